//! The simulated node's answers about transactions and coins: `getblock` verbosity 1 to 3,
//! `getrawtransaction` at every verbosity (from the mempool, with `-txindex`, or with a block
//! hash), and `gettxout`. The spent coins come from the simulated chain, as Core's undo data
//! would give them.

use bitcoin::consensus::encode::serialize_hex;
use bitcoin::{Network, OutPoint, Transaction};
use serde_json::Value;

use super::rpc::{block_hash_at, block_hash_param, err, header_json, param, txid_param, RpcError};
use super::verbose::{self, Coin, Json};
use super::State;

const NETWORK: Network = Network::Regtest;

/// `None`: not a call answered here.
pub(super) fn call(s: &State, method: &str, params: &Value) -> Option<Result<Json, RpcError>> {
    match method {
        "getblock" => {
            let verbosity = verbosity(param(params, 1), 1);
            (verbosity > 0).then(|| block(s, params, verbosity))
        }
        "getrawtransaction" => Some(transaction(s, params, verbosity(param(params, 1), 0))),
        "gettxout" => Some(txout(s, params)),
        _ => None,
    }
}

/// A verbosity given as a number or as a boolean (`true` is 1).
fn verbosity(v: Option<&Value>, default: i64) -> i64 {
    match v {
        Some(Value::Bool(b)) => *b as i64,
        Some(v) => v.as_i64().unwrap_or(default),
        None => default,
    }
}

/// The coins `tx` spends, as the undo data of the block holding it records them.
fn undo(s: &State, tx: &Transaction) -> Option<Vec<Coin>> {
    if tx.is_coinbase() {
        return Some(vec![]);
    }
    tx.input
        .iter()
        .map(|i| {
            let c = s.chain.chain_coin(&i.previous_output)?;
            Some(Coin {
                output: c.output,
                height: c.height,
                coinbase: c.coinbase,
            })
        })
        .collect()
}

fn block(s: &State, params: &Value, verbosity: i64) -> Result<Json, RpcError> {
    let hash = block_hash_param(params)?;
    let head = header_json(s, &hash)?;
    let (block, _) = s.chain.block(&hash)?;
    let coins: Vec<Option<Vec<Coin>>> = block.txdata.iter().map(|tx| undo(s, tx)).collect();
    let more = verbose::block_details(block, &coins, verbosity, NETWORK);
    Ok(verbose::extend(&head, more))
}

fn transaction(s: &State, params: &Value, verbosity: i64) -> Result<Json, RpcError> {
    let txid = txid_param(params)?;
    let (tx, hash) = match param(params, 2) {
        Some(_) => {
            let hash = block_hash_at(params, 2)?;
            let (block, _) = s
                .chain
                .block(&hash)
                .map_err(|_| err(-5, "Block hash not found"))?;
            let tx = block.txdata.iter().find(|t| t.compute_txid() == txid).ok_or_else(|| {
                err(-5, "No such transaction found in the provided block. Use gettransaction for wallet transactions.")
            })?;
            (tx.clone(), Some(hash))
        }
        None => match s.chain.mempool_tx(&txid) {
            Ok(tx) => (tx.clone(), None),
            Err(e) if !s.txindex => return Err(e.into()),
            Err(_) => {
                let (hash, tx) = s.chain.confirmed(&txid).ok_or_else(|| {
                    err(-5, "No such mempool or blockchain transaction. Use gettransaction for wallet transactions.")
                })?;
                (tx, Some(hash))
            }
        },
    };
    if verbosity == 0 {
        return Ok(Json::Str(serialize_hex(&tx)));
    }
    let Some(hash) = hash else {
        // In the mempool: no undo data, so neither prevouts nor fee.
        return Ok(verbose::transaction(&tx, None, false, NETWORK));
    };
    let coins = (verbosity >= 2).then(|| undo(s, &tx)).flatten();
    let (block, height) = s.chain.block(&hash)?;
    let active = s.chain.is_active(&hash);
    let place = verbose::Place {
        block: hash,
        active,
        confirmations: if active {
            s.chain.height() - height + 1
        } else {
            0
        },
        time: block.header.time,
        asked: param(params, 2).is_some(),
    };
    Ok(verbose::transaction_in_block(
        &tx,
        coins.as_deref(),
        &place,
        NETWORK,
    ))
}

/// `gettxout TXID N [include_mempool=true]`: null when spent or unknown.
fn txout(s: &State, params: &Value) -> Result<Json, RpcError> {
    let txid = txid_param(params)?;
    let vout = param(params, 1)
        .and_then(Value::as_u64)
        .ok_or_else(|| err(-1, "n is required"))?;
    let vout = u32::try_from(vout).map_err(|_| err(-8, "n out of range"))?;
    let outpoint = OutPoint::new(txid, vout);
    let include_mempool = param(params, 2).and_then(Value::as_bool).unwrap_or(true);
    let null = Ok(Json::Raw("null".into()));
    if include_mempool && s.chain.mempool().spender(&outpoint).is_some() {
        return null;
    }
    let tip = s.chain.tip();
    if let Some(c) = s.chain.chain_coin(&outpoint).filter(|c| !c.spent) {
        let coin = Coin {
            output: c.output,
            height: c.height,
            coinbase: c.coinbase,
        };
        let confirmations = s.chain.height() - c.height + 1;
        return Ok(verbose::txout(&tip, confirmations, &coin, NETWORK));
    }
    let parent = s.chain.mempool_tx(&txid).ok().filter(|_| include_mempool);
    match parent.and_then(|t| t.output.get(vout as usize)) {
        Some(output) => {
            let coin = Coin {
                output: output.clone(),
                height: 0,
                coinbase: false,
            };
            Ok(verbose::txout(&tip, 0, &coin, NETWORK))
        }
        None => null,
    }
}
