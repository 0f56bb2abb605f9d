//! The same scenarios against a real bitcoind: `BITCOIND_EXE=/path/to/bitcoind cargo test -- --ignored`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chainwatch::config::RpcAuth;
use chainwatch::node::RpcClient;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct RealNode {
    pub dir: tempfile::TempDir,
    child: Child,
    pub rpc_url: String,
    pub node: RpcClient,
    miner: RpcClient,
    shop: RpcClient,
    miner_address: String,
}

impl RealNode {
    pub async fn start() -> RealNode {
        let exe = std::env::var("BITCOIND_EXE").expect("BITCOIND_EXE names a bitcoind");
        let dir = tempfile::tempdir().unwrap();
        let rpc_port = free_port();
        let mut cmd = Command::new(exe);
        cmd.arg("-regtest")
            .arg(format!("-datadir={}", dir.path().display()))
            .arg(format!("-rpcport={rpc_port}"))
            .args([
                "-listen=0",
                "-server=1",
                "-txindex=0",
                "-fallbackfee=0.0002",
                "-printtoconsole=0",
                "-rpcbind=127.0.0.1",
                "-rpcallowip=127.0.0.1",
            ]);
        for topic in ["sequence", "rawtx", "rawblock", "hashtx", "hashblock"] {
            cmd.arg(format!("-zmqpub{topic}=tcp://127.0.0.1:{}", free_port()));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bitcoind starts");
        let rpc_url = format!("http://127.0.0.1:{rpc_port}");
        let cookie = dir.path().join("regtest/.cookie");
        let client = |path: &str| {
            RpcClient::new(&format!("{rpc_url}{path}"), RpcAuth::Cookie(cookie.clone()))
        };
        let node = client("");
        for _ in 0..200 {
            if node.call("getblockchaininfo", json!([])).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node.call("createwallet", json!(["miner"]))
            .await
            .expect("miner wallet");
        node.call("createwallet", json!(["shop"]))
            .await
            .expect("shop wallet");
        let miner = client("/wallet/miner");
        let shop = client("/wallet/shop");
        let miner_address = miner
            .call("getnewaddress", json!([]))
            .await
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        let n = RealNode {
            dir,
            child,
            rpc_url,
            node,
            miner,
            shop,
            miner_address,
        };
        n.mine(101).await;
        n
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

    pub async fn mine(&self, n: u32) -> Vec<String> {
        let r = self
            .node
            .call("generatetoaddress", json!([n, self.miner_address]))
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

impl Drop for RealNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(
    node: &RealNode,
    receiver: &TestReceiver,
    data: &std::path::Path,
    watches: &[(String, u32)],
) -> chainwatch::config::Config {
    let mut t = format!(
        "network = \"regtest\"\ndata_dir = {:?}\n[bitcoind]\nrpc_url = \"{}\"\ncookie_file = {:?}\npoll_interval = \"500ms\"\n[[endpoints]]\nname = \"shop\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        data.display().to_string(),
        node.rpc_url,
        node.cookie().display().to_string(),
        receiver.url
    );
    for (a, c) in watches {
        t.push_str(&format!(
            "[[watches]]\naddress = \"{a}\"\nconfirmations = {c}\n"
        ));
    }
    chainwatch::config::Config::parse(&t, "real-node test", None).unwrap()
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
    let receiver = TestReceiver::start().await;
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
    assert!(got.iter().all(|c| c.verified));
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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bitcoind: set BITCOIND_EXE"]
async fn real_node_reorg_fires_reorged_then_confirmations_with_new_ids() {
    let node = RealNode::start().await;
    let receiver = TestReceiver::start().await;
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
    assert_eq!(info.blocks, 101);
    let best = node.node.best_block_hash().await.unwrap();
    let block = node.node.block(best).await.unwrap();
    assert_eq!(block.block_hash(), best);
    let header = node.node.block_header(best).await.unwrap();
    assert_eq!((header.height, header.confirmations), (101, 1));
    let zmq = node.node.zmq_notifications().await.unwrap();
    assert_eq!(zmq.len(), 5, "{zmq:?}");
    let err = node.node.block_hash(999_999).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}
