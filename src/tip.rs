//! The followed chain as we store it: its blocks, and the change set that moves its tip.

use bitcoin::BlockHash;

use crate::event::{BlockRef, TipRef};
use crate::merge::Merge;

/// A stored block of the followed chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlock {
    pub hash: BlockHash,
    pub height: u32,
    pub prev: BlockHash,
    pub time: u32,
    pub tx_count: Option<u32>,
}

impl StoredBlock {
    pub fn as_ref(&self) -> BlockRef {
        BlockRef {
            hash: self.hash,
            height: self.height,
            time: self.time,
        }
    }

    pub fn tip_ref(&self) -> TipRef {
        TipRef {
            hash: self.hash,
            height: self.height,
        }
    }
}

/// One move of the tip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TipChange {
    /// A block on top of the tip; the store refuses it unless `prev` is the tip.
    Connect {
        block: BlockRef,
        prev: BlockHash,
        tx_count: u32,
    },
    /// The tip block goes; the store refuses it unless `block` is the tip.
    Disconnect { block: BlockRef },
}

impl TipChange {
    /// Whether this move fits the stored tip (hash, height): a connect must extend it, a
    /// disconnect must take it away. Every store checks this before writing the move.
    pub fn fits(&self, tip: Option<(BlockHash, u32)>) -> Result<(), String> {
        match (self, tip) {
            (TipChange::Connect { block, prev, .. }, Some((hash, height)))
                if hash != *prev || height + 1 != block.height =>
            {
                Err(format!(
                    "block {} at {} does not extend tip {hash} at {height}",
                    block.hash, block.height
                ))
            }
            (TipChange::Connect { .. }, _) => Ok(()),
            (TipChange::Disconnect { block }, tip) if tip.map(|t| t.0) != Some(block.hash) => {
                Err(format!("block {} is not the tip", block.hash))
            }
            (TipChange::Disconnect { .. }, _) => Ok(()),
        }
    }
}

/// Moves of the tip, applied in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TipChanges(pub Vec<TipChange>);

impl TipChanges {
    pub fn connect(block: BlockRef, prev: BlockHash, tx_count: u32) -> TipChanges {
        TipChanges(vec![TipChange::Connect {
            block,
            prev,
            tx_count,
        }])
    }

    pub fn disconnect(block: BlockRef) -> TipChanges {
        TipChanges(vec![TipChange::Disconnect { block }])
    }

    /// The tip height after the changes, if they move it.
    pub fn new_height(&self) -> Option<u32> {
        self.0.last().map(|c| match c {
            TipChange::Connect { block, .. } => block.height,
            TipChange::Disconnect { block } => block.height.saturating_sub(1),
        })
    }
}

impl Merge for TipChanges {
    fn merge(&mut self, later: TipChanges) {
        self.0.extend(later.0);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;

    fn block(height: u32) -> BlockRef {
        BlockRef {
            hash: BlockHash::from_byte_array([height as u8; 32]),
            height,
            time: 0,
        }
    }

    #[test]
    fn a_move_fits_only_the_tip_it_was_made_for() {
        let (one, two) = (block(1), block(2));
        let on_one = TipChange::Connect {
            block: two,
            prev: one.hash,
            tx_count: 1,
        };
        assert_eq!(on_one.fits(Some((one.hash, 1))), Ok(()));
        assert_eq!(on_one.fits(None), Ok(()), "the first block after init");
        assert!(
            on_one.fits(Some((two.hash, 2))).is_err(),
            "a block not on the tip"
        );
        let off = TipChange::Disconnect { block: two };
        assert_eq!(off.fits(Some((two.hash, 2))), Ok(()));
        assert!(off.fits(Some((one.hash, 1))).is_err(), "not the tip");
        assert!(off.fits(None).is_err(), "nothing to disconnect");
    }

    #[test]
    fn merged_tip_changes_keep_their_order_and_end_where_the_last_one_does() {
        let mut c = TipChanges::disconnect(block(5));
        assert!(!c.is_empty(), "a disconnect is a change");
        c.merge(TipChanges::connect(block(5), block(4).hash, 1));
        c.merge(TipChanges::default());
        assert_eq!(c.0.len(), 2, "an empty merge adds nothing");
        assert!(
            matches!(c.0[0], TipChange::Disconnect { .. }),
            "the disconnect stays first"
        );
        assert_eq!(
            c.new_height(),
            Some(5),
            "the tip ends at the connected block"
        );
        assert_eq!(TipChanges::disconnect(block(5)).new_height(), Some(4));
        assert!(TipChanges::default().is_empty());
    }
}
