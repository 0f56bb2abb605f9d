//! The simulated node's JSON-RPC server, answering as Bitcoin Core does: JSON-RPC 1.0 errors as
//! HTTP 500 (404 for an unknown method) with `error.code`; 2.0 requests get HTTP 200 with
//! `error` and no `result`; bad credentials get 401 with an empty body.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::{Address, BlockHash, Network, Txid};
use serde_json::{json, Value};

use super::verbose::Json;
use super::{described, mine_one, SimError, SimNode, State, PAYMENT_FEE};

pub fn router(node: SimNode) -> Router {
    let rest = {
        let node = node.clone();
        move |file| super::rest::block(node.clone(), file)
    };
    let handler = move |headers: HeaderMap, body: Bytes| {
        let node = node.clone();
        async move {
            let delay = node.lock().block_read_delay;
            if !delay.is_zero() && asks_for_a_block(&body) {
                node.count_held_read();
                tokio::time::sleep(delay).await;
            }
            handle(&node, &headers, &body)
        }
    };
    Router::new()
        .route("/", post(handler.clone()))
        .route("/wallet/{name}", post(handler))
        .route("/rest/block/{file}", get(rest))
}

fn asks_for_a_block(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .is_some_and(|v| v.get("method").and_then(Value::as_str) == Some("getblock"))
}

pub(super) struct RpcError {
    pub(super) code: i64,
    pub(super) message: String,
}

pub(super) fn err(code: i64, message: impl Into<String>) -> RpcError {
    RpcError {
        code,
        message: message.into(),
    }
}

impl From<SimError> for RpcError {
    fn from(e: SimError) -> RpcError {
        let code = match e {
            SimError::HeightOutOfRange => -8,
            SimError::Orphan(_) => -25,
            SimError::Duplicate(_) => -27,
            _ => -5,
        };
        err(code, e.to_string())
    }
}

fn authorized(node: &SimNode, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(b64) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    decoded == node.lock().cookie.as_bytes()
}

fn handle(node: &SimNode, headers: &HeaderMap, body: &[u8]) -> Response {
    {
        let mut s = node.lock();
        if s.down {
            return (StatusCode::SERVICE_UNAVAILABLE, "stopped").into_response();
        }
        if s.garbage_calls > 0 {
            s.garbage_calls -= 1;
            return (StatusCode::OK, "{\"result\": [truncated").into_response();
        }
    }
    if !authorized(node, headers) {
        return (StatusCode::UNAUTHORIZED, "").into_response();
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"result": null, "error": {"code": -32700, "message": "Parse error"}, "id": null})
                    .to_string(),
            )
        }
    };
    if let Value::Array(batch) = request {
        let answers: Vec<String> = batch.iter().map(|r| answer(node, r).1).collect();
        return reply(StatusCode::OK, format!("[{}]", answers.join(",")));
    }
    let (status, text) = answer(node, &request);
    reply(status, text)
}

fn reply(status: StatusCode, mut text: String) -> Response {
    text.push('\n');
    (status, [("content-type", "application/json")], text).into_response()
}

/// One answer's JSON text, keys in Core's order.
fn answer(node: &SimNode, req: &Value) -> (StatusCode, String) {
    let id = Json::Raw(req.get("id").cloned().unwrap_or(Value::Null).to_string());
    let v2 = req.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let method = req.get("method").and_then(Value::as_str).unwrap_or("");
    let params = req.get("params").cloned().unwrap_or(json!([]));
    let result = {
        let mut s = node.lock();
        *s.calls.entry(method.to_string()).or_default() += 1;
        let r = if s.warmup_calls > 0 {
            s.warmup_calls -= 1;
            Err(err(-28, "Loading P2P addresses…"))
        } else {
            match described::call(&s, method, &params) {
                Some(r) => r,
                None => call(node, &mut s, method, &params).map(|v| Json::Raw(v.to_string())),
            }
        };
        s.flush();
        r
    };
    let null = || Json::Raw("null".into());
    let error = |e: &RpcError| Json::Raw(json!({"code": e.code, "message": e.message}).to_string());
    let (status, fields) = match (result, v2) {
        (Ok(r), false) => (
            StatusCode::OK,
            vec![("result", r), ("error", null()), ("id", id)],
        ),
        (Ok(r), true) => (
            StatusCode::OK,
            vec![
                ("jsonrpc", Json::Str("2.0".into())),
                ("result", r),
                ("id", id),
            ],
        ),
        (Err(e), true) => (
            StatusCode::OK,
            vec![
                ("jsonrpc", Json::Str("2.0".into())),
                ("error", error(&e)),
                ("id", id),
            ],
        ),
        (Err(e), false) => {
            let status = if e.code == -32601 {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            (
                status,
                vec![("result", null()), ("error", error(&e)), ("id", id)],
            )
        }
    };
    (status, Json::Obj(fields).text())
}

pub(super) fn param(params: &Value, i: usize) -> Option<&Value> {
    params.get(i).filter(|v| !v.is_null())
}

pub(super) fn block_hash_param(params: &Value) -> Result<BlockHash, RpcError> {
    block_hash_at(params, 0)
}

pub(super) fn block_hash_at(params: &Value, i: usize) -> Result<BlockHash, RpcError> {
    let s = param(params, i)
        .and_then(Value::as_str)
        .ok_or_else(|| err(-1, "blockhash is required"))?;
    if s.len() != 64 {
        return Err(err(
            -8,
            format!(
                "blockhash must be of length 64 (not {}, for '{s}')",
                s.len()
            ),
        ));
    }
    s.parse().map_err(|_| {
        err(
            -8,
            format!("blockhash must be hexadecimal string (not '{s}')"),
        )
    })
}

pub(super) fn txid_param(params: &Value) -> Result<Txid, RpcError> {
    let s = param(params, 0)
        .and_then(Value::as_str)
        .ok_or_else(|| err(-1, "txid is required"))?;
    s.parse().map_err(|_| {
        err(
            -8,
            format!("txid must be of length 64 (not {}, for '{s}')", s.len()),
        )
    })
}

fn address_param(params: &Value, i: usize) -> Result<bitcoin::ScriptBuf, RpcError> {
    let s = param(params, i)
        .and_then(Value::as_str)
        .ok_or_else(|| err(-1, "address is required"))?;
    s.parse::<Address<_>>()
        .ok()
        .and_then(|a| a.require_network(Network::Regtest).ok())
        .map(|a| a.script_pubkey())
        .ok_or_else(|| err(-5, "Invalid address"))
}

const REGTEST_TARGET: &str = "7fffff0000000000000000000000000000000000000000000000000000000000";
const REGTEST_DIFFICULTY: f64 = 4.656542373906925e-10;

fn chainwork(height: u32) -> String {
    format!("{:064x}", (height as u128 + 1) * 2)
}

pub(super) fn header_json(s: &State, hash: &BlockHash) -> Result<Value, RpcError> {
    let (block, height) = s.chain.block(hash)?;
    let h = &block.header;
    let active = s.chain.is_active(hash);
    let confirmations = if active {
        (s.chain.height() - height + 1) as i64
    } else {
        -1
    };
    let mut v = json!({
        "hash": hash.to_string(),
        "confirmations": confirmations,
        "height": height,
        "version": h.version.to_consensus(),
        "versionHex": format!("{:08x}", h.version.to_consensus()),
        "merkleroot": h.merkle_root.to_string(),
        "time": h.time,
        "mediantime": s.chain.median_time(hash),
        "nonce": h.nonce,
        "bits": format!("{:08x}", h.bits.to_consensus()),
        "target": REGTEST_TARGET,
        "difficulty": REGTEST_DIFFICULTY,
        "chainwork": chainwork(height),
        "nTx": block.txdata.len(),
    });
    if height > 0 {
        v["previousblockhash"] = json!(h.prev_blockhash.to_string());
    }
    if active {
        if let Ok(next) = s.chain.block_hash(height + 1) {
            v["nextblockhash"] = json!(next.to_string());
        }
    }
    Ok(v)
}

fn call(node: &SimNode, s: &mut State, method: &str, params: &Value) -> Result<Value, RpcError> {
    Ok(match method {
        "getblockchaininfo" => {
            let tip = s.chain.tip();
            let (block, _) = s.chain.block(&tip)?;
            json!({
                "chain": "regtest", "blocks": s.chain.height(), "headers": s.chain.height(),
                "bestblockhash": tip.to_string(), "bits": "207fffff", "target": REGTEST_TARGET,
                "difficulty": REGTEST_DIFFICULTY, "time": block.header.time, "mediantime": s.chain.median_time(&tip),
                "verificationprogress": 1, "initialblockdownload": s.chain.height() == 0,
                "chainwork": chainwork(s.chain.height()), "size_on_disk": 0, "pruned": false,
                "warnings": ["chainwatch simnode: a simulated regtest node"]
            })
        }
        "getnetworkinfo" => {
            json!({"version": 319900, "subversion": "/Satoshi:31.99.0/simnode/", "connections": 0, "warnings": []})
        }
        "uptime" => json!(1),
        "getbestblockhash" => json!(s.chain.tip().to_string()),
        "getblockcount" => json!(s.chain.height()),
        "getblockhash" => {
            let h = param(params, 0)
                .and_then(Value::as_i64)
                .ok_or_else(|| err(-1, "height is required"))?;
            let h = u32::try_from(h).map_err(|_| err(-8, "Block height out of range"))?;
            json!(s.chain.block_hash(h)?.to_string())
        }
        "getblockheader" => {
            let hash = block_hash_param(params)?;
            if param(params, 1).and_then(Value::as_bool) == Some(false) {
                json!(serialize_hex(&s.chain.block(&hash)?.0.header))
            } else {
                header_json(s, &hash)?
            }
        }
        "getblockfilter" => super::filters::getblockfilter(s, params)?,
        "getblock" => json!(serialize_hex(s.chain.block(&block_hash_param(params)?)?.0)),
        "getrawmempool" => {
            let txids: Vec<String> = s.chain.mempool().txids().map(|t| t.to_string()).collect();
            if param(params, 1).and_then(Value::as_bool) == Some(true) {
                json!({"txids": txids, "mempool_sequence": s.chain.mempool_sequence})
            } else {
                json!(txids)
            }
        }
        "getmempoolentry" => {
            let tx = s
                .chain
                .mempool_tx(&txid_param(params)?)
                .map_err(|_| err(-5, "Transaction not in mempool"))?;
            let vsize = tx.vsize();
            let fee = json!(PAYMENT_FEE as f64 / 1e8);
            json!({
                "vsize": vsize, "weight": tx.weight().to_wu(), "time": s.clock,
                "height": s.chain.height(), "descendantcount": 1, "descendantsize": vsize,
                "ancestorcount": 1, "ancestorsize": vsize,
                "wtxid": tx.compute_wtxid().to_string(), "chunkweight": tx.weight().to_wu(),
                "fees": {"base": fee, "modified": fee, "ancestor": fee, "descendant": fee, "chunk": fee},
                "depends": [], "spentby": [], "unbroadcast": false
            })
        }
        "getzmqnotifications" => {
            let list: Vec<Value> = node
                .zmq
                .iter()
                .map(|(t, a)| json!({"type": t, "address": a, "hwm": 1000}))
                .collect();
            Value::Array(list)
        }
        "gettxspendingprevout" => {
            let list = param(params, 0)
                .and_then(Value::as_array)
                .ok_or_else(|| err(-1, "outputs are required"))?;
            let mut out = Vec::new();
            for o in list {
                let txid: Txid = o["txid"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| err(-8, "txid must be hexadecimal"))?;
                let vout = o["vout"]
                    .as_u64()
                    .ok_or_else(|| err(-8, "vout must be a number"))?
                    as u32;
                let op = bitcoin::OutPoint::new(txid, vout);
                let mut entry = json!({"txid": txid.to_string(), "vout": vout});
                if let Some(spender) = s.chain.mempool().spender(&op) {
                    entry["spendingtxid"] = json!(spender.to_string());
                }
                out.push(entry);
            }
            Value::Array(out)
        }
        "sendrawtransaction" => {
            let hex = param(params, 0)
                .and_then(Value::as_str)
                .ok_or_else(|| err(-1, "hexstring is required"))?;
            let tx = deserialize_hex(hex).map_err(|_| err(-22, "TX decode failed"))?;
            json!(s.chain.accept_tx(tx)?.to_string())
        }
        "generatetoaddress" => {
            let n = param(params, 0)
                .and_then(Value::as_u64)
                .ok_or_else(|| err(-1, "nblocks is required"))?;
            let to = address_param(params, 1)?;
            let hashes: Vec<String> = (0..n).map(|_| mine_one(s, &to, true).to_string()).collect();
            json!(hashes)
        }
        "invalidateblock" => {
            s.chain.invalidate(block_hash_param(params)?)?;
            Value::Null
        }
        "reconsiderblock" => {
            s.chain.reconsider(block_hash_param(params)?)?;
            Value::Null
        }
        _ => return Err(err(-32601, "Method not found")),
    })
}
