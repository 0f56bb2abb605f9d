//! Retention on PostgreSQL: the same policy as SQLite's, pruned by one instance at a time.

use super::PgStore;
use crate::store::retention::{may_prune, Kept};
use crate::store::{checkpoint, Pruned, Result, RetentionPolicy, RetentionStore};

/// Held while pruning, so instances take turns ("chainwatch" + 2).
const RETENTION_LOCK: i64 = 0x6368_6169_6e79;

impl RetentionStore for PgStore {
    fn prune_batch(
        &mut self,
        policy: &RetentionPolicy,
        now_ms: i64,
        batch: usize,
    ) -> Result<Pruned> {
        self.conn.transaction(|| {
            let ours: bool = self
                .conn
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])?
                .get(0);
            if !ours {
                return Ok(Pruned::default());
            }
            let (cutoff, batch) = (now_ms - policy.attempts.as_millis() as i64, batch as i64);
            // Attempt ids grow with time: walk from the oldest and stop at the first one to keep.
            let attempts = self.conn.execute(
                "DELETE FROM attempts WHERE id IN (
                   SELECT id FROM (SELECT id, started_at FROM attempts ORDER BY id LIMIT $2) a
                    WHERE started_at < $1)",
                &[&cutoff, &batch],
            )?;
            let done: Vec<i64> = self
                .conn
                .query(
                    "SELECT id FROM deliveries WHERE status = 'delivered' AND delivered_at < $1
                      ORDER BY id LIMIT $2",
                    &[&cutoff, &batch],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            self.conn
                .execute("DELETE FROM attempts WHERE delivery_id = ANY($1)", &[&done])?;
            self.conn
                .execute("DELETE FROM deliveries WHERE id = ANY($1)", &[&done])?;
            let events = match policy.events {
                Some(keep) => self.prune_events(now_ms - keep.as_millis() as i64, batch)?,
                None => 0,
            };
            Ok(Pruned {
                attempts: attempts as usize,
                deliveries: done.len(),
                events,
            })
        })
    }
}

impl PgStore {
    /// The oldest events created before `cutoff`, as a prefix, leaving a keyed checkpoint.
    fn prune_events(&self, cutoff: i64, batch: i64) -> Result<usize> {
        let key = &self.audit_key;
        let newest: i64 = self
            .conn
            .query_one("SELECT coalesce(max(seq), 0) FROM events", &[])?
            .get(0);
        let oldest = self.conn.query(
            "SELECT seq, id, type, body, payload_hash, prev_hash, row_hash, created_at,
               (SELECT count(*) FROM deliveries d WHERE d.event_seq = e.seq
                  AND d.status IN ('pending', 'failed', 'held'))
             FROM events e ORDER BY seq LIMIT $1",
            &[&batch],
        )?;
        // A checkpoint that does not verify gives no link: pruning then stops at once.
        let mut prev = self
            .meta("audit_checkpoint")?
            .and_then(|c| crate::store::parse_checkpoint(key, &c))
            .map(|(_, chain)| chain)
            .unwrap_or_default();
        let mut last = None;
        let mut pruned = 0;
        for r in &oldest {
            let row = super::chained_row(r);
            let kept = Kept {
                newest,
                cutoff,
                open_deliveries: r.get(8),
            };
            if !may_prune(&row, r.get(7), &kept, &prev, key) {
                break;
            }
            self.conn.execute(
                "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_seq = $1)",
                &[&row.seq],
            )?;
            self.conn
                .execute("DELETE FROM deliveries WHERE event_seq = $1", &[&row.seq])?;
            self.conn
                .execute("DELETE FROM events WHERE seq = $1", &[&row.seq])?;
            prev = row.chain.clone();
            last = Some((row.seq, row.chain));
            pruned += 1;
        }
        if let Some((seq, chain)) = last {
            self.set_meta("audit_checkpoint", &checkpoint(key, seq, &chain))?;
        }
        Ok(pruned)
    }
}
