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

use vm_memory::GuestMemoryBackend;

use super::guest::Mem;
use super::request::{status, HEADER_BYTES, RANGE_BYTES};
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

/// A chain's bytes, mapped.
pub struct Bytes {
    /// Every device-readable byte, in order.
    pub readable: IoVec<'static>,
    /// Every device-writable byte, in order (the status is the last).
    pub writable: IoVec<'static>,
}

impl Bytes {
    /// Map the descriptors of `chain`, found in the memory table `mem`
    /// (the one the chain holds). None if any lies outside guest memory:
    /// nothing can be written back then, not even a status.
    pub fn of(chain: &Chain, mem: &Arc<Mem>) -> Option<Bytes> {
        let mut r: smallvec::SmallVec<[(*mut u8, usize); 4]> = smallvec::SmallVec::new();
        let mut w: smallvec::SmallVec<[(*mut u8, usize); 4]> = smallvec::SmallVec::new();
        for desc in chain.clone() {
            let list = if desc.is_write_only() { &mut w } else { &mut r };
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            // A descriptor may span two memory regions: one piece each.
            for s in mem.get_slices(desc.addr(), len) {
                let s = s.ok()?;
                list.push((s.ptr_guard_mut().as_ptr(), s.len()));
            }
        }
        let keep: Arc<dyn Send + Sync> = mem.clone();
        // SAFETY: every range was checked by `get_slices` to lie in a
        // region of `mem`, which `keep` holds mapped for as long as the
        // IoVecs live; guest memory is never referenced by Rust code.
        let (readable, writable) =
            unsafe { (IoVec::from_raw(r, keep.clone()), IoVec::from_raw(w, keep)) };
        Some(Bytes { readable, writable })
    }

    /// The 16-byte header, if there are that many readable bytes.
    pub fn header(&self) -> Option<[u8; HEADER_BYTES]> {
        let mut h = [0u8; HEADER_BYTES];
        (self.readable.len() >= HEADER_BYTES).then(|| {
            self.readable.copy_out(0, &mut h);
            h
        })
    }

    /// The DISCARD / WRITE_ZEROES range after the header, if there.
    pub fn range(&self) -> Option<[u8; RANGE_BYTES]> {
        let mut r = [0u8; RANGE_BYTES];
        (self.readable.len() >= HEADER_BYTES + RANGE_BYTES).then(|| {
            self.readable.copy_out(HEADER_BYTES, &mut r);
            r
        })
    }

    /// Writable bytes before the status byte; None with no writable byte.
    pub fn data_writable(&self) -> Option<usize> {
        self.writable.len().checked_sub(1)
    }

    /// Where the status byte goes.
    pub fn status(&self) -> Option<IoVec<'static>> {
        let n = self.data_writable()?;
        Some(self.writable.slice(n, 1))
    }
}

/// Write `st` into the status byte `at` and say what goes in the used
/// ring: `data` bytes of a read's answer, plus the status byte.
pub fn answer(head: u16, at: &IoVec<'_>, st: u8, data: u32) -> Done {
    at.copy_in(0, &[st]);
    let data = if st == status::OK { data } else { 0 };
    Done::new(head, data + 1, st)
}
