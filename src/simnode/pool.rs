//! The simulated node's mempool: in arrival order, as `getrawmempool` lists it, with the
//! lookups by txid and by spent outpoint that bitcoind's own mempool keeps indexes for, so a
//! mempool of mainnet size (100,000 transactions) answers as fast as a small one.

use std::collections::{BTreeMap, HashMap};

use bitcoin::{OutPoint, Transaction, Txid};

#[derive(Clone, Default)]
pub struct Mempool {
    next: u64,
    order: BTreeMap<u64, Txid>,
    entries: HashMap<Txid, (u64, Transaction)>,
    /// Which transaction spends each outpoint: a mempool holds one spender per outpoint.
    spenders: HashMap<OutPoint, Txid>,
}

impl Mempool {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, txid: &Txid) -> bool {
        self.entries.contains_key(txid)
    }

    pub fn get(&self, txid: &Txid) -> Option<&Transaction> {
        self.entries.get(txid).map(|(_, tx)| tx)
    }

    /// The transactions in the order they arrived.
    pub fn iter(&self) -> impl Iterator<Item = &Transaction> + '_ {
        self.order.values().map(|t| &self.entries[t].1)
    }

    /// Their txids, in the same order.
    pub fn txids(&self) -> impl Iterator<Item = Txid> + '_ {
        self.order.values().copied()
    }

    /// Adds `tx` last. The caller has removed what it conflicts with.
    pub fn push(&mut self, tx: Transaction) -> Txid {
        let txid = tx.compute_txid();
        if self.entries.contains_key(&txid) {
            return txid;
        }
        for i in &tx.input {
            self.spenders.insert(i.previous_output, txid);
        }
        self.order.insert(self.next, txid);
        self.entries.insert(txid, (self.next, tx));
        self.next += 1;
        txid
    }

    pub fn remove(&mut self, txid: &Txid) -> Option<Transaction> {
        let (at, tx) = self.entries.remove(txid)?;
        self.order.remove(&at);
        for i in &tx.input {
            if self.spenders.get(&i.previous_output) == Some(txid) {
                self.spenders.remove(&i.previous_output);
            }
        }
        Some(tx)
    }

    /// The mempool transaction spending `outpoint`, if any.
    pub fn spender(&self, outpoint: &OutPoint) -> Option<Txid> {
        self.spenders.get(outpoint).copied()
    }

    /// The mempool transactions spending an output of `txid`, in arrival order.
    pub fn children(&self, txid: &Txid) -> Vec<Txid> {
        let Some(tx) = self.get(txid) else {
            return vec![];
        };
        self.in_arrival_order(
            (0..tx.output.len() as u32)
                .filter_map(|vout| self.spender(&OutPoint::new(*txid, vout))),
        )
    }

    /// The mempool transactions spending any of `outpoints`, in arrival order.
    pub fn spenders_of<'a>(&self, outpoints: impl Iterator<Item = &'a OutPoint>) -> Vec<Txid> {
        self.in_arrival_order(outpoints.filter_map(|o| self.spender(o)))
    }

    /// `txids` of this mempool, once each, in the order they arrived (as bitcoind announces
    /// their removal).
    fn in_arrival_order(&self, txids: impl Iterator<Item = Txid>) -> Vec<Txid> {
        let mut found: Vec<(u64, Txid)> = txids
            .filter_map(|t| Some((self.entries.get(&t)?.0, t)))
            .collect();
        found.sort_unstable();
        found.dedup();
        found.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::absolute::LockTime;
    use bitcoin::transaction::Version;
    use bitcoin::{Amount, ScriptBuf, Sequence, TxIn, TxOut, Witness};

    fn tx(spends: &[OutPoint], outputs: u64) -> Transaction {
        Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: spends
                .iter()
                .map(|o| TxIn {
                    previous_output: *o,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::MAX,
                    witness: Witness::new(),
                })
                .collect(),
            output: (0..outputs)
                .map(|v| TxOut {
                    value: Amount::from_sat(1000 + v),
                    script_pubkey: ScriptBuf::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn keeps_arrival_order_and_finds_by_txid_spender_and_child() {
        let mut pool = Mempool::default();
        let coin = OutPoint::new(Txid::from_raw_hash(bitcoin::hashes::Hash::all_zeros()), 7);
        let parent = pool.push(tx(&[coin], 2));
        let child = pool.push(tx(&[OutPoint::new(parent, 1)], 1));
        let other = pool.push(tx(&[OutPoint::new(child, 0)], 1));
        assert_eq!(pool.txids().collect::<Vec<_>>(), vec![parent, child, other]);
        assert_eq!(pool.spender(&coin), Some(parent), "spender of the coin");
        assert_eq!(pool.children(&parent), vec![child], "child by output");
        assert!(pool.get(&child).is_some() && pool.contains(&other));

        assert!(pool.remove(&child).is_some(), "removed");
        assert_eq!(pool.txids().collect::<Vec<_>>(), vec![parent, other]);
        assert_eq!(pool.children(&parent), Vec::<Txid>::new(), "no child left");
        assert_eq!(pool.spender(&OutPoint::new(parent, 1)), None);
        assert_eq!(pool.len(), 2);
        assert!(pool.remove(&child).is_none(), "twice is nothing");
    }
}
