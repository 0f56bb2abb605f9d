//! The dispatcher: one worker per endpoint reads due deliveries from the outbox, POSTs them with
//! Standard Webhooks headers and records every attempt. Ordered endpoints have one request in
//! flight; unordered ones up to `concurrency`. A slow or dead endpoint delays only itself.

mod http;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use http::{attempt, jitter, judge, system_clock, Clock, Response, Sender, SenderError};
pub use http::{MAX_RESPONSE_READ, MAX_RESPONSE_STORED, MAX_RETRY_AFTER, MIN_BACKOFF_THROTTLED};

use crate::config::EndpointConfig;
use crate::event;
use crate::metrics::Metrics;
use crate::store::{AttemptOutcome, DeliveryResult, DueDelivery, Store, StoreError};
use crate::tracker::ChainStep;

/// Delivers one endpoint's queue until shutdown; requests in flight then finish and are
/// recorded before it returns.
pub async fn run_endpoint(
    ep: EndpointConfig,
    mut store: Store,
    wake: Arc<Notify>,
    clock: Clock,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    store.relax_durability()?;
    let sender = match Sender::new(&ep) {
        Ok(s) => s,
        Err(e) => {
            // The daemon built this client once before starting workers, so this cannot happen
            // with the same config; if it does, say it and wait for shutdown.
            tracing::error!(error = %e, "delivery worker cannot start");
            shutdown.cancelled().await;
            return Ok(());
        }
    };
    let capacity = if ep.ordered {
        1
    } else {
        ep.concurrency as usize
    };
    let mut in_flight = FuturesUnordered::new();
    let mut in_flight_ids: HashSet<i64> = HashSet::new();
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let stopping = shutdown.is_cancelled();
        if stopping && in_flight.is_empty() {
            return Ok(());
        }
        let now = clock();
        if !stopping && in_flight.len() < capacity && store.endpoint_enabled(&ep.name)? {
            let limit = (capacity + in_flight_ids.len()) as u32;
            for d in store.due_deliveries(&ep.name, now, ep.ordered, limit)? {
                if in_flight.len() >= capacity {
                    break;
                }
                if in_flight_ids.insert(d.delivery_id) {
                    let (sender, ep, clock) = (&sender, &ep, &clock);
                    in_flight.push(async move {
                        let o = attempt(sender, ep, &d, clock).await;
                        (d, o)
                    });
                }
            }
        }
        // With requests in flight their completion wakes us; idle, the next due time does.
        let wait = if in_flight.is_empty() {
            match store.next_due(&ep.name, ep.ordered)? {
                Some(t) => Duration::from_millis((t - now).clamp(5, 1000) as u64),
                None => Duration::from_secs(1),
            }
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                // Record everything that finished together in one transaction.
                let mut done = vec![first];
                while let Some(Some(more)) = in_flight.next().now_or_never() {
                    done.push(more);
                }
                for (d, o) in &done {
                    in_flight_ids.remove(&d.delivery_id);
                    log_outcome(&ep.name, d, o);
                    metrics.delivery(&ep.name, outcome_name(o, d, &metrics));
                }
                store.record_attempts(&ep.name, &done)?;
                for (d, o) in &done {
                    after_attempt(&mut store, &ep, d, o, clock(), &wake)?;
                }
            }
            _ = shutdown.cancelled(), if !stopping => {}
            _ = &mut notified, if !stopping => {}
            _ = tokio::time::sleep(wait), if !stopping => {}
        }
    }
}

/// The metrics label of an attempt's outcome; a success also feeds the latency histogram.
fn outcome_name(o: &AttemptOutcome, d: &DueDelivery, metrics: &Metrics) -> &'static str {
    match o.result {
        DeliveryResult::Delivered => {
            let done = o.started_at_ms + o.duration_ms;
            metrics.delivery_latency((done - d.created_at).max(0) as f64 / 1000.0);
            "delivered"
        }
        DeliveryResult::RetryAt(_) => "failed",
        DeliveryResult::Dead => "dead",
        DeliveryResult::EndpointGone => "gone",
    }
}

/// Alerts and endpoint disabling that follow from an attempt.
fn after_attempt(
    store: &mut Store,
    ep: &EndpointConfig,
    d: &DueDelivery,
    o: &AttemptOutcome,
    now: i64,
    wake: &Notify,
) -> Result<(), StoreError> {
    let mut alerts = Vec::new();
    let mut disable = None;
    match o.result {
        DeliveryResult::Delivered => {}
        DeliveryResult::EndpointGone => disable = Some("410 Gone".to_string()),
        DeliveryResult::Dead | DeliveryResult::RetryAt(_) => {
            // Alerts about failed alerts would feed on themselves.
            if o.result == DeliveryResult::Dead && !d.kind.starts_with("alert.") {
                tracing::error!(endpoint = %ep.name, event = %d.event_id, "delivery exhausted its retry schedule");
                let fields = json!({
                    "endpoint": ep.name, "event_id": d.event_id, "event_type": d.kind,
                    "attempts": d.attempts + 1, "last_error": o.error,
                });
                alerts.push(alert(
                    event::ALERT_DELIVERY_EXHAUSTED,
                    &format!("{}|{}|{}", ep.name, d.event_id, o.started_at_ms),
                    fields,
                ));
            }
            if let Some(since) = store.failing_since(&ep.name)? {
                if now - since >= ep.disable_after.as_millis() as i64 {
                    disable = Some(format!(
                        "no successful delivery for {}s",
                        ep.disable_after.as_secs()
                    ));
                }
            }
        }
    }
    if let Some(reason) = &disable {
        alerts.push(disabled_alert(&ep.name, reason, now));
        tracing::error!(endpoint = %ep.name, %reason, "endpoint disabled; `chainwatch endpoints enable {}` resumes it", ep.name);
    }
    let network = store.network()?;
    let wanted: Vec<event::NewEvent> = alerts
        .into_iter()
        .filter(|a| store.wants(a.kind))
        .map(|mut a| {
            a.data.insert("network".into(), json!(network));
            a
        })
        .collect();
    // The endpoint is disabled in the same transaction as its alert: no one sees one without
    // the other, and a crash loses neither.
    let disable_endpoint = disable.map(|reason| (ep.name.clone(), reason));
    if !wanted.is_empty() || disable_endpoint.is_some() {
        store.apply(
            &ChainStep {
                events: wanted,
                disable_endpoint,
                ..ChainStep::empty()
            },
            now,
        )?;
        wake.notify_waiters();
    }
    Ok(())
}

fn disabled_alert(endpoint: &str, reason: &str, now: i64) -> event::NewEvent {
    let fields = json!({ "endpoint": endpoint, "reason": reason });
    alert(
        event::ALERT_ENDPOINT_DISABLED,
        &format!("{endpoint}|{now}"),
        fields,
    )
}

fn alert(kind: &'static str, identity: &str, fields: serde_json::Value) -> event::NewEvent {
    let serde_json::Value::Object(map) = fields else {
        unreachable!("alert fields are an object")
    };
    event::other_event(kind, identity, "", map)
}

fn log_outcome(endpoint: &str, d: &DueDelivery, o: &AttemptOutcome) {
    match o.result {
        DeliveryResult::Delivered => tracing::info!(
            endpoint, event = %d.event_id, seq = d.event_seq, status = o.status_code, ms = o.duration_ms, "delivered"
        ),
        DeliveryResult::RetryAt(t) => tracing::warn!(
            endpoint, event = %d.event_id, attempt = d.attempts + 1, error = o.error.as_deref().unwrap_or(""),
            retry_in_s = (t - o.started_at_ms) / 1000, "delivery failed; will retry"
        ),
        DeliveryResult::Dead => {
            tracing::error!(endpoint, event = %d.event_id, attempts = d.attempts + 1, "delivery dead")
        }
        DeliveryResult::EndpointGone => {
            tracing::error!(endpoint, "endpoint answered 410 Gone; disabled")
        }
    }
}
