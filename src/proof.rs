//! Checks that chain data is what it claims to be before anything believes it. Anyone who can
//! reach a ZMQ port can publish on it, so a block body is used only if its header is the one
//! the node named and its transactions are the ones the header commits to; amounts outside
//! 0 … 21,000,000 BTC are never believed, whatever brought them. A leaf: it imports nothing of
//! the crate.

use std::collections::HashSet;

use bitcoin::consensus::Encodable;
use bitcoin::hashes::{Hash, HashEngine};
use bitcoin::{merkle_tree, Amount, Block, BlockHash, Transaction, TxMerkleNode, Txid};
use bitcoin::{WitnessMerkleNode, Wtxid};

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

/// A block body relayed over ZMQ, checked on arrival (before the node names its hash):
/// everything `check_block` checks but the hash, and no 64-byte transaction either. Such a
/// transaction is valid but could pose as an inner merkle node; refusing the relayed body
/// costs only an RPC fetch.
pub fn check_relayed_block(block: &Block) -> Result<(), ProofError> {
    if let Some(tx) = block.txdata.iter().find(|t| t.base_size() == 64) {
        return Err(ProofError::SixtyFourBytes(tx.compute_txid()));
    }
    check_block_body(block)
}

fn check_block_body(block: &Block) -> Result<(), ProofError> {
    let Some(first) = block.txdata.first() else {
        return Err(ProofError::Empty);
    };
    if !first.is_coinbase() || block.txdata[1..].iter().any(|t| t.is_coinbase()) {
        return Err(ProofError::Coinbase);
    }
    let mut buf = Vec::with_capacity(4096);
    let (txids, wtxids): (Vec<Txid>, Vec<Option<Wtxid>>) =
        block.txdata.iter().map(|t| tx_hashes(t, &mut buf)).unzip();
    let mut seen = HashSet::with_capacity(txids.len());
    for (tx, txid) in block.txdata.iter().zip(&txids) {
        if !seen.insert(*txid) {
            return Err(ProofError::Duplicate(*txid));
        }
        check_amounts(tx, *txid)?;
    }
    let root = merkle_tree::calculate_root(txids.iter().map(|t| t.to_raw_hash()));
    if root.map(TxMerkleNode::from) != Some(block.header.merkle_root) {
        return Err(ProofError::MerkleRoot);
    }
    if !witness_commitment_holds(block, &txids, &wtxids) {
        return Err(ProofError::WitnessCommitment);
    }
    Ok(())
}

/// A transaction's txid and, if it has a witness, its wtxid (without one, the two are the
/// same). Hashing is most of a block check's cost: the transaction is encoded once into a
/// buffer and hashed from it in a few large slices, which took two thirds of the time of
/// encoding it field by field into a hash engine for each (BENCHMARKS.md).
fn tx_hashes(tx: &Transaction, buf: &mut Vec<u8>) -> (Txid, Option<Wtxid>) {
    buf.clear();
    tx.consensus_encode(buf)
        .expect("encoding into a Vec does not fail");
    let base = tx.base_size();
    let txid = if buf.len() == base {
        Txid::hash(buf)
    } else {
        // The segwit layout: version (4), marker and flag (2), inputs and outputs, the
        // witnesses, lock time (4). The txid leaves out the marker, flag and witnesses.
        let mut e = Txid::engine();
        e.input(&buf[..4]);
        e.input(&buf[6..base - 2]);
        e.input(&buf[buf.len() - 4..]);
        Txid::from_engine(e)
    };
    (txid, has_witness(tx).then(|| Wtxid::hash(buf)))
}

fn has_witness(t: &Transaction) -> bool {
    t.input.iter().any(|i| !i.witness.is_empty())
}

/// BIP 141's commitment, as `Block::check_witness_commitment` checks it, with each
/// transaction's wtxid, or its txid when it has no witness.
fn witness_commitment_holds(block: &Block, txids: &[Txid], wtxids: &[Option<Wtxid>]) -> bool {
    const MAGIC: [u8; 6] = [0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    // Optional when no transaction has a witness.
    if wtxids.iter().all(Option::is_none) {
        return true;
    }
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
    let leaves = txids
        .iter()
        .zip(wtxids)
        .enumerate()
        .map(|(i, (txid, wtxid))| match (i, wtxid) {
            (0, _) => Wtxid::all_zeros().to_raw_hash(),
            (_, Some(w)) => w.to_raw_hash(),
            (_, None) => txid.to_raw_hash(),
        });
    let Some(root) = merkle_tree::calculate_root(leaves) else {
        return false;
    };
    let commitment = Block::compute_witness_commitment(&WitnessMerkleNode::from(root), reserved);
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

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::consensus::{deserialize, serialize};
    use bitcoin::hashes::Hash;
    use bitcoin::{ScriptBuf, TxOut};

    fn mainnet_block() -> Block {
        let raw = include_bytes!(
            "../benches/data/block_000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.raw"
        );
        deserialize(raw).expect("the fixture is a block")
    }

    fn hash(b: &Block) -> BlockHash {
        b.block_hash()
    }

    #[test]
    fn a_real_block_passes() {
        let b = mainnet_block();
        assert_eq!(
            hash(&b).to_string(),
            "000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae"
        );
        assert_eq!(
            check_block(&b, hash(&b)),
            Ok(()),
            "the real block proves itself"
        );
    }

    #[test]
    fn another_hash_is_refused() {
        let b = mainnet_block();
        let other = BlockHash::all_zeros();
        assert!(matches!(
            check_block(&b, other),
            Err(ProofError::WrongBlock { .. })
        ));
    }

    #[test]
    fn an_altered_output_under_the_real_header_is_refused() {
        let mut b = mainnet_block();
        let real = hash(&b);
        b.txdata[1].output[0].value = Amount::from_int_btc(10_000);
        assert_eq!(hash(&b), real, "the header is untouched");
        assert_eq!(check_block(&b, real), Err(ProofError::MerkleRoot));
        b.txdata[1].output[0].value = Amount::MAX_MONEY;
        assert!(
            matches!(check_block(&b, real), Err(ProofError::TotalValue(_))),
            "21M BTC plus the rest is refused before the merkle root is even computed"
        );
    }

    #[test]
    fn a_duplicated_tail_is_refused_though_its_merkle_root_matches() {
        let mut b = mainnet_block();
        // CVE-2012-2459: with an odd count, repeating the last transaction keeps the root.
        if b.txdata.len().is_multiple_of(2) {
            b.txdata.pop();
            b.header.merkle_root = b.compute_merkle_root().unwrap();
        }
        let expected = hash(&b);
        let last = b.txdata.last().unwrap().clone();
        b.txdata.push(last.clone());
        assert!(b.check_merkle_root(), "the mutation keeps the merkle root");
        assert_eq!(
            check_block(&b, expected),
            Err(ProofError::Duplicate(last.compute_txid()))
        );
    }

    #[test]
    fn an_altered_witness_is_refused() {
        let mut b = mainnet_block();
        let real = hash(&b);
        let tx = b
            .txdata
            .iter_mut()
            .skip(1)
            .find(|t| t.input.iter().any(|i| !i.witness.is_empty()))
            .expect("the block has segwit spends");
        let input = tx.input.iter_mut().find(|i| !i.witness.is_empty()).unwrap();
        input.witness.push([0u8; 3]);
        assert_eq!(check_block(&b, real), Err(ProofError::WitnessCommitment));
    }

    #[test]
    fn one_encoding_gives_the_txids_and_wtxids_rust_bitcoin_computes() {
        let mut buf = Vec::new();
        let mut witnessed = 0;
        for tx in &mainnet_block().txdata {
            let (txid, wtxid) = tx_hashes(tx, &mut buf);
            assert_eq!(txid, tx.compute_txid(), "txid");
            match wtxid {
                Some(w) => {
                    witnessed += 1;
                    assert_eq!(w, tx.compute_wtxid(), "wtxid of {txid}");
                }
                None => assert!(!has_witness(tx), "{txid} has a witness"),
            }
        }
        assert_eq!(witnessed, 2065, "the block's transactions with a witness");
        // No inputs: rust-bitcoin encodes it with the segwit marker, which the txid leaves out.
        let mut bare = tx_paying(&[1_000]);
        bare.input.clear();
        assert_ne!(serialize(&bare).len(), bare.base_size(), "segwit layout");
        assert_eq!(tx_hashes(&bare, &mut buf), (bare.compute_txid(), None));
    }

    fn tx_paying(values: &[u64]) -> Transaction {
        let mut tx = mainnet_block().txdata[1].clone();
        tx.output = values
            .iter()
            .map(|v| TxOut {
                value: Amount::from_sat(*v),
                script_pubkey: ScriptBuf::new(),
            })
            .collect();
        tx
    }

    #[test]
    fn the_witness_check_agrees_with_rust_bitcoins_on_every_tampering() {
        let mut buf = Vec::new();
        let mut hashes = |b: &Block| -> (Vec<Txid>, Vec<Option<Wtxid>>) {
            b.txdata.iter().map(|t| tx_hashes(t, &mut buf)).unzip()
        };
        let real = mainnet_block();
        let mut cases: Vec<(&str, Block)> = vec![("the real block", real.clone())];
        let mut b = real.clone();
        let plain = b
            .txdata
            .iter()
            .position(|t| !t.is_coinbase() && t.input.iter().all(|i| i.witness.is_empty()));
        let plain = plain.expect("the block has a transaction without witness");
        b.txdata[plain].input[0].witness.push([1u8; 2]);
        cases.push((
            "a witness given to a transaction without one (same txid)",
            b,
        ));
        let mut b = real.clone();
        b.txdata[0].output.retain(|o| {
            !o.script_pubkey
                .as_bytes()
                .starts_with(&[0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed])
        });
        cases.push(("the commitment output removed", b));
        let mut b = real.clone();
        b.txdata[0].input[0].witness = bitcoin::Witness::from_slice(&[[0u8; 31]]);
        cases.push(("a reserved value of 31 bytes", b));
        let mut b = real.clone();
        b.txdata[0].input[0].witness.push([0u8; 32]);
        cases.push(("two reserved values", b));
        for (what, b) in cases {
            let (txids, wtxids) = hashes(&b);
            let ours = witness_commitment_holds(&b, &txids, &wtxids);
            assert_eq!(ours, b.check_witness_commitment(), "{what}");
            assert_eq!(ours, what == "the real block", "{what}");
        }
    }

    #[test]
    fn amounts_beyond_the_supply_are_refused() {
        let max = Amount::MAX_MONEY.to_sat();
        let ok = tx_paying(&[max]);
        assert_eq!(
            check_amounts(&ok, ok.compute_txid()),
            Ok(()),
            "21M BTC is the ceiling"
        );
        let over = tx_paying(&[max + 1]);
        assert!(matches!(
            check_amounts(&over, over.compute_txid()),
            Err(ProofError::OutputValue { vout: 0, .. })
        ));
        let sum = tx_paying(&[max, 1]);
        assert!(matches!(
            check_amounts(&sum, sum.compute_txid()),
            Err(ProofError::TotalValue(_))
        ));
        let wrap = tx_paying(&[u64::MAX, u64::MAX]);
        assert!(
            check_amounts(&wrap, wrap.compute_txid()).is_err(),
            "no overflow"
        );
    }

    #[test]
    fn a_transaction_must_be_the_one_asked_for() {
        let tx = tx_paying(&[1000]);
        let other = tx_paying(&[2000]);
        assert!(matches!(
            check_transaction(&tx, other.compute_txid()),
            Err(ProofError::WrongTransaction { .. })
        ));
        assert_eq!(check_transaction(&tx, tx.compute_txid()), Ok(()));
    }
}
