//! The in-memory index: which scripts are watched, by whom, the coins watches hold, and for
//! descriptor watches the addresses derived so far, extended as payments use them.
//!
//! Built to hold millions of addresses in little memory: a script is kept as a 128-bit keyed
//! hash (SipHash with keys drawn at start, so no one can craft an output that collides) pointing
//! to a slot that holds only the 12-byte watch id. Addresses are rebuilt from the script when one
//! matches; labels and metadata are loaded on demand (and cached) when an event needs them.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, Mutex};

use bitcoin::{Address, Network, OutPoint, Script, ScriptBuf, Transaction, Txid};

use super::descriptor::WatchedDescriptor;
use super::scripts::{PassThrough, ScriptTable};
use super::slots::SlotsById;
use super::{IndexChanges, MatchedInput, MatchedOutput, Target, TxMatch, Watch};

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

type Key = [u64; 2];
type Slot = u32;

/// Who a derived script belongs to: slot, path, index.
type DerivedOwner = (Slot, u32, u32);

/// Loads a watch's full record (labels, metadata, target) by id.
/// Loads a watch's full record: `Ok(None)` when the store has no such watch, `Err` when it
/// could not say (an error must never pass for "removed").
pub type WatchLoader = Arc<dyn Fn(&str) -> Result<Option<Watch>, String> + Send + Sync>;

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
    derived: HashMap<Key, Vec<DerivedOwner>>,
    used: HashMap<(Slot, u32), u32>,
    count: HashMap<(Slot, u32), u32>,
    ids: HashMap<Slot, String>,
}

impl Overlay {
    /// The derivation indexes this step used, to persist with it.
    pub fn derivations(&self) -> Vec<Derivation> {
        let mut v: Vec<Derivation> = self
            .used
            .iter()
            .map(|((slot, p), u)| Derivation {
                watch_id: self.ids[slot].clone(),
                path: *p,
                used: *u,
            })
            .collect();
        v.sort_by(|a, b| (&a.watch_id, a.path).cmp(&(&b.watch_id, b.path)));
        v
    }
}

/// Which outputs of a run of transactions the address table may hold.
pub struct Probe {
    maybe: Vec<bool>,
    starts: Vec<usize>,
}

impl Probe {
    /// The outputs of the run's `i`-th transaction.
    pub fn of(&self, i: usize) -> Option<&[bool]> {
        let (start, end) = (*self.starts.get(i)?, *self.starts.get(i + 1)?);
        Some(&self.maybe[start..end])
    }
}

/// How far `WatchIndex::scripts_not_listed` has listed each watch's scripts: per watch id and
/// descriptor path (`usize::MAX` for an address), how many.
#[derive(Debug, Default, Clone)]
pub struct ListedScripts(HashMap<(String, usize), u32>);

pub struct WatchIndex {
    network: Network,
    /// Seed of the fast first-half hash, and the SipHash keys of the second half.
    seed: u64,
    check_keys: RandomState,
    /// Address watches, by the script's two hashes. The second is computed only when the
    /// first hits.
    scripts: ScriptTable,
    /// Descriptor-derived scripts.
    derived: HashMap<Key, Vec<DerivedOwner>, PassThrough>,
    descriptors: HashMap<Slot, DescState>,
    /// Slot → the watch id's 12 bytes (`wch_` + hex).
    ids: Vec<[u8; 12]>,
    slot_of: SlotsById,
    /// Full records: all of them without a loader, a cache of recent ones with one.
    details: Mutex<HashMap<String, Arc<Watch>>>,
    loader: Option<WatchLoader>,
    /// Slot → the confirmations the watch asks for.
    confirmations: Vec<u32>,
    /// Dust floors, for the few watches that set one (most do not: no cost per watch).
    min_amounts: HashMap<Slot, u64>,
    pub coins: HashMap<OutPoint, WatchedCoin>,
}

impl std::fmt::Debug for WatchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WatchIndex({} watches, {} coins)",
            self.ids.len(),
            self.coins.len()
        )
    }
}

impl Default for WatchIndex {
    fn default() -> Self {
        WatchIndex::empty(Network::Regtest, None)
    }
}

/// The details cache stays this small when a loader can refill it.
const DETAILS_CACHE: usize = 10_000;

fn id_bytes(id: &str) -> Option<[u8; 12]> {
    let hexpart = id.strip_prefix("wch_")?;
    hex::decode(hexpart).ok()?.try_into().ok()
}

fn id_text(b: &[u8; 12]) -> String {
    format!("wch_{}", hex::encode(b))
}

impl WatchIndex {
    fn empty(network: Network, loader: Option<WatchLoader>) -> WatchIndex {
        WatchIndex {
            network,
            seed: {
                let mut h = RandomState::new().build_hasher();
                h.write_u64(0x9e37_79b9_7f4a_7c15);
                h.finish() | 1
            },
            check_keys: RandomState::new(),
            scripts: ScriptTable::default(),
            derived: HashMap::with_hasher(PassThrough),
            descriptors: HashMap::new(),
            ids: Vec::new(),
            slot_of: SlotsById::default(),
            details: Mutex::new(HashMap::new()),
            loader,
            confirmations: Vec::new(),
            min_amounts: HashMap::new(),
            coins: HashMap::new(),
        }
    }

    /// An index holding these watches, records included.
    pub fn new(network: Network, watches: impl IntoIterator<Item = Watch>) -> WatchIndex {
        let mut idx = WatchIndex::empty(network, None);
        for w in watches {
            idx.insert(w);
        }
        idx.settle();
        idx
    }

    /// An index that keeps only what matching needs, and loads records with `loader`.
    pub fn with_loader(network: Network, loader: WatchLoader, expected: usize) -> WatchIndex {
        let mut idx = WatchIndex::empty(network, Some(loader));
        idx.ids.reserve(expected);
        idx.confirmations.reserve(expected);
        idx
    }

    /// First half: a fast seeded hash that routes the probe. Second half: SipHash with secret
    /// keys, checked on every hit, so a crafted output cannot pass for a watched one.
    fn key(&self, script: &Script) -> Key {
        [
            fast_hash(self.seed, script.as_bytes()),
            check_hash(&self.check_keys, script),
        ]
    }

    /// Adds a watch with its record.
    pub fn insert(&mut self, w: Watch) {
        self.insert_target(&w.id, &w.target, w.confirmations);
        self.set_min_amount(&w.id, w.min_amount_sat);
        let mut details = self.details.lock().expect("details lock");
        if self.loader.is_none() || details.len() < DETAILS_CACHE {
            details.insert(w.id.clone(), Arc::new(w));
        }
    }

    /// Adds what matching needs of a watch; its record comes from the loader when needed.
    pub fn insert_target(&mut self, id: &str, target: &Target, confirmations: u32) {
        let Some(idb) = id_bytes(id) else {
            tracing::error!(watch = %id, "stored watch has a malformed id; skipped");
            return;
        };
        let slot = match self.slot_of.get(&self.ids, &idb) {
            Some(s) => {
                self.confirmations[s as usize] = confirmations;
                s
            }
            None => {
                self.ids.push(idb);
                self.confirmations.push(confirmations);
                let s = (self.ids.len() - 1) as Slot;
                self.slot_of.insert(&self.ids, s);
                s
            }
        };
        match target {
            Target::Address { address } => {
                let Some(script) = self.address_script(address) else {
                    tracing::error!(watch = %id, %address, "stored watch has an invalid address; skipped");
                    return;
                };
                let key = self.key(&script);
                self.scripts.insert(key[0], key[1] as u32, slot);
            }
            Target::Descriptor {
                descriptor,
                gap_limit,
            } => match WatchedDescriptor::parse(descriptor, self.network) {
                Ok(desc) => {
                    let n = desc.paths.len();
                    self.descriptors.insert(
                        slot,
                        DescState {
                            desc,
                            gap: *gap_limit,
                            derived: vec![0; n],
                            used: vec![None; n],
                        },
                    );
                    for path in 0..n as u32 {
                        self.extend(slot, path, None);
                    }
                }
                Err(e) => {
                    tracing::error!(watch = %id, error = %e, "stored descriptor watch is invalid; skipped")
                }
            },
        }
    }

    /// The script of a watched address of the index's network.
    fn address_script(&self, address: &str) -> Option<ScriptBuf> {
        let a = address.parse::<Address<_>>().ok()?;
        Some(a.require_network(self.network).ok()?.script_pubkey())
    }

    /// Derives addresses of one path up to what `used` calls for.
    fn extend(&mut self, slot: Slot, path: u32, used: Option<u32>) {
        let (seed, check_keys) = (self.seed, self.check_keys.clone());
        let Some(st) = self.descriptors.get_mut(&slot) else {
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
                Ok((script, _)) => {
                    let key = [
                        fast_hash(seed, script.as_bytes()),
                        check_hash(&check_keys, &script),
                    ];
                    self.derived.entry(key).or_default().push((slot, path, i));
                }
                Err(e) => tracing::error!(error = %e, "derivation failed"),
            }
            st.derived[p] += 1;
        }
    }

    /// Records a committed derivation index and derives the addresses that follow it.
    pub fn set_used(&mut self, d: &Derivation) {
        if let Some(slot) = self.slot(&d.watch_id) {
            self.extend(slot, d.path, Some(d.used));
        }
    }

    /// The watch's full record, for an event's label and metadata: `Ok(None)` when the store
    /// no longer has it, `Err` when it could not say (which must never pass for "removed").
    pub fn record(&self, id: &str) -> Result<Option<Arc<Watch>>, String> {
        if let Some(w) = self.details.lock().expect("details lock").get(id) {
            return Ok(Some(w.clone()));
        }
        let Some(loader) = self.loader.as_ref() else {
            return Ok(None);
        };
        // Only watches in the index count, even if the store still has others.
        if self.slot(id).is_none() {
            return Ok(None);
        }
        let Some(w) = loader(id)?.map(Arc::new) else {
            return Ok(None);
        };
        let mut details = self.details.lock().expect("details lock");
        if details.len() >= DETAILS_CACHE {
            details.clear();
        }
        details.insert(id.to_string(), w.clone());
        Ok(Some(w))
    }

    fn slot(&self, id: &str) -> Option<Slot> {
        id_bytes(id).and_then(|b| self.slot_of.get(&self.ids, &b))
    }

    /// Outputs below `sat` do not pay the watch `id` (0: no floor).
    pub fn set_min_amount(&mut self, id: &str, sat: u64) {
        let Some(slot) = self.slot(id) else { return };
        if sat == 0 {
            self.min_amounts.remove(&slot);
        } else {
            self.min_amounts.insert(slot, sat);
        }
    }

    /// The confirmations a watch asks for; `None` if the index does not hold it.
    pub fn confirmations(&self, id: &str) -> Option<u32> {
        self.slot(id).map(|s| self.confirmations[s as usize])
    }

    /// Takes in what a committed step taught: its coins and used derivation indexes.
    pub fn apply(&mut self, changes: &IndexChanges) {
        for (op, coin) in &changes.coins {
            self.coins.insert(*op, coin.clone());
        }
        for d in &changes.derivations {
            self.set_used(d);
        }
    }

    /// Packs the scripts inserted since the last merge: called after a bulk load, so that
    /// every probe finds them in one place.
    pub fn settle(&mut self) {
        self.scripts.settle();
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// How many scripts are watched (addresses, and derived descriptor addresses).
    pub fn script_count(&self) -> usize {
        self.scripts.len() + self.derived.values().map(Vec::len).sum::<usize>()
    }

    /// The scripts the index watches that `listed` has not listed yet, for asking outside it
    /// (a block's BIP 158 filter): addresses, and descriptor addresses as far as they are
    /// derived. `None` when a record is not at hand (an index with a loader keeps few) or a
    /// derivation fails: the list would be short, and a short list could skip a payment.
    pub fn scripts_not_listed(&self, listed: &mut ListedScripts) -> Option<Vec<ScriptBuf>> {
        if self.loader.is_some() {
            return None;
        }
        let details = self.details.lock().expect("details lock");
        let mut out = Vec::new();
        for w in details.values() {
            match &w.target {
                Target::Address { address } => {
                    if listed.0.insert((w.id.clone(), usize::MAX), 1).is_none() {
                        out.push(self.address_script(address)?);
                    }
                }
                Target::Descriptor { .. } => {
                    let st = self.descriptors.get(&self.slot(&w.id)?)?;
                    for (path, derived) in st.derived.iter().enumerate() {
                        let count = listed.0.entry((w.id.clone(), path)).or_default();
                        for i in *count..*derived {
                            out.push(st.desc.derive(path, i).ok()?.0);
                        }
                        *count = (*count).max(*derived);
                    }
                }
            }
        }
        Some(out)
    }

    /// The watches a transaction touches, in watch-id order (so events come out deterministically).
    pub fn match_tx(&self, tx: &Transaction) -> Vec<TxMatch> {
        self.match_tx_in(tx, &mut Overlay::default())
    }

    fn address_of(&self, script: &Script) -> String {
        Address::from_script(script, self.network)
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// As `match_tx`, seeing and updating what earlier transactions of the step changed.
    pub fn match_tx_in(&self, tx: &Transaction, overlay: &mut Overlay) -> Vec<TxMatch> {
        let probe = self.probe(std::slice::from_ref(tx));
        self.match_tx_probed(tx, probe.of(0), overlay)
    }

    /// Probes the address table for every output of `txs` at once (see `ScriptTable::may_hold`),
    /// for `match_tx_probed` to skip the outputs it cannot hold.
    pub fn probe(&self, txs: &[Transaction]) -> Probe {
        let mut starts = Vec::with_capacity(txs.len() + 1);
        let mut fasts = Vec::new();
        for tx in txs {
            starts.push(fasts.len());
            let hashes = tx.output.iter();
            fasts.extend(hashes.map(|o| fast_hash(self.seed, o.script_pubkey.as_bytes())));
        }
        starts.push(fasts.len());
        Probe {
            maybe: self.scripts.may_hold(&fasts),
            starts,
        }
    }

    /// As `match_tx_in`; `maybe`, from `probe`, says which outputs the address table may hold.
    pub fn match_tx_probed(
        &self,
        tx: &Transaction,
        maybe: Option<&[bool]>,
        overlay: &mut Overlay,
    ) -> Vec<TxMatch> {
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
        let any_derived = !(self.derived.is_empty() && overlay.derived.is_empty());
        for (vout, out) in tx.output.iter().enumerate() {
            let in_table = maybe.is_none_or(|m| m.get(vout).copied().unwrap_or(true));
            let owners = self.owners(&out.script_pubkey, in_table, any_derived, overlay);
            if owners.is_empty() {
                continue;
            }
            let address = self.address_of(&out.script_pubkey);
            for (slot, derivation) in owners {
                // Dust below the watch's floor is not a payment to it.
                if self
                    .min_amounts
                    .get(&slot)
                    .is_some_and(|floor| out.value.to_sat() < *floor)
                {
                    continue;
                }
                let watch_id = id_text(&self.ids[slot as usize]);
                let i = entry(&mut found, &watch_id);
                if found[i].outputs.iter().any(|x| x.vout == vout as u32) {
                    continue;
                }
                let multipath = self
                    .descriptors
                    .get(&slot)
                    .is_some_and(|d| d.desc.is_multipath());
                found[i].outputs.push(MatchedOutput {
                    vout: vout as u32,
                    address: address.clone(),
                    amount_sat: out.value.to_sat(),
                    derivation_index: derivation.map(|d| d.1),
                    derivation_path: derivation.filter(|_| multipath).map(|d| d.0),
                });
                if let Some((path, index)) = derivation {
                    used_now.push((slot, path, index));
                }
            }
        }
        for (slot, path, index) in used_now {
            self.use_index(overlay, slot, path, index);
        }
        found.sort_by(|a, b| a.watch_id.cmp(&b.watch_id));
        found
    }

    /// Who watches `script`: one hash probe for the common miss, the full key only on a hit.
    fn owners(
        &self,
        script: &Script,
        in_table: bool,
        any_derived: bool,
        overlay: &Overlay,
    ) -> Vec<(Slot, Option<(u32, u32)>)> {
        let mut owners = Vec::new();
        if !in_table && !any_derived {
            return owners;
        }
        let first = fast_hash(self.seed, script.as_bytes());
        let mut second = None;
        let mut keyed = || *second.get_or_insert_with(|| check_hash(&self.check_keys, script));
        if in_table {
            self.scripts
                .for_each(first, || keyed() as u32, |slot| owners.push((slot, None)));
        }
        if !any_derived {
            return owners;
        }
        let key = [first, keyed()];
        for (slot, path, index) in self
            .derived
            .get(&key)
            .into_iter()
            .chain(overlay.derived.get(&key))
            .flatten()
        {
            owners.push((*slot, Some((*path, *index))));
        }
        owners
    }

    /// Notes a used index in the overlay and derives, into the overlay, the addresses that
    /// must now be watched after it, so the next transaction of the same block is seen.
    fn use_index(&self, overlay: &mut Overlay, slot: Slot, path: u32, index: u32) {
        let Some(st) = self.descriptors.get(&slot) else {
            return;
        };
        let k = (slot, path);
        let current = overlay.used.get(&k).copied().or(st.used[path as usize]);
        if current.is_some_and(|c| c >= index) {
            return;
        }
        overlay.used.insert(k, index);
        overlay.ids.insert(slot, id_text(&self.ids[slot as usize]));
        let wanted = st.wanted(Some(index));
        let mut derived = overlay
            .count
            .get(&k)
            .copied()
            .unwrap_or(st.derived[path as usize]);
        while derived < wanted {
            if let Ok((script, _)) = st.desc.derive(path as usize, derived) {
                overlay
                    .derived
                    .entry(self.key(&script))
                    .or_default()
                    .push((slot, path, derived));
            }
            derived += 1;
        }
        overlay.count.insert(k, derived);
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

/// Multiply-xorshift over 8-byte words, finished like splitmix64: a few cycles per script.
fn fast_hash(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(buf))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn check_hash(keys: &RandomState, script: &Script) -> u64 {
    let mut h = keys.build_hasher();
    h.write(script.as_bytes());
    h.finish()
}

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

#[cfg(test)]
mod tests {
    use bitcoin::{Network, OutPoint};

    use super::*;
    use crate::unit_kit::*;

    fn index_of(watches: &[Watch]) -> WatchIndex {
        WatchIndex::new(Network::Regtest, watches.iter().cloned())
    }

    #[test]
    fn an_output_to_a_watched_address_matches_with_the_address_rebuilt() {
        let w = watch(1, 3);
        let index = index_of(std::slice::from_ref(&w));
        let tx = payment(
            1,
            &[
                (address(2).script_pubkey(), 5),
                (address(1).script_pubkey(), 7),
            ],
        );
        let m = index.match_tx(&tx);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].watch_id, w.id);
        assert_eq!(
            m[0].outputs,
            [MatchedOutput {
                vout: 1,
                address: address(1).to_string(),
                amount_sat: 7,
                derivation_index: None,
                derivation_path: None,
            }]
        );
        assert!(index
            .match_tx(&payment(2, &[(address(3).script_pubkey(), 1)]))
            .is_empty());
    }

    #[test]
    fn two_watches_of_one_address_both_match() {
        let a = watch(1, 1);
        let mut b = watch(1, 6);
        b.id = crate::watch::watch_id("address:second");
        let index = index_of(&[a.clone(), b.clone()]);
        let m = index.match_tx(&payment(1, &[(address(1).script_pubkey(), 7)]));
        let mut ids: Vec<&str> = m.iter().map(|m| m.watch_id.as_str()).collect();
        ids.sort();
        let mut want = vec![a.id.as_str(), b.id.as_str()];
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(index.confirmations(&b.id), Some(6));
    }

    #[test]
    fn spending_a_recorded_coin_matches_as_an_input() {
        let w = watch(1, 1);
        let mut index = index_of(std::slice::from_ref(&w));
        let pay = payment(1, &[(address(1).script_pubkey(), 7)]);
        let txid = pay.compute_txid();
        let coins = WatchIndex::coins_of(txid, &index.match_tx(&pay)[0]);
        index.apply(&IndexChanges {
            coins,
            derivations: vec![],
        });
        let m = index.match_tx(&spend(&[(OutPoint::new(txid, 0), 7)]));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].inputs.len(), 1);
        assert_eq!(m[0].amount_sat(), -7);
    }

    #[test]
    fn a_descriptor_is_watched_gap_addresses_ahead_of_its_highest_used_index() {
        let w = descriptor_watch(3, 1);
        let mut index = index_of(std::slice::from_ref(&w));
        assert_eq!(index.script_count(), 3, "indexes 0..3 before any is used");
        let beyond = payment(1, &[(derived_script(5), 1)]);
        assert!(index.match_tx(&beyond).is_empty());
        index.set_used(&Derivation {
            watch_id: w.id.clone(),
            path: 0,
            used: 2,
        });
        assert_eq!(index.script_count(), 6, "3 after index 2");
        let m = index.match_tx(&beyond);
        assert_eq!(m[0].outputs[0].derivation_index, Some(5));
    }

    #[test]
    fn records_come_from_memory_or_the_loader_and_unknown_ids_are_none() {
        let w = watch(1, 2);
        let index = index_of(std::slice::from_ref(&w));
        assert_eq!(index.record(&w.id).unwrap().as_deref(), Some(&w));
        assert_eq!(index.record(&watch(2, 1).id).unwrap(), None);
        assert_eq!(index.confirmations(&watch(2, 1).id), None);

        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = calls.clone();
        let stored = w.clone();
        let loader: WatchLoader = Arc::new(move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Some(stored.clone()))
        });
        let mut lazy = WatchIndex::with_loader(Network::Regtest, loader, 1);
        lazy.insert_target(&w.id, &w.target, w.confirmations);
        assert_eq!(lazy.record(&w.id).unwrap().as_deref(), Some(&w));
        assert_eq!(lazy.record(&w.id).unwrap().as_deref(), Some(&w));
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "cached after the first load"
        );
        assert_eq!(
            lazy.record(&watch(3, 1).id).unwrap(),
            None,
            "not in the index: not loaded"
        );
    }

    #[test]
    fn a_probed_block_matches_exactly_as_one_transaction_at_a_time() {
        let mut second = watch(2, 1);
        second.id = crate::watch::watch_id("address:another watch of address 2");
        let d = descriptor_watch(2, 1);
        let mut index = index_of(&[watch(1, 1), watch(2, 1), second, d]);
        // Inserted after the bulk load: waits in the table's map, not its array.
        index.insert(watch(3, 1));
        let txs = vec![
            payment(1, &[(address(9).script_pubkey(), 1)]),
            payment(
                2,
                &[(address(1).script_pubkey(), 2), (derived_script(1), 3)],
            ),
            // Index 3 is watched only once index 1 is used, by the transaction before.
            payment(
                3,
                &[(derived_script(3), 4), (address(2).script_pubkey(), 5)],
            ),
            payment(4, &[(address(3).script_pubkey(), 6)]),
        ];
        let one_by_one: Vec<Vec<TxMatch>> = {
            let mut overlay = Overlay::default();
            txs.iter()
                .map(|t| index.match_tx_in(t, &mut overlay))
                .collect()
        };
        let probe = index.probe(&txs);
        let mut overlay = Overlay::default();
        let probed: Vec<Vec<TxMatch>> = txs
            .iter()
            .enumerate()
            .map(|(i, t)| index.match_tx_probed(t, probe.of(i), &mut overlay))
            .collect();
        assert_eq!(probed, one_by_one, "the probe changes nothing matched");
        let counts: Vec<usize> = probed.iter().map(Vec::len).collect();
        assert_eq!(counts, [0, 2, 3, 1], "watches matched by each transaction");
    }

    #[test]
    fn a_watch_inserted_again_takes_its_new_confirmations() {
        let mut index = index_of(&[watch(1, 1)]);
        index.insert(watch(1, 9));
        assert_eq!(index.len(), 1);
        assert_eq!(index.confirmations(&watch(1, 1).id), Some(9));
    }
}
