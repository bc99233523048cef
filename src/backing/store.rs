//! [`Backing`]: the small synchronous trait every backing store implements,
//! and what goes with it.

use std::io;
use std::os::fd::RawFd;

use super::aligned::AlignedBuf;
use super::librbd::RbdHandle;

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
