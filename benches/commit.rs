//! `cargo bench --bench commit`: storing a block's events, deliveries, tip and state in one
//! transaction.

mod common;

use std::time::Instant;

use bitcoin::hashes::Hash;
use bitcoin::{Address, Network, ScriptBuf, Transaction};
use chainwatch::changeset::ChangeSet;
use chainwatch::event::{BlockRef, TipRef};
use chainwatch::store::Store;
use chainwatch::tracker::Tracker;
use chainwatch::watch::WatchIndex;

use common::{endpoint_config, median, watches};

fn bench_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.check_network("regtest").unwrap();
    // One endpoint, so every event also writes its delivery row, as in a real deployment.
    let cfg = endpoint_config(dir.path(), "http://127.0.0.1:9/hooks", true);
    store.sync_endpoints(&cfg.endpoints).unwrap();
    let ws = watches(1000, Network::Regtest);
    let scripts: Vec<ScriptBuf> = ws
        .iter()
        .map(|w| {
            w.target_text()
                .parse::<Address<_>>()
                .unwrap()
                .assume_checked()
                .script_pubkey()
        })
        .collect();
    let mut index = WatchIndex::new(Network::Regtest, ws);
    let mut tracker = Tracker::new("regtest", 100, vec![]);
    let mut prev = bitcoin::BlockHash::all_zeros();
    let mut times = vec![];
    let mut counts = vec![];
    for height in 0..12u32 {
        // Ten transactions of a hundred outputs each, every output paying a watch.
        let txdata: Vec<Transaction> = (0..10)
            .map(|t| {
                chainwatch::simnode::mining::payment(
                    &[(
                        bitcoin::OutPoint::new(
                            bitcoin::Txid::from_byte_array([height as u8 + 1; 32]),
                            t,
                        ),
                        100_000_000,
                    )],
                    &scripts[t as usize * 100..(t as usize + 1) * 100]
                        .iter()
                        .map(|s| (s.clone(), 10_000))
                        .collect::<Vec<_>>(),
                    &ScriptBuf::new(),
                    1000,
                )
            })
            .collect();
        let block = chainwatch::simnode::mining::build_block(
            prev,
            height,
            1_700_000_000 + height,
            &ScriptBuf::new_op_return([0u8; 4]),
            txdata,
            0,
        );
        let at = BlockRef {
            hash: block.block_hash(),
            height,
            time: block.header.time,
        };
        let step = tracker.connect_block(&index, &block, at);
        let mut changes = ChangeSet::labelled(step, &index).unwrap();
        changes.tip = chainwatch::tip::TipChanges::connect(
            at,
            block.header.prev_blockhash,
            block.txdata.len() as u32,
        );
        let t = Instant::now();
        let committed = store.commit(&changes, 0).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        counts.push(committed.len());
        tracker.apply(&changes.tracked);
        index.apply(&changes.index);
        prev = at.hash;
        let _ = TipRef { hash: prev, height };
    }
    println!(
        "commit: a block paying 1,000 watched outputs ({} events and deliveries, tip, state) commits in {:.1} ms (synchronous=FULL; target < 50 ms)",
        counts[0], times[0]
    );
    println!(
        "commit: steady state, each block also confirming the two before (N=3, {} events per block): {:.1} ms median, {:.1} ms worst over {} blocks",
        counts[5],
        median(times[2..].to_vec()),
        times[2..].iter().cloned().fold(0.0, f64::max),
        times.len() - 2
    );
}

fn main() {
    if common::wants("commit") {
        common::header("commit");
        bench_commit();
    }
}
