//! JSON-RPC over HTTP to bitcoind, async. Re-reads the cookie after a 401 or a lost connection,
//! because bitcoind writes a new cookie every time it starts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::hex::FromHex;
use bitcoin::{Block, BlockHash, OutPoint, Transaction, Txid};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::rest::RestBlocks;
use super::{ChainInfo, ChainSource, HeaderInfo, NodeError, NodeResult, ZmqNotification};
use crate::blockfilter::CheckedFilter;
use crate::config::RpcAuth;
use crate::senders::SpentCoin;

/// The largest JSON-RPC answer read: a 4 MB block is 8 MB of hex, and a mainnet
/// `getrawmempool` of 300,000 txids about 21 MB. Anything larger is refused, not buffered.
pub const MAX_RPC_RESPONSE: usize = 64 * 1024 * 1024;

pub struct RpcClient {
    url: String,
    /// The URL as errors and logs show it (no credentials).
    shown_url: String,
    auth: RpcAuth,
    http: reqwest::Client,
    /// user:password from the cookie, read lazily and dropped when it stops working.
    cookie: Mutex<Option<(String, String)>>,
    next_id: AtomicU64,
    rest: RestBlocks,
}

impl RpcClient {
    pub fn new(url: &str, auth: RpcAuth) -> RpcClient {
        crate::net::install_crypto_provider();
        // No proxy: HTTP_PROXY in the environment must never see the RPC password.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("HTTP client builds");
        RpcClient {
            shown_url: crate::net::redact_url(url),
            url: url.to_string(),
            auth,
            http,
            cookie: Mutex::new(None),
            next_id: AtomicU64::new(1),
            rest: RestBlocks::new(url),
        }
    }

    fn credentials(&self) -> NodeResult<(String, String)> {
        match &self.auth {
            RpcAuth::UserPass { user, password } => Ok((user.clone(), password.clone())),
            RpcAuth::Cookie(path) => {
                let mut cached = self.cookie.lock().expect("cookie lock");
                if let Some(c) = cached.as_ref() {
                    return Ok(c.clone());
                }
                let c = read_cookie(path)?;
                *cached = Some(c.clone());
                Ok(c)
            }
        }
    }

    fn forget_cookie(&self) {
        *self.cookie.lock().expect("cookie lock") = None;
    }

    /// One JSON-RPC call; `result` on success.
    pub async fn call(&self, method: &str, params: Value) -> NodeResult<Value> {
        let (status, body) = self.exchange(method, &params).await?;
        parse_response(method, status, &body)
    }

    /// One call whose answer is read straight into `T`, without a `Value` tree in between:
    /// `getblock … 3` of a full block is tens of megabytes of JSON.
    pub async fn call_typed<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> NodeResult<T> {
        let (status, body) = self.exchange(method, &params).await?;
        parse_typed(method, status, &body)
    }

    /// Several calls in one request (a JSON-RPC batch); the answers in the order asked.
    pub async fn call_batch(&self, calls: &[(&str, Value)]) -> NodeResult<Vec<NodeResult<Value>>> {
        if calls.is_empty() {
            return Ok(vec![]);
        }
        let label = calls[0].0;
        let first = self
            .next_id
            .fetch_add(calls.len() as u64, Ordering::Relaxed);
        let requests: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, (method, params))| {
                json!({ "jsonrpc": "1.0", "id": first + i as u64, "method": method, "params": params })
            })
            .collect();
        let (status, body) = self.post_retrying(label, &Value::Array(requests)).await?;
        let batch = format!("{label} (batch)");
        let bad = |reason: String| NodeError::bad(&batch, reason);
        let answers: Vec<Value> = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("HTTP {status}, not a JSON list ({e})")))?;
        let mut out: Vec<Option<NodeResult<Value>>> = (0..calls.len()).map(|_| None).collect();
        for a in answers {
            let i = a
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| id.checked_sub(first))
                .map(|i| i as usize)
                .filter(|i| *i < calls.len())
                .ok_or_else(|| bad("an answer with an id we did not send".into()))?;
            if out[i].is_some() {
                return Err(bad(format!("two answers to call {}", first + i as u64)));
            }
            out[i] = Some(parse_value(calls[i].0, 200, a));
        }
        out.into_iter()
            .map(|a| a.ok_or_else(|| bad("a call got no answer".into())))
            .collect()
    }

    async fn exchange(&self, method: &str, params: &Value) -> NodeResult<(u16, Vec<u8>)> {
        tracing::debug!(method, "rpc call");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = json!({ "jsonrpc": "1.0", "id": id, "method": method, "params": params });
        self.post_retrying(method, &request).await
    }

    async fn post_retrying(&self, method: &str, request: &Value) -> NodeResult<(u16, Vec<u8>)> {
        let started = std::time::Instant::now();
        let answer = match self.post(method, request).await {
            // A restarted bitcoind wrote a new cookie: read it and try again at once.
            Err(NodeError::Auth(_)) if matches!(self.auth, RpcAuth::Cookie(_)) => {
                self.post(method, request).await
            }
            other => other,
        };
        // At debug level, how long the node took: where the hot path's time goes.
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(method, ms, "rpc answered");
        answer
    }

    async fn post(&self, method: &str, request: &Value) -> NodeResult<(u16, Vec<u8>)> {
        let (user, password) = self.credentials()?;
        let resp = self
            .http
            .post(&self.url)
            .basic_auth(user, Some(password))
            .json(request)
            .send()
            .await
            .map_err(|e| {
                self.forget_cookie();
                self.unreachable(e)
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            self.forget_cookie();
            return Err(NodeError::Auth(format!("HTTP 401 from {}", self.shown_url)));
        }
        // bitcoind's answer when its RPC work queue is full: busy, not broken.
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Err(NodeError::Unreachable {
                url: self.shown_url.clone(),
                reason: "HTTP 503: the node's RPC work queue is full".into(),
            });
        }
        let body = self.read_bounded(method, resp).await?;
        Ok((status.as_u16(), body))
    }

    fn unreachable(&self, e: reqwest::Error) -> NodeError {
        NodeError::Unreachable {
            url: self.shown_url.clone(),
            reason: root_cause(&e.without_url()),
        }
    }

    /// Reads an answer of at most `MAX_RPC_RESPONSE` bytes.
    async fn read_bounded(&self, method: &str, resp: reqwest::Response) -> NodeResult<Vec<u8>> {
        let body = super::body_within(resp, MAX_RPC_RESPONSE).await;
        body.map_err(|e| self.unreachable(e))?
            .ok_or_else(|| NodeError::TooLarge {
                method: method.to_string(),
                limit: MAX_RPC_RESPONSE,
            })
    }

    /// The block `hash` by `getblock`, as hex inside JSON, proven.
    async fn block_by_rpc(&self, hash: BlockHash) -> NodeResult<Block> {
        let (status, body) = self
            .exchange("getblock", &json!([hash.to_string(), 0]))
            .await?;
        super::decode_block(body.len(), move || proven_block(status, &body, hash))
            .await
            .unwrap_or_else(|| Err(NodeError::bad("getblock", "shutting down")))
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

fn read_cookie(path: &PathBuf) -> NodeResult<(String, String)> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => NodeError::Cookie {
            path: shown.clone(),
            reason: e.to_string(),
        },
        _ => NodeError::CookieUnreadable {
            path: shown.clone(),
            reason: format!("cannot read it: {e}"),
        },
    })?;
    let (user, pass) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| NodeError::CookieUnreadable {
            path: shown.clone(),
            reason: "its content is not user:password".into(),
        })?;
    Ok((user.to_string(), pass.to_string()))
}

/// Bitcoin Core answers errors with HTTP 500 (404 for unknown methods) and a JSON body.
pub fn parse_response(method: &str, status: u16, body: &[u8]) -> NodeResult<Value> {
    let v: Value = serde_json::from_slice(body).map_err(|e| not_json(method, status, body, e))?;
    parse_value(method, status, v)
}

fn not_json(method: &str, status: u16, body: &[u8], e: serde_json::Error) -> NodeError {
    NodeError::BadResponse {
        method: method.to_string(),
        reason: format!(
            "HTTP {status}, body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    }
}

/// One answer object (`result`, `error`, `id`) made a result.
fn parse_value(method: &str, status: u16, mut v: Value) -> NodeResult<Value> {
    let result = v.get_mut("result").map(Value::take);
    result_of(method, status, v.get("error"), result)
}

/// What one answer's `error` and `result` (and the HTTP status) say, typed or not.
fn result_of<T>(
    method: &str,
    status: u16,
    error: Option<&Value>,
    result: Option<T>,
) -> NodeResult<T> {
    if let Some(err) = error.filter(|e| !e.is_null()) {
        return Err(error_of(method, err));
    }
    if !(200..300).contains(&status) {
        return Err(NodeError::bad(
            method,
            format!("HTTP {status} without an error object"),
        ));
    }
    result.ok_or_else(|| NodeError::bad(method, "no result field"))
}

fn error_of(method: &str, err: &Value) -> NodeError {
    let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if code == -28 {
        return NodeError::WarmingUp(message);
    }
    NodeError::Rpc {
        method: method.to_string(),
        code,
        message,
    }
}

/// An answer read into `T`; an error answer is told as `parse_response` tells it.
fn parse_typed<T: DeserializeOwned>(method: &str, status: u16, body: &[u8]) -> NodeResult<T> {
    #[derive(serde::Deserialize)]
    struct Envelope<T> {
        result: Option<T>,
        error: Option<Value>,
    }
    /// The error alone: `result` is skipped, not built into a tree.
    #[derive(serde::Deserialize)]
    struct ErrorOnly {
        error: Option<Value>,
    }
    let e: Envelope<T> = match serde_json::from_slice(body) {
        Ok(e) => e,
        // An error answer's `result` is null, which T may not accept.
        Err(err) => {
            let told = serde_json::from_slice::<ErrorOnly>(body)
                .map_err(|e| not_json(method, status, body, e))?;
            return Err(match told.error.filter(|e| !e.is_null()) {
                Some(e) => error_of(method, &e),
                None => NodeError::bad(method, format!("unexpected answer: {err}")),
            });
        }
    };
    result_of(method, status, e.error.as_ref(), e.result)
}

/// A `getblock` answer decoded and proven to be the block `hash`.
fn proven_block(status: u16, body: &[u8], hash: BlockHash) -> NodeResult<Block> {
    const M: &str = "getblock";
    let answer = parse_response(M, status, body)?;
    let hex = as_str(M, &answer)?;
    if hex.len() > 2 * crate::proof::MAX_BLOCK_SIZE {
        let e = crate::proof::ProofError::TooLarge(hex.len() / 2);
        return Err(NodeError::bad(M, e.to_string()));
    }
    let raw =
        Vec::<u8>::from_hex(hex).map_err(|e| NodeError::bad(M, format!("cannot decode: {e}")))?;
    crate::proof::decode_block(&raw, hash).map_err(|e| NodeError::bad(M, e.to_string()))
}

/// A `getrawtransaction` answer decoded and proven to be `txid`.
pub(super) fn proven_transaction(v: &Value, txid: Txid) -> NodeResult<Transaction> {
    const M: &str = "getrawtransaction";
    let tx: Transaction = decode(M, v)?;
    crate::proof::check_transaction(&tx, txid).map_err(|e| NodeError::bad(M, e.to_string()))?;
    Ok(tx)
}

fn field<'a>(method: &str, v: &'a Value, key: &str) -> NodeResult<&'a Value> {
    v.get(key).ok_or_else(|| NodeError::BadResponse {
        method: method.into(),
        reason: format!("missing {key}"),
    })
}

fn as_str<'a>(method: &str, v: &'a Value) -> NodeResult<&'a str> {
    v.as_str().ok_or_else(|| NodeError::BadResponse {
        method: method.into(),
        reason: format!("expected a string, got {v}"),
    })
}

fn as_u64(method: &str, v: &Value) -> NodeResult<u64> {
    v.as_u64().ok_or_else(|| NodeError::BadResponse {
        method: method.into(),
        reason: format!("expected a number, got {v}"),
    })
}

fn as_u32(method: &str, v: &Value) -> NodeResult<u32> {
    u32::try_from(as_u64(method, v)?).map_err(|_| NodeError::BadResponse {
        method: method.into(),
        reason: format!("{v} is out of range"),
    })
}

fn parse_hex<T: std::str::FromStr>(method: &str, v: &Value) -> NodeResult<T> {
    let s = as_str(method, v)?;
    s.parse().map_err(|_| NodeError::BadResponse {
        method: method.into(),
        reason: format!("bad hash {s:?}"),
    })
}

fn decode<T: bitcoin::consensus::Decodable>(method: &str, v: &Value) -> NodeResult<T> {
    deserialize_hex(as_str(method, v)?).map_err(|e| NodeError::BadResponse {
        method: method.into(),
        reason: format!("cannot decode: {e}"),
    })
}

pub fn chain_info_from(v: &Value) -> NodeResult<ChainInfo> {
    let m = "getblockchaininfo";
    Ok(ChainInfo {
        chain: as_str(m, field(m, v, "chain")?)?.to_string(),
        blocks: as_u32(m, field(m, v, "blocks")?)?,
        best_block_hash: parse_hex(m, field(m, v, "bestblockhash")?)?,
        initial_block_download: v
            .get("initialblockdownload")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

pub fn header_from(v: &Value) -> NodeResult<HeaderInfo> {
    let m = "getblockheader";
    Ok(HeaderInfo {
        hash: parse_hex(m, field(m, v, "hash")?)?,
        height: as_u32(m, field(m, v, "height")?)?,
        prev: v
            .get("previousblockhash")
            .map(|p| parse_hex(m, p))
            .transpose()?,
        time: as_u32(m, field(m, v, "time")?)?,
        confirmations: field(m, v, "confirmations")?.as_i64().unwrap_or(-1),
    })
}

/// `getrawmempool false true`, read straight into txids: a mainnet mempool lists 100,000 or
/// more, and a `Value` tree of them would cost several times the answer's size.
#[derive(serde::Deserialize)]
struct MempoolListing {
    txids: Vec<Txid>,
    mempool_sequence: u64,
}

/// A `getblockfilter` answer, checked.
pub fn filter_from(v: &Value) -> NodeResult<CheckedFilter> {
    const M: &str = "getblockfilter";
    let filter = as_str(M, field(M, v, "filter")?)?;
    let header = as_str(M, field(M, v, "header")?)?;
    CheckedFilter::from_hex(filter, header).map_err(|e| NodeError::bad(M, e.to_string()))
}

pub fn zmq_from(v: &Value) -> NodeResult<Vec<ZmqNotification>> {
    let m = "getzmqnotifications";
    let list = v.as_array().ok_or_else(|| NodeError::BadResponse {
        method: m.into(),
        reason: "not a list".into(),
    })?;
    list.iter()
        .map(|n| {
            Ok(ZmqNotification {
                kind: as_str(m, field(m, n, "type")?)?.to_string(),
                address: as_str(m, field(m, n, "address")?)?.to_string(),
            })
        })
        .collect()
}

impl ChainSource for RpcClient {
    async fn chain_info(&self) -> NodeResult<ChainInfo> {
        chain_info_from(&self.call("getblockchaininfo", json!([])).await?)
    }

    async fn best_block_hash(&self) -> NodeResult<BlockHash> {
        parse_hex(
            "getbestblockhash",
            &self.call("getbestblockhash", json!([])).await?,
        )
    }

    async fn block_hash(&self, height: u32) -> NodeResult<BlockHash> {
        parse_hex(
            "getblockhash",
            &self.call("getblockhash", json!([height])).await?,
        )
    }

    async fn block_header(&self, hash: BlockHash) -> NodeResult<HeaderInfo> {
        let h = header_from(
            &self
                .call("getblockheader", json!([hash.to_string(), true]))
                .await?,
        )?;
        if h.hash != hash {
            return Err(NodeError::BadResponse {
                method: "getblockheader".into(),
                reason: format!("asked for {hash}, got {}", h.hash),
            });
        }
        Ok(h)
    }

    async fn block_headers(&self, hashes: &[BlockHash]) -> NodeResult<Vec<HeaderInfo>> {
        let calls: Vec<(&str, Value)> = hashes
            .iter()
            .map(|h| ("getblockheader", json!([h.to_string(), true])))
            .collect();
        let answers = self.call_batch(&calls).await?;
        hashes
            .iter()
            .zip(answers)
            .map(|(hash, a)| {
                let h = header_from(&a?)?;
                if h.hash != *hash {
                    let reason = format!("asked for {hash}, got {}", h.hash);
                    return Err(NodeError::bad("getblockheader", reason));
                }
                Ok(h)
            })
            .collect()
    }

    async fn block(&self, hash: BlockHash) -> NodeResult<Block> {
        let rest_failure = match self.rest.worth_trying() {
            true => match self.rest.block(&self.http, hash).await {
                Ok(block) => return Ok(block),
                Err(e) => {
                    tracing::debug!(%hash, reason = %e, "block not read through REST");
                    Some(e)
                }
            },
            false => None,
        };
        let block = self.block_by_rpc(hash).await;
        if let (Some(e), Ok(_)) = (rest_failure, &block) {
            self.rest.failed(&e);
        }
        block
    }

    async fn block_hashes(&self, from: u32, count: u32) -> NodeResult<Vec<BlockHash>> {
        let calls: Vec<(&str, Value)> = (from..from.saturating_add(count))
            .map(|h| ("getblockhash", json!([h])))
            .collect();
        self.call_batch(&calls)
            .await?
            .into_iter()
            .map(|a| parse_hex("getblockhash", &a?))
            .collect()
    }

    async fn block_filters(
        &self,
        hashes: &[BlockHash],
    ) -> NodeResult<Vec<NodeResult<CheckedFilter>>> {
        let calls: Vec<(&str, Value)> = hashes
            .iter()
            .map(|h| ("getblockfilter", json!([h.to_string(), "basic"])))
            .collect();
        Ok(self
            .call_batch(&calls)
            .await?
            .into_iter()
            .map(|a| filter_from(&a?))
            .collect())
    }

    async fn raw_mempool(&self) -> NodeResult<(Vec<Txid>, u64)> {
        let m: MempoolListing = self
            .call_typed("getrawmempool", json!([false, true]))
            .await?;
        Ok((m.txids, m.mempool_sequence))
    }

    async fn mempool_transaction(&self, txid: Txid) -> NodeResult<Transaction> {
        let v = self
            .call("getrawtransaction", json!([txid.to_string()]))
            .await?;
        proven_transaction(&v, txid)
    }

    async fn mempool_transactions(&self, txids: &[Txid]) -> NodeResult<Vec<Option<Transaction>>> {
        self.transactions(txids).await
    }

    async fn mempool_spender(&self, outpoints: &[OutPoint]) -> NodeResult<Option<Txid>> {
        if outpoints.is_empty() {
            return Ok(None);
        }
        let list: Vec<Value> = outpoints
            .iter()
            .map(|o| json!({"txid": o.txid.to_string(), "vout": o.vout}))
            .collect();
        let v = self.call("gettxspendingprevout", json!([list])).await?;
        let m = "gettxspendingprevout";
        let entries = v.as_array().ok_or_else(|| NodeError::BadResponse {
            method: m.into(),
            reason: "not a list".into(),
        })?;
        for e in entries {
            if let Some(t) = e.get("spendingtxid") {
                return Ok(Some(parse_hex(m, t)?));
            }
        }
        Ok(None)
    }

    async fn block_spent_coins(
        &self,
        hash: BlockHash,
        txids: &[Txid],
    ) -> NodeResult<HashMap<Txid, Vec<SpentCoin>>> {
        self.block_coins(hash, txids).await
    }

    async fn spent_coins(&self, outpoints: &[OutPoint]) -> NodeResult<Vec<Option<SpentCoin>>> {
        self.mempool_coins(outpoints).await
    }

    async fn zmq_notifications(&self) -> NodeResult<Vec<ZmqNotification>> {
        zmq_from(&self.call("getzmqnotifications", json!([])).await?)
    }

    async fn in_mempool(&self, txid: Txid) -> NodeResult<bool> {
        match self
            .call("getmempoolentry", json!([txid.to_string()]))
            .await
        {
            Ok(v) if v.is_object() => Ok(true),
            Ok(v) => Err(NodeError::BadResponse {
                method: "getmempoolentry".into(),
                reason: format!("expected an object, got {v}"),
            }),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with `head`, then streams `chunks` of 1 MiB.
    pub(crate) async fn server(head: &'static str, chunks: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://127.0.0.1:{}/",
            listener.local_addr().unwrap().port()
        );
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("100000\r\n{}\r\n", "0".repeat(0x100000));
                    for _ in 0..chunks {
                        if s.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    fn client(url: &str) -> RpcClient {
        RpcClient::new(
            url,
            RpcAuth::UserPass {
                user: "u".into(),
                password: "p".into(),
            },
        )
    }

    #[tokio::test]
    async fn rest_failing_with_the_whole_node_down_is_not_held_against_it() {
        crate::net::install_crypto_provider();
        // Nothing listens on port 1: REST and JSON-RPC are refused alike.
        let c = client("http://127.0.0.1:1/");
        for _ in 0..5 {
            let e = c
                .block(bitcoin::hashes::Hash::all_zeros())
                .await
                .unwrap_err();
            assert!(matches!(e, NodeError::Unreachable { .. }), "{e}");
        }
        assert!(
            c.rest.worth_trying(),
            "REST is still tried once the node is back: its failures were the node's"
        );
    }

    #[tokio::test]
    async fn an_answer_announcing_more_than_the_limit_is_not_read() {
        let url = server("HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\n", 0).await;
        let e = client(&url).call("getblock", json!([])).await.unwrap_err();
        assert!(
            matches!(&e, NodeError::TooLarge { method, limit } if method == "getblock" && *limit == MAX_RPC_RESPONSE),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_at_the_limit() {
        let chunks = MAX_RPC_RESPONSE / 0x100000 + 8;
        let url = server(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            chunks,
        )
        .await;
        let e = client(&url).call("getblock", json!([])).await.unwrap_err();
        assert!(
            matches!(&e, NodeError::TooLarge { method, limit } if method == "getblock" && *limit == MAX_RPC_RESPONSE),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_rpc_url_s_credentials_never_show_in_errors() {
        let c = RpcClient::new(
            "http://rpcuser:rpcpass-s3cr3t@127.0.0.1:1/",
            RpcAuth::Cookie("/nonexistent".into()),
        );
        let c = RpcClient {
            auth: RpcAuth::UserPass {
                user: "u".into(),
                password: "p".into(),
            },
            ..c
        };
        let e = c.call("getblockchaininfo", json!([])).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, NodeError::Unreachable { .. }), "{text}");
        assert!(
            !text.contains("rpcpass-s3cr3t") && !text.contains("rpcuser"),
            "{text}"
        );
    }
}
