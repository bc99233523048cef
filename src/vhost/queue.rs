//! One queue's pipeline on the virtio side: taking chains from the ring,
//! parsing each into one request for the disk layer, and putting the
//! answers in the used ring.
//!
//! Each queue has its own state behind its own mutex (locked by its worker
//! thread, and by the message handler when it starts or stops the ring):
//! the started ring, the queue's [`DiskQueue`], and the requests the disk
//! has not answered yet. No lock is shared by all queues on the data path.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use vm_memory::GuestAddressSpace;

use super::chain::{answer, Bytes, Chain, Done, StatusByte};
use super::conn::Conn;
use super::counters::Track;
use super::guest::Mem;
use super::poll::PollWindow;
use super::request::{needs_range, parse, status, RequestKind, HEADER_BYTES, ID_BYTES};
use super::ring::Ring;
use crate::disk::{self, DiskQueue, Op, Request, Status};
use crate::fault::Stamp;
use crate::iovec::IoVec;

/// How long stopping a ring waits for requests waiting for space.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Times the worker goes back to the ring for new requests while the
/// disk has background work (fills), before it does the rest without
/// looking.
const BACKGROUND_RING_TURNS: usize = 64;
/// Requests of one queue the disk may hold unanswered. Past that the queue
/// takes nothing more from the ring until some are answered (they wait in
/// the ring, in the guest's memory), so the memory their buffer lists take
/// is bounded whatever the ring's size (a 16 MiB chain of 128 descriptors
/// takes 2 KiB).
const MAX_PENDING: usize = 128;

/// A request the disk has not answered yet.
struct Taken {
    head: u16,
    /// Where its status byte goes.
    status: StatusByte,
    /// Keeps the memory table the request was found in mapped until it is
    /// answered.
    _mem: Arc<Mem>,
    /// Bytes a successful answer returns (a read's length).
    data: u32,
}

/// Per-queue state, owned by that queue's worker thread.
pub struct QueueState {
    /// The started ring; None while the ring is stopped.
    pub(super) ring: Option<Ring>,
    pub(super) dq: DiskQueue,
    /// Requests a previous backend took and did not return, to run before
    /// any new one.
    pub(super) resubmit: VecDeque<(Chain, Arc<Mem>)>,
    taken: HashMap<u64, Taken>,
    next_tag: u64,
    answers: Vec<disk::Done>,
    /// The requests in flight, for the queue's counters.
    pub(super) track: Track,
    /// How long to busy-poll after the ring runs dry.
    poll: PollWindow,
    /// The connection's fault stamp: once a frontend mapping faulted,
    /// every answer is an error.
    since: Stamp,
    /// A broken available ring was reported (once per connection).
    broken_ring_said: bool,
}

impl QueueState {
    /// An idle queue on `dq`, counting its requests through `track`.
    pub fn new(dq: DiskQueue, track: Track, since: Stamp) -> QueueState {
        QueueState {
            ring: None,
            dq,
            resubmit: VecDeque::new(),
            taken: HashMap::new(),
            next_tag: 1,
            answers: Vec::new(),
            track,
            poll: PollWindow::default(),
            since,
            broken_ring_said: false,
        }
    }

    /// The status byte for `s`: an error whatever `s` once guest memory
    /// faulted (the data moved may be a stand-in page's).
    fn status_byte(&self, s: Status) -> u8 {
        match s {
            Status::Ok if self.since.intact() => status::OK,
            _ => status::IOERR,
        }
    }

    /// Requests taken and not yet returned.
    pub fn unfinished(&self) -> usize {
        self.taken.len() + self.resubmit.len()
    }

    /// Put the disk's answers in the used ring (`ring`: None once it is
    /// gone, when they are only counted). Returns whether any went in.
    fn deliver(&mut self, ring: Option<&Ring>, pending: &mut usize) -> bool {
        let mut used = false;
        for a in std::mem::take(&mut self.answers) {
            let Some(t) = self.taken.remove(&a.tag) else {
                continue;
            };
            let st = self.status_byte(a.status);
            let done = answer(t.head, &t.status, st, t.data);
            self.track.done(&done);
            if let Some(r) = ring {
                if r.put_used(done.head, done.len) {
                    used = true;
                    // An error resurfaces at the caller's final notify.
                    let _ = r.signal_every_batch(pending);
                }
            }
        }
        used
    }
}

impl QueueState {
    /// Process everything available on `ring`, following the EVENT_IDX
    /// protocol: with notifications disabled, drain the ring; re-enable
    /// them; if the driver added requests in between (enable returns true),
    /// drain again. One pass is not enough: a request added after the last
    /// pop but before re-enabling would otherwise wait for the next kick.
    pub(super) fn process_vring(&mut self, c: &Conn, ring: &Ring) -> io::Result<()> {
        let event_idx = c.event_idx.load(Ordering::Relaxed);
        self.poll
            .woke(Instant::now(), Duration::from_micros(c.cfg.poll_us as u64));
        // A ring being stopped takes nothing more: its pending requests stay.
        while ring.is_ready() {
            if event_idx {
                ring.vring
                    .disable_notification()
                    .map_err(io::Error::other)?;
            }
            let before = ring.vring.queue_next_avail();
            if self.drain_avail(c, ring)? {
                // Full: notifications stay off; answers bring the worker
                // back to the ring (`on_disk`).
                break;
            }
            let took_none = ring.vring.queue_next_avail() == before;
            if c.is_stopping() {
                // Nothing more is taken: what the driver adds now is left
                // in the ring for the next process.
                break;
            }
            if self.poll_for_more(c, ring) {
                continue;
            }
            if !event_idx || !ring.vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
            if took_none && !ring.avail_pending(&c.mem.memory()) {
                // The ring says more is there but nothing could be taken:
                // an available index the driver broke (more ahead than the
                // ring holds). Spinning on it would give the guest a core;
                // the next kick looks again.
                if !self.broken_ring_said {
                    self.broken_ring_said = true;
                    tracing::warn!(
                        next = before,
                        "the driver's available ring index is invalid; waiting for the next kick"
                    );
                }
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
    fn poll_for_more(&mut self, c: &Conn, ring: &Ring) -> bool {
        let start = Instant::now();
        // With backing I/O in flight, sleep instead: its completions wake
        // the worker, and the kernel needs the CPU to complete it
        // (spinning cost 5-10 % of all-miss IOPS when measured).
        let window = self.poll.window();
        if window.is_zero() || self.dq.backing_in_flight() > 0 || c.is_stopping() {
            self.poll.went_idle(start);
            return false;
        }
        let deadline = start + window;
        let mem = c.mem.memory();
        loop {
            if ring.avail_pending(&mem) {
                return true;
            }
            if Instant::now() >= deadline {
                self.poll.went_idle(start);
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Take and start what the ring holds; true if it stopped because the
    /// disk holds [`MAX_PENDING`] requests of this queue.
    fn drain_avail(&mut self, c: &Conn, ring: &Ring) -> io::Result<bool> {
        let mem = c.mem.memory();
        let keep = mem.clone().into_inner();
        let mut pending = 0;
        let mut taken = Instant::now();
        // What a previous backend left taken runs first, in its order.
        while let Some((chain, m)) = self.resubmit.pop_front() {
            if self.run_chain_at(c, ring, &chain, &m, &mut taken) {
                ring.signal_every_batch(&mut pending)?;
            }
        }
        let mut full = false;
        while !c.is_stopping() {
            if self.dq.pending() >= MAX_PENDING {
                full = true;
                break;
            }
            let Some(chain) = ring.pop(&mem) else {
                break;
            };
            if self.run_chain_at(c, ring, &chain, &keep, &mut taken) {
                ring.signal_every_batch(&mut pending)?;
            }
        }
        // Misses already back complete now, with this batch.
        if self.dq.pending() > 0 {
            self.dq.reap(&mut self.answers);
        }
        if self.deliver(Some(ring), &mut pending) || pending > 0 {
            ring.notify()?;
        }
        Ok(full)
    }

    /// Start one taken chain, as one of a batch (the fuzz harness drives
    /// chains one at a time); true if it completed at once.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn run_chain(
        &mut self,
        c: &Conn,
        ring: &Ring,
        chain: &Chain,
        mem: &Arc<Mem>,
    ) -> bool {
        self.run_chain_at(c, ring, chain, mem, &mut Instant::now())
    }

    /// After a batch: answer the requests whose backing I/O is back
    /// already. Returns whether any went into the used ring.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn end_batch(&mut self, ring: &Ring) -> bool {
        self.dq.reap(&mut self.answers);
        self.deliver(Some(ring), &mut 0)
    }

    /// Start one taken chain (found in memory table `mem`); put it in the
    /// used ring if it completed at once. Returns whether it did. `taken`
    /// is when it was taken, and becomes when it was answered or began to
    /// wait: in a batch, the next chain is taken as the one before it is
    /// done with, so counting a request's latency costs one clock read.
    fn run_chain_at(
        &mut self,
        c: &Conn,
        ring: &Ring,
        chain: &Chain,
        mem: &Arc<Mem>,
        taken: &mut Instant,
    ) -> bool {
        let head = chain.head_index();
        self.track.begin(head, *taken);
        match self.start(c, chain, mem) {
            Some(done) => {
                *taken = self.track.done(&done);
                ring.put_used(done.head, done.len)
            }
            None => {
                *taken = Instant::now();
                false
            }
        }
    }

    /// Parse a chain into a request and submit it. Returns how it was
    /// answered when it completed at once; None when the disk answers
    /// later.
    fn start(&mut self, c: &Conn, chain: &Chain, mem: &Arc<Mem>) -> Option<Done> {
        let head = chain.head_index();
        let Some(bytes) = Bytes::of(chain, mem, self.since) else {
            // Buffers outside guest memory: nothing can be written back,
            // not even a status. Return the chain so the ring moves on.
            tracing::warn!(head, "request with descriptors outside guest memory");
            return Some(Done::unanswered(head));
        };
        let (Some(data_w), Some(st)) = (bytes.data_writable(), bytes.status()) else {
            tracing::warn!(head, "request without a status byte");
            return Some(Done::unanswered(head));
        };
        let header = bytes.header();
        let range = header.filter(needs_range).and_then(|_| bytes.range());
        let readable = bytes.readable_len().saturating_sub(HEADER_BYTES);
        self.track.header(head, header.as_ref());
        let kind = match parse(
            header,
            range,
            readable,
            data_w,
            c.disk.size(),
            c.cfg.read_only,
        ) {
            Ok(k) => k,
            Err(why) => {
                tracing::debug!(head, ?why, "rejected request");
                return Some(answer(head, &st, why.status(), 0));
            }
        };
        self.track.parsed(head, &kind);
        let (op, off, len, buf, data) = match kind {
            RequestKind::GetId => {
                let mut id = [0u8; ID_BYTES];
                let s = c.cfg.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let n = data_w.min(ID_BYTES);
                bytes.writable(n).copy_in(0, &id[..n]);
                return Some(answer(head, &st, status::OK, n as u32));
            }
            RequestKind::Read { off, len } => {
                let buf = bytes.writable(len as usize);
                (Op::Read, off, len, buf, len as u32)
            }
            RequestKind::Write { off, len } => {
                let buf = bytes.readable(HEADER_BYTES, len as usize);
                (Op::Write, off, len, buf, 0)
            }
            RequestKind::Flush => (Op::Flush, 0, 0, IoVec::empty(), 0),
            RequestKind::Zeroes { off, len, unmap } => {
                (Op::Zeroes { unmap }, off, len, IoVec::empty(), 0)
            }
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let req = Request {
            op,
            off,
            len,
            buf,
            tag,
        };
        match self.dq.submit(req) {
            Some(s) => {
                let st_byte = self.status_byte(s);
                Some(answer(head, &st, st_byte, data))
            }
            None => {
                self.taken.insert(
                    tag,
                    Taken {
                        head,
                        status: st,
                        _mem: mem.clone(),
                        data,
                    },
                );
                None
            }
        }
    }

    /// Run the disk's background work (fills) until there is none, going
    /// back to the ring for new requests before each piece: the guest does
    /// not wait for a fill, so requests it queued meanwhile go first.
    fn background(&mut self, c: &Conn, ring: Option<&Ring>) -> io::Result<()> {
        let mut turns = BACKGROUND_RING_TURNS;
        let mem = c.mem.memory();
        while self.dq.has_background_work() {
            if let Some(r) = ring.filter(|_| turns > 0 && !c.is_stopping()) {
                if r.avail_pending(&mem) {
                    turns -= 1;
                    self.process_vring(c, r)?;
                }
            }
            self.dq.background_step();
        }
        Ok(())
    }

    /// The ring was kicked (or started): run what it holds, then the
    /// background work.
    pub(super) fn on_kick(&mut self, c: &Conn) -> io::Result<()> {
        let Some(ring) = self.ring.clone() else {
            return Ok(());
        };
        self.process_vring(c, &ring)?;
        self.background(c, Some(&ring))
    }

    /// The disk has news: answer what finished.
    pub(super) fn on_disk(&mut self, c: &Conn) -> io::Result<()> {
        self.dq.process(&mut self.answers);
        let ring = self.ring.clone();
        let mut pending = 0;
        if self.deliver(ring.as_ref(), &mut pending) {
            if let Some(r) = &ring {
                r.notify()?;
                // Requests left in the ring while the disk held too many.
                if self.dq.pending() < MAX_PENDING && r.avail_pending(&c.mem.memory()) {
                    self.process_vring(c, r)?;
                }
            }
        }
        self.background(c, ring.as_ref())
    }

    /// Finish the requests taken, before `deadline`: those on the backing
    /// store always come back; those waiting for space get until the
    /// deadline. Returns how many are left (they stay taken, for the next
    /// backend to run again).
    pub(super) fn settle(&mut self, c: &Conn, deadline: Instant) -> io::Result<usize> {
        let Some(ring) = self.ring.clone() else {
            return Ok(self.unfinished());
        };
        // Requests a previous backend left are taken too.
        let mut now = Instant::now();
        while let Some((chain, m)) = self.resubmit.pop_front() {
            self.run_chain_at(c, &ring, &chain, &m, &mut now);
        }
        self.dq.settle(deadline, &mut self.answers);
        self.deliver(Some(&ring), &mut 0);
        ring.notify()?;
        Ok(self.unfinished())
    }

    /// Stop the queue (the frontend asked for the ring's base): finish
    /// every request taken from it, so no used-ring write lands after the
    /// frontend reads the base. Requests that find no space in
    /// [`STOP_TIMEOUT`] fail with IOERR.
    pub(super) fn stop(&mut self, c: &Conn) -> io::Result<()> {
        let left = self.settle(c, Instant::now() + STOP_TIMEOUT)?;
        if left > 0 {
            tracing::error!(
                n = left,
                "cache stayed full while stopping a queue; failing the requests left"
            );
        }
        let ring = self.ring.take();
        self.dq.abort(&mut self.answers);
        self.deliver(ring.as_ref(), &mut 0);
        if let Some(r) = &ring {
            r.notify()?;
        }
        Ok(())
    }
}
