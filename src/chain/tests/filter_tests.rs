//! Rescans over a node serving BIP 158 filters (`-blockfilterindex`): the blocks the filters
//! prove hold nothing for the watch are skipped, and the events are those of a full read.

use super::*;
use crate::unit_kit::{derived_script, descriptor_watch};
use crate::watch::Watch;

/// Blocks asked for by `getblock` so far (full blocks, and the senders of matched ones).
fn blocks_read(r: &Rig) -> u32 {
    r.node.calls("getblock")
}

/// A rig following `watch(1, 1)` over a node that, with block filters if `filters`, pays
/// `address(2)` at 180 and goes on to 250: the payment's txid and block.
async fn paid_at_180(filters: bool) -> (Rig, Txid, BlockHash) {
    let live = watch(1, 1);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.set_block_filters(filters);
    r.node.mine(78);
    let txid = r.node.pay(&address(2).to_string(), 70_000);
    let paid_in = r.node.mine(1)[0];
    r.node.mine(70);
    r.sync().await;
    (r, txid, paid_in)
}

/// The types of `found`'s events, in order.
fn kinds(found: &[Value]) -> Vec<&str> {
    found.iter().map(|b| b["type"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_rescan_over_block_filters_reads_only_from_the_paying_block_and_tells_the_same() {
    let late = watch(2, 2);
    let (mut r, txid, paid_in) = paid_at_180(true).await;
    let before = blocks_read(&r);
    let found: Vec<(String, String)> = rescan(&mut r, &late)
        .await
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap().into(),
                b["data"]["id"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                TX_CONFIRMATION.to_string(),
                tx_event_id(TX_CONFIRMATION, txid, &late, Some(paid_in), 1, 0)
            ),
            (
                TX_CONFIRMED.to_string(),
                tx_event_id(TX_CONFIRMED, txid, &late, Some(paid_in), 2, 0)
            ),
        ],
        "the payment at 180 is found and confirmed, with the ids a full read gives"
    );
    assert_eq!(
        blocks_read(&r) - before,
        3,
        "of 150 blocks, only the paying one and the one of its 2nd confirmation are read, and \
         the payment's senders asked for"
    );
    assert_eq!(
        r.follower.store.rescans().unwrap(),
        vec![],
        "the rescan finished"
    );
    assert!(
        r.follower.store.load_tracked().unwrap().is_empty(),
        "70 blocks deep, past finality: retired while passing over blocks, as reading them would"
    );
}

/// Rescans `late` from 101 over `r`'s node; returns the events it stored.
async fn rescan(r: &mut Rig, late: &Watch) -> Vec<Value> {
    let seen = r.log().len();
    r.start_rescan(late, 101).await;
    r.finish_rescan().await;
    r.bodies().split_off(seen)
}

#[tokio::test]
async fn a_payment_owed_confirmations_across_batches_gets_each_at_its_own_block() {
    let late = watch(2, 30);
    let (mut r, txid, paid_in) = paid_at_180(true).await;
    let found = rescan(&mut r, &late).await;
    let tips: Vec<(u64, u64)> = found
        .iter()
        .map(|b| {
            let d = &b["data"];
            (
                d["confirmations"].as_u64().unwrap(),
                d["tip"]["height"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(u64, u64)> = (1..=30).map(|n| (n, 179 + n)).collect();
    assert_eq!(
        tips, want,
        "30 confirmations span two batches: each is told at the block that brings it"
    );
    assert_eq!(
        found[29]["data"]["id"],
        tx_event_id(TX_CONFIRMED, txid, &late, Some(paid_in), 30, 0)
    );
}

#[tokio::test]
async fn a_node_whose_filter_answers_fail_is_read_block_by_block_and_asked_no_more() {
    let late = watch(2, 2);
    let (mut r, txid, _) = paid_at_180(true).await;
    r.node.set_broken_filter_calls(100);
    let before = blocks_read(&r);
    let found = rescan(&mut r, &late).await;
    let kinds = kinds(&found);
    assert_eq!(
        kinds,
        [TX_CONFIRMATION, TX_CONFIRMED],
        "the payment {txid} is found"
    );
    assert_eq!(
        r.node.calls("getblockfilter"),
        3,
        "after three failed asks in a row, the rescan stops asking"
    );
    assert_eq!(
        blocks_read(&r) - before,
        150 + 1,
        "every block read, and the payment's senders"
    );
}

#[tokio::test]
async fn a_filter_answer_that_fails_once_costs_a_few_blocks_read() {
    let live = watch(1, 1);
    let late = watch(2, 2);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.set_block_filters(true);
    r.node.set_broken_filter_calls(1);
    r.node.mine(149);
    r.sync().await;
    let before = blocks_read(&r);
    let found = rescan(&mut r, &late).await;
    assert_eq!(found, Vec::<Value>::new(), "nothing paid the watch");
    assert_eq!(
        blocks_read(&r) - before,
        4,
        "one group of blocks is read; the next batch asks again, and the filters skip the rest"
    );
}

#[tokio::test]
async fn filters_are_asked_about_the_addresses_a_descriptor_derives_as_the_rescan_finds_payments() {
    let live = watch(1, 1);
    let shop = descriptor_watch(2, 1);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.set_block_filters(true);
    r.node.mine(28);
    let a = r.node.pay_script(&[(derived_script(1), 1_000)]);
    r.node.mine(40);
    // Watched only once index 1 is seen used: 3 is within its gap of 2.
    let b = r.node.pay_script(&[(derived_script(3), 3_000)]);
    r.node.mine(40);
    // Past 3 + gap 2: never watched.
    let c = r.node.pay_script(&[(derived_script(6), 6_000)]);
    r.node.mine(40);
    r.sync().await;
    rescan(&mut r, &shop).await;
    assert_eq!(
        r.confirmed_txids(),
        [a.to_string(), b.to_string()],
        "the payment to index 3 is found although index 3 was derived during the rescan"
    );
    assert!(
        !r.log().iter().any(|e| e.1 == c.to_string()),
        "6 is past 3 + gap 2"
    );
}

#[tokio::test]
async fn a_node_without_filters_is_asked_once_and_every_block_is_read() {
    let late = watch(2, 2);
    let (mut r, txid, _) = paid_at_180(false).await;
    let seen = r.log().len();
    let before = blocks_read(&r);
    rescan(&mut r, &late).await;
    assert_eq!(
        r.log_of(seen, txid),
        [
            ev(TX_CONFIRMATION, Some(txid), 1),
            ev(TX_CONFIRMED, Some(txid), 2)
        ]
    );
    assert_eq!(
        r.node.calls("getblockfilter"),
        1,
        "a node that keeps no filters says so once; the rescan does not ask again"
    );
    assert_eq!(
        blocks_read(&r) - before,
        150 + 1,
        "every block of 101..=250 read, and the payment's senders"
    );
}

/// A follower over a store that fails on demand, with a rescan of `watch(2, 2)` from 101
/// requested over a chain that pays it at 110; the commits and pending-rescan reads to fail.
async fn flaky_rescan() -> (
    Follower<SimNode, crate::chain::flaky_store::FlakyStore>,
    SimNode,
    Watch,
    Txid,
    Arc<std::sync::atomic::AtomicU32>,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicBool>,
    tempfile::TempDir,
) {
    let late = watch(2, 2);
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::in_memory();
    node.mine(101);
    let after_next = Arc::<std::sync::atomic::AtomicBool>::default();
    let (commits, rescans) = (
        Arc::<std::sync::atomic::AtomicU32>::default(),
        Arc::default(),
    );
    let store = crate::chain::flaky_store::FlakyStore {
        inner: open_store(dir.path(), &[]),
        fail_next_tip: Arc::default(),
        fail_tip_after_commit: Arc::default(),
        fail_commits: commits.clone(),
        fail_commit_after_next: Arc::clone(&after_next),
        fail_next_rescans: Arc::clone(&rescans),
    };
    let mut f = Follower::new(
        Arc::new(node.clone()),
        store,
        Tracker::new("regtest", FINALITY, vec![]),
        options(),
        Arc::new(Notify::new()),
    );
    f.resync().await.unwrap();
    node.mine(8);
    let txid = node.pay(&address(2).to_string(), 70_000);
    node.mine(20);
    f.resync().await.unwrap();
    f.store.inner.upsert_watch(&late, "test", 1).unwrap();
    f.store.inner.request_rescan(&late.id, 101).unwrap();
    f.refresh_watches().unwrap();
    (f, node, late, txid, commits, rescans, after_next, dir)
}

#[tokio::test]
async fn a_rescan_whose_last_commit_fails_finishes_when_taken_up_again() {
    use std::sync::atomic::Ordering;
    let (mut f, node, late, txid, _, _, after_next, _dir) = flaky_rescan().await;
    f.rescan_batch().await.unwrap();
    // The second batch (126..=129) stores its progress; the commit that ends the rescan fails.
    after_next.store(true, Ordering::SeqCst);
    let e = f.rescan_batch().await.unwrap_err();
    assert!(
        e.to_string().contains("injected"),
        "the injected failure: {e}"
    );
    assert!(!f.rescanning());
    assert_eq!(
        f.store.inner.rescans().unwrap(),
        vec![(late.id.clone(), 130)]
    );
    f.refresh_watches().unwrap();
    assert!(f.rescanning(), "taken up again from the store, at the tip");
    f.rescan_batch().await.unwrap();
    assert_eq!(f.store.inner.rescans().unwrap(), vec![], "finished");
    assert!(!f.rescanning());
    // Following live now: the next block confirms nothing more (2 of 2 told), and the next
    // payment to it is pending at once.
    let next = node.pay(&address(2).to_string(), 1_000);
    f.resync().await.unwrap();
    let pending: Vec<String> = (f.store.inner.events_after(0, 1000).unwrap().into_iter())
        .filter(|e| e.kind == TX_PENDING)
        .map(|e| e.id)
        .collect();
    assert_eq!(
        pending,
        [tx_event_id(TX_PENDING, next, &late, None, 0, 0)],
        "the watch follows live"
    );
    assert_eq!(
        committed_tx_events(&f)[..2],
        expected_events(&late, txid, node.block_hash(110))
    );
}

/// The tx events committed (each commit once: the journal holds what was committed).
fn committed_tx_events<St: crate::store::ChainStore>(
    f: &Follower<SimNode, St>,
) -> Vec<(String, String)> {
    f.journal
        .iter()
        .flat_map(|c| c.events.iter())
        .filter(|e| e.kind.starts_with("tx."))
        .map(|e| (e.kind.to_string(), e.id.clone()))
        .collect()
}

fn expected_events(late: &Watch, txid: Txid, paid_in: BlockHash) -> Vec<(String, String)> {
    vec![
        (
            TX_CONFIRMATION.to_string(),
            tx_event_id(TX_CONFIRMATION, txid, late, Some(paid_in), 1, 0),
        ),
        (
            TX_CONFIRMED.to_string(),
            tx_event_id(TX_CONFIRMED, txid, late, Some(paid_in), 2, 0),
        ),
    ]
}

#[tokio::test]
async fn a_batch_whose_commit_fails_once_is_stored_by_the_retry_and_the_job_goes_on() {
    use std::sync::atomic::Ordering;
    let (mut f, node, late, txid, commits, _, _, _dir) = flaky_rescan().await;
    // The first batch (101..=125) finds the payment at 110 and its 2nd confirmation; its
    // commit fails, and the retry after the failure stores it.
    commits.store(1, Ordering::SeqCst);
    let e = f.rescan_batch().await.unwrap_err();
    assert!(
        e.to_string().contains("injected"),
        "the injected failure: {e}"
    );
    assert!(f.rescanning(), "the job is as the store has it: kept");
    assert_eq!(
        f.store.inner.rescans().unwrap(),
        vec![(late.id.clone(), 126)]
    );
    while f.rescanning() {
        f.rescan_batch().await.unwrap();
    }
    assert_eq!(
        committed_tx_events(&f),
        expected_events(&late, txid, node.block_hash(110)),
        "each event committed once, with its id"
    );
}

#[tokio::test]
async fn a_batch_that_cannot_be_stored_is_scanned_again_from_the_store_even_after_a_failed_pick_up()
{
    use std::sync::atomic::Ordering;
    let (mut f, node, late, txid, commits, rescans, _, _dir) = flaky_rescan().await;
    // Both the batch's commit and the retry fail: nothing of it is written, and the job,
    // ahead of the store, is dropped.
    commits.store(2, Ordering::SeqCst);
    let e = f.rescan_batch().await.unwrap_err();
    assert!(
        e.to_string().contains("injected"),
        "the injected failure: {e}"
    );
    assert!(!f.rescanning(), "the job, ahead of the store, is dropped");
    assert_eq!(
        f.store.inner.rescans().unwrap(),
        vec![(late.id.clone(), 101)],
        "nothing of the failed batch is stored"
    );
    // The next look at the watches fails to read the pending rescans; the one after takes the
    // job up again, as the run loop does every 100 ms.
    rescans.store(true, Ordering::SeqCst);
    assert!(f.refresh_watches().is_err(), "the injected read failure");
    assert!(!f.rescanning());
    f.refresh_watches().unwrap();
    assert!(f.rescanning(), "taken up again from the store");
    while f.rescanning() {
        f.rescan_batch().await.unwrap();
    }
    assert_eq!(
        committed_tx_events(&f),
        expected_events(&late, txid, node.block_hash(110)),
        "each event committed once, with its id"
    );
}

#[tokio::test]
async fn a_forged_filter_that_would_hide_a_payment_breaks_the_chain_of_headers_and_its_block_is_read(
) {
    let late = watch(2, 2);
    let (mut r, txid, paid_in) = paid_at_180(true).await;
    // Emptied, the filter of 180 says the block holds nothing; its header is the true one.
    r.node.forge_filter(paid_in);
    let found = rescan(&mut r, &late).await;
    let kinds = kinds(&found);
    assert_eq!(
        kinds,
        [TX_CONFIRMATION, TX_CONFIRMED],
        "the payment {txid} in the block with the forged filter is found"
    );
}

#[tokio::test]
async fn a_reorg_under_a_filtered_rescan_drops_the_filters_asked_of_the_old_branch() {
    let live = watch(1, 1);
    let late = watch(2, 30);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.set_block_filters(true);
    // Kept wide enough that the rescanned range is within it: a fork there is found.
    r.follower.store.set_keep_blocks(60);
    r.node.mine(8);
    r.node.pay(&address(2).to_string(), 70_000);
    r.node.mine(41);
    r.sync().await;
    r.start_rescan(&late, 101).await;
    // The payment at 110 owes 30 confirmations: the first batch reads 110..=134, and keeps
    // the filters of 135..=150, the last of them of blocks about to go.
    r.follower.rescan_batch().await.unwrap();
    assert_eq!(
        r.follower.store.rescans().unwrap(),
        vec![(late.id.clone(), 135)]
    );
    let seen = r.log().len();
    // From 147 a new branch, which pays the watch again in its first block.
    r.node.invalidate(r.node.block_hash(147)).unwrap();
    let again = r.node.pay(&address(2).to_string(), 80_000);
    let paid_in = r.node.mine(1)[0];
    r.node.mine(20);
    r.sync().await;
    r.finish_rescan().await;
    let confirmations: Vec<Ev> = r
        .log_of(seen, again)
        .into_iter()
        .filter(|e| e.0 != TX_PENDING)
        .collect();
    let want: Vec<Ev> = (1..=21)
        .map(|n| ev(TX_CONFIRMATION, Some(again), n))
        .collect();
    assert_eq!(
        confirmations, want,
        "the payment in the new branch's 147 is found and counted to the tip, 167"
    );
    let first = r
        .bodies()
        .into_iter()
        .find(|b| b["data"]["txid"] == again.to_string() && b["type"] == TX_CONFIRMATION)
        .unwrap();
    assert_eq!(first["data"]["block"]["hash"], paid_in.to_string());
}

/// A payment to the watch at 105 and the spend of its coin at 106, fetched in one group: the
/// senders of both, asked for the group at once, are the node's.
async fn senders_of_a_payment_and_its_spend(filters: bool) {
    use crate::simnode::PAYMENT_FEE;
    let live = watch(1, 1);
    let late = watch(2, 1);
    let mut r = rig(std::slice::from_ref(&live)).await;
    r.node.set_block_filters(filters);
    r.node.mine(3);
    let paid = r.node.pay(&address(2).to_string(), 70_000);
    let paid_in = r.node.mine(1)[0];
    let block = crate::node::ChainSource::block(&r.node, paid_in)
        .await
        .unwrap();
    let tx = block
        .txdata
        .iter()
        .find(|t| t.compute_txid() == paid)
        .unwrap()
        .clone();
    let vout = tx
        .output
        .iter()
        .position(|o| o.script_pubkey == address(2).script_pubkey())
        .unwrap() as u32;
    let coin = bitcoin::OutPoint::new(paid, vout);
    let spent = r
        .node
        .spend(&[(coin, 70_000)], &[(address(3).script_pubkey(), 60_000)]);
    r.node.mine(1);
    r.node.mine(10);
    r.sync().await;
    let found = rescan(&mut r, &late).await;
    let senders = |txid: Txid| {
        found
            .iter()
            .find(|b| b["data"]["txid"] == txid.to_string())
            .unwrap_or_else(|| panic!("no event for {txid}: {found:?}"))["data"]["senders"]
            .clone()
    };
    let paid_senders = senders(paid);
    let prevouts: Vec<String> = tx
        .input
        .iter()
        .map(|i| i.previous_output.to_string())
        .collect();
    let listed: Vec<String> = (paid_senders.as_array().unwrap().iter())
        .map(|s| s["prevout"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed, prevouts,
        "the payment's senders are its inputs, in order"
    );
    let total: u64 = (paid_senders.as_array().unwrap().iter())
        .map(|s| s["amount_sat"].as_u64().unwrap())
        .sum();
    let out: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
    assert_eq!(
        total,
        out + PAYMENT_FEE,
        "what the inputs held: outputs and fee"
    );
    assert_eq!(
        senders(spent),
        json!([{"prevout": coin.to_string(), "address": address(2).to_string(), "amount_sat": 70_000}]),
        "the spend's sender is the watch's own coin"
    );
}

#[tokio::test]
async fn senders_asked_for_a_group_of_blocks_at_once_are_each_transaction_s_own() {
    senders_of_a_payment_and_its_spend(false).await;
}

#[tokio::test]
async fn senders_asked_for_a_run_of_blocks_the_filters_match_are_each_transaction_s_own() {
    senders_of_a_payment_and_its_spend(true).await;
}

#[tokio::test]
async fn filter_answers_too_large_to_read_are_asked_for_in_smaller_spans() {
    let late = watch(2, 2);
    let (mut r, txid, _) = paid_at_180(true).await;
    r.node.limit_filter_answers(60);
    let before = blocks_read(&r);
    let found = rescan(&mut r, &late).await;
    let kinds = kinds(&found);
    assert_eq!(
        kinds,
        [TX_CONFIRMATION, TX_CONFIRMED],
        "the payment {txid} is found"
    );
    // Each refusal reads one group of 4 blocks before the next batch asks for half as many:
    // 200 and 100 are refused, 50 at a time are answered.
    assert_eq!(
        blocks_read(&r) - before,
        4 + 4 + 3,
        "two groups read while the span shrank; then the paying block, its 2nd \
         confirmation's, and its senders"
    );
}
