//! The chain follower. `source` tells what the node did, one step at a time (a block
//! connected or disconnected, a reorg, a fork too deep, mempool news over ZMQ); the follower,
//! the consumer, matches it against the watches, tracks confirmations, raises alerts, commits
//! each step as one change set and runs rescans. Nothing here ends on an error: the step is
//! redone after a back-off.
//!
//! `sync` applies chain changes, `mempool` mempool ones, `rescan` scans a watch's past,
//! `report` tells faults, `support` holds small caches.

mod ahead;
mod mempool;
mod report;
mod rescan;
mod senders;
pub mod source;
mod support;
mod sync;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Map;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::changeset::{ChangeSet, Merge};
use crate::config::StartHeight;
use crate::event::{self, now_ms, NewEvent, TipRef};
use crate::metrics::Metrics;
use crate::node::zmq_sub::ZmqReceiver;
use crate::node::zmq_wire::{SequenceEvent, ZmqMessage};
use crate::node::{ChainSource, NodeError};
use crate::store::{ChainStore, Store, StoreError};
use crate::tracker::{Tracker, TrackerStep};
use crate::watch::WatchIndex;
use mempool::MempoolState;
use source::{NodeSource, SourceError};
use support::RecentSpends;

/// How often the store is asked whether watches were added or removed (by the CLI, which
/// writes to the store directly): one cheap read, so a new watch or rescan starts within it.
const WATCH_CHECK: Duration = Duration::from_millis(100);

/// How long a step under way may go on after shutdown before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(3);

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

impl From<SourceError> for FollowError {
    fn from(e: SourceError) -> FollowError {
        match e {
            SourceError::Node(e) => FollowError::Node(e),
            SourceError::Local(e) => FollowError::Store(e),
        }
    }
}

impl FollowError {
    pub fn is_transient(&self) -> bool {
        match self {
            FollowError::Node(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// How far what we hold may be behind the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SyncState {
    /// Chain and mempool match the node, as far as we know.
    Synced,
    /// The chain must be brought up to date (the poll is due).
    ChainStale,
    /// Chain and mempool both: at start, after lost ZMQ messages, a silence on the sequence
    /// topic, a failed step, or a finished rescan.
    Stale,
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

pub struct Follower<S: ChainSource, St: ChainStore = Store> {
    source: NodeSource<S>,
    store: St,
    tracker: Tracker,
    index: WatchIndex,
    opts: FollowerOptions,
    wake_dispatch: Arc<Notify>,
    recent_spends: RecentSpends,
    mempool: MempoolState,
    state: SyncState,
    /// The store's watch version our index reflects (`None`: to be loaded).
    watch_version: Option<i64>,
    rescan: Option<rescan::RescanJob>,
    /// A rescan the store lists is owed a job: taken up at the next look at the watches (after
    /// a change of watches, or a job dropped on an error, or a pick-up that failed).
    rescan_owed: bool,
    /// A rescanned watch joined live following: the tracker is read again from the store, the
    /// index rebuilt and the mempool read afresh, at the next look at the watches until done.
    rescan_joined: bool,
    /// Loads watch records (labels, metadata) for events, over a connection of its own.
    loader: Option<crate::watch::WatchLoader>,
    network: bitcoin::Network,
    metrics: Arc<Metrics>,
    health: Arc<crate::health::Health>,
    outage: Option<Outage>,
    /// The last error told, so a repeated one is not told again on every retry.
    last_error: String,
    /// The stored tip, read once after each change of it (`None`: to be read). Every relayed
    /// mempool transaction asks for it, and a read after a delivery worker's commit finds the
    /// connection's page cache stale: 0.1–0.2 ms a time.
    tip: std::sync::Mutex<Option<Option<TipRef>>>,
    /// Every change set committed, for unit tests to assert.
    #[cfg(test)]
    journal: Vec<ChangeSet>,
}

impl<S: ChainSource, St: ChainStore> Follower<S, St> {
    pub fn new(
        node: Arc<S>,
        store: St,
        tracker: Tracker,
        opts: FollowerOptions,
        wake_dispatch: Arc<Notify>,
    ) -> Follower<S, St> {
        let metrics = Arc::new(Metrics::default());
        Follower {
            source: NodeSource::new(node, opts.start_height, metrics.clone()),
            store,
            tracker,
            // Built from the store before the first sync (`refresh_watches`).
            index: WatchIndex::default(),
            opts,
            wake_dispatch,
            recent_spends: RecentSpends::default(),
            mempool: MempoolState::default(),
            state: SyncState::Stale,
            watch_version: None,
            rescan: None,
            rescan_owed: false,
            rescan_joined: false,
            loader: None,
            tip: std::sync::Mutex::new(None),
            network: bitcoin::Network::Regtest,
            metrics,
            health: Arc::default(),
            outage: None,
            last_error: String::new(),
            #[cfg(test)]
            journal: Vec::new(),
        }
    }

    /// The network addresses are read for (watches added at run time are reloaded with it).
    pub fn with_network(mut self, network: bitcoin::Network) -> Follower<S, St> {
        self.network = network;
        self
    }

    /// Picks up watches added, changed or removed since we last looked (CLI, API), so a watch
    /// takes effect on the next transaction without a restart.
    fn refresh_watches(&mut self) -> Result<(), FollowError> {
        if self.rescan_joined {
            self.tracker = Tracker::new(
                self.tracker.network,
                self.tracker.finality_depth,
                self.store.load_tracked()?,
            );
            self.watch_version = None;
        }
        let version = self.store.watch_version()?;
        if Some(version) != self.watch_version {
            self.rebuild_index(version)?;
        }
        if self.rescan_joined {
            // Payments to it that sit in the mempool now were passed over while it was not live.
            self.mempool.forget_all();
            self.state = SyncState::Stale;
            self.rescan_joined = false;
        }
        if self.rescan_owed {
            self.pick_up_rescan()?;
            self.rescan_owed = false;
        }
        Ok(())
    }

    /// Builds the live index afresh from the store, at watch version `version`.
    fn rebuild_index(&mut self, version: i64) -> Result<(), FollowError> {
        // A watch still being rescanned joins live following only when its rescan is done.
        let rescanning: Vec<String> = self.store.rescans()?.into_iter().map(|r| r.0).collect();
        let loader = match &self.loader {
            Some(l) => l.clone(),
            None => {
                let l = self.store.watch_loader()?;
                self.loader = Some(l.clone());
                l
            }
        };
        let started = std::time::Instant::now();
        self.index = self.store.build_index(self.network, loader, &rescanning)?;
        if self.watch_version.is_none() {
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
        self.watch_version = Some(version);
        self.rescan_owed = true;
        Ok(())
    }

    /// Loads watch records with `loader` instead of a connection of its own (a test can wrap
    /// the store's loader to inject faults).
    pub fn with_watch_loader(mut self, loader: crate::watch::WatchLoader) -> Follower<S, St> {
        self.loader = Some(loader);
        self
    }

    /// Reports into `metrics` (by default into a private set nobody reads).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Follower<S, St> {
        self.source.set_metrics(metrics.clone());
        self.metrics = metrics;
        self
    }

    /// Reports incidents into `health` (by default into a private one nobody reads).
    pub fn with_health(mut self, health: Arc<crate::health::Health>) -> Follower<S, St> {
        self.health = health;
        self
    }

    /// Runs until `shutdown`. Nothing here is fatal: a node that is down, a malformed answer or
    /// a busy database are all retried with backoff, and said loudly while they last.
    ///
    /// A step under way when `shutdown` comes is given `STOP_GRACE` (counted from when the
    /// step first waits on anything after it) to end, then dropped: a node that stalls an
    /// answer would otherwise hold the stop for its whole timeout (a minute, two with REST's
    /// fallback to `getblock`). Dropping a step loses nothing: each commit is one transaction,
    /// and the next start goes on from the last.
    pub async fn run(self, zmq: Option<ZmqReceiver>, shutdown: CancellationToken) {
        let overdue = async {
            shutdown.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::select! {
            _ = self.follow(zmq, shutdown.clone()) => {}
            _ = overdue => tracing::warn!(
                grace = ?STOP_GRACE,
                "the follower's step under way did not end in time after shutdown; dropped it (nothing it had not committed is lost: it is done again at the next start)"
            ),
        }
    }

    async fn follow(mut self, mut zmq: Option<ZmqReceiver>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let mut poll = tokio::time::interval(self.opts.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch_check = tokio::time::interval(WATCH_CHECK);
        watch_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.state != SyncState::Synced {
                match self.resync().await {
                    Ok(()) => {
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
                            self.state = SyncState::Stale;
                        }
                    }
                    None => {
                        tracing::error!("the ZMQ subscriber stopped; following by RPC polling every {:?}", self.opts.poll_interval);
                        zmq = None;
                    }
                },
                _ = std::future::ready(()), if self.rescanning() && self.state == SyncState::Synced => {
                    if let Err(e) = self.rescan_batch().await {
                        self.sync_failed(&e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                _ = watch_check.tick() => {
                    if let Err(e) = self.refresh_watches() {
                        self.sync_failed(&e);
                        self.state = self.state.max(SyncState::ChainStale);
                    }
                }
                _ = poll.tick() => {
                    // Polling catches what ZMQ missed or never sent; removals announced a whole
                    // interval ago with no replacement or conflict since were evictions.
                    let stale = if self.source.sequence_silence() >= self.opts.poll_interval {
                        SyncState::Stale
                    } else {
                        SyncState::ChainStale
                    };
                    self.state = self.state.max(stale);
                    if self.mempool.removals_pending() {
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
        self.replay_deferred().await?;
        self.sync_chain().await?;
        if self.opts.zmq_mempool && self.state != SyncState::Stale {
            self.state = SyncState::Synced;
            return Ok(());
        }
        self.metrics
            .resyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sync_mempool().await?;
        self.state = SyncState::Synced;
        Ok(())
    }

    async fn on_zmq_batch(&mut self, batch: Vec<ZmqMessage>) -> Result<(), FollowError> {
        let news = self.source.take_zmq(batch);
        if news.gap {
            self.state = SyncState::Stale;
        }
        // Payments seen while the store failed come before anything announced since; if the
        // store still fails, what this batch announces is kept for later too.
        let mut failed = match self.refresh_watches() {
            Ok(()) => self.replay_deferred().await.err(),
            Err(e) => Some(e),
        };
        for ev in news.sequence {
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
                self.mempool_removed(txid);
                Ok(())
            }
        }
    }

    /// Said before any write of the stored blocks (`store_commit` with tip changes, the first
    /// base, a rescan's backfill): the tip is read again afterwards, whether the write moved it
    /// or failed.
    fn forget_tip(&self) {
        *self.tip.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn tip_ref(&self) -> Result<Option<TipRef>, FollowError> {
        let mut known = self.tip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tip) = *known {
            return Ok(tip);
        }
        let tip = self.store.tip()?.map(|t| TipRef {
            hash: t.hash,
            height: t.height,
        });
        *known = Some(tip);
        Ok(tip)
    }

    /// Commits a change set, then applies it to memory.
    fn commit(&mut self, changes: ChangeSet) -> Result<(), FollowError> {
        if changes.is_empty() {
            return Ok(());
        }
        let committed = self.store_commit(&changes)?;
        self.tracker.apply(&changes.tracked);
        self.index.apply(&changes.index);
        if let Some(h) = changes.tip.new_height() {
            self.metrics
                .tip_height
                .store(h as i64, std::sync::atomic::Ordering::Relaxed);
        }
        self.announce(&committed, "event recorded");
        Ok(())
    }

    /// Logs and counts events just committed, and wakes the delivery workers for them.
    fn announce(&self, committed: &[crate::store::CommittedEvent], what: &'static str) {
        for e in committed {
            tracing::info!(seq = e.seq, id = %e.id, kind = %e.kind, "{what}");
            self.metrics.event(&e.kind);
        }
        // A delivery handed straight to its worker needs no wake-up (and the store step a
        // wake-up starts would only compete with its request).
        if committed.iter().any(|e| !e.handed_off) {
            self.wake_dispatch.notify_waiters();
        }
    }

    /// Writes a change set (the one place the follower writes one).
    fn store_commit(
        &mut self,
        changes: &ChangeSet,
    ) -> Result<Vec<crate::store::CommittedEvent>, FollowError> {
        if !changes.tip.is_empty() {
            self.forget_tip();
        }
        let committed = self.store.commit(changes, now_ms())?;
        #[cfg(test)]
        self.journal.push(changes.clone());
        Ok(committed)
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
mod flaky_store;
#[cfg(test)]
mod tests;
