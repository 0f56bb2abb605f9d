//! Blocks asked of the node several at once, and the next group of them asked for while the
//! group before is scanned (a rescan reading every block, a catch-up): the node reads and
//! sends them, and they are decoded and proven on other threads, while the follower matches.
//! A group read ahead is used only if it is still the one wanted; dropped, its asks are
//! cancelled.

use std::sync::Arc;

use bitcoin::{Block, BlockHash};
use tokio_util::task::AbortOnDropHandle;

use futures_util::future::try_join_all;

use crate::node::{ChainSource, NodeError, NodeResult};

type Blocks = NodeResult<Vec<(BlockHash, Block)>>;

/// Blocks asked for at once where every block is read, when their size is not known yet.
pub(super) const GROUP: u32 = 8;
/// The most blocks in a group: many small blocks overlap best.
const MAX_GROUP: u32 = 16;
/// The bytes a group read ahead may come to, judged by the group before: with the group in
/// hand, some 16 MB of blocks are held (4 of mainnet's 4 MB blocks to a group, 16 of 1 MB).
const GROUP_BYTES: usize = 8 * 1024 * 1024;

/// How many blocks the group after `blocks` should hold.
pub(super) fn group_after(blocks: &[(BlockHash, Block)]) -> u32 {
    group_of(average_size(blocks))
}

/// How many blocks a group of blocks of `average` bytes should hold.
pub(super) fn group_of(average: usize) -> u32 {
    (GROUP_BYTES / average.max(1)).clamp(1, MAX_GROUP as usize) as u32
}

/// The average encoded size of `blocks`; 0 for none.
pub(super) fn average_size(blocks: &[(BlockHash, Block)]) -> usize {
    let bytes: usize = blocks.iter().map(|(_, b)| b.total_size()).sum();
    bytes / blocks.len().max(1)
}

pub(super) struct Ahead {
    from: u32,
    /// The hash each height was asked by: the kept chain's, or one the node gave before (a
    /// rescan's heights below the kept blocks); `None` where the node named it when asked.
    kept: Vec<Option<BlockHash>>,
    task: AbortOnDropHandle<Blocks>,
}

impl Ahead {
    /// Asks for the blocks at heights `from..`, by `kept`'s hashes or the node's.
    pub(super) fn ask<S: ChainSource>(
        node: Arc<S>,
        from: u32,
        kept: Vec<Option<BlockHash>>,
    ) -> Ahead {
        let asked = kept.clone();
        let task = tokio::spawn(async move { fetch_blocks(&*node, from, asked).await });
        Ahead {
            from,
            kept,
            task: AbortOnDropHandle::new(task),
        }
    }

    /// The first height asked for.
    pub(super) fn first(&self) -> u32 {
        self.from
    }

    /// The last height asked for.
    pub(super) fn last(&self) -> u32 {
        self.from + self.kept.len() as u32 - 1
    }

    /// Whether these are still the blocks to read at `from`, given what the kept chain names
    /// there now.
    pub(super) fn still_wanted(&self, from: u32, kept_now: &[Option<BlockHash>]) -> bool {
        self.from == from && self.kept == kept_now
    }

    pub(super) async fn blocks(self) -> Blocks {
        match self.task.await {
            Ok(blocks) => blocks,
            // Our bug, not the node's answer: it goes on as a panic.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(NodeError::bad(
                "getblock",
                format!("reading ahead stopped: {e}"),
            )),
        }
    }
}

/// The blocks at heights `from..`, by the hash `kept` has for each or else the node's: asked
/// for all at once, as a node answers several requests in parallel and one at a time the
/// rescan mostly waits on round trips.
pub(super) async fn fetch_blocks<S: ChainSource>(
    node: &S,
    from: u32,
    kept: Vec<Option<BlockHash>>,
) -> Blocks {
    let hashes = resolve_hashes(node, from, kept).await?;
    let blocks = try_join_all(hashes.iter().map(|hash| node.block(*hash))).await?;
    Ok(hashes.into_iter().zip(blocks).collect())
}

/// The node's hashes of heights `from..from + count`, in one batch (none asked for none), one
/// answer per height or an error.
pub(super) async fn node_hashes<S: ChainSource>(
    node: &S,
    from: u32,
    count: u32,
) -> NodeResult<Vec<BlockHash>> {
    if count == 0 {
        return Ok(vec![]);
    }
    let hashes = node.block_hashes(from, count).await?;
    if hashes.len() != count as usize {
        return Err(NodeError::bad(
            "getblockhash",
            "not one answer per height asked",
        ));
    }
    Ok(hashes)
}

/// The hashes of heights `from..`, `kept`'s where it has one: below the blocks we keep the
/// node's chain is the truth, within them ours is. The heights below (the leading `None`s) are
/// asked for in one batch, any other all at once.
pub(super) async fn resolve_hashes<S: ChainSource>(
    node: &S,
    from: u32,
    kept: Vec<Option<BlockHash>>,
) -> NodeResult<Vec<BlockHash>> {
    let below = kept.iter().take_while(|k| k.is_none()).count() as u32;
    let mut hashes = node_hashes(node, from, below).await?;
    let rest = (from + below..).zip(kept.into_iter().skip(below as usize));
    hashes.extend(
        try_join_all(rest.map(|(h, kept)| async move {
            match kept {
                Some(hash) => Ok(hash),
                None => node.block_hash(h).await,
            }
        }))
        .await?,
    );
    Ok(hashes)
}
