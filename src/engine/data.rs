//! Where a request's bytes come from and go to: our own buffers (`[u8]`,
//! the bounce buffers of backing I/O, tools and tests) or memory we share
//! with a guest ([`IoVec`], never read through a Rust reference).

use crate::iovec::IoVec;
use crate::pmem::Region;

/// Bytes to store into the cache.
pub trait DataIn {
    /// Bytes in all.
    fn len(&self) -> usize;
    /// No bytes?
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy bytes `at..at+len` to `off` of the medium.
    fn store(&self, region: &Region, off: u64, at: usize, len: usize);
    /// Can what was stored be trusted (see [`IoVec::intact`])? Asked after
    /// the copy, before anything points at it.
    fn intact(&self) -> bool {
        true
    }
}

/// Room for bytes read from the cache.
pub trait DataOut {
    /// Bytes in all.
    fn len(&self) -> usize;
    /// No bytes?
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `len` bytes at `off` of the medium into bytes `at..at+len`.
    fn load(&mut self, region: &Region, off: u64, at: usize, len: usize);
    /// Set bytes `at..at+len` to zero.
    fn zero(&mut self, at: usize, len: usize);
}

impl DataIn for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn store(&self, region: &Region, off: u64, at: usize, len: usize) {
        region.write(off, &self[at..at + len]);
    }
}

impl DataIn for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn store(&self, region: &Region, off: u64, at: usize, len: usize) {
        region.write(off, &self[at..at + len]);
    }
}

impl<const N: usize> DataIn for [u8; N] {
    fn len(&self) -> usize {
        N
    }
    fn store(&self, region: &Region, off: u64, at: usize, len: usize) {
        region.write(off, &self[at..at + len]);
    }
}

impl DataIn for IoVec<'_> {
    fn len(&self) -> usize {
        IoVec::len(self)
    }
    fn store(&self, region: &Region, off: u64, at: usize, len: usize) {
        region.write_iov(off, self, at, len);
    }
    fn intact(&self) -> bool {
        IoVec::intact(self)
    }
}

impl DataOut for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn load(&mut self, region: &Region, off: u64, at: usize, len: usize) {
        region.read(off, &mut self[at..at + len]);
    }
    fn zero(&mut self, at: usize, len: usize) {
        self[at..at + len].fill(0);
    }
}

impl DataOut for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn load(&mut self, region: &Region, off: u64, at: usize, len: usize) {
        region.read(off, &mut self[at..at + len]);
    }
    fn zero(&mut self, at: usize, len: usize) {
        self[at..at + len].fill(0);
    }
}

impl<const N: usize> DataOut for [u8; N] {
    fn len(&self) -> usize {
        N
    }
    fn load(&mut self, region: &Region, off: u64, at: usize, len: usize) {
        region.read(off, &mut self[at..at + len]);
    }
    fn zero(&mut self, at: usize, len: usize) {
        self[at..at + len].fill(0);
    }
}

impl DataOut for IoVec<'_> {
    fn len(&self) -> usize {
        IoVec::len(self)
    }
    fn load(&mut self, region: &Region, off: u64, at: usize, len: usize) {
        region.read_iov(off, self, at, len);
    }
    fn zero(&mut self, at: usize, len: usize) {
        IoVec::zero(self, at, len);
    }
}
