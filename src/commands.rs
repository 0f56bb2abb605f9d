//! What each CLI command does; `main.rs` only parses arguments and calls these.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, StoreConfig};
use crate::daemon::{self, now_ms, open_store, Backend, PgBackend};
use crate::delivery::DeliveryStatus;
use crate::event::type_matches;
use crate::node::{ChainSource, RpcClient};
use crate::sign::{self, Secret};
use crate::store::AdminStore;
use crate::store::Store;
use crate::watch::check_metadata;

/// The store as it is (the commands that only read or act on what is stored). The command line
/// uses it through `AdminStore` only, as the admin API does.
fn stored(cfg: &Config) -> anyhow::Result<Box<dyn AdminStore>> {
    Ok(match &cfg.store {
        StoreConfig::Sqlite => Box::new(Store::open_keyed(&cfg.data_dir, &cfg.audit_key_file)?),
        StoreConfig::Postgres { url, leader_lease } => {
            Box::new(PgBackend::new(cfg, url, *leader_lease).open()?)
        }
    })
}

/// The store made to match the config first (endpoints, config watches, network).
fn configured(cfg: &Config) -> anyhow::Result<Box<dyn AdminStore>> {
    Ok(match &cfg.store {
        StoreConfig::Sqlite => Box::new(open_store(cfg)?),
        StoreConfig::Postgres { url, leader_lease } => {
            Box::new(PgBackend::new(cfg, url, *leader_lease).prepare(cfg)?)
        }
    })
}

pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

/// Initialises logging; JSON lines when asked (for log shippers).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHAINWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Cancels the token on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: finishing in-flight deliveries");
        t.cancel();
    });
    token
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let token = shutdown_on_signals();
    daemon::run(cfg, token).await
}

pub async fn check(cfg: Config) -> anyhow::Result<()> {
    println!(
        "config: ok ({} endpoints, {} watches, network {})",
        cfg.endpoints.len(),
        cfg.watches.len(),
        crate::config::network_name(cfg.network)
    );
    let rpc = RpcClient::new(&cfg.bitcoind.rpc_url, cfg.bitcoind.auth.clone());
    let info = rpc.chain_info().await.with_context(|| {
        format!(
            "reaching bitcoind at {}",
            crate::net::redact_url(&cfg.bitcoind.rpc_url)
        )
    })?;
    daemon::check_chain(&cfg, &info)?;
    println!(
        "node: {} chain {} height {} best {}",
        crate::net::redact_url(&cfg.bitcoind.rpc_url),
        info.chain,
        info.blocks,
        info.best_block_hash
    );
    let announced = rpc.zmq_notifications().await.unwrap_or_default();
    let subs = daemon::subscriptions(&cfg, &announced);
    for topic in ["sequence", "rawtx", "rawblock"] {
        match subs.iter().find(|s| s.topic == topic) {
            Some(s) => println!("zmq {topic}: {}", s.address),
            None => println!(
                "zmq {topic}: MISSING (add zmqpub{topic}=tcp://127.0.0.1:PORT to bitcoin.conf)"
            ),
        }
    }
    if !subs.iter().any(|s| s.topic == "sequence") {
        println!(
            "warning: without zmq sequence chainwatch follows by polling every {:?}",
            cfg.bitcoind.poll_interval
        );
    }
    if cfg.data_dir.join(crate::store::DB_FILE).exists() {
        let store = stored(&cfg)?;
        match store.tip()? {
            Some(tip) => println!(
                "store: tip {} at height {}, {} blocks behind the node",
                tip.hash,
                tip.height,
                info.blocks.saturating_sub(tip.height)
            ),
            None => println!("store: empty"),
        }
    } else {
        println!("store: not created yet ({})", cfg.data_dir.display());
    }
    Ok(())
}

/// What `watch add` was given.
pub struct WatchArgs {
    pub target: String,
    pub confirmations: Option<u32>,
    pub gap_limit: Option<u32>,
    pub label: Option<String>,
    pub metadata: Option<String>,
    pub rescan_from: Option<u32>,
    /// `--endpoint`, repeated; empty: every endpoint.
    pub endpoints: Vec<String>,
    pub min_amount: Option<u64>,
}

pub fn watch_add(cfg: &Config, a: WatchArgs) -> anyhow::Result<()> {
    let confirmations = a.confirmations.unwrap_or(cfg.default_confirmations);
    if confirmations == 0 || confirmations > 1000 {
        bail!("--confirmations {confirmations}: must be between 1 and 1000");
    }
    let metadata: serde_json::Value = match a.metadata {
        None => serde_json::json!({}),
        Some(text) => serde_json::from_str(&text)
            .with_context(|| format!("--metadata {text:?} is not JSON"))?,
    };
    check_metadata(&metadata).map_err(|e| anyhow::anyhow!("--metadata: {e}"))?;
    let w = crate::watch::parse_target(
        &a.target,
        cfg.network,
        a.gap_limit,
        confirmations,
        a.label,
        metadata,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", a.target))?;
    let routes = (!a.endpoints.is_empty()).then_some(a.endpoints);
    if let Some(r) = &routes {
        let names: Vec<&str> = cfg.endpoints.iter().map(|e| e.name.as_str()).collect();
        crate::watch::check_routes(r, &names).map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
    }
    let w = w.routed(routes, a.min_amount.unwrap_or(0));
    let mut store = configured(cfg)?;
    store.upsert_watches(std::slice::from_ref(&w), "cli", now_ms())?;
    println!("{}", w.id);
    if let Some(from) = a.rescan_from {
        store.request_rescan(&w.id, from)?;
        show_rescan_progress(store.as_ref(), &w.id, from);
    }
    Ok(())
}

/// Follows the running watcher's rescan of `watch_id` with a progress line (blocks, rate, ETA).
/// Leaves it running if nothing moves: the rescan is stored and resumes with `chainwatch run`.
fn show_rescan_progress(store: &dyn AdminStore, watch_id: &str, from: u32) {
    use std::io::Write;
    let started = std::time::Instant::now();
    let (mut last_next, mut last_move) = (from, std::time::Instant::now());
    loop {
        let next = store
            .rescans()
            .ok()
            .and_then(|r| r.into_iter().find(|(id, _)| id == watch_id).map(|(_, n)| n));
        let tip = store.tip().ok().flatten().map(|t| t.height).unwrap_or(0);
        let Some(next) = next else {
            eprintln!(
                "\rrescan done: blocks {from}..={tip} in {:.2}s{}",
                started.elapsed().as_secs_f64(),
                " ".repeat(20)
            );
            return;
        };
        if next != last_next {
            (last_next, last_move) = (next, std::time::Instant::now());
        }
        let done = next.saturating_sub(from) as f64;
        let total = (tip + 1).saturating_sub(from).max(1) as f64;
        let rate = done / started.elapsed().as_secs_f64().max(0.001);
        let eta = if rate > 0.0 {
            format!("{:.0}s", (total - done) / rate)
        } else {
            "?".into()
        };
        let width = 30usize;
        let filled = ((done / total) * width as f64).round() as usize;
        eprint!(
            "\rrescan [{}{}] block {next} of {tip}, {rate:.0} blocks/s, ETA {eta}   ",
            "#".repeat(filled.min(width)),
            ".".repeat(width - filled.min(width))
        );
        let _ = std::io::stderr().flush();
        if last_move.elapsed() > std::time::Duration::from_secs(15) {
            eprintln!("\nno progress for 15s: is `chainwatch run` going? The rescan is stored and resumes when it runs.");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn watch_list(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let store = configured(cfg)?;
    let watches = store.load_watches()?;
    if json {
        println!("{}", serde_json::to_string(&watches)?);
        return Ok(());
    }
    for w in watches {
        println!(
            "{}  {}  conf={}  label={}  metadata={}",
            w.id,
            w.target_text(),
            w.confirmations,
            w.label.as_deref().unwrap_or(""),
            w.metadata
        );
    }
    Ok(())
}

pub fn watch_remove(cfg: &Config, id: &str) -> anyhow::Result<()> {
    let mut store = configured(cfg)?;
    if !store.remove_watch(id)? {
        bail!("no watch with id {id}");
    }
    println!("removed {id}");
    Ok(())
}

pub fn events_list(cfg: &Config, after: i64, glob: Option<&str>, json: bool) -> anyhow::Result<()> {
    let store = stored(cfg)?;
    let mut after = after;
    loop {
        let page = store.events_after(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in page
            .iter()
            .filter(|e| glob.is_none_or(|g| type_matches(g, &e.kind)))
        {
            if json {
                println!("{}", e.body);
            } else {
                println!("{:>6}  {:<17} {}", e.seq, e.kind, e.id);
            }
        }
    }
    Ok(())
}

pub fn deliveries_list(
    cfg: &Config,
    status: Option<&str>,
    endpoint: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let status = match status {
        None => None,
        Some(s) => Some(DeliveryStatus::parse(s).with_context(|| {
            format!("--status {s:?}: expected pending, failed, dead, delivered or held")
        })?),
    };
    let store = stored(cfg)?;
    for d in store.list_deliveries(status, endpoint, i64::MAX)? {
        if json {
            let v = serde_json::json!({
                "event_seq": d.event_seq, "event_type": d.event_type, "event_id": d.event_id,
                "endpoint": d.endpoint, "status": d.status.as_str(), "attempts": d.attempts,
                "next_attempt_at_ms": d.next_attempt_at, "last_status": d.last_status,
                "last_error": d.last_error,
            });
            println!("{v}");
            continue;
        }
        println!(
            "{:>6}  {:<17} {}  {:<10} {:<9} attempts={} last={}",
            d.event_seq,
            d.event_type,
            d.event_id,
            d.endpoint,
            d.status.as_str(),
            d.attempts,
            d.last_error.unwrap_or_default()
        );
    }
    Ok(())
}

pub fn redeliver(
    cfg: &Config,
    event_id: Option<&str>,
    endpoint: Option<&str>,
) -> anyhow::Result<()> {
    let mut store = stored(cfg)?;
    if let Some(id) = event_id {
        if store.event_by_id(id)?.is_none() {
            bail!("no event with id {id}");
        }
    }
    let n = store.redeliver(event_id, endpoint, now_ms())?;
    println!("{n} deliveries queued again");
    Ok(())
}

pub fn endpoints_list(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let store = configured(cfg)?;
    for e in store.list_endpoints()? {
        if json {
            let v = serde_json::json!({
                "name": e.name, "url": crate::net::redact_url(&e.url), "enabled": e.enabled,
                "disabled_reason": e.disabled_reason, "waiting": e.pending, "dead": e.dead,
            });
            println!("{v}");
            continue;
        }
        let state = if e.enabled {
            "enabled".to_string()
        } else {
            format!("DISABLED ({})", e.disabled_reason.unwrap_or_default())
        };
        println!(
            "{:<12} {:<40} {}  waiting={} dead={}",
            e.name,
            crate::net::redact_url(&e.url),
            state,
            e.pending,
            e.dead
        );
    }
    Ok(())
}

pub fn endpoints_enable(cfg: &Config, name: &str) -> anyhow::Result<()> {
    let mut store = configured(cfg)?;
    if !store.set_endpoint_enabled(name, true, None)? {
        bail!("no endpoint named {name}");
    }
    println!("enabled {name}");
    Ok(())
}

/// Records a `webhook.test` for `name` alone and waits for the running daemon's first attempt
/// at it: prints the status code and the response excerpt (or the error). Fails unless the
/// endpoint answered 2xx.
pub fn endpoints_test(cfg: &Config, name: &str) -> anyhow::Result<()> {
    let Some(ep) = cfg.endpoints.iter().find(|e| e.name == name) else {
        let names: Vec<&str> = cfg.endpoints.iter().map(|e| e.name.as_str()).collect();
        bail!(
            "no endpoint named {name:?} (configured: {})",
            names.join(", ")
        );
    };
    let mut store = configured(cfg)?;
    let crate::store::CommittedEvent { id, seq, .. } = store.record_test_event(name, now_ms())?;
    println!("webhook.test {id} (sequence {seq}) queued for {name}; waiting for the delivery");
    // The daemon's worker looks at least every second; the attempt then takes up to the timeout.
    let limit = ep.timeout + std::time::Duration::from_secs(30);
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let Some(a) = store.attempts_for(&id)?.into_iter().next() {
            let excerpt = a.response_excerpt.unwrap_or_default();
            return match (a.status_code, a.error) {
                (Some(code), _) if (200..300).contains(&code) => {
                    println!("{name} answered {code} in {} ms: {excerpt}", a.duration_ms);
                    Ok(())
                }
                (Some(code), _) => {
                    bail!("{name} answered {code} in {} ms: {excerpt}", a.duration_ms)
                }
                (None, error) => bail!(
                    "{name} could not be reached: {}",
                    error.unwrap_or_else(|| "no answer".into())
                ),
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    bail!(
        "no attempt within {}s: is `chainwatch run` running? (the test event stays queued and goes out when it is)",
        limit.as_secs()
    )
}

pub fn audit_verify(cfg: &Config, anchor: Option<&str>) -> anyhow::Result<()> {
    let store = stored(cfg)?;
    let report = store.audit()?;
    if let Some((seq, why)) = report.problem {
        bail!(
            "event log broken at sequence {seq} (after {} good rows): {why}",
            report.verified
        );
    }
    if let Some(anchor) = anchor {
        let (seq, chain) = anchor
            .split_once([' ', ':'])
            .and_then(|(s, c)| Some((s.trim().parse::<i64>().ok()?, c.trim())))
            .with_context(|| {
                format!(
                    "--anchor {anchor:?}: expected \"SEQUENCE CHAIN\" as `audit head` prints it"
                )
            })?;
        if let Some(c) = store.audit_checkpoint()?.filter(|c| seq < *c) {
            bail!("the anchor at sequence {seq} predates the retention checkpoint at sequence {c}: it can no longer be checked (anchor newer heads more often than retention prunes)");
        }
        match store.chain_at(seq)? {
            Some(c) if c == chain => {}
            Some(_) => bail!("event log differs from the anchor: sequence {seq} has another chain value (the log was rewritten)"),
            None => bail!("event log is shorter than the anchor: sequence {seq} is missing (the log was cut back)"),
        }
    }
    match report.head {
        Some((seq, chain)) => println!(
            "event log intact: {} rows verified; head {seq} {chain}",
            report.verified
        ),
        None => println!("event log intact: no events yet"),
    }
    Ok(())
}

/// Prints the newest sequence and its chain value, to be recorded somewhere the store's
/// owner cannot rewrite (a later `audit verify` head must extend it).
pub fn audit_head(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let store = stored(cfg)?;
    let report = store.audit()?;
    if let Some((seq, why)) = report.problem {
        bail!("event log broken at sequence {seq}: {why}; no head to anchor");
    }
    let (seq, chain) = report.head.unwrap_or((0, String::new()));
    if json {
        println!("{}", serde_json::json!({ "sequence": seq, "chain": chain }));
    } else {
        println!("{seq} {chain}");
    }
    Ok(())
}

fn parse_secrets(texts: &[String]) -> anyhow::Result<Vec<Secret>> {
    texts
        .iter()
        .map(|s| Secret::parse(s).map_err(|e| anyhow::anyhow!("--secret: {e}")))
        .collect()
}

pub async fn receive(listen: &str, secrets: &[String]) -> anyhow::Result<()> {
    use crate::testkit::receiver::{describe, Receiver, Reply};
    let secrets = parse_secrets(secrets)?;
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?}: expected IP:PORT"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!(
        "listening on http://{listen}/ ; verifying with {} secret(s)",
        secrets.len()
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Printed, not kept: this receiver may run for hours.
    let _receiver = Receiver::builder()
        .secrets(secrets)
        .reply(Reply::Verdict)
        .forward_to(tx)
        .keep_nothing()
        .serve(listener);
    while let Some(r) = rx.recv().await {
        println!("{}", describe(&r));
        println!("{}", r.body);
    }
    Ok(())
}

pub fn verify(
    secrets: &[String],
    id: &str,
    timestamp: &str,
    signature: &str,
    tolerance: i64,
) -> anyhow::Result<()> {
    let secrets = parse_secrets(secrets)?;
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .context("reading the body from stdin")?;
    let now = now_ms() / 1000;
    sign::verify(&secrets, id, timestamp, signature, &body, now, tolerance)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("signature valid");
    Ok(())
}

/// `store migrate --to URL`: copies the SQLite store into an empty PostgreSQL database, then
/// checks that the copy's event log verifies to the same head under the same audit key.
pub fn store_migrate(cfg: &Config, to: &str) -> anyhow::Result<()> {
    if !crate::config::is_postgres_url(to) {
        bail!(
            "--to {}: expected a postgres://user:password@host:port/database URL",
            crate::net::redact_url(to)
        );
    }
    // Opening would create an empty store (and a new key) where there is none: check first.
    let db = crate::store::db_path(&cfg.data_dir);
    if !db.exists() {
        bail!("no SQLite store at {}: check data_dir", db.display());
    }
    if !cfg.audit_key_file.exists() {
        bail!(
            "no audit key at {}: check [audit] key_file (the store was chained with a key)",
            cfg.audit_key_file.display()
        );
    }
    // Opening brings an older store's schema and chain up to date first.
    let source = Store::open_keyed(&cfg.data_dir, &cfg.audit_key_file)?;
    let before = source.audit()?;
    if let Some((seq, why)) = &before.problem {
        bail!("the SQLite event log does not verify (sequence {seq}: {why}); not copying a broken log");
    }
    drop(source);
    println!(
        "copying {} into {}",
        crate::store::db_path(&cfg.data_dir).display(),
        crate::net::redact_url(to)
    );
    let copied = crate::pg::migrate_sqlite(&cfg.data_dir, to, &mut |table, n| {
        println!("  {table}: {n} rows")
    })?;
    let copy = crate::pg::PgStore::open(to, &cfg.audit_key_file, "migrate")?;
    let after = copy.audit()?;
    if after != before {
        bail!(
            "the copy does not verify like the original (original: {} rows, head {:?}; copy: {} rows, head {:?}, problem {:?})",
            before.verified, before.head, after.verified, after.head, after.problem
        );
    }
    let events = copied
        .iter()
        .find(|(t, _)| *t == "events")
        .map_or(0, |c| c.1);
    match after.head {
        Some((seq, chain)) => println!("done: {events} events copied; the copy's event log verifies to the same head {seq} {chain}"),
        None => println!("done: the store had no events yet"),
    }
    println!("now set [store] url (or url_env) to the new database and start chainwatch");
    Ok(())
}

/// `chainwatch simnode`: the simulated node on its own, for trying `run` and `check` without
/// bitcoind. Prints the `[bitcoind]` section that reaches it; mines every `mine_every` if given.
pub async fn simnode(dir: &std::path::Path, mine_every: Option<&str>) -> anyhow::Result<()> {
    let every = mine_every
        .map(|t| {
            crate::config::parse_duration(t)
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--mine-every {t:?}: expected a duration such as 10s"))
        })
        .transpose()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let node = crate::simnode::SimNode::start(dir)
        .await
        .context("starting the simulated node")?;
    // A wallet with mature coins, as `chainwatch demo` has.
    node.mine(101);
    println!("# chainwatch simnode: a simulated regtest node (not bitcoind), at height 101.");
    println!(
        "# Its ZMQ publishers are announced over RPC (getzmqnotifications). For watcher.toml:"
    );
    println!("[bitcoind]");
    println!("rpc_url = {:?}", node.rpc_url());
    println!(
        "cookie_file = {:?}",
        node.cookie_path().display().to_string()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let stop = shutdown_on_signals();
    match every {
        None => stop.cancelled().await,
        Some(every) => loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {
                    node.mine(1);
                    eprintln!("mined block {}", node.height());
                }
            }
        },
    }
    node.stop();
    Ok(())
}
