//! BIP 158 basic block filters, as bitcoind's `getblockfilter` serves them with
//! `-blockfilterindex`: checked before use, and asked whether a block may hold any of a set of
//! scripts. A rescan skips the blocks whose filters say no.
//!
//! A filter is the node's word, like the block hashes it gives: it cannot be proven against a
//! block without reading the block. What is checked is that it is well formed, that its
//! element count fits its length (so no count can make the matcher read past it or overflow),
//! and that consecutive filters chain through their headers. Whatever fails a check is treated
//! as "may hold": the block is read.

use bitcoin::bip158::{BlockFilter, FilterHash, FilterHeader};
use bitcoin::consensus::encode::VarInt;
use bitcoin::consensus::Decodable;
use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, Script, ScriptBuf};

/// Golomb-Rice parameter of the basic filter: each element takes at least P + 1 bits.
const P: u64 = 19;
/// A filter longer than this is not believed: the basic filter of a 4 MB block is a few
/// tens of kilobytes.
pub const MAX_FILTER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("the filter is not hex")]
    NotHex,
    #[error("the filter header is not a 32-byte hex hash")]
    BadHeader,
    #[error("the filter is {0} bytes, over the limit of {MAX_FILTER_BYTES}")]
    TooLarge(usize),
    #[error("the filter has no element count")]
    NoCount,
    #[error("the filter claims {claimed} elements; its {bytes} bytes hold at most {fits}")]
    CountTooLarge {
        claimed: u64,
        bytes: usize,
        fits: u64,
    },
}

/// A basic filter that passed the checks, with the filter header the node gave for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedFilter {
    filter: BlockFilter,
    pub header: FilterHeader,
}

impl CheckedFilter {
    /// From `getblockfilter`'s `filter` and `header` fields.
    pub fn from_hex(filter: &str, header: &str) -> Result<CheckedFilter, FilterError> {
        if filter.len() / 2 > MAX_FILTER_BYTES {
            return Err(FilterError::TooLarge(filter.len() / 2));
        }
        let content = hex::decode(filter).map_err(|_| FilterError::NotHex)?;
        let header = header
            .parse::<FilterHeader>()
            .map_err(|_| FilterError::BadHeader)?;
        CheckedFilter::new(content, header)
    }

    pub fn new(content: Vec<u8>, header: FilterHeader) -> Result<CheckedFilter, FilterError> {
        if content.len() > MAX_FILTER_BYTES {
            return Err(FilterError::TooLarge(content.len()));
        }
        let mut reader = content.as_slice();
        let claimed = VarInt::consensus_decode(&mut reader)
            .map_err(|_| FilterError::NoCount)?
            .0;
        let bits = reader.len() as u64 * 8;
        let fits = bits / (P + 1);
        if claimed > fits {
            return Err(FilterError::CountTooLarge {
                claimed,
                bytes: content.len(),
                fits,
            });
        }
        Ok(CheckedFilter {
            filter: BlockFilter::new(&content),
            header,
        })
    }

    /// Whether this filter chains onto `previous` (BIP 157: the header commits to the
    /// filter's hash and the previous header).
    pub fn follows(&self, previous: &FilterHeader) -> bool {
        self.filter.filter_header(previous) == self.header
    }

    /// False only when the filter proves block `hash` holds none of `scripts`, as an output
    /// or as a coin spent. A filter that ends before the matcher has read as far as the
    /// scripts need says "may hold". (Bytes after what it needs are not looked at.)
    pub fn may_hold(&self, hash: &BlockHash, scripts: &[ScriptBuf]) -> bool {
        let query = scripts.iter().map(|s| s.as_bytes());
        self.filter.match_any(hash, query).unwrap_or(true)
    }

    pub fn content(&self) -> &[u8] {
        &self.filter.content
    }
}

/// The basic filter of `block`, built as Bitcoin Core builds it: every output script but
/// OP_RETURN ones and every script the block's inputs spend (`spent`, in input order, the
/// coinbase's none), empty ones left out, each once.
pub fn basic_filter<'a>(block: &Block, spent: impl IntoIterator<Item = &'a Script>) -> Vec<u8> {
    let mut content = Vec::new();
    let mut writer = bitcoin::bip158::BlockFilterWriter::new(&mut content, block);
    for tx in &block.txdata {
        for out in &tx.output {
            if !out.script_pubkey.is_op_return() {
                writer.add_element(out.script_pubkey.as_bytes());
            }
        }
    }
    for script in spent {
        writer.add_element(script.as_bytes());
    }
    writer.finish().expect("writing to a vector does not fail");
    content
}

/// The header of `content` following `previous` (all zeros before genesis).
pub fn header_of(content: &[u8], previous: &FilterHeader) -> FilterHeader {
    FilterHash::hash(content).filter_header(previous)
}

/// The header before genesis'.
pub fn genesis_previous() -> FilterHeader {
    FilterHeader::all_zeros()
}

#[cfg(test)]
#[path = "blockfilter_tests.rs"]
mod tests;
