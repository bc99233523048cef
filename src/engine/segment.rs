//! Cache segments: allocation, reference counts and generations.
//!
//! A segment is either a data segment (payload, filled by one data head) or
//! a log segment (ksets). The allocation map lives only in memory; replay
//! rebuilds it.
//!
//! A data segment holds one reference for the data head filling it and one
//! for every key (logged or in an open kset) whose data lives in it. When
//! the count reaches zero the segment is invalidated: its gen is bumped and
//! persisted, which makes every key still pointing at it stale, and only then
//! is it returned to the free map. Log segments have no references: GC frees
//! them when key_tail leaves them.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};

use crate::format::{seg_off, MetaRecord, SegGen, SEG_GEN_OFF};
use crate::pmem::Region;

/// Segments kept back from data allocation so that closing a kset can always
/// get a new log segment. Open ksets hold at most n_ksets * 128 keys, far
/// less than one segment, so two are plenty. (Differs from dm-pcache, which
/// can deadlock when a small cache fills up: notes 14.8.)
pub const LOG_RESERVE_SEGS: u32 = 2;

/// What a segment is allocated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegKind {
    /// Payload for a data head; may not dip into the log reserve.
    Data,
    /// The key log; may use the reserve.
    Log,
}

/// One segment's in-memory state.
#[derive(Debug, Default)]
pub struct Segment {
    /// References (data head + keys).
    pub refs: AtomicU32,
    /// Current generation (persisted).
    pub gen: AtomicU64,
    /// Slot holding the newest gen replica (0 or 1).
    pub gen_slot: AtomicU8,
}

#[derive(Debug)]
struct SegMap {
    used: Vec<u64>,
    n_used: u32,
    hint: u32,
}

/// All segments of a cache.
#[derive(Debug)]
pub struct SegTable {
    segs: Box<[Segment]>,
    map: Mutex<SegMap>,
    n_used: AtomicU32,
    /// Bumped whenever a segment is freed; waiters for space sleep on it.
    space: Mutex<u64>,
    space_cv: Condvar,
    /// Event fds written when space is freed (queue workers waiting to
    /// retry deferred requests).
    space_fds: Mutex<Vec<std::os::fd::RawFd>>,
}

impl SegTable {
    /// A table of `n` segments, all free, gens from `gens` (gen, slot).
    pub fn new(gens: Vec<(u64, u8)>) -> SegTable {
        let n = gens.len();
        let segs: Box<[Segment]> = gens
            .into_iter()
            .map(|(g, slot)| Segment {
                refs: AtomicU32::new(0),
                gen: AtomicU64::new(g),
                gen_slot: AtomicU8::new(slot),
            })
            .collect();
        SegTable {
            segs,
            map: Mutex::new(SegMap {
                used: vec![0; n.div_ceil(64)],
                n_used: 0,
                hint: 0,
            }),
            n_used: AtomicU32::new(0),
            space: Mutex::new(0),
            space_cv: Condvar::new(),
            space_fds: Mutex::new(Vec::new()),
        }
    }

    /// Segments in use (data, log, and held by data heads).
    pub fn used(&self) -> u32 {
        self.n_used.load(Ordering::Relaxed)
    }

    /// Current gen of `seg`.
    pub fn gen(&self, seg: u32) -> u64 {
        self.segs[seg as usize].gen.load(Ordering::Acquire)
    }

    /// Mark `seg` used (replay). Returns false if it already was.
    pub fn mark_used(&self, seg: u32) -> bool {
        let mut m = self.map.lock().expect("segment map lock");
        let (w, b) = (seg as usize / 64, 1u64 << (seg % 64));
        if m.used[w] & b != 0 {
            return false;
        }
        m.used[w] |= b;
        m.n_used += 1;
        self.n_used.store(m.n_used, Ordering::Relaxed);
        true
    }

    /// Allocate a free segment, or `None` when the cache is full (for data:
    /// when only the log reserve is left).
    pub fn alloc(&self, kind: SegKind) -> Option<u32> {
        let mut m = self.map.lock().expect("segment map lock");
        let n = self.segs.len() as u32;
        let free = n - m.n_used;
        let reserve = if kind == SegKind::Data {
            LOG_RESERVE_SEGS
        } else {
            0
        };
        if free <= reserve {
            return None;
        }
        for i in 0..n {
            let seg = (m.hint + i) % n;
            let (w, b) = (seg as usize / 64, 1u64 << (seg % 64));
            if m.used[w] & b == 0 {
                m.used[w] |= b;
                m.n_used += 1;
                m.hint = (seg + 1) % n;
                self.n_used.store(m.n_used, Ordering::Relaxed);
                return Some(seg);
            }
        }
        None
    }

    /// Return `seg` to the free map and wake waiters for space.
    pub fn free(&self, seg: u32) {
        {
            let mut m = self.map.lock().expect("segment map lock");
            let (w, b) = (seg as usize / 64, 1u64 << (seg % 64));
            debug_assert!(m.used[w] & b != 0, "freeing free segment {seg}");
            if m.used[w] & b != 0 {
                m.used[w] &= !b;
                m.n_used -= 1;
                self.n_used.store(m.n_used, Ordering::Relaxed);
            }
        }
        self.notify_space();
    }

    /// Take a reference on `seg`.
    pub fn get_ref(&self, seg: u32) {
        self.segs[seg as usize].refs.fetch_add(1, Ordering::AcqRel);
    }

    /// Drop a reference on `seg`; when it was the last, invalidate the
    /// segment (bump and persist its gen, then free it).
    pub fn put_ref(&self, region: &Region, seg: u32) -> std::io::Result<()> {
        let prev = self.segs[seg as usize].refs.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev > 0, "segment {seg} reference underflow");
        if prev == 1 {
            self.invalidate(region, seg)?;
        }
        Ok(())
    }

    /// Bump `seg`'s gen, persist it, then free the segment.
    ///
    /// Order: (1) the new gen is persisted, so after a crash every key
    /// written with an older gen is stale; (2) only then may the segment be
    /// handed out and overwritten.
    pub fn invalidate(&self, region: &Region, seg: u32) -> std::io::Result<()> {
        let s = &self.segs[seg as usize];
        let gen = s.gen.load(Ordering::Acquire) + 1;
        let slot = 1 - s.gen_slot.load(Ordering::Acquire) as usize;
        // seq = gen + 1 keeps the replica seq monotonic with the gen.
        let rec = SegGen { gen }.encode(gen + 1);
        region.write(seg_off(seg) + SEG_GEN_OFF[slot], &rec);
        region.persist()?; // (1) gen durable before reuse
        s.gen_slot.store(slot as u8, Ordering::Release);
        s.gen.store(gen, Ordering::Release);
        self.free(seg); // (2)
        Ok(())
    }

    /// Register an eventfd to be written whenever space is freed.
    pub fn add_space_fd(&self, fd: std::os::fd::RawFd) {
        self.space_fds.lock().expect("space fds lock").push(fd);
    }

    /// Unregister an eventfd.
    pub fn remove_space_fd(&self, fd: std::os::fd::RawFd) {
        self.space_fds
            .lock()
            .expect("space fds lock")
            .retain(|f| *f != fd);
    }

    /// Wake everything waiting for free space.
    pub fn notify_space(&self) {
        *self.space.lock().expect("space lock") += 1;
        self.space_cv.notify_all();
        for fd in self.space_fds.lock().expect("space fds lock").iter() {
            crate::util::eventfd_write(*fd);
        }
    }

    /// Current space-event count, to pass to [`SegTable::wait_space`].
    pub fn space_epoch(&self) -> u64 {
        *self.space.lock().expect("space lock")
    }

    /// Sleep until space is freed after `epoch` was read, or `timeout`.
    #[cfg(any(test, feature = "test-doubles"))]
    pub fn wait_space(&self, epoch: u64, timeout: std::time::Duration) {
        let g = self.space.lock().expect("space lock");
        let _ = self
            .space_cv
            .wait_timeout_while(g, timeout, |cur| *cur == epoch)
            .expect("space lock");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_allocation_leaves_the_log_reserve() {
        let t = SegTable::new(vec![(0, 0); 5]);
        let mut got = vec![];
        while let Some(s) = t.alloc(SegKind::Data) {
            got.push(s);
        }
        assert_eq!(got.len(), 5 - LOG_RESERVE_SEGS as usize);
        assert!(t.alloc(SegKind::Log).is_some());
        assert!(t.alloc(SegKind::Log).is_some());
        assert!(t.alloc(SegKind::Log).is_none());
        t.free(got[0]);
        assert!(
            t.alloc(SegKind::Data).is_none(),
            "reserve is refilled first"
        );
        assert!(t.alloc(SegKind::Log).is_some());
    }
}
