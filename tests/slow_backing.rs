//! A slow backing store behind a full cache: every backing write takes
//! 500 ms and three times the cache size is written. Writers are deferred
//! (never failed, never deadlocked), memory stays bounded, and every byte
//! reads back at the end, from the cache and from the backing store alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pcache::backing::Backing;
use pcache::engine::{DataHead, Engine, FormatOptions, OpenOptions, Workers, WritebackPolicy};
use pcache::pmem::{Region, RegionOptions};
use pcache::testing::{FaultKind, FaultOp, FaultPlan, FaultyBacking, MemBacking};

const CACHE: u64 = 512 << 20;
const DISK: u64 = 256 << 20;
const PIECE: usize = 4 << 20;

/// Anonymous (non-file) resident memory of this process, in bytes.
fn anon_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    kb("RssAnon:") * 1024
}

#[test]
fn three_times_the_cache_through_a_slow_backing_store_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(CACHE)
        .unwrap();
    let r = Region::open(&path, RegionOptions::default()).unwrap();
    Engine::format(
        &r,
        &FormatOptions {
            backing_bytes: DISK,
            gc_percent: 50,
            ..Default::default()
        },
    )
    .unwrap();
    drop(r);
    let r = Arc::new(Region::open(&path, RegionOptions::default()).unwrap());
    let e = Engine::open(r, &OpenOptions::default()).unwrap();
    let backing = Arc::new(FaultyBacking::new(MemBacking::new(DISK), 1));
    backing.add(FaultPlan::new(
        FaultOp::Write,
        FaultKind::Delay(Duration::from_millis(500)),
    ));
    // Touch every page of the in-memory backing store's two images first,
    // so its own (test-only) memory does not count as growth.
    let ones = vec![1u8; PIECE];
    for p in 0..DISK as usize / PIECE {
        backing.inner().write_at(&ones, (p * PIECE) as u64).unwrap();
    }
    backing.inner().flush().unwrap();
    let zeros = vec![0u8; PIECE];
    for p in 0..DISK as usize / PIECE {
        backing
            .inner()
            .write_at(&zeros, (p * PIECE) as u64)
            .unwrap();
    }
    backing.inner().flush().unwrap();
    let workers = Workers::start(
        e.clone(),
        backing.clone() as Arc<dyn Backing>,
        WritebackPolicy::default(),
    );
    let started = Instant::now();
    let rss_before = anon_rss();
    let mut peak = 0u64;
    // Write the disk over and over in 4 MiB pieces: 3 x 512 MiB in all.
    let pieces = DISK as usize / PIECE;
    let total = 3 * CACHE as usize / PIECE;
    let mut head = DataHead::default();
    let mut buf = vec![0u8; PIECE];
    let mut last = vec![0u8; pieces];
    for i in 0..total {
        let p = (i * 7) % pieces;
        let v = (i % 250) as u8 + 1;
        buf.fill(v);
        e.write_blocking(&mut head, (p * PIECE) as u64, &buf)
            .unwrap();
        last[p] = v;
        peak = peak.max(anon_rss());
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "stalled: {i} of {total} pieces written"
        );
    }
    e.flush().unwrap();
    let s = e.stats().snapshot();
    assert!(
        s.cache_full > 0,
        "the cache never filled: nothing was deferred"
    );
    // Everything reads back through the cache...
    for (p, v) in last.iter().enumerate() {
        e.read_sync(&mut head, &*backing, (p * PIECE) as u64, &mut buf)
            .unwrap();
        assert!(buf.iter().all(|b| b == v), "piece {p} through the cache");
    }
    // ...and, once drained, from the backing store alone.
    backing.clear();
    let t = Instant::now();
    while e.is_dirty() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "writeback did not drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    workers.stop();
    let image = backing.inner().durable_image();
    for (p, v) in last.iter().enumerate() {
        assert!(
            image[p * PIECE..(p + 1) * PIECE].iter().all(|b| b == v),
            "piece {p} on the backing store"
        );
    }
    let growth = peak.saturating_sub(rss_before);
    println!(
        "slow backing: {} MiB written through a {} MiB cache in {:.1} s, {} cache-full deferrals, anon memory grew {} MiB",
        (total * PIECE) >> 20,
        CACHE >> 20,
        started.elapsed().as_secs_f64(),
        s.cache_full,
        growth >> 20
    );
    assert!(growth < 256 << 20, "memory grew by {} MiB", growth >> 20);
}
