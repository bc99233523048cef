//! Backing-store faults: failed write-backs are retried and never drop
//! dirty data, a failed backing flush never lets dirty_tail move, a failed
//! read miss is an error (never zeros), and once faults stop writeback
//! drains and the backing store matches. Also: workers keep going under
//! faults, and the error count is visible in the stats.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pcache::backing::{Backing, BackingQueue};
use pcache::engine::{
    DataHead, Engine, Error, FormatOptions, OpenOptions, Progress, Workers, WritebackPolicy,
};
use pcache::pmem::{Region, RegionOptions};
use pcache::testing::{FaultKind, FaultOp, FaultPlan, FaultyBacking, MemBacking};

const DISK: u64 = 32 << 20;

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let path = dir.join("cache.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let r = Region::open(&path, RegionOptions::default()).unwrap();
    Engine::format(
        &r,
        &FormatOptions {
            backing_bytes: DISK,
            ..Default::default()
        },
    )
    .unwrap();
    drop(r);
    let r = Arc::new(Region::open(&path, RegionOptions::default()).unwrap());
    Engine::open(r, &OpenOptions::default()).unwrap()
}

/// Write 300 random pieces; returns the expected disk image.
fn write_some(e: &Engine, seed: u8) -> Vec<u8> {
    let mut want = vec![0u8; DISK as usize];
    let mut head = DataHead::default();
    for i in 0..300u64 {
        let off = (i * 7_919 * 4096 + seed as u64 * 4096) % (DISK - (256 << 10));
        let len = 4096 * (1 + (i as usize % 32));
        let data: Vec<u8> = (0..len)
            .map(|j| (i as u8).wrapping_add(seed) ^ (j >> 9) as u8)
            .collect();
        e.write(&mut head, off, &data).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&data);
        if i % 40 == 0 {
            e.flush().unwrap();
        }
    }
    e.flush().unwrap();
    e.head_release(&mut head);
    want
}

fn faulty() -> Arc<FaultyBacking<MemBacking>> {
    Arc::new(FaultyBacking::new(MemBacking::new(DISK), 42))
}

#[test]
fn failed_writebacks_are_retried_and_drain_once_faults_stop() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let want = write_some(&e, 1);
    for kind in [FaultKind::Eio, FaultKind::Short, FaultKind::Enospc] {
        let b = faulty();
        b.add(FaultPlan::new(FaultOp::Write, kind).probability(1.0));
        let mut q = BackingQueue::new(b.clone(), 32);
        let tail = e.dirty_tail();
        for _ in 0..3 {
            let err = e.writeback_once(&mut q).unwrap_err();
            assert!(matches!(err, Error::Backing(_)), "{err}");
            assert_eq!(
                e.dirty_tail(),
                tail,
                "dirty_tail moved past a failed write-back"
            );
        }
        assert!(b.injected() >= 3);
    }
    let errors = e.stats().snapshot().writeback_errors;
    assert!(errors >= 9);
    assert!(e.is_dirty());
    // Faults stop: everything drains and the backing store matches.
    let b = faulty();
    let mut q = BackingQueue::new(b.clone(), 32);
    e.writeback_all(&mut q, |_| {}).unwrap();
    assert!(!e.is_dirty());
    assert!(
        b.inner().durable_image() == want,
        "backing store differs after the drain"
    );
}

#[test]
fn a_failed_backing_flush_is_never_taken_for_success() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let want = write_some(&e, 2);
    let b = faulty();
    b.add(FaultPlan::new(FaultOp::Flush, FaultKind::Eio).probability(1.0));
    let mut q = BackingQueue::new(b.clone(), 32);
    let tail = e.dirty_tail();
    assert!(e.writeback_once(&mut q).is_err());
    assert_eq!(e.dirty_tail(), tail);
    // The writes reached the store but were never made durable: a crash of
    // the backing store loses them, and the cache must still hold them.
    b.inner().crash();
    b.clear();
    e.writeback_all(&mut q, |_| {}).unwrap();
    assert!(b.inner().durable_image() == want);
}

#[test]
fn a_failed_read_miss_is_an_error_not_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let b = faulty();
    b.inner().write_at(&[7u8; 4096], 8192).unwrap();
    b.add(
        FaultPlan::new(FaultOp::Read, FaultKind::Eio)
            .probability(1.0)
            .max_count(1),
    );
    let mut head = DataHead::default();
    let mut buf = vec![0u8; 4096];
    let err = e.read_sync(&mut head, &*b, 8192, &mut buf).unwrap_err();
    assert!(matches!(err, Error::Backing(_)), "{err}");
    // Nothing was cached from the failed read; the next one works.
    e.read_sync(&mut head, &*b, 8192, &mut buf).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
}

#[test]
fn workers_retry_with_backoff_under_intermittent_faults() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let b = faulty();
    b.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio).every_nth(3));
    b.add(FaultPlan::new(FaultOp::Flush, FaultKind::Eio).every_nth(2));
    let w = Workers::start(
        e.clone(),
        b.clone() as Arc<dyn Backing>,
        WritebackPolicy::IMMEDIATE,
    );
    let want = write_some(&e, 3);
    let t = Instant::now();
    while e.stats().snapshot().writeback_errors < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no write-back errors seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.clear();
    while e.is_dirty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "writeback did not drain after faults stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    w.stop();
    assert!(b.inner().durable_image() == want);
    println!(
        "faults: workers survived {} injected faults ({} write-back errors) and drained",
        b.injected(),
        e.stats().snapshot().writeback_errors
    );
    let mut q = BackingQueue::new(b.clone(), 4);
    assert_eq!(e.writeback_once(&mut q).unwrap(), Progress::Clean);
}
