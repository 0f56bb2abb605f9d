//! The one capturing webhook receiver: the tests' (every request kept with its headers, a
//! status or a scripted misbehaviour to answer with, a hold, waits for N accepted), the
//! demo's and `chainwatch receive`'s (signatures verified, each request handed on as it
//! arrives). It serves plain HTTP itself; any other transport (TLS) comes from the caller as
//! an accept function, so the library needs no TLS server of its own.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::sign::{self, Secret};

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub path: String,
    pub headers: HeaderMap,
    /// `webhook-id` and `webhook-timestamp` ("" when absent).
    pub id: String,
    pub timestamp: String,
    pub body: String,
    /// What the signature check said (`Err` also when the receiver had nothing to check with).
    pub verdict: Result<(), String>,
    /// The status answered; 0 while the receiver still holds the request.
    pub answered: u16,
    /// When it arrived (benchmarks measure latency to here).
    pub at: Instant,
    json: OnceLock<Value>,
}

impl Captured {
    /// The body as JSON (`Null` if it is not), parsed on first use: receivers in benchmarks
    /// take thousands of requests a second and most are never read.
    pub fn json(&self) -> &Value {
        self.json
            .get_or_init(|| serde_json::from_str(&self.body).unwrap_or(Value::Null))
    }
    pub fn kind(&self) -> &str {
        self.json()["type"].as_str().unwrap_or("")
    }
    pub fn data(&self) -> &Value {
        &self.json()["data"]
    }
    pub fn verified(&self) -> bool {
        self.verdict.is_ok()
    }
    pub fn header(&self, name: &str) -> &str {
        header(&self.headers, name)
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// What the receiver answers a request with.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, no body.
    Status(u16),
    /// This status and body.
    Text(u16, String),
    /// This status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// 301 to this location.
    Redirect(String),
    /// This status and a body of `n` bytes.
    Big(u16, usize),
    /// This status, then a body arriving a few bytes every `every`.
    Trickle(u16, Duration),
    /// 204 when the signature verifies, 401 when not: what a real receiver does.
    Verdict,
    /// This status, once this long has passed (besides any hang).
    After(u16, Duration),
}

/// Another verification besides the receiver's own (a test adds an independent implementation).
pub type Check = Arc<dyn Fn(&HeaderMap, &[u8]) -> Result<(), String> + Send + Sync>;

struct Shared {
    captured: Mutex<Vec<Captured>>,
    keep: bool,
    /// Keep only each request's webhook id and arrival time (benchmarks: the receiver shares
    /// the machine with what it measures).
    ids_only: bool,
    secrets: Vec<Secret>,
    check: Option<Check>,
    default: Mutex<Reply>,
    script: Mutex<VecDeque<Reply>>,
    hold_ms: AtomicU64,
    forward: Option<mpsc::UnboundedSender<Captured>>,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    accept_task: OnceLock<tokio::task::AbortHandle>,
}

/// A running receiver; clones share it.
#[derive(Clone)]
pub struct Receiver {
    /// Where to send webhooks: the listener's address and `/hooks` (any path is accepted).
    pub url: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

/// How a receiver verifies, answers and reports, before it starts.
pub struct ReceiverBuilder {
    secrets: Vec<Secret>,
    check: Option<Check>,
    reply: Reply,
    keep: bool,
    ids_only: bool,
    forward: Option<mpsc::UnboundedSender<Captured>>,
}

impl Receiver {
    pub fn builder() -> ReceiverBuilder {
        ReceiverBuilder {
            secrets: vec![],
            check: None,
            reply: Reply::Status(204),
            keep: true,
            ids_only: false,
            forward: None,
        }
    }

    /// A plain receiver on a free loopback port: keeps everything, answers 204.
    pub async fn start() -> Receiver {
        Receiver::builder()
            .bind_loopback(0)
            .await
            .expect("bind a loopback port")
    }

    /// Stops accepting connections (those already open finish their request).
    pub fn stop(&self) {
        if let Some(task) = self.shared.accept_task.get() {
            task.abort();
        }
    }

    /// Answers later requests with `s`.
    pub fn set_status(&self, s: u16) {
        self.set_reply(Reply::Status(s));
    }
    pub fn set_reply(&self, r: Reply) {
        *self.shared.default.lock().unwrap() = r;
    }
    /// Answers the next request with `r` (queued behind earlier ones), then the usual reply.
    pub fn push(&self, r: Reply) {
        self.shared.script.lock().unwrap().push_back(r);
    }
    /// Holds every request this long before answering (0: answer at once).
    pub fn set_hang(&self, d: Duration) {
        self.shared
            .hold_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Every request so far, in arrival order.
    pub fn all(&self) -> Vec<Captured> {
        self.shared.captured.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.shared.captured.lock().unwrap().len()
    }
    /// Requests answered with 2xx: what the receiver accepted, in arrival order.
    pub fn accepted(&self) -> Vec<Captured> {
        let all = self.shared.captured.lock().unwrap();
        all.iter().filter(|c| is_2xx(c.answered)).cloned().collect()
    }
    /// How many requests were accepted, without copying them.
    pub fn accepted_count(&self) -> usize {
        let all = self.shared.captured.lock().unwrap();
        all.iter().filter(|c| is_2xx(c.answered)).count()
    }
    /// TCP connections accepted (whatever came over them).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
    /// The most requests held at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until `n` distinct webhook ids were accepted; returns every accepted request.
    pub async fn wait_accepted(&self, n: usize, limit: Duration) -> Vec<Captured> {
        let distinct = || {
            let all = self.shared.captured.lock().unwrap();
            let mut ids: Vec<&str> = all
                .iter()
                .filter(|c| is_2xx(c.answered))
                .map(|c| c.id.as_str())
                .collect();
            ids.sort();
            ids.dedup();
            ids.len()
        };
        super::wait_for(&format!("{n} accepted events"), limit, || {
            let have = distinct();
            if have >= n {
                return Ok(());
            }
            let kinds: Vec<String> = self
                .accepted()
                .iter()
                .map(|c| format!("{} {}", c.kind(), c.data()["confirmations"]))
                .collect();
            Err(format!("got {have}: {kinds:?}"))
        })
        .await;
        self.accepted()
    }

    /// Waits until at least `n` requests arrived, whatever was answered.
    pub async fn wait_requests(&self, n: usize, limit: Duration) {
        super::wait_until(&format!("{n} requests"), limit, || self.count() >= n).await
    }
}

fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

impl ReceiverBuilder {
    /// Verifies every request's signature with these secrets.
    pub fn secrets(mut self, secrets: Vec<Secret>) -> Self {
        self.secrets = secrets;
        self
    }
    /// Verifies with `check` too; a request verifies only if both agree.
    pub fn check(
        mut self,
        check: impl Fn(&HeaderMap, &[u8]) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.check = Some(Arc::new(check));
        self
    }
    /// What to answer until told otherwise (default 204).
    pub fn reply(mut self, r: Reply) -> Self {
        self.reply = r;
        self
    }
    /// Hands each request on once answered.
    pub fn forward_to(mut self, tx: mpsc::UnboundedSender<Captured>) -> Self {
        self.forward = Some(tx);
        self
    }
    /// Keeps only the webhook id and arrival time of each request, checks nothing and answers
    /// 204: a benchmark's receiver, as cheap as a receiver can be.
    pub fn ids_only(mut self) -> Self {
        self.ids_only = true;
        self
    }
    /// Keeps no requests (a receiver running for hours forwards them instead).
    pub fn keep_nothing(mut self) -> Self {
        self.keep = false;
        self
    }

    /// Plain HTTP on `127.0.0.1:port` (0: any free port).
    pub async fn bind_loopback(self, port: u16) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        Ok(self.serve(listener))
    }

    /// Plain HTTP on a listener the caller bound.
    pub fn serve(self, listener: TcpListener) -> Receiver {
        let url = format!("http://{}/hooks", local_addr(&listener));
        self.serve_with(listener, url, |tcp| async move { Some(tcp) })
    }

    /// HTTP over whatever `accept` makes of each connection (a TLS handshake, say); a
    /// connection it gives `None` for is dropped. `url` is what senders should use.
    pub fn serve_with<A, F, S>(self, listener: TcpListener, url: String, accept: A) -> Receiver
    where
        A: Fn(TcpStream) -> F + Send + Sync + 'static,
        F: Future<Output = Option<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            captured: Mutex::default(),
            keep: self.keep,
            ids_only: self.ids_only,
            secrets: self.secrets,
            check: self.check,
            default: Mutex::new(self.reply),
            script: Mutex::default(),
            hold_ms: AtomicU64::new(0),
            forward: self.forward,
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            accept_task: OnceLock::new(),
        });
        let addr = local_addr(&listener);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), accept));
        let _ = shared.accept_task.set(task.abort_handle());
        Receiver { url, addr, shared }
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

async fn accept_loop<A, F, S>(listener: TcpListener, shared: Arc<Shared>, accept: A)
where
    A: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = Option<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let me = shared.clone();
    // Webhooks are POSTs; anything else gets 405 and is not kept, as from any receiver.
    let app = Router::new().fallback(axum::routing::post(
        move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let me = me.clone();
            async move { answer(&me, uri, headers, body).await }
        },
    ));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of descriptors, say: wait rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        // As web servers do: a reply written in more than one piece (TLS records) must not
        // wait for the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (app, stream) = (app.clone(), accept(tcp));
        tokio::spawn(async move {
            let Some(stream) = stream.await else {
                return;
            };
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut app = app.clone();
                    async move { tower_service::Service::call(&mut app, req.map(Body::new)).await }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn verdict(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    if shared.secrets.is_empty() && shared.check.is_none() {
        return Err("not checked: the receiver has no secret".into());
    }
    if !shared.secrets.is_empty() {
        sign::verify(
            &shared.secrets,
            header(headers, "webhook-id"),
            header(headers, "webhook-timestamp"),
            header(headers, "webhook-signature"),
            body,
            crate::event::now_ms() / 1000,
            sign::DEFAULT_TOLERANCE_SECS,
        )
        .map_err(|e| e.to_string())?;
    }
    match &shared.check {
        Some(check) => check(headers, body),
        None => Ok(()),
    }
}

async fn answer(shared: &Shared, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    if shared.ids_only {
        let c = Captured {
            path: String::new(),
            id: header(&headers, "webhook-id").to_string(),
            timestamp: String::new(),
            body: String::new(),
            verdict: Err(String::new()),
            headers: HeaderMap::new(),
            answered: 204,
            at: Instant::now(),
            json: OnceLock::new(),
        };
        shared.captured.lock().unwrap().push(c);
        return StatusCode::NO_CONTENT.into_response();
    }
    let c = Captured {
        path: uri.path().to_string(),
        id: header(&headers, "webhook-id").to_string(),
        timestamp: header(&headers, "webhook-timestamp").to_string(),
        body: String::from_utf8_lossy(&body).into_owned(),
        verdict: verdict(shared, &headers, &body),
        headers,
        answered: 0,
        at: Instant::now(),
        json: OnceLock::new(),
    };
    let verified = c.verdict.is_ok();
    // Kept at once, so a test sees a request the receiver is still holding. Moved, not
    // copied, unless it is forwarded too: benchmarks send thousands a second.
    let (index, unkept) = if shared.keep {
        let mut all = shared.captured.lock().unwrap();
        all.push(c);
        (Some(all.len() - 1), None)
    } else {
        (None, Some(c))
    };
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let reply = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| shared.default.lock().unwrap().clone());
    let hold = shared.hold_ms.load(Ordering::SeqCst);
    if hold > 0 {
        tokio::time::sleep(Duration::from_millis(hold)).await;
    }
    if let Reply::After(_, late) = reply {
        tokio::time::sleep(late).await;
    }
    let response = respond(reply, verified);
    let answered = response.status().as_u16();
    let forwarded = match (index, unkept) {
        (Some(i), _) => {
            let mut all = shared.captured.lock().unwrap();
            all[i].answered = answered;
            shared.forward.as_ref().map(|_| all[i].clone())
        }
        (None, Some(mut c)) => {
            c.answered = answered;
            Some(c)
        }
        (None, None) => None,
    };
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    if let (Some(tx), Some(c)) = (&shared.forward, forwarded) {
        let _ = tx.send(c);
    }
    response
}

fn respond(reply: Reply, verified: bool) -> Response {
    let code = |c: u16| StatusCode::from_u16(c).expect("a valid status code");
    match reply {
        Reply::Status(c) | Reply::After(c, _) => code(c).into_response(),
        Reply::Text(c, text) => (code(c), text).into_response(),
        Reply::RetryAfter(c, secs) => {
            (code(c), [("retry-after", secs.to_string())], "slow down").into_response()
        }
        Reply::Redirect(to) => {
            (StatusCode::MOVED_PERMANENTLY, [("location", to)], "").into_response()
        }
        Reply::Big(c, n) => (code(c), vec![b'x'; n]).into_response(),
        Reply::Trickle(c, every) => {
            let drips = futures_util::stream::unfold(0u32, move |i| async move {
                if i >= 200 {
                    return None;
                }
                tokio::time::sleep(every).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b"drip ")), i + 1))
            });
            (code(c), Body::from_stream(drips)).into_response()
        }
        Reply::Verdict if verified => StatusCode::NO_CONTENT.into_response(),
        Reply::Verdict => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// One line describing a received webhook, for people (`chainwatch receive`, the demo).
pub fn describe(r: &Captured) -> String {
    let d = r.data();
    let mark = if r.verified() { "verified" } else { "REJECTED" };
    let kind = r.json()["type"].as_str().unwrap_or("?");
    let seq = format!("#{}", d["sequence"].as_u64().unwrap_or(0));
    let mut line = format!("{mark} {seq:<4} {kind:<16} {}", r.id);
    if let Some(txid) = d["txid"].as_str() {
        let label = d["watch"]["label"].as_str().unwrap_or("");
        line.push_str(&format!(
            " {label} tx {}… conf {}/{} amount {} sat",
            &txid[..12.min(txid.len())],
            d["confirmations"],
            d["required_confirmations"],
            d["amount_sat"]
        ));
        if let Some(prev) = d["previous_block"]["height"].as_u64() {
            line.push_str(&format!(" (was in block {prev})"));
        }
        if let Some(first) = d["senders"].as_array().and_then(|s| s.first()) {
            let from = first["address"].as_str().unwrap_or("a script");
            let more = d["senders"].as_array().map_or(0, |s| s.len() - 1);
            let short = if from.len() > 16 {
                format!("{}…", &from[..14])
            } else {
                from.to_string()
            };
            match more {
                0 => line.push_str(&format!(" from {short}")),
                n => line.push_str(&format!(" from {short} +{n}")),
            }
        }
    }
    if let Err(e) = &r.verdict {
        line.push_str(&format!(" — {e}"));
    }
    line
}

#[cfg(test)]
#[path = "receiver_tests.rs"]
mod tests;
