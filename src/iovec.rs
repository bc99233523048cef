//! [`IoVec`]: a request's data buffers, in memory we may share with someone
//! we do not trust (a guest's RAM, mapped from the frontend).
//!
//! The guest can change those bytes at any moment, even while a request it
//! sent is in flight, which a Rust reference (`&[u8]`, `&mut [u8]`) forbids.
//! So an `IoVec` never hands one out: bytes move in and out only through raw
//! copies (`ptr::copy_nonoverlapping`, as vm-memory's own copies of more than
//! 8 bytes do), and nothing ever reads the same guest byte twice expecting
//! the same value (a checksum is taken of our copy, not of the guest's).
//!
//! It knows nothing of virtio: the vhost layer builds one from a descriptor
//! chain, tools and tests from a buffer of their own ([`IoVec::from_mut`]).
//!
//! # Invariants
//! - Every segment is valid for reads and writes for as long as the `IoVec`
//!   lives (its `keep` handle holds the mapping, or the borrow `'a` does).
//! - `len` is the sum of the segments' lengths.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::fault::Stamp;

/// One contiguous piece of an [`IoVec`].
#[derive(Debug, Clone, Copy)]
struct Seg {
    ptr: *mut u8,
    len: usize,
}

/// A list of byte ranges that together make one request's data; see the
/// module documentation.
pub struct IoVec<'a> {
    segs: SmallVec<[Seg; 2]>,
    len: usize,
    /// Keeps the memory mapped (a guest memory table) while we hold it.
    _keep: Option<Arc<dyn Send + Sync>>,
    /// For memory a frontend mapped: its connection's fault stamp.
    since: Option<Stamp>,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoVec only copies bytes in and out through raw pointers to
// memory it keeps alive (`keep`, or the borrow); which thread does so does
// not matter, and concurrent copies are the same data race a device's DMA
// has with the guest, which the guest must not rely on.
unsafe impl Send for IoVec<'_> {}
// SAFETY: as above; `&IoVec` allows nothing `IoVec` does not.
unsafe impl Sync for IoVec<'_> {}

/// A heap buffer owned by the IoVecs that share it ([`IoVec::owned`]),
/// reached only through raw pointers.
struct Owned(*mut [u8]);

// SAFETY: the buffer is only reached through the raw pointers of the
// IoVecs holding it, by raw copies, as guest memory is.
unsafe impl Send for Owned {}
// SAFETY: as above.
unsafe impl Sync for Owned {}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: made by Box::into_raw in `IoVec::owned`, freed once, when
        // the last IoVec holding it is gone.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

impl std::fmt::Debug for IoVec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVec")
            .field("segments", &self.segs.len())
            .field("len", &self.len)
            .finish()
    }
}

impl IoVec<'static> {
    /// An `IoVec` over raw ranges, each `(address, length)`, held mapped by
    /// `keep` (the guest memory table they were found in).
    ///
    /// # Safety
    /// Every range must be valid for reads and writes for as long as `keep`
    /// lives, and none may overlap memory Rust code holds a reference to.
    pub unsafe fn from_raw(
        ranges: impl IntoIterator<Item = (*mut u8, usize)>,
        keep: Arc<dyn Send + Sync>,
    ) -> IoVec<'static> {
        let mut v = IoVec::empty();
        for (ptr, len) in ranges {
            v.push(ptr, len);
        }
        v._keep = Some(keep);
        v
    }

    /// An `IoVec` that owns `bytes` (tests and tools that hand a disk a
    /// buffer of their own); read the result back with
    /// [`IoVec::copy_out`] through a [`IoVec::slice`] kept beforehand.
    pub fn owned(bytes: Vec<u8>) -> IoVec<'static> {
        let len = bytes.len();
        let raw = Box::into_raw(bytes.into_boxed_slice());
        let owner = Owned(raw);
        let mut v = IoVec::empty();
        v.push(raw.cast::<u8>(), len);
        v._keep = Some(Arc::new(owner));
        v
    }

    /// No bytes at all (a flush).
    pub fn empty() -> IoVec<'static> {
        IoVec {
            segs: SmallVec::new(),
            len: 0,
            _keep: None,
            since: None,
            _borrow: PhantomData,
        }
    }
}

impl<'a> IoVec<'a> {
    /// The same bytes, in memory a frontend mapped for a connection whose
    /// fault stamp is `since` (see [`IoVec::intact`]).
    pub fn watched(mut self, since: Stamp) -> IoVec<'a> {
        self.since = Some(since);
        self
    }

    /// Can what was copied out of these bytes be trusted? False once a
    /// frontend mapping faulted since the connection began: a page may
    /// then be a stand-in of zeros (`crate::fault`). Check after copying,
    /// before making the copy visible.
    pub fn intact(&self) -> bool {
        self.since.is_none_or(|s| s.intact())
    }

    /// An `IoVec` over a buffer of our own (tools and tests).
    pub fn from_mut(buf: &'a mut [u8]) -> IoVec<'a> {
        let mut v = IoVec {
            segs: SmallVec::new(),
            len: 0,
            _keep: None,
            since: None,
            _borrow: PhantomData,
        };
        v.push(buf.as_mut_ptr(), buf.len());
        v
    }

    /// An `IoVec` of several buffers of our own, in order (tests of
    /// scattered requests).
    pub fn from_muts(bufs: Vec<&'a mut [u8]>) -> IoVec<'a> {
        let mut v = IoVec {
            segs: SmallVec::new(),
            len: 0,
            _keep: None,
            since: None,
            _borrow: PhantomData,
        };
        for b in bufs {
            v.push(b.as_mut_ptr(), b.len());
        }
        v
    }

    fn push(&mut self, ptr: *mut u8, len: usize) {
        if len > 0 {
            self.segs.push(Seg { ptr, len });
            self.len += len;
        }
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes `at..at+len` as an `IoVec` of their own (sharing the mapping).
    ///
    /// Panics if the range is not inside this one (a bug in the caller).
    pub fn slice(&self, at: usize, len: usize) -> IoVec<'a> {
        let mut v = IoVec {
            segs: SmallVec::new(),
            len: 0,
            _keep: self._keep.clone(),
            since: self.since,
            _borrow: PhantomData,
        };
        for (p, n) in self.pieces(at, len) {
            v.push(p, n);
        }
        v
    }

    /// No bytes?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw pieces of bytes `at..at+len`, in order, for a copy that must
    /// be done with special instructions (non-temporal stores into the
    /// cache medium).
    ///
    /// Panics if the range is not inside the `IoVec`: callers size their
    /// copies from its length, so that is a bug in the caller.
    pub fn pieces(&self, at: usize, len: usize) -> Pieces<'_> {
        let end = at.checked_add(len);
        assert!(
            end.is_some_and(|e| e <= self.len),
            "IoVec range {at}+{len} outside its {} bytes",
            self.len
        );
        Pieces {
            segs: &self.segs,
            i: 0,
            skip: at,
            left: len,
        }
    }

    /// Copy bytes `at..at+dst.len()` out into `dst`.
    pub fn copy_out(&self, at: usize, dst: &mut [u8]) {
        let mut done = 0;
        for (p, n) in self.pieces(at, dst.len()) {
            // SAFETY: `p..p+n` is inside a segment (valid for reads by the
            // type's invariant); `dst` is our own buffer and cannot overlap
            // memory an IoVec points to (`from_raw`'s contract, or the
            // exclusive borrow of `from_mut`).
            unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr().add(done), n) };
            done += n;
        }
    }

    /// Copy `src` into bytes `at..at+src.len()`.
    pub fn copy_in(&self, at: usize, src: &[u8]) {
        let mut done = 0;
        for (p, n) in self.pieces(at, src.len()) {
            // SAFETY: as in `copy_out`, with the segment valid for writes.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), p, n) };
            done += n;
        }
    }

    /// Set bytes `at..at+len` to zero.
    pub fn zero(&self, at: usize, len: usize) {
        for (p, n) in self.pieces(at, len) {
            // SAFETY: `p..p+n` is inside a segment, valid for writes.
            unsafe { std::ptr::write_bytes(p, 0, n) };
        }
    }
}

/// The raw pieces of a range of an [`IoVec`]: `(address, length)`, each
/// inside one segment. See [`IoVec::pieces`].
pub struct Pieces<'v> {
    segs: &'v [Seg],
    i: usize,
    skip: usize,
    left: usize,
}

impl Iterator for Pieces<'_> {
    type Item = (*mut u8, usize);

    fn next(&mut self) -> Option<(*mut u8, usize)> {
        while self.left > 0 {
            let s = self.segs.get(self.i)?;
            self.i += 1;
            if self.skip >= s.len {
                self.skip -= s.len;
                continue;
            }
            let n = (s.len - self.skip).min(self.left);
            // wrapping_add: `skip < s.len`, so the result is inside the
            // segment; no unsafe needed to form it.
            let p = s.ptr.wrapping_add(self.skip);
            self.skip = 0;
            self.left -= n;
            return Some((p, n));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_cross_segment_boundaries() {
        let mut a = [0u8; 5];
        let mut b = [0u8; 3];
        let mut c = [0u8; 8];
        let v = IoVec::from_muts(vec![&mut a, &mut b, &mut c]);
        assert_eq!(v.len(), 16);
        let src: Vec<u8> = (1..=16).collect();
        v.copy_in(0, &src);
        let mut out = [0u8; 6];
        v.copy_out(3, &mut out);
        assert_eq!(out, [4, 5, 6, 7, 8, 9]);
        v.zero(4, 5);
        let mut all = [0u8; 16];
        v.copy_out(0, &mut all);
        assert_eq!(all, [1, 2, 3, 4, 0, 0, 0, 0, 0, 10, 11, 12, 13, 14, 15, 16]);
        let lens: Vec<usize> = v.pieces(2, 12).map(|(_, n)| n).collect();
        assert_eq!(lens, [3, 3, 6]);
        let s = v.slice(6, 4);
        assert_eq!(s.len(), 4);
        let mut four = [0u8; 4];
        s.copy_out(0, &mut four);
        assert_eq!(four, [0, 0, 0, 10]);
        drop(v);
        assert_eq!(b, [0, 0, 0]);
    }

    #[test]
    #[should_panic(expected = "outside its")]
    fn a_range_past_the_end_is_a_bug() {
        let mut a = [0u8; 4];
        IoVec::from_mut(&mut a).zero(2, 3);
    }

    #[test]
    fn an_owned_buffer_lives_as_long_as_a_slice_of_it() {
        let v = IoVec::owned(vec![1, 2, 3, 4]);
        let view = v.slice(1, 2);
        v.copy_in(2, &[9]);
        drop(v);
        let mut out = [0u8; 2];
        view.copy_out(0, &mut out);
        assert_eq!(out, [2, 9]);
    }

    #[test]
    fn empty_segments_are_dropped() {
        let mut a = [0u8; 0];
        let mut b = [7u8; 2];
        let v = IoVec::from_muts(vec![&mut a, &mut b]);
        assert_eq!(v.pieces(0, 2).count(), 1);
        assert!(IoVec::empty().is_empty());
    }
}
