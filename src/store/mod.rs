//! The SQLite store: tracked state, the event log, the delivery outbox and the followed chain.
//! Every step is committed in one transaction (`commit`), its change set written part by part;
//! `interface` holds the traits the stages use a store through.

mod audit;
mod handoff;
mod interface;
mod log;
mod migrations;
pub(crate) mod outbox;
pub(crate) mod records;
pub(crate) mod retention;
mod shared;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bitcoin::hashes::{sha256, Hash};
use bitcoin::BlockHash;
use rusqlite::{params, Connection, OptionalExtension};

pub use audit::{
    checkpoint, parse_checkpoint, AuditKey, AuditReport, AuditWalk, ChainedRow, AUDIT_KEY_FILE,
};
pub use handoff::{Handoff, Mailbox};
pub use interface::{AdminStore, ChainStore, OutboxStore, RetentionStore};
pub use log::{append_events, wanted, EventLog};
pub use outbox::{
    AttemptOutcome, AttemptRow, DeliveryResult, DeliveryRow, DueDelivery, EndpointRow,
    EndpointState,
};
pub use records::EventRow;
pub use retention::{Pruned, RetentionPolicy};
pub use shared::SharedStore;

use crate::changeset::ChangeSet;
pub use crate::tip::StoredBlock;
use crate::tip::{TipChange, TipChanges};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// A chain step refused because this instance no longer holds the leader lease.
    #[error("not the leader: {0}")]
    Fenced(String),
    #[error("cannot create data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error("data directory was created for network {stored}, but the config says {configured}")]
    NetworkMismatch { stored: String, configured: String },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("chain step does not fit the stored tip: {0}")]
    TipMismatch(String),
    #[error("config key audit.key_file = {path:?}: {reason}")]
    AuditKey { path: String, reason: String },
    #[error("store task failed: {0}")]
    Worker(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// An event as committed: its sequence number and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEvent {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    /// Every delivery its commit wrote went straight to its worker (`Handoff`): no worker
    /// needs waking for it.
    pub handed_off: bool,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Endpoint name → event-type globs, for writing delivery rows beside events.
    filters: Vec<(String, Vec<String>)>,
    /// How many blocks below the tip to keep, to find fork points.
    keep_blocks: u32,
    audit_key: AuditKey,
    /// Where commits hand their deliveries to the workers (the daemon's follower only).
    handoff: Option<std::sync::Arc<Handoff>>,
}

pub const DB_FILE: &str = "chainwatch.sqlite";
/// How long a statement waits for another connection's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

fn parse_hash(s: &str) -> Result<BlockHash> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad block hash {s:?}")))
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256::Hash::hash(data).as_byte_array())
}

/// Creates a directory (and its parents) readable by its owner only; an existing one is left
/// as it is.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::DataDir {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })
}

/// The database file is created 0600, and tightened to that if it was readable by others.
fn make_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| StoreError::DataDir {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map(|_| ())
            .map_err(fail),
        Err(e) => Err(fail(e)),
    }
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`, with the audit key beside it.
    pub fn open(data_dir: &Path) -> Result<Store> {
        Store::open_keyed(data_dir, &data_dir.join(AUDIT_KEY_FILE))
    }

    /// Opens the store in `data_dir` with the event log's audit key at `key_file` (created on
    /// first use, refused if it is not the key the log was chained with).
    pub fn open_keyed(data_dir: &Path, key_file: &Path) -> Result<Store> {
        // Switching a new database to WAL needs a lock for which SQLite does not wait: two
        // processes opening a fresh store at once may be told "busy". That passes; try again.
        let mut tries = 0;
        loop {
            match Store::open_once(data_dir, key_file) {
                Err(StoreError::Sqlite(e))
                    if tries < 50
                        && matches!(
                            e.sqlite_error_code(),
                            Some(
                                rusqlite::ErrorCode::DatabaseBusy
                                    | rusqlite::ErrorCode::DatabaseLocked
                            )
                        ) =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn open_once(data_dir: &Path, key_file: &Path) -> Result<Store> {
        create_private_dir(data_dir)?;
        let path = db_path(data_dir);
        make_private_file(&path)?;
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed chain step survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::migrate(&mut conn)?;
        let keyed: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'audit_key_id'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if keyed.is_some() && !key_file.exists() {
            return Err(StoreError::AuditKey {
                path: key_file.display().to_string(),
                reason: "the file is missing, but the event log was chained with a key: restore it from your backup".into(),
            });
        }
        let audit_key = AuditKey::load_or_create(key_file)?;
        let mut store = Store {
            conn,
            path,
            filters: vec![],
            keep_blocks: 110,
            audit_key,
            handoff: None,
        };
        audit::bind_key(&mut store)?;
        store.load_filters()?;
        Ok(store)
    }

    /// Another connection to the same store, with the same audit key.
    pub fn reopen(&self) -> Result<Store> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        Store::open_keyed(dir, self.audit_key.path())
    }

    /// For connections whose commits may be lost on power failure without harm (delivery
    /// attempts: a lost record means a delivery is sent again, which at-least-once allows).
    /// The event log's connection keeps FULL.
    pub fn relax_durability(&self) -> Result<()> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a write could start now: takes the write lock (waiting at most `wait`) and
    /// lets it go, writing nothing.
    pub fn probe_write(&mut self, wait: Duration) -> Result<()> {
        self.conn.busy_timeout(wait)?;
        let r = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .and_then(|tx| tx.rollback());
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(r?)
    }

    /// How many blocks below the tip are kept to find fork points.
    pub fn keep_blocks(&self) -> u32 {
        self.keep_blocks
    }

    /// Adds blocks just below the lowest stored one (a rescan's range), so forks down there are
    /// found too. The caller checks that they link up.
    pub fn backfill_blocks(&self, blocks: &[StoredBlock]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO blocks (height, hash, prev_hash, time) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for b in blocks {
            stmt.execute(params![
                b.height,
                b.hash.to_string(),
                b.prev.to_string(),
                b.time
            ])?;
        }
        Ok(())
    }

    pub fn set_keep_blocks(&mut self, n: u32) {
        self.keep_blocks = n.max(10);
    }

    pub(crate) fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// The network the data directory belongs to.
    pub fn network(&self) -> Result<String> {
        Ok(self.meta("network")?.unwrap_or_default())
    }

    /// Binds the data directory to a network on first use; refuses another one later.
    pub fn check_network(&self, network: &str) -> Result<()> {
        match self.meta("network")? {
            None => self.set_meta("network", network),
            Some(n) if n == network => Ok(()),
            Some(n) => Err(StoreError::NetworkMismatch {
                stored: n,
                configured: network.into(),
            }),
        }
    }

    pub fn tip(&self) -> Result<Option<StoredBlock>> {
        self.block_where("ORDER BY height DESC LIMIT 1", params![])
    }

    pub fn block_at(&self, height: u32) -> Result<Option<StoredBlock>> {
        self.block_where("WHERE height = ?1", params![height])
    }

    pub fn lowest_block(&self) -> Result<Option<StoredBlock>> {
        self.block_where("ORDER BY height ASC LIMIT 1", params![])
    }

    fn block_where(&self, clause: &str, p: &[&dyn rusqlite::ToSql]) -> Result<Option<StoredBlock>> {
        let sql = format!("SELECT hash, height, prev_hash, time, tx_count FROM blocks {clause}");
        let row = self
            .conn
            .query_row(&sql, p, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, Option<u32>>(4)?,
                ))
            })
            .optional()?;
        row.map(|(h, height, p, time, tx_count)| {
            Ok(StoredBlock {
                hash: parse_hash(&h)?,
                height,
                prev: parse_hash(&p)?,
                time,
                tx_count,
            })
        })
        .transpose()
    }

    /// Whether any endpoint's filter takes events of this type (chain events and alerts are
    /// recorded only then).
    pub fn wants(&self, kind: &str) -> bool {
        log::wanted(&self.filters, kind)
    }

    /// How many times a block was disconnected.
    pub fn disconnect_count(&self, hash: BlockHash) -> Result<u32> {
        Ok(self
            .conn
            .query_row(
                "SELECT count FROM block_disconnects WHERE hash = ?1",
                [hash.to_string()],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Sets the block the watcher starts after (first run only): no events.
    pub fn init_tip(&self, block: StoredBlock) -> Result<()> {
        self.conn.execute(
            "INSERT INTO blocks (height, hash, prev_hash, time) VALUES (?1, ?2, ?3, ?4)",
            params![
                block.height,
                block.hash.to_string(),
                block.prev.to_string(),
                block.time
            ],
        )?;
        Ok(())
    }

    /// Runs `f` in one transaction: everything it writes is committed together, or nothing is.
    /// The store's own writes inside it become savepoints of that transaction.
    pub fn atomically<T>(&mut self, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                if let Err(e) = self.conn.execute_batch("COMMIT") {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(e.into());
                }
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Commits a change set in one transaction: each component's changes, then the events and
    /// their deliveries. Nothing is written if any part fails.
    pub fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        let keep = self.keep_blocks;
        // Read before the transaction begins (see `Handoff`); never inside another's, which
        // could still roll back.
        let handoff = match (&self.handoff, self.conn.is_autocommit()) {
            (Some(h), true) => {
                Some(h.before_commit(log::may_deliver(&self.filters, &changes.events)))
            }
            _ => None,
        };
        let tx = begin(&mut self.conn)?;
        write_tip(&tx, &changes.tip, keep)?;
        records::write_tracked(&tx, &changes.tracked)?;
        records::write_index(&tx, &changes.index)?;
        records::write_rescan(&tx, &changes.rescan)?;
        outbox::write_endpoints(&tx, &changes.endpoints)?;
        let mut committed = append_events(
            &mut SqliteLog(&tx),
            &self.filters,
            &self.audit_key,
            &changes.events,
            now_ms,
        )?;
        let handed = match (handoff, committed.first()) {
            (Some(endpoints), Some(first)) => handoff::hand_off(&tx, &endpoints, first.seq)
                .unwrap_or_else(|e| {
                    // Only a shortcut: the workers are woken to read their deliveries instead.
                    tracing::warn!(error = %e, "could not hand deliveries to their workers; waking them");
                    handoff::Handed::default()
                }),
            _ => handoff::Handed::default(),
        };
        tx.commit()?;
        if handed.all {
            committed.iter_mut().for_each(|e| e.handed_off = true);
        }
        handed.send();
        Ok(committed)
    }

    /// Commits from now on hand the deliveries they write to the workers' mailboxes.
    pub fn hand_off_to(&mut self, handoff: std::sync::Arc<Handoff>) {
        self.handoff = Some(handoff);
    }
}

/// A write transaction of its own, or a savepoint inside `Store::atomically`'s.
pub(crate) enum Tx<'a> {
    Top(rusqlite::Transaction<'a>),
    Nested(rusqlite::Savepoint<'a>),
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Tx::Top(t) => t,
            Tx::Nested(s) => s,
        }
    }
}

impl Tx<'_> {
    pub(crate) fn commit(self) -> rusqlite::Result<()> {
        match self {
            Tx::Top(t) => t.commit(),
            Tx::Nested(s) => s.commit(),
        }
    }
}

pub(crate) fn begin(conn: &mut Connection) -> rusqlite::Result<Tx<'_>> {
    if conn.is_autocommit() {
        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map(Tx::Top)
    } else {
        conn.savepoint().map(Tx::Nested)
    }
}

fn write_tip(tx: &Connection, changes: &TipChanges, keep: u32) -> Result<()> {
    for change in &changes.0 {
        move_tip(tx, change, keep)?;
    }
    Ok(())
}

fn move_tip(tx: &Connection, change: &TipChange, keep: u32) -> Result<()> {
    let tip: Option<(String, u32)> = tx
        .query_row(
            "SELECT hash, height FROM blocks ORDER BY height DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let tip = tip
        .map(|(h, height)| parse_hash(&h).map(|h| (h, height)))
        .transpose()?;
    change.fits(tip).map_err(StoreError::TipMismatch)?;
    match change {
        TipChange::Connect {
            block,
            prev,
            tx_count,
        } => {
            tx.execute(
                "INSERT INTO blocks (height, hash, prev_hash, time, tx_count) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![block.height, block.hash.to_string(), prev.to_string(), block.time, tx_count],
            )?;
            tx.execute(
                "DELETE FROM blocks WHERE height + ?1 < ?2",
                params![keep, block.height],
            )?;
        }
        TipChange::Disconnect { block } => {
            tx.execute("DELETE FROM blocks WHERE height = ?1", [block.height])?;
            tx.execute(
                "INSERT INTO block_disconnects (hash, count) VALUES (?1, 1)
                 ON CONFLICT(hash) DO UPDATE SET count = count + 1",
                [block.hash.to_string()],
            )?;
        }
    }
    Ok(())
}

/// The SQLite side of the event log, inside a step's transaction.
struct SqliteLog<'a>(&'a Connection);

impl EventLog for SqliteLog<'_> {
    fn newest(&mut self) -> Result<(i64, String)> {
        Ok(self
            .0
            .query_row(
                "SELECT seq, row_hash FROM events ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, String::new())))
    }

    fn recorded(&mut self, ids: &[&str]) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT 1 FROM events WHERE id = ?1")?;
        let mut found = std::collections::HashSet::new();
        for id in ids {
            if stmt.exists([id])? {
                found.insert(id.to_string());
            }
        }
        Ok(found)
    }

    fn insert(
        &mut self,
        rows: &[ChainedRow],
        deliveries: &[(i64, &str)],
        now_ms: i64,
    ) -> Result<()> {
        let mut event = self.0.prepare_cached(
            "INSERT INTO events (seq, id, type, body, created_at, prev_hash, payload_hash, row_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for row in rows {
            event.execute(params![
                row.seq,
                row.id,
                row.kind,
                row.body,
                now_ms,
                row.prev,
                row.payload_hash,
                row.chain
            ])?;
        }
        let mut delivery = self.0.prepare_cached(
            "INSERT INTO deliveries (event_seq, endpoint, status, next_attempt_at) VALUES (?1, ?2, 'pending', ?3)",
        )?;
        for (seq, endpoint) in deliveries {
            delivery.execute(params![seq, endpoint, now_ms])?;
        }
        Ok(())
    }

    fn legacy_break(&mut self) -> Result<Option<i64>> {
        audit::legacy_break(self.0)
    }

    fn set_head(&mut self, head: &str) -> Result<()> {
        self.0.execute(
            "INSERT INTO meta (key, value) VALUES ('event_head', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [head],
        )?;
        Ok(())
    }
}

/// A store in `dir` with one endpoint, `shop`, that takes every event (for unit tests).
#[cfg(test)]
pub(crate) fn test_store(dir: &Path) -> Store {
    let mut store = Store::open(dir).unwrap();
    let cfg = crate::config::Config::parse(
        "[[endpoints]]\nname = \"shop\"\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"*\"]\n",
        "test",
        None,
    )
    .unwrap();
    store.sync_endpoints(&cfg.endpoints).unwrap();
    store
}
