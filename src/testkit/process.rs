//! Processes and ports of a test.

/// A child process killed when the test ends, even by a panic.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Kills it now (SIGKILL) and reaps it; dropping later does nothing more.
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `host:port` where nothing listens, for a receiver that refuses connections. On 127.0.0.2,
/// where the suite binds nothing: a port number that was free on 127.0.0.1 may be taken by a
/// test running beside this one, whose server would then answer in the closed port's place.
pub fn refusing_address() -> String {
    format!("127.0.0.2:{}", free_port())
}

/// A loopback port free at the moment of asking, for a server the test starts later.
///
/// Taken below Linux's ephemeral range (32768 and up by default), from a counter: a port the
/// kernel hands out for a `:0` bind or an outgoing connection of a test running beside this one
/// is always in that range, so it cannot take this port between the asking and the binding, and
/// the counter keeps two callers of one test process apart. The process id spreads test binaries.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(397) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

/// Starts `chainwatch run --config CONFIG` from the binary at `exe` (a test's
/// `env!("CARGO_BIN_EXE_chainwatch")`), its log appended to `log`, with `env` set.
pub fn run_daemon(
    exe: &str,
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> KillOnDrop {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("the daemon's log file opens");
    let child = std::process::Command::new(exe)
        .args(["run", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stderr(log)
        .spawn()
        .expect("chainwatch starts");
    KillOnDrop(child)
}

/// `/health`'s role and epoch of the daemon whose API listens on `port`, if it answers.
pub async fn health_role(port: u16) -> Option<(String, i64)> {
    crate::net::install_crypto_provider();
    let client = reqwest::Client::builder().no_proxy().build().ok()?;
    let body: serde_json::Value = client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some((body["role"].as_str()?.to_string(), body["epoch"].as_i64()?))
}

/// Waits until the daemon `who` (API on `port`, log in `log`) says it is `role`, and returns
/// its epoch; after `limit`, panics with what `/health` said last and the log.
pub async fn wait_role(
    port: u16,
    role: &str,
    limit: std::time::Duration,
    who: &str,
    log: &std::path::Path,
) -> i64 {
    let mut seen = None;
    let began = std::time::Instant::now();
    while began.elapsed() < limit {
        seen = health_role(port).await;
        if let Some((r, epoch)) = &seen {
            if r == role {
                return *epoch;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "instance {who} was not {role} within {limit:?}: /health says {seen:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
