//! `cargo bench --bench delivery`: deliveries per second to a local receiver, ordered and
//! not, over plain http and over TLS (a private CA's chain, as production has one), and the
//! latency from commit to request.

mod common;
// Shared with the tests; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/integration/tls_kit.rs"]
mod tls_kit;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainwatch::changeset::ChangeSet;
use chainwatch::config::Config;
use chainwatch::store::{Handoff, Store};
use chainwatch::testkit::{ConfigBuilder, Endpoint, Receiver};

use common::{events, first_arrivals, percentile, verdict, wait_requests, SECRET};
use tls_kit::{TestPki, TlsReceiver};

/// Longer than any run takes; a stalled worker ends the run instead of hanging it.
const LIMIT: Duration = Duration::from_secs(600);

/// Where deliveries go: a plain receiver, or one behind TLS with its PKI.
struct Target {
    receiver: Receiver,
    tls: Option<(TlsReceiver, TestPki)>,
}

impl Target {
    async fn start(tls: bool, dir: &std::path::Path) -> Target {
        if !tls {
            return Target {
                receiver: common::ids_receiver().await,
                tls: None,
            };
        }
        let pki = TestPki::new(&dir.join("pki"));
        let tls =
            TlsReceiver::start(Receiver::builder().ids_only(), pki.server_config(false)).await;
        Target {
            receiver: tls.receiver.clone(),
            tls: Some((tls, pki)),
        }
    }

    fn handshakes(&self) -> u64 {
        self.tls
            .as_ref()
            .map_or(0, |(t, _)| t.handshakes.load(Ordering::SeqCst))
    }

    fn config(&self, dir: &std::path::Path, ordered: bool) -> Config {
        let mut e = Endpoint::new("bench", &self.receiver.url)
            .secret(SECRET)
            .ordered(ordered)
            .concurrency(32);
        if let Some((_, pki)) = &self.tls {
            e = e.ca_file(&pki.ca_file);
        }
        ConfigBuilder::default()
            .data_dir(dir)
            .endpoint(e)
            .parse()
            .unwrap()
    }
}

/// A store with one endpoint at a fresh receiver that keeps only ids and arrival times.
async fn setup(ordered: bool, tls: bool) -> (tempfile::TempDir, Target, Config, Store) {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start(tls, dir.path()).await;
    let cfg = target.config(dir.path(), ordered);
    let mut store = Store::open(dir.path()).unwrap();
    store.check_network("regtest").unwrap();
    store.sync_endpoints(&cfg.endpoints).unwrap();
    (dir, target, cfg, store)
}

fn spawn_worker(
    dir: &std::path::Path,
    cfg: &Config,
    wake: Arc<tokio::sync::Notify>,
    token: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_handed_worker(dir, cfg, wake, token, Default::default())
}

/// A worker whose deliveries commits may hand off through `handoff`.
fn spawn_handed_worker(
    dir: &std::path::Path,
    cfg: &Config,
    wake: Arc<tokio::sync::Notify>,
    token: &tokio_util::sync::CancellationToken,
    handoff: Arc<Handoff>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(chainwatch::dispatch::run_endpoint(
        cfg.endpoints[0].clone(),
        Store::open(dir).unwrap(),
        chainwatch::dispatch::Context {
            handoff,
            ..chainwatch::dispatch::Context::new(wake, token.clone())
        },
    ))
}

/// Deliveries per second of a queue of `n` events.
async fn throughput(ordered: bool, tls: bool, n: usize) {
    let (dir, target, cfg, mut store) = setup(ordered, tls).await;
    for chunk in events(n, "t").chunks(1000) {
        store
            .commit(
                &ChangeSet::events(chunk.to_vec()),
                chainwatch::daemon::now_ms(),
            )
            .unwrap();
    }
    let token = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let worker = spawn_worker(dir.path(), &cfg, Default::default(), &token);
    wait_requests(&target.receiver, n, LIMIT).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    token.cancel();
    worker.await.unwrap();
    let kind = if ordered {
        "ordered"
    } else {
        "unordered (concurrency 32)"
    };
    let scheme = if tls { "https" } else { "http" };
    let shown = format!(
        "{rate:.0} deliveries/s sustained, {kind}, {n} events to a local {scheme} receiver"
    );
    match (ordered, tls) {
        (true, _) => {
            println!("delivery, ordered, {scheme}: {shown} (no target: one request in flight)")
        }
        (false, false) => verdict("delivery, unordered", &shown, ">= 5,000/s", rate >= 5_000.0),
        (false, true) => {
            let (handshakes, connections) = (target.handshakes(), target.receiver.connections());
            verdict(
                "delivery, unordered, TLS",
                &format!("{shown}; {handshakes} TLS handshakes for {connections} connections"),
                ">= 15,000/s, one handshake per connection",
                rate >= 15_000.0 && handshakes == connections as u64,
            );
        }
    }
}

/// Events sent before latency is measured.
const WARM_UP: usize = 10;

/// Latency from commit to request at a steady 100 events per second, ordered: as the daemon
/// commits on SQLite (each delivery, alone in its queue, handed to the worker), or, `woken`,
/// with the worker woken to read it back (as on PostgreSQL, and as before hand-offs).
async fn latency(tls: bool, woken: bool) {
    let (dir, target, cfg, mut store) = setup(true, tls).await;
    let wake = Arc::new(tokio::sync::Notify::new());
    let token = tokio_util::sync::CancellationToken::new();
    let handoff = match woken {
        true => Arc::default(),
        false => Arc::new(Handoff::new([cfg.endpoints[0].name.as_str()])),
    };
    store.hand_off_to(handoff.clone());
    let worker = spawn_handed_worker(dir.path(), &cfg, wake.clone(), &token, handoff);
    let mut committed_at = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    // The first request opens the connection (and loads the system's roots for TLS), tens of
    // milliseconds during which the next few wait behind it: timed apart, not in the
    // percentiles of the steady state.
    let all = events(WARM_UP + 500, "lat");
    let warm: std::collections::HashSet<String> =
        all[..WARM_UP].iter().map(|e| e.id.clone()).collect();
    let first_id = all[0].id.clone();
    for e in all {
        tick.tick().await;
        let id = e.id.clone();
        let committed = store
            .commit(&ChangeSet::events(vec![e]), chainwatch::daemon::now_ms())
            .unwrap();
        committed_at.insert(id, Instant::now());
        if committed.iter().any(|e| !e.handed_off) {
            wake.notify_waiters();
        }
    }
    wait_requests(&target.receiver, WARM_UP + 500, LIMIT).await;
    token.cancel();
    worker.await.unwrap();
    let at = first_arrivals(&target.receiver);
    let ms = |id: &String| {
        at[id]
            .saturating_duration_since(committed_at[id])
            .as_secs_f64()
            * 1e3
    };
    let first = ms(&first_id);
    let lat: Vec<f64> = committed_at
        .keys()
        .filter(|id| !warm.contains(*id))
        .map(ms)
        .collect();
    let (p50, p99) = (percentile(lat.clone(), 0.5), percentile(lat, 0.99));
    let path = match woken {
        true => "worker woken to read each back",
        false => "each handed off by its commit",
    };
    let shown = format!(
        "commit to request p50 {p50:.2} ms, p99 {p99:.2} ms at 100 events/s, ordered, {path} (after {WARM_UP} to warm up; the first, on a new connection, {first:.1} ms)"
    );
    if woken {
        let scheme = if tls { "https" } else { "http" };
        println!("delivery latency, {scheme}, woken: {shown} (reported: the path before hand-offs, and PostgreSQL's)");
    } else if tls {
        verdict("delivery latency, TLS", &shown, "p99 < 2 ms", p99 < 2.0);
    } else {
        verdict("delivery latency", &shown, "p99 < 20 ms", p99 < 20.0);
    }
}

async fn bench_delivery() {
    for tls in [false, true] {
        throughput(false, tls, 20_000).await;
        throughput(true, tls, 3_000).await;
        latency(tls, false).await;
        latency(tls, true).await;
    }
}

fn main() {
    if common::wants("delivery") {
        common::header("delivery");
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(bench_delivery());
    }
}
