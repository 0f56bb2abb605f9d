//! Soak run (not CI): the release binary against the simulated node for a long while, with
//! payments and blocks all along and, at random, SIGKILLs, node restarts, reorgs, receiver
//! outages and write locks held by another process. At the end the receiver's history must
//! equal the event log: no sequence missing, no id with two bodies. Prints the database size
//! every minute so a retention setting can be seen to level it off.
//!
//! `scripts/soak [MINUTES]` builds and runs it (default 60).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chainwatch::delivery::DeliveryStatus;
use chainwatch::simnode::SimNode;
use chainwatch::store::Store;
use chainwatch::testkit::{
    Api, Bitcoind, ConfigBuilder, Endpoint, Receiver, Retention, WatchEntry,
};
use rand::RngExt;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WATCHED: [&str; 4] = [
    "n3iet9u1ki76AoPrk9p6NUhjqxeyQfihSg",
    "2N5nWUDnNCr3kqQesi1YGqBojYwjS4P9Zw9",
    "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp",
    "bcrt1pgf9g8v63sselca7rgx5uyl0xwjjp4vpfn89vt3gdutvpjc8xq8vs0mmh98",
];

/// What the receiver accepted: every body per id, and how many failed their signature check.
#[derive(Default)]
struct Seen {
    bodies: HashMap<String, Vec<String>>,
    bad_signatures: usize,
}

fn seen(rx: &Receiver) -> Seen {
    let mut seen = Seen::default();
    for c in rx.accepted() {
        if !c.verified() {
            seen.bad_signatures += 1;
        }
        seen.bodies.entry(c.id.clone()).or_default().push(c.body);
    }
    seen
}

fn spawn(bin: &Path, config: &Path, log: &Path) -> Child {
    Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("CHAINWATCH_LOG", "warn")
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("chainwatch starts")
}

fn db_bytes(data: &Path) -> u64 {
    [
        "chainwatch.sqlite",
        "chainwatch.sqlite-wal",
        "chainwatch.sqlite-shm",
    ]
    .iter()
    .filter_map(|f| std::fs::metadata(data.join(f)).ok())
    .map(|m| m.len())
    .sum()
}

/// How many distinct events' deliveries died, from the daemon's log.
fn dead_deliveries(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("delivery dead"))
        .filter_map(|l| l.split("evt_").nth(1))
        .map(|rest| rest.chars().take(32).collect::<String>())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn hold_lock(db: PathBuf, secs: u64) {
    std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        if conn.execute_batch("BEGIN IMMEDIATE").is_ok() {
            std::thread::sleep(Duration::from_secs(secs));
            let _ = conn.execute_batch("ROLLBACK");
        }
    });
}

#[tokio::main]
async fn main() {
    let minutes: u64 = std::env::args()
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(60);
    let bin = std::env::var("CHAINWATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/release/chainwatch"));
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start(&dir.path().join("node")).await.unwrap();
    node.mine(130);
    let secret = chainwatch::sign::Secret::parse(SECRET).unwrap();
    let rx = Receiver::builder()
        .secrets(vec![secret])
        .bind_loopback(0)
        .await
        .unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("watcher.toml");
    let mut builder = ConfigBuilder::regtest()
        .data_dir(&data)
        .bitcoind(Bitcoind::simnode(&node).poll_interval("1s"))
        .endpoint(
            Endpoint::new("shop", &rx.url)
                .secret(SECRET)
                .ordered(false)
                .retry_schedule([
                    "1s", "2s", "5s", "10s", "10s", "10s", "10s", "10s", "10s", "10s",
                ]),
        )
        .api(Api::listen("127.0.0.1:0"))
        .retention(Retention {
            attempts: Some("2m".into()),
            events: Some("10m".into()),
        });
    for (i, a) in WATCHED.iter().enumerate() {
        builder = builder.watch(
            WatchEntry::address(a)
                .confirmations(2 + i as u32 % 2)
                .label(&format!("soak-{i}")),
        );
    }
    builder.write_to(&config).unwrap();
    let log = dir.path().join("chainwatch.log");
    let mut child = spawn(&bin, &config, &log);
    let mut rng = rand::rng();
    let began = Instant::now();
    let end = began + Duration::from_secs(minutes * 60);
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut outage_until = Instant::now();
    let mut outage = false;
    let mut next_sample = Instant::now();
    let mut sizes = Vec::new();
    println!(
        "soak: {minutes} min, chainwatch {}, data {}",
        bin.display(),
        data.display()
    );
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        node.pay(
            WATCHED[rng.random_range(0..WATCHED.len())],
            rng.random_range(1_000..5_000_000),
        );
        *counts.entry("payments").or_default() += 1;
        if rng.random_bool(0.2) {
            node.mine(1);
            *counts.entry("blocks").or_default() += 1;
        }
        if outage && Instant::now() > outage_until {
            rx.set_status(204);
            outage = false;
        }
        match rng.random_range(0..400) {
            0 => {
                let _ = child.kill();
                let _ = child.wait();
                child = spawn(&bin, &config, &log);
                *counts.entry("sigkills").or_default() += 1;
            }
            1 => {
                node.restart(2).await.unwrap();
                *counts.entry("node restarts").or_default() += 1;
            }
            2 => {
                rx.set_status(503);
                outage = true;
                outage_until = Instant::now() + Duration::from_secs(rng.random_range(10..90));
                *counts.entry("receiver outages").or_default() += 1;
            }
            3 => {
                hold_lock(chainwatch::store::db_path(&data), rng.random_range(5..25));
                *counts.entry("lock holds").or_default() += 1;
            }
            4 if node.height() > 140 => {
                node.reorg(rng.random_range(1..4), true);
                *counts.entry("reorgs").or_default() += 1;
            }
            _ => {}
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(60);
            let size = db_bytes(&data);
            sizes.push(size);
            println!(
                "t={:>3} min  database {:>7.2} MB  received {}  {counts:?}",
                began.elapsed().as_secs() / 60,
                size as f64 / 1e6,
                rx.accepted_count()
            );
        }
    }
    // Calm: receiver up, a few blocks so everything confirms. Deliveries that went dead during
    // an outage longer than the (short) retry schedule are redelivered, as an operator would
    // with `chainwatch redeliver --dead`; then wait for the queue to empty.
    rx.set_status(204);
    node.mine(4);
    let store = || Store::open(&data).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let dead = store()
        .redeliver(None, None, chainwatch::event::now_ms())
        .unwrap();
    *counts.entry("dead deliveries redelivered").or_default() += dead as u64;
    let settle = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let open = [DeliveryStatus::Pending, DeliveryStatus::Failed]
            .into_iter()
            .map(|s| store().list_deliveries(Some(s), None, 1).unwrap().len())
            .sum::<usize>();
        if open == 0 || Instant::now() > settle {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    let s = store();
    let log_rows = s.events_after(0, i64::MAX).unwrap();
    let max_seq = log_rows.last().map_or(0, |r| r.seq);
    let seen = seen(&rx);
    let mut received_seqs = std::collections::BTreeSet::new();
    let mut two_bodies = 0;
    for bodies in seen.bodies.values() {
        if bodies.iter().any(|b| b != &bodies[0]) {
            two_bodies += 1;
        }
        let v: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
        received_seqs.insert(v["data"]["sequence"].as_i64().unwrap_or(0));
    }
    let missing = (1..=max_seq).filter(|q| !received_seqs.contains(q)).count();
    // Deliveries that died during an outage longer than the (short) retry schedule and were
    // given up by events retention before the end are, by design, never received: the only
    // sequences allowed to be missing. The daemon logs each death once.
    let died = dead_deliveries(&log);
    let given_up = died.saturating_sub(dead);
    let differing = log_rows
        .iter()
        .filter(|r| seen.bodies.get(&r.id).is_none_or(|b| b[0] != r.body))
        .count();
    let audit = s.audit().unwrap();
    println!(
        "\n== soak over after {:.1} min: {counts:?}",
        began.elapsed().as_secs_f64() / 60.0
    );
    println!(
        "events recorded {max_seq} (kept in the log {}), received {} distinct ids",
        log_rows.len(),
        seen.bodies.len()
    );
    println!(
        "sequences missing at the receiver: {missing} (deliveries that died: {died}, redelivered at the end: {dead}, so given up by retention: {given_up}); ids with two bodies: {two_bodies}; log rows differing from what was received: {differing}; bad signatures: {}",
        seen.bad_signatures
    );
    println!(
        "audit verify: {}",
        audit
            .problem
            .as_ref()
            .map_or("intact".to_string(), |p| format!("{p:?}"))
    );
    let mb: Vec<String> = sizes
        .iter()
        .map(|b| format!("{:.2}", *b as f64 / 1e6))
        .collect();
    println!("database size per minute (MB): {}", mb.join(" "));
    let ok = missing <= given_up
        && two_bodies == 0
        && differing == 0
        && seen.bad_signatures == 0
        && audit.problem.is_none();
    println!("{}", if ok { "PASS" } else { "FAIL" });
    std::process::exit(if ok { 0 } else { 1 });
}
