//! The simulated node must answer and publish exactly as Bitcoin Core did in the captures.

use base64::Engine;
use bitcoin::consensus::serialize;
use bitcoin::{BlockHash, Txid};
use chainwatch::node::zmq_wire::{self, SequenceEvent, ZmqBody};
use chainwatch::simnode::SimNode;
use serde_json::Value;

use crate::captures::{self, Bodies};

/// Methods whose answers depend only on the chain, so simnode must match them byte for byte.
fn comparable(req: &Value) -> bool {
    let method = req["method"].as_str().unwrap_or("");
    let params = &req["params"];
    match method {
        "getbestblockhash" | "getblockcount" | "getblockhash" | "getblockheader"
        | "invalidateblock" | "reconsiderblock" | "sendrawtransaction" | "nosuchmethod" => true,
        "getblock" => params.get(1).map(|v| v == 0).unwrap_or(true),
        "getrawmempool" => params.get(0).map(|v| v == false).unwrap_or(true),
        "getrawtransaction" => params.as_array().map(|a| a.len() == 1).unwrap_or(false),
        _ => false,
    }
}

/// Plays the captured state changes into simnode (blocks and transactions by the hashes bitcoind
/// returned), since the wallet calls that made them cannot be repeated byte for byte.
async fn replay_effect(node: &SimNode, bodies: &Bodies, req: &Value, body: &Value) {
    let result = &body["result"];
    match req["method"].as_str().unwrap_or("") {
        "generatetoaddress" => {
            for h in result.as_array().unwrap() {
                let hash: BlockHash = h.as_str().unwrap().parse().unwrap();
                node.submit_block(bodies.blocks[&hash].clone())
                    .expect("captured block connects");
            }
        }
        "generateblock" => {
            let hash: BlockHash = result["hash"].as_str().unwrap().parse().unwrap();
            node.submit_block(bodies.blocks[&hash].clone())
                .expect("captured block connects");
        }
        "sendtoaddress" | "bumpfee" => {
            let txid: Txid = result
                .as_str()
                .or(result["txid"].as_str())
                .unwrap()
                .parse()
                .unwrap();
            node.send_raw(bodies.txs[&txid].clone())
                .expect("captured tx accepted");
        }
        "stop" if req["id"] == "stop" => node.restart(0).await.unwrap(),
        _ => {}
    }
}

async fn send(node: &SimNode, path: &str, auth: &str, req: &Value) -> (u16, String) {
    let cookie = std::fs::read_to_string(node.cookie_path()).unwrap();
    let body = match req {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    };
    let mut r = crate::harness::http_client()
        .post(format!("{}{}", node.rpc_url(), path))
        .body(body);
    match auth {
        "cookie" => {
            r = r.header(
                "authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(cookie)
                ),
            )
        }
        "wrong" => r = r.basic_auth("__cookie__", Some("wrong")),
        _ => {}
    }
    let resp = r.send().await.expect("simnode answers");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simnode_answers_and_publishes_like_bitcoin_core() {
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start_recording(dir.path()).await.unwrap();
    let bodies = captures::bodies();
    node.set_warmup_calls(1);
    let mut compared = 0;
    for ex in captures::lines("rpc.jsonl") {
        let req = &ex["request"];
        let step = ex["step"].as_str().unwrap();
        let body: Value = serde_json::from_str(ex["body"].as_str().unwrap()).unwrap_or(Value::Null);
        // The warm-up answer, every error case (bad auth, parse error, batch) and the chain reads.
        let compare = (comparable(req) || step == "startup" || step == "errors")
            && req["method"] != "getmempoolentry";
        if compare {
            let (status, text) = send(
                &node,
                ex["path"].as_str().unwrap(),
                ex["auth"].as_str().unwrap(),
                req,
            )
            .await;
            assert_eq!(
                status,
                ex["status"].as_u64().unwrap() as u16,
                "HTTP status of {step} {req}"
            );
            assert_eq!(text, ex["body"].as_str().unwrap(), "body of {step} {req}");
            compared += 1;
        } else {
            replay_effect(&node, &bodies, req, &body).await;
        }
    }
    assert_eq!(compared, 41, "exchanges compared byte for byte");

    // ZMQ: every captured message, per topic, in order, with its counter. The captures lack the
    // genesis messages (counter 0 of the tx topics), published before anyone subscribed.
    let published = node.published();
    for topic in ["hashblock", "hashtx", "rawblock", "rawtx", "sequence"] {
        let ours: Vec<(u32, Vec<u8>)> = published
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| (m.counter, m.body.clone()))
            .collect();
        let theirs: Vec<(u32, Vec<u8>)> = captures::zmq()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| (m.counter, m.body))
            .collect();
        let skip = ours.len() - theirs.len();
        assert!(
            skip <= 1,
            "{topic}: simnode published {} messages, capture has {}",
            ours.len(),
            theirs.len()
        );
        for (i, (a, b)) in ours[skip..].iter().zip(&theirs).enumerate() {
            assert_eq!(a.0, b.0, "{topic} message {i}: counter");
            assert_eq!(
                hex::encode(&a.1),
                hex::encode(&b.1),
                "{topic} message {i} (counter {}): body",
                b.0
            );
        }
    }
}

#[test]
fn decoders_read_every_captured_frame() {
    let mut labels = std::collections::HashMap::new();
    for m in captures::zmq() {
        let frames = zmq_wire::encode(&m.topic, m.body.clone(), m.counter);
        let msg =
            zmq_wire::decode(&frames).unwrap_or_else(|e| panic!("{} {}: {e}", m.step, m.topic));
        assert_eq!(msg.counter, m.counter);
        let reencoded = match &msg.body {
            ZmqBody::Sequence(ev) => {
                let key = match ev {
                    SequenceEvent::BlockConnected(_) => 'C',
                    SequenceEvent::BlockDisconnected(_) => 'D',
                    SequenceEvent::TxAdded(..) => 'A',
                    SequenceEvent::TxRemoved(..) => 'R',
                };
                *labels.entry(key).or_insert(0) += 1;
                zmq_wire::sequence_body(ev)
            }
            ZmqBody::RawTx(t) => serialize(t),
            ZmqBody::RawBlock(b) => serialize(b),
            ZmqBody::HashTx(t) => zmq_wire::hash_body(*t),
            ZmqBody::HashBlock(h) => zmq_wire::hash_body(*h),
        };
        assert_eq!(
            reencoded, m.body,
            "{} {} re-encodes byte for byte",
            m.step, m.topic
        );
    }
    assert_eq!(
        labels.get(&'D'),
        Some(&6),
        "six disconnects in the two reorgs: {labels:?}"
    );
    assert_eq!(
        labels.get(&'R'),
        Some(&2),
        "one replacement and one conflict: {labels:?}"
    );
}

#[test]
fn hashes_are_in_rpc_display_order() {
    let m = captures::zmq()
        .into_iter()
        .find(|m| m.topic == "hashblock")
        .unwrap();
    let frames = zmq_wire::encode("hashblock", m.body.clone(), 0);
    let ZmqBody::HashBlock(h) = zmq_wire::decode(&frames).unwrap().body else {
        panic!("hashblock")
    };
    assert_eq!(
        h.to_string(),
        "2f217eda60a9cf71cf22e072c119a5afc8c9df517f87cf2a095623110aae027b",
        "first mined block"
    );
}

#[test]
fn malformed_frames_are_refused_with_a_reason() {
    let e = zmq_wire::decode(&[b"sequence".to_vec(), vec![0u8; 33], vec![0, 0, 0]]).unwrap_err();
    assert_eq!(e.to_string(), "counter frame has 3 bytes, expected 4");
    let mut body = vec![0u8; 32];
    body.push(b'X');
    let e = zmq_wire::decode(&[b"sequence".to_vec(), body, vec![0; 4]]).unwrap_err();
    assert!(e.to_string().contains("unknown label 'X'"), "{e}");
    let e = zmq_wire::decode(&[b"rawtx".to_vec(), vec![1, 2, 3], vec![0; 4]]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("rawtx body of 3 bytes is malformed"),
        "{e}"
    );
    assert!(zmq_wire::decode(&[b"rawtx".to_vec()]).is_err(), "one frame");
}
