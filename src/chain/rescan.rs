//! Rescans: a watch added with `--rescan-from HEIGHT` is scanned block by block from that
//! height, beside live following, with a tracker of its own, so it emits exactly the events a
//! watcher running since then would have emitted (the same ids). What a batch of blocks finds
//! is committed at its end with the batch's progress, in one transaction, so a crash resumes at
//! most a batch before where it stopped and finds the same. At the tip the watch joins live
//! following.
//!
//! Its mempool is followed live from the start, by the rescan's own tracker: a payment made
//! during a long rescan is pending at once, and when the rescan reaches its block it confirms
//! the transaction it already tracks, so nothing is announced twice. Blocks stay the rescan's
//! alone until it reaches the tip: two trackers confirming one watch's transactions would
//! announce them twice, with different ids after a reorg.

use std::time::{Duration, Instant};

use std::collections::HashMap;

use futures_util::future::join_all;

use super::ahead::{average_size, fetch_blocks, group_of, node_hashes, Ahead, GROUP};
use super::support::Progress;
use super::{labelled, FollowError, Follower};
use crate::changeset::ChangeSet;
use crate::merge::Merge;
use bitcoin::{Block, BlockHash, OutPoint, Transaction, Txid};
use filters::{FilterState, Skipped};

use crate::event::{BlockRef, TipRef};
use crate::node::ChainSource;
use crate::senders::SpentCoin;
use crate::store::ChainStore;
use crate::tracker::{Removal, Tracker, TrackerStep};
use crate::watch::{Overlay, RescanChanges, WatchIndex, WatchedCoin};

/// Blocks scanned between two looks at live news, and between two commits of the rescan's
/// progress: 25, or more of small blocks. A batch's end costs a commit and a pause in the
/// reading ahead, which for regtest's small blocks was much of the rescan. Past 25 blocks a
/// batch goes on while it has read less than `BATCH_BYTES` and for less than `BATCH_TIME`,
/// up to as many blocks as come to `BATCH_BYTES` judged by the blocks read before, and
/// `MAX_BATCH`. (Both bounds are checked between groups, so a batch may end a group past.)
const BATCH: u32 = 25;
const BATCH_BYTES: usize = 32 * 1024 * 1024;
const BATCH_TIME: Duration = Duration::from_millis(250);
const MAX_BATCH: u32 = 1_000;
/// Hashes of heights below the blocks we keep, asked of the node in one batch for the groups
/// to come: one round trip per group was as long as reading the group's blocks. Asked again
/// once `HASHES_FRESH` old, as the node's chain may have moved.
const HASHES_AT_ONCE: u32 = 1_000;
const HASHES_FRESH: Duration = Duration::from_secs(1);
/// Blocks asked of the node at once where filters guide: few, as each may be a few megabytes
/// and the filters name the ones worth reading.
const AHEAD: u32 = 4;

mod filters;

pub(super) struct RescanJob {
    watch_id: String,
    next: u32,
    /// The next height as the store has it: blocks that change nothing are not committed one
    /// by one, only their progress, at the end of a batch.
    stored: u32,
    /// What the batch found so far: applied to the tracker and index, committed with the
    /// batch's progress at its end, all at once.
    staged: ChangeSet,
    tracker: Tracker,
    index: WatchIndex,
    progress: Option<Progress>,
    started: Instant,
    backfilled: bool,
    filters: FilterState,
    /// Without filters, the next group of blocks, asked for while this one is scanned.
    ahead: Option<Ahead>,
    /// The average size of the blocks read last, which sizes the batch.
    block_size: Option<usize>,
    /// The node's hashes of heights `hashes_from..`, below the blocks we keep, asked at
    /// `hashes_at`.
    hashes_from: u32,
    hashes: Vec<BlockHash>,
    hashes_at: Instant,
}

impl RescanJob {
    /// Blocks to scan in this batch.
    fn batch(&self) -> u32 {
        self.block_size.map_or(BATCH, |size| {
            (BATCH_BYTES / size.max(1)).clamp(BATCH as usize, MAX_BATCH as usize) as u32
        })
    }

    /// The node's hash of height `h`, if the job holds it.
    fn node_hash(&self, h: u32) -> Option<BlockHash> {
        let i = h.checked_sub(self.hashes_from)?;
        self.hashes.get(i as usize).copied()
    }

    /// Forgets the node's hashes it holds (a reorg, or a rescan moved back).
    fn forget_node_hashes(&mut self) {
        self.hashes.clear();
    }
}

impl<S: ChainSource, St: ChainStore> Follower<S, St> {
    /// Starts the first rescan the store asks for, if none is running.
    pub(super) fn pick_up_rescan(&mut self) -> Result<(), FollowError> {
        if self.rescan.is_some() {
            return Ok(());
        }
        let Some((watch_id, next)) = self.store.rescans()?.into_iter().next() else {
            return Ok(());
        };
        let Some(watch) = self
            .store
            .load_watches()?
            .into_iter()
            .find(|w| w.id == watch_id)
        else {
            return Ok(());
        };
        let mut index = WatchIndex::new(self.network, [watch]);
        index.coins.extend(
            self.store
                .load_coins()?
                .into_iter()
                .filter(|(_, c)| c.watch_id == watch_id),
        );
        for d in self
            .store
            .load_derivations()?
            .iter()
            .filter(|d| d.watch_id == watch_id)
        {
            index.set_used(d);
        }
        let entries = self
            .store
            .load_tracked()?
            .into_iter()
            .filter(|t| t.watch_id == watch_id);
        let tracker = Tracker::new(self.tracker.network, self.tracker.finality_depth, entries);
        tracing::info!(watch = %watch_id, from = next, "rescan started");
        // What the mempool already holds for the watch is matched by the rescan's tracker too.
        self.mempool.forget_all();
        self.state = self.state.max(super::SyncState::Stale);
        self.rescan = Some(RescanJob {
            watch_id,
            next,
            stored: next,
            staged: ChangeSet::default(),
            tracker,
            index,
            progress: None,
            started: Instant::now(),
            backfilled: false,
            filters: FilterState::new(),
            ahead: None,
            block_size: None,
            hashes_from: 0,
            hashes: Vec::new(),
            hashes_at: Instant::now(),
        });
        Ok(())
    }

    /// Matches a mempool transaction against the watch being rescanned, and commits what it
    /// finds in the rescan's tracker.
    pub(super) async fn rescan_mempool_tx(
        &mut self,
        tx: &Transaction,
        tip: TipRef,
    ) -> Result<(), FollowError> {
        let Some(mut job) = self.rescan.take() else {
            return Ok(());
        };
        let done = self.rescan_mempool_step(&mut job, tx, tip).await;
        self.rescan = Some(job);
        done
    }

    async fn rescan_mempool_step(
        &mut self,
        job: &mut RescanJob,
        tx: &Transaction,
        tip: TipRef,
    ) -> Result<(), FollowError> {
        let mut step = job.tracker.mempool_add(&job.index, tx, tip);
        if step.is_empty() {
            return Ok(());
        }
        // The rescan has not reached every block: a coin of the watch it has not found yet may
        // be spent here (a spend with change back to the watch). The node names the coins the
        // transaction spends; those paying the watch are its coins, as the rescan will find.
        let coins = self.mempool_spent_coins(tx).await?;
        if let Some(coins) = &coins {
            let found = unfound_watch_coins(&job.index, coins);
            if !found.is_empty() {
                job.index.coins.extend(found.iter().cloned());
                step = job.tracker.mempool_add(&job.index, tx, tip);
                step.index.add_coins(found);
            }
        }
        if let Some(coins) = coins {
            self.take_senders(&mut step, [(tx, coins)]);
        }
        self.commit_rescan(job, step, RescanChanges::default())
    }

    /// Commits a step of the rescan's own tracker, with where the rescan stands (`next`), and
    /// applies it to the job.
    fn commit_rescan(
        &mut self,
        job: &mut RescanJob,
        step: TrackerStep,
        next: RescanChanges,
    ) -> Result<(), FollowError> {
        debug_assert!(job.staged.is_empty(), "a batch's staged changes come first");
        let mut changes = labelled(&job.index, step)?;
        changes.rescan = next;
        let committed = self.store_commit(&changes)?;
        job.tracker.apply(&changes.tracked);
        job.index.apply(&changes.index);
        self.announce(&committed, "event recorded (rescan)");
        Ok(())
    }

    /// Tracked mempool transactions of the watch being rescanned.
    pub(super) fn rescan_in_mempool(&self) -> Vec<Txid> {
        self.rescan
            .as_ref()
            .map(|j| j.tracker.in_mempool())
            .unwrap_or_default()
    }

    /// How many scripts a running rescan's index watches.
    pub(super) fn rescan_script_count(&self) -> usize {
        self.rescan.as_ref().map_or(0, |j| j.index.script_count())
    }

    /// Whether the rescan's watches would match a mempool transaction.
    pub(super) fn rescan_concerns(&self, tx: &Transaction, tip: TipRef) -> bool {
        self.rescan
            .as_ref()
            .is_some_and(|j| !j.tracker.mempool_add(&j.index, tx, tip).is_empty())
    }

    pub(super) fn rescan_spends_of(&self, txid: Txid) -> Vec<OutPoint> {
        self.rescan
            .as_ref()
            .map(|j| j.tracker.spends_of(txid))
            .unwrap_or_default()
    }

    /// A transaction the rescan tracks in the mempool left it: told as live following tells it.
    pub(super) fn rescan_mempool_removed(
        &mut self,
        txid: Txid,
        why: Removal,
        tip: TipRef,
    ) -> Result<(), FollowError> {
        let Some(mut job) = self.rescan.take() else {
            return Ok(());
        };
        let step = job.tracker.mempool_removed(&job.index, txid, why, tip);
        let done = if step.is_empty() {
            Ok(())
        } else {
            self.commit_rescan(&mut job, step, RescanChanges::default())
        };
        self.rescan = Some(job);
        done
    }

    pub(super) fn rescanning(&self) -> bool {
        self.rescan.is_some()
    }

    /// Scans a batch of blocks (see `BATCH`) of the running rescan; finishes it at the tip.
    pub(super) async fn rescan_batch(&mut self) -> Result<(), FollowError> {
        let Some(mut job) = self.rescan.take() else {
            return Ok(());
        };
        let result = self.rescan_blocks(&mut job).await;
        match result {
            Ok(true) => self.finish_rescan(job),
            Ok(false) => {
                self.rescan = Some(job);
                Ok(())
            }
            Err(e) => {
                // What the batch found up to the failure is kept if it can be stored. If not,
                // the job, ahead of the store, is dropped and read again from the store, as
                // after a restart, and the batch scanned again.
                if !job.staged.is_empty() {
                    if let Err(also) = self.store_rescan_progress(&mut job, u32::MAX) {
                        tracing::debug!(watch = %job.watch_id, error = %also, "rescan batch not stored; resuming from the store");
                        self.rescan_owed = true;
                        return Err(e);
                    }
                }
                self.rescan = Some(job);
                Err(e)
            }
        }
    }

    /// Applies a step of the rescan's tracker to the job and stages it for the batch's commit.
    fn stage_rescan(&mut self, job: &mut RescanJob, step: TrackerStep) -> Result<(), FollowError> {
        let changes = labelled(&job.index, step)?;
        job.tracker.apply(&changes.tracked);
        job.index.apply(&changes.index);
        job.staged.merge(changes);
        Ok(())
    }

    /// The hashes of heights `from..=to` to read: ours within the blocks we keep, the node's
    /// below them, asked for `HASHES_AT_ONCE` at a time (without filters, which name their
    /// own); `None` where neither is known yet.
    async fn hashes_to_read(
        &mut self,
        job: &mut RescanJob,
        from: u32,
        to: u32,
        tip: u32,
    ) -> Result<Vec<Option<BlockHash>>, FollowError> {
        let lowest = self.lowest_kept()?.unwrap_or(tip + 1);
        let held = job.hashes_from..job.hashes_from + job.hashes.len() as u32;
        let below_kept = to.min(lowest.saturating_sub(1));
        let uncovered = !(held.contains(&from) && held.contains(&below_kept))
            || job.hashes_at.elapsed() > HASHES_FRESH;
        if job.filters.off() && from < lowest && uncovered {
            let count = HASHES_AT_ONCE.min(lowest - from);
            let hashes = node_hashes(self.source.node(), from, count).await?;
            (job.hashes_from, job.hashes, job.hashes_at) = (from, hashes, Instant::now());
        }
        self.hashes_held(job, lowest, from, to)
    }

    /// The lowest height of the blocks we keep; `None` if we keep none.
    fn lowest_kept(&self) -> Result<Option<u32>, FollowError> {
        Ok(self.store.lowest_block()?.map(|b| b.height))
    }

    /// The hashes of heights `from..=to` as the job holds them: ours from `lowest` (the
    /// lowest of the blocks we keep) up; below it the node's the job asked for, else `None`
    /// (not looked up one by one: a filter span reaches far below).
    fn hashes_held(
        &self,
        job: &RescanJob,
        lowest: u32,
        from: u32,
        to: u32,
    ) -> Result<Vec<Option<BlockHash>>, FollowError> {
        let mut held = Vec::new();
        for h in from..=to {
            held.push(match h < lowest {
                true => job.node_hash(h),
                false => self.store.block_at(h)?.map(|b| b.hash),
            });
        }
        Ok(held)
    }

    /// Stores the chain from just below the rescan's start up to the lowest block kept (within
    /// the kept window), so a reorg reaching into the rescanned range is found like any other.
    async fn backfill(&mut self, job: &mut RescanJob) -> Result<(), FollowError> {
        job.backfilled = true;
        let (Some(lowest), Some(tip)) = (self.store.lowest_block()?, self.store.tip()?) else {
            return Ok(());
        };
        let from = job
            .next
            .saturating_sub(1)
            .max(tip.height.saturating_sub(self.store.keep_blocks()));
        if from >= lowest.height {
            return Ok(());
        }
        let blocks = self
            .source
            .stored_blocks(from, lowest.height - from)
            .await?;
        let linked = blocks.windows(2).all(|w| w[1].prev == w[0].hash)
            && blocks.last().is_some_and(|b| b.hash == lowest.prev);
        if linked {
            // Blocks below the tip only; said all the same, as every block write is.
            self.forget_tip();
            self.store.backfill_blocks(&blocks)?;
        }
        Ok(())
    }

    /// Returns whether the rescan reached the tip.
    async fn rescan_blocks(&mut self, job: &mut RescanJob) -> Result<bool, FollowError> {
        if !job.backfilled {
            self.backfill(job).await?;
        }
        let Some(tip) = self.store.tip()? else {
            return Ok(false);
        };
        if job.progress.is_none() {
            job.progress = Some(Progress::new(job.next, tip.height));
        }
        let mut may_ask = true;
        let (mut read, mut bytes, started) = (0, 0, Instant::now());
        let batch = job.batch();
        // Bytes and time bound it too: blocks may grow far beyond those the batch was sized
        // by, and a distant node makes each group slow.
        let more = |read: u32, bytes: usize| {
            read < BATCH || (bytes < BATCH_BYTES && started.elapsed() < BATCH_TIME)
        };
        while job.next <= tip.height && read < batch && more(read, bytes) {
            match self.skip_by_filters(job, tip.height, &mut may_ask).await? {
                Skipped::Stop => break,
                Skipped::AtMatch | Skipped::Unfiltered => {}
            }
            // Where the filters guide, only the blocks the confirmations need are worth asking
            // for; where they failed for now a few at once; without them, many.
            let blocks = match self.ahead_still_wanted(job)? {
                Some(ahead) => ahead.blocks().await?,
                None => {
                    let wanted = match job.filters.guiding() {
                        true => (job.tracker.confirmations_owed(&job.index))
                            .max(job.filters.to_read(AHEAD))
                            .clamp(1, AHEAD),
                        false if job.filters.off() => GROUP,
                        false => AHEAD,
                    };
                    let upto = tip
                        .height
                        .min(job.next.saturating_add(wanted.min(batch - read) - 1));
                    // Below what we keep, the node's chain is the truth; within it, ours is.
                    let mut kept = self.hashes_to_read(job, job.next, upto, tip.height).await?;
                    for (i, hash) in kept.iter_mut().enumerate() {
                        *hash = hash.or(job.filters.hash_at(i));
                    }
                    fetch_blocks(self.source.node(), job.next, kept).await?
                }
            };
            let size = average_size(&blocks);
            bytes += size * blocks.len();
            job.block_size = Some(size).filter(|s| *s > 0).or(job.block_size);
            let after = job.next + blocks.len() as u32;
            if job.filters.off() && after <= tip.height {
                // The group this batch would ask for next, or the next batch's first.
                let left = match batch - (read + blocks.len() as u32).min(batch) {
                    0 => job.batch(),
                    left => left,
                };
                let upto = tip.height.min(after + group_of(size).min(left) - 1);
                let kept = self.hashes_to_read(job, after, upto, tip.height).await?;
                job.ahead = Some(Ahead::ask(self.source.shared_node(), after, kept));
            }
            let asked = spent_coins_of(self.source.node(), &job.index, &blocks).await;
            for ((hash, block), asked) in blocks.into_iter().zip(asked) {
                self.rescan_block(job, hash, &block, asked).await?;
                read += 1;
                if job.ahead.is_some() {
                    // The follower's runtime has this one thread: the blocks ahead are asked
                    // for, and their answers handed to be decoded, only when it yields.
                    tokio::task::yield_now().await;
                }
            }
        }
        self.store_rescan_progress(job, tip.height)
    }

    /// The blocks asked for ahead, if they are still the ones to read next.
    fn ahead_still_wanted(&self, job: &mut RescanJob) -> Result<Option<Ahead>, FollowError> {
        let Some(ahead) = job.ahead.take() else {
            return Ok(None);
        };
        let lowest = self.lowest_kept()?.unwrap_or(u32::MAX);
        let kept_now = self.hashes_held(job, lowest, ahead.first(), ahead.last())?;
        let wanted = job.filters.off() && ahead.still_wanted(job.next, &kept_now);
        Ok(wanted.then_some(ahead))
    }

    /// Connects the rescan's next block to its tracker.
    async fn rescan_block(
        &mut self,
        job: &mut RescanJob,
        hash: BlockHash,
        block: &Block,
        asked: Option<HashMap<Txid, Vec<SpentCoin>>>,
    ) -> Result<(), FollowError> {
        let h = job.next;
        let at = BlockRef {
            hash,
            height: h,
            time: block.header.time,
        };
        let mut step = job.tracker.connect_block(&job.index, block, at);
        self.fill_block_senders(&mut step, block, at, asked).await?;
        // A commit (an fsync) per block would be most of the rescan's time: the batch commits
        // once. A crash scans the batch again, finding the same.
        if !step.is_empty() {
            self.stage_rescan(job, step)?;
        }
        job.next = h + 1;
        job.filters.passed();
        if let Some(p) = job.progress.as_mut() {
            p.tick(h);
        }
        Ok(())
    }

    /// Commits what the batch staged with where the rescan stands; returns whether it reached
    /// `tip`.
    fn store_rescan_progress(
        &mut self,
        job: &mut RescanJob,
        tip: u32,
    ) -> Result<bool, FollowError> {
        if job.stored != job.next || !job.staged.is_empty() {
            let mut changes = std::mem::take(&mut job.staged);
            changes.rescan = RescanChanges::next(&job.watch_id, Some(job.next));
            let committed = match self.store_commit(&changes) {
                Ok(committed) => committed,
                Err(e) => {
                    // Still staged (progress alone is not: it is stored again at the next
                    // batch's end).
                    changes.rescan = RescanChanges::default();
                    job.staged = changes;
                    return Err(e);
                }
            };
            job.stored = job.next;
            self.announce(&committed, "event recorded (rescan)");
        }
        Ok(job.next > tip)
    }

    /// A block the rescan already scanned was disconnected: reorg what the rescan confirmed in
    /// it, as a live watcher would, and scan the new branch from there.
    pub(super) fn rescan_disconnected(
        &mut self,
        block: BlockRef,
        new_tip: crate::event::TipRef,
    ) -> Result<(), FollowError> {
        let Some(mut job) = self.rescan.take() else {
            return Ok(());
        };
        job.filters.forget();
        job.ahead = None;
        job.forget_node_hashes();
        let done = if job.next <= block.height {
            Ok(())
        } else {
            let step = job.tracker.disconnect_block(&job.index, block, new_tip);
            let next = RescanChanges::next(&job.watch_id, Some(block.height));
            let done = self.commit_rescan(&mut job, step, next);
            if done.is_ok() {
                job.next = block.height;
                job.stored = block.height;
            }
            done
        };
        self.rescan = Some(job);
        done
    }

    /// The watch joins live following: its tracked state moves to the main tracker.
    fn finish_rescan(&mut self, job: RescanJob) -> Result<(), FollowError> {
        let changes = ChangeSet {
            rescan: RescanChanges::next(&job.watch_id, None),
            ..ChangeSet::default()
        };
        if let Err(e) = self.store_commit(&changes) {
            // Taken up again from the store: at the tip, it finishes at once.
            self.rescan_owed = true;
            return Err(e);
        }
        tracing::info!(watch = %job.watch_id, secs = job.started.elapsed().as_secs_f64(), "rescan finished; following the watch live");
        self.rescan_joined = true;
        self.refresh_watches()
    }
}

/// The coins among `spent` that pay a watch of `index` and that it does not know yet.
fn unfound_watch_coins(index: &WatchIndex, spent: &[SpentCoin]) -> Vec<(OutPoint, WatchedCoin)> {
    spent
        .iter()
        .filter(|c| !index.coins.contains_key(&c.outpoint))
        .flat_map(|c| {
            let probe = Transaction {
                version: bitcoin::transaction::Version::TWO,
                lock_time: bitcoin::absolute::LockTime::ZERO,
                input: vec![],
                output: vec![bitcoin::TxOut {
                    value: c.amount,
                    script_pubkey: c.script.clone(),
                }],
            };
            index.match_tx(&probe).into_iter().map(move |m| {
                let coin = WatchedCoin {
                    watch_id: m.watch_id,
                    address: m.outputs[0].address.clone(),
                    amount_sat: c.amount.to_sat(),
                };
                (c.outpoint, coin)
            })
        })
        .collect()
}

/// The coins spent by the transactions of `blocks` that concern the watches of `index`, asked
/// for all blocks at once, before the blocks are connected one after another: one round trip
/// instead of one per block. `None` for a block with none, or whose answer failed (its
/// senders are then asked for as usual, with its errors handled there).
async fn spent_coins_of<S: ChainSource>(
    node: &S,
    index: &WatchIndex,
    blocks: &[(BlockHash, Block)],
) -> Vec<Option<HashMap<Txid, Vec<SpentCoin>>>> {
    join_all(blocks.iter().map(|(hash, block)| async move {
        let probe = index.probe(&block.txdata);
        let mut overlay = Overlay::default();
        let txids: Vec<Txid> = (block.txdata.iter().enumerate())
            .filter(|(_, tx)| !tx.is_coinbase())
            .filter(|(i, tx)| !(index.match_tx_probed(tx, probe.of(*i), &mut overlay)).is_empty())
            .map(|(_, tx)| tx.compute_txid())
            .collect();
        if txids.is_empty() {
            return None;
        }
        node.block_spent_coins(*hash, &txids).await.ok()
    }))
    .await
}
