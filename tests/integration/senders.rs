//! Where the money came from: `senders` and `coinbase` on transaction events, taken from the
//! node without `-txindex` and checked against the inputs.

use bitcoin::{Amount, OutPoint, ScriptBuf};
use chainwatch::simnode::mining;
use serde_json::{json, Value};

use crate::harness::*;
use crate::on_both_backends;

/// The payers of the captured session: a P2PKH, a P2SH-P2WPKH and a P2TR address.
const PAYERS: [&str; 3] = [
    "mmwpGrjMjXVrLxVvMKqdbFNbF4opv8PJ8F",
    "2MyTruS9wmkc5rkGrdHZ2AgcGQjF9tJDWey",
    "bcrt1pjn9pgdg8mnjyx5afndfvzz3lj8dgjygcqgenl0ukkzd58u20sqaqhhshew",
];

/// The event of `kind` about `txid` the receiver accepted.
fn event_of(r: &Receiver, kind: &str, txid: &str) -> Value {
    r.accepted()
        .iter()
        .find(|c| c.kind() == kind && c.data()["txid"] == txid)
        .map(|c| c.data().clone())
        .unwrap_or_else(|| panic!("no {kind} for {txid}"))
}

fn sender(coin: OutPoint, address: &str, amount_sat: u64) -> Value {
    json!({"prevout": coin.to_string(), "address": address, "amount_sat": amount_sat})
}

on_both_backends!(senders_are_the_coins_each_input_spends_in_mempool_and_block_events);
async fn senders_are_the_coins_each_input_spends_in_mempool_and_block_events(backend: Backend) {
    let h = Harness::on(backend, &[watch(P2WPKH, 1, "shop")]).await;
    let daemon = h.start_daemon();
    h.wait_synced().await;

    // Two coins for each payer, confirmed; and one more to the P2PKH payer, left unconfirmed.
    let amounts = [30_000_000, 20_000_000, 10_000_000, 31_000, 21_000, 11_000];
    let funding: Vec<(ScriptBuf, u64)> = (0..6)
        .map(|i| (script(PAYERS[i % 3]), amounts[i]))
        .collect();
    let funded = h.node.pay_script(&funding);
    h.node.mine(1);
    let coin = |i: u32| OutPoint::new(funded, i);

    // In the mempool: three confirmed coins, each asked for with gettxout.
    let paid = h.node.spend(
        &[
            (coin(0), amounts[0]),
            (coin(1), amounts[1]),
            (coin(2), amounts[2]),
        ],
        &[(script(P2WPKH), 50_000_000)],
    );
    h.receiver.wait_accepted(1, WAIT).await;
    let pending = event_of(&h.receiver, "tx.pending", &paid.to_string());
    let expected = json!([
        sender(coin(0), PAYERS[0], amounts[0]),
        sender(coin(1), PAYERS[1], amounts[1]),
        sender(coin(2), PAYERS[2], amounts[2]),
    ]);
    assert_eq!(
        pending["senders"], expected,
        "tx.pending names the three coins spent, in input order"
    );
    assert_eq!(pending["coinbase"], false);
    // Kept in the store: a restart before the confirmation loses nothing.
    daemon.stop().await;
    let daemon = h.start_daemon();
    h.wait_synced().await;

    // Straight into a block, never in the mempool: the block's own description (getblock 3).
    let miner = script(P2SH);
    let direct = mining::payment(
        &[
            (coin(3), amounts[3]),
            (coin(4), amounts[4]),
            (coin(5), amounts[5]),
        ],
        &[(script(P2WPKH), 60_000)],
        &miner,
        500,
    );
    let direct_id = direct.compute_txid().to_string();
    h.node.mine_block_with(vec![direct]);
    h.receiver.wait_accepted(2, WAIT).await;
    let confirmed = event_of(&h.receiver, "tx.confirmed", &direct_id);
    assert_eq!(
        confirmed["senders"],
        json!([
            sender(coin(3), PAYERS[0], amounts[3]),
            sender(coin(4), PAYERS[1], amounts[4]),
            sender(coin(5), PAYERS[2], amounts[5]),
        ]),
        "a payment first seen in its block names its senders too"
    );

    // The mempool payment confirmed: its senders are kept from tx.pending.
    h.node.mine(1);
    h.receiver.wait_accepted(3, WAIT).await;
    let later = event_of(&h.receiver, "tx.confirmed", &paid.to_string());
    assert_eq!(later["senders"], expected, "tx.confirmed repeats them");

    // A coin created by an unconfirmed transaction: gettxout does not know it, the mempool
    // parent does.
    let parent = h.node.pay_script(&[(script(PAYERS[0]), 70_000)]);
    let child = h.node.spend(
        &[(OutPoint::new(parent, 0), 70_000)],
        &[(script(P2WPKH), 40_000)],
    );
    h.receiver.wait_accepted(4, WAIT).await;
    let pending = event_of(&h.receiver, "tx.pending", &child.to_string());
    assert_eq!(
        pending["senders"],
        json!([sender(OutPoint::new(parent, 0), PAYERS[0], 70_000)]),
        "a coin of a mempool parent"
    );

    // A coinbase paying the shop: no senders, and it says so.
    let mut block = h.node.next_block(false);
    block.txdata[0].output[0].script_pubkey = script(P2WPKH);
    block.header.merkle_root = block.compute_merkle_root().unwrap();
    let coinbase = block.txdata[0].compute_txid().to_string();
    let reward = block.txdata[0].output[0].value;
    h.node.submit_block(block).unwrap();
    h.receiver.wait_accepted(5, WAIT).await;
    let mined = event_of(&h.receiver, "tx.confirmed", &coinbase);
    assert_eq!(mined["senders"], json!([]), "a coinbase spends nothing");
    assert_eq!(mined["coinbase"], true);
    assert_eq!(mined["amount_sat"], reward.to_sat());
    assert!(reward > Amount::ZERO);
    assert!(
        h.receiver.accepted().iter().all(|c| c.verified()),
        "every body verified and valid against its schema"
    );
    daemon.stop().await;
}
