//! The two store backends, as the daemon opens them: a connection per stage (the follower,
//! the admin API, each delivery worker), all of one backend.

use std::sync::Arc;

use anyhow::Context as _;

use super::{follow, now_ms};
use crate::config::{network_name, Config, EndpointConfig};
use crate::dispatch;
use crate::node::{ChainInfo, RpcClient};
use crate::pg::PgStore;
use crate::store::{AdminStore, ChainStore, OutboxStore, RetentionStore, Store, StoreError};

/// Opens store connections and runs the chain follower as the backend requires.
pub trait Backend: Clone + Send + Sync + 'static {
    type Store: ChainStore + OutboxStore + AdminStore + RetentionStore;

    /// A connection of its own.
    fn open(&self) -> Result<Self::Store, StoreError>;

    /// A connection for `ep`'s delivery worker.
    fn open_for_deliveries(&self, _ep: &EndpointConfig) -> Result<Self::Store, StoreError> {
        self.open()
    }

    /// Opens the store and makes its endpoints, config watches and network match the config.
    fn prepare(&self, cfg: &Config) -> anyhow::Result<Self::Store>;

    /// The connection retention prunes through.
    fn retention(&self) -> Result<Self::Store, StoreError> {
        self.open()
    }

    /// Follows the chain until shutdown (with a shared store: while this instance leads).
    fn follow(
        &self,
        cfg: &Config,
        store: Self::Store,
        rpc: Arc<RpcClient>,
        first: Option<ChainInfo>,
        ctx: &dispatch::Context,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// SQLite in the data directory: one instance, which always follows.
#[derive(Clone)]
pub struct SqliteBackend {
    dir: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl SqliteBackend {
    pub fn new(cfg: &Config) -> SqliteBackend {
        SqliteBackend {
            dir: cfg.data_dir.clone(),
            key: cfg.audit_key_file.clone(),
        }
    }
}

impl Backend for SqliteBackend {
    type Store = Store;

    fn open(&self) -> Result<Store, StoreError> {
        Store::open_keyed(&self.dir, &self.key)
    }

    fn prepare(&self, cfg: &Config) -> anyhow::Result<Store> {
        super::open_store(cfg)
    }

    async fn follow(
        &self,
        cfg: &Config,
        mut store: Store,
        rpc: Arc<RpcClient>,
        first: Option<ChainInfo>,
        ctx: &dispatch::Context,
    ) -> anyhow::Result<()> {
        // One instance and no claims: a delivery alone in its queue can go straight to its
        // worker. PostgreSQL's workers must claim what they send.
        store.hand_off_to(ctx.handoff.clone());
        follow(cfg, store, rpc, first, ctx).await
    }
}

/// A PostgreSQL database shared by several instances.
#[derive(Clone)]
pub struct PgBackend {
    url: String,
    key: std::path::PathBuf,
    /// This process's name in the lease and in delivery claims.
    pub(super) instance: String,
    /// How long a leader that stopped renewing keeps the lease.
    pub(super) leader_lease: std::time::Duration,
    keep_blocks: u32,
}

impl PgBackend {
    pub fn new(cfg: &Config, url: &str, leader_lease: std::time::Duration) -> PgBackend {
        PgBackend {
            url: url.to_string(),
            key: cfg.audit_key_file.clone(),
            instance: instance_name(),
            leader_lease,
            keep_blocks: cfg.finality_depth + 10,
        }
    }
}

/// Host, process and a random part: a restarted process is a new holder (a new epoch).
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Backend for PgBackend {
    type Store = PgStore;

    fn open(&self) -> Result<PgStore, StoreError> {
        let mut store = PgStore::open(&self.url, &self.key, &self.instance)?;
        store.set_keep_blocks(self.keep_blocks);
        Ok(store)
    }

    fn open_for_deliveries(&self, ep: &EndpointConfig) -> Result<PgStore, StoreError> {
        let mut store = self.open()?;
        // Longer than one attempt (and its recording): a claim that ran out while the request
        // was still under way would let another instance send it too.
        store.set_claim(ep.timeout + std::time::Duration::from_secs(5));
        Ok(store)
    }

    fn prepare(&self, cfg: &Config) -> anyhow::Result<PgStore> {
        let mut store = self.open().with_context(|| {
            format!(
                "opening the PostgreSQL store at {}",
                crate::net::redact_url(&self.url)
            )
        })?;
        store.check_network(network_name(cfg.network))?;
        store.sync_endpoints(&cfg.endpoints)?;
        store.upsert_watches(&cfg.watches, "config", now_ms())?;
        tracing::info!(store = %store.describe(), instance = %self.instance, "PostgreSQL store open");
        if cfg.retain_events.is_some() {
            tracing::warn!(
                "retention does not prune a PostgreSQL store yet: [retention] is ignored"
            );
        }
        Ok(store)
    }

    async fn follow(
        &self,
        cfg: &Config,
        store: PgStore,
        rpc: Arc<RpcClient>,
        first: Option<ChainInfo>,
        ctx: &dispatch::Context,
    ) -> anyhow::Result<()> {
        super::leader::lead(cfg, self, store, rpc, first, ctx).await
    }
}
