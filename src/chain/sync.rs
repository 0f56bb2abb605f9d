//! The consumer's side of following the best chain: each change the source tells is matched,
//! tracked and committed (with its block events and reorg alert) before the next is asked for.

use bitcoin::{Block, BlockHash};
use serde_json::json;

use super::source::ChainChange;
use super::{fields, labelled, FollowError, Follower};
use crate::event::{self, BlockRef, TipRef};
use crate::health::Following;
use crate::node::ChainSource;
use crate::store::ChainStore;
use crate::store::StoredBlock;
use crate::tip::TipChanges;

impl<S: ChainSource, St: ChainStore> Follower<S, St> {
    /// Applies what the node did until our chain is its best chain.
    pub async fn sync_chain(&mut self) -> Result<(), FollowError> {
        loop {
            let change = match self.source.next_change(&mut self.store).await {
                Ok(Some(change)) => change,
                Ok(None) => break,
                Err(e) => {
                    self.source.reset();
                    return Err(e.into());
                }
            };
            let tip_after = change.tip_height_after();
            let applied = self.apply_change(change).await;
            if applied.is_err() {
                // What the store holds is the truth: the next try plans afresh from it and the
                // node's best chain then, not from a plan the node may have left meanwhile.
                self.source.reset();
            }
            applied?;
            if let Some(height) = tip_after {
                self.report_position(height);
            }
        }
        // At the node's tip: the source just found our tip to be its best block.
        if let Some(height) = self.source.node_height() {
            self.report_position(height);
        }
        self.health.set_following(Following::AtTip);
        Ok(())
    }

    async fn apply_change(&mut self, change: ChainChange) -> Result<(), FollowError> {
        match change {
            ChainChange::Base(b) => {
                self.forget_tip();
                self.store.init_tip(b)?;
                tracing::info!(
                    height = b.height,
                    "following the chain from here (first run, or below a fork deeper than the blocks kept)"
                );
                Ok(())
            }
            ChainChange::Reorg {
                depth,
                fork_height,
                old_tip,
                best,
                best_height,
            } => self.reorg(depth, fork_height, old_tip, best, best_height),
            ChainChange::TooDeep {
                tip,
                lowest,
                best,
                best_height,
            } => self.too_deep(tip, lowest, best, best_height),
            ChainChange::Disconnected { block, new_tip } => self.disconnect(block, new_tip),
            ChainChange::Connected { block, at } => self.connect(&block, at).await,
        }
    }

    /// Where we stand for `/health` and the metrics, with our tip at `tip` (known from the
    /// step just applied: no store read per block).
    fn report_position(&self, tip: u32) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.metrics.tip_height.store(tip as i64, relaxed);
        let node = self.source.node_height().unwrap_or(tip);
        self.metrics.node_height.store(node as i64, relaxed);
        // One block behind is the normal moment before a new block is connected.
        if tip + 1 < node {
            self.health.set_following(Following::Behind {
                tip: tip as i64,
                node: node as i64,
            });
        }
    }

    fn reorg(
        &mut self,
        depth: u32,
        fork_height: Option<u32>,
        tip: StoredBlock,
        best: BlockHash,
        best_height: u32,
    ) -> Result<(), FollowError> {
        tracing::warn!(depth, old_tip = %tip.hash, new_tip = %best, "reorg");
        if depth < self.opts.alert_reorg_depth {
            return Ok(());
        }
        let fork = fork_height.map(|h| json!(h)).unwrap_or(json!(null));
        let f = fields(json!({
            "depth": depth,
            "fork_height": fork,
            "old_tip": { "hash": tip.hash.to_string(), "height": tip.height },
            "new_tip": { "hash": best.to_string(), "height": best_height },
        }));
        self.commit_other(event::ALERT_REORG, &format!("{}|{best}", tip.hash), f)
    }

    fn too_deep(
        &mut self,
        tip: StoredBlock,
        lowest: StoredBlock,
        best: BlockHash,
        best_height: u32,
    ) -> Result<(), FollowError> {
        let kept = tip.height - lowest.height + 1;
        tracing::error!(
            kept,
            lowest = lowest.height,
            "reorg deeper than the blocks kept; events of older blocks cannot be corrected"
        );
        let f = fields(json!({
            "error": format!("reorg deeper than the {kept} blocks kept (finality_depth): the chains fork below height {}", lowest.height),
            "depth": null,
            "fork_height": null,
            "old_tip": { "hash": tip.hash.to_string(), "height": tip.height },
            "new_tip": { "hash": best.to_string(), "height": best_height },
        }));
        self.commit_other(
            event::ALERT_REORG,
            &format!("{}|{best}|too-deep", tip.hash),
            f,
        )
    }

    async fn connect(&mut self, block: &Block, at: BlockRef) -> Result<(), FollowError> {
        let mut step = self.tracker.connect_block(&self.index, block, at);
        self.fill_block_senders(&mut step, block, at, None).await?;
        let mut changes = labelled(&self.index, step)?;
        changes.tip =
            TipChanges::connect(at, block.header.prev_blockhash, block.txdata.len() as u32);
        if self.store.wants(event::BLOCK_CONNECTED) {
            let e = self.block_event(
                event::BLOCK_CONNECTED,
                at,
                block.header.prev_blockhash,
                block.txdata.len(),
            )?;
            changes.events.insert(0, e);
        }
        self.commit(changes)?;
        self.recent_spends.add_block(at.hash, block);
        for tx in &block.txdata {
            self.mempool.forget(&tx.compute_txid());
        }
        Ok(())
    }

    fn block_event(
        &self,
        kind: &'static str,
        at: BlockRef,
        prev: BlockHash,
        tx_count: usize,
    ) -> Result<event::NewEvent, FollowError> {
        // A block that comes back after a reorg is announced anew, with a new id.
        let disconnects = self.store.disconnect_count(at.hash)?;
        let f = fields(json!({
            "hash": at.hash.to_string(),
            "height": at.height,
            "previous_hash": prev.to_string(),
            "time": at.time,
            "tx_count": tx_count,
        }));
        Ok(self.other_event(kind, &format!("{}|{disconnects}", at.hash), f))
    }

    /// Disconnects the tip block: what it confirmed is reorged, in the rescan too.
    fn disconnect(&mut self, tip: StoredBlock, new_tip: TipRef) -> Result<(), FollowError> {
        tracing::info!(height = tip.height, hash = %tip.hash, "disconnecting block (reorg)");
        let step = self
            .tracker
            .disconnect_block(&self.index, tip.as_ref(), new_tip);
        let mut changes = labelled(&self.index, step)?;
        changes.tip = TipChanges::disconnect(tip.as_ref());
        if self.store.wants(event::BLOCK_DISCONNECTED) {
            let tx_count = tip.tx_count.unwrap_or(0) as usize;
            let e =
                self.block_event(event::BLOCK_DISCONNECTED, tip.as_ref(), tip.prev, tx_count)?;
            changes.events.insert(0, e);
        }
        self.commit(changes)?;
        self.recent_spends.remove_block(tip.hash);
        self.rescan_disconnected(tip.as_ref(), new_tip)
    }
}
