//! Following the best chain: find the fork point, disconnect to it, connect in height order.

use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash};
use serde_json::json;

use super::support::Progress;
use super::{fields, labelled, FollowError, Follower};
use crate::config::StartHeight;
use crate::event::{self, BlockRef, TipRef};
use crate::node::ChainSource;
use crate::store::StoredBlock;
use crate::tip::TipChanges;

/// Where the stored chain meets the node's.
enum Fork {
    /// At this stored block (possibly the tip: nothing to disconnect).
    At(StoredBlock),
    /// Below everything we keep: a reorg deeper than `finality_depth` allows for.
    BelowKept { lowest: StoredBlock },
    /// No stored chain yet below genesis.
    Genesis,
}

fn zero_hash() -> BlockHash {
    BlockHash::all_zeros()
}

impl<S: ChainSource> Follower<S> {
    /// Sets the starting point on the first run.
    async fn ensure_base(&mut self) -> Result<(), FollowError> {
        if self.store.tip()?.is_some() {
            return Ok(());
        }
        let base_height = match self.opts.start_height {
            StartHeight::Tip => self.source.chain_info().await?.blocks,
            StartHeight::Height(0) => return Ok(()),
            StartHeight::Height(h) => h - 1,
        };
        self.set_base(base_height).await?;
        tracing::info!(
            height = base_height,
            "first run: following the chain from here"
        );
        Ok(())
    }

    async fn set_base(&mut self, height: u32) -> Result<(), FollowError> {
        let hash = self.source.block_hash(height).await?;
        let header = self.source.block_header(hash).await?;
        let prev = header.prev.unwrap_or_else(zero_hash);
        self.store.init_tip(StoredBlock {
            hash,
            height: header.height,
            prev,
            time: header.time,
            tx_count: None,
        })?;
        Ok(())
    }

    /// The highest stored block that is still on the node's best chain.
    async fn fork_point(
        &mut self,
        tip: StoredBlock,
        node_height: u32,
    ) -> Result<Fork, FollowError> {
        let mut h = tip.height.min(node_height);
        loop {
            let Some(stored) = self.store.block_at(h)? else {
                return Ok(match self.store.lowest_block()? {
                    Some(lowest) if lowest.height > 0 => Fork::BelowKept { lowest },
                    _ => Fork::Genesis,
                });
            };
            if self.source.block_hash(h).await? == stored.hash {
                return Ok(Fork::At(stored));
            }
            if h == 0 {
                return Ok(Fork::Genesis);
            }
            h -= 1;
        }
    }

    /// Disconnects to the fork point, then connects the node's best chain in height order.
    pub async fn sync_chain(&mut self) -> Result<(), FollowError> {
        self.ensure_base().await?;
        'restart: loop {
            let best = self.source.best_block_hash().await?;
            let tip = self.store.tip()?;
            if let Some(t) = tip {
                self.metrics
                    .tip_height
                    .store(t.height as i64, std::sync::atomic::Ordering::Relaxed);
            }
            if tip.map(|t| t.hash) == Some(best) {
                self.health.set_following(crate::health::Following::AtTip);
                if let Some(t) = tip {
                    self.metrics
                        .node_height
                        .store(t.height as i64, std::sync::atomic::Ordering::Relaxed);
                }
                return Ok(());
            }
            let best_height = self.source.block_header(best).await?.height;
            self.metrics
                .node_height
                .store(best_height as i64, std::sync::atomic::Ordering::Relaxed);
            // One block behind is the normal moment before a new block is connected.
            if let Some(t) = tip.filter(|t| t.height + 1 < best_height) {
                self.health.set_following(crate::health::Following::Behind {
                    tip: t.height as i64,
                    node: best_height as i64,
                });
            }
            let start = match tip {
                None => 0,
                Some(tip) => self.unwind(tip, best, best_height).await?,
            };
            let mut progress = Progress::new(start, best_height);
            for h in start..=best_height {
                let hash = if h == best_height {
                    best
                } else {
                    self.source.block_hash(h).await?
                };
                let block = match self.cache.blocks.get(&hash) {
                    Some(b) => b.clone(),
                    None => self.source.block(hash).await?,
                };
                let tip_hash = self.store.tip()?.map(|t| t.hash).unwrap_or_else(zero_hash);
                if tip_hash != block.header.prev_blockhash {
                    tracing::info!(height = h, %hash, "node's chain moved during sync; starting over");
                    continue 'restart;
                }
                self.connect(
                    &block,
                    BlockRef {
                        hash,
                        height: h,
                        time: block.header.time,
                    },
                )?;
                progress.tick(h);
            }
            progress.done();
        }
    }

    /// Disconnects what the node's best chain no longer holds; returns the first height to connect.
    async fn unwind(
        &mut self,
        tip: StoredBlock,
        best: BlockHash,
        best_height: u32,
    ) -> Result<u32, FollowError> {
        let (fork_height, depth) = match self.fork_point(tip, best_height).await? {
            Fork::At(b) => (Some(b.height), tip.height - b.height),
            Fork::Genesis => (None, tip.height + 1),
            Fork::BelowKept { lowest } => {
                self.too_deep(tip, lowest, best, best_height)?;
                // Start again from the node's chain just below what we kept: every transaction we
                // still track was confirmed in a disconnected block and gets its tx.reorged.
                self.disconnect_to(None)?;
                self.set_base(lowest.height - 1).await?;
                return Ok(lowest.height);
            }
        };
        if depth > 0 {
            tracing::warn!(depth, old_tip = %tip.hash, new_tip = %best, "reorg");
            if depth >= self.opts.alert_reorg_depth {
                let fork = fork_height.map(|h| json!(h)).unwrap_or(json!(null));
                let f = fields(json!({
                    "depth": depth,
                    "fork_height": fork,
                    "old_tip": { "hash": tip.hash.to_string(), "height": tip.height },
                    "new_tip": { "hash": best.to_string(), "height": best_height },
                }));
                self.commit_other(event::ALERT_REORG, &format!("{}|{best}", tip.hash), f)?;
            }
        }
        self.disconnect_to(fork_height)?;
        Ok(fork_height.map(|h| h + 1).unwrap_or(0))
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

    fn connect(&mut self, block: &Block, at: BlockRef) -> Result<(), FollowError> {
        let step = self.tracker.connect_block(&self.index, block, at);
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
            self.seen_mempool.remove(&tx.compute_txid());
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

    /// Disconnects stored blocks from the tip down to `fork_height` (all of them for `None`).
    fn disconnect_to(&mut self, fork_height: Option<u32>) -> Result<(), FollowError> {
        while let Some(tip) = self.store.tip()? {
            if fork_height.is_some_and(|f| tip.height <= f) {
                break;
            }
            let new_tip = match self.store.block_at(tip.height.wrapping_sub(1))? {
                Some(p) => TipRef {
                    hash: p.hash,
                    height: p.height,
                },
                None => TipRef {
                    hash: tip.prev,
                    height: tip.height.saturating_sub(1),
                },
            };
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
            self.rescan_disconnected(tip.as_ref(), new_tip)?;
        }
        Ok(())
    }
}
