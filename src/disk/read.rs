//! A read: what the cache holds is copied to the guest at once; the rest
//! (the misses) is read from the backing store into buffers of the I/O
//! budget, a piece of at most one block at a time, copied to the guest as
//! each piece lands, and then offered to the cache from those same buffers
//! (a fill), never from the guest's memory, which the guest may change.
//!
//! A piece waits for memory when the budget is spent; the pieces already
//! read keep going, so a read larger than the whole budget still finishes,
//! one piece after another.

use super::ctx::{Ctx, JobId, Step};
use super::request::Status;
use crate::backing::{Completion, IoOp};
use crate::engine::Miss;
use crate::iovec::IoVec;

/// A read waiting for its misses.
pub(super) struct ReadJob {
    pub tag: u64,
    buf: IoVec<'static>,
    misses: Vec<Miss>,
    /// The next piece to send: (miss, bytes into it).
    next: (usize, u64),
    in_flight: usize,
    failed: bool,
    /// Put what the misses read into the cache (not for a long
    /// sequential stream).
    fill: bool,
    /// It found the budget short (and may hold a reservation).
    starved: bool,
}

/// How a read starts.
pub(super) enum Started {
    /// Answered from the cache alone, or failed.
    Done(Status),
    /// Some of it must come from the backing store.
    Misses(ReadJob),
}

impl ReadJob {
    /// Start a read of `buf.len()` bytes at `off`: copy the hits.
    pub fn start(cx: &mut Ctx, off: u64, buf: IoVec<'static>, tag: u64) -> Started {
        let mut buf = buf;
        let len = buf.len() as u64;
        let fill = !cx
            .streams
            .read
            .note(off, len, cx.shared.cfg.sequential_cutoff);
        let mut misses = Vec::new();
        if let Err(e) = cx.shared.engine.read(off, &mut buf, &mut misses) {
            tracing::warn!(off, len, error = %e, "read failed");
            return Started::Done(Status::IoErr);
        }
        if misses.is_empty() {
            return Started::Done(Status::Ok);
        }
        if !fill {
            let bytes = misses.iter().map(|m| m.len).sum();
            cx.shared.engine.note_unfilled(bytes);
        }
        Started::Misses(ReadJob {
            tag,
            buf,
            misses,
            next: (0, 0),
            in_flight: 0,
            failed: false,
            fill,
            starved: false,
        })
    }

    /// Backing operations in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Send what memory allows; finished once every piece is back.
    pub fn step(&mut self, cx: &mut Ctx, id: JobId) -> Step {
        let piece = cx.shared.budget.read_piece() as u64;
        let mut sent = false;
        let mut starved = false;
        while !self.failed && self.next.0 < self.misses.len() {
            let (i, skip) = self.next;
            let m = self.misses[i];
            let n = (m.len - skip).min(piece);
            let Some(b) = cx.shared.budget.read_buf(n as usize, cx.job_key(id)) else {
                cx.wait_for_memory();
                starved = true;
                self.starved = true;
                break;
            };
            cx.submit(
                id,
                i as u32,
                IoOp::Read {
                    off: m.off + skip,
                    buf: b,
                },
            );
            self.in_flight += 1;
            sent = true;
            self.next = if skip + n == m.len {
                (i + 1, 0)
            } else {
                (i, skip + n)
            };
        }
        if sent {
            // On the device now, not at the end of the batch: under a
            // stream of misses the device works while the rest of the
            // batch is parsed.
            cx.kick();
        }
        let all_sent = self.failed || self.next.0 == self.misses.len();
        match (self.in_flight, all_sent) {
            (0, true) if self.failed => Step::Done(Status::IoErr),
            (0, true) => Step::Done(Status::Ok),
            _ if starved => Step::Wait,
            _ => Step::InFlight,
        }
    }

    /// A piece of miss `i` came back: copy it to the guest, keep it for a
    /// fill.
    pub fn on_io(&mut self, cx: &mut Ctx, i: u32, c: Completion) {
        self.in_flight -= 1;
        let Some(m) = self.misses.get(i as usize).copied() else {
            self.failed = true;
            return;
        };
        match (c.result, c.op) {
            (Ok(()), IoOp::Read { off, buf }) if off >= m.off => {
                let part = m.part(off - m.off, buf.len() as u64);
                self.buf.copy_in(part.buf_off, &buf);
                if self.fill {
                    cx.fills.push_back((part, buf));
                }
            }
            (Err(e), _) => {
                tracing::warn!(off = m.off, len = m.len, error = %e, "backing read failed");
                self.failed = true;
            }
            _ => self.failed = true,
        }
    }

    /// Nothing more will be done (the request is answered or abandoned).
    pub fn release(&mut self, cx: &mut Ctx, id: JobId) {
        if self.starved {
            cx.shared.budget.guest().forget(cx.job_key(id));
        }
    }
}
