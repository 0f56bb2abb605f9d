//! The binary as users drive it: bad input gets one clear line and a non-zero exit.

use std::process::Command;

use crate::harness::*;

fn chainwatch(args: &[&str], dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD_ENDPOINT: &str = "[[endpoints]]\nname = \"shop\"\nurl = \"http://127.0.0.1:9/hooks\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";

#[test]
fn bad_config_values_each_get_one_line_naming_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, String, &[&str]); 8] = [
        ("unknown key", "netwerk = \"regtest\"\n".into(), &["unknown field `netwerk`", "line 1"]),
        ("wrong type", "default_confirmations = \"three\"\n".into(), &["default_confirmations", "line 1"]),
        ("bad network", "network = \"moonnet\"\n".into(), &["network", "\"moonnet\""]),
        ("address of another network", "[[watches]]\naddress = \"bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq\"\n".into(), &["watches[0].address", "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq", "regtest"]),
        ("malformed address", "[[watches]]\naddress = \"bcrt1qnotanaddress\"\n".into(), &["watches[0].address", "bcrt1qnotanaddress"]),
        ("secret without prefix", GOOD_ENDPOINT.replace("whsec_", ""), &["endpoints[0].secret", "whsec_"]),
        ("secret not base64", GOOD_ENDPOINT.replace("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_%%%%"), &["endpoints[0].secret", "base64"]),
        ("zero confirmations", "[[watches]]\naddress = \"bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp\"\nconfirmations = 0\n".into(), &["watches[0].confirmations", "0"]),
    ];
    for (what, text, needles) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        for cmd in ["check", "run"] {
            let (code, _out, err) =
                chainwatch(&[cmd, "--config", path.to_str().unwrap()], dir.path());
            assert_ne!(code, 0, "{what}: `{cmd}` must fail");
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{what}: one line, got {err:?}"
            );
            for n in needles {
                assert!(err.contains(n), "{what}: {err:?} should mention {n:?}");
            }
        }
    }
    let (code, _, err) = chainwatch(&["check", "--config", "missing.toml"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_disagrees_with_the_node_is_refused_at_start() {
    let mut h = Harness::new(&[]).await;
    h.rewrite_config(h.config.clone().network("signet"));
    let cfg = h.config_path.to_str().unwrap().to_string();
    let dir = h.dir.path().to_path_buf();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || chainwatch(&["run", "--config", &cfg], &dir))
            .await
            .unwrap();
    assert_ne!(code, 0);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("network = \"signet\"") && err.contains("\"regtest\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_node_and_its_zmq_topics() {
    let h = Harness::new(&[]).await;
    let cfg = h.config_path.to_str().unwrap().to_string();
    let dir = h.dir.path().to_path_buf();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || chainwatch(&["check", "--config", &cfg], &dir))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("chain regtest height 130"), "{out}");
    for topic in ["sequence", "rawtx", "rawblock"] {
        assert!(
            out.contains(&format!("zmq {topic}: tcp://127.0.0.1:")),
            "{topic} in {out}"
        );
    }
}

#[test]
fn verify_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let body = "{\"type\":\"tx.pending\"}";
    let now = chainwatch::daemon::now_ms() / 1000;
    let secret = chainwatch::sign::Secret::parse(SECRET).unwrap();
    let sig = secret.sign("evt_1", now, body.as_bytes());
    let run = |secret: &str, ts: i64, sig: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chainwatch"))
            .args([
                "verify",
                "--secret",
                secret,
                "--id",
                "evt_1",
                "--timestamp",
                &ts.to_string(),
                "--signature",
                sig,
            ])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(SECRET, now, &sig);
    assert!(ok && text.contains("signature valid"), "{text}");
    let (ok, text) = run(
        SECRET,
        now - 3600,
        &secret.sign("evt_1", now - 3600, body.as_bytes()),
    );
    assert!(!ok && text.contains("away from now"), "stale: {text}");
    let (ok, text) = run(
        "whsec_dGhlIG90aGVyIHNlY3JldCwgMzIgYnl0ZXMgbG9uZyE=",
        now,
        &sig,
    );
    assert!(
        !ok && text.contains("no v1 signature matches"),
        "wrong secret: {text}"
    );
    let (ok, text) = run("not-a-secret", now, &sig);
    assert!(!ok && text.contains("whsec_"), "secret format: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_cookie_is_refused_at_start_naming_the_key() {
    let mut h = Harness::new(&[]).await;
    let bad = h.dir.path().join("bad.cookie");
    std::fs::write(&bad, "no colon here").unwrap();
    let mut config = h.config.clone();
    config.bitcoind.as_mut().unwrap().cookie_file = Some(bad);
    h.rewrite_config(config);
    let cfg = h.config_path.to_str().unwrap().to_string();
    let dir = h.dir.path().to_path_buf();
    for cmd in ["run", "check"] {
        let (cfg, dir) = (cfg.clone(), dir.clone());
        let (code, _, err) =
            tokio::task::spawn_blocking(move || chainwatch(&[cmd, "--config", &cfg], &dir))
                .await
                .unwrap();
        assert_ne!(code, 0, "{cmd}");
        assert_eq!(err.trim_end().lines().count(), 1, "{cmd}: {err}");
        assert!(
            err.contains("bitcoind.cookie_file")
                && err.contains("bad.cookie")
                && err.contains("user:password"),
            "{cmd}: {err}"
        );
    }
}

/// `chainwatch demo` prints its narrative, the verified webhooks and a summary, and no log
/// lines unless asked for them.
#[test]
fn the_demo_tells_its_story_and_ends_with_a_summary() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .arg("demo")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "no log without --verbose: {stderr}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("verified #"))
            .count(),
        28,
        "{stdout}"
    );
    for want in [
        "== summary",
        "28 received, every signature verified: tx.pending 4, tx.confirmation 16, tx.reorged 4, tx.confirmed 4",
        "28 delivered in 28 attempts (0 failed)",
        "commit to answered: p50 ",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    let verbose = std::process::Command::new(env!("CARGO_BIN_EXE_chainwatch"))
        .args(["demo", "--verbose"])
        .output()
        .unwrap();
    assert!(verbose.status.success());
    assert!(
        String::from_utf8_lossy(&verbose.stderr).contains("INFO"),
        "--verbose shows the daemon's log"
    );
}
