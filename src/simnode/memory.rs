//! The simulated node as a `ChainSource` of its own, answering from its state with no RPC or
//! ZMQ sockets in between: the follower's core runs against it in unit tests, with the same
//! chain, mempool and reorg helpers the socket-served node has.

use std::collections::HashMap;

use bitcoin::{Block, BlockHash, OutPoint, Transaction, TxOut, Txid};

use super::{SimError, SimNode, State};
use crate::blockfilter::CheckedFilter;
use crate::node::zmq_wire::{decode_body, ZmqMessage};
use crate::node::{ChainInfo, ChainSource, HeaderInfo, NodeError, NodeResult, ZmqNotification};
use crate::senders::SpentCoin;

fn rpc_error(method: &str, e: SimError) -> NodeError {
    let code = match e {
        SimError::HeightOutOfRange => -8,
        SimError::BlockNotFound | SimError::TxNotFound => -5,
        SimError::Orphan(_) | SimError::Duplicate(_) => -25,
    };
    NodeError::Rpc {
        method: method.into(),
        code,
        message: e.to_string(),
    }
}

impl SimNode {
    /// Answers one call from the state, as bitcoind would: refused while stopped, -28 while
    /// warming up.
    fn answer<T>(
        &self,
        method: &str,
        f: impl FnOnce(&mut State) -> Result<T, SimError>,
    ) -> NodeResult<T> {
        let mut s = self.lock();
        *s.calls.entry(method.to_string()).or_default() += 1;
        if s.down {
            return Err(NodeError::Unreachable {
                url: "memory".into(),
                reason: "the simulated node is stopped".into(),
            });
        }
        if s.warmup_calls > 0 {
            s.warmup_calls -= 1;
            return Err(NodeError::WarmingUp("Loading block index…".into()));
        }
        let answer = f(&mut s).map_err(|e| rpc_error(method, e));
        let asked = s.calls[method];
        let hook = match &s.on_call {
            Some((m, at, _)) if m == method && asked >= *at => s.on_call.take(),
            _ => None,
        };
        drop(s);
        if let Some((.., hook)) = hook {
            hook(self);
        }
        answer
    }

    /// In memory: once `method` has been answered `calls` times in all, `hook` is done to the
    /// node, right after that answer.
    pub fn on_call(&self, method: &str, calls: u32, hook: impl FnOnce(&SimNode) + Send + 'static) {
        self.lock().on_call = Some((method.to_string(), calls, Box::new(hook)));
    }

    /// Another in-memory node starting from this one's chain, mempool and wallet (building
    /// the 101 blocks a funded wallet needs once, not in every test).
    pub fn snapshot(&self) -> SimNode {
        let node = SimNode::in_memory();
        {
            let from = self.lock();
            let mut to = node.lock();
            to.chain = from.chain.clone();
            to.chain.take_published();
            to.clock = from.clock;
            to.spent = from.spent.clone();
            to.change = from.change.clone();
            to.txindex = from.txindex;
            to.block_filters = from.block_filters.clone();
        }
        node
    }

    /// Stops (`true`) or starts answering again, keeping the chain, counters and cookie.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// The ZMQ messages published since the last call, decoded as the subscriber would.
    pub fn take_zmq(&self) -> Vec<ZmqMessage> {
        let published = std::mem::take(self.lock().log.get_or_insert_with(Vec::new));
        published
            .into_iter()
            .map(|p| ZmqMessage {
                topic: p.topic.to_string(),
                body: decode_body(p.topic, &p.body)
                    .expect("the simulated node publishes valid bodies"),
                counter: p.counter,
            })
            .collect()
    }
}

fn header(s: &State, hash: BlockHash) -> Result<HeaderInfo, SimError> {
    let (block, height) = s.chain.block(&hash)?;
    let confirmations = if s.chain.is_active(&hash) {
        (s.chain.height() - height + 1) as i64
    } else {
        -1
    };
    Ok(HeaderInfo {
        hash,
        height,
        prev: (height > 0).then_some(block.header.prev_blockhash),
        time: block.header.time,
        confirmations,
    })
}

fn spent(outpoint: OutPoint, output: &TxOut) -> SpentCoin {
    SpentCoin {
        outpoint,
        script: output.script_pubkey.clone(),
        amount: output.value,
    }
}

impl ChainSource for SimNode {
    async fn chain_info(&self) -> NodeResult<ChainInfo> {
        self.answer("getblockchaininfo", |s| {
            Ok(ChainInfo {
                chain: "regtest".into(),
                blocks: s.chain.height(),
                best_block_hash: s.chain.tip(),
                initial_block_download: s.chain.height() == 0,
            })
        })
    }

    async fn best_block_hash(&self) -> NodeResult<BlockHash> {
        self.answer("getbestblockhash", |s| Ok(s.chain.tip()))
    }

    async fn block_hash(&self, height: u32) -> NodeResult<BlockHash> {
        self.answer("getblockhash", |s| s.chain.block_hash(height))
    }

    async fn block_header(&self, hash: BlockHash) -> NodeResult<HeaderInfo> {
        self.answer("getblockheader", |s| header(s, hash))
    }

    async fn block_headers(&self, hashes: &[BlockHash]) -> NodeResult<Vec<HeaderInfo>> {
        self.answer("getblockheader", |s| {
            hashes.iter().map(|h| header(s, *h)).collect()
        })
    }

    async fn block(&self, hash: BlockHash) -> NodeResult<Block> {
        self.answer("getblock", |s| Ok(s.chain.block(&hash)?.0.clone()))
    }

    async fn block_hashes(&self, from: u32, count: u32) -> NodeResult<Vec<BlockHash>> {
        self.answer("getblockhash", |s| {
            (from..from.saturating_add(count))
                .map(|h| s.chain.block_hash(h))
                .collect()
        })
    }

    async fn block_filters(
        &self,
        hashes: &[BlockHash],
    ) -> NodeResult<Vec<NodeResult<CheckedFilter>>> {
        {
            let mut s = self.lock();
            if s.filter_answer_limit.is_some_and(|n| hashes.len() > n) {
                *s.calls.entry("getblockfilter".into()).or_default() += 1;
                return Err(NodeError::TooLarge {
                    method: "getblockfilter (batch)".into(),
                    limit: crate::node::rpc::MAX_RPC_RESPONSE,
                });
            }
            if s.broken_filter_calls > 0 {
                s.broken_filter_calls -= 1;
                *s.calls.entry("getblockfilter".into()).or_default() += 1;
                return Err(NodeError::bad(
                    "getblockfilter (batch)",
                    "HTTP 403, not a JSON list",
                ));
            }
        }
        self.answer("getblockfilter", |s| {
            Ok(hashes
                .iter()
                .map(|h| {
                    let (mut content, header) =
                        super::filters::filter(s, *h).map_err(|e| NodeError::Rpc {
                            method: "getblockfilter".into(),
                            code: e.code,
                            message: e.message,
                        })?;
                    if s.forged_filter == Some(*h) {
                        content = vec![0];
                    }
                    CheckedFilter::new(content, header)
                        .map_err(|e| NodeError::bad("getblockfilter", e.to_string()))
                })
                .collect())
        })
    }

    async fn raw_mempool(&self) -> NodeResult<(Vec<Txid>, u64)> {
        self.answer("getrawmempool", |s| {
            let txids = s.chain.mempool().txids().collect();
            Ok((txids, s.chain.mempool_sequence))
        })
    }

    async fn mempool_transaction(&self, txid: Txid) -> NodeResult<Transaction> {
        self.answer("getrawtransaction", |s| match s.chain.mempool_tx(&txid) {
            Ok(tx) => Ok(tx.clone()),
            Err(e) if !s.txindex => Err(e),
            Err(e) => s.chain.confirmed_tx(&txid).ok_or(e),
        })
    }

    async fn mempool_transactions(&self, txids: &[Txid]) -> NodeResult<Vec<Option<Transaction>>> {
        self.answer("getrawtransaction", |s| {
            Ok(txids
                .iter()
                .map(|t| s.chain.mempool_tx(t).ok().cloned())
                .collect())
        })
    }

    async fn zmq_notifications(&self) -> NodeResult<Vec<ZmqNotification>> {
        self.answer("getzmqnotifications", |_| Ok(vec![]))
    }

    async fn in_mempool(&self, txid: Txid) -> NodeResult<bool> {
        self.answer("getmempoolentry", |s| Ok(s.chain.mempool_tx(&txid).is_ok()))
    }

    async fn block_spent_coins(
        &self,
        hash: BlockHash,
        txids: &[Txid],
    ) -> NodeResult<HashMap<Txid, Vec<SpentCoin>>> {
        self.answer("getblock", |s| {
            let (block, _) = s.chain.block(&hash)?;
            let mut out = HashMap::new();
            for tx in block.txdata.iter().filter(|t| !t.is_coinbase()) {
                let txid = tx.compute_txid();
                if !txids.contains(&txid) {
                    continue;
                }
                let coins: Option<Vec<SpentCoin>> = tx
                    .input
                    .iter()
                    .map(|i| {
                        let c = s.chain.chain_coin(&i.previous_output)?;
                        Some(spent(i.previous_output, &c.output))
                    })
                    .collect();
                out.insert(txid, coins.ok_or(SimError::TxNotFound)?);
            }
            Ok(out)
        })
    }

    async fn spent_coins(&self, outpoints: &[OutPoint]) -> NodeResult<Vec<Option<SpentCoin>>> {
        self.answer("gettxout", |s| {
            Ok(outpoints
                .iter()
                .map(|o| match s.chain.chain_coin(o) {
                    Some(c) if !c.spent => Some(spent(*o, &c.output)),
                    _ => {
                        let parent = s.chain.mempool_tx(&o.txid).ok()?;
                        Some(spent(*o, parent.output.get(o.vout as usize)?))
                    }
                })
                .collect())
        })
    }

    async fn mempool_spender(&self, outpoints: &[OutPoint]) -> NodeResult<Option<Txid>> {
        self.answer("gettxspendingprevout", |s| {
            Ok(s.chain
                .mempool()
                .spenders_of(outpoints.iter())
                .first()
                .copied())
        })
    }
}
