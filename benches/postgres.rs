//! `cargo bench --bench postgres`: the PostgreSQL store beside SQLite: committing blocks that
//! pay 1,000 watched outputs, and delivery throughput with one and with two instances sharing
//! the outbox. Needs a server in `CHAINWATCH_TEST_PG_URL` (scripts/pg-cluster start).

mod common;
#[path = "common/failover.rs"]
mod failover;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chainwatch::changeset::ChangeSet;
use chainwatch::pg::PgStore;
use chainwatch::store::{OutboxStore, Store};

use common::blocks::commit_blocks;
use common::{endpoint_config, events, median, wait_requests};

const LIMIT: Duration = Duration::from_secs(600);

fn pg_store(
    url: &str,
    key: &std::path::Path,
    instance: &str,
    cfg: &chainwatch::config::Config,
) -> PgStore {
    let mut store = PgStore::open(url, key, instance).unwrap();
    store.check_network("regtest").unwrap();
    store.sync_endpoints(&cfg.endpoints).unwrap();
    store
}

/// Fresh stores the commit is measured on: one cold commit is one sample, and this machine's
/// noise is as large as the figure's distance from its target.
const COMMIT_RUNS: usize = 5;

fn bench_commit(fresh: impl Fn() -> String) {
    let mut first = [vec![], vec![]];
    let mut steady = [vec![], vec![]];
    for _ in 0..COMMIT_RUNS {
        let dir = tempfile::tempdir().unwrap();
        let cfg = endpoint_config(dir.path(), "http://127.0.0.1:9/hooks", true);
        let mut sqlite = Store::open(dir.path()).unwrap();
        sqlite.check_network("regtest").unwrap();
        sqlite.sync_endpoints(&cfg.endpoints).unwrap();
        let mut pg = pg_store(&fresh(), &dir.path().join("audit.key"), "bench", &cfg);
        for (i, blocks) in [commit_blocks(&mut sqlite, 12), commit_blocks(&mut pg, 12)]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                blocks[0].events, 1000,
                "the first block pays 1,000 watched outputs"
            );
            first[i].push(blocks[0].ms);
            steady[i].extend(blocks[2..].iter().map(|b| b.ms));
        }
    }
    for (i, name) in ["SQLite", "PostgreSQL"].into_iter().enumerate() {
        let firsts = first[i].clone();
        let (lo, hi) = (
            firsts.iter().cloned().fold(f64::MAX, f64::min),
            firsts.iter().cloned().fold(0.0, f64::max),
        );
        let median_first = median(firsts);
        common::verdict(
            &format!("postgres, commit, {name}"),
            &format!(
                "a block paying 1,000 watched outputs (1,000 events), each the first commit of a fresh store: median {median_first:.1} ms of {COMMIT_RUNS} (range {lo:.1}–{hi:.1}); steady median {:.1} ms (3,000 events per block)",
                median(steady[i].clone()),
            ),
            "median < 50 ms",
            median_first < 50.0,
        );
    }
}

/// Deliveries per second of `n` events to a local receiver by `instances` workers, each with
/// a connection of its own under its own instance name (as separate processes would be).
async fn bench_delivery(url: &str, instances: usize, n: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let receiver = common::ids_receiver().await;
    let cfg = endpoint_config(dir.path(), &receiver.url, false);
    let key = dir.path().join("audit.key");
    let mut store = pg_store(url, &key, "writer", &cfg);
    for chunk in events(n, "t").chunks(1000) {
        OutboxStore::commit(
            &mut store,
            &ChangeSet::events(chunk.to_vec()),
            chainwatch::daemon::now_ms(),
        )
        .unwrap();
    }
    let token = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let workers: Vec<_> = (0..instances)
        .map(|i| {
            let mut s = pg_store(url, &key, &format!("instance-{i}"), &cfg);
            s.set_claim(Duration::from_secs(20));
            tokio::spawn(chainwatch::dispatch::run_endpoint(
                cfg.endpoints[0].clone(),
                s,
                chainwatch::dispatch::Context::new(
                    Arc::new(tokio::sync::Notify::new()),
                    token.clone(),
                ),
            ))
        })
        .collect();
    wait_requests(&receiver, n, LIMIT).await;
    let secs = t.elapsed().as_secs_f64();
    token.cancel();
    for w in workers {
        w.await.unwrap();
    }
    n as f64 / secs
}

fn main() {
    if !common::wants("postgres") {
        return;
    }
    let Ok(server) = std::env::var(chainwatch::testkit::postgres::URL_VAR) else {
        println!(
            "postgres: skipped (set CHAINWATCH_TEST_PG_URL; scripts/pg-cluster start prints one)"
        );
        return;
    };
    let _ = server;
    common::header("postgres");
    let fresh = |name: &str| chainwatch::testkit::postgres::fresh_database(name).unwrap();
    bench_commit(|| fresh("bench_commit"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = 20_000;
    for instances in [1, 2] {
        let rate = rt.block_on(bench_delivery(&fresh("bench_delivery"), instances, n));
        let shown = format!(
            "{instances} instance(s) sharing the outbox, unordered (concurrency 32 each): {rate:.0} deliveries/s, {n} events to a local receiver"
        );
        if instances == 2 {
            common::verdict(
                "postgres, delivery",
                &shown,
                ">= 10,000/s with two instances",
                rate >= 10_000.0,
            );
        } else {
            println!("postgres, delivery: {shown}");
        }
    }
    let lease = 2.0;
    let times = rt.block_on(failover::failover_times(
        &fresh("bench_failover"),
        5,
        &format!("{lease}s"),
    ));
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "postgres, failover: leader SIGKILLed -> the standby's first commit (its alert.leader_changed): median {:.2} s, worst {max:.2} s of {} kills, with leader_lease = {lease} s (no target: bounded by the lease, 10 s by default)",
        median(times.clone()),
        times.len()
    );
}
