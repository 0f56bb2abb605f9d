//! Rescans give the events a watcher running all along would have given, with the same ids.

use std::time::Duration;

use chainwatch::testkit::config::StartHeight;

use crate::harness::*;

/// (type, id) of every stored event of `data_dir`, in sequence order.
fn log(data_dir: &std::path::Path) -> Vec<(String, String)> {
    let s = chainwatch::store::Store::open(data_dir).unwrap();
    s.events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.id))
        .collect()
}

fn without_pending(v: &[(String, String)]) -> Vec<(String, String)> {
    v.iter()
        .filter(|(k, _)| k != "tx.pending")
        .cloned()
        .collect()
}

/// A second watcher on the same node: its own data directory, a first run from
/// `start_height` if given, and the first one's watches, or none.
fn second_config(
    h: &Harness,
    name: &str,
    start_height: Option<u32>,
    keep_watches: bool,
) -> std::path::PathBuf {
    let mut config = h.config.clone().data_dir(name);
    config.start_height = start_height.map(StartHeight::Height);
    if !keep_watches {
        config.watches.clear();
    }
    let path = h.dir.path().join(format!("{name}.toml"));
    config.write_to(&path).unwrap();
    path
}

/// Live watching over 200 blocks with payments along the way; returns the first height mined.
async fn live_history(h: &Harness) -> u32 {
    let first = h.node.height() + 1;
    for round in 0..8u64 {
        h.node.pay(P2WPKH, 10_000 + round);
        h.node.pay(P2TR, 20_000 + round);
        // Both pendings of this round, after the 7 events of each round before.
        h.receiver.wait_accepted(7 * round as usize + 2, WAIT).await;
        h.node.mine(25);
    }
    h.receiver.wait_accepted(56, WAIT).await;
    first
}

/// A daemon watching live through `live_history`, then stopped: the first height mined, and
/// the events it stored.
async fn live_run(h: &Harness) -> (u32, Vec<(String, String)>) {
    let live = h.start_daemon();
    h.wait_synced().await;
    let first = live_history(h).await;
    h.wait_synced().await;
    live.stop().await;
    (first, log(&h.data_dir()))
}

async fn wait_log_len(dir: &std::path::Path, n: usize) -> Vec<(String, String)> {
    let what = format!("{n} events in {}", dir.display());
    wait_for(&what, Duration::from_secs(40), || {
        if chainwatch::store::db_path(dir).exists() {
            let l = log(dir);
            if l.len() >= n {
                return Ok(l);
            }
        }
        Err(String::new())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_from_start_height_over_200_blocks_has_the_live_runs_ids() {
    let h = Harness::new(&[watch(P2WPKH, 3, "a"), watch(P2TR, 2, "b")]).await;
    let (first, live_log) = live_run(&h).await;
    assert_eq!(
        live_log.len(),
        8 * (2 + 3 + 2),
        "8 rounds: two pendings, 3 + 2 confirmations"
    );
    let expected = without_pending(&live_log);

    let rescanned = catch_up_from(&h, "data2", first, expected.len()).await;
    assert_eq!(rescanned, expected, "the same events with the same ids, in the same order (no pendings: the past mempool is gone), and nothing more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_add_rescan_from_finds_past_payments_with_live_ids_and_resumes_after_a_kill() {
    let h = Harness::new(&[watch(P2WPKH, 3, "a"), watch(P2TR, 2, "b")]).await;
    let live = h.start_daemon();
    h.wait_synced().await;
    // A second watcher runs beside the first, watching nothing yet.
    let path = second_config(&h, "late", None, false);
    let spawn = || h.spawn_binary_with(&path);
    let mut late = spawn();
    let first = live_history(&h).await;
    h.wait_synced().await;
    live.stop().await;
    let expected = without_pending(&log(&h.data_dir()));
    let late_dir = h.dir.path().join("late");
    // Wait for the late watcher to reach the tip too.
    h.wait_synced_dir(&late_dir).await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let from = first.to_string();
    let a = run(&[
        "watch",
        "add",
        P2WPKH,
        "--confirmations",
        "3",
        "--label",
        "a",
        "--metadata",
        "{\"order_id\":1000}",
    ]);
    assert!(a.status.success());
    // The second watch rescans while we kill the watcher half way: after its first batch
    // (25 blocks) is stored, while the second (the other 175 small blocks) is read, which the
    // node slows down.
    h.node.set_block_read_delay(Duration::from_millis(20));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args([
            "watch",
            "add",
            P2TR,
            "--confirmations",
            "2",
            "--label",
            "b",
            "--metadata",
            "{\"order_id\":1001}",
            "--rescan-from",
            &from,
            "--config",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let store = chainwatch::store::Store::open(&late_dir).unwrap();
    // Looking often: the kill must land half way.
    poll(
        "the rescan to start",
        WAIT,
        Duration::from_millis(5),
        || {
            let next = store.rescans().unwrap().first().map(|r| r.1);
            std::future::ready(if next.is_some_and(|n| n > first) {
                Ok(())
            } else {
                Err(format!("rescan did not start: {next:?}"))
            })
        },
    )
    .await;
    late.kill().unwrap();
    late.wait().unwrap();
    h.node.set_block_read_delay(Duration::ZERO);
    let half = store.rescans().unwrap();
    assert!(
        half.first().is_some_and(|r| r.1 < h.node.height()),
        "killed half way: {half:?}"
    );
    let mut late = spawn();
    let progress = tokio::task::spawn_blocking(move || out.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&progress.stderr).to_string();
    assert!(
        text.contains("rescan [") && text.contains("blocks/s"),
        "a progress bar: {text}"
    );
    assert!(text.contains("rescan done"), "{text}");
    // And the first watch, added without a rescan, gets its own rescan now.
    let a_id = String::from_utf8(a.stdout).unwrap().trim().to_string();
    assert!(store.request_rescan(&a_id, first).unwrap());
    wait_until(
        "the rescan of the first watch to finish",
        Duration::from_secs(40),
        || store.rescans().unwrap().is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.kill().unwrap();
    late.wait().unwrap();
    let got = log(&late_dir);
    let mut ids: Vec<&String> = got.iter().map(|e| &e.1).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "no duplicates after the kill");
    let mut want: Vec<(String, String)> = expected.clone();
    want.sort();
    let mut have = got.clone();
    have.sort();
    assert_eq!(
        have, want,
        "every past payment's events, with the ids of the live run"
    );
}

/// `watch add … --rescan-from FROM` with the CLI, waiting for the rescan to finish.
fn add_rescanning(
    path: &std::path::Path,
    address: &str,
    confirmations: &str,
    label: &str,
    from: u32,
) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(["watch", "add", address, "--confirmations", confirmations])
        .args([
            "--label",
            label,
            "--rescan-from",
            &from.to_string(),
            "--config",
        ])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("rescan done"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_over_a_node_with_block_filters_skips_quiet_blocks_and_has_the_live_runs_ids() {
    let h = Harness::new(&[watch(P2WPKH, 3, "a"), watch(P2TR, 2, "b")]).await;
    h.node.set_block_filters(true);
    let live = h.start_daemon();
    h.wait_synced().await;
    let first = live_history(&h).await;
    // Quiet blocks after the last payment: the filters prove they hold nothing for either.
    h.node.mine(100);
    h.wait_synced().await;
    live.stop().await;
    let expected = without_pending(&log(&h.data_dir()));
    let path = second_config(&h, "late", None, false);
    let mut late = h.spawn_binary_with(&path);
    let late_dir = h.dir.path().join("late");
    h.wait_synced_dir(&late_dir).await;
    let read_before = h.node.calls("getblock");
    add_rescanning(&path, P2WPKH, "3", "a", first);
    add_rescanning(&path, P2TR, "2", "b", first);
    let read = h.node.calls("getblock") - read_before;
    late.kill().unwrap();
    late.wait().unwrap();
    let (mut have, mut want) = (log(&late_dir), expected);
    have.sort();
    want.sort();
    assert_eq!(
        have, want,
        "every past payment's events, with the ids of the live run"
    );
    // Each rescan covers 300 blocks. Of them it reads, for each of the 8 payments, the paying
    // block and those of its further confirmations (3 for a, 2 for b); filters skip the rest.
    // (Senders come through getrawtransaction.)
    assert_eq!(
        read,
        8 * 3 + 8 * 2,
        "blocks read by two rescans of 300 blocks (getblockfilter asked {} times)",
        h.node.calls("getblockfilter")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_under_a_running_rescan_reorgs_what_it_found() {
    let h = Harness::new(&[watch(P2WPKH, 2, "a")]).await;
    let live = h.start_daemon();
    h.wait_synced().await;
    let path = second_config(&h, "late", None, false);
    let spawn = || h.spawn_binary_with(&path);
    let mut late = KillOnDrop(spawn());
    let first = h.node.height() + 1;
    h.node.pay(P2WPKH, 12_000);
    h.receiver.wait_accepted(1, WAIT).await;
    h.node.mine(1);
    let paid_height = h.node.height();
    // Deep enough to catch the rescan half way, shallow enough to stay within finality_depth.
    h.node.mine(80);
    h.receiver.wait_accepted(3, WAIT).await;
    h.wait_synced().await;
    let late_dir = h.dir.path().join("late");
    h.wait_synced_dir(&late_dir).await;
    let store = chainwatch::store::Store::open(&late_dir).unwrap();
    // The CLI follows the rescan with its progress bar; let it run beside us.
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args([
            "watch",
            "add",
            P2WPKH,
            "--confirmations",
            "2",
            "--label",
            "a",
            "--metadata",
            "{\"order_id\":1000}",
        ])
        .args(["--rescan-from", &first.to_string(), "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the rescan has passed the payment's confirmations, well before the tip.
    poll(
        "the rescan to progress",
        WAIT,
        Duration::from_millis(2),
        || {
            let next = store.rescans().unwrap().first().map(|r| r.1);
            std::future::ready(if next.is_some_and(|n| n > paid_height + 3) {
                Ok(())
            } else {
                Err(format!("rescan did not progress: {next:?}"))
            })
        },
    )
    .await;
    late.stop();
    let _ = cli.kill();
    let _ = cli.wait();
    let next = store.rescans().unwrap()[0].1;
    assert!(next < h.node.height(), "killed mid-rescan at {next}");
    assert_eq!(
        without_pending(&log(&late_dir)).len(),
        2,
        "the rescan found conf 1 and confirmed before the kill"
    );
    // Replace everything from the payment's block up; the payment is mined again.
    let depth = h.node.height() - paid_height + 1;
    h.node.reorg(depth, true);
    h.receiver.wait_accepted(6, WAIT).await;
    h.wait_synced().await;
    live.stop().await;
    let mut late = KillOnDrop(spawn());
    wait_until("the rescan to finish", Duration::from_secs(40), || {
        store.rescans().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.stop();
    let mut want = without_pending(&log(&h.data_dir()));
    let kinds: Vec<&str> = want.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "tx.confirmation",
            "tx.confirmed",
            "tx.reorged",
            "tx.confirmation",
            "tx.confirmed"
        ],
        "the live run"
    );
    want.sort();
    let mut got = log(&late_dir);
    got.sort();
    assert_eq!(
        got, want,
        "the rescan reorged what it had found, then found the payment again"
    );
}

/// A watch added with a long rescan is followed in the mempool at once: a payment made while
/// the rescan runs is pending before it ends, and the rescan confirms that same transaction
/// (one event of each kind, no second tx.pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_during_a_long_rescan_is_pending_at_once_and_announced_once() {
    let h = Harness::new(&[]).await;
    h.node.mine(300);
    let from = (h.node.height() - 299).to_string();
    let daemon = h.start_daemon();
    h.wait_synced().await;
    // Each block read held 200 ms, 16 at a time: the rescan takes about four seconds.
    h.node.set_block_read_delay(Duration::from_millis(200));
    let mut add = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args([
            "watch",
            "add",
            P2WPKH,
            "--confirmations",
            "2",
            "--rescan-from",
            &from,
            "--config",
        ])
        .arg(&h.config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let store = chainwatch::store::Store::open(&h.data_dir()).unwrap();
    // Paid once the first batch (25 blocks) is stored: the second, of small blocks, would
    // take the rest of the rescan if 250 ms did not end it.
    let from_height: u32 = from.parse().unwrap();
    wait_until("the rescan's first batch", WAIT, || {
        store
            .rescans()
            .unwrap()
            .first()
            .is_some_and(|r| r.1 > from_height)
    })
    .await;
    let txid = h.node.pay(P2WPKH, 42_000).to_string();
    let got = h.receiver.wait_accepted(1, WAIT).await;
    let running = store.rescans().unwrap();
    assert!(
        !running.is_empty(),
        "tx.pending arrived while the rescan was still running"
    );
    assert_eq!(got[0].kind(), "tx.pending");
    assert_eq!(got[0].data()["txid"], txid.as_str());
    // Mined while the rescan is behind; confirmed once by the rescan, then by live following.
    h.node.mine(1);
    wait_until("the rescan to finish", Duration::from_secs(60), || {
        store.rescans().unwrap().is_empty()
    })
    .await;
    h.node.set_block_read_delay(Duration::ZERO);
    h.node.mine(1);
    h.receiver.wait_accepted(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kinds: Vec<(String, u64)> = h
        .receiver
        .accepted()
        .iter()
        .filter(|c| c.data()["txid"] == txid.as_str())
        .map(|c| {
            let n = c.data()["confirmations"].as_u64().unwrap();
            (c.kind().to_string(), n)
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("tx.pending".to_string(), 0),
            ("tx.confirmation".to_string(), 1),
            ("tx.confirmed".to_string(), 2)
        ],
        "each event once"
    );
    add.wait().unwrap();
    daemon.stop().await;
}

/// Catches up over the live history with its own data directory from `first`, until there
/// are `n` events and 300 ms more (time for any more to come); the events it stored.
async fn catch_up_from(h: &Harness, name: &str, first: u32, n: usize) -> Vec<(String, String)> {
    let path = second_config(h, name, Some(first), true);
    let cfg = chainwatch::config::Config::load(&path).unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    let dir = h.dir.path().join(name);
    wait_log_len(&dir, n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel();
    task.await.unwrap().unwrap();
    log(&dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rest_on_blocks_are_read_raw_and_a_forged_one_is_read_again_with_getblock() {
    let h = Harness::new(&[watch(P2WPKH, 3, "a"), watch(P2TR, 2, "b")]).await;
    let (first, live_log) = live_run(&h).await;
    let expected = without_pending(&live_log);
    let blocks = h.node.height() - first + 1;

    // The block that confirms the first round's two payments, each output a satoshi more,
    // under its true header.
    h.node.set_rest(true);
    h.node.forge_rest_block(Some(h.node.block_hash(first)));
    let (rest_before, getblock_before) = (h.node.calls("rest/block"), h.node.calls("getblock"));
    let events = catch_up_from(&h, "raw", first, expected.len()).await;
    assert_eq!(
        events, expected,
        "the live run's events and ids, the forged block's payments at their true amounts"
    );
    assert_eq!(
        h.node.calls("rest/block") - rest_before,
        blocks,
        "every block of the catch-up asked of REST once"
    );
    assert_eq!(
        h.node.calls("getblock") - getblock_before,
        1,
        "only the forged block read again with getblock"
    );

    // Without -rest, REST is asked for the first group of blocks, which are asked for at
    // once (8); then every block comes through getblock.
    h.node.set_rest(false);
    h.node.forge_rest_block(None);
    let (rest_before, getblock_before) = (h.node.calls("rest/block"), h.node.calls("getblock"));
    let events = catch_up_from(&h, "json", first, expected.len()).await;
    assert_eq!(events, expected, "the same events through getblock");
    let asked = h.node.calls("rest/block") - rest_before;
    assert!(
        (1..=8).contains(&asked),
        "a node without -rest is not asked again for every block: asked {asked} times for {blocks} blocks"
    );
    assert_eq!(
        h.node.calls("getblock") - getblock_before,
        blocks,
        "every block read with getblock"
    );
}
