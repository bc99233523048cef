//! [`MemBacking`]: an in-memory disk with a volatile write cache, for tests.
//!
//! Two images: `current` (what reads see) and `durable` (what survives a
//! crash). Writes touch only `current` and mark their 4 KiB pages dirty;
//! `flush` copies the dirty pages to `durable`; `crash` copies them back the
//! other way. Both cost O(dirty pages), not O(size), so tests can flush
//! often on stores of a few hundred MiB.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backing::{check_range, Backing};

/// Granularity of dirty tracking.
const PAGE: usize = 4096;

/// The two images and the dirty-page bookkeeping, under one lock so that a
/// write and a flush never interleave.
struct Images {
    /// What reads return: every completed write.
    current: Vec<u8>,
    /// What survives `crash`: the state as of the last completed flush.
    durable: Vec<u8>,
    /// One flag per page: written since the last flush (or crash).
    dirty: Vec<bool>,
    /// The indices of the set flags, so flush does not scan all pages.
    dirty_list: Vec<usize>,
}

impl Images {
    /// Mark every page overlapping `start..end` dirty.
    fn mark(&mut self, start: usize, end: usize) {
        if start == end {
            return;
        }
        for page in start / PAGE..end.div_ceil(PAGE) {
            if !self.dirty[page] {
                self.dirty[page] = true;
                self.dirty_list.push(page);
            }
        }
    }

    /// Byte range of `page`, clipped to the image.
    fn page_range(&self, page: usize) -> std::ops::Range<usize> {
        let start = page * PAGE;
        start..(start + PAGE).min(self.current.len())
    }
}

/// An in-memory backing store that models a disk with a volatile write
/// cache: writes are visible at once but only durable after `flush`, and
/// [`MemBacking::crash`] throws away everything not flushed.
pub struct MemBacking {
    /// Size in bytes.
    size: u64,
    /// Both images and the dirty pages.
    images: RwLock<Images>,
    /// Completed `write_at` calls.
    writes: AtomicU64,
    /// Completed `flush` calls.
    flushes: AtomicU64,
    /// Completed `read_at` calls.
    reads: AtomicU64,
}

impl MemBacking {
    /// A zero-filled store of `size` bytes (a multiple of 512 to be of any
    /// use: I/O must be on 512-byte boundaries).
    ///
    /// Panics if `size` does not fit in memory's address space.
    pub fn new(size: u64) -> MemBacking {
        let len = usize::try_from(size).expect("MemBacking size exceeds the address space");
        let pages = len.div_ceil(PAGE);
        MemBacking {
            size,
            images: RwLock::new(Images {
                // vec![0; n] is calloc: untouched pages cost no memory.
                current: vec![0; len],
                durable: vec![0; len],
                dirty: vec![false; pages],
                dirty_list: Vec::new(),
            }),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// Shared access; a panic in another test thread must not hide the data.
    fn read_images(&self) -> RwLockReadGuard<'_, Images> {
        self.images.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive access (see `read_images`).
    fn write_images(&self) -> RwLockWriteGuard<'_, Images> {
        self.images.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulate a power loss: every write not covered by a completed flush
    /// is lost, and reads see the durable image again.
    pub fn crash(&self) {
        let mut guard = self.write_images();
        let im = &mut *guard;
        for page in std::mem::take(&mut im.dirty_list) {
            let range = im.page_range(page);
            im.current[range.clone()].copy_from_slice(&im.durable[range]);
            im.dirty[page] = false;
        }
    }

    /// Simulate a power loss on a disk whose volatile cache had already
    /// written some pages: each page written since the last flush survives
    /// if `survives()` says so, the others are lost.
    pub fn crash_partial(&self, mut survives: impl FnMut() -> bool) {
        let mut guard = self.write_images();
        let im = &mut *guard;
        for page in std::mem::take(&mut im.dirty_list) {
            let range = im.page_range(page);
            if survives() {
                let (cur, dur) = (&im.current, &mut im.durable);
                dur[range.clone()].copy_from_slice(&cur[range]);
            } else {
                im.current[range.clone()].copy_from_slice(&im.durable[range]);
            }
            im.dirty[page] = false;
        }
    }

    /// A copy of what would survive a crash now.
    pub fn durable_image(&self) -> Vec<u8> {
        self.read_images().durable.clone()
    }

    /// A copy of what reads return now.
    pub fn image(&self) -> Vec<u8> {
        self.read_images().current.clone()
    }

    /// Number of completed flushes.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Number of completed writes.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Number of completed reads.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Number of 4 KiB pages written since the last flush or crash.
    pub fn dirty_pages(&self) -> usize {
        self.read_images().dirty_list.len()
    }

    /// Same checks as a real device: sector-aligned and inside the store.
    fn check(&self, off: u64, len: usize) -> io::Result<(usize, usize)> {
        check_range(Path::new("mem"), self.size, off, len)?;
        // In range of a Vec of `size` bytes, so it fits in usize.
        let start = off as usize;
        Ok((start, start + len))
    }
}

impl Backing for MemBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let (start, end) = self.check(off, buf.len())?;
        buf.copy_from_slice(&self.read_images().current[start..end]);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let (start, end) = self.check(off, buf.len())?;
        let mut im = self.write_images();
        im.current[start..end].copy_from_slice(buf);
        im.mark(start, end);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut guard = self.write_images();
        let im = &mut *guard;
        for page in std::mem::take(&mut im.dirty_list) {
            let range = im.page_range(page);
            im.durable[range.clone()].copy_from_slice(&im.current[range]);
            im.dirty[page] = false;
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("memory ({} bytes)", self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn filled(len: usize, byte: u8) -> Vec<u8> {
        vec![byte; len]
    }

    fn read(b: &MemBacking, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        b.read_at(&mut v, off).expect("read");
        v
    }

    #[test]
    fn reads_see_writes_before_any_flush() {
        let b = MemBacking::new(1 << 20);
        b.write_at(&filled(1024, 7), 4096).expect("write");
        assert_eq!(read(&b, 4096, 1024), filled(1024, 7));
        assert_eq!(b.writes(), 1);
        assert_eq!(b.flushes(), 0);
        assert_eq!(b.durable_image()[4096..5120], filled(1024, 0)[..]);
        assert_eq!(b.image()[4096..5120], filled(1024, 7)[..]);
    }

    #[test]
    fn crash_loses_exactly_the_unflushed_writes() {
        let b = MemBacking::new(1 << 20);
        b.write_at(&filled(512, 1), 0).expect("write");
        b.write_at(&filled(8192, 2), 65536).expect("write");
        b.flush().expect("flush");
        // Unflushed: one overwrite of flushed data, one fresh area, and one
        // write sharing a 4 KiB page with flushed data.
        b.write_at(&filled(512, 3), 0).expect("write");
        b.write_at(&filled(4096, 4), 1 << 19).expect("write");
        b.write_at(&filled(512, 5), 65536 + 8192).expect("write");
        let before_crash_durable = b.durable_image();
        b.crash();
        let after = b.image();
        assert_eq!(after, before_crash_durable);
        assert_eq!(after[..512], filled(512, 1)[..]);
        assert_eq!(after[65536..65536 + 8192], filled(8192, 2)[..]);
        assert_eq!(after[65536 + 8192..65536 + 8704], filled(512, 0)[..]);
        assert_eq!(after[1 << 19..(1 << 19) + 4096], filled(4096, 0)[..]);
        assert_eq!(b.dirty_pages(), 0);
    }

    #[test]
    fn flush_then_crash_keeps_the_writes() {
        let b = MemBacking::new(1 << 20);
        b.write_at(&filled(4096, 9), 8192).expect("write");
        b.write_at(&filled(512, 8), 512).expect("write");
        b.flush().expect("flush");
        b.crash();
        assert_eq!(read(&b, 8192, 4096), filled(4096, 9));
        assert_eq!(read(&b, 512, 512), filled(512, 8));
        assert_eq!(b.flushes(), 1);
    }

    #[test]
    fn overlapping_writes_keep_the_latest_bytes() {
        let b = MemBacking::new(1 << 20);
        b.write_at(&filled(8192, 1), 0).expect("write");
        b.write_at(&filled(1024, 2), 1024).expect("write");
        b.flush().expect("flush");
        b.write_at(&filled(4096, 3), 1536).expect("write");
        let mut expect = filled(8192, 1);
        expect[1024..2048].fill(2);
        expect[1536..5632].fill(3);
        assert_eq!(read(&b, 0, 8192), expect);
        b.crash();
        let mut durable = filled(8192, 1);
        durable[1024..2048].fill(2);
        assert_eq!(read(&b, 0, 8192), durable);
    }

    #[test]
    fn random_workload_matches_a_model() {
        let size = 4 << 20;
        let b = MemBacking::new(size as u64);
        let mut model = vec![0u8; size];
        let mut durable = vec![0u8; size];
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..2000 {
            let sectors = rng.gen_range(1..=32usize);
            let start = rng.gen_range(0..size / 512 - sectors) * 512;
            match rng.gen_range(0..10) {
                0 => {
                    b.flush().expect("flush");
                    durable.copy_from_slice(&model);
                }
                1 => {
                    b.crash();
                    model.copy_from_slice(&durable);
                }
                _ => {
                    let mut data = vec![0u8; sectors * 512];
                    rng.fill(&mut data[..]);
                    b.write_at(&data, start as u64).expect("write");
                    model[start..start + data.len()].copy_from_slice(&data);
                }
            }
        }
        assert!(b.image() == model);
        assert!(b.durable_image() == durable);
    }

    #[test]
    fn flush_cost_tracks_dirty_pages_not_size() {
        // 256 MiB store: flushing a handful of pages must be quick even in a
        // loop, which it would not be if flush copied the whole image.
        let b = MemBacking::new(256 << 20);
        let started = std::time::Instant::now();
        for i in 0..1000u64 {
            b.write_at(&filled(512, i as u8), (i * 7919 * 512) % (256 << 20))
                .expect("write");
            assert_eq!(b.dirty_pages(), 1);
            b.flush().expect("flush");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(b.flushes(), 1000);
    }

    #[test]
    fn out_of_range_and_misaligned_io_is_invalid_input() {
        let b = MemBacking::new(8192);
        let mut buf = vec![0u8; 1024];
        for (off, len) in [(8192u64, 512usize), (7680, 1024), (1, 512), (0, 3)] {
            let e = b.read_at(&mut buf[..len], off).expect_err("read");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            let e = b.write_at(&buf[..len], off).expect_err("write");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
        assert_eq!(b.writes(), 0);
    }

    #[test]
    fn concurrent_writers_and_flushers_do_not_lose_flushed_data() {
        let b = std::sync::Arc::new(MemBacking::new(1 << 20));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let off = u64::from(t) * 65536;
                    for i in 0..200u8 {
                        b.write_at(&filled(4096, i), off).expect("write");
                        if i % 10 == 0 {
                            b.flush().expect("flush");
                        }
                    }
                    b.flush().expect("flush");
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        b.crash();
        for t in 0..4u64 {
            assert_eq!(read(&b, t * 65536, 4096), filled(4096, 199));
        }
    }
}
