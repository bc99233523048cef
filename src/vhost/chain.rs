//! A descriptor chain's bytes, and writing a request's answer into it.
//!
//! The chain is read by byte offsets, not by descriptor (VERSION_1 allows
//! any layout): its device-readable bytes in order, then its device-writable
//! bytes in order. The header is the first 16 readable bytes (a DISCARD or
//! WRITE_ZEROES range the next 16), a write's data the readable bytes after
//! them, a read's data every writable byte but the last, which is the
//! status. Each descriptor is mapped into our address space once, as
//! [`IoVec`] pieces that keep the guest memory table they were found in
//! mapped; nothing is copied until the disk copies the data itself.
//!
//! Linux and libblkio send a 16-byte header descriptor, one data
//! descriptor and a 1-byte status descriptor: that is three descriptors
//! walked and three mappings, with no allocation.
#![allow(unsafe_code)]

use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::GuestMemoryBackend;

use super::guest::Mem;
use super::request::{status, HEADER_BYTES, RANGE_BYTES};
use crate::fault::Stamp;
use crate::iovec::IoVec;

/// A descriptor chain, holding the guest memory table it was read with.
pub type Chain = virtio_queue::DescriptorChain<vm_memory::GuestMemoryLoadGuard<Mem>>;

/// A request answered: its head and used length, for the used ring, and
/// the status it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Head of its descriptor chain.
    pub head: u16,
    /// Bytes written into the chain, status byte included.
    pub len: u32,
    /// The status byte written.
    pub status: u8,
}

impl Done {
    /// Answered with `status`, `len` bytes written.
    pub fn new(head: u16, len: u32, status: u8) -> Done {
        Done { head, len, status }
    }

    /// Returned with nothing written, not even a status (its chain has no
    /// writable byte, or lies outside guest memory): counted as an error.
    pub fn unanswered(head: u16) -> Done {
        Done::new(head, 0, status::IOERR)
    }
}

/// Pieces of guest memory: (address in our mapping, length).
type Pieces = SmallVec<[(*mut u8, usize); 4]>;

/// A chain's bytes, mapped: its device-readable bytes in order, and its
/// device-writable bytes in order (the status is the last).
pub struct Bytes<'m> {
    readable: Pieces,
    readable_len: usize,
    writable: Pieces,
    writable_len: usize,
    mem: &'m Arc<Mem>,
    since: Stamp,
}

impl<'m> Bytes<'m> {
    /// Map the descriptors of `chain`, found in the memory table `mem`
    /// (the one the chain holds). None if any lies outside guest memory:
    /// nothing can be written back then, not even a status. `since`: the
    /// connection's fault stamp, which the request's buffers carry.
    pub fn of(chain: &Chain, mem: &'m Arc<Mem>, since: Stamp) -> Option<Bytes<'m>> {
        let mut b = Bytes {
            readable: SmallVec::new(),
            readable_len: 0,
            writable: SmallVec::new(),
            writable_len: 0,
            mem,
            since,
        };
        for desc in chain.clone() {
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            let (list, total) = if desc.is_write_only() {
                (&mut b.writable, &mut b.writable_len)
            } else {
                (&mut b.readable, &mut b.readable_len)
            };
            *total += len;
            // Most descriptors lie in one region; one that spans two is
            // mapped a piece per region.
            if let Ok(s) = mem.get_slice(desc.addr(), len) {
                list.push((s.ptr_guard_mut().as_ptr(), len));
                continue;
            }
            for s in mem.get_slices(desc.addr(), len) {
                let s = s.ok()?;
                list.push((s.ptr_guard_mut().as_ptr(), s.len()));
            }
        }
        Some(b)
    }

    /// Device-readable bytes.
    pub fn readable_len(&self) -> usize {
        self.readable_len
    }

    /// Copy readable bytes `at..at+out.len()` out (the caller checked they
    /// are there).
    fn copy_readable(&self, mut at: usize, out: &mut [u8]) {
        let mut done = 0;
        for &(p, n) in &self.readable {
            if done == out.len() {
                break;
            }
            if at >= n {
                at -= n;
                continue;
            }
            let k = (n - at).min(out.len() - done);
            // SAFETY: `p..p+n` lies in a region of the memory table the
            // caller holds (`of` checked it); `out` is our own buffer.
            unsafe { std::ptr::copy_nonoverlapping(p.add(at), out.as_mut_ptr().add(done), k) };
            done += k;
            at = 0;
        }
    }

    /// The 16-byte header, if there are that many readable bytes.
    pub fn header(&self) -> Option<[u8; HEADER_BYTES]> {
        let mut h = [0u8; HEADER_BYTES];
        (self.readable_len >= HEADER_BYTES).then(|| {
            self.copy_readable(0, &mut h);
            h
        })
    }

    /// The DISCARD / WRITE_ZEROES range after the header, if there.
    pub fn range(&self) -> Option<[u8; RANGE_BYTES]> {
        let mut r = [0u8; RANGE_BYTES];
        (self.readable_len >= HEADER_BYTES + RANGE_BYTES).then(|| {
            self.copy_readable(HEADER_BYTES, &mut r);
            r
        })
    }

    /// Writable bytes before the status byte; None with no writable byte.
    pub fn data_writable(&self) -> Option<usize> {
        self.writable_len.checked_sub(1)
    }

    /// An `IoVec` of `len` of `pieces`' bytes from byte `at`, keeping the
    /// memory table mapped.
    fn iovec(&self, writable: bool, at: usize, len: usize) -> IoVec<'static> {
        let keep: Arc<dyn Send + Sync> = self.mem.clone();
        let pieces = if writable {
            &self.writable
        } else {
            &self.readable
        };
        let (mut skip, mut left) = (at, len);
        let range = pieces.iter().filter_map(move |&(p, n)| {
            if skip >= n {
                skip -= n;
                return None;
            }
            let k = (n - skip).min(left);
            let piece = (p.wrapping_add(skip), k);
            skip = 0;
            left -= k;
            (k > 0).then_some(piece)
        });
        // SAFETY: every piece lies in a region of `self.mem` (`of` checked
        // it), and the range inside it; `keep` holds the table mapped for as
        // long as the IoVec lives; guest memory is never referenced by Rust
        // code.
        unsafe { IoVec::from_raw(range, keep) }.watched(self.since)
    }

    /// The readable bytes `at..at+len` (a write's data).
    pub fn readable(&self, at: usize, len: usize) -> IoVec<'static> {
        self.iovec(false, at, len)
    }

    /// The first `len` writable bytes (a read's data).
    pub fn writable(&self, len: usize) -> IoVec<'static> {
        self.iovec(true, 0, len)
    }

    /// Where the status byte goes.
    pub fn status(&self) -> Option<StatusByte> {
        let &(p, n) = self.writable.last()?;
        // SAFETY: the last byte of the last writable piece, which lies in a
        // region of `self.mem` (`of` checked it).
        Some(StatusByte(p.wrapping_add(n - 1)))
    }
}

/// The status byte of a request in guest memory. Valid while the memory
/// table it was found in is held (by the batch that took the request, or by
/// the record of a request the disk answers later).
pub struct StatusByte(*mut u8);

// SAFETY: a pointer into guest memory, written once with a volatile store
// by whichever thread answers the request while the table is held.
unsafe impl Send for StatusByte {}

impl StatusByte {
    /// Store the status.
    fn set(&self, v: u8) {
        // SAFETY: the byte lies in guest memory kept mapped by the holder
        // of its table (see the type's documentation); a volatile store
        // makes no assumption about what the guest does with it.
        unsafe { std::ptr::write_volatile(self.0, v) };
    }
}

/// Write `st` into the status byte `at` and say what goes in the used
/// ring: `data` bytes of a read's answer, plus the status byte.
pub fn answer(head: u16, at: &StatusByte, st: u8, data: u32) -> Done {
    at.set(st);
    let data = if st == status::OK { data } else { 0 };
    Done::new(head, data + 1, st)
}
