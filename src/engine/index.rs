//! The extent index: which logical sectors are cached, and where.
//!
//! One [`ExtentMap`] per 4 MiB logical region (a shard), each behind its own
//! lock and created on first use, so requests to different regions never
//! contend and an empty backing store costs no memory. Inside a shard,
//! extents are sorted by start and never overlap: [`ExtentMap::insert`]
//! resolves every overlap with the extents already there.
//!
//! The six relations of an existing extent T to a new range K (dm-pcache's
//! names; `[` start, `)` end):
//!
//! ```text
//! after:             T[---)                  T ends at or before K starts
//!                          K[-----)
//! before:                  K[-----)          T starts at or after K ends
//!                                 T[---)
//! overlap_tail:            K[-----)          T starts inside K, ends at or after K's end
//!                              T[-----)      -> cut T's front to K's end
//! overlap_contain:         K[-----)          T inside K
//!                           T[--)            -> delete T
//! overlap_contained:       K[-----)          K inside T, T sticks out on both sides
//!                        T[---------)        -> split T around K
//! overlap_head:            K[-----)          T starts before K, ends inside K
//!                       T[----)              -> cut T's back to K's start
//! ```

use std::collections::BTreeMap;

/// A value stored in an [`ExtentMap`]: it knows its length and how to drop
/// sectors from its front (advancing where its data lives).
pub trait Extent: Copy {
    /// Length in sectors.
    fn len(&self) -> u32;
    /// Zero length? (Never true for an extent in a map.)
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Set the length in sectors (a cut at the back).
    fn set_len(&mut self, len: u32);
    /// Drop `n` sectors from the front (n < len).
    fn skip_front(&mut self, n: u32);
    /// A placeholder value (never stored in a map).
    const EMPTY: Self;
}

/// Integer types usable as the start of an extent (sectors relative to the
/// map's base). A shard uses `u16` (4 MiB is 8192 sectors), the writeback
/// batch map uses `u64`.
pub trait Start: Copy + Ord + Into<u64> + TryFrom<u64> {}
impl Start for u16 {}
impl Start for u32 {}
impl Start for u64 {}

/// A sorted set of non-overlapping extents.
///
/// # Invariants
/// - Extents never overlap and all have `len > 0`.
/// - `start + len` never overflows the sector range of the map.
/// - `covered` is the sum of the extents' lengths.
#[derive(Debug, Clone)]
pub struct ExtentMap<S: Start, E: Extent> {
    map: BTreeMap<S, E>,
    covered: u64,
}

impl<S: Start, E: Extent> Default for ExtentMap<S, E> {
    fn default() -> Self {
        ExtentMap {
            map: BTreeMap::new(),
            covered: 0,
        }
    }
}

fn start_of<S: Start>(v: u64) -> S {
    S::try_from(v)
        .ok()
        .expect("extent start fits the map's start type (callers bound it)")
}

impl<S: Start, E: Extent> ExtentMap<S, E> {
    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No extents?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sectors covered by the extents.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Iterate `(start, extent)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &E)> {
        self.map.iter().map(|(s, e)| ((*s).into(), e))
    }

    /// Insert `ext` at `start`, replacing whatever it overlaps.
    pub fn insert(&mut self, start: u64, ext: E) {
        let end = start + ext.len() as u64;
        debug_assert!(ext.len() > 0, "inserting an empty extent");
        // Fast paths, from the last extent starting before K's end. If it
        // does not reach K, nothing overlaps (extents are sorted and
        // disjoint). If it is exactly K's range, it is the only overlap:
        // anything else overlapping K would start after it or end inside
        // it. That is an overwrite of the same blocks, the common case
        // under random writes: one descent instead of four.
        match self.map.range_mut(..start_of::<S>(end)).next_back() {
            Some((s, e)) if (*s).into() == start && e.len() == ext.len() => {
                *e = ext;
                return;
            }
            Some((s, e)) if (*s).into() + e.len() as u64 > start => {}
            _ => {
                self.map.insert(start_of(start), ext);
                self.covered += ext.len() as u64;
                return;
            }
        }
        // The predecessor may overlap (head or contained relation).
        let pred = self
            .map
            .range(..start_of::<S>(start))
            .next_back()
            .map(|(s, e)| ((*s).into(), *e));
        if let Some((ts, t)) = pred {
            let te = ts + t.len() as u64;
            if te > start {
                if te > end {
                    // overlap_contained: keep T's front, re-insert its back.
                    let mut back = t;
                    back.skip_front((end - ts) as u32);
                    self.map.insert(start_of(end), back);
                }
                self.covered -= te.min(end) - start;
                // overlap_head (or the front of contained): cut T's back.
                let front = self.map.get_mut(&start_of(ts)).expect("predecessor exists");
                front.set_len((start - ts) as u32);
            }
        }
        // Extents starting inside K: contain (delete) or tail (cut front).
        loop {
            let next = self
                .map
                .range(start_of::<S>(start)..)
                .next()
                .map(|(s, e)| ((*s).into(), *e));
            let Some((ts, t)) = next else { break };
            if ts >= end {
                break; // before: nothing further can overlap
            }
            self.map.remove(&start_of(ts));
            let te = ts + t.len() as u64;
            self.covered -= te.min(end) - ts;
            if te > end {
                let mut rest = t;
                rest.skip_front((end - ts) as u32);
                self.map.insert(start_of(end), rest);
                break;
            }
        }
        self.map.insert(start_of(start), ext);
        self.covered += ext.len() as u64;
        #[cfg(debug_assertions)]
        self.assert_invariants();
    }

    /// Remove the extent starting exactly at `start`.
    pub fn remove(&mut self, start: u64) -> Option<E> {
        let e = self.map.remove(&start_of(start))?;
        self.covered -= e.len() as u64;
        Some(e)
    }

    /// Remove every extent for which `stale` is true; returns how many.
    pub fn retain(&mut self, mut keep: impl FnMut(&E) -> bool) -> usize {
        let before = self.map.len();
        let mut dropped = 0u64;
        self.map.retain(|_, e| {
            let k = keep(e);
            if !k {
                dropped += e.len() as u64;
            }
            k
        });
        self.covered -= dropped;
        before - self.map.len()
    }

    /// Visit the pieces of `[start, start+len)` in order: `Some((extent
    /// start, extent trimmed to the piece))` for a covered piece, `None` for
    /// a gap. Calls `f(piece_start, piece_len, piece)`.
    pub fn lookup(&self, start: u64, len: u64, mut f: impl FnMut(u64, u64, Option<(u64, E)>)) {
        let end = start + len;
        // Walk backwards from K's end: one tree descent finds every
        // overlapping extent (the common single-extent hit costs one).
        let mut found: [(u64, E); 8] = [(0, E::EMPTY); 8];
        let mut n = 0;
        let mut more: Vec<(u64, E)> = Vec::new();
        for (s, e) in self.map.range(..start_of::<S>(end)).rev() {
            let ts: u64 = (*s).into();
            if ts + e.len() as u64 <= start {
                break;
            }
            if n < found.len() {
                found[n] = (ts, *e);
                n += 1;
            } else {
                more.push((ts, *e));
            }
        }
        // `found` then `more` hold extents in descending order, so
        // reversed, `more` (the lowest starts) comes first.
        let mut pos = start;
        let mut visit = |ts: u64, e: E| {
            let te = ts + e.len() as u64;
            if ts > pos {
                f(pos, ts - pos, None);
                pos = ts;
            }
            let piece_end = te.min(end);
            let mut piece = e;
            if pos > ts {
                piece.skip_front((pos - ts) as u32);
            }
            piece.set_len((piece_end - pos) as u32);
            f(pos, piece_end - pos, Some((ts, piece)));
            pos = piece_end;
        };
        for &(ts, e) in more.iter().rev().chain(found[..n].iter().rev()) {
            visit(ts, e);
        }
        if pos < end {
            f(pos, end - pos, None);
        }
    }

    /// Check the invariants (debug builds and tests).
    #[cfg(debug_assertions)]
    pub fn assert_invariants(&self) {
        let mut prev_end = 0u64;
        for (s, e) in &self.map {
            let s: u64 = (*s).into();
            assert!(e.len() > 0, "empty extent at {s}");
            assert!(
                s >= prev_end,
                "extent at {s} overlaps the one ending at {prev_end}"
            );
            prev_end = s + e.len() as u64;
        }
        let sum: u64 = self.map.values().map(|e| e.len() as u64).sum();
        assert_eq!(self.covered, sum, "covered count drifted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Test extent: `src` is where sector 0 of the extent came from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct T {
        len: u32,
        src: u64,
    }
    impl Extent for T {
        const EMPTY: T = T { len: 0, src: 0 };
        fn len(&self) -> u32 {
            self.len
        }
        fn set_len(&mut self, len: u32) {
            self.len = len;
        }
        fn skip_front(&mut self, n: u32) {
            self.len -= n;
            self.src += n as u64;
        }
    }

    fn map_of(items: &[(u64, u32, u64)]) -> ExtentMap<u16, T> {
        let mut m = ExtentMap::default();
        for &(s, len, src) in items {
            m.insert(s, T { len, src });
        }
        m
    }

    fn dump(m: &ExtentMap<u16, T>) -> Vec<(u64, u32, u64)> {
        m.iter().map(|(s, e)| (s, e.len, e.src)).collect()
    }

    #[test]
    fn insert_resolves_each_overlap_relation() {
        // (existing T, new K at [10,20) with src 1000, expected result)
        let k = (10u64, 10u32, 1000u64);
        type Case<'a> = (&'a str, &'a [(u64, u32, u64)], &'a [(u64, u32, u64)]);
        let cases: &[Case] = &[
            ("after", &[(0, 10, 0)], &[(0, 10, 0), (10, 10, 1000)]),
            ("before", &[(20, 5, 20)], &[(10, 10, 1000), (20, 5, 20)]),
            (
                "overlap_tail",
                &[(15, 10, 15)],
                &[(10, 10, 1000), (20, 5, 20)],
            ),
            ("overlap_tail exact end", &[(15, 5, 15)], &[(10, 10, 1000)]),
            ("overlap_contain", &[(12, 3, 12)], &[(10, 10, 1000)]),
            ("overlap_contain exact", &[(10, 10, 10)], &[(10, 10, 1000)]),
            (
                "overlap_contained",
                &[(5, 20, 5)],
                &[(5, 5, 5), (10, 10, 1000), (20, 5, 20)],
            ),
            ("overlap_head", &[(5, 10, 5)], &[(5, 5, 5), (10, 10, 1000)]),
            (
                "overlap_head same start",
                &[(10, 15, 10)],
                &[(10, 10, 1000), (20, 5, 20)],
            ),
            (
                "several at once",
                &[(8, 4, 8), (13, 2, 13), (16, 1, 16), (19, 3, 19)],
                &[(8, 2, 8), (10, 10, 1000), (20, 2, 20)],
            ),
        ];
        for (name, existing, want) in cases {
            let mut m = map_of(existing);
            m.insert(k.0, T { len: k.1, src: k.2 });
            assert_eq!(dump(&m), *want, "relation {name}");
        }
    }

    #[test]
    fn lookup_reports_hits_partial_hits_and_gaps() {
        let m = map_of(&[(4, 4, 100), (10, 2, 200)]);
        let mut pieces = vec![];
        m.lookup(2, 12, |s, l, e| pieces.push((s, l, e.map(|(_, t)| t.src))));
        assert_eq!(
            pieces,
            vec![
                (2, 2, None),
                (4, 4, Some(100)),
                (8, 2, None),
                (10, 2, Some(200)),
                (12, 2, None)
            ]
        );
        let mut pieces = vec![];
        m.lookup(5, 2, |s, l, e| pieces.push((s, l, e.map(|(_, t)| t.src))));
        assert_eq!(pieces, vec![(5, 2, Some(101))]);
    }

    /// Insert `len` sectors at `s` mapping to `src..`, in the map and in a
    /// per-sector model.
    fn insert_both(
        m: &mut ExtentMap<u16, T>,
        model: &mut [Option<u64>],
        s: u64,
        len: u64,
        src: u64,
    ) {
        m.insert(
            s,
            T {
                len: len as u32,
                src,
            },
        );
        for k in 0..len {
            model[(s + k) as usize] = Some(src + k);
        }
    }

    /// The whole map as the model sees it: per sector, its source or none.
    fn flatten(m: &ExtentMap<u16, T>) -> Vec<Option<u64>> {
        let mut got = vec![None::<u64>; 8192];
        m.lookup(0, 8192, |ps, pl, e| {
            if let Some((_, t)) = e {
                for k in 0..pl {
                    got[(ps + k) as usize] = Some(t.src + k);
                }
            }
        });
        got
    }

    #[test]
    fn overwrites_of_whole_blocks_match_a_simple_interval_map() {
        // 8-sector blocks written again and again (the exact-overwrite fast
        // path), mixed with odd ranges that split and merge them.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut m: ExtentMap<u16, T> = ExtentMap::default();
        let mut model = vec![None::<u64>; 8192];
        for i in 0..20_000u64 {
            let (s, len) = if rng.gen_bool(0.9) {
                (rng.gen_range(0..1024u64) * 8, 8)
            } else {
                let s = rng.gen_range(0..8192u64);
                (s, rng.gen_range(1..=(8192 - s).min(40)))
            };
            insert_both(&mut m, &mut model, s, len, i * 100_000);
            if i % 1000 == 0 || i == 19_999 {
                assert!(flatten(&m) == model, "op {i}");
                #[cfg(debug_assertions)]
                m.assert_invariants();
            }
        }
    }

    #[test]
    fn random_inserts_match_a_simple_interval_map() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..50 {
            let mut m: ExtentMap<u16, T> = ExtentMap::default();
            // model: per sector, the src sector it maps to (or none)
            let mut model = vec![None::<u64>; 8192];
            for i in 0..500u64 {
                let s = rng.gen_range(0..8192u64);
                let cap = if rng.gen_bool(0.1) { 8192 } else { 64 };
                let len = rng.gen_range(1..=(8192 - s).min(cap));
                insert_both(&mut m, &mut model, s, len, round * 1_000_000 + i * 10_000);
                if i % 50 == 0 {
                    assert_eq!(flatten(&m), model, "round {round} op {i}");
                }
            }
        }
    }
}
