//! One frontend connection, from accept to close.
//!
//! A session builds a fresh [`Device`] and [`Handler`] (with a worker per
//! queue), answers the frontend's messages until it disconnects, then
//! finishes what its queues had taken. The disk outlives it.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::conn::ServeConfig;
use super::device::Device;
use super::handler::Handler;
use crate::disk::Disk;

/// How long a closing connection waits for deferred writes to find space.
const CLOSE_SETTLE: Duration = Duration::from_secs(10);
/// How long a stop waits for a frontend that just connected to start its
/// rings before closing the connection. QEMU 7.2 does not recover from a
/// backend that closes the connection in the middle of its handshake: it
/// reconnects but never starts the device again.
const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

/// A handle on the connection being served, to stop it from another thread.
#[derive(Clone)]
pub struct Active {
    dev: Arc<Device>,
    conn: Arc<UnixStream>,
    since: Instant,
}

impl Active {
    /// Tell the frontend the config space changed (see
    /// `Device::notify_config_change`).
    pub fn notify_config_change(&self) -> io::Result<bool> {
        self.dev.notify_config_change()
    }

    /// Rings the frontend has started.
    pub fn started(&self) -> usize {
        self.dev
            .queues
            .iter()
            .filter(|q| q.lock().expect("queue lock").ring.is_some())
            .count()
    }

    /// (reads waiting on the backing store, writes and flushes waiting),
    /// over every queue.
    pub fn waiting(&self) -> (u64, u64) {
        let (mut r, mut w) = (0, 0);
        for q in &self.dev.queues {
            let (qr, qw) = q.lock().expect("queue lock").dq.waiting();
            r += qr;
            w += qw;
        }
        (r, w)
    }

    /// Stop taking requests, finish those taken within `budget` (reads
    /// complete; deferred writes that find no space stay taken, recorded in
    /// the frontend's inflight region for the next backend), then close the
    /// connection. Returns how many were left taken.
    pub fn quiesce(&self, budget: Duration) -> usize {
        // Let a frontend in the middle of its handshake finish it first.
        while self.started() == 0 && self.since.elapsed() < HANDSHAKE_GRACE {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.dev
            .conn
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + budget;
        let mut left = 0;
        for q in 0..self.dev.num_queues() {
            match self.dev.settle_queue(q, deadline) {
                Ok(n) => left += n,
                Err(e) => tracing::warn!(queue = q, error = %e, "settling a queue"),
            }
        }
        let _ = self.conn.shutdown(Shutdown::Both);
        left
    }
}

/// Where a session announces itself while it runs, so another thread can
/// quiesce it.
pub trait SessionHook {
    /// The session starts.
    fn enter(&self, a: Active);
    /// The session is over.
    fn leave(&self);
}

/// Serve the frontend connected on `stream` until it disconnects (or
/// [`Active::quiesce`] closes it).
pub fn serve(
    stream: UnixStream,
    disk: Arc<Disk>,
    cfg: ServeConfig,
    hook: &dyn SessionHook,
) -> io::Result<()> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<super::shm::Owner>::new());
    let dev = Arc::new(Device::new(disk.clone(), cfg, mem)?);
    let handler = Arc::new(Mutex::new(Handler::new(dev.clone())?));
    let conn = Arc::new(stream.try_clone()?);
    *dev.conn.sock.lock().expect("socket lock") = Some(stream.try_clone()?);
    hook.enter(Active {
        dev: dev.clone(),
        conn,
        since: Instant::now(),
    });
    let peek = stream.try_clone()?;
    let mut req = BackendReqHandler::from_stream(stream, handler.clone());
    let result = loop {
        match super::notify::peek_backend_req_fd(&peek) {
            Ok(Some(fd)) => dev.set_config_notifier(fd),
            Ok(None) => {}
            // The read that follows reports it.
            Err(e) => tracing::debug!(error = %e, "peek at the next message"),
        }
        let r = req.handle_request();
        if dev.conn.end_if_faulted() {
            break Ok(());
        }
        match r {
            Ok(()) => {}
            Err(VuError::Disconnected | VuError::PartialMessage) => {
                tracing::info!("frontend disconnected");
                break Ok(());
            }
            Err(e) if dev.is_stopping() => {
                tracing::info!(error = %e, "connection closed for the stop");
                break Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "frontend connection ended with an error");
                break Ok(());
            }
        }
    };
    hook.leave();
    // Nothing more comes from this frontend: finish what was taken (reads
    // land in guest memory still mapped here), then stop the workers.
    if !dev.is_stopping() {
        for q in 0..dev.num_queues() {
            let _ = dev.settle_queue(q, Instant::now() + CLOSE_SETTLE);
        }
    }
    handler.lock().expect("handler lock").stop_all();
    drop(req);
    drop(handler);
    drop(dev);
    // Its queues are gone: give their memory back.
    disk.session_ended();
    result
}
