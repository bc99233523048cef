//! One queue's pipeline: taking requests from the ring, running them
//! against the engine, deferring writes while the cache is full, and
//! stopping the queue.
//!
//! Each queue has its own state behind its own mutex (locked by its worker
//! thread, and by the message handler when it starts or stops the ring): a
//! data head, a backing queue (io_uring) for read misses, the requests
//! waiting on it (`read.rs`), and the writes deferred because the cache was
//! full. No lock is shared by all queues on the data path.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use vhost_user_backend::VringT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{complete, Chain, Done, SimpleLayout};
use super::counters::Track;
use super::device::Device;
use super::poll::PollWindow;
use super::read::{hits_to_keep, queue_misses, PendingRead, MAX_MISSES};
use super::request::{
    needs_range, parse, status, RequestKind, HEADER_BYTES, ID_BYTES, RANGE_BYTES,
};
use super::ring::Ring;
use super::stream::Streams;
use crate::backing::{AlignedBuf, Backing, BackingQueue, BufPool, Completion};
use crate::engine::{DataHead, Error as EngineError, Miss};

/// How long stopping a ring waits for deferred writes to find space.
const STOP_DEFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle backing-read buffers a queue keeps for reuse.
const MISS_BUFS_HELD: usize = 4 << 20;

/// A write or flush waiting for free space, or a write paced while a
/// writeback batch runs.
pub(super) struct Deferred {
    pub(super) chain: Chain,
    pub(super) kind: RequestKind,
    pub(super) data: Vec<u8>,
    pub(super) done: u64,
    /// A paced write runs no earlier than this.
    pub(super) not_before: Option<Instant>,
    /// The write is part of a long sequential stream (`stream.rs`).
    pub(super) sequential: bool,
}

/// Per-queue state, owned by that queue's worker thread.
pub struct QueueState {
    pub(super) head: DataHead,
    pub(super) bq: BackingQueue,
    /// The started ring; None while the ring is stopped.
    pub(super) ring: Option<Ring>,
    /// Requests a previous backend took and did not return, to run before
    /// any new one.
    pub(super) resubmit: VecDeque<Chain>,
    pub(super) reads: HashMap<u64, PendingRead>,
    pub(super) deferred: VecDeque<Deferred>,
    pub(super) next_id: u64,
    pub(super) completions: Vec<Completion>,
    /// The requests in flight, for the queue's counters.
    pub(super) track: Track,
    /// Data buffer reused by requests that complete at once (most of
    /// them), so they neither allocate nor zero a buffer.
    pub(super) scratch: Vec<u8>,
    /// Aligned buffers for backing reads, reused.
    pub(super) bufs: BufPool,
    /// Backing data read for completed misses, to go into the cache once
    /// the guest has been told (`run_fills`).
    pub(super) fills: Vec<(Miss, AlignedBuf)>,
    /// How long to busy-poll after the ring runs dry.
    pub(super) poll: PollWindow,
    /// Fires when the first paced write is due (non-blocking).
    pub(super) timer: TimerFd,
    /// Sequential streams seen on this queue.
    pub(super) streams: Streams,
}

impl QueueState {
    /// An idle queue whose misses go to `backing`, counting its requests
    /// through `track`.
    pub fn new(backing: Arc<dyn Backing>, track: Track) -> io::Result<QueueState> {
        let timer = TimerFd::new()?;
        // Read only when epoll says it fired; a timer re-armed since must
        // not block the worker.
        // SAFETY: plain fcntl calls on a descriptor we own.
        unsafe {
            let fd = timer.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(QueueState {
            head: DataHead::default(),
            bq: BackingQueue::new(backing, 128),
            ring: None,
            resubmit: VecDeque::new(),
            reads: HashMap::new(),
            deferred: VecDeque::new(),
            next_id: 1,
            completions: Vec::new(),
            track,
            scratch: Vec::new(),
            bufs: BufPool::new(MISS_BUFS_HELD),
            fills: Vec::new(),
            poll: PollWindow::default(),
            timer,
            streams: Streams::default(),
        })
    }

    /// Wake the worker at `t` (for the first paced write).
    fn wake_at(&mut self, t: Instant) {
        // A zero duration would disarm the timer.
        let d = t
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        if let Err(e) = self.timer.reset(d, None) {
            tracing::error!(error = %e, "cannot arm a queue's pacing timer");
        }
    }

    /// Requests taken and not yet returned (reads in flight, deferred
    /// writes, and requests waiting to run again).
    pub fn unfinished(&self) -> usize {
        self.reads.len() + self.deferred.len() + self.resubmit.len()
    }
}

impl Device {
    /// Process everything available on `ring`, following the EVENT_IDX
    /// protocol: with notifications disabled, drain the ring; re-enable
    /// them; if the driver added requests in between (enable returns true),
    /// drain again. One pass is not enough: a request added after the last
    /// pop but before re-enabling would otherwise wait for the next kick.
    pub(super) fn process_vring(&self, qs: &mut QueueState, ring: &Ring) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        qs.poll.woke(
            Instant::now(),
            Duration::from_micros(self.cfg.poll_us as u64),
        );
        // A ring being stopped takes nothing more: its pending requests stay.
        while ring.is_ready() {
            if event_idx {
                ring.vring
                    .disable_notification()
                    .map_err(io::Error::other)?;
            }
            self.drain_avail(qs, ring)?;
            if self.is_stopping() {
                // Nothing more is taken: what the driver adds now is left
                // in the ring for the next process.
                break;
            }
            if self.poll_for_more(qs, ring) {
                continue;
            }
            if !event_idx || !ring.vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Busy-poll the avail ring for the queue's adaptive window (with
    /// notifications still off under EVENT_IDX); true as soon as a request
    /// shows up. The window restarts with every batch found, and adapts to
    /// how soon requests follow (`poll.rs`): a busy guest is polled, an
    /// idle queue soon spins no more.
    fn poll_for_more(&self, qs: &mut QueueState, ring: &Ring) -> bool {
        let start = Instant::now();
        // With backing reads in flight, sleep instead: their completions
        // wake the worker, and the kernel needs the CPU to complete them
        // (spinning cost 5-10 % of all-miss IOPS when measured).
        let window = qs.poll.window();
        if window.is_zero() || qs.bq.in_flight() > 0 || self.is_stopping() {
            qs.poll.went_idle(start);
            return false;
        }
        let deadline = start + window;
        let mem = self.mem.memory();
        loop {
            if ring.avail_pending(&mem) {
                return true;
            }
            if Instant::now() >= deadline {
                qs.poll.went_idle(start);
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Is the process stopping (no new request is taken)?
    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn drain_avail(&self, qs: &mut QueueState, ring: &Ring) -> io::Result<()> {
        let mem = self.mem.memory();
        let mut pending = 0;
        let mut taken = Instant::now();
        // What a previous backend left taken runs first, in its order.
        while let Some(chain) = qs.resubmit.pop_front() {
            if self.run_chain_at(qs, ring, chain, &mut taken) {
                ring.signal_every_batch(&mut pending)?;
            }
        }
        while !self.is_stopping() {
            let Some(chain) = ring.pop(&mem) else {
                break;
            };
            if self.run_chain_at(qs, ring, chain, &mut taken) {
                ring.signal_every_batch(&mut pending)?;
            }
        }
        if self.end_batch(qs, ring) || pending > 0 {
            ring.notify()?;
        }
        Ok(())
    }

    /// Start one taken chain; put it in the used ring if it completed.
    /// Returns whether it did.
    pub(super) fn run_chain(&self, qs: &mut QueueState, ring: &Ring, chain: Chain) -> bool {
        self.run_chain_at(qs, ring, chain, &mut Instant::now())
    }

    /// `run_chain` for a chain taken at `*taken`, which then becomes when
    /// the chain was answered or began to wait: in a batch, the next chain
    /// is taken as the one before it is done with, so counting a request's
    /// latency costs one clock read.
    fn run_chain_at(
        &self,
        qs: &mut QueueState,
        ring: &Ring,
        chain: Chain,
        taken: &mut Instant,
    ) -> bool {
        qs.track.begin(chain.head_index(), *taken);
        match self.start(qs, chain) {
            Some(done) => {
                *taken = qs.track.done(&done);
                ring.put_used(done.head, done.len)
            }
            None => {
                *taken = Instant::now();
                false
            }
        }
    }

    /// After a batch of `run_chain`: complete any reads already back.
    /// Returns whether any request completed.
    pub(super) fn end_batch(&self, qs: &mut QueueState, ring: &Ring) -> bool {
        // Most batches are all hits: with nothing in flight there is nothing
        // to submit or reap, so skip the syscalls. A notifier left readable
        // by an earlier completion brings the worker to `on_completions`.
        if qs.bq.in_flight() == 0 {
            return false;
        }
        qs.bq.poll(&mut qs.completions);
        !qs.completions.is_empty() && self.finish_reads(qs, ring)
    }

    /// Start one request. Returns how it was answered when it completed at
    /// once; None when it waits for the backing store or for space.
    fn start(&self, qs: &mut QueueState, chain: Chain) -> Option<Done> {
        let chain = match self.start_simple(qs, chain) {
            Ok(done) => return done,
            Err(chain) => chain,
        };
        let head = chain.head_index();
        let mem = chain.memory();
        let (mut r, mut w) = match (chain.clone().reader(mem), chain.clone().writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                // Buffers outside guest memory: nothing can be written back,
                // not even a status. Return the chain so the ring moves on.
                tracing::warn!(head, "request with descriptors outside guest memory");
                return Some(Done::unanswered(head));
            }
        };
        if w.available_bytes() == 0 {
            tracing::warn!(head, "request without a status byte");
            return Some(Done::unanswered(head));
        }
        let data_w = w.available_bytes() - 1;
        let Ok(mut st) = w.split_at(data_w) else {
            return Some(Done::unanswered(head));
        };
        let mut hdr = [0u8; HEADER_BYTES];
        let header =
            (r.available_bytes() >= HEADER_BYTES && r.read_exact(&mut hdr).is_ok()).then_some(hdr);
        let readable = r.available_bytes();
        let mut range = [0u8; RANGE_BYTES];
        let range = (header.is_some_and(|h| needs_range(&h))
            && readable >= RANGE_BYTES
            && r.read_exact(&mut range).is_ok())
        .then_some(range);
        qs.track.header(head, header.as_ref());
        let kind = match parse(
            header,
            range,
            readable,
            data_w,
            self.capacity(),
            self.cfg.read_only,
        ) {
            Ok(k) => k,
            Err(why) => {
                tracing::debug!(head, ?why, "rejected request");
                let _ = st.write_all(&[why.status()]);
                return Some(Done::new(head, 1, why.status()));
            }
        };
        qs.track.parsed(head, &kind);
        match kind {
            RequestKind::Read { off, len } => {
                // Through a buffer of our own: the usual layout, read
                // straight into guest memory, took `start_simple`.
                let mut misses = Vec::new();
                let mut buf = std::mem::take(&mut qs.scratch);
                // Every byte is overwritten (hits now, misses on completion).
                buf.resize(len as usize, 0);
                let fill = !qs.streams.read.note(off, len, self.cfg.sequential_cutoff);
                if let Err(e) = self.engine.read(off, &mut buf, &mut misses) {
                    tracing::warn!(off, len, error = %e, "read failed");
                    let _ = st.write_all(&[status::IOERR]);
                    return Some(Done::new(head, 1, status::IOERR));
                }
                if misses.is_empty() {
                    let s = if w.write_all(&buf).is_ok() {
                        status::OK
                    } else {
                        status::IOERR
                    };
                    let _ = st.write_all(&[s]);
                    keep_scratch(qs, buf);
                    return Some(Done::new(head, len as u32 + 1, s));
                }
                if misses.len() > MAX_MISSES {
                    tracing::warn!(off, len, n = misses.len(), "read with too many misses");
                    let _ = st.write_all(&[status::IOERR]);
                    return Some(Done::new(head, 1, status::IOERR));
                }
                queue_misses(qs, chain, buf, misses, fill);
                None
            }
            RequestKind::Write { off, len } => {
                // Copied out first: the usual layout, written straight from
                // guest memory, took `start_simple`.
                let mut data = std::mem::take(&mut qs.scratch);
                data.resize(len as usize, 0);
                if r.read_exact(&mut data).is_err() {
                    let _ = st.write_all(&[status::IOERR]);
                    return Some(Done::new(head, 1, status::IOERR));
                }
                let seq = qs.streams.write.note(off, len, self.cfg.sequential_cutoff);
                let wait = self.engine.pace(len);
                let not_before = (!wait.is_zero()).then(|| Instant::now() + wait);
                self.run_or_defer(qs, chain, kind, data, not_before, seq)
            }
            RequestKind::Flush | RequestKind::Zeroes { .. } => {
                self.run_or_defer(qs, chain, kind, Vec::new(), None, false)
            }
            RequestKind::GetId => {
                let mut id = [0u8; ID_BYTES];
                let s = self.cfg.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let n = data_w.min(ID_BYTES);
                let ok = w.write_all(&id[..n]).is_ok();
                let s = if ok { status::OK } else { status::IOERR };
                let _ = st.write_all(&[s]);
                Some(Done::new(head, n as u32 + 1, s))
            }
        }
    }

    /// Start a request laid out as Linux and libblkio lay them out: a
    /// 16-byte header descriptor (a write's data may follow in it), at most
    /// one data descriptor, and a 1-byte status descriptor. One walk of the
    /// chain, no Reader or Writer (their allocations and repeated walks were
    /// a tenth of the server's time on 4 KiB hits). Err(chain), with nothing
    /// done, for any other layout, an ID request or memory it cannot map:
    /// `start` then takes the general path.
    #[allow(clippy::result_large_err)] // the chain goes back by value, once
    fn start_simple(&self, qs: &mut QueueState, chain: Chain) -> Result<Option<Done>, Chain> {
        let Some(SimpleLayout {
            hdr,
            data,
            status: st,
        }) = SimpleLayout::of(&chain)
        else {
            return Err(chain);
        };
        let head = chain.head_index();
        let mem = chain.memory();
        // Map header, data and status once; together they are exactly the
        // descriptors' bytes. As on the general path, any of them outside
        // guest memory means no status at all, before the header is read
        // (a range spanning two regions also lands there).
        let map = |a: u64, l: usize| mem.get_slice(GuestAddress(a), l).ok();
        let Some(hdr) = map(hdr, HEADER_BYTES) else {
            return Err(chain);
        };
        let data = match data {
            Some((a, l, w)) => match map(a, l) {
                Some(vs) => Some((vs.ptr_guard_mut().as_ptr(), l, w)),
                None => return Err(chain),
            },
            None => None,
        };
        let Some(st) = map(st, 1) else {
            return Err(chain);
        };
        let Ok(header) = hdr.read_obj::<[u8; HEADER_BYTES]>(0) else {
            return Err(chain);
        };
        if needs_range(&header) {
            return Err(chain); // rare: the general path reads the range
        }
        let set = |s: u8| {
            let _ = st.write_obj(s, 0);
        };
        let (readable, writable) = match data {
            Some((_, l, false)) => (l, 0),
            Some((_, l, true)) => (0, l),
            None => (0, 0),
        };
        qs.track.header(head, Some(&header));
        let kind = match parse(
            Some(header),
            None,
            readable,
            writable,
            self.capacity(),
            self.cfg.read_only,
        ) {
            Ok(RequestKind::GetId) => return Err(chain),
            Ok(k) => k,
            Err(why) => {
                tracing::debug!(head, ?why, "rejected request");
                set(why.status());
                return Ok(Some(Done::new(head, 1, why.status())));
            }
        };
        qs.track.parsed(head, &kind);
        // The data, if it points the way the request moves data (a read's
        // must be device-writable, a write's device-readable) and so is
        // the length parse took. A read whose only data is readable, say,
        // goes to the general path, which leaves those bytes alone.
        let data_slice = |len: u64, writable: bool| match data {
            Some((p, l, w)) if w == writable && l as u64 == len => Some((p, l)),
            _ => None,
        };
        match kind {
            RequestKind::Read { off, len } => {
                let Some((p, l)) = data_slice(len, true) else {
                    return Err(chain);
                };
                // SAFETY: `get_slice` checked that the bytes lie in one mapped
                // guest memory region, which the chain's guard on the memory
                // table keeps mapped; the guest may write them concurrently,
                // as with any device DMA; we only store into them.
                let direct = unsafe { std::slice::from_raw_parts_mut(p, l) };
                let mut misses = Vec::new();
                let fill = !qs.streams.read.note(off, len, self.cfg.sequential_cutoff);
                if let Err(e) = self.engine.read(off, direct, &mut misses) {
                    tracing::warn!(off, len, error = %e, "read failed");
                    set(status::IOERR);
                    return Ok(Some(Done::new(head, 1, status::IOERR)));
                }
                if misses.is_empty() {
                    set(status::OK);
                    return Ok(Some(Done::new(head, len as u32 + 1, status::OK)));
                }
                if misses.len() > MAX_MISSES {
                    tracing::warn!(off, len, n = misses.len(), "read with too many misses");
                    set(status::IOERR);
                    return Ok(Some(Done::new(head, 1, status::IOERR)));
                }
                let buf = hits_to_keep(direct, &misses);
                queue_misses(qs, chain, buf, misses, fill);
                Ok(None)
            }
            RequestKind::Write { off, len } => {
                let Some((p, l)) = data_slice(len, false) else {
                    return Err(chain);
                };
                // SAFETY: as for a read; we only load from these bytes, and a
                // guest changing them meanwhile gets a mix, as it asked for.
                let direct = unsafe { std::slice::from_raw_parts(p as *const u8, l) };
                let seq = qs.streams.write.note(off, len, self.cfg.sequential_cutoff);
                // Paced while a writeback batch runs (see engine/pace.rs).
                let wait = self.engine.pace(len);
                if !qs.deferred.is_empty() || !wait.is_zero() {
                    let data = direct.to_vec();
                    let not_before = (!wait.is_zero()).then(|| Instant::now() + wait);
                    return Ok(self.run_or_defer(qs, chain, kind, data, not_before, seq));
                }
                let mut done = 0;
                if let Some(s) = self.write_from(&mut qs.head, off, len, direct, &mut done, seq) {
                    set(s);
                    return Ok(Some(Done::new(head, 1, s)));
                }
                let data = direct.to_vec();
                qs.deferred.push_back(Deferred {
                    chain,
                    kind,
                    data,
                    done,
                    not_before: None,
                    sequential: seq,
                });
                Ok(None)
            }
            RequestKind::Flush => Ok(self.run_or_defer(qs, chain, kind, Vec::new(), None, false)),
            RequestKind::GetId | RequestKind::Zeroes { .. } => Err(chain),
        }
    }

    /// Run a write or flush, or queue it behind earlier deferred ones (so a
    /// flush never overtakes a write the guest saw queued before it), or
    /// until `not_before` when it is paced.
    fn run_or_defer(
        &self,
        qs: &mut QueueState,
        chain: Chain,
        kind: RequestKind,
        data: Vec<u8>,
        not_before: Option<Instant>,
        sequential: bool,
    ) -> Option<Done> {
        let mut d = Deferred {
            chain,
            kind,
            data,
            done: 0,
            not_before,
            sequential,
        };
        if !qs.deferred.is_empty() {
            qs.deferred.push_back(d);
            return None;
        }
        if let Some(t) = not_before {
            qs.deferred.push_back(d);
            qs.wake_at(t);
            return None;
        }
        match self.try_run(&mut qs.head, &mut d) {
            Some(st) => {
                let done = complete(&d.chain, st);
                keep_scratch(qs, d.data);
                Some(done)
            }
            None => {
                qs.deferred.push_back(d);
                None
            }
        }
    }

    /// One attempt at a write or flush: Some(status) when done, None when the
    /// cache is full (progress is kept in `d.done`).
    fn try_run(&self, head: &mut DataHead, d: &mut Deferred) -> Option<u8> {
        match d.kind {
            RequestKind::Write { off, len } => {
                self.write_from(head, off, len, &d.data, &mut d.done, d.sequential)
            }
            RequestKind::Flush => match self.engine.flush_with(&*self.backing) {
                Ok(()) => Some(status::OK),
                Err(EngineError::CacheFull { .. }) => None,
                Err(e) => Some(fail("flush", &e)),
            },
            RequestKind::Zeroes { off, len, unmap } => {
                let r = self
                    .engine
                    .zeroes_with(&*self.backing, off + d.done, len - d.done, unmap);
                self.finish_write(r, off, len, &mut d.done, "write-zeroes")
            }
            RequestKind::Read { .. } | RequestKind::GetId => Some(status::IOERR),
        }
    }

    /// Write `data` (the whole request) from byte `done` on: Some(status)
    /// when finished, None when the cache is full (`done` says how far it
    /// got).
    fn write_from(
        &self,
        head: &mut DataHead,
        off: u64,
        len: u64,
        data: &[u8],
        done: &mut u64,
        sequential: bool,
    ) -> Option<u8> {
        let r = self.engine.write_with(
            head,
            &*self.backing,
            off + *done,
            &data[*done as usize..],
            sequential,
        );
        self.finish_write(r, off, len, done, "write")
    }

    /// After a write (or write-zeroes) of `off..off+len` went into the
    /// cache from byte `done` on: commit it in write-through mode.
    /// Some(status) when finished, None when the cache is full.
    fn finish_write(
        &self,
        r: Result<(), EngineError>,
        off: u64,
        len: u64,
        done: &mut u64,
        what: &str,
    ) -> Option<u8> {
        match r {
            Ok(()) => {
                if !self.writeback.load(Ordering::Relaxed) {
                    if let Err(e) = self.engine.commit(off, len) {
                        return match e {
                            EngineError::CacheFull { .. } => {
                                *done = len;
                                None
                            }
                            e => Some(fail("write-through commit", &e)),
                        };
                    }
                }
                Some(status::OK)
            }
            Err(EngineError::CacheFull { done: d }) => {
                *done += d;
                None
            }
            Err(e) => Some(fail(what, &e)),
        }
    }

    /// Retry deferred requests in order, as far as space and pacing allow
    /// (`paced`: false runs paced writes now).
    fn retry_deferred(&self, qs: &mut QueueState, ring: Option<&Ring>, paced: bool) -> bool {
        let mut used = false;
        let mut now = None;
        while let Some(mut d) = qs.deferred.pop_front() {
            if let Some(t) = d.not_before.filter(|_| paced) {
                if *now.get_or_insert_with(Instant::now) < t {
                    qs.deferred.push_front(d);
                    qs.wake_at(t);
                    break;
                }
            }
            match self.try_run(&mut qs.head, &mut d) {
                Some(st) => {
                    let done = complete(&d.chain, st);
                    qs.track.done(&done);
                    if let Some(r) = ring {
                        used |= r.put_used(done.head, done.len);
                    }
                }
                None => {
                    qs.deferred.push_front(d);
                    break;
                }
            }
        }
        used
    }

    /// The ring was kicked (or started): run what it holds, then the fills.
    pub(super) fn on_kick(&self, q: usize) -> io::Result<()> {
        let mut qs = self.queues[q].lock().expect("queue lock");
        let Some(ring) = qs.ring.clone() else {
            return Ok(());
        };
        self.process_vring(&mut qs, &ring)?;
        self.run_fills(&mut qs, Some(&ring))
    }

    /// The engine freed space: retry deferred writes.
    pub(super) fn on_space(&self, q: usize) -> io::Result<()> {
        let _ = self.space_fds[q].read();
        self.retry_queue(q)
    }

    /// A paced write is due: run it, and what follows it.
    pub(super) fn on_timer(&self, q: usize) -> io::Result<()> {
        {
            let qs = self.queues[q].lock().expect("queue lock");
            let mut n = 0u64;
            // SAFETY: reads 8 bytes into `n` from a non-blocking timerfd we
            // own; EAGAIN (re-armed since it fired) is fine.
            let _ = unsafe {
                libc::read(
                    qs.timer.as_raw_fd(),
                    (&mut n as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
        self.retry_queue(q)
    }

    fn retry_queue(&self, q: usize) -> io::Result<()> {
        let mut qs = self.queues[q].lock().expect("queue lock");
        if qs.deferred.is_empty() {
            return Ok(());
        }
        let ring = qs.ring.clone();
        if self.retry_deferred(&mut qs, ring.as_ref(), true) {
            if let Some(r) = &ring {
                r.notify()?;
            }
        }
        Ok(())
    }

    /// Finish the requests queue `q` has taken, before `deadline`: wait for
    /// its reads, and retry its deferred writes as space frees up. Returns
    /// how many are left (deferred writes the cache had no room for; they
    /// stay taken, for the next backend to run again).
    pub(super) fn settle_queue(&self, q: usize, deadline: Instant) -> io::Result<usize> {
        let mut qs = self.queues[q].lock().expect("queue lock");
        let Some(ring) = qs.ring.clone() else {
            return Ok(qs.unfinished());
        };
        // Requests a previous backend left are taken too.
        while let Some(chain) = qs.resubmit.pop_front() {
            self.run_chain(&mut qs, &ring, chain);
        }
        while !qs.reads.is_empty() {
            let qs = &mut *qs;
            qs.bq.wait(1, &mut qs.completions);
            self.finish_reads(qs, &ring);
            // No new requests now, just the fills.
            self.run_fills(qs, None)?;
        }
        while !qs.deferred.is_empty() && Instant::now() < deadline {
            let epoch = self.engine.space_epoch();
            // Stopping: nothing is paced any more.
            self.retry_deferred(&mut qs, Some(&ring), false);
            if !qs.deferred.is_empty() {
                self.engine.wait_for_space(epoch);
            }
        }
        ring.notify()?;
        Ok(qs.deferred.len())
    }

    /// Stop queue `q` (the frontend asked for the ring's base): finish every
    /// request taken from it, so no used-ring write lands after the
    /// frontend reads the base. Deferred writes that find no space in
    /// [`STOP_DEFER_TIMEOUT`] fail with IOERR.
    pub(super) fn stop_queue(&self, q: usize) -> io::Result<()> {
        let left = self.settle_queue(q, Instant::now() + STOP_DEFER_TIMEOUT)?;
        let mut qs = self.queues[q].lock().expect("queue lock");
        if left > 0 {
            tracing::error!(
                n = left,
                "cache stayed full while stopping a queue; failing deferred requests"
            );
        }
        let ring = qs.ring.take();
        while let Some(d) = qs.deferred.pop_front() {
            let done = complete(&d.chain, status::IOERR);
            qs.track.done(&done);
            if let Some(r) = &ring {
                r.put_used(done.head, done.len);
            }
        }
        if let Some(r) = &ring {
            r.notify()?;
        }
        Ok(())
    }
}

/// Keep a buffer for the next request, unless it is unusually large (each
/// idle queue would hold on to it).
pub(super) fn keep_scratch(qs: &mut QueueState, buf: Vec<u8>) {
    if buf.capacity() <= 1 << 20 {
        qs.scratch = buf;
    }
}

fn fail(what: &str, e: &EngineError) -> u8 {
    tracing::warn!(error = %e, "{what} failed");
    status::IOERR
}
