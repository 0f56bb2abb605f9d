//! The watch stage's change sets: coins received and derivation indexes used (what the index
//! learns from matched transactions), and rescan progress.

use std::collections::BTreeMap;

use bitcoin::OutPoint;

use super::{Derivation, WatchedCoin};
use crate::merge::Merge;

/// What matching taught the index: coins watches received (to see their spends) and descriptor
/// indexes used (more addresses are watched after them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexChanges {
    /// A coin is recorded once: the first record of an outpoint stays.
    pub coins: Vec<(OutPoint, WatchedCoin)>,
    /// Sorted by (watch, path); the highest used index of each.
    pub derivations: Vec<Derivation>,
}

impl IndexChanges {
    /// Coins of one step (an outpoint is created once, so they are new to it).
    pub fn add_coins(&mut self, coins: impl IntoIterator<Item = (OutPoint, WatchedCoin)>) {
        self.coins.extend(coins);
    }
}

impl Merge for IndexChanges {
    fn merge(&mut self, later: IndexChanges) {
        let known: std::collections::HashSet<OutPoint> =
            self.coins.iter().map(|(op, _)| *op).collect();
        self.coins.extend(
            later
                .coins
                .into_iter()
                .filter(|(op, _)| !known.contains(op)),
        );
        for d in later.derivations {
            match self
                .derivations
                .iter_mut()
                .find(|x| x.watch_id == d.watch_id && x.path == d.path)
            {
                Some(x) => x.used = x.used.max(d.used),
                None => self.derivations.push(d),
            }
        }
        self.derivations
            .sort_by(|a, b| (&a.watch_id, a.path).cmp(&(&b.watch_id, b.path)));
    }

    fn is_empty(&self) -> bool {
        self.coins.is_empty() && self.derivations.is_empty()
    }
}

/// Rescan progress: watch id → the next height to scan (`None`: done, the watch is live).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RescanChanges(pub BTreeMap<String, Option<u32>>);

impl RescanChanges {
    pub fn next(watch_id: &str, next: Option<u32>) -> RescanChanges {
        RescanChanges(BTreeMap::from([(watch_id.to_string(), next)]))
    }
}

impl Merge for RescanChanges {
    fn merge(&mut self, later: RescanChanges) {
        self.0.extend(later.0);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coin(watch: &str, sat: u64) -> WatchedCoin {
        WatchedCoin {
            watch_id: watch.into(),
            address: "bcrt1q".into(),
            amount_sat: sat,
        }
    }

    fn used(watch: &str, path: u32, used: u32) -> Derivation {
        Derivation {
            watch_id: watch.into(),
            path,
            used,
        }
    }

    #[test]
    fn merging_keeps_the_first_coin_and_the_highest_derivation() {
        let op = OutPoint::null();
        let mut a = IndexChanges {
            coins: vec![(op, coin("w1", 5))],
            derivations: vec![used("w2", 0, 7)],
        };
        a.merge(IndexChanges {
            coins: vec![(op, coin("w1", 9))],
            derivations: vec![used("w2", 0, 3), used("w1", 1, 2)],
        });
        assert_eq!(a.coins, [(op, coin("w1", 5))], "the first record stays");
        assert_eq!(
            a.derivations,
            [used("w1", 1, 2), used("w2", 0, 7)],
            "a lower index never lowers the used one; sorted by watch"
        );
        assert!(IndexChanges::default().is_empty());
    }

    #[test]
    fn a_later_rescan_position_wins() {
        let mut r = RescanChanges::next("w1", Some(10));
        r.merge(RescanChanges::next("w2", Some(4)));
        r.merge(RescanChanges::next("w1", None));
        assert_eq!(
            r.0,
            BTreeMap::from([("w1".to_string(), None), ("w2".to_string(), Some(4))])
        );
        assert!(RescanChanges::default().is_empty());
    }
}
