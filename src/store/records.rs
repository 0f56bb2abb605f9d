//! Watches, tracked transactions, coins and the event log.

use bitcoin::{OutPoint, Txid};
use rusqlite::{params, OptionalExtension};

use super::{parse_hash, Result, Store, StoreError};
use crate::event::BlockRef;
use crate::tracker::{Tracked, TrackedChanges, TxStatus};
use crate::watch::{
    Derivation, IndexChanges, RescanChanges, Target, Watch, WatchIndex, WatchLoader, WatchedCoin,
};

/// One row of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub body: String,
    pub created_at: i64,
}

fn event_row(r: &rusqlite::Row) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        seq: r.get(0)?,
        id: r.get(1)?,
        kind: r.get(2)?,
        body: r.get(3)?,
        created_at: r.get(4)?,
    })
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// A tracked transaction's columns, the same in every backend.
pub(crate) struct TrackedColumns {
    pub txid: String,
    pub watch_id: String,
    pub status: String,
    pub block_hash: Option<String>,
    pub block_height: Option<i64>,
    pub block_time: Option<i64>,
    pub reorg_count: i64,
    pub fired: i64,
    pub outputs: String,
    pub inputs: String,
    pub spends: String,
    /// JSON of `Senders`; NULL while unknown.
    pub senders: Option<String>,
}

impl TrackedColumns {
    pub(crate) fn of(t: &Tracked) -> TrackedColumns {
        let (status, block) = match t.status {
            TxStatus::Mempool => ("mempool", None),
            TxStatus::Confirmed(b) => ("confirmed", Some(b)),
            TxStatus::Unconfirmed => ("unconfirmed", None),
        };
        let spends: Vec<String> = t.spends.iter().map(|o| o.to_string()).collect();
        TrackedColumns {
            txid: t.txid.to_string(),
            watch_id: t.watch_id.clone(),
            status: status.to_string(),
            block_hash: block.map(|b| b.hash.to_string()),
            block_height: block.map(|b| b.height.into()),
            block_time: block.map(|b| b.time.into()),
            reorg_count: t.reorg_count.into(),
            fired: t.fired.into(),
            outputs: serde_json::to_string(&t.outputs).expect("outputs serialise"),
            inputs: serde_json::to_string(&t.inputs).expect("inputs serialise"),
            spends: serde_json::to_string(&spends).expect("spends serialise"),
            senders: t
                .senders
                .as_ref()
                .map(|s| serde_json::to_string(s).expect("senders serialise")),
        }
    }

    pub(crate) fn parse(self) -> Result<Tracked> {
        let spends: Vec<String> =
            serde_json::from_str(&self.spends).map_err(|e| corrupt("spends", e))?;
        let status = match (
            self.status.as_str(),
            self.block_hash,
            self.block_height,
            self.block_time,
        ) {
            ("mempool", ..) => TxStatus::Mempool,
            ("unconfirmed", ..) => TxStatus::Unconfirmed,
            ("confirmed", Some(h), Some(height), Some(time)) => TxStatus::Confirmed(BlockRef {
                hash: parse_hash(&h)?,
                height: small(height, "block height")?,
                time: small(time, "block time")?,
            }),
            (s, ..) => return Err(corrupt("tracked status", s)),
        };
        Ok(Tracked {
            txid: self.txid.parse::<Txid>().map_err(|e| corrupt("txid", e))?,
            watch_id: self.watch_id,
            status,
            reorg_count: small(self.reorg_count, "reorg count")?,
            fired: small(self.fired, "fired")?,
            outputs: serde_json::from_str(&self.outputs).map_err(|e| corrupt("outputs", e))?,
            inputs: serde_json::from_str(&self.inputs).map_err(|e| corrupt("inputs", e))?,
            spends: spends
                .iter()
                .map(|o| o.parse())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| corrupt("spends", e))?,
            senders: self
                .senders
                .map(|s| serde_json::from_str(&s))
                .transpose()
                .map_err(|e| corrupt("senders", e))?,
        })
    }
}

/// A stored integer that must fit 32 bits.
pub(crate) fn small(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(what, v))
}

/// A watch's target from its stored text: a descriptor when it has a gap limit.
pub(crate) fn target_of(text: String, gap_limit: Option<u32>) -> Target {
    match gap_limit {
        None => Target::Address { address: text },
        Some(gap_limit) => Target::Descriptor {
            descriptor: text,
            gap_limit,
        },
    }
}

/// The stored gap limit of a watch (descriptors only).
pub(crate) fn gap_of(w: &Watch) -> Option<u32> {
    match w.target {
        Target::Descriptor { gap_limit, .. } => Some(gap_limit),
        Target::Address { .. } => None,
    }
}

pub(crate) fn parse_metadata(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| corrupt("metadata", e))
}

/// A watch's endpoint list as stored (JSON; NULL for every endpoint).
pub(crate) fn routes_text(w: &Watch) -> Option<String> {
    w.endpoints
        .as_ref()
        .map(|r| serde_json::to_string(r).expect("names serialise"))
}

pub(crate) fn parse_routes(text: Option<String>) -> Result<Option<Vec<String>>> {
    text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt("watch endpoints", e)))
        .transpose()
}

/// A stored floor: SQLite keeps integers signed.
pub(crate) fn floor_of(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt("min_amount_sat", v))
}

pub(super) fn write_tracked(tx: &rusqlite::Connection, changes: &TrackedChanges) -> Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT OR REPLACE INTO tracked (txid, watch_id, status, block_hash, block_height, block_time,
         reorg_count, fired, outputs, inputs, spends, senders)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    for t in changes.upserts() {
        let c = TrackedColumns::of(t);
        upsert.execute(params![
            c.txid,
            c.watch_id,
            c.status,
            c.block_hash,
            c.block_height,
            c.block_time,
            c.reorg_count,
            c.fired,
            c.outputs,
            c.inputs,
            c.spends,
            c.senders,
        ])?;
    }
    let mut remove = tx.prepare_cached("DELETE FROM tracked WHERE txid = ?1 AND watch_id = ?2")?;
    for (txid, watch) in changes.removals() {
        remove.execute(params![txid.to_string(), watch])?;
    }
    Ok(())
}

pub(super) fn write_rescan(tx: &rusqlite::Connection, changes: &RescanChanges) -> Result<()> {
    for (watch, next) in &changes.0 {
        tx.execute(
            "UPDATE watches SET rescan_next = ?2 WHERE id = ?1",
            params![watch, next],
        )?;
    }
    Ok(())
}

pub(super) fn write_index(tx: &rusqlite::Connection, changes: &IndexChanges) -> Result<()> {
    let mut derivation = tx.prepare_cached(
        "INSERT INTO derivations (watch_id, path, used) VALUES (?1, ?2, ?3)
         ON CONFLICT(watch_id, path) DO UPDATE SET used = max(used, excluded.used)",
    )?;
    for d in &changes.derivations {
        derivation.execute(params![d.watch_id, d.path, d.used])?;
    }
    let mut coin = tx.prepare_cached("INSERT OR IGNORE INTO coins (outpoint, watch_id, address, amount_sat) VALUES (?1, ?2, ?3, ?4)")?;
    for (op, c) in &changes.coins {
        coin.execute(params![
            op.to_string(),
            c.watch_id,
            c.address,
            c.amount_sat as i64
        ])?;
    }
    Ok(())
}

impl Store {
    pub fn load_tracked(&self) -> Result<Vec<Tracked>> {
        let mut stmt = self.conn.prepare(
            "SELECT txid, watch_id, status, block_hash, block_height, block_time, reorg_count, fired, outputs, inputs, spends, senders FROM tracked",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TrackedColumns {
                txid: r.get(0)?,
                watch_id: r.get(1)?,
                status: r.get(2)?,
                block_hash: r.get(3)?,
                block_height: r.get(4)?,
                block_time: r.get(5)?,
                reorg_count: r.get(6)?,
                fired: r.get(7)?,
                outputs: r.get(8)?,
                inputs: r.get(9)?,
                spends: r.get(10)?,
                senders: r.get(11)?,
            })
        })?;
        rows.map(|row| row?.parse()).collect()
    }

    pub fn load_coins(&self) -> Result<Vec<(OutPoint, WatchedCoin)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT outpoint, watch_id, address, amount_sat FROM coins")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (op, watch_id, address, amount) = row?;
            let op: OutPoint = op.parse().map_err(|e| corrupt("outpoint", e))?;
            Ok((
                op,
                WatchedCoin {
                    watch_id,
                    address,
                    amount_sat: amount as u64,
                },
            ))
        })
        .collect()
    }

    pub fn load_watches(&self) -> Result<Vec<Watch>> {
        self.load_watches_where("", params![])
    }

    fn load_watches_where(&self, clause: &str, p: &[&dyn rusqlite::ToSql]) -> Result<Vec<Watch>> {
        let sql = format!("SELECT id, address, confirmations, label, metadata, gap_limit, endpoints, min_amount_sat FROM watches {clause} ORDER BY created_at, id");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(p, |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ),
                (
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<u32>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, i64>(7)?,
                ),
            ))
        })?;
        rows.map(|row| {
            let ((id, target, confirmations, label), (metadata, gap_limit, routes, floor)) = row?;
            Ok(Watch {
                id,
                target: target_of(target, gap_limit),
                confirmations,
                label,
                metadata: parse_metadata(&metadata)?,
                endpoints: parse_routes(routes)?,
                min_amount_sat: floor_of(floor)?,
            })
        })
        .collect()
    }

    /// Watches waiting for (or in the middle of) a rescan: id and the next height to scan.
    pub fn rescans(&self) -> Result<Vec<(String, u32)>> {
        let mut stmt = self.conn.prepare("SELECT id, rescan_next FROM watches WHERE rescan_next IS NOT NULL ORDER BY created_at, id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Asks for a watch's past to be scanned from `height` (the running watcher picks it up).
    pub fn request_rescan(&self, watch_id: &str, height: u32) -> Result<bool> {
        // One transaction with the version bump: a change the follower is never told of
        // would never be picked up.
        let tx = self.conn.unchecked_transaction()?;
        let n = tx.execute(
            "UPDATE watches SET rescan_next = ?2 WHERE id = ?1",
            params![watch_id, height],
        )?;
        if n > 0 {
            self.bump_watch_version()?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// One watch's full record.
    pub fn load_watch(&self, id: &str) -> Result<Option<Watch>> {
        Ok(self
            .load_watches_where("WHERE id = ?1", params![id])?
            .into_iter()
            .next())
    }

    /// Builds the matching index straight from the table, without holding every record in
    /// memory (they load through `loader` when an event needs them). Watches in `exclude`
    /// (being rescanned) are left out; coins and derivation indexes are loaded too.
    pub fn build_index(
        &self,
        network: bitcoin::Network,
        loader: WatchLoader,
        exclude: &[String],
    ) -> Result<WatchIndex> {
        let count: i64 = self
            .conn
            .query_row("SELECT count(*) FROM watches", [], |r| r.get(0))?;
        let mut index = WatchIndex::with_loader(network, loader, count as usize);
        let mut stmt = self.conn.prepare(
            "SELECT id, address, gap_limit, confirmations, min_amount_sat FROM watches ORDER BY created_at, id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (id, target, gap, confirmations): (String, String, Option<u32>, u32) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            if exclude.contains(&id) {
                continue;
            }
            index.insert_target(&id, &target_of(target, gap), confirmations);
            index.set_min_amount(&id, floor_of(r.get(4)?)?);
        }
        index.settle();
        index.coins.extend(self.load_coins()?);
        for d in self.load_derivations()? {
            index.set_used(&d);
        }
        Ok(index)
    }

    /// The highest used derivation index of every descriptor path.
    pub fn load_derivations(&self) -> Result<Vec<Derivation>> {
        let mut stmt = self
            .conn
            .prepare("SELECT watch_id, path, used FROM derivations")?;
        let rows = stmt.query_map([], |r| {
            Ok(Derivation {
                watch_id: r.get(0)?,
                path: r.get(1)?,
                used: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Adds a watch or updates the one with the same address.
    pub fn upsert_watch(&mut self, w: &Watch, source: &str, now_ms: i64) -> Result<()> {
        self.upsert_watches(std::slice::from_ref(w), source, now_ms)
    }

    /// Adds or updates many watches in one transaction.
    pub fn upsert_watches(&mut self, watches: &[Watch], source: &str, now_ms: i64) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO watches (id, address, confirmations, label, metadata, source, created_at, gap_limit, endpoints, min_amount_sat)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(address) DO UPDATE SET confirmations = excluded.confirmations,
                   label = excluded.label, metadata = excluded.metadata, gap_limit = excluded.gap_limit,
                   endpoints = excluded.endpoints, min_amount_sat = excluded.min_amount_sat",
            )?;
            for w in watches {
                stmt.execute(params![
                    w.id,
                    w.target_text(),
                    w.confirmations,
                    w.label,
                    w.metadata.to_string(),
                    source,
                    now_ms,
                    gap_of(w),
                    routes_text(w),
                    w.min_amount_sat as i64,
                ])?;
            }
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('watch_version', '1')
             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn remove_watch(&self, id: &str) -> Result<bool> {
        // One transaction with the version bump: a watch deleted without it would stay in the
        // running follower's index, and keep firing.
        let tx = self.conn.unchecked_transaction()?;
        let removed = tx.execute("DELETE FROM watches WHERE id = ?1", [id])? > 0;
        if removed {
            self.bump_watch_version()?;
        }
        tx.commit()?;
        Ok(removed)
    }

    /// Changes whenever a watch is added, changed or removed, by any process.
    pub fn watch_version(&self) -> Result<i64> {
        Ok(self
            .meta("watch_version")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    fn bump_watch_version(&self) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('watch_version', '1')
             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
            [],
        )?;
        Ok(())
    }

    /// Events after `after`, in sequence order.
    pub fn events_after(&self, after: i64, limit: i64) -> Result<Vec<EventRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, id, type, body, created_at FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], event_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn event_by_id(&self, id: &str) -> Result<Option<EventRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT seq, id, type, body, created_at FROM events WHERE id = ?1",
                [id],
                event_row,
            )
            .optional()?)
    }
}
