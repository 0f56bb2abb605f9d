//! Checks that chain data is what it claims to be before anything believes it. Anyone who can
//! reach a ZMQ port can publish on it, so a block body is used only if its header is the one
//! the node named and its transactions are the ones the header commits to; amounts outside
//! 0 … 21,000,000 BTC are never believed, whatever brought them. It imports only `sha256d`,
//! a leaf, of the crate.

use std::collections::HashSet;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, Block, BlockHash, Transaction, Txid, WitnessMerkleNode};

/// Why a block or transaction body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("block header hashes to {got}, not to {expected}")]
    WrongBlock { expected: BlockHash, got: BlockHash },
    #[error("transaction hashes to {got}, not to {expected}")]
    WrongTransaction { expected: Txid, got: Txid },
    #[error("block has no transactions")]
    Empty,
    #[error("first transaction is not a coinbase, or a later one is")]
    Coinbase,
    #[error("merkle root does not match the block's transactions")]
    MerkleRoot,
    #[error("transaction {0} appears twice (a mutated merkle tree)")]
    Duplicate(Txid),
    #[error("transaction {0} is 64 bytes without witness, which can pose as a merkle node")]
    SixtyFourBytes(Txid),
    #[error("witness commitment does not match the block's transactions")]
    WitnessCommitment,
    #[error("transaction {txid} output {vout} pays {sat} sat, more than 21,000,000 BTC")]
    OutputValue { txid: Txid, vout: usize, sat: u64 },
    #[error("transaction {0} pays more than 21,000,000 BTC in all")]
    TotalValue(Txid),
    #[error("cannot decode: {0}")]
    Undecodable(String),
    #[error("{0} bytes, more than any block")]
    TooLarge(usize),
}

/// Bitcoin's `MAX_BLOCK_SERIALIZED_SIZE`: no valid block is larger (its weight, at most
/// 4,000,000, counts every byte at least once).
pub const MAX_BLOCK_SIZE: usize = 4_000_000;

/// Decodes a block from the bytes a node sent and proves it to be the block `expected`, as
/// `check_block` does, hashing the bytes as received rather than encoding the block again.
/// The header is checked first, so a body under another header costs one hash.
pub fn decode_block(raw: &[u8], expected: BlockHash) -> Result<Block, ProofError> {
    let header = raw
        .get(..80)
        .ok_or(ProofError::Undecodable("shorter than a header".into()))?;
    let got = BlockHash::hash(header);
    if got != expected {
        return Err(ProofError::WrongBlock { expected, got });
    }
    let (block, _) = decode_proven(raw, Threads::TwoIfLarge)?;
    Ok(block)
}

/// A block body relayed over ZMQ, proven on arrival, before the node names its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayedBlock(Block);

impl RelayedBlock {
    pub fn block(&self) -> &Block {
        &self.0
    }

    pub fn into_block(self) -> Block {
        self.0
    }
}

/// Decodes a block body relayed over ZMQ and proves it, as `decode_block` does but for the
/// hash (the node has not named it yet), on this thread alone, and with no 64-byte
/// transaction either. Such a transaction is valid but could pose as an inner merkle node;
/// refusing the relayed body costs only an RPC fetch.
pub fn decode_relayed_block(raw: &[u8]) -> Result<RelayedBlock, ProofError> {
    // One thread: a relayed body only spares a fetch, and anyone who reaches the ZMQ port can
    // send one, so a flood of them takes one core, not two.
    let (block, spans) = decode_proven(raw, Threads::One)?;
    if let Some(i) = spans.iter().position(|s| s.base == 64) {
        return Err(ProofError::SixtyFourBytes(block.txdata[i].compute_txid()));
    }
    Ok(RelayedBlock(block))
}

#[derive(Clone, Copy, PartialEq)]
enum Threads {
    One,
    TwoIfLarge,
}

/// Decodes `raw` and checks its body against its header, with each transaction's bounds.
/// A large block's hashing starts on a second thread while this one decodes: that thread
/// scans the bytes for each transaction's bounds, and the two share the hashing once the
/// decode is done. Scanned bounds are used only if they are the decoder's; if they ever were
/// not, the decoded block is encoded again and that is hashed, as `check_block` does.
fn decode_proven(raw: &[u8], threads: Threads) -> Result<(Block, Vec<layout::TxSpan>), ProofError> {
    /// Below this (a regtest block of a few hundred transactions) a thread costs more than
    /// it saves.
    const SECOND_THREAD_FROM: usize = 64 * 1024;
    if raw.len() > MAX_BLOCK_SIZE {
        return Err(ProofError::TooLarge(raw.len()));
    }
    let decode = || {
        bitcoin::consensus::deserialize::<Block>(raw)
            .map_err(|e| ProofError::Undecodable(e.to_string()))
    };
    let shared = SharedHashing::default();
    let (block, scanned) = std::thread::scope(|s| {
        let scan_and_hash = || {
            let spans = scan_spans(raw)?;
            shared.work(raw, &spans);
            Some(spans)
        };
        // Without a thread (too small a block, or none to be had) the scan comes after.
        let helper = (threads == Threads::TwoIfLarge && raw.len() >= SECOND_THREAD_FROM)
            .then(|| {
                std::thread::Builder::new()
                    .spawn_scoped(s, scan_and_hash)
                    .ok()
            })
            .flatten();
        let block = decode().map(|b| (decoded_spans(&b), b));
        if let Ok((spans, _)) = &block {
            shared.work(raw, spans);
            shared.txids_if_hashed(spans);
        }
        let scanned = match helper {
            Some(h) => h.join().expect("hashing does not panic"),
            None => scan_spans(raw),
        };
        (block, scanned)
    });
    let (spans, block) = block?;
    let hashed = hashes_of_what_was_decoded(&block, &spans, scanned, shared);
    check_hashed_body(&block, &hashed)?;
    Ok((block, spans))
}

/// The hashes of `block`: those shared while it was decoded if the bytes scanned as the
/// decoder read them (`spans`), else those of its encoding. The second cannot happen while
/// rust-bitcoin decodes canonically; it is there so that a change in that costs speed only.
fn hashes_of_what_was_decoded(
    block: &Block,
    spans: &[layout::TxSpan],
    scanned: Option<Vec<layout::TxSpan>>,
    shared: SharedHashing,
) -> Hashed {
    if scanned.as_deref() == Some(spans) {
        return shared.finish(spans);
    }
    tracing::warn!(hash = %block.block_hash(), "a block's bytes scan otherwise than they decode; checking its encoding instead");
    hash_encoding(block)
}

/// Checks a block body against the hash the node named: header, merkle root (with no
/// duplicated or 64-byte transactions, which could fake one), witness commitment, amounts.
pub fn check_block(block: &Block, expected: BlockHash) -> Result<(), ProofError> {
    let got = block.block_hash();
    if got != expected {
        return Err(ProofError::WrongBlock { expected, got });
    }
    check_block_body(block)
}

fn check_block_body(block: &Block) -> Result<(), ProofError> {
    check_hashed_body(block, &hash_encoding(block))
}

fn check_hashed_body(block: &Block, hashed: &Hashed) -> Result<(), ProofError> {
    let Some(first) = block.txdata.first() else {
        return Err(ProofError::Empty);
    };
    if !first.is_coinbase() || block.txdata[1..].iter().any(|t| t.is_coinbase()) {
        return Err(ProofError::Coinbase);
    }
    let mut seen = HashSet::with_capacity(hashed.txids.len());
    for (tx, txid) in block.txdata.iter().zip(&hashed.txids) {
        if !seen.insert(*txid) {
            return Err(ProofError::Duplicate(*txid));
        }
        check_amounts(tx, *txid)?;
    }
    if hashed.root != Some(block.header.merkle_root) {
        return Err(ProofError::MerkleRoot);
    }
    if !witness_commitment_holds(block, hashed.witness_root) {
        return Err(ProofError::WitnessCommitment);
    }
    Ok(())
}

/// BIP 141's commitment, as `Block::check_witness_commitment` checks it, with each
/// transaction's wtxid, or its txid when it has no witness.
fn witness_commitment_holds(block: &Block, witness_root: Option<WitnessMerkleNode>) -> bool {
    const MAGIC: [u8; 6] = [0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    // Optional when no transaction has a witness.
    let Some(root) = witness_root else {
        return true;
    };
    let coinbase = &block.txdata[0];
    // The last output starting with the magic bytes holds it.
    let Some(out) = coinbase.output.iter().rev().find(|o| {
        let b = o.script_pubkey.as_bytes();
        b.len() >= 38 && b[..6] == MAGIC
    }) else {
        return false;
    };
    let reserved: Vec<&[u8]> = coinbase.input[0].witness.iter().collect();
    let [reserved] = reserved.as_slice() else {
        return false;
    };
    if reserved.len() != 32 {
        return false;
    }
    let commitment = Block::compute_witness_commitment(&root, reserved);
    commitment.as_byte_array()[..] == out.script_pubkey.as_bytes()[6..38]
}

/// Checks a transaction body against the txid it was asked for, and its amounts.
pub fn check_transaction(tx: &Transaction, expected: Txid) -> Result<(), ProofError> {
    let got = tx.compute_txid();
    if got != expected {
        return Err(ProofError::WrongTransaction { expected, got });
    }
    check_amounts(tx, got)
}

/// Every output and their sum within 0 … 21,000,000 BTC.
pub fn check_amounts(tx: &Transaction, txid: Txid) -> Result<(), ProofError> {
    let mut total = Amount::ZERO;
    for (vout, o) in tx.output.iter().enumerate() {
        if o.value > Amount::MAX_MONEY {
            return Err(ProofError::OutputValue {
                txid,
                vout,
                sat: o.value.to_sat(),
            });
        }
        total = total
            .checked_add(o.value)
            .filter(|t| *t <= Amount::MAX_MONEY)
            .ok_or(ProofError::TotalValue(txid))?;
    }
    Ok(())
}

mod hashing;
mod layout;

use hashing::{hash_encoding, Hashed, SharedHashing};
use layout::{decoded_spans, scan_spans};
#[cfg(test)]
mod tests;
