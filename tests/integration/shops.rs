//! Shops on one chainwatch: each watch's events go to its own endpoints only, routing is kept
//! with history, and dust below a watch's floor is not a payment.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::*;

const OTHER: &str = "other";

/// The txids each receiver was told about.
fn txids(r: &Receiver) -> BTreeSet<String> {
    r.accepted()
        .iter()
        .filter_map(|c| c.data()["txid"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_receiver_gets_exactly_its_watches_events_and_history_keeps_its_routing() {
    let other = receiver().await;
    let other_url = other.url.clone();
    let mut h = Harness::with(
        &[
            watch(P2WPKH, 1, "shop only").endpoints([SHOP]),
            watch(P2TR, 1, "other only").endpoints([OTHER]),
            watch(P2PKH, 1, "both"),
        ],
        |c| c.endpoint(Endpoint::new(OTHER, &other_url).secret(SECRET)),
    )
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let to_shop = h.node.pay(P2WPKH, 11_000).to_string();
    let to_other = h.node.pay(P2TR, 12_000).to_string();
    let to_both = h.node.pay(P2PKH, 13_000).to_string();
    h.receiver.wait_accepted(2, WAIT).await;
    other.wait_accepted(2, WAIT).await;
    h.node.mine(1);
    // Each payment: tx.pending, then tx.confirmed (target 1).
    h.receiver.wait_accepted(4, WAIT).await;
    other.wait_accepted(4, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        txids(&h.receiver),
        BTreeSet::from([to_shop.clone(), to_both.clone()]),
        "shop hears of its own watch and the shared one"
    );
    assert_eq!(
        txids(&other),
        BTreeSet::from([to_other.clone(), to_both.clone()]),
        "other hears of its own watch and the shared one"
    );
    assert_eq!(h.receiver.accepted_count(), 4, "and nothing twice");
    assert_eq!(other.accepted_count(), 4);
    daemon.stop().await;

    // The shop-only watch now goes to both: its history stays routed as it was.
    let first_shop_event = h
        .store()
        .events_after(0, 100)
        .unwrap()
        .into_iter()
        .find(|e| e.body.contains(&to_shop))
        .unwrap();
    let mut config = h.config.clone();
    config.watches[0].endpoints = None;
    h.rewrite_config(config);
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let later = h.node.pay(P2WPKH, 14_000).to_string();
    h.receiver.wait_accepted(5, WAIT).await;
    other.wait_accepted(5, WAIT).await;
    assert!(
        txids(&other).contains(&later),
        "new events follow the new routing"
    );
    let routed: Vec<String> = h
        .store()
        .list_deliveries(None, None, 1_000)
        .unwrap()
        .into_iter()
        .filter(|d| d.event_id == first_shop_event.id)
        .map(|d| d.endpoint)
        .collect();
    assert_eq!(
        routed,
        vec![SHOP.to_string()],
        "the old event is still shop's alone"
    );
    // Redelivering it follows its routing: shop gets it again, other never.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(["redeliver", &first_shop_event.id, "--config"])
        .arg(&h.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shop_had = h.receiver.accepted_count();
    wait_until("shop gets the redelivered event", WAIT, || {
        h.receiver.accepted_count() > shop_had
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !other.accepted().iter().any(|c| c.id == first_shop_event.id),
        "other never receives the shop-only event"
    );
    daemon.stop().await;
}

const TOKEN: &str = "shops-test-token-of-forty-characters-000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_name_that_is_not_configured_is_refused_everywhere() {
    let port = free_port();
    let h = Harness::with(&[], |c| {
        c.api(Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN))
    })
    .await;
    // In the config file.
    let mut config = h.config.clone();
    config
        .watches
        .push(watch(P2WPKH, 1, "x").endpoints(["nope"]));
    let err = config.parse().unwrap_err().to_string();
    assert!(
        err.contains("watches[0].endpoints") && err.contains("nope"),
        "config: {err}"
    );
    // On the command line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(["watch", "add", P2WPKH, "--endpoint", "nope", "--config"])
        .arg(&h.config_path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("--endpoint") && said.contains("nope"),
        "cli: {said}"
    );
    assert!(
        !h.data_dir().exists() || h.store().load_watches().unwrap().is_empty(),
        "nothing was stored"
    );
    // Through the API.
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let post = |body: serde_json::Value| {
        http_client()
            .post(format!("http://127.0.0.1:{port}/v1/watches"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let refused = post(serde_json::json!({ "address": P2WPKH, "endpoints": ["nope"] }))
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let said = refused.text().await.unwrap();
    assert!(said.contains("nope"), "api: {said}");
    assert!(
        h.store().load_watches().unwrap().is_empty(),
        "nothing was stored"
    );
    let added = post(serde_json::json!({
        "address": P2WPKH, "endpoints": [SHOP], "min_amount_sat": 1000
    }))
    .await
    .unwrap();
    assert_eq!(added.status(), 201);
    let stored = h.store().load_watches().unwrap();
    assert_eq!(
        (stored[0].endpoints.clone(), stored[0].min_amount_sat),
        (Some(vec![SHOP.to_string()]), 1000),
        "a known endpoint and a floor are kept"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dust_below_a_watchs_floor_fires_nothing_and_a_larger_output_fires_alone() {
    let h = Harness::new(&[watch(P2WPKH, 1, "floored").min_amount_sat(1_000)]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let dust = h.node.pay(P2WPKH, 546).to_string();
    h.node.mine(1);
    let both = h
        .node
        .pay_script(&[(script(P2WPKH), 546), (script(P2WPKH), 5_000)])
        .to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await;
    assert!(
        !txids(&h.receiver).contains(&dust),
        "a 546-sat payment to a 1,000-sat floor fires nothing"
    );
    assert_eq!(
        h.receiver.accepted_count(),
        2,
        "pending and confirmed of the second only"
    );
    for c in &got {
        assert_eq!(c.data()["txid"], both.as_str());
        let outputs = c.data()["outputs"].as_array().unwrap();
        assert_eq!(
            outputs.len(),
            1,
            "only the output above the floor: {outputs:?}"
        );
        assert_eq!(outputs[0]["amount_sat"], 5_000);
        assert_eq!(
            c.data()["amount_sat"],
            5_000,
            "the watch's net amount leaves the dust out"
        );
    }
}

fn cli(h: &Harness, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(args)
        .arg("--config")
        .arg(&h.config_path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_test_reports_what_each_endpoint_answered() {
    let other = receiver().await;
    let other_url = other.url.clone();
    let closed = format!("http://{}/hooks", chainwatch::testkit::refusing_address());
    let port = free_port();
    let h = Harness::with(&[], |c| {
        c.endpoint(Endpoint::new(OTHER, &other_url).secret(SECRET))
            .endpoint(
                Endpoint::new("closed", &closed)
                    .secret(SECRET)
                    .timeout("2s"),
            )
            .api(Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN))
    })
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;

    let (ok, said) = cli(&h, &["endpoints", "test", SHOP]);
    assert!(
        ok && said.contains("shop answered 204"),
        "200-class answer: {said}"
    );
    let got = h.receiver.wait_accepted(1, WAIT).await;
    let test = &got[0];
    assert_eq!(test.kind(), "webhook.test");
    assert!(test.verified(), "signed like any webhook");
    assert_eq!(test.data()["endpoint"], SHOP);
    assert_eq!(test.data()["network"], "regtest");
    assert_eq!(test.data()["tip"]["height"], h.node.height());
    assert!(test.data()["sequence"].as_i64().unwrap() >= 1);

    h.receiver.set_status(500);
    let (ok, said) = cli(&h, &["endpoints", "test", SHOP]);
    assert!(!ok && said.contains("shop answered 500"), "a 500: {said}");

    let (ok, said) = cli(&h, &["endpoints", "test", "closed"]);
    assert!(
        !ok && said.contains("closed could not be reached"),
        "nothing listening: {said}"
    );
    let (ok, said) = cli(&h, &["endpoints", "test", "nope"]);
    assert!(!ok && said.contains("no endpoint named"), "unknown: {said}");

    let resp = http_client()
        .post(format!("http://127.0.0.1:{port}/v1/endpoints/{OTHER}/test"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    let got = other.wait_accepted(1, WAIT).await;
    assert_eq!(
        got[0].id,
        body["event_id"].as_str().unwrap(),
        "the API's test event arrives"
    );
    assert_eq!(got.len(), 1, "other got its own test and no one else's");
    assert!(
        h.receiver
            .accepted()
            .iter()
            .all(|c| c.data()["endpoint"] == SHOP),
        "shop got only its own tests"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_schema_accepts_what_is_sent_rejects_a_missing_field_and_is_served() {
    let port = free_port();
    let h = Harness::with(&[watch(P2WPKH, 1, "s")], |c| {
        c.map_endpoint(SHOP, |e| e.events(["*"]))
            .api(Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN))
    })
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.pay(P2WPKH, 7_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    // tx.pending, block.connected, tx.confirmed
    let got = h.receiver.wait_accepted(3, WAIT).await;
    let kinds: BTreeSet<&str> = got.iter().map(|c| c.kind()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["block.connected", "tx.confirmed", "tx.pending"])
    );
    for c in &got {
        check_schema(c.body.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let mut body: serde_json::Value = serde_json::from_str(&c.body).unwrap();
        let data = body["data"].as_object_mut().unwrap();
        let field = if c.kind().starts_with("tx.") {
            "txid"
        } else {
            "hash"
        };
        data.remove(field);
        let missing = serde_json::to_vec(&body).unwrap();
        assert!(
            check_schema(&missing).is_err(),
            "{}'s schema rejects a body without data.{field}",
            c.kind()
        );
    }
    let served = |kind: &str| {
        http_client()
            .get(format!("http://127.0.0.1:{port}/v1/schemas/{kind}"))
            .bearer_auth(TOKEN)
            .send()
    };
    for kind in chainwatch::event::all_kinds() {
        let resp = served(kind).await.unwrap();
        assert_eq!(resp.status(), 200, "{kind}");
        let text = resp.text().await.unwrap();
        let file = std::fs::read_to_string(format!(
            "{}/schemas/{kind}.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(
            text, file,
            "GET /v1/schemas/{kind} serves the repository's file"
        );
    }
    assert_eq!(served("tx.nope").await.unwrap().status(), 404);
    daemon.stop().await;
}

#[test]
fn the_documented_example_of_every_event_type_matches_its_schema() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/events.md")).unwrap();
    let mut documented = BTreeSet::new();
    for block in doc.split("```json").skip(1) {
        let example = block.split("```").next().unwrap();
        let body: serde_json::Value = serde_json::from_str(example).unwrap();
        let kind = body["type"].as_str().unwrap().to_string();
        check_schema(example.as_bytes()).unwrap_or_else(|e| panic!("docs/events.md: {e}"));
        documented.insert(kind);
    }
    let all: BTreeSet<String> = chainwatch::event::all_kinds()
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        documented, all,
        "docs/events.md has one example per event type"
    );
}
