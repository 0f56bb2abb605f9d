//! The follower's mempool side: matching new transactions, and telling why tracked ones left
//! (replaced, in conflict with a block, or evicted), the same way whether ZMQ announced the
//! removal or a resync over RPC found it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bitcoin::{OutPoint, Transaction, Txid};

use super::{FollowError, Follower};
use crate::node::{ChainSource, NodeError};
use crate::tracker::Removal;

/// A tracked transaction announced as removed, and when.
type Removed = (Txid, Instant);

impl<S: ChainSource> Follower<S> {
    /// The body of a mempool transaction the node holds; `None` if it is not (or no longer)
    /// in the node's mempool. A txid the node listed itself (`vouched`) needs no proof; one
    /// that only ZMQ announced is proven with `getmempoolentry` (which, unlike
    /// `getrawtransaction` on a node with `-txindex`, never answers for a confirmed
    /// transaction). A relayed body is used only under the txid it hashes to, which commits to
    /// its outputs.
    async fn mempool_body(
        &mut self,
        txid: Txid,
        vouched: bool,
    ) -> Result<Option<Transaction>, FollowError> {
        if !vouched && !self.source.in_mempool(txid).await? {
            if self.cache.txs.contains_key(&txid) && !self.cache.in_recent_block(txid) {
                tracing::warn!(%txid, "ZMQ announced a transaction the node does not hold; ignored");
            }
            return Ok(None);
        }
        if let Some(tx) = self.cache.txs.get(&txid) {
            return Ok(Some(tx.clone()));
        }
        match self.source.mempool_transaction(txid).await {
            Ok(tx) => Ok(Some(tx)),
            // Mined or replaced meanwhile: the chain sync or a removal accounts for it.
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// ZMQ `A`: a transaction entered the mempool.
    pub(super) async fn mempool_added(&mut self, txid: Txid) -> Result<(), FollowError> {
        if self.seen_mempool.contains(&txid) {
            return Ok(());
        }
        let Some(tx) = self.mempool_body(txid, false).await? else {
            return Ok(());
        };
        self.classify_pending(std::slice::from_ref(&tx), Duration::ZERO)
            .await?;
        self.match_mempool_tx(&tx)
    }

    /// Matches a mempool transaction the node has just vouched for. If its step cannot be
    /// committed, the transaction is kept and matched again before anything later (its block
    /// included), so a store outage does not turn its tx.pending into nothing.
    fn match_mempool_tx(&mut self, tx: &Transaction) -> Result<(), FollowError> {
        let txid = tx.compute_txid();
        let Some(tip) = self.tip_ref()? else {
            return Ok(());
        };
        let step = self.tracker.mempool_add(&self.index, tx, tip);
        let matched = !step.events.is_empty();
        if let Err(e) = self.commit_step(step) {
            if matched {
                self.defer(tx);
            }
            return Err(e);
        }
        // Only once handled: a failure above leaves it for the resync to pick up.
        self.seen_mempool.insert(txid);
        Ok(())
    }

    /// Announces every pending removal at least `min_age` old: replaced by one of `incoming`
    /// if it spends the same outpoints, in conflict with a recently mined transaction, or
    /// evicted. Reorged-out transactions that a new block conflicts with are dropped too.
    pub(super) async fn classify_pending(
        &mut self,
        incoming: &[Transaction],
        min_age: Duration,
    ) -> Result<(), FollowError> {
        let Some(tip) = self.tip_ref()? else {
            return Ok(());
        };
        let (due, wait): (Vec<Removed>, Vec<Removed>) = std::mem::take(&mut self.pending_removals)
            .into_iter()
            .partition(|(_, at)| at.elapsed() >= min_age);
        self.pending_removals = wait;
        for (i, &(txid, _)) in due.iter().enumerate() {
            let classified = self.classify_one(txid, incoming, tip).await;
            if classified.is_err() {
                // Not lost: this removal and the ones after it wait for the next try.
                self.pending_removals.extend_from_slice(&due[i..]);
            }
            classified?;
        }
        for txid in self.tracker.reorged_out() {
            if let Some(by) = self.recent_spends.conflict(&self.tracker.spends_of(txid)) {
                let step =
                    self.tracker
                        .mempool_removed(&self.index, txid, Removal::Conflict(by), tip);
                self.commit_step(step)?;
            }
        }
        Ok(())
    }

    /// Says why one tracked transaction left the mempool, unless the node still holds it.
    async fn classify_one(
        &mut self,
        txid: Txid,
        incoming: &[Transaction],
        tip: crate::event::TipRef,
    ) -> Result<(), FollowError> {
        if self.still_in_mempool(txid).await? {
            return Ok(());
        }
        let spends = self.tracker.spends_of(txid);
        let why = self.removal_cause(&spends, incoming).await?;
        tracing::info!(%txid, ?why, "tracked transaction left the mempool");
        let step = self.tracker.mempool_removed(&self.index, txid, why, tip);
        self.commit_step(step)
    }

    /// Whether the node still holds a transaction announced as removed: a forged `R` (or one
    /// re-added since) must not make a payment look dropped.
    async fn still_in_mempool(&mut self, txid: Txid) -> Result<bool, FollowError> {
        let held = self.source.in_mempool(txid).await?;
        if held {
            tracing::warn!(%txid, "a removal was announced for a transaction the node still holds; ignored");
        }
        Ok(held)
    }

    /// Replaced if a mempool transaction (one just announced, or one the node names) spends the
    /// same outpoints; in conflict if a recent block did; else evicted.
    async fn removal_cause(
        &mut self,
        spends: &[OutPoint],
        incoming: &[Transaction],
    ) -> Result<Removal, FollowError> {
        let replacement = incoming
            .iter()
            .find(|t| t.input.iter().any(|i| spends.contains(&i.previous_output)));
        if let Some(r) = replacement {
            return Ok(Removal::Replaced(r.compute_txid()));
        }
        if let Some(by) = self.recent_spends.conflict(spends) {
            return Ok(Removal::Conflict(by));
        }
        match self.source.mempool_spender(spends).await {
            Ok(Some(by)) => Ok(Removal::Replaced(by)),
            Ok(None) => Ok(Removal::Evicted),
            // Nodes before v24 lack gettxspendingprevout: without it, evicted is the best guess.
            Err(NodeError::Rpc { code: -32601, .. }) => Ok(Removal::Evicted),
            Err(e) => Err(e.into()),
        }
    }

    /// A transaction announced while the store fails: kept for later if the node holds it
    /// and it matches; anything that goes wrong here is left to the resync.
    pub(super) async fn defer_announced(&mut self, txid: Txid) {
        if let Ok(Some(tx)) = self.mempool_body(txid, false).await {
            let _ = self.defer_if_matched(&tx);
        }
    }

    /// Keeps a mempool transaction for `replay_deferred` if it pays or spends a watch.
    fn defer_if_matched(&mut self, tx: &Transaction) -> Result<(), FollowError> {
        let Some(tip) = self.tip_ref()? else {
            return Ok(());
        };
        if !self
            .tracker
            .mempool_add(&self.index, tx, tip)
            .events
            .is_empty()
        {
            self.defer(tx);
        }
        Ok(())
    }

    /// Keeps a matched transaction, once, for `replay_deferred`.
    fn defer(&mut self, tx: &Transaction) {
        let txid = tx.compute_txid();
        if !self
            .deferred_mempool
            .iter()
            .any(|t| t.compute_txid() == txid)
        {
            self.deferred_mempool.push(tx.clone());
        }
    }

    /// Matches again, in their order, mempool transactions whose step could not be committed.
    pub(super) fn replay_deferred(&mut self) -> Result<(), FollowError> {
        while let Some(tx) = self.deferred_mempool.first().cloned() {
            let Some(tip) = self.tip_ref()? else {
                return Ok(());
            };
            let step = self.tracker.mempool_add(&self.index, &tx, tip);
            self.commit_step(step)?;
            self.deferred_mempool.remove(0);
        }
        Ok(())
    }

    /// Reconciles with `getrawmempool`: classifies tracked transactions that left while we were
    /// not listening, then matches every transaction not seen yet, in the node's order.
    pub async fn sync_mempool(&mut self) -> Result<(), FollowError> {
        // A transaction mined between our chain sync and this snapshot would look evicted:
        // trust the snapshot only if the best block is still the one we stored.
        let mut tries = 0;
        let txids = loop {
            let (txids, _sequence) = self.source.raw_mempool().await?;
            let best = self.source.best_block_hash().await?;
            if self.store.tip()?.map(|t| t.hash) == Some(best) || tries == 5 {
                break txids;
            }
            tries += 1;
            self.sync_chain().await?;
        };
        let current: HashSet<Txid> = txids.iter().copied().collect();
        self.seen_mempool.retain(|t| current.contains(t));
        let mut fresh = Vec::new();
        for txid in txids
            .iter()
            .filter(|t| !self.seen_mempool.contains(*t))
            .copied()
            .collect::<Vec<_>>()
        {
            if let Some(tx) = self.mempool_body(txid, true).await? {
                fresh.push(tx);
            }
        }
        for txid in self.tracker.in_mempool() {
            if !current.contains(&txid) && !self.pending_removals.iter().any(|(t, _)| *t == txid) {
                self.pending_removals.push((txid, Instant::now()));
            }
        }
        self.classify_pending(&fresh, Duration::ZERO).await?;
        // These came from a getrawmempool validated against the tip: the node vouched for them.
        // Once a commit fails, the rest that match are kept for later without trying each.
        let mut failed = None;
        for tx in &fresh {
            if failed.is_some() {
                self.defer_if_matched(tx)?;
            } else if let Err(e) = self.match_mempool_tx(tx) {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}
