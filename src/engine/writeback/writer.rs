//! The backing writes of one writeback batch: buffers from writeback's
//! share of the I/O memory, as many in flight as it holds.

use std::io;
use std::sync::Arc;

use crate::backing::arena::MAX_BLOCK;
use crate::backing::{AlignedBuf, Arena, BackingQueue, Completion, IoOp, QueueEngine};

/// Writeback's name in its arena (it is the only user).
const WHO: u64 = 0;

/// Writes of one batch in flight.
pub(super) struct Writer<'q> {
    q: &'q mut BackingQueue,
    memory: &'q Arc<Arena>,
    done: Vec<Completion>,
    total: u64,
    first_err: Option<io::Error>,
    /// librbd copies each write: charged twice.
    copied: bool,
}

impl<'q> Writer<'q> {
    pub(super) fn new(q: &'q mut BackingQueue, memory: &'q Arc<Arena>) -> Writer<'q> {
        let copied = q.engine() == QueueEngine::Rbd;
        Writer {
            q,
            memory,
            done: Vec::new(),
            total: 0,
            first_err: None,
            copied,
        }
    }

    /// Largest write: one buffer.
    pub(super) fn merge_bytes(&self) -> usize {
        if self.copied {
            MAX_BLOCK / 2
        } else {
            MAX_BLOCK
        }
    }

    /// A buffer for `len` bytes (at most [`Writer::merge_bytes`]), waiting
    /// for writes in flight to come back while the memory is all out.
    pub(super) fn buffer(&mut self, len: usize) -> AlignedBuf {
        let charge = if self.copied { 2 * len } else { len };
        loop {
            if let Some(b) = self.memory.alloc(len, charge, WHO) {
                return b;
            }
            if self.q.in_flight() == 0 {
                // Nothing of ours is out, so the arena is whole: only a
                // buffer larger than a block gets here, which no caller
                // asks for.
                tracing::error!(
                    len,
                    "writeback buffer larger than its memory; using the heap"
                );
                return AlignedBuf::new(len);
            }
            self.q.wait(1, &mut self.done);
            self.reap();
        }
    }

    /// Send `buf` to `off`.
    pub(super) fn submit(&mut self, off: u64, buf: AlignedBuf) {
        self.total += buf.len() as u64;
        self.q.submit(0, IoOp::Write { off, buf });
        self.q.start();
    }

    /// Zero a range (`unmap`: the store may deallocate it).
    pub(super) fn zero(&mut self, (off, len, unmap): (u64, u64, bool)) {
        self.q.submit(0, IoOp::Zeroes { off, len, unmap });
        self.q.start();
    }

    /// Bytes sent so far.
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    fn reap(&mut self) {
        for c in self.done.drain(..) {
            if let Err(e) = c.result {
                self.first_err.get_or_insert(e);
            }
        }
    }

    /// Wait for everything sent; the first error, if any.
    pub(super) fn finish(mut self) -> io::Result<()> {
        while self.q.in_flight() > 0 {
            self.q.wait(1, &mut self.done);
            self.reap();
        }
        self.reap();
        self.first_err.map_or(Ok(()), Err)
    }
}

/// Flush the backing store and wait for it.
pub(super) fn flush_backing(q: &mut BackingQueue) -> crate::engine::error::Result<()> {
    let mut done = Vec::new();
    q.submit(0, IoOp::Flush);
    while q.in_flight() > 0 {
        q.wait(1, &mut done);
    }
    for c in done {
        c.result.map_err(crate::engine::error::Error::Backing)?;
    }
    Ok(())
}
