//! Open ksets and the head of the key log (the state; closing ksets
//! into the log is `log.rs`).
//!
//! Keys collect in open ksets, one per group of 4 MiB regions (a key goes
//! to kset `region % 16`, as in dm-pcache), so keys that can overlap
//! always pass through the same kset in the order they entered the index:
//! log order equals index order, which replay relies on. A kset is closed
//! (appended to the log) when it holds 128 keys, on flush, or when its
//! first key is a second old.
//!
//! Every key an open kset takes is also stored in the kset's slot on the
//! medium before the request that made it completes (`format/slot.rs`), so
//! the death of the process loses no completed write. Differs from
//! dm-pcache, whose open ksets live in DRAM only: a kernel target does not
//! outlive its open ksets, a daemon does.

use std::time::{Duration, Instant};

use crate::format::{KeyOnMedia, PosOnMedia, KEY_BYTES, KSET_KEYS_MAX};

/// How long a key may wait in an open kset (1 s, as dm-pcache).
pub const KSET_MAX_AGE: Duration = Duration::from_secs(1);
/// Keys in an open kset from which the log closer closes it ahead of need,
/// when closing waits for I/O: a writer then rarely finds it full.
const KSET_CLOSE_AHEAD: usize = KSET_KEYS_MAX * 3 / 4;

/// A kset being filled: its keys in DRAM, mirrored in its slot.
///
/// # Invariants
/// - Keys `0..n` are stored in slot `slot` under era `seq`, in order.
#[derive(Debug)]
pub struct OpenKset {
    /// `n` encoded keys.
    pub(super) keys: Box<[u8]>,
    pub(super) n: usize,
    /// Dirty bytes among the keys (for the dirty counter).
    pub(super) dirty: u64,
    /// Zeroed bytes among the keys (for their dirty counter).
    pub(super) zero: u64,
    pub(super) opened: Option<Instant>,
    /// Which slot on the medium mirrors this kset.
    pub(super) slot: usize,
    /// The slot's current era.
    pub(super) seq: u64,
}

impl OpenKset {
    /// An empty kset mirrored by slot `slot`, whose era is `seq`.
    pub fn new(slot: usize, seq: u64) -> OpenKset {
        OpenKset {
            keys: vec![0u8; KSET_KEYS_MAX * KEY_BYTES].into_boxed_slice(),
            n: 0,
            dirty: 0,
            zero: 0,
            opened: None,
            slot,
            seq,
        }
    }

    /// The slot's current era.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Take up the keys a slot of era `seq` already holds (replay), in
    /// DRAM only: they are in the slot.
    pub(super) fn resume(&mut self, seq: u64, keys: &[KeyOnMedia]) {
        debug_assert!(self.n == 0 && keys.len() <= KSET_KEYS_MAX);
        self.seq = seq;
        for k in keys {
            self.push(k);
        }
    }

    /// Full (must close before appending)?
    pub fn is_full(&self) -> bool {
        self.n == KSET_KEYS_MAX
    }

    /// Full enough that the log closer should close it ahead of need.
    pub(super) fn nearly_full(&self) -> bool {
        self.n >= KSET_CLOSE_AHEAD
    }

    /// Add a key in DRAM only (the caller stores it in the slot), and
    /// return its encoding.
    pub(super) fn push(&mut self, key: &KeyOnMedia) -> &[u8; KEY_BYTES] {
        debug_assert!(!self.is_full());
        let at = self.n * KEY_BYTES;
        let bytes: &mut [u8; KEY_BYTES] = (&mut self.keys[at..at + KEY_BYTES])
            .try_into()
            .expect("KEY_BYTES");
        key.encode(bytes);
        self.n += 1;
        self.dirty += dirty_data_bytes(key);
        self.zero += dirty_zero_bytes(key);
        self.opened.get_or_insert_with(Instant::now);
        bytes
    }

    /// Has the oldest key waited longer than `age`?
    pub fn older_than(&self, age: Duration) -> bool {
        self.opened.is_some_and(|t| t.elapsed() >= age)
    }
}

/// Bytes of cache data a key adds to `dirty_bytes`: its length for guest
/// data, 0 for a fill (clean) or a dataless key (it takes no cache space).
pub(super) fn dirty_data_bytes(key: &KeyOnMedia) -> u64 {
    if key.is_clean() || key.is_dataless() {
        0
    } else {
        key.len as u64
    }
}

/// Bytes a key adds to `dirty_zero_bytes`: its length for a ZERO key.
pub(super) fn dirty_zero_bytes(key: &KeyOnMedia) -> u64 {
    if key.flags & crate::format::KEY_FLAG_ZERO != 0 {
        key.len as u64
    } else {
        0
    }
}

/// The head of the key log.
#[derive(Debug, Clone, Copy)]
pub struct LogHead {
    /// Where the next kset goes, with its LSN (key_head).
    pub pos: PosOnMedia,
    /// Flush epoch stamped into ksets closed now.
    pub epoch: u64,
}
