//! The in-memory index: script → watches, the coins watches hold, and for descriptor watches the
//! addresses derived so far, extended as payments use them.

use std::collections::HashMap;

use bitcoin::{Network, OutPoint, ScriptBuf, Transaction, Txid};

use super::descriptor::WatchedDescriptor;
use super::{MatchedInput, MatchedOutput, Target, TxMatch, Watch};

/// Who a script belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    watch_id: String,
    address: String,
    /// (path, index) for descriptor watches.
    derivation: Option<(u32, u32)>,
}

/// An output a watch received, kept to recognise its spends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedCoin {
    pub watch_id: String,
    pub address: String,
    pub amount_sat: u64,
}

/// The highest used derivation index of one path of a descriptor watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub watch_id: String,
    pub path: u32,
    pub used: u32,
}

struct DescState {
    desc: WatchedDescriptor,
    gap: u32,
    /// Per path: how many indexes are derived (0..derived).
    derived: Vec<u32>,
    used: Vec<Option<u32>>,
}

impl DescState {
    /// Indexes to derive so that `gap` follow the highest used one.
    fn wanted(&self, used: Option<u32>) -> u32 {
        if !self.desc.is_ranged() {
            return 1;
        }
        used.map(|u| u.saturating_add(self.gap).saturating_add(1))
            .unwrap_or(self.gap)
    }
}

/// What matching earlier transactions of the same chain step changed, so later ones see it:
/// coins just created and addresses just derived.
#[derive(Default)]
pub struct Overlay {
    pub coins: HashMap<OutPoint, WatchedCoin>,
    scripts: HashMap<ScriptBuf, Vec<Owner>>,
    used: HashMap<(String, u32), u32>,
    derived: HashMap<(String, u32), u32>,
}

impl Overlay {
    /// The derivation indexes this step used, to persist with it.
    pub fn derivations(&self) -> Vec<Derivation> {
        let mut v: Vec<Derivation> = self
            .used
            .iter()
            .map(|((w, p), u)| Derivation {
                watch_id: w.clone(),
                path: *p,
                used: *u,
            })
            .collect();
        v.sort_by(|a, b| (&a.watch_id, a.path).cmp(&(&b.watch_id, b.path)));
        v
    }
}

#[derive(Default)]
pub struct WatchIndex {
    network: Option<Network>,
    watches: HashMap<String, Watch>,
    by_script: HashMap<ScriptBuf, Vec<Owner>>,
    descriptors: HashMap<String, DescState>,
    pub coins: HashMap<OutPoint, WatchedCoin>,
}

impl std::fmt::Debug for WatchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WatchIndex({} watches, {} scripts, {} coins)",
            self.watches.len(),
            self.by_script.len(),
            self.coins.len()
        )
    }
}

fn add_owner(map: &mut HashMap<ScriptBuf, Vec<Owner>>, script: ScriptBuf, owner: Owner) {
    let owners = map.entry(script).or_default();
    if !owners.contains(&owner) {
        owners.push(owner);
    }
}

impl WatchIndex {
    pub fn new(network: Network, watches: impl IntoIterator<Item = Watch>) -> WatchIndex {
        let mut idx = WatchIndex {
            network: Some(network),
            ..WatchIndex::default()
        };
        for w in watches {
            idx.insert(w);
        }
        idx
    }

    fn network(&self) -> Network {
        self.network.unwrap_or(Network::Regtest)
    }

    /// Adds a watch. A descriptor that fails to parse (it was checked on the way in) is
    /// logged and left out rather than stopping the watcher.
    pub fn insert(&mut self, w: Watch) {
        match &w.target {
            Target::Address { address } => {
                let parsed = address
                    .parse::<bitcoin::Address<_>>()
                    .ok()
                    .and_then(|a| a.require_network(self.network()).ok());
                match parsed {
                    Some(a) => add_owner(
                        &mut self.by_script,
                        a.script_pubkey(),
                        Owner {
                            watch_id: w.id.clone(),
                            address: address.clone(),
                            derivation: None,
                        },
                    ),
                    None => {
                        tracing::error!(watch = %w.id, %address, "stored watch has an invalid address; skipped")
                    }
                }
            }
            Target::Descriptor {
                descriptor,
                gap_limit,
            } => match WatchedDescriptor::parse(descriptor, self.network()) {
                Ok(desc) => {
                    let n = desc.paths.len();
                    let state = DescState {
                        desc,
                        gap: *gap_limit,
                        derived: vec![0; n],
                        used: vec![None; n],
                    };
                    self.descriptors.insert(w.id.clone(), state);
                    for path in 0..n as u32 {
                        self.extend(&w.id, path, None);
                    }
                }
                Err(e) => {
                    tracing::error!(watch = %w.id, error = %e, "stored descriptor watch is invalid; skipped")
                }
            },
        }
        self.watches.insert(w.id.clone(), w);
    }

    /// Derives addresses of one path up to what `used` calls for.
    fn extend(&mut self, watch_id: &str, path: u32, used: Option<u32>) {
        let Some(st) = self.descriptors.get_mut(watch_id) else {
            return;
        };
        let p = path as usize;
        if used > st.used[p] {
            st.used[p] = used;
        }
        let wanted = st.wanted(st.used[p]);
        while st.derived[p] < wanted {
            let i = st.derived[p];
            match st.desc.derive(p, i) {
                Ok((script, address)) => {
                    let owner = Owner {
                        watch_id: watch_id.to_string(),
                        address,
                        derivation: Some((path, i)),
                    };
                    add_owner(&mut self.by_script, script, owner);
                }
                Err(e) => tracing::error!(watch = %watch_id, error = %e, "derivation failed"),
            }
            st.derived[p] += 1;
        }
    }

    /// Records a committed derivation index and derives the addresses that follow it.
    pub fn set_used(&mut self, d: &Derivation) {
        self.extend(&d.watch_id.clone(), d.path, Some(d.used));
    }

    pub fn remove(&mut self, id: &str) -> Option<Watch> {
        let w = self.watches.remove(id)?;
        self.descriptors.remove(id);
        self.by_script.retain(|_, owners| {
            owners.retain(|o| o.watch_id != id);
            !owners.is_empty()
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

    /// How many scripts are watched (addresses, and derived descriptor addresses).
    pub fn script_count(&self) -> usize {
        self.by_script.len()
    }

    pub fn watches(&self) -> impl Iterator<Item = &Watch> {
        self.watches.values()
    }

    /// The watches a transaction touches, in watch-id order (so events come out deterministically).
    pub fn match_tx(&self, tx: &Transaction) -> Vec<TxMatch> {
        self.match_tx_in(tx, &mut Overlay::default())
    }

    /// As `match_tx`, seeing and updating what earlier transactions of the step changed.
    pub fn match_tx_in(&self, tx: &Transaction, overlay: &mut Overlay) -> Vec<TxMatch> {
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
        let may_spend_watched = !(self.coins.is_empty() && overlay.coins.is_empty());
        if may_spend_watched && !tx.is_coinbase() {
            for input in &tx.input {
                let op = &input.previous_output;
                if let Some(coin) = self.coins.get(op).or_else(|| overlay.coins.get(op)) {
                    let i = entry(&mut found, &coin.watch_id);
                    found[i].inputs.push(MatchedInput {
                        prevout: op.to_string(),
                        address: coin.address.clone(),
                        amount_sat: coin.amount_sat,
                    });
                }
            }
        }
        let mut used_now = Vec::new();
        for (vout, out) in tx.output.iter().enumerate() {
            let owners = self
                .by_script
                .get(&out.script_pubkey)
                .into_iter()
                .chain(overlay.scripts.get(&out.script_pubkey))
                .flatten();
            for o in owners {
                let i = entry(&mut found, &o.watch_id);
                if found[i].outputs.iter().any(|x| x.vout == vout as u32) {
                    continue;
                }
                found[i].outputs.push(MatchedOutput {
                    vout: vout as u32,
                    address: o.address.clone(),
                    amount_sat: out.value.to_sat(),
                    derivation_index: o.derivation.map(|d| d.1),
                    derivation_path: o
                        .derivation
                        .filter(|_| self.is_multipath(&o.watch_id))
                        .map(|d| d.0),
                });
                if let Some((path, index)) = o.derivation {
                    used_now.push((o.watch_id.clone(), path, index));
                }
            }
        }
        for (watch, path, index) in used_now {
            self.use_index(overlay, &watch, path, index);
        }
        found.sort_by(|a, b| a.watch_id.cmp(&b.watch_id));
        found
    }

    fn is_multipath(&self, watch_id: &str) -> bool {
        self.descriptors
            .get(watch_id)
            .is_some_and(|d| d.desc.is_multipath())
    }

    /// Notes a used index in the overlay and derives, into the overlay, the addresses that
    /// must now be watched after it, so the next transaction of the same block is seen.
    fn use_index(&self, overlay: &mut Overlay, watch: &str, path: u32, index: u32) {
        let Some(st) = self.descriptors.get(watch) else {
            return;
        };
        let key = (watch.to_string(), path);
        let committed = st.used[path as usize];
        let current = overlay.used.get(&key).copied().or(committed);
        if current.is_some_and(|c| c >= index) {
            return;
        }
        overlay.used.insert(key.clone(), index);
        let wanted = st.wanted(Some(index));
        let mut derived = overlay
            .derived
            .get(&key)
            .copied()
            .unwrap_or(st.derived[path as usize]);
        while derived < wanted {
            if let Ok((script, address)) = st.desc.derive(path as usize, derived) {
                let owner = Owner {
                    watch_id: watch.to_string(),
                    address,
                    derivation: Some((path, derived)),
                };
                add_owner(&mut overlay.scripts, script, owner);
            }
            derived += 1;
        }
        overlay.derived.insert(key, derived);
    }

    /// Coins created by a matched transaction, to recognise their later spends.
    pub fn coins_of(txid: Txid, m: &TxMatch) -> Vec<(OutPoint, WatchedCoin)> {
        m.outputs
            .iter()
            .map(|o| {
                let coin = WatchedCoin {
                    watch_id: m.watch_id.clone(),
                    address: o.address.clone(),
                    amount_sat: o.amount_sat,
                };
                (OutPoint::new(txid, o.vout), coin)
            })
            .collect()
    }
}
