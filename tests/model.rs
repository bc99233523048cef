//! The engine against an in-memory model of a block device.
//!
//! Seeded random reads, writes (1 sector to 1 MiB, unaligned to regions and
//! segments), write-zeroes and discards (up to 12 MiB, so across regions)
//! and flushes on a cache small enough that GC and deferral run
//! many times, with clean restarts and simulated deaths of the process
//! (reopen from the mapped file without closing open ksets, and the backing
//! store losing every write not covered by a flush). After every reopen each
//! sector must hold the value of the last acknowledged write, flushed or
//! not: a completed write survives the process.
//!
//! `PCACHE_MODEL_SEED` replays one run; `PCACHE_MODEL_OPS` sets its length.

use std::path::Path;
use std::sync::Arc;

use pcache::backing::{Backing, BackingQueue};
use pcache::engine::{
    DataHead, Engine, Error, FormatOptions, OpenOptions, Workers, WritebackOrder, WritebackPolicy,
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
const CACHE_BYTES: u64 = 512 << 20;

/// What the device must hold: the latest acknowledged write id per sector.
struct Model {
    cur: Vec<u64>,
}

impl Model {
    fn new(sectors: u64) -> Model {
        Model {
            cur: vec![0; sectors as usize],
        }
    }

    fn write(&mut self, sector: u64, n: u64, id: u64) {
        for s in sector..sector + n {
            self.cur[s as usize] = id;
        }
    }
}

struct Harness {
    path: std::path::PathBuf,
    backing: Arc<MemBacking>,
    engine: Option<Arc<Engine>>,
    head: DataHead,
    queue: BackingQueue,
    /// Counters of engines already closed or crashed.
    gc_freed: u64,
    cache_full: u64,
    wb_bytes: u64,
}

fn open_engine(path: &Path) -> Arc<Engine> {
    let region = Arc::new(Region::open(path, RegionOptions::default()).expect("map cache"));
    Engine::open(region, &OpenOptions::default()).expect("open cache")
}

impl Harness {
    fn new(dir: &Path, backing_bytes: u64, data_crc: bool) -> Harness {
        let path = dir.join("cache.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(CACHE_BYTES).unwrap();
        drop(f);
        let region = Region::open(&path, RegionOptions::default()).unwrap();
        Engine::format(
            &region,
            &FormatOptions {
                backing_bytes,
                data_crc,
                gc_percent: 90,
                force: false,
            },
        )
        .unwrap();
        drop(region);
        let backing = Arc::new(MemBacking::new(backing_bytes));
        let queue = BackingQueue::new(backing.clone(), 64);
        Harness {
            engine: Some(open_engine(&path)),
            path,
            backing,
            head: DataHead::default(),
            queue,
            gc_freed: 0,
            cache_full: 0,
            wb_bytes: 0,
        }
    }

    fn e(&self) -> &Arc<Engine> {
        self.engine.as_ref().unwrap()
    }

    /// Make a little room, as the workers would for a waiting writer: one
    /// small writeback batch, then GC regardless of gc_percent, until a
    /// segment is freed. Keeps the cache near full so deferral happens
    /// often.
    fn reclaim(&mut self) {
        let e = self.engine.as_ref().unwrap().clone();
        e.flush().expect("flush while reclaiming");
        loop {
            let wb = e
                .writeback_with_budget(&mut self.queue, 64 << 10)
                .expect("writeback");
            if e.gc_once(true).expect("gc") > 0 || wb == pcache::engine::Progress::Clean {
                return;
            }
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) -> u32 {
        let mut done = 0usize;
        let mut deferrals = 0;
        loop {
            let e = self.e().clone();
            match e.write(&mut self.head, off + done as u64, &data[done..]) {
                Ok(()) => return deferrals,
                Err(Error::CacheFull { done: d }) => {
                    done += d as usize;
                    deferrals += 1;
                    assert!(deferrals < 1000, "write at {off} deferred forever");
                    self.reclaim();
                }
                Err(e) => panic!("write at {off} failed: {e}"),
            }
        }
    }

    /// Zero (`unmap`: discard) a range, making room as `write` does.
    fn zero(&mut self, off: u64, len: u64, unmap: bool) -> u32 {
        let mut done = 0u64;
        let mut deferrals = 0;
        loop {
            let e = self.e().clone();
            match e.write_zeroes(off + done, len - done, unmap) {
                Ok(()) => return deferrals,
                Err(Error::CacheFull { done: d }) => {
                    done += d;
                    deferrals += 1;
                    assert!(deferrals < 1000, "write-zeroes at {off} deferred forever");
                    self.reclaim();
                }
                Err(e) => panic!("write-zeroes at {off} failed: {e}"),
            }
        }
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) {
        let e = self.e().clone();
        e.read_sync(&mut self.head, &*self.backing, off, buf)
            .expect("read");
    }

    fn tally(&mut self) {
        let s = self.e().stats().snapshot();
        self.gc_freed += s.gc_segs_freed;
        self.cache_full += s.cache_full;
        self.wb_bytes += s.writeback_bytes;
    }

    fn crash(&mut self) {
        self.tally();
        // No flush, no head release: the process just dies. The backing
        // store loses what it was not asked to flush.
        self.engine = None;
        self.head = DataHead::default();
        self.backing.crash();
        self.engine = Some(open_engine(&self.path));
    }

    fn restart(&mut self) {
        self.tally();
        let e = self.engine.take().unwrap();
        e.flush().expect("flush at shutdown");
        e.head_release(&mut self.head);
        drop(e);
        self.engine = Some(open_engine(&self.path));
    }
}

fn verify_all(h: &mut Harness, m: &Model, crashed: bool, seed: u64) {
    let sectors = m.cur.len() as u64;
    let chunk = 1024u64; // sectors per read
    let mut buf = vec![0u8; (chunk * SECTOR) as usize];
    let mut s = 0;
    while s < sectors {
        let n = chunk.min(sectors - s);
        let b = &mut buf[..(n * SECTOR) as usize];
        h.read(s * SECTOR, b);
        for i in 0..n {
            let sec = s + i;
            let got = sector_id(&b[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize], sec)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(
                got,
                m.cur[sec as usize],
                "seed {seed}: sector {sec} after {}",
                if crashed {
                    "the process died"
                } else {
                    "a clean restart"
                }
            );
        }
        s += n;
    }
}

fn random_len(rng: &mut StdRng, max_sectors: u64) -> u64 {
    let n = match rng.gen_range(0..100) {
        0..=59 => rng.gen_range(1..=8),
        60..=89 => rng.gen_range(8..=256),
        _ => rng.gen_range(256..=2048), // up to 1 MiB
    };
    n.min(max_sectors)
}

fn run_model(seed: u64, ops: u64, data_crc: bool) {
    run_model_in(seed, ops, data_crc, WritebackOrder::Batch);
}

fn run_model_in(seed: u64, ops: u64, data_crc: bool, order: WritebackOrder) {
    let dir = tempfile::tempdir().unwrap();
    let backing_bytes = 96 << 20;
    let sectors = backing_bytes / SECTOR;
    let mut h = Harness::new(dir.path(), backing_bytes, data_crc);
    // Kept in the cache: it holds across the crashes and restarts.
    h.e().set_writeback_order(order).unwrap();
    let mut m = Model::new(sectors);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next_id = 1u64;
    let (mut crashes, mut restarts, mut flushes, mut deferrals, mut reads) = (0, 0, 0, 0u64, 0);
    let mut zeroes = 0;
    let mut wbuf = Vec::new();
    let mut rbuf = Vec::new();
    for op in 0..ops {
        let r = rng.gen_range(0..1000);
        match r {
            0..=549 => {
                let n = random_len(&mut rng, sectors);
                let s = rng.gen_range(0..=sectors - n);
                let id = next_id;
                next_id += 1;
                wbuf.resize((n * SECTOR) as usize, 0);
                for i in 0..n {
                    fill_sector(
                        &mut wbuf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
                        id,
                        s + i,
                    );
                }
                deferrals += h.write(s * SECTOR, &wbuf) as u64;
                m.write(s, n, id);
            }
            550..=579 => {
                // Write-zeroes or discard: the range reads zeros from now
                // on (id 0), as after writeback from the backing store.
                let n = if rng.gen_bool(0.3) {
                    rng.gen_range(1..=3 * 8192).min(sectors)
                } else {
                    random_len(&mut rng, sectors)
                };
                let s = rng.gen_range(0..=sectors - n);
                deferrals += h.zero(s * SECTOR, n * SECTOR, rng.gen_bool(0.5)) as u64;
                m.write(s, n, 0);
                zeroes += 1;
            }
            580..=969 => {
                let n = random_len(&mut rng, sectors);
                let s = rng.gen_range(0..=sectors - n);
                rbuf.resize((n * SECTOR) as usize, 0);
                h.read(s * SECTOR, &mut rbuf);
                for i in 0..n {
                    let got = sector_id(
                        &rbuf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
                        s + i,
                    )
                    .unwrap_or_else(|e| panic!("seed {seed} op {op}: {e}"));
                    assert_eq!(
                        got,
                        m.cur[(s + i) as usize],
                        "seed {seed} op {op}: read of sector {}",
                        s + i
                    );
                }
                reads += 1;
            }
            970..=989 => {
                h.e()
                    .flush()
                    .unwrap_or_else(|e| panic!("seed {seed} op {op}: flush: {e}"));
                flushes += 1;
            }
            990..=994 => {
                // Background work at random points, as the workers would,
                // with batches from 4 KiB to 8 MiB.
                let e = h.e().clone();
                let budget = 4096u64 << (op % 12);
                let _ = e
                    .writeback_with_budget(&mut h.queue, budget)
                    .expect("writeback");
                e.gc_once(false).expect("gc");
            }
            _ => {}
        }
        if op % 7919 == 7918 {
            h.crash();
            crashes += 1;
            verify_all(&mut h, &m, true, seed);
            h.e().assert_invariants();
        } else if op % 20011 == 20010 {
            h.restart();
            restarts += 1;
            verify_all(&mut h, &m, false, seed);
            h.e().assert_invariants();
        }
    }
    // Drain online, then the backing store alone must equal the model.
    let e = h.e().clone();
    e.writeback_all(&mut h.queue, |_| {}).expect("drain");
    assert!(!e.is_dirty());
    let image = h.backing.image();
    for s in 0..sectors {
        let got = sector_id(
            &image[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize],
            s,
        )
        .unwrap_or_else(|e| panic!("seed {seed}: backing: {e}"));
        assert_eq!(
            got, m.cur[s as usize],
            "seed {seed}: backing sector {s} after drain"
        );
    }
    h.tally();
    println!(
        "model seed {seed}: {ops} ops, {} writes, {zeroes} zeroes, {reads} reads, {flushes} flushes, {crashes} crashes, {restarts} restarts, \
         {deferrals} deferrals, {} GC segments freed, {} MiB written back, {} cache-full events",
        next_id - 1,
        h.gc_freed,
        h.wb_bytes >> 20,
        h.cache_full
    );
    assert!(
        h.gc_freed >= ops / 1000,
        "GC must run many times (freed {})",
        h.gc_freed
    );
    // Newest order frees space faster (replaced versions cost nothing),
    // so fewer writers wait: it needs only some.
    let want = if order == WritebackOrder::Newest {
        1
    } else {
        ops / 5000
    };
    assert!(
        deferrals >= want,
        "deferral must run many times ({deferrals})"
    );
    assert!(crashes > 0 && flushes > 0 && zeroes > 0);
}

fn seed_and_ops(default_seed: u64) -> (u64, u64) {
    let seed = knobs::seed("PCACHE_MODEL_SEED", default_seed);
    // Fewer operations reach too few of the states the model checks.
    let ops = knobs::size("PCACHE_MODEL_OPS", 100_000, 10_000);
    (seed, ops)
}

#[test]
fn engine_matches_model_through_crashes_restarts_gc_and_deferral() {
    let (seed, ops) = seed_and_ops(0x5eed_0001);
    run_model(seed, ops, false);
}

/// Writeback that skips versions replaced later in the log must still
/// lose nothing through crashes: the replacing key is durable and dirty.
#[test]
fn engine_matches_model_in_newest_writeback_order() {
    let (seed, ops) = seed_and_ops(0x5eed_0003);
    run_model_in(seed, ops / 2, false, WritebackOrder::Newest);
}

#[test]
fn engine_matches_model_with_data_crc() {
    let (seed, ops) = seed_and_ops(0x5eed_0002);
    run_model(seed, ops / 2, true);
}

/// Background workers, two writer threads and a full cache: writers wait
/// for GC (deferral) and every byte verifies at the end.
#[test]
fn concurrent_writers_with_background_workers_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backing_bytes = 64u64 << 20;
    let h = Harness::new(dir.path(), backing_bytes, false);
    let engine = h.e().clone();
    let backing = h.backing.clone();
    let workers = Workers::start(
        engine.clone(),
        backing.clone() as Arc<dyn Backing>,
        WritebackPolicy::IMMEDIATE,
    );
    // Each thread owns half the device and writes it over and over: 4x the
    // cache size in total.
    let half = backing_bytes / 2;
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut head = DataHead::default();
                let mut rng = StdRng::seed_from_u64(t);
                let mut last = vec![0u64; (half / SECTOR) as usize];
                let mut buf = vec![0u8; 256 << 10];
                let mut written = 0u64;
                let mut id = t << 40;
                while written < 2 * CACHE_BYTES {
                    let n = rng.gen_range(1..=512u64);
                    let s = rng.gen_range(0..=half / SECTOR - n);
                    id += 1;
                    let b = &mut buf[..(n * SECTOR) as usize];
                    for i in 0..n {
                        fill_sector(
                            &mut b[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
                            id,
                            t * half / SECTOR + s + i,
                        );
                    }
                    engine
                        .write_blocking(&mut head, t * half + s * SECTOR, b)
                        .expect("write");
                    for i in 0..n {
                        last[(s + i) as usize] = id;
                    }
                    written += n * SECTOR;
                }
                engine.head_release(&mut head);
                last
            })
        })
        .collect();
    let lasts: Vec<Vec<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    engine.flush().unwrap();
    let mut head = DataHead::default();
    let mut buf = vec![0u8; 1 << 20];
    for (t, last) in lasts.iter().enumerate() {
        for chunk in 0..(half / buf.len() as u64) {
            let off = t as u64 * half + chunk * buf.len() as u64;
            engine
                .read_sync(&mut head, &*backing, off, &mut buf)
                .unwrap();
            for i in 0..buf.len() as u64 / SECTOR {
                let sec = off / SECTOR + i;
                let got = sector_id(
                    &buf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
                    sec,
                )
                .unwrap();
                assert_eq!(
                    got,
                    last[(sec - t as u64 * half / SECTOR) as usize],
                    "sector {sec}"
                );
            }
        }
    }
    let s = engine.stats().snapshot();
    assert!(s.cache_full > 0, "the cache never filled up");
    assert!(s.gc_segs_freed > 0);
    workers.stop();
    engine.assert_invariants();
}
