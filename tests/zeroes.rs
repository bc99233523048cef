//! Write-zeroes, discards and ranges marked bad, through the engine and a
//! real backing file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pcache::backing::{Backing, BackingQueue, FileBacking};
use pcache::engine::{DataHead, Engine, Error, FormatOptions, OpenOptions};
use pcache::pmem::{Region, RegionOptions};

const CACHE_BYTES: u64 = 512 << 20;
const DISK: u64 = 32 << 20;

fn new_cache(dir: &Path, data_crc: bool) -> PathBuf {
    let path = dir.join("cache.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(CACHE_BYTES).unwrap();
    let region = Region::open(&path, RegionOptions::default()).unwrap();
    Engine::format(
        &region,
        &FormatOptions {
            backing_bytes: DISK,
            data_crc,
            ..Default::default()
        },
    )
    .unwrap();
    path
}

fn open(path: &Path) -> Arc<Engine> {
    let region = Arc::new(Region::open(path, RegionOptions::default()).unwrap());
    Engine::open(region, &OpenOptions::default()).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 7) as u8) | 1)
        .collect()
}

/// A backing file on the test's directory (ext4 here), full of a pattern.
fn backing_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("backing.img");
    let data = pattern(99, DISK as usize);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn read(e: &Engine, b: &dyn Backing, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    e.read_sync(&mut DataHead::default(), b, off, &mut buf)
        .unwrap();
    buf
}

#[test]
fn zeroed_ranges_read_zeros_at_once_after_a_restart_and_from_the_file_after_writeback() {
    let dir = tempfile::tempdir().unwrap();
    let cache = new_cache(dir.path(), false);
    let (bpath, mut want) = backing_file(dir.path());
    let backing = Arc::new(FileBacking::open(&bpath, false).unwrap());
    let e = open(&cache);
    let mut head = DataHead::default();
    // Dirty data, partly covered by later zeroes: what the zeroes cover
    // must never reach the file (it would land over the zeros).
    let data = pattern(1, 12 << 20);
    e.write(&mut head, 2 << 20, &data).unwrap();
    want[2 << 20..14 << 20].copy_from_slice(&data);
    // Across two 4 MiB region boundaries, deallocating.
    e.write_zeroes(3 << 20, 9 << 20, true).unwrap();
    want[3 << 20..12 << 20].fill(0);
    // Keeping the blocks, in the middle of the untouched pattern.
    e.write_zeroes(20 << 20, 1 << 20, false).unwrap();
    want[20 << 20..21 << 20].fill(0);
    // Data written after a zeroing wins over it.
    let late = pattern(2, 64 << 10);
    e.write(&mut head, 5 << 20, &late).unwrap();
    want[5 << 20..(5 << 20) + late.len()].copy_from_slice(&late);
    assert!(
        read(&e, &*backing, 0, DISK as usize) == want,
        "before a restart"
    );
    assert_eq!(e.stats().snapshot().zeroed_bytes, 10 << 20);
    // A restart without a flush: the keys come back from the kset slots.
    e.head_release(&mut head);
    drop(e);
    let e = open(&cache);
    assert!(
        read(&e, &*backing, 0, DISK as usize) == want,
        "after a restart"
    );
    let blocks_before = std::fs::metadata(&bpath).unwrap().blocks();
    let mut q = BackingQueue::new(backing.clone(), 32);
    e.writeback_all(&mut q, |_| {}).unwrap();
    assert!(!e.is_dirty());
    drop(q);
    assert!(
        std::fs::read(&bpath).unwrap() == want,
        "the backing file differs after writeback"
    );
    // The unmapped range was punched out of the file (9 MiB less a little
    // for the 64 KiB written over it), not written with zeros.
    let freed = (blocks_before - std::fs::metadata(&bpath).unwrap().blocks()) * 512;
    assert!(
        freed >= 8 << 20,
        "only {freed} bytes were deallocated from the backing file"
    );
    // And the cache still reads zeros there.
    assert!(
        read(&e, &*backing, 0, DISK as usize) == want,
        "after writeback"
    );
}

#[test]
fn zeroes_outside_the_device_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(&new_cache(dir.path(), false));
    assert!(matches!(
        e.write_zeroes(DISK - 4096, 8192, false),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        e.write_zeroes(100, 512, true),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        e.write_zeroes(u64::MAX - 511, 512, true),
        Err(Error::OutOfRange { .. })
    ));
}

/// Flip one bit of the first occurrence of `needle` in the cache file.
fn flip_bit_in(path: &Path, needle: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern present in the cache file");
    bytes[at + 100] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn dirty_data_failing_its_crc_at_writeback_stays_failed_across_restarts_until_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let cache = new_cache(dir.path(), true);
    let (bpath, original) = backing_file(dir.path());
    let backing = Arc::new(FileBacking::open(&bpath, false).unwrap());
    let e = open(&cache);
    let mut head = DataHead::default();
    let bad = pattern(7, 64 << 10);
    let good = pattern(8, 64 << 10);
    e.write(&mut head, 1 << 20, &bad).unwrap();
    e.write(&mut head, 8 << 20, &good).unwrap();
    e.flush().unwrap();
    e.head_release(&mut head);
    drop(e);
    flip_bit_in(&cache, &bad[..4096]);

    // Writeback finds the flipped bit: that range is not written (neither
    // the corrupt data nor anything older), the rest is.
    let e = open(&cache);
    let mut q = BackingQueue::new(backing.clone(), 32);
    e.writeback_all(&mut q, |_| {}).unwrap();
    let s = e.stats().snapshot();
    assert_eq!((s.data_crc_errors, s.bad_ranges_marked), (1, 1));
    assert_eq!(e.bad_ranges(10), vec![(1 << 20, 64 << 10)]);
    let file = std::fs::read(&bpath).unwrap();
    assert!(file[1 << 20..(1 << 20) + (64 << 10)] == original[1 << 20..(1 << 20) + (64 << 10)]);
    assert!(file[8 << 20..(8 << 20) + (64 << 10)] == good[..]);
    let read_bad = |e: &Engine| {
        let mut buf = vec![0u8; 8192];
        e.read_sync(
            &mut DataHead::default(),
            &*backing,
            (1 << 20) + 4096,
            &mut buf,
        )
        .map(|()| buf)
    };
    assert!(matches!(read_bad(&e), Err(Error::DataCorrupt { .. })));
    // GC passes the corrupt key and the BAD key (which it logs again), then
    // a restart: still failed, never the older data of the file.
    e.gc_once(true).unwrap();
    e.writeback_all(&mut q, |_| {}).unwrap();
    e.gc_once(true).unwrap();
    drop(q);
    drop(e);
    let e = open(&cache);
    assert!(
        matches!(read_bad(&e), Err(Error::DataCorrupt { .. })),
        "a range marked bad reads again after a restart"
    );
    assert_eq!(e.bad_ranges(10), vec![(1 << 20, 64 << 10)]);
    // The guest writes part of it again: that part reads, the rest fails.
    let mut head = DataHead::default();
    let fresh = pattern(9, 8192);
    e.write(&mut head, (1 << 20) + 4096, &fresh).unwrap();
    assert_eq!(read_bad(&e).unwrap(), fresh);
    let mut rest = vec![0u8; 4096];
    assert!(e
        .read_sync(&mut head, &*backing, 1 << 20, &mut rest)
        .is_err());
    assert_eq!(
        e.bad_ranges(10),
        vec![(1 << 20, 4096), ((1 << 20) + 12288, (64 << 10) - 12288)]
    );
    // Zeroing the rest clears it too.
    e.write_zeroes(1 << 20, 64 << 10, false).unwrap();
    assert!(e.bad_ranges(10).is_empty());
    assert_eq!(read(&e, &*backing, 1 << 20, 4096), vec![0u8; 4096]);
}
