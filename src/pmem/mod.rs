//! The persistent region: the cache medium mapped into memory, and the
//! primitives that make stores to it durable.
//!
//! Three media, chosen at run time by [`Region::open`]:
//!
//! - a device-DAX character device (`/dev/daxX.Y`): mapped shared; stores are
//!   made durable with a cache-line write-back instruction per line (clwb,
//!   else clflushopt, else clflush, picked from CPUID) and an `sfence` at each
//!   persistence point;
//! - a file on a DAX file system: mapped `MAP_SHARED_VALIDATE | MAP_SYNC`,
//!   then persisted like device DAX;
//! - any other file (tmpfs, ext4): mapped shared. A store is in the page
//!   cache at once, so it survives a crash of the process; the dirty ranges
//!   are `msync`ed at each persistence point, so a completed persist also
//!   survives power loss where the file system is on a real disk.
//!
//! What the safe API guarantees: every range passed in lies inside the
//! mapping (checked, a violation is a bug in the caller and panics with the
//! range); after `write(off, ..)` and then `persist()`, the bytes are as
//! durable as [`Durability`] says.
//!
//! Concurrent callers must not write the same bytes at once, nor read bytes
//! another thread is writing; the engine guarantees this through segment
//! ownership and generations.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::iovec::IoVec;

/// Bytes of a cache line, the unit of a flush instruction.
const LINE_BYTES: usize = 64;
/// Granularity of dirty tracking for msync (1 MiB: a 16 MiB segment is 16
/// bits, and msync of a mostly clean 1 MiB range costs a few microseconds).
const DIRTY_CHUNK_SHIFT: u32 = 20;

/// Errors opening the region.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path could not be opened.
    #[error("Cannot open cache medium {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a character (devdax) device.
    #[error("Cache medium {0} is not a regular file or a device-DAX character device")]
    NotFileOrDax(PathBuf),
    /// The size could not be read.
    #[error("Cannot read the size of cache medium {path}")]
    Size {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// mmap failed.
    #[error("Cannot map cache medium {path} ({len} bytes)")]
    Map {
        /// Path.
        path: PathBuf,
        /// Bytes asked for.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// What a persisted store survives on this medium. On either, every store
/// survives the death of the process: the mapping is shared, so the stores
/// are in the medium (or the page cache) the moment they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// DAX: a persisted store survives power loss.
    Dax,
    /// Plain file: a persisted store (msync done) survives power loss only
    /// if the file system is on durable storage (not tmpfs).
    File,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Dax => {
                "completed writes survive a crash of pcache; flushed writes survive power loss (DAX, cache-line flush)"
            }
            Durability::File => {
                "completed writes survive a crash of pcache; flushed writes survive power loss only if the file system is on durable storage (page cache, msync at flush)"
            }
        })
    }
}

/// How stores are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistMode {
    /// Flush cache lines as they are written; `sfence` at persist.
    CacheLine(FlushInsn),
    /// Track dirty chunks; `msync` them at persist.
    Msync,
}

/// Options for [`Region::open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RegionOptions {
    /// Use cache-line flushes even on a plain mapping. Tests use this to run
    /// the DAX persistence path where no DAX medium exists.
    pub force_cache_line_flush: bool,
    /// Map read-only (inspect, check).
    pub read_only: bool,
    /// Record every store between persistence barriers, so tests can
    /// simulate a power failure (`Region::simulate_power_failure`; feature
    /// `test-doubles`).
    #[cfg(any(test, feature = "test-doubles"))]
    pub track_stores: bool,
}

/// The mapped cache medium.
///
/// # Invariants
/// - `ptr..ptr+len` is a live shared mapping of `file` for the life of `self`.
/// - `dirty` has one bit per 1 MiB chunk of the mapping (msync mode only).
pub struct Region {
    ptr: *mut u8,
    len: usize,
    mode: PersistMode,
    durability: Durability,
    read_only: bool,
    /// The medium is a tmpfs file: an msync there does no I/O.
    on_tmpfs: bool,
    dirty: Box<[AtomicU64]>,
    #[cfg(any(test, feature = "test-doubles"))]
    tracker: Option<tracked::Tracker>,
    path: PathBuf,
    _file: File,
    /// A fault in the mapping (the file truncated, a media error) stops
    /// the process with a line saying so (`crate::fault`).
    watch: Option<crate::fault::Watch>,
}

// SAFETY: the mapping is shared memory owned by `Region`; all access goes
// through methods that take `&self` and copy bytes, and the engine keeps
// concurrent writers to disjoint ranges (see the module doc).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Map the cache medium at `path`: device DAX, a MAP_SYNC-capable file,
    /// or a plain file, in that order of preference.
    pub fn open(path: &Path, opts: RegionOptions) -> Result<Region, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| Error::Size {
            path: path.to_owned(),
            source,
        })?;
        let ft = meta.file_type();
        let (len, is_devdax) = if ft.is_file() {
            (meta.len(), false)
        } else if ft.is_char_device() {
            (
                devdax_size(&meta).map_err(|source| Error::Size {
                    path: path.to_owned(),
                    source,
                })?,
                true,
            )
        } else {
            return Err(Error::NotFileOrDax(path.to_owned()));
        };
        let map_err = |source| Error::Map {
            path: path.to_owned(),
            len,
            source,
        };
        let ulen =
            usize::try_from(len).map_err(|_| map_err(io::Error::from_raw_os_error(libc::EFBIG)))?;
        if ulen == 0 {
            return Err(map_err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let prot = if opts.read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        let fd = file.as_raw_fd();
        let mut dax = is_devdax;
        let mut ptr = libc::MAP_FAILED;
        if !is_devdax && !opts.read_only {
            // SAFETY: a fresh mapping of `ulen` bytes of an open fd at a
            // kernel-chosen address; no existing memory is affected.
            ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ulen,
                    prot,
                    libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
                    fd,
                    0,
                )
            };
            dax = ptr != libc::MAP_FAILED;
        }
        if ptr == libc::MAP_FAILED {
            // SAFETY: as above.
            ptr = unsafe { libc::mmap(std::ptr::null_mut(), ulen, prot, libc::MAP_SHARED, fd, 0) };
        }
        if ptr == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        let (mode, durability) = if dax {
            (PersistMode::CacheLine(FlushInsn::detect()), Durability::Dax)
        } else if opts.force_cache_line_flush {
            (
                PersistMode::CacheLine(FlushInsn::detect()),
                Durability::File,
            )
        } else {
            (PersistMode::Msync, Durability::File)
        };
        let on_tmpfs = is_tmpfs(&file);
        if !opts.read_only && on_tmpfs {
            // Fault every page in now: on tmpfs the first store to a page
            // costs a page fault and an allocation (microseconds), which
            // would otherwise land on the guest's write path. Real pmem is
            // mapped with huge pages and has no such cost.
            // SAFETY: advises the kernel about our own live mapping.
            let rc = unsafe { libc::madvise(ptr, ulen, libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                tracing::debug!(error = %io::Error::last_os_error(), "MADV_POPULATE_WRITE failed; pages fault in on first use");
            }
        }
        let chunks = ulen.div_ceil(1 << DIRTY_CHUNK_SHIFT);
        let dirty = (0..chunks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        tracing::info!(
            path = %path.display(),
            bytes = len,
            ?mode,
            %durability,
            "mapped cache medium"
        );
        let watch = crate::fault::Watch::medium(ptr.cast(), ulen).ok();
        Ok(Region {
            watch,
            ptr: ptr.cast(),
            len: ulen,
            mode,
            durability,
            read_only: opts.read_only,
            on_tmpfs,
            dirty,
            #[cfg(any(test, feature = "test-doubles"))]
            tracker: opts.track_stores.then(tracked::Tracker::default),
            path: path.to_owned(),
            _file: file,
        })
    }

    /// Bytes in the mapping.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Is the mapping empty? (Never: `open` refuses empty media.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Path of the medium.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a persisted store survives.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// How stores are persisted.
    pub fn mode(&self) -> PersistMode {
        self.mode
    }

    /// Does [`Region::persist`] wait for a device (an msync of a file on a
    /// real file system)? Not on DAX, where it is an `sfence`, nor on tmpfs,
    /// where an msync has nothing to write. Callers that must never block
    /// on I/O (the queue workers) hand such persists to a thread of their
    /// own.
    pub fn persist_waits_for_io(&self) -> bool {
        self.mode == PersistMode::Msync && !self.on_tmpfs
    }

    #[track_caller]
    fn check(&self, off: u64, len: usize) -> usize {
        let end = off.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len as u64 => off as usize,
            _ => panic!(
                "pmem range {off:#x}+{len:#x} outside the {:#x}-byte mapping",
                self.len
            ),
        }
    }

    /// The address of `len` bytes at `off` in the mapping, for the kernel
    /// to read or write directly (a write to the backing store from cached
    /// data). Valid while the region lives; what the caller does through it
    /// must respect the same rules as the copies here.
    pub fn address(&self, off: u64, len: usize) -> *mut u8 {
        let o = self.check(off, len);
        // SAFETY: `check` proved o..o+len lies inside the mapping.
        unsafe { self.ptr.add(o) }
    }

    /// Copy `buf.len()` bytes at `off` into `buf`.
    pub fn read(&self, off: u64, buf: &mut [u8]) {
        let o = self.check(off, buf.len());
        // SAFETY: `check` proved o..o+len lies inside the live mapping, and
        // `buf` is a distinct Rust allocation, so the ranges don't overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(o), buf.as_mut_ptr(), buf.len()) }
    }

    /// crc32c of `len` bytes at `off`, computed in place without a copy.
    pub fn crc32c(&self, off: u64, len: usize) -> u32 {
        self.crc32c_append(0, off, len)
    }

    /// Continue a crc32c over `len` bytes at `off`.
    pub fn crc32c_append(&self, crc: u32, off: u64, len: usize) -> u32 {
        let o = self.check(off, len);
        // SAFETY: the range lies inside the mapping (checked); the engine
        // only checksums data no thread is writing.
        let s = unsafe { std::slice::from_raw_parts(self.ptr.add(o), len) };
        crc32c::crc32c_append(crc, s)
    }

    /// Copy `data` to `off`, and start making it durable (flush its lines
    /// on DAX, mark its chunks dirty otherwise). Durable after the next
    /// [`Region::persist`].
    ///
    /// Copies of [`NT_MIN_BYTES`] or more use non-temporal stores, as the
    /// kernel's `memcpy_flushcache` does for pmem: the destination lines are
    /// not read into the cache first and do not evict useful ones. That
    /// halves the cost of a 4 KiB cache write here. They end with an
    /// `sfence`, so the data is ordered before any later store (a kset
    /// pointing at it) and visible to other threads like a normal store.
    pub fn write(&self, off: u64, data: &[u8]) {
        assert!(!self.read_only, "write to a read-only cache mapping");
        let o = self.check(off, data.len());
        self.track(o, data.len());
        // SAFETY: the range lies inside the live, writable mapping; `data`
        // is a Rust slice and cannot alias the mapping's bytes being written
        // unless the caller passes a view of the mapping, which no safe API
        // hands out.
        unsafe {
            if data.len() >= NT_MIN_BYTES {
                copy_nt(self.ptr.add(o), data.as_ptr(), data.len());
            } else {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(o), data.len());
            }
        }
        self.written(o, data.len());
    }

    /// Copy bytes `at..at+len` of `src` (memory we do not own) to `off`, as
    /// [`Region::write`] does.
    pub fn write_iov(&self, off: u64, src: &IoVec<'_>, at: usize, len: usize) {
        assert!(!self.read_only, "write to a read-only cache mapping");
        let o = self.check(off, len);
        self.track(o, len);
        let mut done = 0;
        for (p, n) in src.pieces(at, len) {
            // SAFETY: `o+done..o+done+n` lies inside the live, writable
            // mapping (checked for the whole range); `p..p+n` is readable
            // (IoVec's invariant) and is guest memory or a caller's buffer,
            // never a view of this mapping.
            unsafe {
                if n >= NT_MIN_BYTES {
                    copy_nt(self.ptr.add(o + done), p, n);
                } else {
                    std::ptr::copy_nonoverlapping(p, self.ptr.add(o + done), n);
                }
            }
            done += n;
        }
        self.written(o, len);
    }

    /// Copy `len` bytes at `off` into bytes `at..at+len` of `dst` (memory
    /// we do not own).
    pub fn read_iov(&self, off: u64, dst: &IoVec<'_>, at: usize, len: usize) {
        let o = self.check(off, len);
        let mut done = 0;
        for (p, n) in dst.pieces(at, len) {
            // SAFETY: the source lies inside the live mapping (checked);
            // `p..p+n` is writable (IoVec's invariant) and not part of it.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(o + done), p, n) };
            done += n;
        }
    }

    /// Fill `len` bytes at `off` with zeros, as [`Region::write`] does.
    pub fn zero(&self, off: u64, len: usize) {
        assert!(!self.read_only, "write to a read-only cache mapping");
        let o = self.check(off, len);
        self.track(o, len);
        // SAFETY: the range lies inside the live, writable mapping.
        unsafe { std::ptr::write_bytes(self.ptr.add(o), 0, len) }
        self.written(o, len);
    }

    fn written(&self, o: usize, len: usize) {
        if len == 0 {
            return;
        }
        match self.mode {
            PersistMode::CacheLine(insn) => {
                let start = o & !(LINE_BYTES - 1);
                let mut line = start;
                while line < o + len {
                    // SAFETY: `line` is inside the mapping: it is at most
                    // o+len-1 rounded down to a line, and o+len <= self.len.
                    unsafe { flush_line(insn, self.ptr.add(line)) };
                    line += LINE_BYTES;
                }
            }
            PersistMode::Msync => {
                let first = o >> DIRTY_CHUNK_SHIFT;
                let last = (o + len - 1) >> DIRTY_CHUNK_SHIFT;
                for c in first..=last {
                    let bit = 1u64 << (c % 64);
                    let word = &self.dirty[c / 64];
                    // Relaxed load first: the common case is already marked.
                    if word.load(Ordering::Relaxed) & bit == 0 {
                        word.fetch_or(bit, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Persistence point: every store made before this call is durable when
    /// it returns (as far as [`Durability`] goes).
    pub fn persist(&self) -> io::Result<()> {
        let r = match self.mode {
            PersistMode::CacheLine(_) => {
                // SAFETY: sfence has no memory-safety preconditions.
                unsafe { std::arch::x86_64::_mm_sfence() };
                Ok(())
            }
            PersistMode::Msync => self.msync_dirty(),
        };
        #[cfg(any(test, feature = "test-doubles"))]
        if let Some(t) = &self.tracker {
            t.barrier();
        }
        r
    }

    /// Order this thread's flushed stores before any later store: an
    /// `sfence` on DAX (cache-line flushes are weakly ordered, and a later
    /// kset must never reach the medium before the data it points to).
    /// Nothing on a plain file, where [`Region::persist`] msyncs every dirty
    /// page of the process at once.
    pub fn fence(&self) {
        if let PersistMode::CacheLine(_) = self.mode {
            // SAFETY: sfence has no memory-safety preconditions.
            unsafe { std::arch::x86_64::_mm_sfence() };
            #[cfg(any(test, feature = "test-doubles"))]
            if let Some(t) = &self.tracker {
                t.barrier();
            }
        }
    }

    /// Tell the tracker (if any) that `len` bytes at `o` are about to be
    /// stored.
    #[cfg(not(any(test, feature = "test-doubles")))]
    #[inline(always)]
    fn track(&self, _o: usize, _len: usize) {}

    #[cfg(any(test, feature = "test-doubles"))]
    fn track(&self, o: usize, len: usize) {
        let Some(t) = &self.tracker else { return };
        if len == 0 {
            return;
        }
        t.record(o, len, |word| {
            let mut b = [0u8; 8];
            // SAFETY: whole words of the mapping: `word` is below
            // len.div_ceil(8) and mapping lengths are multiples of 8 (files
            // and dax devices come in pages).
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(word * 8), b.as_mut_ptr(), 8) };
            u64::from_ne_bytes(b)
        });
    }

    #[cfg(any(test, feature = "test-doubles"))]
    /// Arm a silent power failure after `stores` more stores (tests; needs
    /// `track_stores`). See [`tracked`].
    pub fn arm_power_failure(&self, stores: u64) {
        self.tracker
            .as_ref()
            .expect("arm_power_failure needs track_stores")
            .arm(stores);
    }

    #[cfg(any(test, feature = "test-doubles"))]
    /// Has an armed power failure happened?
    pub fn power_failed(&self) -> bool {
        self.tracker.as_ref().is_some_and(|t| t.is_dead())
    }

    #[cfg(any(test, feature = "test-doubles"))]
    /// Simulate a power failure (tests; needs `track_stores`): every 8-byte
    /// word stored since the last barrier keeps its new value or reverts to
    /// the old one, chosen by a generator seeded with `seed`. Call only
    /// while no other thread uses the region.
    pub fn simulate_power_failure(&self, seed: u64) -> tracked::CrashReport {
        let t = self
            .tracker
            .as_ref()
            .expect("simulate_power_failure needs track_stores");
        t.crash(seed, |word, old| {
            // SAFETY: as in `track`: a whole word inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(old.to_ne_bytes().as_ptr(), self.ptr.add(word * 8), 8)
            };
        })
    }

    #[cfg(any(test, feature = "test-doubles"))]
    /// Simulate the death of the process (tests; needs `track_stores`):
    /// stores after an armed crash are undone, every store before it stays.
    /// Call only while no other thread uses the region.
    pub fn simulate_process_death(&self) -> tracked::CrashReport {
        let t = self
            .tracker
            .as_ref()
            .expect("simulate_process_death needs track_stores");
        t.crash_process(|word, old| {
            // SAFETY: as in `track`: a whole word inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(old.to_ne_bytes().as_ptr(), self.ptr.add(word * 8), 8)
            };
        })
    }

    fn msync_dirty(&self) -> io::Result<()> {
        let chunk = 1usize << DIRTY_CHUNK_SHIFT;
        let mut run: Option<(usize, usize)> = None;
        let mut result = Ok(());
        let mut flush_run = |run: &mut Option<(usize, usize)>| {
            if let Some((a, b)) = run.take() {
                let start = a * chunk;
                let end = (b * chunk).min(self.len);
                // SAFETY: start..end lies inside the mapping and start is
                // chunk (so page) aligned, as msync requires.
                let rc =
                    unsafe { libc::msync(self.ptr.add(start).cast(), end - start, libc::MS_SYNC) };
                if rc != 0 && result.is_ok() {
                    result = Err(io::Error::last_os_error());
                }
            }
        };
        for (w, word) in self.dirty.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                flush_run(&mut run);
                continue;
            }
            let bits = word.swap(0, Ordering::AcqRel);
            for b in 0..64 {
                let c = w * 64 + b;
                if bits & (1 << b) != 0 {
                    run = match run {
                        Some((a, e)) if e == c => Some((a, c + 1)),
                        other => {
                            let mut o = other;
                            flush_run(&mut o);
                            Some((c, c + 1))
                        }
                    };
                } else {
                    flush_run(&mut run);
                }
            }
        }
        flush_run(&mut run);
        result
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.watch.take();
        // SAFETY: ptr/len are the mapping made in `open`, unmapped once here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Is `file` on tmpfs (or another shmem file system)?
fn is_tmpfs(file: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes a statfs struct into the buffer we own.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    rc == 0 && unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

/// Size of a device-DAX character device, from sysfs.
fn devdax_size(meta: &std::fs::Metadata) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let p = format!("/sys/dev/char/{major}:{minor}/size");
    let s = std::fs::read_to_string(&p).map_err(|e| {
        io::Error::new(e.kind(), format!("{p}: {e} (is this a device-DAX device?)"))
    })?;
    s.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{p}: not a number")))
}

mod cpu;
#[cfg(any(test, feature = "test-doubles"))]
pub mod tracked;

#[cfg(test)]
use cpu::cpu_flush_features;
use cpu::{copy_nt, flush_line};
pub use cpu::{FlushInsn, NT_MIN_BYTES};

#[cfg(test)]
mod tests;
