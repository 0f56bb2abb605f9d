//! What each stage asks of a store, as traits: the follower (`ChainStore`), the delivery
//! workers (`OutboxStore`) and the admin API (`AdminStore`) are generic over them, so another backend (PostgreSQL) implements
//! these and leaves the stages untouched. SQLite's `Store` is the first implementation. Every
//! method blocks: callers in async code run them on the blocking pool (`SharedStore`).

use std::time::Duration;

use bitcoin::{BlockHash, Network, OutPoint};

use super::{
    AttemptOutcome, AttemptRow, AuditReport, CommittedEvent, DeliveryRow, DueDelivery, EndpointRow,
    EndpointState, EventRow, Pruned, Result, RetentionPolicy, Store, StoredBlock,
};
use crate::changeset::ChangeSet;
use crate::delivery::DeliveryStatus;
use crate::event::NewEvent;
use crate::metrics::QueueState;
use crate::tracker::Tracked;
use crate::watch::{Derivation, Watch, WatchIndex, WatchLoader, WatchedCoin};

/// What the chain follower reads and commits.
pub trait ChainStore: Send + 'static {
    /// The followed chain's tip, a block of it, and the lowest block kept.
    fn tip(&self) -> Result<Option<StoredBlock>>;
    fn block_at(&self, height: u32) -> Result<Option<StoredBlock>>;
    fn lowest_block(&self) -> Result<Option<StoredBlock>>;
    /// How many blocks below the tip are kept to find fork points.
    fn keep_blocks(&self) -> u32;
    /// The block the chain starts after (no events for it).
    fn init_tip(&mut self, block: StoredBlock) -> Result<()>;
    /// Blocks just below the lowest kept one (a rescan's range), already checked to link up.
    fn backfill_blocks(&mut self, blocks: &[StoredBlock]) -> Result<()>;
    /// How many times a block was disconnected (a block back after a reorg is a new event).
    fn disconnect_count(&self, hash: BlockHash) -> Result<u32>;
    /// Whether any endpoint takes events of this type.
    fn wants(&self, kind: &str) -> bool;
    /// Commits a change set in one transaction: all of it, or nothing.
    fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>>;

    fn load_tracked(&self) -> Result<Vec<Tracked>>;
    fn load_coins(&self) -> Result<Vec<(OutPoint, WatchedCoin)>>;
    fn load_derivations(&self) -> Result<Vec<Derivation>>;
    fn load_watches(&self) -> Result<Vec<Watch>>;
    /// Changes whenever a watch is added, changed or removed, by any process.
    fn watch_version(&self) -> Result<i64>;
    /// Watches waiting for (or in the middle of) a rescan: id and next height.
    fn rescans(&self) -> Result<Vec<(String, u32)>>;
    /// The matching index of every watch but those in `exclude`, records loaded by `loader`.
    fn build_index(
        &self,
        network: Network,
        loader: WatchLoader,
        exclude: &[String],
    ) -> Result<WatchIndex>;
    /// A loader of single watch records that does not borrow this store (its own connection).
    fn watch_loader(&self) -> Result<WatchLoader>;
}

/// What a delivery worker reads and records.
pub trait OutboxStore: Send + 'static {
    /// Readies a connection of the worker's own: attempt records may trade durability for
    /// speed (one lost to a power cut means a re-send, which at-least-once allows).
    fn prepare_for_deliveries(&mut self) -> Result<()> {
        Ok(())
    }
    /// The network events are recorded for (alerts carry it).
    fn network(&self) -> Result<String>;
    fn wants(&self, kind: &str) -> bool;
    /// Up to `limit` deliveries due by `now_ms` and not among `in_flight` (ids being sent),
    /// oldest first; rows failing their audit check are held. An ordered endpoint gives its
    /// head only, and nothing while the head is in flight.
    fn due_deliveries(
        &mut self,
        endpoint: &str,
        now_ms: i64,
        ordered: bool,
        limit: u32,
        in_flight: &[i64],
    ) -> Result<Vec<DueDelivery>>;
    /// When the next delivery of `endpoint` is due, if any is queued.
    fn next_due(&self, endpoint: &str, ordered: bool) -> Result<Option<i64>>;
    /// Attempts and what they did to their deliveries, in one transaction.
    fn record_attempts(
        &mut self,
        endpoint: &str,
        done: &[(DueDelivery, AttemptOutcome)],
    ) -> Result<()>;
    fn endpoint_state(&self, name: &str) -> Result<EndpointState>;
    fn set_endpoint_backoff(&mut self, name: &str, step: u32, until: Option<i64>) -> Result<()>;
    fn set_failing_alerted(&mut self, name: &str) -> Result<()>;
    /// Gives up what this instance holds of `endpoint` as its worker stops (a shared store's
    /// hold on an ordered endpoint, and its claims on the deliveries `unstarted`, claimed
    /// ahead and never sent), so the next instance serves them at once rather than after the
    /// hold runs out.
    fn release(&mut self, _endpoint: &str, _unstarted: &[i64]) -> Result<()> {
        Ok(())
    }
    /// Alerts and endpoint changes, in one transaction.
    fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>>;
    /// Runs `f` in one transaction: everything it writes is committed together, or nothing.
    fn atomically<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T>
    where
        Self: Sized;
}

/// What retention prunes.
pub trait RetentionStore: Send + 'static {
    /// Removes at most `batch` rows of each kind that the policy lets go, in one transaction.
    fn prune_batch(
        &mut self,
        policy: &RetentionPolicy,
        now_ms: i64,
        batch: usize,
    ) -> Result<Pruned>;
}

impl RetentionStore for Store {
    fn prune_batch(
        &mut self,
        policy: &RetentionPolicy,
        now_ms: i64,
        batch: usize,
    ) -> Result<Pruned> {
        Store::prune_batch(self, policy, now_ms, batch)
    }
}

/// What the admin API and the command line read and change.
pub trait AdminStore: Send + 'static {
    fn tip(&self) -> Result<Option<StoredBlock>>;
    /// Whether a write could start within `wait` (writes nothing).
    fn probe_write(&mut self, wait: Duration) -> Result<()>;
    fn queue_states(&self, now_ms: i64) -> Result<Vec<QueueState>>;
    fn load_watches(&self) -> Result<Vec<Watch>>;
    fn load_watch(&self, id: &str) -> Result<Option<Watch>>;
    fn upsert_watches(&mut self, watches: &[Watch], source: &str, now_ms: i64) -> Result<()>;
    fn remove_watch(&mut self, id: &str) -> Result<bool>;
    /// Asks the running follower to scan a watch's past from `height`.
    fn request_rescan(&mut self, watch_id: &str, height: u32) -> Result<bool>;
    /// Rescans waiting or running: watch id and the next height to scan.
    fn rescans(&self) -> Result<Vec<(String, u32)>>;
    fn events_after(&self, after: i64, limit: i64) -> Result<Vec<EventRow>>;
    fn event_by_id(&self, id: &str) -> Result<Option<EventRow>>;
    fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        endpoint: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>>;
    fn attempts_for(&self, event_id: &str) -> Result<Vec<AttemptRow>>;
    /// Queues deliveries of an event (or every dead one) again; how many.
    fn redeliver(
        &mut self,
        event_id: Option<&str>,
        endpoint: Option<&str>,
        now_ms: i64,
    ) -> Result<usize>;
    fn list_endpoints(&self) -> Result<Vec<EndpointRow>>;
    /// Enables or disables an endpoint (with the reason shown for a disabled one).
    fn set_endpoint_enabled(
        &mut self,
        name: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<bool>;
    /// Checks the keyed chain of the event log.
    fn audit(&self) -> Result<AuditReport>;
    /// The sequence below which retention pruned the log, and the chain value at a row.
    fn audit_checkpoint(&self) -> Result<Option<i64>>;
    fn chain_at(&self, seq: i64) -> Result<Option<String>>;
    /// Records events (a `webhook.test`) with their deliveries, in one transaction.
    fn record_events(&mut self, events: Vec<NewEvent>, now_ms: i64) -> Result<Vec<CommittedEvent>>;
    /// The network the store belongs to.
    fn network_name(&self) -> Result<String>;

    /// Records a `webhook.test` for `endpoint` alone, naming the stored tip: a new event each
    /// call, which the endpoint's worker delivers like any other.
    fn record_test_event(&mut self, endpoint: &str, now_ms: i64) -> Result<CommittedEvent> {
        let tip = self.tip()?.map(|t| (t.hash.to_string(), t.height));
        let nonce = format!("{now_ms}|{:016x}", rand::random::<u64>());
        let event = crate::event::test_event(endpoint, &self.network_name()?, tip, &nonce);
        self.record_events(vec![event], now_ms)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                super::StoreError::Corrupt("a test event with this id was recorded before".into())
            })
    }
}

impl AdminStore for Store {
    fn tip(&self) -> Result<Option<StoredBlock>> {
        Store::tip(self)
    }
    fn probe_write(&mut self, wait: Duration) -> Result<()> {
        Store::probe_write(self, wait)
    }
    fn queue_states(&self, now_ms: i64) -> Result<Vec<QueueState>> {
        Store::queue_states(self, now_ms)
    }
    fn load_watches(&self) -> Result<Vec<Watch>> {
        Store::load_watches(self)
    }
    fn load_watch(&self, id: &str) -> Result<Option<Watch>> {
        Store::load_watch(self, id)
    }
    fn upsert_watches(&mut self, watches: &[Watch], source: &str, now_ms: i64) -> Result<()> {
        Store::upsert_watches(self, watches, source, now_ms)
    }
    fn remove_watch(&mut self, id: &str) -> Result<bool> {
        Store::remove_watch(self, id)
    }
    fn request_rescan(&mut self, watch_id: &str, height: u32) -> Result<bool> {
        Store::request_rescan(self, watch_id, height)
    }
    fn rescans(&self) -> Result<Vec<(String, u32)>> {
        Store::rescans(self)
    }
    fn events_after(&self, after: i64, limit: i64) -> Result<Vec<EventRow>> {
        Store::events_after(self, after, limit)
    }
    fn event_by_id(&self, id: &str) -> Result<Option<EventRow>> {
        Store::event_by_id(self, id)
    }
    fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        endpoint: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>> {
        Store::list_deliveries(self, status, endpoint, limit)
    }
    fn attempts_for(&self, event_id: &str) -> Result<Vec<AttemptRow>> {
        Store::attempts_for(self, event_id)
    }
    fn redeliver(
        &mut self,
        event_id: Option<&str>,
        endpoint: Option<&str>,
        now_ms: i64,
    ) -> Result<usize> {
        Store::redeliver(self, event_id, endpoint, now_ms)
    }
    fn list_endpoints(&self) -> Result<Vec<EndpointRow>> {
        Store::list_endpoints(self)
    }
    fn set_endpoint_enabled(
        &mut self,
        name: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<bool> {
        Store::set_endpoint_enabled(self, name, enabled, reason)
    }
    fn audit(&self) -> Result<AuditReport> {
        Store::audit(self)
    }
    fn audit_checkpoint(&self) -> Result<Option<i64>> {
        Store::audit_checkpoint(self)
    }
    fn chain_at(&self, seq: i64) -> Result<Option<String>> {
        Store::chain_at(self, seq)
    }
    fn record_events(&mut self, events: Vec<NewEvent>, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        Store::commit(self, &ChangeSet::events(events), now_ms)
    }
    fn network_name(&self) -> Result<String> {
        Store::network(self)
    }
}

impl ChainStore for Store {
    fn tip(&self) -> Result<Option<StoredBlock>> {
        Store::tip(self)
    }
    fn block_at(&self, height: u32) -> Result<Option<StoredBlock>> {
        Store::block_at(self, height)
    }
    fn lowest_block(&self) -> Result<Option<StoredBlock>> {
        Store::lowest_block(self)
    }
    fn keep_blocks(&self) -> u32 {
        Store::keep_blocks(self)
    }
    fn init_tip(&mut self, block: StoredBlock) -> Result<()> {
        Store::init_tip(self, block)
    }
    fn backfill_blocks(&mut self, blocks: &[StoredBlock]) -> Result<()> {
        Store::backfill_blocks(self, blocks)
    }
    fn disconnect_count(&self, hash: BlockHash) -> Result<u32> {
        Store::disconnect_count(self, hash)
    }
    fn wants(&self, kind: &str) -> bool {
        Store::wants(self, kind)
    }
    fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        Store::commit(self, changes, now_ms)
    }
    fn load_tracked(&self) -> Result<Vec<Tracked>> {
        Store::load_tracked(self)
    }
    fn load_coins(&self) -> Result<Vec<(OutPoint, WatchedCoin)>> {
        Store::load_coins(self)
    }
    fn load_derivations(&self) -> Result<Vec<Derivation>> {
        Store::load_derivations(self)
    }
    fn load_watches(&self) -> Result<Vec<Watch>> {
        Store::load_watches(self)
    }
    fn watch_version(&self) -> Result<i64> {
        Store::watch_version(self)
    }
    fn rescans(&self) -> Result<Vec<(String, u32)>> {
        Store::rescans(self)
    }
    fn build_index(
        &self,
        network: Network,
        loader: WatchLoader,
        exclude: &[String],
    ) -> Result<WatchIndex> {
        Store::build_index(self, network, loader, exclude)
    }
    fn watch_loader(&self) -> Result<WatchLoader> {
        let conn = std::sync::Mutex::new(self.reopen()?);
        Ok(std::sync::Arc::new(move |id: &str| {
            let conn = conn
                .lock()
                .map_err(|_| "watch loader lock poisoned".to_string())?;
            conn.load_watch(id).map_err(|e| e.to_string())
        }))
    }
}

impl OutboxStore for Store {
    fn prepare_for_deliveries(&mut self) -> Result<()> {
        // The event log's connection keeps `synchronous=FULL`.
        self.relax_durability()
    }
    fn network(&self) -> Result<String> {
        Store::network(self)
    }
    fn wants(&self, kind: &str) -> bool {
        Store::wants(self, kind)
    }
    fn due_deliveries(
        &mut self,
        endpoint: &str,
        now_ms: i64,
        ordered: bool,
        limit: u32,
        in_flight: &[i64],
    ) -> Result<Vec<DueDelivery>> {
        // In flight rows are still queued here: read past them, then leave them out.
        let read = limit + in_flight.len() as u32;
        let mut due = Store::due_deliveries(self, endpoint, now_ms, ordered, read)?;
        due.retain(|d| !in_flight.contains(&d.delivery_id));
        due.truncate(limit as usize);
        Ok(due)
    }
    fn next_due(&self, endpoint: &str, ordered: bool) -> Result<Option<i64>> {
        Store::next_due(self, endpoint, ordered)
    }
    fn record_attempts(
        &mut self,
        endpoint: &str,
        done: &[(DueDelivery, AttemptOutcome)],
    ) -> Result<()> {
        Store::record_attempts(self, endpoint, done)
    }
    fn endpoint_state(&self, name: &str) -> Result<EndpointState> {
        Store::endpoint_state(self, name)
    }
    fn set_endpoint_backoff(&mut self, name: &str, step: u32, until: Option<i64>) -> Result<()> {
        Store::set_endpoint_backoff(self, name, step, until)
    }
    fn set_failing_alerted(&mut self, name: &str) -> Result<()> {
        Store::set_failing_alerted(self, name)
    }
    fn commit(&mut self, changes: &ChangeSet, now_ms: i64) -> Result<Vec<CommittedEvent>> {
        Store::commit(self, changes, now_ms)
    }
    fn atomically<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        Store::atomically(self, f)
    }
}
