//! Shared mappings of files the frontend gave us (guest memory, the
//! inflight region, the dirty log), each checked before it is mapped and
//! watched for SIGBUS while it is ([`crate::fault`]).
//!
//! The frontend is input like the guest: a file shorter than the range it
//! states, an offset past its end or a size that overflows is refused
//! before anything is mapped. A file that shrinks later (a memfd without
//! `F_SEAL_SHRINK`, a `memory-backend-file`) faults on access instead: the
//! watch turns that into a failed request and a closed connection.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegion;

use crate::fault::Watch;

/// Check that `len` bytes at `offset` of `file` exist: a regular file (or
/// memfd) at least `offset + len` long, `len` not zero, nothing
/// overflowing. `what` names the mapping in the error.
pub fn check_file(file: &File, offset: u64, len: u64, what: &str) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {m}"));
    if len == 0 {
        return Err(bad("no bytes".into()));
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| bad(format!("{len} bytes at offset {offset} overflow")))?;
    if usize::try_from(len).is_err() || libc::off_t::try_from(end).is_err() {
        return Err(bad(format!("{len} bytes at offset {offset} are too many")));
    }
    if !offset.is_multiple_of(page_size()) {
        return Err(bad(format!("offset {offset} is not page aligned")));
    }
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("cannot stat the file: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(bad(format!(
            "not a regular file or memfd ({:?})",
            meta.file_type()
        )));
    }
    if meta.len() < end {
        return Err(bad(format!(
            "the file has {} bytes, fewer than the {len} stated at offset {offset}",
            meta.len()
        )));
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096).max(4096)
}

/// `len` bytes of a file at `offset`, mapped shared, read-write, watched
/// for SIGBUS; unmapped when dropped.
///
/// # Invariants
/// `ptr..ptr + len` is a live mapping for the life of `self`, watched as a
/// frontend's until just before it is unmapped.
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
    watch: Option<Watch>,
}

// SAFETY: the mapping is plain memory owned by the value; who touches it
// (and how) is the owner's business, as for any raw allocation.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Map `len` bytes of `file` from `offset` (`what` names it in
    /// errors), after [`check_file`].
    pub fn map(file: &File, len: u64, offset: u64, what: &str) -> io::Result<SharedMap> {
        check_file(file, offset, len, what)?;
        // check_file bounds both.
        let (Ok(len), Ok(off)) = (usize::try_from(len), libc::off_t::try_from(offset)) else {
            return Err(io::Error::other(format!("{what}: size or offset too big")));
        };
        // SAFETY: a fresh shared mapping of a file we hold; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut map = SharedMap {
            ptr: ptr.cast(),
            len,
            watch: None,
        };
        map.watch = Some(Watch::frontend(map.ptr, len)?);
        Ok(map)
    }

    /// The first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // Stop watching first: once unmapped, the range may be someone
        // else's.
        self.watch.take();
        // SAFETY: unmaps exactly what `map` mapped; no reference to it
        // outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What a guest memory region carries besides its bytes: the mapping it
/// is made of. vm-memory lets a region hold a bitmap of our choosing, and
/// drops it after its own (non-owning) mapping record, so this is where
/// the mapping lives; it tracks nothing (dirty pages go to the frontend's
/// log, `dirty.rs`).
#[derive(Debug, Default)]
pub struct Owner(std::sync::OnceLock<OwnedMap>);

/// A [`SharedMap`] with a `Debug` a bitmap needs.
pub struct OwnedMap(#[allow(dead_code)] SharedMap);

impl std::fmt::Debug for OwnedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnedMap({} bytes)", self.0.len)
    }
}

impl<'a> WithBitmapSlice<'a> for Owner {
    type S = ();
}

impl Bitmap for Owner {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }
    fn slice_at(&self, _offset: usize) {}
}

impl NewBitmap for Owner {
    fn with_len(_len: usize) -> Self {
        Owner::default()
    }
}

/// Map a guest memory region: `len` bytes of `file` at `offset`, checked
/// and watched, as a vm-memory region that owns the mapping.
pub fn guest_region(file: &File, offset: u64, len: u64) -> io::Result<MmapRegion<Owner>> {
    let map = SharedMap::map(file, len, offset, "guest memory region")?;
    // SAFETY: `map` is a live shared mapping of `len` bytes, readable and
    // writable; the region keeps it (in its bitmap slot) for its whole
    // life and does not unmap it itself.
    let region = unsafe {
        MmapRegion::<Owner>::build_raw(
            map.ptr,
            map.len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .map_err(|e| io::Error::other(format!("guest memory region: {e}")))?;
    let _ = region.bitmap().0.set(OwnedMap(map));
    Ok(region)
}
