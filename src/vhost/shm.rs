//! A shared mapping of a file the frontend gave us (the inflight region,
//! the dirty log), unmapped when dropped.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `len` bytes of a file at `offset`, mapped shared, read-write.
///
/// # Invariants
/// `ptr..ptr + len` is a live mapping for the life of `self`.
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    /// Map `len` bytes of `file` from `offset` (`what` names it in errors).
    pub fn map(file: &File, len: u64, offset: u64, what: &str) -> io::Result<SharedMap> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let len = usize::try_from(len).map_err(|_| bad(format!("{what} too big")))?;
        let off =
            libc::off_t::try_from(offset).map_err(|_| bad(format!("{what} offset too big")))?;
        // SAFETY: a fresh shared mapping of a file we hold; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap {
            ptr: ptr.cast(),
            len,
        })
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
        // SAFETY: unmaps exactly what `map` mapped; no reference to it
        // outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
