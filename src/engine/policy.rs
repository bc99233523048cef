//! When the writeback worker runs.
//!
//! Writing back reads the cache and writes the backing store, which costs
//! CPU and backing bandwidth the guest may want right now. Dirty data is
//! safe in the cache, so, as dm-writecache does with its watermarks,
//! writeback waits while the guest is busy and the cache has room, and
//! runs at full speed when any of these holds:
//! - dirty data reached `high_percent` of the cache (then it runs until
//!   dirty data is down to `low_percent`);
//! - a writer is waiting for space;
//! - the disk has seen no I/O for `idle`;
//! - the oldest dirty data is older than `max_age`.
//!
//! `high_percent == 0` writes back as soon as anything is dirty (dm-pcache's
//! behaviour).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When to write back; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WritebackPolicy {
    /// Start when dirty data reaches this percent of the cache (0 = always).
    pub high_percent: u8,
    /// Once started by `high_percent`, go on down to this percent.
    pub low_percent: u8,
    /// Start once the disk has been idle (no reads, writes or flushes) this
    /// long.
    #[serde(with = "millis")]
    pub idle: Duration,
    /// Start once the oldest dirty data is this old.
    #[serde(with = "millis")]
    pub max_age: Duration,
}

impl WritebackPolicy {
    /// Write back as soon as anything is dirty.
    pub const IMMEDIATE: WritebackPolicy = WritebackPolicy {
        high_percent: 0,
        low_percent: 0,
        idle: Duration::ZERO,
        max_age: Duration::ZERO,
    };

    /// Check the percentages: `low_percent <= high_percent <= 100`.
    pub fn validate(&self) -> Result<(), String> {
        if self.high_percent > 100 {
            return Err(format!(
                "writeback high watermark must be 0..=100 percent, not {}",
                self.high_percent
            ));
        }
        if self.high_percent > 0 && self.low_percent > self.high_percent {
            return Err(format!(
                "writeback low watermark ({}%) must not exceed the high one ({}%)",
                self.low_percent, self.high_percent
            ));
        }
        Ok(())
    }
}

impl Default for WritebackPolicy {
    /// dm-writecache's style of watermarks, a quarter-second idle trigger,
    /// and nothing left dirty for more than 30 s.
    fn default() -> WritebackPolicy {
        WritebackPolicy {
            high_percent: 50,
            low_percent: 40,
            idle: Duration::from_millis(250),
            max_age: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Display for WritebackPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.high_percent == 0 {
            return write!(f, "immediate");
        }
        write!(
            f,
            "from {}% dirty down to {}%, after {} ms idle, or for data older than {} s",
            self.high_percent,
            self.low_percent,
            self.idle.as_millis(),
            self.max_age.as_secs_f64()
        )
    }
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_millis(ms))
    }
}

/// Why writeback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The policy is [`WritebackPolicy::IMMEDIATE`].
    Immediate,
    /// A writer is waiting for space.
    SpaceWanted,
    /// Dirty data is above the high watermark (or still above the low one).
    Watermark,
    /// The disk is idle.
    Idle,
    /// Some dirty data is older than `max_age`.
    Aged,
    /// An operator asked for everything to be written back (`pcache drain`).
    Drain,
}

/// What the worker sees before each pass.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// When.
    pub now: Instant,
    /// Dirty bytes in the cache.
    pub dirty_bytes: u64,
    /// Bytes of cache data space.
    pub capacity: u64,
    /// A counter that moves with every guest request.
    pub activity: u64,
    /// LSN of the next kset to be written.
    pub head_lsn: u64,
    /// LSN of the oldest kset not yet written back.
    pub dirty_lsn: u64,
    /// A writer is waiting for space.
    pub space_wanted: bool,
    /// An operator asked for a drain, and the cache is not clean yet.
    pub drain: bool,
}

/// Most (time, head) samples kept for the age check; with a sample per
/// worker wake-up this covers well over any sane `max_age`.
const MAX_SAMPLES: usize = 1 << 16;

/// Applies a [`WritebackPolicy`] to a series of observations.
#[derive(Debug)]
pub struct Gate {
    policy: WritebackPolicy,
    /// Started by the high watermark and not yet down to the low one.
    draining: bool,
    activity: u64,
    active_at: Instant,
    /// (t, head_lsn): at time t, every kset before head_lsn was in the log.
    /// Oldest first, one per head change, pruned as writeback passes them.
    samples: VecDeque<(Instant, u64)>,
}

impl Gate {
    /// A gate that has seen no activity yet (`now` counts as the last).
    pub fn new(policy: WritebackPolicy, now: Instant) -> Gate {
        Gate {
            policy,
            draining: false,
            activity: 0,
            active_at: now,
            samples: VecDeque::new(),
        }
    }

    /// Should a writeback pass run now, and why.
    pub fn check(&mut self, o: &Observation) -> Option<Reason> {
        if o.activity != self.activity {
            self.activity = o.activity;
            self.active_at = o.now;
        }
        if self.samples.back().is_none_or(|s| s.1 != o.head_lsn) {
            if self.samples.len() == MAX_SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back((o.now, o.head_lsn));
        }
        // Samples at or before dirty_tail say nothing about dirty data.
        while self.samples.front().is_some_and(|s| s.1 <= o.dirty_lsn) {
            self.samples.pop_front();
        }
        if o.dirty_lsn >= o.head_lsn {
            self.draining = false;
            return None;
        }
        let p = self.policy;
        if o.drain {
            return Some(Reason::Drain);
        }
        if p.high_percent == 0 {
            return Some(Reason::Immediate);
        }
        if o.space_wanted {
            return Some(Reason::SpaceWanted);
        }
        let dirty = o.dirty_bytes as u128 * 100;
        if dirty >= p.high_percent as u128 * o.capacity as u128 {
            self.draining = true;
        } else if dirty <= p.low_percent as u128 * o.capacity as u128 {
            self.draining = false;
        }
        if self.draining {
            return Some(Reason::Watermark);
        }
        if o.now.duration_since(self.active_at) >= p.idle {
            return Some(Reason::Idle);
        }
        // The first sample past dirty_tail was taken after the oldest dirty
        // kset was logged, so that data is at least this old.
        if let Some(&(t, _)) = self.samples.front() {
            if o.now.duration_since(t) >= p.max_age {
                return Some(Reason::Aged);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    struct Sim {
        gate: Gate,
        o: Observation,
    }

    impl Sim {
        fn new(policy: WritebackPolicy) -> Sim {
            let now = Instant::now();
            Sim {
                gate: Gate::new(policy, now),
                o: Observation {
                    now,
                    dirty_bytes: 0,
                    capacity: 10 * GIB,
                    activity: 0,
                    head_lsn: 0,
                    dirty_lsn: 0,
                    space_wanted: false,
                    drain: false,
                },
            }
        }
        /// The guest writes `gib` GiB (one kset) after `ms` milliseconds.
        fn write(&mut self, ms: u64, gib: u64) -> Option<Reason> {
            self.o.now += Duration::from_millis(ms);
            self.o.activity += 1;
            self.o.head_lsn += 1;
            self.o.dirty_bytes += gib * GIB;
            self.gate.check(&self.o)
        }
        /// A writeback pass wrote back one kset of `gib` GiB.
        fn written_back(&mut self, gib: u64) {
            self.o.dirty_lsn += 1;
            self.o.dirty_bytes -= gib * GIB;
        }
        fn after(&mut self, ms: u64) -> Option<Reason> {
            self.o.now += Duration::from_millis(ms);
            self.gate.check(&self.o)
        }
    }

    fn policy() -> WritebackPolicy {
        WritebackPolicy {
            high_percent: 50,
            low_percent: 30,
            idle: Duration::from_millis(100),
            max_age: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_clean_cache_never_writes_back() {
        let mut s = Sim::new(WritebackPolicy::IMMEDIATE);
        assert_eq!(s.after(0), None);
        s.o.space_wanted = true;
        assert_eq!(s.after(1000), None);
    }

    #[test]
    fn a_drain_runs_while_busy_and_under_every_watermark_until_clean() {
        let mut s = Sim::new(policy());
        assert_eq!(s.write(10, 1), None, "busy and under 50%");
        s.o.drain = true;
        assert_eq!(s.write(10, 1), Some(Reason::Drain));
        s.written_back(1);
        assert_eq!(s.after(0), Some(Reason::Drain));
        s.written_back(1);
        assert_eq!(s.after(0), None, "clean: nothing to drain");
    }

    #[test]
    fn immediate_runs_whenever_anything_is_dirty() {
        let mut s = Sim::new(WritebackPolicy::IMMEDIATE);
        assert_eq!(s.write(1, 1), Some(Reason::Immediate));
    }

    #[test]
    fn watermarks_start_at_high_and_stop_at_low() {
        let mut s = Sim::new(policy());
        for _ in 0..4 {
            assert_eq!(s.write(10, 1), None, "busy and under 50%");
        }
        assert_eq!(s.write(10, 1), Some(Reason::Watermark), "50% reached");
        s.written_back(1); // 40%: still above the low mark
        assert_eq!(s.write(10, 0), Some(Reason::Watermark));
        s.written_back(1); // 30%: down to the low mark
        assert_eq!(s.write(10, 0), None);
        assert_eq!(s.write(10, 1), None, "40% again: under the high mark");
    }

    #[test]
    fn an_idle_disk_is_written_back() {
        let mut s = Sim::new(policy());
        assert_eq!(s.write(0, 1), None);
        assert_eq!(s.after(99), None);
        assert_eq!(s.after(1), Some(Reason::Idle));
        // Any request makes it busy again.
        s.o.activity += 1;
        assert_eq!(s.after(1), None);
    }

    #[test]
    fn old_dirty_data_is_written_back_under_load() {
        let mut s = Sim::new(policy());
        assert_eq!(s.write(0, 0), None);
        for _ in 0..99 {
            assert_eq!(s.write(100, 0), None, "busy, small, younger than 10 s");
        }
        assert_eq!(s.write(100, 0), Some(Reason::Aged));
        // Once the oldest kset is written back, the next oldest is 9.9 s old.
        s.written_back(0);
        assert_eq!(s.after(0), None);
        assert_eq!(s.write(100, 0), Some(Reason::Aged));
    }

    #[test]
    fn a_waiting_writer_overrides_the_policy() {
        let mut s = Sim::new(policy());
        assert_eq!(s.write(0, 1), None);
        s.o.space_wanted = true;
        assert_eq!(s.after(0), Some(Reason::SpaceWanted));
    }

    #[test]
    fn validate_rejects_crossed_or_oversized_watermarks() {
        assert!(WritebackPolicy::default().validate().is_ok());
        assert!(WritebackPolicy::IMMEDIATE.validate().is_ok());
        let mut p = policy();
        p.low_percent = 60;
        assert!(p.validate().unwrap_err().contains("must not exceed"));
        p.high_percent = 101;
        assert!(p.validate().unwrap_err().contains("0..=100"));
    }
}
