//! `chainwatch demo`: the whole pipeline against the built-in simulated node, with a built-in
//! receiver that verifies and prints each webhook as it arrives.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::simnode::SimNode;
use crate::testkit::config::{Api, Bitcoind, ConfigBuilder, Endpoint, WatchEntry};
use crate::testkit::receiver::{describe, Captured, Receiver, Reply};

/// The four shop addresses of the captured session, one per standard output type.
pub const DEMO_WATCHES: [(&str, &str); 4] = [
    ("order-1001-p2pkh", "n3iet9u1ki76AoPrk9p6NUhjqxeyQfihSg"),
    ("order-1002-p2sh", "2N5nWUDnNCr3kqQesi1YGqBojYwjS4P9Zw9"),
    (
        "order-1003-p2wpkh",
        "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp",
    ),
    (
        "order-1004-p2tr",
        "bcrt1pgf9g8v63sselca7rgx5uyl0xwjjp4vpfn89vt3gdutvpjc8xq8vs0mmh98",
    ),
];
const DEMO_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn demo_config(
    node: &SimNode,
    data_dir: &std::path::Path,
    receiver: &str,
) -> anyhow::Result<Config> {
    let mut cfg = ConfigBuilder::regtest()
        .data_dir(data_dir)
        .default_confirmations(3)
        .bitcoind(Bitcoind::simnode(node).poll_interval("500ms"))
        .endpoint(
            Endpoint::new("demo", receiver)
                .secret(DEMO_SECRET)
                .events(["tx.*"]),
        )
        .api(Api::listen("127.0.0.1:0"));
    for (i, (label, addr)) in DEMO_WATCHES.iter().enumerate() {
        cfg = cfg.watch(
            WatchEntry::address(addr)
                .label(label)
                .meta("order_id", 1001 + i as i64),
        );
    }
    Ok(Config::parse(&cfg.to_toml(), "demo config", None)?)
}

struct Printer {
    rx: mpsc::UnboundedReceiver<Captured>,
    daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
    seen: usize,
    rejected: usize,
    /// Webhooks received, by type, in first-seen order.
    kinds: Vec<(String, usize)>,
}

impl Printer {
    /// Prints webhooks until `total` have arrived, or fails after `limit`.
    async fn until(&mut self, total: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.seen < total {
            let r = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.rx.recv()) => r
                    .with_context(|| format!("waited {limit:?} for webhook {} of {total}", self.seen + 1))?
                    .context("receiver stopped")?,
                done = &mut self.daemon => {
                    done.context("daemon task")?.context("daemon stopped")?;
                    bail!("daemon stopped before webhook {} of {total}", self.seen + 1);
                }
            };
            if r.verdict.is_err() {
                self.rejected += 1;
            }
            self.seen += 1;
            let kind = r.kind().to_string();
            match self.kinds.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += 1,
                None => self.kinds.push((kind, 1)),
            }
            println!("  {}", describe(&r));
        }
        Ok(())
    }
}

fn say(text: &str) {
    println!("\n== {text}");
}

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let node = SimNode::start(&dir.path().join("node"))
        .await
        .context("starting the simulated node")?;
    let (tx, rx) = mpsc::unbounded_channel();
    let secret = crate::sign::Secret::parse(DEMO_SECRET).expect("valid secret");
    let receiver = Receiver::builder()
        .secrets(vec![secret])
        .reply(Reply::Verdict)
        .forward_to(tx)
        .bind_loopback(0)
        .await?;
    let recv_addr = receiver.addr;
    let cfg = demo_config(&node, &dir.path().join("data"), &receiver.url)?;
    println!(
        "chainwatch demo: simulated regtest node at {}, receiver at http://{recv_addr}/hooks",
        node.rpc_url()
    );
    println!(
        "watching {} addresses (p2pkh, p2sh, p2wpkh, p2tr), 3 confirmations each",
        DEMO_WATCHES.len()
    );

    say("mining 101 blocks so the simulated wallet has spendable coins");
    node.mine(101);
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(crate::daemon::run(cfg, shutdown.clone()));
    let mut p = Printer {
        rx,
        daemon,
        seen: 0,
        rejected: 0,
        kinds: vec![],
    };
    let limit = Duration::from_secs(30);
    tokio::time::sleep(Duration::from_millis(700)).await;

    say("paying each watched address (mempool): expect tx.pending");
    let amounts = [100_000u64, 100_000, 50_000_000, 100_000];
    for ((_, addr), amount) in DEMO_WATCHES.iter().zip(amounts) {
        node.pay(addr, amount);
    }
    p.until(4, limit).await?;
    say("mining 1 block: expect tx.confirmation 1/3");
    node.mine(1);
    p.until(8, limit).await?;
    say("mining 1 block: expect tx.confirmation 2/3");
    node.mine(1);
    p.until(12, limit).await?;
    say("reorg: the two blocks are replaced by three empty ones; expect tx.reorged");
    node.reorg(2, false);
    p.until(16, limit).await?;
    say("mining 3 blocks: the payments confirm again, with new event ids");
    node.mine(3);
    p.until(28, limit).await?;

    shutdown.cancel();
    (&mut p.daemon).await.context("daemon task")??;
    receiver.stop();
    if p.rejected > 0 {
        bail!(
            "{} of {} webhooks failed signature verification",
            p.rejected,
            p.seen
        );
    }
    let data = dir.path().join("data");
    let summary = tokio::task::spawn_blocking(move || summary(&data)).await??;
    say("summary");
    let kinds: Vec<String> = p.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  webhooks     {} received, every signature verified: {}",
        p.seen,
        kinds.join(", ")
    );
    println!(
        "  deliveries   {} delivered in {} attempts ({} failed)",
        summary.delivered, summary.attempts, summary.failed
    );
    println!(
        "  latency      commit to answered: p50 {} ms, p99 {} ms, max {} ms",
        summary.latency_ms(0.5),
        summary.latency_ms(0.99),
        summary.latency_ms(1.0)
    );
    println!("  senders      each payment names the coins it spent (data.senders)");
    println!(
        "\nNext: `chainwatch simnode` serves this simulated node for your own `chainwatch run`;"
    );
    println!("README.md tells how to run against a real bitcoind.");
    Ok(())
}

/// What the store says of the run.
struct Summary {
    delivered: usize,
    attempts: usize,
    failed: usize,
    latencies_ms: Vec<i64>,
}

impl Summary {
    fn latency_ms(&self, q: f64) -> i64 {
        if self.latencies_ms.is_empty() {
            return 0;
        }
        let i = ((self.latencies_ms.len() - 1) as f64 * q).round() as usize;
        self.latencies_ms[i]
    }
}

fn summary(data: &std::path::Path) -> anyhow::Result<Summary> {
    let store = crate::store::Store::open(data)?;
    let mut s = Summary {
        delivered: 0,
        attempts: 0,
        failed: 0,
        latencies_ms: vec![],
    };
    for e in store.events_after(0, 10_000)? {
        let attempts = store.attempts_for(&e.id)?;
        s.attempts += attempts.len();
        s.failed += attempts
            .iter()
            .filter(|a| !a.status_code.is_some_and(|c| (200..300).contains(&c)))
            .count();
        if let Some(ok) = attempts
            .iter()
            .find(|a| a.status_code.is_some_and(|c| (200..300).contains(&c)))
        {
            s.delivered += 1;
            s.latencies_ms
                .push(ok.started_at + ok.duration_ms - e.created_at);
        }
    }
    s.latencies_ms.sort_unstable();
    Ok(s)
}
