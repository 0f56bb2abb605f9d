//! `cargo bench --bench catchup`: catching up with the simulated node over JSON-RPC, from
//! genesis through 2,000 blocks holding 200,000 transactions (about 100 MB), as a first run
//! with `start_height = 0` does. Every block is fetched, proven, matched against the watches
//! and committed (`synchronous=FULL`). Reports blocks/s and MB/s.

mod common;

use std::time::Instant;

use bitcoin::hashes::Hash;
use bitcoin::{OutPoint, ScriptBuf, Txid};
use chainwatch::config::StartHeight;
use chainwatch::simnode::SimNode;

use common::*;

const BLOCKS: u32 = 2_000;
const TXS_PER_BLOCK: usize = 100;
const WATCHED: usize = 1_000;
/// One block in this many pays a watch.
const PAID_EVERY: u32 = 20;

fn main() {
    if !wants("catchup") {
        return;
    }
    header("catch-up");
    on_two_threads(bench_catchup());
}

async fn bench_catchup() {
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start(&dir.path().join("node")).await.unwrap();
    let t = Instant::now();
    let watched: Vec<ScriptBuf> = random_scripts(WATCHED).collect();
    let others: Vec<ScriptBuf> = random_scripts(WATCHED + 10).skip(WATCHED).collect();
    let mut bytes = 0usize;
    let mut coin = 0u64;
    for height in 1..=BLOCKS {
        for i in 0..TXS_PER_BLOCK {
            let mut outputs: Vec<(ScriptBuf, u64)> =
                others.iter().map(|s| (s.clone(), 10_000)).collect();
            if i == 0 && height % PAID_EVERY == 0 {
                outputs[0] = (watched[(height / PAID_EVERY) as usize].clone(), 25_000);
            }
            coin += 1;
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&coin.to_le_bytes());
            id[31] = 0xcd;
            node.spend(
                &[(OutPoint::new(Txid::from_byte_array(id), 0), 1_000_000)],
                &outputs,
            );
        }
        let hash = node.mine(1)[0];
        bytes += node.block_size(hash);
    }
    let mb = bytes as f64 / 1e6;
    println!(
        "catch-up: simnode's chain built: {BLOCKS} blocks, {} transactions, {mb:.1} MB, in {:.1} s",
        BLOCKS as usize * TXS_PER_BLOCK,
        t.elapsed().as_secs_f64()
    );

    let (mut follower, cfg) = rpc_follower(
        &node,
        &dir.path().join("data"),
        WATCHED,
        StartHeight::Height(0),
    );
    let t = Instant::now();
    follower.resync().await.expect("catch-up");
    let secs = t.elapsed().as_secs_f64();
    let store = chainwatch::store::Store::open(&cfg.data_dir).unwrap();
    assert_eq!(
        store.tip().unwrap().map(|t| t.height),
        Some(BLOCKS),
        "caught up with the node's tip"
    );
    let paid: std::collections::BTreeSet<String> = store
        .events_after(0, 100_000)
        .unwrap()
        .iter()
        .filter(|e| e.kind.starts_with("tx."))
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
            v["data"]["txid"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(
        paid.len(),
        (BLOCKS / PAID_EVERY) as usize,
        "every payment to a watch found"
    );
    println!(
        "catch-up: {BLOCKS} blocks in {secs:.1} s: {:.0} blocks/s, {:.1} MB/s (fetched, proven, matched against {WATCHED} watches, committed; no target)",
        BLOCKS as f64 / secs,
        mb / secs
    );
}
