//! Reading the real Bitcoin Core captures in `tests/fixtures/bitcoind-regtest/`.

use std::collections::HashMap;

use bitcoin::consensus::deserialize;
use bitcoin::{Block, BlockHash, Transaction, Txid};
use serde_json::Value;

pub const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/bitcoind-regtest"
);

pub fn lines(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{DIR}/{file}")).expect("fixture readable");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("fixture line is JSON"))
        .collect()
}

pub struct ZmqCapture {
    pub step: String,
    pub topic: String,
    pub body: Vec<u8>,
    pub counter: u32,
}

pub fn zmq() -> Vec<ZmqCapture> {
    lines("zmq.jsonl")
        .into_iter()
        .map(|v| ZmqCapture {
            step: v["step"].as_str().unwrap().to_string(),
            topic: v["topic"].as_str().unwrap().to_string(),
            body: hex::decode(v["body_hex"].as_str().unwrap()).unwrap(),
            counter: v["seq"].as_u64().unwrap() as u32,
        })
        .collect()
}

/// Every block and transaction body the captures carry.
pub struct Bodies {
    pub blocks: HashMap<BlockHash, Block>,
    pub txs: HashMap<Txid, Transaction>,
}

pub fn bodies() -> Bodies {
    let mut blocks = HashMap::new();
    let mut txs = HashMap::new();
    for m in zmq() {
        match m.topic.as_str() {
            "rawblock" => {
                let b: Block = deserialize(&m.body).expect("captured block decodes");
                blocks.insert(b.block_hash(), b);
            }
            "rawtx" => {
                let t: Transaction = deserialize(&m.body).expect("captured tx decodes");
                txs.insert(t.compute_txid(), t);
            }
            _ => {}
        }
    }
    Bodies { blocks, txs }
}
