//! The whole pipeline on the simulated node: payments, confirmations, reorgs, signatures; each
//! test on both store backends (SQLite, and PostgreSQL when a server is configured).

use std::collections::{HashMap, HashSet};

use crate::harness::*;
use crate::on_both_backends;

const ALL_TYPES: [(&str, &str); 5] = [
    (P2PKH, "p2pkh"),
    (P2SH, "p2sh"),
    (P2WPKH, "p2wpkh"),
    (P2WSH, "p2wsh"),
    (P2TR, "p2tr"),
];

on_both_backends!(every_address_type_gets_pending_then_each_confirmation_then_confirmed);
async fn every_address_type_gets_pending_then_each_confirmation_then_confirmed(backend: Backend) {
    let watches: Vec<WatchEntry> = ALL_TYPES.iter().map(|(a, l)| watch(a, 3, l)).collect();
    let h = Harness::on(backend, &watches).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let mut paid = HashMap::new();
    for (i, (addr, label)) in ALL_TYPES.iter().enumerate() {
        let amount = 100_000 + i as u64;
        paid.insert(
            h.node.pay(addr, amount).to_string(),
            (*addr, *label, amount),
        );
    }
    h.receiver.wait_accepted(5, WAIT).await;
    let first_block_height = h.node.height() + 1;
    for _ in 0..3 {
        h.node.mine(1);
    }
    let got = h.receiver.wait_accepted(20, WAIT).await;
    daemon.stop().await;

    assert!(
        got.iter().all(|c| c.verified()),
        "every signature verifies with the standardwebhooks crate"
    );
    let expected = expect_history(&[
        ("tx.pending", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.confirmed", 3),
    ]);
    for (txid, (addr, label, amount)) in &paid {
        assert_eq!(history(&got, txid), expected, "{label} payment {txid}");
        for c in got.iter().filter(|c| c.data()["txid"] == txid.as_str()) {
            let d = c.data();
            assert_eq!(d["id"], c.id.as_str(), "payload id equals webhook-id");
            assert_eq!(d["network"], "regtest");
            assert_eq!(d["watch"]["label"], *label);
            assert_eq!(d["required_confirmations"], 3);
            assert_eq!(d["amount_sat"], *amount, "{label} net amount");
            assert_eq!(
                d["outputs"][0]["address"], *addr,
                "{label} matched output address"
            );
            assert_eq!(d["outputs"][0]["amount_sat"], *amount);
            assert_eq!(
                d["outputs"].as_array().unwrap().len(),
                1,
                "only the watched output is listed"
            );
            assert_eq!(d["inputs"], serde_json::json!([]));
            let confs = d["confirmations"].as_u64().unwrap();
            if confs == 0 {
                assert!(d["block"].is_null(), "pending has no block");
            } else {
                assert_eq!(
                    d["block"]["height"], first_block_height,
                    "confirmed in the first mined block"
                );
                assert_eq!(
                    d["tip"]["height"],
                    first_block_height as u64 + confs - 1,
                    "tip at the event's depth"
                );
            }
        }
    }
    let mut seqs: Vec<i64> = got
        .iter()
        .map(|c| c.data()["sequence"].as_i64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<_>>(),
        "sequence is gap-free and each event delivered once"
    );
    let ids: HashSet<&str> = got.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), 20, "ids are unique");
    assert_eq!(
        h.admin().audit().map(|r| (r.verified, r.problem)).unwrap(),
        (20, None),
        "event log verifies"
    );
}

on_both_backends!(one_confirmation_target_fires_confirmed_on_the_including_block);
async fn one_confirmation_target_fires_confirmed_on_the_including_block(backend: Backend) {
    let h = Harness::on(backend, &[watch(P2WPKH, 1, "fast")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 42_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(3);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &txid),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
    assert_eq!(
        h.receiver.accepted().len(),
        2,
        "nothing more after the target"
    );
}

on_both_backends!(a_transaction_first_seen_in_a_block_fires_no_pending);
async fn a_transaction_first_seen_in_a_block_fires_no_pending(backend: Backend) {
    let h = Harness::on(backend, &[watch(P2TR, 2, "late")]).await;
    let txid = h.node.pay(P2TR, 10_000).to_string();
    h.node.mine(1);
    // Started after the payment was mined: the watcher starts at the tip, so it never saw it.
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let unrelated = h.node.pay(P2WPKH, 5_000).to_string();
    // Mined straight into a block (as generateblock does) without entering the mempool.
    let direct = h.node.payment_tx(P2TR, 20_000);
    let direct_txid = direct.compute_txid().to_string();
    h.node.mine_block_with(vec![direct]);
    h.node.mine(1);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    daemon.stop().await;
    assert!(
        history(&got, &txid).is_empty(),
        "payment mined before start is not announced"
    );
    assert!(
        history(&got, &unrelated).is_empty(),
        "unrelated payment is not announced"
    );
    assert_eq!(
        history(&got, &direct_txid),
        expect_history(&[("tx.confirmation", 1), ("tx.confirmed", 2)]),
        "no tx.pending"
    );
    assert_eq!(h.receiver.accepted().len(), 2);
}

on_both_backends!(reorg_removing_the_block_fires_reorged_and_confirmations_again_with_new_ids);
async fn reorg_removing_the_block_fires_reorged_and_confirmations_again_with_new_ids(
    backend: Backend,
) {
    let h = Harness::on(backend, &[watch(P2WPKH, 3, "order-1017")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 50_000_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    let first = h.node.mine(2);
    h.receiver.wait_accepted(3, WAIT).await;
    // Both blocks replaced; the payment is mined again in the first new block.
    let replacement = h.node.reorg(2, true);
    h.node.mine(1);
    let got = h.receiver.wait_accepted(7, WAIT).await;
    daemon.stop().await;

    let expected = expect_history(&[
        ("tx.pending", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.reorged", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.confirmed", 3),
    ]);
    assert_eq!(history(&got, &txid), expected);
    let reorged = got.iter().find(|c| c.kind() == "tx.reorged").unwrap();
    assert_eq!(
        reorged.data()["previous_block"]["hash"],
        first[0].to_string(),
        "names the disconnected block"
    );
    assert!(reorged.data()["block"].is_null());
    let confs: Vec<&Captured> = got
        .iter()
        .filter(|c| c.kind() == "tx.confirmation" && c.data()["confirmations"] == 1)
        .collect();
    assert_eq!(confs.len(), 2);
    assert_ne!(
        confs[0].id, confs[1].id,
        "confirmation 1 after the reorg has a new id"
    );
    assert_eq!(confs[1].data()["block"]["hash"], replacement[0].to_string());
}

on_both_backends!(reorg_above_the_block_fires_nothing_for_the_transaction);
async fn reorg_above_the_block_fires_nothing_for_the_transaction(backend: Backend) {
    let h = Harness::on(backend, &[watch(P2PKH, 4, "steady")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2PKH, 70_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(2);
    h.receiver.wait_accepted(3, WAIT).await;
    // Replace only the block above the payment's: depth goes 2 → 1 → 2 → 3.
    h.node.reorg(1, false);
    h.node.mine(1);
    let got = h.receiver.wait_accepted(5, WAIT).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    daemon.stop().await;
    let expected = expect_history(&[
        ("tx.pending", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.confirmation", 3),
        ("tx.confirmed", 4),
    ]);
    assert_eq!(
        history(&got, &txid),
        expected,
        "no tx.reorged and no repeated depth"
    );
    assert_eq!(h.receiver.accepted().len(), 5, "each event once");
}

on_both_backends!(the_same_block_reconnected_after_a_reorg_gives_new_ids);
async fn the_same_block_reconnected_after_a_reorg_gives_new_ids(backend: Backend) {
    let h = Harness::on(backend, &[watch(P2SH, 2, "again")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2SH, 30_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    let block = h.node.mine(1)[0];
    h.receiver.wait_accepted(2, WAIT).await;
    // As in the captures' reorg-unconfirm step: invalidate, then reconsider the very same block.
    h.node.invalidate(block).unwrap();
    h.receiver.wait_accepted(3, WAIT).await;
    h.node.reconsider(block).unwrap();
    h.node.mine(1);
    let got = h.receiver.wait_accepted(5, WAIT).await;
    daemon.stop().await;
    let expected = expect_history(&[
        ("tx.pending", 0),
        ("tx.confirmation", 1),
        ("tx.reorged", 0),
        ("tx.confirmation", 1),
        ("tx.confirmed", 2),
    ]);
    assert_eq!(history(&got, &txid), expected);
    let ones: Vec<&Captured> = got
        .iter()
        .filter(|c| c.kind() == "tx.confirmation")
        .collect();
    assert_eq!(
        ones[0].data()["block"]["hash"],
        ones[1].data()["block"]["hash"],
        "same block"
    );
    assert_ne!(ones[0].id, ones[1].id, "a new id once reorged out and back");
}

on_both_backends!(a_tampered_body_fails_independent_verification);
async fn a_tampered_body_fails_independent_verification(backend: Backend) {
    let h = Harness::on(backend, &[watch(P2WPKH, 1, "t")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.pay(P2WPKH, 1_000);
    let got = h.receiver.wait_accepted(1, WAIT).await;
    daemon.stop().await;
    let c = &got[0];
    assert!(c.verified());
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    let mut headers = axum::http::HeaderMap::new();
    let ts = chainwatch::daemon::now_ms() / 1000;
    let sig = chainwatch::sign::Secret::parse(SECRET)
        .unwrap()
        .sign(&c.id, ts, c.body.as_bytes());
    headers.insert("webhook-id", c.id.parse().unwrap());
    headers.insert("webhook-timestamp", ts.to_string().parse().unwrap());
    headers.insert("webhook-signature", sig.parse().unwrap());
    assert!(
        wh.verify(c.body.as_bytes(), &headers).is_ok(),
        "our signature verifies"
    );
    let tampered = c.body.replace("\"amount_sat\":1000", "\"amount_sat\":9000");
    assert_ne!(tampered, c.body);
    assert!(
        wh.verify(tampered.as_bytes(), &headers).is_err(),
        "a tampered body is rejected"
    );
}
