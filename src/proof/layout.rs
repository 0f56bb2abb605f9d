//! Where each transaction lies in a block's encoding: read from the decoded block (where the
//! decoder found it) or scanned from the bytes alone (so that hashing can start before the
//! decoder is done; only bounds equal to the decoder's are ever used).

use bitcoin::consensus::Encodable;
use bitcoin::{Block, Transaction, VarInt};

/// Where a transaction lies in an encoding of its block: from `start`, `len` bytes, of which
/// `base` are not the segwit marker, flag or witnesses; `witness` if any input has one.
#[derive(Debug, PartialEq)]
pub(super) struct TxSpan {
    pub start: usize,
    pub len: usize,
    pub base: usize,
    pub witness: bool,
}

impl TxSpan {
    fn of(tx: &Transaction, start: usize, len: usize) -> Self {
        let witness = tx.input.iter().any(|i| !i.witness.is_empty());
        TxSpan {
            start,
            len,
            base: tx.base_size(),
            witness,
        }
    }
}

/// The bounds of each transaction in a block's encoding, read from its length fields alone;
/// `None` if they run past the end or stop short of it. The decoder has the last word: its
/// bounds (`decoded_spans`) must be these before hashes of these are used.
pub(super) fn scan_spans(raw: &[u8]) -> Option<Vec<TxSpan>> {
    let mut r = Reader { raw, at: 80 };
    let count = r.compact_size()?;
    // Every transaction takes at least 10 bytes, so a forged count cannot reserve much.
    let mut spans = Vec::with_capacity(usize::try_from(count).ok()?.min(raw.len() / 10));
    for _ in 0..count {
        let start = r.at;
        r.skip(4)?;
        // A zero where the input count goes is the segwit marker (then the flag).
        let segwit = *raw.get(r.at)? == 0;
        if segwit {
            r.skip(2)?;
        }
        let inputs_at = r.at;
        let inputs = r.compact_size()?;
        for _ in 0..inputs {
            r.skip(36)?;
            let script = r.compact_size()?;
            r.skip(script)?;
            r.skip(4)?;
        }
        for _ in 0..r.compact_size()? {
            r.skip(8)?;
            let script = r.compact_size()?;
            r.skip(script)?;
        }
        let base = 4 + (r.at - inputs_at) + 4;
        let mut witness = false;
        if segwit {
            for _ in 0..inputs {
                let items = r.compact_size()?;
                witness |= items > 0;
                for _ in 0..items {
                    let len = r.compact_size()?;
                    r.skip(len)?;
                }
            }
        }
        r.skip(4)?;
        spans.push(TxSpan {
            start,
            len: r.at - start,
            base,
            witness,
        });
    }
    (r.at == raw.len()).then_some(spans)
}

/// Where the decoder found each of `block`'s transactions in the bytes it decoded: after the
/// header and the count, back to back, each as long as it encodes (rust-bitcoin refuses a
/// non-minimal length or a needless segwit flag, so a decoded block encodes to the bytes it
/// came from).
pub(super) fn decoded_spans(block: &Block) -> Vec<TxSpan> {
    let mut start = 80 + VarInt::from(block.txdata.len()).size();
    block
        .txdata
        .iter()
        .map(|tx| {
            let len = tx.total_size();
            let span = TxSpan::of(tx, start, len);
            start += len;
            span
        })
        .collect()
}

/// Reads lengths from a block's encoding, refusing to run past its end.
struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn skip(&mut self, n: u64) -> Option<()> {
        let n = usize::try_from(n).ok()?;
        self.at = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.raw.len())?;
        Some(())
    }

    fn compact_size(&mut self) -> Option<u64> {
        let first = *self.raw.get(self.at)?;
        let width = match first {
            0xfd => 2,
            0xfe => 4,
            0xff => 8,
            n => {
                self.at += 1;
                return Some(u64::from(n));
            }
        };
        let bytes = self.raw.get(self.at + 1..self.at + 1 + width)?;
        self.at += 1 + width;
        let mut le = [0u8; 8];
        le[..width].copy_from_slice(bytes);
        Some(u64::from_le_bytes(le))
    }
}

/// The block's transactions encoded one after another, and where each lies.
pub(super) fn encoded(block: &Block) -> (Vec<u8>, Vec<TxSpan>) {
    let mut buf = Vec::with_capacity(1 << 16);
    let spans = block
        .txdata
        .iter()
        .map(|tx| {
            let start = buf.len();
            tx.consensus_encode(&mut buf)
                .expect("encoding into a Vec does not fail");
            TxSpan::of(tx, start, buf.len() - start)
        })
        .collect();
    (buf, spans)
}
