//! A store that refuses one read of its tip, some commits or one read of the pending rescans on
//! demand, for the follower's fault tests: SQLite's store underneath, reached through
//! `ChainStore` as the follower reaches any store.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bitcoin::{BlockHash, Network, OutPoint};

use crate::changeset::ChangeSet;
use crate::store::{ChainStore, CommittedEvent, Result, Store, StoreError, StoredBlock};
use crate::tracker::Tracked;
use crate::watch::{Derivation, Watch, WatchIndex, WatchLoader, WatchedCoin};

pub struct FlakyStore {
    pub inner: Store,
    /// Set: the next `tip()` fails (once).
    pub fail_next_tip: Arc<AtomicBool>,
    /// Set: arm `fail_next_tip` after the next commit.
    pub fail_tip_after_commit: Arc<AtomicBool>,
    /// The next this many commits fail, writing nothing.
    pub fail_commits: Arc<AtomicU32>,
    /// Set: the commit after the next one fails.
    pub fail_commit_after_next: Arc<AtomicBool>,
    /// Set: the next read of the pending rescans fails (once).
    pub fail_next_rescans: Arc<AtomicBool>,
}

impl ChainStore for FlakyStore {
    fn tip(&self) -> Result<Option<StoredBlock>> {
        if self.fail_next_tip.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Corrupt("injected: database is locked".into()));
        }
        self.inner.tip()
    }
    fn block_at(&self, height: u32) -> Result<Option<StoredBlock>> {
        self.inner.block_at(height)
    }
    fn lowest_block(&self) -> Result<Option<StoredBlock>> {
        self.inner.lowest_block()
    }
    fn keep_blocks(&self) -> u32 {
        self.inner.keep_blocks()
    }
    fn init_tip(&mut self, block: StoredBlock) -> Result<()> {
        self.inner.init_tip(block)
    }
    fn backfill_blocks(&mut self, blocks: &[StoredBlock]) -> Result<()> {
        self.inner.backfill_blocks(blocks)
    }
    fn disconnect_count(&self, hash: BlockHash) -> Result<u32> {
        self.inner.disconnect_count(hash)
    }
    fn wants(&self, kind: &str) -> bool {
        self.inner.wants(kind)
    }
    fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        let failing = |n: u32| n.checked_sub(1);
        if self
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, failing)
            .is_ok()
        {
            return Err(StoreError::Corrupt("injected: disk I/O error".into()));
        }
        let done = self.inner.commit(changes, now_ms)?;
        if self.fail_commit_after_next.swap(false, Ordering::SeqCst) {
            self.fail_commits.store(1, Ordering::SeqCst);
        }
        if self.fail_tip_after_commit.swap(false, Ordering::SeqCst) {
            self.fail_next_tip.store(true, Ordering::SeqCst);
        }
        Ok(done)
    }
    fn load_tracked(&self) -> Result<Vec<Tracked>> {
        self.inner.load_tracked()
    }
    fn load_coins(&self) -> Result<Vec<(OutPoint, WatchedCoin)>> {
        self.inner.load_coins()
    }
    fn load_derivations(&self) -> Result<Vec<Derivation>> {
        self.inner.load_derivations()
    }
    fn load_watches(&self) -> Result<Vec<Watch>> {
        self.inner.load_watches()
    }
    fn watch_version(&self) -> Result<i64> {
        self.inner.watch_version()
    }
    fn rescans(&self) -> Result<Vec<(String, u32)>> {
        if self.fail_next_rescans.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Corrupt("injected: database is locked".into()));
        }
        self.inner.rescans()
    }
    fn build_index(
        &self,
        network: Network,
        loader: WatchLoader,
        exclude: &[String],
    ) -> Result<WatchIndex> {
        self.inner.build_index(network, loader, exclude)
    }
    fn watch_loader(&self) -> Result<WatchLoader> {
        ChainStore::watch_loader(&self.inner)
    }
}
