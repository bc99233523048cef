//! The engine itself: what an open cache holds in memory, and the few
//! helpers every part of it uses. Each concern's code is an `impl Engine`
//! in its own file; the public surface is in `io.rs`, `maintenance.rs`
//! and `status.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::error::{Error, Result};
use super::kset::{LogHead, OpenKset};
use super::mode::CacheMode;
use super::pace::Pacer;
use super::record::{Settings, Tail};
use super::segment::SegTable;
use super::shards::{Shard, ShardTable};
use super::stats::Stats;
use super::wb_state::WbState;
use crate::format::{self, Superblock};
use crate::pmem::Region;

/// Wakes a background worker.
#[derive(Debug, Default)]
pub(super) struct Kick {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Kick {
    pub(super) fn kick(&self) {
        *self.pending.lock().expect("kick lock") = true;
        self.cv.notify_all();
    }

    /// Sleep until kicked or `timeout`; returns whether kicked.
    pub(super) fn wait(&self, timeout: std::time::Duration) -> bool {
        let g = self.pending.lock().expect("kick lock");
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |p| !*p)
            .expect("kick lock");
        std::mem::replace(&mut *g, false)
    }
}

/// A pcache engine on an opened cache medium.
///
/// # Invariants
/// - `key_tail <= dirty_tail <= key_head` in log order.
/// - Every extent in the index points at data that was persisted before
///   its key was appended to a kset.
/// - A data segment's `refs` counts its data head (if any) plus every key
///   in the log after key_tail or in an open kset whose gen equals the
///   segment's.
pub struct Engine {
    pub(super) region: Arc<Region>,
    pub(super) sb: Superblock,
    pub(super) n_segs: u32,
    /// Size of the disk in bytes; grows online (`resize.rs`).
    pub(super) backing_bytes: AtomicU64,
    pub(super) data_crc: bool,
    pub(super) read_only: bool,
    pub(super) gc_percent: AtomicU8,
    /// `CacheMode` code (persisted in cache_info).
    pub(super) mode: AtomicU8,
    /// A mode switch in progress goes here.
    pub(super) mode_target: Mutex<Option<CacheMode>>,
    pub(super) settings: Mutex<Settings>,
    pub(super) segs: SegTable,
    pub(super) shards: ShardTable,
    pub(super) ksets: Box<[Mutex<OpenKset>]>,
    /// Guards key_head and the flush epoch; written by kset closes.
    pub(super) log: Mutex<LogHead>,
    /// Written by the GC worker only.
    pub(super) key_tail: Mutex<Tail>,
    /// Written by the writeback worker only.
    pub(super) dirty_tail: Mutex<Tail>,
    /// Sticky failure: set when a persist fails.
    pub(super) failed: AtomicBool,
    /// The background workers are stopping: a writeback pass submits no
    /// more backing writes.
    pub(super) halting: AtomicBool,
    /// A writer found the cache full: GC runs regardless of gc_percent.
    pub(super) space_wanted: AtomicBool,
    /// The same for the writeback worker (each worker clears its own).
    pub(super) writeback_wanted: AtomicBool,
    /// An operator asked for a drain; cleared once nothing is dirty.
    pub(super) drain_wanted: AtomicBool,
    /// A live migration copies the guest: writes go to the backing store
    /// where nothing is dirty, and writeback drains (`mode.rs`).
    pub(super) handing_over: AtomicBool,
    /// Guest writes wait while an invalidation runs (`invalidate.rs`).
    pub(super) writes_paused: AtomicBool,
    /// Kset closes that wait for I/O are left to the log closer instead of
    /// the guest's request (`kset.rs`).
    pub(super) defer_closes: AtomicBool,
    /// A guest request found a kset's lock taken (`LogBusy`): the log
    /// closer signals space once it has had every kset's lock since.
    pub(super) log_waiters: AtomicBool,
    /// Guest writes in progress.
    pub(super) writers: AtomicU64,
    pub(super) stats: Stats,
    pub(super) writeback_kick: Kick,
    pub(super) gc_kick: Kick,
    /// Wakes the log closer (the kset timer thread).
    pub(super) closer_kick: Kick,
    /// Serialises whole writeback passes (online worker vs. `drain`);
    /// holds the writeback target, buffers and measured rate.
    pub(super) writeback: Mutex<WbState>,
    /// Spreads guest writes over a running writeback batch.
    pub(super) pacer: Pacer,
    /// Serialises GC passes.
    pub(super) gc_lock: Mutex<()>,
    /// Opened read-only: the dirty keys found in the kset slots, which
    /// only a writable open appends to the log (for `verify_dirty_data`).
    pub(super) staged_dirty: OnceLock<Vec<format::KeyOnMedia>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("n_segs", &self.n_segs)
            .field("backing_bytes", &self.backing_bytes.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub(super) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(Error::Failed);
        }
        Ok(())
    }

    /// Persistence point; a failure makes the engine fail from now on.
    pub(super) fn persist(&self) -> Result<()> {
        self.region.persist().map_err(|e| {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %e, "persist to the cache medium failed; refusing writes until restart");
            }
            Error::Persist(e)
        })
    }

    pub(super) fn shard(&self, region: u64) -> Option<&Mutex<Shard>> {
        self.shards.get(region)
    }

    pub(super) fn shard_or_create(&self, region: u64) -> &Mutex<Shard> {
        self.shards.get_or_create(region)
    }

    pub(super) fn kset_for(&self, region: u64) -> &Mutex<OpenKset> {
        &self.ksets[region as usize % self.ksets.len()]
    }
}

pub(super) fn region_of(off: u64) -> u64 {
    off >> format::REGION_SHIFT
}

pub(super) fn check_range(off: u64, len: u64, size: u64) -> Result<()> {
    if !off.is_multiple_of(format::SECTOR_BYTES) || !len.is_multiple_of(format::SECTOR_BYTES) {
        return Err(Error::Unaligned { off, len });
    }
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { off, len, size }),
    }
}
