//! Appending to the keyed, hash-chained event log, whichever backend holds it: the backend
//! writes rows (`EventLog`), this decides their sequence numbers, bodies, chain values and
//! deliveries.

use super::audit::ChainedRow;
use super::{sha256_hex, AuditKey, CommittedEvent, Result};
use crate::event::{type_matches, webhook_body, NewEvent};

/// The writes of one append, inside the caller's transaction.
pub trait EventLog {
    /// The newest row's sequence and chain value (0 and "" for an empty log).
    fn newest(&mut self) -> Result<(i64, String)>;
    /// Inserts the row unless an event with its id is recorded already (false then).
    fn insert_event(&mut self, row: &ChainedRow, now_ms: i64) -> Result<bool>;
    fn insert_delivery(&mut self, seq: i64, endpoint: &str, now_ms: i64) -> Result<()>;
    /// Where an upgrade found the old unkeyed chain broken, if it did.
    fn legacy_break(&mut self) -> Result<Option<i64>>;
    fn set_head(&mut self, head: &str) -> Result<()>;
}

/// Appends `events` after the newest row, each with a delivery per endpoint whose filter
/// takes its type (`filters`: endpoint name and event-type globs).
pub fn append_events(
    log: &mut impl EventLog,
    filters: &[(String, Vec<String>)],
    key: &AuditKey,
    events: &[NewEvent],
    now_ms: i64,
) -> Result<Vec<CommittedEvent>> {
    if events.is_empty() {
        return Ok(vec![]);
    }
    let (mut seq, mut prev_hash) = log.newest()?;
    let timestamp = crate::event::rfc3339(
        time::OffsetDateTime::from_unix_timestamp(now_ms / 1000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    );
    let mut out = Vec::new();
    for e in events {
        let next = seq + 1;
        let body = webhook_body(e, next, &timestamp);
        let mut row = ChainedRow {
            seq: next,
            id: e.id.clone(),
            kind: e.kind.to_string(),
            payload_hash: sha256_hex(body.as_bytes()),
            body,
            prev: prev_hash,
            chain: String::new(),
        };
        row.chain = key.chain(&row);
        if !log.insert_event(&row, now_ms)? {
            prev_hash = row.prev;
            // Deterministic ids make a replayed step harmless: the event is already logged.
            tracing::warn!(id = %e.id, kind = e.kind, "event already recorded; not repeated");
            continue;
        }
        seq = next;
        for (name, globs) in filters {
            if globs.iter().any(|g| type_matches(g, e.kind)) {
                log.insert_delivery(seq, name, now_ms)?;
            }
        }
        out.push(CommittedEvent {
            seq,
            id: e.id.clone(),
            kind: e.kind.to_string(),
        });
        prev_hash = row.chain;
    }
    // The head makes removing the newest rows detectable too: the chain alone ends wherever it is cut.
    if let Some(last) = out.last() {
        let head = key.head(last.seq, &prev_hash, log.legacy_break()?);
        log.set_head(&head)?;
    }
    Ok(out)
}
