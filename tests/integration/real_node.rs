//! The same scenarios against a real bitcoind: `BITCOIND_EXE=/path/to/bitcoind cargo test -- --ignored`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chainwatch::config::RpcAuth;
use chainwatch::node::RpcClient;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

pub struct RealNode {
    pub dir: tempfile::TempDir,
    child: Child,
    args: Vec<String>,
    pub rpc_url: String,
    pub node: RpcClient,
    pub miner: RpcClient,
    pub shop: RpcClient,
}

impl RealNode {
    pub async fn start() -> RealNode {
        RealNode::start_with(&[]).await
    }

    /// As `start`, with more of bitcoind's options.
    pub async fn start_with(extra: &[&str]) -> RealNode {
        let exe = std::env::var("BITCOIND_EXE").expect("BITCOIND_EXE names a bitcoind");
        let dir = tempfile::tempdir().unwrap();
        let rpc_port = free_port();
        let mut args: Vec<String> = vec![
            "-regtest".into(),
            format!("-datadir={}", dir.path().display()),
            format!("-rpcport={rpc_port}"),
        ];
        for a in [
            "-listen=0",
            "-server=1",
            "-txindex=0",
            "-fallbackfee=0.0002",
            "-printtoconsole=0",
            "-rpcbind=127.0.0.1",
            "-rpcallowip=127.0.0.1",
        ] {
            args.push(a.into());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        for topic in ["sequence", "rawtx", "rawblock", "hashtx", "hashblock"] {
            args.push(format!("-zmqpub{topic}=tcp://127.0.0.1:{}", free_port()));
        }
        let child = spawn_bitcoind(&exe, &args);
        let rpc_url = format!("http://127.0.0.1:{rpc_port}");
        let cookie = dir.path().join("regtest/.cookie");
        let client = |path: &str| {
            RpcClient::new(&format!("{rpc_url}{path}"), RpcAuth::Cookie(cookie.clone()))
        };
        let node = client("");
        wait_ready(&node).await;
        node.call("createwallet", json!(["miner"]))
            .await
            .expect("miner wallet");
        node.call("createwallet", json!(["shop"]))
            .await
            .expect("shop wallet");
        let miner = client("/wallet/miner");
        let shop = client("/wallet/shop");
        let n = RealNode {
            dir,
            child,
            args,
            rpc_url,
            node,
            miner,
            shop,
        };
        // Ten mature coinbases, so payments and fee bumps have coins to spend.
        n.mine(110).await;
        n
    }

    /// Stops bitcoind, waits `down`, starts it again (a new cookie, ZMQ counters from 0).
    pub async fn restart(&mut self, down: Duration) {
        self.call("stop", json!([])).await;
        let _ = self.child.wait();
        tokio::time::sleep(down).await;
        self.child = spawn_bitcoind(&std::env::var("BITCOIND_EXE").unwrap(), &self.args);
        wait_ready(&self.node).await;
        for w in ["miner", "shop"] {
            let _ = self.node.call("loadwallet", json!([w])).await;
        }
    }

    /// Spends the inputs of mempool transaction `txid` back to the miner, in a block of its own
    /// (`generateblock`), as the captures' double-spend-conflict step does.
    pub async fn mine_double_spend(&self, txid: &str) -> (String, String) {
        let raw = self.call("getrawtransaction", json!([txid, true])).await;
        let inputs: Vec<Value> = raw["vin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| json!({"txid": i["txid"], "vout": i["vout"]}))
            .collect();
        let mut total = 0.0;
        for i in &inputs {
            let prev = self
                .miner
                .call("gettransaction", json!([i["txid"]]))
                .await
                .unwrap();
            let vout = i["vout"].as_u64().unwrap();
            let decoded = self
                .call("decoderawtransaction", json!([prev["hex"]]))
                .await;
            total += decoded["vout"][vout as usize]["value"].as_f64().unwrap();
        }
        let to = self.miner.call("getnewaddress", json!([])).await.unwrap();
        let amount = ((total - 0.001) * 1e8).round() / 1e8;
        let unsigned = self
            .call(
                "createrawtransaction",
                json!([inputs, { to.as_str().unwrap(): amount }]),
            )
            .await;
        let signed = self
            .miner
            .call("signrawtransactionwithwallet", json!([unsigned]))
            .await
            .unwrap();
        let hex = signed["hex"].as_str().unwrap().to_string();
        let decoded = self.call("decoderawtransaction", json!([hex])).await;
        let block = self.call("generateblock", json!([to, [hex]])).await;
        (
            decoded["txid"].as_str().unwrap().to_string(),
            block["hash"].as_str().unwrap().to_string(),
        )
    }

    pub fn cookie(&self) -> PathBuf {
        self.dir.path().join("regtest/.cookie")
    }

    pub async fn shop_address(&self, kind: &str) -> String {
        self.shop
            .call("getnewaddress", json!(["", kind]))
            .await
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn pay(&self, address: &str, btc: f64) -> String {
        let r = self
            .miner
            .call("sendtoaddress", json!([address, btc, "", "", false, true]))
            .await
            .unwrap();
        r.as_str().unwrap().to_string()
    }

    /// Mines to a fresh address: after `invalidateblock`, a block built from the same template
    /// in the same second would be the very block just invalidated, and bitcoind refuses it.
    pub async fn mine(&self, n: u32) -> Vec<String> {
        let to = self.miner.call("getnewaddress", json!([])).await.unwrap();
        let r = self
            .node
            .call("generatetoaddress", json!([n, to]))
            .await
            .unwrap();
        r.as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect()
    }

    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.node.call(method, params).await.unwrap()
    }
}

fn spawn_bitcoind(exe: &str, args: &[String]) -> Child {
    Command::new(exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bitcoind starts")
}

async fn wait_ready(node: &RpcClient) {
    poll(
        "bitcoind to answer",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            match node.call("getblockchaininfo", json!([])).await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("bitcoind did not answer: {e}")),
            }
        },
    )
    .await
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(
    node: &RealNode,
    receiver: &Receiver,
    data: &std::path::Path,
    watches: &[(String, u32)],
) -> chainwatch::config::Config {
    let mut c = ConfigBuilder::regtest()
        .data_dir(data)
        .bitcoind(Bitcoind::cookie(&node.rpc_url, node.cookie()).poll_interval("500ms"))
        .endpoint(Endpoint::new(SHOP, &receiver.url).secret(SECRET))
        .api(Api::listen("127.0.0.1:0"));
    for (a, n) in watches {
        c = c.watch(WatchEntry::address(a).confirmations(*n));
    }
    chainwatch::config::Config::parse(&c.to_toml(), "real-node test", None).unwrap()
}

async fn wait_tip(data: &std::path::Path, node: &RealNode) {
    let best = node
        .call("getbestblockhash", json!([]))
        .await
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..400 {
        if chainwatch::store::db_path(data).exists() {
            if let Ok(Some(t)) = chainwatch::store::Store::open(data).unwrap().tip() {
                if t.hash.to_string() == best {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chainwatch did not reach bitcoind's tip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_every_address_type_pending_confirmations_confirmed() {
    let node = RealNode::start().await;
    let receiver = receiver().await;
    let mut addrs = vec![];
    for kind in ["legacy", "p2sh-segwit", "bech32", "bech32m"] {
        addrs.push(node.shop_address(kind).await);
    }
    let data = node.dir.path().join("chainwatch");
    let cfg = config(
        &node,
        &receiver,
        &data,
        &addrs.iter().map(|a| (a.clone(), 3)).collect::<Vec<_>>(),
    );
    let token = CancellationToken::new();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    wait_tip(&data, &node).await;
    let mut txids = vec![];
    for a in &addrs {
        txids.push(node.pay(a, 0.001).await);
    }
    receiver.wait_accepted(4, WAIT).await;
    for _ in 0..3 {
        node.mine(1).await;
    }
    let got = receiver.wait_accepted(16, WAIT).await;
    token.cancel();
    daemon.await.unwrap().unwrap();
    assert!(got.iter().all(|c| c.verified()));
    let expected = expect_history(&[
        ("tx.pending", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.confirmed", 3),
    ]);
    for (txid, addr) in txids.iter().zip(&addrs) {
        assert_eq!(history(&got, txid), expected, "{addr}");
        let c = got
            .iter()
            .find(|c| c.data()["txid"] == txid.as_str())
            .unwrap();
        assert_eq!(c.data()["outputs"][0]["address"], addr.as_str());
        assert_eq!(c.data()["amount_sat"], 100_000);
        let block = got
            .iter()
            .find(|c| c.data()["txid"] == txid.as_str() && c.kind() == "tx.confirmed")
            .unwrap()
            .data()["block"]["hash"]
            .clone();
        let expected = senders_by_core(&node, block.as_str().unwrap(), txid).await;
        for c in got.iter().filter(|c| c.data()["txid"] == txid.as_str()) {
            assert_eq!(
                c.data()["senders"],
                expected,
                "{} of {txid}: the senders Core's getblock 3 names",
                c.kind()
            );
        }
    }
}

/// What Bitcoin Core's own `getblock HASH 3` says `txid`'s inputs spend, as `senders` shows it.
async fn senders_by_core(node: &RealNode, block: &str, txid: &str) -> Value {
    let b = node.call("getblock", json!([block, 3])).await;
    let tx = b["tx"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["txid"] == txid)
        .expect("the transaction is in its block");
    let senders = tx["vin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let prevout = &i["prevout"];
            json!({
                "prevout": format!("{}:{}", i["txid"].as_str().unwrap(), i["vout"]),
                "address": prevout["scriptPubKey"].get("address").cloned().unwrap_or(Value::Null),
                "amount_sat": (prevout["value"].as_f64().unwrap() * 1e8).round() as u64,
            })
        })
        .collect();
    Value::Array(senders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_reorg_fires_reorged_then_confirmations_with_new_ids() {
    let node = RealNode::start().await;
    let receiver = receiver().await;
    let addr = node.shop_address("bech32").await;
    let data = node.dir.path().join("chainwatch");
    let cfg = config(&node, &receiver, &data, &[(addr.clone(), 3)]);
    let token = CancellationToken::new();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    wait_tip(&data, &node).await;
    let txid = node.pay(&addr, 0.5).await;
    receiver.wait_accepted(1, WAIT).await;
    let blocks = node.mine(2).await;
    receiver.wait_accepted(3, WAIT).await;
    // invalidateblock: the payment returns to the mempool; new blocks mine it again.
    node.call("invalidateblock", json!([blocks[0]])).await;
    receiver.wait_accepted(4, WAIT).await;
    node.mine(3).await;
    let got = receiver.wait_accepted(7, WAIT).await;
    token.cancel();
    daemon.await.unwrap().unwrap();
    let expected = expect_history(&[
        ("tx.pending", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.reorged", 0),
        ("tx.confirmation", 1),
        ("tx.confirmation", 2),
        ("tx.confirmed", 3),
    ]);
    assert_eq!(history(&got, &txid), expected);
    let reorged = got.iter().find(|c| c.kind() == "tx.reorged").unwrap();
    assert_eq!(reorged.data()["previous_block"]["hash"], blocks[0].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_answers_decode_like_the_captures() {
    let node = RealNode::start().await;
    use chainwatch::node::ChainSource;
    let info = node.node.chain_info().await.unwrap();
    assert_eq!(info.chain, "regtest");
    assert_eq!(info.blocks, 110);
    let best = node.node.best_block_hash().await.unwrap();
    let block = node.node.block(best).await.unwrap();
    assert_eq!(block.block_hash(), best);
    let header = node.node.block_header(best).await.unwrap();
    assert_eq!((header.height, header.confirmations), (110, 1));
    let zmq = node.node.zmq_notifications().await.unwrap();
    assert_eq!(zmq.len(), 5, "{zmq:?}");
    let err = node.node.block_hash(999_999).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

async fn start_watching(
    node: &RealNode,
    receiver: &Receiver,
    watches: &[(String, u32)],
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let data = node.dir.path().join("chainwatch");
    let cfg = config(node, receiver, &data, watches);
    let token = CancellationToken::new();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    wait_tip(&data, node).await;
    (token, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_bumpfee_is_replaced_and_a_mined_double_spend_is_dropped() {
    let node = RealNode::start().await;
    let receiver = receiver().await;
    let a = node.shop_address("bech32").await;
    let b = node.shop_address("bech32m").await;
    let (token, daemon) = start_watching(&node, &receiver, &[(a.clone(), 1), (b.clone(), 1)]).await;
    let original = node.pay(&a, 0.25).await;
    receiver.wait_accepted(1, WAIT).await;
    let bumped = node.miner.call("bumpfee", json!([original])).await.unwrap();
    let replacement = bumped["txid"].as_str().unwrap().to_string();
    receiver.wait_accepted(3, WAIT).await;
    let paid = node.pay(&b, 0.1).await;
    receiver.wait_accepted(4, WAIT).await;
    let (conflict, _block) = node.mine_double_spend(&paid).await;
    receiver.wait_accepted(5, WAIT).await;
    // generateblock mined only the conflict; the next block takes the replacement.
    node.mine(1).await;
    let got = receiver.wait_accepted(6, WAIT).await;
    token.cancel();
    daemon.await.unwrap().unwrap();
    assert_eq!(
        history(&got, &original),
        expect_history(&[("tx.pending", 0), ("tx.replaced", 0)])
    );
    let replaced = got.iter().find(|c| c.kind() == "tx.replaced").unwrap();
    assert_eq!(replaced.data()["replaced_by"], replacement.as_str());
    assert_eq!(
        history(&got, &paid),
        expect_history(&[("tx.pending", 0), ("tx.dropped", 0)])
    );
    let dropped = got.iter().find(|c| c.kind() == "tx.dropped").unwrap();
    assert_eq!(dropped.data()["reason"], "conflict");
    assert_eq!(dropped.data()["conflicting_txid"], conflict.as_str());
    // The replacement pays the same watch: its own pending, then confirmed.
    assert_eq!(
        history(&got, &replacement),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_restart_with_a_new_cookie_loses_nothing() {
    let mut node = RealNode::start().await;
    let receiver = receiver().await;
    let a = node.shop_address("bech32").await;
    let (token, daemon) = start_watching(&node, &receiver, &[(a.clone(), 2)]).await;
    let txid = node.pay(&a, 0.3).await;
    receiver.wait_accepted(1, WAIT).await;
    let cookie = std::fs::read_to_string(node.cookie()).unwrap();
    node.restart(Duration::from_secs(2)).await;
    assert_ne!(
        std::fs::read_to_string(node.cookie()).unwrap(),
        cookie,
        "bitcoind wrote a new cookie"
    );
    node.mine(2).await;
    let got = receiver.wait_accepted(3, Duration::from_secs(60)).await;
    token.cancel();
    daemon.await.unwrap().unwrap();
    assert_eq!(
        history(&got, &txid),
        expect_history(&[
            ("tx.pending", 0),
            ("tx.confirmation", 1),
            ("tx.confirmed", 2)
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_descriptor_from_listdescriptors_sees_fresh_addresses_and_spends() {
    let node = RealNode::start().await;
    let receiver = receiver().await;
    let listed = node.shop.call("listdescriptors", json!([])).await.unwrap();
    let desc = listed["descriptors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["desc"].as_str().unwrap().starts_with("wpkh(") && d["internal"] == false)
        .unwrap()["desc"]
        .as_str()
        .unwrap()
        .to_string();
    let data = node.dir.path().join("chainwatch");
    let mut cfg = config(&node, &receiver, &data, &[]);
    cfg.watches.push(
        chainwatch::watch::parse_target(
            &desc,
            bitcoin::Network::Regtest,
            Some(3),
            1,
            Some("shop".into()),
            json!({}),
        )
        .unwrap(),
    );
    let token = CancellationToken::new();
    let daemon = tokio::spawn(chainwatch::daemon::run(cfg, token.clone()));
    wait_tip(&data, &node).await;
    let mut txids = vec![];
    for i in 0..6 {
        // Six fresh addresses with a gap limit of 3: each payment makes room for the next.
        let a = node.shop_address("bech32").await;
        txids.push(node.pay(&a, 0.01).await);
        receiver.wait_accepted(i + 1, WAIT).await;
    }
    node.mine(1).await;
    receiver.wait_accepted(12, WAIT).await;
    // The shop spends: its inputs are coins the watch received.
    let miner_addr = node.miner.call("getnewaddress", json!([])).await.unwrap();
    let spend = node
        .shop
        .call("sendtoaddress", json!([miner_addr, 0.015, "", "", true]))
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    receiver.wait_accepted(13, WAIT).await;
    node.mine(1).await;
    let got = receiver.wait_accepted(14, WAIT).await;
    token.cancel();
    daemon.await.unwrap().unwrap();
    for (i, txid) in txids.iter().enumerate() {
        assert_eq!(
            history(&got, txid),
            expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)]),
            "payment {i}"
        );
        let c = got
            .iter()
            .find(|c| c.data()["txid"] == txid.as_str())
            .unwrap();
        assert_eq!(
            c.data()["outputs"][0]["derivation_index"],
            i,
            "Core's getnewaddress order is the derivation order"
        );
    }
    assert_eq!(
        history(&got, &spend),
        expect_history(&[("tx.pending", 0), ("tx.confirmed", 1)])
    );
    let s = got
        .iter()
        .find(|c| c.data()["txid"] == spend.as_str())
        .unwrap();
    assert!(
        s.data()["inputs"].as_array().unwrap().len() >= 2,
        "spends at least two received coins: {}",
        s.body
    );
    assert!(
        s.data()["amount_sat"].as_i64().unwrap() < 0,
        "money left: {}",
        s.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_block_filters_are_read_checked_and_guide_a_rescan() {
    use chainwatch::node::ChainSource;
    // With -rest: the blocks the rescan reads come as Core's raw bytes.
    let node = RealNode::start_with(&["-blockfilterindex=1", "-rest=1"]).await;
    let receiver = receiver().await;
    let mut paid = vec![];
    for kind in ["bech32", "bech32m", "legacy"] {
        let a = node.shop_address(kind).await;
        let txid = node.pay(&a, 0.01).await;
        let block = node.mine(1).await[0].clone();
        paid.push((a, txid, block));
        node.mine(20).await;
    }
    for _ in 0..200 {
        let info = node
            .call("getindexinfo", json!(["basic block filter index"]))
            .await;
        if info["basic block filter index"]["synced"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Core's own filters, through our client: well formed, chained, and saying which blocks
    // may pay each address.
    let tip = node.node.chain_info().await.unwrap().blocks;
    let hashes = node.node.block_hashes(111, tip - 110).await.unwrap();
    let filters: Vec<_> = (node.node.block_filters(&hashes).await.unwrap())
        .into_iter()
        .map(|f| f.expect("Core's filter passes the checks"))
        .collect();
    assert!(
        filters.windows(2).all(|w| w[1].follows(&w[0].header)),
        "Core's filters chain"
    );
    for (address, _, block) in &paid {
        let script = address
            .parse::<bitcoin::Address<_>>()
            .unwrap()
            .assume_checked()
            .script_pubkey();
        let holding: Vec<String> = (hashes.iter().zip(&filters))
            .filter(|(h, f)| f.may_hold(h, std::slice::from_ref(&script)))
            .map(|(h, _)| h.to_string())
            .collect();
        assert_eq!(
            &holding,
            std::slice::from_ref(block),
            "only the block paying {address} may hold it"
        );
    }
    // And a rescan over them finds every payment, in its block.
    let (token, daemon) = start_watching(&node, &receiver, &[]).await;
    let data = node.dir.path().join("chainwatch");
    let mut store = chainwatch::store::Store::open(&data).unwrap();
    for (address, _, _) in &paid {
        let w = chainwatch::watch::parse_target(
            address,
            bitcoin::Network::Regtest,
            None,
            1,
            Some("shop".into()),
            json!({}),
        )
        .unwrap();
        store.upsert_watch(&w, "test", 1).unwrap();
        store.request_rescan(&w.id, 111).unwrap();
    }
    let got = receiver.wait_accepted(3, WAIT).await;
    token.cancel();
    daemon.await.unwrap().unwrap();
    for (address, txid, block) in &paid {
        let c = got
            .iter()
            .find(|c| c.data()["txid"] == txid.as_str())
            .unwrap_or_else(|| panic!("no event for the payment to {address}"));
        assert_eq!(c.kind(), "tx.confirmed");
        assert_eq!(c.data()["block"]["hash"], block.as_str());
    }
}
