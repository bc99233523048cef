//! What a guest sends never decides how much memory pcache takes: its
//! anonymous memory, sampled while hostile or heavy clients run, stays
//! within `--io-memory` plus a small fixed amount (beyond the extent index,
//! which status reports), and a guest that leaves takes its share with it.
//!
//! Guards against the bugs of main at 252d028: 1 MiB misses at QD128 held
//! 2.7 GiB, a client pointing every request at one buffer 3.1 GiB, and an
//! idle instance kept 84 MiB after its guest left.

mod common;
#[path = "common/throttle.rs"]
mod throttle;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::{Client, Disk, Server};
use throttle::{Limits, Throttle};

const MIB: u64 = 1 << 20;
/// What pcache may take beyond its I/O memory and its index: threads'
/// stacks, rings, the request tables, the heap's slack.
const FIXED: u64 = 16 * MIB;
/// The segment length libblkio's requests are cut into (pcache's size_max).
const SEG: usize = 128 << 10;

/// Anonymous bytes of process `pid` now (None once it is gone).
fn try_anon(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kib * 1024)
}

/// Anonymous bytes of the running process `pid`.
fn anon(pid: u32) -> u64 {
    try_anon(pid).expect("the process is running and has an Anonymous: line")
}

/// Samples a process's anonymous memory every 50 ms; the peak so far.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Some(a) = try_anon(pid) else { return };
                p.fetch_max(a, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// What a client sends for a while.
struct Load {
    write: bool,
    /// Request size (a multiple of [`SEG`], or less than it).
    bs: usize,
    qd: usize,
    /// Every request of a queue uses the same buffer.
    alias: bool,
    secs: f64,
}

/// The buffer region a client needs for `l` on `nq` queues.
fn region_bytes(l: &Load, nq: usize) -> usize {
    nq * l.bs * if l.alias { 1 } else { l.qd }
}

/// Run `l` on every queue of `c` at once, at random offsets below `span`;
/// every request must succeed. Returns early, with requests in flight, once
/// `stop` is set.
fn hammer(c: &mut Client, l: &Load, span: u64, stop: &AtomicBool) {
    let nq = c.queues.len();
    let per_q = if l.alias { l.bs } else { l.bs * l.qd };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let blocks = span / l.bs as u64;
    let iovs: Vec<Vec<Vec<libc::iovec>>> = (0..nq)
        .map(|q| {
            (0..l.qd)
                .map(|s| {
                    let at = q * per_q + if l.alias { 0 } else { s * l.bs };
                    (0..l.bs)
                        .step_by(SEG)
                        .map(|o| libc::iovec {
                            iov_base: c.ptr(at + o).cast(),
                            iov_len: SEG.min(l.bs - o),
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let submit = |c: &mut Client, q: usize, s: usize, off: u64| {
        let iov = &iovs[q][s];
        let (p, n) = (iov.as_ptr(), iov.len() as u32);
        if l.write {
            c.queues[q].writev(off, p, n, s, ReqFlags::empty());
        } else {
            c.queues[q].readv(off, p, n, s, ReqFlags::empty());
        }
    };
    for q in 0..nq {
        for s in 0..l.qd {
            submit(c, q, s, next(blocks) * l.bs as u64);
        }
    }
    let end = Instant::now() + Duration::from_secs_f64(l.secs);
    let mut left = vec![l.qd; nq];
    let mut comps: Vec<std::mem::MaybeUninit<blkio::Completion>> =
        (0..l.qd).map(|_| std::mem::MaybeUninit::uninit()).collect();
    while left.iter().any(|&n| n > 0) && !stop.load(Ordering::Relaxed) {
        for (q, left) in left.iter_mut().enumerate() {
            if *left == 0 {
                continue;
            }
            let mut t = Duration::from_millis(1);
            let n = c.queues[q]
                .do_io(&mut comps, 0, Some(&mut t), None)
                .expect("do_io");
            for comp in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let comp = unsafe { comp.assume_init_read() };
                assert_eq!(comp.ret, 0, "a request failed");
                if Instant::now() < end {
                    submit(c, q, comp.user_data, next(blocks) * l.bs as u64);
                } else {
                    *left -= 1;
                }
            }
        }
    }
}

/// Bytes of the extent index, from status.
fn index_bytes(server: &Server) -> u64 {
    common::status(server)["index_bytes"]
        .as_u64()
        .expect("status reports index_bytes")
}

#[test]
fn peak_memory_stays_within_the_io_memory_whatever_the_guest_sends() {
    let budget = 8 * MIB;
    let span = 1024 * MIB;
    let disk = Disk::new(span, None);
    let server = disk.serve(&["--io-memory", "8M", "--num-queues", "4"]);
    let pid = server.child.id();
    let loads = [
        // 1 MiB misses at QD64 on every queue: 256 MiB asked at once.
        Load {
            write: false,
            bs: MIB as usize,
            qd: 64,
            alias: false,
            secs: 2.0,
        },
        // The same, every request of a queue into one buffer.
        Load {
            write: false,
            bs: MIB as usize,
            qd: 64,
            alias: true,
            secs: 2.0,
        },
        // Chains of the largest size (128 descriptors of 128 KiB), 64 per
        // queue, reading and writing.
        Load {
            write: false,
            bs: 16 << 20,
            qd: 64,
            alias: true,
            secs: 2.0,
        },
        Load {
            write: true,
            bs: 16 << 20,
            qd: 64,
            alias: true,
            secs: 2.0,
        },
    ];
    for l in &loads {
        let mut c = Client::connect(&disk.socket, 4, region_bytes(l, 4));
        let s = Sampler::start(pid);
        hammer(&mut c, l, span, &AtomicBool::new(false));
        let peak = s.peak();
        drop(c);
        let limit = budget + FIXED + index_bytes(&server);
        eprintln!(
            "{} {} KiB x QD{}{}: peak {} KiB (limit {} KiB)",
            if l.write { "writes" } else { "reads" },
            l.bs >> 10,
            l.qd,
            if l.alias { ", aliased" } else { "" },
            peak >> 10,
            limit >> 10
        );
        assert!(
            peak <= limit,
            "pcache took {} KiB with --io-memory 8M",
            peak >> 10
        );
    }
}

#[test]
fn a_guest_that_leaves_takes_its_memory_with_it() {
    let disk = Disk::new(1024 * MIB, None);
    let server = disk.serve(&[]);
    let pid = server.child.id();
    let idle = anon(pid);
    for l in [
        Load {
            write: true,
            bs: 4096,
            qd: 8,
            alias: false,
            secs: 1.0,
        },
        Load {
            write: false,
            bs: MIB as usize,
            qd: 32,
            alias: false,
            secs: 1.0,
        },
    ] {
        let mut c = Client::connect(&disk.socket, 1, region_bytes(&l, 1));
        hammer(&mut c, &l, 1024 * MIB, &AtomicBool::new(false));
    }
    // Writeback finishes, then the memory it held goes back too.
    let t0 = Instant::now();
    while common::status(&server)["dirty_bytes"].as_u64() != Some(0) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "writeback did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let now = anon(pid);
    let index = index_bytes(&server);
    eprintln!(
        "idle before {} KiB, after {} KiB, index {} KiB",
        idle >> 10,
        now >> 10,
        index >> 10
    );
    assert!(
        now <= 8 * MIB + index,
        "an instance whose guest left holds {} KiB beyond its {} KiB index",
        (now - index.min(now)) >> 10,
        index >> 10
    );
}

#[test]
fn writes_into_a_full_cache_before_a_stalled_store_take_no_more_than_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Throttle::new(
        dir.path(),
        Limits {
            read_iops: 100_000,
            write_bps: 64 << 10,
        },
    )
    .unwrap_or_else(|e| panic!("this test needs a slow backing disk: {e}"));
    let span = 2048 * MIB;
    // The cache on tmpfs: only the backing store stalls.
    let cache = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let disk = Disk {
        cache: cache.path().join("cache.img"),
        backing: dir.path().join("disk.img"),
        socket: dir.path().join("vhost.sock"),
        dir,
        image: None,
    };
    std::fs::File::create(&disk.backing)
        .unwrap()
        .set_len(span)
        .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(disk.serve_args(&[
        "--io-memory",
        "8M",
        "--num-queues",
        "4",
        "--cache-size",
        "512M",
    ]));
    let server = Server::start_cmd(slow.wrap(&cmd), &disk.socket);
    let pid = server.child.id();
    // 1 MiB writes fill the 512 MiB cache, then wait for space that the
    // stalled writeback never frees; the sampler runs meanwhile.
    let l = Load {
        write: true,
        bs: MIB as usize,
        qd: 32,
        alias: false,
        secs: 4.0,
    };
    let s = Sampler::start(pid);
    let mut c = Client::connect(&disk.socket, 4, region_bytes(&l, 4));
    let stop = Arc::new(AtomicBool::new(false));
    let halt = stop.clone();
    let t = std::thread::spawn(move || hammer(&mut c, &l, span, &halt));
    std::thread::sleep(Duration::from_secs(6));
    let st = common::status(&server);
    let full = st["frontend"]["writes_waiting"].as_u64().unwrap_or(0);
    let limit = 8 * MIB + FIXED + st["index_bytes"].as_u64().unwrap();
    let peak = s.peak();
    // Requests still wait for space: the client stops waiting for them.
    stop.store(true, Ordering::Relaxed);
    t.join().expect("every request that completed succeeded");
    server.kill();
    eprintln!(
        "writes waiting {full}, peak {} KiB (limit {} KiB)",
        peak >> 10,
        limit >> 10
    );
    assert!(full > 0, "the cache never filled: the test proves nothing");
    assert!(peak <= limit, "pcache took {} KiB", peak >> 10);
}
