//! What the queues of one frontend connection share: the disk, the
//! guest's memory, the dirty log, the negotiated EVENT_IDX and whether the
//! process is stopping. The queues' pipeline (`queue.rs`) and the device
//! (`device.rs`, which also holds the queues) both read it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::counters::Counters;
use super::dirty::DirtyLog;
use super::guest::Gm;
use crate::disk::Disk;

/// What the backend serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Request queues offered.
    pub num_queues: u16,
    /// Every queue's request counters and latencies, shared by every
    /// connection (they count for the life of the process); at least
    /// `num_queues` queues.
    pub counters: Arc<Counters>,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Logical block size advertised (512 or 4096).
    pub blk_size: u32,
    /// Refuse writes.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes are sent).
    pub serial: String,
    /// After the ring runs dry, keep polling it at most this long before
    /// going back to sleep on the kick eventfd (0: never poll); the window
    /// adapts below that (`poll.rs`). Saves a wake-up per request when
    /// requests arrive close together.
    pub poll_us: u32,
}

/// One connection's shared state.
pub struct Conn {
    /// The disk served (shared by every connection).
    pub disk: Arc<Disk>,
    /// Pages of guest memory we write, while the frontend migrates.
    pub log: Arc<DirtyLog>,
    /// What is served.
    pub cfg: ServeConfig,
    /// Guest memory, as the frontend's memory table maps it.
    pub mem: Gm,
    /// The driver negotiated VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: AtomicBool,
    /// Set when the process is stopping: no new request is taken.
    pub stopping: AtomicBool,
}

impl Conn {
    /// Is the process stopping (no new request is taken)?
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}
