//! A benchmark client for any vhost-user-blk socket (pcache, qemu-storage-
//! daemon, ...), driven through libblkio's pure-Rust `blkio` crate.
//!
//! ```sh
//! cargo run --release --example vub_bench -- --socket S --rw randwrite --bs 4k --qd 32
//! ```
//!
//! One thread per queue, each keeping `--qd` requests in flight on its own
//! virtqueue. Reports IOPS, MB/s and the completion latency (mean, p50, p99,
//! p99.9) of every request submitted in the measured window, as text or, with
//! `--json`, as one JSON object that also holds the latency histograms
//! (log-linear buckets, at most 1/64 relative width).
//!
//! `--flush-every N` issues a FLUSH after every N writes (per queue): new
//! writes wait until the N in flight complete, then the FLUSH, then the next
//! N. With `--qd 1 --flush-every 1` that is the write+flush pattern of a
//! synchronous journal. `--total BYTES` stops after that many bytes (split
//! evenly over the queues) instead of, or before, `--runtime`. The JSON
//! report's `iops_per_s` counts the reads and writes completed in each
//! second of the measured phase, for plotting a sustained run over time.

use std::io::Write as _;
use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    /// Uniformly random reads.
    Randread,
    /// Uniformly random writes.
    Randwrite,
    /// Sequential reads (each queue walks its own slice of the region).
    Read,
    /// Sequential writes (each queue walks its own slice of the region).
    Write,
    /// Random reads and writes, `--rwmix-read` percent reads.
    Randrw,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randrw => "randrw",
        }
    }
    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }
    fn writes(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write | Rw::Randrw)
    }
}

fn size_arg(s: &str) -> Result<u64, String> {
    pcache::util::parse_size(s)
}

fn secs_arg(s: &str) -> Result<f64, String> {
    let t = s.trim().trim_end_matches('s');
    let v: f64 = t
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (examples: 10, 2.5, 0)"))?;
    if !v.is_finite() || !(0.0..=1e6).contains(&v) {
        return Err(format!("{s:?}: seconds must be between 0 and 1000000"));
    }
    Ok(v)
}

/// Benchmark a vhost-user-blk socket.
#[derive(Parser, Debug)]
#[command(
    name = "vub_bench",
    about = "Benchmark any vhost-user-blk socket through libblkio"
)]
struct Args {
    /// vhost-user-blk socket.
    #[arg(long)]
    socket: std::path::PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Request size (a multiple of 512; K, M, G suffixes).
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Measured seconds (0: unlimited, then --total is needed).
    #[arg(long, default_value = "10", value_parser = secs_arg)]
    runtime: f64,
    /// Seconds of I/O before measuring.
    #[arg(long, default_value = "2", value_parser = secs_arg)]
    ramp: f64,
    /// Stop the measured phase after this many bytes (over all queues).
    #[arg(long, value_parser = size_arg)]
    total: Option<u64>,
    /// Issue a FLUSH after every N writes (per queue).
    #[arg(long)]
    flush_every: Option<u64>,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50)]
    rwmix_read: u32,
    /// Use poll queues (libblkio num-poll-queues) instead of interrupt-driven ones.
    #[arg(long)]
    poll: bool,
    /// Bytes of the disk to touch, starting at --offset (default: the rest of the disk).
    #[arg(long, value_parser = size_arg)]
    size: Option<u64>,
    /// First byte of the region to touch.
    #[arg(long, default_value = "0", value_parser = size_arg)]
    offset: u64,
    /// Random patterns visit every block once per pass, in a pseudo-random
    /// order (each queue its own slice of the region), instead of drawing
    /// blocks with repeats: a random read over a cold cache stays all misses.
    #[arg(long)]
    random_map: bool,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Every request of a queue uses the same buffer (a hostile guest that
    /// points all its requests at one page set: the server must not hold a
    /// copy per request).
    #[arg(long)]
    alias: bool,
}

/// Log-linear latency histogram over nanoseconds: exact below 64 ns, then
/// 64 buckets per power of two.
#[derive(Clone)]
struct Hist {
    counts: Vec<u64>,
    n: u64,
    sum: u128,
    min: u64,
    max: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

impl Hist {
    fn new() -> Hist {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let sub = (v >> (e - SUB_BITS)) - SUB;
        ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
    }

    /// [low, high) of bucket `i`.
    fn bounds(i: usize) -> (u64, u64) {
        let i = i as u64;
        if i < SUB {
            return (i, i + 1);
        }
        let e = (i / SUB - 1) as u32 + SUB_BITS;
        let sub = i % SUB;
        let width = 1u64 << (e - SUB_BITS);
        let low = (SUB + sub) << (e - SUB_BITS);
        (low, low.saturating_add(width))
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.n += 1;
        self.sum += ns as u128;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// Value (ns) at percentile `p` (0..=100): the middle of its bucket,
    /// clamped to the exact min and max.
    fn percentile(&self, p: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.n as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = Self::bounds(i);
                let mid = if hi - lo <= 1 {
                    lo as f64
                } else {
                    (lo as f64 + hi as f64) / 2.0
                };
                return mid.clamp(self.min as f64, self.max as f64);
            }
        }
        self.max as f64
    }

    fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum as f64 / self.n as f64
        }
    }

    fn lat_json(&self) -> Value {
        let us = |ns: f64| (ns / 10.0).round() / 100.0;
        json!({
            "mean": us(self.mean()),
            "p50": us(self.percentile(50.0)),
            "p99": us(self.percentile(99.0)),
            "p99_9": us(self.percentile(99.9)),
            "min": us(if self.n == 0 { 0.0 } else { self.min as f64 }),
            "max": us(self.max as f64),
        })
    }

    /// Non-empty buckets as [low_ns, high_ns, count].
    fn buckets_json(&self) -> Value {
        Value::Array(
            self.counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| {
                    let (lo, hi) = Self::bounds(i);
                    json!([lo, hi, c])
                })
                .collect(),
        )
    }
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, never 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in 0..n (n > 0), without modulo bias worth caring about.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// A pseudo-random permutation of 0..n: a 4-round Feistel network over the
/// next even power of two, cycle-walked into range.
struct Perm {
    n: u64,
    half: u32,
    mask: u64,
    keys: [u64; 4],
}

impl Perm {
    fn new(n: u64, seed: u64) -> Perm {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let bits = bits + (bits & 1);
        let mut r = Rng::new(seed);
        Perm {
            n,
            half: bits / 2,
            mask: (1u64 << (bits / 2)) - 1,
            keys: [r.next(), r.next(), r.next(), r.next()],
        }
    }

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn round_trip(&self, x: u64) -> u64 {
        let (mut l, mut r) = (x >> self.half, x & self.mask);
        for k in self.keys {
            let f = Self::mix(r ^ k) & self.mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half) | r
    }

    /// The i-th element (i < n).
    fn at(&self, i: u64) -> u64 {
        let mut x = self.round_trip(i);
        while x >= self.n {
            x = self.round_trip(x);
        }
        x
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

/// What one queue's thread does.
struct Job {
    rw: Rw,
    bs: u64,
    qd: usize,
    /// Byte offset of block 0 of the region.
    base: u64,
    /// Blocks of `bs` in the region (random patterns pick among these).
    blocks: u64,
    /// Sequential patterns and --random-map: this queue's first block and
    /// block count.
    seq_first: u64,
    seq_blocks: u64,
    flush_every: Option<u64>,
    rwmix_read: u32,
    random_map: bool,
    /// Measured-phase byte budget of this queue.
    total: Option<u64>,
    seed: u64,
    /// Address of this queue's buffers: `qd` buffers of `bs` bytes.
    buf_addr: usize,
    /// Every request uses buffer 0.
    alias: bool,
    /// A request larger than the device's segment limit is sent as
    /// segments of at most this many bytes (0: one segment).
    seg_len: usize,
}

/// Phase boundaries shared by all threads.
struct Timing {
    ramp_end: Instant,
    end: Option<Instant>,
}

struct QueueResult {
    read: Hist,
    write: Hist,
    flush: Hist,
    first_submit: Option<Instant>,
    last_complete: Option<Instant>,
    /// Reads and writes completed in each second of the measured phase.
    per_sec: Vec<u64>,
}

struct Slot {
    op: Op,
    offset: u64,
    t0: Instant,
    measured: bool,
}

const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn run_queue(
    q: &mut Blkioq,
    job: &Job,
    timing: &Timing,
    stop: &AtomicBool,
) -> Result<QueueResult, String> {
    let mut res = QueueResult {
        read: Hist::new(),
        write: Hist::new(),
        flush: Hist::new(),
        first_submit: None,
        last_complete: None,
        per_sec: Vec::new(),
    };
    let mut rng = Rng::new(job.seed);
    let perm = Perm::new(job.seq_blocks, job.seed ^ 0xa5a5);
    let now0 = Instant::now();
    // Slot qd is reserved for the FLUSH, which is only sent with nothing else in flight.
    let mut slots: Vec<Slot> = (0..=job.qd)
        .map(|_| Slot {
            op: Op::Read,
            offset: 0,
            t0: now0,
            measured: false,
        })
        .collect();
    let mut free: Vec<usize> = (0..job.qd).rev().collect();
    // Segment lists of requests in flight (libblkio reads them at submit).
    let mut iovs: Vec<Vec<libc::iovec>> = (0..job.qd).map(|_| Vec::new()).collect();
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..=job.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut inflight = 0usize;
    let mut seq_next = 0u64;
    let mut writes_since_flush = 0u64;
    let mut flush_wanted = false;
    let mut measured_bytes = 0u64;
    let mut stopping = false;

    loop {
        // Submit.
        let now = Instant::now();
        if !stopping {
            let over_time = timing.end.is_some_and(|e| now >= e);
            let over_bytes = job.total.is_some_and(|t| measured_bytes >= t);
            if over_time || over_bytes || stop.load(Ordering::Relaxed) {
                stopping = true;
            }
        }
        let measured = now >= timing.ramp_end;
        if !stopping {
            while !flush_wanted && inflight < job.qd {
                if job.total.is_some_and(|t| measured && measured_bytes >= t) {
                    break;
                }
                let Some(s) = free.pop() else { break };
                let op = match job.rw {
                    Rw::Randread | Rw::Read => Op::Read,
                    Rw::Randwrite | Rw::Write => Op::Write,
                    Rw::Randrw => {
                        if rng.below(100) < u64::from(job.rwmix_read) {
                            Op::Read
                        } else {
                            Op::Write
                        }
                    }
                };
                let block = if job.random_map {
                    let b = job.seq_first + perm.at(seq_next);
                    seq_next = (seq_next + 1) % job.seq_blocks;
                    b
                } else if job.rw.random() {
                    rng.below(job.blocks)
                } else {
                    let b = job.seq_first + seq_next;
                    seq_next = (seq_next + 1) % job.seq_blocks;
                    b
                };
                let offset = job.base + block * job.bs;
                let at = if job.alias { 0 } else { s };
                let buf = (job.buf_addr + at * job.bs as usize) as *mut u8;
                let len = job.bs as usize;
                if job.seg_len > 0 && len > job.seg_len {
                    let iov = &mut iovs[s];
                    iov.clear();
                    iov.extend((0..len).step_by(job.seg_len).map(|o| libc::iovec {
                        iov_base: buf.wrapping_add(o).cast(),
                        iov_len: job.seg_len.min(len - o),
                    }));
                    let (p, n) = (iov.as_ptr(), iov.len() as u32);
                    match op {
                        Op::Read => q.readv(offset, p, n, s, ReqFlags::empty()),
                        _ => q.writev(offset, p, n, s, ReqFlags::empty()),
                    }
                } else {
                    match op {
                        Op::Read => q.read(offset, buf, len, s, ReqFlags::empty()),
                        _ => q.write(offset, buf, len, s, ReqFlags::empty()),
                    }
                }
                slots[s] = Slot {
                    op,
                    offset,
                    t0: now,
                    measured,
                };
                if measured {
                    measured_bytes += job.bs;
                    res.first_submit.get_or_insert(now);
                }
                inflight += 1;
                if op == Op::Write {
                    if let Some(n) = job.flush_every {
                        writes_since_flush += 1;
                        if writes_since_flush >= n {
                            flush_wanted = true;
                        }
                    }
                }
            }
            if flush_wanted && inflight == 0 {
                let s = job.qd;
                q.flush(s, ReqFlags::empty());
                slots[s] = Slot {
                    op: Op::Flush,
                    offset: 0,
                    t0: now,
                    measured,
                };
                if measured {
                    res.first_submit.get_or_insert(now);
                }
                inflight += 1;
            }
        }
        if inflight == 0 {
            if stopping {
                return Ok(res);
            }
            // Only reachable when the byte budget is spent: nothing left to do.
            if job.total.is_some_and(|t| measured_bytes >= t) {
                stopping = true;
                continue;
            }
            return Err("internal error: nothing in flight and nothing to submit".into());
        }

        // Reap.
        let mut timeout = IO_TIMEOUT;
        let n = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(|e| {
                format!(
                    "waiting for completions ({inflight} in flight, {} s timeout): {e} \
                     (errno {})",
                    IO_TIMEOUT.as_secs(),
                    e.errno()
                )
            })?;
        let done = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            let s = c.user_data;
            let Some(slot) = slots.get(s) else {
                return Err(format!("completion with unknown user_data {s}"));
            };
            if c.ret != 0 {
                stop.store(true, Ordering::Relaxed);
                return Err(format!(
                    "{} of {} bytes at offset {} failed: {}",
                    slot.op.name(),
                    if slot.op == Op::Flush { 0 } else { job.bs },
                    slot.offset,
                    std::io::Error::from_raw_os_error(-c.ret)
                ));
            }
            inflight -= 1;
            if slot.measured {
                let ns = done.duration_since(slot.t0).as_nanos() as u64;
                match slot.op {
                    Op::Read => res.read.record(ns),
                    Op::Write => res.write.record(ns),
                    Op::Flush => res.flush.record(ns),
                }
                if slot.op != Op::Flush {
                    let sec = done.saturating_duration_since(timing.ramp_end).as_secs() as usize;
                    if res.per_sec.len() <= sec {
                        res.per_sec.resize(sec + 1, 0);
                    }
                    res.per_sec[sec] += 1;
                }
                res.last_complete = Some(done);
            }
            if slot.op == Op::Flush {
                flush_wanted = false;
                writes_since_flush = 0;
            } else {
                free.push(s);
            }
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vub_bench: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn run(a: &Args) -> Result<(), String> {
    // Argument checks that need no device.
    if a.bs == 0 || !a.bs.is_multiple_of(512) {
        return Err(format!("--bs {} must be a positive multiple of 512", a.bs));
    }
    if a.bs > 64 << 20 {
        return Err(format!("--bs {} is larger than 64M", a.bs));
    }
    if a.qd == 0 || a.qd > 4096 {
        return Err(format!("--qd {} must be between 1 and 4096", a.qd));
    }
    if a.queues == 0 || a.queues > 64 {
        return Err(format!("--queues {} must be between 1 and 64", a.queues));
    }
    if a.runtime == 0.0 && a.total.is_none() {
        return Err("--runtime 0 (unlimited) needs --total".into());
    }
    if a.total == Some(0) {
        return Err("--total must be more than 0".into());
    }
    if let Some(n) = a.flush_every {
        if n == 0 {
            return Err("--flush-every must be at least 1".into());
        }
        if !a.rw.writes() {
            return Err(format!(
                "--flush-every needs writes, and --rw {} has none",
                a.rw.name()
            ));
        }
    }
    if a.rwmix_read > 100 {
        return Err(format!("--rwmix-read {} must be 0..=100", a.rwmix_read));
    }
    if a.random_map && !a.rw.random() {
        return Err(format!(
            "--random-map needs a random --rw, not {}",
            a.rw.name()
        ));
    }
    if a.rwmix_read != 50 && a.rw != Rw::Randrw {
        return Err("--rwmix-read only applies to --rw randrw".into());
    }
    // An aliasing client has one buffer per queue.
    let per_queue = if a.alias { 1 } else { u64::from(a.qd) };
    let mem_bytes = u64::from(a.queues) * per_queue * a.bs;
    if mem_bytes > 4 << 30 {
        return Err(format!(
            "queues x qd x bs = {mem_bytes} bytes of buffers; keep it under 4G"
        ));
    }
    let Some(path) = a.socket.to_str() else {
        return Err(format!("--socket {:?} is not UTF-8", a.socket));
    };
    if !a.socket.exists() {
        return Err(format!("--socket {path}: no such file"));
    }

    // Connect and check the rest against the device.
    let ctx = |what: &str| {
        let what = what.to_string();
        move |e: blkio::Error| format!("{what}: {e}")
    };
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(ctx("libblkio driver"))?;
    b.set_str("path", path).map_err(ctx("set path"))?;
    b.connect().map_err(ctx(&format!("connect to {path}")))?;
    let capacity = b.get_u64("capacity").map_err(ctx("capacity"))?;
    let max_queues = b.get_i32("max-queues").map_err(ctx("max-queues"))?;
    let req_align = b
        .get_i32("request-alignment")
        .map_err(ctx("request-alignment"))?;
    let max_transfer = b.get_i32("max-transfer").map_err(ctx("max-transfer"))?;
    let max_seg_len = b
        .get_i32("max-segment-len")
        .map_err(ctx("max-segment-len"))?;
    let mem_align = b
        .get_u64("mem-region-alignment")
        .map_err(ctx("mem-region-alignment"))?;
    let read_only = b.get_bool("read-only").map_err(ctx("read-only"))?;

    if capacity == 0 {
        return Err(format!("{path}: the device has capacity 0"));
    }
    if a.queues > u32::try_from(max_queues).unwrap_or(0) {
        return Err(format!(
            "--queues {} but the device offers at most {max_queues}",
            a.queues
        ));
    }
    let req_align = u64::try_from(req_align).unwrap_or(512).max(1);
    if !a.bs.is_multiple_of(req_align) {
        return Err(format!(
            "--bs {} is not a multiple of the device's request alignment {req_align}",
            a.bs
        ));
    }
    // Larger requests go as several segments (readv/writev).
    let seg_len = usize::try_from(max_seg_len).unwrap_or(0);
    for (name, lim) in [("max-transfer", max_transfer)] {
        if let Ok(lim) = u64::try_from(lim) {
            if lim > 0 && a.bs > lim {
                return Err(format!("--bs {} exceeds the device's {name} {lim}", a.bs));
            }
        }
    }
    if read_only && a.rw.writes() {
        return Err(format!(
            "{path} is read-only and --rw {} writes",
            a.rw.name()
        ));
    }
    if !a.offset.is_multiple_of(req_align) {
        return Err(format!(
            "--offset {} is not a multiple of the request alignment {req_align}",
            a.offset
        ));
    }
    if a.offset >= capacity {
        return Err(format!(
            "--offset {} is beyond the disk's capacity {capacity}",
            a.offset
        ));
    }
    let size = a.size.unwrap_or(capacity - a.offset);
    if a.offset.checked_add(size).is_none_or(|end| end > capacity) {
        return Err(format!(
            "--offset {} + --size {size} is beyond the disk's capacity {capacity}",
            a.offset
        ));
    }
    let blocks = size / a.bs;
    if blocks == 0 {
        return Err(format!("--size {size} is smaller than --bs {}", a.bs));
    }
    let nq = u64::from(a.queues);
    if (!a.rw.random() || a.random_map) && blocks < nq {
        return Err(format!(
            "--rw {}{} over {blocks} blocks cannot be split over {nq} queues",
            a.rw.name(),
            if a.random_map { " --random-map" } else { "" },
        ));
    }

    let qd = a.qd as usize;
    // Each request takes 3 descriptors (no indirect descriptors here).
    let queue_size = (a.qd * 3).next_power_of_two().max(256);
    let queue_size = i32::try_from(queue_size).map_err(|_| "--qd is too large".to_string())?;
    b.set_i32("queue-size", queue_size)
        .map_err(ctx("queue-size"))?;
    let nq_i32 = i32::try_from(a.queues).map_err(|_| "--queues is too large".to_string())?;
    if a.poll {
        b.set_i32("num-queues", 0).map_err(ctx("num-queues"))?;
        b.set_i32("num-poll-queues", nq_i32)
            .map_err(ctx("num-poll-queues"))?;
    } else {
        b.set_i32("num-queues", nq_i32).map_err(ctx("num-queues"))?;
    }
    let out = b.start().map_err(ctx("start"))?;
    let queues = if a.poll { out.poll_queues } else { out.queues };
    if queues.len() != a.queues as usize {
        return Err(format!(
            "asked for {} queues, libblkio started {}",
            a.queues,
            queues.len()
        ));
    }
    let mem_align = mem_align.max(4096);
    let region_len = mem_bytes.div_ceil(mem_align) * mem_align;
    let region = b
        .alloc_mem_region(region_len as usize)
        .map_err(ctx("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(ctx("map_mem_region"))?;
    {
        // SAFETY: the region is `region.len` bytes mapped read-write for as
        // long as `b` lives, and no request is in flight yet.
        let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        let mut r = Rng::new(a.seed ^ 0x5555);
        for c in mem.chunks_mut(8) {
            let n = c.len();
            c.copy_from_slice(&r.next().to_le_bytes()[..n]);
        }
    }

    let per_q_bytes = a.total.map(|t| t.div_ceil(nq).div_ceil(a.bs) * a.bs);
    let seq_blocks = blocks / nq;
    let jobs: Vec<Job> = (0..nq)
        .map(|i| Job {
            rw: a.rw,
            bs: a.bs,
            qd,
            base: a.offset,
            blocks,
            seq_first: i * seq_blocks,
            seq_blocks,
            flush_every: a.flush_every,
            rwmix_read: a.rwmix_read,
            random_map: a.random_map,
            total: per_q_bytes,
            seed: a.seed.wrapping_mul(1_000_003).wrapping_add(i),
            buf_addr: region.addr + (i * per_queue * a.bs) as usize,
            alias: a.alias,
            seg_len,
        })
        .collect();

    let start = Instant::now();
    let ramp_end = start + Duration::from_secs_f64(a.ramp);
    let timing = Timing {
        ramp_end,
        end: (a.runtime > 0.0).then(|| ramp_end + Duration::from_secs_f64(a.runtime)),
    };
    let stop = AtomicBool::new(false);
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = queues
            .into_iter()
            .zip(&jobs)
            .map(|(mut q, job)| {
                let (timing, stop) = (&timing, &stop);
                sc.spawn(move || {
                    let r = run_queue(&mut q, job, timing, stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a queue thread panicked".into()))
            })
            .collect()
    });

    let mut read = Hist::new();
    let mut write = Hist::new();
    let mut flush = Hist::new();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut per_sec: Vec<u64> = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let r = r.map_err(|e| format!("queue {i}: {e}"))?;
        if per_sec.len() < r.per_sec.len() {
            per_sec.resize(r.per_sec.len(), 0);
        }
        for (t, n) in per_sec.iter_mut().zip(&r.per_sec) {
            *t += n;
        }
        read.merge(&r.read);
        write.merge(&r.write);
        flush.merge(&r.flush);
        if let Some(f) = r.first_submit {
            first = Some(first.map_or(f, |x| x.min(f)));
        }
        if let Some(l) = r.last_complete {
            last = Some(last.map_or(l, |x| x.max(l)));
        }
    }
    let elapsed = match (first, last) {
        (Some(f), Some(l)) if l > f => l.duration_since(f).as_secs_f64(),
        _ => return Err("no request completed in the measured window".into()),
    };
    let mut data = read.clone();
    data.merge(&write);

    let class = |h: &Hist, bytes_per: u64| {
        let bytes = h.n * bytes_per;
        json!({
            "ops": h.n,
            "iops": (h.n as f64 / elapsed).round(),
            "bytes": bytes,
            "mb_s": ((bytes as f64 / elapsed / 1e6) * 100.0).round() / 100.0,
            "lat_us": h.lat_json(),
        })
    };
    let mut report = json!({
        "socket": path,
        "rw": a.rw.name(),
        "bs": a.bs,
        "qd": a.qd,
        "queues": a.queues,
        "poll": a.poll,
        "runtime_s": a.runtime,
        "ramp_s": a.ramp,
        "total": a.total,
        "flush_every": a.flush_every,
        "random_map": a.random_map,
        "rwmix_read": if a.rw == Rw::Randrw { Some(a.rwmix_read) } else { None },
        "offset": a.offset,
        "size": blocks * a.bs,
        "capacity": capacity,
        "elapsed_s": (elapsed * 1e4).round() / 1e4,
        // The last entry covers a partial second.
        "iops_per_s": per_sec,
    });
    let total = class(&data, a.bs);
    let (rd, wr, fl) = (class(&read, a.bs), class(&write, a.bs), class(&flush, 0));
    if let (Value::Object(m), Value::Object(t)) = (&mut report, total) {
        for (k, v) in t {
            m.insert(k, v);
        }
        m.insert(
            "mib_s".into(),
            json!(((data.n * a.bs) as f64 / elapsed / (1u64 << 20) as f64 * 100.0).round() / 100.0),
        );
        m.insert("hist_ns".into(), data.buckets_json());
        for (name, h, mut v) in [
            ("read", &read, rd),
            ("write", &write, wr),
            ("flush", &flush, fl),
        ] {
            if h.n > 0 {
                if let Value::Object(o) = &mut v {
                    o.insert("hist_ns".into(), h.buckets_json());
                }
                m.insert(name.into(), v);
            }
        }
    }

    let mut out = String::new();
    if a.json {
        out = format!("{report}\n");
    } else {
        out += &format!(
            "vub_bench: {} bs={} qd={} queues={}{} region=[{}, {}) runtime={}s ramp={}s{}{}{}\n",
            a.rw.name(),
            a.bs,
            a.qd,
            a.queues,
            if a.poll { " (poll)" } else { "" },
            a.offset,
            a.offset + blocks * a.bs,
            a.runtime,
            a.ramp,
            a.total.map(|t| format!(" total={t}")).unwrap_or_default(),
            a.flush_every
                .map(|n| format!(" flush-every={n}"))
                .unwrap_or_default(),
            if a.random_map { " random-map" } else { "" },
        );
        let line = |name: &str, h: &Hist, bytes_per: u64| {
            let l = |p: f64| h.percentile(p) / 1e3;
            format!(
                "  {name:<5}: {:>10.0} IOPS {:>9.1} MB/s  lat us: mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}  ({} ops)\n",
                h.n as f64 / elapsed,
                (h.n * bytes_per) as f64 / elapsed / 1e6,
                h.mean() / 1e3,
                l(50.0),
                l(99.0),
                l(99.9),
                h.max as f64 / 1e3,
                h.n
            )
        };
        if read.n > 0 && write.n > 0 {
            out += &line("read", &read, a.bs);
            out += &line("write", &write, a.bs);
        }
        out += &line("total", &data, a.bs);
        if flush.n > 0 {
            out += &line("flush", &flush, 0);
        }
        out += &format!("  elapsed {elapsed:.3} s\n");
    }
    let mut so = std::io::stdout().lock();
    so.write_all(out.as_bytes())
        .and_then(|()| so.flush())
        .map_err(|e| format!("writing the report: {e}"))?;
    drop(b);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Hist;

    #[test]
    fn buckets_round_trip() {
        for v in [
            0u64,
            1,
            63,
            64,
            65,
            127,
            128,
            1000,
            12_345,
            1 << 40,
            u64::MAX,
        ] {
            let i = Hist::index(v);
            let (lo, hi) = Hist::bounds(i);
            assert!(lo <= v && (v < hi || hi == u64::MAX), "{v} in [{lo},{hi})");
            assert!(
                (hi - lo) as f64 <= (lo as f64 / 64.0).max(1.0),
                "{v}: width"
            );
        }
    }

    #[test]
    fn permutation_visits_every_block_once() {
        for n in [1u64, 2, 3, 5, 64, 1000, 4099] {
            let p = super::Perm::new(n, 7);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let x = p.at(i) as usize;
                assert!(!seen[x], "n={n}: {x} twice");
                seen[x] = true;
            }
        }
    }

    #[test]
    fn percentiles() {
        let mut h = Hist::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50.0);
        assert!((p50 - 5_000_000.0).abs() / 5e6 < 0.02, "{p50}");
        let p99 = h.percentile(99.0);
        assert!((p99 - 9_900_000.0).abs() / 9.9e6 < 0.02, "{p99}");
    }
}
