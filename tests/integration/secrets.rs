//! Secrets never show, environment proxies are never used, and hostile clients cannot starve
//! the admin API.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::trust::cli;

const URL_USER: &str = "leakuser";
const URL_PASSWORD: &str = "urlpass-s3cr3t";
const QUERY_TOKEN: &str = "query-s3cr3t";
const API_TOKEN: &str = "api-token-s3cr3t-0123456789abcdef-xyz";
const PROXY_PASSWORD: &str = "proxypass-s3cr3t";
/// base64 of "leaky endpoint secret 32 bytes!!"
const LEAKY_SECRET_B64: &str = "bGVha3kgZW5kcG9pbnQgc2VjcmV0IDMyIGJ5dGVzISE=";

fn haystack_of_files(paths: &[std::path::PathBuf]) -> String {
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listing_log_line_stored_error_or_api_answer_shows_a_secret() {
    let closed = free_port();
    let port = free_port();
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], |c| {
        c.map_endpoint(SHOP, |e| e.events(["*"]))
            .endpoint(
                Endpoint::new(
                    "leaky",
                    &format!("https://{URL_USER}:{URL_PASSWORD}@localhost:{closed}/hooks?token={QUERY_TOKEN}"),
                )
                .secret(&format!("whsec_{LEAKY_SECRET_B64}"))
                .events(["*"])
                .retry_schedule(["200ms"; 4]),
            )
            .api(Api::listen(&format!("127.0.0.1:{port}")).token(API_TOKEN))
    })
    .await;
    let cookie = std::fs::read_to_string(h.node.cookie_path()).unwrap();
    let cookie_password = cookie.trim().split_once(':').unwrap().1.to_string();
    // A proxy that must stay unused: a receiver, counting who connects.
    let proxy = Receiver::start().await;
    let proxy_url = format!("http://proxyuser:{PROXY_PASSWORD}@{}", proxy.addr);
    let log = h.dir.path().join("chainwatch.log");
    let _daemon = KillOnDrop(h.spawn_binary_logged(
        &log,
        &[
            ("CHAINWATCH_LOG", "debug"),
            ("HTTP_PROXY", &proxy_url),
            ("HTTPS_PROXY", &proxy_url),
            ("ALL_PROXY", &proxy_url),
            ("http_proxy", &proxy_url),
            ("https_proxy", &proxy_url),
        ],
    ));
    h.wait_synced().await;
    h.node.pay(P2WPKH, 30_000);
    h.receiver.wait_accepted(1, WAIT).await;
    wait_until("the leaky endpoint's failed attempts", WAIT, || {
        h.store()
            .list_deliveries(None, Some("leaky"), 10)
            .unwrap()
            .iter()
            .any(|d| d.attempts >= 2)
    })
    .await;

    let mut seen = Vec::new();
    for args in [
        vec!["endpoints", "list"],
        vec!["endpoints", "list", "--json"],
        vec!["deliveries", "list"],
        vec!["deliveries", "list", "--json"],
        vec!["deliveries", "list", "--status", "failed"],
        vec!["events", "list"],
        vec!["events", "list", "--json"],
        vec!["watch", "list"],
        vec!["watch", "list", "--json"],
        vec!["audit", "verify"],
        vec!["audit", "head"],
        vec!["check"],
    ] {
        let (code, out, err) = cli(&h, &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        if args.contains(&"--json") {
            for line in out.lines() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{args:?}: a line that is not JSON ({e}): {line}"));
                assert!(v.is_object() || v.is_array(), "{args:?}: {line}");
            }
            assert!(!out.trim().is_empty(), "{args:?} printed nothing");
        }
        seen.push((
            format!("chainwatch {}", args.join(" ")),
            format!("{out}{err}"),
        ));
    }
    let http = http_client();
    for path in [
        "/health",
        "/metrics",
        "/v1/watches",
        "/v1/events?after=0",
        "/v1/deliveries",
        "/v1/deliveries?status=failed",
    ] {
        let resp = http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        seen.push((format!("GET {path}"), resp.text().await.unwrap()));
    }
    let db = chainwatch::store::db_path(&h.data_dir());
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    seen.push((
        "the database files".into(),
        haystack_of_files(&[db, wal.into()]),
    ));
    seen.push(("the log (debug level)".into(), haystack_of_files(&[log])));

    let secrets = [
        URL_PASSWORD,
        QUERY_TOKEN,
        URL_USER,
        API_TOKEN,
        PROXY_PASSWORD,
        LEAKY_SECRET_B64,
        &SECRET["whsec_".len()..],
        &cookie_password,
    ];
    for (place, text) in &seen {
        for s in secrets {
            assert!(!text.contains(s), "{place} shows the secret {s:?}:\n{text}");
        }
    }
    let listing = &seen[0].1;
    assert!(
        listing.contains("https://***@localhost") && listing.contains("token=***"),
        "endpoints list shows the URL redacted: {listing}"
    );
    let stored = &seen
        .iter()
        .find(|(p, _)| p == "GET /v1/deliveries?status=failed")
        .unwrap()
        .1;
    assert!(
        stored.contains("onnection refused"),
        "the stored error still says what happened: {stored}"
    );
    assert_eq!(
        proxy.connections(),
        0,
        "the environment's proxy was never contacted"
    );
}

#[test]
fn config_refusals_never_echo_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = |extra: &str| {
        format!("[[endpoints]]\nname = \"shop\"\nurl = \"https://h.example/x\"\n{extra}\n")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "secret of the wrong type",
            endpoint("secret = 918273645546372819"),
            "918273645546372819",
        ),
        (
            "secret too short",
            endpoint("secret = \"whsec_c2hvcnRzZWNyZXQ=\""),
            "c2hvcnRzZWNyZXQ",
        ),
        (
            "secret without prefix",
            endpoint("secret = \"sk_live_9f8e7d6c5b4a\""),
            "9f8e7d6c5b4a",
        ),
        (
            "secret with a bad character",
            endpoint("secret = \"whsec_abc!defghijklmnopqrstuvwxyzABCDEFG\""),
            "defghijklmnop",
        ),
        (
            "unterminated secret",
            endpoint("secret = \"whsec_unterminatedsecretvalue"),
            "unterminatedsecretvalue",
        ),
        (
            "rpc password of the wrong type",
            "[bitcoind]\nrpc_user = \"u\"\nrpc_password = 55443322110099\n".into(),
            "55443322110099",
        ),
        (
            "endpoint URL with credentials and a bad scheme",
            "[[endpoints]]\nname = \"shop\"\nurl = \"ftp://bob:ftppass-s3cr3t@h.example/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n".into(),
            "ftppass-s3cr3t",
        ),
        (
            "plain http with a query token",
            "[[endpoints]]\nname = \"shop\"\nurl = \"http://h.example/x?token=qtok-s3cr3t\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n".into(),
            "qtok-s3cr3t",
        ),
        (
            "proxy of another scheme",
            endpoint("secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nproxy = \"socks5://u:sockspass-s3cr3t@h:1\""),
            "sockspass-s3cr3t",
        ),
        (
            "API token too short",
            "[api]\ntoken = \"tok-s3cr3t-short\"\n".into(),
            "tok-s3cr3t-short",
        ),
        (
            "rpc_url with credentials, not a URL",
            "[bitcoind]\nrpc_url = \"http://u:rpcpass-s3cr3t@[::1\"\n".into(),
            "rpcpass-s3cr3t",
        ),
    ];
    for (what, text, secret) in cases {
        let path = dir.path().join("watcher.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("CHAINWATCH_API_TOKEN")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: refused");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line: {err}");
        assert!(
            err.contains("watcher.toml") || err.contains("config key"),
            "{what}: {err}"
        );
        assert!(
            !err.contains(secret),
            "{what}: the refusal shows {secret:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_a_refused_address_delay_neither_health_nor_deliveries() {
    let port = free_port();
    let h = Harness::with(&[watch(P2WPKH, 1, "shop")], |c| {
        c.api(
            Api::listen(&format!("127.0.0.1:{port}"))
                .token(API_TOKEN)
                .allow_ips(["127.0.0.1/32"]),
        )
    })
    .await;
    // 320 descriptors: the 300 connections below would leave none for deliveries if they
    // were kept open.
    let daemon = KillOnDrop(h.spawn_binary_fd_limited(320));
    h.wait_synced().await;
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", daemon.0.id())).map_or(0, |d| d.count());
    let before = fds();

    // 300 connections from 127.0.0.2 (outside allow_ips) that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..300 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(
            s.connect(format!("127.0.0.1:{port}").parse().unwrap())
                .await
                .unwrap(),
        );
    }
    // Give the accept loop time to take all of them in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = fds();
    assert!(
        during < before + 100,
        "the daemon holds {during} descriptors with 300 refused clients idle (was {before})"
    );
    let http = http_client();
    let began = Instant::now();
    let resp = http
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .expect("/health answers");
    assert_eq!(resp.status(), 200);
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "/health answered in {:?}",
        began.elapsed()
    );
    let began = Instant::now();
    let txid = h.node.pay(P2WPKH, 20_000).to_string();
    let got = h.receiver.wait_accepted(1, WAIT).await;
    assert_eq!(history(&got, &txid), expect_history(&[("tx.pending", 0)]));
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "delivered in {:?} beside 300 idle connections",
        began.elapsed()
    );
    // Refused connections are answered and closed within a second (or closed unanswered
    // while 64 are already being refused); after that, a refused client that speaks gets 403.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = s
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await;
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("127.0.0.2 is not in api.allow_ips"),
        "{answer}"
    );
    drop(idle);
}
