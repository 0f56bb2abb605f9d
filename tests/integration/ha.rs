//! Two instances sharing one PostgreSQL store (SPEC section 8): one leads and follows the
//! chain, the other stands by and takes over when the leader dies; both deliver. Each has a
//! simulated node of its own, and the two nodes follow the same chain (`Network`), as two
//! bitcoinds on one network would. Needs `CHAINWATCH_TEST_PG_URL` (CI starts a server with
//! scripts/pg-cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chainwatch::pg::PgConn;
use chainwatch::testkit::postgres::fresh_database;

use crate::harness::*;

const LEASE: Duration = Duration::from_secs(2);
const URL_ENV: &str = "CHAINWATCH_STORE_URL";
const TOKEN: &str = "ha-test-token-of-forty-characters-000000";

/// Two simulated nodes on one network: every payment and block reaches both. The simulated
/// node is deterministic, so the same calls on both give the same transactions and blocks
/// (checked at every step).
struct Network {
    second: chainwatch::simnode::SimNode,
}

impl Network {
    async fn start(h: &Harness) -> Network {
        let second = chainwatch::simnode::SimNode::start(&h.dir.path().join("node-b"))
            .await
            .unwrap();
        second.mine(h.node.height());
        assert_eq!(second.tip(), h.node.tip(), "both nodes start on one chain");
        Network { second }
    }

    fn pay(&self, h: &Harness, address: &str, amount: u64) -> bitcoin::Txid {
        let txid = h.node.pay(address, amount);
        assert_eq!(
            self.second.pay(address, amount),
            txid,
            "one payment on both nodes"
        );
        txid
    }

    fn mine(&self, h: &Harness) {
        assert_eq!(
            self.second.mine(1),
            h.node.mine(1),
            "one block on both nodes"
        );
    }
}

struct Instance {
    name: &'static str,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    process: Option<KillOnDrop>,
    starts: u32,
}

impl Instance {
    /// An instance following `node` (the harness's own, or the network's second).
    fn new(h: &Harness, name: &'static str, node: &chainwatch::simnode::SimNode) -> Instance {
        let port = free_port();
        let dir = h.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("watcher.toml");
        h.config
            .clone()
            .data_dir(dir.join("data"))
            // Both chain the shared log with one key: the second machine gets a copy.
            .audit_key_file(h.dir.path().join("audit.key"))
            .api(Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN))
            .bitcoind(Bitcoind::simnode(node).poll_interval("300ms"))
            .postgres_env(URL_ENV, "2s")
            .write_to(&config)
            .unwrap();
        Instance {
            name,
            log: dir.join("log"),
            config,
            port,
            process: None,
            starts: 0,
        }
    }

    fn start(&mut self, url: &str) {
        self.starts += 1;
        self.process = Some(chainwatch::testkit::run_daemon(
            env!("CARGO_BIN_EXE_chainwatch"),
            &self.config,
            &self.log,
            &[("CHAINWATCH_LOG", "info"), (URL_ENV, url)],
        ));
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    /// `/health`'s role and epoch, if the instance answers.
    async fn role(&self) -> Option<(String, i64)> {
        chainwatch::testkit::health_role(self.port).await
    }

    /// `/metrics`' role gauges: (chainwatch_leader, chainwatch_lease_epoch).
    async fn metrics_role(&self) -> (i64, i64) {
        let text = http_client()
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let gauge = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in /metrics:\n{text}"))
        };
        (gauge("chainwatch_leader"), gauge("chainwatch_lease_epoch"))
    }

    async fn wait_role(&self, role: &str, limit: Duration) -> i64 {
        chainwatch::testkit::wait_role(self.port, role, limit, self.name, &self.log).await
    }
}

/// As `wait_until`, showing what the instances logged if it times out: a failover that did
/// not happen on a loaded CI machine must say why.
async fn wait_logged(
    what: &str,
    limit: Duration,
    instances: &[&Instance],
    mut cond: impl FnMut() -> bool,
) {
    wait_for(what, limit, || {
        if cond() {
            return Ok(());
        }
        Err(instances
            .iter()
            .map(|i| {
                let log = std::fs::read_to_string(&i.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!(
                    "\n--- instance {} log (last 40 lines):\n{}",
                    i.name,
                    tail.join("\n")
                )
            })
            .collect())
    })
    .await
}

/// The event log as stored: (seq, id, type, body) in sequence order.
fn stored_events(url: &str) -> Vec<(i64, String, String, String)> {
    let conn = PgConn::open(url).unwrap();
    conn.query("SELECT seq, id, type, body FROM events ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// A harness with one watch (P2WPKH, one confirmation) changed by `configure`, a second node
/// on its chain, and two instances on the database at `url`: `a` leading (the epoch it took is
/// returned), `b` standing by.
async fn leader_and_standby(
    url: &str,
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (Harness, Network, Instance, Instance, i64) {
    let h = Harness::with(&[watch(P2WPKH, 1, "shop order")], configure).await;
    let net = Network::start(&h).await;
    let mut a = Instance::new(&h, "a", &h.node);
    let mut b = Instance::new(&h, "b", &net.second);
    a.start(url);
    let epoch = a.wait_role("leader", WAIT).await;
    b.start(url);
    b.wait_role("standby", WAIT).await;
    (h, net, a, b, epoch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_ten_times_loses_nothing_and_sends_each_id_with_one_body() {
    let Some(url) = fresh_database("ha_failover") else {
        return;
    };
    let (h, net, mut a, mut b, first_epoch) = leader_and_standby(&url, |c| {
        // A short timeout: a killed instance's claims (timeout + 5 s) come back sooner.
        c.map_endpoint(SHOP, |e| e.events(["*"]).timeout("3s"))
    })
    .await;

    let mut takeovers = Vec::new();
    let mut payments = BTreeSet::new();
    let (mut leader, mut standby) = (&mut a, &mut b);
    let mut epoch = first_epoch;
    for round in 0..10u64 {
        payments.insert(net.pay(&h, P2WPKH, 10_000 + round).to_string());
        // Killed at a different moment of the pipeline each round.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..600))).await;
        net.mine(&h);
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..600))).await;
        leader.kill();
        let killed = Instant::now();
        let new_epoch = standby.wait_role("leader", LEASE * 4).await;
        takeovers.push(killed.elapsed());
        assert!(
            new_epoch > epoch,
            "round {round}: the new leader's epoch {new_epoch} follows {epoch}"
        );
        epoch = new_epoch;
        leader.start(&url);
        leader.wait_role("standby", WAIT).await;
        std::mem::swap(&mut leader, &mut standby);
    }
    net.mine(&h);

    // Every confirmation recorded, then every recorded event delivered.
    wait_logged(
        "ten tx.confirmed in the shared log",
        WAIT,
        &[&a, &b],
        || {
            stored_events(&url)
                .iter()
                .filter(|e| e.2 == "tx.confirmed")
                .count()
                == 10
        },
    )
    .await;
    let log = stored_events(&url);
    let ids: BTreeSet<String> = log.iter().map(|e| e.1.clone()).collect();
    wait_until("every stored event at the receiver", WAIT * 2, || {
        let got: BTreeSet<String> = h.receiver.accepted().into_iter().map(|c| c.id).collect();
        ids.is_subset(&got)
    })
    .await;

    let seqs: Vec<i64> = log.iter().map(|e| e.0).collect();
    let expected: Vec<i64> = (1..=log.len() as i64).collect();
    assert_eq!(seqs, expected, "sequence is gap-free across ten failovers");
    let mut bodies: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in h.receiver.accepted() {
        assert!(c.verified(), "every request verifies: {:?}", c.verdict);
        bodies
            .entry(c.id.clone())
            .or_default()
            .insert(c.body.clone());
    }
    for (id, b) in &bodies {
        assert_eq!(b.len(), 1, "event {id} was sent with {} bodies", b.len());
    }
    let confirmed: BTreeSet<String> = log
        .iter()
        .filter(|e| e.2 == "tx.confirmed")
        .map(|e| {
            let body: serde_json::Value = serde_json::from_str(&e.3).unwrap();
            body["data"]["txid"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(confirmed, payments, "each payment confirmed exactly once");
    let changes = log.iter().filter(|e| e.2 == "alert.leader_changed").count();
    assert_eq!(
        changes, 11,
        "one alert.leader_changed per lease taken (the first and ten takeovers)"
    );
    for t in &takeovers {
        assert!(
            *t <= LEASE + Duration::from_millis(1_500),
            "a takeover took {t:?}, more than the lease {LEASE:?} (all: {takeovers:?})"
        );
    }
    eprintln!("takeovers after SIGKILL: {takeovers:?}");

    let audit = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(["audit", "verify", "--config"])
        .arg(&a.config)
        .env(URL_ENV, &url)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&audit.stdout).to_string()
        + &String::from_utf8_lossy(&audit.stderr);
    assert!(audit.status.success(), "audit verify passes: {said}");
    // The leader may have recorded more since `log` was read (alerts): at least those rows.
    let verified: usize = said
        .split(" rows verified")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        verified >= log.len(),
        "audit verify walked the whole log of {} rows: {said}",
        log.len()
    );
    let password = url::Url::parse(&url)
        .unwrap()
        .password()
        .unwrap_or("")
        .to_string();
    for i in [&a, &b] {
        let text = std::fs::read_to_string(&i.log).unwrap();
        assert!(
            password.is_empty() || !text.contains(&password),
            "instance {}'s log shows the database password",
            i.name
        );
    }
    a.kill();
    b.kill();
}

fn signal(i: &Instance, sig: &str) {
    let pid = i.process.as_ref().expect("running").0.id();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_writes_nothing_when_it_wakes_and_says_so() {
    let Some(url) = fresh_database("ha_paused") else {
        return;
    };
    let (h, net, mut a, mut b, paused_epoch) = leader_and_standby(&url, |c| {
        c.map_endpoint(SHOP, |e| e.events(["*"]).timeout("3s"))
    })
    .await;
    let before = stored_events(&url).len();

    signal(&a, "-STOP");
    let new_epoch = b.wait_role("leader", LEASE * 4).await;
    assert!(new_epoch > paused_epoch, "b took a newer epoch");
    // The chain moves on while a sleeps: b records it.
    let paid = net.pay(&h, P2WPKH, 25_000).to_string();
    net.mine(&h);
    wait_logged(
        "b records the payment's confirmation",
        WAIT,
        &[&a, &b],
        || {
            stored_events(&url)
                .iter()
                .any(|e| e.2 == "tx.confirmed" && e.3.contains(&paid))
        },
    )
    .await;
    signal(&a, "-CONT");
    // a wakes with a follower that believes it leads; within a renewal it must know better.
    a.wait_role("standby", LEASE * 2).await;
    net.mine(&h);
    wait_logged("b records the next block", WAIT, &[&a, &b], || {
        stored_events(&url)
            .iter()
            .filter(|e| e.2 == "block.connected")
            .count()
            >= 2
    })
    .await;
    let log = stored_events(&url);
    assert!(log.len() > before, "b recorded the new blocks' events");
    let seqs: Vec<i64> = log.iter().map(|e| e.0).collect();
    assert_eq!(
        seqs,
        (1..=log.len() as i64).collect::<Vec<_>>(),
        "gap-free: the woken leader inserted nothing"
    );
    let connected: Vec<&String> = log
        .iter()
        .filter(|e| e.2 == "block.connected")
        .map(|e| &e.1)
        .collect();
    let distinct: BTreeSet<&String> = connected.iter().copied().collect();
    assert_eq!(
        connected.len(),
        distinct.len(),
        "no block was recorded twice"
    );
    let a_log = std::fs::read_to_string(&a.log).unwrap();
    assert!(
        a_log.contains("lost the leader lease"),
        "the woken leader says it lost the lease:\n{a_log}"
    );
    let (role, epoch) = b.role().await.expect("b answers");
    assert_eq!(
        (role.as_str(), epoch),
        ("leader", new_epoch),
        "b still leads"
    );
    assert_eq!(b.metrics_role().await, (1, new_epoch), "/metrics: b leads");
    assert_eq!(
        a.metrics_role().await,
        (0, new_epoch),
        "/metrics: a stands by and has seen b's epoch"
    );
    let changed: Vec<serde_json::Value> = log
        .iter()
        .filter(|e| e.2 == "alert.leader_changed")
        .map(|e| serde_json::from_str(&e.3).unwrap())
        .collect();
    let last = &changed.last().expect("alert.leader_changed recorded")["data"];
    assert_eq!(
        last["epoch"], new_epoch,
        "the alert names the new epoch: {last}"
    );
    assert!(
        last["previous_instance"].is_string() && last["previous_instance"] != last["instance"],
        "and the instance it took over from: {last}"
    );
    a.kill();
    b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_migrate_copies_ten_thousand_events_with_identical_pages_and_chain() {
    use chainwatch::store::{AdminStore, AttemptOutcome, DeliveryResult};
    let Some(url) = fresh_database("migrate") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("watcher.toml");
    let config = ConfigBuilder::regtest()
        .data_dir(dir.path().join("data"))
        .endpoint(
            Endpoint::new(SHOP, "http://127.0.0.1:9/hooks")
                .secret(SECRET)
                .events(["*"]),
        )
        .watch(watch(P2WPKH, 3, "order"));
    config.write_to(&config_path).unwrap();
    let cfg = chainwatch::config::Config::load(&config_path).unwrap();
    let mut sqlite = chainwatch::daemon::open_store(&cfg).unwrap();
    for batch in 0..10 {
        let events: Vec<_> = (0..1_000)
            .map(|i| chainwatch::testkit::sample_event(&format!("m-{batch}-{i}")))
            .collect();
        sqlite
            .commit(
                &chainwatch::changeset::ChangeSet::events(events),
                T0 + batch,
            )
            .unwrap();
    }
    // Some history of attempts too: the first 300 delivered.
    let due = sqlite.due_deliveries(SHOP, T0 + 100, false, 300).unwrap();
    let done: Vec<_> = due
        .into_iter()
        .map(|d| {
            let o = AttemptOutcome {
                started_at_ms: T0 + 100,
                duration_ms: 3,
                status_code: Some(204),
                error: None,
                response_excerpt: Some("ok".into()),
                result: DeliveryResult::Delivered,
            };
            (d, o)
        })
        .collect();
    sqlite.record_attempts(SHOP, &done).unwrap();
    drop(sqlite);

    let migrate = |target: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
            .args(["store", "migrate", "--to", target, "--config"])
            .arg(&config_path)
            .output()
            .unwrap()
    };
    let out = migrate(&url);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "store migrate succeeds: {said}");
    assert!(
        said.contains("events: 10000 rows"),
        "progress names each table: {said}"
    );
    let password = url::Url::parse(&url)
        .unwrap()
        .password()
        .unwrap_or("")
        .to_string();
    assert!(
        password.is_empty() || !said.contains(&password),
        "the password is not shown: {said}"
    );

    let before = chainwatch::store::Store::open_keyed(&cfg.data_dir, &cfg.audit_key_file).unwrap();
    let after = chainwatch::pg::PgStore::open(&url, &cfg.audit_key_file, "test").unwrap();
    let mut pages = 0;
    let mut cursor = 0;
    loop {
        let a = AdminStore::events_after(&before, cursor, 100).unwrap();
        let b = AdminStore::events_after(&after, cursor, 100).unwrap();
        assert_eq!(a, b, "the page after sequence {cursor} is the same");
        let Some(last) = a.last() else { break };
        cursor = last.seq;
        pages += 1;
    }
    assert_eq!(pages, 100, "10,000 events in pages of 100");
    assert_eq!(
        AdminStore::audit(&before).unwrap(),
        AdminStore::audit(&after).unwrap(),
        "same chain, same head"
    );
    let listed = |s: &dyn AdminStore| {
        s.list_deliveries(None, None, 20_000)
            .unwrap()
            .iter()
            .map(|d| (d.event_seq, d.status, d.attempts))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(&before),
        listed(&after),
        "deliveries and their states"
    );
    let first = AdminStore::events_after(&before, 0, 1).unwrap()[0]
        .id
        .clone();
    let attempts = |s: &dyn AdminStore| {
        s.attempts_for(&first)
            .unwrap()
            .iter()
            .map(|a| (a.started_at, a.status_code, a.response_excerpt.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(attempts(&before), attempts(&after), "attempts");
    assert_eq!(attempts(&after).len(), 1);
    assert_eq!(
        AdminStore::load_watches(&before).unwrap().len(),
        AdminStore::load_watches(&after).unwrap().len()
    );

    // Into a database that is no longer empty: refused, nothing changed.
    let again = migrate(&url);
    let said = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(
        !again.status.success() && said.contains("not empty"),
        "a second migrate is refused: {said}"
    );
    assert_eq!(
        AdminStore::events_after(&after, 9_990, 100).unwrap().len(),
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_go_on_when_an_instance_dies_mid_request_and_an_ordered_endpoint_keeps_order() {
    let Some(url) = fresh_database("ha_mid_request") else {
        return;
    };
    let ledger = receiver().await;
    let ledger_url = ledger.url.clone();
    let (h, net, mut a, mut b, _) = leader_and_standby(&url, |c| {
        c.map_endpoint(SHOP, |e| e.events(["tx.*"]).timeout("2s").concurrency(4))
            .endpoint(
                Endpoint::new("ledger", &ledger_url)
                    .secret(SECRET)
                    .events(["tx.*"])
                    .ordered(true)
                    .timeout("2s"),
            )
    })
    .await;
    // Slow receivers: every request is still open for a while, so the kill lands mid-request,
    // and the shop's worker (four in flight) holds the other payments claimed ahead, unsent:
    // they come back to the standby when the dead instance's claims run out.
    h.receiver.set_hang(Duration::from_millis(400));
    ledger.set_hang(Duration::from_millis(400));
    for i in 0..8 {
        net.pay(&h, P2WPKH, 20_000 + i);
    }
    wait_until("requests under way at both receivers", WAIT, || {
        h.receiver.count() >= 2 && ledger.count() >= 1
    })
    .await;
    a.kill();
    b.wait_role("leader", LEASE * 4).await;
    net.mine(&h);
    wait_until("eight tx.confirmed in the shared log", WAIT, || {
        stored_events(&url)
            .iter()
            .filter(|e| e.2 == "tx.confirmed")
            .count()
            == 8
    })
    .await;
    let ids: BTreeSet<String> = stored_events(&url)
        .iter()
        .filter(|e| e.2.starts_with("tx."))
        .map(|e| e.1.clone())
        .collect();
    assert_eq!(ids.len(), 16, "eight payments, pending and confirmed");
    for (name, r) in [("shop", &h.receiver), ("ledger", &ledger)] {
        wait_until(&format!("every tx event at {name}"), WAIT * 2, || {
            let got: BTreeSet<String> = r.accepted().into_iter().map(|c| c.id).collect();
            ids.is_subset(&got)
        })
        .await;
        let mut bodies: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for c in r.all() {
            bodies
                .entry(c.id.clone())
                .or_default()
                .insert(c.body.clone());
        }
        assert!(
            bodies.values().all(|b| b.len() == 1),
            "{name}: an id was sent with two bodies"
        );
    }
    // Ordered: each event first arrives after every earlier one first arrived.
    let mut first_seen = Vec::new();
    for c in ledger.all() {
        let seq = c.data()["sequence"].as_i64().unwrap();
        if !first_seen.contains(&seq) {
            first_seen.push(seq);
        }
    }
    let mut sorted = first_seen.clone();
    sorted.sort_unstable();
    assert_eq!(
        first_seen, sorted,
        "the ordered endpoint got its events in order"
    );
    a.kill();
    b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_cut_by_the_server_is_reopened_and_nothing_is_lost() {
    let Some(url) = fresh_database("ha_cut") else {
        return;
    };
    let h = Harness::on(Backend::Postgres(url.clone()), &[watch(P2WPKH, 1, "cut")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let first = h.node.pay(P2WPKH, 31_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    // The server ends every session of this database (a restart or a failover of PostgreSQL
    // looks the same to the daemon): the follower's, each worker's, the API's, the loader's.
    let admin = PgConn::open(&url).unwrap();
    let cut: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(cut >= 2, "the daemon's sessions were cut ({cut})");
    // The first step after the cut may fail on a session not yet seen closed; it is retried
    // on a new one, and the payment is announced.
    let second = h.node.pay(P2WPKH, 32_000).to_string();
    h.receiver.wait_accepted(2, WAIT).await;
    h.node.mine(1);
    // pending and confirmed of both payments
    let got = h.receiver.wait_accepted(4, WAIT).await;
    daemon.stop().await;
    let confirmed: BTreeSet<String> = got
        .iter()
        .filter(|c| c.kind() == "tx.confirmed")
        .map(|c| c.data()["txid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        confirmed,
        BTreeSet::from([first, second]),
        "both payments confirmed after the cut"
    );
    let seqs: Vec<i64> = stored_events(&url).iter().map(|e| e.0).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "gap-free across the cut"
    );
}
