//! `cargo bench --bench resync`: a mempool resync at mainnet size. The simulated node holds
//! 100,000 transactions (about 40 MB serialized, ten outputs each) when the follower, at the
//! tip with an empty view of the mempool, reads it over JSON-RPC: as after a restart, or a ZMQ
//! gap. 100 of them pay one of 1,000 watched addresses.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::hashes::Hash;
use bitcoin::{OutPoint, ScriptBuf, Txid};
use chainwatch::chain::{Follower, FollowerOptions};
use chainwatch::config::{RpcAuth, StartHeight};
use chainwatch::node::RpcClient;
use chainwatch::simnode::SimNode;
use chainwatch::tracker::Tracker;

use common::*;

const TRANSACTIONS: usize = 100_000;
const WATCHED: usize = 1_000;
const PAID: usize = 100;
const TARGET_SECS: f64 = 30.0;
const TARGET_MB: f64 = 50.0;

fn main() {
    if !wants("resync") {
        return;
    }
    header("mempool resync");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench_resync());
}

async fn bench_resync() {
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start(&dir.path().join("node")).await.unwrap();
    node.mine(1);
    let cfg = endpoint_config(&dir.path().join("data"), "http://127.0.0.1:9/hooks", false);
    let mut store = chainwatch::daemon::open_store(&cfg).unwrap();
    let watched: Vec<ScriptBuf> = random_scripts(WATCHED).collect();
    store
        .upsert_watches(&watches(WATCHED, bitcoin::Network::Regtest), "bench", 0)
        .unwrap();
    let tracker = Tracker::new("regtest", 6, store.load_tracked().unwrap());
    let rpc = Arc::new(RpcClient::new(
        &node.rpc_url(),
        RpcAuth::Cookie(node.cookie_path()),
    ));
    let opts = FollowerOptions {
        start_height: StartHeight::Tip,
        poll_interval: Duration::from_secs(3600),
        zmq_mempool: false,
        alert_reorg_depth: 3,
        node_unreachable_after: Duration::from_secs(60),
    };
    let mut follower = Follower::new(rpc, store, tracker, opts, Default::default());

    let t = Instant::now();
    let mut bytes = 0;
    let others: Vec<ScriptBuf> = random_scripts(WATCHED + 10).skip(WATCHED).collect();
    for i in 0..TRANSACTIONS {
        let mut outputs: Vec<(ScriptBuf, u64)> =
            others.iter().map(|s| (s.clone(), 10_000)).collect();
        if i % (TRANSACTIONS / PAID) == 0 {
            outputs[0] = (watched[i / (TRANSACTIONS / PAID)].clone(), 25_000);
        }
        // Coins nobody checks: simnode does not verify what an input spends.
        let coin = OutPoint::new(Txid::from_byte_array(fake_txid(i)), 0);
        let txid = node.spend(&[(coin, 1_000_000)], &outputs);
        if i == 0 {
            bytes = bitcoin::consensus::serialize(&node.mempool_entry(txid).unwrap()).len();
        }
    }
    println!(
        "resync: simnode's mempool filled with {TRANSACTIONS} transactions of {bytes} bytes in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let baseline = rss_mb();
    reset_peak_rss();
    let t = Instant::now();
    follower.resync().await.expect("resync");
    let took = t.elapsed().as_secs_f64();
    let peak = peak_rss_mb() - baseline;
    let pending = chainwatch::store::Store::open(&cfg.data_dir)
        .unwrap()
        .events_after(0, 10_000)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "tx.pending")
        .count();
    assert_eq!(pending, PAID, "every payment to a watch is pending once");
    verdict(
        "resync, time",
        &format!(
            "{took:.1} s for {TRANSACTIONS} mempool transactions ({:.0} tx/s)",
            TRANSACTIONS as f64 / took
        ),
        &format!("<= {TARGET_SECS} s"),
        took <= TARGET_SECS,
    );
    verdict(
        "resync, memory",
        &format!("peak {peak:.1} MB above the steady state ({baseline:.0} MB resident before, simulated node included)"),
        &format!("<= {TARGET_MB} MB"),
        peak <= TARGET_MB,
    );
}

fn fake_txid(i: usize) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b[31] = 0xcc;
    b
}
