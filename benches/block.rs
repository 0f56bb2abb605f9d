//! `cargo bench --bench block`: matching a mainnet block, and mempool transactions, against a
//! million watches (`-- block` or `-- mempool` runs one of the two; they share the index).

mod common;

use std::time::Instant;

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Address, Block, Network, ScriptBuf, Transaction};
use chainwatch::watch::Overlay;

use common::{compact_index, median};

const BLOCK: &[u8] = include_bytes!(
    "data/block_000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.raw"
);

/// 100 distinct standard output scripts the block pays.
fn paid_scripts(block: &Block) -> Vec<ScriptBuf> {
    let mut v: Vec<ScriptBuf> = Vec::new();
    for tx in &block.txdata[1..] {
        for o in &tx.output {
            if Address::from_script(&o.script_pubkey, Network::Bitcoin).is_ok()
                && !v.contains(&o.script_pubkey)
            {
                v.push(o.script_pubkey.clone());
            }
            if v.len() == 100 {
                return v;
            }
        }
    }
    v
}

fn bench_block_and_mempool(run_block: bool, run_mempool: bool) {
    let block: Block = deserialize(BLOCK).unwrap();
    let paid = paid_scripts(&block);
    let t = Instant::now();
    let index = compact_index(1_000_000 - paid.len(), Network::Bitcoin, &paid);
    println!(
        "setup: 1,000,000 watches indexed in {:.1}s ({} scripts)",
        t.elapsed().as_secs_f64(),
        index.script_count()
    );
    if run_block {
        let mut decode = vec![];
        let mut both = vec![];
        let mut matched = 0;
        for _ in 0..40 {
            let t = Instant::now();
            let b: Block = deserialize(BLOCK).unwrap();
            decode.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(&b);
            let t = Instant::now();
            let b: Block = deserialize(BLOCK).unwrap();
            let mut overlay = Overlay::default();
            matched = b
                .txdata
                .iter()
                .map(|tx| index.match_tx_in(tx, &mut overlay).len())
                .sum::<usize>();
            both.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (d, b) = (median(decode), median(both));
        println!(
            "block: decode {d:.2} ms, decode+match {b:.2} ms against 1M watches ({matched} matches, {} txs): {:.2}x decode (target <= 1.5x)",
            block.txdata.len(),
            b / d
        );
    }
    if run_mempool {
        let raws: Vec<Vec<u8>> = block.txdata.iter().map(serialize).collect();
        let mut decode_rates = vec![];
        let mut rates = vec![];
        for _ in 0..10 {
            let t = Instant::now();
            for r in &raws {
                let tx: Transaction = deserialize(r).unwrap();
                std::hint::black_box(&tx);
            }
            decode_rates.push(raws.len() as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for r in &raws {
                let tx: Transaction = deserialize(r).unwrap();
                std::hint::black_box(index.match_tx(&tx));
            }
            rates.push(raws.len() as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "mempool: decode+match {:.0} tx/s on one core against 1M watches (decode alone {:.0} tx/s; target >= 300,000)",
            median(rates),
            median(decode_rates)
        );
    }
}

fn main() {
    let (block, mempool) = (common::wants("block"), common::wants("mempool"));
    if block || mempool {
        common::header("block, mempool");
        bench_block_and_mempool(block, mempool);
    }
}
