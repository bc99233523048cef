//! [`AlignedBuf`]: an owned heap buffer aligned for O_DIRECT.
//!
//! O_DIRECT and io_uring on an O_DIRECT descriptor need the buffer address
//! aligned to the device's logical block size; a `Vec<u8>` only guarantees
//! alignment 1. Every buffer the queue hands to the kernel is one of these,
//! so the queue never has to bounce.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use std::sync::Arc;

/// Alignment of buffers handed to the backing store (enough for O_DIRECT on
/// any device with a logical block size up to 4 KiB).
pub const IO_ALIGN: usize = 4096;

/// Where the block of a buffer that is not a heap allocation goes back to
/// when the buffer is dropped (an [`Arena`](super::arena::Arena)).
pub trait Home: Send + Sync {
    /// Take back the block at `ptr`.
    fn release(&self, ptr: *mut u8);
}

/// An owned byte buffer whose address is a multiple of [`IO_ALIGN`]: from
/// the heap (zeroed), or cut from an arena (holding whatever its last user
/// left), to which it goes back when dropped.
///
/// A zero-length buffer allocates nothing; its pointer is still aligned.
pub struct AlignedBuf {
    /// Start of the allocation (dangling but aligned when `len == 0`).
    ptr: NonNull<u8>,
    /// Length in bytes (what I/O transfers).
    len: usize,
    /// Size of the allocation (`len <= cap`).
    cap: usize,
    /// The arena the block belongs to; None for a heap allocation.
    home: Option<Arc<dyn Home>>,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Vec<u8>`), so
// moving it to another thread moves the only handle to the bytes.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, and mutation needs `&mut`,
// so the usual borrow rules prevent data races (as for `Vec<u8>`).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The layout of a non-empty buffer of `len` bytes.
    ///
    /// Panics only if `len` rounded up to [`IO_ALIGN`] overflows `isize`,
    /// which no real allocation can reach anyway (like `Vec`'s capacity
    /// overflow).
    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, IO_ALIGN) {
            Ok(layout) => layout,
            Err(_) => panic!("AlignedBuf of {len} bytes exceeds the address space"),
        }
    }

    /// A dangling pointer that is nevertheless aligned to [`IO_ALIGN`], for
    /// empty buffers (so `as_ptr()` is aligned even then).
    fn dangling() -> NonNull<u8> {
        // `IO_ALIGN` is a non-zero power of two, so this is never null.
        NonNull::new(std::ptr::without_provenance_mut::<u8>(IO_ALIGN))
            .unwrap_or(NonNull::dangling())
    }

    /// Allocate `len` zeroed bytes aligned to [`IO_ALIGN`].
    ///
    /// Aborts on allocation failure, like `Vec`.
    pub fn new(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                ptr: Self::dangling(),
                len: 0,
                cap: 0,
                home: None,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (len > 0 was checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => AlignedBuf {
                ptr,
                len,
                cap: len,
                home: None,
            },
            None => alloc::handle_alloc_error(layout),
        }
    }

    /// A buffer over a block of `arena`, `len` of its `cap` bytes in use.
    ///
    /// # Safety
    /// `ptr..ptr+cap` must be a block of `arena`'s memory, aligned to
    /// [`IO_ALIGN`], that nothing else uses until [`Home::release`] gets it
    /// back (from this buffer's drop), and `len <= cap`.
    pub(super) unsafe fn from_arena(
        ptr: NonNull<u8>,
        len: usize,
        cap: usize,
        arena: Arc<dyn Home>,
    ) -> AlignedBuf {
        AlignedBuf {
            ptr,
            len,
            cap,
            home: Some(arena),
        }
    }

    /// A buffer over `len` bytes at `ptr` that another owner lends for an
    /// I/O: `home.release(ptr)` is called when the buffer is dropped, and
    /// until then the memory must stay valid.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be readable and writable, aligned to
    /// [`IO_ALIGN`], and stay valid and untouched by anyone else until
    /// `home.release(ptr)` is called.
    pub unsafe fn lent(ptr: NonNull<u8>, len: usize, home: Arc<dyn Home>) -> AlignedBuf {
        debug_assert_eq!(ptr.as_ptr() as usize % IO_ALIGN, 0);
        // SAFETY: the caller's guarantees are those of an arena's block.
        unsafe { AlignedBuf::from_arena(ptr, len, len, home) }
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Size of the allocation: the most [`AlignedBuf::set_len`] allows.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Shorten or lengthen the buffer within its allocation (the bytes
    /// beyond the old length hold whatever they held before).
    ///
    /// Panics if `len` exceeds [`AlignedBuf::capacity`]: callers size
    /// their own buffers, so that is a bug, never a data-driven failure.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "AlignedBuf::set_len({len}) beyond its {} bytes",
            self.cap
        );
        self.len = len;
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, shared.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes we own (zeroed at
        // allocation, or an arena's block: anonymous memory is initialised,
        // zero at first; or `len == 0` with a non-null aligned dangling
        // pointer), and `&self` keeps them from being mutated meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, exclusive.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only
        // live reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer to the first byte (aligned to [`IO_ALIGN`]).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer to the first byte (aligned to [`IO_ALIGN`]); the
    /// heap address stays the same when the `AlignedBuf` itself is moved.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(arena) = self.home.take() {
            arena.release(self.ptr.as_ptr());
        } else if self.cap != 0 {
            // SAFETY: a non-empty allocation was made in `new` with exactly
            // this layout (`cap` is its size, same alignment) and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        AlignedBuf::from_slice(self.as_slice())
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The contents are usually megabytes of sector data: print the shape.
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("ptr", &self.ptr)
            .finish()
    }
}

/// Aligned buffers kept for reuse, by exact allocation size.
///
/// The data paths allocate the same few sizes over and over; a fresh
/// zeroed allocation of a large buffer costs a memset and page faults each
/// time (a tenth of a core during writeback, measured).
#[derive(Debug)]
pub struct BufPool {
    free: std::collections::HashMap<usize, Vec<AlignedBuf>>,
    held: usize,
    max_held: usize,
}

impl BufPool {
    /// A pool holding at most `max_held` bytes of idle buffers.
    pub fn new(max_held: usize) -> BufPool {
        BufPool {
            free: Default::default(),
            held: 0,
            max_held,
        }
    }

    /// A buffer of `len` bytes (and as much capacity): a returned one
    /// (holding old data, which the caller overwrites) or a new zeroed one.
    pub fn take(&mut self, len: usize) -> AlignedBuf {
        match self.free.get_mut(&len).and_then(Vec::pop) {
            Some(buf) => {
                self.held -= len;
                buf
            }
            None => AlignedBuf::new(len),
        }
    }

    /// Give a buffer back; it is freed if the pool is full.
    pub fn give(&mut self, mut buf: AlignedBuf) {
        let len = buf.capacity();
        if len == 0 || self.held + len > self.max_held {
            return;
        }
        buf.set_len(len);
        self.held += len;
        self.free.entry(len).or_default().push(buf);
    }

    /// Bytes of idle buffers held.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortened_buffer_goes_back_to_the_pool_whole() {
        let mut pool = BufPool::new(1 << 20);
        let mut a = pool.take(65536);
        a.set_len(4096);
        assert_eq!((a.len(), a.capacity()), (4096, 65536));
        assert_eq!(a.as_slice().len(), 4096);
        let pa = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.held(), 65536, "held by capacity");
        let b = pool.take(65536);
        assert_eq!(b.as_ptr(), pa);
        assert_eq!(b.len(), 65536, "full length again");
    }

    #[test]
    #[should_panic(expected = "beyond its")]
    fn set_len_past_the_allocation_panics() {
        AlignedBuf::new(512).set_len(1024);
    }

    #[test]
    fn pool_reuses_buffers_of_the_same_length_up_to_its_limit() {
        let mut pool = BufPool::new(12288);
        let mut a = pool.take(4096);
        a[0] = 1;
        let pa = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.held(), 4096);
        assert_eq!(pool.take(8192).len(), 8192, "other lengths are new");
        let again = pool.take(4096);
        assert_eq!(again.as_ptr(), pa, "the returned buffer came back");
        assert_eq!(pool.held(), 0);
        pool.give(again);
        pool.give(AlignedBuf::new(8192));
        pool.give(AlignedBuf::new(4096)); // over the limit: freed
        assert_eq!(pool.held(), 12288);
    }

    #[test]
    fn new_buffer_is_zeroed_and_aligned() {
        for len in [1usize, 511, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::new(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0, "len {len}");
            assert!(buf.iter().all(|&b| b == 0), "len {len}");
        }
    }

    #[test]
    fn empty_buffer_is_allowed_and_aligned() {
        let mut buf = AlignedBuf::new(0);
        assert!(buf.is_empty());
        assert_eq!(buf.as_slice(), &[] as &[u8]);
        assert_eq!(buf.as_mut_slice().len(), 0);
        assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
        let copy = buf.clone();
        assert_eq!(copy.len(), 0);
    }

    #[test]
    fn writes_through_deref_mut_are_visible() {
        let mut buf = AlignedBuf::new(8192);
        buf[100] = 7;
        buf.as_mut_slice()[8191] = 9;
        assert_eq!(buf.as_slice()[100], 7);
        assert_eq!(buf[8191], 9);
        let copy = buf.clone();
        assert_eq!(copy.as_slice(), buf.as_slice());
        assert_ne!(copy.as_ptr(), buf.as_ptr());
    }

    #[test]
    fn from_slice_copies_and_aligns() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let buf = AlignedBuf::from_slice(&data);
        assert_eq!(&buf[..], &data[..]);
        assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
    }

    #[test]
    fn heap_address_survives_a_move() {
        let mut buf = AlignedBuf::new(4096);
        let before = buf.as_mut_ptr();
        let moved = Box::new(buf);
        assert_eq!(moved.as_ptr(), before as *const u8);
    }

    #[test]
    fn buffers_can_be_sent_between_threads() {
        let mut buf = AlignedBuf::new(512);
        buf[0] = 42;
        let back = std::thread::spawn(move || {
            buf[1] = 43;
            buf
        })
        .join()
        .expect("thread");
        assert_eq!(&back[..2], &[42, 43]);
    }
}
