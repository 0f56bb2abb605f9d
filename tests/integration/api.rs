//! The admin API, metrics, reconciliation and the tamper-evident log.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::*;
use chainwatch::delivery::DeliveryStatus;

const TOKEN: &str = "t0ken-for-tests-7f3a9c21d4e8b6f0a5c2e9d1";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    /// With `allow_ips` unless it is empty (then the default).
    async fn start(watches: &[WatchEntry], allow_ips: &[&str]) -> (Harness, Daemon, Api) {
        let port = free_port();
        let mut api = chainwatch::testkit::Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN);
        if !allow_ips.is_empty() {
            api = api.allow_ips(allow_ips.iter().copied());
        }
        let h = Harness::with(watches, |c| c.api(api)).await;
        let daemon = h.start_daemon();
        h.wait_synced().await;
        (
            h,
            daemon,
            Api {
                base: format!("http://127.0.0.1:{port}"),
                http: crate::harness::http_client(),
            },
        )
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, String) {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn json(&self, path: &str) -> Value {
        let (s, body) = self.get(path, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::OK, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn post(&self, path: &str, body: String) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_checked() {
    let (h, daemon, api) = Api::start(&[], &[]).await;
    let (s, body) = api.get("/health", None).await;
    assert_eq!(s, StatusCode::OK, "health needs no token");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tip"]["height"], h.node.height());
    assert_eq!(v["node_reachable"], true);
    let (s, body) = api.get("/v1/watches", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(body.contains("missing Authorization"), "{body}");
    let (s, body) = api.get("/v1/watches", Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(body.contains("wrong bearer token"), "{body}");
    for path in ["/metrics", "/v1/events", "/v1/deliveries"] {
        assert_eq!(
            api.get(path, Some("nope")).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(api.get(path, Some(TOKEN)).await.0, StatusCode::OK, "{path}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_outside_allow_ips_are_refused_before_anything_else() {
    let (h, daemon, api) = Api::start(&[], &["10.0.0.0/8"]).await;
    assert_eq!(
        api.get("/health", None).await.0,
        StatusCode::FORBIDDEN,
        "even /health"
    );
    let body = json!({ "address": P2TR }).to_string();
    let (s, v) = api.post("/v1/watches", body).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1 is not in api.allow_ips"),
        "{v}"
    );
    assert!(
        h.store().load_watches().unwrap().is_empty(),
        "nothing changed"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_clear_4xx_and_change_nothing() {
    let (h, daemon, api) = Api::start(&[], &[]).await;
    let big = json!({ "address": P2TR, "label": "x".repeat(100_000) }).to_string();
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (big, StatusCode::PAYLOAD_TOO_LARGE, ""),
        ("{not json".into(), StatusCode::BAD_REQUEST, "body"),
        (
            json!({ "address": P2TR, "colour": "red" }).to_string(),
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            json!({ "address": "bcrt1qnope" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not a Bitcoin address",
        ),
        (
            json!({ "address": "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not for network regtest",
        ),
        (
            json!({ "address": P2TR, "confirmations": 0 }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "between 1 and 1000",
        ),
        (
            json!({ "address": P2TR, "metadata": [1, 2] }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "JSON object",
        ),
        (
            json!({ "address": P2TR, "metadata": { "blob": "y".repeat(5000) } }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "4096",
        ),
    ];
    for (body, status, needle) in cases {
        let (s, v) = api.post("/v1/watches", body.clone()).await;
        assert_eq!(s, status, "{}: {v}", &body[..body.len().min(60)]);
        if !needle.is_empty() {
            assert!(
                v["error"].as_str().unwrap_or("").contains(needle),
                "{v} should say {needle:?}"
            );
        }
    }
    assert!(
        h.store().load_watches().unwrap().is_empty(),
        "nothing was added"
    );
    let (s, _) = api.get("/v1/events?after=x", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api.get("/v1/events?limit=0", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api.get("/v1/deliveries?status=lost", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let resp = api
        .http
        .delete(format!("{}/v1/watches/wch_nope", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let (s, _) = api
        .post("/v1/events/evt_nope/redeliver", String::new())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_added_while_running_catches_the_next_payment() {
    let (h, daemon, api) = Api::start(&[], &[]).await;
    let (s, w) = api.post("/v1/watches", json!({ "address": P2TR, "confirmations": 1, "label": "live", "metadata": { "order": 7 } }).to_string()).await;
    assert_eq!(s, StatusCode::CREATED, "{w}");
    let id = w["id"].as_str().unwrap().to_string();
    let listed = api.json("/v1/watches").await;
    assert_eq!(listed["watches"][0]["id"], id.as_str());
    let txid = h.node.pay(P2TR, 12_345).to_string();
    let got = h.receiver.wait_accepted(1, WAIT).await;
    assert_eq!(history(&got, &txid), expect_history(&[("tx.pending", 0)]));
    assert_eq!(
        got[0].data()["watch"],
        json!({ "id": id, "label": "live", "metadata": { "order": 7 } })
    );
    let resp = api
        .http
        .delete(format!("{}/v1/watches/{id}", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    h.node.pay(P2TR, 999);
    h.node.mine(1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    daemon.stop().await;
    let got = h.receiver.accepted();
    let what: Vec<(String, String)> = got
        .iter()
        .map(|c| (c.kind().to_string(), c.id.clone()))
        .collect();
    assert_eq!(got.len(), 1, "a removed watch fires nothing more: {what:?}");
}

/// Every sample line of a Prometheus text exposition: (name with labels, value).
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut out = vec![];
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "bad comment {line:?}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name:?}"
        );
        if let Some(labels) = name.strip_prefix(bare) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels {line:?}"
            );
        }
        let v: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value {line:?}"))
        };
        out.push((name.to_string(), v));
    }
    out
}

fn sample(m: &[(String, f64)], name: &str) -> f64 {
    m.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_events_happen() {
    let (h, daemon, api) = Api::start(&[watch(P2WPKH, 1, "m")], &[]).await;
    let before = parse_prometheus(&api.get("/metrics", Some(TOKEN)).await.1);
    assert_eq!(
        sample(&before, "chainwatch_tip_height"),
        h.node.height() as f64
    );
    assert_eq!(sample(&before, "chainwatch_node_reachable"), 1.0);
    assert_eq!(
        sample(&before, "chainwatch_events_total{type=\"tx.pending\"}"),
        0.0
    );
    h.node.pay(P2WPKH, 1_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    h.receiver.wait_accepted(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = parse_prometheus(&api.get("/metrics", Some(TOKEN)).await.1);
    daemon.stop().await;
    assert_eq!(
        sample(&after, "chainwatch_events_total{type=\"tx.pending\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "chainwatch_events_total{type=\"tx.confirmed\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "chainwatch_deliveries_total{endpoint=\"shop\",outcome=\"delivered\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(&after, "chainwatch_delivery_latency_seconds_count"),
        2.0
    );
    assert_eq!(
        sample(&after, "chainwatch_tip_height"),
        h.node.height() as f64
    );
    assert_eq!(sample(&after, "chainwatch_lag_blocks"), 0.0);
    assert_eq!(
        sample(&after, "chainwatch_queue_depth{endpoint=\"shop\"}"),
        0.0
    );
    assert!(sample(&after, "chainwatch_zmq_messages_total{topic=\"sequence\"}") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_returns_exactly_what_was_sent_and_redelivery_resends_it() {
    let (h, daemon, api) = Api::start(&[watch(P2WPKH, 2, "r"), watch(P2SH, 2, "s")], &[]).await;
    h.node.pay(P2WPKH, 1_000);
    h.node.pay(P2SH, 2_000);
    h.receiver.wait_accepted(2, WAIT).await;
    h.node.mine(2);
    let got = h.receiver.wait_accepted(6, WAIT).await;
    let mut sent: Vec<Value> = got
        .iter()
        .map(|c| serde_json::from_str(&c.body).unwrap())
        .collect();
    sent.sort_by_key(|v| v["data"]["sequence"].as_i64());
    let all = api.json("/v1/events?after=0&limit=1000").await;
    assert_eq!(
        all["events"].as_array().unwrap(),
        &sent,
        "/v1/events returns the payloads that were sent, in order"
    );
    assert_eq!(all["next_after"], 6);
    let page = api.json("/v1/events?after=2&limit=2").await;
    assert_eq!(page["events"].as_array().unwrap(), &sent[2..4].to_vec());
    assert_eq!(page["next_after"], 4);
    // The CLI says the same, one body per line.
    let cfg = h.config_path.to_str().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(["events", "list", "--json", "--config", &cfg])
        .output()
        .unwrap();
    let cli: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cli, sent, "events list --json equals what the receiver got");
    let first = sent[0]["data"]["id"].as_str().unwrap().to_string();
    let (s, v) = api
        .post(&format!("/v1/events/{first}/redeliver"), String::new())
        .await;
    assert_eq!((s, v["queued"].clone()), (StatusCode::ACCEPTED, json!(1)));
    wait_until("the redelivery", WAIT, || {
        h.receiver
            .accepted()
            .iter()
            .filter(|c| c.id == first)
            .count()
            >= 2
    })
    .await;
    daemon.stop().await;
    let copies: Vec<String> = h
        .receiver
        .accepted()
        .into_iter()
        .filter(|c| c.id == first)
        .map(|c| c.body)
        .collect();
    assert_eq!(
        copies[0], copies[1],
        "a redelivered event carries the identical body"
    );
    let deliveries = api_free_deliveries(&h);
    assert_eq!(deliveries, 6);
}

fn api_free_deliveries(h: &Harness) -> usize {
    h.store()
        .list_deliveries(Some(DeliveryStatus::Delivered), None, 100)
        .unwrap()
        .len()
}

fn audit(h: &Harness) -> (bool, String) {
    let cfg = h.config_path.to_str().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(["audit", "verify", "--config", &cfg])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn sql(h: &Harness, statement: &str) {
    let conn = rusqlite::Connection::open(chainwatch::store::db_path(&h.data_dir())).unwrap();
    // A tamperer does not care for foreign keys.
    conn.execute_batch(&format!("PRAGMA foreign_keys = OFF; {statement}"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_first_edited_removed_or_swapped_row() {
    let h = Harness::new(&[watch(P2WPKH, 3, "a")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.pay(P2WPKH, 5_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(3);
    h.receiver.wait_accepted(4, WAIT).await;
    daemon.stop().await;
    // The daemon may leave committed rows in the write-ahead log; a copy of the main file
    // alone would then miss them (CI once restored a database without its tables).
    sql(&h, "PRAGMA wal_checkpoint(TRUNCATE)");
    let db = chainwatch::store::db_path(&h.data_dir());
    let backup = std::fs::read(&db).unwrap();
    let restore = || {
        for side in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", db.display()));
        }
        std::fs::write(&db, &backup).unwrap();
    };
    let (ok, out) = audit(&h);
    assert!(ok && out.contains("4 rows verified"), "{out}");
    sql(
        &h,
        "UPDATE events SET body = replace(body, '5000', '9000') WHERE seq = 2",
    );
    let (ok, out) = audit(&h);
    assert!(
        !ok && out.contains("sequence 2") && out.contains("edited"),
        "edit: {out}"
    );
    restore();
    sql(
        &h,
        "DELETE FROM deliveries WHERE event_seq = 3; DELETE FROM events WHERE seq = 3",
    );
    let (ok, out) = audit(&h);
    assert!(
        !ok && out.contains("sequence 4") && out.contains("removed"),
        "delete: {out}"
    );
    restore();
    sql(&h, "PRAGMA foreign_keys = OFF; UPDATE events SET seq = 100 WHERE seq = 2; UPDATE events SET seq = 2 WHERE seq = 3; UPDATE events SET seq = 3 WHERE seq = 100;");
    let (ok, out) = audit(&h);
    assert!(!ok && out.contains("sequence 2"), "swap: {out}");
    restore();
    sql(
        &h,
        "DELETE FROM deliveries WHERE event_seq = 4; DELETE FROM events WHERE seq = 4",
    );
    let (ok, out) = audit(&h);
    assert!(
        !ok && out.contains("newest rows were removed"),
        "tail removed: {out}"
    );
    restore();
    assert!(audit(&h).0, "the untouched log passes");
}
