//! The virtio-blk device one frontend connection sees: its features, its
//! config space, the guest's cache mode, and one [`QueueState`] per queue.
//!
//! The engine and the backing store outlive it: a new device is built for
//! each connection.

use std::io;
use std::os::fd::OwnedFd;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{bits, BlkConfig, PROTOCOL_FEATURES, PROTOCOL_FEATURES_BIT, VIRTIO_FEATURES};
use super::counters::{Counters, Track};
use super::dirty::DirtyLog;
use super::queue::QueueState;
use super::Gm;
use crate::backing::Backing;
use crate::engine::Engine;
use crate::handover::Handover;

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
    /// A sequential run of requests past this many bytes goes around the
    /// cache (writes) or is not filled in (reads); 0: never.
    pub sequential_cutoff: u64,
}

/// The device of one frontend connection.
pub struct Device {
    pub(super) engine: Arc<Engine>,
    /// For the writes that go to the backing store themselves (modes
    /// other than write-back, sequential streams); reads use each queue's
    /// asynchronous backing queue.
    pub(super) backing: Arc<dyn Backing>,
    /// Who writes the disk; the live migration switchover.
    pub(super) handover: Arc<Handover>,
    /// Pages of guest memory we write, while the frontend migrates.
    pub(super) log: Arc<DirtyLog>,
    pub(super) cfg: ServeConfig,
    pub(super) mem: Gm,
    pub(super) event_idx: AtomicBool,
    /// Cache mode the guest sees: writeback (FLUSH needed) or writethrough.
    pub(super) writeback: AtomicBool,
    acked: AtomicU64,
    pub(super) queues: Vec<Mutex<QueueState>>,
    /// Written by the engine when it frees space (one per queue).
    pub(super) space_fds: Vec<EventFd>,
    /// Set when the process is stopping: no new request is taken.
    pub(super) stopping: AtomicBool,
    /// Our copy of the back-end request socket (`notify.rs`), once the
    /// frontend sent one.
    config_notifier: Mutex<Option<OwnedFd>>,
}

impl Device {
    /// A device serving the cache and backing store of `handover`, with
    /// guest memory `mem` (filled in by the frontend's memory table).
    pub fn new(handover: Arc<Handover>, cfg: ServeConfig, mem: Gm) -> io::Result<Device> {
        let engine = handover.engine().clone();
        let backing = handover.backing().clone();
        let mut queues = Vec::new();
        let mut space_fds = Vec::new();
        for q in 0..cfg.num_queues as usize {
            let track = Track::new(cfg.counters.clone(), q, cfg.queue_size);
            queues.push(Mutex::new(QueueState::new(backing.clone(), track)?));
            let fd = EventFd::new(EFD_NONBLOCK)?;
            engine.add_space_fd(fd.as_raw_fd());
            space_fds.push(fd);
        }
        Ok(Device {
            writeback: AtomicBool::new(!engine.guest_writethrough()),
            engine,
            backing,
            handover,
            log: Arc::new(DirtyLog::default()),
            cfg,
            mem,
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            queues,
            space_fds,
            stopping: AtomicBool::new(false),
            config_notifier: Mutex::new(None),
        })
    }

    /// Size of the disk in bytes.
    pub(super) fn capacity(&self) -> u64 {
        self.engine.size()
    }

    /// The frontend gave us a back-end request socket.
    pub(super) fn set_config_notifier(&self, fd: OwnedFd) {
        *self.config_notifier.lock().expect("notifier lock") = Some(fd);
    }

    /// Tell the frontend the config space changed (the capacity grew), so
    /// it raises a config interrupt in the guest. Ok(false) when it gave
    /// no channel for that (BACKEND_REQ not negotiated).
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let n = self.config_notifier.lock().expect("notifier lock");
        match &*n {
            Some(fd) => super::notify::send_config_change(fd).map(|()| true),
            None => Ok(false),
        }
    }

    /// Queues offered.
    pub fn num_queues(&self) -> usize {
        self.cfg.num_queues as usize
    }

    /// Largest ring accepted.
    pub fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    /// Guest memory, as the frontend's memory table maps it.
    pub fn memory(&self) -> &Gm {
        &self.mem
    }

    /// The fds a queue's worker watches besides its kick: backing
    /// completions, freed space and the pacing timer.
    pub fn worker_fds(&self, q: usize) -> [RawFd; 3] {
        let qs = self.queues[q].lock().expect("queue lock");
        [
            qs.bq.notifier(),
            self.space_fds[q].as_raw_fd(),
            qs.timer.as_raw_fd(),
        ]
    }

    /// Virtio features offered (a read-only disk offers RO, and neither
    /// DISCARD nor WRITE_ZEROES).
    pub fn features(&self) -> u64 {
        if self.cfg.read_only {
            (VIRTIO_FEATURES & !(bits::DISCARD | bits::WRITE_ZEROES))
                | bits::RO
                | PROTOCOL_FEATURES_BIT
        } else {
            VIRTIO_FEATURES | PROTOCOL_FEATURES_BIT
        }
    }

    /// vhost-user protocol features offered.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    /// The driver accepted `features`.
    pub fn set_acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        // Without FLUSH the driver cannot ask for durability: writethrough.
        // With it, what the guest chose last (CONFIG_WCE), kept in the cache
        // because a reconnecting frontend does not say it again.
        let wb = features & bits::FLUSH != 0 && !self.engine.guest_writethrough();
        self.writeback.store(wb, Ordering::Relaxed);
        self.event_idx.store(
            features & bits::EVENT_IDX != 0,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Bytes `offset..offset+size` of the config space.
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        BlkConfig {
            capacity: self.capacity() / 512,
            blk_size: self.cfg.blk_size,
            num_queues: self.cfg.num_queues,
            writeback: u8::from(self.writeback.load(Ordering::Relaxed)),
        }
        .read(offset, size)
    }

    /// The driver wrote the config space: only the writeback byte (offset
    /// 32) is writable, with CONFIG_WCE. The choice is persisted.
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wb = 32u32;
        if self.acked.load(Ordering::Relaxed) & bits::CONFIG_WCE == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "config space is read-only without CONFIG_WCE",
            ));
        }
        let Some(v) = wb.checked_sub(offset).and_then(|i| buf.get(i as usize)) else {
            return Ok(());
        };
        let writeback = *v != 0;
        if !writeback {
            // Switching to writethrough: make what is cached durable first.
            self.engine.flush().map_err(io::Error::other)?;
        }
        if !self.cfg.read_only {
            self.engine
                .set_guest_writethrough(!writeback)
                .map_err(io::Error::other)?;
        }
        self.writeback.store(writeback, Ordering::Relaxed);
        tracing::info!(writeback, "guest set the write cache mode");
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for fd in &self.space_fds {
            self.engine.remove_space_fd(fd.as_raw_fd());
        }
        for q in &self.queues {
            let mut qs = q.lock().expect("queue lock");
            let mut head = std::mem::take(&mut qs.head);
            self.engine.head_release(&mut head);
        }
    }
}
