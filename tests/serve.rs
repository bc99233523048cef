//! `pcache serve` driven by a real vhost-user-blk client (libblkio), no VM:
//! data integrity across the whole disk, several queues, partly cached
//! reads, FLUSH, clean and unclean restarts, bad requests, the control
//! socket.

mod common;

use blkio::ReqFlags;
use common::{fill_block, pcache, text, verify_all_blocks, write_all_blocks, Client, Disk};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

/// Sequential writes all cached (no sequential cutoff), for the tests of
/// what the cache keeps across a stop or a kill.
const CACHED: [&str; 2] = ["--sequential-cutoff", "0"];

#[test]
fn whole_disk_written_and_read_back_with_checksums() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&["--num-queues", "2"]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    assert_eq!(c.capacity, 64 * MIB);
    let blocks = 64 * MIB / BLOCK as u64;
    write_all_blocks(&mut c, 0, blocks, 1);
    verify_all_blocks(&mut c, 0, blocks, |_| 1);
    drop(c);
    server.stop();
}

#[test]
fn several_queues_at_once() {
    let disk = Disk::new(32 * MIB, None);
    let server = disk.serve(&["--num-queues", "4"]);
    let mut c = Client::connect(&disk.socket, 4, 8 << 20);
    assert_eq!(c.queues.len(), 4);
    // Interleave: each queue owns every 4th block; all four in flight.
    let blocks = 32 * MIB / BLOCK as u64;
    let mut inflight = [0usize; 4];
    for b in 0..blocks {
        let q = (b % 4) as usize;
        let slot = (b as usize % 512) * BLOCK;
        fill_block(&mut c.mem()[slot..slot + BLOCK], b, 7);
        let p = c.ptr(slot);
        c.queues[q].write(b * BLOCK as u64, p, BLOCK, b as usize, ReqFlags::empty());
        inflight[q] += 1;
        if inflight[q] == 16 {
            for (ud, ret) in c.reap(q, 16) {
                assert_eq!(ret, 0, "write {ud}");
            }
            inflight[q] = 0;
        }
    }
    for (q, n) in inflight.into_iter().enumerate() {
        if n > 0 {
            for (_, ret) in c.reap(q, n) {
                assert_eq!(ret, 0);
            }
        }
    }
    for q in 0..4 {
        assert_eq!(c.flush_sync(q), 0);
    }
    verify_all_blocks(&mut c, 3, blocks, |_| 7);
    drop(c);
    server.stop();
}

#[test]
fn a_partly_cached_read_combines_cache_and_backing_store() {
    let fill = |i: u64| (i / 512) as u8 ^ 0x5a;
    let disk = Disk::new(16 * MIB, Some(&fill));
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 4 << 20);
    // Cache two separate 8 KiB pieces inside a 1 MiB range.
    c.mem()[..8192].fill(0xee);
    assert_eq!(c.write_sync(0, 100 * 4096, 0, 8192), 0);
    assert_eq!(c.write_sync(0, 200 * 4096, 0, 8192), 0);
    assert_eq!(c.read_sync(0, 0, MIB as usize, MIB as usize), 0);
    let got = c.mem()[MIB as usize..2 * MIB as usize].to_vec();
    for (i, b) in got.iter().enumerate() {
        let cached = (409600..409600 + 8192).contains(&i) || (819200..819200 + 8192).contains(&i);
        let want = if cached { 0xee } else { fill(i as u64) };
        assert_eq!(*b, want, "byte {i}");
    }
    // Read again: now all of it is a hit, and still the same.
    assert_eq!(c.read_sync(0, 0, MIB as usize, MIB as usize), 0);
    assert_eq!(&c.mem()[MIB as usize..2 * MIB as usize], &got[..]);
    drop(c);
    server.stop();
}

/// `pcache status --json` of the server on control socket `ctl`.
fn status_json(ctl: &str) -> serde_json::Value {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(["status", "--control", ctl, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// read_hits, read_misses and fill_bytes from `pcache status`.
fn read_counters(ctl: &str) -> (u64, u64, u64) {
    let v = status_json(ctl);
    (
        v["read_hits"].as_u64().unwrap(),
        v["read_misses"].as_u64().unwrap(),
        v["stats"]["fill_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn misses_in_flight_together_come_from_the_backing_store_then_hit() {
    // 32 reads, each one whole miss, all in flight at once: each goes to
    // the backing store on its own and is answered from its read buffer;
    // the fills that follow make the same reads hits.
    let fill = |i: u64| ((i / 4096) as u8).wrapping_mul(31) ^ (i % 251) as u8;
    let disk = Disk::new(16 * MIB, Some(&fill));
    let server = disk.serve(&[]);
    let ctl = server.control.display().to_string();
    let mut c = Client::connect(&disk.socket, 1, 4 << 20);
    // Distinct blocks (37 is odd, so i * 37 mod 4096 never repeats).
    let blocks: Vec<u64> = (0..32u64).map(|i| i * 37 % 4096).collect();
    for round in 0..2u64 {
        c.mem()[..32 * BLOCK].fill(0);
        for (i, &b) in blocks.iter().enumerate() {
            let p = c.ptr(i * BLOCK);
            c.queues[0].read(b * BLOCK as u64, p, BLOCK, i, ReqFlags::empty());
        }
        let mut done = 0;
        while done < blocks.len() {
            for (i, ret) in c.reap(0, 1) {
                assert_eq!(ret, 0, "read {i} failed in round {round}");
                done += 1;
            }
        }
        for (i, &b) in blocks.iter().enumerate() {
            let got = &c.mem()[i * BLOCK..(i + 1) * BLOCK];
            let off = b * BLOCK as u64;
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(j, &x)| x == fill(off + j as u64)),
                "block {b} read wrong in round {round}"
            );
        }
        // Fills run after the guest is answered: give them a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (hits, misses, filled) = loop {
            let r = read_counters(&ctl);
            if r.2 >= 32 * BLOCK as u64 || std::time::Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(misses, 32, "round {round}");
        assert_eq!(hits, 32 * round, "round {round}");
        assert_eq!(filled, 32 * BLOCK as u64, "round {round}");
    }
    drop(c);
    server.stop();
}

#[test]
fn sigterm_persists_and_a_restart_reads_everything_back() {
    let disk = Disk::new(32 * MIB, None);
    let server = disk.serve(&CACHED);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    let blocks = 32 * MIB / BLOCK as u64;
    write_all_blocks(&mut c, 0, blocks, 3);
    drop(c);
    // No FLUSH: SIGTERM itself must close the open ksets.
    server.stop();
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    verify_all_blocks(&mut c, 0, blocks, |_| 3);
    drop(c);
    server.stop();
}

#[test]
fn sigkill_after_a_completed_flush_loses_nothing_written_before_it() {
    let disk = Disk::new(32 * MIB, None);
    let server = disk.serve(&CACHED);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    let blocks = 32 * MIB / BLOCK as u64;
    write_all_blocks(&mut c, 0, blocks, 5);
    assert_eq!(c.flush_sync(0), 0);
    server.kill();
    drop(c);
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    verify_all_blocks(&mut c, 0, blocks, |_| 5);
    drop(c);
    server.stop();
}

#[test]
fn ten_thousand_completed_writes_without_a_flush_survive_sigkill() {
    // 10,000 distinct 4 KiB blocks (40 MiB, more than 78 ksets of keys),
    // each written once at QD32; no FLUSH, then the process dies.
    let disk = Disk::new(48 * MIB, None);
    let server = disk.serve(&CACHED);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    let blocks = 10_000;
    write_all_blocks(&mut c, 0, blocks, 11);
    server.kill();
    drop(c);
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    verify_all_blocks(&mut c, 0, blocks, |_| 11);
    drop(c);
    let st = status_json(&server.control.display().to_string());
    assert!(
        st["stats"]["replay_staged_keys"].as_u64().unwrap() > 0,
        "the kill left keys in open ksets, and they were replayed: {st}"
    );
    server.stop();
}

#[test]
fn out_of_range_requests_fail_and_the_next_client_is_served() {
    let disk = Disk::new(16 * MIB, None);
    let server = disk.serve(&[]);
    {
        let mut c = Client::connect(&disk.socket, 1, 1 << 20);
        let p = c.ptr(0);
        c.queues[0].read(16 * MIB, p, 4096, 1, ReqFlags::empty());
        c.queues[0].write(16 * MIB - 512, p, 4096, 2, ReqFlags::empty());
        let done = c.reap(0, 2);
        assert!(
            done.iter().all(|(_, ret)| *ret != 0),
            "out-of-range requests must fail: {done:?}"
        );
        // The same client can still do valid I/O.
        assert_eq!(c.write_sync(0, 0, 0, 4096), 0);
    }
    // A second client after the first disconnected.
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    c.mem()[..4096].fill(9);
    assert_eq!(c.write_sync(0, 4096, 0, 4096), 0);
    assert_eq!(c.read_sync(0, 4096, 8192, 4096), 0);
    assert!(c.mem()[8192..8192 + 4096].iter().all(|b| *b == 9));
    drop(c);
    server.stop();
}

#[test]
fn status_gc_percent_and_flush_through_the_control_socket() {
    let disk = Disk::new(16 * MIB, None);
    let server = disk.serve(&["--num-queues", "3"]);
    let ctl = server.control.to_str().unwrap().to_owned();
    let pcache = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
            .args(args)
            .output()
            .unwrap()
    };
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(c.write_sync(0, 0, 0, 65536), 0);
    let o = pcache(&["flush", "--control", &ctl]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = pcache(&["gc-percent", "--control", &ctl, "42"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = pcache(&["gc-percent", "--control", &ctl, "95"]);
    assert!(!o.status.success());
    let o = pcache(&["status", "--control", &ctl, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["gc_percent"], 42);
    assert_eq!(v["num_queues"], 3);
    assert_eq!(v["backing_bytes"], 16 * MIB);
    assert!(v["segments"].as_u64().unwrap() >= 31);
    assert!(v["stats"]["write_bytes"].as_u64().unwrap() >= 65536);
    assert!(v["durability"]
        .as_str()
        .unwrap()
        .contains("completed writes survive a crash of pcache"));
    let o = pcache(&["status", "--control", &ctl]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("gc_percent   42"));
    drop(c);
    server.stop();
    // gc_percent persisted.
    let o = pcache(&["inspect", "--cache", disk.cache.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["gc_percent"], 42);
}

#[test]
fn refuses_foreign_caches_and_mismatched_backing_stores() {
    let disk = Disk::new(16 * MIB, None);
    std::fs::write(&disk.cache, vec![7u8; 1 << 20]).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
            .args(disk.serve_args(extra))
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not a usable pcache cache") && err.contains("--format"),
        "{err}"
    );
    // With --format it is formatted (and serves).
    std::fs::remove_file(&disk.cache).unwrap();
    let server = disk.serve(&[]);
    server.stop();
    // A smaller backing store is refused (a disk never shrinks; a larger
    // one grows the disk, see tests/resize.rs).
    std::fs::File::options()
        .write(true)
        .open(&disk.backing)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refusing to use it"), "{err}");
}

#[test]
fn garbage_on_the_vhost_socket_closes_that_connection_and_the_next_client_is_served() {
    use std::io::{Read, Write};
    let disk = Disk::new(16 * MIB, None);
    let server = disk.serve(&[]);
    for garbage in [
        vec![0xffu8; 64],
        // A header claiming a huge payload, then nothing.
        {
            let mut m = vec![0u8; 12];
            m[0..4].copy_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
            m[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            m
        },
        // A valid-looking request code far out of range.
        {
            let mut m = vec![0u8; 12];
            m[0..4].copy_from_slice(&9999u32.to_le_bytes());
            m
        },
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&disk.socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let _ = s.write_all(&garbage);
        // pcache hangs up on us (or we give up after the timeout).
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        drop(s);
        // The next client works.
        let mut c = Client::connect(&disk.socket, 1, 1 << 20);
        c.mem()[..4096].fill(3);
        assert_eq!(c.write_sync(0, 0, 0, 4096), 0);
        assert_eq!(c.read_sync(0, 0, 4096, 4096), 0);
        assert!(c.mem()[4096..8192].iter().all(|b| *b == 3));
    }
    server.stop();
}

#[test]
fn busy_polling_serves_the_same_data() {
    let disk = Disk::new(16 * MIB, None);
    let server = disk.serve(&["--poll-us", "200", "--num-queues", "2"]);
    let mut c = Client::connect(&disk.socket, 2, 8 << 20);
    let blocks = 16 * MIB / BLOCK as u64;
    write_all_blocks(&mut c, 1, blocks, 9);
    assert_eq!(c.flush_sync(0), 0);
    verify_all_blocks(&mut c, 0, blocks, |_| 9);
    drop(c);
    server.stop();
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_disk_costs_no_cpu_although_queues_poll_by_default() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&[]);
    let pid = server.child.id();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    // Back-to-back requests grow the poll window to its maximum (reads of
    // a fresh cache: misses, then hits, nothing to write back).
    let t0 = std::time::Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < std::time::Duration::from_secs(1) {
        assert_eq!(c.read_sync(0, (n % 4096) * 4096, 0, 4096), 0);
        n += 1;
    }
    let busy = cpu_ticks(pid);
    // Connected, rings started, nothing to do.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let idle = cpu_ticks(pid) - busy;
    // The kset timer and the idle writeback check wake up a few times a
    // second; spinning would cost 300 ticks (100 Hz).
    assert!(
        idle <= 6,
        "pcache used {idle} ticks of CPU in 3 s of an idle disk after {n} requests"
    );
    drop(c);
    server.stop();
}

/// Dirty bytes and writeback progress from `pcache status --json`.
fn dirty_and_written(ctl: &str) -> (u64, u64) {
    let v = status_json(ctl);
    (
        v["dirty_bytes"].as_u64().unwrap(),
        v["stats"]["writeback_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn writeback_waits_while_the_disk_is_busy_and_runs_once_it_is_idle() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&["--writeback-idle-ms", "1500", "--writeback-max-age", "3600"]);
    let ctl = server.control.to_str().unwrap().to_owned();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    // Keep the disk busy for 2 s (longer than the idle time) with small
    // flushed writes: nothing may be written back meanwhile, far under the
    // 50 % watermark.
    let t0 = std::time::Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < std::time::Duration::from_secs(2) {
        assert_eq!(c.write_sync(0, (n % 1024) * 65536, 0, 65536), 0);
        assert_eq!(c.flush_sync(0), 0);
        n += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (dirty, written) = dirty_and_written(&ctl);
    assert!(dirty >= 65536, "dirty_bytes {dirty} after {n} writes");
    assert_eq!(written, 0, "wrote back while the disk was busy");
    // Idle: everything goes to the backing store within idle time + slack.
    let idle_from = std::time::Instant::now();
    let mut last = (dirty, written);
    while last.0 > 0 {
        assert!(
            idle_from.elapsed() < std::time::Duration::from_secs(20),
            "still {} dirty bytes 20 s after going idle",
            last.0
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        last = dirty_and_written(&ctl);
    }
    assert!(last.1 >= 65536);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(["status", "--control", &ctl])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("after 1500 ms idle"), "{text}");
    drop(c);
    server.stop();
}

#[test]
fn bad_writeback_watermarks_are_refused() {
    let disk = Disk::new(16 * MIB, None);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(["serve", "--socket"])
        .arg(&disk.socket)
        .arg("--cache")
        .arg(&disk.cache)
        .arg("--backing")
        .arg(&disk.backing)
        .args([
            "--cache-size",
            "512M",
            "--writeback-high",
            "30",
            "--writeback-low",
            "40",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("must not exceed"), "{err}");
}

#[test]
fn the_writeback_order_is_kept_in_the_cache_and_shown_by_status() {
    let disk = Disk::new(16 * MIB, None);
    let server = disk.serve(&["--writeback-order", "strict"]);
    let ctl = server.control.to_str().unwrap().to_owned();
    assert_eq!(status_json(&ctl)["writeback_order"], "strict");
    let o = pcache(&["status", "--control", &ctl]);
    assert!(text(&o).contains("strict order"), "{}", text(&o));
    server.stop();
    // Restarted without the flag: the cache keeps the choice.
    let server = disk.serve(&[]);
    assert_eq!(status_json(&ctl)["writeback_order"], "strict");
    server.stop();
    let server = disk.serve(&["--writeback-order", "newest"]);
    assert_eq!(status_json(&ctl)["writeback_order"], "newest");
    server.stop();
    let server = disk.serve(&[]);
    assert_eq!(status_json(&ctl)["writeback_order"], "newest");
    server.stop();
    let server = disk.serve(&["--writeback-order", "batch"]);
    assert_eq!(status_json(&ctl)["writeback_order"], "batch");
    server.stop();
}
