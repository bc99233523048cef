//! Store tracking for power-failure simulation (tests only, opt-in).
//!
//! Real persistent memory guarantees only that an aligned 8-byte store is
//! atomic and that stores flushed before a barrier are durable after it.
//! So the crash image of a medium is: everything persisted at the last
//! barrier, plus any subset of the 8-byte words stored since. The tracker
//! remembers the old value of each word first stored since the last
//! barrier; a simulated crash reverts a random subset of them (single words
//! or whole cache lines, with a survival rate that varies per crash).
//!
//! A crash can also be armed to happen silently after the Nth store, in the
//! middle of an operation: from then on the program runs on, but nothing it
//! stores or persists counts, as if the power had gone at that instant.
//!
//! The death of the process is the same cut without the reverts: every
//! store made before it stays, persisted or not (the page cache, or the
//! DAX medium, keeps it), and none made after it counts.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
struct State {
    /// Words stored since the last barrier -> value before them.
    pending: HashMap<usize, u64>,
    /// Stores left before an armed crash.
    armed: Option<u64>,
    /// The armed crash happened: `pending` froze at that instant.
    dead: bool,
    /// Words stored after the crash -> value at the crash.
    post: HashMap<usize, u64>,
}

/// Words stored since the last barrier, with their old values.
#[derive(Debug, Default)]
pub struct Tracker {
    state: Mutex<State>,
}

/// What a simulated crash did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Words stored since the last barrier before the crash.
    pub pending_words: usize,
    /// Of those, words reverted to their old value.
    pub reverted_words: usize,
    /// Words stored after an armed crash (all discarded).
    pub discarded_words: usize,
}

impl Tracker {
    /// Note a store to bytes `o..o+len`; `old(word)` reads a word's current
    /// (pre-store) value.
    pub fn record(&self, o: usize, len: usize, old: impl Fn(usize) -> u64) {
        let mut st = self.state.lock().expect("tracker lock");
        if st.dead {
            for w in o / 8..(o + len).div_ceil(8) {
                st.post.entry(w).or_insert_with(|| old(w));
            }
            return;
        }
        for w in o / 8..(o + len).div_ceil(8) {
            st.pending.entry(w).or_insert_with(|| old(w));
        }
        if let Some(n) = st.armed {
            if n <= 1 {
                st.armed = None;
                st.dead = true; // this store happened; the next ones do not
            } else {
                st.armed = Some(n - 1);
            }
        }
    }

    /// A barrier: everything stored so far is durable (unless dead).
    pub fn barrier(&self) {
        let mut st = self.state.lock().expect("tracker lock");
        if !st.dead {
            st.pending.clear();
        }
    }

    /// Arm a silent crash after `stores` more stores.
    pub fn arm(&self, stores: u64) {
        self.state.lock().expect("tracker lock").armed = Some(stores.max(1));
    }

    /// Has an armed crash happened?
    pub fn is_dead(&self) -> bool {
        self.state.lock().expect("tracker lock").dead
    }

    /// Apply the death of the process: restore every word stored after an
    /// armed crash to its value at the crash; every word stored before it
    /// stays. Resets the tracker.
    pub fn crash_process(&self, mut restore: impl FnMut(usize, u64)) -> CrashReport {
        let mut st = self.state.lock().expect("tracker lock");
        let r = CrashReport {
            pending_words: st.pending.len(),
            reverted_words: 0,
            discarded_words: st.post.len(),
        };
        for (w, v) in st.post.drain() {
            restore(w, v);
        }
        st.pending.clear();
        st.armed = None;
        st.dead = false;
        r
    }

    /// Apply the crash: restore every word stored after an armed crash to
    /// its value at the crash, then revert a random subset of the words
    /// pending at the crash, via `restore(word, value)`. Resets the tracker.
    pub fn crash(&self, seed: u64, mut restore: impl FnMut(usize, u64)) -> CrashReport {
        let mut st = self.state.lock().expect("tracker lock");
        let mut r = CrashReport {
            pending_words: st.pending.len(),
            reverted_words: 0,
            discarded_words: st.post.len(),
        };
        for (w, v) in st.post.drain() {
            restore(w, v);
        }
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Vary the shape of the damage from crash to crash: how likely a
        // pending store is to have reached the medium, and whether whole
        // cache lines or single words decide (a line is written back as a
        // unit when evicted; an 8-byte store is the atomic unit).
        let keep_per_mille = [0, 300, 500, 700, 950, 990, 1000][(next() % 7) as usize];
        let by_line = next() % 2 == 0;
        let mut lines: HashMap<usize, bool> = HashMap::new();
        // Visit in word order so a seed always gives the same image.
        let mut words: Vec<(usize, u64)> = st.pending.drain().collect();
        words.sort_unstable_by_key(|w| w.0);
        for (w, old) in words {
            let survive = if by_line {
                *lines
                    .entry(w / 8)
                    .or_insert_with(|| next() % 1000 < keep_per_mille)
            } else {
                next() % 1000 < keep_per_mille
            };
            if !survive {
                restore(w, old);
                r.reverted_words += 1;
            }
        }
        st.armed = None;
        st.dead = false;
        r
    }
}
