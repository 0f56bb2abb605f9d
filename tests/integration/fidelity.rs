//! The simulated node must answer and publish exactly as Bitcoin Core did in the captures.

use base64::Engine;
use bitcoin::consensus::serialize;
use bitcoin::{BlockHash, Txid};
use chainwatch::node::zmq_wire::{self, SequenceEvent, ZmqBody};
use chainwatch::simnode::{verbose, SimNode};
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
            ZmqBody::RawBlock(b) => serialize(b.block()),
            ZmqBody::RefusedBlock { hash, error } => {
                panic!("{} refused block {hash}: {error}", m.step)
            }
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

/// The result's JSON text inside a captured answer (`{"result":…,"error":null,"id":N}`).
fn captured_result(ex: &Value) -> String {
    let body = ex["body"].as_str().unwrap();
    let end = body.rfind(",\"error\":null").expect("a successful answer");
    body["{\"result\":".len()..end].to_string()
}

/// The coins a captured `getblock … 3` or `getrawtransaction … 2 BLOCKHASH` says `tx` spends.
fn captured_coins(described_tx: &Value) -> Vec<verbose::Coin> {
    described_tx["vin"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("prevout"))
        .map(|p| verbose::Coin {
            output: bitcoin::TxOut {
                value: bitcoin::Amount::from_btc(p["value"].as_f64().unwrap()).unwrap(),
                script_pubkey: bitcoin::ScriptBuf::from_hex(
                    p["scriptPubKey"]["hex"].as_str().unwrap(),
                )
                .unwrap(),
            },
            height: p["height"].as_u64().unwrap() as u32,
            coinbase: p["generated"].as_bool().unwrap(),
        })
        .collect()
}

/// Given the facts a node holds (the block, the coins its transactions spend, where the block
/// is), simnode describes transactions, blocks and scripts in Bitcoin Core's exact text: key
/// order, eight-decimal amounts, assembly with sighash types, inferred descriptors with their
/// checksums, P2PKH, P2SH-P2WPKH and P2TR inputs, an OP_RETURN output and a coinbase.
#[test]
fn simnode_describes_transactions_blocks_and_coins_like_bitcoin_core() {
    let ex: std::collections::HashMap<String, Value> = captures::lines("rpc-senders.jsonl")
        .into_iter()
        .map(|l| (l["step"].as_str().unwrap().to_string(), l))
        .collect();
    let raw: Value = serde_json::from_str(ex["block-raw"]["body"].as_str().unwrap()).unwrap();
    let block: bitcoin::Block =
        bitcoin::consensus::encode::deserialize_hex(raw["result"].as_str().unwrap()).unwrap();
    let payment = &block.txdata[1];
    let net = bitcoin::Network::Regtest;

    for step in ["mempool-payment-verbose1", "mempool-payment-verbose2"] {
        assert_eq!(
            verbose::transaction(payment, None, false, net).text(),
            captured_result(&ex[step]),
            "{step}: a mempool transaction, described without prevouts or fee"
        );
    }

    let v3: Value = serde_json::from_str(&captured_result(&ex["block-verbose3"])).unwrap();
    let coins: Vec<Option<Vec<verbose::Coin>>> =
        vec![Some(vec![]), Some(captured_coins(&v3["tx"][1]))];
    assert_eq!(coins[1].as_ref().unwrap().len(), 3, "three coins spent");
    for (step, verbosity) in [("block-verbose3", 3), ("block-verbose2", 2)] {
        let text = captured_result(&ex[step]);
        let details = text
            .find(",\"strippedsize\"")
            .expect("block details follow the header");
        let ours = verbose::block_details(&block, &coins, verbosity, net).text();
        assert_eq!(
            format!("{{{}", &text[details + 1..]),
            ours,
            "{step}: sizes, coinbase summary and transactions"
        );
    }

    let ours = verbose::transaction_in_block(
        payment,
        coins[1].as_deref(),
        &verbose::Place {
            block: block.block_hash(),
            active: true,
            confirmations: 1,
            time: block.header.time,
            asked: true,
        },
        net,
    );
    assert_eq!(
        ours.text(),
        captured_result(&ex["confirmed-payment-verbose2-with-blockhash"]),
        "a confirmed transaction asked for with its block hash"
    );
}

/// Without -txindex a confirmed transaction asked for without its block is refused as Core
/// refuses it: HTTP 500, code -5, the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simnode_refuses_a_confirmed_transaction_without_its_block_like_bitcoin_core() {
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start(dir.path()).await.unwrap();
    let ex = captures::lines("rpc-senders.jsonl")
        .into_iter()
        .find(|l| l["step"] == "confirmed-payment-verbose2-no-txindex")
        .unwrap();
    let (status, text) = send(&node, "/", "cookie", &ex["request"]).await;
    assert_eq!(status, 500, "HTTP status");
    assert_eq!(text, ex["body"].as_str().unwrap(), "body");
}

/// Core's REST answers for a block, captured with and without `-rest` (`rest.jsonl`): simnode
/// gives the same status, content type and bytes, the regtest genesis block's raw bytes among
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simnode_answers_rest_block_reads_like_bitcoin_core() {
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start(dir.path()).await.unwrap();
    let captured = captures::lines("rest.jsonl");
    assert_eq!(captured.len(), 8, "four asks with -rest, four without");
    let base = node.rpc_url();
    let base = base.trim_end_matches('/');
    for c in captured {
        node.set_rest(c["step"] == "rest-on");
        let path = c["path"].as_str().unwrap();
        let resp = crate::harness::http_client()
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("simnode answers");
        let status = resp.status().as_u16();
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        let body = resp.bytes().await.unwrap();
        let what = format!("{} GET {path}", c["step"]);
        assert_eq!(
            status as u64,
            c["status"].as_u64().unwrap(),
            "{what}: status"
        );
        assert_eq!(kind, c["headers"]["content-type"], "{what}: content type");
        assert_eq!(
            hex::encode(&body),
            c["body_hex"].as_str().unwrap(),
            "{what}: body"
        );
    }
}
