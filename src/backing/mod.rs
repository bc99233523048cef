//! The backing store: the disk behind the cache.
//!
//! [`Backing`] is the small synchronous trait every store implements: a raw
//! file or block device ([`FileBacking`]) and a Ceph RBD image
//! ([`RbdBacking`]); the test doubles live in `crate::testing`.
//! [`BackingQueue`] is the asynchronous
//! side: one per worker thread, on io_uring when the store exposes a file
//! descriptor and the kernel allows it, on librbd's asynchronous calls for
//! an RBD image, on a small thread pool otherwise. [`BackingSpec`] is what
//! `--backing` names, and [`open`] opens it.
//!
//! This module knows nothing about the cache.

mod aligned;
mod file;
mod queue;
mod rbd;
mod spec;

pub use aligned::{AlignedBuf, BufPool};
#[cfg(any(test, feature = "test-doubles"))]
pub(crate) use file::check_range;
pub use file::FileBacking;
pub use queue::{BackingQueue, Completion, IoOp, QueueEngine};
pub use rbd::{RbdBacking, RbdHandle, RbdSpec, DEFAULT_READ_TIMEOUT};
pub use spec::BackingSpec;

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
    /// The image handle, for a store that is an RBD image: the queue then
    /// uses librbd's asynchronous calls.
    fn rbd(&self) -> Option<RbdHandle> {
        None
    }
    /// Call `f` (from another thread) whenever the store may have changed
    /// size behind our back. Returns false if the store cannot tell; files
    /// cannot (an operator runs `pcache resize`).
    fn watch_size(&self, f: Box<dyn Fn() + Send + Sync>) -> io::Result<bool> {
        let _ = f;
        Ok(false)
    }
    /// Become the store's one writer before writing it (an RBD image's
    /// exclusive lock; a file has no owner). Fails, naming the holder, if
    /// another client holds it. Opening alone claims nothing, so a live
    /// migration's destination can open the store while the source writes.
    fn claim(&self) -> io::Result<()> {
        Ok(())
    }
    /// Make writes durable and stop being the store's writer (a live
    /// migration's switchover hands the store to the destination). Nothing
    /// may be written until [`Backing::claim`] again.
    fn hand_off(&self) -> io::Result<()> {
        self.flush()
    }
    /// Let go of the store at a clean stop, before the process exits: make
    /// writes durable and release what we hold (an RBD image's exclusive
    /// lock, so the next owner need not wait for it to time out). Nothing
    /// may be written afterwards.
    fn release(&self) -> io::Result<()> {
        self.hand_off()
    }
}

/// How to open a backing store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-only (an RBD image is then not locked).
    pub read_only: bool,
    /// Claim the store ([`Backing::claim`]) once open, unless read-only.
    pub claim: bool,
    /// How long an RBD read may wait for the cluster ([`DEFAULT_READ_TIMEOUT`]
    /// if `None`).
    pub read_timeout: Option<std::time::Duration>,
    /// Where an RBD image's lock owner is recorded (see
    /// [`RbdBacking::open`]); the caller holds the cache whose previous
    /// owner wrote it.
    pub lock_record: Option<std::path::PathBuf>,
}

/// Open the store `spec` names.
pub fn open(spec: &BackingSpec, o: &OpenOptions) -> io::Result<Box<dyn Backing>> {
    Ok(match spec {
        BackingSpec::File(p) => Box::new(FileBacking::open(p, o.read_only)?),
        BackingSpec::Rbd(r) => {
            let mut b = RbdBacking::open(r, o.read_only, o.lock_record.as_deref())?;
            b.set_read_timeout(o.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT));
            if o.claim && !o.read_only {
                b.claim()?;
            }
            Box::new(b)
        }
    })
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
