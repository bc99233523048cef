//! SIGKILL loop through the real client: QD32 random writes with periodic
//! FLUSH through libblkio, pcache killed at random moments, restarted on the
//! same cache, and every block checked: it must hold the last version whose
//! write completed, flushed or not, or one still in flight at the kill.
//! Guards against losing a completed write, or returning data never
//! written, when the process dies mid-request.
//!
//! `PCACHE_KILLS` sets the number of kills (default 50), `PCACHE_KILL_SEED`
//! the seed.

mod common;
#[path = "common/knobs.rs"]
mod knobs;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::{check_block, fill_block, Client, Disk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const DISK: u64 = 16 << 20;
const QD: usize = 32;

/// Versions a block may hold.
struct BlockModel {
    /// Version of the last completed write.
    done: Vec<u64>,
    /// Versions in flight at the kill.
    running: HashMap<u64, Vec<u64>>,
}

/// Fewer kills than this rarely land one in the middle of a log append
/// or a writeback pass.
const MIN_KILLS: u64 = 10;

#[test]
fn sigkill_at_random_moments_never_loses_a_completed_write() {
    let kills = knobs::size("PCACHE_KILLS", 50, MIN_KILLS) as usize;
    kill_loop(Disk::new(DISK, None), kills, &[]);
}

/// The same in front of an RBD image on the test cluster, with writeback
/// running all along so restarts also read what reached the image (each
/// restart takes over the dead pcache's image lock).
#[test]
fn sigkill_at_random_moments_never_loses_a_completed_write_on_rbd() {
    let kills = knobs::size("PCACHE_KILLS", 50, MIN_KILLS) as usize;
    kill_loop(
        Disk::rbd("killloop", DISK),
        kills,
        &["--writeback-high", "0"],
    );
}

/// Kill `pcache serve` (with `extra` flags) `kills` times under load on
/// `disk`, checking every block after each restart.
fn kill_loop(disk: Disk, kills: usize, extra: &[&str]) {
    let seed = knobs::seed("PCACHE_KILL_SEED", 0xdead_beef);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut args = vec!["--num-queues", "1"];
    args.extend_from_slice(extra);
    let blocks = DISK / BLOCK as u64;
    let mut m = BlockModel {
        done: vec![0; blocks as usize],
        running: HashMap::new(),
    };
    let mut version = 0u64;
    let mut total_writes = 0u64;
    let mut total_flushes = 0u64;
    let started = Instant::now();
    for round in 0..kills {
        let server = disk.serve(&args);
        let mut c = Client::connect(&disk.socket, 1, QD * BLOCK);
        // Verify what the previous kill left, and settle the model.
        verify(&mut c, &mut m, blocks, seed, round);
        // Write for a random while, then kill without warning.
        let run_for = Duration::from_millis(rng.gen_range(20..250));
        let t = Instant::now();
        let mut inflight: HashMap<usize, (u64, u64)> = HashMap::new(); // slot -> (block, version)
        let mut free: Vec<usize> = (0..QD).collect();
        let mut since_flush = 0;
        while t.elapsed() < run_for {
            while let Some(slot) = free.pop() {
                let b = rng.gen_range(0..blocks);
                version += 1;
                fill_block(&mut c.mem()[slot * BLOCK..(slot + 1) * BLOCK], b, version);
                let p = c.ptr(slot * BLOCK);
                c.queues[0].write(b * BLOCK as u64, p, BLOCK, slot, ReqFlags::empty());
                inflight.insert(slot, (b, version));
                total_writes += 1;
            }
            for (slot, ret) in c.reap(0, 1) {
                assert_eq!(ret, 0, "seed {seed} round {round}: write failed");
                let (b, v) = inflight.remove(&slot).expect("in flight");
                m.done[b as usize] = m.done[b as usize].max(v);
                free.push(slot);
                since_flush += 1;
            }
            if since_flush >= 64 {
                // Drain, then FLUSH: everything completed so far is durable
                // once the FLUSH completes.
                while !inflight.is_empty() {
                    for (slot, ret) in c.reap(0, 1) {
                        assert_eq!(ret, 0);
                        let (b, v) = inflight.remove(&slot).expect("in flight");
                        m.done[b as usize] = m.done[b as usize].max(v);
                        free.push(slot);
                    }
                }
                assert_eq!(
                    c.flush_sync(0),
                    0,
                    "seed {seed} round {round}: flush failed"
                );
                total_flushes += 1;
                since_flush = 0;
            }
        }
        server.kill();
        for (_, (b, v)) in inflight.drain() {
            m.running.entry(b).or_default().push(v);
        }
        drop(c);
    }
    let server = disk.serve(extra);
    let mut c = Client::connect(&disk.socket, 1, QD * BLOCK);
    verify(&mut c, &mut m, blocks, seed, kills);
    drop(c);
    server.stop();
    println!(
        "kill loop on {} seed {seed}: {kills} kills survived, {total_writes} writes, {total_flushes} flushes, \
         {} MiB verified after each kill, {:.1} s",
        disk.backing_arg(),
        DISK >> 20,
        started.elapsed().as_secs_f64()
    );
}

/// Every block holds its last completed version or one in flight at the
/// kill; adopt it.
fn verify(c: &mut Client, m: &mut BlockModel, blocks: u64, seed: u64, round: usize) {
    let per = QD as u64;
    let mut b = 0;
    while b < blocks {
        let n = per.min(blocks - b);
        assert_eq!(c.read_sync(0, b * BLOCK as u64, 0, n as usize * BLOCK), 0);
        for i in 0..n {
            let blk = b + i;
            let buf = &c.mem()[i as usize * BLOCK..(i as usize + 1) * BLOCK];
            let got =
                check_block(buf, blk).unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
            let ok = got == m.done[blk as usize]
                || m.running.get(&blk).is_some_and(|v| v.contains(&got));
            assert!(
                ok,
                "seed {seed} round {round}: block {blk} holds version {got}; completed {}, in flight {:?}",
                m.done[blk as usize],
                m.running.get(&blk)
            );
            m.done[blk as usize] = got;
        }
        b += n;
    }
    m.running.clear();
}
