//! `cargo bench --bench block`: matching a mainnet block, and mempool transactions, against a
//! million watches (`-- block` or `-- mempool` runs one of the two; they share the index).

mod common;

use std::time::Instant;

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Address, Block, Network, ScriptBuf, Transaction};
use chainwatch::watch::Overlay;

use common::{compact_index, median, verdict};

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

/// The median time of the hashing a block check must do, with nothing else: double SHA-256
/// of each transaction's txid preimage (and wtxid preimage, if it has a witness), encoded
/// beforehand, then the two merkle roots over the results, with the check's own hasher.
fn hashing_floor(block: &Block) -> f64 {
    use chainwatch::sha256d::{merkle_root, sha256d_each, Pieces};
    let preimages: Vec<(Vec<u8>, Option<Vec<u8>>)> = block
        .txdata
        .iter()
        .map(|tx| {
            let mut stripped = tx.clone();
            stripped.input.iter_mut().for_each(|i| i.witness.clear());
            let witness = tx.input.iter().any(|i| !i.witness.is_empty());
            (serialize(&stripped), witness.then(|| serialize(tx)))
        })
        .collect();
    let mut msgs: Vec<Pieces> = preimages.iter().map(|(b, _)| [&b[..], &[], &[]]).collect();
    msgs.extend(
        preimages
            .iter()
            .filter_map(|(_, w)| w.as_ref().map(|w| [&w[..], &[][..], &[][..]])),
    );
    let runs = (0..40).map(|_| {
        let t = Instant::now();
        let hashes = sha256d_each(&msgs);
        let (txids, wtxids) = hashes.split_at(preimages.len());
        std::hint::black_box(merkle_root(txids.to_vec()));
        std::hint::black_box(merkle_root(wtxids.to_vec()));
        t.elapsed().as_secs_f64() * 1e3
    });
    median(runs.collect())
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
        let hash = block.block_hash();
        let (mut decode, mut checked, mut both, mut all) = (vec![], vec![], vec![], vec![]);
        let mut one_thread = vec![];
        let mut matched = 0;
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let match_all = |b: &Block| -> usize {
            let mut overlay = Overlay::default();
            let probe = index.probe(&b.txdata);
            b.txdata
                .iter()
                .enumerate()
                .map(|(i, tx)| index.match_tx_probed(tx, probe.of(i), &mut overlay).len())
                .sum()
        };
        for _ in 0..40 {
            let t = Instant::now();
            std::hint::black_box(deserialize::<Block>(BLOCK).unwrap());
            decode.push(ms(t));
            let t = Instant::now();
            std::hint::black_box(chainwatch::proof::decode_block(BLOCK, hash).unwrap());
            checked.push(ms(t));
            let t = Instant::now();
            let b: Block = deserialize(BLOCK).unwrap();
            chainwatch::proof::check_block(&b, hash).unwrap();
            one_thread.push(ms(t));
            let t = Instant::now();
            let b: Block = deserialize(BLOCK).unwrap();
            matched = match_all(&b);
            both.push(ms(t));
            let t = Instant::now();
            let b = chainwatch::proof::decode_block(BLOCK, hash).unwrap();
            std::hint::black_box(match_all(&b));
            all.push(ms(t));
        }
        let (d, c, b, a) = (median(decode), median(checked), median(both), median(all));
        let one = median(one_thread);
        println!(
            "block: decode {d:.2} ms; decode+check (merkle root, witness commitment, amounts; hashed on a second thread beside the decode) {c:.2} ms; decode+match {b:.2} ms; all three {a:.2} ms ({matched} matches against 1M watches, {} txs)",
            block.txdata.len(),
        );
        let floor = hashing_floor(&block);
        println!(
            "block, on one thread: decode+check {one:.2} ms ({:.2}x decode); the hashing alone {floor:.2} ms ({:.2}x decode): every txid and wtxid preimage, already encoded, and both merkle trees, two messages at a time",
            one / d,
            floor / d
        );
        verdict(
            "block, decode+match",
            &format!("{:.2}x decode", b / d),
            "<= 1.5x (first round)",
            b / d <= 1.5,
        );
        verdict(
            "block, decode+check+match",
            &format!("{:.2}x decode", a / d),
            "<= 1.25x",
            a / d <= 1.25,
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
        let rate = median(rates);
        verdict(
            "mempool, decode+match",
            &format!(
                "{rate:.0} tx/s on one core against 1M watches (decode alone {:.0} tx/s)",
                median(decode_rates)
            ),
            ">= 300,000 tx/s",
            rate >= 300_000.0,
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
