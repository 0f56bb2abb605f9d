//! Blocks paying 1,000 watched outputs each, committed through any store backend.

use std::time::Instant;

use bitcoin::hashes::Hash;
use bitcoin::{Address, Network, ScriptBuf, Transaction};
use chainwatch::changeset::ChangeSet;
use chainwatch::event::BlockRef;
use chainwatch::store::ChainStore;
use chainwatch::tracker::Tracker;
use chainwatch::watch::WatchIndex;

/// One block's commit: how long it took and how many events it recorded.
pub struct Committed {
    pub ms: f64,
    pub events: usize,
}

/// Commits `n` blocks of ten transactions with a hundred outputs each, every output paying one
/// of 1,000 watches (confirmation target 3, so later blocks also confirm earlier ones).
pub fn commit_blocks(store: &mut impl ChainStore, n: u32) -> Vec<Committed> {
    let ws = super::watches(1000, Network::Regtest);
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
    let mut out = vec![];
    for height in 0..n {
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
        out.push(Committed {
            ms: t.elapsed().as_secs_f64() * 1e3,
            events: committed.len(),
        });
        tracker.apply(&changes.tracked);
        index.apply(&changes.index);
        prev = at.hash;
    }
    out
}
