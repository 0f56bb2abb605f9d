//! The chain source: tells, one step at a time, what the node did relative to the chain the
//! consumer holds (connect, disconnect, a reorg and its depth, a fork below what is kept), and
//! proves mempool transactions. It reads the consumer's chain through `LocalChain` and never
//! writes it: the consumer commits each step, and the next step is computed from what was
//! committed. ZMQ bodies only spare RPC calls; RPC decides.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, OutPoint, Transaction, Txid};

use super::ahead::{fetch_blocks, group_after, Ahead, GROUP};
use super::support::{BodyCache, Progress};
use crate::config::StartHeight;
use crate::event::{BlockRef, TipRef};
use crate::metrics::Metrics;
use crate::node::zmq_wire::{SequenceEvent, ZmqBody, ZmqMessage};
use crate::node::{ChainSource, HeaderInfo, NodeError};
use crate::store::{ChainStore, StoreError};
use crate::tip::StoredBlock;

/// The consumer's chain, as the source may read it. (Lent as `&mut`: a store connection may
/// be sent between threads but not shared, and the source holds it across node calls. The
/// trait has nothing that writes.)
pub trait LocalChain: Send {
    fn tip(&self) -> Result<Option<StoredBlock>, StoreError>;
    fn block_at(&self, height: u32) -> Result<Option<StoredBlock>, StoreError>;
    fn lowest_block(&self) -> Result<Option<StoredBlock>, StoreError>;
}

impl<T: ChainStore> LocalChain for T {
    fn tip(&self) -> Result<Option<StoredBlock>, StoreError> {
        ChainStore::tip(self)
    }
    fn block_at(&self, height: u32) -> Result<Option<StoredBlock>, StoreError> {
        ChainStore::block_at(self, height)
    }
    fn lowest_block(&self) -> Result<Option<StoredBlock>, StoreError> {
        ChainStore::lowest_block(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Reading the consumer's chain failed.
    #[error(transparent)]
    Local(#[from] StoreError),
}

/// What the node did, relative to the consumer's chain.
#[derive(Debug, Clone, PartialEq)]
pub enum ChainChange {
    /// No chain yet: start after this block (no events for it or anything before).
    Base(StoredBlock),
    /// The node's best chain forks `depth` blocks below our tip; told once, before the
    /// disconnects. `fork_height` is `None` when even genesis differs.
    Reorg {
        depth: u32,
        fork_height: Option<u32>,
        old_tip: StoredBlock,
        best: BlockHash,
        best_height: u32,
    },
    /// The chains fork below every block we keep: each kept block is disconnected, then the
    /// chain starts again (`Base`) just below the lowest of them.
    TooDeep {
        tip: StoredBlock,
        lowest: StoredBlock,
        best: BlockHash,
        best_height: u32,
    },
    /// Our tip is not on the node's best chain.
    Disconnected { block: StoredBlock, new_tip: TipRef },
    /// The next block of the node's best chain, on our tip.
    Connected { block: Box<Block>, at: BlockRef },
}

impl ChainChange {
    /// The consumer's tip height once the change is applied, if the change moves it.
    pub fn tip_height_after(&self) -> Option<u32> {
        match self {
            ChainChange::Base(b) => Some(b.height),
            ChainChange::Connected { at, .. } => Some(at.height),
            ChainChange::Disconnected { block, .. } => block.height.checked_sub(1),
            ChainChange::Reorg { .. } | ChainChange::TooDeep { .. } => None,
        }
    }
}

/// Where the source is in bringing the consumer's chain to the node's.
enum Plan {
    /// Disconnect down to this height (`None`: everything), then start again at `rebase`
    /// (read from the node before the first disconnection: between the last one and the new
    /// base there is then nothing to wait for, so a stop cannot leave the store empty, which
    /// the next start would take for a first run).
    Unwind {
        to: Option<u32>,
        rebase: Option<StoredBlock>,
    },
    /// Connect the node's best chain up to `best`.
    Connect {
        best: BlockHash,
        best_height: u32,
        progress: Progress,
    },
}

impl Plan {
    /// Connect the node's best chain from height `from` up to `best`.
    fn connect(best: BlockHash, best_height: u32, from: u32) -> Plan {
        Plan::Connect {
            best,
            best_height,
            progress: Progress::new(from, best_height),
        }
    }
}

/// What one turn of `next_change` came to.
enum Turn {
    Tell(ChainChange),
    AtTip,
    /// The plan changed: look again.
    Again,
}

/// What a batch of ZMQ messages told.
#[derive(Debug, Default)]
pub struct ZmqNews {
    pub sequence: Vec<SequenceEvent>,
    /// Messages were lost, or this is the first we hear: what we know may be stale.
    pub gap: bool,
}

pub struct NodeSource<S: ChainSource> {
    node: Arc<S>,
    cache: BodyCache,
    plan: Option<Plan>,
    start_height: StartHeight,
    counters: HashMap<String, u32>,
    /// When the sequence topic last spoke: a silence may hide a lost last message, which no
    /// counter gap would reveal.
    last_sequence_msg: Instant,
    metrics: Arc<Metrics>,
    node_height: Option<u32>,
    /// Catching up from far behind: blocks read, by height, and the group asked for next.
    ready: VecDeque<(u32, BlockHash, Block)>,
    ahead: Option<Ahead>,
}

/// Blocks below the node's tip that a catch-up reads one at a time, as ZMQ brings them, and
/// where a reorg of the tip replaces blocks: only those below are read ahead.
const READ_AHEAD_BEHIND: u32 = 4;

impl<S: ChainSource> NodeSource<S> {
    pub fn new(node: Arc<S>, start_height: StartHeight, metrics: Arc<Metrics>) -> NodeSource<S> {
        NodeSource {
            node,
            cache: BodyCache::default(),
            plan: None,
            start_height,
            counters: HashMap::new(),
            last_sequence_msg: Instant::now(),
            metrics,
            node_height: None,
            ready: VecDeque::new(),
            ahead: None,
        }
    }

    /// Counts into `metrics` (by default into a private set nobody reads).
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
    }

    /// The node, for the questions only it can answer (rescans, mempool spenders).
    pub fn node(&self) -> &S {
        &self.node
    }

    /// The node, for work that outlives a borrow (blocks asked for ahead).
    pub fn shared_node(&self) -> Arc<S> {
        self.node.clone()
    }

    /// The node's best height when last asked.
    pub fn node_height(&self) -> Option<u32> {
        self.node_height
    }

    /// Forgets a plan: the consumer failed to commit a step, so what it holds is the truth.
    pub fn reset(&mut self) {
        self.plan = None;
        self.forget_read_ahead();
    }

    fn forget_read_ahead(&mut self) {
        self.ready.clear();
        self.ahead = None;
    }

    /// The next step that brings `local` toward the node's best chain; `None` at its tip.
    pub async fn next_change(
        &mut self,
        local: &mut impl LocalChain,
    ) -> Result<Option<ChainChange>, SourceError> {
        loop {
            let tip = local.tip()?;
            let turn = match self.plan.take() {
                None => self.plan_turn(local, tip).await?,
                Some(Plan::Unwind { to, rebase }) => {
                    self.unwind_turn(local, tip, to, rebase).await?
                }
                Some(Plan::Connect {
                    best,
                    best_height,
                    progress,
                }) => self.connect_turn(tip, best, best_height, progress).await?,
            };
            match turn {
                Turn::Tell(change) => return Ok(Some(change)),
                Turn::AtTip => return Ok(None),
                Turn::Again => {}
            }
        }
    }

    /// No plan: the first run's base, or a new plan from our tip.
    async fn plan_turn(
        &mut self,
        local: &mut impl LocalChain,
        tip: Option<StoredBlock>,
    ) -> Result<Turn, SourceError> {
        let Some(tip) = tip else {
            // First run: start after `start_height - 1`, or connect from genesis.
            let base = match self.start_height {
                StartHeight::Tip => self.node.chain_info().await?.blocks,
                StartHeight::Height(0) => {
                    self.plan_connect(0).await?;
                    return Ok(Turn::Again);
                }
                StartHeight::Height(h) => h - 1,
            };
            return Ok(Turn::Tell(ChainChange::Base(
                self.stored_block(base).await?,
            )));
        };
        Ok(match self.plan_from(local, tip).await? {
            Some(change) => Turn::Tell(change),
            None if self.plan.is_none() => Turn::AtTip,
            None => Turn::Again,
        })
    }

    /// Disconnects our tip while it is above `to` (every block for `None`), then starts again
    /// at `rebase` or from genesis if nothing is left.
    async fn unwind_turn(
        &mut self,
        local: &mut impl LocalChain,
        tip: Option<StoredBlock>,
        to: Option<u32>,
        rebase: Option<StoredBlock>,
    ) -> Result<Turn, SourceError> {
        // What was read ahead may be of the branch being left.
        self.forget_read_ahead();
        match tip {
            Some(t) if to.is_none_or(|f| t.height > f) => {
                self.plan = Some(Plan::Unwind { to, rebase });
                let new_tip = match local.block_at(t.height.wrapping_sub(1))? {
                    Some(p) => p.tip_ref(),
                    None => TipRef {
                        hash: t.prev,
                        height: t.height.saturating_sub(1),
                    },
                };
                Ok(Turn::Tell(ChainChange::Disconnected { block: t, new_tip }))
            }
            // At the fork: plan again from there.
            Some(_) => Ok(Turn::Again),
            None => match rebase {
                Some(base) => Ok(Turn::Tell(ChainChange::Base(base))),
                None => {
                    self.plan_connect(0).await?;
                    Ok(Turn::Again)
                }
            },
        }
    }

    /// The node's next block on our tip, if it still extends it.
    async fn connect_turn(
        &mut self,
        tip: Option<StoredBlock>,
        best: BlockHash,
        best_height: u32,
        mut progress: Progress,
    ) -> Result<Turn, SourceError> {
        let next = tip.map_or(0, |t| t.height + 1);
        if next > best_height {
            progress.done();
            return Ok(Turn::Again);
        }
        let (hash, block) = match self.read_ahead(next, best_height).await? {
            Some(read) => read,
            None => {
                let hash = if next == best_height {
                    best
                } else {
                    self.node.block_hash(next).await?
                };
                match self.cache.block(&hash) {
                    Some(b) => (hash, b.clone()),
                    None => (hash, self.node.block(hash).await?),
                }
            }
        };
        let tip_hash = tip.map_or_else(BlockHash::all_zeros, |t| t.hash);
        if block.header.prev_blockhash != tip_hash {
            tracing::info!(height = next, %hash, "node's chain moved during sync; starting over");
            self.forget_read_ahead();
            return Ok(Turn::Again);
        }
        progress.tick(next);
        self.plan = Some(Plan::Connect {
            best,
            best_height,
            progress,
        });
        let at = BlockRef {
            hash,
            height: next,
            time: block.header.time,
        };
        Ok(Turn::Tell(ChainChange::Connected {
            block: Box::new(block),
            at,
        }))
    }

    /// Far behind the node's tip, the block at `next` from a group read ahead, the next group
    /// being asked for meanwhile; `None` nearer the tip. Blocks read ahead are the node's
    /// chain as it was when asked: one that no longer extends our tip is caught by the caller.
    async fn read_ahead(
        &mut self,
        next: u32,
        best_height: u32,
    ) -> Result<Option<(BlockHash, Block)>, NodeError> {
        while self.ready.front().is_some_and(|(h, ..)| *h < next) {
            self.ready.pop_front();
        }
        if self.ready.front().is_some_and(|(h, ..)| *h == next) {
            if self.ahead.is_some() {
                // The follower's runtime has this one thread: the group ahead is asked for,
                // and its answers handed on to be decoded, only when it yields.
                tokio::task::yield_now().await;
            }
            return Ok(self.ready.pop_front().map(|(_, hash, b)| (hash, b)));
        }
        self.ready.clear();
        let ahead = self.ahead.take();
        // The last blocks below the node's tip, where reorgs happen, are read one at a time,
        // each by the hash the node gives at that moment.
        let Some(last) = best_height
            .checked_sub(READ_AHEAD_BEHIND)
            .filter(|l| next <= *l)
        else {
            return Ok(None);
        };
        let ahead = match ahead {
            Some(a) if a.first() == next => Some(a.blocks().await?),
            _ => None,
        };
        let blocks = match ahead {
            Some(blocks) if self.still_active(next, &blocks).await? => blocks,
            _ => {
                let n = GROUP.min(last - next + 1);
                fetch_blocks(&*self.node, next, vec![None; n as usize]).await?
            }
        };
        let group = group_after(&blocks);
        let heights = next..;
        (self.ready).extend(heights.zip(blocks).map(|(h, (hash, b))| (h, hash, b)));
        let after = next + self.ready.len() as u32;
        if after <= last {
            let n = group.min(last - after + 1);
            let node = self.node.clone();
            self.ahead = Some(Ahead::ask(node, after, vec![None; n as usize]));
        }
        Ok(self.ready.pop_front().map(|(_, hash, b)| (hash, b)))
    }

    /// Whether `blocks`, read ahead from height `from`, are still the node's: a reorg since
    /// would have them told only to be taken back. Linked one to the next, their last one
    /// still at its height says so for all of them, in one call for the group.
    async fn still_active(
        &self,
        from: u32,
        blocks: &[(BlockHash, Block)],
    ) -> Result<bool, NodeError> {
        let Some((last, _)) = blocks.last() else {
            return Ok(false);
        };
        // Linked, as a batch of hashes a reorg fell in the middle of would not be.
        let linked = (blocks.windows(2)).all(|w| w[1].1.header.prev_blockhash == w[0].0);
        let height = from + blocks.len() as u32 - 1;
        Ok(linked && self.node.block_hash(height).await? == *last)
    }

    /// Compares our tip with the node's best block and plans the way there; returns a change
    /// to tell first (a reorg, a fork too deep), if any.
    async fn plan_from(
        &mut self,
        local: &mut impl LocalChain,
        tip: StoredBlock,
    ) -> Result<Option<ChainChange>, SourceError> {
        let best = self.node.best_block_hash().await?;
        if tip.hash == best {
            self.node_height = Some(tip.height);
            return Ok(None);
        }
        let best_height = self.node.block_header(best).await?.height;
        self.node_height = Some(best_height);
        let (fork_height, depth) = match self.fork_point(local, tip, best_height).await? {
            Fork::At(b) => (Some(b.height), tip.height - b.height),
            Fork::Genesis => (None, tip.height + 1),
            Fork::BelowKept { lowest } => {
                let base = self.stored_block(lowest.height - 1).await?;
                self.plan = Some(Plan::Unwind {
                    to: None,
                    rebase: Some(base),
                });
                return Ok(Some(ChainChange::TooDeep {
                    tip,
                    lowest,
                    best,
                    best_height,
                }));
            }
        };
        if depth == 0 {
            self.plan = Some(Plan::connect(best, best_height, tip.height + 1));
            return Ok(None);
        }
        self.plan = Some(Plan::Unwind {
            to: fork_height,
            rebase: None,
        });
        Ok(Some(ChainChange::Reorg {
            depth,
            fork_height,
            old_tip: tip,
            best,
            best_height,
        }))
    }

    async fn plan_connect(&mut self, from: u32) -> Result<(), SourceError> {
        let best = self.node.best_block_hash().await?;
        let best_height = self.node.block_header(best).await?.height;
        self.node_height = Some(best_height);
        self.plan = Some(Plan::connect(best, best_height, from));
        Ok(())
    }

    /// The highest block of ours still on the node's best chain.
    async fn fork_point(
        &self,
        local: &mut impl LocalChain,
        tip: StoredBlock,
        node_height: u32,
    ) -> Result<Fork, SourceError> {
        let mut h = tip.height.min(node_height);
        loop {
            let Some(stored) = local.block_at(h)? else {
                return Ok(match local.lowest_block()? {
                    Some(lowest) if lowest.height > 0 => Fork::BelowKept { lowest },
                    _ => Fork::Genesis,
                });
            };
            if self.node.block_hash(h).await? == stored.hash {
                return Ok(Fork::At(stored));
            }
            if h == 0 {
                return Ok(Fork::Genesis);
            }
            h -= 1;
        }
    }

    /// The node's blocks at heights `from..from + count`, as we store them: hashes and headers
    /// asked in one batch each.
    pub async fn stored_blocks(
        &self,
        from: u32,
        count: u32,
    ) -> Result<Vec<StoredBlock>, NodeError> {
        let hashes = self.node.block_hashes(from, count).await?;
        let headers = self.node.block_headers(&hashes).await?;
        if headers.len() != count as usize {
            return Err(NodeError::bad(
                "getblockhash",
                "not one answer per height asked",
            ));
        }
        for (height, h) in (from..).zip(&headers) {
            at_height(h, height)?;
        }
        Ok(headers.iter().map(stored).collect())
    }

    /// The node's block at `height`, as we store it.
    pub async fn stored_block(&self, height: u32) -> Result<StoredBlock, NodeError> {
        let hash = self.node.block_hash(height).await?;
        // `block_header` checks that the header is the one of `hash`.
        let header = self.node.block_header(hash).await?;
        at_height(&header, height)?;
        Ok(stored(&header))
    }
}

/// A header the node gave for the block it named at `height` must say that height: a block's
/// height never changes, even in a reorg, so any other answer is a node not to believe, and
/// storing it would put the block at the wrong place in the chain we compare against.
fn at_height(h: &HeaderInfo, height: u32) -> Result<(), NodeError> {
    if h.height == height {
        return Ok(());
    }
    let reason = format!(
        "block {} is at height {height}, but its header says {}",
        h.hash, h.height
    );
    Err(NodeError::bad("getblockheader", reason))
}

/// A block as we store it, from the node's header.
fn stored(h: &HeaderInfo) -> StoredBlock {
    StoredBlock {
        hash: h.hash,
        height: h.height,
        prev: h.prev.unwrap_or_else(BlockHash::all_zeros),
        time: h.time,
        tx_count: None,
    }
}

/// Where the stored chain meets the node's.
enum Fork {
    /// At this stored block (possibly the tip: nothing to disconnect).
    At(StoredBlock),
    /// Below everything we keep: a reorg deeper than `finality_depth` allows for.
    BelowKept { lowest: StoredBlock },
    /// No common block, genesis included.
    Genesis,
}

/// The mempool side: what the node holds, proven.
impl<S: ChainSource> NodeSource<S> {
    /// The body of a mempool transaction the node holds; `None` if it is not (or no longer)
    /// in the node's mempool. A txid only ZMQ announced is proven with `getmempoolentry`
    /// (which, unlike `getrawtransaction` on a node with `-txindex`, never answers for a
    /// confirmed transaction). A relayed body is used only under the txid it hashes to, which
    /// commits to its outputs.
    pub async fn mempool_body(&self, txid: Txid) -> Result<Option<Transaction>, NodeError> {
        if !self.node.in_mempool(txid).await? {
            if self.cache.txs.contains_key(&txid) && !self.cache.in_recent_block(txid) {
                tracing::warn!(%txid, "ZMQ announced a transaction the node does not hold; ignored");
            }
            return Ok(None);
        }
        if let Some(tx) = self.cache.txs.get(&txid) {
            return Ok(Some(tx.clone()));
        }
        match self.node.mempool_transaction(txid).await {
            Ok(tx) => Ok(Some(tx)),
            // Mined or replaced meanwhile: the chain sync or a removal accounts for it.
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A transaction body ZMQ relayed, under the txid it hashes to.
    pub fn relayed(&self, txid: &Txid) -> Option<&Transaction> {
        self.cache.txs.get(txid)
    }

    /// The bodies of `txids`, which a `getrawmempool` answer just listed (so the node vouched
    /// for them), in that order: from what ZMQ brought where it did, the rest in JSON-RPC
    /// batches. Those gone since (mined, replaced) are left out.
    pub async fn mempool_bodies(&self, txids: &[Txid]) -> Result<Vec<Transaction>, NodeError> {
        let missing: Vec<Txid> = txids
            .iter()
            .filter(|t| !self.cache.txs.contains_key(*t))
            .copied()
            .collect();
        let mut fetched: HashMap<Txid, Transaction> = missing
            .iter()
            .zip(self.node.mempool_transactions(&missing).await?)
            .filter_map(|(t, tx)| Some((*t, tx?)))
            .collect();
        Ok(txids
            .iter()
            .filter_map(|t| fetched.remove(t).or_else(|| self.cache.txs.get(t).cloned()))
            .collect())
    }

    /// Whether the node still holds a transaction announced as removed: a forged `R` (or one
    /// re-added since) must not make a payment look dropped.
    pub async fn still_in_mempool(&self, txid: Txid) -> Result<bool, NodeError> {
        let held = self.node.in_mempool(txid).await?;
        if held {
            tracing::warn!(%txid, "a removal was announced for a transaction the node still holds; ignored");
        }
        Ok(held)
    }

    /// Which mempool transaction spends any of `outpoints`; `None` also from nodes before v24,
    /// which lack `gettxspendingprevout`.
    pub async fn mempool_spender(&self, outpoints: &[OutPoint]) -> Result<Option<Txid>, NodeError> {
        match self.node.mempool_spender(outpoints).await {
            Err(NodeError::Rpc { code: -32601, .. }) => Ok(None),
            other => other,
        }
    }

    /// The node's mempool, and the best block it is valid at (read just after it).
    pub async fn mempool_snapshot(&self) -> Result<(Vec<Txid>, BlockHash), NodeError> {
        let (txids, _sequence) = self.node.raw_mempool().await?;
        let best = self.node.best_block_hash().await?;
        Ok((txids, best))
    }
}

/// The ZMQ side: bodies kept to spare RPC calls, counters checked for lost messages.
impl<S: ChainSource> NodeSource<S> {
    pub fn take_zmq(&mut self, batch: Vec<ZmqMessage>) -> ZmqNews {
        let mut news = ZmqNews::default();
        for m in batch {
            news.gap |= self.check_counter(&m);
            match m.body {
                ZmqBody::RawTx(tx) => self.cache.add_tx(tx),
                ZmqBody::RawBlock(b) => self.cache.add_block(b),
                ZmqBody::RefusedBlock { hash, error } => {
                    tracing::warn!(%hash, counter = m.counter, %error, "refused a ZMQ rawblock body that does not prove itself (forged or corrupt); the block is fetched over RPC");
                    self.metrics.zmq_refused(&m.topic);
                }
                ZmqBody::Sequence(ev) => news.sequence.push(ev),
                ZmqBody::HashTx(_) | ZmqBody::HashBlock(_) => {}
            }
        }
        news
    }

    /// How long the sequence topic has been silent.
    pub fn sequence_silence(&self) -> std::time::Duration {
        self.last_sequence_msg.elapsed()
    }

    /// Whether messages may have been lost before this one.
    fn check_counter(&mut self, m: &ZmqMessage) -> bool {
        tracing::debug!(topic = %m.topic, counter = m.counter, "zmq message");
        self.metrics.zmq_message(&m.topic);
        if m.topic == "sequence" {
            self.last_sequence_msg = Instant::now();
        }
        match self.counters.insert(m.topic.clone(), m.counter) {
            Some(last) if m.counter != last.wrapping_add(1) => {
                if m.counter < last {
                    tracing::warn!(topic = %m.topic, last, got = m.counter, "ZMQ counter went back: bitcoind restarted; resyncing over RPC");
                } else {
                    tracing::warn!(topic = %m.topic, last, got = m.counter, lost = m.counter - last - 1, "ZMQ messages lost; resyncing over RPC");
                }
                self.metrics.zmq_gap(&m.topic);
                true
            }
            // Messages published before the subscription took hold are lost without a trace.
            None => true,
            Some(_) => false,
        }
    }
}

#[cfg(test)]
mod height_tests {
    use super::*;

    #[test]
    fn a_header_at_another_height_than_asked_is_refused() {
        let h = HeaderInfo {
            hash: BlockHash::all_zeros(),
            height: 7,
            prev: None,
            time: 0,
            confirmations: 1,
        };
        assert!(at_height(&h, 7).is_ok(), "the height asked");
        let refused = at_height(&h, 8).expect_err("another height");
        assert!(
            refused
                .to_string()
                .contains("at height 8, but its header says 7"),
            "{refused}"
        );
    }
}
