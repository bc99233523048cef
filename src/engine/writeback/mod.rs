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

use std::time::Instant;

use super::index::ExtentMap;

mod batch;
mod gather;
mod writer;

pub use batch::WritebackOrder;
use batch::{WbExt, WbKind};

use writer::{flush_backing, Writer};

use super::cache::Engine;
use super::error::{Error, Result};
use super::stats;
use crate::engine::wb_state::WbState;
use std::sync::Arc;

use crate::backing::{Arena, BackingQueue};
use crate::format::{self, data_off, SECTOR_BYTES};

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

impl Engine {
    /// Give the pages of writeback's free buffers back to the kernel
    /// (nothing is dirty for now).
    pub(super) fn trim_writeback_memory(&self) {
        if let Some(m) = &self.writeback.lock().expect("writeback lock").memory {
            m.trim();
        }
    }

    /// See [`Engine::writeback_once`].
    pub(super) fn wb_pass(&self, q: &mut BackingQueue) -> Result<Progress> {
        let mut st = self.writeback.lock().expect("writeback lock");
        let budget = st.budget();
        self.pass(&mut st, q, budget)
    }

    /// See [`Engine::writeback_with_budget`].
    pub(super) fn wb_pass_budget(&self, q: &mut BackingQueue, budget: u64) -> Result<Progress> {
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

    /// See [`Engine::writeback_all`].
    pub(super) fn wb_all(&self, q: &mut BackingQueue, mut progress: impl FnMut(u64)) -> Result<()> {
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
    pub(super) fn observe(&self) -> super::policy::Observation {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        let head_lsn = self.key_head().lsn;
        let dirty_lsn = self.dirty_tail().lsn;
        if dirty_lsn >= head_lsn {
            self.drain_wanted.store(false, Relaxed);
        }
        super::policy::Observation {
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

    /// See [`Engine::request_drain`].
    pub(super) fn drain_request(&self) -> Result<()> {
        self.flush()?;
        self.check_writable()?;
        self.drain_wanted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.writeback_kick.kick();
        Ok(())
    }
}
