//! Dirty-page logging for live migration (vhost-user LOG_SHMFD).
//!
//! While the frontend migrates the guest, it copies guest memory in rounds
//! and needs to know which pages changed behind its back. It shares a
//! bitmap (SET_LOG_BASE: one bit per 4 KiB page of guest-physical memory)
//! and sets VHOST_F_LOG_ALL; we then set the bit of every page we write:
//! the buffers a request returns data or a status in, and the used ring.
//!
//! Bits are set after the write, never before: the frontend clears a bit
//! and then copies its page, so a bit set early could be cleared and the
//! page copied before our data lands. Everything we write into guest memory
//! for a request is written before it goes into the used ring, so
//! [`Ring::put_used`](super::ring::Ring::put_used) marks the whole chain's
//! device-writable buffers, then the used ring. The frontend reads the
//! bitmap a last time after it has stopped the rings (GET_VRING_BASE),
//! so a mark made before that reply reaches the destination.
//!
//! When not migrating, the cost is two relaxed loads per returned request.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::RwLock;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::guest::{Mem, Vring};
use super::shm::SharedMap;

/// Bytes of guest memory one bit covers (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 4096;
/// Largest bitmap accepted: 1 GiB covers 32 TiB of guest memory.
const MAX_LOG_BYTES: u64 = 1 << 30;

/// Descriptor flags (virtio 1.2, 2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// The frontend's bitmap, mapped shared.
struct Bitmap(SharedMap);

// SAFETY: the mapping is only touched through atomic byte operations.
unsafe impl Send for Bitmap {}
// SAFETY: as above.
unsafe impl Sync for Bitmap {}

impl Bitmap {
    fn map(file: &File, size: u64, offset: u64) -> io::Result<Bitmap> {
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("dirty log of {size} bytes (at most {MAX_LOG_BYTES})"),
            ));
        }
        if !offset.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("dirty log at offset {offset}, not page aligned"),
            ));
        }
        SharedMap::map(file, size, offset, "dirty log").map(Bitmap)
    }

    /// Set the bits of every page of `gpa..gpa+len`; pages past the bitmap
    /// (a frontend that sized it too small) are left out.
    fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = (page / 8) as usize;
            if byte >= self.0.len() {
                return;
            }
            // SAFETY: `byte` is inside the mapping; the frontend updates the
            // same bytes atomically too.
            let cell = unsafe { &*(self.0.ptr().add(byte) as *const AtomicU8) };
            cell.fetch_or(1 << (page % 8), Ordering::Release);
        }
    }
}

/// The dirty log of one connection: the bitmap once the frontend gave it,
/// and whether the frontend logs now (VHOST_F_LOG_ALL).
#[derive(Default)]
pub struct DirtyLog {
    on: AtomicBool,
    map: RwLock<Option<Bitmap>>,
}

impl DirtyLog {
    /// Use the bitmap in `file` (SET_LOG_BASE), replacing any before it
    /// (the frontend resizes it when guest memory grows).
    pub fn set_base(&self, file: &File, size: u64, offset: u64) -> io::Result<()> {
        let b = Bitmap::map(file, size, offset)?;
        *self.map.write().expect("log lock") = Some(b);
        Ok(())
    }

    /// The frontend starts (`true`) or stops logging.
    pub fn set_logging(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    /// Is the frontend logging?
    pub fn logging(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Mark `gpa..gpa+len` written, if the frontend is logging.
    pub fn mark(&self, gpa: u64, len: u64) {
        if !self.logging() {
            return;
        }
        if let Some(b) = &*self.map.read().expect("log lock") {
            b.mark(gpa, len);
        }
    }

    /// Mark the whole used ring of `vring` written (its entries, index and
    /// avail_event), if logging.
    pub fn mark_used_ring(&self, vring: &Vring) {
        if !self.logging() {
            return;
        }
        let (at, size) = {
            let st = vring.get_ref();
            (st.get_queue().used_ring(), st.get_queue().size())
        };
        self.mark(at, 6 + 8 * u64::from(size));
    }

    /// Mark every device-writable buffer of the chain headed by `head` in
    /// the descriptor table at `table` (a ring of `size`), if logging. A
    /// descriptor outside guest memory ends the walk: such a chain was
    /// refused, and nothing was written into it.
    pub fn mark_chain(&self, mem: &Mem, table: u64, size: u16, head: u16) {
        if !self.logging() {
            return;
        }
        let guard = self.map.read().expect("log lock");
        let Some(b) = &*guard else { return };
        let read = |at: u64| -> Option<(u64, u32, u16, u16)> {
            let d: [u8; 16] = mem.read_obj(GuestAddress(at)).ok()?;
            Some((
                u64::from_le_bytes(d[0..8].try_into().ok()?),
                u32::from_le_bytes(d[8..12].try_into().ok()?),
                u16::from_le_bytes(d[12..14].try_into().ok()?),
                u16::from_le_bytes(d[14..16].try_into().ok()?),
            ))
        };
        let mut i = head;
        // A chain visits each descriptor once: a loop is the driver's bug.
        for _ in 0..size {
            if i >= size {
                return;
            }
            let Some((addr, len, flags, next)) = read(table + 16 * u64::from(i)) else {
                return;
            };
            if flags & F_INDIRECT != 0 {
                let n = (len / 16).min(u32::from(u16::MAX));
                let mut j = 0u32;
                for _ in 0..n {
                    if j >= n {
                        break;
                    }
                    let Some((a, l, f, nx)) = read(addr + 16 * u64::from(j)) else {
                        return;
                    };
                    if f & F_WRITE != 0 && mem.check_range(GuestAddress(a), l as usize) {
                        b.mark(a, u64::from(l));
                    }
                    if f & F_NEXT == 0 {
                        break;
                    }
                    j = u32::from(nx);
                }
            } else if flags & F_WRITE != 0 && mem.check_range(GuestAddress(addr), len as usize) {
                b.mark(addr, u64::from(len));
            }
            if flags & F_NEXT == 0 {
                return;
            }
            i = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: a plain memfd_create call with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"pcache-test-log".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is ours.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn bits(f: &File, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut v, 0).unwrap();
        v
    }

    #[test]
    fn marks_pages_only_while_logging() {
        let f = memfd(4096);
        let log = DirtyLog::default();
        log.set_base(&f, 4096, 0).unwrap();
        log.mark(0, 4096);
        assert!(
            bits(&f, 16).iter().all(|b| *b == 0),
            "marked while not logging"
        );
        log.set_logging(true);
        // Pages 1 and 2 (a range straddling them), page 9, page 4095*8+7 (last).
        log.mark(4096 + 4000, 200);
        log.mark(9 * 4096, 1);
        log.mark((4096 * 8 - 1) * 4096, 1);
        // Past the bitmap: ignored, no fault.
        log.mark(4096 * 8 * 4096, 4096);
        let b = bits(&f, 4096);
        assert_eq!(b[0], 0b0000_0110);
        assert_eq!(b[1], 0b0000_0010);
        assert_eq!(b[4095], 0b1000_0000);
        assert_eq!(b.iter().map(|x| x.count_ones()).sum::<u32>(), 4);
        log.set_logging(false);
        log.mark(20 * 4096, 1);
        assert_eq!(bits(&f, 4)[2], 0, "marked after logging stopped");
    }

    #[test]
    fn refuses_bad_bases() {
        let f = memfd(4096);
        let log = DirtyLog::default();
        assert!(log.set_base(&f, 0, 0).is_err());
        assert!(log.set_base(&f, 4096, 100).is_err());
        assert!(log.set_base(&f, MAX_LOG_BYTES + 1, 0).is_err());
    }
}
