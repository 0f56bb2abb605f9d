//! The admin API's accept loop. The source address is checked the moment a connection is
//! accepted, before a byte of it is read; request headers must arrive within
//! `HEADER_TIMEOUT`; at most `MAX_CONNECTIONS` are served at once, so idle or hostile clients
//! cannot take the file descriptors that deliveries need.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::IpNet;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The accept loop's limits (the constants above, but for tests).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}
/// Refused connections being answered at once (each lingers at most twice `REFUSE_LINGER`);
/// beyond that they are closed unanswered, so a flood of them holds few file descriptors.
const MAX_REFUSING: usize = 64;
const REFUSE_LINGER: Duration = Duration::from_millis(500);

/// Serves `app` until `shutdown`; requests in progress then finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    allow: Arc<Vec<IpNet>>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let serving = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let tasks = TaskTracker::new();
    let mut accept_failing = false;
    loop {
        let permit = tokio::select! {
            p = serving.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                accept_failing = false;
                a
            }
            Err(e) => {
                // Out of file descriptors, usually: say it once, wait, and go on.
                if !accept_failing {
                    tracing::warn!(error = %e, "admin API cannot accept connections; retrying");
                    accept_failing = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !allow.iter().any(|n| n.contains(peer.ip())) {
            drop(permit);
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tasks.spawn(async move {
                    refuse(stream, peer).await;
                    drop(p);
                });
            }
            continue;
        }
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tasks.spawn(async move {
            serve_connection(stream, peer, app, limits.header_timeout, shutdown).await;
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Answers 403 without reading the request, then closes. What the client already sent is
/// discarded for a moment first, so the close is a clean FIN rather than a reset that could
/// swallow the answer.
async fn refuse(mut stream: TcpStream, peer: SocketAddr) {
    let body = format!("{{\"error\":\"{} is not in api.allow_ips\"}}", peer.ip());
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // The verdict is already made; waiting for the request to arrive (peeking, not reading:
    // readiness alone can be spurious) keeps HTTP clients from seeing an answer before they asked.
    let mut first = [0u8; 1];
    let _ = tokio::time::timeout(REFUSE_LINGER, stream.peek(&mut first)).await;
    let _ = stream.try_write(answer.as_bytes());
    // Shuts the write half (FIN); it does not wait for the peer.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        let mut total = 0usize;
        while let Ok(n) = stream.read(&mut sink).await {
            total += n;
            if n == 0 || total > 64 * 1024 {
                break;
            }
        }
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            async move { app.call(req.map(axum::body::Body::new)).await }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "admin API connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(15), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    async fn start(allow: &str, limits: Limits) -> (SocketAddr, CancellationToken) {
        crate::net::install_crypto_provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/health", get(|| async { "ok" }));
        let allow = Arc::new(vec![allow.parse::<IpNet>().unwrap()]);
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, app, allow, limits, shutdown.clone()));
        (addr, shutdown)
    }

    async fn health(addr: SocketAddr) -> reqwest::Result<reqwest::StatusCode> {
        let resp = reqwest::Client::new()
            .get(format!("http://{addr}/health"))
            .send()
            .await?;
        Ok(resp.status())
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_header_timeout() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
        };
        let (addr, stop) = start("127.0.0.1/32", limits).await;
        // Two silent clients take both places; a third waits until one is timed out.
        let idle: Vec<TcpStream> = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        let began = std::time::Instant::now();
        assert_eq!(
            health(addr).await.unwrap(),
            200,
            "served once a place frees"
        );
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "waited {waited:?}: the silent clients held the places until their header timeout"
        );
        for mut s in idle {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                .await
                .expect("the server closed the silent connection")
                .unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(
                n == 0 || text.starts_with("HTTP/1.1 408"),
                "closed: {text:?}"
            );
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn refused_sources_take_no_place_from_allowed_ones() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(10),
        };
        // Everything on loopback is 127.0.0.1 here, so refuse 127.0.0.1 and allow nobody:
        // the refused connections must not use up the two places.
        let (addr, stop) = start("10.0.0.0/8", limits).await;
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let began = std::time::Instant::now();
        assert_eq!(health(addr).await.unwrap(), 403);
        assert!(
            began.elapsed() < Duration::from_millis(900),
            "answered at once despite 50 idle refused connections ({:?})",
            began.elapsed()
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_refused_source_gets_403_from_the_accept_loop() {
        let (addr, stop) = start("10.0.0.0/8", Limits::default()).await;
        for i in 0..20 {
            let resp = reqwest::Client::new()
                .get(format!("http://{addr}/health"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("request {i}: an answer, not a reset: {e:?}"));
            assert_eq!(resp.status(), 403);
            let body = resp.text().await.unwrap();
            assert!(body.contains("127.0.0.1 is not in api.allow_ips"), "{body}");
        }
        stop.cancel();
    }
}
