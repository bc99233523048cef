//! Keeping overlapping writes to the backing store in order.
//!
//! A write that goes to the backing store (write-through, write-around, a
//! bypassed sequential write, a zeroing) then updates the cache: a clean
//! copy, or forgetting the range. Two such writes to overlapping ranges in
//! flight at once could land on the store in one order and reach the cache
//! in the other, leaving the two disagreeing. So each holds its range from
//! before its backing write until its cache update is done, and a write
//! that overlaps a held range waits (in whatever queue it came from) until
//! it is let go. Guests rarely overlap their own writes in flight, so this
//! costs a short lock per write and, almost always, no wait.
//!
//! Ranges are kept per 4 MiB region, in a few independently locked shards:
//! no lock is shared by all queues.

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use crate::format::REGION_SHIFT;

/// Shards of the table (regions are spread over them by index).
const SHARDS: usize = 64;

/// One shard: the ranges held in its regions, and who waits for them.
#[derive(Debug, Default)]
struct Shard {
    /// (start, end) byte ranges, clipped to one region each.
    held: Vec<(u64, u64)>,
    /// Eventfds to signal when a range here is let go.
    waiters: Vec<RawFd>,
}

/// The ranges held by writes on their way to the backing store.
#[derive(Debug)]
pub struct RangeLocks {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for RangeLocks {
    fn default() -> Self {
        RangeLocks {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// The pieces of `off..off+len` cut at region boundaries: (start, end,
/// shard).
fn pieces(off: u64, len: u64) -> impl Iterator<Item = (u64, u64, usize)> {
    let end = off.saturating_add(len.max(1));
    let first = off >> REGION_SHIFT;
    let last = (end - 1) >> REGION_SHIFT;
    (first..=last).map(move |r| {
        let rs = r << REGION_SHIFT;
        let re = (r + 1) << REGION_SHIFT;
        (off.max(rs), end.min(re), r as usize % SHARDS)
    })
}

impl RangeLocks {
    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // Every update leaves a shard consistent.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hold `off..off+len`, unless part of it is held: then false, and
    /// `wake` is signalled once something there is let go.
    pub fn try_hold(&self, off: u64, len: u64, wake: RawFd) -> bool {
        // Shards in ascending order, each once: no two holders can deadlock.
        let mut ids: smallvec::SmallVec<[usize; 8]> = pieces(off, len).map(|p| p.2).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut guards: smallvec::SmallVec<[(usize, MutexGuard<'_, Shard>); 8]> =
            ids.iter().map(|&i| (i, self.lock(i))).collect();
        let shard = |guards: &mut [(usize, MutexGuard<'_, Shard>)], i: usize| {
            guards
                .iter_mut()
                .position(|(id, _)| *id == i)
                .expect("every piece's shard is locked")
        };
        for (s, e, i) in pieces(off, len) {
            let k = shard(&mut guards, i);
            if guards[k].1.held.iter().any(|&(hs, he)| hs < e && s < he) {
                let g = &mut guards[k].1;
                if !g.waiters.contains(&wake) {
                    g.waiters.push(wake);
                }
                return false;
            }
        }
        for (s, e, i) in pieces(off, len) {
            let k = shard(&mut guards, i);
            guards[k].1.held.push((s, e));
        }
        true
    }

    /// Let go of `off..off+len` (held by [`RangeLocks::try_hold`]) and wake
    /// whoever waits there.
    pub fn release(&self, off: u64, len: u64) {
        for (s, e, i) in pieces(off, len) {
            let mut g = self.lock(i);
            if let Some(k) = g.held.iter().position(|&r| r == (s, e)) {
                g.held.swap_remove(k);
            }
            for fd in g.waiters.drain(..) {
                signal(fd);
            }
        }
    }

    /// `wake` is going away: stop signalling it.
    pub fn forget(&self, wake: RawFd) {
        for i in 0..SHARDS {
            self.lock(i).waiters.retain(|&w| w != wake);
        }
    }
}

/// Add one to an eventfd (EAGAIN means it is readable already).
#[allow(unsafe_code)]
fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; a waiter keeps its fd open
    // until it calls `forget`.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let l = RangeLocks::default();
        assert!(l.try_hold(4096, 8192, -1));
        assert!(l.try_hold(12288, 4096, -1), "adjacent, not overlapping");
        assert!(!l.try_hold(8192, 512, -1));
        // Across a region boundary, and a shard's wrap.
        let big = 64u64 << REGION_SHIFT;
        assert!(l.try_hold(big - 4096, 8192, -1));
        assert!(!l.try_hold(4096 * 3 - 512, 1024, -1));
        l.release(4096, 8192);
        assert!(l.try_hold(8192, 512, -1));
        assert!(
            !l.try_hold(big, 512, -1),
            "the second half of the crossing range"
        );
        l.release(big - 4096, 8192);
        assert!(l.try_hold(big, 512, -1));
    }
}
