//! Events made up for tests and benches that load the outbox without a chain: each is a
//! `tx.pending` body shaped as the daemon's own (its schema accepts it), with a made-up
//! transaction and watch derived from a tag.

use bitcoin::hashes::{sha256, Hash};
use serde_json::json;

use crate::event::{other_event, NewEvent, TX_PENDING};

fn hex_of(text: &str) -> String {
    hex::encode(sha256::Hash::hash(text.as_bytes()).as_byte_array())
}

/// A schema-valid `tx.pending` event whose id and transaction derive from `tag`.
pub fn sample_event(tag: &str) -> NewEvent {
    let txid = hex_of(&format!("tx|{tag}"));
    let fields = json!({
        "txid": txid,
        "confirmations": 0,
        "required_confirmations": 1,
        "block": null,
        "watch": { "id": format!("wch_{}", &hex_of(tag)[..24]), "label": null, "metadata": {} },
        "outputs": [{ "vout": 0, "address": "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp", "amount_sat": 1000 }],
        "inputs": [],
        "senders": [{ "prevout": format!("{}:1", hex_of(&format!("parent|{tag}"))), "address": "n3iet9u1ki76AoPrk9p6NUhjqxeyQfihSg", "amount_sat": 1500 }],
        "coinbase": false,
        "amount_sat": 1000,
        "tip": { "hash": hex_of("tip"), "height": 130 },
    });
    let serde_json::Value::Object(fields) = fields else {
        unreachable!("an object")
    };
    other_event(TX_PENDING, tag, "regtest", fields)
}

/// `n` of them, tagged `{tag}-{i}`.
pub fn sample_events(n: usize, tag: &str) -> Vec<NewEvent> {
    (0..n)
        .map(|i| sample_event(&format!("{tag}-{i}")))
        .collect()
}
