//! A write or a zeroing, routed by the cache mode:
//!
//! - into the cache (write-back): the data is copied from the guest's
//!   buffers into the medium, nothing else; a full cache (or a full key log
//!   that only the log closer may close) makes it wait for a space signal,
//!   and a write paced while a writeback batch runs waits for its time;
//! - through the cache (write-through): copied into the cache first, but
//!   not visible, then to the backing store from that copy, which becomes
//!   visible as clean data once the store has it (`engine/placed.rs`; no
//!   buffer of the I/O budget, no second copy). Where the cache takes no
//!   copy now (full, or a head not aligned for O_DIRECT), from a buffer of
//!   the I/O budget, then into the cache from that buffer;
//! - around the cache (write-around, none, and in write-back mode a long
//!   sequential write or any write during a migration's copy, where nothing
//!   dirty is cached for its range): to the backing store, then the range is
//!   forgotten in the cache. If a write reached the range meanwhile, the
//!   write is cached after it instead, so log order stays the order of the
//!   writes.
//!
//! A write to the backing store holds its range ([`super::order`]) from
//! before it is sent until the cache is updated, so overlapping writes land
//! on the store in the order they reach the cache. Nothing waits on the
//! queue's thread: backing writes, and the backing flush that makes them
//! durable when the guest runs with its write cache off, go through the
//! queue's asynchronous backing queue; a commit that waits for I/O goes to
//! the persisting thread.

use std::collections::VecDeque;

use smallvec::SmallVec;
use std::os::fd::AsRawFd;
use std::time::Instant;

use super::ctx::{with_room, Ctx, JobId, Step};
use super::request::Status;
use super::syncer::{SyncOp, Synced};
use crate::backing::{AlignedBuf, Completion, IoOp, IO_ALIGN};
use crate::engine::{CacheMode, Error as EngineError, Placed};
use crate::iovec::IoVec;

/// Piece numbers of backing writes from a placed copy (the index into
/// `WriteJob::placed` below this bit).
const PLACED: u32 = 1 << 23;

/// How the data reaches the backing store.
#[derive(Debug)]
enum Via {
    /// Then a clean copy into the cache.
    Through,
    /// Then the range is forgotten; with the write versions of its regions
    /// when it must be cached instead if another write came meanwhile.
    Around { versions: Option<Vec<u64>> },
}

/// Where a write stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not started: route it by the mode.
    Route,
    /// Into the cache; `done` bytes from `off` are in.
    Cache {
        done: u64,
    },
    /// Waiting for its range, then to the backing store.
    Hold,
    Send,
    /// Its backing writes are out: update the cache once they are back.
    Update,
    /// The guest's write cache is off: flush the backing store.
    Durable,
    /// The guest's write cache is off: make the cache's keys durable.
    Commit,
}

/// A write or a zeroing in progress.
pub(super) struct WriteJob {
    pub tag: u64,
    /// Some(unmap) for a zeroing.
    zeroes: Option<bool>,
    off: u64,
    len: u64,
    buf: IoVec<'static>,
    sequential: bool,
    /// A paced write runs no earlier than this.
    not_before: Option<Instant>,
    paced: bool,
    stage: Stage,
    via: Via,
    /// Bytes the cache took before a mode switch sent the rest to the
    /// backing store: the backing route covers `off+base..off+len`.
    base: u64,
    /// Bytes sent to the backing store.
    sent: u64,
    in_flight: usize,
    failed: bool,
    /// The range is held (see `order.rs`).
    held: bool,
    /// The data is on the backing store.
    backed: bool,
    /// Write-through pieces back from the store whose clean copy did not
    /// fit in the cache yet: (offset, data).
    clean: VecDeque<(u64, AlignedBuf)>,
    /// Write-through copies placed in the cache, by piece, while their
    /// backing write is out; then in `landed` until they are published.
    placed: SmallVec<[Option<Placed>; 1]>,
    landed: SmallVec<[Placed; 1]>,
    /// Give up placing (the cache took no copy): bounce the rest.
    bounce: bool,
    /// It found the budget short (and may hold a reservation).
    starved: bool,
    /// A flush or commit was asked for and not answered yet.
    asked: bool,
    synced: Option<Synced>,
    /// The space epoch at which it last found no room (see `with_room`).
    room: Option<u64>,
}

impl WriteJob {
    /// A write of `buf` at `off` (`zeroes`: a zeroing of `len` bytes,
    /// Some(unmap)).
    pub fn new(
        cx: &mut Ctx,
        zeroes: Option<bool>,
        off: u64,
        len: u64,
        buf: IoVec<'static>,
        tag: u64,
    ) -> WriteJob {
        let sequential = zeroes.is_none()
            && cx
                .streams
                .write
                .note(off, len, cx.shared.cfg.sequential_cutoff);
        WriteJob {
            tag,
            zeroes,
            off,
            len,
            buf,
            sequential,
            not_before: None,
            paced: false,
            stage: Stage::Route,
            via: Via::Through,
            base: 0,
            sent: 0,
            in_flight: 0,
            failed: false,
            held: false,
            backed: false,
            clean: VecDeque::new(),
            placed: SmallVec::new(),
            landed: SmallVec::new(),
            bounce: false,
            starved: false,
            asked: false,
            synced: None,
            room: None,
        }
    }

    /// Has it started (so later writes need not wait behind it)? A write
    /// into the cache has not until it is all in.
    pub fn started(&self) -> bool {
        !matches!(self.stage, Stage::Route | Stage::Cache { .. } | Stage::Hold)
    }

    /// Backing operations in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Go as far as possible.
    pub fn step(&mut self, cx: &mut Ctx, id: JobId) -> Step {
        loop {
            let next = match self.stage {
                Stage::Route => self.route(cx),
                Stage::Cache { done } => match self.cache(cx, done) {
                    Ok(s) => s,
                    Err(step) => return step,
                },
                Stage::Hold => {
                    let (o, l) = self.backing_range();
                    if !cx.shared.locks.try_hold(o, l, cx.wake.as_raw_fd()) {
                        return Step::Wait;
                    }
                    self.held = true;
                    cx.shared
                        .backing_unflushed
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    Stage::Send
                }
                Stage::Send => match self.send(cx, id) {
                    Some(s) => s,
                    None => return Step::Wait,
                },
                Stage::Update => {
                    if self.in_flight > 0 {
                        return Step::InFlight;
                    }
                    if self.failed {
                        return Step::Done(Status::IoErr);
                    }
                    self.backed = true;
                    match self.update(cx) {
                        Ok(s) => s,
                        Err(step) => return step,
                    }
                }
                Stage::Durable => {
                    if self.in_flight > 0 {
                        return Step::InFlight;
                    }
                    if self.failed {
                        return Step::Done(Status::IoErr);
                    }
                    if !self.asked && !cx.shared.write_cache() {
                        self.asked = true;
                        cx.submit(id, 0, IoOp::Flush);
                        cx.kick();
                        self.in_flight = 1;
                        return Step::InFlight;
                    }
                    self.asked = false;
                    Stage::Commit
                }
                Stage::Commit => match self.commit(cx, id) {
                    Some(step) => return step,
                    None => return Step::Done(Status::Ok),
                },
            };
            self.stage = next;
        }
    }

    /// The part of the request that goes to the backing store.
    fn backing_range(&self) -> (u64, u64) {
        (self.off + self.base, self.len - self.base)
    }

    /// Choose the way by the mode now.
    fn route(&mut self, cx: &mut Ctx) -> Stage {
        let e = &cx.shared.engine;
        let (o, l) = self.backing_range();
        let to_store = |via| (via, Stage::Hold);
        let (via, stage) = match (e.mode(), self.zeroes) {
            (CacheMode::Writeback, Some(_)) => (Via::Through, Stage::Cache { done: self.base }),
            (CacheMode::Writeback, None) if self.sequential || e.is_handing_over() => {
                // Around only where nothing dirty is cached: writeback
                // follows the log, and would put older dirty data back on
                // top of this write later.
                match e.clean_versions(o, l) {
                    Some(v) => to_store(Via::Around { versions: Some(v) }),
                    None => (Via::Through, Stage::Cache { done: self.base }),
                }
            }
            (CacheMode::Writeback, None) => (Via::Through, Stage::Cache { done: self.base }),
            (CacheMode::Writethrough, None) => to_store(Via::Through),
            (CacheMode::Writethrough, Some(_)) | (CacheMode::Writearound | CacheMode::None, _) => {
                to_store(Via::Around { versions: None })
            }
        };
        if let (Stage::Cache { .. }, None, false) = (stage, self.zeroes, self.paced) {
            // Paced while a writeback batch runs (see engine/pace.rs).
            self.paced = true;
            let wait = e.pace(l);
            if !wait.is_zero() {
                self.not_before = Some(Instant::now() + wait);
            }
        }
        if let Via::Around { versions: Some(_) } = via {
            cx.shared.engine.note_bypassed(l);
        }
        self.via = via;
        stage
    }

    /// Into the cache from byte `done` on. Ok(next stage), or Err(step) to
    /// return.
    fn cache(&mut self, cx: &mut Ctx, done: u64) -> Result<Stage, Step> {
        if let Some(t) = self.not_before.filter(|_| !cx.unpaced) {
            if Instant::now() < t {
                cx.wake_at(t);
                return Err(Step::Wait);
            }
            self.not_before = None;
        }
        let e = &cx.shared.engine;
        if e.mode() != CacheMode::Writeback {
            if self.backed {
                // Written around, then a write came, then the mode changed:
                // the store has it; the cache must not keep older data.
                let (o, l) = self.backing_range();
                return match e.forget(o, l, None) {
                    Ok(_) => Ok(Stage::Durable),
                    Err(err) => Err(self.engine_failed(err, "forget")),
                };
            }
            // The mode changed while it waited (a switch drained what was
            // cached): the rest goes the new way.
            self.base = done;
            return Ok(Stage::Route);
        }
        let (off, len, zeroes) = (self.off, self.len, self.zeroes);
        let buf = &self.buf;
        let head = &mut cx.head;
        let mut at = done;
        let r = with_room(&mut self.room, e, || {
            let r = match zeroes {
                Some(unmap) => e.write_zeroes(off + at, len - at, unmap),
                None if at == 0 => e.write(head, off, buf),
                None => {
                    let rest = buf.slice(at as usize, (len - at) as usize);
                    e.write(head, off + at, &rest)
                }
            };
            if let Some(d) = r.as_ref().err().and_then(|e| e.retry_from()) {
                at += d;
            }
            r
        });
        self.stage = Stage::Cache { done: at };
        match r {
            None => Err(Step::Wait),
            // A write cached after going around: its backing copy must be
            // durable too when the guest's write cache is off.
            Some(Ok(())) if self.backed => Ok(Stage::Durable),
            Some(Ok(())) => Ok(Stage::Commit),
            Some(Err(err)) if err.retry_from().is_some() => Err(Step::Wait),
            Some(Err(err)) => Err(self.engine_failed(err, self.what())),
        }
    }

    /// Send what memory allows to the backing store. Some(next stage) once
    /// all of it is out; None to wait (for memory, or its own pieces).
    fn send(&mut self, cx: &mut Ctx, id: JobId) -> Option<Stage> {
        // Clean copies first: their buffers are memory the next pieces need.
        if !self.put_clean(cx) {
            return None;
        }
        let (o, l) = self.backing_range();
        if let Some(unmap) = self.zeroes {
            cx.submit(
                id,
                0,
                IoOp::Zeroes {
                    off: o,
                    len: l,
                    unmap,
                },
            );
            cx.kick();
            self.in_flight += 1;
            self.sent = l;
            return Some(Stage::Update);
        }
        let piece = cx.shared.budget.write_piece() as u64;
        let mut out = false;
        let place =
            matches!(self.via, Via::Through) && cx.shared.engine.mode() == CacheMode::Writethrough;
        while !self.failed && self.sent < l {
            let n = (l - self.sent).min(piece);
            if place && !self.bounce && self.placed.len() < PLACED as usize {
                let e = &cx.shared.engine;
                let at = (self.base + self.sent) as usize;
                match e.place(
                    &mut cx.head,
                    o + self.sent,
                    &self.buf,
                    at,
                    n as usize,
                    IO_ALIGN,
                ) {
                    Some(p) => {
                        let b = cx.lend(&p);
                        let n = p.len() as u64;
                        let idx = PLACED | self.placed.len() as u32;
                        cx.submit(
                            id,
                            idx,
                            IoOp::Write {
                                off: p.off(),
                                buf: b,
                            },
                        );
                        self.placed.push(Some(p));
                        self.in_flight += 1;
                        self.sent += n;
                        out = true;
                        continue;
                    }
                    None => self.bounce = true,
                }
            }
            let Some(mut b) = cx.shared.budget.write_buf(n as usize, cx.job_key(id)) else {
                cx.wait_for_memory();
                self.starved = true;
                break;
            };
            self.buf.copy_out((self.base + self.sent) as usize, &mut b);
            if !self.buf.intact() {
                // The guest's memory faulted: its bytes are a stand-in's.
                self.failed = true;
                break;
            }
            let at = o + self.sent;
            cx.submit(
                id,
                (self.sent / piece) as u32,
                IoOp::Write { off: at, buf: b },
            );
            self.in_flight += 1;
            self.sent += n;
            out = true;
        }
        if out {
            cx.kick();
        }
        (self.failed || self.sent == l).then_some(Stage::Update)
    }

    /// Put pending write-through pieces into the cache; false while one
    /// still waits for space.
    fn put_clean(&mut self, cx: &mut Ctx) -> bool {
        while let Some(p) = self.landed.first() {
            let e = &cx.shared.engine;
            match with_room(&mut self.room, e, || e.publish_placed(p)) {
                None => return false,
                Some(Ok(())) => {
                    // Its segment reference is the key's now.
                    let _published = self.landed.remove(0);
                }
                Some(Err(e)) if e.retry_from().is_some() => return false,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "write-through: caching a clean copy failed");
                    self.failed = true;
                    let p = self.landed.remove(0);
                    cx.shared.engine.discard_placed(p);
                }
            }
        }
        while let Some((at, b)) = self.clean.front() {
            let (e, head) = (&cx.shared.engine, &mut cx.head);
            match with_room(&mut self.room, e, || e.write_clean(head, *at, b.as_slice())) {
                None => return false,
                Some(Ok(())) => {}
                Some(Err(e)) if e.retry_from().is_some() => return false,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "write-through: caching a clean copy failed");
                    self.failed = true;
                }
            }
            self.clean.pop_front();
        }
        true
    }

    /// The data is on the store: update the cache.
    fn update(&mut self, cx: &mut Ctx) -> Result<Stage, Step> {
        if self.zeroes.is_none() && matches!(self.via, Via::Through) {
            return if self.put_clean(cx) {
                Ok(Stage::Durable)
            } else {
                Err(Step::Wait)
            };
        }
        let (o, l) = self.backing_range();
        let e = &cx.shared.engine;
        let versions = match &self.via {
            Via::Around { versions: Some(v) } => Some(v.as_slice()),
            _ => None,
        };
        match with_room(&mut self.room, e, || e.forget(o, l, versions)) {
            None => Err(Step::Wait),
            Some(Ok(true)) => Ok(Stage::Durable),
            // A write reached the range meanwhile and is cached: cache
            // this one after it, so the log keeps the order.
            Some(Ok(false)) => Ok(Stage::Cache { done: self.base }),
            Some(Err(err)) if err.retry_from().is_some() => Err(Step::Wait),
            Some(Err(err)) => Err(self.engine_failed(err, "forget")),
        }
    }

    /// With the guest's write cache off, make the write's keys durable.
    /// None when done, Some(step) to return.
    fn commit(&mut self, cx: &mut Ctx, id: JobId) -> Option<Step> {
        if cx.shared.write_cache() {
            return None;
        }
        let e = &cx.shared.engine;
        match self.synced.take() {
            Some(Synced::Ok) => return None,
            Some(Synced::Failed) => return Some(Step::Done(Status::IoErr)),
            Some(Synced::Retry(epoch)) => self.room = Some(epoch),
            None => {}
        }
        if cx.shared.syncer.is_some() {
            if !self.asked {
                if self.room.is_some_and(|w| e.space_epoch() == w) {
                    return Some(Step::Wait);
                }
                self.asked = true;
                let op = SyncOp::Commit {
                    off: self.off,
                    len: self.len,
                };
                cx.ask_sync(op, u64::from(id));
            }
            return Some(Step::Wait);
        }
        let (off, len) = (self.off, self.len);
        match with_room(&mut self.room, e, || e.commit(off, len)) {
            Some(Ok(())) => None,
            None => Some(Step::Wait),
            Some(Err(err)) if err.retry_from().is_some() => Some(Step::Wait),
            Some(Err(err)) => Some(self.engine_failed(err, "write-through commit")),
        }
    }

    /// The persisting thread answered.
    pub fn on_sync(&mut self, s: Synced) {
        self.asked = false;
        self.synced = Some(s);
    }

    /// A backing operation of this job came back.
    pub fn on_io(&mut self, cx: &mut Ctx, piece: u32, c: Completion) {
        self.in_flight -= 1;
        // Dropping the completion's buffer gives a lent copy's pin back.
        let placed = (piece & PLACED != 0)
            .then(|| {
                self.placed
                    .get_mut((piece & !PLACED) as usize)
                    .and_then(Option::take)
            })
            .flatten();
        if let Err(e) = c.result {
            tracing::warn!(off = self.off, len = self.len, error = %e, "backing {} failed", self.what());
            self.failed = true;
            if let Some(p) = placed {
                cx.shared.engine.discard_placed(p);
            }
            return;
        }
        if let Some(p) = placed {
            // The store has it: the copy becomes visible now, or as soon
            // as the key log has room.
            self.landed.push(p);
            self.put_clean(cx);
            return;
        }
        if let (Via::Through, IoOp::Write { off, buf }) = (&self.via, c.op) {
            // The store has it: the clean copy goes into the cache now, or
            // as soon as there is room.
            self.clean.push_back((off, buf));
            self.put_clean(cx);
        }
    }

    fn what(&self) -> &'static str {
        match self.zeroes {
            None => "write",
            Some(false) => "write-zeroes",
            Some(true) => "discard",
        }
    }

    #[cold]
    fn engine_failed(&self, e: EngineError, what: &str) -> Step {
        tracing::warn!(off = self.off, len = self.len, error = %e, "{what} failed");
        Step::Done(Status::IoErr)
    }

    /// Nothing more will be done (answered or abandoned): let go of the
    /// range and any reservation.
    pub fn release(&mut self, cx: &mut Ctx, id: JobId) {
        // A copy still being written keeps its pin (in the write's buffer).
        let e = &cx.shared.engine;
        for p in self.placed.drain(..).flatten().chain(self.landed.drain(..)) {
            e.discard_placed(p);
        }
        if std::mem::take(&mut self.held) {
            let (o, l) = self.backing_range();
            cx.shared.locks.release(o, l);
        }
        if self.starved {
            cx.shared.budget.guest().forget(cx.job_key(id));
        }
    }
}
