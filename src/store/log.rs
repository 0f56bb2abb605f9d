//! Appending to the keyed, hash-chained event log, whichever backend holds it: the backend
//! writes rows (`EventLog`), this decides their sequence numbers, bodies, chain values and
//! deliveries.

use std::collections::HashSet;

use super::audit::ChainedRow;
use super::{sha256_hex, AuditKey, CommittedEvent, Result};
use crate::event::{type_matches, webhook_body, NewEvent, WEBHOOK_TEST};

/// The writes of one append, inside the caller's transaction.
pub trait EventLog {
    /// The newest row's sequence and chain value (0 and "" for an empty log).
    fn newest(&mut self) -> Result<(i64, String)>;
    /// Which of `ids` are recorded already.
    fn recorded(&mut self, ids: &[&str]) -> Result<HashSet<String>>;
    /// Inserts new rows (their ids are not recorded) and their deliveries (sequence, endpoint).
    fn insert(
        &mut self,
        rows: &[ChainedRow],
        deliveries: &[(i64, &str)],
        now_ms: i64,
    ) -> Result<()>;
    /// Where an upgrade found the old unkeyed chain broken, if it did.
    fn legacy_break(&mut self) -> Result<Option<i64>>;
    fn set_head(&mut self, head: &str) -> Result<()>;
}

/// Endpoint name → event-type globs, as each backend keeps them.
pub type Filters = [(String, Vec<String>)];

/// The endpoints that may get a delivery of one of `events`: a few more than `append_events`
/// writes for (routes are not looked at), never fewer.
pub(crate) fn may_deliver<'a>(
    filters: &'a Filters,
    events: &'a [NewEvent],
) -> impl Iterator<Item = &'a str> {
    filters
        .iter()
        .filter(|(_, globs)| {
            events
                .iter()
                .any(|e| e.kind == WEBHOOK_TEST || globs.iter().any(|g| type_matches(g, e.kind)))
        })
        .map(|(name, _)| name.as_str())
}

/// Whether any endpoint's filter takes events of type `kind`.
pub fn wanted(filters: &Filters, kind: &str) -> bool {
    filters
        .iter()
        .any(|(_, globs)| globs.iter().any(|g| type_matches(g, kind)))
}

/// Rows handed to the log at once: a store that sends them without waiting for the answer
/// (PostgreSQL's pipeline) writes one chunk while the next is built.
const INSERT_CHUNK: usize = 250;

/// Appends `events` after the newest row, each with a delivery per endpoint whose filter
/// takes its type (`filters`: endpoint name and event-type globs).
pub fn append_events(
    log: &mut impl EventLog,
    filters: &Filters,
    key: &AuditKey,
    events: &[NewEvent],
    now_ms: i64,
) -> Result<Vec<CommittedEvent>> {
    if events.is_empty() {
        return Ok(vec![]);
    }
    let (mut seq, mut prev_hash) = log.newest()?;
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let mut seen = log.recorded(&ids)?;
    let timestamp = crate::event::rfc3339(
        time::OffsetDateTime::from_unix_timestamp(now_ms / 1000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    );
    let (mut rows, mut deliveries, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for e in events {
        if !seen.insert(e.id.clone()) {
            // Deterministic ids make a replayed step harmless: the event is already logged.
            tracing::warn!(id = %e.id, kind = e.kind, "event already recorded; not repeated");
            continue;
        }
        seq += 1;
        let body = webhook_body(e, seq, &timestamp);
        let mut row = ChainedRow {
            seq,
            id: e.id.clone(),
            kind: e.kind.to_string(),
            payload_hash: sha256_hex(body.as_bytes()),
            body,
            prev: prev_hash,
            chain: String::new(),
        };
        row.chain = key.chain(&row);
        prev_hash = row.chain.clone();
        for (name, globs) in filters {
            let routed = e.routes.as_ref().is_none_or(|r| r.contains(name));
            // A test event is asked for by name: it goes whatever the endpoint's filter says.
            let wanted = e.kind == WEBHOOK_TEST || globs.iter().any(|g| type_matches(g, e.kind));
            if routed && wanted {
                deliveries.push((seq, name.as_str()));
            }
        }
        out.push(CommittedEvent {
            seq,
            id: e.id.clone(),
            kind: e.kind.to_string(),
            handed_off: false,
        });
        rows.push(row);
        if rows.len() == INSERT_CHUNK {
            log.insert(&rows, &deliveries, now_ms)?;
            rows.clear();
            deliveries.clear();
        }
    }
    if out.is_empty() {
        return Ok(out);
    }
    if !rows.is_empty() {
        log.insert(&rows, &deliveries, now_ms)?;
    }
    // The head makes removing the newest rows detectable too: the chain alone ends wherever it is cut.
    let head = key.head(seq, &prev_hash, log.legacy_break()?);
    log.set_head(&head)?;
    Ok(out)
}
