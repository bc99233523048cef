//! The disk layer driven directly, as the vhost layer drives it: nothing
//! blocks a queue on the backing store, a request larger than the I/O
//! memory still completes, writes to the backing store keep their order,
//! and a flush covers what went around the cache.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::disk::{default_disk, disk, Driver};
use pcache::backing::Backing;
use pcache::disk::{Disk, DiskConfig, Op, Status, DEFAULT_IO_MEMORY, MIN_IO_MEMORY};
use pcache::engine::{CacheMode, WritebackPolicy};
use pcache::iovec::IoVec;
use pcache::testing::{FaultKind, FaultOp, FaultPlan, FaultyBacking, MemBacking};

const MIB: u64 = 1 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed) as u8)
        .collect()
}

#[test]
fn writes_to_the_backing_store_never_block_the_queue() {
    // Write-through and write-around writes, discards in those modes, and
    // the flushes after them, in front of a store that takes 100 ms per
    // write: each submit returns at once; the answers come later.
    for mode in [CacheMode::Writethrough, CacheMode::Writearound] {
        let dir = tempfile::tempdir().unwrap();
        let slow = Arc::new(FaultyBacking::new(MemBacking::new(64 * MIB), 1));
        slow.add(FaultPlan::new(
            FaultOp::Write,
            FaultKind::Delay(Duration::from_millis(100)),
        ));
        let d = default_disk(dir.path(), slow.clone(), mode);
        let mut q = Driver::new(&d);
        let t0 = Instant::now();
        let tags: Vec<u64> = (0..8)
            .map(|i| {
                let data = pattern(i, 4096);
                q.submit(Op::Write, i * 4096, 4096, IoVec::owned(data))
            })
            .collect();
        let submitted = t0.elapsed();
        assert!(
            submitted < Duration::from_millis(50),
            "{mode}: 8 submits took {submitted:?}: a backing write blocked the queue"
        );
        for &t in &tags {
            assert_eq!(
                q.answer(t),
                None,
                "{mode}: answered before the store wrote it"
            );
        }
        for t in tags {
            assert_eq!(q.wait(t, Duration::from_secs(10)), Status::Ok);
        }
        let image = slow.inner().image();
        for i in 0..8u64 {
            let at = (i * 4096) as usize;
            assert_eq!(image[at..at + 4096], pattern(i, 4096)[..], "{mode}");
            assert_eq!(q.read(i * 4096, 4096), (Status::Ok, pattern(i, 4096)));
        }
        assert_eq!(q.flush(), Status::Ok);
    }
}

#[test]
fn a_read_larger_than_the_io_memory_is_served_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let backing = Arc::new(MemBacking::new(64 * MIB));
    let data = pattern(7, 16 << 20);
    backing.write_at(&data, 8 * MIB).unwrap();
    let d = disk(
        dir.path(),
        backing.clone(),
        CacheMode::Writeback,
        MIN_IO_MEMORY,
    );
    let mut q = Driver::new(&d);
    let (s, got) = q.read(8 * MIB, 16 << 20);
    assert_eq!(s, Status::Ok);
    assert!(
        got == data,
        "a 16 MiB read through 3 MiB of I/O memory came back wrong"
    );
    // The misses went into the cache: the same read now hits.
    let reads = backing.reads();
    assert_eq!(q.read(8 * MIB, 16 << 20), (Status::Ok, data));
    assert_eq!(backing.reads(), reads, "read again from the store");
}

#[test]
fn overlapping_writes_reach_the_store_and_the_cache_in_the_same_order() {
    // The first write lands on the store at once but is reported 300 ms
    // later; a second write to the same range, from another queue, comes
    // meanwhile. Were it let through, it would land after the first and
    // reach the cache first: the cache would keep the first, the store the
    // second. It waits instead, and both end with the second.
    let dir = tempfile::tempdir().unwrap();
    let slow = Arc::new(FaultyBacking::new(MemBacking::new(64 * MIB), 1));
    slow.add(
        FaultPlan::new(
            FaultOp::Write,
            FaultKind::DelayAfter(Duration::from_millis(300)),
        )
        .max_count(1),
    );
    let d = default_disk(dir.path(), slow.clone(), CacheMode::Writethrough);
    let (mut a, mut b) = (Driver::new(&d), Driver::new(&d));
    let first = a.submit(Op::Write, MIB, 8192, IoVec::owned(pattern(1, 8192)));
    std::thread::sleep(Duration::from_millis(50));
    let second = b.submit(Op::Write, MIB + 4096, 8192, IoVec::owned(pattern(2, 8192)));
    assert_eq!(b.answer(second), None);
    b.poll(Duration::from_millis(50));
    assert_eq!(
        b.answer(second),
        None,
        "the second write did not wait for the first"
    );
    assert_eq!(a.wait(first, Duration::from_secs(5)), Status::Ok);
    assert_eq!(b.wait(second, Duration::from_secs(5)), Status::Ok);
    let mut want = pattern(1, 8192);
    want.truncate(4096);
    want.extend(pattern(2, 8192));
    let store = slow.inner().image()[MIB as usize..MIB as usize + 12288].to_vec();
    assert!(store == want, "the store does not hold the writes in order");
    assert!(
        a.read(MIB, 12288) == (Status::Ok, want),
        "the cache disagrees with the store"
    );
}

#[test]
fn a_guest_flush_makes_writes_that_went_around_the_cache_durable() {
    // Both ways around in write-back mode: a long sequential stream, and
    // every write while a live migration copies the guest.
    for migrating in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let backing = Arc::new(MemBacking::new(64 * MIB));
        let e = common::disk::engine(&dir.path().join("cache.img"), 512 * MIB, 64 * MIB);
        e.set_handing_over(migrating);
        let cfg = DiskConfig {
            sequential_cutoff: if migrating { 0 } else { MIB },
            read_only: false,
            io_memory: DEFAULT_IO_MEMORY,
        };
        let b: Arc<dyn Backing> = backing.clone();
        let d = Disk::new(e.clone(), b, true, cfg, WritebackPolicy::default()).unwrap();
        let mut q = Driver::new(&d);
        // The stream: two megabytes in, the rest goes around.
        let data = pattern(9, 4 * MIB as usize);
        for (i, c) in data.chunks(256 << 10).enumerate() {
            assert_eq!(q.write(4 * MIB + i as u64 * (256 << 10), c), Status::Ok);
        }
        let around = e.stats().snapshot().write_bypass_bytes;
        assert!(
            around >= 2 * MIB,
            "migrating {migrating}: {around} bytes went around"
        );
        assert_eq!(q.flush(), Status::Ok);
        // The backing disk loses power: what a completed FLUSH covered stays.
        backing.crash();
        let tail = (8 * MIB - around) as usize..8 * MIB as usize;
        assert!(
            backing.image()[tail.clone()] == data[tail.start - 4 * MIB as usize..],
            "migrating {migrating}: a flushed write around the cache was lost"
        );
    }
}

#[test]
fn with_the_guest_cache_off_a_write_to_the_store_is_durable_when_answered() {
    for mode in [CacheMode::Writethrough, CacheMode::Writearound] {
        let dir = tempfile::tempdir().unwrap();
        let backing = Arc::new(MemBacking::new(64 * MIB));
        let d = default_disk(dir.path(), backing.clone(), mode);
        d.set_flush_negotiated(false);
        let mut q = Driver::new(&d);
        assert_eq!(q.write(MIB, &pattern(3, 4096)), Status::Ok);
        backing.crash();
        assert_eq!(
            backing.image()[MIB as usize..MIB as usize + 4096],
            pattern(3, 4096)[..],
            "{mode}: lost with no FLUSH asked for"
        );
    }
}

#[test]
fn a_failed_backing_write_fails_the_request_and_keeps_the_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Arc::new(FaultyBacking::new(MemBacking::new(64 * MIB), 1));
    let d = default_disk(dir.path(), bad.clone(), CacheMode::Writethrough);
    let mut q = Driver::new(&d);
    assert_eq!(q.write(0, &pattern(1, 4096)), Status::Ok);
    bad.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio));
    assert_eq!(q.write(0, &pattern(2, 4096)), Status::IoErr);
    bad.clear();
    assert_eq!(q.read(0, 4096), (Status::Ok, pattern(1, 4096)));
    assert_eq!(bad.inner().image()[..4096], pattern(1, 4096)[..]);
}

#[test]
fn a_write_through_copy_shows_only_once_the_store_has_it_and_an_abandoned_one_is_reclaimed() {
    // The cache takes a write-through write's copy before the store has
    // it (the store is written from that copy), but nothing reads it until
    // the store's write is back; a request abandoned meanwhile leaves no
    // space held once its write is done.
    let dir = tempfile::tempdir().unwrap();
    let slow = Arc::new(FaultyBacking::new(MemBacking::new(64 * MIB), 1));
    let d = default_disk(dir.path(), slow.clone(), CacheMode::Writethrough);
    let e = d.engine().clone();
    let fresh = e.segs_used();
    let mut q = Driver::new(&d);
    let mut reader = Driver::new(&d);
    assert_eq!(q.write(0, &pattern(1, 8192)), Status::Ok);
    slow.add(FaultPlan::new(
        FaultOp::Write,
        FaultKind::Delay(Duration::from_millis(300)),
    ));
    let t = q.submit(Op::Write, 0, 8192, IoVec::owned(pattern(2, 8192)));
    assert_eq!(q.answer(t), None);
    assert_eq!(
        reader.read(0, 8192),
        (Status::Ok, pattern(1, 8192)),
        "the new copy was read before the store had it"
    );
    assert_eq!(q.wait(t, Duration::from_secs(10)), Status::Ok);
    assert_eq!(reader.read(0, 8192), (Status::Ok, pattern(2, 8192)));
    let hits = e.stats().snapshot().read_hit_bytes;
    assert_eq!(reader.read(0, 8192).1, pattern(2, 8192));
    assert_eq!(
        e.stats().snapshot().read_hit_bytes - hits,
        8192,
        "the write-through copy is not in the cache"
    );
    // Abandoned with their writes out: the queue goes away at once.
    for i in 0..16u64 {
        q.submit(
            Op::Write,
            MIB + i * 4096,
            4096,
            IoVec::owned(pattern(i, 4096)),
        );
    }
    drop(q);
    drop(reader);
    slow.clear();
    e.invalidate(Duration::from_secs(10)).unwrap();
    assert_eq!(
        e.segs_used(),
        fresh,
        "segments still held after every request ended and the cache was emptied"
    );
}
