//! Payments that will not confirm: replacements, double-spends, evictions.

use std::time::Duration;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbf_replacement_paying_the_same_watch_is_replaced_then_pending() {
    let h = Harness::new(&[watch(P2WPKH, 1, "order")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let original = h.node.pay(P2WPKH, 25_000_000);
    h.receiver.wait_accepted(1, WAIT).await;
    let replacement = h.node.replace(original, &[(script(P2WPKH), 25_000_000)]);
    h.receiver.wait_accepted(3, WAIT).await;
    h.node.mine(1);
    let got = h.receiver.wait_accepted(4, WAIT).await;
    daemon.stop().await;
    let (o, r) = (original.to_string(), replacement.to_string());
    assert_eq!(
        history(&got, &o),
        expect_history(&[("tx.pending", 0), ("tx.replaced", 0)])
    );
    assert_eq!(
        history(&got, &r),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
    let replaced = got.iter().find(|c| c.kind() == "tx.replaced").unwrap();
    assert_eq!(replaced.data()["replaced_by"], r.as_str());
    let order: Vec<String> = log_of(&got)
        .into_iter()
        .map(|(k, t)| format!("{k} {t}"))
        .collect();
    assert_eq!(
        order[1],
        format!("tx.replaced {o}"),
        "replaced is announced before the replacement's pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbf_replacement_paying_elsewhere_is_only_replaced() {
    let h = Harness::new(&[watch(P2TR, 2, "order")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let original = h.node.pay(P2TR, 100_000);
    h.receiver.wait_accepted(1, WAIT).await;
    let replacement = h.node.replace(original, &[(script(P2PKH), 100_000)]);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    h.node.mine(2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &original.to_string()),
        expect_history(&[("tx.pending", 0), ("tx.replaced", 0)])
    );
    assert_eq!(got[1].data()["replaced_by"], replacement.to_string());
    assert_eq!(
        h.receiver.accepted().len(),
        2,
        "nothing for the replacement: it pays elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mined_double_spend_drops_the_payment_as_a_conflict() {
    let h = Harness::new(&[watch(P2SH, 3, "order")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let paid = h.node.pay(P2SH, 40_000);
    h.receiver.wait_accepted(1, WAIT).await;
    // As the captures' double-spend-conflict step: the conflict is mined without entering the mempool.
    let conflict = h.node.double_spend(paid, &[(script(P2PKH), 40_000)]);
    let conflict_txid = conflict.compute_txid().to_string();
    h.node.mine_block_with(vec![conflict]);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &paid.to_string()),
        expect_history(&[("tx.pending", 0), ("tx.dropped", 0)])
    );
    let d = got[1].data();
    assert_eq!(d["reason"], "conflict");
    assert_eq!(d["conflicting_txid"], conflict_txid.as_str());
    assert_eq!(h.receiver.accepted().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_payment_is_dropped_as_evicted() {
    let h = Harness::new(&[watch(P2PKH, 1, "order")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let paid = h.node.pay(P2PKH, 40_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.evict(paid);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &paid.to_string()),
        expect_history(&[("tx.pending", 0), ("tx.dropped", 0)])
    );
    assert_eq!(got[1].data()["reason"], "evicted");
    assert!(got[1].data().get("conflicting_txid").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_zmq_the_watcher_polls_and_sees_everything() {
    let h = Harness::without_zmq(&[watch(P2WPKH, 2, "poll")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let paid = h.node.pay(P2WPKH, 11_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    h.receiver.wait_accepted(2, WAIT).await;
    h.node.mine(1);
    let got = h.receiver.wait_accepted(3, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &paid.to_string()),
        expect_history(&[
            ("tx.pending", 0),
            ("tx.confirmation", 1),
            ("tx.confirmed", 2)
        ])
    );
}

/// One scripted session: payments, an RBF, a reorg, a double-spend. Each step waits for its
/// events, so a run that loses ZMQ messages must recover exactly what a clean run saw.
/// Returns each payment's history (txids differ between runs, roles do not).
async fn scripted_session(drop_rate: f64, seed: u64) -> Vec<(&'static str, Vec<(String, u64)>)> {
    let h = Harness::new(&[watch(P2WPKH, 2, "a"), watch(P2TR, 3, "b")]).await;
    if drop_rate > 0.0 {
        h.node.drop_zmq(drop_rate, seed);
    }
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let a = h.node.pay(P2WPKH, 10_000);
    let b = h.node.pay(P2TR, 20_000);
    h.receiver.wait_accepted(2, WAIT).await;
    let a2 = h.node.replace(a, &[(script(P2WPKH), 10_000)]);
    h.receiver.wait_accepted(4, WAIT).await;
    h.node.mine(1);
    h.receiver.wait_accepted(6, WAIT).await;
    h.node.reorg(1, true);
    h.receiver.wait_accepted(12, WAIT).await;
    let c = h.node.pay(P2TR, 30_000);
    h.receiver.wait_accepted(13, WAIT).await;
    let conflict = h.node.double_spend(c, &[(script(P2PKH), 30_000)]);
    h.node.mine_block_with(vec![conflict]);
    // Dropped, and the block holding the conflict is b's third confirmation.
    let got = h.receiver.wait_accepted(15, WAIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    daemon.stop().await;
    assert_eq!(
        h.receiver.accepted().len(),
        got.len(),
        "nothing after the session's last event"
    );
    let ids: std::collections::HashSet<&str> = got.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), 15, "each event delivered once");
    [("a", a), ("a2", a2), ("b", b), ("c", c)]
        .into_iter()
        .map(|(role, t)| (role, history(&got, &t.to_string())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_zmq_messages_change_nothing_in_the_event_log() {
    let clean = scripted_session(0.0, 0).await;
    let expected = vec![
        (
            "a",
            expect_history(&[("tx.pending", 0), ("tx.replaced", 0)]),
        ),
        (
            "a2",
            expect_history(&[
                ("tx.pending", 0),
                ("tx.confirmation", 1),
                ("tx.reorged", 0),
                ("tx.confirmation", 1),
                ("tx.confirmed", 2),
            ]),
        ),
        (
            "b",
            expect_history(&[
                ("tx.pending", 0),
                ("tx.confirmation", 1),
                ("tx.reorged", 0),
                ("tx.confirmation", 1),
                ("tx.confirmation", 2),
                ("tx.confirmed", 3),
            ]),
        ),
        ("c", expect_history(&[("tx.pending", 0), ("tx.dropped", 0)])),
    ];
    assert_eq!(clean, expected, "the clean run's log");
    for seed in 1..=6u64 {
        let lossy = scripted_session(0.3, seed).await;
        assert_eq!(
            lossy, expected,
            "seed {seed}: the same events with 30% of ZMQ messages lost"
        );
    }
}
