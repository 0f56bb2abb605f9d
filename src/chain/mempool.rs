//! The follower's mempool side: matching new transactions, and telling why tracked ones left
//! (replaced, in conflict with a block, or evicted), the same way whether ZMQ announced the
//! removal or a resync over RPC found it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bitcoin::{OutPoint, Transaction, Txid};

use super::{FollowError, Follower};
use crate::node::{ChainSource, NodeResult};
use crate::senders::SpentCoin;
use crate::store::ChainStore;
use crate::tracker::Removal;

/// Mempool transactions fetched per JSON-RPC batch in a resync.
const RESYNC_BATCH: usize = 500;

/// A tracked transaction announced as removed, and when.
type Removed = (Txid, Instant);

/// What the follower knows of the node's mempool beyond the tracked transactions.
#[derive(Default)]
pub(super) struct MempoolState {
    /// Mempool txids already matched, so a resync fetches only new ones.
    seen: HashSet<Txid>,
    /// Relayed over ZMQ and concerning nothing of ours when announced, never asked about: a
    /// resync need not fetch them, but an announcement of one is looked at again (a forged
    /// early copy must not hide the real replacement of a tracked transaction).
    idle: HashSet<Txid>,
    /// Matched mempool transactions whose commit failed, to be matched again first.
    deferred: Vec<Transaction>,
    /// Tracked transactions announced as removed, classified by what comes next.
    removals: Vec<Removed>,
}

impl MempoolState {
    pub(super) fn removals_pending(&self) -> bool {
        !self.removals.is_empty()
    }

    fn note_removal(&mut self, txid: Txid) {
        if !self.removals.iter().any(|(t, _)| *t == txid) {
            self.removals.push((txid, Instant::now()));
        }
    }

    /// Mined: no longer in the mempool, and to be matched anew if it comes back after a reorg.
    pub(super) fn forget(&mut self, txid: &Txid) {
        self.seen.remove(txid);
        self.idle.remove(txid);
    }

    /// Everything is matched anew (a watch joined live following).
    pub(super) fn forget_all(&mut self) {
        self.seen.clear();
        self.idle.clear();
    }
}

impl<S: ChainSource, St: ChainStore> Follower<S, St> {
    /// ZMQ `A`: a transaction entered the mempool.
    pub(super) async fn mempool_added(&mut self, txid: Txid) -> Result<(), FollowError> {
        if self.mempool.seen.contains(&txid) {
            return Ok(());
        }
        // A relayed body that pays, spends or replaces nothing of ours changes nothing: the
        // node need not be asked about it. Most of a busy mempool's traffic ends here.
        let concerning = match self.source.relayed(&txid) {
            Some(tx) if !self.concerns_us(tx, &self.removed_spends(), &HashSet::new())? => {
                self.mempool.idle.insert(txid);
                return Ok(());
            }
            Some(tx) => Some(super::senders::spent_outpoints(tx)),
            None => None,
        };
        // One that does: the node's word that it holds it, and the coins it spends (for its
        // senders), asked for together, as each round trip to a busy node counts.
        let (body, coins) = match concerning {
            Some(spent) => {
                let node = self.source.node();
                let (body, coins) =
                    tokio::join!(self.source.mempool_body(txid), node.spent_coins(&spent));
                (body?, Some(coins))
            }
            None => (self.source.mempool_body(txid).await?, None),
        };
        let Some(tx) = body else {
            return Ok(());
        };
        self.classify_pending(std::slice::from_ref(&tx), Duration::ZERO)
            .await?;
        self.match_mempool_tx(&tx, coins).await
    }

    /// Matches a mempool transaction the node has just vouched for. If its step cannot be
    /// committed, the transaction is kept and matched again before anything later (its block
    /// included), so a store outage does not turn its tx.pending into nothing.
    async fn match_mempool_tx(
        &mut self,
        tx: &Transaction,
        coins: Option<NodeResult<Vec<Option<SpentCoin>>>>,
    ) -> Result<(), FollowError> {
        let txid = tx.compute_txid();
        let Some(tip) = self.tip_ref()? else {
            return Ok(());
        };
        let mut step = self.tracker.mempool_add(&self.index, tx, tip);
        let matched = !step.events.is_empty();
        // Kept for later on any failure, the node's included: its tx.pending is owed.
        if let Err(e) = self.fill_mempool_senders(&mut step, tx, coins).await {
            if matched {
                self.defer(tx);
            }
            return Err(e);
        }
        if let Err(e) = self.commit_step(step) {
            if matched {
                self.defer(tx);
            }
            return Err(e);
        }
        self.rescan_mempool_tx(tx, tip).await?;
        // Only once handled: a failure above leaves it for the resync to pick up.
        self.mempool.seen.insert(txid);
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
        let (due, wait): (Vec<Removed>, Vec<Removed>) = std::mem::take(&mut self.mempool.removals)
            .into_iter()
            .partition(|(_, at)| at.elapsed() >= min_age);
        self.mempool.removals = wait;
        for (i, &(txid, _)) in due.iter().enumerate() {
            let classified = self.classify_one(txid, incoming, tip).await;
            if classified.is_err() {
                // Not lost: this removal and the ones after it wait for the next try.
                self.mempool.removals.extend_from_slice(&due[i..]);
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
        if self.source.still_in_mempool(txid).await? {
            return Ok(());
        }
        let mut spends = self.tracker.spends_of(txid);
        if spends.is_empty() {
            spends = self.rescan_spends_of(txid);
        }
        let why = self.removal_cause(&spends, incoming).await?;
        if why == Removal::Conflict(txid) {
            // Mined: its block confirms it (the rescan's, when it is the rescan's).
            return Ok(());
        }
        tracing::info!(%txid, ?why, "tracked transaction left the mempool");
        let step = self.tracker.mempool_removed(&self.index, txid, why, tip);
        self.commit_step(step)?;
        self.rescan_mempool_removed(txid, why, tip)
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
        // Without gettxspendingprevout (nodes before v24), evicted is the best guess.
        Ok(match self.source.mempool_spender(spends).await? {
            Some(by) => Removal::Replaced(by),
            None => Removal::Evicted,
        })
    }

    /// ZMQ `R`: a tracked unconfirmed transaction left (never published for one mined); why is
    /// told once what follows shows it.
    pub(super) fn mempool_removed(&mut self, txid: Txid) {
        self.mempool.forget(&txid);
        if self.tracker.is_unconfirmed(txid) || self.rescan_in_mempool().contains(&txid) {
            self.mempool.note_removal(txid);
        }
    }

    /// A transaction announced while the store fails: kept for later if the node holds it
    /// and it matches; anything that goes wrong here is left to the resync.
    pub(super) async fn defer_announced(&mut self, txid: Txid) {
        if let Ok(Some(tx)) = self.source.mempool_body(txid).await {
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
            .mempool
            .deferred
            .iter()
            .any(|t| t.compute_txid() == txid)
        {
            self.mempool.deferred.push(tx.clone());
        }
    }

    /// Matches again, in their order, mempool transactions whose step could not be committed.
    pub(super) async fn replay_deferred(&mut self) -> Result<(), FollowError> {
        while let Some(tx) = self.mempool.deferred.first().cloned() {
            let Some(tip) = self.tip_ref()? else {
                return Ok(());
            };
            let mut step = self.tracker.mempool_add(&self.index, &tx, tip);
            self.fill_mempool_senders(&mut step, &tx, None).await?;
            self.commit_step(step)?;
            self.rescan_mempool_tx(&tx, tip).await?;
            self.mempool.deferred.remove(0);
        }
        Ok(())
    }

    /// Reconciles with `getrawmempool`: classifies tracked transactions that left while we were
    /// not listening, then matches every transaction not seen yet, in the node's order. Bodies
    /// are fetched in JSON-RPC batches and matched as they arrive; only those that concern a
    /// watch (or may have replaced a tracked one) are kept, so a mainnet-sized mempool costs
    /// a batch's memory, not the mempool's.
    pub async fn sync_mempool(&mut self) -> Result<(), FollowError> {
        // A transaction mined between our chain sync and this snapshot would look evicted:
        // trust the snapshot only if the best block is still the one we stored.
        let mut tries = 0;
        let txids = loop {
            let (txids, best) = self.source.mempool_snapshot().await?;
            if self.store.tip()?.map(|t| t.hash) == Some(best) || tries == 5 {
                break txids;
            }
            tries += 1;
            self.sync_chain().await?;
        };
        if self.tip_ref()?.is_none() {
            // Nothing can be matched before the chain has a base.
            return Ok(());
        }
        // A watch added since this resync began (a CLI or API add racing it) must match what
        // the snapshot holds: its writes came before any payment the snapshot shows.
        self.refresh_watches()?;
        let mut fresh = {
            let current: HashSet<Txid> = txids.iter().copied().collect();
            self.mempool.seen.retain(|t| current.contains(t));
            self.mempool.idle.retain(|t| current.contains(t));
            // Not the rescan's: gone from a snapshot may mean mined in a block it has not reached.
            for txid in self.tracker.in_mempool() {
                if !current.contains(&txid) {
                    self.mempool.note_removal(txid);
                }
            }
            let m = &self.mempool;
            txids
                .into_iter()
                .filter(|t| !m.seen.contains(t) && !m.idle.contains(t))
                .collect::<Vec<_>>()
        };
        let began = Instant::now();
        if fresh.len() >= RESYNC_BATCH {
            tracing::info!(transactions = fresh.len(), "reading the node's mempool");
        }
        // Matching a kept transaction can derive new addresses of a descriptor watch, which a
        // later transaction passed over may pay: those are read again, until nothing new is
        // derived. (An earlier one is not: it paid an address nobody watched yet, as when
        // announced one by one.)
        // One pass at least: it also tells why tracked transactions left.
        loop {
            let (passed, again) = self.sync_mempool_pass(&fresh).await?;
            self.mempool.seen.extend(passed);
            if again.is_empty() {
                break;
            }
            fresh = again;
        }
        if began.elapsed() > Duration::from_secs(1) {
            tracing::info!(took = ?began.elapsed(), "mempool read");
        }
        Ok(())
    }

    /// One reading of `txids`' bodies (in the node's order): those that concern us are
    /// classified and matched in that order. Returns the txids of the others: those done with,
    /// and those to read again because they come after a match that derived new addresses.
    async fn sync_mempool_pass(
        &mut self,
        txids: &[Txid],
    ) -> Result<(Vec<Txid>, Vec<Txid>), FollowError> {
        let replacing = self.removed_spends();
        // Kept transactions, and where each stood among `txids`.
        let (mut kept, mut kept_at) = (Vec::new(), Vec::new());
        // Outputs of kept transactions may be watched coins once these are matched: a
        // transaction spending one (a sweep of an unconfirmed deposit) is kept too.
        let mut kept_txids = HashSet::new();
        let mut passed = Vec::new();
        for part in txids.chunks(RESYNC_BATCH) {
            for tx in self.source.mempool_bodies(part).await? {
                let at = kept_at.len() + passed.len();
                let txid = tx.compute_txid();
                if self.concerns_us(&tx, &replacing, &kept_txids)? {
                    kept_txids.insert(txid);
                    kept.push(tx);
                    kept_at.push(at);
                } else {
                    passed.push((at, txid));
                }
            }
        }
        self.classify_pending(&kept, Duration::ZERO).await?;
        // These came from a getrawmempool validated against the tip: the node vouched for them.
        // Once a commit fails, the rest that match are kept for later without trying each.
        let mut failed = None;
        let mut derived_after = None;
        for (at, tx) in kept_at.iter().zip(&kept) {
            let before = self.derived_scripts();
            if failed.is_some() {
                self.defer_if_matched(tx)?;
            } else if let Err(e) = self.match_mempool_tx(tx, None).await {
                failed = Some(e);
            }
            if derived_after.is_none() && self.derived_scripts() != before {
                derived_after = Some(*at);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let (again, done): (Vec<_>, Vec<_>) = passed
            .into_iter()
            .partition(|(at, _)| derived_after.is_some_and(|d| *at > d));
        let txids = |v: Vec<(usize, Txid)>| v.into_iter().map(|(_, t)| t).collect();
        Ok((txids(done), txids(again)))
    }

    /// How many scripts the live index and a running rescan's watch: a change means matching
    /// derived new addresses.
    fn derived_scripts(&self) -> usize {
        self.index.script_count() + self.rescan_script_count()
    }

    /// The outpoints spent by tracked transactions waiting to be told why they left: a
    /// transaction spending one of them replaced it.
    fn removed_spends(&self) -> HashSet<OutPoint> {
        self.mempool
            .removals
            .iter()
            .flat_map(|(txid, _)| {
                let spends = self.tracker.spends_of(*txid);
                if spends.is_empty() {
                    self.rescan_spends_of(*txid)
                } else {
                    spends
                }
            })
            .collect()
    }

    /// Whether a mempool transaction pays or spends a watch (the live one's or the rescan's),
    /// spends what a removed tracked transaction spent, or spends an output of `parents`.
    fn concerns_us(
        &self,
        tx: &Transaction,
        replacing: &HashSet<OutPoint>,
        parents: &HashSet<Txid>,
    ) -> Result<bool, FollowError> {
        // Without a base block nothing is matched, and nothing may be passed over either.
        let Some(tip) = self.tip_ref()? else {
            return Ok(true);
        };
        if tx.input.iter().any(|i| {
            replacing.contains(&i.previous_output) || parents.contains(&i.previous_output.txid)
        }) {
            return Ok(true);
        }
        if !self.tracker.mempool_add(&self.index, tx, tip).is_empty() {
            return Ok(true);
        }
        Ok(self.rescan_concerns(tx, tip))
    }
}
