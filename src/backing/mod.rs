//! The backing store: the disk behind the cache.
//!
//! [`Backing`] is the small synchronous trait every store implements: a raw
//! file or block device ([`FileBacking`]), and the test doubles
//! ([`MemBacking`], which can lose unflushed writes, and [`FaultyBacking`],
//! which injects errors and delays). [`BackingQueue`] is the asynchronous
//! side: one per worker thread, on io_uring when the store exposes a file
//! descriptor and the kernel allows it, on a small thread pool otherwise.
//!
//! This module knows nothing about the cache.

mod aligned;
mod faulty;
mod file;
mod mem;
mod queue;

pub use aligned::{AlignedBuf, BufPool};
pub use faulty::{FaultKind, FaultOp, FaultPlan, FaultyBacking};
pub use file::FileBacking;
pub use mem::MemBacking;
pub use queue::{BackingQueue, Completion, IoOp, QueueEngine};

use std::io;
use std::os::fd::RawFd;

/// Alignment of buffers handed to the backing store (enough for O_DIRECT on
/// any device with a logical block size up to 4 KiB).
pub const IO_ALIGN: usize = 4096;

/// A backing store. Offsets and lengths are multiples of 512.
///
/// Implementations must be safe to call from several threads at once.
pub trait Backing: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Look at the store's size again (it may have grown), remember it and
    /// return it.
    fn refresh_size(&self) -> io::Result<u64> {
        Ok(self.size())
    }
    /// Read exactly `buf.len()` bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Make `len` bytes at `off` read zeros; with `unmap` the store may
    /// deallocate them. Durable after the next `flush`, like a write. The
    /// default writes zeros.
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _ = unmap;
        write_zeros(self, off, len)
    }
    /// Human-readable description for status and logs (path, mode).
    fn describe(&self) -> String;
    /// A file descriptor that io_uring may use directly, with the alignment
    /// it needs (`Some((fd, needs_aligned_buffers))`). Test doubles return
    /// `None`, so every operation goes through the trait methods.
    fn uring_fd(&self) -> Option<(RawFd, bool)> {
        None
    }
}

/// Write zeros over `len` bytes at `off`, a megabyte at a time: the fallback
/// of [`Backing::write_zeroes`] for stores that cannot zero a range.
pub fn write_zeros<B: Backing + ?Sized>(b: &B, off: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = AlignedBuf::new(CHUNK.min(len) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        b.write_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
