//! `cargo bench --bench delivery`: deliveries per second to a local receiver, ordered and
//! not, and the latency from commit to request.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainwatch::changeset::ChangeSet;
use chainwatch::store::Store;
use chainwatch::testkit::Receiver;

use common::{endpoint_config, events, first_arrivals, percentile, wait_requests};

/// Longer than any run takes; a stalled worker ends the run instead of hanging it.
const LIMIT: Duration = Duration::from_secs(600);

/// A store with one endpoint at a fresh receiver that keeps only ids and arrival times.
async fn setup(
    ordered: bool,
) -> (
    tempfile::TempDir,
    Receiver,
    chainwatch::config::Config,
    Store,
) {
    let dir = tempfile::tempdir().unwrap();
    let receiver = common::ids_receiver().await;
    let cfg = endpoint_config(dir.path(), &receiver.url, ordered);
    let mut store = Store::open(dir.path()).unwrap();
    store.check_network("regtest").unwrap();
    store.sync_endpoints(&cfg.endpoints).unwrap();
    (dir, receiver, cfg, store)
}

async fn bench_delivery() {
    for ordered in [false, true] {
        let (dir, receiver, cfg, mut store) = setup(ordered).await;
        let n = if ordered { 3_000 } else { 20_000 };
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
        let worker = tokio::spawn(chainwatch::dispatch::run_endpoint(
            cfg.endpoints[0].clone(),
            Store::open(dir.path()).unwrap(),
            chainwatch::dispatch::Context::new(Arc::new(tokio::sync::Notify::new()), token.clone()),
        ));
        wait_requests(&receiver, n, LIMIT).await;
        let secs = t.elapsed().as_secs_f64();
        token.cancel();
        worker.await.unwrap();
        let kind = if ordered {
            "ordered"
        } else {
            "unordered (concurrency 32)"
        };
        println!("delivery: {:.0} deliveries/s sustained, {kind}, {n} events to a local receiver (target >= 5,000 unordered)", n as f64 / secs);
    }
    // Latency from commit to request at a steady 100 events per second.
    let (dir, receiver, cfg, mut store) = setup(true).await;
    let wake = Arc::new(tokio::sync::Notify::new());
    let token = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(chainwatch::dispatch::run_endpoint(
        cfg.endpoints[0].clone(),
        Store::open(dir.path()).unwrap(),
        chainwatch::dispatch::Context::new(wake.clone(), token.clone()),
    ));
    let mut committed_at = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for (i, e) in events(500, "lat").into_iter().enumerate() {
        tick.tick().await;
        let id = e.id.clone();
        store
            .commit(&ChangeSet::events(vec![e]), chainwatch::daemon::now_ms())
            .unwrap();
        committed_at.insert(id, Instant::now());
        wake.notify_waiters();
        let _ = i;
    }
    wait_requests(&receiver, 500, LIMIT).await;
    token.cancel();
    worker.await.unwrap();
    let at = first_arrivals(&receiver);
    let lat: Vec<f64> = committed_at
        .iter()
        .map(|(id, c)| at[id].saturating_duration_since(*c).as_secs_f64() * 1e3)
        .collect();
    println!(
        "delivery latency: commit to request p50 {:.2} ms, p99 {:.2} ms at 100 events/s, ordered (target p99 < 20 ms)",
        percentile(lat.clone(), 0.5),
        percentile(lat, 0.99)
    );
}

fn main() {
    if common::wants("delivery") {
        common::header("delivery");
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(bench_delivery());
    }
}
