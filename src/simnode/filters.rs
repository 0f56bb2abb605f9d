//! `getblockfilter`, as Bitcoin Core answers it when started with `-blockfilterindex`: a
//! block's BIP 158 basic filter and its filter header. Filters are built from the chain when
//! first asked for and kept by block hash, which commits to everything they depend on.

use std::collections::HashMap;

use bitcoin::bip158::FilterHeader;
use bitcoin::{BlockHash, ScriptBuf};
use serde_json::{json, Value};

use super::rpc::{block_hash_param, err, param, RpcError};
use super::State;
use crate::blockfilter::{basic_filter, genesis_previous, header_of};

/// Filters built so far; absent from the state when the index is off.
pub(crate) type FilterIndex = HashMap<BlockHash, (Vec<u8>, FilterHeader)>;

/// The RPC call.
pub(super) fn getblockfilter(s: &mut State, params: &Value) -> Result<Value, RpcError> {
    let hash = block_hash_param(params)?;
    match param(params, 1).map(|t| t.as_str()) {
        None | Some(Some("basic")) => {}
        Some(_) => return Err(err(-5, "Unknown filtertype")),
    }
    let (content, header) = filter(s, hash)?;
    Ok(json!({"filter": hex::encode(content), "header": header.to_string()}))
}

/// The filter of block `hash` and its header.
pub(super) fn filter(s: &mut State, hash: BlockHash) -> Result<(Vec<u8>, FilterHeader), RpcError> {
    if s.block_filters.is_none() {
        return Err(err(-1, "Index is not enabled for filtertype basic"));
    }
    s.chain
        .block(&hash)
        .map_err(|_| err(-5, "Block not found"))?;
    // The blocks from `hash` down to the highest one already built (or genesis).
    let mut missing = vec![];
    let mut at = hash;
    let mut previous = genesis_previous();
    loop {
        if let Some((_, header)) = s.block_filters.as_ref().and_then(|f| f.get(&at)) {
            previous = *header;
            break;
        }
        missing.push(at);
        let Ok((block, height)) = s.chain.block(&at) else {
            return Err(err(-1, "Filter not found."));
        };
        if height == 0 {
            break;
        }
        at = block.header.prev_blockhash;
    }
    for at in missing.into_iter().rev() {
        let content = build(s, at)?;
        let header = header_of(&content, &previous);
        previous = header;
        if let Some(f) = s.block_filters.as_mut() {
            f.insert(at, (content, header));
        }
    }
    Ok(s.block_filters
        .as_ref()
        .and_then(|f| f.get(&hash))
        .cloned()
        .expect("just built"))
}

fn build(s: &State, hash: BlockHash) -> Result<Vec<u8>, RpcError> {
    let (block, _) = s
        .chain
        .block(&hash)
        .map_err(|_| err(-5, "Block not found"))?;
    let spent: Option<Vec<ScriptBuf>> = block
        .txdata
        .iter()
        .filter(|tx| !tx.is_coinbase())
        .flat_map(|tx| tx.input.iter())
        .map(|i| Some(s.chain.chain_coin(&i.previous_output)?.output.script_pubkey))
        .collect();
    let spent = spent.ok_or_else(|| err(-1, "Filter not found."))?;
    Ok(basic_filter(block, spent.iter().map(|s| s.as_script())))
}
