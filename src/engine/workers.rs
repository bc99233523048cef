//! The background workers of an open engine: writeback, GC and the kset
//! timer, each a thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cache::Engine;
use super::error::Error;
use super::kset::KSET_MAX_AGE;
use super::policy::{Gate, WritebackPolicy};
use super::writeback::Progress;
use crate::backing::{Backing, BackingQueue};

/// How often the kset timer looks at open ksets.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Idle poll interval of writeback and GC (they are also kicked).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often a waiting writeback worker re-checks its policy.
const POLICY_TICK: Duration = Duration::from_millis(25);
/// Writeback retry backoff after a backing error: from 10 ms doubling to 5 s.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Running background workers. Stop them with [`Workers::stop`] (dropping
/// also stops them).
pub struct Workers {
    stop: Arc<AtomicBool>,
    engine: Arc<Engine>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Start writeback (against `backing`, when `policy` says), GC and the
    /// kset timer. A read-only engine gets none: it writes nothing, so it
    /// has nothing to write back, reclaim or close.
    pub fn start(
        engine: Arc<Engine>,
        backing: Arc<dyn Backing>,
        policy: WritebackPolicy,
    ) -> Workers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        if engine.is_read_only() {
            return Workers {
                stop,
                engine,
                threads,
            };
        }
        let (e, s) = (engine.clone(), stop.clone());
        threads.push(spawn("pcache-writeback", move || {
            writeback_loop(&e, backing, policy, &s)
        }));
        let (e, s) = (engine.clone(), stop.clone());
        threads.push(spawn("pcache-gc", move || gc_loop(&e, &s)));
        let (e, s) = (engine.clone(), stop.clone());
        threads.push(spawn("pcache-kset-timer", move || timer_loop(&e, &s)));
        Workers {
            stop,
            engine,
            threads,
        }
    }

    /// Stop and join every worker.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A writeback pass on a slow backing store could run for a long
        // while: cut it short (nothing it did moves dirty_tail).
        self.engine.halting.store(true, Ordering::Relaxed);
        self.engine.writeback_kick.kick();
        self.engine.gc_kick.kick();
        self.engine.closer_kick.kick();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The engine may be driven on by hand (drain, tests).
        self.engine.halting.store(false, Ordering::Relaxed);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.halt();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawning a worker thread")
}

fn writeback_loop(
    e: &Engine,
    backing: Arc<dyn Backing>,
    policy: WritebackPolicy,
    stop: &AtomicBool,
) {
    let mut q = BackingQueue::new(backing, 64);
    let mut backoff = BACKOFF_MIN;
    let mut gate = Gate::new(policy, Instant::now());
    let mut running = None;
    // Memory writeback held is given back once nothing is dirty.
    let mut trimmed = true;
    while !stop.load(Ordering::Relaxed) {
        crate::sandbox::narrow(crate::sandbox::Kind::Background);
        let seen = e.observe();
        if seen.dirty_lsn >= seen.head_lsn && !trimmed {
            e.trim_writeback_memory();
            crate::util::trim_heap();
            trimmed = true;
        }
        let why = gate.check(&seen);
        if why != running {
            tracing::debug!(reason = ?why, "writeback {}", if why.is_some() { "running" } else { "waiting" });
            running = why;
        }
        if why.is_none() {
            if seen.dirty_lsn < seen.head_lsn {
                // Dirty, but the policy says wait: re-check on a tick rather
                // than on every kset close (a wake-up per 128 writes).
                std::thread::sleep(POLICY_TICK);
            } else {
                e.writeback_kick.wait(IDLE_POLL);
            }
            continue;
        }
        match e.writeback_once(&mut q) {
            Ok(Progress::Advanced { .. }) => {
                backoff = BACKOFF_MIN;
                trimmed = false;
            }
            Ok(Progress::Clean) => {
                e.writeback_kick.wait(IDLE_POLL);
            }
            Err(Error::Stopping) => break,
            Err(err) => {
                tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "writeback failed; dirty data stays cached and will be retried");
                e.writeback_kick.wait(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn gc_loop(e: &Engine, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        crate::sandbox::narrow(crate::sandbox::Kind::Background);
        e.gc_kick.wait(IDLE_POLL);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let forced = e.space_wanted.swap(false, Ordering::Relaxed);
        if let Err(err) = e.gc_once(forced) {
            tracing::error!(error = %err, "gc failed");
        }
    }
}

/// The kset timer, which is also the log closer: closes ksets whose
/// oldest key waited a second, and, when kicked, the ksets guest requests
/// left (nearly) full (`Engine::defer_log_closes`).
fn timer_loop(e: &Engine, stop: &AtomicBool) {
    let mut next_tick = Instant::now() + TIMER_TICK;
    while !stop.load(Ordering::Relaxed) {
        crate::sandbox::narrow(crate::sandbox::Kind::Background);
        let wait = next_tick.saturating_duration_since(Instant::now());
        if e.closer_kick.wait(wait) {
            if let Err(err) = e.close_full_ksets() {
                tracing::debug!(error = %err, "closing full ksets deferred");
            }
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TIMER_TICK;
            if let Err(err) = e.close_aged_ksets(KSET_MAX_AGE) {
                tracing::debug!(error = %err, "timed kset close deferred");
            }
        }
    }
}
