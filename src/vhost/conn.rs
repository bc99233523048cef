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
use crate::fault::Stamp;

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
    /// Frontend mappings' faults when the connection began: after one, no
    /// byte of guest memory can be trusted (`crate::fault`).
    pub since: Stamp,
    /// The connection's socket, shut down when its memory faulted.
    pub sock: std::sync::Mutex<Option<std::os::unix::net::UnixStream>>,
    /// The fault was reported (once).
    pub faulted: AtomicBool,
}

impl Conn {
    /// Is the process stopping (no new request is taken)?
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// End the connection if a frontend mapping faulted since it began (a
    /// file shrank under us): every request still taken fails, and the
    /// frontend sees the socket close. Returns whether it did.
    pub fn end_if_faulted(&self) -> bool {
        if self.since.intact() {
            return false;
        }
        if !self.faulted.swap(true, Ordering::Relaxed) {
            tracing::error!(
                address = format_args!("{:#x}", crate::fault::last_frontend_fault()),
                "the frontend's memory faulted (a file it gave us shrank under our mapping): \
                 failing the connection's requests and closing it"
            );
            if let Some(s) = &*self.sock.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        true
    }
}
