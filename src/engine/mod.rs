//! The cache engine: a userspace port of dm-pcache.
//!
//! It knows sectors, not descriptors: requests arrive as byte offsets and
//! buffers, and nothing here knows about virtio or sockets.
//!
//! | file | kernel counterpart | holds |
//! |---|---|---|
//! | `segment.rs` | `cache_segment.c` | allocation, refs, gens |
//! | `index.rs`, `key.rs` | `cache_key.c` (tree part) | the sharded extent index |
//! | `kset.rs` | `cache_key.c` (kset part) | open ksets, key head, log segments |
//! | `req.rs` | `cache_req.c` | read, write, miss fill, flush |
//! | `writeback.rs` | `cache_writeback.c` | dirty keys to the backing store |
//! | `gc.rs` | `cache_gc.c` | reclaiming segments from key_tail |
//! | `bad.rs` | - | ranges whose dirty data failed its CRC |
//! | `pace.rs` | - | spreading guest writes over a writeback batch |
//! | `invalidate.rs` | - | dropping everything cached, writes held back |
//! | `mode.rs` | - | cache modes, writes that go to the backing store |
//! | `verify.rs` | - | offline check of dirty data against its CRCs |
//! | `resize.rs` | - | growing the disk online |
//! | `shards.rs` | - | the table of index shards, growing with the disk |
//! | `replay.rs` | `cache_key_replay` | rebuilding state at open |
//! | `open.rs` | `cache.c`, `cache_dev.c` | format, open, tails, settings |
//!
//! Lock order (outer first): index shard -> open kset -> log head ->
//! segment map. Tail mutexes and the settings mutex are leaves.

mod bad;
mod data;
mod gc;
mod index;
mod invalidate;
mod key;
mod kset;
mod mode;
mod open;
mod pace;
mod policy;
mod replay;
mod req;
mod resize;
mod segment;
mod shards;
mod stats;
mod verify;
mod workers;
mod writeback;

pub use data::{DataIn, DataOut};
pub use index::{Extent, ExtentMap};
pub use key::CacheExt;
pub use mode::CacheMode;
pub use open::{FormatOptions, OpenOptions};
pub use policy::{Gate, Observation, Reason, WritebackPolicy};
pub use req::{DataHead, Miss};
pub use segment::LOG_RESERVE_SEGS;
pub use stats::{Stats, StatsSnapshot};
pub use verify::{BadData, DataCheck};
pub use workers::Workers;
pub use writeback::{Progress, WritebackOrder};

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::format::{self, PosOnMedia, Superblock};
use crate::pmem::Region;

use index::ExtentMap as Map;
use kset::{LogHead, OpenKset};
use segment::SegTable;

/// Errors from the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cache medium could not be mapped.
    #[error(transparent)]
    Pmem(#[from] crate::pmem::Error),
    /// A record on the cache medium is invalid.
    #[error(transparent)]
    Format(#[from] format::Error),
    /// Persisting to the cache medium failed.
    #[error("Persisting to the cache medium failed")]
    Persist(#[source] io::Error),
    /// No free segment: retry after GC frees one. `done` bytes of the
    /// request were cached before space ran out.
    #[error("Cache is full ({done} bytes of the request were cached)")]
    CacheFull {
        /// Bytes already handled.
        done: u64,
    },
    /// The key log cannot take the request's keys until a full kset is
    /// closed, which would wait for I/O on this thread (see
    /// [`Engine::defer_log_closes`]): retry on the next space signal.
    /// `done` bytes of the request were handled.
    #[error("The key log is being closed ({done} bytes of the request were handled)")]
    LogBusy {
        /// Bytes already handled.
        done: u64,
    },
    /// The request conflicts with one in progress, or could not finish.
    #[error("{0}")]
    Busy(&'static str),
    /// Data verification asked of a cache that keeps no data CRCs.
    #[error("The cache was formatted without data CRCs (--data-crc): there is nothing to verify its data against")]
    NoDataCrc,
    /// The request reaches past the end of the device or overflows.
    #[error("Request {off:#x}+{len:#x} is outside the {size:#x}-byte device")]
    OutOfRange {
        /// Offset asked for.
        off: u64,
        /// Length asked for.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// Offset or length is not a multiple of 512.
    #[error("Request {off:#x}+{len:#x} is not aligned to 512-byte sectors")]
    Unaligned {
        /// Offset asked for.
        off: u64,
        /// Length asked for.
        len: u64,
    },
    /// Cached dirty data failed its data CRC; it cannot be served.
    #[error("Cached data at {off:#x}+{len:#x} failed its CRC check")]
    DataCorrupt {
        /// Logical offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// The backing store failed.
    #[error("Backing store I/O failed")]
    Backing(#[source] io::Error),
    /// An earlier persist failed; the engine refuses writes until restart.
    #[error("The cache failed earlier (a persist to the medium did not complete); restart pcache")]
    Failed,
    /// The cache was opened read-only.
    #[error("The cache is open read-only")]
    ReadOnly,
    /// A background pass was cut short because the process is stopping;
    /// nothing moved (the dirty data stays cached).
    #[error("Stopped before the pass finished")]
    Stopping,
    /// The medium already holds pcache metadata and `force` was not given,
    /// or an option conflicts with what the medium records.
    #[error("{0}")]
    Refused(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A wait-and-retry error (`CacheFull`, `LogBusy`) for a request of
    /// which `done` bytes were handled before it; any other error as is.
    pub(crate) fn with_done(self, done: u64) -> Error {
        match self {
            Error::CacheFull { .. } => Error::CacheFull { done },
            Error::LogBusy { .. } => Error::LogBusy { done },
            e => e,
        }
    }

    /// Bytes handled before a wait-and-retry error; None for the others.
    pub fn retry_from(&self) -> Option<u64> {
        match self {
            Error::CacheFull { done } | Error::LogBusy { done } => Some(*done),
            _ => None,
        }
    }
}

/// A log position plus which replica of its record is newest.
#[derive(Debug, Clone, Copy)]
struct Tail {
    pos: PosOnMedia,
    slot: usize,
    seq: u64,
}

/// Persistent settings and the replica that holds them.
#[derive(Debug, Clone, Copy)]
struct Settings {
    info: format::CacheInfo,
    slot: usize,
    seq: u64,
}

/// Wakes a background worker.
#[derive(Debug, Default)]
struct Kick {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Kick {
    fn kick(&self) {
        *self.pending.lock().expect("kick lock") = true;
        self.cv.notify_all();
    }

    /// Sleep until kicked or `timeout`; returns whether kicked.
    fn wait(&self, timeout: std::time::Duration) -> bool {
        let g = self.pending.lock().expect("kick lock");
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |p| !*p)
            .expect("kick lock");
        std::mem::replace(&mut *g, false)
    }
}

/// One index shard: the extents of a 4 MiB region.
#[derive(Debug, Default)]
struct Shard {
    map: Map<u16, CacheExt>,
    /// Bumped by every write into the region; a miss fill whose read
    /// started at an older version is dropped, since the backing data it
    /// read may be older than what the guest wrote meanwhile.
    write_version: u64,
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
    region: Arc<Region>,
    sb: Superblock,
    n_segs: u32,
    /// Size of the disk in bytes; grows online (`resize.rs`).
    backing_bytes: std::sync::atomic::AtomicU64,
    data_crc: bool,
    read_only: bool,
    gc_percent: AtomicU8,
    /// `CacheMode` code (persisted in cache_info).
    mode: AtomicU8,
    /// A mode switch in progress goes here.
    mode_target: Mutex<Option<CacheMode>>,
    settings: Mutex<Settings>,
    segs: SegTable,
    shards: shards::ShardTable,
    ksets: Box<[Mutex<OpenKset>]>,
    /// Guards key_head and the flush epoch; written by kset closes.
    log: Mutex<LogHead>,
    /// Written by the GC worker only.
    key_tail: Mutex<Tail>,
    /// Written by the writeback worker only.
    dirty_tail: Mutex<Tail>,
    /// Sticky failure: set when a persist fails.
    failed: AtomicBool,
    /// The background workers are stopping: a writeback pass submits no
    /// more backing writes.
    halting: AtomicBool,
    /// A writer found the cache full: GC runs regardless of gc_percent.
    space_wanted: AtomicBool,
    /// The same for the writeback worker (each worker clears its own).
    writeback_wanted: AtomicBool,
    /// An operator asked for a drain; cleared once nothing is dirty.
    drain_wanted: AtomicBool,
    /// A live migration copies the guest: writes go to the backing store
    /// where nothing is dirty, and writeback drains (`mode.rs`).
    handing_over: AtomicBool,
    /// Guest writes wait while an invalidation runs (`invalidate.rs`).
    writes_paused: AtomicBool,
    /// Kset closes that wait for I/O are left to the log closer instead of
    /// the guest's request (`kset.rs`).
    defer_closes: AtomicBool,
    /// Guest writes in progress.
    writers: std::sync::atomic::AtomicU64,
    stats: Stats,
    writeback_kick: Kick,
    gc_kick: Kick,
    /// Wakes the log closer (the kset timer thread).
    closer_kick: Kick,
    /// Serialises whole writeback passes (online worker vs. `drain`);
    /// holds the writeback target, buffers and measured rate.
    writeback: Mutex<writeback::WbState>,
    /// Spreads guest writes over a running writeback batch.
    pacer: pace::Pacer,
    /// Serialises GC passes.
    gc_lock: Mutex<()>,
    /// Opened read-only: the dirty keys found in the kset slots, which
    /// only a writable open appends to the log (for `verify_dirty_data`).
    staged_dirty: OnceLock<Vec<format::KeyOnMedia>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("n_segs", &self.n_segs)
            .field("backing_bytes", &self.size())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The mapped medium.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Size of the cached device in bytes (= the backing store's size).
    pub fn size(&self) -> u64 {
        self.backing_bytes.load(Ordering::Acquire)
    }

    /// Number of segments.
    pub fn n_segs(&self) -> u32 {
        self.n_segs
    }

    /// Was the cache opened read-only (nothing is ever written to it)?
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Is per-key data CRC on?
    pub fn data_crc(&self) -> bool {
        self.data_crc
    }

    /// Current gc_percent.
    pub fn gc_percent(&self) -> u8 {
        self.gc_percent.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Segments in use.
    pub fn segs_used(&self) -> u32 {
        self.segs.used()
    }

    /// key_head: where the next kset goes.
    pub fn key_head(&self) -> PosOnMedia {
        self.log.lock().expect("log lock").pos
    }

    /// dirty_tail: the first kset not yet written back.
    pub fn dirty_tail(&self) -> PosOnMedia {
        self.dirty_tail.lock().expect("dirty_tail lock").pos
    }

    /// key_tail: the first kset not yet reclaimed by GC.
    pub fn key_tail(&self) -> PosOnMedia {
        self.key_tail.lock().expect("key_tail lock").pos
    }

    /// Has a persist failed?
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Leave kset closes that would wait for I/O (an msync of a cache file
    /// on a real file system) to the log closer, so that guest requests
    /// never do; a request that finds its kset full then gets `LogBusy`.
    /// Set by a server whose queue threads must not block.
    pub fn defer_log_closes(&self, on: bool) {
        self.defer_closes.store(on, Ordering::Relaxed);
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(Error::Failed);
        }
        Ok(())
    }

    /// Persistence point; a failure makes the engine fail from now on.
    fn persist(&self) -> Result<()> {
        self.region.persist().map_err(|e| {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %e, "persist to the cache medium failed; refusing writes until restart");
            }
            Error::Persist(e)
        })
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

    /// Did the guest turn its write cache off (virtio-blk CONFIG_WCE)? The
    /// frontend sets it once and does not repeat it to a restarted backend,
    /// so the cache keeps it.
    pub fn guest_writethrough(&self) -> bool {
        let s = self.settings.lock().expect("settings lock");
        s.info.flags & format::CACHE_FLAG_WRITETHROUGH != 0
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

    fn shard(&self, region: u64) -> Option<&Mutex<Shard>> {
        self.shards.get(region)
    }

    fn shard_or_create(&self, region: u64) -> &Mutex<Shard> {
        self.shards.get_or_create(region)
    }

    fn kset_for(&self, region: u64) -> &Mutex<OpenKset> {
        &self.ksets[region as usize % self.ksets.len()]
    }

    /// Number of extents in the index (walks every shard).
    pub fn extent_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|(_, s)| s.lock().expect("shard lock").map.len() as u64)
            .sum()
    }

    /// Check the engine's invariants (tests).
    pub fn assert_invariants(&self) {
        for (_, s) in self.shards.iter() {
            #[cfg(debug_assertions)]
            s.lock().expect("shard lock").map.assert_invariants();
            #[cfg(not(debug_assertions))]
            let _ = s;
        }
        let kt = self.key_tail();
        let dt = self.dirty_tail();
        let kh = self.key_head();
        assert!(
            kt.lsn <= dt.lsn && dt.lsn <= kh.lsn,
            "log order broken: key_tail {kt:?} dirty_tail {dt:?} key_head {kh:?}"
        );
    }
}

fn region_of(off: u64) -> u64 {
    off >> format::REGION_SHIFT
}

fn check_range(off: u64, len: u64, size: u64) -> Result<()> {
    if !off.is_multiple_of(format::SECTOR_BYTES) || !len.is_multiple_of(format::SECTOR_BYTES) {
        return Err(Error::Unaligned { off, len });
    }
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { off, len, size }),
    }
}
