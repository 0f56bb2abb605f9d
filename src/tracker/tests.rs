//! The tracker on its own: exact change sets and events for every step, no store or node.

use std::collections::BTreeMap;

use bitcoin::hashes::Hash;
use bitcoin::{BlockHash, Network, OutPoint, Txid};
use serde_json::json;

use super::*;
use crate::event::{
    TX_CONFIRMATION, TX_CONFIRMED, TX_DROPPED, TX_PENDING, TX_REORGED, TX_REPLACED,
};
use crate::unit_kit::*;
use crate::watch::{Derivation, Watch, WatchedCoin};

const FINALITY: u32 = 6;

fn index_of(watches: &[Watch]) -> WatchIndex {
    WatchIndex::new(Network::Regtest, watches.iter().cloned())
}

fn tracker() -> Tracker {
    Tracker::new("regtest", FINALITY, vec![])
}

/// What the follower does once the step is committed.
fn applied(tracker: &mut Tracker, index: &mut WatchIndex, step: &TrackerStep) {
    tracker.apply(&step.tracked);
    index.apply(&step.index);
}

fn genesis() -> BlockRef {
    block(BlockHash::all_zeros(), 0, vec![]).1
}

fn pays(n: u8, sat: u64) -> (bitcoin::ScriptBuf, u64) {
    (address(n).script_pubkey(), sat)
}

/// (kind, confirmations, id) of each event.
fn events_of(step: &TrackerStep) -> Vec<(&'static str, u64, String)> {
    step.events
        .iter()
        .map(|e| {
            let c = e.event.data["confirmations"].as_u64().unwrap_or(0);
            (e.event.kind, c, e.event.id.clone())
        })
        .collect()
}

fn output(n: u8, vout: u32, sat: u64) -> MatchedOutput {
    MatchedOutput {
        vout,
        address: address(n).to_string(),
        amount_sat: sat,
        derivation_index: None,
        derivation_path: None,
    }
}

/// A watch (N confirmations) paid 50,000 sat by a transaction confirmed in block 1.
struct Paid {
    w: Watch,
    index: WatchIndex,
    tracker: Tracker,
    txid: Txid,
    b1: BlockRef,
}

fn paid_in_block_1(confirmations: u32) -> Paid {
    let w = watch(1, confirmations);
    let mut index = index_of(std::slice::from_ref(&w));
    let mut tracker = tracker();
    let tx = payment(1, &[pays(1, 50_000)]);
    let txid = tx.compute_txid();
    let (b, b1) = block(genesis().hash, 1, vec![tx]);
    let step = tracker.connect_block(&index, &b, b1);
    applied(&mut tracker, &mut index, &step);
    Paid {
        w,
        index,
        tracker,
        txid,
        b1,
    }
}

/// Block 1 disconnected (back to genesis) and the step applied.
fn reorged_out_of_block_1(p: &mut Paid) {
    let step = p
        .tracker
        .disconnect_block(&p.index, p.b1, tip_of(&genesis()));
    applied(&mut p.tracker, &mut p.index, &step);
}

/// Connects empty blocks on `prev` up to `to`, returning each step.
fn empty_blocks(p: &mut Paid, prev: BlockRef, to: u32) -> Vec<(BlockRef, TrackerStep)> {
    let mut out = vec![];
    let mut prev = prev;
    for h in prev.height + 1..=to {
        let (b, at) = block(prev.hash, h, vec![]);
        let step = p.tracker.connect_block(&p.index, &b, at);
        applied(&mut p.tracker, &mut p.index, &step);
        out.push((at, step));
        prev = at;
    }
    out
}

#[test]
fn a_mempool_payment_is_pending_with_its_tracked_row_and_coin() {
    let w = watch(1, 3);
    let index = index_of(std::slice::from_ref(&w));
    let tx = payment(1, &[pays(1, 50_000)]);
    let txid = tx.compute_txid();
    let step = tracker().mempool_add(&index, &tx, tip_of(&genesis()));
    assert_eq!(
        events_of(&step),
        [(TX_PENDING, 0, tx_event_id(TX_PENDING, txid, &w, None, 0, 0))],
        "one tx.pending with the content-derived id"
    );
    let e = &step.events[0];
    assert_eq!(e.watch_id, w.id, "the event names its watch");
    assert_eq!(e.event.data["amount_sat"], 50_000);
    assert_eq!(e.event.data["block"], serde_json::Value::Null);
    assert_eq!(
        e.event.data["watch"],
        json!({ "id": w.id, "label": null, "metadata": null }),
        "labels are the lookup's job, not the tracker's"
    );
    let row = Tracked {
        txid,
        watch_id: w.id.clone(),
        status: TxStatus::Mempool,
        reorg_count: 0,
        fired: 0,
        outputs: vec![output(1, 0, 50_000)],
        inputs: vec![],
        spends: vec![OutPoint::new(Txid::from_byte_array([1; 32]), 0)],
        senders: None,
    };
    assert_eq!(
        step.tracked,
        TrackedChanges(BTreeMap::from([((txid, w.id.clone()), Some(row))]))
    );
    let coin = WatchedCoin {
        watch_id: w.id.clone(),
        address: address(1).to_string(),
        amount_sat: 50_000,
    };
    assert_eq!(step.index.coins, [(OutPoint::new(txid, 0), coin)]);
    assert!(
        step.index.derivations.is_empty(),
        "an address watch derives nothing"
    );
}

#[test]
fn a_transaction_that_touches_no_watch_changes_nothing() {
    let index = index_of(&[watch(1, 1)]);
    let tx = payment(1, &[pays(2, 50_000)]);
    let step = tracker().mempool_add(&index, &tx, tip_of(&genesis()));
    assert!(
        step.is_empty(),
        "nothing tracked, no coin, no event: {step:?}"
    );
    let (b, at) = block(genesis().hash, 1, vec![tx]);
    assert!(tracker().connect_block(&index, &b, at).is_empty());
}

#[test]
fn a_payment_seen_twice_in_the_mempool_is_announced_once() {
    let w = watch(1, 1);
    let mut index = index_of(&[w]);
    let mut t = tracker();
    let tx = payment(1, &[pays(1, 50_000)]);
    let step = t.mempool_add(&index, &tx, tip_of(&genesis()));
    applied(&mut t, &mut index, &step);
    let again = t.mempool_add(&index, &tx, tip_of(&genesis()));
    assert!(again.events.is_empty(), "no second tx.pending");
    assert!(again.tracked.is_empty(), "the row is unchanged");
}

#[test]
fn each_confirmation_up_to_the_target_is_announced_once_then_confirmed() {
    let mut p = paid_in_block_1(3);
    let (w, txid, b1) = (p.w.clone(), p.txid, p.b1);
    let steps = empty_blocks(&mut p, b1, 4);
    let id = |kind, n| tx_event_id(kind, txid, &w, Some(b1.hash), n, 0);
    assert_eq!(
        events_of(&steps[0].1),
        [(TX_CONFIRMATION, 2, id(TX_CONFIRMATION, 2))]
    );
    assert_eq!(
        events_of(&steps[1].1),
        [(TX_CONFIRMED, 3, id(TX_CONFIRMED, 3))]
    );
    assert!(steps[2].1.events.is_empty(), "nothing after tx.confirmed");
    assert!(
        steps[2].1.tracked.is_empty(),
        "the row stays as it is until final: {:?}",
        steps[2].1.tracked
    );
    let row = p.tracker.get(txid, &w.id).expect("still tracked");
    assert_eq!(row.fired, 3);
    assert_eq!(row.status, TxStatus::Confirmed(b1));
}

#[test]
fn the_first_block_announces_confirmation_one_with_its_block() {
    let w = watch(1, 2);
    let index = index_of(std::slice::from_ref(&w));
    let tx = payment(1, &[pays(1, 50_000)]);
    let txid = tx.compute_txid();
    let (b, b1) = block(genesis().hash, 1, vec![tx]);
    let step = tracker().connect_block(&index, &b, b1);
    assert_eq!(
        events_of(&step),
        [(
            TX_CONFIRMATION,
            1,
            tx_event_id(TX_CONFIRMATION, txid, &w, Some(b1.hash), 1, 0)
        )]
    );
    let data = &step.events[0].event.data;
    assert_eq!(
        data["block"],
        json!({"hash": b1.hash.to_string(), "height": 1, "time": b1.time})
    );
    assert_eq!(
        data["tip"],
        json!({"hash": b1.hash.to_string(), "height": 1})
    );
    assert_eq!(data["required_confirmations"], 2);
    let upserted: Vec<_> = step.tracked.upserts().collect();
    assert_eq!(upserted.len(), 1);
    assert_eq!(upserted[0].status, TxStatus::Confirmed(b1));
    assert_eq!(upserted[0].fired, 1);
}

#[test]
fn with_one_confirmation_the_first_block_confirms() {
    let p = paid_in_block_1(1);
    let row = p.tracker.get(p.txid, &p.w.id).unwrap();
    assert_eq!(row.fired, 1, "tx.confirmed was fired in block 1");
    let tx = payment(9, &[pays(1, 7_000)]);
    let txid = tx.compute_txid();
    let (b, b2) = block(p.b1.hash, 2, vec![tx]);
    let step = p.tracker.connect_block(&p.index, &b, b2);
    assert_eq!(
        events_of(&step),
        [(
            TX_CONFIRMED,
            1,
            tx_event_id(TX_CONFIRMED, txid, &p.w, Some(b2.hash), 1, 0)
        )],
        "only the new payment: the first was confirmed already"
    );
}

#[test]
fn a_tracked_transaction_found_deep_announces_every_depth_in_order() {
    let w = watch(1, 3);
    let index = index_of(std::slice::from_ref(&w));
    let txid = Txid::from_byte_array([5; 32]);
    let b1 = block(genesis().hash, 1, vec![]).1;
    let row = Tracked {
        txid,
        watch_id: w.id.clone(),
        status: TxStatus::Confirmed(b1),
        reorg_count: 0,
        fired: 0,
        outputs: vec![output(1, 0, 1_000)],
        inputs: vec![],
        spends: vec![],
        senders: None,
    };
    let t = Tracker::new("regtest", FINALITY, [row]);
    let (b, b5) = block(BlockHash::from_byte_array([4; 32]), 5, vec![]);
    let step = t.connect_block(&index, &b, b5);
    let id = |kind, n| tx_event_id(kind, txid, &w, Some(b1.hash), n, 0);
    assert_eq!(
        events_of(&step),
        [
            (TX_CONFIRMATION, 1, id(TX_CONFIRMATION, 1)),
            (TX_CONFIRMATION, 2, id(TX_CONFIRMATION, 2)),
            (TX_CONFIRMED, 3, id(TX_CONFIRMED, 3)),
        ]
    );
    assert_eq!(
        step.events[0].event.data["tip"]["height"], 5,
        "each names the current tip"
    );
}

#[test]
fn a_final_transaction_stops_being_tracked_without_an_event() {
    let mut p = paid_in_block_1(2);
    let b1 = p.b1;
    let steps = empty_blocks(&mut p, b1, FINALITY + 1);
    let (last_at, last) = steps.last().unwrap();
    assert_eq!(last_at.height, FINALITY + 1);
    assert!(last.events.is_empty());
    assert_eq!(
        last.tracked,
        TrackedChanges(BTreeMap::from([((p.txid, p.w.id.clone()), None)])),
        "retired once a reorg of finality_depth can no longer reach its block"
    );
    assert!(p.tracker.is_empty());
}

#[test]
fn a_disconnected_block_reorgs_what_it_confirmed() {
    let p = paid_in_block_1(3);
    let step = p
        .tracker
        .disconnect_block(&p.index, p.b1, tip_of(&genesis()));
    assert_eq!(
        events_of(&step),
        [(
            TX_REORGED,
            0,
            tx_event_id(TX_REORGED, p.txid, &p.w, Some(p.b1.hash), 0, 0)
        )],
        "the id names the block it left"
    );
    let data = &step.events[0].event.data;
    assert_eq!(data["block"], serde_json::Value::Null);
    assert_eq!(data["previous_block"]["hash"], p.b1.hash.to_string());
    assert_eq!(data["tip"]["height"], 0, "the tip after the disconnect");
    let row: Vec<_> = step.tracked.upserts().collect();
    assert_eq!(row.len(), 1);
    assert_eq!(row[0].status, TxStatus::Unconfirmed);
    assert_eq!((row[0].reorg_count, row[0].fired), (1, 0));
    assert!(step.index.is_empty());
}

#[test]
fn a_disconnect_leaves_transactions_of_other_blocks_alone() {
    let mut p = paid_in_block_1(3);
    let b1 = p.b1;
    let steps = empty_blocks(&mut p, b1, 2);
    let step = p
        .tracker
        .disconnect_block(&p.index, steps[0].0, tip_of(&b1));
    assert!(step.is_empty(), "block 2 confirmed nothing: {step:?}");
}

#[test]
fn a_transaction_confirmed_again_after_a_reorg_gets_new_ids() {
    let mut p = paid_in_block_1(2);
    reorged_out_of_block_1(&mut p);
    let tx = payment(1, &[pays(1, 50_000)]);
    // The same transaction in a different block 1 (another time, so another hash).
    let mut b = block(genesis().hash, 1, vec![tx]).0;
    b.header.time += 7;
    let b1b = BlockRef {
        hash: b.block_hash(),
        height: 1,
        time: b.header.time,
    };
    let step = p.tracker.connect_block(&p.index, &b, b1b);
    let first = tx_event_id(TX_CONFIRMATION, p.txid, &p.w, Some(p.b1.hash), 1, 0);
    let again = tx_event_id(TX_CONFIRMATION, p.txid, &p.w, Some(b1b.hash), 1, 1);
    assert_ne!(first, again);
    assert_eq!(events_of(&step), [(TX_CONFIRMATION, 1, again)]);
    assert_eq!(step.tracked.upserts().next().unwrap().reorg_count, 1);
}

#[test]
fn a_reorged_transaction_back_in_the_mempool_is_not_announced_again() {
    let mut p = paid_in_block_1(2);
    reorged_out_of_block_1(&mut p);
    assert_eq!(p.tracker.reorged_out(), [p.txid]);
    let tx = payment(1, &[pays(1, 50_000)]);
    let step = p.tracker.mempool_add(&p.index, &tx, tip_of(&genesis()));
    assert!(step.events.is_empty(), "tx.reorged already told");
    let row = step.tracked.upserts().next().expect("status changes");
    assert_eq!((row.status, row.reorg_count), (TxStatus::Mempool, 1));
}

fn pending(t: &mut Tracker, index: &mut WatchIndex) -> Txid {
    let tx = payment(1, &[pays(1, 50_000)]);
    let step = t.mempool_add(index, &tx, tip_of(&genesis()));
    applied(t, index, &step);
    assert_eq!(t.in_mempool(), [tx.compute_txid()]);
    tx.compute_txid()
}

#[test]
fn a_replaced_transaction_is_announced_with_its_replacement_and_dropped() {
    let w = watch(1, 1);
    let (mut index, mut t) = (index_of(std::slice::from_ref(&w)), tracker());
    let txid = pending(&mut t, &mut index);
    let by = Txid::from_byte_array([9; 32]);
    let step = t.mempool_removed(&index, txid, Removal::Replaced(by), tip_of(&genesis()));
    assert_eq!(
        events_of(&step),
        [(
            TX_REPLACED,
            0,
            tx_event_id(TX_REPLACED, txid, &w, None, 0, 0)
        )]
    );
    assert_eq!(step.events[0].event.data["replaced_by"], by.to_string());
    assert_eq!(
        step.tracked,
        TrackedChanges(BTreeMap::from([((txid, w.id.clone()), None)]))
    );
}

#[test]
fn a_conflict_and_an_eviction_are_drops_with_their_reason() {
    let w = watch(1, 1);
    let (mut index, mut t) = (index_of(std::slice::from_ref(&w)), tracker());
    let txid = pending(&mut t, &mut index);
    let by = Txid::from_byte_array([8; 32]);
    let conflict = t.mempool_removed(&index, txid, Removal::Conflict(by), tip_of(&genesis()));
    let id = tx_event_id(TX_DROPPED, txid, &w, None, 0, 0);
    assert_eq!(events_of(&conflict), [(TX_DROPPED, 0, id.clone())]);
    let data = &conflict.events[0].event.data;
    assert_eq!(
        (data["reason"].as_str(), data["conflicting_txid"].as_str()),
        (Some("conflict"), Some(by.to_string().as_str()))
    );
    let evicted = t.mempool_removed(&index, txid, Removal::Evicted, tip_of(&genesis()));
    assert_eq!(
        events_of(&evicted),
        [(TX_DROPPED, 0, id)],
        "same occurrence, same id"
    );
    assert_eq!(evicted.events[0].event.data["reason"], "evicted");
    assert!(evicted.events[0]
        .event
        .data
        .get("conflicting_txid")
        .is_none());
}

#[test]
fn a_removal_of_a_confirmed_transaction_changes_nothing() {
    let p = paid_in_block_1(3);
    let step = p
        .tracker
        .mempool_removed(&p.index, p.txid, Removal::Evicted, tip_of(&p.b1));
    assert!(
        step.is_empty(),
        "a mined transaction leaves the mempool without a drop"
    );
}

#[test]
fn spending_a_watched_coin_is_a_payment_from_the_watch() {
    let mut p = paid_in_block_1(1);
    let coin = OutPoint::new(p.txid, 0);
    let tx = spend(&[(coin, 50_000)]);
    let step = p.tracker.mempool_add(&p.index, &tx, tip_of(&p.b1));
    assert_eq!(events_of(&step).len(), 1);
    let data = &step.events[0].event.data;
    assert_eq!(data["amount_sat"], -50_000, "received minus spent");
    assert_eq!(
        data["inputs"],
        json!([{ "prevout": coin.to_string(), "address": address(1).to_string(), "amount_sat": 50_000 }])
    );
    assert!(step.index.coins.is_empty(), "the spend pays no watch");
    applied(&mut p.tracker, &mut p.index, &step);
    assert_eq!(p.tracker.len(), 2);
}

#[test]
fn one_transaction_paying_two_watches_makes_an_event_for_each_in_watch_id_order() {
    let (w1, w2) = (watch(1, 1), watch(2, 1));
    let index = index_of(&[w1.clone(), w2.clone()]);
    let tx = payment(1, &[pays(2, 2_000), pays(1, 1_000)]);
    let txid = tx.compute_txid();
    let step = tracker().mempool_add(&index, &tx, tip_of(&genesis()));
    let mut want = vec![
        (
            w1.id.clone(),
            tx_event_id(TX_PENDING, txid, &w1, None, 0, 0),
        ),
        (
            w2.id.clone(),
            tx_event_id(TX_PENDING, txid, &w2, None, 0, 0),
        ),
    ];
    want.sort();
    let got: Vec<_> = step
        .events
        .iter()
        .map(|e| (e.watch_id.clone(), e.event.id.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(step.tracked.0.len(), 2);
    assert_eq!(step.index.coins.len(), 2);
}

#[test]
fn a_watch_gone_from_the_index_stops_its_tracking_silently() {
    let mut p = paid_in_block_1(3);
    p.index = index_of(&[]);
    let (b, b2) = block(p.b1.hash, 2, vec![]);
    let step = p.tracker.connect_block(&p.index, &b, b2);
    assert!(step.events.is_empty());
    assert_eq!(
        step.tracked,
        TrackedChanges(BTreeMap::from([((p.txid, p.w.id.clone()), None)]))
    );
}

#[test]
fn a_descriptor_payment_extends_the_gap_within_the_same_block() {
    let w = descriptor_watch(2, 1);
    let mut index = index_of(std::slice::from_ref(&w));
    let t = tracker();
    // Indexes 0 and 1 are watched; paying 1 makes 2..=3 watched, so the next transaction of the
    // same block, paying 3, is seen too; 6 is past the gap still.
    let txs = vec![
        payment(1, &[(derived_script(1), 1_000)]),
        payment(2, &[(derived_script(3), 3_000)]),
        payment(3, &[(derived_script(6), 6_000)]),
    ];
    let (b, b1) = block(genesis().hash, 1, txs);
    let step = t.connect_block(&index, &b, b1);
    let paid: Vec<u64> = step
        .events
        .iter()
        .map(|e| e.event.data["amount_sat"].as_u64().unwrap())
        .collect();
    assert_eq!(paid, [1_000, 3_000], "index 6 is beyond the gap after 3");
    assert_eq!(
        step.events[1].event.data["outputs"][0]["derivation_index"], 3,
        "the event says which index was paid"
    );
    assert_eq!(
        step.index.derivations,
        [Derivation {
            watch_id: w.id.clone(),
            path: 0,
            used: 3
        }]
    );
    index.apply(&step.index);
    // Used 3 with a gap of 2: indexes up to 5 are watched now.
    let later = payment(4, &[(derived_script(5), 5_000)]);
    let step = t.mempool_add(&index, &later, tip_of(&b1));
    assert_eq!(
        step.events.len(),
        1,
        "once committed, index 5 is within the gap"
    );
    assert_eq!(step.index.derivations[0].used, 5);
}

#[test]
fn labelling_fills_the_watch_in_place_and_drops_events_of_removed_watches() {
    let w = watch(1, 1);
    let index = index_of(std::slice::from_ref(&w));
    let tx = payment(1, &[pays(1, 50_000)]);
    let step = tracker().mempool_add(&index, &tx, tip_of(&genesis()));
    let tracked = step.tracked.clone();
    let changes = crate::changeset::ChangeSet::labelled(step.clone(), &index).unwrap();
    assert_eq!(changes.tracked, tracked);
    assert_eq!(changes.events.len(), 1);
    let keys: Vec<&String> = changes.events[0].data.keys().collect();
    let before: Vec<&String> = step.events[0].event.data.keys().collect();
    assert_eq!(keys, before, "the body keeps its key order");
    assert_eq!(
        changes.events[0].data["watch"],
        json!({ "id": w.id, "label": "order-1", "metadata": { "order": 1 } })
    );

    let gone: crate::watch::WatchLoader = std::sync::Arc::new(|_| Ok(None));
    let mut without = WatchIndex::with_loader(Network::Regtest, gone, 1);
    without.insert_target(&w.id, &w.target, 1);
    let changes = crate::changeset::ChangeSet::labelled(step.clone(), &without).unwrap();
    assert!(changes.events.is_empty(), "no record, no event");
    assert_eq!(changes.tracked, tracked, "the tracking itself stands");

    let failing: crate::watch::WatchLoader =
        std::sync::Arc::new(|_| Err("database is locked".into()));
    let mut broken = WatchIndex::with_loader(Network::Regtest, failing, 1);
    broken.insert_target(&w.id, &w.target, 1);
    assert_eq!(
        crate::changeset::ChangeSet::labelled(step, &broken),
        Err("database is locked".to_string()),
        "a failed lookup never passes for a removed watch"
    );
}

#[test]
fn merged_tracked_changes_keep_the_later_state_of_each_row() {
    let p = paid_in_block_1(3);
    let row = p.tracker.get(p.txid, &p.w.id).unwrap().clone();
    let mut a = TrackedChanges::default();
    a.upsert(row.clone());
    let mut b = TrackedChanges::default();
    b.remove((p.txid, p.w.id.clone()));
    a.merge(b);
    assert_eq!(a.upserts().count(), 0);
    assert_eq!(a.removals().count(), 1);
    let mut c = TrackedChanges::default();
    c.upsert(row);
    a.merge(c);
    assert_eq!((a.upserts().count(), a.removals().count()), (1, 0));
    assert!(TrackedChanges::default().is_empty());
}

#[test]
fn senders_told_after_the_step_fill_its_rows_and_events_and_a_coinbase_needs_none() {
    let w = watch(1, 1);
    let index = index_of(std::slice::from_ref(&w));
    let tx = payment(1, &[pays(1, 50_000)]);
    let txid = tx.compute_txid();
    let mut step = tracker().mempool_add(&index, &tx, tip_of(&genesis()));
    assert_eq!(step.events[0].event.data["senders"], json!(null));
    assert_eq!(step.events[0].event.data["coinbase"], json!(false));
    assert_eq!(step.unknown_senders(TxStatus::Mempool), vec![txid]);
    assert!(
        step.unknown_senders(TxStatus::Unconfirmed).is_empty(),
        "only the status asked for"
    );
    let senders = Senders {
        coinbase: false,
        inputs: vec![crate::senders::Sender {
            prevout: tx.input[0].previous_output.to_string(),
            address: None,
            amount_sat: 60_000,
        }],
    };
    step.fill_senders(&HashMap::from([(txid, senders.clone())]));
    assert_eq!(
        step.events[0].event.data["senders"],
        json!([{"prevout": tx.input[0].previous_output.to_string(), "address": null, "amount_sat": 60_000}]),
        "the event built before they were known carries them"
    );
    assert_eq!(
        step.tracked.upserts().next().unwrap().senders,
        Some(senders),
        "and so does the row"
    );
    assert!(step.unknown_senders(TxStatus::Mempool).is_empty());

    // A coinbase paying the watch: known to spend nothing, nothing to ask.
    let (b, at) = block(genesis().hash, 1, vec![]);
    let mut b = b;
    b.txdata[0].output[0].script_pubkey = address(1).script_pubkey();
    let step = tracker().connect_block(&index, &b, at);
    assert!(step.unknown_senders(TxStatus::Confirmed(at)).is_empty());
    assert_eq!(step.events[0].event.data["coinbase"], json!(true));
    assert_eq!(step.events[0].event.data["senders"], json!([]));
}
