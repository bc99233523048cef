//! What the transport above hands the disk, and what it gets back.

use crate::iovec::IoVec;

/// What a request asks of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `off` into the buffers.
    Read,
    /// Write the buffers' `len` bytes at `off`.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Make `len` bytes at `off` read zeros (the buffers are unused);
    /// `unmap`: the backing store may deallocate them (a discard).
    Zeroes {
        /// May deallocate.
        unmap: bool,
    },
}

impl Op {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Zeroes { unmap: false } => "write-zeroes",
            Op::Zeroes { unmap: true } => "discard",
        }
    }
}

/// One request: its kind, its byte range, the guest's buffers (exactly
/// `len` bytes for a read or a write) and the caller's tag, handed back
/// with the answer.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Byte offset (a multiple of 512; 0 for a flush).
    pub off: u64,
    /// Bytes (a multiple of 512; 0 for a flush).
    pub len: u64,
    /// The data: read into, or written from.
    pub buf: IoVec<'static>,
    /// The caller's name for the request.
    pub tag: u64,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done: a read's bytes are in its buffers.
    Ok,
    /// Failed (the cause is in the log); a read's buffers may hold part of
    /// the data.
    IoErr,
}

/// A request answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The request's tag.
    pub tag: u64,
    /// How it ended.
    pub status: Status,
}
