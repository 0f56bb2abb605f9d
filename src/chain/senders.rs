//! Where the money came from: before a step that tracks transactions anew is committed, the
//! node describes the coins they spend (`getrawtransaction` or `getblock HASH 3` for a block,
//! `gettxout` for a mempool transaction) and `Senders::of` checks that description against the inputs. Only matched
//! transactions are asked about, so a block with no payment to a watch costs nothing more.

use std::collections::HashMap;

use bitcoin::{Block, OutPoint, Transaction, Txid};

use super::{FollowError, Follower};
use crate::event::BlockRef;
use crate::node::{ChainSource, NodeError, NodeResult};
use crate::senders::{Senders, SpentCoin};
use crate::store::ChainStore;
use crate::tracker::{TrackerStep, TxStatus};

impl<S: ChainSource, St: ChainStore> Follower<S, St> {
    /// Senders of a mempool transaction `step` tracks anew. (`&mut self`: a `&Follower` held
    /// across an await would need the store to be `Sync`.)
    pub(super) async fn fill_mempool_senders(
        &mut self,
        step: &mut TrackerStep,
        tx: &Transaction,
        asked: Option<NodeResult<Vec<Option<SpentCoin>>>>,
    ) -> Result<(), FollowError> {
        if step.unknown_senders(TxStatus::Mempool).is_empty() {
            return Ok(());
        }
        let coins = match asked {
            Some(answer) => self.judge_spent_coins(tx, answer)?,
            None => self.mempool_spent_coins(tx).await?,
        };
        if let Some(coins) = coins {
            self.take_senders(step, [(tx, coins)]);
        }
        Ok(())
    }

    /// The coins a mempool transaction spends, as the node describes them; `None` when they
    /// cannot be learned (told in the log), an error only when the node cannot be reached.
    pub(super) async fn mempool_spent_coins(
        &mut self,
        tx: &Transaction,
    ) -> Result<Option<Vec<SpentCoin>>, FollowError> {
        let answer = self.source.node().spent_coins(&spent_outpoints(tx)).await;
        self.judge_spent_coins(tx, answer)
    }

    /// What the node's description of the coins `tx` spends tells: see `mempool_spent_coins`.
    fn judge_spent_coins(
        &self,
        tx: &Transaction,
        answer: NodeResult<Vec<Option<SpentCoin>>>,
    ) -> Result<Option<Vec<SpentCoin>>, FollowError> {
        let coins = match answer {
            Ok(c) => c,
            Err(e) => return self.unknown(e, tx.compute_txid()).map(|()| None),
        };
        // A parent neither the chainstate nor the mempool holds: the transaction was mined or
        // dropped meanwhile; its block, if any, tells its senders.
        let coins = coins.into_iter().collect::<Option<Vec<SpentCoin>>>();
        if coins.is_none() {
            tracing::info!(txid = %tx.compute_txid(), "a coin this mempool transaction spends is gone; senders unknown for now");
        }
        Ok(coins)
    }

    /// Senders of the transactions of `block` that `step` tracks anew, in one call, unless
    /// `asked` (the block's spent coins, asked for ahead) already holds them all.
    pub(super) async fn fill_block_senders(
        &mut self,
        step: &mut TrackerStep,
        block: &Block,
        at: BlockRef,
        asked: Option<HashMap<Txid, Vec<SpentCoin>>>,
    ) -> Result<(), FollowError> {
        let wanted = step.unknown_senders(TxStatus::Confirmed(at));
        if wanted.is_empty() {
            return Ok(());
        }
        let mut coins = match asked {
            Some(c) if wanted.iter().all(|t| c.contains_key(t)) => c,
            _ => match self.source.node().block_spent_coins(at.hash, &wanted).await {
                Ok(c) => c,
                Err(e) => return self.unknown(e, wanted[0]),
            },
        };
        let txs: Vec<_> = block
            .txdata
            .iter()
            .filter_map(|tx| {
                let coins = coins.remove(&tx.compute_txid())?;
                Some((tx, coins))
            })
            .collect();
        if txs.len() < wanted.len() {
            tracing::warn!(block = %at.hash, asked = wanted.len(), described = txs.len(), "the node's description of the block leaves out transactions it holds; their senders are unknown");
        }
        self.take_senders(step, txs);
        Ok(())
    }

    pub(super) fn take_senders<'t>(
        &self,
        step: &mut TrackerStep,
        described: impl IntoIterator<Item = (&'t Transaction, Vec<SpentCoin>)>,
    ) {
        let mut found: HashMap<Txid, Senders> = HashMap::new();
        for (tx, coins) in described {
            let txid = tx.compute_txid();
            match Senders::of(tx, &coins, self.network) {
                Ok(s) => {
                    found.insert(txid, s);
                }
                Err(e) => {
                    tracing::warn!(%txid, error = %e, "the node's description of the coins spent does not fit the transaction; senders unknown")
                }
            }
        }
        step.fill_senders(&found);
    }

    /// A node that cannot be reached fails the step, which is retried; any other failure
    /// (an answer we cannot use) leaves the senders unknown rather than holding up the chain.
    fn unknown(&self, e: NodeError, txid: Txid) -> Result<(), FollowError> {
        if e.is_transient() {
            return Err(e.into());
        }
        tracing::warn!(%txid, error = %e, "could not learn where the money came from; senders unknown");
        Ok(())
    }
}

/// The coins `tx` spends, as the node is asked about them.
pub(super) fn spent_outpoints(tx: &Transaction) -> Vec<OutPoint> {
    tx.input.iter().map(|i| i.previous_output).collect()
}
