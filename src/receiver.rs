//! A local webhook receiver that verifies Standard Webhooks signatures: `chainwatch receive`
//! and the demo's built-in endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use tokio::sync::mpsc;

use crate::sign::{self, Secret};

/// One request as it arrived, with the verdict on its signature.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub body: String,
    pub verdict: Result<(), String>,
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Serves on `listener` until the task is dropped; each request goes to `out`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    secrets: Vec<Secret>,
    out: mpsc::UnboundedSender<Received>,
) {
    let secrets = Arc::new(secrets);
    let handler = move |headers: HeaderMap, body: Bytes| {
        let secrets = secrets.clone();
        let out = out.clone();
        async move {
            let r = Received {
                id: header(&headers, "webhook-id"),
                timestamp: header(&headers, "webhook-timestamp"),
                body: String::from_utf8_lossy(&body).into_owned(),
                verdict: sign::verify(
                    &secrets,
                    &header(&headers, "webhook-id"),
                    &header(&headers, "webhook-timestamp"),
                    &header(&headers, "webhook-signature"),
                    &body,
                    chrono_now(),
                    sign::DEFAULT_TOLERANCE_SECS,
                )
                .map_err(|e| e.to_string()),
            };
            let status = if r.verdict.is_ok() {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::UNAUTHORIZED
            };
            let _ = out.send(r);
            status
        }
    };
    let app = Router::new().fallback(post(handler));
    let _ = axum::serve(listener, app).await;
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// One line describing a received webhook, for people.
pub fn describe(r: &Received) -> String {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    let d = &v["data"];
    let mark = if r.verdict.is_ok() {
        "verified"
    } else {
        "REJECTED"
    };
    let kind = v["type"].as_str().unwrap_or("?");
    let mut line = format!("{mark} #{:<3} {:<16} {}", d["sequence"], kind, r.id);
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
    }
    if let Err(e) = &r.verdict {
        line.push_str(&format!(" — {e}"));
    }
    line
}
