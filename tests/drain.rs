//! `pcache drain`: everything dirty is written back now, whatever the
//! writeback policy says, and the command returns once nothing is dirty
//! (or fails after its timeout, in front of a slow disk).

mod common;
#[path = "common/throttle.rs"]
mod throttle;

use std::io::{Read, Seek, SeekFrom};

use common::{check_block, fill_block, Client, Disk, Server};
use throttle::{Limits, Throttle};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

/// A policy that would write nothing back for an hour, and the tests'
/// sequential writes all cached (no sequential cutoff).
const LAZY: [&str; 8] = [
    "--writeback-idle-ms",
    "3600000",
    "--writeback-max-age",
    "3600",
    "--writeback-high",
    "100",
    "--sequential-cutoff",
    "0",
];

fn dirty_bytes(ctl: &str) -> u64 {
    let o = common::pcache(&["status", "--control", ctl, "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["dirty_bytes"].as_u64().unwrap()
}

/// Write `n` blocks of version 1, unflushed, at QD1.
fn write_blocks(c: &mut Client, n: u64) {
    for b in 0..n {
        fill_block(&mut c.mem()[..BLOCK], b, 1);
        assert_eq!(c.write_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
    }
}

#[test]
fn drain_writes_back_everything_now_and_returns_when_nothing_is_dirty() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&LAZY);
    let ctl = server.control.to_str().unwrap().to_owned();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    let blocks = 32 * MIB / BLOCK as u64;
    write_blocks(&mut c, blocks);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(dirty_bytes(&ctl) > 0, "nothing dirty before the drain");

    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "120", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["drained"], true, "{v}");
    assert_eq!(v["dirty_bytes"], 0, "{v}");
    assert!(v["written_back_bytes"].as_u64().unwrap() >= 32 * MIB, "{v}");
    assert_eq!(dirty_bytes(&ctl), 0);

    // The backing file alone holds every block (pcache still runs: the
    // drain, not a stop, put it there).
    let mut f = std::fs::File::open(&disk.backing).unwrap();
    let mut buf = vec![0u8; BLOCK];
    for b in 0..blocks {
        f.seek(SeekFrom::Start(b * BLOCK as u64)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(check_block(&buf, b), Ok(1), "block {b} in the backing file");
    }
    // Text output says what it did.
    write_blocks(&mut c, 16);
    let o = common::pcache(&["drain", "--control", &ctl]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("drained:"),
        "{}",
        common::text(&o)
    );
    drop(c);
    server.stop();
}

#[test]
fn drain_in_front_of_a_slow_disk_times_out_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Throttle::new(
        dir.path(),
        Limits {
            read_iops: 100_000,
            write_bps: MIB,
        },
    )
    .unwrap_or_else(|e| panic!("this test needs a slow backing disk: {e}"));
    // The cache on tmpfs: only the backing store is slow (a cache file on
    // the throttled disk would make its own persists crawl too).
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
        .set_len(64 * MIB)
        .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(["serve", "--socket"])
        .arg(&disk.socket)
        .arg("--cache")
        .arg(&disk.cache)
        .args(["--cache-size", "512M", "--backing"])
        .arg(&disk.backing)
        .args(LAZY);
    let server = Server::start_cmd(slow.wrap(&cmd), &disk.socket);
    let ctl = server.control.to_str().unwrap().to_owned();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_blocks(&mut c, 16 * MIB / BLOCK as u64);
    let t = std::time::Instant::now();
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("drain timed out after"),
        "{}",
        common::text(&o)
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(dirty_bytes(&ctl) > 0);
    // A bad timeout is a usage error.
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "soon"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    drop(c);
    server.kill();
}

/// Read block `b` through pcache and return the version it holds.
fn version_of(c: &mut Client, b: u64) -> u64 {
    assert_eq!(c.read_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
    check_block(&c.mem()[..BLOCK], b).unwrap()
}

#[test]
fn invalidate_drops_what_the_cache_holds_so_reads_see_the_backing_store() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&LAZY);
    let ctl = server.control.to_str().unwrap().to_owned();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_blocks(&mut c, 64);
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "60"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    // Another writer changes the backing file behind the cache: pcache
    // still serves its own copy.
    let behind = |b: u64, v: u64| {
        use std::io::Write;
        let mut buf = vec![0u8; BLOCK];
        fill_block(&mut buf, b, v);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.backing)
            .unwrap();
        f.seek(SeekFrom::Start(b * BLOCK as u64)).unwrap();
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
    };
    behind(20, 2);
    assert_eq!(
        version_of(&mut c, 20),
        1,
        "the cache should still serve its copy"
    );

    let o = common::pcache(&["invalidate", "--control", &ctl, "--timeout", "60"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("invalidated"),
        "{}",
        common::text(&o)
    );
    assert_eq!(dirty_bytes(&ctl), 0);
    assert_eq!(version_of(&mut c, 20), 2, "read the cache's stale copy");
    assert_eq!(version_of(&mut c, 5), 1);
    // Writes go on, and what they wrote is read back.
    fill_block(&mut c.mem()[..BLOCK], 30, 3);
    assert_eq!(c.write_sync(0, 30 * BLOCK as u64, 0, BLOCK), 0);
    assert_eq!(version_of(&mut c, 30), 3);
    drop(c);
    // Nothing invalidated comes back after a restart either.
    server.stop();
    behind(40, 2);
    let server = disk.serve(&LAZY);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(
        version_of(&mut c, 40),
        2,
        "a restart replayed invalidated data"
    );
    assert_eq!(version_of(&mut c, 30), 3);
    drop(c);
    server.stop();
}

#[test]
fn writes_during_an_invalidate_wait_and_none_is_lost() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&LAZY);
    let ctl = server.control.to_str().unwrap().to_owned();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    const N: u64 = 256;
    write_blocks(&mut c, N);
    let mut last = vec![1u64; N as usize];
    let inv = {
        let ctl = ctl.clone();
        std::thread::spawn(move || common::pcache(&["invalidate", "--control", &ctl]))
    };
    // Keep writing (QD1) until the invalidation is done, and a little more.
    let mut x = 0x9e37_79b9u64;
    let mut v = 1u64;
    let mut after = None;
    while after.is_none_or(|n| n < 200) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % N;
        v += 1;
        fill_block(&mut c.mem()[..BLOCK], b, v);
        assert_eq!(c.write_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
        last[b as usize] = v;
        if inv.is_finished() {
            *after.get_or_insert(0) += 1;
        }
    }
    let o = inv.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    for b in 0..N {
        assert_eq!(version_of(&mut c, b), last[b as usize], "block {b}");
    }
    drop(c);
    server.stop();
    let server = disk.serve(&LAZY);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    for b in 0..N {
        assert_eq!(
            version_of(&mut c, b),
            last[b as usize],
            "block {b} after a restart"
        );
    }
    drop(c);
    server.stop();
}
