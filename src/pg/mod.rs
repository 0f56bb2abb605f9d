//! The PostgreSQL store, for several instances sharing one database: the same tables, change
//! sets and keyed event log as SQLite's, behind the same traits (`ChainStore`, `OutboxStore`,
//! `AdminStore`). One instance at a time leads (holds the lease in `leader`) and follows the
//! chain; its every chain write checks, in its own transaction, that the lease's epoch is still
//! its own (`Fence`), so a deposed or paused leader cannot write. Every instance delivers:
//! deliveries are claimed with `FOR UPDATE SKIP LOCKED`, and a claim runs out if its holder dies.

mod admin;
mod chain;
mod conn;
mod lease;
mod migrate;
mod outbox;
mod retention;
mod schema;

use std::path::Path;
use std::time::Duration;

pub use conn::PgConn;
pub use lease::Lease;
pub use migrate::{migrate_sqlite, Copied};

use crate::config::EndpointConfig;
use crate::net::redact_url;
use crate::store::records::{
    floor_of, gap_of, parse_metadata, parse_routes, routes_text, small, target_of,
};
use crate::store::{AuditKey, Result, StoreError};
use crate::watch::Watch;

/// The lease this store's chain writes must still hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub holder: String,
    pub epoch: i64,
}

pub struct PgStore {
    conn: PgConn,
    /// Endpoint name → event-type globs, for writing delivery rows beside events.
    filters: Vec<(String, Vec<String>)>,
    keep_blocks: u32,
    audit_key: AuditKey,
    /// This process, in claims (a name unique to the process).
    instance: String,
    fence: Option<Fence>,
    /// How long a claimed delivery stays with this instance before another may send it.
    claim: Duration,
}

/// An event row's chained fields, from a query selecting `seq, id, type, body, payload_hash,
/// prev_hash, row_hash` first.
fn chained_row(r: &tokio_postgres::Row) -> crate::store::ChainedRow {
    crate::store::ChainedRow {
        seq: r.get(0),
        id: r.get(1),
        kind: r.get(2),
        body: r.get(3),
        payload_hash: r.get(4),
        prev: r.get(5),
        chain: r.get(6),
    }
}

/// The advisory lock held while appending to the event log: any instance may append (alerts).
const EVENT_LOG_LOCK: i64 = 0x6368_6169_6e78;

impl PgStore {
    /// Connects, migrates, and binds the database to the network and the audit key.
    pub fn open(url: &str, key_file: &Path, instance: &str) -> Result<PgStore> {
        let conn = PgConn::open(url)?;
        schema::migrate(&conn)?;
        let audit_key = AuditKey::load_or_create(key_file)?;
        let mut store = PgStore {
            conn,
            filters: vec![],
            keep_blocks: 110,
            audit_key,
            instance: instance.to_string(),
            fence: None,
            claim: Duration::from_secs(60),
        };
        store.bind_key()?;
        store.load_filters()?;
        Ok(store)
    }

    /// Another connection to the same database, for the same instance.
    pub fn reopen(&self) -> Result<PgStore> {
        let mut other = PgStore::open(self.conn.url(), self.audit_key.path(), &self.instance)?;
        other.keep_blocks = self.keep_blocks;
        other.claim = self.claim;
        Ok(other)
    }

    /// Where the database is, without its password.
    pub fn describe(&self) -> String {
        redact_url(self.conn.url())
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn set_keep_blocks(&mut self, n: u32) {
        self.keep_blocks = n.max(10);
    }

    /// How long this instance's claims on deliveries last (longer than one attempt).
    pub fn set_claim(&mut self, claim: Duration) {
        self.claim = claim;
    }

    /// Chain writes through this store must hold `fence`'s lease.
    pub fn fenced(mut self, fence: Fence) -> PgStore {
        self.fence = Some(fence);
        self
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?
            .map(|r| r.get(0)))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )?;
        Ok(())
    }

    /// Binds the database to a network on first use; refuses another one later.
    pub fn check_network(&self, network: &str) -> Result<()> {
        self.conn.transaction(|| {
            self.conn
                .execute("LOCK TABLE meta IN EXCLUSIVE MODE", &[])?;
            match self.meta("network")? {
                None => self.set_meta("network", network),
                Some(n) if n == network => Ok(()),
                Some(n) => Err(StoreError::NetworkMismatch {
                    stored: n,
                    configured: network.into(),
                }),
            }
        })
    }

    /// Every instance must chain the log with the same key: the first binds it, the others
    /// must bring a copy of that key file.
    fn bind_key(&self) -> Result<()> {
        let id = self.audit_key.id();
        self.conn.transaction(|| {
            self.conn.execute("LOCK TABLE meta IN EXCLUSIVE MODE", &[])?;
            match self.meta("audit_key_id")? {
                Some(stored) if stored == id => Ok(()),
                Some(stored) => Err(StoreError::AuditKey {
                    path: self.audit_key.path().display().to_string(),
                    reason: format!("this is not the key the shared event log was chained with (key id {stored}); copy that key file from the first instance"),
                }),
                None => {
                    let events: i64 = self.conn.query_one("SELECT count(*) FROM events", &[])?.get(0);
                    if events > 0 {
                        return Err(StoreError::AuditKey {
                            path: self.audit_key.path().display().to_string(),
                            reason: "the event log has events but no record of its key: its binding was removed from the database".into(),
                        });
                    }
                    self.set_meta("audit_key_id", &id)
                }
            }
        })
    }

    /// Endpoint name → event-type globs, as stored.
    fn read_filters(&self) -> Result<Vec<(String, Vec<String>)>> {
        Ok(self
            .conn
            .query("SELECT name, events FROM endpoints ORDER BY name", &[])?
            .into_iter()
            .map(|r| {
                let events: String = r.get(1);
                (r.get(0), serde_json::from_str(&events).unwrap_or_default())
            })
            .collect())
    }

    fn load_filters(&mut self) -> Result<()> {
        self.filters = self.read_filters()?;
        Ok(())
    }

    /// Makes the endpoints table match the config (new ones added, filters and urls updated;
    /// endpoints no longer configured get no new deliveries).
    pub fn sync_endpoints(&mut self, endpoints: &[EndpointConfig]) -> Result<()> {
        self.conn.transaction(|| {
            for e in endpoints {
                let events = serde_json::to_string(&e.events).expect("globs serialise");
                self.conn.execute(
                    "INSERT INTO endpoints (name, url, events) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET url = excluded.url, events = excluded.events",
                    &[&e.name, &redact_url(&e.url), &events],
                )?;
            }
            let names: Vec<String> = endpoints.iter().map(|e| e.name.clone()).collect();
            self.conn.execute(
                "UPDATE endpoints SET events = '[]' WHERE NOT (name = ANY($1))",
                &[&names],
            )?;
            Ok(())
        })?;
        self.load_filters()
    }

    /// Adds or updates watches (by address or descriptor) in one transaction.
    pub fn upsert_watches(&self, watches: &[Watch], source: &str, now_ms: i64) -> Result<()> {
        self.conn.transaction(|| {
            for w in watches {
                let gap = gap_of(w).map(i64::from);
                self.conn.execute(
                    "INSERT INTO watches (id, address, confirmations, label, metadata, source, created_at, gap_limit, endpoints, min_amount_sat)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (address) DO UPDATE SET confirmations = excluded.confirmations,
                       label = excluded.label, metadata = excluded.metadata, gap_limit = excluded.gap_limit,
                       endpoints = excluded.endpoints, min_amount_sat = excluded.min_amount_sat",
                    &[&w.id, &w.target_text(), &i64::from(w.confirmations), &w.label, &w.metadata.to_string(), &source, &now_ms, &gap, &routes_text(w), &(w.min_amount_sat as i64)],
                )?;
            }
            self.bump_watch_version()
        })
    }

    fn bump_watch_version(&self) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('watch_version', '1')
             ON CONFLICT (key) DO UPDATE SET value = (meta.value::bigint + 1)::text",
            &[],
        )?;
        Ok(())
    }

    fn load_watches_where(&self, clause: &str, p: conn::Params) -> Result<Vec<Watch>> {
        let sql = format!("SELECT id, address, confirmations, label, metadata, gap_limit, endpoints, min_amount_sat FROM watches {clause} ORDER BY created_at, id");
        self.conn
            .query(&sql, p)?
            .into_iter()
            .map(|r| {
                let gap: Option<i64> = r.get(5);
                let gap = gap.map(|g| small(g, "gap limit")).transpose()?;
                let metadata: String = r.get(4);
                Ok(Watch {
                    id: r.get(0),
                    target: target_of(r.get(1), gap),
                    confirmations: small(r.get(2), "confirmations")?,
                    label: r.get(3),
                    metadata: parse_metadata(&metadata)?,
                    endpoints: parse_routes(r.get(6))?,
                    min_amount_sat: floor_of(r.get(7))?,
                })
            })
            .collect()
    }

    fn wants_kind(&self, kind: &str) -> bool {
        crate::store::wanted(&self.filters, kind)
    }

    /// Checks, inside the caller's transaction, that this store's lease is still held, and
    /// keeps a takeover waiting until that transaction ends.
    fn check_fence(&self) -> Result<()> {
        let Some(f) = &self.fence else {
            return Ok(());
        };
        let held = self.conn.query_opt(
            "SELECT epoch FROM leader WHERE id = 1 AND holder = $1 AND epoch = $2
               AND expires_at > clock_timestamp() FOR SHARE",
            &[&f.holder, &f.epoch],
        )?;
        match held {
            Some(_) => Ok(()),
            None => Err(StoreError::Fenced(format!(
                "the leader lease of epoch {} is no longer this instance's; nothing was written",
                f.epoch
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
