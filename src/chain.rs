//! The chain follower: keeps the stored chain equal to the node's best chain, one step at a time.
//! ZMQ messages only wake it and carry bodies; RPC decides. On a fork it disconnects back to
//! the fork point, then connects the new branch in height order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::{Block, BlockHash, Transaction, Txid};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::StartHeight;
use crate::event::{BlockRef, TipRef};
use crate::node::zmq_wire::{SequenceEvent, ZmqBody, ZmqMessage};
use crate::node::{ChainSource, NodeError};
use crate::store::{Store, StoreError, StoredBlock};
use crate::tracker::{ChainStep, Tracker};
use crate::watch::WatchIndex;

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "reorg deeper than the {kept} blocks kept: the node's chain forks below height {lowest}"
    )]
    TooDeep { kept: u32, lowest: u32 },
}

impl FollowError {
    pub fn is_transient(&self) -> bool {
        match self {
            FollowError::Node(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Bodies that arrived over ZMQ, so RPC need not fetch them again.
#[derive(Default)]
struct BodyCache {
    txs: HashMap<Txid, Transaction>,
    tx_order: VecDeque<Txid>,
    blocks: HashMap<BlockHash, Block>,
    block_order: VecDeque<BlockHash>,
}

impl BodyCache {
    const MAX_TXS: usize = 20_000;
    const MAX_BLOCKS: usize = 8;

    fn add_tx(&mut self, tx: Transaction) {
        let txid = tx.compute_txid();
        if self.txs.insert(txid, tx).is_none() {
            self.tx_order.push_back(txid);
            if self.tx_order.len() > Self::MAX_TXS {
                let old = self.tx_order.pop_front().expect("non-empty");
                self.txs.remove(&old);
            }
        }
    }

    fn add_block(&mut self, block: Block) {
        let hash = block.block_hash();
        if self.blocks.insert(hash, block).is_none() {
            self.block_order.push_back(hash);
            if self.block_order.len() > Self::MAX_BLOCKS {
                let old = self.block_order.pop_front().expect("non-empty");
                self.blocks.remove(&old);
            }
        }
    }
}

/// Settings the follower needs from the config.
#[derive(Debug, Clone)]
pub struct FollowerOptions {
    pub start_height: StartHeight,
    pub poll_interval: Duration,
    /// Whether ZMQ delivers mempool news; without it the mempool is polled.
    pub zmq_mempool: bool,
}

pub struct Follower<S: ChainSource> {
    source: Arc<S>,
    store: Store,
    tracker: Tracker,
    index: WatchIndex,
    opts: FollowerOptions,
    wake_dispatch: Arc<Notify>,
    cache: BodyCache,
    /// Mempool txids already matched, so a resync fetches only new ones.
    seen_mempool: HashSet<Txid>,
    counters: HashMap<String, u32>,
    needs_resync: bool,
    /// The mempool view may have missed something (start, counter gap, first ZMQ message).
    mempool_stale: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl<S: ChainSource> Follower<S> {
    pub fn new(
        source: Arc<S>,
        store: Store,
        tracker: Tracker,
        index: WatchIndex,
        opts: FollowerOptions,
        wake_dispatch: Arc<Notify>,
    ) -> Follower<S> {
        Follower {
            source,
            store,
            tracker,
            index,
            opts,
            wake_dispatch,
            cache: BodyCache::default(),
            seen_mempool: HashSet::new(),
            counters: HashMap::new(),
            needs_resync: true,
            mempool_stale: true,
        }
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Runs until `shutdown`; node trouble is retried with backoff, never fatal.
    pub async fn run(
        mut self,
        mut zmq: Option<mpsc::Receiver<ZmqMessage>>,
        shutdown: CancellationToken,
    ) -> Result<(), FollowError> {
        let mut backoff = Duration::from_millis(250);
        let mut poll = tokio::time::interval(self.opts.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.needs_resync {
                match self.resync().await {
                    Ok(()) => {
                        self.needs_resync = false;
                        backoff = Duration::from_millis(250);
                    }
                    Err(e) => {
                        // Nothing here is fatal: a node that is down, a malformed answer or a
                        // busy database are all retried, and said loudly while they last.
                        if e.is_transient() {
                            tracing::warn!(error = %e, retry_in = ?backoff, "node not available; will retry");
                        } else {
                            tracing::error!(error = %e, retry_in = ?backoff, "sync failed; will retry");
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                msg = recv(&mut zmq) => match msg {
                    Some(m) => {
                        // Take everything already queued: bodies from rawtx/rawblock (other sockets)
                        // then serve the sequence events without asking RPC for them.
                        let mut batch = vec![m];
                        if let Some(rx) = zmq.as_mut() {
                            while batch.len() < 10_000 {
                                match rx.try_recv() {
                                    Ok(m) => batch.push(m),
                                    Err(_) => break,
                                }
                            }
                        }
                        if let Err(e) = self.on_zmq_batch(batch).await {
                            tracing::warn!(error = %e, "handling ZMQ news failed; resyncing over RPC");
                            self.needs_resync = true;
                            self.mempool_stale = true;
                        }
                    }
                    None => zmq = None,
                },
                _ = poll.tick() => {
                    // Polling catches what ZMQ missed or never sent.
                    self.needs_resync = true;
                }
            }
        }
    }

    /// Brings chain and mempool up to date with the node.
    pub async fn resync(&mut self) -> Result<(), FollowError> {
        self.sync_chain().await?;
        if self.opts.zmq_mempool && !self.mempool_stale {
            return Ok(());
        }
        self.sync_mempool().await?;
        self.mempool_stale = false;
        Ok(())
    }

    async fn on_zmq_batch(&mut self, batch: Vec<ZmqMessage>) -> Result<(), FollowError> {
        let mut events = Vec::new();
        for m in batch {
            self.check_counter(&m);
            match m.body {
                ZmqBody::RawTx(tx) => self.cache.add_tx(tx),
                ZmqBody::RawBlock(b) => self.cache.add_block(b),
                ZmqBody::Sequence(ev) => events.push(ev),
                ZmqBody::HashTx(_) | ZmqBody::HashBlock(_) => {}
            }
        }
        for ev in events {
            self.on_sequence(ev).await?;
        }
        Ok(())
    }

    fn check_counter(&mut self, m: &ZmqMessage) {
        tracing::debug!(topic = %m.topic, counter = m.counter, "zmq message");
        match self.counters.insert(m.topic.clone(), m.counter) {
            Some(last) if m.counter != last.wrapping_add(1) => {
                tracing::warn!(topic = %m.topic, last, got = m.counter, "ZMQ counter gap; resyncing over RPC");
                self.needs_resync = true;
                self.mempool_stale = true;
            }
            // Messages published before the subscription took hold are lost without a trace.
            None => {
                self.needs_resync = true;
                self.mempool_stale = true;
            }
            Some(_) => {}
        }
    }

    async fn on_sequence(&mut self, ev: SequenceEvent) -> Result<(), FollowError> {
        let result = match ev {
            SequenceEvent::BlockConnected(_) | SequenceEvent::BlockDisconnected(_) => {
                self.sync_chain().await
            }
            SequenceEvent::TxAdded(txid, _) => self.mempool_tx(txid).await,
            SequenceEvent::TxRemoved(txid, _) => {
                self.seen_mempool.remove(&txid);
                Ok(())
            }
        };
        match result {
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "node call failed; resyncing when it answers");
                self.needs_resync = true;
                Ok(())
            }
            other => other,
        }
    }

    async fn mempool_tx(&mut self, txid: Txid) -> Result<(), FollowError> {
        if !self.seen_mempool.insert(txid) {
            return Ok(());
        }
        let tx = match self.cache.txs.get(&txid) {
            Some(tx) => tx.clone(),
            None => match self.source.mempool_transaction(txid).await {
                Ok(tx) => tx,
                // Already gone again (mined or replaced); the chain sync will see it.
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => {
                    self.seen_mempool.remove(&txid);
                    return Err(e.into());
                }
            },
        };
        let Some(tip) = self.store.tip()? else {
            return Ok(());
        };
        let step = self.tracker.mempool_add(
            &self.index,
            &tx,
            TipRef {
                hash: tip.hash,
                height: tip.height,
            },
        );
        self.commit(step)
    }

    /// Matches every mempool transaction not yet seen.
    pub async fn sync_mempool(&mut self) -> Result<(), FollowError> {
        let (txids, _seq) = self.source.raw_mempool().await?;
        let current: HashSet<Txid> = txids.iter().copied().collect();
        self.seen_mempool.retain(|t| current.contains(t));
        for txid in txids {
            self.mempool_tx(txid).await?;
        }
        Ok(())
    }

    fn commit(&mut self, step: ChainStep) -> Result<(), FollowError> {
        if step.events.is_empty()
            && step.upserts.is_empty()
            && step.removals.is_empty()
            && step.coins_added.is_empty()
            && step.tip == crate::tracker::TipChange::None
        {
            return Ok(());
        }
        let committed = self.store.apply(&step, now_ms())?;
        self.tracker.apply(&step, &mut self.index);
        for e in &committed {
            tracing::info!(seq = e.seq, id = %e.id, kind = %e.kind, "event recorded");
        }
        if !committed.is_empty() {
            self.wake_dispatch.notify_waiters();
        }
        Ok(())
    }

    /// Sets the starting point on the first run.
    async fn ensure_base(&mut self) -> Result<(), FollowError> {
        if self.store.tip()?.is_some() {
            return Ok(());
        }
        let base_height = match self.opts.start_height {
            StartHeight::Tip => self.source.chain_info().await?.blocks,
            StartHeight::Height(0) => return Ok(()),
            StartHeight::Height(h) => h - 1,
        };
        let hash = self.source.block_hash(base_height).await?;
        let header = self.source.block_header(hash).await?;
        let prev = header
            .prev
            .unwrap_or(BlockHash::from_raw_hash(bitcoin::hashes::Hash::all_zeros()));
        self.store.init_tip(StoredBlock {
            hash,
            height: header.height,
            prev,
            time: header.time,
        })?;
        tracing::info!(height = header.height, %hash, "first run: following the chain from here");
        Ok(())
    }

    /// The highest stored block that is still on the node's best chain.
    async fn fork_point(
        &mut self,
        tip: StoredBlock,
        node_height: u32,
    ) -> Result<Option<StoredBlock>, FollowError> {
        let mut h = tip.height.min(node_height);
        loop {
            let Some(stored) = self.store.block_at(h)? else {
                let lowest = self.store.lowest_block()?.map(|b| b.height).unwrap_or(0);
                if lowest == 0 && h == 0 {
                    return Ok(None);
                }
                return Err(FollowError::TooDeep {
                    kept: tip.height - lowest + 1,
                    lowest,
                });
            };
            if self.source.block_hash(h).await? == stored.hash {
                return Ok(Some(stored));
            }
            if h == 0 {
                return Ok(None);
            }
            h -= 1;
        }
    }

    /// Disconnects to the fork point, then connects the node's best chain in height order.
    pub async fn sync_chain(&mut self) -> Result<(), FollowError> {
        self.ensure_base().await?;
        'restart: loop {
            let best = self.source.best_block_hash().await?;
            let tip = self.store.tip()?;
            if tip.map(|t| t.hash) == Some(best) {
                return Ok(());
            }
            let best_height = self.source.block_header(best).await?.height;
            let start = match tip {
                None => 0,
                Some(tip) => {
                    let fork = self.fork_point(tip, best_height).await?;
                    self.disconnect_to(fork.map(|b| b.height)).await?;
                    fork.map(|b| b.height + 1).unwrap_or(0)
                }
            };
            let mut progress = Progress::new(start, best_height);
            for h in start..=best_height {
                let hash = if h == best_height {
                    best
                } else {
                    self.source.block_hash(h).await?
                };
                let block = match self.cache.blocks.get(&hash) {
                    Some(b) => b.clone(),
                    None => self.source.block(hash).await?,
                };
                let tip = self.store.tip()?;
                if tip
                    .map(|t| t.hash)
                    .unwrap_or(BlockHash::from_raw_hash(bitcoin::hashes::Hash::all_zeros()))
                    != block.header.prev_blockhash
                {
                    tracing::info!(height = h, %hash, "node's chain moved during sync; starting over");
                    continue 'restart;
                }
                let at = BlockRef {
                    hash,
                    height: h,
                    time: block.header.time,
                };
                let step = self.tracker.connect_block(&self.index, &block, at);
                self.commit(step)?;
                for tx in &block.txdata {
                    self.seen_mempool.remove(&tx.compute_txid());
                }
                progress.tick(h);
            }
            progress.done();
        }
    }

    async fn disconnect_to(&mut self, fork_height: Option<u32>) -> Result<(), FollowError> {
        while let Some(tip) = self.store.tip()? {
            if fork_height.is_some_and(|f| tip.height <= f) {
                break;
            }
            let parent = self.store.block_at(tip.height.wrapping_sub(1))?;
            let new_tip = parent
                .map(|p| TipRef {
                    hash: p.hash,
                    height: p.height,
                })
                .unwrap_or(TipRef {
                    hash: tip.prev,
                    height: tip.height.saturating_sub(1),
                });
            tracing::info!(height = tip.height, hash = %tip.hash, "disconnecting block (reorg)");
            let step = self
                .tracker
                .disconnect_block(&self.index, tip.as_ref(), new_tip);
            self.commit(step)?;
        }
        Ok(())
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<ZmqMessage>>) -> Option<ZmqMessage> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Progress of a long catch-up, logged every few seconds with rate and ETA.
struct Progress {
    start: u32,
    end: u32,
    began: Instant,
    last_report: Instant,
}

impl Progress {
    fn new(start: u32, end: u32) -> Progress {
        let now = Instant::now();
        if end >= start + 10 {
            tracing::info!(
                from = start,
                to = end,
                blocks = end - start + 1,
                "catching up"
            );
        }
        Progress {
            start,
            end,
            began: now,
            last_report: now,
        }
    }

    fn tick(&mut self, height: u32) {
        if self.last_report.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_report = Instant::now();
        let done = (height - self.start + 1) as f64;
        let rate = done / self.began.elapsed().as_secs_f64().max(0.001);
        let eta = (self.end - height) as f64 / rate.max(0.001);
        tracing::info!(
            height,
            target = self.end,
            rate = format!("{rate:.1} blocks/s"),
            eta = format!("{eta:.0}s"),
            "catch-up progress"
        );
    }

    fn done(&self) {
        if self.end >= self.start + 10 {
            tracing::info!(
                height = self.end,
                secs = self.began.elapsed().as_secs_f64(),
                "caught up"
            );
        }
    }
}
