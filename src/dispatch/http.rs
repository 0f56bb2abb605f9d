//! One webhook request, and the verdict on its outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngExt;

use crate::config::EndpointConfig;
use crate::sign;
use crate::store::{AttemptOutcome, DeliveryResult, DueDelivery};

pub const MAX_RESPONSE_READ: usize = 64 * 1024;
pub const MAX_RESPONSE_STORED: usize = 4 * 1024;
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// 429s and timeouts wait at least this long before the next attempt.
pub const MIN_BACKOFF_THROTTLED: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch; injected so tests can drive time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(crate::event::now_ms)
}

/// What one HTTP attempt came to, before it is judged.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
    pub error: Option<String>,
    pub timed_out: bool,
    pub excerpt: Option<String>,
}

/// Judges an attempt: delivered, retry when, dead, or endpoint gone.
pub fn judge(
    r: &Response,
    attempts_before: u32,
    schedule: &[Duration],
    now_ms: i64,
    jitter: f64,
) -> DeliveryResult {
    match r.status {
        Some(s) if (200..300).contains(&s) => return DeliveryResult::Delivered,
        Some(410) => return DeliveryResult::EndpointGone,
        _ => {}
    }
    let failures = attempts_before as usize + 1;
    let Some(base) = schedule.get(failures - 1) else {
        return DeliveryResult::Dead;
    };
    let mut delay = base.mul_f64(jitter);
    if r.status == Some(429) || r.timed_out {
        delay = delay.max(MIN_BACKOFF_THROTTLED);
    }
    if let Some(ra) = r.retry_after {
        delay = delay.max(ra.min(MAX_RETRY_AFTER));
    }
    DeliveryResult::RetryAt(now_ms + delay.as_millis() as i64)
}

/// ±20% jitter factor.
pub fn jitter() -> f64 {
    rand::rng().random_range(0.8..=1.2)
}

fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

pub struct Sender {
    http: reqwest::Client,
}

/// Why an endpoint's HTTP client could not be built (bad TLS material or proxy).
#[derive(Debug, thiserror::Error)]
#[error("endpoint {endpoint}: cannot build its HTTP client: {reason}")]
pub struct SenderError {
    pub endpoint: String,
    pub reason: String,
}

impl Sender {
    /// An HTTP client for one endpoint: its own TLS roots and client identity, its explicit
    /// proxy or none (environment proxies never apply), no redirects, kept-alive connections.
    pub fn new(ep: &EndpointConfig) -> Result<Sender, SenderError> {
        crate::net::install_crypto_provider();
        let fail = |reason: String| SenderError {
            endpoint: ep.name.clone(),
            reason,
        };
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(ep.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(ep.concurrency.max(1) as usize)
            .no_proxy();
        if let Some(pem) = &ep.tls.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| fail(format!("ca_file: {}", chain(&e))))?;
            b = b.tls_certs_merge(certs);
        }
        if let Some(pem) = &ep.tls.identity_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| fail(format!("client_cert/client_key: {}", chain(&e))))?;
            b = b.identity(id);
        }
        if let Some(proxy) = &ep.proxy {
            let p = reqwest::Proxy::all(proxy)
                .map_err(|_| fail(format!("proxy {}", crate::net::redact_url(proxy))))?;
            b = b.proxy(p);
        }
        let http = b.build().map_err(|e| fail(chain(&e)))?;
        Ok(Sender { http })
    }

    /// POSTs one signed webhook.
    pub async fn send(
        &self,
        ep: &EndpointConfig,
        id: &str,
        body: &str,
        timestamp: i64,
    ) -> Response {
        let signature = sign::signature_header(&ep.secrets, id, timestamp, body.as_bytes());
        let result = self
            .http
            .post(&ep.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_string())
            .send()
            .await;
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                return Response {
                    status: None,
                    retry_after: None,
                    timed_out: e.is_timeout(),
                    error: Some(describe(e)),
                    excerpt: None,
                }
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let (mut buf, failed) = crate::net::body_prefix(&mut resp, MAX_RESPONSE_READ).await;
        let timed_out = failed.as_ref().is_some_and(reqwest::Error::is_timeout);
        let error = failed.map(describe);
        buf.truncate(MAX_RESPONSE_STORED);
        let excerpt = Some(String::from_utf8_lossy(&buf).into_owned());
        // A 2xx whose body then timed out still counts: the receiver accepted the request.
        let status_ok = (200..300).contains(&status);
        Response {
            status: Some(status),
            retry_after,
            timed_out: timed_out && !status_ok,
            error: if status_ok { None } else { error },
            excerpt,
        }
    }
}

/// Sends one delivery and judges the outcome against the endpoint's retry schedule.
pub async fn attempt(
    sender: &Sender,
    ep: &EndpointConfig,
    d: &DueDelivery,
    clock: &Clock,
) -> AttemptOutcome {
    let started_at_ms = clock();
    let began = Instant::now();
    let r = sender
        .send(ep, &d.event_id, &d.body, started_at_ms / 1000)
        .await;
    let result = judge(&r, d.attempts, &ep.retry_schedule, clock(), jitter());
    let status_error = r
        .status
        .filter(|s| !(200..300).contains(s))
        .map(|s| format!("HTTP {s}"));
    AttemptOutcome {
        started_at_ms,
        duration_ms: began.elapsed().as_millis() as i64,
        status_code: r.status,
        error: r.error.or(status_error),
        response_excerpt: r.excerpt,
        result,
    }
}

/// An attempt's error as it is logged and stored: the whole cause chain (a TLS failure names
/// the certificate problem), without the URL, which may carry credentials or a query token.
fn describe(e: reqwest::Error) -> String {
    chain(&e.without_url())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let part = s.to_string();
        // hyper and rustls often repeat the inner message in the outer one.
        if !msg.contains(&part) {
            msg = format!("{msg}: {part}");
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: Option<u16>) -> Response {
        Response {
            status,
            retry_after: None,
            error: None,
            timed_out: false,
            excerpt: None,
        }
    }

    #[test]
    fn schedule_then_dead() {
        let sched: Vec<Duration> = crate::config::DEFAULT_RETRY_SCHEDULE
            .iter()
            .map(|d| crate::config::parse_duration(d).unwrap())
            .collect();
        assert_eq!(
            judge(&resp(Some(200)), 0, &sched, 0, 1.0),
            DeliveryResult::Delivered
        );
        assert_eq!(
            judge(&resp(Some(500)), 0, &sched, 0, 1.0),
            DeliveryResult::RetryAt(5_000),
            "first retry after 5s"
        );
        assert_eq!(
            judge(&resp(Some(500)), 1, &sched, 0, 1.2),
            DeliveryResult::RetryAt(360_000),
            "5m +20%"
        );
        assert_eq!(
            judge(&resp(None), 8, &sched, 0, 1.0),
            DeliveryResult::RetryAt(24 * 3_600_000)
        );
        assert_eq!(
            judge(&resp(Some(500)), 9, &sched, 0, 1.0),
            DeliveryResult::Dead,
            "ten attempts in all"
        );
        assert_eq!(
            judge(&resp(Some(301)), 0, &sched, 0, 1.0),
            DeliveryResult::RetryAt(5_000),
            "redirects fail"
        );
        assert_eq!(
            judge(&resp(Some(410)), 0, &sched, 0, 1.0),
            DeliveryResult::EndpointGone
        );
        assert_eq!(
            judge(&resp(Some(429)), 0, &sched, 0, 1.0),
            DeliveryResult::RetryAt(60_000),
            "429 waits 60s"
        );
        let mut r = resp(Some(503));
        r.retry_after = Some(Duration::from_secs(48 * 3600));
        assert_eq!(
            judge(&r, 0, &sched, 0, 1.0),
            DeliveryResult::RetryAt(24 * 3_600_000),
            "Retry-After capped at 24h"
        );
    }
}
