//! Deep reorgs, chain events, alerts, and malformed input from the node.

use std::time::Duration;

use crate::harness::*;

async fn deep_reorg(depth: u32) {
    let h = Harness::with(&[watch(P2WPKH, 3, "deep")], |c| {
        c.map_endpoint(SHOP, |e| e.events(["tx.*", "alert.*"]))
    })
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 77_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    let first = h.node.mine(1)[0];
    h.node.mine(depth - 1);
    // Confirmations seen before the reorg: one per depth up to the target of 3.
    let before = depth.min(3) as usize;
    h.receiver.wait_accepted(1 + before, WAIT).await;
    h.wait_synced().await;
    // The payment's block is exactly `depth` deep: the reorg removes it, and the payment is
    // mined again in the first of `depth + 1` new blocks.
    let old_tip = h.node.tip();
    h.node.reorg(depth, true);
    let after = (depth + 1).min(3) as usize;
    let alerts = usize::from(depth >= 2);
    let total = 1 + before + 1 + after + alerts;
    let got = h.receiver.wait_accepted(total, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await;
    let confs = |n: usize| {
        (1..=n as u64).map(|c| {
            (
                if c < 3 {
                    "tx.confirmation"
                } else {
                    "tx.confirmed"
                },
                c,
            )
        })
    };
    let mut expected = vec![("tx.pending", 0)];
    expected.extend(confs(before));
    expected.push(("tx.reorged", 0));
    expected.extend(confs(after));
    assert_eq!(
        history(&got, &txid),
        expect_history(&expected),
        "depth {depth}"
    );
    let reorged = got.iter().find(|c| c.kind() == "tx.reorged").unwrap();
    assert_eq!(reorged.data()["previous_block"]["hash"], first.to_string());
    let alert: Vec<&Captured> = got.iter().filter(|c| c.kind() == "alert.reorg").collect();
    assert_eq!(
        alert.len(),
        alerts,
        "alert.reorg only from depth 2 (alert_reorg_depth)"
    );
    if let Some(a) = alert.first() {
        assert_eq!(a.data()["depth"], depth);
        assert_eq!(a.data()["old_tip"]["hash"], old_tip.to_string());
        let reorged_seq = reorged.data()["sequence"].as_i64().unwrap();
        assert!(
            a.data()["sequence"].as_i64().unwrap() < reorged_seq,
            "the alert precedes the reorg's events"
        );
    }
    let all = h.receiver.accepted();
    let kinds: Vec<String> = all
        .iter()
        .map(|c| {
            format!(
                "{} {} {}",
                c.data()["sequence"],
                c.kind(),
                c.data()["confirmations"]
            )
        })
        .collect();
    if all.len() != total {
        eprintln!("payment {txid}; last: {}", all.last().unwrap().body);
    }
    assert_eq!(all.len(), total, "nothing more: {kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_of_depth_1_reorgs_the_payment() {
    deep_reorg(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_of_depth_6_reorgs_the_payment_and_alerts() {
    deep_reorg(6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_of_depth_100_the_finality_depth_still_reorgs_the_payment() {
    deep_reorg(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_deeper_than_kept_is_an_error_alert_and_the_watcher_goes_on() {
    let h = Harness::with(&[watch(P2TR, 1, "x")], |c| {
        c.finality_depth(5)
            .map_endpoint(SHOP, |e| e.events(["tx.*", "alert.*"]))
    })
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.mine(2);
    h.node.pay(P2TR, 5_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    h.receiver.wait_accepted(2, WAIT).await;
    // 20 blocks replaced while only 15 are kept (finality_depth 5 + 10).
    h.node.reorg(20, false);
    let later = h.node.pay(P2TR, 6_000).to_string();
    h.node.mine(1);
    let got = h.receiver.wait_accepted(5, WAIT).await;
    daemon.stop().await;
    let alert = got
        .iter()
        .find(|c| c.kind() == "alert.reorg")
        .expect("an alert");
    assert!(
        alert.data()["error"]
            .as_str()
            .unwrap()
            .contains("deeper than the"),
        "{}",
        alert.body
    );
    assert!(
        history(&got, &later).iter().any(|e| e.0 == "tx.confirmed"),
        "following the new chain afterwards"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_events_for_endpoints_that_ask() {
    let h = Harness::with(&[], |c| c.map_endpoint(SHOP, |e| e.events(["block.*"]))).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let start = h.node.height();
    let first = h.node.mine(2);
    h.receiver.wait_accepted(2, WAIT).await;
    h.node.invalidate(first[1]).unwrap();
    h.receiver.wait_accepted(3, WAIT).await;
    h.node.reconsider(first[1]).unwrap();
    let got = h.receiver.wait_accepted(4, WAIT).await;
    daemon.stop().await;
    let kinds: Vec<(&str, u64)> = got
        .iter()
        .map(|c| (c.kind(), c.data()["height"].as_u64().unwrap()))
        .collect();
    let s = start as u64;
    assert_eq!(
        kinds,
        vec![
            ("block.connected", s + 1),
            ("block.connected", s + 2),
            ("block.disconnected", s + 2),
            ("block.connected", s + 2)
        ]
    );
    let d = got[0].data();
    assert_eq!(d["hash"], first[0].to_string());
    assert_eq!(d["previous_hash"], h.node.block_hash(start).to_string());
    assert_eq!(d["tx_count"], 1);
    assert!(d["time"].as_u64().unwrap() > 0);
    assert_eq!(
        got[2].data()["tx_count"],
        1,
        "disconnected blocks keep their tx count"
    );
    assert_ne!(
        got[1].id, got[3].id,
        "the block connected again is a new event"
    );
    assert_eq!(got[1].data()["hash"], got[3].data()["hash"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unreachable_and_recovered_alerts() {
    let h = Harness::with(&[], |c| {
        c.node_unreachable_after("1s")
            .map_endpoint(SHOP, |e| e.events(["alert.*"]))
    })
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.stop();
    let got = h.receiver.wait_accepted(1, WAIT).await;
    assert_eq!(got[0].kind(), "alert.node_unreachable");
    assert!(
        got[0].data()["error"].as_str().unwrap().len() > 5,
        "says why: {}",
        got[0].body
    );
    h.node.restart(0).await.unwrap();
    let got = h.receiver.wait_accepted(2, WAIT).await;
    daemon.stop().await;
    assert_eq!(got[1].kind(), "alert.node_recovered");
    assert_eq!(
        got[1].data()["since"],
        got[0].data()["since"],
        "the same outage"
    );
    assert!(got[1].data()["down_seconds"].as_i64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_zmq_frames_and_rpc_answers_are_skipped_and_nothing_is_corrupted() {
    let h = Harness::new(&[watch(P2WPKH, 2, "m")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.publish_raw("sequence", b"short".to_vec());
    h.node.publish_raw("rawtx", vec![0xff; 40]);
    h.node.publish_raw("rawblock", vec![1, 2, 3]);
    h.node.set_garbage_calls(3);
    let txid = h.node.pay(P2WPKH, 8_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(2);
    let got = h.receiver.wait_accepted(3, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &txid),
        expect_history(&[
            ("tx.pending", 0),
            ("tx.confirmation", 1),
            ("tx.confirmed", 2)
        ])
    );
    assert_eq!(
        h.store().audit().map(|r| (r.verified, r.problem)).unwrap(),
        (3, None),
        "store intact"
    );
}
