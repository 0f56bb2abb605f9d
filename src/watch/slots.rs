//! Which slot of the index holds a watch id. A hash map of 12-byte ids costs about 28 bytes a
//! watch (280 MB for ten million); here most slots sit in one array sorted by id (4 bytes a
//! watch, found by binary search), and those added since the last merge in a small map. The
//! ids themselves are the index's own array, by slot.

use std::collections::HashMap;

pub type Id = [u8; 12];
pub type Slot = u32;

/// The map's share of the sorted array at which it is merged in: merges cost O(n) each and
/// come at geometric intervals, and the map never holds more than an eighth of the slots.
const MERGE_SHARE: usize = 8;
/// Below this many, the map is not worth merging.
const MERGE_MIN: usize = 1024;

#[derive(Default)]
pub struct SlotsById {
    sorted: Vec<Slot>,
    recent: HashMap<Id, Slot>,
}

impl SlotsById {
    /// The slot holding `id`; `ids[slot]` is the id of each slot.
    pub fn get(&self, ids: &[Id], id: &Id) -> Option<Slot> {
        if let Some(s) = self.recent.get(id) {
            return Some(*s);
        }
        self.sorted
            .binary_search_by(|s| ids[*s as usize].cmp(id))
            .ok()
            .map(|i| self.sorted[i])
    }

    /// Records that `slot` holds `ids[slot]`, a new id.
    pub fn insert(&mut self, ids: &[Id], slot: Slot) {
        self.recent.insert(ids[slot as usize], slot);
        if self.recent.len() >= MERGE_MIN.max(self.sorted.len() / MERGE_SHARE) {
            self.merge(ids);
        }
    }

    /// Moves the map's slots into the sorted array: sorts the few, then merges two sorted runs.
    fn merge(&mut self, ids: &[Id]) {
        let mut fresh: Vec<Slot> = self.recent.drain().map(|(_, s)| s).collect();
        fresh.sort_unstable_by(|a, b| ids[*a as usize].cmp(&ids[*b as usize]));
        let old = std::mem::take(&mut self.sorted);
        let mut merged = Vec::with_capacity(old.len() + fresh.len());
        let (mut i, mut j) = (0, 0);
        while i < old.len() && j < fresh.len() {
            if ids[old[i] as usize] <= ids[fresh[j] as usize] {
                merged.push(old[i]);
                i += 1;
            } else {
                merged.push(fresh[j]);
                j += 1;
            }
        }
        merged.extend_from_slice(&old[i..]);
        merged.extend_from_slice(&fresh[j..]);
        self.sorted = merged;
        self.recent.shrink_to(MERGE_MIN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Id {
        // Scrambled, so ids do not arrive in sorted order.
        let x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&x.to_be_bytes());
        b[8..].copy_from_slice(&(n as u32).to_be_bytes());
        b
    }

    #[test]
    fn every_id_is_found_across_merges_and_unknown_ones_are_not() {
        let mut ids = Vec::new();
        let mut slots = SlotsById::default();
        for n in 0..20_000u64 {
            ids.push(id(n));
            slots.insert(&ids, (ids.len() - 1) as Slot);
        }
        assert!(
            slots.sorted.len() > 15_000 && slots.recent.len() < 20_000 / MERGE_SHARE + MERGE_MIN,
            "most slots were merged into the sorted array ({} sorted, {} recent)",
            slots.sorted.len(),
            slots.recent.len()
        );
        assert!(
            slots
                .sorted
                .windows(2)
                .all(|w| ids[w[0] as usize] < ids[w[1] as usize]),
            "sorted by id"
        );
        for (slot, i) in ids.iter().enumerate() {
            assert_eq!(slots.get(&ids, i), Some(slot as Slot), "slot {slot}");
        }
        assert_eq!(slots.get(&ids, &id(20_001)), None, "an id never added");
    }
}
