//! The layout of a descriptor chain, and writing a request's answer into it.
//!
//! Linux and libblkio lay a request out as a 16-byte header descriptor (a
//! write's data may follow in it), at most one data descriptor and a 1-byte
//! status descriptor: [`SimpleLayout::of`] finds that in one walk with no
//! allocation. Any other layout goes through virtio-queue's Reader and
//! Writer, by byte offsets.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryLoadGuard};

use super::request::{status, HEADER_BYTES};
use super::Mem;

/// A descriptor chain, holding the guest memory table it was read with.
pub type Chain = virtio_queue::DescriptorChain<GuestMemoryLoadGuard<Mem>>;

/// Where a request laid out as Linux and libblkio lay them out keeps its
/// parts: a 16-byte header descriptor (a write's data may follow in it),
/// at most one data descriptor, and a 1-byte status descriptor.
pub struct SimpleLayout {
    /// Guest address of the header.
    pub hdr: u64,
    /// The data's guest address, length and whether the device writes it.
    pub data: Option<(u64, usize, bool)>,
    /// Guest address of the status byte.
    pub status: u64,
}

impl SimpleLayout {
    /// The chain's layout, if it is the simple one; None for anything else.
    /// One walk over at most three descriptors, with no allocation.
    pub fn of(chain: &Chain) -> Option<SimpleLayout> {
        // (address, length, device-writable) of each descriptor.
        let mut d = [(0u64, 0usize, false); 3];
        let mut n = 0;
        for desc in chain.clone() {
            if n == d.len() {
                return None;
            }
            d[n] = (desc.addr().0, desc.len() as usize, desc.is_write_only());
            n += 1;
        }
        match (n, d[0], d[1], d[2]) {
            (2, (h, hl, false), (s, 1, true), _) if hl >= HEADER_BYTES => Some(SimpleLayout {
                hdr: h,
                data: (hl > HEADER_BYTES)
                    .then(|| (h + HEADER_BYTES as u64, hl - HEADER_BYTES, false)),
                status: s,
            }),
            (3, (h, HEADER_BYTES, false), (a, l, w), (s, 1, true)) => Some(SimpleLayout {
                hdr: h,
                data: Some((a, l, w)),
                status: s,
            }),
            _ => None,
        }
    }
}

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

/// Write the status byte of a request with no data to return.
pub fn complete(chain: &Chain, st: u8) -> Done {
    let mem = chain.memory();
    if let Ok(mut w) = chain.clone().writer(mem) {
        let n = w.available_bytes();
        if n > 0 {
            if let Ok(mut s) = w.split_at(n - 1) {
                let _ = s.write_all(&[st]);
                return Done::new(chain.head_index(), 1, st);
            }
        }
    }
    Done::unanswered(chain.head_index())
}

/// Copy a finished read's `data` to the guest and write its status
/// (IOERR, with no data, when `failed`).
///
/// The chain is walked again from guest memory, which the guest may have
/// rewritten while the read was in flight: nothing about its layout at
/// start can be assumed (it may have no writable byte left, or fewer than
/// the data needs).
pub fn finish_read(chain: &Chain, failed: bool, data: &[u8]) -> Done {
    let head = chain.head_index();
    let mem = chain.memory();
    // The usual layout, mapped once; anything else takes the Writer below.
    if let Some(SimpleLayout {
        data: Some((a, l, true)),
        status,
        ..
    }) = SimpleLayout::of(chain)
    {
        if let (Ok(dst), Ok(st)) = (
            mem.get_slice(GuestAddress(a), l),
            mem.get_slice(GuestAddress(status), 1),
        ) {
            if failed || l != data.len() {
                let _ = st.write_obj(status::IOERR, 0);
                return Done::new(head, 1, status::IOERR);
            }
            // SAFETY: `get_slice` checked the bytes lie in one mapped region,
            // kept mapped by the chain's guard on the memory table; we only
            // store into them.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.ptr_guard_mut().as_ptr(), l) };
            dst.copy_from_slice(data);
            let _ = st.write_obj(status::OK, 0);
            return Done::new(head, l as u32 + 1, status::OK);
        }
    }
    let Ok(mut w) = chain.clone().writer(mem) else {
        return Done::unanswered(head);
    };
    let Some(data_w) = w.available_bytes().checked_sub(1) else {
        return Done::unanswered(head);
    };
    let Ok(mut st) = w.split_at(data_w) else {
        return Done::unanswered(head);
    };
    if failed {
        let _ = st.write_all(&[status::IOERR]);
        return Done::new(head, 1, status::IOERR);
    }
    let ok = data_w == data.len() && w.write_all(data).is_ok();
    let s = if ok { status::OK } else { status::IOERR };
    let _ = st.write_all(&[s]);
    Done::new(head, w.bytes_written() as u32 + 1, s)
}
