//! What the benchmark stages share: the header line, statistics, the deterministic watch sets,
//! an endpoint config and events for the store. Each stage is its own bench target
//! (`cargo bench --bench block`); `cargo bench` runs them all.

// Each bench target compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod blocks;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::hashes::Hash;
use bitcoin::{Address, Network, ScriptBuf, WPubkeyHash};
use chainwatch::testkit::{poll, ConfigBuilder, Endpoint, Receiver};
use chainwatch::watch::{Watch, WatchIndex};

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Stage names given on the command line (`cargo bench -- block`); cargo's own flags are not.
pub fn args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect()
}

/// Whether `stage` runs: no stage named, or this one named.
pub fn wants(stage: &str) -> bool {
    let args = args();
    args.is_empty() || args.iter().any(|a| a == stage)
}

/// The first line of a stage's output: the machine and the time.
pub fn header(stages: &str) {
    println!(
        "chainwatch benchmarks ({stages}) on {} ({})",
        machine(),
        chainwatch::event::now_rfc3339()
    );
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

/// One figure with its target: `resync: 12.3 s (target <= 30 s): met`.
pub fn verdict(figure: &str, shown: &str, target: &str, met: bool) {
    println!(
        "{figure}: {shown} (target {target}): {}",
        if met { "met" } else { "NOT MET" }
    );
}

/// The highest resident size since the last `reset_peak_rss`, in MB (`VmHWM`).
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0 / 1e6)
}

/// Starts measuring `peak_rss_mb` afresh from the current resident size (Linux 4.0+).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `n` random p2wpkh scripts, the same every run (xorshift).
pub fn random_scripts(n: usize) -> impl Iterator<Item = ScriptBuf> {
    let mut seed = 0x1234_5678_9abc_def0u64;
    (0..n).map(move |_| {
        let mut h = [0u8; 20];
        for chunk in h.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        ScriptBuf::new_p2wpkh(&WPubkeyHash::from_byte_array(h))
    })
}

/// `n` random p2wpkh watches on `network`.
pub fn watches(n: usize, network: Network) -> Vec<Watch> {
    random_scripts(n)
        .map(|script| {
            let addr = Address::from_script(&script, network).unwrap();
            Watch::new(&addr, 3, None, serde_json::json!({}))
        })
        .collect()
}

/// The index the daemon builds: streamed in, records left in the store (here: none to load).
pub fn compact_index(n: usize, network: Network, extra: &[ScriptBuf]) -> WatchIndex {
    let loader: chainwatch::watch::WatchLoader = Arc::new(|_| Ok(None));
    let mut index = WatchIndex::with_loader(network, loader, n + extra.len());
    let add = |index: &mut WatchIndex, script: &ScriptBuf| {
        let addr = Address::from_script(script, network).unwrap().to_string();
        let id = chainwatch::watch::watch_id(&format!("address:{addr}"));
        index.insert_target(
            &id,
            &chainwatch::watch::Target::Address { address: addr },
            1,
        );
    };
    for script in random_scripts(n) {
        add(&mut index, &script);
    }
    for s in extra {
        if Address::from_script(s, network).is_ok() {
            add(&mut index, s);
        }
    }
    index.settle();
    index
}

/// A store's config: data in `dir`, one endpoint at `url` with 32 requests in flight.
pub fn endpoint_config(
    dir: &std::path::Path,
    url: &str,
    ordered: bool,
) -> chainwatch::config::Config {
    ConfigBuilder::default()
        .data_dir(dir)
        .endpoint(
            Endpoint::new("bench", url)
                .secret(SECRET)
                .ordered(ordered)
                .concurrency(32),
        )
        .parse()
        .unwrap()
}

/// A receiver on a free loopback port that keeps only ids and arrival times.
pub async fn ids_receiver() -> Receiver {
    Receiver::builder()
        .ids_only()
        .bind_loopback(0)
        .await
        .unwrap()
}

/// `n` tx.pending events with ids from `tag`.
pub fn events(n: usize, tag: &str) -> Vec<chainwatch::event::NewEvent> {
    chainwatch::testkit::sample_events(n, tag)
}

/// When each webhook id first reached `receiver`.
pub fn first_arrivals(receiver: &Receiver) -> HashMap<String, Instant> {
    let mut at = HashMap::new();
    for c in receiver.all() {
        at.entry(c.id).or_insert(c.at);
    }
    at
}

/// Waits until `receiver` got `n` requests, looking every 5 ms. Requests, not distinct ids:
/// counting those is cheap, and a receiver answering 204 at once is sent nothing twice.
pub async fn wait_requests(receiver: &Receiver, n: usize, limit: Duration) {
    let got = || {
        std::future::ready(if receiver.count() >= n {
            Ok(())
        } else {
            Err(format!("{} so far", receiver.count()))
        })
    };
    poll(
        &format!("{n} requests"),
        limit,
        Duration::from_millis(5),
        got,
    )
    .await
}

/// Runs `bench` on a two-thread runtime, as the daemon's machine has two cores.
pub fn on_two_threads(bench: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench);
}

/// A follower of `node` over JSON-RPC from `start_height`, its store in `data` watching
/// `watches(n)` (one endpoint, so events are recorded), and the config of that store.
pub fn rpc_follower(
    node: &chainwatch::simnode::SimNode,
    data: &std::path::Path,
    n: usize,
    start_height: chainwatch::config::StartHeight,
) -> (
    chainwatch::chain::Follower<chainwatch::node::RpcClient>,
    chainwatch::config::Config,
) {
    let cfg = endpoint_config(data, "http://127.0.0.1:9/hooks", false);
    let mut store = chainwatch::daemon::open_store(&cfg).unwrap();
    store
        .upsert_watches(&watches(n, Network::Regtest), "bench", 0)
        .unwrap();
    let tracker = chainwatch::tracker::Tracker::new("regtest", 6, store.load_tracked().unwrap());
    let rpc = Arc::new(chainwatch::node::RpcClient::new(
        &node.rpc_url(),
        chainwatch::config::RpcAuth::Cookie(node.cookie_path()),
    ));
    let opts = chainwatch::chain::FollowerOptions {
        start_height,
        poll_interval: Duration::from_secs(3600),
        zmq_mempool: false,
        alert_reorg_depth: 3,
        node_unreachable_after: Duration::from_secs(60),
    };
    let follower = chainwatch::chain::Follower::new(rpc, store, tracker, opts, Default::default());
    (follower, cfg)
}
