//! What the chain follower reads and commits, on PostgreSQL. Every write checks the fence
//! first, in its own transaction.

use bitcoin::{BlockHash, Network, OutPoint};
use tokio_postgres::Row;

use super::conn::{Owned, Pipeline};
use super::{PgStore, EVENT_LOG_LOCK};
use crate::changeset::ChangeSet;
use crate::store::records::{corrupt, floor_of, small, target_of, TrackedColumns};
use crate::store::{
    append_events, ChainStore, ChainedRow, CommittedEvent, EventLog, Result, StoreError,
    StoredBlock,
};
use crate::tip::TipChange;
use crate::tracker::Tracked;
use crate::watch::{Derivation, Watch, WatchIndex, WatchLoader, WatchedCoin};

const DELETE_TRACKED: &str = "DELETE FROM tracked WHERE txid = $1 AND watch_id = $2";
const UPSERT_DERIVATION: &str = "INSERT INTO derivations (watch_id, path, used) VALUES ($1, $2, $3)
                 ON CONFLICT (watch_id, path) DO UPDATE SET used = GREATEST(derivations.used, excluded.used)";
const INSERT_COINS: &str = "INSERT INTO coins (outpoint, watch_id, address, amount_sat)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[])
                 ON CONFLICT DO NOTHING";
const SET_RESCAN_NEXT: &str = "UPDATE watches SET rescan_next = $2 WHERE id = $1";
const DISABLE_ENDPOINT: &str =
    "UPDATE endpoints SET enabled = false, disabled_reason = $2 WHERE name = $1";
const UPSERT_TRACKED: &str =
    "INSERT INTO tracked (txid, watch_id, status, block_hash, block_height, block_time,
           reorg_count, fired, outputs, inputs, spends, senders)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
           $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[],
           $12::text[])
         ON CONFLICT (txid, watch_id) DO UPDATE SET status = excluded.status,
           block_hash = excluded.block_hash, block_height = excluded.block_height,
           block_time = excluded.block_time, reorg_count = excluded.reorg_count,
           fired = excluded.fired, outputs = excluded.outputs, inputs = excluded.inputs,
           spends = excluded.spends, senders = excluded.senders";
const INSERT_EVENTS: &str = "INSERT INTO events (seq, id, type, body, created_at, prev_hash, payload_hash, row_hash)
             SELECT s, i, t, b, $5, p, h, c
               FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $6::text[], $7::text[], $8::text[])
                 AS u(s, i, t, b, p, h, c)";
const INSERT_DELIVERIES: &str =
    "INSERT INTO deliveries (event_seq, endpoint, status, next_attempt_at)
             SELECT s, e, 'pending', $3 FROM UNNEST($1::bigint[], $2::text[]) AS u(s, e)";
const SET_EVENT_HEAD: &str = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Every statement a commit sends down its pipeline, prepared before it opens.
const PIPELINED: &[&str] = &[
    DELETE_TRACKED,
    UPSERT_DERIVATION,
    INSERT_COINS,
    SET_RESCAN_NEXT,
    DISABLE_ENDPOINT,
    UPSERT_TRACKED,
    INSERT_EVENTS,
    INSERT_DELIVERIES,
    SET_EVENT_HEAD,
];

fn block_of(r: &Row) -> Result<StoredBlock> {
    let hash: String = r.get(0);
    let prev: String = r.get(2);
    let tx_count: Option<i64> = r.get(4);
    Ok(StoredBlock {
        hash: hash.parse().map_err(|e| corrupt("block hash", e))?,
        height: small(r.get(1), "block height")?,
        prev: prev.parse().map_err(|e| corrupt("block hash", e))?,
        time: small(r.get(3), "block time")?,
        tx_count: tx_count.map(|n| small(n, "tx count")).transpose()?,
    })
}

impl PgStore {
    fn block_where(&self, clause: &str, p: super::conn::Params) -> Result<Option<StoredBlock>> {
        let sql = format!("SELECT hash, height, prev_hash, time, tx_count FROM blocks {clause}");
        self.conn
            .query_opt(&sql, p)?
            .map(|r| block_of(&r))
            .transpose()
    }

    /// A block below the tip, or the first one (no events for it); one already there stays.
    fn insert_block(&self, b: &StoredBlock) -> Result<()> {
        self.conn.execute(
            "INSERT INTO blocks (height, hash, prev_hash, time, tx_count) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
            &[
                &i64::from(b.height),
                &b.hash.to_string(),
                &b.prev.to_string(),
                &i64::from(b.time),
                &b.tx_count.map(i64::from),
            ],
        )?;
        Ok(())
    }

    fn move_tip(&self, change: &TipChange) -> Result<()> {
        let tip = self.block_where("ORDER BY height DESC LIMIT 1", &[])?;
        change
            .fits(tip.map(|t| (t.hash, t.height)))
            .map_err(StoreError::TipMismatch)?;
        match change {
            TipChange::Connect {
                block,
                prev,
                tx_count,
            } => {
                self.conn.execute(
                    "INSERT INTO blocks (height, hash, prev_hash, time, tx_count) VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &i64::from(block.height),
                        &block.hash.to_string(),
                        &prev.to_string(),
                        &i64::from(block.time),
                        &i64::from(*tx_count),
                    ],
                )?;
                self.conn.execute(
                    "DELETE FROM blocks WHERE height + $1 < $2",
                    &[&i64::from(self.keep_blocks), &i64::from(block.height)],
                )?;
            }
            TipChange::Disconnect { block } => {
                self.conn.execute(
                    "DELETE FROM blocks WHERE height = $1",
                    &[&i64::from(block.height)],
                )?;
                self.conn.execute(
                    "INSERT INTO block_disconnects (hash, count) VALUES ($1, 1)
                     ON CONFLICT (hash) DO UPDATE SET count = block_disconnects.count + 1",
                    &[&block.hash.to_string()],
                )?;
            }
        }
        Ok(())
    }

    /// Sends the change set's rows (all but the tip's) down `p`, without waiting for answers.
    fn send_changes(&self, p: &mut Pipeline<'_>, changes: &ChangeSet) -> Result<()> {
        for d in &changes.index.derivations {
            p.send(
                UPSERT_DERIVATION,
                vec![
                    Box::new(d.watch_id.clone()),
                    Box::new(i64::from(d.path)),
                    Box::new(i64::from(d.used)),
                ],
            )?;
        }
        if !changes.index.coins.is_empty() {
            let coins = &changes.index.coins;
            let column = |f: fn(&OutPoint, &WatchedCoin) -> String| -> Owned {
                Box::new(coins.iter().map(|(op, c)| f(op, c)).collect::<Vec<_>>())
            };
            let amounts: Vec<i64> = coins.iter().map(|(_, c)| c.amount_sat as i64).collect();
            p.send(
                INSERT_COINS,
                vec![
                    column(|op, _| op.to_string()),
                    column(|_, c| c.watch_id.clone()),
                    column(|_, c| c.address.clone()),
                    Box::new(amounts),
                ],
            )?;
        }
        for (watch, next) in &changes.rescan.0 {
            p.send(
                SET_RESCAN_NEXT,
                vec![Box::new(watch.clone()), Box::new(next.map(i64::from))],
            )?;
        }
        for (name, reason) in &changes.endpoints.disabled {
            p.send(
                DISABLE_ENDPOINT,
                vec![Box::new(name.clone()), Box::new(reason.clone())],
            )?;
        }
        // The tracked rows last: they take the longest to build (their JSON columns), and the
        // server writes what was sent before them meanwhile.
        send_tracked(p, changes.tracked.upserts())?;
        for (txid, watch) in changes.tracked.removals() {
            p.send(
                DELETE_TRACKED,
                vec![Box::new(txid.to_string()), Box::new(watch.clone())],
            )?;
        }
        Ok(())
    }

    /// Commits a change set in one transaction, fenced when this store leads.
    ///
    /// The tip moves first (each change reads the tip the one before left), then the event
    /// log's lock and reads; only then are the rows sent, in one pipeline, so the server
    /// writes the tracked rows while this thread builds the events' bodies and chain.
    pub fn commit_changes(&self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        self.conn.transaction(|| {
            self.check_fence()?;
            for change in &changes.tip.0 {
                self.move_tip(change)?;
            }
            let log = if changes.events.is_empty() {
                None
            } else {
                self.conn
                    .execute("SELECT pg_advisory_xact_lock($1)", &[&EVENT_LOG_LOCK])?;
                // Read now, not at open: another instance may have synced a changed config.
                let filters = self.read_filters()?;
                let ids: Vec<&str> = changes.events.iter().map(|e| e.id.as_str()).collect();
                Some((filters, self.log_newest()?, self.log_recorded(&ids)?))
            };
            self.conn.pipelined(PIPELINED, |p| {
                self.send_changes(p, changes)?;
                let Some((filters, newest, recorded)) = log else {
                    return Ok(vec![]);
                };
                let mut log = PgLog {
                    pipeline: p,
                    newest: Some(newest),
                    recorded: Some(recorded),
                };
                append_events(&mut log, &filters, &self.audit_key, &changes.events, now_ms)
            })
        })
    }

    fn log_newest(&self) -> Result<(i64, String)> {
        Ok(self
            .conn
            .query_opt(
                "SELECT seq, row_hash FROM events ORDER BY seq DESC LIMIT 1",
                &[],
            )?
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((0, String::new())))
    }

    fn log_recorded(&self, ids: &[&str]) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .conn
            .query("SELECT id FROM events WHERE id = ANY($1)", &[&ids])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub fn load_coins(&self) -> Result<Vec<(OutPoint, WatchedCoin)>> {
        self.conn
            .query(
                "SELECT outpoint, watch_id, address, amount_sat FROM coins",
                &[],
            )?
            .into_iter()
            .map(|r| {
                let op: String = r.get(0);
                let amount: i64 = r.get(3);
                Ok((
                    op.parse().map_err(|e| corrupt("outpoint", e))?,
                    WatchedCoin {
                        watch_id: r.get(1),
                        address: r.get(2),
                        amount_sat: amount as u64,
                    },
                ))
            })
            .collect()
    }

    pub fn load_derivations(&self) -> Result<Vec<Derivation>> {
        self.conn
            .query("SELECT watch_id, path, used FROM derivations", &[])?
            .into_iter()
            .map(|r| {
                Ok(Derivation {
                    watch_id: r.get(0),
                    path: small(r.get(1), "derivation path")?,
                    used: small(r.get(2), "derivation index")?,
                })
            })
            .collect()
    }

    pub fn load_watches(&self) -> Result<Vec<Watch>> {
        self.load_watches_where("", &[])
    }

    pub fn load_watch(&self, id: &str) -> Result<Option<Watch>> {
        Ok(self
            .load_watches_where("WHERE id = $1", &[&id])?
            .into_iter()
            .next())
    }

    pub fn rescans(&self) -> Result<Vec<(String, u32)>> {
        self.conn
            .query("SELECT id, rescan_next FROM watches WHERE rescan_next IS NOT NULL ORDER BY created_at, id", &[])?
            .into_iter()
            .map(|r| Ok((r.get(0), small(r.get(1), "rescan height")?)))
            .collect()
    }

    pub fn watch_version(&self) -> Result<i64> {
        Ok(self
            .meta("watch_version")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    pub fn tip(&self) -> Result<Option<StoredBlock>> {
        self.block_where("ORDER BY height DESC LIMIT 1", &[])
    }
}

/// Inserts or replaces tracked rows, all in one statement.
fn send_tracked<'t>(
    p: &mut Pipeline<'_>,
    tracked: impl Iterator<Item = &'t Tracked>,
) -> Result<()> {
    let rows: Vec<TrackedColumns> = tracked.map(TrackedColumns::of).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&TrackedColumns) -> &str| -> Owned {
        Box::new(rows.iter().map(|c| f(c).to_string()).collect::<Vec<_>>())
    };
    let opt_text = |f: fn(&TrackedColumns) -> Option<&str>| -> Owned {
        Box::new(
            rows.iter()
                .map(|c| f(c).map(str::to_string))
                .collect::<Vec<_>>(),
        )
    };
    let opt_int = |f: fn(&TrackedColumns) -> Option<i64>| -> Owned {
        Box::new(rows.iter().map(f).collect::<Vec<_>>())
    };
    let int = |f: fn(&TrackedColumns) -> i64| -> Owned {
        Box::new(rows.iter().map(f).collect::<Vec<_>>())
    };
    p.send(
        UPSERT_TRACKED,
        vec![
            text(|c| &c.txid),
            text(|c| &c.watch_id),
            text(|c| &c.status),
            opt_text(|c| c.block_hash.as_deref()),
            opt_int(|c| c.block_height),
            opt_int(|c| c.block_time),
            int(|c| c.reorg_count),
            int(|c| c.fired),
            text(|c| &c.outputs),
            text(|c| &c.inputs),
            text(|c| &c.spends),
            opt_text(|c| c.senders.as_deref()),
        ],
    )
}

/// The PostgreSQL side of the event log, inside a commit's transaction: its reads were made
/// before the pipeline opened, and its rows go down the pipeline.
struct PgLog<'p, 'c> {
    pipeline: &'p mut Pipeline<'c>,
    newest: Option<(i64, String)>,
    recorded: Option<std::collections::HashSet<String>>,
}

impl EventLog for PgLog<'_, '_> {
    fn newest(&mut self) -> Result<(i64, String)> {
        Ok(self
            .newest
            .take()
            .expect("the log's newest row is read once"))
    }

    fn recorded(&mut self, _ids: &[&str]) -> Result<std::collections::HashSet<String>> {
        // Read for the same change set's ids before the pipeline opened.
        Ok(self
            .recorded
            .take()
            .expect("the recorded ids are read once"))
    }

    fn insert(
        &mut self,
        rows: &[ChainedRow],
        deliveries: &[(i64, &str)],
        now_ms: i64,
    ) -> Result<()> {
        // One statement for all rows: a block's thousand events are one round trip.
        let column = |f: fn(&ChainedRow) -> &str| -> Owned {
            Box::new(rows.iter().map(|r| f(r).to_string()).collect::<Vec<_>>())
        };
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        self.pipeline.send(
            INSERT_EVENTS,
            vec![
                Box::new(seqs),
                column(|r| &r.id),
                column(|r| &r.kind),
                column(|r| &r.body),
                Box::new(now_ms),
                column(|r| &r.prev),
                column(|r| &r.payload_hash),
                column(|r| &r.chain),
            ],
        )?;
        let seqs: Vec<i64> = deliveries.iter().map(|(s, _)| *s).collect();
        let endpoints: Vec<String> = deliveries.iter().map(|(_, e)| e.to_string()).collect();
        self.pipeline.send(
            INSERT_DELIVERIES,
            vec![Box::new(seqs), Box::new(endpoints), Box::new(now_ms)],
        )
    }

    fn legacy_break(&mut self) -> Result<Option<i64>> {
        // A PostgreSQL store never held an unkeyed chain.
        Ok(None)
    }

    fn set_head(&mut self, head: &str) -> Result<()> {
        self.pipeline.send(
            SET_EVENT_HEAD,
            vec![
                Box::new("event_head".to_string()),
                Box::new(head.to_string()),
            ],
        )
    }
}

impl ChainStore for PgStore {
    fn tip(&self) -> Result<Option<StoredBlock>> {
        PgStore::tip(self)
    }
    fn block_at(&self, height: u32) -> Result<Option<StoredBlock>> {
        self.block_where("WHERE height = $1", &[&i64::from(height)])
    }
    fn lowest_block(&self) -> Result<Option<StoredBlock>> {
        self.block_where("ORDER BY height ASC LIMIT 1", &[])
    }
    fn keep_blocks(&self) -> u32 {
        self.keep_blocks
    }
    fn init_tip(&mut self, block: StoredBlock) -> Result<()> {
        self.conn.transaction(|| {
            self.check_fence()?;
            self.insert_block(&block)
        })
    }
    fn backfill_blocks(&mut self, blocks: &[StoredBlock]) -> Result<()> {
        self.conn.transaction(|| {
            self.check_fence()?;
            blocks.iter().try_for_each(|b| self.insert_block(b))
        })
    }
    fn disconnect_count(&self, hash: BlockHash) -> Result<u32> {
        self.conn
            .query_opt(
                "SELECT count FROM block_disconnects WHERE hash = $1",
                &[&hash.to_string()],
            )?
            .map_or(Ok(0), |r| small(r.get(0), "disconnect count"))
    }
    fn wants(&self, kind: &str) -> bool {
        self.wants_kind(kind)
    }
    fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        self.commit_changes(changes, now_ms)
    }
    fn load_tracked(&self) -> Result<Vec<Tracked>> {
        self.conn
            .query("SELECT txid, watch_id, status, block_hash, block_height, block_time, reorg_count, fired, outputs, inputs, spends, senders FROM tracked", &[])?
            .into_iter()
            .map(|r| {
                TrackedColumns {
                    txid: r.get(0),
                    watch_id: r.get(1),
                    status: r.get(2),
                    block_hash: r.get(3),
                    block_height: r.get(4),
                    block_time: r.get(5),
                    reorg_count: r.get(6),
                    fired: r.get(7),
                    outputs: r.get(8),
                    inputs: r.get(9),
                    spends: r.get(10),
                    senders: r.get(11),
                }
                .parse()
            })
            .collect()
    }
    fn load_coins(&self) -> Result<Vec<(OutPoint, WatchedCoin)>> {
        PgStore::load_coins(self)
    }
    fn load_derivations(&self) -> Result<Vec<Derivation>> {
        PgStore::load_derivations(self)
    }
    fn load_watches(&self) -> Result<Vec<Watch>> {
        PgStore::load_watches(self)
    }
    fn watch_version(&self) -> Result<i64> {
        PgStore::watch_version(self)
    }
    fn rescans(&self) -> Result<Vec<(String, u32)>> {
        PgStore::rescans(self)
    }
    fn build_index(
        &self,
        network: Network,
        loader: WatchLoader,
        exclude: &[String],
    ) -> Result<WatchIndex> {
        let rows = self.conn.query(
            "SELECT id, address, gap_limit, confirmations, min_amount_sat FROM watches ORDER BY created_at, id",
            &[],
        )?;
        let mut index = WatchIndex::with_loader(network, loader, rows.len());
        for r in rows {
            let id: String = r.get(0);
            if exclude.contains(&id) {
                continue;
            }
            let gap: Option<i64> = r.get(2);
            let gap = gap.map(|g| small(g, "gap limit")).transpose()?;
            let target = target_of(r.get(1), gap);
            index.insert_target(&id, &target, small(r.get(3), "confirmations")?);
            index.set_min_amount(&id, floor_of(r.get(4))?);
        }
        index.settle();
        index.coins.extend(self.load_coins()?);
        for d in self.load_derivations()? {
            index.set_used(&d);
        }
        Ok(index)
    }
    fn watch_loader(&self) -> Result<WatchLoader> {
        let conn = std::sync::Mutex::new(self.reopen()?);
        Ok(std::sync::Arc::new(move |id: &str| {
            let conn = conn
                .lock()
                .map_err(|_| "watch loader lock poisoned".to_string())?;
            conn.load_watch(id).map_err(|e| e.to_string())
        }))
    }
}
