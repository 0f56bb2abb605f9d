//! `cargo bench --bench resync`: a mempool resync at mainnet size. The simulated node holds
//! 100,000 transactions (about 40 MB serialized, ten outputs each) when the follower, at the
//! tip with an empty view of the mempool, reads it over JSON-RPC: as after a restart, or a ZMQ
//! gap. 100 of them pay one of 1,000 watched addresses.

mod common;

use std::time::Instant;

use bitcoin::hashes::Hash;
use bitcoin::{OutPoint, ScriptBuf, Txid};
use chainwatch::config::StartHeight;
use chainwatch::simnode::SimNode;

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
    on_two_threads(bench_resync());
}

async fn bench_resync() {
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start(&dir.path().join("node")).await.unwrap();
    node.mine(1);
    let watched: Vec<ScriptBuf> = random_scripts(WATCHED).collect();
    let (mut follower, cfg) =
        rpc_follower(&node, &dir.path().join("data"), WATCHED, StartHeight::Tip);

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
