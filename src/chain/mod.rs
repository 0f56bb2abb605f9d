//! The chain follower: keeps the stored chain equal to the node's best chain, one step at a time.
//! ZMQ messages only wake it and carry bodies; RPC decides. On a fork it disconnects back to
//! the fork point, then connects the new branch in height order.

mod mempool;
mod report;
mod rescan;
mod support;
mod sync;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bitcoin::Txid;
use serde_json::Map;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::changeset::{ChangeSet, Merge};
use crate::config::StartHeight;
use crate::event::{self, now_ms, NewEvent, TipRef};
use crate::metrics::Metrics;
use crate::node::zmq_sub::ZmqReceiver;
use crate::node::zmq_wire::{SequenceEvent, ZmqBody, ZmqMessage};
use crate::node::{ChainSource, NodeError};
use crate::store::{Store, StoreError};
use crate::tracker::{Tracker, TrackerStep};
use crate::watch::WatchIndex;
use support::{BodyCache, RecentSpends};

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A watch record could not be loaded: the step is dropped and retried, never taken to
    /// mean the watch was removed.
    #[error("loading a watch record failed: {0}")]
    Lookup(String),
}

impl FollowError {
    pub fn is_transient(&self) -> bool {
        match self {
            FollowError::Node(e) => e.is_transient(),
            _ => false,
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
    pub alert_reorg_depth: u32,
    pub node_unreachable_after: Duration,
}

/// An outage of the node, for `alert.node_unreachable` / `alert.node_recovered`.
struct Outage {
    since_ms: i64,
    alerted: bool,
    error: String,
}

pub struct Follower<S: ChainSource> {
    source: Arc<S>,
    store: Store,
    tracker: Tracker,
    index: WatchIndex,
    opts: FollowerOptions,
    wake_dispatch: Arc<Notify>,
    cache: BodyCache,
    recent_spends: RecentSpends,
    /// Mempool txids already matched, so a resync fetches only new ones.
    seen_mempool: HashSet<Txid>,
    /// Matched mempool transactions whose commit failed, to be matched again first.
    deferred_mempool: Vec<bitcoin::Transaction>,
    /// Tracked transactions announced as removed (`R`), classified by what comes next.
    pending_removals: Vec<(Txid, std::time::Instant)>,
    counters: HashMap<String, u32>,
    needs_resync: bool,
    /// The mempool view may have missed something (start, counter gap, first ZMQ message).
    mempool_stale: bool,
    outage: Option<Outage>,
    metrics: Arc<Metrics>,
    /// The store's watch version our index reflects.
    watch_version: i64,
    rescan: Option<rescan::RescanJob>,
    /// Loads watch records (labels, metadata) for events, over a connection of its own.
    loader: Option<crate::watch::WatchLoader>,
    network: bitcoin::Network,
    health: Arc<crate::health::Health>,
    /// The last error told, so a repeated one is not told again on every retry.
    last_error: String,
    /// When the sequence topic last spoke: a silence longer than `poll_interval` may hide a
    /// lost last message, which no counter gap would reveal.
    last_sequence_msg: std::time::Instant,
}

impl<S: ChainSource> Follower<S> {
    pub fn new(
        source: Arc<S>,
        store: Store,
        tracker: Tracker,
        opts: FollowerOptions,
        wake_dispatch: Arc<Notify>,
    ) -> Follower<S> {
        Follower {
            source,
            store,
            tracker,
            // Built from the store before the first sync (`refresh_watches`).
            index: WatchIndex::default(),
            opts,
            wake_dispatch,
            cache: BodyCache::default(),
            recent_spends: RecentSpends::default(),
            seen_mempool: HashSet::new(),
            pending_removals: Vec::new(),
            deferred_mempool: Vec::new(),
            counters: HashMap::new(),
            needs_resync: true,
            mempool_stale: true,
            outage: None,
            last_sequence_msg: std::time::Instant::now(),
            metrics: Arc::new(Metrics::default()),
            health: Arc::default(),
            last_error: String::new(),
            watch_version: -1,
            rescan: None,
            loader: None,
            network: bitcoin::Network::Regtest,
        }
    }

    /// The network addresses are read for (watches added at run time are reloaded with it).
    pub fn with_network(mut self, network: bitcoin::Network) -> Follower<S> {
        self.network = network;
        self
    }

    /// Picks up watches added, changed or removed since we last looked (CLI, API), so a watch
    /// takes effect on the next transaction without a restart.
    fn refresh_watches(&mut self) -> Result<(), FollowError> {
        let version = self.store.watch_version()?;
        if version == self.watch_version {
            return Ok(());
        }
        // A watch still being rescanned joins live following only when its rescan is done.
        let rescanning: Vec<String> = self.store.rescans()?.into_iter().map(|r| r.0).collect();
        let loader = match &self.loader {
            Some(l) => l.clone(),
            None => {
                let l = watch_loader(&self.store)?;
                self.loader = Some(l.clone());
                l
            }
        };
        let started = std::time::Instant::now();
        self.index = self.store.build_index(self.network, loader, &rescanning)?;
        if self.watch_version < 0 {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                watches = self.index.len(),
                scripts = self.index.script_count(),
                secs,
                "watches loaded"
            );
        } else {
            tracing::info!(watches = self.index.len(), "watches changed; reloaded");
        }
        self.watch_version = version;
        self.pick_up_rescan()
    }

    /// Loads watch records with `loader` instead of a connection of its own (a test can wrap
    /// the store's loader to inject faults).
    pub fn with_watch_loader(mut self, loader: crate::watch::WatchLoader) -> Follower<S> {
        self.loader = Some(loader);
        self
    }

    /// Reports into `metrics` (by default into a private set nobody reads).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Follower<S> {
        self.metrics = metrics;
        self
    }

    /// Reports incidents into `health` (by default into a private one nobody reads).
    pub fn with_health(mut self, health: Arc<crate::health::Health>) -> Follower<S> {
        self.health = health;
        self
    }

    /// Runs until `shutdown`. Nothing here is fatal: a node that is down, a malformed answer or
    /// a busy database are all retried with backoff, and said loudly while they last.
    pub async fn run(mut self, mut zmq: Option<ZmqReceiver>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let mut poll = tokio::time::interval(self.opts.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.needs_resync {
                match self.resync().await {
                    Ok(()) => {
                        self.needs_resync = false;
                        backoff = Duration::from_millis(250);
                        self.sync_succeeded();
                    }
                    Err(e) => {
                        self.sync_failed(&e);
                        // Keep reading ZMQ while waiting: a payment announced now is owed its
                        // tx.pending even if it is mined before the resync succeeds.
                        let sleep = tokio::time::sleep(backoff);
                        tokio::pin!(sleep);
                        loop {
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = &mut sleep => break,
                                Some(m) = recv(&mut zmq) => {
                                    let batch = drain(m, zmq.as_mut());
                                    // Failures here are the one being retried.
                                    let _ = self.on_zmq_batch(batch).await;
                                }
                            }
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                msg = recv(&mut zmq) => match msg {
                    Some(m) => {
                        let batch = drain(m, zmq.as_mut());
                        if let Err(e) = self.on_zmq_batch(batch).await {
                            self.sync_failed(&e);
                            self.needs_resync = true;
                            self.mempool_stale = true;
                        }
                    }
                    None => {
                        tracing::error!("the ZMQ subscriber stopped; following by RPC polling every {:?}", self.opts.poll_interval);
                        zmq = None;
                    }
                },
                _ = std::future::ready(()), if self.rescanning() && !self.needs_resync => {
                    if let Err(e) = self.rescan_batch().await {
                        self.sync_failed(&e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                _ = poll.tick() => {
                    // Polling catches what ZMQ missed or never sent; removals announced a whole
                    // interval ago with no replacement or conflict since were evictions.
                    self.needs_resync = true;
                    if self.last_sequence_msg.elapsed() >= self.opts.poll_interval {
                        self.mempool_stale = true;
                    }
                    if !self.pending_removals.is_empty() {
                        if let Err(e) = self.classify_pending(&[], self.opts.poll_interval).await {
                            self.sync_failed(&e);
                        }
                    }
                }
            }
        }
    }

    /// Brings chain and mempool up to date with the node.
    pub async fn resync(&mut self) -> Result<(), FollowError> {
        self.refresh_watches()?;
        self.replay_deferred()?;
        self.sync_chain().await?;
        if self.opts.zmq_mempool && !self.mempool_stale {
            return Ok(());
        }
        self.metrics
            .resyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                ZmqBody::RawBlock(b) => {
                    let hash = b.block_hash();
                    if let Err(e) = self.cache.add_block(b) {
                        tracing::warn!(%hash, counter = m.counter, error = %e, "refused a ZMQ rawblock body that does not prove itself (forged or corrupt); the block is fetched over RPC");
                        self.metrics.zmq_refused(&m.topic);
                    }
                }
                ZmqBody::Sequence(ev) => events.push(ev),
                ZmqBody::HashTx(_) | ZmqBody::HashBlock(_) => {}
            }
        }
        // Payments seen while the store failed come before anything announced since; if the
        // store still fails, what this batch announces is kept for later too.
        let mut failed = self
            .refresh_watches()
            .and_then(|()| self.replay_deferred())
            .err();
        for ev in events {
            match (&failed, ev) {
                (None, ev) => {
                    if let Err(e) = self.on_sequence(ev).await {
                        failed = Some(e);
                    }
                }
                // The store failed: payments announced behind the failure are kept for later
                // (their tx.pending is owed); blocks and removals are redone by the resync.
                (Some(_), SequenceEvent::TxAdded(txid, _)) => self.defer_announced(txid).await,
                (Some(_), _) => {}
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn check_counter(&mut self, m: &ZmqMessage) {
        tracing::debug!(topic = %m.topic, counter = m.counter, "zmq message");
        self.metrics.zmq_message(&m.topic);
        if m.topic == "sequence" {
            self.last_sequence_msg = std::time::Instant::now();
        }
        match self.counters.insert(m.topic.clone(), m.counter) {
            Some(last) if m.counter != last.wrapping_add(1) => {
                if m.counter < last {
                    tracing::warn!(topic = %m.topic, last, got = m.counter, "ZMQ counter went back: bitcoind restarted; resyncing over RPC");
                } else {
                    tracing::warn!(topic = %m.topic, last, got = m.counter, lost = m.counter - last - 1, "ZMQ messages lost; resyncing over RPC");
                }
                self.needs_resync = true;
                self.mempool_stale = true;
                self.metrics.zmq_gap(&m.topic);
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
        match ev {
            SequenceEvent::BlockConnected(_) | SequenceEvent::BlockDisconnected(_) => {
                self.sync_chain().await?;
                // bitcoind announces the R of a transaction a block conflicts with before the
                // block's C: now the block is in, classify.
                self.classify_pending(&[], Duration::ZERO).await
            }
            SequenceEvent::TxAdded(txid, _) => self.mempool_added(txid).await,
            SequenceEvent::TxRemoved(txid, _) => {
                self.seen_mempool.remove(&txid);
                if self.tracker.is_unconfirmed(txid)
                    && !self.pending_removals.iter().any(|(t, _)| *t == txid)
                {
                    self.pending_removals
                        .push((txid, std::time::Instant::now()));
                }
                Ok(())
            }
        }
    }

    fn tip_ref(&self) -> Result<Option<TipRef>, FollowError> {
        Ok(self.store.tip()?.map(|t| TipRef {
            hash: t.hash,
            height: t.height,
        }))
    }

    /// Commits a change set, then applies it to memory.
    fn commit(&mut self, changes: ChangeSet) -> Result<(), FollowError> {
        if changes.is_empty() {
            return Ok(());
        }
        let committed = self.store.commit(&changes, now_ms())?;
        self.tracker.apply(&changes.tracked);
        self.index.apply(&changes.index);
        for e in &committed {
            tracing::info!(seq = e.seq, id = %e.id, kind = %e.kind, "event recorded");
            self.metrics.event(&e.kind);
        }
        if let Some(h) = changes.tip.new_height() {
            self.metrics
                .tip_height
                .store(h as i64, std::sync::atomic::Ordering::Relaxed);
        }
        if !committed.is_empty() {
            self.wake_dispatch.notify_waiters();
        }
        Ok(())
    }

    /// Labels and commits a tracker step of the live index.
    fn commit_step(&mut self, step: TrackerStep) -> Result<(), FollowError> {
        let changes = labelled(&self.index, step)?;
        self.commit(changes)
    }

    /// Records a chain event or alert on its own, if any endpoint asks for its type.
    fn commit_other(
        &mut self,
        kind: &'static str,
        identity: &str,
        fields: Map<String, serde_json::Value>,
    ) -> Result<(), FollowError> {
        if !self.store.wants(kind) {
            return Ok(());
        }
        let changes = ChangeSet::events(vec![self.other_event(kind, identity, fields)]);
        self.commit(changes)
    }

    fn other_event(
        &self,
        kind: &'static str,
        identity: &str,
        fields: Map<String, serde_json::Value>,
    ) -> NewEvent {
        event::other_event(kind, identity, self.tracker.network, fields)
    }
}

/// The tracker's step as a change set with labelled events (see `ChangeSet::labelled`).
fn labelled(index: &WatchIndex, step: TrackerStep) -> Result<ChangeSet, FollowError> {
    ChangeSet::labelled(step, index).map_err(FollowError::Lookup)
}

/// A loader of watch records over its own connection to the store.
fn watch_loader(store: &Store) -> Result<crate::watch::WatchLoader, FollowError> {
    let conn = std::sync::Mutex::new(store.reopen()?);
    Ok(Arc::new(move |id: &str| {
        let conn = conn
            .lock()
            .map_err(|_| "watch loader lock poisoned".to_string())?;
        conn.load_watch(id).map_err(|e| e.to_string())
    }))
}

fn fields(v: serde_json::Value) -> Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Takes `first` and everything already queued behind it: bodies from rawtx/rawblock (other
/// sockets) can then serve the sequence events without asking RPC for them.
fn drain(first: ZmqMessage, rx: Option<&mut ZmqReceiver>) -> Vec<ZmqMessage> {
    let mut batch = vec![first];
    if let Some(rx) = rx {
        while batch.len() < 10_000 {
            match rx.try_recv() {
                Some(m) => batch.push(m),
                None => break,
            }
        }
    }
    batch
}

async fn recv(rx: &mut Option<ZmqReceiver>) -> Option<ZmqMessage> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
