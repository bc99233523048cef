//! The I/O memory budget of one disk (`--io-memory`): every buffer the disk
//! takes for a request (a read miss and its fill, a write on its way to the
//! backing store) and for writeback comes out of it, so what a guest sends
//! never decides how much memory pcache takes.
//!
//! Two arenas ([`Arena`]): the guests' share and writeback's reserve (a
//! quarter, at least 1 MiB). Writeback frees the cache, so it must never
//! wait for the guests' buffers, and they must never wait for its own.
//! Requests are cut into pieces of at most one block ([`MAX_BLOCK`]), so a
//! large request never needs more than one piece at a time, and a small one
//! never waits long behind it.
//!
//! librbd copies what it is asked to write and keeps the copy until the
//! write completes, so in front of an RBD image a write charges its arena
//! twice its size (a block twice as large, half of it never touched).

use std::io;
use std::sync::Arc;

use crate::backing::arena::MAX_BLOCK;
use crate::backing::{AlignedBuf, Arena};

/// The default budget: enough for a small VM's requests at full speed.
pub const DEFAULT_IO_MEMORY: u64 = 64 << 20;
/// The smallest budget accepted: a block for the guests' requests and one
/// for writeback, and room beside them.
pub const MIN_IO_MEMORY: u64 = 4 << 20;

/// One disk's I/O memory.
#[derive(Debug)]
pub struct Budget {
    guest: Arc<Arena>,
    writeback: Arc<Arena>,
    /// Writes are copied by the backing store's client (librbd).
    copied_writes: bool,
}

impl Budget {
    /// A budget of `total` bytes (at least [`MIN_IO_MEMORY`]); with
    /// `copied_writes`, the backing store keeps a copy of every write in
    /// flight, which is charged too.
    pub fn new(total: u64, copied_writes: bool) -> io::Result<Budget> {
        if total < MIN_IO_MEMORY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--io-memory {total} is below the minimum of {MIN_IO_MEMORY} bytes"),
            ));
        }
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        let wb = (total / 4).max(MAX_BLOCK);
        Ok(Budget {
            guest: Arena::new("guest", total - wb)?,
            writeback: Arena::new("writeback", wb)?,
            copied_writes,
        })
    }

    /// Largest piece a read is cut into.
    pub fn read_piece(&self) -> usize {
        MAX_BLOCK
    }

    /// Largest piece a write to the backing store is cut into.
    pub fn write_piece(&self) -> usize {
        if self.copied_writes {
            MAX_BLOCK / 2
        } else {
            MAX_BLOCK
        }
    }

    /// A buffer for `len` bytes read from the backing store, or None until
    /// memory comes back (`who` names the request; see [`Arena::alloc`]).
    pub fn read_buf(&self, len: usize, who: u64) -> Option<AlignedBuf> {
        self.guest.alloc(len, len, who)
    }

    /// A buffer for `len` bytes written to the backing store.
    pub fn write_buf(&self, len: usize, who: u64) -> Option<AlignedBuf> {
        let charge = if self.copied_writes { 2 * len } else { len };
        self.guest.alloc(len, charge, who)
    }

    /// The guests' share.
    pub fn guest(&self) -> &Arc<Arena> {
        &self.guest
    }

    /// Writeback's reserve.
    pub fn writeback(&self) -> &Arc<Arena> {
        &self.writeback
    }

    /// Does the backing store copy writes (charged twice)?
    pub fn copied_writes(&self) -> bool {
        self.copied_writes
    }

    /// Bytes of the budget, both shares.
    pub fn bytes(&self) -> u64 {
        (self.guest.bytes() + self.writeback.bytes()) as u64
    }

    /// Give the pages of every free buffer back to the kernel.
    pub fn trim(&self) {
        self.guest.trim();
        self.writeback.trim();
    }
}
