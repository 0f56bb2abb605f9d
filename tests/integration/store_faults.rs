//! The real daemon through store faults: a write lock held by another process, a full disk,
//! a watch lookup that fails. Each time: `/health` says so while it lasts, nothing is lost,
//! and everything resumes by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const TOKEN: &str = "store-fault-tests-token-0123456789abcdef";

/// Waits for `/health` to answer `code`; a daemon still starting (nothing listening yet) is
/// waited for too.
async fn wait_health(port: u16, code: u16, what: &str, limit: Duration) -> Value {
    let what = format!("/health {code} ({what})");
    poll(&what, limit, Duration::from_millis(200), || async move {
        let resp = http_client()
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let c = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        if c == code {
            Ok(body)
        } else {
            Err(format!("last {c} {body}"))
        }
    })
    .await
}

/// The API on `port` with a token, and the shop endpoint taking `events` (or its default).
fn api_config(port: u16, events: Option<&[&str]>) -> impl FnOnce(ConfigBuilder) -> ConfigBuilder {
    let events: Option<Vec<String>> = events.map(|v| v.iter().map(|e| e.to_string()).collect());
    move |c| {
        let c = c.api(Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN));
        match events {
            Some(events) => c.map_endpoint(SHOP, |e| e.events(events)),
            None => c,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_held_over_a_minute_stops_nothing_for_good_and_is_alerted() {
    let port = free_port();
    let h = Harness::with(
        &[watch(P2WPKH, 2, "shop")],
        api_config(port, Some(&["tx.*", "alert.*"])),
    )
    .await;
    let _daemon = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    wait_health(port, 200, "synced", WAIT).await;
    let before = h.node.pay(P2WPKH, 10_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;

    // Another process takes the write lock and keeps it for 75 s: past the 10 s busy timeout,
    // and past a minute of refused writes, after which alert.store_error is due.
    let db = chainwatch::store::db_path(&h.data_dir());
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(75));
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv().unwrap();
    let during = h.node.pay(P2WPKH, 11_000).to_string();
    // The payment is seen in the mempool (its commit then waits out the busy timeout and
    // fails) before it is mined: its tx.pending is owed once the store takes writes.
    tokio::time::sleep(Duration::from_secs(12)).await;
    h.node.mine(1);
    let body = wait_health(port, 503, "the lock", Duration::from_secs(30)).await;
    let problems = body["problems"].to_string();
    assert!(
        problems.contains("store") && problems.contains("locked"),
        "/health names the store: {body}"
    );
    tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();

    h.node.mine(1);
    wait_health(port, 200, "recovery", Duration::from_secs(40)).await;
    let got = h.receiver.wait_accepted(7, Duration::from_secs(40)).await;
    for txid in [&before, &during] {
        assert_eq!(
            history(&got, txid),
            expect_history(&[
                ("tx.pending", 0),
                ("tx.confirmation", 1),
                ("tx.confirmed", 2)
            ]),
            "{txid}: every event, once"
        );
    }
    let alerts: Vec<&Captured> = got
        .iter()
        .filter(|c| c.kind() == "alert.store_error")
        .collect();
    assert_eq!(alerts.len(), 1, "one alert.store_error for the incident");
    let a = alerts[0].data();
    assert!(
        a["error"].as_str().unwrap_or("").contains("locked") && a["seconds"].as_u64() >= Some(60),
        "{a}"
    );
    let ids: std::collections::HashSet<&str> = got.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), 7, "no id twice: {got:?}");
}

/// A small tmpfs to hold the data directory, if this machine lets the test mount one.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_said_and_survived() {
    let port = free_port();
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], api_config(port, None)).await;
    let Some(_fs) = Tmpfs::mount(&h.data_dir(), "16m") else {
        eprintln!("skipped: this machine cannot mount a tmpfs (not root?)");
        return;
    };
    let _daemon = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    let first = h.node.pay(P2WPKH, 12_000).to_string();
    h.receiver.wait_accepted(1, WAIT).await;

    // Fold the WAL into the database so the next write must grow a file, then fill the disk.
    let db = rusqlite::Connection::open(chainwatch::store::db_path(&h.data_dir())).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let _: (i64, i64, i64) = db
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    drop(db);
    let filler = h.data_dir().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let during: Vec<String> = (0..3)
        .map(|i| h.node.pay(P2WPKH, 13_000 + i).to_string())
        .collect();
    // Seen in the mempool (their commits fail) before they are mined.
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.node.mine(1);
    let body = wait_health(port, 503, "the full disk", Duration::from_secs(30)).await;
    assert!(
        body["problems"].to_string().contains("store"),
        "/health names the store: {body}"
    );

    std::fs::remove_file(&filler).unwrap();
    wait_health(port, 200, "space again", Duration::from_secs(40)).await;
    let got = h.receiver.wait_accepted(8, Duration::from_secs(40)).await;
    assert_eq!(
        history(&got, &first),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
    for txid in &during {
        assert_eq!(
            history(&got, txid),
            expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)]),
            "{txid}: both events once the disk had room"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_watch_lookup_never_loses_a_tracked_transactions_later_events() {
    use chainwatch::chain::{Follower, FollowerOptions};
    use chainwatch::config::{RpcAuth, StartHeight};
    use chainwatch::node::RpcClient;
    use chainwatch::store::Store;
    use chainwatch::tracker::Tracker;

    let h = Harness::new(&[watch(P2WPKH, 2, "lookup")]).await;
    let cfg = chainwatch::config::Config::load(&h.config_path).unwrap();
    let store = chainwatch::daemon::open_store(&cfg).unwrap();
    let tracker = Tracker::new("regtest", 100, store.load_tracked().unwrap());
    let records = std::sync::Mutex::new(Store::open(&h.data_dir()).unwrap());
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let loader: chainwatch::watch::WatchLoader = Arc::new(move |id: &str| {
        if f.load(Ordering::SeqCst) {
            return Err("injected: database is locked".to_string());
        }
        records
            .lock()
            .unwrap()
            .load_watch(id)
            .map_err(|e| e.to_string())
    });
    let rpc = Arc::new(RpcClient::new(
        &h.node.rpc_url(),
        RpcAuth::Cookie(h.node.cookie_path()),
    ));
    let opts = FollowerOptions {
        start_height: StartHeight::Tip,
        poll_interval: Duration::from_millis(100),
        zmq_mempool: false,
        alert_reorg_depth: 2,
        node_unreachable_after: Duration::from_secs(60),
    };
    let follower =
        Follower::new(rpc, store, tracker, opts, Default::default()).with_watch_loader(loader);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(follower.run(None, stop.clone()));
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 14_000).to_string();
    h.wait_events(1).await;

    // The watch's record can no longer be read, and the index is rebuilt so it must be.
    failing.store(true, Ordering::SeqCst);
    let mut other = Store::open(&h.data_dir()).unwrap();
    let extra = chainwatch::watch::parse_target(
        P2TR,
        bitcoin::Network::Regtest,
        None,
        1,
        None,
        serde_json::json!({}),
    )
    .unwrap();
    other.upsert_watch(&extra, "test", 0).unwrap();
    h.node.mine(1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        h.store().events_after(0, 100).unwrap().len(),
        1,
        "nothing recorded while the lookup fails"
    );
    let tracked = h.store().load_tracked().unwrap();
    assert!(
        tracked.iter().any(|t| t.txid.to_string() == txid),
        "the transaction is still tracked"
    );

    failing.store(false, Ordering::SeqCst);
    h.wait_events(2).await;
    h.node.mine(1);
    h.wait_events(3).await;
    stop.cancel();
    task.await.unwrap();
    let kinds: Vec<(String, Value)> = h
        .store()
        .events_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.body).unwrap();
            (e.kind, v["data"]["watch"]["label"].clone())
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("tx.pending".to_string(), Value::from("lookup")),
            ("tx.confirmation".to_string(), Value::from("lookup")),
            ("tx.confirmed".to_string(), Value::from("lookup")),
        ],
        "the later events came once the lookup worked again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_load_the_tracked_transactions_at_start_is_said_and_waited_for() {
    let port = free_port();
    let h = Harness::with(
        &[watch(P2WPKH, 1, "shop")],
        api_config(port, Some(&["tx.*"])),
    )
    .await;
    let first = KillOnDrop(h.spawn_binary());
    h.wait_synced().await;
    let txid = h.node.pay(P2WPKH, 12_000).to_string();
    h.wait_events(1).await;
    drop(first);

    // The tracked table is out of reach when the next run starts (a restore half done, a
    // permission taken away): the daemon must wait for it, not exit.
    let db = chainwatch::store::db_path(&h.data_dir());
    let hide = |from: &str, to: &str| {
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(&format!("ALTER TABLE {from} RENAME TO {to}"))
            .unwrap();
    };
    hide("tracked", "tracked_away");
    let mut daemon = KillOnDrop(h.spawn_binary());
    let body = wait_health(port, 503, "the follower cannot load", WAIT).await;
    assert!(
        body.to_string().contains("tracked"),
        "/health names what fails: {body}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon waits for its store instead of exiting"
    );

    hide("tracked_away", "tracked");
    wait_health(port, 200, "the store answers again", WAIT).await;
    h.node.mine(1);
    h.wait_events(2).await;
    let events: Vec<(String, String)> = h
        .store()
        .events_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.body).unwrap();
            (e.kind, v["data"]["txid"].as_str().unwrap_or("").to_string())
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("tx.pending".to_string(), txid.clone()),
            ("tx.confirmed".to_string(), txid),
        ],
        "the payment tracked before the restart is confirmed once its record could be read"
    );
}
