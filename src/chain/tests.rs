//! The follower against the in-memory simulated node: no HTTP, no ZMQ sockets, no sleeping.
//! Each test drives the node, lets the follower catch up, and asserts the exact event log.

use std::sync::Arc;
use std::time::Duration;

use bitcoin::{BlockHash, Txid};
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::{FollowError, Follower, FollowerOptions};
use crate::config::StartHeight;
use crate::event::*;
use crate::merge::Merge;
use crate::simnode::SimNode;
use crate::store::Store;
use crate::tip::TipChange;
use crate::tracker::{Tracker, TxStatus};
use crate::unit_kit::*;
use crate::watch::Watch;

const FINALITY: u32 = 6;

struct Rig {
    node: SimNode,
    follower: Follower<SimNode>,
    _dir: tempfile::TempDir,
}

fn options() -> FollowerOptions {
    FollowerOptions {
        start_height: StartHeight::Tip,
        poll_interval: Duration::from_secs(3600),
        zmq_mempool: false,
        alert_reorg_depth: 3,
        node_unreachable_after: Duration::from_secs(60),
    }
}

fn open_store(dir: &std::path::Path, watches: &[Watch]) -> Store {
    let mut store = crate::store::test_store(dir);
    // Commits need not survive power loss here; fsyncs would make the tests slow.
    store.relax_durability().unwrap();
    store.check_network("regtest").unwrap();
    store.set_keep_blocks(FINALITY + 10);
    store.upsert_watches(watches, "test", 0).unwrap();
    store
}

/// A node with mature coins (101 blocks) and a follower of it watching `watches`, started at
/// the node's tip.
async fn rig(watches: &[Watch]) -> Rig {
    static FUNDED: std::sync::OnceLock<SimNode> = std::sync::OnceLock::new();
    let node = FUNDED
        .get_or_init(|| {
            let node = SimNode::in_memory();
            node.mine(101);
            node
        })
        .snapshot();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), watches);
    let follower = follower_over(&node, store);
    let mut rig = Rig {
        node,
        follower,
        _dir: dir,
    };
    rig.sync().await;
    assert_eq!(
        rig.log(),
        Vec::<Ev>::new(),
        "starting at the tip tells nothing"
    );
    rig
}

fn follower_over(node: &SimNode, store: Store) -> Follower<SimNode> {
    let tracker = Tracker::new("regtest", FINALITY, store.load_tracked().unwrap());
    Follower::new(
        Arc::new(node.clone()),
        store,
        tracker,
        options(),
        Arc::new(Notify::new()),
    )
}

/// One logged event: type, txid (empty for others), confirmations.
type Ev = (String, String, u64);

fn ev(kind: &str, txid: Option<Txid>, confirmations: u64) -> Ev {
    (
        kind.to_string(),
        txid.map(|t| t.to_string()).unwrap_or_default(),
        confirmations,
    )
}

impl Rig {
    async fn sync(&mut self) {
        self.follower.resync().await.expect("resync");
    }

    fn bodies(&self) -> Vec<Value> {
        self.follower
            .store
            .events_after(0, 10_000)
            .unwrap()
            .iter()
            .map(|e| serde_json::from_str(&e.body).unwrap())
            .collect()
    }

    fn log(&self) -> Vec<Ev> {
        self.bodies()
            .iter()
            .map(|b| {
                let d = &b["data"];
                (
                    b["type"].as_str().unwrap().to_string(),
                    d["txid"].as_str().unwrap_or_default().to_string(),
                    d["confirmations"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Events after the first `n`.
    fn log_after(&self, n: usize) -> Vec<Ev> {
        self.log().split_off(n)
    }

    /// Events about `txid` after the first `n`.
    fn log_of(&self, n: usize, txid: Txid) -> Vec<Ev> {
        let txid = txid.to_string();
        self.log_after(n)
            .into_iter()
            .filter(|e| e.1 == txid)
            .collect()
    }

    /// The txids of the `tx.confirmed` events so far, in order.
    fn confirmed_txids(&self) -> Vec<String> {
        (self.log().into_iter())
            .filter(|e| e.0 == TX_CONFIRMED)
            .map(|e| e.1)
            .collect()
    }

    /// Adds watch `w` and asks for its rescan from `from`; the follower takes it up.
    async fn start_rescan(&mut self, w: &Watch, from: u32) {
        self.follower.store.upsert_watch(w, "test", 1).unwrap();
        self.follower.store.request_rescan(&w.id, from).unwrap();
        self.sync().await;
    }

    /// Scans until the running rescan reaches the tip.
    async fn finish_rescan(&mut self) {
        while self.follower.rescanning() {
            self.follower.rescan_batch().await.unwrap();
        }
    }

    /// Feeds what the node published since last time to the follower, as the subscriber would.
    async fn deliver_zmq(&mut self) {
        let batch = self.node.take_zmq();
        self.follower.on_zmq_batch(batch).await.expect("zmq batch");
    }

    fn tip(&self) -> BlockHash {
        self.follower.store.tip().unwrap().unwrap().hash
    }
}

fn blocks(kind: &str, n: usize) -> Vec<Ev> {
    vec![ev(kind, None, 0); n]
}

#[tokio::test]
async fn a_payment_is_pending_then_confirmed_block_by_block() {
    let w = watch(1, 2);
    let mut r = rig(std::slice::from_ref(&w)).await;
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.sync().await;
    r.node.mine(2);
    r.sync().await;
    assert_eq!(
        r.log(),
        [
            ev(TX_PENDING, Some(txid), 0),
            ev(BLOCK_CONNECTED, None, 0),
            ev(TX_CONFIRMATION, Some(txid), 1),
            ev(BLOCK_CONNECTED, None, 0),
            ev(TX_CONFIRMED, Some(txid), 2),
        ]
    );
    let bodies = r.bodies();
    let b102 = r.node.block_hash(102);
    assert_eq!(
        bodies[2]["data"]["id"],
        tx_event_id(TX_CONFIRMATION, txid, &w, Some(b102), 1, 0)
    );
    assert_eq!(
        bodies[0]["data"]["watch"]["label"], "order-1",
        "labelled before commit"
    );
    assert_eq!(r.tip(), r.node.tip());
}

#[tokio::test]
async fn a_restarted_follower_repeats_nothing() {
    let w = watch(1, 3);
    let mut r = rig(std::slice::from_ref(&w)).await;
    r.node.pay(&address(1).to_string(), 50_000);
    r.node.mine(1);
    r.sync().await;
    let before = r.log();
    let store = r.follower.store.reopen().unwrap();
    r.follower = follower_over(&r.node, store);
    r.sync().await;
    assert_eq!(r.log(), before, "state came back from the store");
    r.node.mine(1);
    r.sync().await;
    assert_eq!(r.log_after(before.len())[1].0, TX_CONFIRMATION);
}

/// A payment confirmed `depth` blocks deep, then a reorg of that depth that mines it again.
async fn reorg_of_depth(depth: u32) {
    let w = watch(1, 100);
    let mut r = rig(std::slice::from_ref(&w)).await;
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.node.mine(depth);
    r.sync().await;
    let old_block = r.node.block_hash(102);
    let seen = r.log().len();
    let committed = r.follower.journal.len();
    r.node.reorg(depth, true);
    r.sync().await;
    assert_reorg_change_sets(&r, committed, depth, txid, &w);
    let mut want = vec![];
    if depth >= options().alert_reorg_depth {
        want.push(ev(ALERT_REORG, None, 0));
    }
    // From the top down; the payment's block (the lowest) is disconnected last.
    want.extend(blocks(BLOCK_DISCONNECTED, depth as usize));
    want.push(ev(TX_REORGED, Some(txid), 0));
    want.push(ev(BLOCK_CONNECTED, None, 0));
    want.push(ev(TX_CONFIRMATION, Some(txid), 1));
    for n in 2..=depth + 1 {
        want.push(ev(BLOCK_CONNECTED, None, 0));
        want.push(ev(TX_CONFIRMATION, Some(txid), n as u64));
    }
    assert_eq!(r.log_after(seen), want, "reorg of depth {depth}");
    let bodies = r.bodies();
    let reorged = bodies
        .iter()
        .find(|b| b["type"] == TX_REORGED)
        .expect("tx.reorged");
    assert_eq!(
        reorged["data"]["id"],
        tx_event_id(TX_REORGED, txid, &w, Some(old_block), 0, 0)
    );
    let new_block = r.node.block_hash(102);
    let again = bodies.last().unwrap();
    assert_eq!(
        again["data"]["id"],
        tx_event_id(TX_CONFIRMATION, txid, &w, Some(new_block), depth + 1, 1),
        "counted again in the new block, with the reorg in its id"
    );
    assert_eq!(r.tip(), r.node.tip());
}

/// The change sets of a reorg of `depth` over a payment confirmed at 102: the tip goes down
/// block by block to 101 and up again to 102 + depth; the payment's row is unconfirmed (its
/// reorg counted) with 102's disconnect and confirmed in the new 102 with its connect.
fn assert_reorg_change_sets(r: &Rig, from: usize, depth: u32, txid: Txid, w: &Watch) {
    let sets = &r.follower.journal[from..];
    let moves: Vec<(bool, u32)> = sets
        .iter()
        .flat_map(|c| c.tip.0.iter())
        .map(|t| match t {
            TipChange::Connect { block, .. } => (true, block.height),
            TipChange::Disconnect { block } => (false, block.height),
        })
        .collect();
    let mut want: Vec<(bool, u32)> = (102..=101 + depth).rev().map(|h| (false, h)).collect();
    want.extend((102..=102 + depth).map(|h| (true, h)));
    assert_eq!(moves, want, "one tip move per change set, down then up");
    assert!(
        sets.iter().all(|c| c.tip.0.len() <= 1),
        "a step moves the tip at most once"
    );
    let row_at = |connect: bool, height: u32| {
        let set = sets
            .iter()
            .find(|c| {
                c.tip.0.iter().any(|t| match t {
                    TipChange::Connect { block, .. } => connect && block.height == height,
                    TipChange::Disconnect { block } => !connect && block.height == height,
                })
            })
            .expect("a change set for the move");
        let rows: Vec<&crate::tracker::Tracked> = set.tracked.upserts().collect();
        assert_eq!(
            rows.len(),
            1,
            "only the payment's row changes: {:?}",
            set.tracked
        );
        assert_eq!(
            (rows[0].txid, rows[0].watch_id.as_str()),
            (txid, w.id.as_str())
        );
        rows[0].clone()
    };
    let gone = row_at(false, 102);
    assert_eq!(
        (gone.status, gone.reorg_count, gone.fired),
        (TxStatus::Unconfirmed, 1, 0)
    );
    let back = row_at(true, 102);
    let new_102 = r.node.block_hash(102);
    assert!(
        matches!(back.status, TxStatus::Confirmed(b) if b.hash == new_102),
        "{:?}",
        back.status
    );
    assert_eq!((back.reorg_count, back.fired), (1, 1));
    assert!(
        sets.iter()
            .all(|c| c.index.is_empty() || c.index.coins.len() == 1),
        "the payment's coin is recorded again with its block, nothing else"
    );
}

// Every depth up to finality (6), each a test of its own so they run side by side.
#[tokio::test]
async fn a_reorg_of_depth_1_is_undone_and_redone() {
    reorg_of_depth(1).await;
}

#[tokio::test]
async fn a_reorg_of_depth_2_is_undone_and_redone() {
    reorg_of_depth(2).await;
}

#[tokio::test]
async fn a_reorg_of_depth_3_is_undone_and_redone() {
    reorg_of_depth(3).await;
}

#[tokio::test]
async fn a_reorg_of_depth_4_is_undone_and_redone() {
    reorg_of_depth(4).await;
}

#[tokio::test]
async fn a_reorg_of_depth_5_is_undone_and_redone() {
    reorg_of_depth(5).await;
}

#[tokio::test]
async fn a_reorg_of_depth_6_is_undone_and_redone() {
    assert_eq!(FINALITY, 6);
    reorg_of_depth(6).await;
}

#[tokio::test]
async fn a_reorg_alert_names_depth_fork_and_both_tips() {
    let mut r = rig(&[]).await;
    r.node.mine(4);
    r.sync().await;
    let old_tip = r.node.tip();
    r.node.reorg(3, false);
    r.sync().await;
    let alert = r
        .bodies()
        .into_iter()
        .find(|b| b["type"] == ALERT_REORG)
        .expect("alert.reorg");
    let d = &alert["data"];
    assert_eq!(d["depth"], 3);
    assert_eq!(d["fork_height"], 102);
    assert_eq!(d["old_tip"]["hash"], old_tip.to_string());
    assert_eq!(d["old_tip"]["height"], 105);
    assert_eq!(d["new_tip"]["hash"], r.node.tip().to_string());
    assert_eq!(d["new_tip"]["height"], 106);
}

#[tokio::test]
async fn a_fork_below_the_kept_blocks_is_alerted_and_followed() {
    let w = watch(1, 100);
    let mut r = rig(std::slice::from_ref(&w)).await;
    r.node.mine(13);
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.node.mine(12);
    r.sync().await;
    let lowest = r.follower.store.lowest_block().unwrap().unwrap().height;
    assert_eq!(lowest, 126 - (FINALITY + 10), "the kept window");
    let seen = r.log().len();
    // A 20-block reorg forks at 106, below the lowest kept block.
    r.node.reorg(20, false);
    r.sync().await;
    let after = r.log_after(seen);
    assert_eq!(after[0].0, ALERT_REORG);
    let alert = &r.bodies()[seen]["data"];
    assert!(
        alert["error"]
            .as_str()
            .unwrap()
            .contains("reorg deeper than the 17 blocks kept"),
        "{alert}"
    );
    assert_eq!(alert["depth"], Value::Null);
    // Every kept block goes, from the top; the payment's block (115) reorgs it.
    let mut want = blocks(BLOCK_DISCONNECTED, 12);
    want.push(ev(TX_REORGED, Some(txid), 0));
    want.extend(blocks(BLOCK_DISCONNECTED, 5));
    // Then the node's chain from the lowest kept height to its new tip (127).
    want.extend(blocks(BLOCK_CONNECTED, 127 - lowest as usize + 1));
    assert_eq!(after[1..], want[..]);
    assert_eq!(r.tip(), r.node.tip(), "following the node's chain again");
    let row = r.follower.tracker.get(txid, &w.id).expect("still tracked");
    assert_eq!(
        row.status,
        crate::tracker::TxStatus::Mempool,
        "back in the mempool after the reorg"
    );
}

#[tokio::test]
async fn a_replacement_announced_over_zmq_is_told_with_its_successor() {
    let w = watch(1, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    r.node.take_zmq();
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.deliver_zmq().await;
    let other = address(2).script_pubkey();
    let by = r.node.replace(txid, &[(other, 40_000)]);
    r.deliver_zmq().await;
    assert_eq!(
        r.log(),
        [
            ev(TX_PENDING, Some(txid), 0),
            ev(TX_REPLACED, Some(txid), 0)
        ]
    );
    let replaced = r.bodies().pop().unwrap();
    assert_eq!(replaced["data"]["replaced_by"], by.to_string());
    assert_eq!(
        replaced["data"]["id"],
        tx_event_id(TX_REPLACED, txid, &w, None, 0, 0)
    );
}

#[tokio::test]
async fn a_double_spend_mined_drops_the_payment_as_a_conflict() {
    let w = watch(1, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.sync().await;
    let ds = r
        .node
        .double_spend(txid, &[(address(2).script_pubkey(), 40_000)]);
    r.node.mine_block_with(vec![ds.clone()]);
    r.sync().await;
    assert_eq!(
        r.log(),
        [
            ev(TX_PENDING, Some(txid), 0),
            ev(BLOCK_CONNECTED, None, 0),
            ev(TX_DROPPED, Some(txid), 0),
        ]
    );
    let dropped = &r.bodies()[2]["data"];
    assert_eq!(dropped["reason"], "conflict");
    assert_eq!(dropped["conflicting_txid"], ds.compute_txid().to_string());
}

#[tokio::test]
async fn an_eviction_is_a_drop() {
    let mut r = rig(&[watch(1, 1)]).await;
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.sync().await;
    r.node.evict(txid);
    r.sync().await;
    assert_eq!(
        r.log(),
        [ev(TX_PENDING, Some(txid), 0), ev(TX_DROPPED, Some(txid), 0)]
    );
    assert_eq!(r.bodies()[1]["data"]["reason"], "evicted");
}

#[tokio::test]
async fn a_zmq_announcement_of_a_transaction_the_node_lacks_is_ignored() {
    let mut r = rig(&[watch(1, 1)]).await;
    r.node.take_zmq();
    let forged = r.node.payment_tx(&address(1).to_string(), 50_000);
    let txid = forged.compute_txid();
    r.node
        .publish_raw("rawtx", bitcoin::consensus::serialize(&forged));
    r.node.publish_raw(
        "sequence",
        crate::node::zmq_wire::sequence_body(&crate::node::zmq_wire::SequenceEvent::TxAdded(
            txid, 99,
        )),
    );
    r.deliver_zmq().await;
    r.sync().await;
    assert_eq!(r.log(), Vec::<Ev>::new(), "nothing the node does not hold");
}

#[tokio::test]
async fn descriptor_payments_extend_the_watched_range_across_blocks() {
    let w = descriptor_watch(2, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    let a = r.node.pay_script(&[(derived_script(1), 1_000)]);
    r.node.mine(1);
    r.sync().await;
    let b = r.node.pay_script(&[(derived_script(3), 3_000)]);
    let c = r.node.pay_script(&[(derived_script(6), 6_000)]);
    r.node.mine(1);
    r.sync().await;
    assert_eq!(
        r.confirmed_txids(),
        [a.to_string(), b.to_string()],
        "6 is past 3 + gap 2"
    );
    assert!(!r.log().iter().any(|e| e.1 == c.to_string()));
    let used = r.follower.store.load_derivations().unwrap();
    assert_eq!(used.len(), 1);
    assert_eq!((used[0].path, used[0].used), (0, 3));
    let derivations: Vec<(u32, u32)> = r
        .follower
        .journal
        .iter()
        .flat_map(|c| c.index.derivations.iter())
        .map(|d| (d.path, d.used))
        .collect();
    assert_eq!(
        derivations,
        [(0, 1), (0, 3)],
        "each used index committed with the block that used it"
    );
}

#[tokio::test]
async fn a_failed_watch_lookup_fails_the_step_and_loses_nothing() {
    let w = watch(1, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let store = r.follower.store.reopen().unwrap();
    let conn = std::sync::Mutex::new(store.reopen().unwrap());
    let flag = fail.clone();
    let loader: crate::watch::WatchLoader = Arc::new(move |id: &str| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("database is locked".into());
        }
        conn.lock()
            .unwrap()
            .load_watch(id)
            .map_err(|e| e.to_string())
    });
    r.follower = follower_over(&r.node, store).with_watch_loader(loader);
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.node.mine(1);
    let err = r.follower.resync().await.expect_err("the lookup fails");
    assert!(matches!(err, FollowError::Lookup(_)), "{err}");
    assert_eq!(r.log(), Vec::<Ev>::new(), "nothing committed");
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    r.sync().await;
    assert_eq!(
        r.log(),
        [
            ev(BLOCK_CONNECTED, None, 0),
            ev(TX_CONFIRMED, Some(txid), 1)
        ]
    );
}

#[tokio::test]
async fn an_unreachable_node_is_a_transient_failure_and_following_resumes() {
    let mut r = rig(&[watch(1, 1)]).await;
    r.node.set_down(true);
    let err = r.follower.resync().await.expect_err("node is down");
    assert!(err.is_transient(), "{err}");
    r.node.set_down(false);
    r.node.mine(1);
    r.sync().await;
    assert_eq!(r.log(), [ev(BLOCK_CONNECTED, None, 0)]);
}

#[tokio::test]
async fn a_rescan_of_blocks_that_change_nothing_stores_its_progress_at_the_end_of_each_batch() {
    let live = watch(1, 1);
    let late = watch(2, 2);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.mine(40);
    r.sync().await;
    let seen = r.log().len();
    r.start_rescan(&late, 101).await;
    r.follower.rescan_batch().await.unwrap();
    assert_eq!(
        r.follower.store.rescans().unwrap(),
        vec![(late.id.clone(), 126)],
        "25 empty blocks scanned, none committed alone: their progress is stored once"
    );
    assert_eq!(r.log_after(seen), [], "nothing to announce");
    r.finish_rescan().await;
    assert_eq!(
        r.follower.store.rescans().unwrap(),
        vec![],
        "the rescan finished"
    );
}

/// A follower of a chain that holds, 199 blocks below its tip, a payment to a watch it does
/// not follow yet, then starts a rescan of that watch from height 0: the follower, the watch,
/// the payment and the block that holds it.
async fn rescanning_a_payment_far_below() -> (Rig, Watch, Txid, BlockHash) {
    let live = watch(1, 1);
    let late = watch(2, 2);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.mine(100);
    let paid = r.node.pay(&address(2).to_string(), 50_000);
    let holder = r.node.mine(1)[0];
    r.node.mine(199);
    r.sync().await;
    r.start_rescan(&late, 0).await;
    (r, late, paid, holder)
}

/// Small blocks make large batches: after a first batch of 25 (the blocks' size not known
/// yet), the next goes on past 25 (on a quiet machine through all 402 regtest blocks; its
/// 250 ms may end it sooner). The hashes below the blocks we keep are asked for in one batch
/// of up to 1,000 heights, not one batch per group of blocks, and each is the block of its
/// height: a payment far below the kept blocks is confirmed in the block that holds it.
#[tokio::test]
async fn a_rescan_of_small_blocks_takes_large_batches_and_asks_their_hashes_at_once() {
    let (mut r, late, paid, holder) = rescanning_a_payment_far_below().await;
    let tip = r.node.height();
    let held_at = tip - 199;
    let (hashes, bodies) = (r.node.calls("getblockhash"), r.node.calls("getblock"));
    r.follower.rescan_batch().await.unwrap();
    assert_eq!(
        r.follower.store.rescans().unwrap(),
        vec![(late.id.clone(), 25)],
        "the first batch: 25 blocks"
    );
    r.follower.rescan_batch().await.unwrap();
    // Time is looked at only past 25 blocks, between groups of 16: at least 32.
    let second = (r.follower.store.rescans().unwrap().first()).map_or(tip + 1, |r| r.1);
    assert!(
        second >= 25 + 32,
        "the second batch read {} blocks, more than 25",
        second - 25
    );
    r.finish_rescan().await;
    assert_eq!(
        r.node.calls("getblock") - bodies,
        tip + 2,
        "every block read once, and the payment's again for the coins it spends (its senders)"
    );
    // One with the filters asked for first (the node keeps none, so every block is read),
    // one for the heights, and again if a slow machine took a second; asked per group of 16,
    // as before, they were 27.
    let asked = r.node.calls("getblockhash") - hashes;
    assert!(
        (2..=4).contains(&asked),
        "{asked} batches of hashes for the {} heights below the {} blocks kept",
        tip + 1 - (FINALITY + 10),
        FINALITY + 10
    );
    let found: Vec<(String, Value)> = (r.bodies().into_iter())
        .filter(|b| b["data"]["txid"] == paid.to_string())
        .map(|b| {
            (
                b["type"].as_str().unwrap().to_string(),
                b["data"]["block"].clone(),
            )
        })
        .collect();
    let block = serde_json::json!({ "hash": holder.to_string(), "height": held_at });
    let in_holder =
        |(_, b): &(String, Value)| b["hash"] == block["hash"] && b["height"] == block["height"];
    assert!(
        found.len() == 2 && found.iter().all(in_holder),
        "the payment confirmed, then final, both in block {held_at}: {found:?}"
    );
}

/// The node going down between two batches of a rescan fails the batch as a transient error
/// (reported and retried by the follower's loop) with the progress stored before it; once the
/// node is back the rescan goes on and tells a payment far below the kept blocks once, in the
/// block that holds it.
#[tokio::test]
async fn a_rescan_whose_node_goes_down_between_batches_resumes_and_tells_each_payment_once() {
    let (mut r, late, paid, holder) = rescanning_a_payment_far_below().await;
    r.follower.rescan_batch().await.unwrap();
    r.node.set_down(true);
    let err = (r.follower.rescan_batch().await).expect_err("the node is down");
    assert!(err.is_transient(), "a transient failure: {err}");
    assert_eq!(
        r.follower.store.rescans().unwrap(),
        vec![(late.id.clone(), 25)],
        "the first batch's progress stands"
    );
    r.node.set_down(false);
    r.finish_rescan().await;
    let told: Vec<(String, String)> = (r.bodies().into_iter())
        .filter(|b| b["data"]["txid"] == paid.to_string())
        .map(|b| {
            let kind = b["type"].as_str().unwrap().to_string();
            (
                kind,
                b["data"]["block"]["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let holder = holder.to_string();
    assert_eq!(
        told,
        [
            (TX_CONFIRMATION.to_string(), holder.clone()),
            (TX_CONFIRMED.to_string(), holder)
        ],
        "confirmed, then final, once each, in the block that holds it"
    );
}

/// The node's hashes a rescan holds are asked for again once a second old, so a rescan that
/// pauses reads the node's chain as it is now.
#[tokio::test]
async fn a_rescans_hashes_from_the_node_are_asked_again_once_a_second_old() {
    let live = watch(1, 1);
    let late = watch(2, 2);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.mine(300);
    r.sync().await;
    r.start_rescan(&late, 0).await;
    r.follower.rescan_batch().await.unwrap();
    let asked = r.node.calls("getblockhash");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    r.finish_rescan().await;
    assert!(
        r.node.calls("getblockhash") > asked,
        "the hashes held since the first batch were asked for again"
    );
}

#[tokio::test]
async fn a_rescan_under_a_reorg_reorgs_what_it_found_and_finds_it_again() {
    let live = watch(1, 1);
    let late = watch(2, 2);
    let mut r = rig(std::slice::from_ref(&live)).await;
    // Kept wide enough that the rescanned range is within it: a fork there is found.
    r.follower.store.set_keep_blocks(60);
    // Paid at 120, long before the watch exists.
    r.node.mine(18);
    let txid = r.node.pay(&address(2).to_string(), 70_000);
    r.node.mine(22);
    r.sync().await;
    let seen = r.log().len();
    r.start_rescan(&late, 101).await;
    // One batch scans 25 blocks (101..=125): the payment is found and confirmed, and still
    // tracked (6 deep at 125, within finality).
    r.follower.rescan_batch().await.unwrap();
    assert!(r.follower.rescanning(), "15 blocks are still to scan");
    let found = r.log_after(seen);
    assert_eq!(
        found,
        [
            ev(TX_CONFIRMATION, Some(txid), 1),
            ev(TX_CONFIRMED, Some(txid), 2)
        ]
    );
    // A reorg from 120 takes the payment's block; it is mined again in the new 120.
    let old_block = r.node.block_hash(120);
    r.node.reorg(22, true);
    r.sync().await;
    r.finish_rescan().await;
    let late_events = r.log_of(seen, txid);
    assert_eq!(
        late_events,
        [
            ev(TX_CONFIRMATION, Some(txid), 1),
            ev(TX_CONFIRMED, Some(txid), 2),
            ev(TX_REORGED, Some(txid), 0),
            ev(TX_CONFIRMATION, Some(txid), 1),
            ev(TX_CONFIRMED, Some(txid), 2),
        ]
    );
    let bodies = r.bodies();
    let reorged = bodies.iter().find(|b| b["type"] == TX_REORGED).unwrap();
    assert_eq!(
        reorged["data"]["id"],
        tx_event_id(TX_REORGED, txid, &late, Some(old_block), 0, 0)
    );
    assert_eq!(
        r.follower.store.rescans().unwrap(),
        vec![],
        "the rescan finished"
    );
}

#[tokio::test]
async fn a_catch_up_far_behind_reads_blocks_in_groups_with_the_events_of_one_by_one() {
    let w = watch(1, 2);
    let mut r = rig(std::slice::from_ref(&w)).await;
    r.sync().await;
    let seen = r.log().len();
    let mined = r.node.mine(40);
    let (hashes, bodies) = (r.node.calls("getblockhash"), r.node.calls("getblock"));
    r.sync().await;
    assert_eq!(
        r.log_after(seen),
        blocks(BLOCK_CONNECTED, 40),
        "every block, once"
    );
    let connected: Vec<Value> = r.bodies().split_off(seen);
    let connected: Vec<String> = (connected.iter())
        .map(|b| b["data"]["hash"].as_str().unwrap().to_string())
        .collect();
    let mined: Vec<String> = mined.iter().map(|h| h.to_string()).collect();
    assert_eq!(connected, mined, "in the chain's order");
    // After the look at our tip's hash that finds no fork: the 36 blocks up to 4 below the
    // tip in three groups (8, then 16 and 12 of these small blocks), each with one batch of
    // hashes, and a look that each group read ahead is still the node's; the last 4 one at a
    // time, the tip's hash known. One by one, that was 39 hashes.
    assert_eq!(
        (
            r.node.calls("getblockhash") - hashes,
            r.node.calls("getblock") - bodies
        ),
        (1 + 3 + 2 + 3, 40),
        "a batch of hashes per group, every block read once"
    );
}

#[tokio::test]
async fn a_catch_up_whose_blocks_read_ahead_are_reorged_away_ends_on_the_new_branch() {
    let w = watch(1, 2);
    let mut r = rig(std::slice::from_ref(&w)).await;
    let seen = r.log().len();
    let base = r.node.height();
    r.node.mine(20);
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.node.mine(20);
    let paid_in = r.node.block_hash(base + 21);
    // Once the first group (8 blocks) and the group after it (16) have been read, the node
    // leaves for a branch from base + 15 without the payment: blocks base + 15 to base + 24,
    // read ahead, are stale before the follower takes them.
    let asked = r.node.calls("getblock");
    r.node.on_call("getblock", asked + 24, move |node| {
        node.invalidate(node.block_hash(base + 15)).unwrap();
        node.mine_empty(40);
    });
    r.sync().await;
    assert_eq!(
        r.node.height(),
        base + 54,
        "the node moved to the new branch"
    );
    let log = r.log_after(seen);
    let connected: Vec<String> = (r.bodies().split_off(seen).iter())
        .filter(|b| b["type"] == BLOCK_CONNECTED)
        .map(|b| b["data"]["hash"].as_str().unwrap().to_string())
        .collect();
    let active: Vec<String> = (base + 1..=base + 54)
        .map(|h| r.node.block_hash(h).to_string())
        .collect();
    assert_eq!(
        connected, active,
        "exactly the new branch's blocks are told connected, in order: no stale one read ahead"
    );
    assert!(
        !connected.contains(&paid_in.to_string()),
        "the old branch's block with the payment was never told"
    );
    assert_eq!(
        log.iter()
            .filter(|e| e.0 != BLOCK_CONNECTED)
            .cloned()
            .collect::<Vec<_>>(),
        [ev(TX_PENDING, Some(txid), 0)],
        "no disconnection, no reorg alert, no confirmation taken back: the payment is pending"
    );
    // Taking the stale group would have read 8 + 16 + 30 blocks, and 10 more again after
    // the disconnections.
    assert!(
        r.node.calls("getblock") - asked >= 8 + 16 + 46,
        "the group read ahead was dropped whole, and the blocks from base + 9 read again: {}",
        r.node.calls("getblock") - asked
    );
}

#[tokio::test]
async fn blocks_read_ahead_of_a_reorg_are_read_again_from_the_new_branch() {
    let live = watch(1, 1);
    let late = watch(2, 2);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.follower.store.set_keep_blocks(60);
    r.node.mine(40);
    r.sync().await;
    let seen = r.log().len();
    let first = r.node.height() - 39;
    r.start_rescan(&late, first).await;
    // The first batch scans 25 blocks and asks for the next group (8 of the 15 left) ahead.
    r.follower.rescan_batch().await.unwrap();
    assert!(r.follower.rescanning(), "15 blocks are still to scan");
    // The top 10, 6 of them read ahead, are replaced by a branch whose first block pays the
    // watch.
    let fork = r.node.height() - 9;
    r.node.invalidate(r.node.block_hash(fork)).unwrap();
    let txid = r.node.pay(&address(2).to_string(), 70_000);
    r.node.mine(11);
    r.sync().await;
    r.finish_rescan().await;
    assert_eq!(
        r.log_of(seen, txid),
        [
            ev(TX_CONFIRMATION, Some(txid), 1),
            ev(TX_CONFIRMED, Some(txid), 2)
        ],
        "the payment in the new branch, which no block read ahead held, is found"
    );
    let confirmed = r.bodies();
    let confirmed = confirmed
        .iter()
        .find(|b| b["type"] == TX_CONFIRMED)
        .unwrap();
    assert_eq!(
        confirmed["data"]["block"]["hash"],
        r.node.block_hash(fork).to_string(),
        "confirmed in the new branch's first block"
    );
}

#[tokio::test]
async fn a_step_whose_aftermath_fails_is_planned_afresh_against_the_node() {
    use super::flaky_store::FlakyStore;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::in_memory();
    node.mine(102);
    let fail_after = Arc::new(AtomicBool::new(false));
    let store = FlakyStore {
        inner: open_store(dir.path(), &[]),
        fail_next_tip: Arc::default(),
        fail_tip_after_commit: fail_after.clone(),
        fail_commits: Arc::default(),
        fail_commit_after_next: Arc::default(),
        fail_next_rescans: Arc::default(),
    };
    let mut f: Follower<SimNode, FlakyStore> = Follower::new(
        Arc::new(node.clone()),
        store,
        Tracker::new("regtest", FINALITY, vec![]),
        options(),
        Arc::new(Notify::new()),
    );
    f.resync().await.unwrap();
    node.mine(2);
    f.resync().await.unwrap();
    let (a103, a104) = (node.block_hash(103), node.block_hash(104));
    // The node moves to a branch B from 103 (depth 2: no alert); our first step back commits,
    // but the next read of our tip fails.
    node.invalidate(a103).unwrap();
    node.mine_empty(3);
    fail_after.store(true, Ordering::SeqCst);
    let seen = f.store.inner.events_after(0, 1000).unwrap().len();
    assert!(f.resync().await.is_err(), "the injected failure");
    // Before the retry the node goes back to branch A.
    let b103 = node.block_hash(103);
    node.invalidate(b103).unwrap();
    node.reconsider(a103).unwrap();
    assert_eq!(node.tip(), a104);
    f.resync().await.unwrap();
    let kinds: Vec<String> = f
        .store
        .inner
        .events_after(0, 1000)
        .unwrap()
        .into_iter()
        .skip(seen)
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [BLOCK_DISCONNECTED, BLOCK_CONNECTED],
        "104 went and came back; 103, on the node's chain again, was never disconnected"
    );
    assert_eq!(f.store.inner.tip().unwrap().unwrap().hash, a104);
}

#[tokio::test]
async fn a_payment_during_a_rescan_is_pending_at_once_and_the_rescan_announces_nothing_twice() {
    let live = watch(1, 1);
    let late = watch(2, 2);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.mine(40);
    r.sync().await;
    let seen = r.log().len();
    // Already in the mempool when the watch is added.
    let early = r.node.pay(&address(2).to_string(), 60_000);
    r.start_rescan(&late, 101).await;
    r.follower.rescan_batch().await.unwrap();
    assert!(r.follower.rescanning(), "41 blocks take two batches");
    r.node.take_zmq();
    let during = r.node.pay(&address(2).to_string(), 70_000);
    r.deliver_zmq().await;
    assert_eq!(
        r.log_after(seen),
        [
            ev(TX_PENDING, Some(early), 0),
            ev(TX_PENDING, Some(during), 0)
        ],
        "both pending before the rescan ends"
    );
    // Replaced during the rescan: told then, as live following tells it.
    let replaced = r.node.pay(&address(2).to_string(), 80_000);
    r.deliver_zmq().await;
    let by = r
        .node
        .replace(replaced, &[(address(3).script_pubkey(), 70_000)]);
    r.deliver_zmq().await;
    let told = r.log_of(seen, replaced);
    assert_eq!(
        told,
        [
            ev(TX_PENDING, Some(replaced), 0),
            ev(TX_REPLACED, Some(replaced), 0)
        ]
    );
    assert_eq!(
        r.bodies().pop().unwrap()["data"]["replaced_by"],
        by.to_string()
    );
    assert!(r.follower.rescanning(), "all of it while the rescan runs");
    // Mined while the rescan is still behind: the rescan confirms it when it gets there.
    r.node.mine(1);
    r.deliver_zmq().await;
    assert!(r.follower.rescanning());
    r.finish_rescan().await;
    r.node.mine(1);
    r.sync().await;
    let bodies = r.bodies();
    for txid in [early, during] {
        let events = r.log_of(seen, txid);
        assert_eq!(
            events,
            [
                ev(TX_PENDING, Some(txid), 0),
                ev(TX_CONFIRMATION, Some(txid), 1),
                ev(TX_CONFIRMED, Some(txid), 2)
            ],
            "{txid}: each event once"
        );
        let ids: Vec<&Value> = bodies
            .iter()
            .filter(|b| b["data"]["txid"] == txid.to_string())
            .map(|b| &b["data"]["id"])
            .collect();
        let block = r.node.block_hash(142);
        assert_eq!(
            ids,
            [
                &json!(tx_event_id(TX_PENDING, txid, &late, None, 0, 0)),
                &json!(tx_event_id(TX_CONFIRMATION, txid, &late, Some(block), 1, 0)),
                &json!(tx_event_id(TX_CONFIRMED, txid, &late, Some(block), 2, 0)),
            ],
            "the ids a watcher running all along would have given"
        );
    }
}

#[tokio::test]
async fn a_spend_during_a_rescan_of_a_coin_it_has_not_reached_yet_counts_that_coin() {
    let late = watch(2, 1);
    let mut r = rig(&[]).await;
    r.node.mine(30);
    // The watch's coin, received at 132: beyond the rescan's first batch (101..=125).
    let funding = r.node.pay(&address(2).to_string(), 90_000);
    r.node.mine(1);
    r.node.mine(10);
    r.sync().await;
    let seen = r.log().len();
    r.start_rescan(&late, 101).await;
    r.follower.rescan_batch().await.unwrap();
    assert!(r.follower.rescanning());
    r.node.take_zmq();
    // Spent with change back to the watch while the rescan is behind.
    let coin = bitcoin::OutPoint::new(funding, 0);
    let spend = r.node.spend(
        &[(coin, 90_000)],
        &[
            (address(2).script_pubkey(), 30_000),
            (address(3).script_pubkey(), 50_000),
        ],
    );
    r.deliver_zmq().await;
    let pending = r.bodies().pop().unwrap();
    assert_eq!(pending["type"], TX_PENDING);
    assert_eq!(pending["data"]["txid"], spend.to_string());
    assert_eq!(
        pending["data"]["inputs"],
        json!([{"prevout": coin.to_string(), "address": address(2).to_string(), "amount_sat": 90_000}]),
        "the coin the rescan has not reached yet is the watch's"
    );
    assert_eq!(
        pending["data"]["amount_sat"], -60_000,
        "30,000 back of 90,000 spent"
    );
    r.finish_rescan().await;
    r.node.mine(1);
    r.sync().await;
    let spend_events: Vec<Value> = r
        .bodies()
        .into_iter()
        .skip(seen)
        .filter(|b| b["data"]["txid"] == spend.to_string())
        .collect();
    assert_eq!(
        spend_events.len(),
        2,
        "pending and confirmed: {spend_events:?}"
    );
    assert_eq!(spend_events[1]["type"], TX_CONFIRMED);
    assert_eq!(spend_events[1]["data"]["amount_sat"], -60_000);
}

#[tokio::test]
async fn a_watch_added_while_a_resync_runs_matches_what_the_mempool_snapshot_shows() {
    let mut r = rig(&[]).await;
    r.sync().await;
    // The resync read the watches before this add (a CLI or API add racing it); the payment,
    // made after the add, is in the snapshot the same resync then takes.
    let late = watch(2, 1);
    r.follower.store.upsert_watch(&late, "test", 1).unwrap();
    let txid = r.node.pay(&address(2).to_string(), 40_000);
    r.follower.sync_mempool().await.unwrap();
    assert_eq!(
        r.log(),
        [ev(TX_PENDING, Some(txid), 0)],
        "the payment to the watch just added is pending"
    );
}

#[tokio::test]
async fn a_resync_reads_a_large_mempool_in_batches_and_tells_a_replacement_before_new_payments() {
    use bitcoin::hashes::Hash;
    let w = watch(1, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.sync().await;
    // While the follower is away: 1,500 transactions arrive (three batches), the payment is
    // replaced by one paying elsewhere in the middle of them, and two new payments come after.
    let elsewhere = address(3).script_pubkey();
    let mut by = None;
    let mut paid = vec![];
    for i in 0..1_500u32 {
        let mut coin = [0u8; 32];
        coin[..4].copy_from_slice(&i.to_le_bytes());
        let coin = bitcoin::OutPoint::new(Txid::from_byte_array(coin), 0);
        r.node
            .spend(&[(coin, 100_000)], &[(elsewhere.clone(), 90_000)]);
        match i {
            700 => {
                by = Some(
                    r.node
                        .replace(txid, &[(address(2).script_pubkey(), 40_000)]),
                )
            }
            900 | 1_499 => paid.push(r.node.pay(&address(1).to_string(), 30_000 + i as u64)),
            _ => {}
        }
    }
    r.sync().await;
    assert_eq!(
        r.log(),
        [
            ev(TX_PENDING, Some(txid), 0),
            ev(TX_REPLACED, Some(txid), 0),
            ev(TX_PENDING, Some(paid[0]), 0),
            ev(TX_PENDING, Some(paid[1]), 0),
        ],
        "the replacement is told first, then the new payments in the node's order"
    );
    assert_eq!(
        r.bodies()[1]["data"]["replaced_by"],
        by.unwrap().to_string(),
        "replaced by the transaction found in the second batch"
    );
    r.sync().await;
    assert_eq!(r.log().len(), 4, "a second resync tells nothing again");
}

#[tokio::test]
async fn relayed_transactions_that_concern_no_watch_cost_no_call_to_the_node() {
    let mut r = rig(&[watch(1, 1)]).await;
    r.node.take_zmq();
    let elsewhere = address(3).script_pubkey();
    for i in 0..50 {
        r.node.pay_script(&[(elsewhere.clone(), 10_000 + i)]);
    }
    let paid = r.node.pay(&address(1).to_string(), 20_000);
    let before = r.node.calls("getmempoolentry");
    r.deliver_zmq().await;
    assert_eq!(
        r.node.calls("getmempoolentry") - before,
        1,
        "only the payment to the watch is proven with the node"
    );
    assert_eq!(r.log(), [ev(TX_PENDING, Some(paid), 0)]);
}

/// `n` transactions paying no watch, from coins nobody checks.
fn unrelated(node: &SimNode, n: u32, tag: u8) {
    use bitcoin::hashes::Hash;
    for i in 0..n {
        let mut coin = [tag; 32];
        coin[..4].copy_from_slice(&i.to_le_bytes());
        let coin = bitcoin::OutPoint::new(Txid::from_byte_array(coin), 0);
        node.spend(&[(coin, 100_000)], &[(address(3).script_pubkey(), 90_000)]);
    }
}

#[tokio::test]
async fn a_resync_matches_the_sweep_of_a_payment_it_finds_in_the_same_mempool() {
    let mut r = rig(&[watch(1, 1)]).await;
    // While the follower is away: a payment to the watch, 600 others, then the payment's
    // output swept elsewhere (its spend of a watched coin, found in a later batch).
    let paid = r.node.pay(&address(1).to_string(), 50_000);
    unrelated(&r.node, 600, 0x31);
    let coin = bitcoin::OutPoint::new(paid, 0);
    let sweep = r
        .node
        .spend(&[(coin, 50_000)], &[(address(3).script_pubkey(), 45_000)]);
    r.sync().await;
    assert_eq!(
        r.log(),
        [
            ev(TX_PENDING, Some(paid), 0),
            ev(TX_PENDING, Some(sweep), 0)
        ],
        "the sweep spends a coin the same resync found: it is the watch's spend"
    );
    assert_eq!(
        r.bodies()[1]["data"]["inputs"][0]["prevout"],
        coin.to_string()
    );
}

/// The follower keeps the stored tip in memory between block writes: each payment's
/// tx.pending must still name the tip it was seen at, after blocks and a reorg.
#[tokio::test]
async fn each_pending_payment_names_the_tip_it_was_seen_at() {
    let w = watch(1, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    for step in ["as synced", "after a block", "after a reorg"] {
        match step {
            "after a block" => {
                r.node.mine(1);
            }
            "after a reorg" => {
                r.node.reorg(2, false);
            }
            _ => {}
        }
        r.sync().await;
        r.node.take_zmq();
        r.node.pay(&address(1).to_string(), 10_000);
        r.deliver_zmq().await;
        let tip = r.bodies().last().unwrap()["data"]["tip"].clone();
        assert_eq!(
            (
                tip["hash"].as_str().unwrap(),
                tip["height"].as_u64().unwrap()
            ),
            (r.node.tip().to_string().as_str(), r.node.height() as u64),
            "the tx.pending {step} names the node's tip"
        );
    }
}

#[tokio::test]
async fn a_payment_relayed_before_the_first_base_block_is_matched_by_the_next_resync() {
    let node = SimNode::in_memory();
    node.mine(101);
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &[watch(1, 1)]);
    let mut f = follower_over(&node, store);
    node.take_zmq();
    let paid = node.pay(&address(1).to_string(), 50_000);
    // Announced before the follower stored any block (its first resync failed, say).
    f.on_zmq_batch(node.take_zmq()).await.unwrap();
    f.resync().await.unwrap();
    let kinds: Vec<String> = f
        .store
        .events_after(0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [TX_PENDING],
        "the payment is pending once there is a base: {paid}"
    );
}

#[tokio::test]
async fn a_forged_early_copy_of_a_replacement_does_not_hide_the_real_one() {
    let w = watch(1, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    r.node.take_zmq();
    let txid = r.node.pay(&address(1).to_string(), 50_000);
    r.deliver_zmq().await;
    // Someone who can publish on the ZMQ ports announces the replacement before it exists.
    let replacement = r
        .node
        .double_spend(txid, &[(address(2).script_pubkey(), 40_000)]);
    let by = replacement.compute_txid();
    r.node
        .publish_raw("rawtx", bitcoin::consensus::serialize(&replacement));
    r.node.publish_raw(
        "sequence",
        crate::node::zmq_wire::sequence_body(&crate::node::zmq_wire::SequenceEvent::TxAdded(
            by, 999,
        )),
    );
    r.deliver_zmq().await;
    assert_eq!(r.log(), [ev(TX_PENDING, Some(txid), 0)], "nothing yet");
    // Now it is broadcast for real: R for the payment, then A for the replacement.
    r.node.send_raw(replacement).unwrap();
    r.deliver_zmq().await;
    assert_eq!(
        r.log(),
        [
            ev(TX_PENDING, Some(txid), 0),
            ev(TX_REPLACED, Some(txid), 0)
        ],
        "the real announcement tells the replacement at once"
    );
    assert_eq!(r.bodies()[1]["data"]["replaced_by"], by.to_string());
}

#[tokio::test]
async fn a_resync_reads_again_what_addresses_derived_by_its_own_matches_make_payments() {
    let w = descriptor_watch(2, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    // While the follower is away: index 1 is paid (within the gap of 2), then index 3, which
    // is derived only once index 1 counts as used.
    let first = r.node.pay_script(&[(derived_script(1), 1_000)]);
    unrelated(&r.node, 50, 0x32);
    let second = r.node.pay_script(&[(derived_script(3), 3_000)]);
    r.sync().await;
    assert_eq!(
        r.log(),
        [
            ev(TX_PENDING, Some(first), 0),
            ev(TX_PENDING, Some(second), 0)
        ],
        "the payment to the address derived meanwhile is found in the same resync"
    );
}

#[tokio::test]
async fn a_resync_does_not_match_what_paid_an_address_before_it_was_derived() {
    let w = descriptor_watch(2, 1);
    let mut r = rig(std::slice::from_ref(&w)).await;
    // Index 3 is paid before index 1 makes it watched: as when announced one by one, and as
    // in a block, it paid an address nobody watched yet.
    let early = r.node.pay_script(&[(derived_script(3), 3_000)]);
    let first = r.node.pay_script(&[(derived_script(1), 1_000)]);
    r.sync().await;
    assert_eq!(
        r.log(),
        [ev(TX_PENDING, Some(first), 0)],
        "only the payment to an address watched when it came: {early} is not"
    );
}

mod filter_tests;
