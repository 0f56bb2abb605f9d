//! The table of watched address scripts: which slots watch a script, found by the script's two
//! hashes. A hash map of these costs about 28 bytes a script with its empty buckets (285 MB for
//! ten million); here most entries sit in one array of 12-byte entries, sorted and reached
//! through a directory on the first hash's top 20 bits (4 MB, made at the first merge), and
//! those added since the last merge in a small map.
//!
//! What must agree before a script counts: the first hash's top 52 bits (20 by the directory,
//! 32 in the entry) and 32 bits of the second, keyed one.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

pub type Slot = u32;

/// The keys are already uniformly random: hash tables may use them as they are.
#[derive(Clone, Copy, Default)]
pub struct PassThrough;

pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

const BUCKET_BITS: u32 = 20;
const BUCKETS: usize = 1 << BUCKET_BITS;
/// The map is merged in at this share of the array (merges cost O(n), at geometric intervals).
const MERGE_SHARE: usize = 8;
/// Below this many, the map is not worth merging.
const MERGE_MIN: usize = 1024;
/// Entries whose first hash is already in the map wait in a list scanned on every probe.
const EXTRA_MAX: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Entry {
    mid: u32,
    check: u32,
    slot: Slot,
}

fn bucket(fast: u64) -> usize {
    (fast >> (64 - BUCKET_BITS)) as usize
}

fn mid(fast: u64) -> u32 {
    (fast >> (64 - BUCKET_BITS - 32)) as u32
}

#[derive(Default)]
pub struct ScriptTable {
    /// Sorted by (bucket, mid, check, slot); `dir[b]..dir[b + 1]` is bucket `b`. Empty until
    /// the first merge.
    entries: Vec<Entry>,
    dir: Vec<u32>,
    recent: HashMap<u64, (u32, Slot), PassThrough>,
    /// Entries whose first hash the map already holds (two watches of one script, or a
    /// collision of first hashes).
    extra: Vec<(u64, u32, Slot)>,
}

impl ScriptTable {
    pub fn len(&self) -> usize {
        self.entries.len() + self.recent.len() + self.extra.len()
    }

    /// Records that `slot` watches the script of hashes `fast` and `check`; again is a no-op.
    pub fn insert(&mut self, fast: u64, check: u32, slot: Slot) {
        let mut known = false;
        self.for_each(fast, || check, |s| known |= s == slot);
        if known {
            return;
        }
        match self.recent.get(&fast) {
            Some(_) => self.extra.push((fast, check, slot)),
            None => {
                self.recent.insert(fast, (check, slot));
            }
        }
        let pending = self.recent.len() + self.extra.len();
        if pending >= MERGE_MIN.max(self.entries.len() / MERGE_SHARE)
            || self.extra.len() >= EXTRA_MAX
        {
            self.merge();
        }
    }

    /// Calls `found` with each slot watching the script. `check` is asked for only when an
    /// entry agrees on the first hash, so a miss costs no keyed hash.
    pub fn for_each(&self, fast: u64, check: impl FnOnce() -> u32, mut found: impl FnMut(Slot)) {
        let in_array = self.range(fast);
        let in_map = match self.recent.is_empty() {
            true => None,
            false => self.recent.get(&fast),
        };
        let in_extra = !self.extra.is_empty() && self.extra.iter().any(|e| e.0 == fast);
        if in_array.is_empty() && in_map.is_none() && !in_extra {
            return;
        }
        let check = check();
        for e in &self.entries[in_array] {
            if e.check == check {
                found(e.slot);
            }
        }
        if let Some(&(c, slot)) = in_map {
            if c == check {
                found(slot);
            }
        }
        for &(f, c, slot) in &self.extra {
            if f == fast && c == check {
                found(slot);
            }
        }
    }

    /// For each first hash, whether some entry agrees with it: a miss here is a miss for
    /// `for_each`. Done for many hashes at once, so that their memory reads overlap instead of
    /// waiting one after the other (a block's probes are nearly all misses, each a cache miss).
    pub fn may_hold(&self, fasts: &[u64]) -> Vec<bool> {
        let bounds: Vec<(u32, u32)> = match self.dir.is_empty() {
            true => vec![(0, 0); fasts.len()],
            false => fasts
                .iter()
                .map(|f| (self.dir[bucket(*f)], self.dir[bucket(*f) + 1]))
                .collect(),
        };
        fasts
            .iter()
            .zip(bounds)
            .map(|(&fast, (lo, hi))| {
                let m = mid(fast);
                self.entries[lo as usize..hi as usize]
                    .iter()
                    .any(|e| e.mid == m)
                    || (!self.recent.is_empty() && self.recent.contains_key(&fast))
                    || self.extra.iter().any(|e| e.0 == fast)
            })
            .collect()
    }

    /// The array's entries that agree with `fast` on its top 48 bits.
    fn range(&self, fast: u64) -> std::ops::Range<usize> {
        if self.dir.is_empty() {
            return 0..0;
        }
        let b = bucket(fast);
        let (lo, hi) = (self.dir[b] as usize, self.dir[b + 1] as usize);
        let m = mid(fast);
        let within = &self.entries[lo..hi];
        let start = lo + within.partition_point(|e| e.mid < m);
        let end = start
            + self.entries[start..hi]
                .iter()
                .take_while(|e| e.mid == m)
                .count();
        start..end
    }

    /// Moves whatever waits in the map into the array: after a bulk load, so probes find
    /// everything in one place.
    pub fn settle(&mut self) {
        // A few entries stay in the map: the array's directory alone is 4 MB.
        if self.len() >= MERGE_MIN && !(self.recent.is_empty() && self.extra.is_empty()) {
            self.merge();
        }
    }

    /// Moves the map and the list into the array, bucket by bucket.
    fn merge(&mut self) {
        let mut fresh: Vec<(usize, Entry)> = self
            .recent
            .drain()
            .map(|(fast, (check, slot))| (fast, check, slot))
            .chain(self.extra.drain(..))
            .map(|(fast, check, slot)| {
                let e = Entry {
                    mid: mid(fast),
                    check,
                    slot,
                };
                (bucket(fast), e)
            })
            .collect();
        fresh.sort_unstable();
        let old = std::mem::take(&mut self.entries);
        let old_dir = std::mem::take(&mut self.dir);
        let mut merged = Vec::with_capacity(old.len() + fresh.len());
        let mut dir = Vec::with_capacity(BUCKETS + 1);
        let mut f = 0;
        for b in 0..BUCKETS {
            dir.push(merged.len() as u32);
            let olds = match old_dir.is_empty() {
                true => &old[0..0],
                false => &old[old_dir[b] as usize..old_dir[b + 1] as usize],
            };
            let f_end = f + fresh[f..].partition_point(|(fb, _)| *fb == b);
            merge_runs(olds, fresh[f..f_end].iter().map(|(_, e)| *e), &mut merged);
            f = f_end;
        }
        dir.push(merged.len() as u32);
        self.entries = merged;
        self.dir = dir;
        self.recent.shrink_to(MERGE_MIN);
        self.extra.shrink_to(EXTRA_MAX);
    }
}

/// Appends the sorted runs `a` and `b` to `out`, in order.
fn merge_runs(a: &[Entry], b: impl Iterator<Item = Entry>, out: &mut Vec<Entry>) {
    let mut i = 0;
    for e in b {
        while i < a.len() && a[i] <= e {
            out.push(a[i]);
            i += 1;
        }
        out.push(e);
    }
    out.extend_from_slice(&a[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(n: u64) -> (u64, u32) {
        let fast = n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ n;
        (fast, (n.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 32) as u32)
    }

    /// A table holding scripts `ns`, each watched by the slot of its number.
    fn filled(ns: std::ops::Range<u64>) -> ScriptTable {
        let mut t = ScriptTable::default();
        for n in ns {
            let (f, c) = hashes(n);
            t.insert(f, c, n as Slot);
        }
        t
    }

    fn slots_of(t: &ScriptTable, fast: u64, check: u32) -> Vec<Slot> {
        let mut v = Vec::new();
        t.for_each(fast, || check, |s| v.push(s));
        v.sort();
        v
    }

    #[test]
    fn every_script_is_found_across_merges_and_others_are_not() {
        let mut t = filled(0..20_000);
        assert_eq!(t.len(), 20_000, "one entry a script");
        assert!(
            t.entries.len() > 15_000,
            "most entries were merged into the array ({} there)",
            t.entries.len()
        );
        for n in 0..20_000u64 {
            let (f, c) = hashes(n);
            assert_eq!(slots_of(&t, f, c), [n as Slot], "script {n}");
        }
        let (f, c) = hashes(20_001);
        assert!(slots_of(&t, f, c).is_empty(), "a script never added");
        t.insert(f, c, 7);
        let fasts: Vec<u64> = (19_990..20_010).map(|n| hashes(n).0).collect();
        let want: Vec<bool> = (19_990..20_010)
            .map(|n| n < 20_000 || n == 20_001)
            .collect();
        assert_eq!(
            t.may_hold(&fasts),
            want,
            "in the array, in the map, or neither"
        );
    }

    #[test]
    fn a_first_hash_that_agrees_is_not_enough() {
        let t = filled(0..5_000);
        let (f, c) = hashes(42);
        let mut asked = 0;
        let mut found = Vec::new();
        t.for_each(
            f,
            || {
                asked += 1;
                c ^ 1
            },
            |s| found.push(s),
        );
        assert_eq!(asked, 1, "the keyed hash is asked for on a first-hash hit");
        assert!(found.is_empty(), "a different keyed hash does not match");
        let (miss, _) = hashes(9_999_999);
        t.for_each(miss, || panic!("no keyed hash on a miss"), |_| {});
    }

    #[test]
    fn two_slots_of_one_script_and_a_repeated_insert_are_kept_right() {
        let mut t = ScriptTable::default();
        let (f, c) = hashes(7);
        t.insert(f, c, 1);
        t.insert(f, c, 2);
        t.insert(f, c, 1);
        // A different script that agrees on the first hash only.
        t.insert(f, c ^ 5, 3);
        assert_eq!(t.len(), 3);
        assert_eq!(slots_of(&t, f, c), [1, 2]);
        for n in 100..3_000u64 {
            let (f, c) = hashes(n);
            t.insert(f, c, n as Slot);
        }
        assert!(t.extra.is_empty(), "merged into the array");
        t.insert(f, c, 2);
        assert_eq!(slots_of(&t, f, c), [1, 2], "after the merge");
        assert_eq!(slots_of(&t, f, c ^ 5), [3]);
        assert_eq!(t.len(), 2 + 1 + 2_900);
    }

    #[test]
    fn many_watches_of_one_script_move_into_the_array() {
        let mut t = ScriptTable::default();
        let (f, c) = hashes(1);
        for slot in 0..200 {
            t.insert(f, c, slot);
        }
        assert!(t.extra.len() < EXTRA_MAX, "the list stays short");
        assert_eq!(slots_of(&t, f, c), (0..200).collect::<Vec<_>>());
    }
}
