//! Watches and the in-memory index that matches transactions against them.

use std::collections::HashMap;

use bitcoin::hashes::{sha256, Hash};
use bitcoin::{Address, Network, OutPoint, ScriptBuf, Transaction, Txid};
use serde::{Deserialize, Serialize};

pub const MAX_METADATA_BYTES: usize = 4096;

/// A watched address with its confirmation target and the labels copied into its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watch {
    pub id: String,
    pub address: String,
    pub confirmations: u32,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
}

impl Watch {
    pub fn new(
        address: &Address,
        confirmations: u32,
        label: Option<String>,
        metadata: serde_json::Value,
    ) -> Watch {
        Watch {
            id: watch_id(&address.to_string()),
            address: address.to_string(),
            confirmations,
            label,
            metadata,
        }
    }

    pub fn script_pubkey(&self, network: Network) -> Option<ScriptBuf> {
        let a: bitcoin::Address<bitcoin::address::NetworkUnchecked> = self.address.parse().ok()?;
        Some(a.require_network(network).ok()?.script_pubkey())
    }
}

/// Watch ids derive from the address, so the same config yields the same ids (and event ids)
/// even on a fresh data directory.
pub fn watch_id(address: &str) -> String {
    let h = sha256::Hash::hash(format!("address:{address}").as_bytes());
    format!("wch_{}", hex::encode(&h.as_byte_array()[..12]))
}

/// Metadata must be a JSON object of at most 4 KiB.
pub fn check_metadata(v: &serde_json::Value) -> Result<(), String> {
    if !v.is_object() {
        return Err("metadata must be a JSON object".into());
    }
    let len = v.to_string().len();
    if len > MAX_METADATA_BYTES {
        return Err(format!(
            "metadata is {len} bytes; at most {MAX_METADATA_BYTES} are allowed"
        ));
    }
    Ok(())
}

/// An output that pays a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchedOutput {
    pub vout: u32,
    pub address: String,
    pub amount_sat: u64,
}

/// An input that spends an output a watch had received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchedInput {
    pub prevout: String,
    pub address: String,
    pub amount_sat: u64,
}

/// What one transaction does to one watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxMatch {
    pub watch_id: String,
    pub outputs: Vec<MatchedOutput>,
    pub inputs: Vec<MatchedInput>,
}

impl TxMatch {
    pub fn amount_sat(&self) -> i64 {
        let received: u64 = self.outputs.iter().map(|o| o.amount_sat).sum();
        let spent: u64 = self.inputs.iter().map(|i| i.amount_sat).sum();
        received as i64 - spent as i64
    }
}

/// An output a watch received and has not yet seen spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedCoin {
    pub watch_id: String,
    pub address: String,
    pub amount_sat: u64,
}

/// Script → watches, plus the coins the watches hold, for matching inputs.
#[derive(Debug, Default, Clone)]
pub struct WatchIndex {
    watches: HashMap<String, Watch>,
    by_script: HashMap<ScriptBuf, Vec<String>>,
    pub coins: HashMap<OutPoint, WatchedCoin>,
}

impl WatchIndex {
    pub fn new(network: Network, watches: impl IntoIterator<Item = Watch>) -> WatchIndex {
        let mut idx = WatchIndex::default();
        for w in watches {
            idx.insert(network, w);
        }
        idx
    }

    pub fn insert(&mut self, network: Network, w: Watch) {
        if let Some(spk) = w.script_pubkey(network) {
            let ids = self.by_script.entry(spk).or_default();
            if !ids.contains(&w.id) {
                ids.push(w.id.clone());
            }
        }
        self.watches.insert(w.id.clone(), w);
    }

    pub fn remove(&mut self, id: &str) -> Option<Watch> {
        let w = self.watches.remove(id)?;
        self.by_script.retain(|_, ids| {
            ids.retain(|x| x != id);
            !ids.is_empty()
        });
        Some(w)
    }

    pub fn get(&self, id: &str) -> Option<&Watch> {
        self.watches.get(id)
    }

    pub fn len(&self) -> usize {
        self.watches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    pub fn watches(&self) -> impl Iterator<Item = &Watch> {
        self.watches.values()
    }

    /// The watches a transaction touches, in watch-id order (so events come out deterministically).
    pub fn match_tx(&self, tx: &Transaction) -> Vec<TxMatch> {
        self.match_tx_with(tx, &HashMap::new())
    }

    /// As `match_tx`, also recognising spends of `extra` coins (created earlier in the same block).
    pub fn match_tx_with(
        &self,
        tx: &Transaction,
        extra: &HashMap<OutPoint, WatchedCoin>,
    ) -> Vec<TxMatch> {
        fn entry(found: &mut Vec<TxMatch>, watch_id: &str) -> usize {
            match found.iter().position(|m| m.watch_id == watch_id) {
                Some(i) => i,
                None => {
                    found.push(TxMatch {
                        watch_id: watch_id.to_string(),
                        outputs: vec![],
                        inputs: vec![],
                    });
                    found.len() - 1
                }
            }
        }
        let mut found: Vec<TxMatch> = Vec::new();
        let may_spend_watched = !(self.coins.is_empty() && extra.is_empty());
        if may_spend_watched && !tx.is_coinbase() {
            for input in &tx.input {
                let op = &input.previous_output;
                if let Some(coin) = self.coins.get(op).or_else(|| extra.get(op)) {
                    let i = entry(&mut found, &coin.watch_id);
                    found[i].inputs.push(MatchedInput {
                        prevout: input.previous_output.to_string(),
                        address: coin.address.clone(),
                        amount_sat: coin.amount_sat,
                    });
                }
            }
        }
        for (vout, out) in tx.output.iter().enumerate() {
            if let Some(ids) = self.by_script.get(&out.script_pubkey) {
                for id in ids {
                    let address = self.watches[id].address.clone();
                    let i = entry(&mut found, id);
                    found[i].outputs.push(MatchedOutput {
                        vout: vout as u32,
                        address,
                        amount_sat: out.value.to_sat(),
                    });
                }
            }
        }
        found.sort_by(|a, b| a.watch_id.cmp(&b.watch_id));
        found
    }

    /// Coins created by a matched transaction, to recognise their later spends.
    pub fn coins_of(txid: Txid, m: &TxMatch) -> Vec<(OutPoint, WatchedCoin)> {
        m.outputs
            .iter()
            .map(|o| {
                (
                    OutPoint::new(txid, o.vout),
                    WatchedCoin {
                        watch_id: m.watch_id.clone(),
                        address: o.address.clone(),
                        amount_sat: o.amount_sat,
                    },
                )
            })
            .collect()
    }
}
