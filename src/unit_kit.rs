//! Fixtures for the library's unit tests: watches with labels, blocks paying them, a fast store.

use bitcoin::hashes::Hash;
use bitcoin::{Address, Block, BlockHash, Network, OutPoint, ScriptBuf, Transaction, Txid};

use crate::event::{BlockRef, TipRef, TxEventIdentity};
use crate::simnode::mining;
use crate::watch::{Watch, WatchedDescriptor};

/// A descriptor watch's receive path (derivations checked in tests/integration/descriptors.rs).
pub const SHOP_WPKH: &str = "wpkh([ef03ecfa/84h/1h/0h]tpubDDqrRTGGpApdar6GULkh3EFCoiGJTTkLnfidWJe4GKDAEMqkx3Jh2Yzz1bbA76HWSuwzp7W3ZWzKa78cWXvEtc4eqsqRz8VzzMNVDPf3X9p/0/*)#qgmdk2f6";

/// A regtest address of its own for each `n`.
pub fn address(n: u8) -> Address {
    Address::p2wsh(&ScriptBuf::from_bytes(vec![0x51, n]), Network::Regtest)
}

/// A watch of `address(n)` asking for `confirmations`, labelled `order-n` with metadata.
pub fn watch(n: u8, confirmations: u32) -> Watch {
    Watch::new(
        &address(n),
        confirmations,
        Some(format!("order-{n}")),
        serde_json::json!({ "order": n }),
    )
}

/// A descriptor watch of `SHOP_WPKH` with `gap` addresses ahead.
pub fn descriptor_watch(gap: u32, confirmations: u32) -> Watch {
    let canonical = WatchedDescriptor::parse(SHOP_WPKH, Network::Regtest)
        .expect("valid descriptor")
        .canonical();
    Watch::new_descriptor(
        &canonical,
        gap,
        confirmations,
        Some("shop".into()),
        serde_json::json!({}),
    )
}

/// The script `SHOP_WPKH` derives at `index`.
pub fn derived_script(index: u32) -> ScriptBuf {
    WatchedDescriptor::parse(SHOP_WPKH, Network::Regtest)
        .expect("valid descriptor")
        .derive(0, index)
        .expect("derives")
        .0
}

/// A payment from a made-up coin (`seed` makes it unique) to `outputs`.
pub fn payment(seed: u8, outputs: &[(ScriptBuf, u64)]) -> Transaction {
    let coin = OutPoint::new(Txid::from_byte_array([seed; 32]), 0);
    mining::payment(&[(coin, 100_000_000)], outputs, &ScriptBuf::new(), 1_000)
}

/// A payment spending `coins` to a script no one watches.
pub fn spend(coins: &[(OutPoint, u64)]) -> Transaction {
    mining::payment(
        coins,
        &[(ScriptBuf::new_op_return([7u8; 4]), 1_000)],
        &ScriptBuf::new(),
        1_000,
    )
}

/// A block at `height` on `prev` holding `txs`, and how events name it.
pub fn block(prev: BlockHash, height: u32, txs: Vec<Transaction>) -> (Block, BlockRef) {
    let b = mining::build_block(
        prev,
        height,
        1_764_000_000 + height,
        &ScriptBuf::new(),
        txs,
        0,
    );
    let at = BlockRef {
        hash: b.block_hash(),
        height,
        time: b.header.time,
    };
    (b, at)
}

pub fn tip_of(b: &BlockRef) -> TipRef {
    TipRef {
        hash: b.hash,
        height: b.height,
    }
}

/// The id a transaction event must have.
pub fn tx_event_id(
    kind: &str,
    txid: Txid,
    watch: &Watch,
    block: Option<BlockHash>,
    confirmations: u32,
    reorg_count: u32,
) -> String {
    TxEventIdentity {
        kind,
        txid,
        watch_id: &watch.id,
        block_hash: block,
        confirmations,
        reorg_count,
    }
    .event_id()
}
