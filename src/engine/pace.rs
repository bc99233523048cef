//! Pacing guest writes while a writeback batch runs.
//!
//! Space comes back only when a batch ends. A guest that writes faster than
//! writeback frees space would fill the cache in the middle of a batch and
//! then wait for all of it at once: hundreds of milliseconds with nothing
//! completing. Instead, while a batch runs, writes are admitted at the rate
//! that uses the reclaimable space (less a margin) by a little after the
//! batch is expected to end: the same bytes get through, each waiting a
//! little, none waiting long.
//!
//! Admission is a generic cell rate algorithm on one atomic word, shared by
//! all queues: each write moves a virtual clock forward by its cost at the
//! current rate, and waits for however far that clock runs ahead of real
//! time, past a small burst allowance.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::format::SEG_DATA_BYTES;

/// How far ahead of real time admissions may run before a write waits.
const BURST: Duration = Duration::from_millis(1);
/// Writes are paced as if a batch took this share (1/n) of its expected
/// time longer, and at least `MIN_SLACK` longer: a batch that overruns its
/// estimate slows writers down gradually (the space left shrinks
/// exponentially) instead of leaving none.
const SLACK_SHARE: u32 = 4;
const MIN_SLACK: Duration = Duration::from_millis(50);
/// Longest a single write is paced; past that it goes on, to the cache-full
/// path if there is no room, which waits for space itself.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// Reclaimable space kept back when pacing writes: 1/n of the cache, plus
/// segments for the key log and the data heads.
const MARGIN_SHARE: u64 = 40;
const MARGIN_SEGS: u64 = 4;
/// Writes are not paced while at least 1/n of the cache is reclaimable.
const FREE_RUN_SHARE: u64 = 2;

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Pacer {
    origin: Instant,
    /// When the running batch should end, in ns after `origin`; 0 when no
    /// batch runs.
    batch_end: AtomicU64,
    /// See [`SLACK_SHARE`], in ns.
    slack: AtomicU64,
    /// The virtual clock: when the next write would be due, in ns after
    /// `origin`.
    due: AtomicU64,
}

impl Pacer {
    /// How long a write of `bytes` waits while a batch runs, in a cache of
    /// `capacity` bytes of which `dirty` are not reclaimable yet.
    pub(super) fn wait_for(&self, bytes: u64, capacity: u64, dirty: u64) -> Duration {
        let margin = capacity / MARGIN_SHARE + MARGIN_SEGS * SEG_DATA_BYTES;
        let free = capacity.saturating_sub(dirty + margin);
        if free >= capacity / FREE_RUN_SHARE {
            // A burst into a roomy cache goes at full speed: it may end
            // long before the space does.
            return Duration::ZERO;
        }
        self.delay(bytes, free)
    }

    pub(super) fn new() -> Pacer {
        Pacer {
            origin: Instant::now(),
            batch_end: AtomicU64::new(0),
            slack: AtomicU64::new(0),
            due: AtomicU64::new(0),
        }
    }

    pub(super) fn active(&self) -> bool {
        self.batch_end.load(Ordering::Relaxed) != 0
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// A batch started that should take about `expected`; writes are paced
    /// until the returned guard is dropped.
    pub(super) fn batch(&self, expected: Duration) -> BatchGuard<'_> {
        self.batch_started(expected);
        BatchGuard(self)
    }

    fn batch_started(&self, expected: Duration) {
        self.due.store(self.now_ns(), Ordering::Relaxed);
        self.expect(expected);
    }

    /// The running batch should end in `left`.
    fn expect(&self, left: Duration) {
        let slack = (left / SLACK_SHARE).max(MIN_SLACK);
        self.slack.store(slack.as_nanos() as u64, Ordering::Relaxed);
        let end = self.now_ns() + left.as_nanos() as u64;
        self.batch_end.store(end.max(1), Ordering::Relaxed);
    }

    /// The batch ended (or failed): writes go unpaced until the next one.
    fn batch_ended(&self) {
        self.batch_end.store(0, Ordering::Relaxed);
    }

    /// How long a write of `bytes` should wait, with `free` bytes of the
    /// cache reclaimable. Zero when no batch runs or the space lasts.
    pub(super) fn delay(&self, bytes: u64, free: u64) -> Duration {
        let end = self.batch_end.load(Ordering::Relaxed);
        if end == 0 {
            return Duration::ZERO;
        }
        let free = free.max(1);
        let now = self.now_ns();
        let left = end.saturating_sub(now) + self.slack.load(Ordering::Relaxed);
        // The write's share of the time left, at `free` bytes per `left`.
        let cost = (bytes as u128 * left as u128 / free as u128).min(u64::MAX as u128) as u64;
        let burst = BURST.as_nanos() as u64;
        let max_wait = MAX_WAIT.as_nanos() as u64;
        let mut due = self.due.load(Ordering::Relaxed);
        loop {
            // Never more than MAX_WAIT ahead: a write paced that long goes
            // on, and the next batch starts from real time again.
            let next = due
                .max(now.saturating_sub(burst))
                .saturating_add(cost)
                .min(now + max_wait);
            match self
                .due
                .compare_exchange_weak(due, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Duration::from_nanos(next.saturating_sub(now)),
                Err(d) => due = d,
            }
        }
    }
}

/// Paces writes while it lives; see [`Pacer::batch`].
pub(super) struct BatchGuard<'a>(&'a Pacer);

impl BatchGuard<'_> {
    /// The batch is now expected to take `left` more.
    pub(super) fn expect(&mut self, left: Duration) {
        self.0.expect(left);
    }
}

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        self.0.batch_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_not_paced_without_a_batch() {
        let p = Pacer::new();
        for _ in 0..1000 {
            assert_eq!(p.delay(1 << 20, 1 << 20), Duration::ZERO);
        }
    }

    #[test]
    fn a_batch_spreads_the_free_space_over_its_expected_time() {
        let p = Pacer::new();
        p.batch_started(Duration::from_secs(1));
        // 125 MiB free for about 1.25 s (1 s and its slack): 1 MiB writes
        // cost about 10 ms each.
        let free = 125 << 20;
        let mut last = Duration::ZERO;
        for _ in 0..5 {
            last = p.delay(1 << 20, free);
        }
        assert!(
            last >= Duration::from_millis(35) && last <= Duration::from_millis(55),
            "fifth write waits {last:?}"
        );
        p.batch_ended();
        assert_eq!(p.delay(1 << 20, free), Duration::ZERO);
    }

    #[test]
    fn plenty_of_space_costs_nothing_and_a_wait_is_bounded() {
        let p = Pacer::new();
        p.batch_started(Duration::from_millis(200));
        assert_eq!(p.delay(4096, 1 << 40), Duration::ZERO);
        for _ in 0..100 {
            assert!(p.delay(1 << 30, 1 << 20) <= MAX_WAIT);
        }
        p.batch_ended();
        p.batch_started(Duration::from_millis(200));
        assert_eq!(
            p.delay(4096, 1 << 40),
            Duration::ZERO,
            "a new batch starts from real time"
        );
    }
}
