//! The example receivers of `examples/receivers/` (Python with Flask, Node with Express, each
//! with its language's `standardwebhooks` package) run against the pipeline: every event is
//! stored and acted on once, a duplicate is answered 200 without a second action, a tampered or
//! stale request is refused, and what was sent while the receiver was down is caught up from
//! `/v1/events` when it starts. Skipped where the language's packages are missing, unless
//! `CHAINWATCH_REQUIRE_RECEIVERS=1` (CI sets it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use chainwatch::sign::{signature_header, Secret};
use chainwatch::testkit::{free_port, KillOnDrop};

use crate::harness::*;

const TOKEN: &str = "receivers-test-token-0f5c2a9e71d84b36a2c0e9d7f1b3a5c8";

#[derive(Clone, Copy, Debug)]
enum Example {
    Python,
    Node,
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/receivers")
}

impl Example {
    /// Why it cannot run here, if it cannot.
    fn missing(self) -> Option<String> {
        let ok = match self {
            Example::Python => Command::new("python3")
                .args(["-c", "import flask, standardwebhooks"])
                .status()
                .is_ok_and(|s| s.success()),
            Example::Node => {
                Command::new("node")
                    .arg("--version")
                    .status()
                    .is_ok_and(|s| s.success())
                    && examples_dir()
                        .join("node/node_modules/standardwebhooks")
                        .exists()
            }
        };
        (!ok).then(|| match self {
            Example::Python => "python3 with flask and standardwebhooks (pip install -r examples/receivers/python/requirements.txt)".into(),
            Example::Node => "node with the example's packages (npm ci in examples/receivers/node)".into(),
        })
    }

    fn start(self, dir: &Path, port: u16, api: &str) -> Child {
        let mut cmd = match self {
            Example::Python => {
                let mut c = Command::new("python3");
                c.arg(examples_dir().join("python/receiver.py"))
                    .env("RECEIVER_DB", dir.join("inbox.sqlite3"));
                c
            }
            Example::Node => {
                let mut c = Command::new("node");
                c.arg(examples_dir().join("node/receiver.js"))
                    .env("RECEIVER_DIR", dir);
                c
            }
        };
        cmd.env("CHAINWATCH_WEBHOOK_SECRET", SECRET)
            .env("RECEIVER_LISTEN", format!("127.0.0.1:{port}"))
            .env("CHAINWATCH_API", api)
            .env("CHAINWATCH_API_TOKEN", TOKEN)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{self:?}.log"))).unwrap())
            .spawn()
            .expect("the example receiver starts")
    }

    /// (event id, how it arrived) of everything the receiver stored, in its order.
    fn stored(self, dir: &Path) -> Vec<(String, String)> {
        match self {
            Example::Python => {
                let Ok(db) = rusqlite::Connection::open(dir.join("inbox.sqlite3")) else {
                    return vec![];
                };
                let Ok(mut stmt) = db.prepare("SELECT id, source FROM inbox ORDER BY rowid") else {
                    return vec![];
                };
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect()
            }
            Example::Node => std::fs::read_to_string(dir.join("inbox.jsonl"))
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let id = v["event"]["data"]["id"].as_str().unwrap().to_string();
                    (id, v["source"].as_str().unwrap().to_string())
                })
                .collect(),
        }
    }
}

/// Event ids in the receiver's actions.log, in the order it acted.
fn actions(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("actions.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

async fn healthy(url: &str) {
    let http = http_client();
    poll(
        "the example receiver to answer",
        WAIT,
        Duration::from_millis(100),
        || {
            let r = http.get(format!("{url}/health")).send();
            async move {
                match r.await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await;
}

async fn post(url: &str, id: &str, timestamp: i64, body: &str, signed: &str) -> (u16, String) {
    let secret = Secret::parse(SECRET).unwrap();
    let r = http_client()
        .post(format!("{url}/hooks"))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            signature_header(&[secret], id, timestamp, signed.as_bytes()),
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn example_receiver_against_the_pipeline(example: Example) {
    if let Some(missing) = example.missing() {
        assert!(
            std::env::var("CHAINWATCH_REQUIRE_RECEIVERS").is_err(),
            "the {example:?} receiver needs {missing}"
        );
        eprintln!("skipped: the {example:?} receiver needs {missing}");
        return;
    }
    let (port, api_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let api = format!("http://127.0.0.1:{api_port}");
    let h = Harness::with(&[watch(P2WPKH, 1, "a"), watch(P2TR, 1, "b")], |c| {
        c.api(chainwatch::testkit::Api::listen(&format!("127.0.0.1:{api_port}")).token(TOKEN))
            .map_endpoint(SHOP, |e| {
                e.url(&format!("{url}/hooks"))
                    .retry_schedule(["2s", "2s", "2s", "2s", "2s", "2s"])
            })
    })
    .await;
    let dir = h.dir.path().join("receiver");
    std::fs::create_dir_all(&dir).unwrap();
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let mut receiver = KillOnDrop(example.start(&dir, port, &api));
    healthy(&url).await;

    let recorded = || -> Vec<(String, String)> {
        h.store()
            .events_after(0, 1000)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.body))
            .collect()
    };
    h.node.pay(P2WPKH, 21_000);
    h.node.pay(P2TR, 22_000);
    wait_until("both pending", WAIT, || recorded().len() == 2).await;
    h.node.mine(1);
    let why_not = |n: usize| {
        let acted = actions(&dir);
        if acted.len() >= n {
            return Ok(());
        }
        let deliveries: Vec<String> = h
            .store()
            .list_deliveries(None, None, 100)
            .unwrap()
            .into_iter()
            .map(|d| {
                format!(
                    "{} {:?} {:?} {:?}",
                    d.event_type, d.status, d.last_status, d.last_error
                )
            })
            .collect();
        let log = std::fs::read_to_string(dir.join(format!("{example:?}.log"))).unwrap_or_default();
        Err(format!(
            "acted on {}; deliveries {deliveries:?}; receiver log: {log}",
            acted.len()
        ))
    };
    wait_for("four events acted on", WAIT, || why_not(4)).await;
    let events = recorded();
    assert_eq!(events.len(), 4, "two pending, two confirmed");
    let ids: Vec<String> = events.iter().map(|e| e.0.clone()).collect();
    let mut stored: Vec<String> = example.stored(&dir).into_iter().map(|s| s.0).collect();
    stored.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(stored, want, "every event stored, once");

    // A duplicate: answered 200, not acted on again.
    let (id, body) = &events[0];
    let now = chainwatch::event::now_ms() / 1000;
    let (status, answer) = post(&url, id, now, body, body).await;
    assert_eq!(status, 200, "a duplicate is answered 200: {answer}");
    assert!(answer.contains("\"duplicate\":true"), "{answer}");
    // Tampered (signed over other bytes) and stale (signed ten minutes ago): refused.
    let tampered = body.replacen("21000", "91000", 1);
    assert_ne!(&tampered, body);
    let (status, _) = post(&url, id, now, &tampered, body).await;
    assert_eq!(status, 401, "a tampered body is refused");
    let (status, _) = post(&url, id, now - 600, body, body).await;
    assert_eq!(status, 401, "a stale timestamp is refused");
    let new_id = "evt_00000000000000000000000000000000";
    let (status, _) = post(&url, new_id, now, &body.replace(id, new_id), body).await;
    assert_eq!(status, 401, "a body that is not the one signed is refused");

    // Down while a payment comes; caught up from the API on start.
    drop(receiver);
    h.node.pay(P2WPKH, 23_000);
    wait_until("the fifth event recorded", WAIT, || recorded().len() == 5).await;
    receiver = KillOnDrop(example.start(&dir, port, &api));
    healthy(&url).await;
    let fifth = recorded()[4].0.clone();
    let stored = example.stored(&dir);
    assert!(
        stored.contains(&(fifth.clone(), "reconcile".to_string())),
        "the event sent while it was down came from /v1/events on start: {stored:?}"
    );
    // chainwatch's retry then arrives as a duplicate, and is delivered.
    wait_until(
        "the retried delivery answered",
        Duration::from_secs(30),
        || {
            h.store()
                .list_deliveries(None, None, 100)
                .unwrap()
                .iter()
                .all(|d| d.status == chainwatch::delivery::DeliveryStatus::Delivered)
        },
    )
    .await;
    wait_for("five events acted on", WAIT, || why_not(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut acted = actions(&dir);
    let mut stored: Vec<String> = example.stored(&dir).into_iter().map(|s| s.0).collect();
    assert_eq!(acted.len(), 5, "each event acted on once: {acted:?}");
    acted.sort();
    stored.sort();
    let mut all: Vec<String> = recorded().into_iter().map(|e| e.0).collect();
    all.sort();
    assert_eq!(acted, all, "acted on exactly chainwatch's events");
    assert_eq!(stored, all, "stored exactly chainwatch's events");
    drop(receiver);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_receiver_stores_each_event_once_and_catches_up() {
    example_receiver_against_the_pipeline(Example::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_receiver_stores_each_event_once_and_catches_up() {
    example_receiver_against_the_pipeline(Example::Node).await;
}
