//! `cargo bench`: every stage of the pipeline, with the figures the performance targets name.
//! Prints one line per figure and the machine it ran on; BENCHMARKS.md keeps the latest run.
//! Run one stage with `cargo bench -- block` (block, mempool, commit, delivery, e2e, memory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::{Address, Block, Network, ScriptBuf, Transaction, WPubkeyHash};
use chainwatch::changeset::ChangeSet;
use chainwatch::event::{BlockRef, TipRef};
use chainwatch::store::Store;
use chainwatch::tracker::Tracker;
use chainwatch::watch::{Overlay, Watch, WatchIndex};

const BLOCK: &[u8] = include_bytes!(
    "data/block_000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.raw"
);

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `n` random p2wpkh scripts, the same every run (xorshift).
fn random_scripts(n: usize) -> impl Iterator<Item = ScriptBuf> {
    let mut seed = 0x1234_5678_9abc_def0u64;
    (0..n).map(move |_| {
        let mut h = [0u8; 20];
        for chunk in h.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        ScriptBuf::new_p2wpkh(&WPubkeyHash::from_byte_array(h))
    })
}

/// `n` random p2wpkh watches on `network`, plus `extra`.
fn watches(n: usize, network: Network, extra: &[ScriptBuf]) -> Vec<Watch> {
    let mut out = Vec::with_capacity(n + extra.len());
    for script in random_scripts(n) {
        let addr = Address::from_script(&script, network).unwrap();
        out.push(Watch::new(&addr, 3, None, serde_json::json!({})));
    }
    for s in extra {
        if let Ok(addr) = Address::from_script(s, network) {
            out.push(Watch::new(
                &addr,
                3,
                Some("paid".into()),
                serde_json::json!({}),
            ));
        }
    }
    out
}

/// The index the daemon builds: streamed in, records left in the store (here: none to load).
fn compact_index(n: usize, network: Network, extra: &[ScriptBuf]) -> WatchIndex {
    let loader: chainwatch::watch::WatchLoader = Arc::new(|_| Ok(None));
    let mut index = WatchIndex::with_loader(network, loader, n + extra.len());
    let add = |index: &mut WatchIndex, script: &ScriptBuf| {
        let addr = Address::from_script(script, network).unwrap().to_string();
        let id = chainwatch::watch::watch_id(&format!("address:{addr}"));
        index.insert_target(
            &id,
            &chainwatch::watch::Target::Address { address: addr },
            1,
        );
    };
    for script in random_scripts(n) {
        add(&mut index, &script);
    }
    for s in extra {
        if Address::from_script(s, network).is_ok() {
            add(&mut index, s);
        }
    }
    index
}

/// 100 distinct standard output scripts the block pays.
fn paid_scripts(block: &Block) -> Vec<ScriptBuf> {
    let mut v: Vec<ScriptBuf> = Vec::new();
    for tx in &block.txdata[1..] {
        for o in &tx.output {
            if Address::from_script(&o.script_pubkey, Network::Bitcoin).is_ok()
                && !v.contains(&o.script_pubkey)
            {
                v.push(o.script_pubkey.clone());
            }
            if v.len() == 100 {
                return v;
            }
        }
    }
    v
}

fn bench_block_and_mempool(run_block: bool, run_mempool: bool) {
    let block: Block = deserialize(BLOCK).unwrap();
    let paid = paid_scripts(&block);
    let t = Instant::now();
    let index = compact_index(1_000_000 - paid.len(), Network::Bitcoin, &paid);
    println!(
        "setup: 1,000,000 watches indexed in {:.1}s ({} scripts)",
        t.elapsed().as_secs_f64(),
        index.script_count()
    );
    if run_block {
        let mut decode = vec![];
        let mut both = vec![];
        let mut matched = 0;
        for _ in 0..40 {
            let t = Instant::now();
            let b: Block = deserialize(BLOCK).unwrap();
            decode.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(&b);
            let t = Instant::now();
            let b: Block = deserialize(BLOCK).unwrap();
            let mut overlay = Overlay::default();
            matched = b
                .txdata
                .iter()
                .map(|tx| index.match_tx_in(tx, &mut overlay).len())
                .sum::<usize>();
            both.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (d, b) = (median(decode), median(both));
        println!(
            "block: decode {d:.2} ms, decode+match {b:.2} ms against 1M watches ({matched} matches, {} txs): {:.2}x decode (target <= 1.5x)",
            block.txdata.len(),
            b / d
        );
    }
    if run_mempool {
        let raws: Vec<Vec<u8>> = block.txdata.iter().map(serialize).collect();
        let mut decode_rates = vec![];
        let mut rates = vec![];
        for _ in 0..10 {
            let t = Instant::now();
            for r in &raws {
                let tx: Transaction = deserialize(r).unwrap();
                std::hint::black_box(&tx);
            }
            decode_rates.push(raws.len() as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for r in &raws {
                let tx: Transaction = deserialize(r).unwrap();
                std::hint::black_box(index.match_tx(&tx));
            }
            rates.push(raws.len() as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "mempool: decode+match {:.0} tx/s on one core against 1M watches (decode alone {:.0} tx/s; target >= 300,000)",
            median(rates),
            median(decode_rates)
        );
    }
}

fn bench_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.check_network("regtest").unwrap();
    // One endpoint, so every event also writes its delivery row, as in a real deployment.
    let cfg = endpoint_config(dir.path(), "http://127.0.0.1:9/hooks", true);
    store.sync_endpoints(&cfg.endpoints).unwrap();
    let ws = watches(1000, Network::Regtest, &[]);
    let scripts: Vec<ScriptBuf> = ws
        .iter()
        .map(|w| {
            w.target_text()
                .parse::<Address<_>>()
                .unwrap()
                .assume_checked()
                .script_pubkey()
        })
        .collect();
    let mut index = WatchIndex::new(Network::Regtest, ws);
    let mut tracker = Tracker::new("regtest", 100, vec![]);
    let mut prev = bitcoin::BlockHash::all_zeros();
    let mut times = vec![];
    let mut counts = vec![];
    for height in 0..12u32 {
        // Ten transactions of a hundred outputs each, every output paying a watch.
        let txdata: Vec<Transaction> = (0..10)
            .map(|t| {
                chainwatch::simnode::mining::payment(
                    &[(
                        bitcoin::OutPoint::new(
                            bitcoin::Txid::from_byte_array([height as u8 + 1; 32]),
                            t,
                        ),
                        100_000_000,
                    )],
                    &scripts[t as usize * 100..(t as usize + 1) * 100]
                        .iter()
                        .map(|s| (s.clone(), 10_000))
                        .collect::<Vec<_>>(),
                    &ScriptBuf::new(),
                    1000,
                )
            })
            .collect();
        let block = chainwatch::simnode::mining::build_block(
            prev,
            height,
            1_700_000_000 + height,
            &ScriptBuf::new_op_return([0u8; 4]),
            txdata,
            0,
        );
        let at = BlockRef {
            hash: block.block_hash(),
            height,
            time: block.header.time,
        };
        let step = tracker.connect_block(&index, &block, at);
        let mut changes = ChangeSet::labelled(step, &index).unwrap();
        changes.tip = chainwatch::tip::TipChanges::connect(
            at,
            block.header.prev_blockhash,
            block.txdata.len() as u32,
        );
        let t = Instant::now();
        let committed = store.commit(&changes, 0).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        counts.push(committed.len());
        tracker.apply(&changes.tracked);
        index.apply(&changes.index);
        prev = at.hash;
        let _ = TipRef { hash: prev, height };
    }
    println!(
        "commit: a block paying 1,000 watched outputs ({} events and deliveries, tip, state) commits in {:.1} ms (synchronous=FULL; target < 50 ms)",
        counts[0], times[0]
    );
    println!(
        "commit: steady state, each block also confirming the two before (N=3, {} events per block): {:.1} ms median, {:.1} ms worst over {} blocks",
        counts[5],
        median(times[2..].to_vec()),
        times[2..].iter().cloned().fold(0.0, f64::max),
        times.len() - 2
    );
}

struct Arrivals {
    at: Mutex<HashMap<String, Instant>>,
}

async fn receiver() -> (String, Arc<Arrivals>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let arrivals = Arc::new(Arrivals {
        at: Mutex::new(HashMap::new()),
    });
    let a = arrivals.clone();
    let handler = move |headers: axum::http::HeaderMap| {
        let a = a.clone();
        async move {
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            a.at.lock().unwrap().entry(id).or_insert_with(Instant::now);
            axum::http::StatusCode::NO_CONTENT
        }
    };
    let app = axum::Router::new().fallback(axum::routing::post(handler));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, arrivals)
}

fn endpoint_config(dir: &std::path::Path, url: &str, ordered: bool) -> chainwatch::config::Config {
    let text = format!(
        "data_dir = {:?}\n[[endpoints]]\nname = \"bench\"\nurl = \"{url}\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nordered = {ordered}\nconcurrency = 32\n",
        dir.display().to_string()
    );
    chainwatch::config::Config::parse(&text, "bench", None).unwrap()
}

fn events(n: usize, tag: &str) -> Vec<chainwatch::event::NewEvent> {
    (0..n)
        .map(|i| {
            chainwatch::event::other_event(
                chainwatch::event::TX_PENDING,
                &format!("{tag}-{i}"),
                "regtest",
                Default::default(),
            )
        })
        .collect()
}

async fn bench_delivery() {
    for ordered in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (url, arrivals) = receiver().await;
        let cfg = endpoint_config(dir.path(), &url, ordered);
        let mut store = Store::open(dir.path()).unwrap();
        store.check_network("regtest").unwrap();
        store.sync_endpoints(&cfg.endpoints).unwrap();
        let n = if ordered { 3_000 } else { 20_000 };
        for chunk in events(n, "t").chunks(1000) {
            store
                .commit(
                    &ChangeSet::events(chunk.to_vec()),
                    chainwatch::daemon::now_ms(),
                )
                .unwrap();
        }
        let token = tokio_util::sync::CancellationToken::new();
        let t = Instant::now();
        let worker = tokio::spawn(chainwatch::dispatch::run_endpoint(
            cfg.endpoints[0].clone(),
            Store::open(dir.path()).unwrap(),
            chainwatch::dispatch::Context::new(Arc::new(tokio::sync::Notify::new()), token.clone()),
        ));
        while arrivals.at.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        token.cancel();
        worker.await.unwrap();
        let kind = if ordered {
            "ordered"
        } else {
            "unordered (concurrency 32)"
        };
        println!("delivery: {:.0} deliveries/s sustained, {kind}, {n} events to a local receiver (target >= 5,000 unordered)", n as f64 / secs);
    }
    // Latency from commit to request at a steady 100 events per second.
    let dir = tempfile::tempdir().unwrap();
    let (url, arrivals) = receiver().await;
    let cfg = endpoint_config(dir.path(), &url, true);
    let mut store = Store::open(dir.path()).unwrap();
    store.check_network("regtest").unwrap();
    store.sync_endpoints(&cfg.endpoints).unwrap();
    let wake = Arc::new(tokio::sync::Notify::new());
    let token = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(chainwatch::dispatch::run_endpoint(
        cfg.endpoints[0].clone(),
        Store::open(dir.path()).unwrap(),
        chainwatch::dispatch::Context::new(wake.clone(), token.clone()),
    ));
    let mut committed_at = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for (i, e) in events(500, "lat").into_iter().enumerate() {
        tick.tick().await;
        let id = e.id.clone();
        store
            .commit(&ChangeSet::events(vec![e]), chainwatch::daemon::now_ms())
            .unwrap();
        committed_at.insert(id, Instant::now());
        wake.notify_waiters();
        let _ = i;
    }
    while arrivals.at.lock().unwrap().len() < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    token.cancel();
    worker.await.unwrap();
    let at = arrivals.at.lock().unwrap();
    let lat: Vec<f64> = committed_at
        .iter()
        .map(|(id, c)| at[id].saturating_duration_since(*c).as_secs_f64() * 1e3)
        .collect();
    println!(
        "delivery latency: commit to request p50 {:.2} ms, p99 {:.2} ms at 100 events/s, ordered (target p99 < 20 ms)",
        percentile(lat.clone(), 0.5),
        percentile(lat, 0.99)
    );
}

async fn bench_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let node = chainwatch::simnode::SimNode::start(&dir.path().join("node"))
        .await
        .unwrap();
    node.mine(300);
    let (url, arrivals) = receiver().await;
    let addr = "bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp";
    let text = format!(
        "network = \"regtest\"\ndata_dir = {:?}\n[bitcoind]\nrpc_url = \"{}\"\ncookie_file = {:?}\n[[endpoints]]\nname = \"e2e\"\nurl = \"{url}\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n[api]\nlisten = \"127.0.0.1:0\"\n[[watches]]\naddress = \"{addr}\"\nconfirmations = 1\n",
        dir.path().join("data").display().to_string(),
        node.rpc_url(),
        node.cookie_path().display().to_string()
    );
    let cfg = chainwatch::config::Config::parse(&text, "bench", None).unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    // Let it reach the tip and subscribe.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sent = vec![];
    for _ in 0..150 {
        let t = Instant::now();
        let txid = node.pay(addr, 10_000);
        sent.push((txid, t));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.at.lock().unwrap().len() < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    token.cancel();
    daemon.await.unwrap().unwrap();
    // Map txids to event ids through the store.
    let store = Store::open(&dir.path().join("data")).unwrap();
    let rows = store.events_after(0, 10_000).unwrap();
    let by_txid: HashMap<String, String> = rows
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            (
                v["data"]["txid"].as_str().unwrap_or("").to_string(),
                r.id.clone(),
            )
        })
        .collect();
    let at = arrivals.at.lock().unwrap();
    let lat: Vec<f64> = sent
        .iter()
        .filter_map(|(txid, t)| {
            by_txid
                .get(&txid.to_string())
                .and_then(|id| at.get(id))
                .map(|a| a.saturating_duration_since(*t).as_secs_f64() * 1e3)
        })
        .collect();
    println!(
        "end to end: rawtx published by simnode to webhook received p50 {:.2} ms, p99 {:.2} ms ({} of {} payments)",
        percentile(lat.clone(), 0.5),
        percentile(lat.clone(), 0.99),
        lat.len(),
        sent.len()
    );
}

fn bench_memory() {
    for n in [1_000_000usize, 10_000_000] {
        let before = rss_mb();
        let index = compact_index(n, Network::Bitcoin, &[]);
        let after = rss_mb();
        println!("memory: {:.0} MB resident for the index of {} watched addresses (target < 150 MB for 1M)", after - before, n);
        drop(index);
    }
}

/// Child process: a store in `dir` with `n` watched regtest addresses.
fn fill_store(dir: &str, n: usize) {
    let mut store = Store::open(std::path::Path::new(dir)).unwrap();
    store.check_network("regtest").unwrap();
    let scripts: Vec<ScriptBuf> = random_scripts(n).collect();
    for chunk in scripts.chunks(100_000) {
        let ws: Vec<Watch> = chunk
            .iter()
            .map(|s| {
                Watch::new(
                    &Address::from_script(s, Network::Regtest).unwrap(),
                    3,
                    Some("order".into()),
                    serde_json::json!({"order_id": 1}),
                )
            })
            .collect();
        store.upsert_watches(&ws, "bench", 0).unwrap();
    }
}

/// The whole daemon's resident size once it has loaded a store of a million watches.
async fn bench_daemon_memory() {
    let n = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let t = Instant::now();
    // Filled by another process, so its allocations do not count here.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["fill-store", data.to_str().unwrap(), &n.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let fill_secs = t.elapsed().as_secs_f64();
    let node = chainwatch::simnode::SimNode::start(&dir.path().join("node"))
        .await
        .unwrap();
    node.mine(1);
    let baseline = rss_mb();
    let text = format!(
        "network = \"regtest\"\ndata_dir = {:?}\n[bitcoind]\nrpc_url = \"{}\"\ncookie_file = {:?}\n[api]\nlisten = \"127.0.0.1:0\"\n",
        data.display().to_string(),
        node.rpc_url(),
        node.cookie_path().display().to_string()
    );
    let cfg = chainwatch::config::Config::parse(&text, "bench", None).unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    // The tip is set right after the index is built.
    while Store::open(&data).unwrap().tip().unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = rss_mb();
    token.cancel();
    daemon.await.unwrap().unwrap();
    println!(
        "memory: the running daemon with {n} watched addresses in its store: {:.0} MB resident ({:.0} MB above the process before it started; store filled in {fill_secs:.0}s, watches loaded in {load_secs:.1}s)",
        total,
        total - baseline
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some("fill-store") {
        fill_store(&args[1], args[2].parse().unwrap());
        return;
    }
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    println!(
        "chainwatch benchmarks on {} ({})",
        machine(),
        chrono_like_now()
    );
    if want("block") || want("mempool") {
        bench_block_and_mempool(want("block"), want("mempool"));
    }
    if want("commit") {
        bench_commit();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    if want("delivery") {
        rt.block_on(bench_delivery());
    }
    if want("e2e") {
        rt.block_on(bench_end_to_end());
    }
    if want("memory") {
        rt.block_on(bench_daemon_memory());
        bench_memory();
    }
}

fn chrono_like_now() -> String {
    chainwatch::event::now_rfc3339()
}
