//! Shops: descriptor watches with a gap limit, outgoing spends, watches added at run time.

use std::time::Duration;

use bitcoin::{Network, OutPoint};
use chainwatch::watch::WatchedDescriptor;

use crate::harness::*;

/// The captured shop wallet's receive descriptor (Bitcoin Core's `listdescriptors`).
pub const SHOP_WPKH: &str = "wpkh([ef03ecfa/84h/1h/0h]tpubDDqrRTGGpApdar6GULkh3EFCoiGJTTkLnfidWJe4GKDAEMqkx3Jh2Yzz1bbA76HWSuwzp7W3ZWzKa78cWXvEtc4eqsqRz8VzzMNVDPf3X9p/0/*)#qgmdk2f6";
const TPUB_A: &str = "tpubDDqrRTGGpApdar6GULkh3EFCoiGJTTkLnfidWJe4GKDAEMqkx3Jh2Yzz1bbA76HWSuwzp7W3ZWzKa78cWXvEtc4eqsqRz8VzzMNVDPf3X9p";
const TPUB_B: &str = "tpubDDLnLWaBbWy3NiDYTRY6Mn3R6qQhEY8cxFenoRx5ANhXx9hSweaq16FiMkCmY22aBikixJPzsC53LBYwmsxbsDt5hYR1nz73BXL9ZoSjMzo";

fn addresses(descriptor: &str, path: usize, n: u32) -> Vec<String> {
    let d = WatchedDescriptor::parse(descriptor, Network::Regtest).unwrap();
    (0..n).map(|i| d.derive(path, i).unwrap().1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_consecutive_fresh_addresses_with_gap_limit_20_are_all_seen() {
    let h = Harness::new(&[descriptor_watch(SHOP_WPKH, 1, "shop", 20)]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let addrs = addresses(SHOP_WPKH, 0, 25);
    let mut txids = vec![];
    for (i, a) in addrs.iter().enumerate() {
        txids.push(h.node.pay(a, 10_000 + i as u64).to_string());
        // One at a time, as orders come in: each payment makes room for the next address.
        h.receiver.wait_accepted(i + 1, WAIT).await;
    }
    h.node.mine(1);
    let got = h.receiver.wait_accepted(50, WAIT).await;
    daemon.stop().await;
    for (i, txid) in txids.iter().enumerate() {
        assert_eq!(
            history(&got, txid),
            expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)]),
            "payment to index {i}"
        );
        let c = got
            .iter()
            .find(|c| c.data()["txid"] == txid.as_str())
            .unwrap();
        let out = &c.data()["outputs"][0];
        assert_eq!(out["derivation_index"], i, "names the derivation index");
        assert_eq!(out["address"], addrs[i].as_str());
        assert!(
            out.get("derivation_path").is_none(),
            "single-path descriptor"
        );
        assert_eq!(c.data()["watch"]["label"], "shop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_fresh_addresses_paid_in_one_block_are_all_seen() {
    let h = Harness::new(&[descriptor_watch(SHOP_WPKH, 1, "shop", 20)]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let addrs = addresses(SHOP_WPKH, 0, 25);
    let txs: Vec<bitcoin::Transaction> =
        addrs.iter().map(|a| h.node.payment_tx(a, 5_000)).collect();
    let txids: Vec<String> = txs.iter().map(|t| t.compute_txid().to_string()).collect();
    // In block order the 21st address becomes watched only once the first is used.
    h.node.mine_block_with(txs);
    let got = h.receiver.wait_accepted(25, WAIT).await;
    daemon.stop().await;
    for (i, txid) in txids.iter().enumerate() {
        assert_eq!(
            history(&got, txid),
            expect_history(&[("tx.confirmed", 1)]),
            "index {i}"
        );
    }
    // The used index is kept: after a restart the window starts past index 24.
    let next = addresses(SHOP_WPKH, 0, 45)[44].clone();
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let late = h.node.pay(&next, 1_000).to_string();
    let got = h.receiver.wait_accepted(26, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &late),
        expect_history(&[("tx.pending", 0)]),
        "index 44 = 24 + 20 is watched after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_the_gap_limit_is_not_seen() {
    let h = Harness::new(&[descriptor_watch(SHOP_WPKH, 1, "shop", 5)]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let addrs = addresses(SHOP_WPKH, 0, 7);
    let beyond = h.node.pay(&addrs[5], 1_000).to_string();
    let inside = h.node.pay(&addrs[4], 1_000).to_string();
    let got = h.receiver.wait_accepted(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &inside).len(),
        1,
        "index 4 is within a gap of 5"
    );
    assert!(
        history(&h.receiver.accepted(), &beyond).is_empty(),
        "index 5 was not yet watched when it was paid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipath_multisig_descriptors_name_the_path_and_index() {
    let desc: &'static str = Box::leak(
        format!("wsh(sortedmulti(2,{TPUB_A}/<0;1>/*,{TPUB_B}/<0;1>/*))").into_boxed_str(),
    );
    let h = Harness::new(&[descriptor_watch(desc, 1, "vault", 10)]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let change = addresses(desc, 1, 4)[3].clone();
    let receive = addresses(desc, 0, 1)[0].clone();
    assert!(
        change.starts_with("bcrt1q") && change.len() == 64,
        "p2wsh: {change}"
    );
    let a = h.node.pay(&change, 70_000).to_string();
    let b = h.node.pay(&receive, 80_000).to_string();
    let got = h.receiver.wait_accepted(2, WAIT).await;
    daemon.stop().await;
    let out =
        |t: &str| got.iter().find(|c| c.data()["txid"] == t).unwrap().data()["outputs"][0].clone();
    assert_eq!(
        (
            out(&a)["derivation_path"].clone(),
            out(&a)["derivation_index"].clone()
        ),
        (1.into(), 3.into())
    );
    assert_eq!(
        (
            out(&b)["derivation_path"].clone(),
            out(&b)["derivation_index"].clone()
        ),
        (0.into(), 0.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spending_from_a_watched_address_goes_through_its_own_life_with_a_negative_amount() {
    let h = Harness::new(&[watch(P2WPKH, 2, "hot")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let paid = h.node.pay(P2WPKH, 50_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(2);
    h.receiver.wait_accepted(3, WAIT).await;
    // 30 000 leave, 17 180 come back as change to the same address, 2 820 are the fee.
    let coin = OutPoint::new(paid, 0);
    let spend = h
        .node
        .spend(
            &[(coin, 50_000)],
            &[(script(P2PKH), 30_000), (script(P2WPKH), 17_180)],
        )
        .to_string();
    h.receiver.wait_accepted(4, WAIT).await;
    h.node.mine(2);
    let got = h.receiver.wait_accepted(6, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        history(&got, &spend),
        expect_history(&[
            ("tx.pending", 0),
            ("tx.confirmation", 1),
            ("tx.confirmed", 2)
        ])
    );
    for c in got.iter().filter(|c| c.data()["txid"] == spend.as_str()) {
        let d = c.data();
        assert_eq!(
            d["inputs"],
            serde_json::json!([{ "prevout": format!("{paid}:0"), "address": P2WPKH, "amount_sat": 50_000 }])
        );
        assert_eq!(
            d["outputs"],
            serde_json::json!([{ "vout": 1, "address": P2WPKH, "amount_sat": 17_180 }])
        );
        assert_eq!(d["amount_sat"], 17_180 - 50_000, "received minus spent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_added_with_the_cli_while_running_catches_the_next_payment() {
    let h = Harness::new(&[]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let cfg = h.config_path.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
            .args(args)
            .args(["--config", &cfg])
            .output()
            .unwrap()
    };
    let bad = run(&["watch", "add", "wpkh(tpubNOPE/0/*)"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("not a valid descriptor") && err.lines().count() == 1,
        "{err}"
    );
    let ok = run(&[
        "watch",
        "add",
        SHOP_WPKH,
        "--gap-limit",
        "5",
        "--confirmations",
        "1",
        "--label",
        "late",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let id = String::from_utf8(ok.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("wch_"));
    let addr = addresses(SHOP_WPKH, 0, 3)[2].clone();
    let txid = h.node.pay(&addr, 3_000).to_string();
    wait_for("the payment's tx.pending", WAIT, || {
        if h.receiver.accepted_count() >= 1 {
            return Ok(());
        }
        let requests: Vec<String> = h
            .receiver
            .all()
            .iter()
            .map(|c| format!("{} answered {} {:?}", c.kind(), c.answered, c.verdict))
            .collect();
        let stored = h.store().events_after(0, 10).map(|e| e.len());
        Err(format!("requests {requests:?}; events stored {stored:?}"))
    })
    .await;
    let got = h.receiver.accepted();
    daemon.stop().await;
    assert_eq!(history(&got, &txid), expect_history(&[("tx.pending", 0)]));
    assert_eq!(got[0].data()["watch"]["id"], id.as_str());
    assert_eq!(got[0].data()["outputs"][0]["derivation_index"], 2);
    let listed = run(&["watch", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v[0]["gap_limit"], 5);
    assert!(v[0]["descriptor"].as_str().unwrap().starts_with("wpkh("));
}
