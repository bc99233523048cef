//! [`BackingQueue`]: asynchronous I/O to the backing store, one queue per
//! worker thread.
//!
//! Three engines behind one interface, this file being the interface:
//! - io_uring (`uring.rs`), when the store exposes a file descriptor and
//!   the kernel lets us set up a ring: reads, writes and fdatasyncs go
//!   straight to the kernel, batched per `poll`/`wait` call;
//! - librbd's asynchronous calls (`rbd.rs`) for an RBD image;
//! - a pool of four threads calling the [`Backing`] trait methods
//!   (`pool.rs`), for test doubles and for kernels (or seccomp profiles)
//!   without io_uring.
//!
//! Either way completions are reported through an eventfd (the notifier),
//! so a worker can sleep in epoll on its vhost-user queues and its backing
//! I/O at once.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::store::Backing;

mod op;
mod pool;
mod rbd;
mod uring;

use op::{signal_eventfd, POOL_THREADS, SECTOR};
pub use op::{Completion, IoOp};

use pool::Pool;
use rbd::Rbd;
use uring::Uring;

/// Which engine a [`BackingQueue`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEngine {
    /// io_uring on the store's file descriptor.
    Uring,
    /// A pool of threads calling the [`Backing`] methods.
    ThreadPool,
    /// librbd's asynchronous calls.
    Rbd,
}

/// The asynchronous side of a backing store, owned by one worker thread.
///
/// `submit` queues, `poll`/`wait` hand work to the engine and collect
/// completions. [`BackingQueue::notifier`] becomes readable when completions
/// are ready; `poll` and `wait` reset it.
///
/// Dropping the queue blocks until every submitted operation has finished
/// (results are discarded): the kernel may still be using their buffers.
pub struct BackingQueue {
    /// The engine; declared first so it is torn down before the notifier
    /// and the store it uses.
    engine: Engine,
    /// Completions decided at submit time (invalid requests, empty
    /// transfers), delivered by the next `poll`/`wait`.
    ready: VecDeque<Completion>,
    /// The eventfd signalled on completion; `None` only if it could not be
    /// created.
    notifier: Option<Arc<OwnedFd>>,
    /// Whether we signalled the notifier ourselves since it was last
    /// drained (one signal is enough to wake the worker).
    kicked: bool,
    /// The store; kept alive (and its descriptor open) until the engine has
    /// finished with it.
    backing: Arc<dyn Backing>,
}

/// The two engines.
enum Engine {
    /// io_uring (boxed: the ring is much bigger than the pool handle).
    Uring(Box<Uring>),
    /// The thread pool.
    Pool(Pool),
    /// librbd.
    Rbd(Rbd),
}

// Log the engine choice once per process, not once per worker.
static LOGGED_URING: AtomicBool = AtomicBool::new(false);
static LOGGED_URING_FAILED: AtomicBool = AtomicBool::new(false);
static LOGGED_NO_FD: AtomicBool = AtomicBool::new(false);
static LOGGED_RBD: AtomicBool = AtomicBool::new(false);

/// Whether this is the first time `flag` is asked about.
fn first_time(flag: &AtomicBool) -> bool {
    !flag.swap(true, Ordering::Relaxed)
}

impl BackingQueue {
    /// A queue on `backing` with room for `depth` operations in the kernel
    /// at once (more may be submitted; they wait their turn).
    ///
    /// Uses io_uring if `backing.uring_fd()` is `Some` and a ring can be set
    /// up, a thread pool otherwise; the choice is logged.
    pub fn new(backing: Arc<dyn Backing>, depth: u32) -> BackingQueue {
        let notifier = match new_eventfd() {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                tracing::error!(
                    "cannot create the backing queue's eventfd ({e}); \
                     completions will only be seen by polling"
                );
                None
            }
        };
        let notifier_fd = notifier.as_ref().map(|fd| fd.as_raw_fd());
        let engine = match (backing.rbd(), backing.uring_fd()) {
            (Some(handle), _) => {
                if first_time(&LOGGED_RBD) {
                    tracing::info!(backing = %backing.describe(), "backing I/O uses librbd's asynchronous calls");
                }
                Engine::Rbd(Rbd::new(handle, notifier.clone()))
            }
            (None, Some((fd, direct))) => match Uring::new(fd, depth, notifier_fd) {
                Ok(uring) => {
                    if first_time(&LOGGED_URING) {
                        tracing::info!(
                            backing = %backing.describe(),
                            depth = uring.limit,
                            o_direct = direct,
                            "backing I/O uses io_uring"
                        );
                    }
                    Engine::Uring(Box::new(uring))
                }
                Err(e) => {
                    if first_time(&LOGGED_URING_FAILED) {
                        tracing::warn!(
                            backing = %backing.describe(),
                            "io_uring is not available ({e}); backing I/O uses a \
                             pool of {POOL_THREADS} threads"
                        );
                    }
                    Engine::Pool(Pool::new(backing.clone(), notifier.clone()))
                }
            },
            (None, None) => {
                if first_time(&LOGGED_NO_FD) {
                    tracing::info!(
                        backing = %backing.describe(),
                        "the backing store has no file descriptor for io_uring; \
                         backing I/O uses a pool of {POOL_THREADS} threads"
                    );
                }
                Engine::Pool(Pool::new(backing.clone(), notifier.clone()))
            }
        };
        BackingQueue {
            engine,
            ready: VecDeque::new(),
            notifier,
            kicked: false,
            backing,
        }
    }

    /// Which engine this queue runs on.
    pub fn engine(&self) -> QueueEngine {
        match self.engine {
            Engine::Uring(_) => QueueEngine::Uring,
            Engine::Pool(_) => QueueEngine::ThreadPool,
            Engine::Rbd(_) => QueueEngine::Rbd,
        }
    }

    /// The store this queue does I/O on.
    pub fn backing(&self) -> &Arc<dyn Backing> {
        &self.backing
    }

    /// Queue `op`; its [`Completion`] carries `user_data`. Never fails: an
    /// invalid request (offset or length not a multiple of 512, or beyond
    /// the end of the store) completes with an `InvalidInput` error.
    ///
    /// On io_uring nothing reaches the kernel until the next `poll` or
    /// `wait`, so a batch of submits costs one system call; the notifier is
    /// made readable so that a worker that goes back to epoll instead of
    /// polling still comes round to it (a worker that polls right after
    /// submitting clears that signal without an extra wakeup).
    pub fn submit(&mut self, user_data: u64, op: IoOp) {
        if let Err(e) = validate(&op, self.backing.size()) {
            self.complete_now(user_data, op, Err(e));
            return;
        }
        let empty = !matches!(op, IoOp::Flush) && op.range().1 == 0;
        if empty {
            self.complete_now(user_data, op, Ok(()));
            return;
        }
        match &mut self.engine {
            Engine::Uring(u) => {
                u.queue(user_data, op);
                self.signal_notifier();
            }
            Engine::Pool(p) => p.submit(user_data, op),
            Engine::Rbd(r) => r.submit(user_data, op),
        }
    }

    /// Hand the operations submitted so far to the kernel now, without
    /// reaping anything, instead of at the next `poll`. A reader waiting on
    /// the store calls it per request: the device starts on the first read
    /// while later ones are still being parsed, as it would for a guest
    /// issuing them itself. If the kernel refuses them for now, they stay
    /// queued for the next `poll` (the notifier is already readable).
    pub fn start(&mut self) {
        if let Engine::Uring(u) = &mut self.engine {
            u.push_pending();
            if let Err(e) = u.submit(0) {
                tracing::debug!("io_uring_enter on start: {e}");
            }
        }
    }

    /// Operations submitted whose completion has not been returned yet.
    pub fn in_flight(&self) -> usize {
        self.ready.len()
            + match &self.engine {
                Engine::Uring(u) => u.live,
                Engine::Pool(p) => p.outstanding,
                Engine::Rbd(r) => r.outstanding,
            }
    }

    /// An eventfd that becomes readable when completions are ready, for the
    /// worker's epoll loop (level- or edge-triggered). `poll` and `wait`
    /// reset it. -1 if the eventfd could not be created (logged at `new`).
    pub fn notifier(&self) -> RawFd {
        self.notifier.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// Without blocking: hand queued operations to the engine and append
    /// every completion that is ready to `out`.
    pub fn poll(&mut self, out: &mut Vec<Completion>) {
        // Reset the notifier before reaping, so a completion that lands
        // after the reap signals it again.
        self.drain_notifier();
        out.extend(self.ready.drain(..));
        let stalled = match &mut self.engine {
            Engine::Uring(u) => u.poll(out).is_err(),
            Engine::Pool(p) => {
                p.try_reap(out);
                false
            }
            Engine::Rbd(r) => {
                r.try_reap(out);
                false
            }
        };
        if stalled {
            // The kernel refused the submission for now (e.g. EAGAIN):
            // make the worker come back to retry rather than sleep forever.
            self.signal_notifier();
        } else {
            self.settle_notifier();
        }
    }

    /// Block until at least `min` completions have been appended to `out`
    /// by this call, or nothing is in flight any more.
    pub fn wait(&mut self, min: usize, out: &mut Vec<Completion>) {
        let start = out.len();
        loop {
            self.drain_notifier();
            out.extend(self.ready.drain(..));
            let result = match &mut self.engine {
                Engine::Uring(u) => u.poll(out),
                Engine::Pool(p) => {
                    p.try_reap(out);
                    Ok(())
                }
                Engine::Rbd(r) => {
                    r.try_reap(out);
                    Ok(())
                }
            };
            if out.len() - start >= min || self.in_flight() == 0 {
                if result.is_err() {
                    self.signal_notifier();
                } else {
                    self.settle_notifier();
                }
                return;
            }
            match &mut self.engine {
                Engine::Uring(u) => u.block(result.is_err()),
                Engine::Pool(p) => p.block(out),
                Engine::Rbd(r) => r.block(out),
            }
        }
    }

    /// Complete `op` at once (delivered by the next `poll`/`wait`), and wake
    /// the worker so it calls one.
    fn complete_now(&mut self, user_data: u64, op: IoOp, result: io::Result<()>) {
        self.ready.push_back(Completion {
            user_data,
            op,
            result,
        });
        self.signal_notifier();
    }

    /// Make the notifier readable (once until the next drain).
    fn signal_notifier(&mut self) {
        if self.kicked {
            return;
        }
        if let Some(fd) = &self.notifier {
            signal_eventfd(fd.as_raw_fd());
            self.kicked = true;
        }
    }

    /// With nothing in flight no completion can arrive any more, so a
    /// signal still pending is for completions already reaped: clear it to
    /// spare the worker a spurious wakeup. (With work in flight it must stay:
    /// it may be for a completion that landed after the reap.)
    fn settle_notifier(&mut self) {
        if self.in_flight() == 0 {
            self.drain_notifier();
        }
    }

    /// Reset the notifier (it is non-blocking, so this never waits).
    fn drain_notifier(&mut self) {
        self.kicked = false;
        if let Some(fd) = &self.notifier {
            let mut value: u64 = 0;
            // SAFETY: reads at most 8 bytes into a live local u64 from a
            // descriptor we own (kept open by `self.notifier`).
            let _ = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    (&mut value as *mut u64).cast::<libc::c_void>(),
                    8,
                )
            };
        }
    }
}

impl Drop for BackingQueue {
    fn drop(&mut self) {
        match &mut self.engine {
            Engine::Uring(u) => u.drain_for_drop(),
            Engine::Pool(p) => p.shutdown(),
            Engine::Rbd(r) => r.shutdown(),
        }
    }
}

/// Check a request against the store: sector-aligned, inside `size`.
fn validate(op: &IoOp, size: u64) -> io::Result<()> {
    if let IoOp::Flush = op {
        return Ok(());
    }
    let (off, len) = op.range();
    if !off.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "backing {} of {len} bytes at offset {off} is not aligned to {SECTOR} bytes",
                op.name()
            ),
        ));
    }
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "backing {} of {len} bytes at offset {off} is beyond the end ({size} bytes)",
                op.name()
            ),
        )),
    }
}

/// A non-blocking, close-on-exec eventfd.
fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; we check the result.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor eventfd just returned to us, owned by
    // nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests;
