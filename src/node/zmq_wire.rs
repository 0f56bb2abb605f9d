//! Decoding bitcoind's ZMQ messages: three frames, topic, body and a little-endian u32 counter.

use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{BlockHash, Transaction, Txid};

use crate::proof::{decode_relayed_block, ProofError, RelayedBlock};

/// A `sequence` notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceEvent {
    BlockConnected(BlockHash),
    BlockDisconnected(BlockHash),
    /// Entered the mempool, at this mempool sequence.
    TxAdded(Txid, u64),
    /// Left the mempool for any reason but inclusion in a block.
    TxRemoved(Txid, u64),
}

/// A decoded message body.
#[derive(Debug, Clone, PartialEq)]
pub enum ZmqBody {
    Sequence(SequenceEvent),
    RawTx(Transaction),
    /// A block body, proven on arrival (its transactions are the ones its header commits to).
    RawBlock(RelayedBlock),
    /// A block body that decodes but does not prove itself: forged or corrupt.
    RefusedBlock {
        hash: BlockHash,
        error: ProofError,
    },
    HashTx(Txid),
    HashBlock(BlockHash),
}

/// One message with its per-topic counter.
#[derive(Debug, Clone, PartialEq)]
pub struct ZmqMessage {
    pub topic: String,
    pub counter: u32,
    pub body: ZmqBody,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("expected 3 frames, got {0}")]
    FrameCount(usize),
    #[error("counter frame has {0} bytes, expected 4")]
    Counter(usize),
    #[error("unknown topic {0:?}")]
    Topic(String),
    #[error("{topic} body of {len} bytes is malformed: {reason}")]
    Body {
        topic: String,
        len: usize,
        reason: String,
    },
}

/// bitcoind sends hashes in the byte order RPC displays, the reverse of the internal order.
fn display_order_hash(bytes: &[u8]) -> Option<[u8; 32]> {
    let mut h: [u8; 32] = bytes.try_into().ok()?;
    h.reverse();
    Some(h)
}

pub fn decode(frames: &[Vec<u8>]) -> Result<ZmqMessage, WireError> {
    if frames.len() != 3 {
        return Err(WireError::FrameCount(frames.len()));
    }
    let topic = String::from_utf8_lossy(&frames[0]).into_owned();
    let counter_bytes: [u8; 4] = frames[2]
        .as_slice()
        .try_into()
        .map_err(|_| WireError::Counter(frames[2].len()))?;
    let counter = u32::from_le_bytes(counter_bytes);
    let body = decode_body(&topic, &frames[1])?;
    Ok(ZmqMessage {
        topic,
        counter,
        body,
    })
}

pub fn decode_body(topic: &str, b: &[u8]) -> Result<ZmqBody, WireError> {
    let err = |reason: String| WireError::Body {
        topic: topic.to_string(),
        len: b.len(),
        reason,
    };
    match topic {
        "sequence" => decode_sequence(b).map(ZmqBody::Sequence).map_err(err),
        "rawtx" => deserialize(b)
            .map(ZmqBody::RawTx)
            .map_err(|e| err(e.to_string())),
        "rawblock" => match decode_relayed_block(b) {
            Ok(block) => Ok(ZmqBody::RawBlock(block)),
            Err(e @ ProofError::Undecodable(_)) => Err(err(e.to_string())),
            Err(error) => Ok(ZmqBody::RefusedBlock {
                hash: b.get(..80).map_or(BlockHash::all_zeros(), BlockHash::hash),
                error,
            }),
        },
        "hashtx" => display_order_hash(b)
            .map(|h| ZmqBody::HashTx(Txid::from_byte_array(h)))
            .ok_or_else(|| err("expected 32 bytes".into())),
        "hashblock" => display_order_hash(b)
            .map(|h| ZmqBody::HashBlock(BlockHash::from_byte_array(h)))
            .ok_or_else(|| err("expected 32 bytes".into())),
        other => Err(WireError::Topic(other.to_string())),
    }
}

fn decode_sequence(b: &[u8]) -> Result<SequenceEvent, String> {
    if b.len() < 33 {
        return Err("shorter than hash + label".into());
    }
    let hash = display_order_hash(&b[..32]).expect("32 bytes");
    let mempool_seq = || -> Result<u64, String> {
        let s: [u8; 8] = b[33..]
            .try_into()
            .map_err(|_| format!("{} bytes after the label, expected 8", b.len() - 33))?;
        Ok(u64::from_le_bytes(s))
    };
    let block_only = || {
        if b.len() == 33 {
            Ok(())
        } else {
            Err(format!("{} stray bytes after a block label", b.len() - 33))
        }
    };
    match b[32] {
        b'C' => {
            block_only().map(|_| SequenceEvent::BlockConnected(BlockHash::from_byte_array(hash)))
        }
        b'D' => {
            block_only().map(|_| SequenceEvent::BlockDisconnected(BlockHash::from_byte_array(hash)))
        }
        b'A' => Ok(SequenceEvent::TxAdded(
            Txid::from_byte_array(hash),
            mempool_seq()?,
        )),
        b'R' => Ok(SequenceEvent::TxRemoved(
            Txid::from_byte_array(hash),
            mempool_seq()?,
        )),
        l => Err(format!("unknown label {:?}", l as char)),
    }
}

/// Encodes a message exactly as bitcoind does (used by the simulated node).
pub fn encode(topic: &str, body: Vec<u8>, counter: u32) -> [Vec<u8>; 3] {
    [
        topic.as_bytes().to_vec(),
        body,
        counter.to_le_bytes().to_vec(),
    ]
}

pub fn sequence_body(ev: &SequenceEvent) -> Vec<u8> {
    let (hash, label, seq): ([u8; 32], u8, Option<u64>) = match *ev {
        SequenceEvent::BlockConnected(h) => (h.to_byte_array(), b'C', None),
        SequenceEvent::BlockDisconnected(h) => (h.to_byte_array(), b'D', None),
        SequenceEvent::TxAdded(t, s) => (t.to_byte_array(), b'A', Some(s)),
        SequenceEvent::TxRemoved(t, s) => (t.to_byte_array(), b'R', Some(s)),
    };
    let mut out: Vec<u8> = hash.iter().rev().copied().collect();
    out.push(label);
    if let Some(s) = seq {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

pub fn hash_body<H: Hash<Bytes = [u8; 32]>>(h: H) -> Vec<u8> {
    h.to_byte_array().iter().rev().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::consensus::serialize;
    use bitcoin::{Amount, Block};

    const MAINNET: &[u8] = include_bytes!(
        "../../benches/data/block_000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.raw"
    );

    /// A real body is kept proven; one that decodes but does not prove itself, or is larger
    /// than any block, is a refusal naming its header's hash (its counter still counts); one
    /// that does not decode is a malformed message.
    #[test]
    fn rawblock_bodies_are_proven_refused_or_malformed() {
        let real: Block = deserialize(MAINNET).unwrap();
        let hash = real.block_hash();
        match decode_body("rawblock", MAINNET) {
            Ok(ZmqBody::RawBlock(b)) => assert_eq!(b.block(), &real, "the real body, proven"),
            other => panic!("the real body: {other:?}"),
        }
        let mut forged = real.clone();
        forged.txdata[7].output[0].value = Amount::from_sat(1);
        let oversized = [MAINNET, &vec![0u8; 3_000_000][..]].concat();
        for (what, bytes, error) in [
            (
                "an altered output",
                serialize(&forged),
                ProofError::MerkleRoot,
            ),
            (
                "a body over 4 MB",
                oversized.clone(),
                ProofError::TooLarge(oversized.len()),
            ),
        ] {
            assert_eq!(
                decode_body("rawblock", &bytes),
                Ok(ZmqBody::RefusedBlock { hash, error }),
                "{what}"
            );
        }
        for garbage in [&MAINNET[..79], &MAINNET[..MAINNET.len() - 1]] {
            assert!(
                matches!(
                    decode_body("rawblock", garbage),
                    Err(WireError::Body { .. })
                ),
                "{} bytes that do not decode",
                garbage.len()
            );
        }
    }
}
