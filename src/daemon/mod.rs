//! `chainwatch run`: opens the store, starts the admin API and one supervised delivery worker
//! per endpoint, then waits for the node, subscribes to ZMQ and runs the follower until
//! shutdown. With a shared PostgreSQL store the follower runs only while this instance holds
//! the leader lease (`leader`); the API and the deliveries run on every instance.

mod backend;
pub mod dir_lock;
mod leader;

pub use backend::{Backend, PgBackend, SqliteBackend};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::chain::{Follower, FollowerOptions};
use crate::config::StoreConfig;
use crate::config::{core_chain_name, network_name, Config};
use crate::dispatch;
pub use crate::event::now_ms;
use crate::health::Health;
use crate::node::zmq_sub::{Subscriber, Subscription};
use crate::node::{ChainInfo, ChainSource, NodeError, RpcClient, ZmqNotification};
use crate::store::{ChainStore, Handoff, RetentionPolicy, RetentionStore, SharedStore, Store};
use crate::tracker::Tracker;

/// Opens the store and makes its endpoints and config watches match the config.
pub fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let mut store = Store::open_keyed(&cfg.data_dir, &cfg.audit_key_file)
        .with_context(|| format!("opening store in {}", cfg.data_dir.display()))?;
    store.check_network(network_name(cfg.network))?;
    store.set_keep_blocks(cfg.finality_depth + 10);
    store.sync_endpoints(&cfg.endpoints)?;
    store.upsert_watches(&cfg.watches, "config", now_ms())?;
    Ok(store)
}

/// Waits until the node answers, telling the user why while it does not (once, and again
/// when the reason changes), and saying so in `/health`.
pub async fn wait_for_node(
    rpc: &RpcClient,
    shutdown: &CancellationToken,
    health: &Health,
) -> Result<Option<ChainInfo>, NodeError> {
    let mut delay = Duration::from_millis(250);
    let mut said = String::new();
    loop {
        match rpc.chain_info().await {
            Ok(info) => {
                health.node_ok();
                return Ok(Some(info));
            }
            Err(e) if e.is_transient() => {
                health.node_failed(&e.to_string());
                let why = e.to_string();
                if why != said {
                    tracing::warn!(error = %e, "waiting for bitcoind (the API and deliveries run meanwhile)");
                    said = why;
                }
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The topics we subscribe to and where: the config overrides what the node announces.
pub fn subscriptions(cfg: &Config, announced: &[ZmqNotification]) -> Vec<Subscription> {
    let find = |topic: &str, over: &Option<String>| {
        over.clone()
            .or_else(|| {
                announced
                    .iter()
                    .find(|n| n.kind == format!("pub{topic}"))
                    .map(|n| n.address.replace("0.0.0.0", "127.0.0.1"))
            })
            .map(|address| Subscription {
                topic: topic.to_string(),
                address,
            })
    };
    [
        find("sequence", &cfg.bitcoind.zmq_sequence),
        find("rawtx", &cfg.bitcoind.zmq_rawtx),
        find("rawblock", &cfg.bitcoind.zmq_rawblock),
    ]
    .into_iter()
    .flatten()
    .collect()
}

pub fn check_chain(cfg: &Config, info: &ChainInfo) -> anyhow::Result<()> {
    let want = core_chain_name(cfg.network);
    if info.chain != want {
        bail!(
            "config key network = {:?}: the node at {} is on chain {:?}",
            network_name(cfg.network),
            crate::net::redact_url(&cfg.bitcoind.rpc_url),
            info.chain
        );
    }
    Ok(())
}

/// Binds the admin API; a port already taken is an error at start, not a silent absence.
async fn start_api<B: Backend>(
    cfg: &Config,
    backend: &B,
    ctx: &dispatch::Context,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let app = api::router(
        &cfg.api,
        backend.open()?,
        ctx.metrics.clone(),
        ctx.health.clone(),
        api::WatchRules {
            network: cfg.network,
            default_confirmations: cfg.default_confirmations,
            endpoints: cfg.endpoints.iter().map(|e| e.name.clone()).collect(),
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .with_context(|| {
            format!(
                "config key api.listen = \"{}\": cannot bind",
                cfg.api.listen
            )
        })?;
    if cfg.api.token.is_none() {
        tracing::warn!("no API token configured (api.token_env): only /health answers");
    }
    tracing::info!(listen = %cfg.api.listen, "admin API listening");
    let allow = cfg.api.allow_ips.clone();
    let shutdown = ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = api::serve(listener, app, &allow, shutdown).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    }))
}

/// Runs a delivery worker for `ep`, starting it again whenever it ends before shutdown (a
/// panic, or a store that could not be opened), and saying so in `/health` meanwhile.
fn supervise_endpoint<B: Backend>(
    backend: B,
    ep: crate::config::EndpointConfig,
    ctx: dispatch::Context,
) -> tokio::task::JoinHandle<()> {
    let who = format!("dispatch:{}", ep.name);
    tokio::spawn(async move {
        loop {
            let opened = {
                let (backend, ep) = (backend.clone(), ep.clone());
                tokio::task::spawn_blocking(move || backend.open_for_deliveries(&ep)).await
            };
            let why = match opened {
                Ok(Ok(store)) => {
                    ctx.health.worker_running(&who);
                    match tokio::spawn(dispatch::run_endpoint(ep.clone(), store, ctx.clone())).await
                    {
                        Ok(()) if ctx.shutdown.is_cancelled() => return,
                        Ok(()) => "it ended".to_string(),
                        Err(e) => format!("it panicked: {e}"),
                    }
                }
                Ok(Err(e)) => format!("cannot open the store: {e}"),
                Err(e) => format!("opening the store panicked: {e}"),
            };
            tracing::error!(worker = %who, %why, "delivery worker stopped; starting it again");
            ctx.health.worker_ended(&who, &why);
            ctx.metrics.worker_restart(&who);
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// How long a daemon waits for another to let go of its SQLite data_dir before it gives up:
/// a restart's old process may still be finishing its requests, each bounded by its
/// endpoint's timeout, then recording them.
pub fn data_dir_wait(cfg: &Config) -> Duration {
    let longest = cfg.endpoints.iter().map(|e| e.timeout).max();
    longest.unwrap_or_default() + Duration::from_secs(10)
}

/// Runs the daemon until `shutdown` is cancelled; in-flight deliveries finish first. The admin
/// API and the delivery workers start first and run whether or not bitcoind answers.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    match &cfg.store {
        StoreConfig::Sqlite => {
            let (dir, wait) = (cfg.data_dir.clone(), data_dir_wait(&cfg));
            let _lock =
                tokio::task::spawn_blocking(move || dir_lock::lock_data_dir(&dir, wait)).await??;
            let backend = SqliteBackend::new(&cfg);
            run_with(cfg, backend, shutdown).await
        }
        StoreConfig::Postgres { url, leader_lease } => {
            let backend = PgBackend::new(&cfg, url, *leader_lease);
            run_with(cfg, backend, shutdown).await
        }
    }
}

async fn run_with<B: Backend>(
    cfg: Config,
    backend: B,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Each worker builds the same client again; a bad certificate or proxy stops us here, once.
    for ep in &cfg.endpoints {
        dispatch::Sender::new(ep)?;
    }
    let store = {
        let (backend, cfg) = (backend.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || backend.prepare(&cfg)).await??
    };
    // One look at the node first: a node of another chain or an unusable cookie is refused
    // here, in one line, before anything starts. A node that is merely down is waited for.
    let rpc = Arc::new(RpcClient::new(
        &cfg.bitcoind.rpc_url,
        cfg.bitcoind.auth.clone(),
    ));
    let first = match rpc.chain_info().await {
        Ok(info) => {
            check_chain(&cfg, &info)?;
            Some(info)
        }
        Err(e) if e.is_transient() => None,
        Err(e) => return Err(e).context("connecting to bitcoind"),
    };
    let mut ctx = dispatch::Context::new(Arc::new(Notify::new()), shutdown.clone());
    ctx.handoff = Arc::new(Handoff::new(cfg.endpoints.iter().map(|e| e.name.as_str())));
    let api = start_api(&cfg, &backend, &ctx).await?;
    let workers: Vec<_> = cfg
        .endpoints
        .iter()
        .map(|ep| supervise_endpoint(backend.clone(), ep.clone(), ctx.clone()))
        .collect();
    let retention = tokio::spawn(retain(
        backend.retention()?,
        RetentionPolicy {
            attempts: cfg.retain_attempts,
            events: cfg.retain_events,
        },
        ctx.clone(),
    ));
    let followed = backend.follow(&cfg, store, rpc, first, &ctx).await;
    shutdown.cancel();
    for w in workers {
        if let Err(e) = w.await {
            tracing::error!(error = %e, "delivery supervisor panicked");
        }
    }
    let _ = api.await;
    let _ = retention.await;
    tracing::info!("stopped");
    followed
}

/// How often retention looks for something to prune, and how much goes per transaction.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
const RETENTION_BATCH: usize = 500;
const RETENTION_RETRY: Duration = Duration::from_secs(5);

/// Prunes what the retention policy lets go, in small batches, until shutdown; store errors
/// are reported and retried like any worker's.
async fn retain<St: RetentionStore>(store: St, policy: RetentionPolicy, ctx: dispatch::Context) {
    let store = SharedStore::new(store);
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = RETENTION_EVERY;
        let mut total = crate::store::Pruned::default();
        loop {
            let now = (ctx.clock)();
            match store
                .run(move |s| s.prune_batch(&policy, now, RETENTION_BATCH))
                .await
            {
                Ok(p) => {
                    ctx.health.store_ok("retention");
                    if p.is_empty() {
                        break;
                    }
                    total.merge(p);
                }
                Err(e) => {
                    // Soon again: /health reports the incident until a prune succeeds.
                    wait = RETENTION_RETRY;
                    ctx.metrics.store_error("retention");
                    if ctx.health.store_failed("retention", &e.to_string())
                        == crate::health::Change::Started
                    {
                        tracing::error!(error = %e, "retention cannot prune; will try again");
                    }
                    break;
                }
            }
            if ctx.shutdown.is_cancelled() {
                return;
            }
            // Let writers in between batches.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !total.is_empty() {
            tracing::info!(
                attempts = total.attempts,
                deliveries = total.deliveries,
                events = total.events,
                "retention pruned old records"
            );
        }
    }
}

/// Reads what is tracked, retrying with back-off while the store refuses (locked, full,
/// unreachable) and saying so in `/health`: a daemon that ended here would stay down until a
/// supervisor restarted it. `None` on shutdown.
async fn load_tracked<St: ChainStore>(
    mut store: St,
    ctx: &dispatch::Context,
) -> anyhow::Result<Option<(St, Vec<crate::tracker::Tracked>)>> {
    const WHO: &str = "follower";
    let mut delay = Duration::from_millis(250);
    loop {
        // Off the runtime's threads: the API and the deliveries are already running on them.
        let (back, loaded) = tokio::task::spawn_blocking(move || {
            let loaded = store.load_tracked();
            (store, loaded)
        })
        .await?;
        store = back;
        match loaded {
            Ok(tracked) => {
                ctx.health.store_ok(WHO);
                return Ok(Some((store, tracked)));
            }
            Err(e) => {
                ctx.metrics.store_error(WHO);
                if ctx.health.store_failed(WHO, &e.to_string()) == crate::health::Change::Started {
                    tracing::error!(error = %e, "cannot load the tracked transactions; retrying with back-off");
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Waits for the node, subscribes to ZMQ and follows the chain until shutdown. The follower
/// runs on a thread of its own: its store work may block (busy timeouts, a slow disk) without
/// stalling the API or the deliveries.
async fn follow<St: ChainStore>(
    cfg: &Config,
    store: St,
    rpc: Arc<RpcClient>,
    first: Option<ChainInfo>,
    ctx: &dispatch::Context,
) -> anyhow::Result<()> {
    let shutdown = ctx.shutdown.clone();
    let info = match first {
        Some(info) => info,
        None => {
            let Some(info) = wait_for_node(&rpc, &shutdown, &ctx.health)
                .await
                .context("connecting to bitcoind")?
            else {
                return Ok(());
            };
            check_chain(cfg, &info)?;
            info
        }
    };
    tracing::info!(chain = %info.chain, height = info.blocks, "connected to bitcoind");

    let Some((store, tracked)) = load_tracked(store, ctx).await? else {
        return Ok(());
    };
    let announced = match rpc.zmq_notifications().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list ZMQ notifications");
            vec![]
        }
    };
    let subs = subscriptions(cfg, &announced);
    let has_sequence = subs.iter().any(|s| s.topic == "sequence");
    let (subscriber, zmq_rx) = if has_sequence {
        for s in &subs {
            tracing::info!(topic = %s.topic, address = %s.address, "subscribing to ZMQ");
        }
        let (s, rx) = Subscriber::start(subs).context("starting ZMQ subscriber")?;
        (Some(s), Some(rx))
    } else {
        tracing::warn!(poll_interval = ?cfg.bitcoind.poll_interval, "bitcoind publishes no ZMQ sequence topic: following by RPC polling only (add zmqpubsequence to bitcoin.conf)");
        (None, None)
    };

    let tracker = Tracker::new(network_name(cfg.network), cfg.finality_depth, tracked);
    tracing::info!(tracked = tracker.len(), "state loaded");
    let opts = FollowerOptions {
        start_height: cfg.start_height,
        poll_interval: cfg.bitcoind.poll_interval,
        zmq_mempool: has_sequence,
        alert_reorg_depth: cfg.alert_reorg_depth,
        node_unreachable_after: cfg.node_unreachable_after,
    };
    let follower = Follower::new(rpc, store, tracker, opts, ctx.wake.clone())
        .with_metrics(ctx.metrics.clone())
        .with_health(ctx.health.clone())
        .with_network(cfg.network);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("follower".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("follower runtime");
            rt.block_on(follower.run(zmq_rx, shutdown));
            let _ = done_tx.send(());
        })
        .context("starting the follower thread")?;
    let finished = done_rx.await;
    if let Some(s) = subscriber {
        s.stop();
    }
    // A panic must end the process with a failure, so a supervisor (systemd) restarts it.
    finished.map_err(|_| anyhow::anyhow!("the follower thread panicked"))
}
