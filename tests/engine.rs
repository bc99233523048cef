//! Engine behaviour a user relies on: settings that persist, data CRC that
//! catches corruption, replicas that survive one bad copy, refusals that
//! protect existing caches, and writeback to a real file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pcache::backing::{Backing, BackingQueue, FileBacking};
use pcache::engine::{DataHead, Engine, Error, FormatOptions, OpenOptions};
use pcache::format;
use pcache::pmem::{Region, RegionOptions};
use pcache::testing::MemBacking;

const CACHE_BYTES: u64 = 512 << 20;

fn new_cache(dir: &Path, opts: FormatOptions) -> PathBuf {
    let path = dir.join("cache.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(CACHE_BYTES).unwrap();
    let region = Region::open(&path, RegionOptions::default()).unwrap();
    Engine::format(&region, &opts).unwrap();
    path
}

fn open(path: &Path) -> pcache::engine::Result<Arc<Engine>> {
    let region = Arc::new(Region::open(path, RegionOptions::default())?);
    Engine::open(region, &OpenOptions::default())
}

fn opts(backing_bytes: u64) -> FormatOptions {
    FormatOptions {
        backing_bytes,
        ..Default::default()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 7) as u8))
        .collect()
}

/// Flip one bit of the first occurrence of `needle` in the cache file.
fn flip_bit_in(path: &Path, needle: &[u8]) -> u64 {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern present in the cache file");
    bytes[at + 100] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
    at as u64
}

#[test]
fn gc_percent_and_data_crc_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(
        dir.path(),
        FormatOptions {
            data_crc: true,
            gc_percent: 55,
            ..opts(64 << 20)
        },
    );
    let e = open(&path).unwrap();
    assert!(e.data_crc());
    assert_eq!(e.gc_percent(), 55);
    e.set_gc_percent(33).unwrap();
    e.set_gc_percent(12).unwrap(); // twice: both replicas get written
    drop(e);
    let e = open(&path).unwrap();
    assert!(e.data_crc());
    assert_eq!(e.gc_percent(), 12);
    assert!(matches!(e.set_gc_percent(91), Err(Error::Refused(_))));
}

#[test]
fn flipped_bit_in_dirty_data_is_detected_and_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(
        dir.path(),
        FormatOptions {
            data_crc: true,
            ..opts(64 << 20)
        },
    );
    let e = open(&path).unwrap();
    let mut head = DataHead::default();
    let data = pattern(7, 64 << 10);
    e.write(&mut head, 1 << 20, &data).unwrap();
    e.flush().unwrap();
    drop(e);
    flip_bit_in(&path, &data[..4096]);
    let e = open(&path).unwrap();
    let backing = MemBacking::new(64 << 20);
    let mut buf = vec![0u8; data.len()];
    let err = e
        .read_sync(&mut head, &backing, 1 << 20, &mut buf)
        .unwrap_err();
    assert!(matches!(err, Error::DataCorrupt { .. }), "{err}");
    assert_eq!(e.stats().snapshot().data_crc_errors, 1);
    // A read of another range still works.
    let mut other = vec![0u8; 4096];
    e.read_sync(&mut head, &backing, 8 << 20, &mut other)
        .unwrap();
}

#[test]
fn flipped_bit_in_clean_data_is_refetched_from_the_backing_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(
        dir.path(),
        FormatOptions {
            data_crc: true,
            ..opts(64 << 20)
        },
    );
    let backing = MemBacking::new(64 << 20);
    let data = pattern(9, 128 << 10);
    backing.write_at(&data, 2 << 20).unwrap();
    let e = open(&path).unwrap();
    let mut head = DataHead::default();
    let mut buf = vec![0u8; data.len()];
    e.read_sync(&mut head, &backing, 2 << 20, &mut buf).unwrap(); // miss, fill
    assert_eq!(buf, data);
    e.flush().unwrap();
    drop(e);
    flip_bit_in(&path, &data[..4096]);
    let e = open(&path).unwrap();
    buf.fill(0);
    e.read_sync(&mut head, &backing, 2 << 20, &mut buf).unwrap();
    assert_eq!(buf, data, "clean data is refetched, never returned corrupt");
    assert_eq!(e.stats().snapshot().data_crc_errors, 1);
}

#[test]
fn a_partly_cached_read_combines_cache_and_backing() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    let backing = MemBacking::new(64 << 20);
    let base = pattern(1, 1 << 20);
    backing.write_at(&base, 0).unwrap();
    let e = open(&path).unwrap();
    let mut head = DataHead::default();
    let new = pattern(2, 8192);
    e.write(&mut head, 4096 * 10, &new).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut misses = Vec::new();
    e.read(0, &mut buf, &mut misses).unwrap();
    assert_eq!(
        misses.len(),
        2,
        "the gaps before and after the cached piece"
    );
    let mut want = base.clone();
    want[40960..40960 + 8192].copy_from_slice(&new);
    e.read_sync(&mut head, &backing, 0, &mut buf).unwrap();
    assert_eq!(buf, want);
    // Now everything is cached: the same read is a full hit.
    misses.clear();
    buf.fill(0);
    e.read(0, &mut buf, &mut misses).unwrap();
    assert!(misses.is_empty());
    assert_eq!(buf, want);
}

#[test]
fn requests_outside_the_device_or_unaligned_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    let e = open(&path).unwrap();
    let mut head = DataHead::default();
    let mut misses = Vec::new();
    assert!(matches!(
        e.write(&mut head, 64 << 20, &[0; 512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        e.write(&mut head, u64::MAX - 511, &[0; 512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        e.write(&mut head, 100, &[0; 512]),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        e.read(0, &mut [0; 100], &mut misses),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        e.read((64 << 20) - 512, &mut [0; 1024], &mut misses),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn format_refuses_an_existing_cache_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    let region = Region::open(&path, RegionOptions::default()).unwrap();
    let err = Engine::format(&region, &opts(64 << 20)).unwrap_err();
    assert!(
        err.to_string().contains("already holds a pcache cache"),
        "{err}"
    );
    Engine::format(
        &region,
        &FormatOptions {
            force: true,
            ..opts(64 << 20)
        },
    )
    .unwrap();
    // Foreign data in the superblock area is refused too.
    region.write(format::SB_OFF, b"some other format");
    region.persist().unwrap();
    let err = Engine::format(&region, &opts(64 << 20)).unwrap_err();
    assert!(err.to_string().contains("no pcache magic"), "{err}");
}

#[test]
fn blank_and_foreign_media_are_refused_at_open_not_reformatted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blank.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(CACHE_BYTES)
        .unwrap();
    let err = open(&path).unwrap_err();
    assert!(
        matches!(err, Error::Format(format::Error::NotPcache)),
        "{err}"
    );
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes.iter().all(|b| *b == 0),
        "open must not write to a blank medium"
    );
}

#[test]
fn one_torn_replica_of_each_record_is_survived_and_two_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    {
        // Some history, so the tails and settings have been rewritten.
        let e = open(&path).unwrap();
        let mut head = DataHead::default();
        e.write(&mut head, 0, &pattern(3, 4096)).unwrap();
        e.set_gc_percent(40).unwrap();
        e.flush().unwrap();
    }
    let records: [(&str, [u64; 2]); 5] = [
        ("cache_info", format::CACHE_INFO_OFF),
        ("key_tail", format::KEY_TAIL_OFF),
        ("dirty_tail", format::DIRTY_TAIL_OFF),
        ("writeback target", format::WB_TARGET_OFF),
        (
            "segment_gen",
            [
                format::seg_off(0) + format::SEG_GEN_OFF[0],
                format::seg_off(0) + format::SEG_GEN_OFF[1],
            ],
        ),
    ];
    let original = std::fs::read(&path).unwrap();
    for (name, offs) in records {
        for slot in 0..2 {
            let mut bytes = original.clone();
            bytes[offs[slot] as usize + 9] ^= 0x40;
            std::fs::write(&path, &bytes).unwrap();
            let e = open(&path).unwrap_or_else(|e| panic!("{name} slot {slot} torn: {e}"));
            // The newest valid replica wins: the update before last when
            // the newest copy is the torn one.
            assert!([40, 70].contains(&e.gc_percent()), "{name} slot {slot}");
        }
        let mut bytes = original.clone();
        bytes[offs[0] as usize + 9] ^= 0x40;
        bytes[offs[1] as usize + 9] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = open(&path).unwrap_err().to_string();
        assert!(err.contains(name), "both {name} replicas bad: {err}");
    }
    // A cache formatted before the writeback target existed holds zeros
    // there: no batch in progress.
    let mut bytes = original.clone();
    for off in format::WB_TARGET_OFF {
        bytes[off as usize..off as usize + 32].fill(0);
    }
    std::fs::write(&path, &bytes).unwrap();
    open(&path).unwrap();
    std::fs::write(&path, &original).unwrap();
    open(&path).unwrap();
}

#[test]
fn settings_that_differ_from_the_medium_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    let e = open(&path).unwrap();
    assert_eq!(e.size(), 64 << 20);
    assert!(!e.data_crc());
    assert_eq!(e.gc_percent(), format::GC_PERCENT_DEFAULT);
}

#[test]
fn writeback_to_a_real_file_makes_it_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(32 << 20));
    let bpath = dir.path().join("backing.img");
    std::fs::File::create(&bpath)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mut want = vec![0u8; 32 << 20];
    let e = open(&path).unwrap();
    let mut head = DataHead::default();
    for i in 0..200u64 {
        let off = (i * 7919 * 4096) % ((32 << 20) - (64 << 10));
        let data = pattern(i as u8, 4096 * (1 + (i % 16) as usize));
        e.write(&mut head, off, &data).unwrap();
        want[off as usize..off as usize + data.len()].copy_from_slice(&data);
        if i % 50 == 0 {
            e.flush().unwrap();
        }
    }
    let backing = Arc::new(FileBacking::open(&bpath, false).unwrap());
    let mut q = BackingQueue::new(backing.clone(), 32);
    e.writeback_all(&mut q, |_| {}).unwrap();
    assert!(!e.is_dirty());
    assert_eq!(e.stats().snapshot().dirty_bytes, 0);
    drop(q);
    assert!(
        std::fs::read(&bpath).unwrap() == want,
        "backing file differs from what was written"
    );
}

#[test]
fn a_completed_write_survives_the_process_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    let e = open(&path).unwrap();
    let mut head = DataHead::default();
    let data = pattern(7, 12288);
    e.write(&mut head, 1 << 20, &data).unwrap();
    // One key in an open kset, no flush, no shutdown: the process dies.
    drop(e);
    let e = open(&path).unwrap();
    assert_eq!(e.stats().snapshot().replay_staged_keys, 1);
    let mut got = vec![0u8; data.len()];
    let mut misses = Vec::new();
    e.read(1 << 20, &mut got, &mut misses).unwrap();
    assert!(misses.is_empty(), "the write is cached: {misses:?}");
    assert_eq!(got, data);
    // Opening appended the slot's keys to the log and emptied the slot.
    drop(e);
    let e = open(&path).unwrap();
    assert_eq!(e.stats().snapshot().replay_staged_keys, 0);
    e.read(1 << 20, &mut got, &mut misses).unwrap();
    assert!(misses.is_empty() && got == data);
}

#[test]
fn a_staged_key_that_passes_its_crc_but_is_impossible_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    let e = open(&path).unwrap();
    let fid = e.superblock().format_id();
    let mut head = DataHead::default();
    e.write(&mut head, 0, &pattern(1, 4096)).unwrap();
    // Slot 0 now holds one key of the current era: forge a second, sealed
    // with a valid crc, that ends past the 64 MiB backing store.
    let mut hdr = [0u8; format::SLOT_HEADER_BYTES];
    e.region().read(format::slot_off(0), &mut hdr);
    let seq = format::SlotHeader::decode(&hdr).seq;
    drop(e);
    let bad = format::KeyOnMedia {
        off: 64 << 20,
        len: 4096,
        flags: 0,
        seg: 0,
        seg_off: 0,
        gen: 0,
        data_crc: 0,
    };
    let bytes = format::encode_staged(&bad, fid, 0, seq);
    let region = Region::open(&path, RegionOptions::default()).unwrap();
    region.write(format::staged_key_off(0, 1), &bytes);
    drop(region);
    match open(&path) {
        Err(Error::Format(format::Error::Corrupt { what, offset, .. })) => {
            assert_eq!(what, "kset key");
            assert_eq!(offset, format::staged_key_off(0, 1));
        }
        other => panic!("expected a corrupt staged key, got {other:?}"),
    }
}

#[test]
fn the_guests_write_cache_choice_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_cache(dir.path(), opts(64 << 20));
    let e = open(&path).unwrap();
    assert!(!e.guest_writethrough(), "a new cache starts write-back");
    e.set_guest_writethrough(true).unwrap();
    drop(e);
    let e = open(&path).unwrap();
    assert!(e.guest_writethrough());
    e.set_guest_writethrough(false).unwrap();
    drop(e);
    assert!(!open(&path).unwrap().guest_writethrough());
}
