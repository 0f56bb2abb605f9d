//! What follows from recorded attempts: alerts (exhausted, disabled, failing), disabling an
//! endpoint, and the endpoint's back-off. Runs on a blocking thread with the worker's store,
//! in the same transaction as the attempts it follows from.

use std::time::Duration;

use serde_json::json;

use super::http::jitter;
use crate::changeset::ChangeSet;
use crate::config::EndpointConfig;
use crate::delivery::EndpointChanges;
use crate::event::{self, NewEvent};
use crate::store::{AttemptOutcome, DeliveryResult, DueDelivery, OutboxStore, StoreError};

/// Alerts and endpoint disabling that follow from recorded attempts; true if anything was
/// recorded (the workers are woken for it).
pub fn after_attempts<St: OutboxStore>(
    store: &mut St,
    ep: &EndpointConfig,
    done: &[(DueDelivery, AttemptOutcome)],
    now: i64,
) -> Result<bool, StoreError> {
    let mut alerts = Vec::new();
    let mut disable = None;
    for (d, o) in done {
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
            }
        }
    }
    let state = store.endpoint_state(&ep.name)?;
    let mut failing_alert = false;
    // Identity of a disabling: the failing spell it ends, so a batch finishing after it (or a
    // retried record) cannot raise it twice.
    let mut disabled_identity = format!("{}|410|{now}", ep.name);
    if let Some(since) = state.failing_since {
        let failing_for = now - since;
        if disable.is_none() && failing_for >= ep.disable_after.as_millis() as i64 {
            disable = Some(format!(
                "no successful delivery for {}s",
                ep.disable_after.as_secs()
            ));
            disabled_identity = format!("{}|failing|{since}", ep.name);
        }
        if !state.failing_alerted && failing_for >= ep.failing_after.as_millis() as i64 {
            tracing::warn!(endpoint = %ep.name, failing_s = failing_for / 1000, "every delivery has failed for longer than failing_after");
            let last_error = done.iter().rev().find_map(|(_, o)| o.error.clone());
            let fields = json!({
                "endpoint": ep.name, "since": event::rfc3339_ms(since),
                "failing_seconds": failing_for / 1000, "last_error": last_error,
            });
            alerts.push(alert(
                event::ALERT_ENDPOINT_FAILING,
                &format!("{}|{since}", ep.name),
                fields,
            ));
            failing_alert = true;
        }
    }
    if !state.enabled {
        disable = None;
    }
    if let Some(reason) = &disable {
        alerts.push(alert(
            event::ALERT_ENDPOINT_DISABLED,
            &disabled_identity,
            json!({ "endpoint": ep.name, "reason": reason }),
        ));
        tracing::error!(endpoint = %ep.name, %reason, "endpoint disabled; `chainwatch endpoints enable {}` resumes it", ep.name);
    }
    // The endpoint is disabled in the same transaction as its alert: no one sees one without
    // the other, and a crash loses neither.
    let recorded = record_alerts(store, alerts, disable.map(|r| (ep.name.clone(), r)), now)?;
    if failing_alert {
        store.set_failing_alerted(&ep.name)?;
    }
    Ok(recorded)
}

/// Updates the endpoint's back-off after attempts: any answer ends it; a refused connection
/// or a timeout with no answer starts or lengthens it. Returns the new step when it changed.
pub fn update_backoff<St: OutboxStore>(
    store: &mut St,
    ep: &EndpointConfig,
    done: &[(DueDelivery, AttemptOutcome)],
    now: i64,
) -> Result<Option<u32>, StoreError> {
    let state = store.endpoint_state(&ep.name)?;
    let step = if done.iter().any(|(_, o)| o.status_code.is_some()) {
        0
    } else {
        // Only a probe (an attempt started once the current step was over) lengthens the
        // back-off: the other requests of the burst that started it tell nothing new.
        let counts = done.iter().any(|(_, o)| {
            o.status_code.is_none() && state.backoff_until.is_none_or(|u| o.started_at_ms >= u)
        });
        if !counts {
            return Ok(None);
        }
        state.backoff_step + 1
    };
    if step == state.backoff_step {
        return Ok(None);
    }
    let until = (step > 0).then(|| {
        let i = (step as usize - 1).min(ep.retry_schedule.len().saturating_sub(1));
        let base = ep
            .retry_schedule
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(5));
        now + base.mul_f64(jitter()).as_millis() as i64
    });
    store.set_endpoint_backoff(&ep.name, step, until)?;
    Ok(Some(step))
}

/// `alert.store_error` for an incident that lasted `seconds`, recorded once the store takes
/// writes again.
pub fn store_error_alert(since_ms: i64, error: &str, seconds: u64, who: &str) -> NewEvent {
    alert(
        event::ALERT_STORE_ERROR,
        &format!("store|{since_ms}"),
        json!({
            "since": event::rfc3339_ms(since_ms), "error": error,
            "seconds": seconds, "component": who,
        }),
    )
}

/// This instance took the leader lease (`epoch`) from `previous` (its holder), if anyone held it.
pub fn leader_changed_alert(epoch: i64, instance: &str, previous: Option<&str>) -> NewEvent {
    alert(
        event::ALERT_LEADER_CHANGED,
        &format!("leader|{epoch}"),
        json!({ "epoch": epoch, "instance": instance, "previous_instance": previous }),
    )
}

/// Records alerts (only those some endpoint asks for) and an endpoint disabling together.
pub fn record_alerts<St: OutboxStore>(
    store: &mut St,
    alerts: Vec<NewEvent>,
    disable_endpoint: Option<(String, String)>,
    now: i64,
) -> Result<bool, StoreError> {
    let wanted: Vec<NewEvent> = alerts.into_iter().filter(|a| store.wants(a.kind)).collect();
    // Asked after every batch of attempts, which almost never raises an alert: nothing is
    // read then.
    if wanted.is_empty() && disable_endpoint.is_none() {
        return Ok(false);
    }
    let network = store.network()?;
    let events: Vec<NewEvent> = wanted
        .into_iter()
        .map(|mut a| {
            a.data.insert("network".into(), json!(network));
            a
        })
        .collect();
    let endpoints = disable_endpoint
        .map(|(name, reason)| EndpointChanges::disable(&name, &reason))
        .unwrap_or_default();
    store.commit(
        &ChangeSet {
            endpoints,
            ..ChangeSet::events(events)
        },
        now,
    )?;
    Ok(true)
}

fn alert(kind: &'static str, identity: &str, fields: serde_json::Value) -> NewEvent {
    let serde_json::Value::Object(map) = fields else {
        unreachable!("alert fields are an object")
    };
    event::other_event(kind, identity, "", map)
}
