//! The node misbehaving: warming up, going away, coming back with a new cookie.

use std::time::Duration;

use crate::harness::*;
use chainwatch::delivery::DeliveryStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warming_up_node_is_waited_for() {
    let h = Harness::new(&[watch(P2WPKH, 1, "w")]).await;
    h.node.set_warmup_calls(5);
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 5_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &txid),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitcoind_down_then_back_with_a_new_cookie_loses_nothing() {
    let h = Harness::new(&[watch(P2WPKH, 3, "r")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 9_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    let old_cookie = std::fs::read_to_string(h.node.cookie_path()).unwrap();
    h.node.stop();
    // Blocks mined while chainwatch cannot reach the node.
    h.node.mine(2);
    tokio::time::sleep(Duration::from_millis(800)).await;
    h.node.restart(2).await.unwrap();
    assert_ne!(
        std::fs::read_to_string(h.node.cookie_path()).unwrap(),
        old_cookie,
        "restart wrote a new cookie"
    );
    let got = h.receiver.wait_accepted(3, WAIT).await;
    h.node.mine(1);
    let got2 = h.receiver.wait_accepted(4, WAIT).await;
    daemon.stop().await;
    assert_eq!(got.len(), 3);
    let expected = expect_history(&[
        ("tx.pending", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.confirmed", 3),
    ]);
    assert_eq!(
        history(&got2, &txid),
        expected,
        "caught up over RPC, then followed ZMQ with reset counters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_delivery_in_flight_and_exits_zero() {
    let h = Harness::new(&[watch(P2TR, 1, "t")]).await;
    let mut child = h.spawn_binary();
    h.wait_synced().await;
    h.receiver.set_hang(Duration::from_millis(1500));
    h.node.pay(P2TR, 4_000);
    h.receiver.wait_requests(1, WAIT).await;
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    let rows = h.store().list_deliveries(None, None, 10).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].status,
        DeliveryStatus::Delivered,
        "the request in flight was finished and recorded"
    );
    assert_eq!(h.receiver.all().len(), 1, "and not sent twice");
}

/// A node that takes a block read and never answers (a stalled disk, a hung bitcoind) must not
/// hold a stop for the client's timeout: with REST on, that was a minute for REST and another
/// for its fallback to `getblock`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_is_prompt_while_the_node_holds_a_block_read() {
    let h = Harness::new(&[watch(P2WPKH, 1, "s")]).await;
    let (txid, daemon) = restarted_behind_held_reads(&h, 6, Duration::from_secs(600), 1).await;
    tokio::time::timeout(Duration::from_secs(10), daemon.stop())
        .await
        .expect("the daemon stops within 10 s while the node holds its block read");
    // Nothing was lost: the next start, with a node that answers, reaches the node's tip and
    // tells the payment, once.
    h.node.set_block_read_delay(Duration::ZERO);
    let daemon = h.start_daemon();
    synced_with_one_confirmation(
        &h,
        daemon,
        &txid,
        "the payment in the blocks the stop cut off",
    )
    .await;
    assert!(
        h.node.calls("rest/block") > 0,
        "blocks were read through REST"
    );
}

/// The node going down while a catch-up has blocks in flight through REST: they fail with it,
/// and JSON-RPC with them. That is the node's outage, not REST's failing: once the node is
/// back, the catch-up reads on through REST, not for ten minutes through `getblock`. (How many
/// of the reads cut fail before the catch-up gives up on its group is a matter of timing; the
/// rule itself is pinned by `node::rpc`'s unit test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_reads_cut_by_a_node_outage_leave_rest_on() {
    let h = Harness::new(&[watch(P2WPKH, 1, "o")]).await;
    let (txid, daemon) = restarted_behind_held_reads(&h, 30, Duration::from_millis(700), 4).await;
    h.node.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.node.set_block_read_delay(Duration::ZERO);
    h.node.restart(0).await.unwrap();
    let (raw, by_rpc) = (h.node.calls("rest/block"), h.node.calls("getblock"));
    let what = "the payment in the blocks caught up was told once";
    synced_with_one_confirmation(&h, daemon, &txid, what).await;
    assert!(
        h.node.calls("rest/block") > raw,
        "the catch-up read on through REST after the outage"
    );
    assert_eq!(
        h.node.calls("getblock") - by_rpc,
        0,
        "no block was read with getblock once the node was back: REST stayed on"
    );
}

/// With REST on: a first run to the tip, then a payment and `blocks` blocks mined while the
/// daemon is stopped; the node then holds each block read for `delay`, and the daemon is
/// started again until `held` reads are held. The payment's txid and the running daemon.
async fn restarted_behind_held_reads(
    h: &Harness,
    blocks: u32,
    delay: Duration,
    held: u32,
) -> (String, Daemon) {
    h.node.set_rest(true);
    let daemon = h.start_daemon();
    h.wait_synced().await;
    daemon.stop().await;
    // The first block the next start reads to catch up pays the watch.
    let txid = h.node.pay(P2WPKH, 6_000).to_string();
    h.node.mine(blocks);
    h.node.set_block_read_delay(delay);
    let daemon = h.start_daemon();
    wait_for("block reads held by the node", WAIT, || {
        match h.node.reads_held() >= held {
            true => Ok(()),
            false => Err(format!("{} reads held", h.node.reads_held())),
        }
    })
    .await;
    (txid, daemon)
}

/// Waits for `daemon` to reach the node's tip, stops it, and requires the payment `txid` to
/// have been told as exactly one `tx.confirmed` at 1 confirmation: mined before the daemon
/// saw it in the mempool, its first event is the confirmation.
async fn synced_with_one_confirmation(h: &Harness, daemon: Daemon, txid: &str, what: &str) {
    h.wait_synced().await;
    let got = h.receiver.wait_accepted(1, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, txid),
        expect_history(&[("tx.confirmed", 1)]),
        "{what}"
    );
}
