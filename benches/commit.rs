//! `cargo bench --bench commit`: storing a block's events, deliveries, tip and state in one
//! transaction.

mod common;

use chainwatch::store::Store;

use common::blocks::commit_blocks;
use common::{endpoint_config, median};

fn bench_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.check_network("regtest").unwrap();
    // One endpoint, so every event also writes its delivery row, as in a real deployment.
    let cfg = endpoint_config(dir.path(), "http://127.0.0.1:9/hooks", true);
    store.sync_endpoints(&cfg.endpoints).unwrap();
    let blocks = commit_blocks(&mut store, 12);
    common::verdict(
        "commit, SQLite",
        &format!(
            "a block paying 1,000 watched outputs ({} events and deliveries, tip, state) in {:.1} ms (synchronous=FULL)",
            blocks[0].events, blocks[0].ms
        ),
        "< 50 ms",
        blocks[0].ms < 50.0,
    );
    let steady: Vec<f64> = blocks[2..].iter().map(|b| b.ms).collect();
    println!(
        "commit: steady state, each block also confirming the two before (N=3, {} events per block): {:.1} ms median, {:.1} ms worst over {} blocks",
        blocks[5].events,
        median(steady.clone()),
        steady.iter().cloned().fold(0.0, f64::max),
        steady.len()
    );
}

fn main() {
    if common::wants("commit") {
        common::header("commit");
        bench_commit();
    }
}
