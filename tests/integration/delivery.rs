//! Delivery through failures: retries follow the schedule, order holds, every attempt is kept.

use std::time::Duration;

use crate::harness::*;
use chainwatch::delivery::DeliveryStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_endpoint_that_fails_then_recovers_gets_everything_once_in_order() {
    let h = Harness::with(&[watch(P2WPKH, 2, "a"), watch(P2TR, 2, "b")], |c| {
        c.map_endpoint(SHOP, |e| e.retry_schedule(["200ms"; 8]))
    })
    .await;
    h.receiver.set_status(500);
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.pay(P2WPKH, 1_000);
    h.node.pay(P2TR, 2_000);
    h.receiver.wait_requests(3, WAIT).await;
    h.node.mine(2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.receiver.set_status(200);
    let got = h.receiver.wait_accepted(6, WAIT).await;
    daemon.stop().await;

    let seqs: Vec<i64> = got
        .iter()
        .map(|c| c.data()["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=6).collect::<Vec<_>>(),
        "accepted once each, in sequence order"
    );
    let failed: Vec<Captured> = h
        .receiver
        .all()
        .into_iter()
        .filter(|c| c.answered == 500)
        .collect();
    assert!(failed.len() >= 3, "failed attempts were made");
    assert!(
        failed.iter().all(|c| c.data()["sequence"] == 1),
        "an ordered endpoint retries its head only"
    );
    let store = h.store();
    let rows = store.list_deliveries(None, Some("shop"), 100).unwrap();
    assert_eq!(rows.len(), 6);
    assert!(
        rows.iter().all(|r| r.status == DeliveryStatus::Delivered),
        "{rows:?}"
    );
    assert_eq!(
        rows[0].attempts as usize,
        failed.len() + 1,
        "every attempt of the head is recorded"
    );
    assert!(
        rows[1..].iter().all(|r| r.attempts == 1),
        "the rest went through first time"
    );
}
