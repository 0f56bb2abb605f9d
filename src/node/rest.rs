//! Blocks read through bitcoind's REST interface (`-rest`), when it is on: the block file's raw
//! bytes, where `getblock` sends them as hex inside JSON, twice the bytes to write, send, parse
//! and decode. REST is optional and unauthenticated: a node without it answers 404, and blocks
//! are then read over JSON-RPC, with REST tried again a while later. A block read here is as
//! hostile as any answer: it must be at most the largest block there can be, decode exactly,
//! and prove itself the block asked for.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitcoin::{Block, BlockHash};

use crate::proof::MAX_BLOCK_SIZE;

/// How long blocks are read over JSON-RPC after REST failed, before REST is tried again (a
/// node restarted with `-rest`).
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// REST failures in a row, of any kind, after which blocks are read with getblock for a
/// while: a proxy in front of the node that does not pass REST, or a broken answer, is not
/// paid for at every block. Only failures JSON-RPC answered through count (`failed`).
const MAX_FAILURES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not known to work yet, with the failures in a row so far.
    Untried(u32),
    /// Worked last time, with the failures in a row since.
    On(u32),
    Off(Instant),
}

/// Why one REST read gave no block. Every one means: read this block over JSON-RPC.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("HTTP {status}: {text:?}")]
    Status { status: u16, text: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("its answer is larger than {MAX_BLOCK_SIZE} bytes")]
    TooLarge,
    #[error("its answer is not the block asked for: {0}")]
    Bad(String),
}

pub struct RestBlocks {
    /// `scheme://host:port` of the RPC URL, without its path or credentials; `None` when the
    /// URL has no such form.
    base: Option<String>,
    state: Mutex<State>,
}

impl RestBlocks {
    pub fn new(rpc_url: &str) -> RestBlocks {
        RestBlocks {
            base: base_of(rpc_url),
            state: Mutex::new(State::Untried(0)),
        }
    }

    /// Whether the next block is worth asking of REST.
    pub fn worth_trying(&self) -> bool {
        self.base.is_some()
            && match *self.state.lock().expect("rest state") {
                State::Untried(_) | State::On(_) => true,
                State::Off(since) => since.elapsed() >= RETRY_AFTER,
            }
    }

    /// The block `hash`, or why REST gave none. Whether REST is used is logged when that
    /// changes, so an operator learns it once. A failure is judged only once JSON-RPC has
    /// answered for the same block (`failed`): while the node is down or restarting, REST
    /// fails with it, and is not the one to blame.
    pub async fn block(&self, http: &reqwest::Client, hash: BlockHash) -> Result<Block, RestError> {
        let base = self.base.as_deref().unwrap_or_default();
        let answer = read(http, &format!("{base}/rest/block/{hash}.bin"), hash).await;
        match &answer {
            Ok(_) => {
                let mut state = self.state.lock().expect("rest state");
                if !matches!(*state, State::On(_)) {
                    tracing::info!("reading blocks through bitcoind's REST interface");
                }
                *state = State::On(0);
            }
            Err(e @ RestError::Bad(_)) => {
                tracing::warn!(%hash, reason = %e, "bitcoind's REST interface sent a bad block; asking getblock");
            }
            Err(_) => {}
        }
        answer
    }

    /// Counts `e`, REST's failure to give a block that JSON-RPC then gave: after a few in a
    /// row, or one that says REST is off, blocks are read with `getblock` for a while.
    pub fn failed(&self, e: &RestError) {
        let mut state = self.state.lock().expect("rest state");
        let failures = match *state {
            State::Untried(n) | State::On(n) => n + 1,
            State::Off(_) => MAX_FAILURES,
        };
        *state = match e.means_off() || failures >= MAX_FAILURES {
            true => {
                if !matches!(*state, State::Off(_)) {
                    tracing::info!(
                        reason = %e,
                        "bitcoind's REST interface is off or failing: reading blocks with getblock for 10 minutes (bitcoind's -rest makes rescans faster)"
                    );
                }
                State::Off(Instant::now())
            }
            false if matches!(*state, State::On(_)) => State::On(failures),
            false => State::Untried(failures),
        };
    }
}

impl RestError {
    /// The answer of a node whose REST interface is off, or kept from us: bitcoind without
    /// `-rest` answers 404 with no body, where a missing block's 404 names the block.
    fn means_off(&self) -> bool {
        match self {
            RestError::Status { status: 404, text } => text.is_empty(),
            RestError::Status { status, .. } => matches!(status, 401 | 403 | 405),
            _ => false,
        }
    }
}

async fn read(http: &reqwest::Client, url: &str, hash: BlockHash) -> Result<Block, RestError> {
    let unreachable = |e: reqwest::Error| RestError::Unreachable(e.without_url().to_string());
    let mut resp = http.get(url).send().await.map_err(unreachable)?;
    let status = resp.status().as_u16();
    if status != 200 {
        // Core's error texts are a line; what else comes is not read past its first kilobyte.
        let (text, _) = crate::net::body_prefix(&mut resp, 1024).await;
        let text = String::from_utf8_lossy(&text[..text.len().min(200)]);
        let text = text.trim().to_string();
        return Err(RestError::Status { status, text });
    }
    let body = super::body_within(resp, MAX_BLOCK_SIZE)
        .await
        .map_err(unreachable)?
        .ok_or(RestError::TooLarge)?;
    super::decode_block(body.len(), move || proven_block(&body, hash))
        .await
        .unwrap_or_else(|| Err(RestError::Unreachable("shutting down".into())))
}

fn proven_block(body: &[u8], hash: BlockHash) -> Result<Block, RestError> {
    crate::proof::decode_block(body, hash).map_err(|e| RestError::Bad(e.to_string()))
}

/// `scheme://host:port` of `url`: REST lives beside JSON-RPC, at the root, and needs no
/// credentials, so the URL's path (a wallet's) and user information are dropped.
fn base_of(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    // An IPv6 host comes with its brackets.
    let host = u.host_str()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    Some(match u.port() {
        Some(port) => format!("{}://{host}:{port}", u.scheme()),
        None => format!("{}://{host}", u.scheme()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::rpc::tests::server;
    use bitcoin::hashes::Hash as _;

    async fn ask(url: &str) -> Result<Block, RestError> {
        crate::net::install_crypto_provider();
        let rest = RestBlocks::new(url);
        rest.block(&reqwest::Client::new(), BlockHash::all_zeros())
            .await
    }

    #[tokio::test]
    async fn a_block_larger_than_any_valid_one_is_not_read() {
        let url = server("HTTP/1.1 200 OK\r\ncontent-length: 4000001\r\n\r\n", 0).await;
        let e = ask(&url).await.unwrap_err();
        assert!(matches!(e, RestError::TooLarge), "announced too large: {e}");
        let url = server("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", 8).await;
        let e = ask(&url).await.unwrap_err();
        assert!(matches!(e, RestError::TooLarge), "endless: {e}");
    }

    #[tokio::test]
    async fn three_judged_failures_in_a_row_of_any_kind_turn_rest_off_and_an_endless_error_is_cut()
    {
        crate::net::install_crypto_provider();
        let url = server(
            "HTTP/1.1 500 Oops\r\ntransfer-encoding: chunked\r\n\r\n",
            64,
        )
        .await;
        let rest = RestBlocks::new(&url);
        let http = reqwest::Client::new();
        for _ in 1..=3 {
            rest.block(&http, BlockHash::all_zeros()).await.unwrap_err();
        }
        assert!(
            rest.worth_trying(),
            "failures not judged (`failed`) count for nothing"
        );
        for n in 1..=3 {
            assert!(rest.worth_trying(), "still tried after {} failures", n - 1);
            let e = rest.block(&http, BlockHash::all_zeros()).await.unwrap_err();
            assert!(
                matches!(&e, RestError::Status { status: 500, text } if text.len() <= 200),
                "{e}"
            );
            rest.failed(&e);
        }
        assert!(!rest.worth_trying(), "off after three failures in a row");
    }

    #[tokio::test]
    async fn only_an_empty_404_or_a_refusal_means_rest_is_off() {
        for (head, off) in [
            ("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", true),
            ("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n", true),
            (
                "HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\n\r\nX not found\n",
                false,
            ),
            (
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
            ("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false),
        ] {
            let e = ask(&server(head, 0).await).await.unwrap_err();
            assert_eq!(e.means_off(), off, "{head:?} gave {e}");
        }
    }

    #[test]
    fn the_base_drops_the_path_and_the_credentials() {
        for (url, base) in [
            ("http://127.0.0.1:18443/", Some("http://127.0.0.1:18443")),
            (
                "http://user:secret@127.0.0.1:18443/wallet/shop",
                Some("http://127.0.0.1:18443"),
            ),
            ("http://[::1]:8332", Some("http://[::1]:8332")),
            ("https://node.example", Some("https://node.example")),
            ("unix:///run/bitcoind.sock", None),
            ("not a url", None),
        ] {
            assert_eq!(base_of(url).as_deref(), base, "the REST base of {url}");
        }
    }
}
