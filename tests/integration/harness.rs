//! Test harness: a capturing receiver that verifies every request with an independent Standard
//! Webhooks implementation, a simulated node, and chainwatch run in-process or as the binary.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use chainwatch::simnode::SimNode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Addresses of every standard type (the captured shop wallet's).
pub const P2PKH: &str = "n3iet9u1ki76AoPrk9p6NUhjqxeyQfihSg";
pub const P2SH: &str = "2N5nWUDnNCr3kqQesi1YGqBojYwjS4P9Zw9";
pub const P2WPKH: &str = "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp";
pub const P2TR: &str = "bcrt1pgf9g8v63sselca7rgx5uyl0xwjjp4vpfn89vt3gdutvpjc8xq8vs0mmh98";
/// A p2wsh address (BIP173's test vector script, on regtest).
pub const P2WSH: &str = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub id: String,
    pub body: String,
    pub json: Value,
    /// What the independent verifier said.
    pub verified: bool,
    /// The status the receiver answered.
    pub answered: u16,
}

impl Captured {
    pub fn kind(&self) -> &str {
        self.json["type"].as_str().unwrap_or("")
    }
    pub fn data(&self) -> &Value {
        &self.json["data"]
    }
}

#[derive(Clone)]
pub struct TestReceiver {
    pub url: String,
    captured: Arc<Mutex<Vec<Captured>>>,
    status: Arc<AtomicU16>,
    hang_ms: Arc<AtomicU64>,
    /// TLS handshakes completed and failed (an https receiver only).
    pub handshakes: Arc<AtomicU64>,
    pub failed_handshakes: Arc<AtomicU64>,
}

impl TestReceiver {
    pub async fn start() -> TestReceiver {
        TestReceiver::start_on(0).await
    }

    /// A receiver on a chosen loopback port (0: any).
    pub async fn start_on(port: u16) -> TestReceiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let r = TestReceiver::new(url);
        let app = r.router();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        r
    }

    /// An https receiver at `https://localhost:PORT/hooks` serving `tls`.
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> TestReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let r = TestReceiver::new(format!("https://localhost:{port}/hooks"));
        let (app, ok, failed) = (
            r.router(),
            r.handshakes.clone(),
            r.failed_handshakes.clone(),
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, app, ok, failed) =
                    (acceptor.clone(), app.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    ok.fetch_add(1, Ordering::SeqCst);
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let mut app = app.clone();
                            async move {
                                tower_service::Service::call(
                                    &mut app,
                                    req.map(axum::body::Body::new),
                                )
                                .await
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        r
    }

    fn new(url: String) -> TestReceiver {
        TestReceiver {
            url,
            captured: Default::default(),
            status: Arc::new(AtomicU16::new(204)),
            hang_ms: Arc::new(AtomicU64::new(0)),
            handshakes: Default::default(),
            failed_handshakes: Default::default(),
        }
    }

    /// Captures every request, verifying its signature with the independent implementation.
    fn router(&self) -> Router {
        let me = self.clone();
        let handler = move |headers: HeaderMap, body: Bytes| {
            let me = me.clone();
            async move {
                let hang = me.hang_ms.load(Ordering::SeqCst);
                // Two checks: the standardwebhooks crate accepts a truncated signature, so the
                // full-length check of our own verifier must agree.
                let header = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let ours = chainwatch::sign::verify(
                    &[chainwatch::sign::Secret::parse(SECRET).unwrap()],
                    &header("webhook-id"),
                    &header("webhook-timestamp"),
                    &header("webhook-signature"),
                    &body,
                    chainwatch::event::now_ms() / 1000,
                    chainwatch::sign::DEFAULT_TOLERANCE_SECS,
                )
                .is_ok();
                let verified = ours
                    && standardwebhooks::Webhook::new(SECRET)
                        .unwrap()
                        .verify(&body, &headers)
                        .is_ok();
                let text = String::from_utf8_lossy(&body).into_owned();
                let answered = if hang > 0 {
                    0
                } else {
                    me.status.load(Ordering::SeqCst)
                };
                me.captured.lock().unwrap().push(Captured {
                    id: headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                    json: serde_json::from_str(&text).unwrap_or(Value::Null),
                    body: text,
                    verified,
                    answered,
                });
                if hang > 0 {
                    tokio::time::sleep(Duration::from_millis(hang)).await;
                }
                StatusCode::from_u16(me.status.load(Ordering::SeqCst)).unwrap()
            }
        };
        Router::new().fallback(axum::routing::post(handler))
    }

    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }

    /// Holds every request this long before answering (0: answer at once).
    pub fn set_hang(&self, d: Duration) {
        self.hang_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn all(&self) -> Vec<Captured> {
        self.captured.lock().unwrap().clone()
    }

    /// Requests answered with 2xx: what the receiver accepted, in arrival order.
    pub fn accepted(&self) -> Vec<Captured> {
        self.all()
            .into_iter()
            .filter(|c| (200..300).contains(&c.answered))
            .collect()
    }

    /// Waits until `n` distinct event ids were accepted.
    pub async fn wait_accepted(&self, n: usize, limit: Duration) -> Vec<Captured> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let got = self.accepted();
            let mut ids: Vec<&str> = got.iter().map(|c| c.id.as_str()).collect();
            ids.sort();
            ids.dedup();
            if ids.len() >= n {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                let kinds: Vec<String> = got
                    .iter()
                    .map(|c| format!("{} {}", c.kind(), c.data()["confirmations"]))
                    .collect();
                panic!(
                    "waited {limit:?} for {n} accepted events, got {}: {kinds:?}",
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` requests arrived, whatever was answered.
    pub async fn wait_requests(&self, n: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.all().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {limit:?} for {n} requests"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub struct WatchSpec {
    /// An address, or a descriptor (with `gap_limit`).
    pub address: &'static str,
    pub confirmations: u32,
    pub label: &'static str,
    pub gap_limit: Option<u32>,
}

pub fn watch(address: &'static str, confirmations: u32, label: &'static str) -> WatchSpec {
    WatchSpec {
        address,
        confirmations,
        label,
        gap_limit: None,
    }
}

pub fn descriptor_watch(
    descriptor: &'static str,
    confirmations: u32,
    label: &'static str,
    gap_limit: u32,
) -> WatchSpec {
    WatchSpec {
        address: descriptor,
        confirmations,
        label,
        gap_limit: Some(gap_limit),
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub node: SimNode,
    pub receiver: TestReceiver,
    pub config_path: PathBuf,
}

/// What a harness varies: top-level config keys, endpoint keys, a node without ZMQ.
#[derive(Default)]
pub struct Options {
    pub top: &'static str,
    /// Extra keys of the `shop` endpoint.
    pub endpoint: String,
    /// The `shop` endpoint's URL instead of the harness's plain-http receiver.
    pub endpoint_url: Option<String>,
    pub no_zmq: bool,
    /// The [api] table's body; empty means an ephemeral port.
    pub api: String,
}

impl Harness {
    /// A simulated node with 130 blocks (spendable coins), a receiver, and a config watching `watches`.
    pub async fn new(watches: &[WatchSpec], extra: &'static str) -> Harness {
        Harness::with(
            watches,
            Options {
                top: extra,
                ..Options::default()
            },
        )
        .await
    }

    pub async fn with(watches: &[WatchSpec], opts: Options) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let node_dir = dir.path().join("node");
        let node = if opts.no_zmq {
            SimNode::start_without_zmq(&node_dir).await
        } else {
            SimNode::start(&node_dir).await
        };
        let node = node.unwrap();
        // 30 mature coinbases: payments need not chain on each other's change.
        node.mine(130);
        let receiver = TestReceiver::start().await;
        let config_path = dir.path().join("watcher.toml");
        let h = Harness {
            dir,
            node,
            receiver,
            config_path,
        };
        std::fs::write(&h.config_path, h.config_text(watches, &opts)).unwrap();
        h
    }

    pub fn config_text(&self, watches: &[WatchSpec], opts: &Options) -> String {
        let mut t = format!(
            "network = \"regtest\"\ndata_dir = \"data\"\n{}\n[bitcoind]\nrpc_url = \"{}\"\ncookie_file = {:?}\npoll_interval = \"300ms\"\n\n[[endpoints]]\nname = \"shop\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\ntimeout = \"60s\"\n{}\n",
            opts.top,
            self.node.rpc_url(),
            self.node.cookie_path().display().to_string(),
            opts.endpoint_url.as_deref().unwrap_or(&self.receiver.url),
            opts.endpoint,
        );
        let api = if opts.api.is_empty() {
            "listen = \"127.0.0.1:0\""
        } else {
            opts.api.as_str()
        };
        t.push_str(&format!("\n[api]\n{api}\n"));
        for (i, w) in watches.iter().enumerate() {
            let target = match w.gap_limit {
                Some(g) => format!("descriptor = \"{}\"\ngap_limit = {g}", w.address),
                None => format!("address = \"{}\"", w.address),
            };
            t.push_str(&format!(
                "\n[[watches]]\n{}\nconfirmations = {}\nlabel = \"{}\"\nmetadata = {{ order_id = {} }}\n",
                target,
                w.confirmations,
                w.label,
                1000 + i
            ));
        }
        t
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
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let db = chainwatch::store::db_path(dir);
            let tip = if db.exists() {
                chainwatch::store::Store::open(dir).map(|s| s.tip())
            } else {
                Ok(Ok(None))
            };
            if matches!(&tip, Ok(Ok(Some(t))) if t.hash == self.node.tip()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chainwatch did not reach the node's tip {} at {}: store says {tip:?}",
                self.node.tip(),
                self.node.height()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Waits until chainwatch's store holds at least `n` events (whatever was delivered).
    pub async fn wait_events(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let db = chainwatch::store::db_path(&self.data_dir());
            if db.exists() && self.store().events_after(0, 10_000).unwrap().len() >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited for {n} events in the store"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
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

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, even by a panic.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` every 20 ms until it holds, or panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP client for tests: no proxy from the environment, and the process's TLS provider
/// installed (reqwest is built without one of its own).
pub fn http_client() -> reqwest::Client {
    chainwatch::net::install_crypto_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}
