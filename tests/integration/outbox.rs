//! The delivery engine against a receiver scripted to fail in every way, with the clock injected:
//! attempts, delays, statuses and alerts exactly as specified, and nothing slept through.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use chainwatch::changeset::ChangeSet;
use chainwatch::config::{Config, EndpointConfig};
use chainwatch::dispatch::{self, Clock};
use chainwatch::event;
use chainwatch::store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::harness::SECRET;

#[derive(Clone, Debug)]
pub enum Behave {
    Status(u16),
    RetryAfter(u16, u64),
    Redirect,
    Hang(Duration),
    Big(u16, usize),
    Trickle(u16, Duration),
}

#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
}

/// A receiver that answers each request with the next scripted behaviour (then the default).
#[derive(Clone)]
pub struct Scripted {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<VecDeque<Behave>>>,
    default: Arc<Mutex<Behave>>,
    pub concurrent: Arc<AtomicUsize>,
    pub max_concurrent: Arc<AtomicUsize>,
}

impl Scripted {
    pub async fn start(default: Behave) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let s = Scripted {
            url,
            requests: Default::default(),
            script: Default::default(),
            default: Arc::new(Mutex::new(default)),
            concurrent: Default::default(),
            max_concurrent: Default::default(),
        };
        let me = s.clone();
        let handler = move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let me = me.clone();
            async move { me.answer(uri.path().to_string(), headers, body).await }
        };
        let app = Router::new().fallback(axum::routing::post(handler));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        s
    }

    pub fn push(&self, b: Behave) {
        self.script.lock().unwrap().push_back(b);
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    async fn answer(&self, path: String, headers: HeaderMap, body: Bytes) -> Response {
        self.requests.lock().unwrap().push(Request {
            path,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        let b = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.default.lock().unwrap().clone());
        let code = |c: u16| StatusCode::from_u16(c).unwrap();
        let r = match b {
            Behave::Status(c) => (code(c), "answer").into_response(),
            Behave::RetryAfter(c, secs) => {
                (code(c), [("retry-after", secs.to_string())], "slow down").into_response()
            }
            Behave::Redirect => (
                StatusCode::MOVED_PERMANENTLY,
                [("location", "/elsewhere")],
                "",
            )
                .into_response(),
            Behave::Hang(d) => {
                tokio::time::sleep(d).await;
                (StatusCode::OK, "late").into_response()
            }
            Behave::Big(c, n) => (code(c), vec![b'x'; n]).into_response(),
            Behave::Trickle(c, every) => {
                let stream = futures_util::stream::unfold(0u32, move |i| async move {
                    if i >= 200 {
                        return None;
                    }
                    tokio::time::sleep(every).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from_static(b"drip ")), i + 1))
                });
                (code(c), Body::from_stream(stream)).into_response()
            }
        };
        self.concurrent.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

/// A store with `n` events waiting for one endpoint, and the worker delivering them on a fake clock.
pub struct Outbox {
    pub dir: tempfile::TempDir,
    pub clock: Arc<AtomicI64>,
    pub wake: Arc<Notify>,
    pub token: CancellationToken,
    pub endpoints: Vec<EndpointConfig>,
    pub ids: Vec<String>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

pub const T0: i64 = 1_800_000_000_000;

impl Outbox {
    pub async fn new(endpoints_toml: &str, n: usize) -> Outbox {
        Outbox::new_at(endpoints_toml, n, T0).await
    }

    pub async fn new_at(endpoints_toml: &str, n: usize, t0: i64) -> Outbox {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(
            &format!(
                "data_dir = {:?}\n{endpoints_toml}",
                dir.path().display().to_string()
            ),
            "test",
            None,
        )
        .unwrap();
        let mut store = Store::open(&cfg.data_dir).unwrap();
        store.check_network("regtest").unwrap();
        store.sync_endpoints(&cfg.endpoints).unwrap();
        let events: Vec<event::NewEvent> = (0..n)
            .map(|i| {
                event::other_event(
                    event::TX_PENDING,
                    &format!("test-{i}"),
                    "regtest",
                    Default::default(),
                )
            })
            .collect();
        let ids = events.iter().map(|e| e.id.clone()).collect();
        store.commit(&ChangeSet::events(events), t0).unwrap();
        let clock = Arc::new(AtomicI64::new(t0));
        let mut o = Outbox {
            dir,
            clock,
            wake: Arc::new(Notify::new()),
            token: CancellationToken::new(),
            endpoints: cfg.endpoints,
            ids,
            workers: vec![],
        };
        for ep in o.endpoints.clone() {
            let c = o.clock.clone();
            let clock: Clock = Arc::new(move || c.load(Ordering::SeqCst));
            let store = Store::open(o.dir.path()).unwrap();
            let ctx = dispatch::Context {
                clock,
                ..dispatch::Context::new(o.wake.clone(), o.token.clone())
            };
            o.workers
                .push(tokio::spawn(dispatch::run_endpoint(ep, store, ctx)));
        }
        o
    }

    pub fn store(&self) -> Store {
        Store::open(self.dir.path()).unwrap()
    }

    pub fn set_clock(&self, ms: i64) {
        self.clock.store(ms, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    /// Waits until the first event has `n` recorded attempts; returns them.
    pub async fn attempts(&self, event: usize, n: usize) -> Vec<chainwatch::store::AttemptRow> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let a = self.store().attempts_for(&self.ids[event]).unwrap();
            if a.len() >= n {
                return a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited for {n} attempts, have {}: {a:?}",
                a.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn delivery(&self, event: usize) -> chainwatch::store::DeliveryRow {
        let id = &self.ids[event];
        self.store()
            .list_deliveries(None, None, 10_000)
            .unwrap()
            .into_iter()
            .find(|d| &d.event_id == id)
            .unwrap()
    }

    pub fn next_attempt(&self, event: usize) -> i64 {
        self.delivery(event).next_attempt_at
    }

    pub fn alerts(&self, kind: &str) -> Vec<serde_json::Value> {
        self.store()
            .events_after(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| serde_json::from_str(&e.body).unwrap())
            .collect()
    }

    pub async fn stop(self) {
        self.token.cancel();
        for w in self.workers {
            w.await.expect("worker ends cleanly");
        }
    }
}

fn endpoint(name: &str, url: &str, extra: &str) -> String {
    format!("[[endpoints]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nevents = [\"tx.*\", \"alert.*\"]\n{extra}\n")
}

const SCHEDULE_S: [i64; 9] = [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_on_the_default_schedule_then_dead_with_an_alert() {
    let rx = Scripted::start(Behave::Status(500)).await;
    let o = Outbox::new(&endpoint("shop", &rx.url, ""), 1).await;
    for (i, base) in SCHEDULE_S.iter().enumerate() {
        let a = o.attempts(0, i + 1).await;
        let last = a.last().unwrap();
        assert_eq!(last.status_code, Some(500));
        assert_eq!(last.error.as_deref(), Some("HTTP 500"));
        assert_eq!(last.response_excerpt.as_deref(), Some("answer"));
        let delay = o.next_attempt(0) - last.started_at;
        let (lo, hi) = (base * 800, base * 1200);
        assert!(
            (lo..=hi).contains(&delay),
            "retry {} after {delay} ms, expected {base}s ±20%",
            i + 1
        );
        assert_eq!(o.delivery(0).status, "failed");
        o.set_clock(o.next_attempt(0));
    }
    let a = o.attempts(0, 10).await;
    assert_eq!(a.len(), 10, "immediately, then nine retries");
    let total_h = (a[9].started_at - a[0].started_at) as f64 / 3.6e6;
    assert!(
        (60.0..=90.0).contains(&total_h),
        "about 75 hours in all, got {total_h:.1}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(o.delivery(0).status, "dead");
    let alerts = o.alerts("alert.delivery_exhausted");
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["data"]["event_id"], o.ids[0].as_str());
    assert_eq!(alerts[0]["data"]["attempts"], 10);
    assert_eq!(alerts[0]["data"]["endpoint"], "shop");
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_at_once() {
    let rx = Scripted::start(Behave::Status(410)).await;
    let o = Outbox::new(&endpoint("shop", &rx.url, ""), 2).await;
    let a = o.attempts(0, 1).await;
    assert_eq!(a[0].status_code, Some(410));
    tokio::time::sleep(Duration::from_millis(300)).await;
    o.set_clock(T0 + 3_600_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.count(), 1, "nothing more is sent to a disabled endpoint");
    let store = o.store();
    assert!(!store.endpoint_enabled("shop").unwrap());
    assert_eq!(
        o.delivery(0).status,
        "failed",
        "kept for when the endpoint is enabled again"
    );
    let alerts = o.alerts("alert.endpoint_disabled");
    assert_eq!(alerts.len(), 1);
    assert!(alerts[0]["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("410"));
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_waits_as_told_and_at_least_a_minute() {
    let rx = Scripted::start(Behave::Status(200)).await;
    rx.push(Behave::RetryAfter(429, 120));
    rx.push(Behave::Status(429));
    rx.push(Behave::RetryAfter(503, 48 * 3600));
    let o = Outbox::new(&endpoint("shop", &rx.url, ""), 1).await;
    let a = o.attempts(0, 1).await;
    assert_eq!(
        o.next_attempt(0) - a[0].started_at,
        120_000,
        "Retry-After: 120 honoured"
    );
    o.set_clock(o.next_attempt(0));
    let a = o.attempts(0, 2).await;
    let d = o.next_attempt(0) - a[1].started_at;
    assert!(
        (240_000..=360_000).contains(&d),
        "a second 429 follows the schedule (5m ±20%), got {d}"
    );
    o.set_clock(o.next_attempt(0));
    let a = o.attempts(0, 3).await;
    assert_eq!(
        o.next_attempt(0) - a[2].started_at,
        24 * 3_600_000,
        "Retry-After capped at 24h"
    );
    o.set_clock(o.next_attempt(0));
    o.attempts(0, 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(o.delivery(0).status, "delivered");
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_429_without_retry_after_waits_a_minute_not_five_seconds() {
    let rx = Scripted::start(Behave::Status(204)).await;
    rx.push(Behave::Status(429));
    let o = Outbox::new(&endpoint("shop", &rx.url, ""), 1).await;
    let a = o.attempts(0, 1).await;
    let d = o.next_attempt(0) - a[0].started_at;
    assert_eq!(d, 60_000, "max(5s ±20%, 60s)");
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_fail_and_are_never_followed() {
    let rx = Scripted::start(Behave::Redirect).await;
    let o = Outbox::new(&endpoint("shop", &rx.url, ""), 1).await;
    let a = o.attempts(0, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a[0].status_code, Some(301));
    assert_eq!(o.delivery(0).status, "failed");
    let paths: Vec<String> = rx
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, vec!["/hooks"], "the Location was not requested");
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_refused_connections_are_failed_attempts() {
    let rx = Scripted::start(Behave::Hang(Duration::from_secs(5))).await;
    let toml = endpoint("slow", &rx.url, "timeout = \"1s\"")
        + &endpoint("closed", "http://127.0.0.1:1/hooks", "");
    let o = Outbox::new(&toml, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (slow, closed) = loop {
        let a = o.store().attempts_for(&o.ids[0]).unwrap();
        let slow: Vec<_> = a.iter().filter(|x| x.endpoint == "slow").cloned().collect();
        let closed: Vec<_> = a
            .iter()
            .filter(|x| x.endpoint == "closed")
            .cloned()
            .collect();
        if !slow.is_empty() && !closed.is_empty() {
            break (slow[0].clone(), closed[0].clone());
        }
        assert!(tokio::time::Instant::now() < deadline, "{a:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(slow.status_code, None);
    assert!(
        slow.error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        slow.error
    );
    assert!(
        (900..3000).contains(&slow.duration_ms),
        "gave up after the 1s timeout: {}",
        slow.duration_ms
    );
    assert!(
        closed
            .error
            .as_deref()
            .unwrap()
            .to_lowercase()
            .contains("refused"),
        "{:?}",
        closed.error
    );
    let rows = o.store().list_deliveries(None, None, 10).unwrap();
    let next = |ep: &str| {
        rows.iter()
            .find(|r| r.endpoint == ep)
            .unwrap()
            .next_attempt_at
    };
    assert!(
        next("slow") - slow.started_at >= 60_000,
        "a timeout waits at least 60s"
    );
    let d = next("closed") - closed.started_at;
    assert!(
        (4_000..=6_000).contains(&d),
        "a refused connection follows the schedule: {d}"
    );
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_trickling_responses_are_cut_short() {
    let rx = Scripted::start(Behave::Status(200)).await;
    rx.push(Behave::Big(500, 10 * 1024 * 1024));
    rx.push(Behave::Trickle(503, Duration::from_millis(50)));
    rx.push(Behave::Trickle(200, Duration::from_millis(50)));
    let o = Outbox::new(&endpoint("shop", &rx.url, "timeout = \"1s\""), 1).await;
    let a = o.attempts(0, 1).await;
    assert_eq!(a[0].status_code, Some(500));
    assert_eq!(
        a[0].response_excerpt.as_ref().unwrap().len(),
        4096,
        "at most 4 KiB stored"
    );
    o.set_clock(o.next_attempt(0));
    let a = o.attempts(0, 2).await;
    assert_eq!(a[1].status_code, Some(503));
    assert!(
        a[1].error.as_deref().unwrap_or("").contains("timed out"),
        "{:?}",
        a[1]
    );
    assert!(
        a[1].response_excerpt.as_ref().unwrap().starts_with("drip"),
        "what arrived is kept"
    );
    assert!(o.next_attempt(0) - a[1].started_at >= 60_000);
    o.set_clock(o.next_attempt(0));
    let a = o.attempts(0, 3).await;
    assert_eq!(a[2].status_code, Some(200));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        o.delivery(0).status,
        "delivered",
        "a 2xx came back, even if its body trickled"
    );
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_disable_after_is_disabled_with_an_alert() {
    let rx = Scripted::start(Behave::Status(500)).await;
    let o = Outbox::new(&endpoint("shop", &rx.url, "disable_after = \"1h\""), 1).await;
    for i in 0..4 {
        o.attempts(0, i + 1).await;
        o.set_clock(o.next_attempt(0));
    }
    // Attempts at 0, ~5s, ~5m and ~35m fail; the one after the ~30m wait is past the hour... or not yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while o.store().endpoint_enabled("shop").unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "never disabled");
        o.set_clock(o.next_attempt(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = o.store().attempts_for(&o.ids[0]).unwrap();
    let failing_for = a.last().unwrap().started_at - a[0].started_at;
    assert!(
        failing_for >= 3_600_000,
        "disabled only after an hour of failures: {failing_for}"
    );
    assert!(
        a[a.len() - 2].started_at - a[0].started_at < 3_600_000,
        "and at the first attempt past it"
    );
    let alerts = o.alerts("alert.endpoint_disabled");
    assert_eq!(alerts.len(), 1);
    assert!(alerts[0]["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("3600s"));
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_endpoints_keep_concurrency_requests_in_flight() {
    let rx = Scripted::start(Behave::Hang(Duration::from_millis(400))).await;
    let o = Outbox::new(
        &endpoint("bulk", &rx.url, "ordered = false\nconcurrency = 4"),
        12,
    )
    .await;
    for i in 0..12 {
        o.attempts(i, 1).await;
    }
    assert_eq!(
        rx.max_concurrent.load(Ordering::SeqCst),
        4,
        "exactly `concurrency` at once"
    );
    let rows = o.store().list_deliveries(None, None, 100).unwrap();
    assert!(rows
        .iter()
        .all(|r| r.status == "delivered" && r.attempts == 1));
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_slow_a_healthy_one() {
    let stuck = Scripted::start(Behave::Hang(Duration::from_secs(30))).await;
    let healthy = Scripted::start(Behave::Status(204)).await;
    let toml =
        endpoint("stuck", &stuck.url, "timeout = \"30s\"") + &endpoint("healthy", &healthy.url, "");
    let began = std::time::Instant::now();
    let o = Outbox::new(&toml, 20).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while healthy.count() < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthy endpoint got {}",
            healthy.count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "healthy endpoint served in {:?}",
        began.elapsed()
    );
    // Its worker may reach the first request a moment after the healthy one finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stuck.count() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stuck.count(), 1, "the stuck one holds its ordered head");
    let seqs: Vec<i64> = healthy
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["data"]["sequence"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "in sequence order");
    o.token.cancel();
}

/// Verifies with the Python `standardwebhooks` package, a second independent implementation.
fn python_verifies(secret: &str, r: &Request) -> Option<bool> {
    let script = "import sys, json\nfrom standardwebhooks.webhooks import Webhook\nd = json.load(sys.stdin)\ntry:\n    Webhook(d['secret']).verify(d['body'], d['headers'])\n    print('ok')\nexcept Exception as e:\n    print('fail', e)\n";
    let h = |n: &str| r.headers.get(n).unwrap().to_str().unwrap().to_string();
    let input = serde_json::json!({
        "secret": secret, "body": r.body,
        "headers": { "webhook-id": h("webhook-id"), "webhook-timestamp": h("webhook-timestamp"), "webhook-signature": h("webhook-signature") }
    });
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if String::from_utf8_lossy(&out.stderr).contains("No module named") {
        return None;
    }
    Some(text.trim() == "ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_two_independent_implementations_during_a_rotation() {
    const NEW: &str = "whsec_bmV3IHNlY3JldCBmb3Igcm90YXRpb24gdGVzdHMh";
    let rx = Scripted::start(Behave::Status(204)).await;
    let toml = format!(
        "[[endpoints]]\nname = \"rot\"\nurl = \"{}\"\nsecret = [\"{NEW}\", \"{SECRET}\"]\n",
        rx.url
    );
    // Real time: verifiers reject timestamps more than five minutes off.
    let o = Outbox::new_at(&toml, 3, chainwatch::daemon::now_ms()).await;
    o.attempts(2, 1).await;
    o.stop().await;
    let requests = rx.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    let must_have_python = std::env::var("CI").is_ok();
    for r in &requests {
        let sig = r
            .headers
            .get("webhook-signature")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            sig.split(' ').count(),
            2,
            "one signature per active secret: {sig}"
        );
        for secret in [NEW, SECRET] {
            let wh = standardwebhooks::Webhook::new(secret).unwrap();
            assert!(
                wh.verify(r.body.as_bytes(), &r.headers).is_ok(),
                "Rust standardwebhooks, {secret}"
            );
            match python_verifies(secret, r) {
                Some(ok) => assert!(ok, "Python standardwebhooks, {secret}"),
                None if must_have_python => panic!("CI must have the Python standardwebhooks package"),
                None => eprintln!("python standardwebhooks not installed: `pip install standardwebhooks` to run this check"),
            }
        }
        let other =
            standardwebhooks::Webhook::new("whsec_c29tZSBvdGhlciBzZWNyZXQgb2YgcmVhbCBsZW5ndGg=")
                .unwrap();
        assert!(
            other.verify(r.body.as_bytes(), &r.headers).is_err(),
            "a third secret does not verify"
        );
        assert!(
            !python_verifies("whsec_c29tZSBvdGhlciBzZWNyZXQgb2YgcmVhbCBsZW5ndGg=", r)
                .unwrap_or(false),
            "Python rejects a third secret too"
        );
    }
}
