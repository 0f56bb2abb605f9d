//! The dispatcher: one worker per endpoint reads due deliveries from the outbox, POSTs them with
//! Standard Webhooks headers and records every attempt. Ordered endpoints have one request in
//! flight; unordered ones up to `concurrency`. A slow or dead endpoint delays only itself, and
//! one that refuses connections waits as a whole (one probe at a time).

pub mod alerts;
mod http;
mod worker;

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::health::STORE_ALERT_AFTER;
pub use http::{attempt, jitter, judge, system_clock, Clock, Response, Sender, SenderError};
pub use http::{MAX_RESPONSE_READ, MAX_RESPONSE_STORED, MAX_RETRY_AFTER, MIN_BACKOFF_THROTTLED};

use crate::config::EndpointConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::{
    AttemptOutcome, DeliveryResult, DueDelivery, Handoff, OutboxStore, SharedStore,
};

/// What every delivery worker shares.
#[derive(Clone)]
pub struct Context {
    /// Notified when events are committed (and when a worker records alerts).
    pub wake: Arc<Notify>,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: CancellationToken,
    /// Where commits hand deliveries straight to the workers (SQLite's follower only).
    pub handoff: Arc<Handoff>,
}

impl Context {
    /// Real time, fresh metrics and health, a shutdown token of its own.
    pub fn new(wake: Arc<Notify>, shutdown: CancellationToken) -> Context {
        Context {
            wake,
            clock: system_clock(),
            metrics: Arc::default(),
            health: Arc::default(),
            shutdown,
            handoff: Arc::default(),
        }
    }
}

/// Delivers one endpoint's queue until shutdown; requests in flight then finish and are
/// recorded before it returns. Store, network and endpoint faults are retried, never fatal.
pub async fn run_endpoint<St: OutboxStore>(ep: EndpointConfig, store: St, ctx: Context) {
    let sender = match Sender::new(&ep) {
        Ok(s) => s,
        Err(e) => {
            // The daemon built this client once before starting workers, so this cannot happen
            // with the same config; if it does, say it and wait for shutdown.
            tracing::error!(error = %e, "delivery worker cannot start");
            ctx.health
                .worker_ended(&format!("dispatch:{}", ep.name), &e.to_string());
            ctx.shutdown.cancelled().await;
            return;
        }
    };
    worker::Worker::new(ep, sender, SharedStore::new(store), ctx)
        .run()
        .await
}

/// The metrics label of an attempt's outcome; a success also feeds the latency histogram.
pub(crate) fn outcome_name(o: &AttemptOutcome, d: &DueDelivery, metrics: &Metrics) -> &'static str {
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

pub(crate) fn log_outcome(endpoint: &str, d: &DueDelivery, o: &AttemptOutcome) {
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
