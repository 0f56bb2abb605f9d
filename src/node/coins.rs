//! The coins a transaction spends, as bitcoind describes them without `-txindex`: for a block,
//! `getrawtransaction TXID 2 HASH` for a few of its transactions, `getblock HASH 3` for many
//! (every input carries `prevout`, read from the block's undo data); for a
//! mempool transaction, `gettxout PARENT N false` in one batch (the chainstate, where a coin
//! spent only in the mempool is still unspent), then the mempool parent itself for coins an
//! unconfirmed transaction created. `senders::Senders::of` checks the coins against the inputs.

use std::collections::{HashMap, HashSet};

use bitcoin::{Amount, BlockHash, OutPoint, ScriptBuf, Transaction, Txid};
use serde::Deserialize;
use serde_json::{json, Value};

use super::rpc::proven_transaction;
use super::{NodeError, NodeResult, RpcClient};
use crate::senders::SpentCoin;

/// Calls per JSON-RPC batch: a transaction with thousands of inputs is asked about in parts.
const BATCH: usize = 500;

#[derive(Deserialize)]
struct VerboseBlock {
    hash: BlockHash,
    tx: Vec<VerboseTx>,
}

#[derive(Deserialize)]
struct VerboseTx {
    txid: Txid,
    vin: Vec<VerboseInput>,
}

/// `getrawtransaction TXID 2 BLOCKHASH`: the transaction with its inputs' `prevout`.
#[derive(Deserialize)]
struct VerboseTxInBlock {
    txid: Txid,
    blockhash: BlockHash,
    vin: Vec<VerboseInput>,
}

/// Up to this many transactions of a block are asked about one by one (in one batch); above,
/// the whole block at verbosity 3 costs less, as each look-up reads the block from disk. One
/// look-up answers in about a fifth of the time of a 100-transaction block at verbosity 3.
const FEW: usize = 8;

/// A coinbase input has neither `txid` nor `prevout`.
#[derive(Deserialize)]
struct VerboseInput {
    txid: Option<Txid>,
    vout: Option<u32>,
    prevout: Option<CoinJson>,
}

/// A coin as `prevout` and `gettxout` describe it.
#[derive(Deserialize)]
struct CoinJson {
    value: f64,
    #[serde(rename = "scriptPubKey")]
    script_pubkey: ScriptJson,
}

#[derive(Deserialize)]
struct ScriptJson {
    hex: String,
}

impl CoinJson {
    fn coin(self, method: &str, outpoint: OutPoint) -> NodeResult<SpentCoin> {
        let amount = Amount::from_btc(self.value).map_err(|e| {
            NodeError::bad(method, format!("{outpoint}: amount {}: {e}", self.value))
        })?;
        let script = ScriptBuf::from_hex(&self.script_pubkey.hex)
            .map_err(|e| NodeError::bad(method, format!("{outpoint}: script: {e}")))?;
        Ok(SpentCoin {
            outpoint,
            script,
            amount,
        })
    }
}

/// The coins a transaction's inputs spend, from their `prevout`s (the coinbase spends none).
fn coins_of(method: &str, txid: Txid, vin: Vec<VerboseInput>) -> NodeResult<Vec<SpentCoin>> {
    let mut coins = Vec::with_capacity(vin.len());
    for input in vin {
        let (Some(prev_txid), Some(vout)) = (input.txid, input.vout) else {
            continue;
        };
        let outpoint = OutPoint::new(prev_txid, vout);
        let prevout = input.prevout.ok_or_else(|| {
            NodeError::bad(
                method,
                format!("input {outpoint} of {txid} has no prevout (a node older than v23?)"),
            )
        })?;
        coins.push(prevout.coin(method, outpoint)?);
    }
    Ok(coins)
}

impl RpcClient {
    /// The coins spent by `txids` of the block `hash`: a few asked about one by one, many
    /// through the whole block.
    pub(super) async fn block_coins(
        &self,
        hash: BlockHash,
        txids: &[Txid],
    ) -> NodeResult<HashMap<Txid, Vec<SpentCoin>>> {
        if txids.len() > FEW {
            return self.verbose_block_coins(hash, txids).await;
        }
        const M: &str = "getrawtransaction";
        let calls: Vec<(&str, Value)> = txids
            .iter()
            .map(|t| (M, json!([t.to_string(), 2, hash.to_string()])))
            .collect();
        let answers = match self.call_batch(&calls).await {
            // Their answers together are over the size limit: the block's is read in parts.
            Err(NodeError::TooLarge { .. }) => return self.verbose_block_coins(hash, txids).await,
            other => other?,
        };
        let mut out = HashMap::new();
        for (txid, answer) in txids.iter().zip(answers) {
            let answer = match answer {
                Err(e) if e.is_not_found() => continue,
                other => other?,
            };
            let tx: VerboseTxInBlock = serde_json::from_value(answer)
                .map_err(|e| NodeError::bad(M, format!("{txid}: {e}")))?;
            if tx.txid != *txid || tx.blockhash != hash {
                return Err(NodeError::bad(
                    M,
                    format!(
                        "asked for {txid} in {hash}, got {} in {}",
                        tx.txid, tx.blockhash
                    ),
                ));
            }
            // Before v25, verbosity 2 of getrawtransaction has no prevout; getblock 3 has it
            // from v23.
            if tx
                .vin
                .iter()
                .any(|i| i.txid.is_some() && i.prevout.is_none())
            {
                return self.verbose_block_coins(hash, txids).await;
            }
            out.insert(tx.txid, coins_of(M, tx.txid, tx.vin)?);
        }
        Ok(out)
    }

    pub(super) async fn verbose_block_coins(
        &self,
        hash: BlockHash,
        txids: &[Txid],
    ) -> NodeResult<HashMap<Txid, Vec<SpentCoin>>> {
        const M: &str = "getblock";
        let block: VerboseBlock = self.call_typed(M, json!([hash.to_string(), 3])).await?;
        if block.hash != hash {
            return Err(NodeError::bad(
                M,
                format!("asked for {hash}, got {}", block.hash),
            ));
        }
        let wanted: HashSet<&Txid> = txids.iter().collect();
        let mut out = HashMap::new();
        for tx in block.tx.into_iter().filter(|t| wanted.contains(&t.txid)) {
            out.insert(tx.txid, coins_of(M, tx.txid, tx.vin)?);
        }
        Ok(out)
    }

    pub(super) async fn mempool_coins(
        &self,
        outpoints: &[OutPoint],
    ) -> NodeResult<Vec<Option<SpentCoin>>> {
        let mut coins = Vec::with_capacity(outpoints.len());
        for part in outpoints.chunks(BATCH) {
            let calls: Vec<(&str, Value)> = part
                .iter()
                .map(|o| ("gettxout", json!([o.txid.to_string(), o.vout, false])))
                .collect();
            for (o, answer) in part.iter().zip(self.call_batch(&calls).await?) {
                coins.push(match answer? {
                    Value::Null => None,
                    v => Some(coin_from(v, *o)?),
                });
            }
        }
        let parents: Vec<Txid> = outpoints
            .iter()
            .zip(&coins)
            .filter(|(_, c)| c.is_none())
            .map(|(o, _)| o.txid)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let found = self.mempool_parents(&parents).await?;
        for (o, c) in outpoints.iter().zip(coins.iter_mut()) {
            if c.is_none() {
                *c = found.get(&o.txid).and_then(|tx| {
                    let out = tx.output.get(o.vout as usize)?;
                    Some(SpentCoin {
                        outpoint: *o,
                        script: out.script_pubkey.clone(),
                        amount: out.value,
                    })
                });
            }
        }
        Ok(coins)
    }

    /// Unconfirmed parents from the mempool, each proven by its txid; those the node does not
    /// hold are absent.
    async fn mempool_parents(&self, txids: &[Txid]) -> NodeResult<HashMap<Txid, Transaction>> {
        let found = self.transactions(txids).await?;
        Ok(txids
            .iter()
            .zip(found)
            .filter_map(|(t, tx)| Some((*t, tx?)))
            .collect())
    }

    /// `getrawtransaction` for each of `txids`, in batches of `BATCH`, each answer proven by
    /// its txid; `None` where the node does not hold it. A batch whose answer is over the size
    /// limit (large transactions) is asked for again in halves, down to one transaction.
    pub(super) async fn transactions(
        &self,
        txids: &[Txid],
    ) -> NodeResult<Vec<Option<Transaction>>> {
        const M: &str = "getrawtransaction";
        let mut out = Vec::with_capacity(txids.len());
        let mut parts: Vec<&[Txid]> = txids.chunks(BATCH).rev().collect();
        while let Some(part) = parts.pop() {
            let calls: Vec<(&str, Value)> =
                part.iter().map(|t| (M, json!([t.to_string()]))).collect();
            let answers = match self.call_batch(&calls).await {
                Err(NodeError::TooLarge { .. }) if part.len() > 1 => {
                    let (a, b) = part.split_at(part.len() / 2);
                    parts.push(b);
                    parts.push(a);
                    continue;
                }
                answers => answers?,
            };
            for (txid, answer) in part.iter().zip(answers) {
                out.push(match answer {
                    Ok(v) => Some(proven_transaction(&v, *txid)?),
                    Err(e) if e.is_not_found() => None,
                    Err(e) => return Err(e),
                });
            }
        }
        Ok(out)
    }
}

fn coin_from(v: Value, outpoint: OutPoint) -> NodeResult<SpentCoin> {
    let c: CoinJson = serde_json::from_value(v)
        .map_err(|e| NodeError::bad("gettxout", format!("{outpoint}: {e}")))?;
    c.coin("gettxout", outpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RpcAuth;
    use bitcoin::hashes::Hash;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A node that reads each request whole and answers it with the JSON text `reply(request)`.
    async fn serving(reply: impl Fn(&Value) -> String + Clone + Send + 'static) -> RpcClient {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = vec![0u8; 65536];
                    let body = loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&req).to_string();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break body.to_string();
                        }
                    };
                    let out = reply(&serde_json::from_str(&body).unwrap());
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        out.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(out.as_bytes()).await;
                });
            }
        });
        let auth = RpcAuth::UserPass {
            user: "u".into(),
            password: "p".into(),
        };
        RpcClient::new(&url, auth)
    }

    /// A node that answers every request with `body`.
    async fn answering(body: String) -> RpcClient {
        serving(move |_| body.clone()).await
    }

    fn op() -> OutPoint {
        OutPoint::new(Txid::from_byte_array([7; 32]), 1)
    }

    /// A node that answers each call (alone or in a batch) with `result(call)`, and records
    /// the methods called.
    async fn scripted(
        result: fn(&Value) -> Value,
    ) -> (RpcClient, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let node = serving(move |request| {
            let answer = |call: &Value| {
                log.lock()
                    .unwrap()
                    .push(call["method"].as_str().unwrap().to_string());
                json!({ "result": result(call), "error": null, "id": call["id"] })
            };
            match request {
                Value::Array(calls) => Value::Array(calls.iter().map(answer).collect()),
                call => answer(call),
            }
            .to_string()
        })
        .await;
        (node, seen)
    }

    #[tokio::test]
    async fn a_node_before_v25_without_prevouts_in_getrawtransaction_is_asked_for_the_block() {
        const TXID: &str = "0303030303030303030303030303030303030303030303030303030303030303";
        const BLOCK: &str = "0101010101010101010101010101010101010101010101010101010101010101";
        const PREV: &str = "0707070707070707070707070707070707070707070707070707070707070707";
        // v24: verbosity 2 is read as "verbose", so inputs come without `prevout`; getblock 3
        // has them.
        let (node, seen) = scripted(|call| match call["method"].as_str().unwrap() {
            "getrawtransaction" => json!({ "txid": TXID, "blockhash": BLOCK,
                "vin": [{ "txid": PREV, "vout": 1, "sequence": 0 }] }),
            "getblock" => json!({ "hash": BLOCK, "tx": [{ "txid": TXID,
                "vin": [{ "txid": PREV, "vout": 1,
                    "prevout": { "value": 0.5, "scriptPubKey": { "hex": "51" } } }] }] }),
            other => panic!("unexpected call {other}"),
        })
        .await;
        let txid: Txid = TXID.parse().unwrap();
        let coins = node
            .block_coins(BLOCK.parse().unwrap(), &[txid])
            .await
            .unwrap();
        assert_eq!(
            coins[&txid],
            [SpentCoin {
                outpoint: OutPoint::new(PREV.parse().unwrap(), 1),
                script: ScriptBuf::from_hex("51").unwrap(),
                amount: Amount::from_sat(50_000_000),
            }],
            "the coins come from the block's description"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            ["getrawtransaction", "getblock"],
            "asked for the transaction, then for the block"
        );
    }

    #[tokio::test]
    async fn a_block_description_of_another_block_is_refused() {
        let other = BlockHash::from_byte_array([2; 32]);
        let node = answering(format!(
            r#"{{"result":{{"hash":"{other}","tx":[]}},"error":null,"id":1}}"#
        ))
        .await;
        let e = node
            .verbose_block_coins(BlockHash::from_byte_array([1; 32]), &[])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("asked for"), "{e}");
    }

    #[tokio::test]
    async fn a_batch_answer_with_an_id_we_did_not_send_is_refused() {
        let node = answering(r#"[{"result":null,"error":null,"id":999999}]"#.into()).await;
        let e = node.mempool_coins(&[op()]).await.unwrap_err();
        assert!(e.to_string().contains("did not send"), "{e}");
    }

    #[tokio::test]
    async fn two_answers_to_one_call_are_refused() {
        let node = answering(
            r#"[{"result":null,"error":null,"id":1},{"result":{"value":1.0,"scriptPubKey":{"hex":"51"}},"error":null,"id":1}]"#.into(),
        )
        .await;
        let e = node.mempool_coins(&[op()]).await.unwrap_err();
        assert!(e.to_string().contains("two answers"), "{e}");
    }

    #[tokio::test]
    async fn a_negative_or_unparseable_coin_is_refused() {
        let node = answering(
            r#"[{"result":{"value":-1.0,"scriptPubKey":{"hex":"51"}},"error":null,"id":1}]"#.into(),
        )
        .await;
        let e = node.mempool_coins(&[op()]).await.unwrap_err();
        assert!(matches!(e, NodeError::BadResponse { .. }), "{e}");
        let node = answering(
            r#"[{"result":{"value":1.0,"scriptPubKey":{"hex":"zz"}},"error":null,"id":1}]"#.into(),
        )
        .await;
        let e = node.mempool_coins(&[op()]).await.unwrap_err();
        assert!(e.to_string().contains("script"), "{e}");
    }

    /// A node holding `txs` whose answer to any batch of more than one call is over the size
    /// limit; it counts the requests it answered.
    async fn holding(
        txs: Vec<Transaction>,
    ) -> (RpcClient, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let answered = std::sync::Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        let txs: HashMap<String, String> = txs
            .iter()
            .map(|t| {
                let hex = bitcoin::consensus::encode::serialize_hex(t);
                (t.compute_txid().to_string(), hex)
            })
            .collect();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut req = Vec::new();
                let mut buf = vec![0u8; 65536];
                let body = loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break Some(body.to_string());
                    }
                };
                let Some(body) = body else { continue };
                let calls: Vec<Value> = serde_json::from_str(&body).unwrap();
                let head = if calls.len() > 1 {
                    "HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\n".to_string()
                } else {
                    count.fetch_add(1, Ordering::SeqCst);
                    let c = &calls[0];
                    let answer = match txs.get(c["params"][0].as_str().unwrap()) {
                        Some(hex) => json!([{"result": hex, "error": null, "id": c["id"]}]),
                        None => json!([{"result": null, "error": {"code": -5, "message": "No such mempool or blockchain transaction"}, "id": c["id"]}]),
                    }
                    .to_string();
                    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}", answer.len())
                };
                let _ = s.write_all(head.as_bytes()).await;
            }
        });
        let auth = RpcAuth::UserPass {
            user: "u".into(),
            password: "p".into(),
        };
        (RpcClient::new(&url, auth), answered)
    }

    fn payment(n: u8) -> Transaction {
        Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![bitcoin::TxIn {
                previous_output: OutPoint::new(Txid::from_byte_array([n; 32]), 0),
                ..Default::default()
            }],
            output: vec![bitcoin::TxOut {
                value: Amount::from_sat(1000 + n as u64),
                script_pubkey: ScriptBuf::new(),
            }],
        }
    }

    #[tokio::test]
    async fn a_batch_answer_over_the_limit_is_asked_for_again_in_halves_keeping_order() {
        let txs: Vec<Transaction> = (1..=3).map(payment).collect();
        let (node, answered) = holding(txs.clone()).await;
        let gone = Txid::from_byte_array([9; 32]);
        let asked = [
            txs[0].compute_txid(),
            gone,
            txs[2].compute_txid(),
            txs[1].compute_txid(),
        ];
        let got = node.transactions(&asked).await.unwrap();
        assert_eq!(
            got,
            vec![
                Some(txs[0].clone()),
                None,
                Some(txs[2].clone()),
                Some(txs[1].clone())
            ],
            "each answer in the order asked; the one the node does not hold is None"
        );
        assert_eq!(
            answered.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "split down to single calls, each asked once"
        );
    }
}
