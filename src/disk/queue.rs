//! [`DiskQueue`]: one queue's requests, from submission to answer.
//!
//! Each virtqueue's worker owns one. A request either completes inside
//! [`DiskQueue::submit`] (the common case: a read the cache holds, a write
//! into the cache) or becomes a job that waits for the backing store, for
//! I/O memory, for space in the cache, for its range, for its time (pacing)
//! or for a persist; [`DiskQueue::fd`] becomes readable when any of those
//! may have moved, and [`DiskQueue::process`] then hands back what
//! finished. No call blocks on I/O.
//!
//! Writes, zeroings and flushes that have not started keep their order: a
//! later one waits behind an earlier one that waits (so a flush never
//! overtakes a write the guest queued before it). Once started, jobs run
//! independently. Reads never wait behind writes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::ctx::{split_user_data, Ctx, JobId, Step};
use super::flush::FlushJob;
use super::read::{ReadJob, Started};
use super::request::{Done, Op, Request, Status};
use super::shared::Shared;
use super::syncer::Synced;
use super::write::WriteJob;
use crate::backing::{BackingQueue, Completion};

/// Largest request accepted (the virtio-blk layer advertises less).
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;
/// Backing operations a queue keeps in the kernel at once.
const BACKING_DEPTH: u32 = 128;

/// A request that did not complete at once. Jobs live in a slab: boxing
/// the large variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Job {
    Read(ReadJob),
    Write(WriteJob),
    Flush(FlushJob),
}

impl Job {
    fn tag(&self) -> u64 {
        match self {
            Job::Read(j) => j.tag,
            Job::Write(j) => j.tag,
            Job::Flush(j) => j.tag,
        }
    }

    fn step(&mut self, cx: &mut Ctx, id: JobId) -> Step {
        match self {
            Job::Read(j) => j.step(cx, id),
            Job::Write(j) => j.step(cx, id),
            Job::Flush(j) => j.step(cx, id),
        }
    }

    fn started(&self) -> bool {
        match self {
            Job::Read(_) => true,
            Job::Write(j) => j.started(),
            Job::Flush(j) => j.started(),
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            Job::Read(j) => j.in_flight(),
            Job::Write(j) => j.in_flight(),
            Job::Flush(j) => j.in_flight(),
        }
    }

    fn on_io(&mut self, cx: &mut Ctx, piece: u32, c: Completion) {
        match self {
            Job::Read(j) => j.on_io(cx, piece, c),
            Job::Write(j) => j.on_io(cx, piece, c),
            Job::Flush(j) => j.on_io(cx, c),
        }
    }

    fn on_sync(&mut self, s: Synced) {
        match self {
            Job::Read(_) => {}
            Job::Write(j) => j.on_sync(s),
            Job::Flush(j) => j.on_sync(s),
        }
    }

    fn release(&mut self, cx: &mut Ctx, id: JobId) {
        match self {
            Job::Read(j) => j.release(cx, id),
            Job::Write(j) => j.release(cx, id),
            Job::Flush(_) => {}
        }
    }

    fn is_read(&self) -> bool {
        matches!(self, Job::Read(_))
    }
}

/// The requests of one queue; see the module documentation.
pub struct DiskQueue {
    cx: Ctx,
    jobs: Vec<Option<Job>>,
    free: Vec<JobId>,
    /// Writes, zeroings and flushes not started yet, in order.
    queued: VecDeque<JobId>,
    /// Started jobs waiting for something outside themselves.
    stalled: VecDeque<JobId>,
    /// Jobs to step once their own completions are in.
    touched: Vec<JobId>,
    completions: Vec<Completion>,
    synced: Vec<(u64, Synced)>,
    epoll: Epoll,
    answers: Vec<Done>,
}

impl DiskQueue {
    pub(super) fn new(shared: Arc<Shared>) -> io::Result<DiskQueue> {
        let bq = BackingQueue::new(shared.backing.clone(), BACKING_DEPTH);
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let timer = TimerFd::new()?;
        crate::util::set_nonblocking(timer.as_raw_fd())?;
        let epoll = Epoll::new()?;
        for fd in [bq.notifier(), wake.as_raw_fd(), timer.as_raw_fd()] {
            if fd >= 0 {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )?;
            }
        }
        shared.engine.add_space_fd(wake.as_raw_fd());
        Ok(DiskQueue {
            cx: Ctx::new(shared, bq, wake, timer),
            jobs: Vec::new(),
            free: Vec::new(),
            queued: VecDeque::new(),
            stalled: VecDeque::new(),
            touched: Vec::new(),
            completions: Vec::new(),
            synced: Vec::new(),
            epoll,
            answers: Vec::new(),
        })
    }

    /// An fd that becomes readable when [`DiskQueue::process`] has
    /// something to do (for the worker's epoll loop).
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Start `req`. Some(status) when it is answered already; otherwise its
    /// answer comes from [`DiskQueue::process`].
    pub fn submit(&mut self, req: Request) -> Option<Status> {
        #[cfg(feature = "test-doubles")]
        panic_when_asked();
        let Request {
            op,
            off,
            len,
            buf,
            tag,
        } = req;
        let e = &self.cx.shared.engine;
        let data = matches!(op, Op::Read | Op::Write);
        if len > MAX_REQUEST_BYTES
            || (data && buf.len() as u64 != len)
            || off.checked_add(len).is_none_or(|end| end > e.size())
        {
            tracing::warn!(
                off,
                len,
                op = op.name(),
                "request outside the disk or malformed"
            );
            return Some(Status::IoErr);
        }
        if op != Op::Read && op != Op::Flush && self.cx.shared.cfg.read_only {
            return Some(Status::IoErr);
        }
        let id = self.next_id();
        let job = match op {
            Op::Read => match ReadJob::start(&mut self.cx, off, buf, tag) {
                Started::Done(s) => return Some(s),
                Started::Misses(j) => Job::Read(j),
            },
            Op::Write | Op::Zeroes { .. } if len == 0 => return Some(Status::Ok),
            Op::Write => Job::Write(WriteJob::new(&mut self.cx, None, off, len, buf, tag)),
            Op::Zeroes { unmap } => {
                Job::Write(WriteJob::new(&mut self.cx, Some(unmap), off, len, buf, tag))
            }
            Op::Flush => Job::Flush(FlushJob::new(tag)),
        };
        self.start(id, job)
    }

    /// The slot the next job takes.
    fn next_id(&self) -> JobId {
        self.free
            .last()
            .copied()
            .unwrap_or(self.jobs.len() as JobId)
    }

    fn start(&mut self, id: JobId, mut job: Job) -> Option<Status> {
        if !job.is_read() && !self.queued.is_empty() {
            self.insert(id, job);
            self.queued.push_back(id);
            return None;
        }
        let step = job.step(&mut self.cx, id);
        if let Step::Done(s) = step {
            job.release(&mut self.cx, id);
            return Some(s);
        }
        let started = job.started();
        self.insert(id, job);
        if !started {
            self.queued.push_back(id);
        } else if step == Step::Wait {
            self.stalled.push_back(id);
        }
        None
    }

    fn insert(&mut self, id: JobId, job: Job) {
        let taken = self.free.pop();
        debug_assert_eq!(taken.unwrap_or(id), id);
        if id as usize == self.jobs.len() {
            self.jobs.push(Some(job));
        } else {
            self.jobs[id as usize] = Some(job);
        }
    }

    /// Answer job `id` with `status`.
    fn finish(&mut self, id: JobId, status: Status) {
        if let Some(mut job) = self.jobs.get_mut(id as usize).and_then(Option::take) {
            job.release(&mut self.cx, id);
            self.answers.push(Done {
                tag: job.tag(),
                status,
            });
            self.free.push(id);
        }
    }

    /// Step job `id`; true if it is still waiting for something outside.
    fn step_job(&mut self, id: JobId) -> bool {
        let Some(job) = self.jobs.get_mut(id as usize).and_then(Option::as_mut) else {
            return false;
        };
        match job.step(&mut self.cx, id) {
            Step::Done(s) => {
                self.finish(id, s);
                false
            }
            Step::Wait => true,
            Step::InFlight => false,
        }
    }

    /// Handle whatever happened (backing completions, persists, freed
    /// space or memory, a paced write's time) and append the requests that
    /// finished to `out`.
    pub fn process(&mut self, out: &mut Vec<Done>) {
        let (woken, io) = self.ready();
        if io {
            self.take_completions();
        }
        self.cx.mailbox.take(&mut self.synced);
        for (ticket, s) in std::mem::take(&mut self.synced) {
            let id = ticket as JobId;
            if let Some(job) = self.jobs.get_mut(id as usize).and_then(Option::as_mut) {
                job.on_sync(s);
                self.touched.push(id);
            }
        }
        self.step_touched();
        if woken {
            self.retry_waiting();
        }
        out.append(&mut self.answers);
    }

    /// Only the backing completions already in (after a batch of
    /// submissions: misses already back complete with it); appends the
    /// requests that finished to `out`.
    pub fn reap(&mut self, out: &mut Vec<Done>) {
        self.take_completions();
        self.step_touched();
        out.append(&mut self.answers);
    }

    fn take_completions(&mut self) {
        self.cx.bq.poll(&mut self.completions);
        let mut done = std::mem::take(&mut self.completions);
        for c in done.drain(..) {
            let (id, piece) = split_user_data(c.user_data);
            if let Some(job) = self.jobs.get_mut(id as usize).and_then(Option::as_mut) {
                job.on_io(&mut self.cx, piece, c);
                self.touched.push(id);
            }
        }
        self.completions = done;
    }

    /// Step the jobs whose own completions or persists came in.
    fn step_touched(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &id in &touched {
            if self.step_job(id) && !self.stalled.contains(&id) && !self.queued.contains(&id) {
                self.stalled.push_back(id);
            }
        }
        touched.clear();
        self.touched = touched;
    }

    /// Which sources are ready (one epoll_wait, no blind reads): (woken by
    /// the wake-up or the timer, backing completions in). The wake-up and
    /// the timer are reset.
    fn ready(&mut self) -> (bool, bool) {
        let mut ev = [EpollEvent::default(); 4];
        let n = self.epoll.wait(0, &mut ev).unwrap_or(0);
        let (wake, timer) = (self.cx.wake.as_raw_fd(), self.cx.timer.as_raw_fd());
        let (mut woken, mut io) = (false, false);
        for e in &ev[..n] {
            let fd = e.data() as RawFd;
            if fd == wake {
                woken |= self.cx.wake.read().is_ok();
            } else if fd == timer {
                let mut n = 0u64;
                // SAFETY: reads 8 bytes into a live local from a
                // non-blocking timerfd we own; EAGAIN (re-armed) is fine.
                #[allow(unsafe_code)]
                let fired = unsafe {
                    libc::read(
                        timer,
                        (&mut n as *mut u64).cast(),
                        std::mem::size_of::<u64>(),
                    )
                } == 8;
                if fired {
                    self.cx.timer_fired();
                    woken = true;
                }
            } else {
                io = true;
            }
        }
        (woken, io)
    }

    /// Step every job that waits for something outside, then the queued
    /// ones in order, as far as they go.
    fn retry_waiting(&mut self) {
        for _ in 0..self.stalled.len() {
            let Some(id) = self.stalled.pop_front() else {
                break;
            };
            if self.step_job(id) {
                self.stalled.push_back(id);
            }
        }
        while let Some(&id) = self.queued.front() {
            let still = self.step_job(id);
            let started = self
                .jobs
                .get(id as usize)
                .and_then(Option::as_ref)
                .is_none_or(Job::started);
            if !started {
                break;
            }
            self.queued.pop_front();
            if still {
                self.stalled.push_back(id);
            }
        }
    }

    /// Is there work to do that no request waits for (fills)?
    pub fn has_background_work(&self) -> bool {
        !self.cx.fills.is_empty()
    }

    /// Do one piece of background work: put one read's data into the
    /// cache.
    pub fn background_step(&mut self) {
        if let Some((m, buf)) = self.cx.fills.pop_front() {
            self.cx.shared.engine.fill(&mut self.cx.head, &m, &buf);
        }
    }

    /// Requests taken and not answered.
    pub fn pending(&self) -> usize {
        self.jobs.len() - self.free.len()
    }

    /// Backing operations in flight (a worker with some sleeps rather than
    /// spins: their completions wake it, and the kernel needs the CPU).
    pub fn backing_in_flight(&self) -> usize {
        self.cx.bq.in_flight()
    }

    /// (reads waiting for the backing store or memory, writes and flushes
    /// waiting), for status.
    pub fn waiting(&self) -> (u64, u64) {
        let reads = self.jobs.iter().flatten().filter(|j| j.is_read()).count() as u64;
        (reads, self.pending() as u64 - reads)
    }

    /// Finish what was taken, until `deadline`: backing operations always
    /// run to completion; jobs waiting for space or memory get until the
    /// deadline, and nothing is paced any more. Answers go to `out`;
    /// returns how many requests are left.
    pub fn settle(&mut self, deadline: Instant, out: &mut Vec<Done>) -> usize {
        self.cx.unpaced = true;
        let _ = self.cx.wake.write(1);
        loop {
            self.process(out);
            while self.has_background_work() {
                self.background_step();
            }
            let in_flight = self.jobs.iter().flatten().any(|j| j.in_flight() > 0);
            if self.pending() == 0 || (!in_flight && Instant::now() >= deadline) {
                return self.pending();
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(50));
            let mut ev = [EpollEvent::default(); 4];
            let _ = self.epoll.wait(wait.as_millis() as i32, &mut ev);
            // Waiting for space: make sure GC and writeback know.
            let _ = self.cx.wake.write(1);
        }
    }

    /// Fail every request that has nothing in flight on the backing store
    /// (the rest must still come back: see [`DiskQueue::settle`]).
    pub fn abort(&mut self, out: &mut Vec<Done>) {
        let ids: Vec<JobId> = (0..self.jobs.len() as JobId)
            .filter(|&id| {
                self.jobs[id as usize]
                    .as_ref()
                    .is_some_and(|j| j.in_flight() == 0)
            })
            .collect();
        for id in ids {
            self.finish(id, Status::IoErr);
        }
        self.queued.retain(|&id| self.jobs[id as usize].is_some());
        self.stalled.retain(|&id| self.jobs[id as usize].is_some());
        out.append(&mut self.answers);
    }
}

/// Test builds only: `PCACHE_TEST_PANIC_AT=N` makes the Nth request of
/// the process panic its queue worker, to show that a panic ends pcache;
/// `PCACHE_TEST_FORBIDDEN_AT=N` makes it call what the sandbox forbids.
#[cfg(feature = "test-doubles")]
fn panic_when_asked() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static AT: OnceLock<(Option<u64>, Option<u64>)> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let n = |v: &str| std::env::var(v).ok().and_then(|v| v.parse().ok());
        (n("PCACHE_TEST_PANIC_AT"), n("PCACHE_TEST_FORBIDDEN_AT"))
    });
    if *at == (None, None) {
        return;
    }
    let seen = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
    if at.0 == Some(seen) {
        panic!("PCACHE_TEST_PANIC_AT={seen}: a test asked for this panic");
    }
    if at.1 == Some(seen) {
        crate::sandbox::forbidden_call();
    }
}

impl Drop for DiskQueue {
    fn drop(&mut self) {
        for id in 0..self.jobs.len() as JobId {
            if let Some(mut job) = self.jobs[id as usize].take() {
                job.release(&mut self.cx, id);
            }
        }
        let sh = self.cx.shared.clone();
        let wake = self.cx.wake.as_raw_fd();
        sh.engine.remove_space_fd(wake);
        sh.locks.forget(wake);
        sh.budget.guest().forget(self.cx.key);
        sh.engine.head_release(&mut self.cx.head);
    }
}
