//! The event log's keyed chain. Each row stores `chain = HMAC(key, seq|id|type|payload_hash|prev)`
//! over the row before's chain value; the head (newest sequence and chain value) carries a MAC of
//! its own. The key lives in a file outside the database, so whoever can edit the database
//! cannot recompute the chain, and a body is checked against its row before it is signed.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use rusqlite::{params, OptionalExtension, Transaction};
use sha2::Sha256;

use super::{sha256_hex, Result, Store, StoreError};

pub use crate::config::AUDIT_KEY_FILE;
const KEY_BYTES: usize = 32;

/// The HMAC key of the event log's chain.
#[derive(Clone)]
pub struct AuditKey {
    key: [u8; KEY_BYTES],
    path: PathBuf,
    /// Made by this open: only a new key may key a log that has none (see `bind_key`).
    created: bool,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey({})", self.path.display())
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::AuditKey {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl AuditKey {
    /// Reads the key file, or creates it (mode 0600, 32 random bytes as hex) when absent.
    pub fn load_or_create(path: &Path) -> Result<AuditKey> {
        match std::fs::read_to_string(path) {
            Ok(text) => AuditKey::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AuditKey::create(path),
            Err(e) => Err(key_error(path, format!("cannot read it: {e}"))),
        }
    }

    fn parse(path: &Path, text: &str) -> Result<AuditKey> {
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == KEY_BYTES)
            .ok_or_else(|| key_error(path, "expected 64 hexadecimal characters (32 bytes)"))?;
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the audit key is readable by others; chmod 600 it");
        }
        let mut key = [0u8; KEY_BYTES];
        key.copy_from_slice(&bytes);
        Ok(AuditKey {
            key,
            path: path.to_path_buf(),
            created: false,
        })
    }

    /// Writes a new key to a temporary file and links it into place, so no one ever reads a
    /// half-written key, and two processes starting at once end up with the same one.
    fn create(path: &Path) -> Result<AuditKey> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            super::create_private_dir(dir)?;
        }
        let key: [u8; KEY_BYTES] = rand::random();
        // Unique per attempt: two openers in one process must not share a temporary file.
        let tmp = path.with_extension(format!("tmp{}", hex::encode(rand::random::<[u8; 8]>())));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
                f.sync_all()
            });
        let linked = written.and_then(|_| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                tracing::debug!(path = %path.display(), "created the audit key of the event log");
                Ok(AuditKey {
                    key,
                    path: path.to_path_buf(),
                    created: true,
                })
            }
            // Another process created it a moment ago: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| key_error(path, format!("cannot read it: {e}")))?;
                AuditKey::parse(path, &text)
            }
            Err(e) => Err(key_error(path, format!("cannot create it: {e}"))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key");
        for p in parts {
            mac.update(p);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// A short public name of the key, stored so a wrong key file is named at start.
    pub fn id(&self) -> String {
        self.mac(&[b"chainwatch audit key id"])[..16].to_string()
    }

    /// The chain value of one row. Each field is length-prefixed, so no two rows' fields can
    /// be re-split into the same input.
    pub fn chain(&self, row: &ChainedRow) -> String {
        let seq = row.seq.to_string();
        let fields = [
            seq.as_str(),
            &row.id,
            &row.kind,
            &row.payload_hash,
            &row.prev,
        ];
        let text: String = fields.iter().map(|f| format!("{}:{f};", f.len())).collect();
        self.mac(&[b"row|", text.as_bytes()])
    }

    /// The stored head: newest sequence, its chain value, and a MAC over both and over the
    /// break an upgrade found (so removing that record is found too).
    pub fn head(&self, seq: i64, chain: &str, legacy_break: Option<i64>) -> String {
        let brk = legacy_break.map_or(String::new(), |b| b.to_string());
        let mac = self.mac(&[format!("head|{seq}|{chain}|{brk}").as_bytes()]);
        format!("{seq}|{chain}|{mac}")
    }
}

/// The fields of an event row that the chain covers.
#[derive(Debug, Clone)]
pub struct ChainedRow {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub body: String,
    pub payload_hash: String,
    pub prev: String,
    pub chain: String,
}

impl ChainedRow {
    /// Whether the body is the one recorded: its hash matches, and the row's chain value is the
    /// keyed one. Checked before every send, so an edited body is never signed.
    pub fn check(&self, key: &AuditKey) -> std::result::Result<(), &'static str> {
        if sha256_hex(self.body.as_bytes()) != self.payload_hash {
            return Err("its body does not match its payload hash: the row was edited");
        }
        if key.chain(self) != self.chain {
            return Err("its chain value does not match its contents under the audit key: the row was edited or re-chained");
        }
        // The webhook-id header comes from the row; it must be the id the body states.
        let body: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        if body["data"]["id"] != self.id.as_str() || body["type"] != self.kind.as_str() {
            return Err("its id or type differs from the body's: the row was edited");
        }
        Ok(())
    }
}

/// The result of walking the chain: rows verified, and the first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    pub verified: i64,
    pub problem: Option<(i64, String)>,
    /// The newest (sequence, chain value), to anchor elsewhere.
    pub head: Option<(i64, String)>,
}

pub(super) const ROW_COLUMNS: &str = "seq, id, type, body, payload_hash, prev_hash, row_hash";

pub(super) fn chained_row(r: &rusqlite::Row) -> rusqlite::Result<ChainedRow> {
    Ok(ChainedRow {
        seq: r.get(0)?,
        id: r.get(1)?,
        kind: r.get(2)?,
        body: r.get(3)?,
        payload_hash: r.get(4)?,
        prev: r.get(5)?,
        chain: r.get(6)?,
    })
}

/// The first-round chain (unkeyed SHA-256), checked once when a store is upgraded.
fn legacy_row_hash(r: &ChainedRow) -> String {
    let text = format!(
        "{}|{}|{}|{}|{}",
        r.seq, r.id, r.kind, r.payload_hash, r.prev
    );
    sha256_hex(text.as_bytes())
}

/// Binds the store to its audit key: checks the key is the one the log was chained with, and
/// re-chains a store from before keyed chains (once, after checking the old chain).
pub(super) fn bind_key(store: &mut Store) -> Result<()> {
    let key = store.audit_key.clone();
    // The usual case, a bound store and its key, needs no write lock: read-only commands and
    // other connections must not contend with the daemon's writes.
    if store.meta("audit_key_id")?.as_deref() == Some(key.id().as_str()) {
        return Ok(());
    }
    let tx = store
        .conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let stored_id: Option<String> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'audit_key_id'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match stored_id {
        Some(id) if id == key.id() => return Ok(()),
        Some(id) => {
            return Err(key_error(
                key.path(),
                format!("this is not the key the event log was chained with (key id {id}); restore that key file"),
            ))
        }
        None => {}
    }
    let events: i64 = tx.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    // An existing key with an unkeyed log means the log's binding was removed: re-chaining
    // now would vouch for whatever was edited meanwhile. Only a key made for this log may.
    if events > 0 && !key.created {
        return Err(key_error(
            key.path(),
            "the event log has events but no record of this key: its binding was removed from the database. Restore the database from a backup (or, for a store from before keyed chains, move this key file away so a new one is made)",
        ));
    }
    upgrade_legacy_chain(&tx, &key)?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('audit_key_id', ?1)",
        [key.id()],
    )?;
    tx.commit()?;
    Ok(())
}

/// Re-chains every row under the key. A break in the old chain is kept in `meta` so that
/// `audit verify` keeps reporting it: re-chaining must not launder an earlier edit.
fn upgrade_legacy_chain(tx: &Transaction, key: &AuditKey) -> Result<()> {
    let rows: Vec<ChainedRow> = {
        let mut stmt = tx.prepare(&format!("SELECT {ROW_COLUMNS} FROM events ORDER BY seq"))?;
        let rows = stmt.query_map([], chained_row)?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if rows.is_empty() {
        return Ok(());
    }
    let mut legacy_break = None;
    let mut prev_legacy = String::new();
    for (i, r) in rows.iter().enumerate() {
        let ok = r.seq == i as i64 + 1
            && r.prev == prev_legacy
            && sha256_hex(r.body.as_bytes()) == r.payload_hash
            && legacy_row_hash(r) == r.chain;
        if !ok && legacy_break.is_none() {
            legacy_break = Some(r.seq);
        }
        prev_legacy = r.chain.clone();
    }
    let mut update =
        tx.prepare("UPDATE events SET prev_hash = ?2, row_hash = ?3 WHERE seq = ?1")?;
    let mut prev = String::new();
    for r in &rows {
        let row = ChainedRow {
            prev: prev.clone(),
            ..r.clone()
        };
        let chain = key.chain(&row);
        update.execute(params![r.seq, prev, chain])?;
        prev = chain;
    }
    let last = rows.last().expect("non-empty").seq;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('event_head', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key.head(last, &prev, legacy_break)],
    )?;
    if let Some(seq) = legacy_break {
        tracing::error!(seq, "the event log's old (unkeyed) chain was broken before it was keyed; `audit verify` reports it");
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('audit_legacy_break', ?1)",
            [seq.to_string()],
        )?;
    }
    tracing::info!(
        events = rows.len(),
        "event log re-chained under the audit key"
    );
    Ok(())
}

/// Walks the keyed chain row by row, whichever backend reads the rows, then checks the head.
pub struct AuditWalk<'k> {
    key: &'k AuditKey,
    expected_seq: i64,
    prev: String,
    count: i64,
    problem: Option<(i64, String)>,
}

impl<'k> AuditWalk<'k> {
    /// Starts after retention's checkpoint (the stored text), if it pruned a prefix.
    pub fn start(key: &'k AuditKey, checkpoint: Option<&str>) -> AuditWalk<'k> {
        let mut walk = AuditWalk {
            key,
            expected_seq: 1,
            prev: String::new(),
            count: 0,
            problem: None,
        };
        if let Some(c) = checkpoint {
            match parse_checkpoint(key, c) {
                Some((seq, chain)) => (walk.expected_seq, walk.prev) = (seq + 1, chain),
                None => walk.problem = Some((
                    1,
                    "the retention checkpoint does not verify under the audit key: it was edited"
                        .into(),
                )),
            }
        }
        walk
    }

    /// Whether a problem was found (the rest of the rows need not be read).
    pub fn failed(&self) -> bool {
        self.problem.is_some()
    }

    /// The next row in sequence order.
    pub fn push(&mut self, row: ChainedRow) {
        if self.failed() {
            return;
        }
        let expected = self.expected_seq;
        let problem = if row.seq != expected {
            Some(format!(
                "expected sequence {expected} here: a row was removed or reordered"
            ))
        } else if row.prev != self.prev {
            Some("its previous chain value does not match the row before: a row was removed, edited or reordered".into())
        } else {
            row.check(self.key).err().map(str::to_string)
        };
        match problem {
            Some(p) => self.problem = Some((row.seq, p)),
            None => {
                self.prev = row.chain;
                self.expected_seq += 1;
                self.count += 1;
            }
        }
    }

    /// Checks the stored head (and a break an upgrade recorded) against the rows walked.
    pub fn finish(self, head: Option<String>, legacy_break: Option<i64>) -> AuditReport {
        let count = self.count;
        let fail = |seq: i64, why: String| AuditReport {
            verified: count,
            problem: Some((seq, why)),
            head: None,
        };
        if let Some((seq, why)) = self.problem {
            return fail(seq, why);
        }
        let last = self.expected_seq - 1;
        if last == 0 && head.is_none() {
            return AuditReport {
                verified: 0,
                problem: None,
                head: None,
            };
        }
        let Some(head) = head else {
            let why = "the stored head is missing while events exist: the newest rows or the head were removed".to_string();
            return fail(last + 1, why);
        };
        let head_seq: i64 = head
            .split('|')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        if head != self.key.head(last, &self.prev, legacy_break) {
            let why = if head_seq > last {
                format!("the log ends at sequence {last}, but {head_seq} events were recorded: the newest rows were removed")
            } else {
                "the stored head does not match the log's newest row under the audit key: the head or the newest rows were edited".to_string()
            };
            return fail(last + 1, why);
        }
        if let Some(seq) = legacy_break {
            let why = "the log was edited before it was keyed: its old unkeyed chain broke here when the store was upgraded".to_string();
            return fail(seq, why);
        }
        AuditReport {
            verified: count,
            problem: None,
            head: Some((last, self.prev)),
        }
    }
}

impl Store {
    /// Walks the keyed chain and checks the head.
    pub fn audit(&self) -> Result<AuditReport> {
        // One snapshot for the checkpoint, the rows and the head, though the daemon writes on.
        let _snapshot = self.conn.unchecked_transaction()?;
        let checkpoint = self.meta("audit_checkpoint")?;
        let mut walk = AuditWalk::start(&self.audit_key, checkpoint.as_deref());
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {ROW_COLUMNS} FROM events ORDER BY seq"))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            if walk.failed() {
                break;
            }
            walk.push(chained_row(r)?);
        }
        drop(rows);
        drop(stmt);
        Ok(walk.finish(self.meta("event_head")?, legacy_break(&self.conn)?))
    }
}

impl Store {
    /// The last sequence retention pruned, if it pruned any.
    pub fn audit_checkpoint(&self) -> Result<Option<i64>> {
        Ok(read_checkpoint(&self.conn, &self.audit_key)?.map(|(seq, _)| seq))
    }

    /// The chain value stored for `seq` (or kept by the retention checkpoint), to compare with
    /// an anchor recorded elsewhere.
    pub fn chain_at(&self, seq: i64) -> Result<Option<String>> {
        if let Some((s, chain)) = read_checkpoint(&self.conn, &self.audit_key)? {
            if s == seq {
                return Ok(Some(chain));
            }
        }
        Ok(self
            .conn
            .query_row("SELECT row_hash FROM events WHERE seq = ?1", [seq], |r| {
                r.get(0)
            })
            .optional()?)
    }
}

/// The retention checkpoint: the last pruned sequence and its chain value, under a MAC.
pub fn checkpoint(key: &AuditKey, seq: i64, chain: &str) -> String {
    let mac = key.mac(&[format!("checkpoint|{seq}|{chain}").as_bytes()]);
    format!("{seq}|{chain}|{mac}")
}

/// The retention checkpoint, if there is one that verifies under the key.
pub(super) fn read_checkpoint(
    conn: &rusqlite::Connection,
    key: &AuditKey,
) -> Result<Option<(i64, String)>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'audit_checkpoint'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.and_then(|t| parse_checkpoint(key, &t)))
}

pub fn parse_checkpoint(key: &AuditKey, text: &str) -> Option<(i64, String)> {
    let mut parts = text.split('|');
    let seq: i64 = parts.next()?.parse().ok()?;
    let chain = parts.next()?.to_string();
    (checkpoint(key, seq, &chain) == text).then_some((seq, chain))
}

/// Where an upgrade found the old chain broken, if it did (covered by the head's MAC).
pub(super) fn legacy_break(conn: &rusqlite::Connection) -> Result<Option<i64>> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'audit_legacy_break'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.and_then(|s| s.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changeset::ChangeSet;
    use crate::event::{other_event, ALERT_REORG};

    /// A store in a fresh directory with one endpoint taking every event, and `n` events.
    fn store_with_events(n: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = crate::store::test_store(dir.path());
        let events = (0..n)
            .map(|i| {
                let fields = serde_json::json!({ "depth": i })
                    .as_object()
                    .unwrap()
                    .clone();
                other_event(ALERT_REORG, &format!("test-{i}"), "regtest", fields)
            })
            .collect();
        let step = ChangeSet::events(events);
        store.commit(&step, 1_764_000_000_000).unwrap();
        (dir, store)
    }

    fn problem(store: &Store) -> Option<(i64, String)> {
        store.audit().unwrap().problem
    }

    fn exec(store: &Store, sql: &str) {
        store.conn.execute_batch(sql).unwrap();
    }

    #[test]
    fn an_intact_log_verifies_and_names_its_head() {
        let (_d, store) = store_with_events(5);
        let r = store.audit().unwrap();
        assert_eq!((r.verified, r.problem.clone()), (5, None), "{r:?}");
        let (seq, chain) = r.head.expect("a head");
        assert_eq!(seq, 5);
        assert_eq!(chain.len(), 64, "an HMAC-SHA256 in hex");
    }

    #[test]
    fn an_edited_body_is_found_and_its_delivery_held_not_sent() {
        let (_d, store) = store_with_events(3);
        exec(
            &store,
            "UPDATE events SET body = replace(body, '\"depth\":1', '\"depth\":9') WHERE seq = 2",
        );
        let (seq, why) = problem(&store).expect("the edit is found");
        assert_eq!(seq, 2, "{why}");
        let due = store.due_deliveries("shop", i64::MAX, false, 10).unwrap();
        let seqs: Vec<i64> = due.iter().map(|d| d.event_seq).collect();
        assert_eq!(
            seqs,
            vec![1, 3],
            "the edited body is never handed to the sender"
        );
        let held = store
            .list_deliveries(Some(crate::delivery::DeliveryStatus::Held), None, 10)
            .unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].event_seq, 2);
        assert!(
            held[0]
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("payload hash"),
            "{:?}",
            held[0].last_error
        );
    }

    #[test]
    fn an_edit_with_its_unkeyed_hashes_recomputed_is_still_found() {
        let (_d, store) = store_with_events(3);
        // The forger edits the body and recomputes everything a key is not needed for:
        // the payload hash, and an unkeyed chain from that row on.
        let rows: Vec<ChainedRow> = {
            let mut stmt = store
                .conn
                .prepare(&format!("SELECT {ROW_COLUMNS} FROM events ORDER BY seq"))
                .unwrap();
            let rows = stmt.query_map([], chained_row).unwrap();
            rows.map(|r| r.unwrap()).collect()
        };
        let mut prev = rows[0].chain.clone();
        for r in rows.iter().skip(1) {
            let mut row = r.clone();
            if row.seq == 2 {
                row.body = row.body.replace("\"depth\":1", "\"depth\":9");
            }
            row.payload_hash = sha256_hex(row.body.as_bytes());
            row.prev = prev.clone();
            row.chain = legacy_row_hash(&row);
            store
                .conn
                .execute(
                    "UPDATE events SET body = ?2, payload_hash = ?3, prev_hash = ?4, row_hash = ?5 WHERE seq = ?1",
                    params![row.seq, row.body, row.payload_hash, row.prev, row.chain],
                )
                .unwrap();
            prev = row.chain;
        }
        let (seq, why) = problem(&store).expect("re-chaining without the key is found");
        assert_eq!(seq, 2, "{why}");
        assert!(why.contains("audit key"), "{why}");
        let due = store.due_deliveries("shop", i64::MAX, false, 10).unwrap();
        assert_eq!(
            due.iter().map(|d| d.event_seq).collect::<Vec<_>>(),
            vec![1],
            "no re-chained row is sent"
        );
    }

    #[test]
    fn removing_the_newest_rows_is_found_with_or_without_the_head() {
        let (_d, store) = store_with_events(4);
        exec(
            &store,
            "DELETE FROM deliveries WHERE event_seq > 2; DELETE FROM events WHERE seq > 2;",
        );
        let (_, why) = problem(&store).expect("removed tail rows are found");
        assert!(why.contains("newest rows were removed"), "{why}");

        // The head rewound to the new last row, with that row's real chain value: no MAC.
        let chain: String = store
            .conn
            .query_row("SELECT row_hash FROM events WHERE seq = 2", [], |r| {
                r.get(0)
            })
            .unwrap();
        exec(
            &store,
            &format!("UPDATE meta SET value = '2|{chain}' WHERE key = 'event_head'"),
        );
        assert!(problem(&store).is_some(), "a rewound head is found");

        exec(&store, "DELETE FROM meta WHERE key = 'event_head'");
        let (_, why) = problem(&store).expect("a missing head is found");
        assert!(why.contains("head is missing"), "{why}");
    }

    /// Turns the store back into a first-round one: an unkeyed chain, no key.
    fn make_legacy(store: &Store, key_file: &Path) {
        let rows: Vec<ChainedRow> = {
            let mut stmt = store
                .conn
                .prepare(&format!("SELECT {ROW_COLUMNS} FROM events ORDER BY seq"))
                .unwrap();
            let rows = stmt.query_map([], chained_row).unwrap();
            rows.map(|r| r.unwrap()).collect()
        };
        let mut prev = String::new();
        for r in rows {
            let row = ChainedRow {
                prev: prev.clone(),
                ..r
            };
            let hash = legacy_row_hash(&row);
            store
                .conn
                .execute(
                    "UPDATE events SET prev_hash = ?2, row_hash = ?3 WHERE seq = ?1",
                    params![row.seq, prev, hash],
                )
                .unwrap();
            prev = hash;
        }
        exec(store, "DELETE FROM meta WHERE key = 'audit_key_id'");
        exec(
            store,
            &format!("UPDATE meta SET value = '3|{prev}' WHERE key = 'event_head'"),
        );
        std::fs::remove_file(key_file).unwrap();
    }

    #[test]
    fn a_first_round_store_is_keyed_on_open() {
        let (dir, store) = store_with_events(3);
        let key_file = dir.path().join(AUDIT_KEY_FILE);
        make_legacy(&store, &key_file);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let r = store.audit().unwrap();
        assert_eq!(
            (r.verified, r.problem),
            (3, None),
            "re-chained under a new key"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key file is the owner's alone");
    }

    #[test]
    fn an_edit_made_before_the_upgrade_stays_reported() {
        let (dir, store) = store_with_events(3);
        let key_file = dir.path().join(AUDIT_KEY_FILE);
        make_legacy(&store, &key_file);
        // Body and payload hash edited, the old chain left broken: re-keying would cover the
        // edit with a valid keyed chain, so the break must be remembered.
        let body: String = store
            .conn
            .query_row("SELECT body FROM events WHERE seq = 2", [], |r| r.get(0))
            .unwrap();
        let body = body.replace("\"depth\":1", "\"depth\":9");
        store
            .conn
            .execute(
                "UPDATE events SET body = ?1, payload_hash = ?2 WHERE seq = 2",
                params![body, sha256_hex(body.as_bytes())],
            )
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let (seq, why) = problem(&store).expect("re-keying does not launder the edit");
        assert_eq!(seq, 2, "{why}");
        assert!(why.contains("before it was keyed"), "{why}");
    }

    #[test]
    fn removing_the_binding_to_relaunder_an_edit_is_refused() {
        let (dir, store) = store_with_events(3);
        let key_file = dir.path().join(AUDIT_KEY_FILE);
        let key = std::fs::read(&key_file).unwrap();
        // The forger edits a body, rebuilds the old unkeyed chain and removes the binding,
        // hoping the next open re-chains it all under the real key.
        exec(
            &store,
            "UPDATE events SET body = replace(body, '\"depth\":1', '\"depth\":9') WHERE seq = 2",
        );
        make_legacy(&store, &key_file);
        std::fs::write(&key_file, &key).unwrap();
        drop(store);
        let e = Store::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("binding was removed"), "{e}");
    }

    #[test]
    fn removing_the_record_of_an_old_break_is_found() {
        let (dir, store) = store_with_events(3);
        let key_file = dir.path().join(AUDIT_KEY_FILE);
        make_legacy(&store, &key_file);
        exec(
            &store,
            "UPDATE events SET row_hash = 'broken' WHERE seq = 3",
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(problem(&store).is_some(), "the break is reported");
        exec(&store, "DELETE FROM meta WHERE key = 'audit_legacy_break'");
        let (_, why) = problem(&store).expect("its removal is found");
        assert!(why.contains("head"), "{why}");
    }

    #[test]
    fn a_missing_or_wrong_key_file_is_refused_at_open() {
        let (dir, store) = store_with_events(1);
        drop(store);
        let key_file = dir.path().join(AUDIT_KEY_FILE);
        let real = std::fs::read_to_string(&key_file).unwrap();
        std::fs::remove_file(&key_file).unwrap();
        let e = Store::open(dir.path()).err().expect("missing key refused");
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!key_file.exists(), "no new key is made in its place");
        std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).unwrap();
        let e = Store::open(dir.path()).err().expect("wrong key refused");
        assert!(e.to_string().contains("not the key"), "{e}");
        std::fs::write(&key_file, "short").unwrap();
        let e = Store::open(dir.path())
            .err()
            .expect("malformed key refused");
        assert!(e.to_string().contains("64 hexadecimal"), "{e}");
        std::fs::write(&key_file, real).unwrap();
        assert!(
            Store::open(dir.path()).is_ok(),
            "the right key opens it again"
        );
    }

    #[test]
    fn openers_racing_to_create_the_key_agree_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_KEY_FILE);
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| AuditKey::load_or_create(&path).unwrap().id()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
    }

    #[test]
    fn openers_racing_on_a_fresh_store_all_get_in() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let opened: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| Store::open(dir.path()).is_ok()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(opened.iter().all(|ok| *ok), "{opened:?}");
        }
    }

    #[test]
    fn data_directory_and_database_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let _store = Store::open(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "data directory");
        assert_eq!(mode(&super::super::db_path(&dir)), 0o600, "database");
    }
}
