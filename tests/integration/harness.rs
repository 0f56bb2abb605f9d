//! Test harness: the testkit's receiver verifying every request with an independent Standard
//! Webhooks implementation too, a simulated node, and chainwatch run in-process or as the
//! binary; and the delivery engine alone on a fake clock (`Outbox`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chainwatch::changeset::ChangeSet;
use chainwatch::config::EndpointConfig;
use chainwatch::dispatch::{self, Clock};
use chainwatch::event;
use chainwatch::simnode::SimNode;
use chainwatch::store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use chainwatch::testkit::{
    free_port, poll, wait_for, wait_until, Api, Bitcoind, Captured, ConfigBuilder, Endpoint,
    KillOnDrop, Receiver, ReceiverBuilder, Reply, WatchEntry,
};

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Addresses of every standard type (the captured shop wallet's).
pub const P2PKH: &str = "n3iet9u1ki76AoPrk9p6NUhjqxeyQfihSg";
pub const P2SH: &str = "2N5nWUDnNCr3kqQesi1YGqBojYwjS4P9Zw9";
pub const P2WPKH: &str = "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp";
pub const P2TR: &str = "bcrt1pgf9g8v63sselca7rgx5uyl0xwjjp4vpfn89vt3gdutvpjc8xq8vs0mmh98";
/// A p2wsh address (BIP173's test vector script, on regtest).
pub const P2WSH: &str = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry";

/// A receiver verifying with `SECRET`, through our verifier and an independent Standard
/// Webhooks implementation, and checking every body against its type's JSON Schema.
pub fn verifying() -> ReceiverBuilder {
    Receiver::builder()
        // 204 for a body that verifies and matches its schema, 401 otherwise: a wrong body
        // is never counted as delivered.
        .reply(Reply::Verdict)
        .secrets(vec![chainwatch::sign::Secret::parse(SECRET).unwrap()])
        // Two checks: the standardwebhooks crate accepts a truncated signature, so the
        // full-length check of our own verifier must agree.
        .check(|headers, body| {
            standardwebhooks::Webhook::new(SECRET)
                .unwrap()
                .verify(body, headers)
                .map_err(|e| format!("standardwebhooks: {e:?}"))?;
            // Every body the suite receives must be what its type's schema says.
            check_schema(body)
        })
}

/// Validates a webhook body against the JSON Schema of its type (`schemas/`).
pub fn check_schema(body: &[u8]) -> Result<(), String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static VALIDATORS: OnceLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> =
        OnceLock::new();
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let kind = value["type"].as_str().unwrap_or_default().to_string();
    let validator = {
        let mut all = VALIDATORS.get_or_init(Default::default).lock().unwrap();
        match all.get(&kind) {
            Some(v) => v.clone(),
            None => {
                let text = chainwatch::schemas::schema(&kind)
                    .ok_or_else(|| format!("no schema for event type {kind:?}"))?;
                let schema: serde_json::Value = serde_json::from_str(text).unwrap();
                let v = Arc::new(
                    jsonschema::draft202012::new(&schema)
                        .map_err(|e| format!("schema of {kind} does not compile: {e}"))?,
                );
                all.insert(kind.clone(), v.clone());
                v
            }
        }
    };
    validator
        .validate(&value)
        .map_err(|e| format!("{kind} body fails its schema at {}: {e}", e.instance_path()))
}

/// A verifying receiver on a free loopback port, answering 204.
pub async fn receiver() -> Receiver {
    receiver_on(0).await
}

/// A verifying receiver on a chosen loopback port (0: any).
pub async fn receiver_on(port: u16) -> Receiver {
    verifying().bind_loopback(port).await.unwrap()
}

/// A watch of `address` with its confirmations and label.
pub fn watch(address: &str, confirmations: u32, label: &str) -> WatchEntry {
    WatchEntry::address(address)
        .confirmations(confirmations)
        .label(label)
}

pub fn descriptor_watch(
    descriptor: &str,
    confirmations: u32,
    label: &str,
    gap_limit: u32,
) -> WatchEntry {
    WatchEntry::descriptor(descriptor, gap_limit)
        .confirmations(confirmations)
        .label(label)
}

/// Where a harness's daemon keeps its store.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    /// A fresh PostgreSQL database (its URL).
    Postgres(String),
}

impl Backend {
    /// A fresh PostgreSQL database, or `None` (skip) when no server is configured.
    pub fn postgres(test: &str) -> Option<Backend> {
        chainwatch::testkit::postgres::fresh_database(test).map(Backend::Postgres)
    }
}

/// Defines `mod NAME` with two tests running `NAME(backend)`: on SQLite, and on PostgreSQL
/// when a server is configured (see testkit::postgres).
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::harness::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(b) = $crate::harness::Backend::postgres(stringify!($name)) {
                    super::$name(b).await
                }
            }
        }
    };
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub node: SimNode,
    pub receiver: Receiver,
    pub config_path: PathBuf,
    /// What `config_path` holds; a test changes a copy and writes it back.
    pub config: ConfigBuilder,
}

/// The endpoint every harness config has, delivering to `Harness::receiver`.
pub const SHOP: &str = "shop";

impl Harness {
    /// A simulated node with 130 blocks (spendable coins), a receiver, and a config watching `watches`.
    pub async fn new(watches: &[WatchEntry]) -> Harness {
        Harness::with(watches, |c| c).await
    }

    /// As `new`, with the store on `backend`.
    pub async fn on(backend: Backend, watches: &[WatchEntry]) -> Harness {
        let store = match &backend {
            Backend::Sqlite => None,
            Backend::Postgres(url) => Some(chainwatch::testkit::StoreSection {
                url: Some(url.clone()),
                ..Default::default()
            }),
        };
        let mut h = Harness::start(watches, true, |mut c| {
            c.store = store;
            c
        })
        .await;
        h.backend = backend;
        h
    }

    /// As `new`, with the config changed by `configure` before it is written.
    pub async fn with(
        watches: &[WatchEntry],
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Harness {
        Harness::start(watches, true, configure).await
    }

    /// A node without ZMQ: the watcher can only poll.
    pub async fn without_zmq(watches: &[WatchEntry]) -> Harness {
        Harness::start(watches, false, |c| c).await
    }

    async fn start(
        watches: &[WatchEntry],
        zmq: bool,
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let node_dir = dir.path().join("node");
        let node = if zmq {
            SimNode::start(&node_dir).await
        } else {
            SimNode::start_without_zmq(&node_dir).await
        };
        let node = node.unwrap();
        // 30 mature coinbases: payments need not chain on each other's change.
        node.mine(130);
        let receiver = receiver().await;
        let config_path = dir.path().join("watcher.toml");
        let config = configure(Harness::base_config(&node, &receiver, watches));
        config.write_to(&config_path).unwrap();
        Harness {
            dir,
            backend: Backend::Sqlite,
            node,
            receiver,
            config_path,
            config,
        }
    }

    /// Regtest, data in `data` beside the config, the node polled every 300 ms, the `shop`
    /// endpoint at `receiver`, the API on an ephemeral port, and each watch with an order id.
    fn base_config(node: &SimNode, receiver: &Receiver, watches: &[WatchEntry]) -> ConfigBuilder {
        let mut c = ConfigBuilder::regtest()
            .data_dir("data")
            .bitcoind(Bitcoind::simnode(node).poll_interval("300ms"))
            .endpoint(
                Endpoint::new(SHOP, &receiver.url)
                    .secret(SECRET)
                    .timeout("60s"),
            )
            .api(Api::listen("127.0.0.1:0"));
        for (i, w) in watches.iter().enumerate() {
            c = c.watch(w.clone().meta("order_id", 1000 + i as i64));
        }
        c
    }

    /// Writes `config` as this harness's config file (for a daemon started after).
    pub fn rewrite_config(&mut self, config: ConfigBuilder) {
        config.write_to(&self.config_path).unwrap();
        self.config = config;
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs chainwatch in this process until the returned token is cancelled.
    pub fn start_daemon(&self) -> Daemon {
        let cfg =
            chainwatch::config::Config::load(&self.config_path).expect("test config is valid");
        let token = CancellationToken::new();
        let run = chainwatch::daemon::run(cfg, token.clone());
        let handle = tokio::spawn(async move {
            let r = run.await;
            // A daemon that ends by itself would otherwise only show as a test timing out.
            if let Err(e) = &r {
                eprintln!("in-process daemon ended: {e:#}");
            }
            r
        });
        Daemon { token, handle }
    }

    /// Runs the release binary (as users do) against this harness.
    pub fn spawn_binary(&self) -> std::process::Child {
        self.spawn_binary_with(&self.config_path)
    }

    /// The binary with another config (a second watcher on the same node).
    pub fn spawn_binary_with(&self, config: &std::path::Path) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
            .args(["run", "--config"])
            .arg(config)
            .env("CHAINWATCH_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chainwatch binary starts")
    }

    /// The binary with its log (warnings and errors) in `log`, and extra environment.
    pub fn spawn_binary_logged(
        &self,
        log: &std::path::Path,
        env: &[(&str, &str)],
    ) -> std::process::Child {
        let file = std::fs::File::create(log).expect("log file");
        std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("CHAINWATCH_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(file)
            .spawn()
            .expect("chainwatch binary starts")
    }

    /// The binary with at most `nofile` open file descriptors (as a tight systemd limit would).
    pub fn spawn_binary_fd_limited(&self, nofile: u32) -> std::process::Child {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {nofile} && exec \"$0\" run --config \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_chainwatch"))
            .arg(&self.config_path)
            .env("CHAINWATCH_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chainwatch binary starts")
    }

    /// Waits until chainwatch's stored tip is the node's tip, then a little longer so its ZMQ
    /// subscription takes hold (messages published before that are lost, as with bitcoind).
    pub async fn wait_synced(&self) {
        self.wait_synced_dir(&self.data_dir()).await
    }

    /// As `wait_synced`, for the watcher whose data directory is `dir`.
    pub async fn wait_synced_dir(&self, dir: &std::path::Path) {
        wait_for("chainwatch to reach the node's tip", WAIT, || {
            let tip = match &self.backend {
                Backend::Postgres(url) => Ok(chainwatch::pg::PgStore::open(
                    url,
                    &dir.join(chainwatch::store::AUDIT_KEY_FILE),
                    "test",
                )
                .and_then(|s| chainwatch::store::AdminStore::tip(&s))),
                Backend::Sqlite if chainwatch::store::db_path(dir).exists() => {
                    chainwatch::store::Store::open(dir).map(|s| s.tip())
                }
                Backend::Sqlite => Ok(Ok(None)),
            };
            if matches!(&tip, Ok(Ok(Some(t))) if t.hash == self.node.tip()) {
                return Ok(());
            }
            Err(format!(
                "chainwatch did not reach the node's tip {} at {}: store says {tip:?}",
                self.node.tip(),
                self.node.height()
            ))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Waits until chainwatch's store holds at least `n` events (whatever was delivered).
    pub async fn wait_events(&self, n: usize) {
        let db = chainwatch::store::db_path(&self.data_dir());
        wait_until(&format!("{n} events in the store"), WAIT, || {
            db.exists() && self.store().events_after(0, 10_000).unwrap().len() >= n
        })
        .await
    }

    /// The store as the admin API sees it, whichever the backend.
    pub fn admin(&self) -> Box<dyn chainwatch::store::AdminStore> {
        match &self.backend {
            Backend::Sqlite => Box::new(self.store()),
            Backend::Postgres(url) => Box::new(
                chainwatch::pg::PgStore::open(
                    url,
                    &self.data_dir().join(chainwatch::store::AUDIT_KEY_FILE),
                    "test",
                )
                .unwrap(),
            ),
        }
    }

    pub fn store(&self) -> chainwatch::store::Store {
        chainwatch::store::Store::open(&self.data_dir()).unwrap()
    }
}

pub struct Daemon {
    pub token: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    pub async fn stop(self) {
        self.token.cancel();
        self.handle
            .await
            .expect("daemon task")
            .expect("daemon stops cleanly");
    }
}

/// A store with `n` events waiting for one endpoint, and the worker delivering them on a fake clock.
pub struct Outbox {
    pub dir: tempfile::TempDir,
    pub clock: Arc<AtomicI64>,
    pub wake: Arc<Notify>,
    pub token: CancellationToken,
    pub endpoints: Vec<EndpointConfig>,
    pub ids: Vec<String>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

pub const T0: i64 = 1_800_000_000_000;

impl Outbox {
    pub async fn new(endpoints: &[Endpoint], n: usize) -> Outbox {
        Outbox::new_at(endpoints, n, T0).await
    }

    /// As `new`, with the fake clock starting at `t0` (ms).
    pub async fn new_at(endpoints: &[Endpoint], n: usize, t0: i64) -> Outbox {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ConfigBuilder::default().data_dir(dir.path());
        config.endpoints = endpoints.to_vec();
        let cfg = config.parse().unwrap();
        let mut store = Store::open(&cfg.data_dir).unwrap();
        store.check_network("regtest").unwrap();
        store.sync_endpoints(&cfg.endpoints).unwrap();
        let events: Vec<event::NewEvent> = chainwatch::testkit::sample_events(n, "test");
        let ids = events.iter().map(|e| e.id.clone()).collect();
        store.commit(&ChangeSet::events(events), t0).unwrap();
        let clock = Arc::new(AtomicI64::new(t0));
        let mut o = Outbox {
            dir,
            clock,
            wake: Arc::new(Notify::new()),
            token: CancellationToken::new(),
            endpoints: cfg.endpoints,
            ids,
            workers: vec![],
        };
        for ep in o.endpoints.clone() {
            let c = o.clock.clone();
            let clock: Clock = Arc::new(move || c.load(Ordering::SeqCst));
            let store = Store::open(o.dir.path()).unwrap();
            let ctx = dispatch::Context {
                clock,
                ..dispatch::Context::new(o.wake.clone(), o.token.clone())
            };
            o.workers
                .push(tokio::spawn(dispatch::run_endpoint(ep, store, ctx)));
        }
        o
    }

    pub fn store(&self) -> Store {
        Store::open(self.dir.path()).unwrap()
    }

    pub fn set_clock(&self, ms: i64) {
        self.clock.store(ms, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    /// Waits until event `event` has `n` recorded attempts; returns them.
    pub async fn attempts(&self, event: usize, n: usize) -> Vec<chainwatch::store::AttemptRow> {
        wait_for(&format!("{n} attempts"), WAIT, || {
            let a = self.store().attempts_for(&self.ids[event]).unwrap();
            if a.len() >= n {
                return Ok(a);
            }
            Err(format!("have {}: {a:?}", a.len()))
        })
        .await
    }

    pub fn delivery(&self, event: usize) -> chainwatch::store::DeliveryRow {
        let id = &self.ids[event];
        self.store()
            .list_deliveries(None, None, 10_000)
            .unwrap()
            .into_iter()
            .find(|d| &d.event_id == id)
            .unwrap()
    }

    pub fn next_attempt(&self, event: usize) -> i64 {
        self.delivery(event).next_attempt_at
    }

    pub fn alerts(&self, kind: &str) -> Vec<serde_json::Value> {
        self.store()
            .events_after(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| serde_json::from_str(&e.body).unwrap())
            .collect()
    }

    pub async fn stop(self) {
        self.token.cancel();
        for w in self.workers {
            w.await.expect("worker ends cleanly");
        }
    }
}

pub const WAIT: Duration = Duration::from_secs(20);

/// The (type, confirmations) sequence the receiver got for one txid, in sequence order.
pub fn history(events: &[Captured], txid: &str) -> Vec<(String, u64)> {
    let mut v: Vec<&Captured> = events.iter().filter(|c| c.data()["txid"] == txid).collect();
    v.sort_by_key(|c| c.data()["sequence"].as_i64());
    v.dedup_by_key(|c| c.id.clone());
    v.iter()
        .map(|c| {
            (
                c.kind().to_string(),
                c.data()["confirmations"].as_u64().unwrap(),
            )
        })
        .collect()
}

pub fn expect_history(kinds: &[(&str, u64)]) -> Vec<(String, u64)> {
    kinds.iter().map(|(k, c)| (k.to_string(), *c)).collect()
}

pub fn script(address: &str) -> bitcoin::ScriptBuf {
    let a: bitcoin::Address<bitcoin::address::NetworkUnchecked> = address.parse().unwrap();
    a.assume_checked().script_pubkey()
}

/// (type, txid) of every accepted event, in sequence order, each id once.
pub fn log_of(events: &[Captured]) -> Vec<(String, String)> {
    let mut v: Vec<&Captured> = events.iter().collect();
    v.sort_by_key(|c| c.data()["sequence"].as_i64());
    v.dedup_by_key(|c| c.id.clone());
    v.iter()
        .map(|c| {
            (
                c.kind().to_string(),
                c.data()["txid"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// An HTTP client for tests: no proxy from the environment, and the process's TLS provider
/// installed (reqwest is built without one of its own).
pub fn http_client() -> reqwest::Client {
    chainwatch::net::install_crypto_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}
