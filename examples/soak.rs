//! Soak run (not CI): the release binary against the simulated node for a long while, with
//! payments and blocks all along and, at random, SIGKILLs, node restarts, reorgs, receiver
//! outages and write locks held by another process. At the end the receiver's history must
//! equal the event log: no sequence missing, no id with two bodies. Prints the database size
//! every minute so a retention setting can be seen to level it off.
//!
//! `scripts/soak [MINUTES]` builds and runs it (default 60).

use chainwatch::delivery::DeliveryStatus;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use chainwatch::simnode::SimNode;
use chainwatch::store::Store;
use rand::Rng;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WATCHED: [&str; 4] = [
    "n3iet9u1ki76AoPrk9p6NUhjqxeyQfihSg",
    "2N5nWUDnNCr3kqQesi1YGqBojYwjS4P9Zw9",
    "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp",
    "bcrt1pgf9g8v63sselca7rgx5uyl0xwjjp4vpfn89vt3gdutvpjc8xq8vs0mmh98",
];

/// What the receiver saw: every body per id, and which signatures failed.
#[derive(Default)]
struct Seen {
    bodies: HashMap<String, Vec<String>>,
    bad_signatures: usize,
}

struct Receiver {
    seen: Arc<Mutex<Seen>>,
    status: Arc<AtomicU16>,
}

async fn receiver(port: u16) -> Receiver {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let status = Arc::new(AtomicU16::new(204));
    let (s, st) = (seen.clone(), status.clone());
    let secrets = vec![chainwatch::sign::Secret::parse(SECRET).unwrap()];
    let handler = move |headers: HeaderMap, body: Bytes| {
        let (s, st, secrets) = (s.clone(), st.clone(), secrets.clone());
        async move {
            let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
            let code = st.load(Ordering::SeqCst);
            if code == 204 {
                let ok = chainwatch::sign::verify(
                    &secrets,
                    h("webhook-id"),
                    h("webhook-timestamp"),
                    h("webhook-signature"),
                    &body,
                    chainwatch::event::now_ms() / 1000,
                    300,
                )
                .is_ok();
                let mut seen = s.lock().unwrap();
                if !ok {
                    seen.bad_signatures += 1;
                }
                seen.bodies
                    .entry(h("webhook-id").to_string())
                    .or_default()
                    .push(String::from_utf8_lossy(&body).into_owned());
            }
            StatusCode::from_u16(code).unwrap()
        }
    };
    let app = axum::Router::new().fallback(axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver { seen, status }
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rx = receiver(port).await;
    let data = dir.path().join("data");
    let config = dir.path().join("watcher.toml");
    let mut text = format!(
        "network = \"regtest\"\ndata_dir = {data:?}\n[bitcoind]\nrpc_url = \"{}\"\ncookie_file = {:?}\npoll_interval = \"1s\"\n\n[[endpoints]]\nname = \"shop\"\nurl = \"http://127.0.0.1:{port}/hooks\"\nsecret = \"{SECRET}\"\nordered = false\nretry_schedule = [\"1s\", \"2s\", \"5s\", \"10s\", \"10s\", \"10s\", \"10s\", \"10s\", \"10s\", \"10s\"]\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[retention]\nattempts = \"2m\"\nevents = \"10m\"\n",
        node.rpc_url(),
        node.cookie_path()
    );
    for (i, a) in WATCHED.iter().enumerate() {
        text.push_str(&format!(
            "\n[[watches]]\naddress = \"{a}\"\nconfirmations = {}\nlabel = \"soak-{i}\"\n",
            2 + i % 2
        ));
    }
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("chainwatch.log");
    let mut child = spawn(&bin, &config, &log);
    let mut rng = rand::rng();
    let began = Instant::now();
    let end = began + Duration::from_secs(minutes * 60);
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut outage_until = Instant::now();
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
        if Instant::now() > outage_until && rx.status.load(Ordering::SeqCst) != 204 {
            rx.status.store(204, Ordering::SeqCst);
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
                rx.status.store(503, Ordering::SeqCst);
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
                rx.seen.lock().unwrap().bodies.len()
            );
        }
    }
    // Calm: receiver up, a few blocks so everything confirms. Deliveries that went dead during
    // an outage longer than the (short) retry schedule are redelivered, as an operator would
    // with `chainwatch redeliver --dead`; then wait for the queue to empty.
    rx.status.store(204, Ordering::SeqCst);
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
    let seen = rx.seen.lock().unwrap();
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
        "sequences missing at the receiver: {missing}; ids with two bodies: {two_bodies}; log rows differing from what was received: {differing}; bad signatures: {}",
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
    let ok = missing == 0
        && two_bodies == 0
        && differing == 0
        && seen.bad_signatures == 0
        && audit.problem.is_none();
    println!("{}", if ok { "PASS" } else { "FAIL" });
    std::process::exit(if ok { 0 } else { 1 });
}
