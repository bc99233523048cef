//! What the queue's engines share: an operation, its completion, and the
//! limits and helpers they all use.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

use crate::backing::aligned::AlignedBuf;

/// Offsets and lengths must be multiples of this.
pub(super) const SECTOR: u64 = 512;

/// Threads in the fallback pool.
pub(super) const POOL_THREADS: usize = 4;

/// Largest transfer one SQE asks for (the SQE length is 32 bits); longer
/// operations continue where the previous piece stopped.
pub(super) const MAX_SQE_BYTES: usize = 1 << 30;

/// Times an operation is resubmitted after EINTR/EAGAIN before its error is
/// reported.
pub(super) const MAX_RETRIES: u32 = 16;

/// Consecutive failures of `io_uring_enter` after which `Drop` gives up
/// waiting and leaks the in-flight buffers instead of hanging.
pub(super) const MAX_DROP_ENTER_FAILURES: u32 = 1000;

/// Largest ring asked for (the kernel's limit without IORING_SETUP_CLAMP).
pub(super) const MAX_RING_ENTRIES: u32 = 32768;

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
    /// Make `len` bytes at `off` read zeros ([`Backing::write_zeroes`]):
    /// `unmap` lets the store deallocate them.
    Zeroes {
        /// Byte offset (a multiple of 512).
        off: u64,
        /// Bytes (a multiple of 512).
        len: u64,
        /// May deallocate.
        unmap: bool,
    },
}

impl IoOp {
    /// A short name for messages.
    pub(super) fn name(&self) -> &'static str {
        match self {
            IoOp::Read { .. } => "read",
            IoOp::Write { .. } => "write",
            IoOp::Flush => "flush",
            IoOp::Zeroes { .. } => "write-zeroes",
        }
    }

    /// Where it starts and how many bytes it covers (0, 0 for a flush).
    pub(super) fn range(&self) -> (u64, u64) {
        match self {
            IoOp::Read { off, buf } | IoOp::Write { off, buf } => (*off, buf.len() as u64),
            IoOp::Zeroes { off, len, .. } => (*off, *len),
            IoOp::Flush => (0, 0),
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

/// Add one to an eventfd. Failure (only EAGAIN when the counter is
/// saturated, which means it is readable anyway) is ignored.
pub(super) fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local u64; the caller keeps `fd`
    // open for the duration of the call.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast::<libc::c_void>(), 8) };
}

/// The error for a negative CQE result.
pub(super) fn errno_error(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}
