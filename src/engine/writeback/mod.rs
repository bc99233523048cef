//! Writing dirty keys back to the backing store.
//!
//! A pass gathers a batch of ksets from dirty_tail, keeps only the newest
//! version of each sector in it, writes those sorted by offset and merged
//! into large backing writes, flushes the backing store once, and only then
//! persists the new dirty_tail. A sector overwritten ten times between two
//! passes is written back once: sustained writes run at the cache's speed,
//! not the backing store's random-write rate.
//!
//! A batch spans as many flush epochs as its budget allows: the longer the
//! stretch of log it covers, the more overwrites it absorbs. The budget, in
//! distinct bytes, is what the backing store writes in about 1.5 s at its
//! measured rate, and a batch covers at most half the cache, so the other
//! half takes the guest's writes while it runs (and the next batch covers
//! those). Space comes back only when a pass ends: while it runs, guest
//! writes are paced (`pace.rs`) so the reclaimable space lasts until then,
//! and the pass frees it (GC) itself before pacing stops.
//!
//! What the backing store alone holds (if the cache were lost):
//! - [`WritebackOrder::Batch`] (the default): after each pass, exactly the
//!   guest's writes up to a kset boundary of the log, which is every flush
//!   epoch up to some E plus part of E+1; while a pass runs, that plus some
//!   of the newest versions in its batch.
//! - [`WritebackOrder::Strict`]: a batch never spans two flush epochs, so at
//!   every instant the backing store holds every epoch up to some E plus
//!   part of E+1 (dm-pcache's guarantee), at one backing flush per epoch.
//! - [`WritebackOrder::Newest`] (opt-in): a pass looks at all the durable
//!   dirty log it may (half the cache) and writes, for the ksets it passes,
//!   only the versions nothing later in that stretch replaces; a replaced
//!   one is left to the newer key, which is durable and still dirty. A hot
//!   set much smaller than the cache then costs one backing write per
//!   sector per pass instead of one per version, but the backing store
//!   alone holds a mix of epochs until the cache is clean.
//!
//! The end of the batch being written is persisted (the writeback target)
//! before its first backing write, and a pass never stops short of it: a
//! batch cut off by a crash or an error is finished by the next pass, even
//! in another process, so later passes never leave a sector of the cut-off
//! batch newer than the rest of the backing store.

use std::time::{Duration, Instant};

use super::index::{Extent, ExtentMap};

mod gather;
mod writer;

use writer::{flush_backing, Writer};

use super::{stats, Engine, Error, Result, Tail};
use std::sync::Arc;

use crate::backing::{Arena, BackingQueue};
use crate::format::{self, data_off, SECTOR_BYTES};

/// Memory for writeback's buffers when the server gives none
/// ([`Engine::set_writeback_memory`]): the offline tools.
const DEFAULT_MEMORY: usize = 32 << 20;
/// Time a pass is sized to spend writing, at the measured rate: long
/// enough to amortise the backing flush, short enough that space comes
/// back often.
const PASS_SECS: f64 = 1.5;
/// Batch budget bounds, in distinct bytes.
const BUDGET_MIN: u64 = 4 << 20;
const BUDGET_MAX: u64 = 1 << 30;
/// A batch covers at most this many times its budget of logged bytes, so
/// one pass over a huge cache stays bounded.
const LOGGED_PER_BUDGET: u64 = 16;
/// A batch covers at most this share of the cache (1/n): the rest is the
/// room guest writes use while it runs, and the next batch covers what
/// they wrote. Larger batches would leave the next ones smaller, and the
/// sizes would swing between the two.
const LOGGED_SHARE_OF_CACHE: u64 = 2;
/// Backing write rate assumed before the first pass is measured: low, so
/// the first batch of a process is small on a slow disk (a batch cut off
/// by a restart must be finished by the next process before dirty_tail
/// moves); one pass measures the real rate.
const RATE_START: f64 = 16e6;

/// How writeback orders what reaches the backing store; see the module
/// documentation. Persisted in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WritebackOrder {
    /// Coalesce many flush epochs per batch; the backing store alone is
    /// consistent at batch boundaries.
    #[default]
    Batch,
    /// One flush epoch per batch; the backing store alone is always a flush
    /// boundary plus part of the next epoch.
    Strict,
    /// Only the newest durable version of each sector is written; the
    /// backing store alone is consistent only once the cache is clean.
    Newest,
}

impl std::fmt::Display for WritebackOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WritebackOrder::Batch => "batch",
            WritebackOrder::Strict => "strict",
            WritebackOrder::Newest => "newest",
        })
    }
}

/// What one writeback pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing was dirty (dirty_tail == key_head).
    Clean,
    /// dirty_tail moved forward.
    Advanced {
        /// Ksets consumed (LAST ones included).
        ksets: usize,
        /// Bytes written to the backing store.
        bytes: u64,
    },
}

/// The writeback worker's state, behind the engine's writeback lock (which
/// also serialises passes: the online worker against `drain`).
#[derive(Debug)]
pub(super) struct WbState {
    /// Where write buffers come from (created when first needed).
    memory: Option<Arc<Arena>>,
    /// The writeback target record: where the batch being written ends.
    target: Tail,
    /// Backing write rate of recent passes while writing, bytes per second.
    rate: f64,
    /// Time of a pass not spent writing (gathering, the backing flush),
    /// seconds.
    fixed: f64,
    /// How long the last pass took.
    last_pass: Duration,
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
    fn memory(&mut self) -> Result<Arc<Arena>> {
        if self.memory.is_none() {
            self.memory = Some(Arena::new("writeback", DEFAULT_MEMORY).map_err(Error::Backing)?);
        }
        Ok(self.memory.clone().expect("just set"))
    }

    /// Distinct bytes the next batch may hold.
    fn budget(&self) -> u64 {
        ((self.rate * PASS_SECS) as u64).clamp(BUDGET_MIN, BUDGET_MAX)
    }

    /// How long a batch of `bytes` distinct bytes should take.
    fn expected(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.rate + self.fixed)
    }

    /// Fold a finished pass into the estimates: its bytes over the time its
    /// writes took (passes too small to time say little about bandwidth),
    /// and the rest of its time.
    fn measured(&mut self, bytes: u64, writing: Duration, total: Duration) {
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

/// What a batch writes for a range: its newest version in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WbKind {
    /// Data in the cache, at `seg`/`seg_off`.
    Data,
    /// Zeros (`unmap`: the store may deallocate).
    Zero { unmap: bool },
    /// Nothing: the newest data was lost (a range marked bad).
    Skip,
}

/// A dirty extent in a batch: what its newest version is, and for data,
/// where it lives in the cache.
#[derive(Debug, Clone, Copy)]
struct WbExt {
    sectors: u32,
    seg: u32,
    seg_off: u32,
    kind: WbKind,
    /// The lsn of the kset holding this version.
    lsn: u64,
}

impl Extent for WbExt {
    const EMPTY: WbExt = WbExt {
        sectors: 0,
        seg: 0,
        seg_off: 0,
        kind: WbKind::Skip,
        lsn: 0,
    };
    fn len(&self) -> u32 {
        self.sectors
    }
    fn set_len(&mut self, len: u32) {
        self.sectors = len;
    }
    fn skip_front(&mut self, n: u32) {
        self.sectors -= n;
        if self.kind == WbKind::Data {
            self.seg_off += n * SECTOR_BYTES as u32;
        }
    }
}

impl WbExt {
    /// The batch entry for a dataless key, or a key marked bad.
    fn dataless(key: &format::KeyOnMedia, kind: WbKind, lsn: u64) -> WbExt {
        WbExt {
            sectors: key.len / SECTOR_BYTES as u32,
            seg: 0,
            seg_off: 0,
            kind,
            lsn,
        }
    }
}

impl Engine {
    /// How writeback orders what reaches the backing store.
    pub fn writeback_order(&self) -> WritebackOrder {
        let s = self.settings.lock().expect("settings lock");
        if s.info.flags & format::CACHE_FLAG_WB_STRICT != 0 {
            WritebackOrder::Strict
        } else if s.info.flags & format::CACHE_FLAG_WB_NEWEST != 0 {
            WritebackOrder::Newest
        } else {
            WritebackOrder::Batch
        }
    }

    /// Choose the writeback order and persist it (nothing is written when
    /// it does not change). Takes effect at the next batch.
    pub fn set_writeback_order(&self, order: WritebackOrder) -> Result<()> {
        self.check_writable()?;
        let mut s = self.settings.lock().expect("settings lock");
        let mut info = s.info;
        info.flags &= !(format::CACHE_FLAG_WB_STRICT | format::CACHE_FLAG_WB_NEWEST);
        match order {
            WritebackOrder::Strict => info.flags |= format::CACHE_FLAG_WB_STRICT,
            WritebackOrder::Newest => info.flags |= format::CACHE_FLAG_WB_NEWEST,
            WritebackOrder::Batch => {}
        }
        if info == s.info {
            return Ok(());
        }
        self.write_settings(&mut s, info)
    }

    /// One writeback pass: write back a batch from dirty_tail and persist
    /// the new dirty_tail. The batch is sized from the backing store's
    /// measured rate and how long the free space lasts. On a backing
    /// error dirty_tail does not move; the caller retries later (with
    /// backoff) and the dirty data stays in the cache.
    pub fn writeback_once(&self, q: &mut BackingQueue) -> Result<Progress> {
        let mut st = self.writeback.lock().expect("writeback lock");
        let budget = st.budget();
        self.pass(&mut st, q, budget)
    }

    /// One writeback pass whose batch holds at most about `budget` distinct
    /// bytes (more only to finish a batch a crash or an error cut off).
    pub fn writeback_with_budget(&self, q: &mut BackingQueue, budget: u64) -> Result<Progress> {
        let mut st = self.writeback.lock().expect("writeback lock");
        self.pass(&mut st, q, budget)
    }

    fn pass(&self, st: &mut WbState, q: &mut BackingQueue, budget: u64) -> Result<Progress> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let started = Instant::now();
        // Writes are paced from the start: the space this pass frees comes
        // back only at its end. Until the batch is known, assume it takes
        // as long as the last one.
        let mut pacing = self.pacer.batch(st.last_pass);
        let Some(batch) = self.gather(st.target.pos, budget)? else {
            // Nothing to do for a while, probably: give the memory back.
            if let Some(m) = &st.memory {
                m.trim();
            }
            return Ok(Progress::Clean);
        };
        for key in &batch.bad {
            stats::add(&self.stats.data_crc_errors, 1);
            // Logged before dirty_tail can pass the corrupt key.
            self.mark_bad(key)?;
        }
        if batch.end.lsn > st.target.pos.lsn {
            // Whoever writes back next must finish this batch before
            // dirty_tail moves; see the module documentation.
            self.write_tail(&mut st.target, format::WB_TARGET_OFF, batch.end)?;
        }
        let gathered = started.elapsed();
        let distinct = batch.map.covered() * SECTOR_BYTES;
        let expected = st.expected(distinct);
        pacing.expect(expected);
        let memory = st.memory()?;
        let bytes = self.write_batch(q, &batch.map, &memory)?;
        let written = started.elapsed();
        // dirty_tail may only pass these keys once they are durable on the
        // backing store.
        flush_backing(q)?;
        let flushed = started.elapsed();
        {
            let mut t = self.dirty_tail.lock().expect("dirty_tail lock");
            self.write_tail(&mut t, format::DIRTY_TAIL_OFF, batch.end)?;
        }
        // Free the space here, before pacing stops, rather than leave it to
        // the GC worker: writers let loose before GC ran would find the
        // cache full. (Only down to gc_percent: clean data stays cached.)
        stats::sub(&self.stats.dirty_bytes, batch.logged_dirty);
        stats::sub(&self.stats.dirty_zero_bytes, batch.logged_zero);
        let gc_start = Instant::now();
        if let Err(e) = self.gc_once(false) {
            tracing::error!(error = %e, "gc after writeback failed");
        }
        let gc = gc_start.elapsed();
        drop(pacing);
        stats::add(&self.stats.writeback_bytes, bytes);
        stats::add(&self.stats.writeback_batches, 1);
        st.measured(bytes, written - gathered, started.elapsed());
        tracing::debug!(
            ksets = batch.ksets,
            logged = batch.logged_dirty,
            written = bytes,
            gather_ms = gathered.as_millis() as u64,
            write_ms = (written - gathered).as_millis() as u64,
            flush_ms = (flushed - written).as_millis() as u64,
            expected_ms = (gathered + expected).as_millis() as u64,
            gc_ms = gc.as_millis() as u64,
            ms = started.elapsed().as_millis() as u64,
            "writeback batch"
        );
        Ok(Progress::Advanced {
            ksets: batch.ksets,
            bytes,
        })
    }

    /// Write a batch's extents, sorted by offset, merging neighbours into
    /// writes of up to one buffer ([`Writer::merge_bytes`]). Returns the
    /// bytes written.
    fn write_batch(
        &self,
        q: &mut BackingQueue,
        map: &ExtentMap<u64, WbExt>,
        memory: &Arc<Arena>,
    ) -> Result<u64> {
        let mut w = Writer::new(q, memory);
        let merge = w.merge_bytes();
        // The run being merged: its backing offset, length, and where each
        // piece lives in the cache.
        let mut run_off = 0u64;
        let mut run_len = 0usize;
        let mut pieces: Vec<(u64, usize)> = Vec::new();
        let mut halted = false;
        // A run of zeroed ranges: offset, length, unmap.
        let mut zeros: Option<(u64, u64, bool)> = None;
        for (start, e) in map.iter() {
            if self.halting.load(std::sync::atomic::Ordering::Relaxed) {
                halted = true;
                break;
            }
            let off = start * SECTOR_BYTES;
            let len = e.sectors as usize * SECTOR_BYTES as usize;
            if e.kind != WbKind::Data {
                // No overlap within a batch, so zeroing here, between the
                // asynchronous writes, needs no ordering against them.
                if let WbKind::Zero { unmap } = e.kind {
                    match &mut zeros {
                        Some((zo, zl, zu)) if *zo + *zl == off && *zu == unmap => *zl += len as u64,
                        _ => {
                            if let Some(z) = zeros.replace((off, len as u64, unmap)) {
                                w.zero(z);
                            }
                        }
                    }
                }
                continue;
            }
            // An extent larger than a buffer goes in several.
            let mut done = 0;
            while done < len {
                let at = off + done as u64;
                let n = (len - done).min(merge);
                if run_len > 0 && (run_off + run_len as u64 != at || run_len + n > merge) {
                    self.submit_run(&mut w, run_off, run_len, &mut pieces);
                    run_len = 0;
                }
                if run_len == 0 {
                    run_off = at;
                }
                pieces.push((data_off(e.seg, e.seg_off) + done as u64, n));
                run_len += n;
                done += n;
            }
        }
        if run_len > 0 && !halted {
            self.submit_run(&mut w, run_off, run_len, &mut pieces);
        }
        if let Some(z) = zeros.filter(|_| !halted) {
            w.zero(z);
        }
        let total = w.total();
        if let Err(e) = w.finish() {
            stats::add(&self.stats.writeback_errors, 1);
            return Err(Error::Backing(e));
        }
        if halted {
            return Err(Error::Stopping);
        }
        Ok(total)
    }

    /// Copy a run's pieces into one buffer and submit it as one write.
    fn submit_run(&self, w: &mut Writer<'_>, off: u64, len: usize, pieces: &mut Vec<(u64, usize)>) {
        let mut buf = w.buffer(len);
        let mut at = 0;
        for (src, n) in pieces.drain(..) {
            self.region.read(src, &mut buf[at..at + n]);
            at += n;
        }
        w.submit(off, buf);
    }

    /// Take writeback's buffers from `memory` (the server's I/O budget)
    /// from the next pass on.
    pub fn set_writeback_memory(&self, memory: Arc<Arena>) {
        self.writeback.lock().expect("writeback lock").memory = Some(memory);
    }

    /// Write back everything dirty now (the offline `pcache writeback`, and
    /// shutdown with draining). Closes open ksets first. `progress` gets the
    /// dirty bytes left after each pass.
    pub fn writeback_all(&self, q: &mut BackingQueue, mut progress: impl FnMut(u64)) -> Result<()> {
        self.flush()?;
        loop {
            match self.writeback_once(q)? {
                Progress::Clean => return Ok(()),
                Progress::Advanced { .. } => progress(self.stats.snapshot().dirty_bytes),
            }
        }
    }

    /// What the writeback policy looks at, now. Clears the flag set by a
    /// writer waiting for space.
    pub fn observe(&self) -> super::Observation {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        let head_lsn = self.key_head().lsn;
        let dirty_lsn = self.dirty_tail().lsn;
        if dirty_lsn >= head_lsn {
            self.drain_wanted.store(false, Relaxed);
        }
        super::Observation {
            now: std::time::Instant::now(),
            dirty_bytes: load(&s.dirty_bytes),
            capacity: self.n_segs as u64 * format::SEG_DATA_BYTES,
            activity: load(&s.write_bytes)
                .wrapping_add(load(&s.read_hit_bytes))
                .wrapping_add(load(&s.read_miss_bytes))
                .wrapping_add(load(&s.flushes)),
            head_lsn,
            dirty_lsn,
            space_wanted: self.writeback_wanted.swap(false, Relaxed),
            drain: self.drain_wanted.load(Relaxed) || self.handing_over.load(Relaxed),
        }
    }

    /// Write back everything now, whatever the policy says: close the open
    /// ksets (so every completed write is in the log) and run writeback
    /// until nothing is dirty. Returns at once; `dirty_bytes` says when it
    /// is done (writes that arrive meanwhile are dirty again).
    pub fn request_drain(&self) -> Result<()> {
        self.flush()?;
        self.check_writable()?;
        self.drain_wanted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.writeback_kick.kick();
        Ok(())
    }

    /// Is there logged dirty data not yet written back?
    pub fn is_dirty(&self) -> bool {
        self.dirty_tail().lsn < self.key_head().lsn
    }
}
