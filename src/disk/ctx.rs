//! What a request's job may use while it runs on its queue: the disk's
//! shared state and the queue's own data head, backing queue, fills,
//! wake-up and persist mailbox.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::request::Status;
use super::shared::Shared;
use super::stream::Streams;
use super::syncer::{Mailbox, SyncOp};
use crate::backing::{AlignedBuf, BackingQueue, Home, IoOp};
use crate::engine::{DataHead, Engine, Error as EngineError, Miss, Placed};

/// A job's slot in its queue.
pub(super) type JobId = u32;

/// Bits of a backing operation's user_data that name the piece of its job.
const PIECE_BITS: u32 = 24;

/// The user_data of piece `piece` of job `job`.
pub(super) fn user_data(job: JobId, piece: u32) -> u64 {
    (u64::from(job) << PIECE_BITS) | u64::from(piece & ((1 << PIECE_BITS) - 1))
}

/// (job, piece) of a user_data.
pub(super) fn split_user_data(u: u64) -> (JobId, u32) {
    (
        (u >> PIECE_BITS) as JobId,
        (u & ((1 << PIECE_BITS) - 1)) as u32,
    )
}

/// Where a job stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Finished.
    Done(Status),
    /// Needs something from outside (memory, space, a range, time, a
    /// persist): step it again on the queue's next wake-up.
    Wait,
    /// Waits only for its own backing operations: step it again when one
    /// completes.
    InFlight,
}

/// One queue's resources, lent to its jobs.
pub(super) struct Ctx {
    pub shared: Arc<Shared>,
    pub head: DataHead,
    pub bq: BackingQueue,
    /// Data read for misses, to go into the cache once the guest has it.
    pub fills: VecDeque<(Miss, AlignedBuf)>,
    /// Signalled by whatever a waiting job waits for.
    pub wake: Arc<EventFd>,
    pub mailbox: Arc<Mailbox>,
    /// Fires for the first paced write.
    pub timer: TimerFd,
    timer_due: Option<Instant>,
    /// This queue's name (arena watches).
    pub key: u64,
    pub streams: Streams,
    /// The queue is being settled: nothing is paced any more.
    pub unpaced: bool,
    /// Takes back the cache bytes lent to backing writes.
    pins: Arc<dyn Home>,
}

/// Takes back cache bytes lent to a backing write (see
/// `engine/placed.rs`) when the write's buffer is dropped.
struct Pins(Arc<Engine>);

impl Home for Pins {
    fn release(&self, ptr: *mut u8) {
        self.0.unpin_placed(ptr);
    }
}

impl Ctx {
    pub fn new(shared: Arc<Shared>, bq: BackingQueue, wake: Arc<EventFd>, timer: TimerFd) -> Ctx {
        let key = shared.new_id();
        Ctx {
            pins: Arc::new(Pins(shared.engine.clone())),
            mailbox: Mailbox::new(wake.clone()),
            shared,
            head: DataHead::default(),
            bq,
            fills: VecDeque::new(),
            wake,
            timer,
            timer_due: None,
            key,
            streams: Streams::default(),
            unpaced: false,
        }
    }

    /// A request has queued its backing operations: hand them to the
    /// kernel now, not at the end of the batch. The device then works
    /// while the rest of the batch is parsed (4 KiB misses at QD32: a
    /// fifth more than submitting per batch, measured; batching every 8
    /// or 64 requests was slower for misses and for write-through).
    pub fn kick(&mut self) {
        self.bq.start();
    }

    /// A buffer over `p`'s bytes in the cache, for its backing write.
    #[allow(unsafe_code)]
    pub fn lend(&self, p: &Placed) -> AlignedBuf {
        let ptr = self.shared.engine.pin_placed(p);
        let ptr = std::ptr::NonNull::new(ptr).expect("a mapping is never at address 0");
        // SAFETY: the pin keeps the segment (so the bytes) from being
        // reused until `Pins::release`; the bytes are aligned (`place` was
        // asked for IO_ALIGN) and only read by the write they are lent to.
        unsafe { AlignedBuf::lent(ptr, p.len(), self.pins.clone()) }
    }

    /// Send piece `piece` of job `job` to the backing store.
    pub fn submit(&mut self, job: JobId, piece: u32, op: IoOp) {
        self.bq.submit(user_data(job, piece), op);
    }

    /// The name of job `job` for the budget's reservations (unique).
    pub fn job_key(&self, job: JobId) -> u64 {
        (self.key << 32) | u64::from(job)
    }

    /// Wake the queue when I/O memory comes back.
    pub fn wait_for_memory(&self) {
        self.shared
            .budget
            .guest()
            .watch(self.key, self.wake.as_raw_fd());
    }

    /// Wake the queue at `t` (a paced write).
    pub fn wake_at(&mut self, t: Instant) {
        if self.timer_due.is_some_and(|d| d <= t && d > Instant::now()) {
            return;
        }
        // A zero duration would disarm the timer.
        let d = t
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        match self.timer.reset(d, None) {
            Ok(()) => self.timer_due = Some(t),
            Err(e) => tracing::error!(error = %e, "cannot arm a queue's pacing timer"),
        }
    }

    /// The pacing timer fired.
    pub fn timer_fired(&mut self) {
        self.timer_due = None;
    }

    /// Ask the persisting thread for `op`, answered to this queue's
    /// mailbox under `ticket`.
    pub fn ask_sync(&self, op: SyncOp, ticket: u64) {
        if let Some(s) = &self.shared.syncer {
            s.ask(op, ticket, &self.mailbox);
        }
    }
}

/// Run `attempt`, which may find no room (a full cache or key log: an
/// error with [`EngineError::retry_from`]; it records its own progress),
/// without trying again until room was freed.
///
/// `waiting` remembers the space epoch it last found no room at: while the
/// epoch has not moved, None (wait) without trying. The first time it finds
/// no room it reads the epoch and tries once more at once, so room freed
/// just before is not missed either. Some(result) otherwise; an error that
/// asks for a retry means: wait for the next space signal.
pub(super) fn with_room<T>(
    waiting: &mut Option<u64>,
    e: &Engine,
    mut attempt: impl FnMut() -> Result<T, EngineError>,
) -> Option<Result<T, EngineError>> {
    let mut epoch = match *waiting {
        Some(w) => {
            let now = e.space_epoch();
            if now == w {
                return None;
            }
            Some(now)
        }
        None => None,
    };
    loop {
        match attempt() {
            Err(err) if err.retry_from().is_some() => match epoch {
                None => epoch = Some(e.space_epoch()),
                Some(ep) => {
                    *waiting = Some(ep);
                    return Some(Err(err));
                }
            },
            r => {
                *waiting = None;
                return Some(r);
            }
        }
    }
}
