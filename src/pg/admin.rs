//! What the admin API and the command line read and change, on PostgreSQL.

use std::time::Duration;

use tokio_postgres::Row;

use super::PgStore;
use crate::delivery::DeliveryStatus;
use crate::metrics::QueueState;
use crate::store::records::{corrupt, small};
use crate::store::{
    AdminStore, AttemptRow, AuditReport, AuditWalk, DeliveryRow, EndpointRow, EventRow, Result,
    StoredBlock,
};
use crate::watch::Watch;

/// Rows of the event log read per query while auditing.
const AUDIT_PAGE: i64 = 5_000;

fn event_of(r: &Row) -> EventRow {
    EventRow {
        seq: r.get(0),
        id: r.get(1),
        kind: r.get(2),
        body: r.get(3),
        created_at: r.get(4),
    }
}

fn status_code(r: &Row, i: usize) -> Option<u16> {
    r.get::<_, Option<i64>>(i)
        .and_then(|c| u16::try_from(c).ok())
}

impl AdminStore for PgStore {
    fn tip(&self) -> Result<Option<StoredBlock>> {
        PgStore::tip(self)
    }
    fn probe_write(&mut self, _wait: Duration) -> Result<()> {
        // PostgreSQL has no database-wide write lock to wait for: a round trip that starts a
        // writing transaction shows the server takes writes.
        self.conn.transaction(|| {
            self.conn.execute("SELECT txid_current()", &[])?;
            Ok(())
        })
    }
    fn queue_states(&self, now_ms: i64) -> Result<Vec<QueueState>> {
        self.conn
            .query(
                "SELECT ep.name,
                   (SELECT count(*) FROM deliveries d WHERE d.endpoint = ep.name AND d.status IN ('pending','failed')),
                   (SELECT min(e.created_at) FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.endpoint = ep.name AND d.status IN ('pending','failed'))
                 FROM endpoints ep ORDER BY ep.name",
                &[],
            )?
            .iter()
            .map(|r| {
                let oldest: Option<i64> = r.get(2);
                Ok(QueueState {
                    endpoint: r.get(0),
                    waiting: r.get(1),
                    oldest_age_seconds: oldest
                        .map(|t| (now_ms - t).max(0) as f64 / 1000.0)
                        .unwrap_or(0.0),
                })
            })
            .collect()
    }
    fn load_watches(&self) -> Result<Vec<Watch>> {
        PgStore::load_watches(self)
    }
    fn load_watch(&self, id: &str) -> Result<Option<Watch>> {
        PgStore::load_watch(self, id)
    }
    fn upsert_watches(&mut self, watches: &[Watch], source: &str, now_ms: i64) -> Result<()> {
        PgStore::upsert_watches(self, watches, source, now_ms)
    }
    fn remove_watch(&mut self, id: &str) -> Result<bool> {
        self.conn.transaction(|| {
            let removed = self
                .conn
                .execute("DELETE FROM watches WHERE id = $1", &[&id])?
                > 0;
            if removed {
                self.bump_watch_version()?;
            }
            Ok(removed)
        })
    }
    fn request_rescan(&mut self, watch_id: &str, height: u32) -> Result<bool> {
        self.conn.transaction(|| {
            let n = self.conn.execute(
                "UPDATE watches SET rescan_next = $2 WHERE id = $1",
                &[&watch_id, &i64::from(height)],
            )?;
            if n > 0 {
                self.bump_watch_version()?;
            }
            Ok(n > 0)
        })
    }
    fn rescans(&self) -> Result<Vec<(String, u32)>> {
        PgStore::rescans(self)
    }
    fn events_after(&self, after: i64, limit: i64) -> Result<Vec<EventRow>> {
        Ok(self
            .conn
            .query(
                "SELECT seq, id, type, body, created_at FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &limit],
            )?
            .iter()
            .map(event_of)
            .collect())
    }
    fn event_by_id(&self, id: &str) -> Result<Option<EventRow>> {
        Ok(self
            .conn
            .query_opt(
                "SELECT seq, id, type, body, created_at FROM events WHERE id = $1",
                &[&id],
            )?
            .as_ref()
            .map(event_of))
    }
    fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        endpoint: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>> {
        let status = status.map(|s| s.as_str());
        self.conn
            .query(
                "SELECT e.id, d.event_seq, e.type, d.endpoint, d.status, d.attempts, d.next_attempt_at, d.last_status, d.last_error
                   FROM deliveries d JOIN events e ON e.seq = d.event_seq
                  WHERE ($1::text IS NULL OR d.status = $1) AND ($2::text IS NULL OR d.endpoint = $2)
                  ORDER BY d.event_seq, d.endpoint LIMIT $3",
                &[&status, &endpoint, &limit],
            )?
            .iter()
            .map(|r| {
                let status: String = r.get(4);
                Ok(DeliveryRow {
                    event_id: r.get(0),
                    event_seq: r.get(1),
                    event_type: r.get(2),
                    endpoint: r.get(3),
                    status: DeliveryStatus::parse(&status)
                        .ok_or_else(|| corrupt("delivery status", &status))?,
                    attempts: small(r.get(5), "attempts")?,
                    next_attempt_at: r.get(6),
                    last_status: status_code(r, 7),
                    last_error: r.get(8),
                })
            })
            .collect()
    }
    fn attempts_for(&self, event_id: &str) -> Result<Vec<AttemptRow>> {
        Ok(self
            .conn
            .query(
                "SELECT d.endpoint, a.started_at, a.duration_ms, a.status_code, a.error, a.response_excerpt
                   FROM attempts a JOIN deliveries d ON d.id = a.delivery_id JOIN events e ON e.seq = d.event_seq
                  WHERE e.id = $1 ORDER BY a.id",
                &[&event_id],
            )?
            .iter()
            .map(|r| AttemptRow {
                endpoint: r.get(0),
                started_at: r.get(1),
                duration_ms: r.get(2),
                status_code: status_code(r, 3),
                error: r.get(4),
                response_excerpt: r.get(5),
            })
            .collect())
    }
    fn redeliver(
        &mut self,
        event_id: Option<&str>,
        endpoint: Option<&str>,
        now_ms: i64,
    ) -> Result<usize> {
        let n = match event_id {
            Some(id) => self.conn.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $1, claimed_by = NULL
                  WHERE event_seq = (SELECT seq FROM events WHERE id = $2) AND ($3::text IS NULL OR endpoint = $3)",
                &[&now_ms, &id, &endpoint],
            )?,
            None => self.conn.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $1, claimed_by = NULL
                  WHERE status = 'dead' AND ($2::text IS NULL OR endpoint = $2)",
                &[&now_ms, &endpoint],
            )?,
        };
        Ok(n as usize)
    }
    fn list_endpoints(&self) -> Result<Vec<EndpointRow>> {
        Ok(self
            .conn
            .query(
                "SELECT e.name, e.url, e.enabled, e.disabled_reason,
                   (SELECT count(*) FROM deliveries d WHERE d.endpoint = e.name AND d.status IN ('pending','failed')),
                   (SELECT count(*) FROM deliveries d WHERE d.endpoint = e.name AND d.status = 'dead')
                 FROM endpoints e ORDER BY e.name",
                &[],
            )?
            .iter()
            .map(|r| EndpointRow {
                name: r.get(0),
                url: r.get(1),
                enabled: r.get(2),
                disabled_reason: r.get(3),
                pending: r.get(4),
                dead: r.get(5),
            })
            .collect())
    }
    fn set_endpoint_enabled(
        &mut self,
        name: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<bool> {
        // Enabling by hand is a fresh start: no back-off step carried over.
        let n = self.conn.execute(
            "UPDATE endpoints SET enabled = $2, disabled_reason = $3,
               backoff_step = CASE WHEN $2 THEN 0 ELSE backoff_step END,
               backoff_until = CASE WHEN $2 THEN NULL ELSE backoff_until END,
               failing_since = CASE WHEN $2 THEN NULL ELSE failing_since END,
               failing_alerted = CASE WHEN $2 THEN false ELSE failing_alerted END
             WHERE name = $1",
            &[&name, &enabled, &reason],
        )?;
        Ok(n > 0)
    }
    fn audit(&self) -> Result<AuditReport> {
        // One snapshot for the checkpoint, the rows and the head, though the leader writes on.
        self.conn.snapshot(|| {
            let checkpoint = self.meta("audit_checkpoint")?;
            let mut walk = AuditWalk::start(&self.audit_key, checkpoint.as_deref());
            let mut after = 0i64;
            while !walk.failed() {
                let rows = self.conn.query(
                    "SELECT seq, id, type, body, payload_hash, prev_hash, row_hash FROM events
                      WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &AUDIT_PAGE],
                )?;
                let Some(last) = rows.last() else { break };
                after = last.get(0);
                for r in &rows {
                    walk.push(super::chained_row(r));
                }
            }
            Ok(walk.finish(self.meta("event_head")?, None))
        })
    }
    fn audit_checkpoint(&self) -> Result<Option<i64>> {
        Ok(self
            .meta("audit_checkpoint")?
            .and_then(|c| crate::store::parse_checkpoint(&self.audit_key, &c))
            .map(|(seq, _)| seq))
    }
    fn chain_at(&self, seq: i64) -> Result<Option<String>> {
        let checkpoint = self
            .meta("audit_checkpoint")?
            .and_then(|c| crate::store::parse_checkpoint(&self.audit_key, &c));
        if let Some((s, chain)) = checkpoint {
            if s == seq {
                return Ok(Some(chain));
            }
        }
        Ok(self
            .conn
            .query_opt("SELECT row_hash FROM events WHERE seq = $1", &[&seq])?
            .map(|r| r.get(0)))
    }
    fn record_events(
        &mut self,
        events: Vec<crate::event::NewEvent>,
        now_ms: i64,
    ) -> Result<Vec<crate::store::CommittedEvent>> {
        crate::store::OutboxStore::commit(
            self,
            &crate::changeset::ChangeSet::events(events),
            now_ms,
        )
    }
    fn network_name(&self) -> Result<String> {
        crate::store::OutboxStore::network(self)
    }
}
