//! The simulated node's REST interface, as Bitcoin Core's with `-rest`: `/rest/block/HASH.bin`
//! answers the block's raw bytes (`.hex` as hex); an unknown block is a 404 whose text names
//! it. Without `-rest`, every REST path is a 404 with no body, as bitcoind answers a path it
//! does not serve. `tests/fixtures/bitcoind-regtest/rest.jsonl` holds Core's own answers.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bitcoin::{Block, BlockHash};

use super::SimNode;

pub(super) async fn block(node: SimNode, Path(file): Path<String>) -> Response {
    let delay = node.lock().block_read_delay;
    if !delay.is_zero() {
        node.count_held_read();
        tokio::time::sleep(delay).await;
    }
    let mut s = node.lock();
    if s.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopped").into_response();
    }
    // Every ask is counted, answered or not: tests see how often a client tries.
    *s.calls.entry("rest/block".into()).or_default() += 1;
    if !s.rest {
        let headers = [("content-type", "text/html; charset=ISO-8859-1")];
        return (StatusCode::NOT_FOUND, headers).into_response();
    }
    // As Core reads the name: a known format's suffix is cut off, and anything else is taken
    // whole as the hash (and fails as one). JSON is not served here.
    let (hash_text, hex) = match (file.strip_suffix(".bin"), file.strip_suffix(".hex")) {
        (Some(h), _) => (h, false),
        (_, Some(h)) => (h, true),
        _ => (file.as_str(), false),
    };
    let Ok(hash) = hash_text.parse::<BlockHash>() else {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("Invalid hash: {hash_text}"),
        );
    };
    let Ok((block, _)) = s.chain.block(&hash) else {
        return text(StatusCode::NOT_FOUND, &format!("{hash_text} not found"));
    };
    let bytes = match s.forged_rest_block == Some(hash) {
        true => bitcoin::consensus::serialize(&forged(block)),
        false => bitcoin::consensus::serialize(block),
    };
    if hex {
        let headers = [("content-type", "text/plain")];
        return (StatusCode::OK, headers, format!("{}\n", hex::encode(bytes))).into_response();
    }
    let headers = [("content-type", "application/octet-stream")];
    (StatusCode::OK, headers, bytes).into_response()
}

/// Core's REST errors: `text/plain`, the message and CRLF.
fn text(status: StatusCode, message: &str) -> Response {
    let headers = [("content-type", "text/plain")];
    (status, headers, format!("{message}\r\n")).into_response()
}

/// The block under its true header, each output of its payments paying one satoshi more:
/// amounts that pass every check but the merkle root's.
fn forged(block: &Block) -> Block {
    let mut forged = block.clone();
    for tx in forged.txdata.iter_mut().skip(1) {
        for out in &mut tx.output {
            out.value += bitcoin::Amount::ONE_SAT;
        }
    }
    forged
}
