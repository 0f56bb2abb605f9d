//! `simnode`: a simulated regtest bitcoind. It serves the JSON-RPC subset chainwatch uses and
//! publishes the ZMQ topics exactly as Bitcoin Core does (see `tests/fixtures/bitcoind-regtest`),
//! so the real follower, RPC client and ZMQ subscriber run against it unchanged. Tests and
//! `chainwatch demo` drive it with helpers: pay, mine, reorg, restart.

pub mod chain;
mod described;
mod filters;
mod memory;
pub mod mining;
pub mod pool;
mod rest;
mod rpc;
pub mod verbose;
mod zmq_pub;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bitcoin::{Address, BlockHash, Network, OutPoint, ScriptBuf, Transaction, Txid};

pub use chain::{Published, SimChain, SimError};

/// The miner address of the captured session; coinbases pay it.
pub const MINER_ADDRESS: &str = "bcrt1q97t2ayg7ypwhc4wgc6gcwk9qgynzkpp35gvc6m";
/// Fee every simulated payment pays, in satoshis.
pub const PAYMENT_FEE: u64 = 2_820;

/// Something done to the node between two calls, without its lock held.
pub type CallHook = Box<dyn FnOnce(&SimNode) + Send>;

pub(crate) struct State {
    pub chain: SimChain,
    /// Block timestamps advance one second per block from here.
    pub clock: u32,
    pub cookie: String,
    /// RPC calls still to answer with -28 (warming up).
    pub warmup_calls: u32,
    /// Stopped: a request on a connection that outlived the server is dropped unanswered.
    pub down: bool,
    /// RPC calls still to answer with a malformed body.
    pub garbage_calls: u32,
    /// How long each `getblock` takes, as on a node reading blocks from a slow disk.
    pub block_read_delay: std::time::Duration,
    /// `-txindex`: `getrawtransaction` also answers for confirmed transactions.
    pub txindex: bool,
    /// `-rest`: blocks are served raw at `/rest/block/HASH.bin`.
    pub rest: bool,
    /// A block REST serves altered under its true header (in memory only).
    pub forged_rest_block: Option<BlockHash>,
    /// `-blockfilterindex`: the filters `getblockfilter` has built; `None` when off.
    pub block_filters: Option<filters::FilterIndex>,
    /// Asks for block filters still to fail as a whole (in memory only).
    pub broken_filter_calls: u32,
    /// A block whose filter is served emptied, under its true header (in memory only).
    pub forged_filter: Option<BlockHash>,
    /// Asks for more filters than this at once are answered "too large" (in memory only).
    pub filter_answer_limit: Option<usize>,
    /// Outpoints the simulated wallet has spent.
    pub spent: std::collections::HashSet<OutPoint>,
    pub miner: ScriptBuf,
    /// Change outputs of the simulated wallet's payments, spendable at once.
    pub change: Vec<(OutPoint, u64)>,
    pub publisher: Option<zmq_pub::Publisher>,
    /// Every message published, when recording (tests compare it with the captures).
    pub log: Option<Vec<Published>>,
    /// Drops published ZMQ messages at random: (probability, RNG).
    pub drop: Option<(f64, rand::rngs::StdRng)>,
    /// Calls answered, by method: what a follower asked. Over JSON-RPC each call of a batch
    /// counts; in memory each ask (`block_filters` of many blocks is one).
    pub calls: std::collections::HashMap<String, u32>,
    /// In memory: what to do to the node once a method has been asked so many times (a reorg
    /// between two asks of a follower).
    pub on_call: Option<(String, u32, CallHook)>,
}

impl State {
    fn flush(&mut self) {
        let mut msgs = self.chain.take_published();
        if let Some(log) = &mut self.log {
            log.extend(msgs.iter().cloned());
        }
        if let Some((p, rng)) = &mut self.drop {
            use rand::RngExt;
            msgs.retain(|_| !rng.random_bool(*p));
        }
        if let Some(p) = &self.publisher {
            p.send(msgs);
        }
    }
}

/// A running simulated node.
#[derive(Clone)]
pub struct SimNode {
    state: Arc<Mutex<State>>,
    dir: PathBuf,
    rpc_addr: SocketAddr,
    zmq: Vec<(String, String)>,
    /// Cancelling it shuts the RPC server down, closing kept-alive connections too.
    server: Arc<Mutex<Option<tokio_util::sync::CancellationToken>>>,
}

fn new_cookie() -> String {
    use rand::RngExt;
    let bytes: [u8; 32] = rand::rng().random();
    format!("__cookie__:{}", hex::encode(bytes))
}

impl SimNode {
    /// Starts RPC on an ephemeral loopback port and one ZMQ publisher per topic; writes the
    /// cookie to `dir/regtest/.cookie` as bitcoind does.
    pub async fn start(dir: &Path) -> std::io::Result<SimNode> {
        SimNode::start_inner(dir, false, true).await
    }

    /// As `start`, keeping a log of every ZMQ message (genesis included) for `published`.
    pub async fn start_recording(dir: &Path) -> std::io::Result<SimNode> {
        SimNode::start_inner(dir, true, true).await
    }

    /// A node started without any -zmqpub option: `getzmqnotifications` lists nothing.
    pub async fn start_without_zmq(dir: &Path) -> std::io::Result<SimNode> {
        SimNode::start_inner(dir, false, false).await
    }

    /// A node with no sockets at all: it is a `ChainSource` itself (see `memory.rs`), and what
    /// it would publish over ZMQ is kept for `take_zmq`. For unit tests of the follower.
    pub fn in_memory() -> SimNode {
        let node = SimNode {
            state: Arc::new(Mutex::new(SimNode::fresh_state(None, true))),
            dir: PathBuf::new(),
            rpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            zmq: vec![],
            server: Arc::new(Mutex::new(None)),
        };
        // Genesis's messages are published before anyone subscribes.
        node.lock().log = Some(vec![]);
        node
    }

    fn fresh_state(publisher: Option<zmq_pub::Publisher>, record: bool) -> State {
        let miner = MINER_ADDRESS
            .parse::<Address<_>>()
            .expect("valid")
            .assume_checked()
            .script_pubkey();
        let mut state = State {
            chain: SimChain::new(),
            clock: 1_764_000_000,
            cookie: new_cookie(),
            warmup_calls: 0,
            down: false,
            garbage_calls: 0,
            block_read_delay: std::time::Duration::ZERO,
            txindex: false,
            rest: false,
            forged_rest_block: None,
            block_filters: None,
            broken_filter_calls: 0,
            forged_filter: None,
            filter_answer_limit: None,
            spent: Default::default(),
            miner,
            change: vec![],
            publisher,
            log: record.then(Vec::new),
            drop: None,
            calls: Default::default(),
            on_call: None,
        };
        state.flush();
        state
    }

    async fn start_inner(dir: &Path, record: bool, with_zmq: bool) -> std::io::Result<SimNode> {
        let (publisher, zmq) = if with_zmq {
            let (p, list) = zmq_pub::Publisher::bind().map_err(std::io::Error::other)?;
            (Some(p), list)
        } else {
            (None, vec![])
        };
        let state = SimNode::fresh_state(publisher, record);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let rpc_addr = listener.local_addr()?;
        let node = SimNode {
            state: Arc::new(Mutex::new(state)),
            dir: dir.to_path_buf(),
            rpc_addr,
            zmq,
            server: Arc::new(Mutex::new(None)),
        };
        node.write_cookie()?;
        node.serve(listener);
        Ok(node)
    }

    /// Every ZMQ message published so far (only when started with `start_recording`).
    pub fn published(&self) -> Vec<Published> {
        self.lock().log.clone().unwrap_or_default()
    }

    /// From now on drops each ZMQ message with probability `p` (seeded, so runs repeat).
    pub fn drop_zmq(&self, p: f64, seed: u64) {
        use rand::SeedableRng;
        self.lock().drop = Some((p, rand::rngs::StdRng::seed_from_u64(seed)));
    }

    /// Replaces a mempool transaction (as `bumpfee` does): same inputs, `outputs`, a higher fee.
    /// bitcoind publishes R for the original, then A for the replacement.
    pub fn replace(&self, txid: Txid, outputs: &[(ScriptBuf, u64)]) -> Txid {
        let mut s = self.lock();
        let tx = conflicting_tx(&s, txid, outputs);
        let new = s.chain.accept_tx(tx).expect("replacement accepted");
        s.flush();
        new
    }

    /// Spends `coins` (anyone's: signatures are not checked) into `outputs`; enters the mempool.
    pub fn spend(&self, coins: &[(OutPoint, u64)], outputs: &[(ScriptBuf, u64)]) -> Txid {
        let mut s = self.lock();
        let miner = s.miner.clone();
        let tx = mining::payment(coins, outputs, &miner, PAYMENT_FEE);
        let txid = s.chain.accept_tx(tx).expect("spend accepted");
        s.flush();
        txid
    }

    /// A transaction spending the same inputs as mempool transaction `txid`, not broadcast:
    /// mined with `mine_block_with`, it is the double-spend that drops `txid`.
    pub fn double_spend(&self, txid: Txid, outputs: &[(ScriptBuf, u64)]) -> Transaction {
        conflicting_tx(&self.lock(), txid, outputs)
    }

    /// Runs as with `-blockfilterindex`: `getblockfilter` serves BIP 158 basic filters.
    pub fn set_block_filters(&self, on: bool) {
        let mut s = self.lock();
        if on != s.block_filters.is_some() {
            s.block_filters = on.then(Default::default);
        }
    }

    /// The next `n` asks for block filters fail as a whole with an answer that is not one (in
    /// memory only): as a node whose `rpcwhitelist` leaves `getblockfilter` out answers.
    pub fn set_broken_filter_calls(&self, n: u32) {
        self.lock().broken_filter_calls = n;
    }

    /// Serves block `hash`'s filter with no elements (so it would hide everything the block
    /// holds) under its true header (in memory only): a forgery only the header chain shows.
    pub fn forge_filter(&self, hash: BlockHash) {
        self.lock().forged_filter = Some(hash);
    }

    /// Answers an ask for more than `n` block filters as too large to read (in memory only).
    pub fn limit_filter_answers(&self, n: usize) {
        self.lock().filter_answer_limit = Some(n);
    }

    /// Runs as with `-txindex`: confirmed transactions are served by `getrawtransaction`.
    pub fn set_txindex(&self, on: bool) {
        self.lock().txindex = on;
    }

    /// Runs as with `-rest`: blocks are served raw through REST.
    pub fn set_rest(&self, on: bool) {
        self.lock().rest = on;
    }

    /// REST serves block `hash` with its body altered under its true header.
    pub fn forge_rest_block(&self, hash: Option<BlockHash>) {
        self.lock().forged_rest_block = hash;
    }

    /// The next `n` RPC calls get HTTP 200 with a body that is not JSON.
    pub fn set_garbage_calls(&self, n: u32) {
        self.lock().garbage_calls = n;
    }

    /// Every `getblock` answer waits `delay` first (a long rescan, on a small chain).
    pub fn set_block_read_delay(&self, delay: std::time::Duration) {
        self.lock().block_read_delay = delay;
    }

    /// Publishes an arbitrary message on a topic's socket (with the topic's next counter), to
    /// see how a subscriber copes with malformed bodies.
    pub fn publish_raw(&self, topic: &'static str, body: Vec<u8>) {
        let mut s = self.lock();
        s.chain.publish_raw(topic, body);
        s.flush();
    }

    /// How many block reads (`getblock`, REST) `set_block_read_delay` has held so far,
    /// counted as each begins to wait.
    pub fn reads_held(&self) -> u32 {
        self.calls("held block read")
    }

    /// How many `method` calls the node answered, over JSON-RPC or in memory.
    pub fn calls(&self, method: &str) -> u32 {
        self.lock().calls.get(method).copied().unwrap_or(0)
    }

    /// The serialized size of a block the node holds (0 for one it does not).
    pub fn block_size(&self, hash: BlockHash) -> usize {
        self.lock()
            .chain
            .block(&hash)
            .map_or(0, |(b, _)| bitcoin::consensus::serialize(b).len())
    }

    /// A transaction the mempool holds.
    pub fn mempool_entry(&self, txid: Txid) -> Option<Transaction> {
        self.lock().chain.mempool_tx(&txid).ok().cloned()
    }

    /// Drops a transaction from the mempool for no visible reason (limits, expiry): R only.
    pub fn evict(&self, txid: Txid) {
        let mut s = self.lock();
        s.chain.remove_tx(txid);
        s.flush();
    }

    /// The next `n` RPC calls answer -28 (warming up), as bitcoind does while it starts.
    pub fn set_warmup_calls(&self, n: u32) {
        self.lock().warmup_calls = n;
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = rpc::router(self.clone());
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        *self.server.lock().expect("server lock") = Some(token);
    }

    fn write_cookie(&self) -> std::io::Result<()> {
        let path = self.cookie_path();
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        std::fs::write(path, self.lock().cookie.as_bytes())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("simnode state lock")
    }

    fn count_held_read(&self) {
        *self
            .lock()
            .calls
            .entry("held block read".into())
            .or_default() += 1;
    }

    pub fn rpc_url(&self) -> String {
        format!("http://{}", self.rpc_addr)
    }

    pub fn cookie_path(&self) -> PathBuf {
        self.dir.join("regtest").join(".cookie")
    }

    pub fn height(&self) -> u32 {
        self.lock().chain.height()
    }

    pub fn tip(&self) -> BlockHash {
        self.lock().chain.tip()
    }

    pub fn block_hash(&self, height: u32) -> BlockHash {
        self.lock()
            .chain
            .block_hash(height)
            .expect("height on the active chain")
    }

    /// Mines `n` blocks holding the whole mempool (the first one) to the miner address.
    pub fn mine(&self, n: u32) -> Vec<BlockHash> {
        let mut s = self.lock();
        let miner = s.miner.clone();
        let hashes = (0..n).map(|_| mine_one(&mut s, &miner, true)).collect();
        s.flush();
        hashes
    }

    /// Mines `n` blocks that leave the mempool alone.
    pub fn mine_empty(&self, n: u32) -> Vec<BlockHash> {
        let mut s = self.lock();
        let miner = s.miner.clone();
        let hashes = (0..n).map(|_| mine_one(&mut s, &miner, false)).collect();
        s.flush();
        hashes
    }

    /// Pays `amount_sat` to `address` from mature coinbases; the payment enters the mempool.
    pub fn pay(&self, address: &str, amount_sat: u64) -> Txid {
        let script = regtest_script(address);
        self.pay_script(&[(script, amount_sat)])
    }

    /// A payment to `address` from the simulated wallet, not broadcast.
    pub fn payment_tx(&self, address: &str, amount_sat: u64) -> Transaction {
        let script = regtest_script(address);
        let mut s = self.lock();
        build_payment(&mut s, &[(script, amount_sat)])
    }

    /// Mines one block holding exactly `txs` (as `generateblock` does), leaving the mempool alone
    /// except for conflicts.
    pub fn mine_block_with(&self, txs: Vec<Transaction>) -> BlockHash {
        let mut s = self.lock();
        let prev = s.chain.tip();
        let height = s.chain.height() + 1;
        s.clock += 1;
        let fees = txs.len() as u64 * PAYMENT_FEE;
        let miner = s.miner.clone();
        let block = mining::build_block(prev, height, s.clock, &miner, txs, fees);
        let hash = s.chain.add_block(block).expect("extends the tip");
        s.flush();
        hash
    }

    /// The block `mine(1)` would mine next (with the mempool, or empty), built but not
    /// submitted: a test can forge a copy of it and publish that first.
    pub fn next_block(&self, with_mempool: bool) -> bitcoin::Block {
        let s = self.lock();
        let txs: Vec<Transaction> = if with_mempool {
            s.chain.mempool().iter().cloned().collect()
        } else {
            vec![]
        };
        let fees = txs.len() as u64 * PAYMENT_FEE;
        mining::build_block(
            s.chain.tip(),
            s.chain.height() + 1,
            s.clock + 1,
            &s.miner,
            txs,
            fees,
        )
    }

    pub fn pay_script(&self, outputs: &[(ScriptBuf, u64)]) -> Txid {
        let mut s = self.lock();
        let tx = build_payment(&mut s, outputs);
        let txid = s.chain.accept_tx(tx).expect("fresh payment");
        s.flush();
        txid
    }
}

/// Spends wallet coins into `outputs`, keeping the change for later payments.
fn build_payment(s: &mut State, outputs: &[(ScriptBuf, u64)]) -> Transaction {
    {
        let total: u64 = outputs.iter().map(|o| o.1).sum::<u64>() + PAYMENT_FEE;
        let coins = wallet_coins(s, total);
        for c in &coins {
            s.spent.insert(c.0);
        }
        let miner = s.miner.clone();
        let tx = mining::payment(&coins, outputs, &miner, PAYMENT_FEE);
        let txid = tx.compute_txid();
        if tx.output.len() > outputs.len() {
            let vout = (tx.output.len() - 1) as u32;
            let value = tx.output[vout as usize].value.to_sat();
            s.change.push((OutPoint::new(txid, vout), value));
        }
        tx
    }
}

impl SimNode {
    /// Accepts a raw transaction into the mempool.
    pub fn send_raw(&self, tx: Transaction) -> Result<Txid, SimError> {
        let mut s = self.lock();
        let r = s.chain.accept_tx(tx);
        s.flush();
        r
    }

    pub fn submit_block(&self, block: bitcoin::Block) -> Result<BlockHash, SimError> {
        let mut s = self.lock();
        let r = s.chain.add_block(block);
        s.flush();
        r
    }

    pub fn invalidate(&self, hash: BlockHash) -> Result<(), SimError> {
        let mut s = self.lock();
        let r = s.chain.invalidate(hash);
        s.flush();
        r
    }

    pub fn reconsider(&self, hash: BlockHash) -> Result<(), SimError> {
        let mut s = self.lock();
        let r = s.chain.reconsider(hash);
        s.flush();
        r
    }

    /// Replaces the top `depth` blocks with `depth + 1` new ones. With `keep_txs` the
    /// disconnected transactions are mined again in the first new block; without, they stay
    /// in the mempool.
    pub fn reorg(&self, depth: u32, keep_txs: bool) -> Vec<BlockHash> {
        let height = self.height();
        assert!(
            depth >= 1 && depth <= height,
            "reorg depth {depth} at height {height}"
        );
        let first = self.block_hash(height - depth + 1);
        self.invalidate(first).expect("known block");
        if keep_txs {
            let mut v = self.mine(1);
            v.extend(self.mine_empty(depth));
            v
        } else {
            self.mine_empty(depth + 1)
        }
    }

    /// Takes the RPC server down (connections refused) until `restart`.
    pub fn stop(&self) {
        if let Some(t) = self.server.lock().expect("server lock").take() {
            t.cancel();
        }
        self.lock().down = true;
    }

    /// Starts again as bitcoind would after a restart: a new cookie, ZMQ counters from zero,
    /// and `warmup_calls` answers of -28 first.
    pub async fn restart(&self, warmup_calls: u32) -> std::io::Result<()> {
        self.stop();
        {
            let mut s = self.lock();
            s.chain.restart();
            s.cookie = new_cookie();
            s.warmup_calls = warmup_calls;
            s.down = false;
        }
        self.write_cookie()?;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.rpc_addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
        Ok(())
    }
}

/// The script of a regtest address; helpers panic on a bad one, as tests want.
fn regtest_script(address: &str) -> ScriptBuf {
    address
        .parse::<Address<_>>()
        .expect("address")
        .require_network(Network::Regtest)
        .expect("regtest address")
        .script_pubkey()
}

fn mine_one(s: &mut State, to: &ScriptBuf, with_mempool: bool) -> BlockHash {
    let prev = s.chain.tip();
    let height = s.chain.height() + 1;
    s.clock += 1;
    let txs: Vec<Transaction> = if with_mempool {
        s.chain.mempool().iter().cloned().collect()
    } else {
        vec![]
    };
    let fees = txs.len() as u64 * PAYMENT_FEE;
    let block = mining::build_block(prev, height, s.clock, to, txs, fees);
    s.chain.add_block(block).expect("extends the tip")
}

/// Coins to cover `total`: mature coinbases of the active chain first (so payments are
/// independent of each other), then change of earlier payments.
fn wallet_coins(s: &State, total: u64) -> Vec<(OutPoint, u64)> {
    let tip = s.chain.height();
    let mut coins = vec![];
    let mut sum = 0;
    let coinbases = (1..=tip.saturating_sub(100)).filter_map(|h| {
        let hash = s.chain.block_hash(h).expect("active");
        let cb = &s.chain.block(&hash).expect("known").0.txdata[0];
        (cb.output[0].script_pubkey == s.miner).then(|| {
            (
                OutPoint::new(cb.compute_txid(), 0),
                cb.output[0].value.to_sat(),
            )
        })
    });
    let change = s.change.iter().copied();
    for (op, value) in coinbases.collect::<Vec<_>>().into_iter().chain(change) {
        if s.spent.contains(&op) {
            continue;
        }
        sum += value;
        coins.push((op, value));
        if sum >= total {
            return coins;
        }
    }
    panic!("simnode wallet has {sum} sat spendable, needs {total}: mine at least 101 blocks first");
}

fn conflicting_tx(s: &State, txid: Txid, outputs: &[(ScriptBuf, u64)]) -> Transaction {
    let original = s
        .chain
        .mempool_tx(&txid)
        .expect("transaction in the mempool")
        .clone();
    let coins: Vec<(OutPoint, u64)> = original
        .input
        .iter()
        .map(|i| (i.previous_output, coin_value(s, &i.previous_output)))
        .collect();
    mining::payment(&coins, outputs, &s.miner, PAYMENT_FEE * 2)
}

/// The value of an outpoint the simulated wallet spent (a coinbase or its own change).
fn coin_value(s: &State, op: &OutPoint) -> u64 {
    if let Some((_, v)) = s.change.iter().find(|(o, _)| o == op) {
        return *v;
    }
    for h in 1..=s.chain.height() {
        let hash = s.chain.block_hash(h).expect("active");
        let cb = &s.chain.block(&hash).expect("known").0.txdata[0];
        if cb.compute_txid() == op.txid {
            return cb.output[op.vout as usize].value.to_sat();
        }
    }
    0
}
