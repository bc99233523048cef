//! [`BackingQueue`]: asynchronous I/O to the backing store, one queue per
//! worker thread.
//!
//! Two engines behind one interface:
//! - io_uring, when the store exposes a file descriptor and the kernel lets
//!   us set up a ring: reads, writes and fdatasyncs go straight to the
//!   kernel, batched per `poll`/`wait` call;
//! - a pool of four threads calling the [`Backing`] trait methods, for test
//!   doubles and for kernels (or seccomp profiles) without io_uring.
//!
//! Either way completions are reported through an eventfd (the notifier),
//! so a worker can sleep in epoll on its vhost-user queues and its backing
//! I/O at once.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::{AlignedBuf, Backing};

/// Offsets and lengths must be multiples of this.
const SECTOR: u64 = 512;

/// Threads in the fallback pool.
const POOL_THREADS: usize = 4;

/// Largest transfer one SQE asks for (the SQE length is 32 bits); longer
/// operations continue where the previous piece stopped.
const MAX_SQE_BYTES: usize = 1 << 30;

/// Times an operation is resubmitted after EINTR/EAGAIN before its error is
/// reported.
const MAX_RETRIES: u32 = 16;

/// Consecutive failures of `io_uring_enter` after which `Drop` gives up
/// waiting and leaks the in-flight buffers instead of hanging.
const MAX_DROP_ENTER_FAILURES: u32 = 1000;

/// Largest ring asked for (the kernel's limit without IORING_SETUP_CLAMP).
const MAX_RING_ENTRIES: u32 = 32768;

/// One operation on the backing store. The buffer travels with the
/// operation and comes back in its [`Completion`].
#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` from the store at byte offset `off`.
    Read {
        /// Byte offset (a multiple of 512).
        off: u64,
        /// Destination; its length (a multiple of 512) is the transfer size.
        buf: AlignedBuf,
    },
    /// Write all of `buf` to the store at byte offset `off`.
    Write {
        /// Byte offset (a multiple of 512).
        off: u64,
        /// Source; its length (a multiple of 512) is the transfer size.
        buf: AlignedBuf,
    },
    /// Make every write completed before this was submitted durable.
    Flush,
}

impl IoOp {
    /// A short name for messages.
    fn name(&self) -> &'static str {
        match self {
            IoOp::Read { .. } => "read",
            IoOp::Write { .. } => "write",
            IoOp::Flush => "flush",
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The value given to [`BackingQueue::submit`].
    pub user_data: u64,
    /// The operation, with its buffer handed back (filled, for a read that
    /// succeeded).
    pub op: IoOp,
    /// Whether it succeeded. A read or write either transferred every byte
    /// or reports an error; a partial transfer is never `Ok`.
    pub result: io::Result<()>,
}

/// Which engine a [`BackingQueue`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEngine {
    /// io_uring on the store's file descriptor.
    Uring,
    /// A pool of threads calling the [`Backing`] methods.
    ThreadPool,
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
}

// Log the engine choice once per process, not once per worker.
static LOGGED_URING: AtomicBool = AtomicBool::new(false);
static LOGGED_URING_FAILED: AtomicBool = AtomicBool::new(false);
static LOGGED_NO_FD: AtomicBool = AtomicBool::new(false);

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
        let engine = match backing.uring_fd() {
            Some((fd, direct)) => match Uring::new(fd, depth, notifier_fd) {
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
            None => {
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
        let empty = match &op {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.is_empty(),
            IoOp::Flush => false,
        };
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
        }
    }
}

/// Check a request against the store: sector-aligned, inside `size`.
fn validate(op: &IoOp, size: u64) -> io::Result<()> {
    let (off, len) = match op {
        IoOp::Read { off, buf } | IoOp::Write { off, buf } => (*off, buf.len() as u64),
        IoOp::Flush => return Ok(()),
    };
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

/// Add one to an eventfd. Failure (only EAGAIN when the counter is
/// saturated, which means it is readable anyway) is ignored.
fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local u64; the caller keeps `fd`
    // open for the duration of the call.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast::<libc::c_void>(), 8) };
}

/// The error for a negative CQE result.
fn errno_error(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

// ---------------------------------------------------------------------------
// io_uring engine

/// An operation owned by the ring engine from `queue` until its CQE is
/// reaped: the slot owns the buffer the kernel reads or writes.
struct Slot {
    /// The caller's tag.
    user_data: u64,
    /// The operation and its buffer.
    op: IoOp,
    /// Bytes transferred so far (reads and writes continue after a short
    /// transfer).
    done: usize,
    /// Resubmissions after EINTR/EAGAIN.
    retries: u32,
}

/// The io_uring engine.
///
/// Invariant for memory safety: while an SQE for slot `i` is in the
/// submission ring or in the kernel (`in_kernel` counts them), `slots[i]`
/// stays `Some` and its buffer is neither freed nor accessed; only the reap
/// of that SQE's CQE (user_data `i`) may remove it. `Drop` waits for all
/// CQEs, or leaks the slots if it cannot.
struct Uring {
    /// The ring.
    ring: IoUring,
    /// The store's descriptor (kept open by `BackingQueue::backing`).
    fd: RawFd,
    /// Operations by slot index (the SQE user_data).
    slots: Vec<Option<Slot>>,
    /// Free slot indices.
    free: Vec<usize>,
    /// Slots whose next SQE is still to be pushed, in order.
    pending: VecDeque<usize>,
    /// SQEs pushed whose CQE has not been reaped.
    in_kernel: usize,
    /// Occupied slots (operations not yet completed to the caller).
    live: usize,
    /// Most SQEs in the kernel at once: the SQ size, which keeps the CQ
    /// (twice as big) from ever overflowing.
    limit: usize,
    /// Scratch for reaped CQEs (user_data, result).
    reaped: Vec<(u64, i32)>,
}

impl Uring {
    /// Set up a ring of `depth` entries for `fd`, check the opcodes we need
    /// and register the notifier.
    fn new(fd: RawFd, depth: u32, notifier: Option<RawFd>) -> io::Result<Uring> {
        let ring = IoUring::new(depth.clamp(1, MAX_RING_ENTRIES))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io::Error::new(e.kind(), format!("kernel too old to probe: {e}")))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel lacks IORING_OP_{name}"),
                ));
            }
        }
        if let Some(efd) = notifier {
            ring.submitter().register_eventfd(efd)?;
        }
        let limit = ring.params().sq_entries() as usize;
        Ok(Uring {
            ring,
            fd,
            slots: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            in_kernel: 0,
            live: 0,
            limit,
            reaped: Vec::new(),
        })
    }

    /// Take ownership of a validated, non-empty operation.
    fn queue(&mut self, user_data: u64, op: IoOp) {
        let slot = Slot {
            user_data,
            op,
            done: 0,
            retries: 0,
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(slot);
                idx
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.live += 1;
        self.pending.push_back(idx);
    }

    /// Push pending SQEs (up to the limit), submit them, reap completions;
    /// repeat while reaping made room for more or queued resubmissions, so
    /// nothing is left pending that no future completion would wake us for.
    fn poll(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        loop {
            self.push_pending();
            let submitted = self.submit(0);
            // Reap even if the submit failed: EBUSY means the kernel wants
            // completions consumed before it takes more.
            let reaped = self.reap(out);
            submitted?;
            if reaped == 0 || self.pending.is_empty() || self.in_kernel >= self.limit {
                return Ok(());
            }
        }
    }

    /// Sleep in the kernel until a completion arrives (or, if the last
    /// submission failed, a little while before retrying).
    fn block(&mut self, submit_failed: bool) {
        if self.in_kernel == 0 || submit_failed {
            // Nothing can wake us (or the kernel is refusing work): back off.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        if let Err(e) = self.submit(1) {
            tracing::debug!("io_uring_enter while waiting: {e}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `io_uring_enter`: submit what is in the SQ and wait for `want`
    /// completions. EINTR is not an error (the caller loops anyway).
    fn submit(&mut self, want: usize) -> io::Result<()> {
        if want == 0 && self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Move pending operations into the SQ while the kernel has room.
    fn push_pending(&mut self) {
        let mut sq = self.ring.submission();
        while self.in_kernel < self.limit {
            let Some(&idx) = self.pending.front() else {
                break;
            };
            let Some(entry) = sqe_for(self.fd, &mut self.slots, idx) else {
                // Cannot happen (pending slots are occupied); drop the entry
                // rather than submit garbage.
                self.pending.pop_front();
                continue;
            };
            // SAFETY: the entry points at the heap buffer of `slots[idx]`
            // (or at nothing, for fsync) and at `self.fd`. By the `Uring`
            // invariant that slot, and so its buffer, stays allocated and
            // untouched until the CQE with user_data `idx` is reaped; the
            // heap address does not change when the `Slot` or `slots` moves.
            // The descriptor stays open because `BackingQueue` keeps the
            // store alive until `drain_for_drop` has reaped every CQE.
            if unsafe { sq.push(&entry) }.is_err() {
                break; // SQ full: the rest waits for the next round
            }
            self.pending.pop_front();
            self.in_kernel += 1;
        }
    }

    /// Reap every available CQE, finishing or resubmitting its operation.
    /// Returns the number of CQEs reaped.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.reaped.clear();
        self.reaped.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let count = self.reaped.len();
        for i in 0..count {
            let (user_data, res) = self.reaped[i];
            self.in_kernel = self.in_kernel.saturating_sub(1);
            self.handle_cqe(user_data, res, out);
        }
        count
    }

    /// Account for one CQE of slot `idx`.
    fn handle_cqe(&mut self, idx: u64, res: i32, out: &mut Vec<Completion>) {
        let idx = idx as usize;
        let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            tracing::error!("io_uring completion for unknown slot {idx} (ignored)");
            return;
        };
        let total = match &slot.op {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.len(),
            IoOp::Flush => 0,
        };
        let result = if res < 0 {
            if (res == -libc::EINTR || res == -libc::EAGAIN) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                self.pending.push_front(idx);
                return;
            }
            Err(errno_error(res))
        } else if matches!(slot.op, IoOp::Flush) {
            Ok(())
        } else if res == 0 {
            // No progress: the file shrank under us (read) or the device
            // takes no more (write). Never report a partial transfer as Ok.
            let remaining = total - slot.done;
            Err(match slot.op {
                IoOp::Read { off, .. } => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at offset {} with {remaining} bytes left to read",
                        off + slot.done as u64
                    ),
                ),
                _ => io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!(
                        "write made no progress with {remaining} bytes left at offset {}",
                        slot.op_offset() + slot.done as u64
                    ),
                ),
            })
        } else {
            slot.done += res as usize;
            if slot.done < total {
                // Short transfer: continue with the rest.
                self.pending.push_front(idx);
                return;
            }
            Ok(())
        };
        self.finish(idx, result, out);
    }

    /// Hand slot `idx` back to the caller with `result`.
    fn finish(&mut self, idx: usize, result: io::Result<()>, out: &mut Vec<Completion>) {
        if let Some(slot) = self.slots[idx].take() {
            self.free.push(idx);
            self.live -= 1;
            out.push(Completion {
                user_data: slot.user_data,
                op: slot.op,
                result,
            });
        }
    }

    /// Before the ring and the buffers go away: let every operation run to
    /// completion. If the kernel keeps refusing, leak the buffers instead
    /// (memory it may still write must never be freed).
    fn drain_for_drop(&mut self) {
        let mut sink = Vec::new();
        let mut failures = 0;
        while self.live > 0 {
            if self.in_kernel == 0 && self.pending.is_empty() {
                // Cannot happen (a live slot is pending or in the kernel);
                // if it did, the kernel holds no buffer and freeing is safe.
                break;
            }
            sink.clear();
            let result = self.poll(&mut sink).and_then(|()| {
                if self.live > 0 && self.in_kernel > 0 {
                    self.submit(1)
                } else {
                    Ok(())
                }
            });
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_DROP_ENTER_FAILURES {
                        tracing::error!(
                            "io_uring keeps failing ({e}) while dropping a backing \
                             queue; leaking {} in-flight buffers",
                            self.live
                        );
                        std::mem::forget(std::mem::take(&mut self.slots));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

impl Slot {
    /// The operation's starting offset (0 for flush).
    fn op_offset(&self) -> u64 {
        match &self.op {
            IoOp::Read { off, .. } | IoOp::Write { off, .. } => *off,
            IoOp::Flush => 0,
        }
    }
}

/// The SQE for the next piece of slot `idx`: the rest of its transfer (at
/// most `MAX_SQE_BYTES`), or the fdatasync.
fn sqe_for(fd: RawFd, slots: &mut [Option<Slot>], idx: usize) -> Option<squeue::Entry> {
    let slot = slots.get_mut(idx)?.as_mut()?;
    let done = slot.done;
    let entry = match &mut slot.op {
        IoOp::Read { off, buf } => {
            let len = (buf.len() - done).min(MAX_SQE_BYTES);
            // wrapping_add: in bounds (done < len), no unsafe needed.
            let ptr = buf.as_mut_ptr().wrapping_add(done);
            // Issued inline by io_uring_enter, not punted to io-wq
            // (IOSQE_ASYNC): with `start` after each request, inline
            // issue puts each read on the device at once; io-wq added a
            // thread switch and issued a whole batch only after it.
            opcode::Read::new(types::Fd(fd), ptr, len as u32)
                .offset(*off + done as u64)
                .build()
        }
        IoOp::Write { off, buf } => {
            let len = (buf.len() - done).min(MAX_SQE_BYTES);
            let ptr = buf.as_ptr().wrapping_add(done);
            opcode::Write::new(types::Fd(fd), ptr, len as u32)
                .offset(*off + done as u64)
                .build()
        }
        IoOp::Flush => opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    };
    Some(entry.user_data(idx as u64))
}

// ---------------------------------------------------------------------------
// Thread-pool engine

/// A queued job.
struct Job {
    /// The caller's tag.
    user_data: u64,
    /// The operation.
    op: IoOp,
}

/// Jobs waiting for a thread, and whether the pool is shutting down.
struct Jobs {
    /// Not yet started, in order.
    queue: VecDeque<Job>,
    /// Set by `shutdown`: threads exit once the queue is empty.
    stop: bool,
}

/// State shared with the pool threads.
struct Shared {
    /// The job queue.
    jobs: Mutex<Jobs>,
    /// Signalled when a job is queued or the pool stops.
    wake: Condvar,
}

impl Shared {
    /// The job queue, even if a thread panicked while holding it (the
    /// queue itself is always consistent).
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread-pool engine.
struct Pool {
    /// Queue shared with the threads.
    shared: Arc<Shared>,
    /// The threads, joined on shutdown.
    threads: Vec<JoinHandle<()>>,
    /// Completions from the threads.
    rx: mpsc::Receiver<Completion>,
    /// Jobs submitted and not yet received back.
    outstanding: usize,
    /// Jobs failed at submit because no thread could be started.
    failed: VecDeque<Completion>,
}

impl Pool {
    /// Start the threads.
    fn new(backing: Arc<dyn Backing>, notifier: Option<Arc<OwnedFd>>) -> Pool {
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::new(),
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(POOL_THREADS);
        for i in 0..POOL_THREADS {
            let shared = shared.clone();
            let backing = backing.clone();
            let tx = tx.clone();
            let notifier = notifier.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pcache-bio-{i}"))
                .spawn(move || pool_thread(&shared, &*backing, &tx, notifier.as_deref()));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => tracing::error!("cannot start backing I/O thread {i}: {e}"),
            }
        }
        Pool {
            shared,
            threads,
            rx,
            outstanding: 0,
            failed: VecDeque::new(),
        }
    }

    /// Queue a validated operation for a thread (or fail it at once if no
    /// thread could be started).
    fn submit(&mut self, user_data: u64, op: IoOp) {
        self.outstanding += 1;
        if self.threads.is_empty() {
            self.failed.push_back(Completion {
                user_data,
                op,
                result: Err(io::Error::other("no backing I/O thread could be started")),
            });
            return;
        }
        self.shared.lock().queue.push_back(Job { user_data, op });
        self.shared.wake.notify_one();
    }

    /// Append every completion already sent back.
    fn try_reap(&mut self, out: &mut Vec<Completion>) {
        self.outstanding -= self.failed.len();
        out.extend(self.failed.drain(..));
        while let Ok(c) = self.rx.try_recv() {
            self.outstanding -= 1;
            out.push(c);
        }
    }

    /// Wait for one completion.
    fn block(&mut self, out: &mut Vec<Completion>) {
        match self.rx.recv() {
            Ok(c) => {
                self.outstanding -= 1;
                out.push(c);
            }
            Err(_) => {
                // Every thread is gone (a store panicked): their jobs will
                // never complete. Stop counting them so `wait` returns.
                tracing::error!(
                    "backing I/O threads are gone; {} operations are lost",
                    self.outstanding
                );
                self.outstanding = 0;
            }
        }
    }

    /// Let the threads finish every queued job, then stop and join them.
    fn shutdown(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Body of a pool thread: run jobs until told to stop and the queue is
/// empty.
fn pool_thread(
    shared: &Shared,
    backing: &dyn Backing,
    tx: &mpsc::Sender<Completion>,
    notifier: Option<&OwnedFd>,
) {
    loop {
        let job = {
            let mut jobs = shared.lock();
            loop {
                if let Some(job) = jobs.queue.pop_front() {
                    break Some(job);
                }
                if jobs.stop {
                    break None;
                }
                jobs = shared.wake.wait(jobs).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(Job { user_data, mut op }) = job else {
            return;
        };
        let result = match &mut op {
            IoOp::Read { off, buf } => backing.read_at(buf, *off),
            IoOp::Write { off, buf } => backing.write_at(buf, *off),
            IoOp::Flush => backing.flush(),
        };
        if tx
            .send(Completion {
                user_data,
                op,
                result,
            })
            .is_err()
        {
            // Cannot happen: the receiver outlives the threads (the queue
            // joins them before its fields are dropped). Keep draining jobs.
            continue;
        }
        if let Some(fd) = notifier {
            signal_eventfd(fd.as_raw_fd());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FaultKind, FaultOp, FaultPlan, FaultyBacking, FileBacking, MemBacking};
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    /// Hides the descriptor of a store, forcing the thread pool.
    struct NoUring<B>(B);

    impl<B: Backing> Backing for NoUring<B> {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.0.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.0.write_at(buf, off)
        }
        fn flush(&self) -> io::Result<()> {
            self.0.flush()
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
    }

    /// A scratch dir on the disk file system (O_DIRECT works there).
    fn disk_dir() -> tempfile::TempDir {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).expect("target dir");
        tempfile::tempdir_in(base).expect("tempdir")
    }

    fn disk_file(dir: &Path, len: u64) -> PathBuf {
        let path = dir.join("disk");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("create");
        path
    }

    /// Whether this process may use io_uring at all.
    fn kernel_has_uring() -> bool {
        IoUring::new(2).is_ok()
    }

    /// The queue engine expected for a store with a descriptor.
    fn expected_file_engine() -> QueueEngine {
        if kernel_has_uring() {
            QueueEngine::Uring
        } else {
            QueueEngine::ThreadPool
        }
    }

    fn wait_for_all(q: &mut BackingQueue) -> Vec<Completion> {
        let mut out = Vec::new();
        while q.in_flight() > 0 {
            q.wait(1, &mut out);
        }
        out
    }

    /// 256 random writes (non-overlapping, so order does not matter), a
    /// flush, then reads of every written range; checks the data.
    fn random_writes_then_reads(q: &mut BackingQueue, size: u64, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let slots = size / 65536;
        let mut chosen: Vec<u64> = (0..slots).collect();
        // Shuffle, take 256 distinct 64 KiB slots, random length inside.
        for i in (1..chosen.len()).rev() {
            chosen.swap(i, rng.gen_range(0..=i));
        }
        let mut written: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
        for (tag, &slot) in chosen.iter().take(256).enumerate() {
            let sectors = rng.gen_range(1..=128u64);
            let off = slot * 65536;
            let mut buf = AlignedBuf::new((sectors * 512) as usize);
            rng.fill(&mut buf[..]);
            written.insert(tag as u64, (off, buf.to_vec()));
            q.submit(tag as u64, IoOp::Write { off, buf });
        }
        assert_eq!(q.in_flight(), 256);
        let done = wait_for_all(q);
        assert_eq!(done.len(), 256);
        for c in &done {
            c.result.as_ref().expect("write ok");
            assert!(matches!(c.op, IoOp::Write { .. }));
        }
        q.submit(9999, IoOp::Flush);
        let flushed = wait_for_all(q);
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].user_data, 9999);
        flushed[0].result.as_ref().expect("flush ok");

        for (&tag, (off, data)) in &written {
            q.submit(
                tag,
                IoOp::Read {
                    off: *off,
                    buf: AlignedBuf::new(data.len()),
                },
            );
        }
        let reads = wait_for_all(q);
        assert_eq!(reads.len(), 256);
        for c in reads {
            c.result.as_ref().expect("read ok");
            let (off, data) = &written[&c.user_data];
            match c.op {
                IoOp::Read { off: got, buf } => {
                    assert_eq!(got, *off);
                    assert!(buf[..] == data[..], "data of tag {}", c.user_data);
                }
                other => panic!("expected a read back, got {other:?}"),
            }
        }
    }

    #[test]
    fn file_backing_queue_uses_io_uring_when_the_kernel_allows() {
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        let b = Arc::new(FileBacking::open(&path, false).expect("open"));
        assert!(b.is_direct());
        let q = BackingQueue::new(b, 32);
        assert_eq!(q.engine(), expected_file_engine());
        eprintln!("engine for FileBacking on this machine: {:?}", q.engine());
    }

    #[test]
    fn uring_random_writes_then_reads_return_the_data_o_direct() {
        let dir = disk_dir();
        let size = 64 << 20;
        let path = disk_file(dir.path(), size);
        let b = Arc::new(FileBacking::open(&path, false).expect("open"));
        assert!(b.is_direct());
        // Depth 16 < 256 submissions: exercises the internal queueing.
        let mut q = BackingQueue::new(b, 16);
        assert_eq!(q.engine(), expected_file_engine());
        random_writes_then_reads(&mut q, size, 1);
    }

    #[test]
    fn uring_random_writes_then_reads_return_the_data_buffered() {
        let dir = disk_dir();
        let size = 64 << 20;
        let path = disk_file(dir.path(), size);
        let b = Arc::new(FileBacking::open_with(&path, false, false).expect("open"));
        assert!(!b.is_direct());
        let mut q = BackingQueue::new(b, 64);
        assert_eq!(q.engine(), expected_file_engine());
        random_writes_then_reads(&mut q, size, 2);
    }

    #[test]
    fn thread_pool_random_writes_then_reads_return_the_data() {
        let dir = disk_dir();
        let size = 64 << 20;
        let path = disk_file(dir.path(), size);
        let b = FileBacking::open(&path, false).expect("open");
        let mut q = BackingQueue::new(Arc::new(NoUring(b)), 16);
        assert_eq!(q.engine(), QueueEngine::ThreadPool);
        random_writes_then_reads(&mut q, size, 3);
    }

    #[test]
    fn thread_pool_on_mem_backing_flush_makes_writes_durable() {
        let mem = Arc::new(MemBacking::new(32 << 20));
        let mut q = BackingQueue::new(mem.clone(), 8);
        assert_eq!(q.engine(), QueueEngine::ThreadPool);
        random_writes_then_reads(&mut q, 32 << 20, 4);
        mem.crash();
        assert!(mem.image() == mem.durable_image());
        assert_eq!(mem.flushes(), 1);
        assert_eq!(mem.writes(), 256);
    }

    #[test]
    fn uring_data_is_visible_to_plain_reads_of_the_file() {
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        let b = Arc::new(FileBacking::open(&path, false).expect("open"));
        let mut q = BackingQueue::new(b.clone(), 8);
        let buf = AlignedBuf::from_slice(&[0xabu8; 8192]);
        q.submit(1, IoOp::Write { off: 4096, buf });
        q.submit(2, IoOp::Flush);
        let done = wait_for_all(&mut q);
        assert!(done.iter().all(|c| c.result.is_ok()));
        let contents = std::fs::read(&path).expect("read file");
        assert!(contents[4096..12288].iter().all(|&x| x == 0xab));
        assert!(contents[..4096].iter().all(|&x| x == 0));
    }

    #[test]
    fn invalid_requests_complete_with_invalid_input_on_both_engines() {
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        let file = || FileBacking::open(&path, false).expect("open");
        let queues = [
            BackingQueue::new(Arc::new(file()), 8),
            BackingQueue::new(Arc::new(NoUring(file())), 8),
        ];
        for mut q in queues {
            let size = 1u64 << 20;
            q.submit(
                1,
                IoOp::Read {
                    off: size,
                    buf: AlignedBuf::new(512),
                },
            );
            q.submit(
                2,
                IoOp::Write {
                    off: 100,
                    buf: AlignedBuf::new(512),
                },
            );
            q.submit(
                3,
                IoOp::Write {
                    off: 0,
                    buf: AlignedBuf::new(100),
                },
            );
            q.submit(
                4,
                IoOp::Read {
                    off: u64::MAX - 511,
                    buf: AlignedBuf::new(1024),
                },
            );
            q.submit(
                5,
                IoOp::Read {
                    off: 0,
                    buf: AlignedBuf::new(0),
                },
            );
            let mut out = wait_for_all(&mut q);
            out.sort_by_key(|c| c.user_data);
            assert_eq!(out.len(), 5);
            for c in &out[..4] {
                let e = c.result.as_ref().expect_err("invalid");
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{:?}", q.engine());
            }
            out[4].result.as_ref().expect("empty read is fine");
        }
    }

    #[test]
    fn faulty_backing_errors_surface_as_err_completions() {
        let faulty = Arc::new(FaultyBacking::new(MemBacking::new(1 << 20), 5));
        faulty.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio).every_nth(2));
        faulty.add(FaultPlan::new(FaultOp::Flush, FaultKind::Enospc));
        faulty.add(FaultPlan::new(FaultOp::Read, FaultKind::Short));
        let mut q = BackingQueue::new(faulty.clone(), 4);
        assert_eq!(q.engine(), QueueEngine::ThreadPool);
        // Submit one at a time so "every 2nd" is well defined.
        let mut results = Vec::new();
        for i in 0..6u64 {
            q.submit(
                i,
                IoOp::Write {
                    off: i * 4096,
                    buf: AlignedBuf::new(4096),
                },
            );
            results.extend(wait_for_all(&mut q));
        }
        let failed: Vec<bool> = results.iter().map(|c| c.result.is_err()).collect();
        assert_eq!(failed, [false, true, false, true, false, true]);
        for c in results.iter().filter(|c| c.result.is_err()) {
            let e = c.result.as_ref().expect_err("err");
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
        }
        q.submit(10, IoOp::Flush);
        let flush = wait_for_all(&mut q);
        let e = flush[0].result.as_ref().expect_err("flush fails");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        q.submit(
            11,
            IoOp::Read {
                off: 0,
                buf: AlignedBuf::new(4096),
            },
        );
        let read = wait_for_all(&mut q);
        let e = read[0].result.as_ref().expect_err("short read");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(faulty.injected(), 5);
    }

    #[test]
    fn uring_errors_from_the_kernel_surface_as_err_completions() {
        // A read-only descriptor: the kernel fails writes with EBADF.
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        let b = Arc::new(FileBacking::open(&path, true).expect("open"));
        let mut q = BackingQueue::new(b, 8);
        q.submit(
            1,
            IoOp::Write {
                off: 0,
                buf: AlignedBuf::new(4096),
            },
        );
        let out = wait_for_all(&mut q);
        assert_eq!(out.len(), 1);
        assert!(out[0].result.is_err(), "{:?}", q.engine());
    }

    #[test]
    fn uring_read_of_a_truncated_file_is_an_error_not_a_short_success() {
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        for direct in [true, false] {
            let b = Arc::new(FileBacking::open_with(&path, false, direct).expect("open"));
            let mut q = BackingQueue::new(b, 8);
            // Shrink the file behind the store's back: reads past the new
            // end get a short transfer, then end of file.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(8192))
                .expect("truncate");
            q.submit(
                1,
                IoOp::Read {
                    off: 4096,
                    buf: AlignedBuf::new(16384),
                },
            );
            let out = wait_for_all(&mut q);
            let e = out[0].result.as_ref().expect_err("short read is an error");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(1 << 20))
                .expect("restore");
        }
    }

    /// poll(2) on the notifier with a timeout; true if readable.
    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    fn notifier_becomes_readable(mut q: BackingQueue) {
        let fd = q.notifier();
        assert!(fd >= 0);
        assert!(!readable(fd, 0), "idle queue is not readable");
        q.submit(
            7,
            IoOp::Write {
                off: 0,
                buf: AlignedBuf::new(4096),
            },
        );
        // Hand it to the engine (uring submits only in poll/wait).
        let mut out = Vec::new();
        q.poll(&mut out);
        if out.is_empty() {
            assert!(readable(fd, 5000), "{:?}: notifier never fired", q.engine());
            let deadline = Instant::now() + Duration::from_secs(5);
            while out.is_empty() && Instant::now() < deadline {
                q.poll(&mut out);
            }
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].user_data, 7);
        // poll reset it.
        assert!(
            !readable(fd, 0),
            "{:?}: notifier still readable",
            q.engine()
        );
        // Invalid requests also wake the worker.
        q.submit(
            8,
            IoOp::Write {
                off: 1,
                buf: AlignedBuf::new(512),
            },
        );
        assert!(readable(fd, 0));
        out.clear();
        q.poll(&mut out);
        assert_eq!(out.len(), 1);
        assert!(!readable(fd, 0));
    }

    #[test]
    fn notifier_becomes_readable_when_a_completion_is_ready_uring() {
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        let b = Arc::new(FileBacking::open(&path, false).expect("open"));
        let q = BackingQueue::new(b, 8);
        assert_eq!(q.engine(), expected_file_engine());
        notifier_becomes_readable(q);
    }

    #[test]
    fn notifier_becomes_readable_when_a_completion_is_ready_thread_pool() {
        // A delay makes sure the first poll finds nothing, so the test sees
        // the eventfd fire rather than a completion that was already there.
        let faulty = FaultyBacking::new(MemBacking::new(1 << 20), 1);
        faulty.add(FaultPlan::new(
            FaultOp::Write,
            FaultKind::Delay(Duration::from_millis(50)),
        ));
        let q = BackingQueue::new(Arc::new(faulty), 8);
        assert_eq!(q.engine(), QueueEngine::ThreadPool);
        notifier_becomes_readable(q);
    }

    #[test]
    fn uring_submit_alone_makes_the_notifier_readable() {
        // A worker that goes back to epoll right after submitting must be
        // woken to call poll, which is what hands the SQEs to the kernel.
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        let b = Arc::new(FileBacking::open(&path, false).expect("open"));
        let mut q = BackingQueue::new(b, 8);
        if q.engine() != QueueEngine::Uring {
            return; // the thread pool starts work at submit anyway
        }
        let fd = q.notifier();
        q.submit(1, IoOp::Flush);
        assert!(readable(fd, 0));
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.is_empty() && Instant::now() < deadline {
            if readable(fd, 1000) {
                q.poll(&mut out);
            }
        }
        assert_eq!(out.len(), 1);
        out[0].result.as_ref().expect("flush ok");
    }

    #[test]
    fn start_hands_a_read_to_the_kernel_before_any_poll() {
        // With the notifier drained after `start`, only the read finishing
        // in the kernel (or the pool) can make it readable again.
        let dir = disk_dir();
        let path = disk_file(dir.path(), 1 << 20);
        let want: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.write_all_at(&want, 8192))
            .expect("seed");
        let b = Arc::new(FileBacking::open(&path, false).expect("open"));
        let mut q = BackingQueue::new(b, 8);
        assert_eq!(q.engine(), expected_file_engine());
        let fd = q.notifier();
        q.submit(
            7,
            IoOp::Read {
                off: 8192,
                buf: AlignedBuf::new(4096),
            },
        );
        q.start();
        q.drain_notifier();
        assert!(readable(fd, 5000), "the read never completed");
        let mut out = Vec::new();
        q.poll(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].user_data, 7);
        out[0].result.as_ref().expect("read ok");
        match &out[0].op {
            IoOp::Read { buf, .. } => assert!(buf[..] == want[..]),
            _ => panic!("not a read"),
        }
    }

    /// Batches of random reads and writes to distinct sectors, against a
    /// model, mixing `poll` and `wait`; depth 1 forces internal queueing.
    fn mixed_workload_matches_a_model(q: &mut BackingQueue, size: u64, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut model = vec![0u8; size as usize];
        let blocks = size / 4096;
        let mut tag = 0u64;
        for _round in 0..20 {
            let mut offs: Vec<u64> = (0..blocks).collect();
            for i in (1..offs.len()).rev() {
                offs.swap(i, rng.gen_range(0..=i));
            }
            let mut expected: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
            for &block in offs.iter().take(40) {
                let off = block * 4096;
                let range = off as usize..off as usize + 4096;
                tag += 1;
                if rng.gen_bool(0.5) {
                    let mut buf = AlignedBuf::new(4096);
                    rng.fill(&mut buf[..]);
                    model[range].copy_from_slice(&buf);
                    expected.insert(tag, None);
                    q.submit(tag, IoOp::Write { off, buf });
                } else {
                    expected.insert(tag, Some(model[range].to_vec()));
                    let buf = AlignedBuf::new(4096);
                    q.submit(tag, IoOp::Read { off, buf });
                }
            }
            let mut out = Vec::new();
            while q.in_flight() > 0 {
                if rng.gen_bool(0.5) {
                    q.poll(&mut out);
                    std::thread::yield_now();
                } else {
                    q.wait(rng.gen_range(1..8), &mut out);
                }
            }
            assert_eq!(out.len(), 40);
            for c in out {
                c.result.as_ref().expect("ok");
                let want = expected.remove(&c.user_data).expect("known tag");
                match (c.op, want) {
                    (IoOp::Read { buf, .. }, Some(data)) => assert!(buf[..] == data[..]),
                    (IoOp::Write { .. }, None) => {}
                    (op, _) => panic!("unexpected {op:?}"),
                }
            }
        }
    }

    #[test]
    fn mixed_workload_matches_a_model_on_both_engines() {
        let dir = disk_dir();
        let size = 4u64 << 20;
        let path = disk_file(dir.path(), size);
        let file = || FileBacking::open(&path, false).expect("open");
        for depth in [1, 4] {
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(size))
                .expect("reset");
            let mut q = BackingQueue::new(Arc::new(file()), depth);
            assert_eq!(q.engine(), expected_file_engine());
            mixed_workload_matches_a_model(&mut q, size, u64::from(depth));
        }
        let mut q = BackingQueue::new(Arc::new(MemBacking::new(size)), 1);
        assert_eq!(q.engine(), QueueEngine::ThreadPool);
        mixed_workload_matches_a_model(&mut q, size, 99);
    }

    #[test]
    fn wait_returns_once_min_completions_are_in() {
        let faulty = FaultyBacking::new(MemBacking::new(1 << 20), 1);
        // The 2nd write is slow: wait(1) must not sit behind it.
        faulty.add(
            FaultPlan::new(FaultOp::Write, FaultKind::Delay(Duration::from_millis(500)))
                .skip_first(1)
                .max_count(1),
        );
        let mut q = BackingQueue::new(Arc::new(faulty), 8);
        q.submit(
            1,
            IoOp::Write {
                off: 0,
                buf: AlignedBuf::new(512),
            },
        );
        q.submit(
            2,
            IoOp::Write {
                off: 512,
                buf: AlignedBuf::new(512),
            },
        );
        let mut out = Vec::new();
        let started = Instant::now();
        q.wait(1, &mut out);
        assert!(!out.is_empty());
        assert!(started.elapsed() < Duration::from_millis(400));
        q.wait(usize::MAX, &mut out); // returns when nothing is in flight
        assert_eq!(out.len(), 2);
        assert_eq!(q.in_flight(), 0);
        q.wait(1, &mut out); // nothing in flight: returns at once
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn dropping_a_queue_with_ops_in_flight_is_safe_and_finishes_them() {
        let dir = disk_dir();
        let size = 16u64 << 20;
        let path = disk_file(dir.path(), size);
        let file = || FileBacking::open(&path, false).expect("open");
        let queues = [
            BackingQueue::new(Arc::new(file()), 8),
            BackingQueue::new(Arc::new(NoUring(file())), 8),
        ];
        for (round, mut q) in queues.into_iter().enumerate() {
            let byte = round as u8 + 1;
            for i in 0..64u64 {
                let buf = AlignedBuf::from_slice(&vec![byte; 65536]);
                q.submit(
                    i,
                    IoOp::Write {
                        off: i * 65536,
                        buf,
                    },
                );
                if i == 32 {
                    // Some in the kernel / threads, some still queued.
                    q.poll(&mut Vec::new());
                }
            }
            assert!(q.in_flight() > 0);
            drop(q);
            let contents = std::fs::read(&path).expect("read");
            assert!(
                contents[..64 * 65536].iter().all(|&x| x == byte),
                "round {round}: submitted writes finished before drop returned"
            );
        }
    }

    #[test]
    fn dropping_a_slow_thread_pool_queue_waits_for_the_running_op() {
        let faulty = Arc::new(FaultyBacking::new(MemBacking::new(1 << 20), 1));
        faulty.add(FaultPlan::new(
            FaultOp::Read,
            FaultKind::Delay(Duration::from_millis(100)),
        ));
        let mut q = BackingQueue::new(faulty.clone(), 4);
        for i in 0..8 {
            q.submit(
                i,
                IoOp::Read {
                    off: 0,
                    buf: AlignedBuf::new(4096),
                },
            );
        }
        drop(q);
        assert_eq!(faulty.inner().reads(), 8);
    }

    #[test]
    fn large_transfers_split_and_complete() {
        // Bigger than one bounce chunk and than a typical max I/O size.
        let dir = disk_dir();
        let size = 64u64 << 20;
        let path = disk_file(dir.path(), size);
        let b = Arc::new(FileBacking::open(&path, false).expect("open"));
        let mut q = BackingQueue::new(b, 4);
        let mut data = AlignedBuf::new(32 << 20);
        rand::rngs::StdRng::seed_from_u64(8).fill(&mut data[..]);
        let expect = data.clone();
        q.submit(
            1,
            IoOp::Write {
                off: 4096,
                buf: data,
            },
        );
        q.submit(2, IoOp::Flush);
        for c in wait_for_all(&mut q) {
            c.result.expect("ok");
        }
        q.submit(
            3,
            IoOp::Read {
                off: 4096,
                buf: AlignedBuf::new(32 << 20),
            },
        );
        let out = wait_for_all(&mut q);
        match &out[0].op {
            IoOp::Read { buf, .. } => assert!(buf[..] == expect[..]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn queue_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<BackingQueue>();
        assert_send::<Completion>();
    }
}
