//! The simulated node's chain and mempool, and the ZMQ messages bitcoind would publish for each
//! change, in bitcoind's order and with its per-topic counters.

use std::collections::{HashMap, HashSet};

use bitcoin::consensus::serialize;
use bitcoin::{Block, BlockHash, OutPoint, Transaction, TxOut, Txid};

use super::pool::Mempool;
use crate::node::zmq_wire::{hash_body, sequence_body, SequenceEvent};

pub const TOPICS: [&str; 5] = ["hashblock", "hashtx", "rawblock", "rawtx", "sequence"];

/// One message as published: topic, body, counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub topic: &'static str,
    pub body: Vec<u8>,
    pub counter: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimError {
    #[error("Block not found")]
    BlockNotFound,
    #[error("Block height out of range")]
    HeightOutOfRange,
    #[error("No such mempool transaction. Use -txindex or provide a block hash to enable blockchain transaction queries. Use gettransaction for wallet transactions.")]
    TxNotFound,
    #[error("block {0} does not connect to a known block")]
    Orphan(BlockHash),
    #[error("transaction {0} is already in the mempool")]
    Duplicate(Txid),
}

/// An output of the active chain, as the undo data and the chainstate know it.
#[derive(Debug, Clone)]
pub struct ChainCoin {
    pub output: TxOut,
    pub height: u32,
    pub coinbase: bool,
    /// Whether a block of the active chain spends it (then `gettxout` does not find it).
    pub spent: bool,
}

#[derive(Clone)]
struct Entry {
    block: Block,
    height: u32,
    /// Arrival order, to break ties between equal-height branches as bitcoind does.
    order: usize,
}

#[derive(Clone)]
pub struct SimChain {
    blocks: HashMap<BlockHash, Entry>,
    /// The active chain; index = height.
    active: Vec<BlockHash>,
    invalid: HashSet<BlockHash>,
    mempool: Mempool,
    /// Where each transaction of the active chain is (height, position), and the height of the
    /// block of the active chain spending each outpoint: what `-txindex` and the chainstate
    /// answer without reading every block.
    located: HashMap<Txid, (u32, u32)>,
    spent_at: HashMap<OutPoint, u32>,
    /// `getrawmempool`'s `mempool_sequence`: bumped on every add and every removal.
    pub mempool_sequence: u64,
    counters: HashMap<&'static str, u32>,
    outbox: Vec<Published>,
}

impl SimChain {
    /// A fresh regtest chain. Like bitcoind, connecting genesis at start publishes counter 0
    /// on the tx and sequence topics (but not on the block topics: it is still in IBD).
    pub fn new() -> SimChain {
        let genesis = bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Regtest);
        let hash = genesis.block_hash();
        let mut c = SimChain {
            blocks: HashMap::new(),
            active: vec![hash],
            invalid: HashSet::new(),
            mempool: Mempool::default(),
            mempool_sequence: 1,
            located: HashMap::new(),
            spent_at: HashMap::new(),
            counters: HashMap::new(),
            outbox: vec![],
        };
        c.publish_txs(&genesis);
        c.publish(
            "sequence",
            sequence_body(&SequenceEvent::BlockConnected(hash)),
        );
        c.index_block(&genesis, 0);
        c.blocks.insert(
            hash,
            Entry {
                block: genesis,
                height: 0,
                order: 0,
            },
        );
        c
    }

    /// A restart: counters and the mempool sequence start again; the chain stays.
    pub fn restart(&mut self) {
        self.counters.clear();
        self.mempool_sequence = 1;
        self.outbox.clear();
    }

    pub fn take_published(&mut self) -> Vec<Published> {
        std::mem::take(&mut self.outbox)
    }

    pub fn publish_raw(&mut self, topic: &'static str, body: Vec<u8>) {
        self.publish(topic, body);
    }

    fn publish(&mut self, topic: &'static str, body: Vec<u8>) {
        let c = self.counters.entry(topic).or_insert(0);
        self.outbox.push(Published {
            topic,
            body,
            counter: *c,
        });
        *c = c.wrapping_add(1);
    }

    fn publish_tx(&mut self, tx: &Transaction) {
        self.publish("hashtx", hash_body(tx.compute_txid()));
        self.publish("rawtx", serialize(tx));
    }

    fn publish_txs(&mut self, block: &Block) {
        for tx in &block.txdata {
            self.publish_tx(tx);
        }
    }

    pub fn height(&self) -> u32 {
        (self.active.len() - 1) as u32
    }

    pub fn tip(&self) -> BlockHash {
        *self.active.last().expect("genesis")
    }

    pub fn block_hash(&self, height: u32) -> Result<BlockHash, SimError> {
        self.active
            .get(height as usize)
            .copied()
            .ok_or(SimError::HeightOutOfRange)
    }

    pub fn block(&self, hash: &BlockHash) -> Result<(&Block, u32), SimError> {
        self.blocks
            .get(hash)
            .map(|e| (&e.block, e.height))
            .ok_or(SimError::BlockNotFound)
    }

    pub fn is_active(&self, hash: &BlockHash) -> bool {
        self.blocks
            .get(hash)
            .is_some_and(|e| self.active.get(e.height as usize) == Some(hash))
    }

    pub fn mempool(&self) -> &Mempool {
        &self.mempool
    }

    /// A transaction of the active chain (what `-txindex` finds).
    pub fn confirmed_tx(&self, txid: &Txid) -> Option<Transaction> {
        self.confirmed(txid).map(|(_, tx)| tx)
    }

    /// A transaction of the active chain and the block holding it.
    pub fn confirmed(&self, txid: &Txid) -> Option<(BlockHash, Transaction)> {
        let (hash, tx, _) = self.locate(txid)?;
        Some((hash, tx.clone()))
    }

    /// A transaction of the active chain, its block and height.
    fn locate(&self, txid: &Txid) -> Option<(BlockHash, &Transaction, u32)> {
        let &(height, at) = self.located.get(txid)?;
        let hash = self.active[height as usize];
        let tx = self.blocks[&hash].block.txdata.get(at as usize)?;
        Some((hash, tx, height))
    }

    /// An output created in the active chain, whatever spent it since.
    pub fn chain_coin(&self, outpoint: &OutPoint) -> Option<ChainCoin> {
        let (_, tx, height) = self.locate(&outpoint.txid)?;
        Some(ChainCoin {
            output: tx.output.get(outpoint.vout as usize)?.clone(),
            height,
            coinbase: tx.is_coinbase(),
            spent: self.spent_at.contains_key(outpoint),
        })
    }

    /// Records where the transactions of `block`, now at `height` of the active chain, are
    /// and what they spend.
    fn index_block(&mut self, block: &Block, height: u32) {
        for (at, tx) in block.txdata.iter().enumerate() {
            self.located
                .entry(tx.compute_txid())
                .or_insert((height, at as u32));
            if !tx.is_coinbase() {
                for i in &tx.input {
                    self.spent_at.entry(i.previous_output).or_insert(height);
                }
            }
        }
    }

    /// Forgets what `index_block` recorded for the block at `height`, as it leaves the active
    /// chain.
    fn unindex_block(&mut self, block: &Block, height: u32) {
        for tx in &block.txdata {
            let txid = tx.compute_txid();
            if self.located.get(&txid).is_some_and(|l| l.0 == height) {
                self.located.remove(&txid);
            }
            for i in &tx.input {
                if self.spent_at.get(&i.previous_output) == Some(&height) {
                    self.spent_at.remove(&i.previous_output);
                }
            }
        }
    }

    pub fn mempool_tx(&self, txid: &Txid) -> Result<&Transaction, SimError> {
        self.mempool.get(txid).ok_or(SimError::TxNotFound)
    }

    /// Median of the last eleven block times, as bitcoind computes `mediantime`.
    pub fn median_time(&self, hash: &BlockHash) -> u32 {
        let mut times = Vec::new();
        let mut h = *hash;
        while let Some(e) = self.blocks.get(&h) {
            times.push(e.block.header.time);
            if times.len() == 11 || e.height == 0 {
                break;
            }
            h = e.block.header.prev_blockhash;
        }
        times.sort_unstable();
        times[times.len() / 2]
    }

    /// Accepts a transaction into the mempool: hashtx, rawtx, then sequence A.
    pub fn accept_tx(&mut self, tx: Transaction) -> Result<Txid, SimError> {
        let txid = tx.compute_txid();
        if self.mempool.contains(&txid) {
            return Err(SimError::Duplicate(txid));
        }
        // A replacement: what it conflicts with leaves first (R), then it enters (A).
        let replaced = self
            .mempool
            .spenders_of(tx.input.iter().map(|i| &i.previous_output));
        for t in replaced {
            self.remove_tx(t);
        }
        self.publish_tx(&tx);
        let seq = self.mempool_sequence;
        self.mempool_sequence += 1;
        self.publish(
            "sequence",
            sequence_body(&SequenceEvent::TxAdded(txid, seq)),
        );
        self.mempool.push(tx);
        Ok(txid)
    }

    /// Removes a mempool transaction (and its descendants) for a reason other than a block:
    /// sequence R for each.
    pub fn remove_tx(&mut self, txid: Txid) -> Vec<Txid> {
        let mut removed = vec![];
        let mut queue = vec![txid];
        while let Some(t) = queue.pop() {
            let children = self.mempool.children(&t);
            if self.mempool.remove(&t).is_none() {
                continue;
            }
            let seq = self.mempool_sequence;
            self.mempool_sequence += 1;
            self.publish("sequence", sequence_body(&SequenceEvent::TxRemoved(t, seq)));
            removed.push(t);
            queue.extend(children);
        }
        removed
    }

    /// Adds a block (mined here or submitted) and moves to the best valid chain.
    pub fn add_block(&mut self, block: Block) -> Result<BlockHash, SimError> {
        let hash = block.block_hash();
        if self.blocks.contains_key(&hash) {
            return Ok(hash);
        }
        let parent = self
            .blocks
            .get(&block.header.prev_blockhash)
            .ok_or(SimError::Orphan(hash))?;
        let height = parent.height + 1;
        let order = self.blocks.len();
        self.blocks.insert(
            hash,
            Entry {
                block,
                height,
                order,
            },
        );
        self.activate_best_chain();
        Ok(hash)
    }

    pub fn invalidate(&mut self, hash: BlockHash) -> Result<(), SimError> {
        self.blocks.get(&hash).ok_or(SimError::BlockNotFound)?;
        self.invalid.insert(hash);
        self.activate_best_chain();
        Ok(())
    }

    pub fn reconsider(&mut self, hash: BlockHash) -> Result<(), SimError> {
        self.blocks.get(&hash).ok_or(SimError::BlockNotFound)?;
        self.invalid.remove(&hash);
        self.activate_best_chain();
        Ok(())
    }

    fn has_invalid_ancestor(&self, mut hash: BlockHash) -> bool {
        loop {
            if self.invalid.contains(&hash) {
                return true;
            }
            match self.blocks.get(&hash) {
                Some(e) if e.height > 0 => hash = e.block.header.prev_blockhash,
                _ => return false,
            }
        }
    }

    /// The highest valid block; on a tie the active tip, then the one received first.
    fn best_valid_tip(&self) -> BlockHash {
        let tip = self.tip();
        self.blocks
            .iter()
            .filter(|(h, _)| self.invalid.is_empty() || !self.has_invalid_ancestor(**h))
            .max_by_key(|(h, e)| (e.height, **h == tip, std::cmp::Reverse(e.order)))
            .map(|(h, _)| *h)
            .unwrap_or(tip)
    }

    fn activate_best_chain(&mut self) {
        let target = self.best_valid_tip();
        if target == self.tip() {
            return;
        }
        // The branch from target back to the active chain.
        let mut branch = vec![];
        let mut h = target;
        while !self.is_active(&h) {
            branch.push(h);
            h = self.blocks[&h].block.header.prev_blockhash;
        }
        let fork_height = self.blocks[&h].height;
        let mut returned: Vec<Transaction> = vec![];
        while self.height() > fork_height {
            let height = self.height();
            let hash = self.active.pop().expect("above fork");
            let block = self.blocks[&hash].block.clone();
            self.unindex_block(&block, height);
            self.publish_txs(&block);
            self.publish(
                "sequence",
                sequence_body(&SequenceEvent::BlockDisconnected(hash)),
            );
            // Transactions of disconnected blocks go back to the mempool, oldest block first.
            let mut txs: Vec<Transaction> = block
                .txdata
                .into_iter()
                .filter(|t| !t.is_coinbase())
                .collect();
            txs.append(&mut returned);
            returned = txs;
        }
        for hash in branch.into_iter().rev() {
            self.connect(hash, &mut returned);
        }
        for tx in returned {
            let _ = self.accept_tx(tx);
        }
    }

    fn connect(&mut self, hash: BlockHash, returned: &mut Vec<Transaction>) {
        let block = self.blocks[&hash].block.clone();
        let in_block: HashSet<Txid> = block.txdata.iter().map(|t| t.compute_txid()).collect();
        returned.retain(|t| !in_block.contains(&t.compute_txid()));
        // Conflicts leave with R before the block is announced; included ones leave silently.
        let conflicts: Vec<Txid> = self
            .mempool
            .spenders_of(
                block
                    .txdata
                    .iter()
                    .flat_map(|t| t.input.iter().map(|i| &i.previous_output)),
            )
            .into_iter()
            .filter(|t| !in_block.contains(t))
            .collect();
        for t in conflicts {
            self.remove_tx(t);
        }
        for t in &in_block {
            if self.mempool.remove(t).is_some() {
                self.mempool_sequence += 1;
            }
        }
        self.index_block(&block, self.height() + 1);
        self.active.push(hash);
        self.publish_txs(&block);
        self.publish(
            "sequence",
            sequence_body(&SequenceEvent::BlockConnected(hash)),
        );
        self.publish("hashblock", hash_body(hash));
        self.publish("rawblock", serialize(&block));
    }
}

impl Default for SimChain {
    fn default() -> Self {
        SimChain::new()
    }
}
