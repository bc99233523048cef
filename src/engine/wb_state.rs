//! What writeback keeps from one pass to the next: where the batch being
//! written ends (the writeback target), its buffers, and the backing
//! store's measured rate, which sizes the next batch.

use std::sync::Arc;
use std::time::Duration;

use super::error::{Error, Result};
use super::record::Tail;
use crate::backing::Arena;

/// Memory for writeback's buffers when the server gives none
/// ([`Engine::set_writeback_memory`]): the offline tools.
pub(super) const DEFAULT_MEMORY: usize = 32 << 20;
/// Time a pass is sized to spend writing, at the measured rate: long
/// enough to amortise the backing flush, short enough that space comes
/// back often.
const PASS_SECS: f64 = 1.5;
/// Batch budget bounds, in distinct bytes.
const BUDGET_MIN: u64 = 4 << 20;
const BUDGET_MAX: u64 = 1 << 30;
/// Backing write rate assumed before the first pass is measured: low, so
/// the first batch of a process is small on a slow disk (a batch cut off
/// by a restart must be finished by the next process before dirty_tail
/// moves); one pass measures the real rate.
const RATE_START: f64 = 16e6;

/// The writeback worker's state, behind the engine's writeback lock (which
/// also serialises passes: the online worker against `drain`).
#[derive(Debug)]
pub(super) struct WbState {
    /// Where write buffers come from (created when first needed).
    pub(super) memory: Option<Arc<Arena>>,
    /// The writeback target record: where the batch being written ends.
    pub(super) target: Tail,
    /// Backing write rate of recent passes while writing, bytes per second.
    pub(super) rate: f64,
    /// Time of a pass not spent writing (gathering, the backing flush),
    /// seconds.
    pub(super) fixed: f64,
    /// How long the last pass took.
    pub(super) last_pass: Duration,
}

impl WbState {
    /// State for an engine whose target record is `target`.
    pub(super) fn new(target: Tail) -> WbState {
        WbState {
            memory: None,
            target,
            rate: RATE_START,
            fixed: 0.0,
            last_pass: Duration::ZERO,
        }
    }

    /// The buffers' arena.
    pub(super) fn memory(&mut self) -> Result<Arc<Arena>> {
        if self.memory.is_none() {
            self.memory = Some(Arena::new("writeback", DEFAULT_MEMORY).map_err(Error::Backing)?);
        }
        Ok(self.memory.clone().expect("just set"))
    }

    /// Distinct bytes the next batch may hold.
    pub(super) fn budget(&self) -> u64 {
        ((self.rate * PASS_SECS) as u64).clamp(BUDGET_MIN, BUDGET_MAX)
    }

    /// How long a batch of `bytes` distinct bytes should take.
    pub(super) fn expected(&self, bytes: u64) -> Duration {
        // A rate that measured nothing (or overflowed) must not panic.
        Duration::try_from_secs_f64(bytes as f64 / self.rate + self.fixed)
            .unwrap_or(Duration::from_secs(3600))
    }

    /// Fold a finished pass into the estimates: its bytes over the time its
    /// writes took (passes too small to time say little about bandwidth),
    /// and the rest of its time.
    pub(super) fn measured(&mut self, bytes: u64, writing: Duration, total: Duration) {
        self.last_pass = total;
        let fixed = total.saturating_sub(writing).as_secs_f64();
        self.fixed = 0.5 * self.fixed + 0.5 * fixed;
        let secs = writing.as_secs_f64();
        if bytes >= BUDGET_MIN / 4 && secs > 0.0 {
            let r = bytes as f64 / secs;
            // Up at once (the first guess is low on purpose), down gently.
            self.rate = if r > self.rate {
                r
            } else {
                0.5 * self.rate + 0.5 * r
            };
        }
    }
}
