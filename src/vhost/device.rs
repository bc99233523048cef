//! The virtio-blk device one frontend connection sees: its features, its
//! config space, and one [`QueueState`] per queue.
//!
//! The disk outlives it: a new device is built for each connection.

use std::io;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::config::{bits, BlkConfig, PROTOCOL_FEATURES, PROTOCOL_FEATURES_BIT, VIRTIO_FEATURES};
use super::conn::{Conn, ServeConfig};
use super::counters::Track;
use super::dirty::DirtyLog;
use super::guest::Gm;
use super::queue::QueueState;
use crate::disk::Disk;

/// The device of one frontend connection.
pub struct Device {
    /// What its queues share.
    pub(super) conn: Conn,
    acked: AtomicU64,
    pub(super) queues: Vec<Mutex<QueueState>>,
    /// Our copy of the back-end request socket (`notify.rs`), once the
    /// frontend sent one.
    config_notifier: Mutex<Option<OwnedFd>>,
}

impl Device {
    /// A device serving `disk`, with guest memory `mem` (filled in by the
    /// frontend's memory table).
    pub fn new(disk: Arc<Disk>, cfg: ServeConfig, mem: Gm) -> io::Result<Device> {
        let since = crate::fault::Stamp::now();
        let mut queues = Vec::new();
        for q in 0..cfg.num_queues as usize {
            let track = Track::new(cfg.counters.clone(), q, cfg.queue_size);
            queues.push(Mutex::new(QueueState::new(disk.queue()?, track, since)));
        }
        Ok(Device {
            conn: Conn {
                disk,
                log: Arc::new(DirtyLog::default()),
                cfg,
                mem,
                event_idx: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                since,
                sock: Mutex::new(None),
                faulted: AtomicBool::new(false),
            },
            acked: AtomicU64::new(0),
            queues,
            config_notifier: Mutex::new(None),
        })
    }

    /// Size of the disk in bytes.
    pub(super) fn capacity(&self) -> u64 {
        self.conn.disk.size()
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
        self.conn.cfg.num_queues as usize
    }

    /// Largest ring accepted.
    pub fn max_queue_size(&self) -> u16 {
        self.conn.cfg.queue_size
    }

    /// Guest memory, as the frontend's memory table maps it.
    pub fn memory(&self) -> &Gm {
        &self.conn.mem
    }

    /// The ring was kicked (or started): run what it holds.
    pub(super) fn on_kick(&self, q: usize) -> io::Result<()> {
        self.queues[q]
            .lock()
            .expect("queue lock")
            .on_kick(&self.conn)
    }

    /// Queue `q`'s disk queue has news.
    pub(super) fn on_disk(&self, q: usize) -> io::Result<()> {
        self.queues[q]
            .lock()
            .expect("queue lock")
            .on_disk(&self.conn)
    }

    /// Finish what queue `q` has taken, before `deadline`; returns how
    /// many are left (see `QueueState::settle`).
    pub(super) fn settle_queue(&self, q: usize, deadline: std::time::Instant) -> io::Result<usize> {
        self.queues[q]
            .lock()
            .expect("queue lock")
            .settle(&self.conn, deadline)
    }

    /// Stop queue `q` (see `QueueState::stop`).
    pub(super) fn stop_queue(&self, q: usize) -> io::Result<()> {
        self.queues[q].lock().expect("queue lock").stop(&self.conn)
    }

    /// Is the process stopping (no new request is taken)?
    pub(super) fn is_stopping(&self) -> bool {
        self.conn.is_stopping()
    }

    /// The fd a queue's worker watches besides its kick: its disk queue's.
    pub fn worker_fd(&self, q: usize) -> RawFd {
        self.queues[q].lock().expect("queue lock").dq.fd()
    }

    /// Virtio features offered (a read-only disk offers RO, and neither
    /// DISCARD nor WRITE_ZEROES).
    pub fn features(&self) -> u64 {
        if self.conn.cfg.read_only {
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
        // With it, what the guest chose last (CONFIG_WCE), which the disk
        // keeps because a reconnecting frontend does not say it again.
        self.conn
            .disk
            .set_flush_negotiated(features & bits::FLUSH != 0);
        self.conn.event_idx.store(
            features & bits::EVENT_IDX != 0,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Bytes `offset..offset+size` of the config space.
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        BlkConfig {
            capacity: self.capacity() / 512,
            blk_size: self.conn.cfg.blk_size,
            num_queues: self.conn.cfg.num_queues,
            writeback: u8::from(self.conn.disk.write_cache()),
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
        self.conn.disk.set_write_cache(*v != 0)
    }
}
