//! Sustained writes in front of a slow disk. A hot set that fits the cache
//! is overwritten at QD32 for seconds while writeback can only run at the
//! disk's speed. Writers are paced while each writeback batch runs, so the
//! same bytes get through without any writer finding the cache full, and
//! every block reads back with its last version.

mod common;
#[path = "common/throttle.rs"]
mod throttle;

use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::{check_block, fill_block, Client, Server};
use throttle::{Limits, Throttle};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
const HOT_BLOCKS: u64 = 64 * MIB / BLOCK as u64;
const QD: usize = 32;

fn status(ctl: &std::path::Path) -> serde_json::Value {
    let o = common::pcache(&["status", "--control", ctl.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "status: {}", common::text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_hot_set_overwritten_in_front_of_a_slow_disk_paces_writers_and_never_fills_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Throttle::new(
        dir.path(),
        Limits {
            read_iops: 100_000,
            write_bps: 32 * MIB,
        },
    )
    .unwrap_or_else(|e| panic!("this test needs a slow backing disk: {e}"));
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    let shm = std::path::Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "this test keeps its cache on tmpfs at /dev/shm, which is missing"
    );
    let fast = tempfile::tempdir_in(shm).unwrap();
    let sock = dir.path().join("vhost.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(&sock)
        .arg("--cache")
        .arg(fast.path().join("cache.img"))
        .args(["--cache-size", "512M", "--writeback-high", "0"])
        .arg("--backing")
        .arg(&backing);
    let server = Server::start_cmd(slow.wrap(&cmd), &sock);

    let mut c = Client::connect(&sock, 1, QD * BLOCK);
    let mut last = vec![0u64; HOT_BLOCKS as usize];
    // What each slot's request writes; a block is never in flight twice, so
    // the last version submitted is the one it must hold.
    let mut slot_block = [u64::MAX; QD];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut version = 0u64;
    let mut pick = |slot_block: &[u64; QD]| loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % HOT_BLOCKS;
        if !slot_block.contains(&b) {
            return b;
        }
    };
    let submit = |c: &mut Client, slot: usize, b: u64, v: u64| {
        let at = slot * BLOCK;
        fill_block(&mut c.mem()[at..at + BLOCK], b, v);
        let p = c.ptr(at);
        c.queues[0].write(b * BLOCK as u64, p, BLOCK, slot, ReqFlags::empty());
    };
    for slot in 0..QD {
        let b = pick(&slot_block);
        version += 1;
        slot_block[slot] = b;
        last[b as usize] = version;
        submit(&mut c, slot, b, version);
    }
    let t0 = Instant::now();
    let mut writes = 0u64;
    let mut worst = Duration::ZERO;
    let mut since = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let done = c.reap(0, 1);
        let now = Instant::now();
        worst = worst.max(now - since);
        since = now;
        for (slot, ret) in done {
            assert_eq!(ret, 0, "a write failed");
            writes += 1;
            slot_block[slot] = u64::MAX;
            let b = pick(&slot_block);
            version += 1;
            slot_block[slot] = b;
            last[b as usize] = version;
            submit(&mut c, slot, b, version);
        }
    }
    let mut left = QD;
    while left > 0 {
        for (_, ret) in c.reap(0, 1) {
            assert_eq!(ret, 0, "a write failed");
            left -= 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let s = status(&server.control);
    let st = &s["stats"];
    println!(
        "{writes} writes in {secs:.1} s ({:.0} MB/s), longest gap between completions {} ms; {st}",
        writes as f64 * BLOCK as f64 / secs / 1e6,
        worst.as_millis()
    );
    let written = st["write_bytes"].as_u64().unwrap();
    assert!(
        written > 512 * MIB && st["gc_segs_freed"].as_u64().unwrap() > 0,
        "the guest wrote only {written} bytes: the cache never had to free space"
    );
    assert!(
        st["writeback_batches"].as_u64().unwrap() >= 2,
        "writeback never finished a second batch in front of the slow disk"
    );
    assert!(
        st["writes_paced"].as_u64().unwrap() > 0,
        "no write was paced although writeback could not keep up"
    );
    assert_eq!(
        st["cache_full"].as_u64().unwrap(),
        0,
        "writers found the cache full although the hot set fits it"
    );
    assert!(
        worst < Duration::from_millis(500),
        "no write completed for {worst:?}"
    );

    // Every block holds its last version.
    for b in 0..HOT_BLOCKS {
        assert_eq!(c.read_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
        let got = check_block(&c.mem()[..BLOCK], b).unwrap();
        assert_eq!(got, last[b as usize], "block {b}");
    }
    drop(c);
    server.stop();
}
