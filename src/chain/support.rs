//! Small helpers of the follower: caches of ZMQ bodies and of recent spends, and progress reports.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bitcoin::{Block, BlockHash, OutPoint, Transaction, Txid};

/// Bodies that arrived over ZMQ, so RPC need not fetch them again.
#[derive(Default)]
pub struct BodyCache {
    pub txs: HashMap<Txid, Transaction>,
    tx_order: VecDeque<Txid>,
    blocks: HashMap<BlockHash, Block>,
    block_order: VecDeque<BlockHash>,
}

impl BodyCache {
    const MAX_TXS: usize = 20_000;
    const MAX_BLOCKS: usize = 8;

    /// Keeps a relayed transaction body under the txid it hashes to; used only for txids the
    /// node lists itself. The first body kept for a txid stays.
    pub fn add_tx(&mut self, tx: Transaction) {
        let txid = tx.compute_txid();
        if let Err(e) = crate::proof::check_amounts(&tx, txid) {
            tracing::warn!(%txid, error = %e, "refused a ZMQ rawtx body");
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(v) = self.txs.entry(txid) {
            v.insert(tx);
            self.tx_order.push_back(txid);
            if self.tx_order.len() > Self::MAX_TXS {
                let old = self.tx_order.pop_front().expect("non-empty");
                self.txs.remove(&old);
            }
        }
    }

    /// Keeps a relayed block body (proven on arrival: its transactions are the ones its header
    /// commits to); the first body kept for a hash stays, so a later copy cannot replace it.
    /// The follower uses a body only under the hash the node names.
    pub fn add_block(&mut self, block: crate::proof::RelayedBlock) {
        let block = block.into_block();
        let hash = block.block_hash();
        if let std::collections::hash_map::Entry::Vacant(v) = self.blocks.entry(hash) {
            v.insert(block);
            self.block_order.push_back(hash);
            if self.block_order.len() > Self::MAX_BLOCKS {
                let old = self.block_order.pop_front().expect("non-empty");
                self.blocks.remove(&old);
            }
        }
    }
}

impl BodyCache {
    /// The relayed body of block `hash`, if one was kept.
    pub fn block(&self, hash: &BlockHash) -> Option<&Block> {
        self.blocks.get(hash)
    }

    /// Whether a kept block holds `txid` (it was mined, not forged, when the node lost it).
    pub fn in_recent_block(&self, txid: Txid) -> bool {
        self.blocks
            .values()
            .any(|b| b.txdata.iter().any(|t| t.compute_txid() == txid))
    }
}

/// Which transaction of a recently connected block spent an outpoint: the evidence for
/// `tx.dropped` with reason `conflict`.
#[derive(Default)]
pub struct RecentSpends {
    by_outpoint: HashMap<OutPoint, Txid>,
    blocks: VecDeque<(BlockHash, Vec<OutPoint>)>,
}

impl RecentSpends {
    const BLOCKS: usize = 12;

    pub fn add_block(&mut self, hash: BlockHash, block: &Block) {
        let mut ops = Vec::new();
        for tx in block.txdata.iter().filter(|t| !t.is_coinbase()) {
            let txid = tx.compute_txid();
            for i in &tx.input {
                self.by_outpoint.insert(i.previous_output, txid);
                ops.push(i.previous_output);
            }
        }
        self.blocks.push_back((hash, ops));
        if self.blocks.len() > Self::BLOCKS {
            let (_, old) = self.blocks.pop_front().expect("non-empty");
            for op in old {
                self.by_outpoint.remove(&op);
            }
        }
    }

    pub fn remove_block(&mut self, hash: BlockHash) {
        if let Some(pos) = self.blocks.iter().position(|(h, _)| *h == hash) {
            let (_, ops) = self.blocks.remove(pos).expect("present");
            for op in ops {
                self.by_outpoint.remove(&op);
            }
        }
    }

    /// The confirmed transaction that spent one of `spends`, if any.
    pub fn conflict(&self, spends: &[OutPoint]) -> Option<Txid> {
        spends.iter().find_map(|o| self.by_outpoint.get(o).copied())
    }
}

/// Progress of a long catch-up, logged every few seconds with rate and ETA.
pub struct Progress {
    start: u32,
    end: u32,
    began: Instant,
    last_report: Instant,
}

impl Progress {
    pub fn new(start: u32, end: u32) -> Progress {
        let now = Instant::now();
        if end >= start + 10 {
            tracing::info!(
                from = start,
                to = end,
                blocks = end - start + 1,
                "catching up"
            );
        }
        Progress {
            start,
            end,
            began: now,
            last_report: now,
        }
    }

    pub fn tick(&mut self, height: u32) {
        if self.last_report.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_report = Instant::now();
        // A rescan's tip moves on while it runs, and a reorg moves it back: `height` may be
        // past `end` or before `start`.
        let done = (height.saturating_sub(self.start) + 1) as f64;
        let rate = done / self.began.elapsed().as_secs_f64().max(0.001);
        let eta = self.end.saturating_sub(height) as f64 / rate.max(0.001);
        tracing::info!(
            height,
            target = self.end,
            rate = format!("{rate:.1} blocks/s"),
            eta = format!("{eta:.0}s"),
            "catch-up progress"
        );
    }

    pub fn done(&self) {
        if self.end >= self.start + 10 {
            tracing::info!(
                height = self.end,
                secs = self.began.elapsed().as_secs_f64(),
                "caught up"
            );
        }
    }
}
