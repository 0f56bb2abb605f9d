//! The trust boundary: HTTPS delivery against a real certificate chain, relayed chain data
//! that must prove itself, a keyed audit chain, secrets that never show, and an admin API
//! that hostile clients cannot starve.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bitcoin::consensus::serialize;
use bitcoin::{Amount, OutPoint, Transaction, TxIn, TxOut};
use chainwatch::node::zmq_wire::{sequence_body, SequenceEvent};

use crate::harness::*;
use crate::tls_kit::{TestPki, TlsReceiver};
use chainwatch::delivery::DeliveryStatus;

/// What the shop endpoint is given of the test PKI.
struct Trust {
    /// `ca_file`: the private root.
    ca: bool,
    /// `client_cert` and `client_key`, for mutual TLS.
    identity: bool,
}

async fn tls_harness(
    trust: Trust,
    require_client_cert: bool,
) -> (Harness, TlsReceiver, tempfile::TempDir) {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let receiver = TlsReceiver::start(
        crate::harness::verifying(),
        pki.server_config(require_client_cert),
    )
    .await;
    let url = receiver.url.clone();
    let h = Harness::with(&[watch(P2WPKH, 1, "tls-order")], |c| {
        c.map_endpoint(SHOP, |mut e| {
            if trust.ca {
                e = e.ca_file(&pki.ca_file);
            }
            if trust.identity {
                e = e.client_identity(&pki.client_cert, &pki.client_key);
            }
            e.retry_schedule(["300ms"; 6]).url(&url)
        })
    })
    .await;
    (h, receiver, pki_dir)
}

/// The last error recorded for the first event's delivery, once an attempt failed.
async fn first_failure(h: &Harness) -> String {
    let mut error = String::new();
    wait_until("a failed attempt", WAIT, || {
        let rows = h.store().list_deliveries(None, None, 10).unwrap();
        if let Some(e) = rows.first().and_then(|d| d.last_error.clone()) {
            error = e;
            return true;
        }
        false
    })
    .await;
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_delivery_trusts_the_receivers_chain_through_ca_file_and_reuses_the_connection() {
    let (h, receiver, _pki) = tls_harness(
        Trust {
            ca: true,
            identity: false,
        },
        false,
    )
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 70_000).to_string();
    receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    let got = receiver.wait_accepted(2, WAIT).await;
    assert_eq!(
        history(&got, &txid),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)]),
        "both events over https"
    );
    assert!(got.iter().all(|c| c.verified()), "every signature verifies");
    assert_eq!(got[0].data()["amount_sat"], 70_000);
    assert_eq!(
        receiver.handshakes.load(Ordering::SeqCst),
        1,
        "one TLS handshake: the second request reused the kept-alive connection"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_is_a_failed_attempt_naming_why() {
    // No ca_file: the private root is not among the system's, so nothing may be sent.
    let (h, receiver, _pki) = tls_harness(
        Trust {
            ca: false,
            identity: false,
        },
        false,
    )
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.pay(P2WPKH, 70_000);
    let error = first_failure(&h).await;
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "the attempt names the certificate problem: {error}"
    );
    assert!(
        !error.contains("localhost:"),
        "the error carries no URL: {error}"
    );
    assert!(receiver.all().is_empty(), "no request reached the receiver");
    assert!(receiver.failed_handshakes.load(Ordering::SeqCst) >= 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_only_with_the_client_certificate() {
    let (h, receiver, _pki) = tls_harness(
        Trust {
            ca: true,
            identity: true,
        },
        true,
    )
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 71_000).to_string();
    let got = receiver.wait_accepted(1, WAIT).await;
    assert_eq!(history(&got, &txid), expect_history(&[("tx.pending", 0)]));
    assert!(got[0].verified());
    daemon.stop().await;

    // The same receiver, a client without its certificate: the handshake is refused.
    let (h, receiver, _pki) = tls_harness(
        Trust {
            ca: true,
            identity: false,
        },
        true,
    )
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.pay(P2WPKH, 71_000);
    let error = first_failure(&h).await;
    assert!(!error.is_empty(), "a failed attempt is recorded");
    assert!(receiver.all().is_empty(), "nothing was delivered: {error}");
    daemon.stop().await;
}

/// A transaction paying `amount` to `address` that no node has seen: the forger's.
fn forged_payment(address: &str, amount: Amount) -> Transaction {
    Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::new(
                "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"
                    .parse()
                    .unwrap(),
                0,
            ),
            ..TxIn::default()
        }],
        output: vec![TxOut {
            value: amount,
            script_pubkey: script(address),
        }],
    }
}

fn log_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_blocks_confirm_nothing_and_real_payments_still_arrive() {
    let h = Harness::new(&[watch(P2WPKH, 2, "shop"), watch(P2TR, 2, "other")]).await;
    let log = h.dir.path().join("chainwatch.log");
    let _daemon = KillOnDrop(h.spawn_binary_logged(&log, &[]));
    h.wait_synced().await;

    // 1. The header of a real coinbase-only block, with a forged 21M BTC payment added.
    let real = h.node.next_block(false);
    let mut forged = real.clone();
    let big = forged_payment(P2WPKH, Amount::MAX_MONEY);
    let big_txid = big.compute_txid().to_string();
    forged.txdata.push(big);
    assert_eq!(forged.block_hash(), real.block_hash(), "same header");
    h.node.publish_raw("rawblock", serialize(&forged));
    h.node.submit_block(real).unwrap();

    // 2. Two real payments; their block is relayed with the watched outputs altered, once
    //    before bitcoind's own body and once after it.
    let a = h.node.pay(P2WPKH, 50_000).to_string();
    let b = h.node.pay(P2TR, 60_000).to_string();
    receiver_has(&h, 2).await;
    let real = h.node.next_block(true);
    let mut altered = real.clone();
    for tx in altered.txdata.iter_mut().skip(1) {
        for o in tx.output.iter_mut() {
            if o.script_pubkey == script(P2WPKH) || o.script_pubkey == script(P2TR) {
                o.value = Amount::from_sat(o.value.to_sat() * 1000);
            }
        }
    }
    h.node.publish_raw("rawblock", serialize(&altered));
    h.node.submit_block(real).unwrap();
    h.node.publish_raw("rawblock", serialize(&altered));
    h.node.mine(1);

    let got = h.receiver.wait_accepted(6, WAIT).await;
    for (txid, amount) in [(&a, 50_000), (&b, 60_000)] {
        assert_eq!(
            history(&got, txid),
            expect_history(&[
                ("tx.pending", 0),
                ("tx.confirmation", 1),
                ("tx.confirmed", 2)
            ]),
            "the real payment {txid} confirms as mined, never dropped"
        );
        for c in got.iter().filter(|c| c.data()["txid"] == txid.as_str()) {
            assert_eq!(
                c.data()["amount_sat"],
                amount,
                "{} carries the real amount",
                c.kind()
            );
        }
    }
    assert!(
        !got.iter().any(|c| c.data()["txid"] == big_txid.as_str()),
        "nothing about the forged 21M BTC payment"
    );
    let stored = h.store().events_after(0, 1000).unwrap();
    assert!(
        !stored.iter().any(|e| e.body.contains(&big_txid)),
        "no event recorded for the forgery"
    );
    assert_eq!(stored.len(), 6, "exactly the six real events");
    // The rawblock socket may trail the sequence socket: wait for the last refusal to be read.
    let refusals = || {
        log_text(&log)
            .matches("refused a ZMQ rawblock body")
            .count()
    };
    wait_until("three logged refusals", WAIT, || refusals() >= 3).await;
    assert_eq!(
        refusals(),
        3,
        "each of the three forged bodies is logged once: {}",
        log_text(&log)
    );
}

/// Waits for `n` accepted deliveries on the harness's receiver.
async fn receiver_has(h: &Harness, n: usize) {
    h.receiver.wait_accepted(n, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_mempool_news_is_checked_with_the_node() {
    let h = Harness::new(&[watch(P2WPKH, 1, "shop")]).await;
    let log = h.dir.path().join("chainwatch.log");
    let _daemon = KillOnDrop(h.spawn_binary_logged(&log, &[]));
    h.wait_synced().await;

    // A forged rawtx and its `A`: the node holds no such transaction.
    let fake = forged_payment(P2WPKH, Amount::from_btc(1.0).unwrap());
    let fake_txid = fake.compute_txid();
    h.node.publish_raw("rawtx", serialize(&fake));
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.node.publish_raw(
        "sequence",
        sequence_body(&SequenceEvent::TxAdded(fake_txid, 999)),
    );

    // A real payment, then a forged `R` claiming it left the mempool.
    let real = h.node.pay(P2WPKH, 40_000);
    receiver_has(&h, 1).await;
    h.node.publish_raw(
        "sequence",
        sequence_body(&SequenceEvent::TxRemoved(real, 1000)),
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    h.node.mine(1);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    assert_eq!(
        history(&got, &real.to_string()),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)]),
        "the forged removal dropped nothing"
    );
    assert!(
        !got.iter()
            .any(|c| c.data()["txid"] == fake_txid.to_string()),
        "no event for the forged transaction"
    );
    let text = log_text(&log);
    assert!(
        text.contains("ZMQ announced a transaction the node does not hold"),
        "the forged rawtx is logged: {text}"
    );
    assert!(
        text.contains("a removal was announced for a transaction the node still holds"),
        "the forged removal is logged: {text}"
    );
}

/// Runs a CLI command of the binary against the harness's config.
pub fn cli(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(args)
        .arg("--config")
        .arg(&h.config_path)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_event_body_is_never_signed_and_audit_verify_names_it() {
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], |c| {
        c.map_endpoint(SHOP, |e| e.retry_schedule(["300ms"; 8]))
    })
    .await;
    h.receiver.set_status(503);
    let _daemon = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 40_000).to_string();
    h.receiver.wait_requests(1, WAIT).await;

    // Someone with write access to the database turns 40,000 sat into 21M BTC, and
    // recomputes the payload hash (it needs no key).
    let db = rusqlite::Connection::open(chainwatch::store::db_path(&h.data_dir())).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let body: String = db
        .query_row("SELECT body FROM events WHERE seq = 1", [], |r| r.get(0))
        .unwrap();
    assert!(body.contains("\"amount_sat\":40000"), "{body}");
    let forged = body.replace("40000", "2100000000000000");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(forged.as_bytes()));
    db.execute(
        "UPDATE events SET body = ?1, payload_hash = ?2 WHERE seq = 1",
        rusqlite::params![forged, hash],
    )
    .unwrap();
    h.receiver.set_status(204);

    wait_until("the delivery to be held", WAIT, || {
        h.store()
            .list_deliveries(Some(DeliveryStatus::Held), None, 10)
            .unwrap()
            .len()
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        h.receiver.accepted().is_empty(),
        "nothing accepted: the edited body was never sent"
    );
    assert!(
        !h.receiver
            .all()
            .iter()
            .any(|c| c.body.contains("2100000000000000")),
        "the receiver never saw the forged amount"
    );
    let (code, _, err) = cli(&h, &["audit", "verify"]);
    assert_ne!(code, 0, "audit verify fails");
    assert!(
        err.contains("sequence 1") && err.contains("audit key"),
        "names the row and why: {err}"
    );
    let (code, out, _) = cli(&h, &["deliveries", "list", "--status", "held"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("held"),
        "the listing shows the held delivery: {out}"
    );

    // A payment after the edit is unaffected.
    let later = h.node.pay(P2WPKH, 41_000).to_string();
    let got = h.receiver.wait_accepted(1, WAIT).await;
    assert_eq!(history(&got, &later), expect_history(&[("tx.pending", 0)]));
    assert!(history(&got, &txid).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_zmq_message_is_refused_and_following_goes_on() {
    let h = Harness::new(&[watch(P2WPKH, 1, "shop")]).await;
    let _daemon = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    // 5 MiB on the rawblock topic: more than any block. libzmq drops the publisher, the
    // subscription reconnects, and the lost counter makes the follower resync over RPC.
    h.node.publish_raw("rawblock", vec![0u8; 5 * 1024 * 1024]);
    let txid = h.node.pay(P2WPKH, 25_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    let got = h.receiver.wait_accepted(2, WAIT).await;
    assert_eq!(
        history(&got, &txid),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_explicit_proxy_is_the_one_used() {
    // The proxy is a receiver too: it counts who connects.
    let proxy = Receiver::start().await;
    let proxy_url = format!("http://{}", proxy.addr);
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], |c| {
        c.map_endpoint(SHOP, |e| e.proxy(&proxy_url))
    })
    .await;
    let daemon = h.start_daemon();
    h.wait_synced().await;
    h.node.pay(P2WPKH, 25_000);
    wait_until("a request through the proxy", WAIT, || {
        proxy.connections() >= 1
    })
    .await;
    assert!(
        h.receiver.all().is_empty(),
        "nothing went around the proxy to the receiver"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_announcement_of_an_old_transaction_on_a_txindex_node_fires_nothing() {
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], |c| c.finality_depth(2)).await;
    h.node.set_txindex(true);
    let _daemon = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    let old = h.node.pay(P2WPKH, 33_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(4);
    h.receiver.wait_accepted(2, WAIT).await;
    // Long final and no longer tracked; getrawtransaction still answers for it (txindex).
    h.node.publish_raw(
        "sequence",
        sequence_body(&SequenceEvent::TxAdded(old, 4242)),
    );
    let marker = h.node.pay(P2WPKH, 34_000).to_string();
    let got = h.receiver.wait_accepted(3, WAIT).await;
    assert_eq!(history(&got, &marker), expect_history(&[("tx.pending", 0)]));
    assert_eq!(
        history(&got, &old.to_string()),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)]),
        "no second tx.pending for a transaction the node holds only in a block"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_with_an_anchor_finds_a_log_cut_back_below_it() {
    let h = Harness::new(&[watch(P2WPKH, 1, "shop")]).await;
    let daemon = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    h.node.pay(P2WPKH, 35_000);
    h.receiver.wait_accepted(1, WAIT).await;
    let (code, anchor, _) = cli(&h, &["audit", "head"]);
    assert_eq!(code, 0);
    let anchor = anchor.trim().to_string();
    assert!(
        anchor.starts_with("1 ") && anchor.len() == 2 + 64,
        "{anchor}"
    );
    let (code, _, err) = cli(&h, &["audit", "verify", "--anchor", &anchor]);
    assert_eq!(code, 0, "{err}");
    drop(daemon);

    // Everything removed, the head too: on its own the log looks empty and intact.
    let db = rusqlite::Connection::open(chainwatch::store::db_path(&h.data_dir())).unwrap();
    db.execute_batch(
        "DELETE FROM attempts; DELETE FROM deliveries; DELETE FROM events;
         DELETE FROM meta WHERE key = 'event_head';",
    )
    .unwrap();
    let (code, out, _) = cli(&h, &["audit", "verify"]);
    assert_eq!(code, 0, "without the anchor nothing can tell: {out}");
    let (code, _, err) = cli(&h, &["audit", "verify", "--anchor", &anchor]);
    assert_ne!(code, 0);
    assert!(err.contains("sequence 1 is missing"), "{err}");
}
