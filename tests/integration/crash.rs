//! SIGKILL at awkward moments: nothing is lost, nothing is repeated, ids never change.

use std::collections::HashMap;
use std::time::Duration;

use crate::harness::*;

fn kill(child: &mut std::process::Child) {
    // SIGKILL: no chance to clean up.
    child.kill().expect("kill chainwatch");
    child.wait().expect("reap chainwatch");
}

/// Every event id appears once in the store, and every copy the receiver got of an id carries
/// the identical body.
fn assert_consistent(h: &Harness, expected_events: usize) {
    let rows = h.store().events_after(0, 10_000).unwrap();
    assert_eq!(rows.len(), expected_events, "events in the store");
    let mut ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), rows.len(), "every id appears once in the store");
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=rows.len() as i64).collect::<Vec<_>>(),
        "gap-free sequence"
    );
    let stored: HashMap<&str, &str> = rows
        .iter()
        .map(|r| (r.id.as_str(), r.body.as_str()))
        .collect();
    for c in h.receiver.all() {
        assert!(c.verified(), "signature of {} verifies", c.id);
        assert_eq!(
            Some(&c.body.as_str()),
            stored.get(c.id.as_str()),
            "body of {} is the stored one, every time",
            c.id
        );
    }
    assert_eq!(
        h.store().audit().map(|r| (r.verified, r.problem)).unwrap(),
        (rows.len() as i64, None),
        "hash chain intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_commit_and_delivery_loses_and_repeats_nothing() {
    let h = Harness::new(&[watch(P2WPKH, 3, "order-1017"), watch(P2TR, 2, "order-1018")]).await;
    let mut child = h.spawn_binary();
    h.wait_synced().await;
    // The receiver holds every request: events get committed, deliveries stay in flight.
    h.receiver.set_hang(Duration::from_secs(30));
    let a = h.node.pay(P2WPKH, 200_000).to_string();
    let b = h.node.pay(P2TR, 300_000).to_string();
    h.receiver.wait_requests(1, WAIT).await;
    // Both pendings committed (the receiver holds the first request), then the block.
    h.wait_events(2).await;
    h.node.mine(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&mut child);
    assert!(
        h.receiver.accepted().is_empty(),
        "nothing was acknowledged before the kill"
    );

    // Blocks arrive while chainwatch is down; it catches up on restart.
    h.node.mine(2);
    h.receiver.set_hang(Duration::ZERO);
    let mut child = h.spawn_binary();
    let got = h.receiver.wait_accepted(7, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(&mut child);

    assert_eq!(
        history(&got, &a),
        expect_history(&[
            ("tx.pending", 0),
            ("tx.confirmation", 1),
            ("tx.confirmation", 2),
            ("tx.confirmed", 3)
        ])
    );
    assert_eq!(
        history(&got, &b),
        expect_history(&[
            ("tx.pending", 0),
            ("tx.confirmation", 1),
            ("tx.confirmed", 2)
        ])
    );
    assert_consistent(&h, 7);
    let redelivered = h.receiver.all().len() - h.receiver.accepted().len();
    assert!(
        redelivered >= 1,
        "the request in flight at the kill was sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkills_while_blocks_arrive_give_the_same_log_as_a_clean_run() {
    let h = Harness::new(&[watch(P2PKH, 6, "slow")]).await;
    let mut child = h.spawn_binary();
    h.wait_synced().await;
    let txid = h.node.pay(P2PKH, 123_456).to_string();
    h.receiver.wait_accepted(1, WAIT).await;
    // Kill at varied instants after each block: before, during and after its commit.
    for (i, delay_ms) in [0u64, 3, 7, 15, 30, 60, 120].iter().enumerate() {
        h.node.mine(1);
        tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
        kill(&mut child);
        child = h.spawn_binary();
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let got = h.receiver.wait_accepted(7, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(&mut child);
    let mut expected = vec![("tx.pending", 0)];
    expected.extend((1..6).map(|c| ("tx.confirmation", c)));
    expected.push(("tx.confirmed", 6));
    assert_eq!(history(&got, &txid), expect_history(&expected));
    assert_consistent(&h, 7);
}

/// A second daemon on the same data_dir would follow the chain beside the first and send every
/// webhook again. It waits for the first to stop (a restart's overlap), then gives up, naming
/// it; the first goes on delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_data_dir_is_refused_naming_the_first() {
    let mut h = Harness::new(&[watch(P2WPKH, 1, "order-1")]).await;
    // The wait for the first to stop follows the longest endpoint timeout.
    let mut config = h.config.clone();
    config.endpoints = config
        .endpoints
        .into_iter()
        .map(|e| e.timeout("2s"))
        .collect();
    h.rewrite_config(config);
    let mut first = h.spawn_binary();
    h.wait_synced().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("second.log");
    let mut second = h.spawn_binary_logged(&log, &[]);
    let cfg = chainwatch::config::Config::load(&h.config_path).unwrap();
    let limit = chainwatch::daemon::data_dir_wait(&cfg) + Duration::from_secs(20);
    let status = wait_for("the second daemon to give up", limit, || {
        second
            .try_wait()
            .unwrap()
            .ok_or_else(|| "still running".to_string())
    })
    .await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "it exits with an error: {said}");
    assert!(
        said.contains(&format!(
            "is in use by another chainwatch (pid {})",
            first.id()
        )),
        "it names the daemon holding the data_dir: {said}"
    );
    let paid = h.node.pay(P2WPKH, 100_000).to_string();
    let got = h.receiver.wait_accepted(1, WAIT).await;
    assert_eq!(
        (got[0].kind(), got[0].data()["txid"].as_str()),
        ("tx.pending", Some(paid.as_str())),
        "the first daemon still delivers"
    );
    kill(&mut first);
}
