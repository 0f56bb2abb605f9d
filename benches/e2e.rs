//! `cargo bench --bench e2e`: from a transaction the simulated node publishes to the webhook
//! at the receiver, through the whole daemon.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chainwatch::store::Store;
use chainwatch::testkit::{Api, Bitcoind, ConfigBuilder, Endpoint, Receiver, WatchEntry};

use common::{first_arrivals, percentile, SECRET};

async fn bench_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let node = chainwatch::simnode::SimNode::start(&dir.path().join("node"))
        .await
        .unwrap();
    node.mine(300);
    let receiver = Receiver::builder()
        .ids_only()
        .bind_loopback(0)
        .await
        .unwrap();
    let addr = "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp";
    let cfg = ConfigBuilder::regtest()
        .data_dir(dir.path().join("data"))
        .bitcoind(Bitcoind::simnode(&node))
        .endpoint(Endpoint::new("e2e", &receiver.url).secret(SECRET))
        .api(Api::listen("127.0.0.1:0"))
        .watch(WatchEntry::address(addr).confirmations(1))
        .parse()
        .unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    // Let it reach the tip and subscribe.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sent = vec![];
    for _ in 0..150 {
        let t = Instant::now();
        let txid = node.pay(addr, 10_000);
        sent.push((txid, t));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // At most 30 s: payments still missing then are reported, not waited for.
    let all_arrived = async {
        while receiver.count() < sent.len() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), all_arrived).await;
    token.cancel();
    daemon.await.unwrap().unwrap();
    // Map txids to event ids through the store.
    let store = Store::open(&dir.path().join("data")).unwrap();
    let rows = store.events_after(0, 10_000).unwrap();
    let by_txid: HashMap<String, String> = rows
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            (
                v["data"]["txid"].as_str().unwrap_or("").to_string(),
                r.id.clone(),
            )
        })
        .collect();
    let at = first_arrivals(&receiver);
    let lat: Vec<f64> = sent
        .iter()
        .filter_map(|(txid, t)| {
            by_txid
                .get(&txid.to_string())
                .and_then(|id| at.get(id))
                .map(|a| a.saturating_duration_since(*t).as_secs_f64() * 1e3)
        })
        .collect();
    let (p50, p99) = (percentile(lat.clone(), 0.5), percentile(lat.clone(), 0.99));
    common::verdict(
        "end to end",
        &format!(
            "rawtx published by simnode to webhook received p50 {p50:.2} ms, p99 {p99:.2} ms ({} of {} payments; proof, senders and commit included)",
            lat.len(),
            sent.len()
        ),
        "p50 <= 2.5 ms, p99 <= 6 ms",
        p50 <= 2.5 && p99 <= 6.0,
    );
}

fn main() {
    if common::wants("e2e") {
        common::header("e2e");
        // `CHAINWATCH_LOG=debug` shows each stage of each payment with its time: the ZMQ
        // message, the node's answers, the event recorded, the request delivered.
        if std::env::var_os("CHAINWATCH_LOG").is_some() {
            chainwatch::commands::init_logging(false);
        }
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(bench_end_to_end());
    }
}
