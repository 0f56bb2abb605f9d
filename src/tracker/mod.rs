//! Confirmation tracking. Pure: given the watch index, each chain step turns the tracked
//! transactions into a `TrackerStep` (its change sets, and events naming the watch) that the
//! follower commits; only after the commit succeeds is it applied to memory.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use bitcoin::{Block, OutPoint, Transaction, Txid};
use serde::{Deserialize, Serialize};

use crate::event::{self, BlockRef, NewEvent, TipRef, TxEventFacts, TxEventIdentity};
use crate::merge::Merge;
use crate::senders::Senders;
use crate::watch::{net_amount, IndexChanges, MatchedInput, MatchedOutput, Overlay, WatchIndex};

/// Where a tracked transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxStatus {
    /// In the node's mempool.
    Mempool,
    /// In a block of the active chain.
    Confirmed(BlockRef),
    /// Its block was disconnected and it has not been seen in the mempool since.
    Unconfirmed,
}

/// One (transaction, watch) pair being followed until it is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    pub txid: Txid,
    pub watch_id: String,
    pub status: TxStatus,
    /// How many times a block holding it was disconnected.
    pub reorg_count: u32,
    /// The deepest confirmation count already announced for the current confirmation.
    pub fired: u32,
    pub outputs: Vec<MatchedOutput>,
    pub inputs: Vec<MatchedInput>,
    /// Every outpoint the transaction spends, to recognise replacements and conflicts.
    pub spends: Vec<OutPoint>,
    /// Where its money came from; `None` until the node has described the coins it spends.
    pub senders: Option<Senders>,
}

/// Why a transaction left the mempool without being mined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// A replacement spending the same inputs arrived.
    Replaced(Txid),
    /// An input was spent by a transaction confirmed in a block.
    Conflict(Txid),
    /// Any other reason (mempool limits, expiry, a replaced ancestor).
    Evicted,
}

fn spends_of(tx: &Transaction) -> Vec<OutPoint> {
    if tx.is_coinbase() {
        return vec![];
    }
    tx.input.iter().map(|i| i.previous_output).collect()
}

impl Tracked {
    fn amount_sat(&self) -> i64 {
        net_amount(&self.outputs, &self.inputs)
    }
}

pub type TrackedKey = (Txid, String);

/// The tracker's change set: rows to write (`Some`) or to stop tracking (`None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackedChanges(pub BTreeMap<TrackedKey, Option<Tracked>>);

impl TrackedChanges {
    pub fn upsert(&mut self, t: Tracked) {
        self.0.insert((t.txid, t.watch_id.clone()), Some(t));
    }

    pub fn remove(&mut self, key: TrackedKey) {
        self.0.insert(key, None);
    }

    pub fn upserts(&self) -> impl Iterator<Item = &Tracked> {
        self.0.values().flatten()
    }

    pub fn removals(&self) -> impl Iterator<Item = &TrackedKey> {
        self.0.iter().filter(|(_, t)| t.is_none()).map(|(k, _)| k)
    }
}

impl Merge for TrackedChanges {
    fn merge(&mut self, later: TrackedChanges) {
        self.0.extend(later.0);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An event about a (transaction, watch) before the watch's label and metadata are added
/// (`event::label`): the tracker needs no more of a watch than its confirmation target.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub watch_id: String,
    pub event: NewEvent,
}

/// What the tracker makes of one chain step: its changes, and the events they announce.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackerStep {
    pub tracked: TrackedChanges,
    pub index: IndexChanges,
    pub events: Vec<WatchEvent>,
}

impl TrackerStep {
    /// Whether the step matched anything (a payment to or from a watch).
    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty() && self.index.is_empty() && self.events.is_empty()
    }

    /// Transactions this step leaves at `status` whose senders are not known yet, once each:
    /// those the node can describe now (in the mempool, or in the block just connected).
    pub fn unknown_senders(&self, status: TxStatus) -> Vec<Txid> {
        let mut txids: Vec<Txid> = self
            .tracked
            .upserts()
            .filter(|t| t.senders.is_none() && t.status == status)
            .map(|t| t.txid)
            .collect();
        txids.dedup();
        txids
    }

    /// Takes in the senders the node described: into the rows, and into the events about
    /// those transactions, which were built before they were known.
    pub fn fill_senders(&mut self, found: &HashMap<Txid, Senders>) {
        for t in self.tracked.0.values_mut().flatten() {
            if t.senders.is_none() {
                t.senders = found.get(&t.txid).cloned();
            }
        }
        for e in &mut self.events {
            let data = &mut e.event.data;
            let txid = data.get("txid").and_then(|v| v.as_str());
            let Some(s) = txid
                .and_then(|t| t.parse::<Txid>().ok())
                .and_then(|t| found.get(&t))
            else {
                continue;
            };
            if data.get("senders").is_some_and(|v| v.is_null()) {
                let (senders, coinbase) = event::senders_json(Some(s));
                data.insert("senders".into(), senders);
                data.insert("coinbase".into(), coinbase);
            }
        }
    }
}

/// The tracked transactions, keyed by (txid, watch id).
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    pub network: &'static str,
    pub finality_depth: u32,
    entries: BTreeMap<TrackedKey, Tracked>,
}

impl Tracker {
    pub fn new(
        network: &'static str,
        finality_depth: u32,
        entries: impl IntoIterator<Item = Tracked>,
    ) -> Tracker {
        Tracker {
            network,
            finality_depth,
            entries: entries
                .into_iter()
                .map(|t| ((t.txid, t.watch_id.clone()), t))
                .collect(),
        }
    }

    pub fn get(&self, txid: Txid, watch_id: &str) -> Option<&Tracked> {
        self.entries.get(&(txid, watch_id.to_string()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many more blocks the confirmed transactions need to announce all their
    /// confirmations (the most any one needs). While it is above 0 every block counts, even
    /// one holding nothing of the watches'; at 0 such a block changes nothing anyone is told,
    /// and a rescan may skip it.
    pub fn confirmations_owed(&self, index: &WatchIndex) -> u32 {
        self.entries
            .values()
            .filter(|t| matches!(t.status, TxStatus::Confirmed(_)))
            .filter_map(|t| Some(index.confirmations(&t.watch_id)?.saturating_sub(t.fired)))
            .max()
            .unwrap_or(0)
    }

    /// Blocks up to `tip` were passed over, known to hold nothing of the watches' (a rescan's
    /// filters said so) while no confirmation was owed: retires what they made final, as
    /// connecting them one by one would have. Announces nothing.
    pub fn passed_over(&self, index: &WatchIndex, tip: TipRef) -> TrackerStep {
        let mut step = TrackerStep::default();
        for (key, t) in &self.entries {
            if matches!(t.status, TxStatus::Confirmed(_)) {
                self.advance(index, t.clone(), key.clone(), tip, &mut step);
            }
        }
        step
    }

    /// Takes in a committed change set.
    pub fn apply(&mut self, changes: &TrackedChanges) {
        for (k, t) in &changes.0 {
            match t {
                Some(t) => self.entries.insert(k.clone(), t.clone()),
                None => self.entries.remove(k),
            };
        }
    }

    /// A transaction entered the mempool.
    pub fn mempool_add(&self, index: &WatchIndex, tx: &Transaction, tip: TipRef) -> TrackerStep {
        let mut step = TrackerStep::default();
        let txid = tx.compute_txid();
        let mut overlay = Overlay::default();
        let matches = index.match_tx_in(tx, &mut overlay);
        step.index.derivations = overlay.derivations();
        for m in matches {
            step.index.add_coins(WatchIndex::coins_of(txid, &m));
            match self.get(txid, &m.watch_id) {
                None => {
                    let t = Tracked {
                        txid,
                        watch_id: m.watch_id.clone(),
                        status: TxStatus::Mempool,
                        reorg_count: 0,
                        fired: 0,
                        outputs: m.outputs,
                        inputs: m.inputs,
                        spends: spends_of(tx),
                        senders: None,
                    };
                    self.event(
                        index,
                        &t,
                        Shape::new(event::TX_PENDING, 0, None, tip),
                        &mut step,
                    );
                    step.tracked.upsert(t);
                }
                // Back in the mempool after a reorg: tx.reorged already said so.
                Some(t) if t.status == TxStatus::Unconfirmed => {
                    step.tracked.upsert(Tracked {
                        status: TxStatus::Mempool,
                        ..t.clone()
                    });
                }
                Some(_) => {}
            }
        }
        step
    }

    /// A block was connected on top of the tip.
    pub fn connect_block(&self, index: &WatchIndex, block: &Block, at: BlockRef) -> TrackerStep {
        let tip = TipRef {
            hash: at.hash,
            height: at.height,
        };
        let mut step = TrackerStep::default();
        let mut changed: BTreeMap<TrackedKey, Tracked> = BTreeMap::new();
        let mut overlay = Overlay::default();
        let probe = index.probe(&block.txdata);
        for (i, tx) in block.txdata.iter().enumerate() {
            let matches = index.match_tx_probed(tx, probe.of(i), &mut overlay);
            // Hashed only when it concerns a watch: most of a block's transactions do not.
            let txid = match matches.is_empty() {
                true => continue,
                false => tx.compute_txid(),
            };
            for m in matches {
                let coins = WatchIndex::coins_of(txid, &m);
                overlay.coins.extend(coins.iter().cloned());
                step.index.add_coins(coins);
                let key = (txid, m.watch_id.clone());
                let t = match self.entries.get(&key) {
                    Some(t) if t.status == TxStatus::Confirmed(at) => continue,
                    Some(t) => Tracked {
                        status: TxStatus::Confirmed(at),
                        fired: 0,
                        ..t.clone()
                    },
                    None => Tracked {
                        txid,
                        watch_id: m.watch_id,
                        status: TxStatus::Confirmed(at),
                        reorg_count: 0,
                        fired: 0,
                        outputs: m.outputs,
                        inputs: m.inputs,
                        spends: spends_of(tx),
                        senders: tx.is_coinbase().then(Senders::coinbase),
                    },
                };
                changed.insert(key, t);
            }
        }
        step.index.derivations = overlay.derivations();
        let confirmed = self
            .entries
            .iter()
            .filter(|(k, _)| !changed.contains_key(*k))
            .filter(|(_, t)| matches!(t.status, TxStatus::Confirmed(_)))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect::<Vec<_>>();
        for (key, t) in confirmed.into_iter().chain(changed) {
            self.advance(index, t, key, tip, &mut step);
        }
        step
    }

    /// Announces every confirmation depth not yet announced, and retires final transactions.
    fn advance(
        &self,
        index: &WatchIndex,
        mut t: Tracked,
        key: TrackedKey,
        tip: TipRef,
        step: &mut TrackerStep,
    ) {
        let TxStatus::Confirmed(block) = t.status else {
            return;
        };
        let Some(target) = index.confirmations(&t.watch_id) else {
            step.tracked.remove(key);
            return;
        };
        let depth = tip.height.saturating_sub(block.height) + 1;
        let before = t.fired;
        while t.fired < depth.min(target) {
            t.fired += 1;
            let kind = if t.fired < target {
                event::TX_CONFIRMATION
            } else {
                event::TX_CONFIRMED
            };
            self.event(index, &t, Shape::new(kind, t.fired, Some(block), tip), step);
        }
        // Kept while a reorg of finality_depth blocks could still remove its block.
        if depth > self.finality_depth.max(target) {
            step.tracked.remove(key);
        } else if t.fired != before || self.entries.get(&key) != Some(&t) {
            step.tracked.upsert(t);
        }
    }

    /// The tip block was disconnected.
    pub fn disconnect_block(
        &self,
        index: &WatchIndex,
        at: BlockRef,
        new_tip: TipRef,
    ) -> TrackerStep {
        let mut step = TrackerStep::default();
        for t in self.entries.values() {
            if t.status != TxStatus::Confirmed(at) {
                continue;
            }
            let shape = Shape::new(event::TX_REORGED, 0, None, new_tip)
                .with("previous_block", event::block_json(&at));
            let shape = Shape {
                identity_block: Some(at.hash),
                ..shape
            };
            self.event(index, t, shape, &mut step);
            step.tracked.upsert(Tracked {
                status: TxStatus::Unconfirmed,
                reorg_count: t.reorg_count + 1,
                fired: 0,
                ..t.clone()
            });
        }
        step
    }

    fn entries_of(&self, txid: Txid) -> impl Iterator<Item = &Tracked> {
        self.entries
            .range((txid, String::new())..)
            .take_while(move |(k, _)| k.0 == txid)
            .map(|(_, t)| t)
    }

    /// Whether `txid` is tracked and not confirmed.
    pub fn is_unconfirmed(&self, txid: Txid) -> bool {
        self.entries_of(txid)
            .any(|t| !matches!(t.status, TxStatus::Confirmed(_)))
    }

    /// The outpoints a tracked transaction spends.
    pub fn spends_of(&self, txid: Txid) -> Vec<OutPoint> {
        self.entries_of(txid)
            .next()
            .map(|t| t.spends.clone())
            .unwrap_or_default()
    }

    fn txids_with(&self, status: impl Fn(&TxStatus) -> bool) -> Vec<Txid> {
        let mut v: Vec<Txid> = self
            .entries
            .values()
            .filter(|t| status(&t.status))
            .map(|t| t.txid)
            .collect();
        v.dedup();
        v
    }

    /// Tracked transactions we believe are in the mempool.
    pub fn in_mempool(&self) -> Vec<Txid> {
        self.txids_with(|s| *s == TxStatus::Mempool)
    }

    /// Tracked transactions reorged out and not seen in the mempool since.
    pub fn reorged_out(&self) -> Vec<Txid> {
        self.txids_with(|s| *s == TxStatus::Unconfirmed)
    }

    /// A tracked unconfirmed transaction left the mempool (or will never return to it).
    pub fn mempool_removed(
        &self,
        index: &WatchIndex,
        txid: Txid,
        why: Removal,
        tip: TipRef,
    ) -> TrackerStep {
        let mut step = TrackerStep::default();
        for t in self.entries_of(txid) {
            if matches!(t.status, TxStatus::Confirmed(_)) {
                continue;
            }
            let key = (t.txid, t.watch_id.clone());
            let shape = match why {
                Removal::Replaced(by) => Shape::new(event::TX_REPLACED, 0, None, tip)
                    .with("replaced_by", json!(by.to_string())),
                Removal::Conflict(by) => Shape::new(event::TX_DROPPED, 0, None, tip)
                    .with("reason", json!("conflict"))
                    .with("conflicting_txid", json!(by.to_string())),
                Removal::Evicted => {
                    Shape::new(event::TX_DROPPED, 0, None, tip).with("reason", json!("evicted"))
                }
            };
            self.event(index, t, shape, &mut step);
            step.tracked.remove(key);
        }
        step
    }

    /// Adds the event `shape` describes, if the index still holds the watch.
    fn event(&self, index: &WatchIndex, t: &Tracked, shape: Shape, step: &mut TrackerStep) {
        let Some(required_confirmations) = index.confirmations(&t.watch_id) else {
            return;
        };
        let identity = TxEventIdentity {
            kind: shape.kind,
            txid: t.txid,
            watch_id: &t.watch_id,
            block_hash: shape.block.map(|b| b.hash).or(shape.identity_block),
            confirmations: shape.confirmations,
            reorg_count: t.reorg_count,
        };
        let event = TxEventFacts {
            identity,
            network: self.network,
            required_confirmations,
            block: shape.block,
            outputs: &t.outputs,
            inputs: &t.inputs,
            senders: t.senders.as_ref(),
            coinbase: t.spends.is_empty(),
            amount_sat: t.amount_sat(),
            tip: shape.tip,
            extra: shape.extra,
        }
        .into_event();
        step.events.push(WatchEvent {
            watch_id: t.watch_id.clone(),
            event,
        });
    }
}

/// What distinguishes one transaction event from another of the same transaction.
struct Shape {
    kind: &'static str,
    confirmations: u32,
    block: Option<BlockRef>,
    /// The block named in the id when `block` is null (tx.reorged names the one it left).
    identity_block: Option<bitcoin::BlockHash>,
    tip: TipRef,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl Shape {
    fn new(kind: &'static str, confirmations: u32, block: Option<BlockRef>, tip: TipRef) -> Shape {
        Shape {
            kind,
            confirmations,
            block,
            identity_block: None,
            tip,
            extra: Default::default(),
        }
    }

    fn with(mut self, key: &str, v: serde_json::Value) -> Shape {
        self.extra.insert(key.to_string(), v);
        self
    }
}

#[cfg(test)]
mod tests;
