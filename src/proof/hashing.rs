//! The hashes a block check needs (txids, wtxids, both merkle roots), taken from the block's
//! encoding, by one thread or by two sharing the work.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use bitcoin::hashes::Hash;
use bitcoin::{TxMerkleNode, Txid, WitnessMerkleNode, Wtxid};

use super::layout::TxSpan;
use crate::sha256d::{merkle_root, sha256d_each, Pieces};

/// What a block check needs hashed: each txid, the merkle root over them, and the root over
/// the wtxids (`None` when no transaction has a witness and the commitment is optional).
#[derive(Debug, PartialEq)]
pub(super) struct Hashed {
    pub txids: Vec<Txid>,
    pub root: Option<TxMerkleNode>,
    pub witness_root: Option<WitnessMerkleNode>,
}

/// The hashes of `block`'s own encoding, on this thread.
pub(super) fn hash_encoding(block: &bitcoin::Block) -> Hashed {
    let (bytes, spans) = super::layout::encoded(block);
    hash_block(&bytes, &spans)
}

/// The hashes of the transactions at `spans` of `bytes`, on this thread.
pub(super) fn hash_block(bytes: &[u8], spans: &[TxSpan]) -> Hashed {
    let hashes = sha256d_each(&messages(bytes, spans));
    with_roots(spans, &hashes)
}

/// The messages to hash: every transaction's txid preimage, then the wtxid preimage of those
/// with a witness.
fn messages<'a>(bytes: &'a [u8], spans: &[TxSpan]) -> Vec<Pieces<'a>> {
    let tx = |s: &TxSpan| &bytes[s.start..s.start + s.len];
    let mut msgs: Vec<Pieces> = spans
        .iter()
        .map(|s| {
            let t = tx(s);
            if s.len == s.base {
                [t, &[], &[]]
            } else {
                // The segwit layout: version (4), marker and flag (2), inputs and outputs,
                // the witnesses, lock time (4). The txid leaves out the marker, flag and
                // witnesses.
                [&t[..4], &t[6..s.base - 2], &t[s.len - 4..]]
            }
        })
        .collect();
    msgs.extend(
        spans
            .iter()
            .filter(|s| s.witness)
            .map(|s| [tx(s), &[], &[]]),
    );
    msgs
}

#[cfg(test)]
pub(super) fn tx_hashes(bytes: &[u8], spans: &[TxSpan]) -> (Vec<Txid>, Vec<Option<Wtxid>>) {
    split(spans, &sha256d_each(&messages(bytes, spans)))
}

/// Each transaction's txid and, if it has a witness, its wtxid (without one, the two are the
/// same), from the hashes of `messages`.
fn split(spans: &[TxSpan], hashes: &[[u8; 32]]) -> (Vec<Txid>, Vec<Option<Wtxid>>) {
    let (txids, mut witnessed) = hashes.split_at(spans.len());
    let txids = txids.iter().map(|h| Txid::from_byte_array(*h)).collect();
    let wtxids = spans
        .iter()
        .map(|s| {
            s.witness.then(|| {
                let (w, rest) = witnessed.split_first().expect("one per witnessed span");
                witnessed = rest;
                Wtxid::from_byte_array(*w)
            })
        })
        .collect();
    (txids, wtxids)
}

fn with_roots(spans: &[TxSpan], hashes: &[[u8; 32]]) -> Hashed {
    let (txids, root) = txid_root(spans, hashes);
    Hashed {
        txids,
        root,
        witness_root: witness_root(spans, hashes),
    }
}

/// The txids and their merkle root, from the first hashes (one per transaction).
fn txid_root(spans: &[TxSpan], hashes: &[[u8; 32]]) -> (Vec<Txid>, Option<TxMerkleNode>) {
    let leaves = hashes[..spans.len()].to_vec();
    let txids = leaves.iter().map(|h| Txid::from_byte_array(*h)).collect();
    (
        txids,
        merkle_root(leaves).map(TxMerkleNode::from_byte_array),
    )
}

/// The root over the wtxids, from all the hashes; `None` when no transaction has a witness.
fn witness_root(spans: &[TxSpan], hashes: &[[u8; 32]]) -> Option<WitnessMerkleNode> {
    let (txids, wtxids) = split(spans, hashes);
    wtxids.iter().any(Option::is_some).then(|| {
        // The coinbase's wtxid counts as zero.
        let leaves = std::iter::once([0; 32]).chain(txids.iter().zip(&wtxids).skip(1).map(
            |(txid, wtxid)| match wtxid {
                Some(w) => w.to_byte_array(),
                None => txid.to_byte_array(),
            },
        ));
        WitnessMerkleNode::from_byte_array(merkle_root(leaves.collect()).expect("a leaf"))
    })
}

/// Hashing shared by two threads that each hold the same list of messages: each takes the
/// next chunk not yet taken, so the one that started later (the decoder) takes fewer. The
/// two merkle roots are computed where the work is done first: the txid root by the decoder
/// once it has no chunk left, if the txids are all hashed by then (they come first); the
/// witness root by the thread that finishes the last chunk.
#[derive(Default)]
pub(super) struct SharedHashing {
    next: AtomicUsize,
    done: Mutex<Vec<(usize, Vec<[u8; 32]>)>>,
    txid_root: OnceLock<(Vec<Txid>, Option<TxMerkleNode>)>,
    witness_root: OnceLock<Option<WitnessMerkleNode>>,
}

impl SharedHashing {
    /// Enough messages that taking a chunk costs little beside hashing it, few enough that
    /// the last chunk keeps neither thread waiting long.
    const CHUNK: usize = 64;

    /// Hashes chunks of the messages of `spans` until none is left.
    pub fn work(&self, bytes: &[u8], spans: &[TxSpan]) {
        let msgs = messages(bytes, spans);
        let chunks = msgs.len().div_ceil(Self::CHUNK);
        loop {
            let chunk = self.next.fetch_add(1, Ordering::Relaxed);
            if chunk >= chunks {
                return;
            }
            let from = chunk * Self::CHUNK;
            let hashes = sha256d_each(&msgs[from..msgs.len().min(from + Self::CHUNK)]);
            let finished = {
                let mut done = self.done.lock().expect("not poisoned");
                done.push((chunk, hashes));
                done.len()
            };
            if finished == chunks {
                if let Some(hashes) = self.hashes_so_far(spans, msgs.len()) {
                    let _ = self.witness_root.set(witness_root(spans, &hashes));
                }
            }
        }
    }

    /// The decoder's part, once `work` has no chunk left for it: the txid root, if every
    /// txid is hashed.
    pub fn txids_if_hashed(&self, spans: &[TxSpan]) {
        if let Some(hashes) = self.hashes_so_far(spans, spans.len()) {
            let _ = self.txid_root.set(txid_root(spans, &hashes));
        }
    }

    /// The hashes of `spans`, once both threads are done working on these same spans.
    pub fn finish(self, spans: &[TxSpan]) -> Hashed {
        let (txids_done, witness_done) = (self.txid_root.get(), self.witness_root.get());
        // Gathered once, and only if a root is still to compute.
        let all = (txids_done.is_none() || witness_done.is_none()).then(|| {
            self.hashes_so_far(spans, message_count(spans))
                .expect("every chunk hashed once")
        });
        let all = all.as_deref().unwrap_or_default();
        let (txids, root) = match txids_done {
            Some(done) => done.clone(),
            None => txid_root(spans, all),
        };
        let witness_root = match witness_done {
            Some(done) => *done,
            None => witness_root(spans, all),
        };
        Hashed {
            txids,
            root,
            witness_root,
        }
    }

    /// The first `count` hashes, in order, if they are all done; `None` if not (or if the
    /// other thread read other bounds and hashed other messages).
    fn hashes_so_far(&self, spans: &[TxSpan], count: usize) -> Option<Vec<[u8; 32]>> {
        let all = message_count(spans);
        let done = self.done.lock().expect("not poisoned");
        // Sorted by reference: only the hashes wanted are copied.
        let mut in_order: Vec<&(usize, Vec<[u8; 32]>)> = done.iter().collect();
        in_order.sort_unstable_by_key(|(chunk, _)| *chunk);
        let mut hashes = Vec::with_capacity(count);
        for (i, (chunk, h)) in in_order.into_iter().enumerate() {
            if hashes.len() >= count {
                break;
            }
            let expected = Self::CHUNK.min(all.saturating_sub(i * Self::CHUNK));
            if *chunk != i || h.len() != expected {
                return None;
            }
            hashes.extend_from_slice(h);
        }
        (hashes.len() >= count).then(|| {
            hashes.truncate(count);
            hashes
        })
    }
}

/// How many messages `messages` makes of `spans`: a txid preimage each, a wtxid preimage
/// for each with a witness.
fn message_count(spans: &[TxSpan]) -> usize {
    spans.len() + spans.iter().filter(|s| s.witness).count()
}
