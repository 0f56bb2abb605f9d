//! Retention: old attempt records and delivered delivery rows are pruned, and optionally the
//! oldest events, in small batches so a writer never waits long. Pruned events leave a keyed
//! checkpoint, so the rest of the log still verifies.

use std::time::Duration;

use rusqlite::params;

use super::audit::{chained_row, checkpoint, read_checkpoint, ChainedRow, ROW_COLUMNS};
use super::{Result, Store};

/// How long records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Attempts, and delivery rows that were delivered, older than this go.
    pub attempts: Duration,
    /// Events older than this go, once none of their deliveries is pending, failed or held
    /// (never the newest).
    pub events: Option<Duration>,
}

/// What one batch removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub attempts: usize,
    pub deliveries: usize,
    pub events: usize,
}

impl Pruned {
    pub fn is_empty(&self) -> bool {
        self.attempts + self.deliveries + self.events == 0
    }

    pub fn merge(&mut self, other: Pruned) {
        self.attempts += other.attempts;
        self.deliveries += other.deliveries;
        self.events += other.events;
    }
}

/// What keeps the oldest event from going.
pub(crate) struct Kept {
    /// The newest sequence (never pruned: the log's head must stay).
    pub newest: i64,
    /// Events created before this (ms) may go.
    pub cutoff: i64,
    /// Its deliveries still pending, failed or held.
    pub open_deliveries: i64,
}

/// Whether the oldest remaining event (`row`, linked to `prev`) may be pruned. Only a prefix
/// goes, so the rest still chains from the checkpoint; a row that fails its audit check is
/// evidence and is never pruned (retention stops there, loudly).
pub(crate) fn may_prune(
    row: &ChainedRow,
    created_at: i64,
    kept: &Kept,
    prev: &str,
    key: &super::AuditKey,
) -> bool {
    // A delivery still under way, or held as evidence, keeps its event. A dead one does not:
    // past the retention period it is given up, or pruning would stall behind it for good.
    if row.seq >= kept.newest || created_at >= kept.cutoff || kept.open_deliveries > 0 {
        return false;
    }
    let linked = if row.prev == prev {
        Ok(())
    } else {
        Err("its previous chain value does not match the row before")
    };
    if let Err(why) = linked.and_then(|()| row.check(key)) {
        tracing::error!(
            seq = row.seq,
            problem = why,
            "retention stops at a row that fails its audit check; run `chainwatch audit verify`"
        );
        return false;
    }
    true
}

impl Store {
    /// Removes at most `batch` rows of each kind that the policy lets go, in one transaction.
    pub fn prune_batch(
        &mut self,
        policy: &RetentionPolicy,
        now_ms: i64,
        batch: usize,
    ) -> Result<Pruned> {
        let key = self.audit_key.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let cutoff = now_ms - policy.attempts.as_millis() as i64;
        // Attempt ids grow with time: walk from the oldest and stop at the first one to keep.
        let attempts = tx.execute(
            "DELETE FROM attempts WHERE id IN (
               SELECT id FROM (SELECT id, started_at FROM attempts ORDER BY id LIMIT ?2)
                WHERE started_at < ?1)",
            params![cutoff, batch as i64],
        )?;
        let done: Vec<i64> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM deliveries WHERE status = 'delivered' AND delivered_at < ?1
                  ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cutoff, batch as i64], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for id in &done {
            tx.execute("DELETE FROM attempts WHERE delivery_id = ?1", [id])?;
            tx.execute("DELETE FROM deliveries WHERE id = ?1", [id])?;
        }
        let mut events = 0;
        if let Some(keep) = policy.events {
            let cutoff = now_ms - keep.as_millis() as i64;
            let newest: i64 =
                tx.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
            let oldest: Vec<(ChainedRow, i64)> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT {ROW_COLUMNS}, created_at FROM events ORDER BY seq LIMIT ?1"
                ))?;
                let rows = stmt.query_map([batch as i64], |r| Ok((chained_row(r)?, r.get(7)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            // A checkpoint that does not verify gives no link: pruning then stops at once.
            let mut prev = read_checkpoint(&tx, &key)?
                .map(|(_, chain)| chain)
                .unwrap_or_default();
            let mut last = None;
            for (row, created_at) in oldest {
                let open: i64 = tx.query_row(
                    "SELECT count(*) FROM deliveries WHERE event_seq = ?1 AND status IN ('pending', 'failed', 'held')",
                    [row.seq],
                    |r| r.get(0),
                )?;
                let kept = Kept {
                    newest,
                    cutoff,
                    open_deliveries: open,
                };
                if !may_prune(&row, created_at, &kept, &prev, &key) {
                    break;
                }
                let (seq, chain) = (row.seq, row.chain.clone());
                prev = row.chain;
                tx.execute(
                    "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_seq = ?1)",
                    [seq],
                )?;
                tx.execute("DELETE FROM deliveries WHERE event_seq = ?1", [seq])?;
                tx.execute("DELETE FROM events WHERE seq = ?1", [seq])?;
                last = Some((seq, chain));
                events += 1;
            }
            if let Some((seq, chain)) = last {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('audit_checkpoint', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [checkpoint(&key, seq, &chain)],
                )?;
            }
        }
        tx.commit()?;
        Ok(Pruned {
            attempts,
            deliveries: done.len(),
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changeset::ChangeSet;
    use crate::event::{other_event, ALERT_REORG};
    use crate::store::{AttemptOutcome, DeliveryResult};

    const DAY: i64 = 86_400_000;

    fn store(dir: &std::path::Path) -> Store {
        crate::store::test_store(dir)
    }

    /// Records `n` events at `at` and delivers all but the last `open` of them.
    fn events_at(store: &mut Store, at: i64, n: usize, open: usize, tag: &str) {
        let events = (0..n)
            .map(|i| {
                let f = serde_json::json!({ "i": i }).as_object().unwrap().clone();
                other_event(ALERT_REORG, &format!("{tag}-{i}"), "regtest", f)
            })
            .collect();
        store.commit(&ChangeSet::events(events), at).unwrap();
        let before: i64 = store
            .conn
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
            - n as i64;
        let due = store.due_deliveries("shop", at, false, 10_000).unwrap();
        let delivered: Vec<_> = due
            .into_iter()
            .filter(|d| d.event_seq > before)
            .take(n - open)
            .map(|d| {
                let o = AttemptOutcome {
                    started_at_ms: at,
                    duration_ms: 1,
                    status_code: Some(204),
                    error: None,
                    response_excerpt: None,
                    result: DeliveryResult::Delivered,
                };
                (d, o)
            })
            .collect();
        store.record_attempts("shop", &delivered).unwrap();
    }

    fn count(store: &Store, table: &str) -> i64 {
        store
            .conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn old_attempts_and_delivered_rows_go_in_batches_and_recent_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        let now = 100 * DAY;
        events_at(&mut s, now - 40 * DAY, 25, 0, "old");
        events_at(&mut s, now - DAY, 5, 0, "new");
        let policy = RetentionPolicy {
            attempts: Duration::from_secs(30 * 86_400),
            events: None,
        };
        let first = s.prune_batch(&policy, now, 10).unwrap();
        assert_eq!(
            (first.attempts, first.deliveries),
            (10, 10),
            "one batch of each"
        );
        let mut total = first;
        loop {
            let p = s.prune_batch(&policy, now, 10).unwrap();
            if p.is_empty() {
                break;
            }
            total.merge(p);
        }
        assert_eq!(
            (total.attempts, total.deliveries, total.events),
            (25, 25, 0)
        );
        assert_eq!(count(&s, "attempts"), 5, "the recent attempts stay");
        assert_eq!(
            count(&s, "events"),
            30,
            "events stay without an events policy"
        );
        assert_eq!(s.audit().unwrap().problem, None);
    }

    #[test]
    fn old_events_go_from_the_front_and_the_log_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        let now = 1000 * DAY;
        events_at(&mut s, now - 400 * DAY, 10, 0, "a");
        events_at(&mut s, now - 390 * DAY, 5, 2, "b"); // two still waiting: the prefix stops there
        events_at(&mut s, now - 380 * DAY, 5, 0, "c");
        let head_before = s.audit().unwrap().head.unwrap();
        let policy = RetentionPolicy {
            attempts: Duration::from_secs(30 * 86_400),
            events: Some(Duration::from_secs(365 * 86_400)),
        };
        while !s.prune_batch(&policy, now, 4).unwrap().is_empty() {}
        assert_eq!(
            count(&s, "events"),
            7,
            "15 pruned up to the first undelivered one"
        );
        let r = s.audit().unwrap();
        assert_eq!(r.problem, None, "the rest verifies from the checkpoint");
        assert_eq!(r.head, Some(head_before), "the head is unchanged");
        assert!(
            s.chain_at(13).unwrap().is_some(),
            "the checkpoint answers for its sequence"
        );

        // A forged checkpoint is found.
        s.conn
            .execute(
                "UPDATE meta SET value = '13|00|00' WHERE key = 'audit_checkpoint'",
                [],
            )
            .unwrap();
        assert!(s.audit().unwrap().problem.is_some());
    }

    #[test]
    fn rows_under_way_held_or_failing_their_check_are_never_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        let now = 1000 * DAY;
        events_at(&mut s, now - 400 * DAY, 6, 0, "a");
        events_at(&mut s, now - 399 * DAY, 2, 0, "b");
        s.conn
            .execute(
                "UPDATE deliveries SET status = 'held' WHERE event_seq = 5",
                [],
            )
            .unwrap();
        s.conn
            .execute(
                "UPDATE deliveries SET status = 'dead' WHERE event_seq = 2",
                [],
            )
            .unwrap();
        s.conn
            .execute(
                "UPDATE events SET body = replace(body, '\"i\":2', '\"i\":9') WHERE seq = 3",
                [],
            )
            .unwrap();
        let policy = RetentionPolicy {
            attempts: Duration::from_secs(86_400),
            events: Some(Duration::from_secs(86_400)),
        };
        while !s.prune_batch(&policy, now, 100).unwrap().is_empty() {}
        assert_eq!(count(&s, "events"), 6, "pruning stops at the edited row 3");
        let (seq, _) = s
            .audit()
            .unwrap()
            .problem
            .expect("the edit is still reported");
        assert_eq!(seq, 3);
        s.conn
            .execute(
                "UPDATE events SET body = replace(body, '\"i\":9', '\"i\":2') WHERE seq = 3",
                [],
            )
            .unwrap();
        while !s.prune_batch(&policy, now, 100).unwrap().is_empty() {}
        assert_eq!(
            count(&s, "events"),
            4,
            "then at the held delivery of row 5 (the dead one of row 2 did not stop it)"
        );
        assert_eq!(s.audit().unwrap().problem, None);
    }

    #[test]
    fn atomically_commits_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        events_at(&mut s, DAY, 1, 0, "a");
        let step = |tag: &str| {
            ChangeSet::events(vec![other_event(
                ALERT_REORG,
                tag,
                "regtest",
                serde_json::Map::new(),
            )])
        };
        let failed: Result<()> = s.atomically(|s| {
            s.commit(&step("inner"), DAY)?;
            Err(crate::store::StoreError::Corrupt(
                "a later write failed".into(),
            ))
        });
        assert!(failed.is_err());
        assert_eq!(
            count(&s, "events"),
            1,
            "the inner write was rolled back with it"
        );
        s.atomically(|s| s.commit(&step("both"), DAY).map(|_| ()))
            .unwrap();
        assert_eq!(count(&s, "events"), 2);
        assert_eq!(s.audit().unwrap().problem, None);
    }

    #[test]
    fn the_newest_event_is_never_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        let now = 1000 * DAY;
        events_at(&mut s, now - 400 * DAY, 3, 0, "a");
        let policy = RetentionPolicy {
            attempts: Duration::from_secs(86_400),
            events: Some(Duration::from_secs(86_400)),
        };
        while !s.prune_batch(&policy, now, 100).unwrap().is_empty() {}
        assert_eq!(
            count(&s, "events"),
            1,
            "the newest stays, so sequences go on"
        );
        events_at(&mut s, now, 1, 0, "b");
        let r = s.audit().unwrap();
        assert_eq!((r.problem, r.head.map(|h| h.0)), (None, Some(4)));
    }
}
