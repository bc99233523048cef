//! The disk layer: one virtual disk, made of the cache and the backing
//! store, served to whatever transport sits above (vhost-user today).
//!
//! The transport submits requests (kind, byte range, the guest's buffers as
//! an [`IoVec`](crate::iovec::IoVec), a tag) to a [`DiskQueue`] and hands
//! back to its driver what the queue answers. Everything between is here:
//! the cache mode's routing (write-back, write-through, write-around,
//! none), the sequential cutoff, read misses and fills, deferral while the
//! cache is full, pacing, ordering of overlapping writes to the backing
//! store, flushes, and the I/O memory budget that bounds what all of them
//! may hold. The disk also owns the guest's write-cache choice and the
//! handover of the disk in a live migration. It knows nothing of virtio.
//!
//! | file | holds |
//! |---|---|
//! | `queue.rs` | [`DiskQueue`]: submission, the one dispatch per kind, events, settling |
//! | `read.rs`, `write.rs`, `flush.rs` | the job of each kind of request |
//! | `ctx.rs` | what a job may use on its queue |
//! | `shared.rs` | what the queues of a disk share |
//! | `budget.rs` | the I/O memory budget (`--io-memory`) |
//! | `order.rs` | ranges held by writes on their way to the backing store |
//! | `syncer.rs` | the thread that persists a cache file on a real file system |
//! | `stream.rs` | the sequential cutoff |
//! | `handover.rs` | who writes the disk; a live migration's switchover |
//! | `request.rs` | requests and answers |

mod budget;
mod ctx;
mod flush;
pub mod handover;
mod order;
mod queue;
mod read;
mod request;
mod shared;
mod stream;
mod syncer;
mod write;

pub use budget::{Budget, DEFAULT_IO_MEMORY, MIN_IO_MEMORY};
pub use handover::{Handover, HandoverStatus, Phase, Switchover};
pub use queue::{DiskQueue, MAX_REQUEST_BYTES};
pub use request::{Done, Op, Request, Status};
pub use shared::DiskConfig;

use std::io;
use std::sync::{Arc, Mutex};

use crate::backing::Backing;
use crate::engine::{Engine, Workers, WritebackPolicy};
use shared::Shared;
use syncer::Syncer;

/// One disk: the cache in front of its backing store, with the background
/// workers running. Shared by every connection of the process.
pub struct Disk {
    shared: Arc<Shared>,
    workers: Mutex<Option<Workers>>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("engine", &self.shared.engine)
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

impl Disk {
    /// Serve `engine` in front of `backing` (`claimed`: the store is ours
    /// already), starting writeback, GC and the kset timer under `policy`.
    pub fn new(
        engine: Arc<Engine>,
        backing: Arc<dyn Backing>,
        claimed: bool,
        cfg: DiskConfig,
        policy: WritebackPolicy,
    ) -> io::Result<Disk> {
        let budget = Budget::new(cfg.io_memory, backing.rbd().is_some())?;
        engine.set_writeback_memory(budget.writeback().clone());
        let syncer = if engine.region().persist_waits_for_io() && !engine.is_read_only() {
            // The queues must not wait for msync: full ksets are closed by
            // the log closer, flushes and commits by the syncer.
            engine.defer_log_closes(true);
            Some(Syncer::start(engine.clone())?)
        } else {
            None
        };
        let workers = Workers::start(engine.clone(), backing.clone(), policy);
        let handover = Handover::new(engine.clone(), backing.clone(), claimed);
        Ok(Disk {
            shared: Arc::new(Shared::new(engine, backing, handover, budget, syncer, cfg)),
            workers: Mutex::new(Some(workers)),
        })
    }

    /// A queue of requests (one per virtqueue; dropped when its connection
    /// ends).
    pub fn queue(&self) -> io::Result<DiskQueue> {
        DiskQueue::new(self.shared.clone())
    }

    /// The cache.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// The backing store.
    pub fn backing(&self) -> &Arc<dyn Backing> {
        &self.shared.backing
    }

    /// Who writes the disk, and a live migration's switchover.
    pub fn handover(&self) -> &Handover {
        &self.shared.handover
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.shared.engine.size()
    }

    /// Does it refuse writes?
    pub fn read_only(&self) -> bool {
        self.shared.cfg.read_only
    }

    /// Bytes of I/O memory (both shares).
    pub fn io_memory(&self) -> u64 {
        self.shared.budget.bytes()
    }

    /// Does the guest see a volatile write cache (FLUSH needed)?
    pub fn write_cache(&self) -> bool {
        self.shared.write_cache()
    }

    /// The driver negotiated FLUSH, or did not (then every write is made
    /// durable before it completes).
    pub fn set_flush_negotiated(&self, on: bool) {
        self.shared.set_flush_acked(on);
    }

    /// The guest turned its write cache on or off (virtio-blk CONFIG_WCE).
    /// Turning it off makes what is cached durable first. The choice is
    /// kept in the cache: a reconnecting frontend does not say it again.
    pub fn set_write_cache(&self, on: bool) -> io::Result<()> {
        let e = &self.shared.engine;
        if !on {
            e.flush().map_err(io::Error::other)?;
        }
        if !self.shared.cfg.read_only {
            e.set_guest_writethrough(!on).map_err(io::Error::other)?;
        }
        self.shared.set_guest_writethrough(!on);
        tracing::info!(write_cache = on, "guest set the write cache mode");
        Ok(())
    }

    /// A frontend's connection ended: a migration's copy phase ends with
    /// it, and the I/O memory its requests used goes back to the kernel.
    pub fn session_ended(&self) {
        self.shared.handover.session_ended();
        self.shared.set_flush_acked(true);
        self.shared.budget.trim();
        crate::util::trim_heap();
    }

    /// Stop for good: make the cache durable, stop the workers and let go
    /// of the backing store. Returns the flush's outcome.
    pub fn shutdown(&self) -> crate::engine::Result<()> {
        let flushed = self.shared.engine.flush();
        if let Some(w) = self.workers.lock().expect("workers lock").take() {
            w.stop();
        }
        if let Err(e) = self.shared.backing.release() {
            tracing::warn!(error = %e, "releasing the backing store at stop");
        }
        flushed
    }
}
