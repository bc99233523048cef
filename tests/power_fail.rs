//! Power failures and process deaths, of the cache medium and of the
//! backing store.
//!
//! The cache medium records every store between persistence barriers; at a
//! power-failure point it keeps everything persisted and a random part of
//! the 8-byte words stored since (real pmem is atomic only per 8 bytes), and
//! the engine replays that image: every flushed write must be there. At a
//! process-death point every store made so far stays (the page cache keeps
//! it) and none after it counts: every completed write, flushed or not,
//! must be there. The backing store loses every write not covered by a
//! completed flush. Guards against: a kset durable before the data it points
//! to, a torn record taken for a valid one, a tail written into the replica
//! that held the newest copy, a kset from an earlier lap replayed, a key of
//! an open kset lost with the process (or replayed from an earlier era of
//! its slot), writeback leaving the backing store between two flush
//! boundaries after a batch (a batch cut off by a failure and retried
//! shorter), and, in strict order, a later flush epoch reaching the backing
//! store before an earlier one is complete.
//!
//! `PCACHE_CRASH_POINTS` sets the number of crash points (default 3000),
//! `PCACHE_CRASH_SEED` the seed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use pcache::backing::{Backing, BackingQueue};
use pcache::engine::{
    DataHead, Engine, Error, FormatOptions, OpenOptions, Progress, WritebackOrder,
};
use pcache::pmem::{Region, RegionOptions};
use pcache::testing::MemBacking;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/knobs.rs"]
mod knobs;
#[path = "common/sectors.rs"]
mod sectors;
use sectors::{fill_sector, sector_id};

const SECTOR: u64 = 512;
const DISK: u64 = 4 << 20;
const SECTORS: u64 = DISK / SECTOR;

fn tracked_region(path: &Path) -> Arc<Region> {
    Arc::new(
        Region::open(
            path,
            RegionOptions {
                force_cache_line_flush: true,
                track_stores: true,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn new_cache(dir: &Path) -> Arc<Region> {
    let path = dir.join("cache.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let r = tracked_region(&path);
    Engine::format(
        &r,
        &FormatOptions {
            backing_bytes: DISK,
            gc_percent: 10,
            ..Default::default()
        },
    )
    .unwrap();
    r
}

fn open(r: &Arc<Region>) -> Arc<Engine> {
    Engine::open(r.clone(), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open after power failure: {e}"))
}

/// What a crash point does to the cache medium.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// The power goes: unpersisted words may revert.
    Power,
    /// The process dies: nothing stored reverts.
    Process,
}

#[test]
fn power_failures_and_process_deaths_at_random_points_lose_nothing_promised() {
    let points: u64 = knobs::size("PCACHE_CRASH_POINTS", 3000, 300);
    let seed: u64 = knobs::seed("PCACHE_CRASH_SEED", 77);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let region = new_cache(dir.path());
    let backing = Arc::new(MemBacking::new(DISK));
    let mut q = BackingQueue::new(backing.clone(), 16);
    let mut e = open(&region);
    let mut head = DataHead::default();
    // Model: durable id per sector (as of the last completed flush), the id
    // of the last completed write, and ids written since the flush.
    let mut durable = vec![0u64; SECTORS as usize];
    let mut cur = vec![0u64; SECTORS as usize];
    let mut since: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut next_id = 1u64;
    let (mut pending_total, mut reverted_total, mut writes, mut flushes) =
        (0usize, 0usize, 0u64, 0u64);
    let mut buf = vec![0u8; 256 * SECTOR as usize];
    let (mut mid_op, mut discarded_total) = (0u64, 0usize);
    let (mut deaths, mut staged_total) = (0u64, 0u64);
    let mut zeroes = 0u64;
    for point in 0..points {
        let kind = if rng.gen_bool(0.5) {
            Crash::Power
        } else {
            Crash::Process
        };
        // Most crash points fall inside an operation: the crash comes after
        // a random number of stores and nothing after it counts.
        if rng.gen_bool(0.9) {
            region.arm_power_failure(rng.gen_range(1..60));
        }
        // The write that was running when the crash came (not completed).
        let mut in_progress: Option<(u64, u64, u64)> = None;
        for _ in 0..rng.gen_range(1..40) {
            match rng.gen_range(0..100) {
                0..=53 => {
                    let n = if rng.gen_bool(0.9) {
                        rng.gen_range(1..=16)
                    } else {
                        rng.gen_range(16..=256)
                    };
                    let s = rng.gen_range(0..=SECTORS - n);
                    let id = next_id;
                    next_id += 1;
                    let b = &mut buf[..(n * SECTOR) as usize];
                    for i in 0..n {
                        fill_sector(
                            &mut b[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
                            id,
                            s + i,
                        );
                    }
                    // Submitted: it may survive even if never acknowledged.
                    for i in s..s + n {
                        since.entry(i).or_default().push(id);
                    }
                    let mut done = 0usize;
                    loop {
                        match e.write(&mut head, s * SECTOR + done as u64, &b[done..]) {
                            Ok(()) => break,
                            Err(Error::CacheFull { done: d }) => {
                                done += d as usize;
                                e.flush().unwrap();
                                let _ = e.writeback_once(&mut q).unwrap();
                                e.gc_once(true).unwrap();
                            }
                            Err(err) => panic!("seed {seed} point {point}: write: {err}"),
                        }
                    }
                    if region.power_failed() {
                        in_progress = Some((s, n, id));
                    } else {
                        for i in s..s + n {
                            cur[i as usize] = id;
                        }
                    }
                    writes += 1;
                }
                54..=59 => {
                    // Write-zeroes or discard: reads zeros (id 0) after.
                    let n = rng.gen_range(1..=1024u64).min(SECTORS);
                    let s = rng.gen_range(0..=SECTORS - n);
                    for i in s..s + n {
                        since.entry(i).or_default().push(0);
                    }
                    let mut done = 0u64;
                    loop {
                        let (off, len) = (s * SECTOR + done, n * SECTOR - done);
                        match e.write_zeroes(off, len, rng.gen_bool(0.5)) {
                            Ok(()) => break,
                            Err(Error::CacheFull { done: d }) => {
                                done += d;
                                e.flush().unwrap();
                                let _ = e.writeback_once(&mut q).unwrap();
                                e.gc_once(true).unwrap();
                            }
                            Err(err) => panic!("seed {seed} point {point}: zeroes: {err}"),
                        }
                    }
                    if region.power_failed() {
                        in_progress = Some((s, n, 0));
                    } else {
                        for i in s..s + n {
                            cur[i as usize] = 0;
                        }
                    }
                    zeroes += 1;
                }
                60..=74 => {
                    e.flush().unwrap();
                    if !region.power_failed() {
                        for (s, _) in since.drain() {
                            durable[s as usize] = cur[s as usize];
                        }
                        flushes += 1;
                    }
                }
                75..=89 => {
                    let n = rng.gen_range(1..=64u64);
                    let s = rng.gen_range(0..=SECTORS - n);
                    let b = &mut buf[..(n * SECTOR) as usize];
                    e.read_sync(&mut head, &*backing, s * SECTOR, b).unwrap();
                    for i in 0..n {
                        let got = sector_id(
                            &b[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
                            s + i,
                        )
                        .unwrap();
                        assert_eq!(
                            got,
                            cur[(s + i) as usize],
                            "seed {seed} point {point}: read of sector {}",
                            s + i
                        );
                    }
                }
                90..=96 => {
                    let _ = e.writeback_once(&mut q).unwrap();
                }
                _ => {
                    e.gc_once(rng.gen_bool(0.5)).unwrap();
                }
            }
            if region.power_failed() {
                mid_op += 1;
                break;
            }
        }
        // The crash: the cache medium keeps what this kind of crash keeps;
        // the backing store loses what it was not asked to flush.
        drop(e);
        head = DataHead::default();
        let r = match kind {
            Crash::Power => region.simulate_power_failure(seed ^ point),
            Crash::Process => {
                deaths += 1;
                region.simulate_process_death()
            }
        };
        pending_total += r.pending_words;
        reverted_total += r.reverted_words;
        discarded_total += r.discarded_words;
        backing.crash();
        e = open(&region);
        e.assert_invariants();
        staged_total += e.stats().snapshot().replay_staged_keys;
        let mut s = 0;
        while s < SECTORS {
            let n = 256.min(SECTORS - s);
            let b = &mut buf[..(n * SECTOR) as usize];
            e.read_sync(&mut head, &*backing, s * SECTOR, b).unwrap();
            for i in 0..n {
                let sec = s + i;
                let got = sector_id(&b[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize], sec)
                    .unwrap_or_else(|m| panic!("seed {seed} point {point}: {m}"));
                let running =
                    in_progress.is_some_and(|(s, n, id)| (s..s + n).contains(&sec) && got == id);
                let ok = match kind {
                    // Every flushed write, or something written after it.
                    Crash::Power => {
                        got == durable[sec as usize]
                            || since.get(&sec).is_some_and(|v| v.contains(&got))
                    }
                    // Every completed write, or the one that was running.
                    Crash::Process => got == cur[sec as usize] || running,
                };
                assert!(
                    ok,
                    "seed {seed} point {point}: after a {} sector {sec} holds {got}; \
                     flushed {}, completed {}, running {in_progress:?}, later {:?}",
                    if kind == Crash::Power {
                        "power failure"
                    } else {
                        "process death"
                    },
                    durable[sec as usize],
                    cur[sec as usize],
                    since.get(&sec)
                );
                // Adopt it: it is what the disk holds now.
                durable[sec as usize] = got;
                cur[sec as usize] = got;
            }
            s += n;
        }
        since.clear();
    }
    println!(
        "crash points (seed {seed}): {points} ({mid_op} inside an operation, {deaths} process deaths), \
         {writes} writes, {zeroes} zeroes, {flushes} flushes, {pending_total} unpersisted words at crash time, \
         {reverted_total} reverted, {discarded_total} stored after the crash discarded, \
         {staged_total} keys replayed from kset slots"
    );
    assert!(
        reverted_total > 0,
        "no crash point had unpersisted stores: the simulation tested nothing"
    );
    assert!(
        deaths > 0 && staged_total > 0,
        "no process death found keys in the kset slots: the simulation tested nothing"
    );
}

/// A backing store that fails every write and flush once a countdown of
/// writes runs out, until revived (the test then crashes its contents).
struct DyingBacking {
    mem: MemBacking,
    countdown: AtomicI64,
}

impl Backing for DyingBacking {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let left = self.countdown.fetch_sub(1, Ordering::SeqCst);
        if left <= 1 {
            return Err(std::io::Error::other("power failure"));
        }
        self.mem.write_at(buf, off)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.countdown.load(Ordering::SeqCst) <= 0 {
            return Err(std::io::Error::other("power failure"));
        }
        self.mem.flush()
    }
    fn describe(&self) -> String {
        "dying test backing".into()
    }
}

/// The flush boundaries E the backing store's durable image allows: each
/// sector's version v allows E in [epoch(v) - 1, epoch(next version) - 1],
/// and the image is a flush boundary plus part of the next epoch when all
/// sectors share one. Panics on a sector id never written.
fn boundaries(image: &[u8], hist: &[Vec<(u64, u64)>]) -> (u64, u64) {
    let (mut lo, mut hi) = (0u64, u64::MAX);
    for s in 0..SECTORS {
        let v = sector_id(
            &image[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize],
            s,
        )
        .unwrap();
        let h = &hist[s as usize];
        let i = h
            .iter()
            .position(|(_, id)| *id == v)
            .unwrap_or_else(|| panic!("sector {s}: id {v} never written"));
        let a = h[i].0.saturating_sub(1);
        let b = h.get(i + 1).map_or(u64::MAX, |(ep, _)| ep - 1);
        lo = lo.max(a);
        hi = hi.min(b);
    }
    (lo, hi)
}

/// Writes with random flushes, then writeback in passes of random budgets
/// while both media fail at random points. Checks the backing store's
/// durable image after every completed pass, and in strict order also at
/// every failure. Returns (failures, completed passes, epochs).
fn writeback_under_failures(order: WritebackOrder, seed: u64) -> (u64, u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let region = new_cache(dir.path());
    let mut e = open(&region);
    e.set_writeback_order(order).unwrap();
    // History per sector: (epoch written, id). Epoch k = writes between
    // flush k-1 and flush k.
    let mut hist: Vec<Vec<(u64, u64)>> = vec![vec![(0, 0)]; SECTORS as usize];
    let mut epoch = 1u64;
    let mut buf = vec![0u8; 64 * SECTOR as usize];
    let backing = Arc::new(DyingBacking {
        mem: MemBacking::new(DISK),
        countdown: AtomicI64::new(i64::MAX),
    });
    let (mut failures, mut passes) = (0u64, 0u64);
    // Backing writes before a failure: merged batches need few writes, a
    // strict batch (one epoch) needs more to finish at all.
    let countdown_max = match order {
        WritebackOrder::Batch | WritebackOrder::Newest => 8,
        WritebackOrder::Strict => 64,
    };
    // Phases of writes, each ending with a flush, then some writeback
    // passes; the last phase drains.
    const PHASES: u64 = 30;
    let mut next_id = 1u64;
    let mut head = DataHead::default();
    for phase in 1..=PHASES {
        for _ in 0..100 {
            let n = rng.gen_range(1..=64u64);
            let s = rng.gen_range(0..=SECTORS - n);
            let b = &mut buf[..(n * SECTOR) as usize];
            for i in 0..n {
                fill_sector(
                    &mut b[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
                    next_id,
                    s + i,
                );
            }
            e.write(&mut head, s * SECTOR, b).unwrap();
            for i in s..s + n {
                hist[i as usize].push((epoch, next_id));
            }
            next_id += 1;
            if rng.gen_bool(0.05) {
                e.flush().unwrap();
                epoch += 1;
            }
        }
        // Nothing the power failures below may lose.
        e.flush().unwrap();
        epoch += 1;
        let mut left = if phase == PHASES {
            u64::MAX
        } else {
            rng.gen_range(1..6)
        };
        // Failures in a row: each allows more writes before the next, so a
        // batch that needs many writes still finishes in the end.
        let mut streak = 0u32;
        while left > 0 {
            let most = countdown_max << streak.min(12);
            backing
                .countdown
                .store(rng.gen_range(1..most), Ordering::SeqCst);
            let mut q = BackingQueue::new(backing.clone(), 8);
            let mut failed = false;
            while left > 0 {
                // Budgets from one 4 KiB key to half the disk: a batch cut
                // off by a failure is often retried with a smaller budget.
                let budget = 4096u64 << rng.gen_range(0..10);
                match e.writeback_with_budget(&mut q, budget) {
                    Ok(Progress::Clean) => left = 0,
                    Ok(Progress::Advanced { .. }) => {
                        passes += 1;
                        left -= 1;
                        streak = 0;
                        // Newest order promises nothing of the store alone
                        // until it is clean: only the drain below.
                        if order != WritebackOrder::Newest {
                            let (lo, hi) = boundaries(&backing.mem.durable_image(), &hist);
                            assert!(
                                lo <= hi,
                                "{order} order, seed {seed}, after pass {passes}: the backing store is not a flush boundary plus part of the next epoch (needs a boundary in {lo}..={hi})"
                            );
                        }
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            drop(q);
            backing.countdown.store(i64::MAX, Ordering::SeqCst);
            if !failed {
                break;
            }
            // Both media fail at this point.
            streak += 1;
            drop(e);
            // The disk's own cache had written some of the batch.
            backing.mem.crash_partial(|| rng.gen_bool(0.5));
            region.simulate_power_failure(seed ^ failures);
            failures += 1;
            e = open(&region);
            head = DataHead::default();
            let (lo, hi) = boundaries(&backing.mem.durable_image(), &hist);
            if order == WritebackOrder::Strict {
                assert!(
                    lo <= hi,
                    "strict order, seed {seed}, failure {failures}: the backing store mixes flush epochs (needs a boundary in {lo}..={hi})"
                );
            }
        }
        e.gc_once(false).unwrap();
    }
    let _ = head;
    // Fully drained: the backing store alone is the whole disk.
    let image = backing.mem.durable_image();
    for s in 0..SECTORS {
        let v = sector_id(
            &image[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize],
            s,
        )
        .unwrap();
        assert_eq!(
            v,
            hist[s as usize].last().unwrap().1,
            "sector {s} after the drain"
        );
    }
    assert!(failures >= 3, "too few failure points ({failures})");
    (failures, passes, epoch)
}

#[test]
fn backing_store_alone_is_a_flush_boundary_after_every_writeback_batch() {
    let seed: u64 = knobs::seed("PCACHE_CRASH_SEED", 78);
    let (failures, passes, epochs) = writeback_under_failures(WritebackOrder::Batch, seed);
    println!(
        "backing crash consistency, batch order (seed {seed}): {failures} failures of both media during writeback, {passes} batches checked, {epochs} epochs"
    );
}

#[test]
fn newest_order_skips_replaced_versions_and_loses_nothing_through_failures_of_both_media() {
    let seed: u64 = knobs::seed("PCACHE_CRASH_SEED", 80);
    let (failures, passes, epochs) = writeback_under_failures(WritebackOrder::Newest, seed);
    println!(
        "newest order (seed {seed}): {failures} failures of both media during writeback, {passes} batches, {epochs} epochs; drained store checked"
    );
}

#[test]
fn strict_order_keeps_the_backing_store_a_flush_boundary_at_every_instant() {
    let seed: u64 = knobs::seed("PCACHE_CRASH_SEED", 79);
    let (failures, passes, epochs) = writeback_under_failures(WritebackOrder::Strict, seed);
    println!(
        "backing crash consistency, strict order (seed {seed}): {failures} failures of both media during writeback, each checked, {passes} batches checked, {epochs} epochs"
    );
}
