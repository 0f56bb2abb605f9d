//! Failover between two daemons sharing a PostgreSQL database: the leader is killed with
//! SIGKILL, and the clock runs until the standby's first commit as leader, its
//! `alert.leader_changed` in the shared log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chainwatch::pg::PgConn;
use chainwatch::simnode::SimNode;
use chainwatch::testkit::postgres::URL_VAR;
use chainwatch::testkit::{free_port, Api, Bitcoind, ConfigBuilder, Endpoint};
use chainwatch::testkit::{run_daemon, KillOnDrop, Receiver};

use crate::common::SECRET;

const TOKEN: &str = "bench-failover-token-0123456789abcdef";

struct Daemon {
    name: String,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    process: Option<KillOnDrop>,
}

impl Daemon {
    fn new(dir: &Path, name: &str, node: &SimNode, receiver: &Receiver, lease: &str) -> Daemon {
        let (port, home) = (free_port(), dir.join(name));
        std::fs::create_dir_all(&home).unwrap();
        let config = home.join("watcher.toml");
        ConfigBuilder::regtest()
            .data_dir(home.join("data"))
            .audit_key_file(dir.join("audit.key"))
            .api(Api::listen(&format!("127.0.0.1:{port}")).token(TOKEN))
            .bitcoind(Bitcoind::simnode(node))
            .postgres_env(URL_VAR, lease)
            .endpoint(
                Endpoint::new("ops", &receiver.url)
                    .secret(SECRET)
                    .events(["alert.*"]),
            )
            .write_to(&config)
            .unwrap();
        Daemon {
            name: name.to_string(),
            config,
            log: home.join("log"),
            port,
            process: None,
        }
    }

    fn start(&mut self, url: &str) {
        self.process = Some(run_daemon(
            env!("CARGO_BIN_EXE_chainwatch"),
            &self.config,
            &self.log,
            &[(URL_VAR, url)],
        ));
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    async fn wait_role(&self, role: &str) {
        let limit = Duration::from_secs(60);
        chainwatch::testkit::wait_role(self.port, role, limit, &self.name, &self.log).await;
    }
}

fn leader_changes(conn: &PgConn) -> i64 {
    conn.query_one(
        "SELECT count(*) FROM events WHERE type = 'alert.leader_changed'",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Seconds from each SIGKILL of the leader to the standby's `alert.leader_changed`, over
/// `rounds` kills (the killed instance restarts as the standby between them).
pub async fn failover_times(url: &str, rounds: usize, lease: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let node = SimNode::start(&dir.path().join("node")).await.unwrap();
    node.mine(10);
    let receiver = Receiver::builder()
        .ids_only()
        .bind_loopback(0)
        .await
        .unwrap();
    let mut a = Daemon::new(dir.path(), "a", &node, &receiver, lease);
    let mut b = Daemon::new(dir.path(), "b", &node, &receiver, lease);
    a.start(url);
    a.wait_role("leader").await;
    b.start(url);
    b.wait_role("standby").await;
    let conn = PgConn::open(url).unwrap();
    let (mut leader, mut standby) = (&mut a, &mut b);
    let mut times = Vec::new();
    for _ in 0..rounds {
        let before = leader_changes(&conn);
        leader.kill();
        let killed = Instant::now();
        // Looked at every 5 ms: the figure is in seconds, and each look is one query.
        while leader_changes(&conn) == before {
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "no failover in a minute"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(killed.elapsed().as_secs_f64());
        standby.wait_role("leader").await;
        leader.start(url);
        leader.wait_role("standby").await;
        std::mem::swap(&mut leader, &mut standby);
    }
    a.kill();
    b.kill();
    times
}
