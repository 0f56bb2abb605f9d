//! The delivery engine against a receiver scripted to fail in every way, with the clock injected:
//! attempts, delays, statuses and alerts exactly as specified, and nothing slept through.

use std::time::Duration;

use crate::harness::*;
use chainwatch::delivery::DeliveryStatus;

/// A receiver answering `reply` unless scripted otherwise.
async fn receiver_replying(reply: Reply) -> Receiver {
    Receiver::builder()
        .reply(reply)
        .bind_loopback(0)
        .await
        .unwrap()
}

/// A status with a body, so the stored response excerpt has something to show.
fn answer(status: u16) -> Reply {
    Reply::Text(status, "answer".into())
}

/// A receiver holding every request for `d`, then answering 200.
async fn receiver_holding(d: Duration) -> Receiver {
    let r = receiver_replying(Reply::Text(200, "late".into())).await;
    r.set_hang(d);
    r
}

/// An endpoint at `url` taking transaction events and alerts.
fn endpoint(name: &str, url: &str) -> Endpoint {
    Endpoint::new(name, url)
        .secret(SECRET)
        .events(["tx.*", "alert.*"])
}

const SCHEDULE_S: [i64; 9] = [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_on_the_default_schedule_then_dead_with_an_alert() {
    let rx = receiver_replying(answer(500)).await;
    let o = Outbox::new(&[endpoint("shop", &rx.url)], 1).await;
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
        assert_eq!(o.delivery(0).status, DeliveryStatus::Failed);
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
    assert_eq!(o.delivery(0).status, DeliveryStatus::Dead);
    let alerts = o.alerts("alert.delivery_exhausted");
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["data"]["event_id"], o.ids[0].as_str());
    assert_eq!(alerts[0]["data"]["attempts"], 10);
    assert_eq!(alerts[0]["data"]["endpoint"], "shop");
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_at_once() {
    let rx = receiver_replying(answer(410)).await;
    let o = Outbox::new(&[endpoint("shop", &rx.url)], 2).await;
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
        DeliveryStatus::Failed,
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
    let rx = receiver_replying(answer(200)).await;
    rx.push(Reply::RetryAfter(429, 120));
    rx.push(answer(429));
    rx.push(Reply::RetryAfter(503, 48 * 3600));
    let o = Outbox::new(&[endpoint("shop", &rx.url)], 1).await;
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
    assert_eq!(o.delivery(0).status, DeliveryStatus::Delivered);
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_429_without_retry_after_waits_a_minute_not_five_seconds() {
    let rx = receiver_replying(answer(204)).await;
    rx.push(answer(429));
    let o = Outbox::new(&[endpoint("shop", &rx.url)], 1).await;
    let a = o.attempts(0, 1).await;
    let d = o.next_attempt(0) - a[0].started_at;
    assert_eq!(d, 60_000, "max(5s ±20%, 60s)");
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_fail_and_are_never_followed() {
    let rx = receiver_replying(Reply::Redirect("/elsewhere".into())).await;
    let o = Outbox::new(&[endpoint("shop", &rx.url)], 1).await;
    let a = o.attempts(0, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a[0].status_code, Some(301));
    assert_eq!(o.delivery(0).status, DeliveryStatus::Failed);
    let paths: Vec<String> = rx.all().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec!["/hooks"], "the Location was not requested");
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_refused_connections_are_failed_attempts() {
    let rx = receiver_holding(Duration::from_secs(5)).await;
    let endpoints = [
        endpoint("slow", &rx.url).timeout("1s"),
        endpoint("closed", "http://127.0.0.1:1/hooks"),
    ];
    let o = Outbox::new(&endpoints, 1).await;
    let (slow, closed) = wait_for("an attempt to each endpoint", WAIT, || {
        let a = o.store().attempts_for(&o.ids[0]).unwrap();
        let slow: Vec<_> = a.iter().filter(|x| x.endpoint == "slow").cloned().collect();
        let closed: Vec<_> = a
            .iter()
            .filter(|x| x.endpoint == "closed")
            .cloned()
            .collect();
        if !slow.is_empty() && !closed.is_empty() {
            return Ok((slow[0].clone(), closed[0].clone()));
        }
        Err(format!("{a:?}"))
    })
    .await;
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
    let rx = receiver_replying(answer(200)).await;
    rx.push(Reply::Big(500, 10 * 1024 * 1024));
    rx.push(Reply::Trickle(503, Duration::from_millis(50)));
    rx.push(Reply::Trickle(200, Duration::from_millis(50)));
    let o = Outbox::new(&[endpoint("shop", &rx.url).timeout("1s")], 1).await;
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
        DeliveryStatus::Delivered,
        "a 2xx came back, even if its body trickled"
    );
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_disable_after_is_disabled_with_an_alert() {
    let rx = receiver_replying(answer(500)).await;
    let o = Outbox::new(&[endpoint("shop", &rx.url).disable_after("1h")], 1).await;
    for i in 0..4 {
        o.attempts(0, i + 1).await;
        o.set_clock(o.next_attempt(0));
    }
    // Attempts at 0, ~5s, ~5m and ~35m fail; the one after the ~30m wait is past the hour... or not yet.
    wait_until("the endpoint to be disabled", WAIT, || {
        if !o.store().endpoint_enabled("shop").unwrap() {
            return true;
        }
        o.set_clock(o.next_attempt(0));
        false
    })
    .await;
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
    let rx = receiver_holding(Duration::from_millis(400)).await;
    let o = Outbox::new(
        &[endpoint("bulk", &rx.url).ordered(false).concurrency(4)],
        12,
    )
    .await;
    for i in 0..12 {
        o.attempts(i, 1).await;
    }
    assert_eq!(rx.max_in_flight(), 4, "exactly `concurrency` at once");
    let rows = o.store().list_deliveries(None, None, 100).unwrap();
    assert!(rows
        .iter()
        .all(|r| r.status == DeliveryStatus::Delivered && r.attempts == 1));
    o.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_slow_a_healthy_one() {
    let stuck = receiver_holding(Duration::from_secs(30)).await;
    let healthy = receiver_replying(answer(204)).await;
    let endpoints = [
        endpoint("stuck", &stuck.url).timeout("30s"),
        endpoint("healthy", &healthy.url),
    ];
    let began = std::time::Instant::now();
    let o = Outbox::new(&endpoints, 20).await;
    wait_for(
        "20 requests at the healthy endpoint",
        Duration::from_secs(10),
        || match healthy.count() {
            20.. => Ok(()),
            n => Err(format!("healthy endpoint got {n}")),
        },
    )
    .await;
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "healthy endpoint served in {:?}",
        began.elapsed()
    );
    // Its worker may reach the first request a moment after the healthy one finished.
    wait_until(
        "the stuck endpoint's first request",
        Duration::from_secs(5),
        || stuck.count() > 0,
    )
    .await;
    assert_eq!(stuck.count(), 1, "the stuck one holds its ordered head");
    let seqs: Vec<i64> = healthy
        .all()
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
fn python_verifies(secret: &str, r: &Captured) -> Option<bool> {
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
    let rx = receiver_replying(answer(204)).await;
    let rotating = Endpoint::new("rot", &rx.url).secrets([NEW, SECRET]);
    // Real time: verifiers reject timestamps more than five minutes off.
    let o = Outbox::new_at(&[rotating], 3, chainwatch::daemon::now_ms()).await;
    o.attempts(2, 1).await;
    o.stop().await;
    let requests = rx.all();
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
