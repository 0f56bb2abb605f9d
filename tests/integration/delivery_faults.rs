//! The real daemon through delivery-side faults: the node down at start with deliveries
//! queued, and a receiver whose port is closed while 100,000 events wait.

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::*;

const TOKEN: &str = "delivery-fault-tests-token-0123456789abc";

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_node_down_at_start_the_api_answers_and_queued_deliveries_go_out() {
    let port = free_port();
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], |c| {
        c.api(Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN))
            .map_endpoint(SHOP, |e| e.retry_schedule(["500ms"; 5]))
    })
    .await;
    h.receiver.set_status(503);
    let first = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 15_000).to_string();
    h.receiver.wait_requests(1, WAIT).await;
    drop(first); // SIGKILL, with the tx.pending delivery still queued

    h.node.stop();
    h.receiver.set_status(204);
    let _second = KillOnDrop(h.spawn_binary());
    let http = http_client();
    let base = format!("http://127.0.0.1:{port}");
    // Queued deliveries go out though the node never answered.
    let got = h.receiver.wait_accepted(1, WAIT).await;
    assert_eq!(history(&got, &txid), expect_history(&[("tx.pending", 0)]));
    let resp = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["problems"]
            .to_string()
            .contains("node unreachable since"),
        "{body}"
    );
    let events = http
        .get(format!("{base}/v1/events?after=0"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200, "the API answers with the node down");

    h.node.restart(0).await.unwrap();
    let health = format!("{base}/health");
    poll(
        "healthy once the node is back",
        WAIT,
        Duration::from_millis(200),
        || {
            let request = http.get(&health).send();
            async move {
                match request.await.unwrap().status() {
                    reqwest::StatusCode::OK => Ok(()),
                    other => Err(format!("last {other}")),
                }
            }
        },
    )
    .await;
    h.node.mine(1);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    assert_eq!(
        history(&got, &txid),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_for_100000_queued_events_costs_one_attempt_per_step() {
    const EVENTS: usize = 100_000;
    let closed = chainwatch::testkit::refusing_address();
    let h = Harness::with(&[], |c| {
        c.map_endpoint(SHOP, |e| {
            e.url(&format!("http://{closed}/hooks"))
                .events(["*"])
                .ordered(false)
                .retry_schedule(["1s", "2s", "3s", "3s", "3s", "3s", "3s", "3s", "3s", "3s"])
        })
    })
    .await;
    let cfg = chainwatch::config::Config::load(&h.config_path).unwrap();
    let ids: HashSet<String> = tokio::task::spawn_blocking(move || {
        let mut store = chainwatch::daemon::open_store(&cfg).unwrap();
        let events = chainwatch::testkit::sample_events(EVENTS, "q");
        let ids = events.iter().map(|e| e.id.clone()).collect();
        let changes = chainwatch::changeset::ChangeSet::events(events);
        store.commit(&changes, chainwatch::event::now_ms()).unwrap();
        ids
    })
    .await
    .unwrap();
    let daemon = KillOnDrop(h.spawn_binary());
    let pid = daemon.0.id();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_early = rss_kb(pid);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_late = rss_kb(pid);
    let attempts: i64 = {
        let db = rusqlite::Connection::open(chainwatch::store::db_path(&h.data_dir())).unwrap();
        db.query_row("SELECT count(*) FROM attempts", [], |r| r.get(0))
            .unwrap()
    };
    // Nine seconds closed: the first burst (concurrency 16), then one probe per step
    // (1 s, 2 s, 3 s, 3 s ...): a few dozen at most, not one per queued event.
    assert!(
        (1..=16 + 8).contains(&attempts),
        "{attempts} attempts for {EVENTS} queued events on a closed port"
    );
    assert!(
        rss_late < rss_early + 20_000,
        "memory flat while waiting: {rss_early} kB then {rss_late} kB"
    );

    let receiver = verifying().serve(tokio::net::TcpListener::bind(&closed).await.unwrap());
    // Every half second: counting 100,000 requests is not free.
    poll(
        &format!("{EVENTS} deliveries once the port opened"),
        Duration::from_secs(240),
        Duration::from_millis(500),
        || {
            let n = receiver.accepted_count();
            std::future::ready(if n >= EVENTS {
                Ok(())
            } else {
                Err(format!("{n} of {EVENTS} delivered once the port opened"))
            })
        },
    )
    .await;
    let got = receiver.accepted();
    let seen: HashSet<String> = got.iter().map(|c| c.id.clone()).collect();
    assert_eq!(got.len(), EVENTS, "each event once");
    assert_eq!(seen, ids, "exactly the queued events");
    assert!(got.iter().all(|c| c.verified()), "every signature verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_past_failing_after_raises_one_alert() {
    let failing = receiver().await;
    failing.set_status(500);
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], |c| {
        c.map_endpoint(SHOP, |e| e.events(["alert.*"])).endpoint(
            Endpoint::new("orders", &failing.url)
                .secret(SECRET)
                .failing_after("2s")
                .retry_schedule(["300ms"; 10]),
        )
    })
    .await;
    let _daemon = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 16_000).to_string();
    let alerts = h.receiver.wait_accepted(1, WAIT).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind(), "alert.endpoint_failing");
    let a = alerts[0].data();
    assert_eq!(a["endpoint"], "orders", "{a}");
    assert!(a["failing_seconds"].as_i64() >= Some(2), "{a}");
    assert!(
        a["last_error"].as_str().unwrap_or("").contains("HTTP 500"),
        "{a}"
    );
    failing.set_status(204);
    let got = failing.wait_accepted(1, WAIT).await;
    assert_eq!(history(&got, &txid), expect_history(&[("tx.pending", 0)]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        h.receiver.accepted().len(),
        1,
        "one alert for the failing spell"
    );
}
