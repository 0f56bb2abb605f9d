//! The admin HTTP API (`api.listen`). Requests from outside `api.allow_ips` get 403 before
//! anything else is read; every route but `/health` needs `Authorization: Bearer <token>`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bitcoin::Network;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod listen;

pub use listen::{HEADER_TIMEOUT, MAX_CONNECTIONS};

use crate::config::ApiConfig;
use crate::delivery::DeliveryStatus;
use crate::health::Health;
use crate::metrics::Metrics;
pub use crate::net::IpNet;
use crate::store::{AdminStore, SharedStore};
use crate::watch::check_metadata;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

struct Api<St> {
    store: SharedStore<St>,
    health: Arc<Health>,
    token: Option<String>,
    allow: Arc<Vec<IpNet>>,
    metrics: Arc<Metrics>,
    rules: Arc<WatchRules>,
}

/// What a watch added through the API is checked against and completed with.
pub struct WatchRules {
    pub network: Network,
    pub default_confirmations: u32,
    /// The configured endpoints' names: a watch may route its events to these only.
    pub endpoints: Vec<String>,
}

impl<St> Clone for Api<St> {
    fn clone(&self) -> Self {
        Api {
            store: self.store.clone(),
            health: self.health.clone(),
            token: self.token.clone(),
            allow: self.allow.clone(),
            metrics: self.metrics.clone(),
            rules: self.rules.clone(),
        }
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// Equal-time comparison of hashes, so the response time says nothing about the token.
fn token_matches(given: &str, expected: &str) -> bool {
    use bitcoin::hashes::{sha256, Hash};
    let a = sha256::Hash::hash(given.as_bytes()).to_byte_array();
    let b = sha256::Hash::hash(expected.as_bytes()).to_byte_array();
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn guard<St: AdminStore>(
    State(api): State<Api<St>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !api.allow.iter().any(|n| n.contains(peer.ip())) {
        return error(
            StatusCode::FORBIDDEN,
            format!("{} is not in api.allow_ips", peer.ip()),
        );
    }
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let Some(expected) = api.token.as_deref() else {
        return error(
            StatusCode::UNAUTHORIZED,
            "no API token is configured (set api.token_env)",
        );
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if token_matches(t.trim(), expected) => next.run(req).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "wrong bearer token"),
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token>",
        ),
    }
}

pub fn router<St: AdminStore>(
    cfg: &ApiConfig,
    store: St,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    rules: WatchRules,
) -> Result<Router, String> {
    let allow = cfg
        .allow_ips
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map_err(|e| format!("api.allow_ips {s:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let api = Api {
        store: SharedStore::new(store),
        health,
        token: cfg.token.clone(),
        allow: Arc::new(allow),
        metrics,
        rules: Arc::new(rules),
    };
    Ok(Router::new()
        .route("/health", get(health_check::<St>))
        .route("/metrics", get(metrics_text::<St>))
        .route("/v1/watches", get(list_watches::<St>).post(add_watch::<St>))
        .route("/v1/watches/{id}", delete(remove_watch::<St>))
        .route("/v1/events", get(list_events::<St>))
        .route("/v1/events/{id}/redeliver", post(redeliver::<St>))
        .route("/v1/deliveries", get(list_deliveries::<St>))
        .route("/v1/endpoints/{name}/test", post(test_endpoint::<St>))
        .route("/v1/schemas/{kind}", get(event_schema))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(api.clone(), guard::<St>))
        .with_state(api))
}

/// Serves until `shutdown` (see `listen` for the connection limits).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    allow_ips: &[String],
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let allow = allow_ips
        .iter()
        .filter_map(|s| s.parse::<IpNet>().ok())
        .collect();
    listen::serve(
        listener,
        app,
        Arc::new(allow),
        listen::Limits::default(),
        shutdown,
    )
    .await
}

fn store_error(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"))
}

/// 200 only when the follower is at the node's tip, the store takes writes and every worker
/// runs; otherwise 503 with what is wrong.
async fn health_check<St: AdminStore>(State(api): State<Api<St>>) -> Response {
    let probe = api
        .store
        .run(|s| {
            let tip = s.tip()?;
            let writable = s.probe_write(HEALTH_WRITE_PROBE);
            Ok((tip, writable))
        })
        .await;
    let mut problems = api.health.problems();
    let tip = match probe {
        Ok((tip, writable)) => {
            if let Err(e) = writable {
                problems.push(format!("store: {e}"));
            }
            tip
        }
        Err(e) => {
            problems.push(format!("store: {e}"));
            None
        }
    };
    let node = api
        .metrics
        .node_reachable
        .load(std::sync::atomic::Ordering::Relaxed);
    let tip = tip.map(|t| json!({ "hash": t.hash.to_string(), "height": t.height }));
    let mut body = if problems.is_empty() {
        json!({ "status": "ok", "tip": tip, "node_reachable": node })
    } else {
        json!({ "status": "degraded", "problems": problems, "tip": tip, "node_reachable": node })
    };
    if let Some(role) = api.health.role() {
        body["role"] = json!(if role.leader { "leader" } else { "standby" });
        body["epoch"] = json!(role.epoch);
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// How long `/health` waits for the store's write lock before calling it refused.
/// (A large commit holds the lock for well under this.)
const HEALTH_WRITE_PROBE: std::time::Duration = std::time::Duration::from_secs(3);

async fn metrics_text<St: AdminStore>(State(api): State<Api<St>>) -> Response {
    let now = crate::event::now_ms();
    let queues = match api.store.run(move |s| s.queue_states(now)).await {
        Ok(q) => q,
        Err(e) => return store_error(e),
    };
    (
        [("content-type", "text/plain; version=0.0.4")],
        api.metrics.render(&queues),
    )
        .into_response()
}

async fn list_watches<St: AdminStore>(State(api): State<Api<St>>) -> Response {
    match api.store.run(|s| s.load_watches()).await {
        Ok(w) => Json(json!({ "watches": w })).into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewWatch {
    address: Option<String>,
    descriptor: Option<String>,
    gap_limit: Option<u32>,
    confirmations: Option<u32>,
    rescan_from: Option<u32>,
    label: Option<String>,
    metadata: Option<Value>,
    endpoints: Option<Vec<String>>,
    min_amount_sat: Option<u64>,
}

async fn add_watch<St: AdminStore>(
    State(api): State<Api<St>>,
    body: axum::body::Bytes,
) -> Response {
    let w: NewWatch = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let target = match (w.address, w.descriptor) {
        (Some(a), None) => a,
        (None, Some(d)) => d,
        _ => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "give one of address or descriptor",
            )
        }
    };
    let confirmations = w.confirmations.unwrap_or(api.rules.default_confirmations);
    if !(1..=1000).contains(&confirmations) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("confirmations {confirmations}: must be between 1 and 1000"),
        );
    }
    let metadata = w.metadata.unwrap_or(json!({}));
    if let Err(e) = check_metadata(&metadata) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, e);
    }
    let watch = match crate::watch::parse_target(
        &target,
        api.rules.network,
        w.gap_limit,
        confirmations,
        w.label,
        metadata,
    ) {
        Ok(parsed) => parsed,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    if let Some(routes) = &w.endpoints {
        let names: Vec<&str> = api.rules.endpoints.iter().map(String::as_str).collect();
        if let Err(e) = crate::watch::check_routes(routes, &names) {
            return error(StatusCode::UNPROCESSABLE_ENTITY, format!("endpoints: {e}"));
        }
    }
    let watch = watch.routed(w.endpoints, w.min_amount_sat.unwrap_or(0));
    let (to_store, rescan_from) = (watch.clone(), w.rescan_from);
    let stored = api
        .store
        .run(move |store| {
            store.upsert_watches(
                std::slice::from_ref(&to_store),
                "api",
                crate::event::now_ms(),
            )?;
            match rescan_from {
                Some(h) => store.request_rescan(&to_store.id, h).map(|_| ()),
                None => Ok(()),
            }
        })
        .await;
    match stored {
        Ok(()) => (StatusCode::CREATED, Json(json!(watch))).into_response(),
        Err(e) => store_error(e),
    }
}

async fn remove_watch<St: AdminStore>(
    State(api): State<Api<St>>,
    Path(id): Path<String>,
) -> Response {
    let wid = id.clone();
    match api.store.run(move |s| s.remove_watch(&wid)).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no watch {id}")),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

async fn list_events<St: AdminStore>(
    State(api): State<Api<St>>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit {limit}: must be between 1 and 1000"),
        );
    }
    let after = q.after.unwrap_or(0);
    let rows = match api.store.run(move |s| s.events_after(after, limit)).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let next = rows.last().map(|r| r.seq);
    let events: Vec<Value> = rows
        .iter()
        .filter_map(|r| serde_json::from_str(&r.body).ok())
        .collect();
    Json(json!({ "events": events, "next_after": next })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    status: Option<String>,
    endpoint: Option<String>,
}

async fn list_deliveries<St: AdminStore>(
    State(api): State<Api<St>>,
    q: Result<Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let status = match q.status.as_deref().map(|s| (s, DeliveryStatus::parse(s))) {
        None => None,
        Some((_, Some(status))) => Some(status),
        Some((s, None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("status {s:?}: expected pending, failed, dead, delivered or held"),
            )
        }
    };
    let endpoint = q.endpoint.clone();
    let rows = api
        .store
        .run(move |s| s.list_deliveries(status, endpoint.as_deref(), 10_000))
        .await;
    match rows {
        Ok(rows) => Json(json!({ "deliveries": rows })).into_response(),
        Err(e) => store_error(e),
    }
}

async fn redeliver<St: AdminStore>(State(api): State<Api<St>>, Path(id): Path<String>) -> Response {
    let eid = id.clone();
    let queued = api
        .store
        .run(move |s| match s.event_by_id(&eid)? {
            Some(_) => s
                .redeliver(Some(&eid), None, crate::event::now_ms())
                .map(Some),
            None => Ok(None),
        })
        .await;
    match queued {
        Ok(Some(n)) => (StatusCode::ACCEPTED, Json(json!({ "queued": n }))).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no event {id}")),
        Err(e) => store_error(e),
    }
}

/// The JSON Schema of an event type's body.
async fn event_schema(Path(kind): Path<String>) -> Response {
    match crate::schemas::schema(&kind) {
        Some(text) => ([("content-type", "application/schema+json")], text).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "no event type {kind:?} (types: {})",
                crate::schemas::kinds().collect::<Vec<_>>().join(", ")
            ),
        ),
    }
}

/// Records a `webhook.test` for one endpoint; the delivery worker sends it like any event, and
/// `GET /v1/deliveries` (or `chainwatch endpoints test`) shows the outcome.
async fn test_endpoint<St: AdminStore>(
    State(api): State<Api<St>>,
    Path(name): Path<String>,
) -> Response {
    if !api.rules.endpoints.contains(&name) {
        return error(StatusCode::NOT_FOUND, format!("no endpoint {name}"));
    }
    let recorded = api
        .store
        .run(move |s| s.record_test_event(&name, crate::event::now_ms()))
        .await;
    match recorded {
        Ok(c) => (
            StatusCode::ACCEPTED,
            Json(json!({ "event_id": c.id, "sequence": c.seq })),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_blocks() {
        let n: IpNet = "127.0.0.1/32".parse().unwrap();
        assert!(n.contains("127.0.0.1".parse().unwrap()));
        assert!(!n.contains("127.0.0.2".parse().unwrap()));
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.200.1.1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.1.2.3".parse().unwrap()),
            "v4-mapped v6"
        );
        let n: IpNet = "::1/128".parse().unwrap();
        assert!(n.contains("::1".parse().unwrap()) && !n.contains("127.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense/8".parse::<IpNet>().is_err());
    }

    #[test]
    fn tokens_compare_by_content() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cret", "s3cret2"));
        assert!(!token_matches("", "x"));
    }
}
