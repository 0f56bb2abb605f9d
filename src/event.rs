//! Events: their deterministic ids and the Standard Webhooks payloads that carry them.

use bitcoin::hashes::{sha256, Hash};
use bitcoin::{BlockHash, Txid};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::senders::Senders;
use crate::watch::{MatchedInput, MatchedOutput, Watch};

pub const TX_PENDING: &str = "tx.pending";
pub const TX_CONFIRMATION: &str = "tx.confirmation";
pub const TX_CONFIRMED: &str = "tx.confirmed";
pub const TX_REORGED: &str = "tx.reorged";
pub const TX_REPLACED: &str = "tx.replaced";
pub const TX_DROPPED: &str = "tx.dropped";
pub const BLOCK_CONNECTED: &str = "block.connected";
pub const BLOCK_DISCONNECTED: &str = "block.disconnected";
pub const ALERT_REORG: &str = "alert.reorg";
pub const ALERT_NODE_UNREACHABLE: &str = "alert.node_unreachable";
pub const ALERT_NODE_RECOVERED: &str = "alert.node_recovered";
pub const ALERT_ENDPOINT_DISABLED: &str = "alert.endpoint_disabled";
pub const ALERT_DELIVERY_EXHAUSTED: &str = "alert.delivery_exhausted";
pub const ALERT_ENDPOINT_FAILING: &str = "alert.endpoint_failing";
pub const ALERT_STORE_ERROR: &str = "alert.store_error";
pub const ALERT_LEADER_CHANGED: &str = "alert.leader_changed";
pub const WEBHOOK_TEST: &str = "webhook.test";

/// A block as events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    pub hash: BlockHash,
    pub height: u32,
    pub time: u32,
}

/// The chain tip as events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TipRef {
    pub hash: BlockHash,
    pub height: u32,
}

/// An event before the store gives it a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: String,
    pub kind: &'static str,
    /// `data` without `id` and `sequence`, which the store adds.
    pub data: Map<String, Value>,
    /// The only endpoints that get it (its watch's routing); `None`: every endpoint whose
    /// filter takes its type. Decided here, when it is recorded, and kept in its deliveries.
    pub routes: Option<Vec<String>>,
}

/// What identifies a transaction event: two events with the same identity are the same event.
pub struct TxEventIdentity<'a> {
    pub kind: &'a str,
    pub txid: Txid,
    pub watch_id: &'a str,
    pub block_hash: Option<BlockHash>,
    pub confirmations: u32,
    pub reorg_count: u32,
}

impl TxEventIdentity<'_> {
    pub fn event_id(&self) -> String {
        let block = self.block_hash.map(|h| h.to_string()).unwrap_or_default();
        let text = format!(
            "chainwatch-event-v1|{}|{}|{}|{}|{}|{}",
            self.kind, self.txid, self.watch_id, block, self.confirmations, self.reorg_count
        );
        let h = sha256::Hash::hash(text.as_bytes());
        format!("evt_{}", hex::encode(&h.as_byte_array()[..16]))
    }
}

/// Everything a transaction event says.
pub struct TxEventFacts<'a> {
    pub identity: TxEventIdentity<'a>,
    pub network: &'a str,
    pub required_confirmations: u32,
    pub block: Option<BlockRef>,
    pub outputs: &'a [MatchedOutput],
    pub inputs: &'a [MatchedInput],
    /// `None`: not known (see `senders_json`).
    pub senders: Option<&'a Senders>,
    /// Whether it spends nothing: true only of a coinbase, told even when senders are not.
    pub coinbase: bool,
    pub amount_sat: i64,
    pub tip: TipRef,
    /// Type-specific fields: `previous_block`, `replaced_by`, `reason`, `conflicting_txid`.
    pub extra: Map<String, Value>,
}

/// `senders` and `coinbase` as events carry them. Unknown senders are null: the node could not
/// describe the coins (a transaction whose parents left the mempool and chainstate before we
/// asked; an answer that did not match the inputs), or the transaction was tracked before
/// chainwatch recorded senders.
pub fn senders_json(senders: Option<&Senders>) -> (Value, Value) {
    match senders {
        Some(s) => (json!(s.inputs), json!(s.coinbase)),
        None => (Value::Null, json!(false)),
    }
}

pub fn block_json(b: &BlockRef) -> Value {
    json!({ "hash": b.hash.to_string(), "height": b.height, "time": b.time })
}

impl TxEventFacts<'_> {
    pub fn into_event(self) -> NewEvent {
        let id = self.identity.event_id();
        let mut data = Map::new();
        data.insert("network".into(), json!(self.network));
        data.insert("txid".into(), json!(self.identity.txid.to_string()));
        data.insert("confirmations".into(), json!(self.identity.confirmations));
        data.insert(
            "required_confirmations".into(),
            json!(self.required_confirmations),
        );
        data.insert(
            "block".into(),
            self.block.as_ref().map(block_json).unwrap_or(Value::Null),
        );
        // Its place in the body is kept; `label` fills in the label and metadata.
        data.insert(
            "watch".into(),
            json!({ "id": self.identity.watch_id, "label": null, "metadata": null }),
        );
        data.insert("outputs".into(), json!(self.outputs));
        data.insert("inputs".into(), json!(self.inputs));
        let (senders, _) = senders_json(self.senders);
        data.insert("senders".into(), senders);
        data.insert("coinbase".into(), json!(self.coinbase));
        data.insert("amount_sat".into(), json!(self.amount_sat));
        data.insert(
            "tip".into(),
            json!({ "hash": self.tip.hash.to_string(), "height": self.tip.height }),
        );
        data.extend(self.extra);
        NewEvent {
            id,
            kind: static_kind(self.identity.kind),
            data,
            routes: None,
        }
    }
}

/// Adds a watch's label, metadata and routing to an event about it.
pub fn label(event: &mut NewEvent, watch: &Watch) {
    event.routes = watch.endpoints.clone();
    // In place: the object and its keys were allocated with the event already.
    match event.data.get_mut("watch").and_then(Value::as_object_mut) {
        Some(w) => {
            if let Some(v) = w.get_mut("label") {
                *v = json!(watch.label);
            }
            if let Some(v) = w.get_mut("metadata") {
                *v = watch.metadata.clone();
            }
        }
        None => {
            event.data.insert(
                "watch".into(),
                json!({ "id": watch.id, "label": watch.label, "metadata": watch.metadata }),
            );
        }
    }
}

const KINDS: [&str; 17] = [
    TX_PENDING,
    TX_CONFIRMATION,
    TX_CONFIRMED,
    TX_REORGED,
    TX_REPLACED,
    TX_DROPPED,
    BLOCK_CONNECTED,
    BLOCK_DISCONNECTED,
    ALERT_REORG,
    ALERT_NODE_UNREACHABLE,
    ALERT_NODE_RECOVERED,
    ALERT_ENDPOINT_DISABLED,
    ALERT_DELIVERY_EXHAUSTED,
    ALERT_ENDPOINT_FAILING,
    ALERT_STORE_ERROR,
    ALERT_LEADER_CHANGED,
    WEBHOOK_TEST,
];

/// Every event type chainwatch sends.
pub fn all_kinds() -> &'static [&'static str] {
    &KINDS
}

pub fn static_kind(kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("unknown")
}

/// An event that is not about a (transaction, watch): chain events and alerts. Its id hashes
/// its type and `identity`, which must name the occurrence (a block and how often it was
/// disconnected before, an outage's start).
pub fn other_event(
    kind: &'static str,
    identity: &str,
    network: &str,
    fields: Map<String, Value>,
) -> NewEvent {
    let h = sha256::Hash::hash(format!("chainwatch-event-v1|{kind}|{identity}").as_bytes());
    let mut data = Map::new();
    data.insert("network".into(), json!(network));
    data.extend(fields);
    NewEvent {
        id: format!("evt_{}", hex::encode(&h.as_byte_array()[..16])),
        kind,
        data,
        routes: None,
    }
}

/// A `webhook.test` for `endpoint` alone (whatever its `events` filter), naming the tip; each
/// call is a new event (`nonce` makes its id).
pub fn test_event(
    endpoint: &str,
    network: &str,
    tip: Option<(String, u32)>,
    nonce: &str,
) -> NewEvent {
    let tip = tip.map(|(hash, height)| json!({ "hash": hash, "height": height }));
    let mut fields = Map::new();
    fields.insert("endpoint".into(), json!(endpoint));
    fields.insert("tip".into(), tip.unwrap_or(Value::Null));
    let mut e = other_event(
        WEBHOOK_TEST,
        &format!("{endpoint}|{nonce}"),
        network,
        fields,
    );
    e.routes = Some(vec![endpoint.to_string()]);
    e
}

/// The full webhook body: `{type, timestamp, data: {id, sequence, ...}}`.
pub fn webhook_body(event: &NewEvent, sequence: i64, timestamp: &str) -> String {
    // Written straight from the event, not through a `Value` tree: building that tree cloned
    // all of `data` and was most of a block's commit (a thousand events) outside the database.
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        timestamp: &'a str,
        data: BodyData<'a>,
    }
    let body = Body {
        kind: event.kind,
        timestamp,
        data: BodyData { event, sequence },
    };
    serde_json::to_string(&body).expect("strings and JSON values serialise")
}

/// A body's `data`: `id` and `sequence` first, then the event's own fields.
struct BodyData<'a> {
    event: &'a NewEvent,
    sequence: i64,
}

impl Serialize for BodyData<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let data = &self.event.data;
        let mut map = s.serialize_map(Some(data.len() + 2))?;
        // A field of `data` named like these takes their place, as it did when the body was a
        // map built with them first.
        match data.get("id") {
            Some(v) => map.serialize_entry("id", v)?,
            None => map.serialize_entry("id", &self.event.id)?,
        }
        match data.get("sequence") {
            Some(v) => map.serialize_entry("sequence", v)?,
            None => map.serialize_entry("sequence", &self.sequence)?,
        }
        for (k, v) in data.iter().filter(|(k, _)| *k != "id" && *k != "sequence") {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Glob match on event types: `*` matches any run of characters.
pub fn type_matches(glob: &str, kind: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(glob.as_bytes(), kind.as_bytes())
}

/// Milliseconds since the Unix epoch.
/// Unix milliseconds as an RFC 3339 time (whole seconds).
pub fn rfc3339_ms(ms: i64) -> String {
    rfc3339(
        time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_written_as_the_map_it_was_built_as_before() {
        // The body as it was built up to this version: the bytes signed and stored must not move.
        fn as_built_before(event: &NewEvent, sequence: i64, timestamp: &str) -> String {
            let mut data = Map::new();
            data.insert("id".into(), json!(event.id));
            data.insert("sequence".into(), json!(sequence));
            for (k, v) in &event.data {
                data.insert(k.clone(), v.clone());
            }
            json!({ "type": event.kind, "timestamp": timestamp, "data": data }).to_string()
        }
        let event = |data: Value| NewEvent {
            id: "evt_2f\"quoted\u{e9}".into(),
            kind: "tx.confirmed",
            data: data.as_object().unwrap().clone(),
            routes: None,
        };
        let cases = [
            event(json!({})),
            event(
                json!({"txid": "ab", "amount_sat": 5_000_000_000u64, "outputs": [{"vout": 1}],
                         "label": "caf\u{e9} \"quote\" \n", "metadata": {"z": 1, "a": null}}),
            ),
            event(json!({"sequence": "theirs", "watch_id": "w", "id": 7})),
        ];
        for e in &cases {
            for seq in [1, i64::MAX] {
                assert_eq!(
                    webhook_body(e, seq, "2026-11-28T00:00:00Z"),
                    as_built_before(e, seq, "2026-11-28T00:00:00Z"),
                    "the body of {:?} at sequence {seq}",
                    e.data
                );
            }
        }
    }

    #[test]
    fn globs_match_event_types() {
        assert!(type_matches("tx.*", "tx.confirmed"));
        assert!(type_matches("*", "block.connected"));
        assert!(type_matches("tx.confirmed", "tx.confirmed"));
        assert!(!type_matches("tx.*", "block.connected"));
        assert!(!type_matches("tx.confirmed", "tx.confirmation"));
    }

    #[test]
    fn ids_change_with_every_identity_field() {
        let txid: Txid = "dd386822a62ef88575dfe82fa1db5fc34baef163e6f7a0a4efd8b6013da4e205"
            .parse()
            .unwrap();
        let base = TxEventIdentity {
            kind: TX_CONFIRMED,
            txid,
            watch_id: "wch_1",
            block_hash: None,
            confirmations: 3,
            reorg_count: 0,
        };
        let id = base.event_id();
        assert!(id.starts_with("evt_") && id.len() == 36, "{id}");
        assert_eq!(id, TxEventIdentity { ..base }.event_id(), "deterministic");
        let other = TxEventIdentity {
            kind: TX_CONFIRMED,
            txid,
            watch_id: "wch_1",
            block_hash: None,
            confirmations: 3,
            reorg_count: 1,
        };
        assert_ne!(id, other.event_id(), "a reorg count gives a new id");
    }
}
