//! Access to bitcoind: the `ChainSource` trait the follower uses, its JSON-RPC implementation,
//! and the ZMQ subscriber.

pub mod coins;
pub mod rest;
pub mod rpc;
pub mod zmq_sub;
pub mod zmq_wire;

use std::collections::HashMap;
use std::future::Future;

use bitcoin::{Block, BlockHash, OutPoint, Transaction, Txid};

pub use rpc::RpcClient;

use crate::blockfilter::CheckedFilter;
use crate::senders::SpentCoin;

/// Why a node call failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot reach bitcoind at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("bitcoind is warming up: {0}")]
    WarmingUp(String),
    #[error("bitcoind refused the RPC credentials ({0})")]
    Auth(String),
    /// The cookie is not there (yet): bitcoind writes it when it starts.
    #[error("RPC cookie file {path} does not exist yet ({reason}); is bitcoind running?")]
    Cookie { path: String, reason: String },
    /// The cookie is there but cannot be used: waiting will not help.
    #[error("config key bitcoind.cookie_file = {path:?}: {reason}")]
    CookieUnreadable { path: String, reason: String },
    #[error("bitcoind RPC {method} failed with code {code}: {message}")]
    Rpc {
        method: String,
        code: i64,
        message: String,
    },
    #[error("bitcoind sent a malformed answer to {method}: {reason}")]
    BadResponse { method: String, reason: String },
    /// An answer over our size limit: not read. A batch this large is asked for in parts.
    #[error("bitcoind's answer to {method} is larger than {limit} bytes; not read")]
    TooLarge { method: String, limit: usize },
}

impl NodeError {
    /// An answer from `method` we cannot use, and why.
    pub fn bad(method: &str, reason: impl Into<String>) -> NodeError {
        NodeError::BadResponse {
            method: method.into(),
            reason: reason.into(),
        }
    }

    /// Transient errors are retried with backoff; the others need a person.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            NodeError::Unreachable { .. }
                | NodeError::WarmingUp(_)
                | NodeError::Auth(_)
                | NodeError::Cookie { .. }
        )
    }

    /// The node keeps no block filters: `getblockfilter` unknown (before v0.19) or its index
    /// off (no `-blockfilterindex`).
    pub fn is_no_filter_index(&self) -> bool {
        match self {
            NodeError::Rpc { code: -32601, .. } => true,
            NodeError::Rpc {
                code: -1, message, ..
            } => message.starts_with("Index is not enabled"),
            _ => false,
        }
    }

    /// "Not found" answers (-5 unknown block/tx, -8 height out of range).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NodeError::Rpc { code: -5 | -8, .. })
    }
}

/// What `getblockchaininfo` says that we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub chain: String,
    pub blocks: u32,
    pub best_block_hash: BlockHash,
    pub initial_block_download: bool,
}

/// What `getblockheader` says that we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    pub hash: BlockHash,
    pub height: u32,
    pub prev: Option<BlockHash>,
    pub time: u32,
    /// -1 when the block is not on the active chain.
    pub confirmations: i64,
}

/// A ZMQ publisher bitcoind announces (`getzmqnotifications`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZmqNotification {
    pub kind: String,
    pub address: String,
}

pub type NodeResult<T> = Result<T, NodeError>;

/// The body of `resp` if it is at most `limit` bytes; `None` if it is larger, announced or sent,
/// and then it is not read past the limit.
async fn body_within(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if resp.content_length().unwrap_or(0) > limit as u64 {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Block bodies from this size up are decoded and proven on the blocking pool, off the
/// runtime's thread, which meanwhile serves the other blocks in flight; below it (a regtest
/// block of a hundred transactions) the move costs more than the work.
const OFF_THREAD_FROM: usize = 64 * 1024;

/// `decode` of a body of `len` bytes, on the blocking pool when large; `None` only if the
/// runtime shuts down meanwhile. A panic in it goes on as a panic: it is our bug, not the
/// node's answer.
async fn decode_block<T: Send + 'static>(
    len: usize,
    decode: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if len < OFF_THREAD_FROM {
        return Some(decode());
    }
    match tokio::task::spawn_blocking(decode).await {
        Ok(t) => Some(t),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// Everything the follower asks of a node. Implemented over JSON-RPC for bitcoind; the
/// simulated node serves the same JSON-RPC, so the follower runs unchanged against both.
pub trait ChainSource: Send + Sync + 'static {
    fn chain_info(&self) -> impl Future<Output = NodeResult<ChainInfo>> + Send;
    fn best_block_hash(&self) -> impl Future<Output = NodeResult<BlockHash>> + Send;
    fn block_hash(&self, height: u32) -> impl Future<Output = NodeResult<BlockHash>> + Send;
    fn block_header(&self, hash: BlockHash) -> impl Future<Output = NodeResult<HeaderInfo>> + Send;
    /// The headers of blocks `hashes`, in that order, asked in one batch.
    fn block_headers(
        &self,
        hashes: &[BlockHash],
    ) -> impl Future<Output = NodeResult<Vec<HeaderInfo>>> + Send;
    fn block(&self, hash: BlockHash) -> impl Future<Output = NodeResult<Block>> + Send;
    /// The hashes of heights `from..from + count` of the active chain, asked in one batch.
    fn block_hashes(
        &self,
        from: u32,
        count: u32,
    ) -> impl Future<Output = NodeResult<Vec<BlockHash>>> + Send;
    /// The BIP 158 basic filters of blocks `hashes` (`getblockfilter`), checked, asked in one
    /// batch. An entry fails where the node has no filter for its block: a node started
    /// without `-blockfilterindex` fails them all with code -1.
    fn block_filters(
        &self,
        hashes: &[BlockHash],
    ) -> impl Future<Output = NodeResult<Vec<NodeResult<CheckedFilter>>>> + Send;
    /// Mempool txids and the mempool sequence they are valid at.
    fn raw_mempool(&self) -> impl Future<Output = NodeResult<(Vec<Txid>, u64)>> + Send;
    fn mempool_transaction(
        &self,
        txid: Txid,
    ) -> impl Future<Output = NodeResult<Transaction>> + Send;
    /// The mempool transactions `txids`, in that order, each proven by its txid, asked for in
    /// JSON-RPC batches; `None` for one the node does not hold (mined or replaced since).
    fn mempool_transactions(
        &self,
        txids: &[Txid],
    ) -> impl Future<Output = NodeResult<Vec<Option<Transaction>>>> + Send;
    fn zmq_notifications(&self) -> impl Future<Output = NodeResult<Vec<ZmqNotification>>> + Send;
    /// Whether the node's mempool holds `txid` now (`getmempoolentry`): unlike
    /// `getrawtransaction`, never true for a confirmed transaction on a node with `-txindex`.
    fn in_mempool(&self, txid: Txid) -> impl Future<Output = NodeResult<bool>> + Send;
    /// Which mempool transaction spends any of `outpoints` (`gettxspendingprevout`).
    fn mempool_spender(
        &self,
        outpoints: &[OutPoint],
    ) -> impl Future<Output = NodeResult<Option<Txid>>> + Send;
    /// The coins spent by each input of the transactions `txids` of block `hash`, in input
    /// order (`getrawtransaction TXID 2 HASH` for a few, `getblock HASH 3` for many: both read
    /// the block's undo data, so no `-txindex` is needed).
    /// A txid the block does not hold is absent from the answer.
    fn block_spent_coins(
        &self,
        hash: BlockHash,
        txids: &[Txid],
    ) -> impl Future<Output = NodeResult<HashMap<Txid, Vec<SpentCoin>>>> + Send;
    /// The coins `outpoints` name, as a mempool transaction spending them sees them: from the
    /// chainstate, where a coin spent only in the mempool is still unspent (`gettxout … false`),
    /// else from the mempool transaction that created it; `None` where neither holds it.
    fn spent_coins(
        &self,
        outpoints: &[OutPoint],
    ) -> impl Future<Output = NodeResult<Vec<Option<SpentCoin>>>> + Send;
}
