//! `chainwatch run`: opens the store, waits for the node, subscribes to ZMQ, then runs the
//! follower and one delivery worker per endpoint until shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::chain::{Follower, FollowerOptions};
use crate::config::{core_chain_name, network_name, Config};
use crate::dispatch;
pub use crate::event::now_ms;
use crate::metrics::Metrics;
use crate::node::zmq_sub::{Subscriber, Subscription};
use crate::node::{ChainInfo, ChainSource, NodeError, RpcClient, ZmqNotification};
use crate::store::Store;
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

/// Waits until the node answers, telling the user why while it does not.
pub async fn wait_for_node(
    rpc: &RpcClient,
    shutdown: &CancellationToken,
) -> Result<Option<ChainInfo>, NodeError> {
    let mut delay = Duration::from_millis(250);
    let mut said = false;
    loop {
        match rpc.chain_info().await {
            Ok(info) => return Ok(Some(info)),
            Err(e) if e.is_transient() => {
                if !said || delay >= Duration::from_secs(8) {
                    tracing::warn!(error = %e, "waiting for bitcoind");
                    said = true;
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
async fn start_api(
    cfg: &Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let app = api::router(
        &cfg.api,
        Store::open_keyed(&cfg.data_dir, &cfg.audit_key_file)?,
        metrics,
        cfg.network,
        cfg.default_confirmations,
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
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = api::serve(listener, app, &allow, shutdown).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    })))
}

/// Runs the daemon until `shutdown` is cancelled; in-flight deliveries finish first.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Each worker builds the same client again; a bad certificate or proxy stops us here, once.
    for ep in &cfg.endpoints {
        dispatch::Sender::new(ep)?;
    }
    let store = open_store(&cfg)?;
    let rpc = Arc::new(RpcClient::new(
        &cfg.bitcoind.rpc_url,
        cfg.bitcoind.auth.clone(),
    ));
    let Some(info) = wait_for_node(&rpc, &shutdown)
        .await
        .context("connecting to bitcoind")?
    else {
        return Ok(());
    };
    check_chain(&cfg, &info)?;
    tracing::info!(chain = %info.chain, height = info.blocks, "connected to bitcoind");

    let announced = match rpc.zmq_notifications().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list ZMQ notifications");
            vec![]
        }
    };
    let subs = subscriptions(&cfg, &announced);
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

    let tracker = Tracker::new(
        network_name(cfg.network),
        cfg.finality_depth,
        store.load_tracked()?,
    );
    tracing::info!(tracked = tracker.len(), "state loaded");

    let metrics = Arc::new(Metrics::default());
    let api = start_api(&cfg, metrics.clone(), shutdown.clone()).await?;
    let wake = Arc::new(Notify::new());
    let mut workers = Vec::new();
    for ep in cfg.endpoints.clone() {
        let ep_store = Store::open_keyed(&cfg.data_dir, &cfg.audit_key_file)?;
        let (w, s, m) = (wake.clone(), shutdown.clone(), metrics.clone());
        workers.push(tokio::spawn(dispatch::run_endpoint(
            ep,
            ep_store,
            w,
            dispatch::system_clock(),
            m,
            s,
        )));
    }

    let opts = FollowerOptions {
        start_height: cfg.start_height,
        poll_interval: cfg.bitcoind.poll_interval,
        zmq_mempool: has_sequence,
        alert_reorg_depth: cfg.alert_reorg_depth,
        node_unreachable_after: cfg.node_unreachable_after,
    };
    let follower = Follower::new(rpc, store, tracker, opts, wake)
        .with_metrics(metrics)
        .with_network(cfg.network);
    follower.run(zmq_rx, shutdown.clone()).await;
    shutdown.cancel();
    for w in workers {
        match w.await {
            Ok(Err(e)) => tracing::error!(error = %e, "delivery worker failed"),
            Err(e) => tracing::error!(error = %e, "delivery worker panicked"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(s) = subscriber {
        s.stop();
    }
    if let Some(api) = api {
        let _ = api.await;
    }
    tracing::info!("stopped");
    Ok(())
}
