//! [`Arena`]: a fixed amount of memory for I/O buffers, so that what a
//! guest sends can never make the process take more.
//!
//! An arena is one anonymous mapping of its whole size, made at once but
//! touched only as buffers are used; buffers are cut from it by a buddy
//! allocator (4 KiB to 1 MiB blocks, each aligned to its size, so every
//! buffer suits O_DIRECT) and come back to it when dropped, wherever that
//! happens (a buffer librbd still holds comes back when librbd lets go).
//! When nothing is free, [`Arena::alloc`] says so and the caller waits for
//! [`Arena::watch`] to fire: the arena never grows. [`Arena::trim`] gives the
//! pages of free blocks back to the kernel (when a guest disconnects).
//!
//! A large request can be passed over by small ones that fit while it
//! waits; to stop that from going on forever, the first request that finds
//! no room for a large block reserves it ([`Arena::alloc`]'s `who`): from
//! then on others are served only from what is free beyond it.
//!
//! # Invariants
//! - Every 4 KiB unit is in exactly one block: free (in `free[order]`) or
//!   allocated (recorded in `allocated`).
//! - Two free buddies of the same order never both sit in the free lists.
#![allow(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use super::aligned::{AlignedBuf, Home};

/// Smallest block: 4 KiB (also the alignment O_DIRECT needs here).
pub const MIN_BLOCK: usize = 4096;
/// Largest block: 1 MiB. Larger buffers are not handed out: requests are
/// cut into pieces of at most this much.
pub const MAX_BLOCK: usize = 1 << 20;
const MAX_ORDER: usize = (MAX_BLOCK / MIN_BLOCK).trailing_zeros() as usize;

/// The buddy allocator's state.
#[derive(Debug)]
struct Buddy {
    /// Free blocks of each order, by first unit.
    free: Vec<BTreeSet<u32>>,
    /// Order of each allocated block, by first unit.
    allocated: HashMap<u32, u8>,
    /// Bytes in allocated blocks.
    used: usize,
    /// A waiter that reserved room: (who, bytes).
    reserved: Option<(u64, usize)>,
    /// Eventfds to signal when memory comes back, by waiter.
    watchers: Vec<(u64, RawFd)>,
}

/// Memory for I/O buffers; see the module documentation. Shared by the
/// threads that use it (`Arc`).
pub struct Arena {
    base: NonNull<u8>,
    bytes: usize,
    name: &'static str,
    state: Mutex<Buddy>,
}

// SAFETY: the mapping is owned by the arena and only reached through
// buffers handed out under the lock, each owning a disjoint block.
unsafe impl Send for Arena {}
// SAFETY: as above; every shared method takes the lock.
unsafe impl Sync for Arena {}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("name", &self.name)
            .field("bytes", &self.bytes)
            .field("used", &self.used())
            .finish()
    }
}

fn order_of(bytes: usize) -> Option<usize> {
    let units = bytes.max(1).div_ceil(MIN_BLOCK).next_power_of_two();
    let o = units.trailing_zeros() as usize;
    (o <= MAX_ORDER).then_some(o)
}

impl Arena {
    /// An arena of `bytes` (rounded down to whole megabytes, at least one),
    /// named for messages. Reserves address space only.
    pub fn new(name: &'static str, bytes: usize) -> io::Result<Arc<Arena>> {
        let tops = (bytes / MAX_BLOCK).max(1);
        let bytes = tops * MAX_BLOCK;
        // Over-map by one block to align the base to MAX_BLOCK, so every
        // block is aligned to its own size.
        let map_len = bytes + MAX_BLOCK;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot reserve {bytes} bytes for the {name} I/O memory: {e}"),
            ));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(MAX_BLOCK);
        let (head, tail) = (aligned - start, start + map_len - (aligned + bytes));
        // SAFETY: both ranges lie inside the mapping just made and are not
        // used: unmapping them leaves exactly `aligned..aligned+bytes`.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + bytes) as *mut libc::c_void, tail);
            }
        }
        let mut free = vec![BTreeSet::new(); MAX_ORDER + 1];
        let units_per_top = (MAX_BLOCK / MIN_BLOCK) as u32;
        free[MAX_ORDER] = (0..tops as u32).map(|t| t * units_per_top).collect();
        Ok(Arc::new(Arena {
            base: NonNull::new(aligned as *mut u8).expect("mmap never returns null"),
            bytes,
            name,
            state: Mutex::new(Buddy {
                free,
                allocated: HashMap::new(),
                used: 0,
                reserved: None,
                watchers: Vec::new(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Buddy> {
        // The state is consistent at every unlock: a panic elsewhere while
        // holding it cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes handed out now (blocks, rounded up to powers of two).
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// A buffer of `len` bytes (at most [`MAX_BLOCK`]) taking a block of at
    /// least `charge` bytes (more than `len` to account for a copy someone
    /// else makes of it), or None when there is no room. `who` identifies
    /// the caller: if a block of this size is found nowhere, `who` reserves
    /// it, and others are served only beyond it until `who` gets one (or
    /// calls [`Arena::forget`]).
    ///
    /// The bytes are whatever a previous user left: the caller overwrites
    /// them.
    pub fn alloc(self: &Arc<Self>, len: usize, charge: usize, who: u64) -> Option<AlignedBuf> {
        let order = order_of(charge.max(len))?;
        let size = MIN_BLOCK << order;
        let mut st = self.lock();
        if let Some((holder, want)) = st.reserved {
            if holder != who && st.used + want + size > self.bytes {
                return None;
            }
        }
        let Some(unit) = st.take(order) else {
            if st.reserved.is_none() {
                st.reserved = Some((who, size));
            }
            return None;
        };
        if st.reserved.is_some_and(|(h, _)| h == who) {
            st.reserved = None;
        }
        st.allocated.insert(unit, order as u8);
        st.used += size;
        drop(st);
        let ptr = self.base.as_ptr().wrapping_add(unit as usize * MIN_BLOCK);
        let home: Arc<dyn Home> = self.clone();
        // SAFETY: the block `unit..unit+2^order` lies inside the mapping and
        // was free: nothing else refers to it until the buffer comes back
        // through `release`.
        Some(unsafe { AlignedBuf::from_arena(NonNull::new(ptr)?, len, size, home) })
    }

    /// Signal the eventfd `fd` when memory next comes back (once), for
    /// `who`. The caller keeps `fd` open until [`Arena::forget`].
    pub fn watch(&self, who: u64, fd: RawFd) {
        let mut st = self.lock();
        if !st.watchers.iter().any(|&(w, _)| w == who) {
            st.watchers.push((who, fd));
        }
    }

    /// `who` no longer waits: drop its watch and its reservation.
    pub fn forget(&self, who: u64) {
        let mut st = self.lock();
        st.watchers.retain(|&(w, _)| w != who);
        if st.reserved.is_some_and(|(h, _)| h == who) {
            st.reserved = None;
            // Others may fit now.
            for (_, fd) in st.watchers.drain(..) {
                signal(fd);
            }
        }
    }

    /// Return the pages of every free block to the kernel: the arena then
    /// takes no memory but for the buffers in use.
    pub fn trim(&self) {
        let st = self.lock();
        for (order, blocks) in st.free.iter().enumerate() {
            for &unit in blocks {
                let p = self.base.as_ptr().wrapping_add(unit as usize * MIN_BLOCK);
                // SAFETY: a free block inside our own mapping: nothing uses
                // its bytes, and MADV_DONTNEED on private anonymous memory
                // only replaces them with zero pages.
                unsafe { libc::madvise(p.cast(), MIN_BLOCK << order, libc::MADV_DONTNEED) };
            }
        }
    }
}

impl Home for Arena {
    /// Give a block back (called by [`AlignedBuf`]'s drop).
    fn release(&self, ptr: *mut u8) {
        let unit = ((ptr as usize - self.base.as_ptr() as usize) / MIN_BLOCK) as u32;
        let mut st = self.lock();
        let Some(order) = st.allocated.remove(&unit) else {
            tracing::error!(
                arena = self.name,
                unit,
                "a buffer came back that was never handed out"
            );
            return;
        };
        st.used -= MIN_BLOCK << order;
        st.put(unit, order as usize);
        for (_, fd) in st.watchers.drain(..) {
            signal(fd);
        }
    }
}

impl Buddy {
    /// Take a free block of `order`, splitting a larger one if needed.
    fn take(&mut self, order: usize) -> Option<u32> {
        let from = (order..=MAX_ORDER).find(|&o| !self.free[o].is_empty())?;
        let unit = self.free[from].pop_first()?;
        for o in (order..from).rev() {
            // Keep the lower half, free the upper.
            self.free[o].insert(unit + (1 << o));
        }
        Some(unit)
    }

    /// Free the block at `unit` of `order`, merging it with its buddy while
    /// the buddy is free too.
    fn put(&mut self, mut unit: u32, mut order: usize) {
        while order < MAX_ORDER {
            let buddy = unit ^ (1 << order);
            if !self.free[order].remove(&buddy) {
                break;
            }
            unit = unit.min(buddy);
            order += 1;
        }
        self.free[order].insert(unit);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // Every buffer holds an Arc to the arena, so none is left.
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// Add one to an eventfd (EAGAIN means it is readable already).
fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; the watcher keeps `fd` open
    // while it is registered.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(a: &Arena) -> usize {
        let pages = a.bytes / 4096;
        let mut v = vec![0u8; pages];
        // SAFETY: mincore on our own mapping, with one byte per page.
        let rc = unsafe { libc::mincore(a.base.as_ptr().cast(), a.bytes, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        v.iter().filter(|&&b| b & 1 != 0).count() * 4096
    }

    #[test]
    fn blocks_split_merge_and_never_exceed_the_arena() {
        let a = Arena::new("test", 2 << 20).unwrap();
        let mut bufs = Vec::new();
        while let Some(b) = a.alloc(4096, 4096, 1) {
            assert_eq!(b.as_ptr() as usize % 4096, 0);
            bufs.push(b);
        }
        assert_eq!(bufs.len(), 512);
        assert_eq!(a.used(), 2 << 20);
        // A 1 MiB block needs a whole aligned megabyte free.
        a.forget(1);
        bufs.truncate(300);
        assert!(
            a.alloc(1 << 20, 1 << 20, 2).is_none(),
            "half of the second megabyte is in use"
        );
        bufs.truncate(0);
        assert_eq!(a.used(), 0);
        let big: Vec<_> = (0..2)
            .map(|_| a.alloc(1 << 20, 1 << 20, 2).unwrap())
            .collect();
        assert_eq!(
            big[0].as_ptr() as usize % (1 << 20),
            0,
            "aligned to its size"
        );
        assert!(a.alloc(512, 512, 3).is_none());
    }

    #[test]
    fn a_large_waiter_is_not_passed_over_forever() {
        let a = Arena::new("test", 1 << 20).unwrap();
        let small: Vec<_> = (0..255).map(|_| a.alloc(4096, 4096, 1).unwrap()).collect();
        assert!(
            a.alloc(1 << 20, 1 << 20, 9).is_none(),
            "9 reserves a megabyte"
        );
        assert!(
            a.alloc(4096, 4096, 1).is_none(),
            "nothing beyond the reservation"
        );
        drop(small);
        let b = a.alloc(1 << 20, 1 << 20, 9).expect("the reserver gets it");
        drop(b);
        assert!(a.alloc(4096, 4096, 1).is_some(), "the reservation is gone");
    }

    #[test]
    fn a_charge_takes_a_larger_block_than_the_buffer() {
        let a = Arena::new("test", 1 << 20).unwrap();
        let b = a.alloc(256 << 10, 512 << 10, 1).unwrap();
        assert_eq!(b.len(), 256 << 10);
        assert_eq!(a.used(), 512 << 10);
        assert!(a.alloc(1, 2 << 20, 1).is_none(), "no block that large");
    }

    #[test]
    fn trim_gives_free_pages_back() {
        let a = Arena::new("test", 4 << 20).unwrap();
        let mut keep = a.alloc(4096, 4096, 1).unwrap();
        {
            let mut b = a.alloc(1 << 20, 1 << 20, 1).unwrap();
            b.as_mut_slice().fill(7);
            keep.as_mut_slice().fill(1);
        }
        assert!(resident(&a) >= (1 << 20) + 4096);
        a.trim();
        assert_eq!(resident(&a), 4096, "only the buffer in use stays");
        assert!(keep.iter().all(|&b| b == 1));
    }

    #[test]
    fn a_returned_buffer_wakes_a_watcher_once() {
        let a = Arena::new("test", 1 << 20).unwrap();
        let b = a.alloc(1 << 20, 1 << 20, 1).unwrap();
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        a.watch(2, fd);
        drop(b);
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a live local.
        let r = unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
        assert_eq!((r, n), (8, 1));
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    }
}
