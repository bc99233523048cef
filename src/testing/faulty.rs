//! [`FaultyBacking`]: wraps a store and injects errors, short transfers and
//! delays, so tests can check how the cache survives a misbehaving disk.
//!
//! Deterministic for a given seed and sequence of calls: the random draws
//! come from an inline splitmix64 (the crate has no `rand` outside tests).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::backing::Backing;

/// Which operation a [`FaultPlan`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Fail with EIO without touching the store.
    Eio,
    /// Transfer the first half of the buffer (rounded down to 512 bytes),
    /// then fail with `UnexpectedEof` (reads) or `WriteZero` (writes): a
    /// caller that ignores the error is left with a torn write. A flush
    /// fails with EIO.
    Short,
    /// Fail with ENOSPC without touching the store.
    Enospc,
    /// Sleep this long, then perform the operation normally.
    Delay(Duration),
    /// Perform the operation, then sleep this long before returning: it
    /// lands at once but is reported late (as a completion can be).
    DelayAfter(Duration),
}

/// When to inject one kind of fault into one kind of operation.
///
/// Of the operations of kind `op`, the first `skip_first` are left alone;
/// after that, an operation is a candidate if it is every `every_nth`-th one
/// (all of them if `None`), and a candidate fails with `probability`, until
/// `max_count` faults have been injected by this plan.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Operation the plan applies to.
    pub op: FaultOp,
    /// What happens when it fires.
    pub kind: FaultKind,
    /// Chance, from 0.0 to 1.0, that a candidate operation fails.
    pub probability: f64,
    /// Only every Nth operation (counted after `skip_first`) is a candidate;
    /// `Some(0)` never fires.
    pub every_nth: Option<u64>,
    /// Stop after injecting this many faults.
    pub max_count: Option<u64>,
    /// Leave the first this-many operations alone.
    pub skip_first: u64,
}

impl FaultPlan {
    /// A plan that injects `kind` into every `op` operation, forever.
    pub fn new(op: FaultOp, kind: FaultKind) -> FaultPlan {
        FaultPlan {
            op,
            kind,
            probability: 1.0,
            every_nth: None,
            max_count: None,
            skip_first: 0,
        }
    }

    /// Fire with probability `p` (clamped to 0.0..=1.0).
    pub fn probability(mut self, p: f64) -> FaultPlan {
        self.probability = p.clamp(0.0, 1.0);
        self
    }

    /// Fire on every `n`th operation only.
    pub fn every_nth(mut self, n: u64) -> FaultPlan {
        self.every_nth = Some(n);
        self
    }

    /// Stop after `n` injections.
    pub fn max_count(mut self, n: u64) -> FaultPlan {
        self.max_count = Some(n);
        self
    }

    /// Leave the first `n` operations alone.
    pub fn skip_first(mut self, n: u64) -> FaultPlan {
        self.skip_first = n;
        self
    }
}

/// A plan with its counters.
struct ActivePlan {
    /// The plan as given.
    plan: FaultPlan,
    /// Operations of the plan's kind seen since it was added.
    seen: u64,
    /// Faults this plan has injected.
    fired: u64,
}

/// splitmix64: tiny, fast, and good enough to decide coin flips.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        // The top 53 bits make an exactly representable fraction.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Everything that changes as operations happen, under one lock.
struct State {
    /// Plans in the order added.
    plans: Vec<ActivePlan>,
    /// Source of the probability draws.
    rng: SplitMix64,
}

/// What to do to one operation.
#[derive(Default)]
struct Decision {
    /// Sleep this long first (sum of the Delay plans that fired).
    delay: Duration,
    /// Sleep this long after the operation (the DelayAfter plans).
    delay_after: Duration,
    /// Then fail this way instead of (or, for Short, after part of) the
    /// operation.
    fault: Option<FaultKind>,
}

/// A backing store that injects faults into another one.
///
/// `uring_fd` is always `None`, so a [`super::BackingQueue`] over it goes
/// through the trait methods and sees the faults.
pub struct FaultyBacking<B: Backing> {
    /// The real store.
    inner: B,
    /// Plans and random state.
    state: Mutex<State>,
    /// Faults injected so far (delays included).
    injected: AtomicU64,
}

impl<B: Backing> FaultyBacking<B> {
    /// Wrap `inner`; no faults until a plan is added. `seed` fixes the
    /// random draws of probabilistic plans.
    pub fn new(inner: B, seed: u64) -> FaultyBacking<B> {
        FaultyBacking {
            inner,
            state: Mutex::new(State {
                plans: Vec::new(),
                rng: SplitMix64(seed),
            }),
            injected: AtomicU64::new(0),
        }
    }

    /// Add a plan. Plans count operations from the moment they are added.
    pub fn add(&self, plan: FaultPlan) {
        self.lock().plans.push(ActivePlan {
            plan,
            seen: 0,
            fired: 0,
        });
    }

    /// Remove every plan: operations succeed (or fail) as the inner store
    /// decides from now on.
    pub fn clear(&self) {
        self.lock().plans.clear();
    }

    /// Total faults injected so far, delays included.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The wrapped store (to inspect it, or to bypass the faults).
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The state, even if a test thread panicked while holding it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advance every plan for `op` and decide what happens to this
    /// operation. Every matching plan counts the operation; delays add up;
    /// the first error plan that fires wins.
    fn decide(&self, op: FaultOp) -> Decision {
        let mut decision = Decision::default();
        let mut guard = self.lock();
        let state = &mut *guard;
        for active in state.plans.iter_mut().filter(|a| a.plan.op == op) {
            active.seen += 1;
            let is_delay = matches!(
                active.plan.kind,
                FaultKind::Delay(_) | FaultKind::DelayAfter(_)
            );
            if !is_delay && decision.fault.is_some() {
                continue;
            }
            if !fires(active, &mut state.rng) {
                continue;
            }
            active.fired += 1;
            self.injected.fetch_add(1, Ordering::Relaxed);
            match active.plan.kind {
                FaultKind::Delay(d) => decision.delay += d,
                FaultKind::DelayAfter(d) => decision.delay_after += d,
                kind => decision.fault = Some(kind),
            }
        }
        decision
    }
}

/// Sleeps when dropped: after the operation, before its caller hears.
struct Late(Duration);

impl Drop for Late {
    fn drop(&mut self) {
        if !self.0.is_zero() {
            std::thread::sleep(self.0);
        }
    }
}

/// Whether `active` fires on the operation it has just counted.
fn fires(active: &ActivePlan, rng: &mut SplitMix64) -> bool {
    let plan = &active.plan;
    if active.seen <= plan.skip_first {
        return false;
    }
    if plan.max_count.is_some_and(|max| active.fired >= max) {
        return false;
    }
    if let Some(n) = plan.every_nth {
        if n == 0 || !(active.seen - plan.skip_first).is_multiple_of(n) {
            return false;
        }
    }
    if plan.probability >= 1.0 {
        true
    } else if plan.probability > 0.0 {
        rng.next_f64() < plan.probability
    } else {
        false
    }
}

/// The error an injected fault reports.
fn fault_error(kind: FaultKind, op: FaultOp) -> io::Error {
    match (kind, op) {
        (FaultKind::Enospc, _) => io::Error::from_raw_os_error(libc::ENOSPC),
        (FaultKind::Short, FaultOp::Read) => {
            io::Error::new(io::ErrorKind::UnexpectedEof, "injected short read")
        }
        (FaultKind::Short, FaultOp::Write) => {
            io::Error::new(io::ErrorKind::WriteZero, "injected short write")
        }
        _ => io::Error::from_raw_os_error(libc::EIO),
    }
}

/// The part of a buffer of `len` bytes a short transfer moves: the first
/// half, rounded down to whole sectors so the inner store accepts it.
fn short_len(len: usize) -> usize {
    len / 2 / 512 * 512
}

impl<B: Backing> Backing for FaultyBacking<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn refresh_size(&self) -> io::Result<u64> {
        self.inner.refresh_size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.decide(FaultOp::Read);
        if !d.delay.is_zero() {
            std::thread::sleep(d.delay);
        }
        let _late = Late(d.delay_after);
        match d.fault {
            None => self.inner.read_at(buf, off),
            Some(FaultKind::Short) => {
                let n = short_len(buf.len());
                self.inner.read_at(&mut buf[..n], off)?;
                Err(fault_error(FaultKind::Short, FaultOp::Read))
            }
            Some(kind) => Err(fault_error(kind, FaultOp::Read)),
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let d = self.decide(FaultOp::Write);
        if !d.delay.is_zero() {
            std::thread::sleep(d.delay);
        }
        let _late = Late(d.delay_after);
        match d.fault {
            None => self.inner.write_at(buf, off),
            Some(FaultKind::Short) => {
                let n = short_len(buf.len());
                self.inner.write_at(&buf[..n], off)?;
                Err(fault_error(FaultKind::Short, FaultOp::Write))
            }
            Some(kind) => Err(fault_error(kind, FaultOp::Write)),
        }
    }

    fn flush(&self) -> io::Result<()> {
        let d = self.decide(FaultOp::Flush);
        if !d.delay.is_zero() {
            std::thread::sleep(d.delay);
        }
        let _late = Late(d.delay_after);
        match d.fault {
            None => self.inner.flush(),
            Some(kind) => Err(fault_error(kind, FaultOp::Flush)),
        }
    }

    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }

    // `uring_fd` stays `None`: handing the queue the inner descriptor would
    // bypass the faults.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemBacking;
    use std::time::Instant;

    fn store() -> FaultyBacking<MemBacking> {
        FaultyBacking::new(MemBacking::new(1 << 20), 7)
    }

    /// Outcome of `n` writes of 4 KiB at offset 0: true where it failed.
    fn write_pattern(b: &FaultyBacking<MemBacking>, n: usize) -> Vec<bool> {
        let buf = vec![1u8; 4096];
        (0..n).map(|_| b.write_at(&buf, 0).is_err()).collect()
    }

    #[test]
    fn every_nth_fails_exactly_those_operations() {
        let b = store();
        b.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio).every_nth(3));
        let failed = write_pattern(&b, 9);
        assert_eq!(
            failed,
            [false, false, true, false, false, true, false, false, true]
        );
        assert_eq!(b.injected(), 3);
        assert_eq!(b.inner().writes(), 6);
    }

    #[test]
    fn every_nth_counts_after_skip_first() {
        let b = store();
        b.add(
            FaultPlan::new(FaultOp::Write, FaultKind::Eio)
                .skip_first(2)
                .every_nth(2),
        );
        let failed = write_pattern(&b, 6);
        assert_eq!(failed, [false, false, false, true, false, true]);
    }

    #[test]
    fn probability_one_always_fails_and_zero_never_does() {
        let b = store();
        b.add(FaultPlan::new(FaultOp::Read, FaultKind::Eio).probability(1.0));
        b.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio).probability(0.0));
        let mut buf = vec![0u8; 512];
        for _ in 0..100 {
            let e = b.read_at(&mut buf, 0).expect_err("read fails");
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            b.write_at(&buf, 0).expect("write succeeds");
        }
        assert_eq!(b.injected(), 100);
    }

    #[test]
    fn probability_half_fails_about_half() {
        let b = store();
        b.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio).probability(0.5));
        let failures = write_pattern(&b, 2000).iter().filter(|&&f| f).count();
        assert!((800..1200).contains(&failures), "{failures}");
    }

    #[test]
    fn max_count_stops_injecting() {
        let b = store();
        b.add(FaultPlan::new(FaultOp::Flush, FaultKind::Enospc).max_count(2));
        let e = b.flush().expect_err("first");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        b.flush().expect_err("second");
        for _ in 0..10 {
            b.flush().expect("later flushes succeed");
        }
        assert_eq!(b.injected(), 2);
        assert_eq!(b.inner().flushes(), 10);
    }

    #[test]
    fn short_write_writes_the_first_half_then_errors() {
        let b = store();
        b.add(FaultPlan::new(FaultOp::Write, FaultKind::Short));
        let e = b.write_at(&vec![5u8; 8192], 4096).expect_err("short");
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        let image = b.inner().image();
        assert!(image[4096..8192].iter().all(|&x| x == 5));
        assert!(image[8192..12288].iter().all(|&x| x == 0));
    }

    #[test]
    fn short_read_fills_the_first_half_then_errors() {
        let b = store();
        b.inner().write_at(&vec![6u8; 2048], 0).expect("seed");
        b.add(FaultPlan::new(FaultOp::Read, FaultKind::Short));
        let mut buf = vec![0u8; 2048];
        let e = b.read_at(&mut buf, 0).expect_err("short");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(buf[..1024].iter().all(|&x| x == 6));
        assert!(buf[1024..].iter().all(|&x| x == 0));
    }

    #[test]
    fn delay_delays_and_then_succeeds() {
        let b = store();
        b.add(FaultPlan::new(
            FaultOp::Write,
            FaultKind::Delay(Duration::from_millis(50)),
        ));
        let started = Instant::now();
        b.write_at(&[3u8; 512], 0).expect("delayed write succeeds");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(b.inner().image()[..512], [3u8; 512]);
        assert_eq!(b.injected(), 1);
    }

    #[test]
    fn delay_combines_with_an_error_plan() {
        let b = store();
        b.add(FaultPlan::new(
            FaultOp::Read,
            FaultKind::Delay(Duration::from_millis(20)),
        ));
        b.add(FaultPlan::new(FaultOp::Read, FaultKind::Eio));
        let started = Instant::now();
        b.read_at(&mut [0u8; 512], 0).expect_err("eio");
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(b.injected(), 2);
    }

    #[test]
    fn clear_stops_faults() {
        let b = store();
        b.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio));
        b.add(FaultPlan::new(FaultOp::Flush, FaultKind::Eio));
        b.write_at(&[0u8; 512], 0).expect_err("faulty");
        b.clear();
        b.write_at(&[0u8; 512], 0).expect("no more faults");
        b.flush().expect("no more faults");
        assert_eq!(b.injected(), 1);
    }

    #[test]
    fn same_seed_gives_the_same_faults() {
        let run = |seed| {
            let b = FaultyBacking::new(MemBacking::new(1 << 20), seed);
            b.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio).probability(0.3));
            write_pattern(&b, 500)
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn plans_for_other_operations_do_not_fire() {
        let b = store();
        b.add(FaultPlan::new(FaultOp::Flush, FaultKind::Eio));
        b.write_at(&[1u8; 512], 0).expect("write");
        b.read_at(&mut [0u8; 512], 0).expect("read");
        assert_eq!(b.injected(), 0);
        assert!(b.uring_fd().is_none());
        assert!(b.describe().starts_with("faulty memory"));
    }

    #[test]
    fn inner_errors_pass_through() {
        let b = store();
        let e = b.write_at(&[0u8; 512], 1 << 20).expect_err("beyond end");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
