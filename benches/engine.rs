//! Engine-only numbers on one thread, cache on a tmpfs file:
//! 4 KiB write hits/s, 4 KiB read hits/s, replay keys/s on a cache full of
//! 4 KiB keys, and DRAM bytes per cached extent.
//!
//! `cargo bench --bench engine` (PCACHE_BENCH_CACHE sets the cache size,
//! default 2G; PCACHE_BENCH_DIR the directory, default /dev/shm).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pcache::engine::{DataHead, Engine, FormatOptions, OpenOptions};
use pcache::pmem::{Region, RegionOptions};

/// Counts live heap bytes, to measure DRAM per extent.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// xorshift64*: cheap and deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
}

fn main() {
    let dir = std::env::var("PCACHE_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let cache_bytes = std::env::var("PCACHE_BENCH_CACHE")
        .ok()
        .map(|s| pcache::util::parse_size(&s).expect("PCACHE_BENCH_CACHE"))
        .unwrap_or(2 << 30);
    let path = std::path::Path::new(&dir).join(format!("pcache-bench-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).expect("create cache file");
    f.set_len(cache_bytes).unwrap();
    drop(f);
    let backing_bytes: u64 = 64 << 30; // never touched: every write and read is a hit
    {
        let r = Region::open(&path, RegionOptions::default()).unwrap();
        Engine::format(
            &r,
            &FormatOptions {
                backing_bytes,
                ..Default::default()
            },
        )
        .unwrap();
    }
    let region = Arc::new(Region::open(&path, RegionOptions::default()).unwrap());
    let open = || Engine::open(region.clone(), &OpenOptions::default()).unwrap();
    let e = open();
    let data = vec![0x5au8; 4096];
    // Fill ~85% of the cache with distinct 4 KiB keys (scattered over a
    // range much larger than the cache so keys never merge or overlap).
    let n_writes = (cache_bytes / 4096) * 85 / 100;
    let span = n_writes * 4; // in 4 KiB blocks
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut head = DataHead::default();
    let mut offs = Vec::with_capacity(n_writes as usize);
    // Warm the mapping's page tables once, outside the timed loop.
    let t = Instant::now();
    for _ in 0..n_writes {
        let off = (rng.next() % span) * 4096;
        e.write(&mut head, off, &data).expect("write");
        offs.push(off);
    }
    let w_secs = t.elapsed().as_secs_f64();
    e.flush().unwrap();

    let mut buf = vec![0u8; 4096];
    let mut misses = Vec::new();
    let n_reads = n_writes.min(2_000_000);
    let t = Instant::now();
    for i in 0..n_reads {
        let _ = i;
        let off = offs[(rng.next() % n_writes) as usize];
        e.read(off, &mut buf, &mut misses).expect("read");
    }
    let r_secs = t.elapsed().as_secs_f64();
    assert!(misses.is_empty(), "every read must hit");

    // The floor: the same number of random 4 KiB copies straight out of
    // the mapping, with no index and no locks.
    let data_bytes = (cache_bytes - (64 << 20)) / 4096;
    let t = Instant::now();
    for _ in 0..n_reads {
        let blk = rng.next() % data_bytes;
        region.read(32768 + blk * 4096, &mut buf);
    }
    let raw_secs = t.elapsed().as_secs_f64();

    let extents = e.extent_count();
    e.head_release(&mut head);
    drop(e);
    let live_before = LIVE.load(Ordering::Relaxed);
    let t = Instant::now();
    let e = open();
    let replay_secs = t.elapsed().as_secs_f64();
    let live_after = LIVE.load(Ordering::Relaxed);
    let keys = e.stats().snapshot().replay_keys;
    let shard_table = e.size().div_ceil(4 << 20) as usize * 8;
    let per_extent = (live_after - live_before - shard_table) as f64 / e.extent_count() as f64;
    drop(e);
    let _ = std::fs::remove_file(&path);

    println!(
        "pcache engine, one thread, cache {} MiB on {dir}",
        cache_bytes >> 20
    );
    println!(
        "  4 KiB write hits   {:>12.0} /s   ({n_writes} writes in {w_secs:.3} s)",
        n_writes as f64 / w_secs
    );
    println!(
        "  4 KiB read hits    {:>12.0} /s   ({n_reads} reads in {r_secs:.3} s)",
        n_reads as f64 / r_secs
    );
    println!(
        "  raw 4 KiB copies   {:>12.0} /s   (random copies out of the mapping: the floor)",
        n_reads as f64 / raw_secs
    );
    println!(
        "  replay             {:>12.0} keys/s ({keys} keys in {replay_secs:.3} s)",
        keys as f64 / replay_secs
    );
    println!("  DRAM per extent    {per_extent:>12.1} bytes ({extents} extents; shard table excluded: {shard_table} bytes)");
    println!(
        "{}",
        serde_json::json!({
            "write_hits_per_s": n_writes as f64 / w_secs,
            "read_hits_per_s": n_reads as f64 / r_secs,
            "raw_copies_per_s": n_reads as f64 / raw_secs,
            "replay_keys_per_s": keys as f64 / replay_secs,
            "dram_bytes_per_extent": per_extent,
        })
    );
}
