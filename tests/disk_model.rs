//! The disk layer against a model, in every cache mode, with many
//! overlapping requests in flight at once.
//!
//! Three queues keep up to eight seeded random requests each in flight over
//! a 16 MiB hot area: writes (one sector to 256 KiB, sector aligned),
//! write-zeroes, discards, reads, flushes and bursts of sequential writes
//! (long enough to go around the cache in write-back mode). The backing
//! store delays some operations before and some after they land, so its
//! completions come back out of order, and the I/O memory is the smallest
//! allowed, so requests wait for it.
//!
//! Concurrent writes to one sector may land in either order, but not in
//! any order: a read may only return a write that was not already replaced
//! when the read began (by a write that started after it completed). At
//! the end, once writeback has drained, the cache and the backing store
//! must agree on every sector: a later write never lands on the store
//! before an earlier one that the cache kept.
//!
//! `PCACHE_MODEL_SEED` replays one run; `PCACHE_DISK_MODEL_OPS` sets its
//! length.

mod common;
#[path = "common/knobs.rs"]
mod knobs;

#[path = "common/sectors.rs"]
mod sectors;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::disk::Driver;
use pcache::backing::Backing;
use pcache::disk::{Disk, DiskConfig, Op, Status, MIN_IO_MEMORY};
use pcache::engine::{CacheMode, WritebackPolicy};
use pcache::iovec::IoVec;
use pcache::testing::{FaultKind, FaultOp, FaultPlan, FaultyBacking, MemBacking};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sectors::{fill_sector, sector_id};

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// Where the requests go (four regions, so requests cross them).
const HOT: u64 = 16 * MIB;
const QUEUES: usize = 3;
const DEPTH: usize = 8;

/// One write-like request: the id its sectors carry (0 for zeroes and the
/// initial contents), and when it was submitted and seen complete.
struct Put {
    value: u64,
    submit: u64,
    complete: u64,
}

/// Every put to every sector, and a clock that ticks at every submission
/// and every completion seen.
struct History {
    puts: Vec<Put>,
    /// Per sector of the hot area, the puts that covered it.
    by_sector: Vec<Vec<u32>>,
    clock: u64,
}

impl History {
    fn new() -> History {
        // Put 0: the initial zeros, complete before anything starts.
        History {
            puts: vec![Put {
                value: 0,
                submit: 0,
                complete: 0,
            }],
            by_sector: vec![vec![0]; (HOT / SECTOR) as usize],
            clock: 1,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A put of `value` (0: zeros) to `sector..sector+n`, submitted now.
    fn put(&mut self, sector: u64, n: u64, value: u64) -> u32 {
        let i = self.puts.len() as u32;
        let submit = self.tick();
        self.puts.push(Put {
            value,
            submit,
            complete: u64::MAX,
        });
        for s in sector..sector + n {
            self.by_sector[s as usize].push(i);
        }
        i
    }

    fn completed(&mut self, put: u32) {
        let t = self.tick();
        self.puts[put as usize].complete = t;
    }

    /// Whether `value` may be read from `sector` by a read submitted at
    /// `start` and seen complete at `end`: some put of it began before the
    /// read ended, and no put that began after that one completed had
    /// completed before the read began.
    fn allowed(&self, sector: u64, value: u64, start: u64, end: u64) -> bool {
        let puts = &self.by_sector[sector as usize];
        puts.iter()
            .map(|&i| &self.puts[i as usize])
            .filter(|a| a.value == value && a.submit < end)
            .any(|a| {
                !puts.iter().map(|&j| &self.puts[j as usize]).any(|b| {
                    a.complete != u64::MAX
                        && b.submit > a.complete
                        && b.complete != u64::MAX
                        && b.complete < start
                })
            })
    }

    /// Check `data`, read from `off` between `start` and `end`.
    fn check(&self, what: &str, off: u64, data: &[u8], start: u64, end: u64) {
        for (k, sec) in data.chunks(SECTOR as usize).enumerate() {
            let s = off / SECTOR + k as u64;
            let v = sector_id(sec, s).unwrap_or_else(|e| panic!("{what}: sector {s}: {e}"));
            assert!(
                self.allowed(s, v, start, end),
                "{what}: sector {s} holds write {v}, which a later completed write had replaced"
            );
        }
    }
}

/// What a queue's request in flight is.
enum Flight {
    Put(u32),
    Read {
        off: u64,
        view: IoVec<'static>,
        len: usize,
        start: u64,
    },
    Flush,
}

fn data(id: u64, sector: u64, n: u64) -> Vec<u8> {
    let mut buf = vec![0u8; (n * SECTOR) as usize];
    for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
        fill_sector(s, id, sector + i as u64);
    }
    buf
}

/// A store that delays a third of its writes (half before they land, half
/// after) and some reads, through four threads: completions come back out
/// of order.
fn slow_store(seed: u64) -> Arc<FaultyBacking<MemBacking>> {
    let store = Arc::new(FaultyBacking::new(MemBacking::new(64 * MIB), seed));
    let ms = Duration::from_millis;
    store.add(FaultPlan::new(FaultOp::Write, FaultKind::Delay(ms(3))).probability(0.15));
    store.add(FaultPlan::new(FaultOp::Write, FaultKind::DelayAfter(ms(3))).probability(0.15));
    store.add(FaultPlan::new(FaultOp::Read, FaultKind::Delay(ms(2))).probability(0.1));
    store
}

/// `write_cache`: the guest negotiated a write cache (FLUSH); without
/// one, every write is durable when answered.
fn run(mode: CacheMode, write_cache: bool, seed: u64, ops: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = slow_store(seed);
    let e = common::disk::engine(&dir.path().join("cache.img"), 512 * MIB, store.size());
    if mode != CacheMode::Writeback {
        e.set_mode(mode, Duration::from_secs(10)).unwrap();
    }
    let cfg = DiskConfig {
        sequential_cutoff: 128 << 10,
        read_only: false,
        io_memory: MIN_IO_MEMORY,
    };
    let backing: Arc<dyn Backing> = store.clone();
    let disk =
        Arc::new(Disk::new(e.clone(), backing, true, cfg, WritebackPolicy::IMMEDIATE).unwrap());
    disk.set_flush_negotiated(write_cache);
    let mut queues: Vec<(Driver, Vec<(u64, Flight)>)> = (0..QUEUES)
        .map(|_| (Driver::new(&disk), Vec::new()))
        .collect();
    let mut h = History::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next_id = 1u64;
    let (mut issued, mut reads_checked) = (0u64, 0u64);
    let mut counts = [0u64; 5];
    let t0 = Instant::now();
    while issued < ops || queues.iter().any(|(_, f)| !f.is_empty()) {
        if t0.elapsed() > Duration::from_secs(300) {
            let stuck: Vec<usize> = queues.iter().map(|(q, _)| q.dq.pending()).collect();
            panic!(
                "{mode} seed {seed}: requests still unanswered after 300 s ({stuck:?} per queue)"
            );
        }
        for (q, flights) in queues.iter_mut() {
            let depth = rng.gen_range(1..=DEPTH);
            while issued < ops && flights.len() < depth {
                issued += 1;
                let n = match rng.gen_range(0..10) {
                    0..=5 => rng.gen_range(1..=16u64),
                    6..=8 => rng.gen_range(1..=128u64),
                    _ => rng.gen_range(1..=512u64),
                };
                let sector = rng.gen_range(0..=HOT / SECTOR - n);
                let off = sector * SECTOR;
                let len = n * SECTOR;
                match rng.gen_range(0..100) {
                    0..=44 => {
                        next_id += 1;
                        let p = h.put(sector, n, next_id);
                        let buf = IoVec::owned(data(next_id, sector, n));
                        flights.push((q.submit(Op::Write, off, len, buf), Flight::Put(p)));
                        counts[0] += 1;
                    }
                    45..=49 => {
                        // A sequential burst: long enough to go around.
                        let chunk = 128u64;
                        let start = rng.gen_range(0..HOT / SECTOR / chunk - 6) * chunk;
                        for k in 0..6 {
                            next_id += 1;
                            let s = start + k * chunk;
                            let p = h.put(s, chunk, next_id);
                            let buf = IoVec::owned(data(next_id, s, chunk));
                            let tag = q.submit(Op::Write, s * SECTOR, chunk * SECTOR, buf);
                            flights.push((tag, Flight::Put(p)));
                        }
                        counts[0] += 6;
                    }
                    50..=57 => {
                        let unmap = rng.gen_bool(0.5);
                        let p = h.put(sector, n, 0);
                        let tag = q.submit(Op::Zeroes { unmap }, off, len, IoVec::empty());
                        flights.push((tag, Flight::Put(p)));
                        counts[1] += 1;
                    }
                    58..=95 => {
                        let buf = IoVec::owned(vec![0u8; len as usize]);
                        let view = buf.slice(0, len as usize);
                        let start = h.tick();
                        let tag = q.submit(Op::Read, off, len, buf);
                        let read = Flight::Read {
                            off,
                            view,
                            len: len as usize,
                            start,
                        };
                        flights.push((tag, read));
                        counts[2] += 1;
                    }
                    _ => {
                        flights.push((q.submit(Op::Flush, 0, 0, IoVec::empty()), Flight::Flush));
                        counts[3] += 1;
                    }
                }
            }
            q.poll(Duration::from_micros(if rng.gen_bool(0.5) {
                0
            } else {
                500
            }));
            let mut k = 0;
            while k < flights.len() {
                let Some(status) = q.answer(flights[k].0) else {
                    k += 1;
                    continue;
                };
                let (_, flight) = flights.swap_remove(k);
                assert_eq!(status, Status::Ok, "{mode} seed {seed}: a request failed");
                match flight {
                    Flight::Put(p) => h.completed(p),
                    Flight::Read {
                        off,
                        view,
                        len,
                        start,
                    } => {
                        let end = h.tick();
                        let mut got = vec![0u8; len];
                        view.copy_out(0, &mut got);
                        h.check(&format!("{mode} seed {seed}: read"), off, &got, start, end);
                        reads_checked += 1;
                    }
                    Flight::Flush => {}
                }
            }
        }
    }

    // Everything answered: write back what is dirty, then the cache and the
    // store must hold the same, and only what the model allows.
    let (q, _) = &mut queues[0];
    assert_eq!(q.flush(), Status::Ok);
    e.request_drain().unwrap();
    let t0 = Instant::now();
    while e.is_dirty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{mode} seed {seed}: writeback did not drain"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let image = store.inner().image();
    let now = h.tick();
    for off in (0..HOT).step_by(MIB as usize) {
        let (s, got) = q.read(off, MIB as usize);
        assert_eq!(s, Status::Ok);
        let what = format!("{mode} seed {seed}: after drain");
        h.check(&what, off, &got, now, now);
        for (k, (c, b)) in got
            .chunks(SECTOR as usize)
            .zip(image[off as usize..(off + MIB) as usize].chunks(SECTOR as usize))
            .enumerate()
        {
            let s = off / SECTOR + k as u64;
            assert!(
                c == b,
                "{what}: sector {s}: the cache holds write {:?}, the store write {:?}",
                sector_id(c, s),
                sector_id(b, s)
            );
        }
    }
    let st = e.stats().snapshot();
    eprintln!(
        "{mode} seed {seed}: {} writes, {} zeroings, {} reads ({reads_checked} checked), {} flushes; \
         {} bytes around the cache, {} delays injected",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        st.write_bypass_bytes,
        store.injected()
    );
    assert!(store.injected() > 0, "no delay was injected");
    if mode == CacheMode::Writeback {
        assert!(
            st.write_bypass_bytes > 0,
            "no sequential write went around the cache"
        );
    }
    drop(queues);
    disk.shutdown().unwrap();
}

fn seed_and_ops(default_seed: u64) -> (u64, u64) {
    let seed = knobs::seed("PCACHE_MODEL_SEED", default_seed);
    // Fewer operations reach too few of the states the model checks.
    let ops = knobs::size("PCACHE_DISK_MODEL_OPS", 20_000, 2_000);
    (seed, ops)
}

#[test]
fn overlapping_requests_in_write_back_mode_match_the_model() {
    let (seed, ops) = seed_and_ops(0xd15c_0001);
    run(CacheMode::Writeback, true, seed, ops);
}

#[test]
fn overlapping_requests_in_write_through_mode_match_the_model() {
    let (seed, ops) = seed_and_ops(0xd15c_0002);
    run(CacheMode::Writethrough, true, seed, ops);
}

#[test]
fn overlapping_requests_in_write_around_mode_match_the_model() {
    let (seed, ops) = seed_and_ops(0xd15c_0003);
    run(CacheMode::Writearound, true, seed, ops);
}

#[test]
fn overlapping_requests_with_the_cache_off_match_the_model() {
    let (seed, ops) = seed_and_ops(0xd15c_0004);
    run(CacheMode::None, true, seed, ops);
}

#[test]
fn overlapping_requests_with_the_guest_cache_off_match_the_model() {
    let (seed, ops) = seed_and_ops(0xd15c_0005);
    for mode in [CacheMode::Writeback, CacheMode::Writethrough] {
        run(mode, false, seed, ops / 4);
    }
}
