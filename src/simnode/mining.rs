//! Building blocks and payments for the simulated node, shaped like bitcoind's own.

use bitcoin::blockdata::block::{Header, Version};
use bitcoin::blockdata::script::Builder;
use bitcoin::hashes::Hash;
use bitcoin::{
    absolute, transaction, Amount, Block, BlockHash, CompactTarget, OutPoint, ScriptBuf, Sequence,
    Transaction, TxIn, TxMerkleNode, TxOut, Witness,
};

/// Regtest's proof-of-work limit, `207fffff`.
pub const REGTEST_BITS: u32 = 0x207f_ffff;
pub const BLOCK_SUBSIDY: u64 = 50 * 100_000_000;

/// BIP34 height push as bitcoind writes it (small heights as OP_N), then OP_0.
fn coinbase_script(height: u32) -> ScriptBuf {
    let b = Builder::new();
    let b = if (1..=16).contains(&height) {
        b.push_opcode(bitcoin::opcodes::Opcode::from(0x50 + height as u8))
    } else {
        b.push_int(height as i64)
    };
    b.push_opcode(bitcoin::opcodes::OP_0).into_script()
}

/// The coinbase: subsidy plus fees to `to`, and the segwit commitment output.
pub fn coinbase(height: u32, to: &ScriptBuf, fees: u64) -> Transaction {
    let mut witness = Witness::new();
    witness.push([0u8; 32]);
    Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: coinbase_script(height),
            sequence: Sequence(0xffff_fffe),
            witness,
        }],
        output: vec![TxOut {
            value: Amount::from_sat(BLOCK_SUBSIDY + fees),
            script_pubkey: to.clone(),
        }],
    }
}

/// A block on `prev` holding `txs`, with a valid merkle root, witness commitment and regtest work.
pub fn build_block(
    prev: BlockHash,
    height: u32,
    time: u32,
    to: &ScriptBuf,
    txs: Vec<Transaction>,
    fees: u64,
) -> Block {
    let mut txdata = vec![coinbase(height, to, fees)];
    txdata.extend(txs);
    let mut block = Block {
        header: Header {
            version: Version::from_consensus(0x2000_0000),
            prev_blockhash: prev,
            merkle_root: TxMerkleNode::all_zeros(),
            time,
            bits: CompactTarget::from_consensus(REGTEST_BITS),
            nonce: 0,
        },
        txdata,
    };
    let witness_root = block.witness_root().expect("has coinbase");
    let commitment = Block::compute_witness_commitment(&witness_root, &[0u8; 32]);
    let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    script.extend_from_slice(commitment.as_byte_array());
    block.txdata[0].output.push(TxOut {
        value: Amount::ZERO,
        script_pubkey: ScriptBuf::from_bytes(script),
    });
    block.header.merkle_root = block.compute_merkle_root().expect("has transactions");
    let target = block.header.target();
    while !target.is_met_by(block.header.block_hash()) {
        block.header.nonce += 1;
    }
    block
}

/// A payment spending `coins`, paying `outputs` and returning change to `change_to`.
/// Signatures are placeholders: the simulated node checks structure, not scripts.
pub fn payment(
    coins: &[(OutPoint, u64)],
    outputs: &[(ScriptBuf, u64)],
    change_to: &ScriptBuf,
    fee: u64,
) -> Transaction {
    let input_total: u64 = coins.iter().map(|c| c.1).sum();
    let paid: u64 = outputs.iter().map(|o| o.1).sum();
    let mut output: Vec<TxOut> = outputs
        .iter()
        .map(|(s, v)| TxOut {
            value: Amount::from_sat(*v),
            script_pubkey: s.clone(),
        })
        .collect();
    let change = input_total.saturating_sub(paid + fee);
    if change > 0 {
        output.push(TxOut {
            value: Amount::from_sat(change),
            script_pubkey: change_to.clone(),
        });
    }
    Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: coins
            .iter()
            .map(|(op, _)| {
                let mut w = Witness::new();
                w.push([0x30u8; 71]);
                w.push([0x02u8; 33]);
                TxIn {
                    previous_output: *op,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence(0xffff_fffd),
                    witness: w,
                }
            })
            .collect(),
        output,
    }
}
