//! The delivery outbox: endpoints, due deliveries, attempts.

use rusqlite::{params, Connection, OptionalExtension};

use super::{ChainedRow, Result, Store};
use crate::config::EndpointConfig;
use crate::delivery::{DeliveryStatus, EndpointChanges};
use crate::net::redact_url;

/// A delivery ready to send, with the body it carries.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub delivery_id: i64,
    pub event_seq: i64,
    pub event_id: String,
    pub kind: String,
    pub body: String,
    pub attempts: u32,
    /// When the event was committed (ms).
    pub created_at: i64,
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub started_at_ms: i64,
    pub duration_ms: i64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
    /// Success, or the next attempt time, or dead (`None`).
    pub result: DeliveryResult,
}

impl AttemptOutcome {
    /// What the attempt leaves of its delivery: status, next attempt time and delivery time.
    /// A 410 keeps it failed (queued): disabling the endpoint is the dispatcher's next step.
    pub fn delivery_state(&self) -> (DeliveryStatus, i64, Option<i64>) {
        let at = self.started_at_ms;
        match self.result {
            DeliveryResult::Delivered => (DeliveryStatus::Delivered, at, Some(at)),
            DeliveryResult::RetryAt(t) => (DeliveryStatus::Failed, t, None),
            DeliveryResult::Dead => (DeliveryStatus::Dead, at, None),
            DeliveryResult::EndpointGone => (DeliveryStatus::Failed, at, None),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryResult {
    Delivered,
    RetryAt(i64),
    Dead,
    /// The endpoint answered 410 Gone: disable it, keep the delivery pending.
    EndpointGone,
}

/// A delivery as `deliveries list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryRow {
    pub event_id: String,
    pub event_seq: i64,
    pub event_type: String,
    pub endpoint: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

/// One recorded attempt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptRow {
    pub endpoint: String,
    pub started_at: i64,
    pub duration_ms: i64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

/// What the dispatcher needs of an endpoint's stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointState {
    pub enabled: bool,
    /// Consecutive back-off steps (0: the endpoint answers).
    pub backoff_step: u32,
    /// No request before this (ms), except the one probe that ends the step.
    pub backoff_until: Option<i64>,
    /// Since when every attempt has failed, if they do.
    pub failing_since: Option<i64>,
    /// alert.endpoint_failing was recorded for this failing spell.
    pub failing_alerted: bool,
}

/// An endpoint as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointRow {
    pub name: String,
    pub url: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub pending: i64,
    pub dead: i64,
}

impl rusqlite::types::ToSql for DeliveryStatus {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for DeliveryStatus {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = v.as_str()?;
        DeliveryStatus::parse(s).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(format!("unknown delivery status {s:?}").into())
        })
    }
}

/// Says, loudly, that a delivery is held because its event fails its audit check.
pub(crate) fn report_held(endpoint: &str, d: &DueDelivery, why: &str) {
    tracing::error!(
        endpoint,
        event = %d.event_id,
        seq = d.event_seq,
        problem = why,
        "event body fails its audit check; delivery held, not sent (run `chainwatch audit verify`)"
    );
}

/// Disables endpoints, with the reason shown in `endpoints list` and `/health`.
pub(super) fn write_endpoints(tx: &rusqlite::Connection, changes: &EndpointChanges) -> Result<()> {
    for (name, reason) in &changes.disabled {
        tx.execute(
            "UPDATE endpoints SET enabled = 0, disabled_reason = ?2 WHERE name = ?1",
            params![name, reason],
        )?;
    }
    Ok(())
}

impl Store {
    pub(super) fn load_filters(&mut self) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, events FROM endpoints ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut filters = Vec::new();
        for row in rows {
            let (name, events) = row?;
            filters.push((name, serde_json::from_str(&events).unwrap_or_default()));
        }
        drop(stmt);
        self.filters = filters;
        Ok(())
    }

    /// Makes the endpoints table match the config (new ones added, filters and urls updated).
    pub fn sync_endpoints(&mut self, endpoints: &[EndpointConfig]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for e in endpoints {
            tx.execute(
                "INSERT INTO endpoints (name, url, events) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET url = excluded.url, events = excluded.events",
                params![
                    e.name,
                    redact_url(&e.url),
                    serde_json::to_string(&e.events).expect("globs serialise")
                ],
            )?;
        }
        // Stores written before URLs were redacted may still hold credentials: rewrite them.
        let stored: Vec<(String, String)> = {
            let mut stmt = tx.prepare("SELECT name, url FROM endpoints")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (name, url) in stored {
            let shown = redact_url(&url);
            if shown != url {
                tx.execute(
                    "UPDATE endpoints SET url = ?2 WHERE name = ?1",
                    params![name, shown],
                )?;
            }
        }
        let names: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
        let names_json = serde_json::to_string(&names).expect("names serialise");
        // Endpoints removed from the config stop receiving new deliveries; old rows stay for the record.
        tx.execute(
            "UPDATE endpoints SET events = '[]' WHERE name NOT IN (SELECT value FROM json_each(?1))",
            [names_json],
        )?;
        tx.commit()?;
        self.load_filters()
    }

    /// Since when the endpoint has failed without a success in between, if it is failing.
    pub fn failing_since(&self, name: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT failing_since FROM endpoints WHERE name = ?1",
                [name],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten())
    }

    pub fn endpoint_state(&self, name: &str) -> Result<EndpointState> {
        read_endpoint_state(&self.conn, name)
    }

    /// Puts the endpoint on back-off step `step` until `until` (step 0: it answers again).
    pub fn set_endpoint_backoff(&self, name: &str, step: u32, until: Option<i64>) -> Result<()> {
        self.conn.execute(
            "UPDATE endpoints SET backoff_step = ?2, backoff_until = ?3 WHERE name = ?1",
            params![name, step, until],
        )?;
        Ok(())
    }

    pub fn set_failing_alerted(&self, name: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE endpoints SET failing_alerted = 1 WHERE name = ?1",
            [name],
        )?;
        Ok(())
    }

    pub fn endpoint_enabled(&self, name: &str) -> Result<bool> {
        Ok(self.endpoint_state(name)?.enabled)
    }

    pub fn set_endpoint_enabled(
        &self,
        name: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<bool> {
        // Enabling by hand is a fresh start: the next delivery goes out at once, not after
        // the back-off step the endpoint was on.
        let n = self.conn.execute(
            "UPDATE endpoints SET enabled = ?2, disabled_reason = ?3,
               backoff_step = CASE WHEN ?2 THEN 0 ELSE backoff_step END,
               backoff_until = CASE WHEN ?2 THEN NULL ELSE backoff_until END,
               failing_since = CASE WHEN ?2 THEN NULL ELSE failing_since END,
               failing_alerted = CASE WHEN ?2 THEN 0 ELSE failing_alerted END
             WHERE name = ?1",
            params![name, enabled, reason],
        )?;
        Ok(n > 0)
    }

    pub fn list_endpoints(&self) -> Result<Vec<EndpointRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT e.name, e.url, e.enabled, e.disabled_reason,
               (SELECT count(*) FROM deliveries d WHERE d.endpoint = e.name AND d.status IN ('pending','failed')),
               (SELECT count(*) FROM deliveries d WHERE d.endpoint = e.name AND d.status = 'dead')
             FROM endpoints e ORDER BY e.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(EndpointRow {
                name: r.get(0)?,
                url: r.get(1)?,
                enabled: r.get(2)?,
                disabled_reason: r.get(3)?,
                pending: r.get(4)?,
                dead: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deliveries of `endpoint` that may be sent now. Ordered endpoints get only their head,
    /// and only when it is due, so a failing head holds back the ones behind it.
    pub fn due_deliveries(
        &self,
        endpoint: &str,
        now_ms: i64,
        ordered: bool,
        limit: u32,
    ) -> Result<Vec<DueDelivery>> {
        // Each status is read along its own index; `status IN (...)` with an ORDER BY would sort
        // the endpoint's whole queue on every call.
        const COLS: &str = "d.id, d.event_seq, e.id AS eid, e.body, d.attempts, d.next_attempt_at, e.type, e.created_at, e.payload_hash, e.prev_hash, e.row_hash";
        let sql = if ordered {
            format!(
                "SELECT * FROM (
                   SELECT * FROM (SELECT {COLS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.endpoint = ?1 AND d.status = 'pending' ORDER BY d.event_seq LIMIT 1)
                   UNION ALL
                   SELECT * FROM (SELECT {COLS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.endpoint = ?1 AND d.status = 'failed' ORDER BY d.event_seq LIMIT 1)
                   ORDER BY event_seq LIMIT 1)
                 WHERE next_attempt_at <= ?2 LIMIT ?3"
            )
        } else {
            format!(
                "SELECT * FROM (SELECT {COLS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                   WHERE d.endpoint = ?1 AND d.status = 'pending' ORDER BY d.event_seq LIMIT ?3) WHERE next_attempt_at <= ?2
                 UNION ALL
                 SELECT * FROM (SELECT {COLS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                   WHERE d.endpoint = ?1 AND d.status = 'failed' AND d.next_attempt_at <= ?2 ORDER BY d.next_attempt_at LIMIT ?3)"
            )
        };
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![endpoint, now_ms, limit], |r| {
            let d = DueDelivery {
                delivery_id: r.get(0)?,
                event_seq: r.get(1)?,
                event_id: r.get(2)?,
                body: r.get(3)?,
                attempts: r.get(4)?,
                kind: r.get(6)?,
                created_at: r.get(7)?,
            };
            let row = ChainedRow {
                seq: d.event_seq,
                id: d.event_id.clone(),
                kind: d.kind.clone(),
                body: d.body.clone(),
                payload_hash: r.get(8)?,
                prev: r.get(9)?,
                chain: r.get(10)?,
            };
            Ok((d, row))
        })?;
        let mut due = Vec::new();
        for row in rows {
            let (d, chained) = row?;
            // Signing an edited body would vouch for it: hold it instead, loudly.
            match chained.check(&self.audit_key) {
                Ok(()) => due.push(d),
                Err(why) => self.hold_delivery(endpoint, &d, why)?,
            }
        }
        due.sort_by_key(|d| d.event_seq);
        due.truncate(limit as usize);
        Ok(due)
    }

    /// Takes a delivery whose event row fails its audit check out of the queue (status
    /// `held`): it is never sent, and `deliveries list --status held` shows why.
    fn hold_delivery(&self, endpoint: &str, d: &DueDelivery, why: &str) -> Result<()> {
        report_held(endpoint, d, why);
        self.conn.execute(
            "UPDATE deliveries SET status = 'held', last_error = ?2 WHERE id = ?1",
            params![d.delivery_id, format!("held: event {why}")],
        )?;
        Ok(())
    }

    /// When the next delivery of `endpoint` falls due (ms), if any is waiting.
    pub fn next_due(&self, endpoint: &str, ordered: bool) -> Result<Option<i64>> {
        let sql = if ordered {
            "SELECT next_attempt_at FROM (
               SELECT * FROM (SELECT event_seq, next_attempt_at FROM deliveries WHERE endpoint = ?1 AND status = 'pending' ORDER BY event_seq LIMIT 1)
               UNION ALL
               SELECT * FROM (SELECT event_seq, next_attempt_at FROM deliveries WHERE endpoint = ?1 AND status = 'failed' ORDER BY event_seq LIMIT 1))
             ORDER BY event_seq LIMIT 1"
        } else {
            "SELECT min(t) FROM (
               SELECT min(next_attempt_at) AS t FROM deliveries WHERE endpoint = ?1 AND status = 'pending'
               UNION ALL
               SELECT min(next_attempt_at) FROM deliveries WHERE endpoint = ?1 AND status = 'failed')"
        };
        Ok(self
            .conn
            .query_row(sql, [endpoint], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten())
    }

    /// Records several attempts in one transaction (one disk sync for many deliveries).
    pub fn record_attempts(
        &mut self,
        endpoint: &str,
        done: &[(DueDelivery, AttemptOutcome)],
    ) -> Result<()> {
        let tx = super::begin(&mut self.conn)?;
        for (d, o) in done {
            record_one(&tx, endpoint, d, o)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        endpoint: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT e.id, d.event_seq, e.type, d.endpoint, d.status, d.attempts, d.next_attempt_at, d.last_status, d.last_error
               FROM deliveries d JOIN events e ON e.seq = d.event_seq
              WHERE (?1 IS NULL OR d.status = ?1) AND (?2 IS NULL OR d.endpoint = ?2)
              ORDER BY d.event_seq, d.endpoint LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![status, endpoint, limit], |r| {
            Ok(DeliveryRow {
                event_id: r.get(0)?,
                event_seq: r.get(1)?,
                event_type: r.get(2)?,
                endpoint: r.get(3)?,
                status: r.get(4)?,
                attempts: r.get(5)?,
                next_attempt_at: r.get(6)?,
                last_status: r.get(7)?,
                last_error: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Puts deliveries of an event (or all dead ones) back in the queue. Returns how many.
    pub fn redeliver(
        &self,
        event_id: Option<&str>,
        endpoint: Option<&str>,
        now_ms: i64,
    ) -> Result<usize> {
        let n = match event_id {
            Some(id) => self.conn.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?1
                  WHERE event_seq = (SELECT seq FROM events WHERE id = ?2) AND (?3 IS NULL OR endpoint = ?3)",
                params![now_ms, id, endpoint],
            )?,
            None => self.conn.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?1
                  WHERE status = 'dead' AND (?2 IS NULL OR endpoint = ?2)",
                params![now_ms, endpoint],
            )?,
        };
        Ok(n)
    }

    /// Every attempt to deliver an event, oldest first.
    pub fn attempts_for(&self, event_id: &str) -> Result<Vec<AttemptRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT d.endpoint, a.started_at, a.duration_ms, a.status_code, a.error, a.response_excerpt
               FROM attempts a JOIN deliveries d ON d.id = a.delivery_id JOIN events e ON e.seq = d.event_seq
              WHERE e.id = ?1 ORDER BY a.id",
        )?;
        let rows = stmt.query_map([event_id], |r| {
            Ok(AttemptRow {
                endpoint: r.get(0)?,
                started_at: r.get(1)?,
                duration_ms: r.get(2)?,
                status_code: r.get(3)?,
                error: r.get(4)?,
                response_excerpt: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Per endpoint: deliveries waiting, and the age of the oldest one's event at `now_ms`.
    pub fn queue_states(&self, now_ms: i64) -> Result<Vec<crate::metrics::QueueState>> {
        let mut stmt = self.conn.prepare(
            "SELECT ep.name,
               (SELECT count(*) FROM deliveries d WHERE d.endpoint = ep.name AND d.status IN ('pending','failed')),
               (SELECT min(e.created_at) FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.endpoint = ep.name AND d.status IN ('pending','failed'))
             FROM endpoints ep ORDER BY ep.name",
        )?;
        let rows = stmt.query_map([], |r| {
            let oldest: Option<i64> = r.get(2)?;
            Ok(crate::metrics::QueueState {
                endpoint: r.get(0)?,
                waiting: r.get(1)?,
                oldest_age_seconds: oldest
                    .map(|t| (now_ms - t).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

fn record_one(
    tx: &rusqlite::Connection,
    endpoint: &str,
    d: &DueDelivery,
    o: &AttemptOutcome,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO attempts (delivery_id, started_at, duration_ms, status_code, error, response_excerpt)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![d.delivery_id, o.started_at_ms, o.duration_ms, o.status_code, o.error, o.response_excerpt])?;
    let (status, next, delivered_at) = o.delivery_state();
    tx.prepare_cached(
        "UPDATE deliveries SET status = ?2, attempts = attempts + 1, next_attempt_at = ?3,
           last_status = ?4, last_error = ?5, delivered_at = ?6 WHERE id = ?1",
    )?
    .execute(params![
        d.delivery_id,
        status,
        next,
        o.status_code,
        o.error,
        delivered_at
    ])?;
    match o.result {
        DeliveryResult::Delivered => tx
            .prepare_cached(
                "UPDATE endpoints SET last_success_at = ?2, failing_since = NULL, failing_alerted = 0 WHERE name = ?1",
            )?
            .execute(params![endpoint, o.started_at_ms])?,
        // Disabling for 410 is the dispatcher's next step, together with its alert.
        DeliveryResult::EndpointGone => 0,
        _ => tx
            .prepare_cached(
                "UPDATE endpoints SET failing_since = coalesce(failing_since, ?2) WHERE name = ?1",
            )?
            .execute(params![endpoint, o.started_at_ms])?,
    };
    Ok(())
}

/// Endpoint `name`'s stored state, on `conn` (inside a transaction, if it is in one); an
/// endpoint not stored reads as disabled.
pub(crate) fn read_endpoint_state(conn: &Connection, name: &str) -> Result<EndpointState> {
    Ok(conn
        .query_row(
            "SELECT enabled, backoff_step, backoff_until, failing_since, failing_alerted
               FROM endpoints WHERE name = ?1",
            [name],
            |r| {
                Ok(EndpointState {
                    enabled: r.get(0)?,
                    backoff_step: r.get(1)?,
                    backoff_until: r.get(2)?,
                    failing_since: r.get(3)?,
                    failing_alerted: r.get(4)?,
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}
