//! Double SHA-256 of many messages at once, and merkle roots over the results: the hashing a
//! block check must do. On x86-64 with the SHA extensions two messages go through the rounds
//! side by side. One message's rounds wait on each other (each round needs the state the last
//! one left), so a single stream leaves the SHA unit idle half the time; two streams keep it
//! busy, which hashes about 1.7 times as fast on this project's machine (BENCHMARKS.md).
//! Without the extensions, `bitcoin_hashes` hashes one message at a time. A leaf: it imports
//! nothing of the crate.

use bitcoin::hashes::{sha256, Hash, HashEngine};

/// A message given as up to three slices, hashed as if joined (a segwit transaction's txid
/// leaves out the middle of its encoding).
pub type Pieces<'a> = [&'a [u8]; 3];

/// The double SHA-256 of each message, in order.
pub fn sha256d_each(msgs: &[Pieces]) -> Vec<[u8; 32]> {
    #[cfg(target_arch = "x86_64")]
    if shani::available() {
        let mut out = vec![[0u8; 32]; msgs.len()];
        // SAFETY: the CPU has the instructions `shani` is compiled for.
        unsafe {
            shani::sha256_each(msgs, &mut out);
            shani::sha256_of_32_in_place(&mut out);
        }
        return out;
    }
    msgs.iter().map(portable_sha256d).collect()
}

/// Bitcoin's merkle root of `leaves` (an odd level pairs its last node with itself); `None`
/// for no leaves. Matches `bitcoin::merkle_tree::calculate_root`.
pub fn merkle_root(mut level: Vec<[u8; 32]>) -> Option<[u8; 32]> {
    while level.len() > 1 {
        let pairs: Vec<[u8; 64]> = level
            .chunks(2)
            .map(|p| {
                let mut joined = [0u8; 64];
                joined[..32].copy_from_slice(&p[0]);
                joined[32..].copy_from_slice(p.get(1).unwrap_or(&p[0]));
                joined
            })
            .collect();
        let msgs: Vec<Pieces> = pairs.iter().map(|p| [&p[..], &[], &[]]).collect();
        level = sha256d_each(&msgs);
    }
    level.pop()
}

fn portable_sha256d(msg: &Pieces) -> [u8; 32] {
    let mut e = sha256::Hash::engine();
    msg.iter().for_each(|p| e.input(p));
    let first = sha256::Hash::from_engine(e);
    sha256::Hash::hash(first.as_byte_array()).to_byte_array()
}

#[cfg(target_arch = "x86_64")]
mod shani {
    use std::arch::x86_64::*;

    use super::Pieces;

    pub fn available() -> bool {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    }

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// The state as the SHA instructions hold it: words A, B, E, F and C, D, G, H.
    #[derive(Clone, Copy)]
    struct State(__m128i, __m128i);

    /// A message being cut into 64-byte blocks, its padding and length included.
    struct Feed<'a> {
        pieces: Pieces<'a>,
        piece: usize,
        at: usize,
        bits: u64,
        padded: bool,
        done: bool,
        scratch: [u8; 64],
    }

    impl<'a> Feed<'a> {
        fn new(pieces: Pieces<'a>) -> Self {
            let bits = pieces.iter().map(|p| p.len() as u64).sum::<u64>() * 8;
            Feed {
                pieces,
                piece: 0,
                at: 0,
                bits,
                padded: false,
                done: false,
                scratch: [0; 64],
            }
        }

        /// The next block, straight from the message where 64 bytes of one piece remain,
        /// else assembled in `scratch`; `None` once the length block is out.
        fn next_block(&mut self) -> Option<Next> {
            if self.done {
                return None;
            }
            while self.piece < 3 && self.at == self.pieces[self.piece].len() {
                (self.piece, self.at) = (self.piece + 1, 0);
            }
            if self.piece < 3 && self.pieces[self.piece].len() - self.at >= 64 {
                let p = self.pieces[self.piece][self.at..].as_ptr();
                self.at += 64;
                return Some(Next::At(p));
            }
            let mut n = 0;
            while n < 64 && self.piece < 3 {
                let rest = &self.pieces[self.piece][self.at..];
                let take = rest.len().min(64 - n);
                self.scratch[n..n + take].copy_from_slice(&rest[..take]);
                (n, self.at) = (n + take, self.at + take);
                if self.at == self.pieces[self.piece].len() {
                    (self.piece, self.at) = (self.piece + 1, 0);
                }
            }
            if n < 64 && !self.padded {
                self.scratch[n] = 0x80;
                (n, self.padded) = (n + 1, true);
            }
            if n <= 56 && self.padded {
                self.scratch[n..56].fill(0);
                self.scratch[56..].copy_from_slice(&self.bits.to_be_bytes());
                self.done = true;
            } else {
                self.scratch[n..].fill(0);
            }
            Some(Next::Scratch)
        }

        /// Where block `next` is. The pointer to `scratch` is taken only now, just before
        /// the block is read, so that no borrow of the lane taken meanwhile invalidates it.
        fn at(&self, next: Next) -> *const u8 {
            match next {
                Next::At(p) => p,
                Next::Scratch => self.scratch.as_ptr(),
            }
        }
    }

    /// Where a feed's next block is: at this place in the message, or in its scratch.
    #[derive(Clone, Copy)]
    enum Next {
        At(*const u8),
        Scratch,
    }

    /// A message in one of the two streams: where its hash goes, its blocks, its state.
    struct Lane<'a> {
        slot: usize,
        feed: Feed<'a>,
        state: State,
    }

    /// Lane `lane`'s next block, finishing its message (hash into `out`) and starting the
    /// next of `queue` as messages run out; `None` once the queue is empty too.
    ///
    /// # Safety
    /// The CPU has the SHA extensions.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn next_of<'a>(
        lane: &mut Option<Lane<'a>>,
        queue: &mut impl Iterator<Item = (usize, &'a Pieces<'a>)>,
        out: &mut [[u8; 32]],
    ) -> Option<Next> {
        loop {
            if let Some(l) = lane {
                if let Some(p) = l.feed.next_block() {
                    return Some(p);
                }
                out[l.slot] = digest(l.state);
            }
            let (slot, msg) = queue.next()?;
            *lane = Some(Lane {
                slot,
                feed: Feed::new(*msg),
                state: initial(),
            });
        }
    }

    /// The SHA-256 of each message into `out` (as long as `msgs`), two at a time.
    ///
    /// # Safety
    /// The CPU has the SHA extensions (`available`).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn sha256_each(msgs: &[Pieces], out: &mut [[u8; 32]]) {
        let mut queue = msgs.iter().enumerate();
        let (mut a, mut b) = (None, None);
        loop {
            let pa = next_of(&mut a, &mut queue, out);
            let pb = next_of(&mut b, &mut queue, out);
            match (pa, pb, &mut a, &mut b) {
                (Some(pa), Some(pb), Some(la), Some(lb)) => {
                    let (pa, pb) = (la.feed.at(pa), lb.feed.at(pb));
                    compress2(&mut la.state, pa, &mut lb.state, pb)
                }
                (Some(p), None, Some(l), _) | (None, Some(p), _, Some(l)) => {
                    let p = l.feed.at(p);
                    compress1(&mut l.state, p)
                }
                _ => return,
            }
        }
    }

    /// Replaces each 32-byte value by its SHA-256: the second half of a double SHA-256.
    ///
    /// # Safety
    /// The CPU has the SHA extensions (`available`).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn sha256_of_32_in_place(hashes: &mut [[u8; 32]]) {
        let block = |h: &[u8; 32]| {
            let mut b = [0u8; 64];
            b[..32].copy_from_slice(h);
            b[32] = 0x80;
            b[62] = 0x01; // 256 bits, big-endian
            b
        };
        for pair in hashes.chunks_mut(2) {
            let mut sa = initial();
            let ba = block(&pair[0]);
            if let [_, second] = pair {
                let bb = block(second);
                let mut sb = initial();
                compress2(&mut sa, ba.as_ptr(), &mut sb, bb.as_ptr());
                *second = digest(sb);
            } else {
                compress1(&mut sa, ba.as_ptr());
            }
            pair[0] = digest(sa);
        }
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn initial() -> State {
        let cdab = _mm_shuffle_epi32(_mm_loadu_si128(IV.as_ptr() as *const __m128i), 0xB1);
        let efgh = _mm_shuffle_epi32(_mm_loadu_si128(IV.as_ptr().add(4) as *const __m128i), 0x1B);
        State(
            _mm_alignr_epi8(cdab, efgh, 8),
            _mm_blend_epi16(efgh, cdab, 0xF0),
        )
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn digest(s: State) -> [u8; 32] {
        let feba = _mm_shuffle_epi32(s.0, 0x1B);
        let dchg = _mm_shuffle_epi32(s.1, 0xB1);
        let abcd = _mm_blend_epi16(feba, dchg, 0xF0);
        let efgh = _mm_alignr_epi8(dchg, feba, 8);
        let mut out = [0u8; 32];
        _mm_storeu_si128(
            out.as_mut_ptr() as *mut __m128i,
            _mm_shuffle_epi8(abcd, be_words()),
        );
        _mm_storeu_si128(
            out.as_mut_ptr().add(16) as *mut __m128i,
            _mm_shuffle_epi8(efgh, be_words()),
        );
        out
    }

    /// Swaps each 32-bit word's bytes: SHA-256 reads its words big-endian.
    #[inline(always)]
    unsafe fn be_words() -> __m128i {
        _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203)
    }

    /// Words `4i..4i + 4` of the message schedule: read from the block for the first four
    /// groups, derived from the last sixteen words (kept in `w`, four to an entry) after.
    #[inline(always)]
    unsafe fn words(w: &mut [__m128i; 4], block: *const u8, i: usize) -> __m128i {
        w[i & 3] = if i < 4 {
            _mm_shuffle_epi8(
                _mm_loadu_si128(block.add(16 * i) as *const __m128i),
                be_words(),
            )
        } else {
            let sigma0 = _mm_sha256msg1_epu32(w[i & 3], w[(i + 1) & 3]);
            let w7 = _mm_alignr_epi8(w[(i + 3) & 3], w[(i + 2) & 3], 4);
            _mm_sha256msg2_epu32(_mm_add_epi32(sigma0, w7), w[(i + 3) & 3])
        };
        w[i & 3]
    }

    /// Rounds `4i..4i + 4`.
    #[inline(always)]
    unsafe fn rounds(s: &mut State, w: __m128i, i: usize) {
        let wk = _mm_add_epi32(w, _mm_loadu_si128(K.as_ptr().add(4 * i) as *const __m128i));
        s.1 = _mm_sha256rnds2_epu32(s.1, s.0, wk);
        s.0 = _mm_sha256rnds2_epu32(s.0, s.1, _mm_shuffle_epi32(wk, 0x0E));
    }

    /// The sixteen groups of four rounds written out, so that the compiler sees constant
    /// indices and keeps the schedule in registers.
    macro_rules! sixteen_groups {
        ($step:ident) => {
            $step!(0);
            $step!(1);
            $step!(2);
            $step!(3);
            $step!(4);
            $step!(5);
            $step!(6);
            $step!(7);
            $step!(8);
            $step!(9);
            $step!(10);
            $step!(11);
            $step!(12);
            $step!(13);
            $step!(14);
            $step!(15);
        };
    }

    /// One block into `s`. `block` points to 64 readable bytes.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn compress1(s: &mut State, block: *const u8) {
        let start = *s;
        let mut w = [_mm_setzero_si128(); 4];
        macro_rules! step {
            ($i:expr) => {{
                let x = words(&mut w, block, $i);
                rounds(s, x, $i);
            }};
        }
        sixteen_groups!(step);
        *s = State(_mm_add_epi32(s.0, start.0), _mm_add_epi32(s.1, start.1));
    }

    /// One block into each of two states, their rounds interleaved. `a` and `b` point to 64
    /// readable bytes each.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn compress2(sa: &mut State, a: *const u8, sb: &mut State, b: *const u8) {
        let (start_a, start_b) = (*sa, *sb);
        let (mut wa, mut wb) = ([_mm_setzero_si128(); 4], [_mm_setzero_si128(); 4]);
        macro_rules! step {
            ($i:expr) => {{
                let xa = words(&mut wa, a, $i);
                let xb = words(&mut wb, b, $i);
                rounds(sa, xa, $i);
                rounds(sb, xb, $i);
            }};
        }
        sixteen_groups!(step);
        *sa = State(
            _mm_add_epi32(sa.0, start_a.0),
            _mm_add_epi32(sa.1, start_a.1),
        );
        *sb = State(
            _mm_add_epi32(sb.0, start_b.0),
            _mm_add_epi32(sb.1, start_b.1),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::sha256d;

    /// Messages of every length from 0 to 300 bytes, split into pieces at every kind of
    /// place, hashed as a batch (odd and even counts, so both the paired and the lone
    /// stream finish messages), each equal to `bitcoin_hashes`' double SHA-256 of the whole.
    #[test]
    fn batches_hash_every_length_and_split_as_bitcoin_hashes_does() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 131 + 7) as u8).collect();
        let mut msgs: Vec<Pieces> = Vec::new();
        for len in 0..=300usize {
            let m = &data[..len];
            let (a, b) = (len / 3, len * 2 / 3);
            msgs.push([m, &[], &[]]);
            msgs.push([&m[..a], &m[a..b], &m[b..]]);
            msgs.push([&[], &m[..len.min(64)], &m[len.min(64)..]]);
        }
        for count in [msgs.len(), msgs.len() - 1, 1, 0] {
            let got = sha256d_each(&msgs[..count]);
            assert_eq!(got.len(), count, "one hash per message");
            for (i, (m, h)) in msgs.iter().zip(&got).enumerate() {
                let joined = m.concat();
                let want = sha256d::Hash::hash(&joined).to_byte_array();
                assert_eq!(*h, want, "message {i} of {} bytes", joined.len());
            }
        }
    }

    /// Merkle roots of 0 to 40 leaves match rust-bitcoin's, odd levels included.
    #[test]
    fn merkle_roots_match_rust_bitcoin() {
        for n in 0..=40u8 {
            let leaves: Vec<[u8; 32]> = (0..n).map(|i| [i.wrapping_mul(37); 32]).collect();
            let want = bitcoin::merkle_tree::calculate_root(
                leaves.iter().map(|l| sha256d::Hash::from_byte_array(*l)),
            )
            .map(|h| h.to_byte_array());
            assert_eq!(merkle_root(leaves), want, "root of {n} leaves");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_portable_path_agrees_with_the_batched_one() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i ^ (i >> 3)) as u8).collect();
        let msgs: Vec<Pieces> = (0..1000)
            .step_by(37)
            .map(|n| [&data[..n], &data[n..], &[]])
            .collect();
        let portable: Vec<[u8; 32]> = msgs.iter().map(portable_sha256d).collect();
        assert_eq!(
            sha256d_each(&msgs),
            portable,
            "both paths give the same hashes"
        );
    }
}
