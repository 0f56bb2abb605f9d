//! `cargo bench --bench memory`: resident size of the watch index, and of the whole daemon
//! with a million watches in its store.

mod common;

use std::time::{Duration, Instant};

use bitcoin::{Address, Network, ScriptBuf};
use chainwatch::store::Store;
use chainwatch::testkit::{poll, Api, Bitcoind, ConfigBuilder};
use chainwatch::watch::Watch;

use common::{compact_index, random_scripts, rss_mb};

fn bench_memory() {
    for n in [1_000_000usize, 10_000_000] {
        let before = rss_mb();
        let index = compact_index(n, Network::Bitcoin, &[]);
        let after = rss_mb();
        let mb = after - before;
        let limit = if n == 1_000_000 { 150.0 } else { 400.0 };
        common::verdict(
            "memory, index",
            &format!("{mb:.0} MB resident for the index of {n} watched addresses"),
            &format!("<= {limit:.0} MB for {n}"),
            mb <= limit,
        );
        drop(index);
    }
}

/// Child process: a store in `dir` with `n` watched regtest addresses.
fn fill_store(dir: &str, n: usize) {
    let mut store = Store::open(std::path::Path::new(dir)).unwrap();
    store.check_network("regtest").unwrap();
    let scripts: Vec<ScriptBuf> = random_scripts(n).collect();
    for chunk in scripts.chunks(100_000) {
        let ws: Vec<Watch> = chunk
            .iter()
            .map(|s| {
                Watch::new(
                    &Address::from_script(s, Network::Regtest).unwrap(),
                    3,
                    Some("order".into()),
                    serde_json::json!({"order_id": 1}),
                )
            })
            .collect();
        store.upsert_watches(&ws, "bench", 0).unwrap();
    }
}

/// The whole daemon's resident size once it has loaded a store of a million watches.
async fn bench_daemon_memory() {
    let n = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let t = Instant::now();
    // Filled by another process, so its allocations do not count here.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["fill-store", data.to_str().unwrap(), &n.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let fill_secs = t.elapsed().as_secs_f64();
    let node = chainwatch::simnode::SimNode::start(&dir.path().join("node"))
        .await
        .unwrap();
    node.mine(1);
    let baseline = rss_mb();
    let cfg = ConfigBuilder::regtest()
        .data_dir(&data)
        .bitcoind(Bitcoind::simnode(&node))
        .api(Api::listen("127.0.0.1:0"))
        .parse()
        .unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    // The tip is set right after the index is built.
    let tip_set = || {
        let tip = Store::open(&data).unwrap().tip().unwrap();
        std::future::ready(tip.map(|_| ()).ok_or_else(String::new))
    };
    poll(
        "the daemon to load its watches",
        Duration::from_secs(600),
        Duration::from_millis(50),
        tip_set,
    )
    .await;
    let load_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = rss_mb();
    token.cancel();
    daemon.await.unwrap().unwrap();
    common::verdict(
        "memory, daemon",
        &format!(
            "the running daemon with {n} watched addresses in its store: {total:.0} MB resident ({:.0} MB above the process before it started; store filled in {fill_secs:.0}s, watches loaded in {load_secs:.1}s)",
            total - baseline
        ),
        "<= 100 MB",
        total <= 100.0,
    );
}

fn main() {
    let args = common::args();
    if args.first().map(String::as_str) == Some("fill-store") {
        fill_store(&args[1], args[2].parse().unwrap());
        return;
    }
    if common::wants("memory") {
        common::header("memory");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(bench_daemon_memory());
        bench_memory();
    }
}
