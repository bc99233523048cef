//! What every queue of one disk shares: the cache, the backing store, the
//! handover state, the I/O memory budget, the ranges held by writes on
//! their way to the store, the persisting thread, and the guest's
//! write-cache choice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::budget::Budget;
use super::handover::Handover;
use super::order::RangeLocks;
use super::syncer::Syncer;
use crate::backing::Backing;
use crate::engine::{CacheMode, Engine};

/// How a disk is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskConfig {
    /// A sequential run of requests past this many bytes goes around the
    /// cache (writes) or is not filled in (reads); 0: never.
    pub sequential_cutoff: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// Bytes of I/O memory (`--io-memory`).
    pub io_memory: u64,
}

/// State shared by the queues of one disk.
pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub backing: Arc<dyn Backing>,
    pub handover: Handover,
    pub budget: Budget,
    pub locks: RangeLocks,
    /// Persists that wait for I/O (a cache file on a real file system);
    /// None when the queues persist themselves.
    pub syncer: Option<Syncer>,
    pub cfg: DiskConfig,
    /// The driver negotiated FLUSH (this connection).
    flush_acked: AtomicBool,
    /// The guest turned its write cache off (CONFIG_WCE); the engine keeps
    /// the choice across restarts, this is its copy for the data path.
    guest_writethrough: AtomicBool,
    /// A write went around the cache in write-back mode since the last
    /// guest flush: the next flush flushes the backing store too.
    pub backing_unflushed: AtomicBool,
    /// Names handed to queues and requests (arena waiters, reservations).
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(
        engine: Arc<Engine>,
        backing: Arc<dyn Backing>,
        handover: Handover,
        budget: Budget,
        syncer: Option<Syncer>,
        cfg: DiskConfig,
    ) -> Shared {
        let wt = engine.guest_writethrough();
        Shared {
            engine,
            backing,
            handover,
            budget,
            locks: RangeLocks::default(),
            syncer,
            cfg,
            flush_acked: AtomicBool::new(true),
            guest_writethrough: AtomicBool::new(wt),
            backing_unflushed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        }
    }

    /// A name not handed out before.
    pub fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Does the guest see a volatile write cache (FLUSH needed)? Without
    /// FLUSH negotiated it cannot ask for durability: every write is
    /// committed.
    pub fn write_cache(&self) -> bool {
        self.flush_acked.load(Ordering::Relaxed) && !self.guest_writethrough.load(Ordering::Relaxed)
    }

    pub fn set_flush_acked(&self, on: bool) {
        self.flush_acked.store(on, Ordering::Relaxed);
    }

    pub fn set_guest_writethrough(&self, on: bool) {
        self.guest_writethrough.store(on, Ordering::Relaxed);
    }

    /// How the cache mode routes a guest write now.
    pub fn mode(&self) -> CacheMode {
        self.engine.mode()
    }
}
