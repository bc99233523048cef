//! [`FileBacking`]: a regular file or block device as the backing store.
//!
//! Opened with O_DIRECT so the cache, not the host page cache, decides what
//! stays in memory, and so a completed write has reached the device (its
//! volatile cache at least; `flush` covers the rest). File systems that
//! refuse O_DIRECT get a buffered descriptor instead, with a warning.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::aligned::{AlignedBuf, IO_ALIGN};
use super::store::{write_zeros, Backing};

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes (libc has
/// no constant for it).
const BLKGETSIZE64: libc::c_ulong = 0x80081272;

/// Granularity of offsets and lengths (the trait's contract).
const SECTOR: u64 = 512;

/// Largest piece an unaligned buffer is bounced through at once, so a huge
/// unaligned request does not allocate a huge bounce buffer.
const BOUNCE_CHUNK: usize = 1 << 20;

/// A raw file or block device opened for the cache to write back to.
#[derive(Debug)]
pub struct FileBacking {
    /// The open descriptor; closed on drop.
    file: File,
    /// The path it was opened from (for messages).
    path: PathBuf,
    /// Size in bytes, from open or the last `refresh_size`.
    size: AtomicU64,
    /// Whether `file` was opened with O_DIRECT.
    direct: bool,
    /// Whether `file` was opened read-only.
    read_only: bool,
    /// Whether falling back from fallocate to written zeros was logged.
    zero_fallback_logged: AtomicBool,
}

impl FileBacking {
    /// Open `path` (a regular file or a block device) as a backing store.
    ///
    /// Tries O_DIRECT first and falls back to buffered I/O, with a warning,
    /// when the file system refuses it. Fails if the path is anything else,
    /// or if its size is not a multiple of 512 bytes.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileBacking> {
        Self::open_with(path, read_only, true)
    }

    /// [`FileBacking::open`], with O_DIRECT only attempted if `try_direct`
    /// (tests use `false` to exercise the buffered path on any file system).
    pub(crate) fn open_with(
        path: &Path,
        read_only: bool,
        try_direct: bool,
    ) -> io::Result<FileBacking> {
        // Check the kind before opening: opening a directory for writing
        // fails with a bare "Is a directory", and opening a FIFO could block.
        let kind = std::fs::metadata(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        check_kind(path, &kind.file_type())?;

        let mut direct = try_direct;
        let mut file = if try_direct {
            match open_file(path, read_only, libc::O_DIRECT) {
                Ok(file) => file,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        path = %path.display(),
                        "the file system refuses O_DIRECT; using buffered I/O \
                         (the host page cache will hold backing data, and flush \
                         will fdatasync)"
                    );
                    direct = false;
                    open_file(path, read_only, 0)?
                }
                Err(e) => return Err(e),
            }
        } else {
            open_file(path, read_only, 0)?
        };

        // Check again on what was actually opened (the path may have changed
        // in between).
        let meta = file
            .metadata()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let file_type = meta.file_type();
        check_kind(path, &file_type)?;

        // O_DIRECT I/O must be aligned to the device's logical block size;
        // the trait promises 512-byte granularity, so a 4Kn device (or a
        // file system that needs more) gets buffered I/O instead of EINVAL
        // on every small request.
        if direct {
            if let Some(align) = direct_io_alignment(&file, file_type.is_block_device()) {
                if u64::from(align) > SECTOR {
                    tracing::warn!(
                        path = %path.display(),
                        "O_DIRECT needs {align}-byte alignment here but the cache \
                         issues {SECTOR}-byte I/O; using buffered I/O"
                    );
                    direct = false;
                    file = open_file(path, read_only, 0)?;
                }
            }
        }
        let size = store_size(&file, path)?;
        if !size.is_multiple_of(SECTOR) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: size {size} bytes is not a multiple of {SECTOR} bytes",
                    path.display()
                ),
            ));
        }
        Ok(FileBacking {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            direct,
            read_only,
            zero_fallback_logged: AtomicBool::new(false),
        })
    }

    /// The path this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the descriptor uses O_DIRECT (false: buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Check that `len` bytes at `off` lie inside the store and on sector
    /// boundaries.
    fn check_range(&self, off: u64, len: usize) -> io::Result<()> {
        check_range(&self.path, self.size.load(Ordering::Acquire), off, len)
    }

    /// Whether `buf` can go to the kernel as it is (O_DIRECT needs an
    /// aligned address and a whole number of sectors).
    fn needs_bounce(&self, addr: *const u8, len: usize) -> bool {
        self.direct
            && (!(addr as usize).is_multiple_of(IO_ALIGN) || !(len as u64).is_multiple_of(SECTOR))
    }
}

/// The size of an open regular file or block device.
fn store_size(file: &File, path: &Path) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        block_device_size(file)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: BLKGETSIZE64: {e}", path.display())))
    } else {
        Ok(meta.len())
    }
}

/// Reject anything that is neither a regular file nor a block device.
fn check_kind(path: &Path, file_type: &std::fs::FileType) -> io::Result<()> {
    if file_type.is_file() || file_type.is_block_device() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file or block device", path.display()),
        ))
    }
}

/// Check that `len` bytes at `off` lie inside a store of `size` bytes, on
/// 512-byte boundaries; `InvalidInput` otherwise.
pub(crate) fn check_range(path: &Path, size: u64, off: u64, len: usize) -> io::Result<()> {
    let len64 = len as u64;
    if !off.is_multiple_of(SECTOR) || !len64.is_multiple_of(SECTOR) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: I/O of {len} bytes at offset {off} is not aligned to {SECTOR} bytes",
                path.display()
            ),
        ));
    }
    match off.checked_add(len64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: I/O of {len} bytes at offset {off} is beyond the end ({size} bytes)",
                path.display()
            ),
        )),
    }
}

/// Open `path` read-only or read-write with extra `flags`, close-on-exec.
fn open_file(path: &Path, read_only: bool, flags: libc::c_int) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            // Keep the errno (callers look at EINVAL) and add the path.
            match e.raw_os_error() {
                Some(errno) if errno == libc::EINVAL => e,
                _ => io::Error::new(e.kind(), format!("{}: {e}", path.display())),
            }
        })
}

/// The size of the block device open as `file`.
fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live local u64; the descriptor is open for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The offset/length alignment O_DIRECT needs on `file`, if the kernel
/// says: the logical block size of a block device (BLKSSZGET), or what
/// statx reports for a file (STATX_DIOALIGN, Linux 6.1+). `None` when
/// unknown (then 512 is assumed, which every 512e device and common file
/// system accepts).
fn direct_io_alignment(file: &File, block_device: bool) -> Option<u32> {
    let fd = file.as_raw_fd();
    if block_device {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points
        // to a live local; the descriptor is open for the whole call.
        let rc = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size as *mut libc::c_int) };
        return if rc == 0 {
            u32::try_from(size).ok()
        } else {
            None
        };
    }
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH makes statx
    // describe `fd` itself; it writes only into `stx`, a live local.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    // A zero alignment means "no direct I/O support reported": we already
    // opened with O_DIRECT successfully, so keep the 512 assumption.
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        Some(stx.stx_dio_offset_align)
    } else {
        None
    }
}

/// `pread` until `buf` is full; EINTR is retried, end of file is an error.
fn pread_all(file: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, off) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at offset {off} with {} bytes left to read",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pwrite` until all of `buf` is written; EINTR is retried.
fn pwrite_all(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.write_at(buf, off) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("write made no progress at offset {off}"),
                ))
            }
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Backing for FileBacking {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn refresh_size(&self) -> io::Result<u64> {
        let size = store_size(&self.file, &self.path)?;
        if !size.is_multiple_of(SECTOR) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: size {size} bytes is not a multiple of {SECTOR} bytes",
                    self.path.display()
                ),
            ));
        }
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check_range(off, buf.len())?;
        if !self.needs_bounce(buf.as_ptr(), buf.len()) {
            return pread_all(&self.file, buf, off);
        }
        let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_CHUNK));
        let mut off = off;
        for piece in buf.chunks_mut(BOUNCE_CHUNK) {
            let staged = &mut bounce[..piece.len()];
            pread_all(&self.file, staged, off)?;
            piece.copy_from_slice(staged);
            off += piece.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check_range(off, buf.len())?;
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened read-only", self.path.display()),
            ));
        }
        if !self.needs_bounce(buf.as_ptr(), buf.len()) {
            return pwrite_all(&self.file, buf, off);
        }
        let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_CHUNK));
        let mut off = off;
        for piece in buf.chunks(BOUNCE_CHUNK) {
            let staged = &mut bounce[..piece.len()];
            staged.copy_from_slice(piece);
            pwrite_all(&self.file, staged, off)?;
            off += piece.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // fdatasync in both modes: with O_DIRECT it flushes the device's
        // volatile write cache, buffered it also writes back dirty pages.
        loop {
            match self.file.sync_data() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_range(off, len as usize)?;
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened read-only", self.path.display()),
            ));
        }
        // Files and block devices both take fallocate: a punched hole reads
        // zeros (a block device may unmap it), ZERO_RANGE keeps the blocks.
        let mode = libc::FALLOC_FL_KEEP_SIZE
            | if unmap {
                libc::FALLOC_FL_PUNCH_HOLE
            } else {
                libc::FALLOC_FL_ZERO_RANGE
            };
        let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return write_zeros(self, off, len);
        };
        loop {
            // SAFETY: fallocate on a descriptor we own; no pointers.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The file system or device cannot do it (tmpfs has no
                // ZERO_RANGE, some devices no discard): write the zeros.
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV) => {
                    if !self.zero_fallback_logged.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            backing = %self.path.display(),
                            unmap,
                            error = %e,
                            "fallocate cannot zero this store; writing zeros instead"
                        );
                    }
                    return write_zeros(self, off, len);
                }
                _ => return Err(e),
            }
        }
    }

    fn describe(&self) -> String {
        let mode = if self.direct { "O_DIRECT" } else { "buffered" };
        format!("{} ({mode})", self.path.display())
    }

    fn uring_fd(&self) -> Option<(RawFd, bool)> {
        Some((self.file.as_raw_fd(), self.direct))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A directory on a disk file system, where O_DIRECT works (unlike on
    /// tmpfs before Linux 6.6).
    fn disk_dir() -> tempfile::TempDir {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).expect("target dir");
        tempfile::tempdir_in(base).expect("tempdir")
    }

    fn make_file(dir: &Path, name: &str, len: u64) -> PathBuf {
        let path = dir.join(name);
        let f = File::create(&path).expect("create");
        f.set_len(len).expect("set_len");
        path
    }

    /// Writes random data through `buf_offset`-shifted (so possibly
    /// unaligned) slices and reads it back the same way.
    fn round_trip(b: &FileBacking, buf_offset: usize, len: usize, off: u64, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut src = vec![0u8; len + buf_offset];
        rng.fill(&mut src[..]);
        b.write_at(&src[buf_offset..], off).expect("write");
        let mut dst = vec![0u8; len + buf_offset];
        b.read_at(&mut dst[buf_offset..], off).expect("read");
        assert!(dst[buf_offset..] == src[buf_offset..]);
        // Aligned read of the same range sees the same bytes.
        let mut aligned = AlignedBuf::new(len);
        b.read_at(&mut aligned, off).expect("aligned read");
        assert!(aligned[..] == src[buf_offset..]);
    }

    fn exercise(b: &FileBacking) {
        // Aligned buffers, several sizes, including one larger than the
        // bounce chunk.
        let mut big = AlignedBuf::new(3 * BOUNCE_CHUNK + 4096);
        rand::rngs::StdRng::seed_from_u64(1).fill(&mut big[..]);
        b.write_at(&big, 8192).expect("aligned write");
        let mut back = AlignedBuf::new(big.len());
        b.read_at(&mut back, 8192).expect("aligned read");
        assert!(back[..] == big[..]);
        // Unaligned addresses (Vec + odd offset), small and multi-chunk.
        round_trip(b, 1, 512, 0, 2);
        round_trip(b, 3, 4096 * 3, 512 * 7, 3);
        round_trip(b, 17, 2 * BOUNCE_CHUNK + 1536, 1 << 22, 4);
        // Last sector of the store.
        round_trip(b, 5, 512, b.size() - 512, 5);
        b.flush().expect("flush");
    }

    #[test]
    fn round_trips_aligned_and_unaligned_buffers_with_o_direct() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 16 << 20);
        let b = FileBacking::open(&path, false).expect("open");
        assert!(
            b.is_direct(),
            "O_DIRECT should work on the scratch ext4 dir"
        );
        assert_eq!(b.describe(), format!("{} (O_DIRECT)", path.display()));
        assert_eq!(b.uring_fd().map(|(_, d)| d), Some(true));
        assert_eq!(b.size(), 16 << 20);
        assert_eq!(b.path(), path.as_path());
        exercise(&b);
        // Data reached the file: a fresh buffered open sees it.
        drop(b);
        let again = FileBacking::open_with(&path, true, false).expect("reopen");
        assert!(!again.is_direct());
        // (The tail of the big write: later writes overlap its head.)
        let mut expect = AlignedBuf::new(3 * BOUNCE_CHUNK + 4096);
        rand::rngs::StdRng::seed_from_u64(1).fill(&mut expect[..]);
        let tail = expect.len() - 4096;
        let mut got = vec![0u8; 4096];
        again.read_at(&mut got, 8192 + tail as u64).expect("read");
        assert!(got[..] == expect[tail..]);
    }

    #[test]
    fn round_trips_aligned_and_unaligned_buffers_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = make_file(dir.path(), "disk", 16 << 20);
        let b = FileBacking::open_with(&path, false, false).expect("open");
        assert!(!b.is_direct());
        assert_eq!(b.describe(), format!("{} (buffered)", path.display()));
        assert_eq!(b.uring_fd().map(|(_, d)| d), Some(false));
        exercise(&b);
    }

    #[test]
    fn falls_back_to_buffered_when_the_file_system_refuses_o_direct() {
        // procfs refuses O_DIRECT with EINVAL on every kernel (tmpfs accepts
        // it since Linux 6.6), and its files are regular with size 0.
        let path = Path::new("/proc/self/status");
        let b = FileBacking::open(path, true).expect("open");
        assert!(!b.is_direct(), "procfs should refuse O_DIRECT");
        assert_eq!(b.size(), 0);
        assert!(b.describe().ends_with("(buffered)"));
        let mut empty = [0u8; 0];
        b.read_at(&mut empty, 0).expect("empty read");
        let mut sector = [0u8; 512];
        let err = b.read_at(&mut sector, 0).expect_err("beyond end");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn tmpfs_mode_matches_what_the_kernel_allows() {
        // /dev/shm is tmpfs: whichever mode we got must match a direct probe.
        let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) for this test");
        let path = make_file(dir.path(), "disk", 1 << 20);
        let probe = open_file(&path, false, libc::O_DIRECT).is_ok();
        let b = FileBacking::open(&path, false).expect("open");
        assert_eq!(b.is_direct(), probe);
        round_trip(&b, 1, 4096, 4096, 9);
    }

    /// Fill a file with 0xAB, zero two ranges of it, and check the bytes
    /// and how much stayed allocated.
    fn zero_ranges(dir: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let path = dir.join("disk");
        std::fs::write(&path, vec![0xABu8; 4 << 20]).expect("write");
        let b = FileBacking::open(&path, false).expect("open");
        b.write_zeroes(4096, 1 << 20, false).expect("zero range");
        b.write_zeroes(2 << 20, 1 << 20, true).expect("punch hole");
        b.flush().expect("flush");
        let got = std::fs::read(&path).expect("read");
        for (i, v) in got.iter().enumerate() {
            let zero = (4096..4096 + (1 << 20)).contains(&i) || (2 << 20..3 << 20).contains(&i);
            assert_eq!(*v, if zero { 0 } else { 0xAB }, "byte {i}");
        }
        let allocated = std::fs::metadata(&path).expect("stat").blocks() * 512;
        assert!(matches!(
            b.write_zeroes(4 << 20, 4096, false),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput
        ));
        (allocated, 4 << 20)
    }

    #[test]
    fn write_zeroes_zeroes_by_fallocate_on_ext4_and_by_writing_on_tmpfs() {
        // ext4: ZERO_RANGE keeps its megabyte, the punched one is freed.
        let (allocated, size) = zero_ranges(disk_dir().path());
        assert_eq!(allocated, size - (1 << 20));
        // tmpfs has no ZERO_RANGE: zeros are written (allocated), the punch
        // still frees its megabyte.
        let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) for this test");
        let (allocated, size) = zero_ranges(shm.path());
        assert_eq!(allocated, size - (1 << 20));
    }

    #[test]
    fn out_of_range_and_misaligned_io_is_invalid_input() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 1 << 20);
        for direct in [true, false] {
            let b = FileBacking::open_with(&path, false, direct).expect("open");
            assert_eq!(b.is_direct(), direct);
            let size = b.size();
            let mut buf = AlignedBuf::new(1024);
            let cases: [(u64, usize); 6] = [
                (size, 512),
                (size - 512, 1024),
                (u64::MAX - 511, 1024),
                (100, 512),
                (0, 100),
                (size + 4096, 0),
            ];
            for (off, len) in cases {
                let e = b.read_at(&mut buf[..len], off).expect_err("read");
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "read {off} {len}");
                let e = b.write_at(&buf[..len], off).expect_err("write");
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "write {off} {len}");
            }
        }
    }

    #[test]
    fn size_not_a_multiple_of_512_is_rejected() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "odd", 4096 + 100);
        let e = FileBacking::open(&path, false).expect_err("odd size");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("not a multiple of 512"), "{e}");
    }

    #[test]
    fn a_directory_is_rejected_with_a_clear_message() {
        let dir = disk_dir();
        for read_only in [true, false] {
            let e = FileBacking::open(dir.path(), read_only).expect_err("dir");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(
                e.to_string().contains("not a regular file or block device"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_missing_path_names_the_path() {
        let dir = disk_dir();
        let path = dir.path().join("nope");
        let e = FileBacking::open(&path, false).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn read_only_store_refuses_writes() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 8192);
        let b = FileBacking::open(&path, true).expect("open");
        let buf = AlignedBuf::new(512);
        let e = b.write_at(&buf, 0).expect_err("write");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let mut back = AlignedBuf::new(512);
        b.read_at(&mut back, 0).expect("read");
    }

    #[test]
    fn reading_a_file_truncated_behind_our_back_is_unexpected_eof() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 8192);
        for direct in [true, false] {
            let b = FileBacking::open_with(&path, false, direct).expect("open");
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(4096).expect("truncate");
            let mut buf = AlignedBuf::new(8192);
            let e = b.read_at(&mut buf, 0).expect_err("eof");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "direct {direct}");
            f.set_len(8192).expect("restore");
        }
    }

    #[test]
    fn o_direct_alignment_on_the_scratch_disk_is_at_most_512() {
        // Why the O_DIRECT tests above get O_DIRECT: the file system takes
        // 512-byte direct I/O (or does not say).
        let dir = disk_dir();
        let path = make_file(dir.path(), "disk", 8192);
        let f = File::open(&path).expect("open");
        let align = direct_io_alignment(&f, false);
        assert!(align.is_none_or(|a| a <= 512), "{align:?}");
    }

    /// Attach `file` as a loop device with `sector` logical blocks; detached
    /// on drop.
    struct Loop(String);

    impl Loop {
        fn attach(file: &Path, sector: u32) -> Loop {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show", "--direct-io=off", "--sector-size"])
                .arg(sector.to_string())
                .arg(file)
                .output()
                .expect("losetup");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["--detach", &self.0])
                .status();
        }
    }

    #[test]
    fn block_devices_use_blkgetsize64_and_4k_sectors_fall_back_to_buffered() {
        let dir = disk_dir();
        let path = make_file(dir.path(), "img", 8 << 20);
        for (sector, want_direct) in [(512u32, true), (4096, false)] {
            let dev = Loop::attach(&path, sector);
            let b = FileBacking::open(Path::new(&dev.0), false).expect("open loop");
            assert_eq!(b.size(), 8 << 20, "{}", dev.0);
            assert_eq!(b.is_direct(), want_direct, "sector {sector}");
            // 512-byte I/O works either way.
            round_trip(&b, 1, 512, 512 * 3, u64::from(sector));
            round_trip(&b, 0, 8192, 4096, 7);
            b.flush().expect("flush");
            // And through a queue (io_uring where available).
            let mut q = super::super::BackingQueue::new(std::sync::Arc::new(b), 4);
            let data = AlignedBuf::from_slice(&[0x5a; 4096]);
            q.submit(
                1,
                super::super::IoOp::Write {
                    off: 65536,
                    buf: data,
                },
            );
            q.submit(2, super::super::IoOp::Flush);
            let mut out = Vec::new();
            q.wait(2, &mut out);
            assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
            q.submit(
                3,
                super::super::IoOp::Read {
                    off: 65536,
                    buf: AlignedBuf::new(4096),
                },
            );
            out.clear();
            q.wait(1, &mut out);
            match &out[0].op {
                super::super::IoOp::Read { buf, .. } => assert!(buf.iter().all(|&x| x == 0x5a)),
                other => panic!("{other:?}"),
            }
            // Zeroing on a block device (fallocate, or zeros written where
            // the loop driver refuses), with and without unmap.
            let bk = q.backing().clone();
            for unmap in [false, true] {
                bk.write_at(&[0x77; 8192], 1 << 20).expect("write");
                bk.write_zeroes(1 << 20, 8192, unmap).expect("write_zeroes");
                let mut got = vec![1u8; 8192];
                bk.read_at(&mut got, 1 << 20).expect("read");
                assert!(
                    got.iter().all(|&x| x == 0),
                    "unmap {unmap}, sector {sector}"
                );
            }
            eprintln!("{}: {:?}, {}", dev.0, q.engine(), q.backing().describe());
        }
    }

    #[test]
    fn a_character_device_is_rejected() {
        let e = FileBacking::open(Path::new("/dev/null"), true).expect_err("chr");
        assert!(e.to_string().contains("not a regular file or block device"));
    }
}
