//! The engine's public surface for whoever runs the cache (the server,
//! the control socket, the offline commands): settings, modes,
//! draining, invalidation, growing, checking.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::cache::Engine;
use super::error::{Error, Result};
use super::mode::CacheMode;
use super::verify::DataCheck;
use super::writeback::{Progress, WritebackOrder};
use crate::backing::{Arena, BackingQueue};
use crate::format;

impl Engine {
    /// Leave kset closes that would wait for I/O (an msync of a cache file
    /// on a real file system) to the log closer, so that guest requests
    /// never do; a request that finds its kset full then gets `LogBusy`.
    /// Set by a server whose queue threads must not block.
    pub fn defer_log_closes(&self, on: bool) {
        self.defer_closes.store(on, Ordering::Relaxed);
    }

    /// Change gc_percent (0..=90) and persist it.
    pub fn set_gc_percent(&self, pct: u8) -> Result<()> {
        if pct > format::GC_PERCENT_MAX {
            return Err(Error::Refused(format!(
                "gc_percent must be 0..={}, not {pct}",
                format::GC_PERCENT_MAX
            )));
        }
        self.check_writable()?;
        let mut s = self.settings.lock().expect("settings lock");
        let mut info = s.info;
        info.gc_percent = pct;
        self.write_settings(&mut s, info)?;
        self.gc_percent.store(pct, Ordering::Relaxed);
        self.gc_kick.kick();
        Ok(())
    }

    /// Record the guest's write-cache choice and persist it (nothing is
    /// written when it does not change).
    pub fn set_guest_writethrough(&self, on: bool) -> Result<()> {
        self.check_writable()?;
        let mut s = self.settings.lock().expect("settings lock");
        let mut info = s.info;
        if on {
            info.flags |= format::CACHE_FLAG_WRITETHROUGH;
        } else {
            info.flags &= !format::CACHE_FLAG_WRITETHROUGH;
        }
        if info == s.info {
            return Ok(());
        }
        self.write_settings(&mut s, info)
    }

    /// Start (`true`) or end a live migration's copy phase: writes go to the
    /// backing store where the cache holds nothing dirty of their range,
    /// and writeback writes everything back, while it lasts. The mode
    /// itself does not change, so a cancelled migration is back in it at
    /// once.
    pub fn set_handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::SeqCst);
        if on {
            self.writeback_kick.kick();
        }
    }

    /// Announce a switch to `mode` (status shows it) and, when it leaves
    /// write-back, start writing everything back now. The caller waits
    /// for the drain, then calls [`Engine::set_mode`].
    pub fn prepare_mode(&self, mode: CacheMode) -> Result<()> {
        self.announce_mode(mode)
    }

    /// Switch to `mode` and persist it. Leaving write-back holds writes
    /// back and writes back what is still dirty first (failing, with
    /// nothing changed, after `timeout`); entering `none` also drops what
    /// the cache holds.
    pub fn set_mode(&self, mode: CacheMode, timeout: Duration) -> Result<()> {
        self.change_mode(mode, timeout)
    }

    /// Drop every cached extent; see the module documentation. Fails,
    /// dropping nothing, if dirty data is not written back within
    /// `timeout` (drain first: `pcache invalidate` does). Returns the
    /// segments freed.
    pub fn invalidate(&self, timeout: Duration) -> Result<u32> {
        self.drop_everything(timeout)
    }

    /// One GC pass. `forced` ignores gc_percent (a writer is waiting for
    /// space). Returns the number of segments freed.
    pub fn gc_once(&self, forced: bool) -> Result<u32> {
        self.gc_pass(forced)
    }

    /// Grow the disk to `bytes` (the backing store's new size) and persist
    /// it. Returns the old size; nothing changes when the size is the same.
    /// A smaller size is refused.
    pub fn grow(&self, bytes: u64) -> Result<u64> {
        self.grow_to(bytes)
    }

    /// Check the data CRC of every dirty key; see the module documentation.
    /// Fails if the cache keeps no data CRCs (formatted without data_crc).
    pub fn verify_dirty_data(&self) -> Result<DataCheck> {
        self.check_dirty_data()
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

    /// Take writeback's buffers from `memory` (the server's I/O budget)
    /// from the next pass on.
    pub fn set_writeback_memory(&self, memory: Arc<Arena>) {
        self.writeback.lock().expect("writeback lock").memory = Some(memory);
    }

    /// One writeback pass: write back a batch from dirty_tail and persist
    /// the new dirty_tail. The batch is sized from the backing store's
    /// measured rate and how long the free space lasts. On a backing
    /// error dirty_tail does not move; the caller retries later (with
    /// backoff) and the dirty data stays in the cache.
    pub fn writeback_once(&self, q: &mut BackingQueue) -> Result<Progress> {
        self.wb_pass(q)
    }

    /// One writeback pass whose batch holds at most about `budget` distinct
    /// bytes (more only to finish a batch a crash or an error cut off).
    pub fn writeback_with_budget(&self, q: &mut BackingQueue, budget: u64) -> Result<Progress> {
        self.wb_pass_budget(q, budget)
    }

    /// Write back everything dirty now (the offline `pcache writeback`, and
    /// shutdown with draining). Closes open ksets first. `progress` gets the
    /// dirty bytes left after each pass.
    pub fn writeback_all(&self, q: &mut BackingQueue, progress: impl FnMut(u64)) -> Result<()> {
        self.wb_all(q, progress)
    }

    /// Write back everything now, whatever the policy says: close the open
    /// ksets (so every completed write is in the log) and run writeback
    /// until nothing is dirty. Returns at once; `dirty_bytes` says when it
    /// is done (writes that arrive meanwhile are dirty again).
    pub fn request_drain(&self) -> Result<()> {
        self.drain_request()
    }
}
