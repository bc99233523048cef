//! Cache modes and the sequential cutoff, through a real `pcache serve` and
//! libblkio: switches under load lose nothing, write-through and
//! write-around put each write on the backing store before it completes,
//! the mode survives a restart, and long sequential streams go around the
//! cache without ever letting older cached data overwrite them.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::process::{Command, Stdio};

use blkio::ReqFlags;
use common::{check_block, fill_block, Client, Disk, Server};
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

/// Nothing is written back unless asked.
const LAZY: [&str; 4] = [
    "--writeback-idle-ms",
    "3600000",
    "--writeback-max-age",
    "3600",
];

fn backing_block(disk: &Disk, b: u64) -> Result<u64, String> {
    let mut f = std::fs::File::open(&disk.backing).unwrap();
    let mut buf = vec![0u8; BLOCK];
    f.seek(SeekFrom::Start(b * BLOCK as u64)).unwrap();
    f.read_exact(&mut buf).unwrap();
    check_block(&buf, b)
}

fn read_block(c: &mut Client, b: u64) -> Result<u64, String> {
    assert_eq!(
        c.read_sync(0, b * BLOCK as u64, 0, BLOCK),
        0,
        "read of block {b}"
    );
    check_block(&c.mem()[..BLOCK], b)
}

fn write_block(c: &mut Client, b: u64, v: u64) {
    fill_block(&mut c.mem()[..BLOCK], b, v);
    assert_eq!(
        c.write_sync(0, b * BLOCK as u64, 0, BLOCK),
        0,
        "write of block {b}"
    );
}

fn mode_of(server: &Server) -> String {
    common::status(server)["mode"].as_str().unwrap().to_owned()
}

#[test]
fn mode_switches_under_load_lose_nothing() {
    let disk = Disk::new(64 * MIB, None);
    let mut args = LAZY.to_vec();
    args.extend(["--sequential-cutoff", "0"]);
    let server = disk.serve(&args);
    let ctl = server.control.display().to_string();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    let blocks = 16 * MIB / BLOCK as u64;
    let mut last = vec![0u64; blocks as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut version = 0u64;
    let mut writes = 0u64;
    let plan = [
        "writethrough",
        "writearound",
        "none",
        "writeback",
        "writearound",
        "writeback",
        "none",
        "writethrough",
        "writeback",
    ];
    for mode in plan {
        // The switch runs while the guest keeps writing at QD8.
        let child = Command::new(env!("CARGO_BIN_EXE_pcache"))
            .args(["mode", "--control", &ctl, mode, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = Some(child);
        let mut rounds = 0;
        while rounds < 20
            || child
                .as_mut()
                .is_some_and(|c| c.try_wait().unwrap().is_none())
        {
            // Distinct blocks: two writes of one block in flight at once
            // may land in either order.
            let mut batch: Vec<u64> = Vec::new();
            while batch.len() < 8 {
                let b = rng.gen_range(0..blocks);
                if !batch.contains(&b) {
                    batch.push(b);
                }
            }
            for (i, b) in batch.iter().enumerate() {
                version += 1;
                fill_block(&mut c.mem()[i * BLOCK..(i + 1) * BLOCK], *b, version);
                let p = c.ptr(i * BLOCK);
                c.queues[0].write(*b * BLOCK as u64, p, BLOCK, i, ReqFlags::empty());
            }
            let mut done = 0;
            while done < 8 {
                for (i, ret) in c.reap(0, 1) {
                    assert_eq!(ret, 0, "a write failed during the switch to {mode}");
                    let b = batch[i];
                    let v = u64::from_le_bytes(
                        c.mem()[i * BLOCK + 8..i * BLOCK + 16].try_into().unwrap(),
                    );
                    last[b as usize] = v;
                    done += 1;
                }
            }
            writes += 8;
            rounds += 1;
        }
        let o = child.take().unwrap().wait_with_output().unwrap();
        assert!(o.status.success(), "{}", common::text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["mode"], mode, "{v}");
        assert_eq!(mode_of(&server), mode);
    }
    assert!(
        writes > 1000,
        "only {writes} writes ran during the switches"
    );
    for b in 0..blocks {
        assert_eq!(read_block(&mut c, b), Ok(last[b as usize]), "block {b}");
    }
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "120"]);
    assert!(o.status.success(), "{}", common::text(&o));
    for b in 0..blocks {
        assert_eq!(
            backing_block(&disk, b),
            Ok(last[b as usize]),
            "backing block {b}"
        );
    }
    drop(c);
    server.stop();
}

#[test]
fn writethrough_writearound_and_none_put_writes_on_the_backing_store_and_persist() {
    let disk = Disk::new(64 * MIB, None);
    let mut args = LAZY.to_vec();
    args.extend(["--mode", "writethrough"]);
    let server = disk.serve(&args);
    assert_eq!(mode_of(&server), "writethrough");
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_block(&mut c, 10, 1);
    assert_eq!(
        backing_block(&disk, 10),
        Ok(1),
        "write-through: on the store at once"
    );
    let before = common::status(&server)["read_hits"].as_u64().unwrap();
    assert_eq!(read_block(&mut c, 10), Ok(1));
    let st = common::status(&server);
    assert_eq!(
        st["read_hits"].as_u64().unwrap(),
        before + 1,
        "and in the cache: {st}"
    );
    assert_eq!(st["dirty_bytes"], 0, "{st}");

    let ctl = server.control.display().to_string();
    let o = common::pcache(&["mode", "--control", &ctl, "writearound"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(common::text(&o).contains("mode: writearound (was writethrough)"));
    write_block(&mut c, 10, 2);
    assert_eq!(backing_block(&disk, 10), Ok(2));
    assert_eq!(read_block(&mut c, 10), Ok(2), "the cache forgot version 1");
    drop(c);
    server.stop();

    // The mode is kept in the cache.
    let server = disk.serve(&LAZY);
    assert_eq!(mode_of(&server), "writearound");
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(read_block(&mut c, 10), Ok(2), "after a restart");
    let ctl = server.control.display().to_string();
    let o = common::pcache(&["mode", "--control", &ctl, "none"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let fills = common::status(&server)["stats"]["fill_bytes"]
        .as_u64()
        .unwrap();
    write_block(&mut c, 11, 3);
    assert_eq!(backing_block(&disk, 11), Ok(3));
    assert_eq!(read_block(&mut c, 11), Ok(3));
    assert_eq!(read_block(&mut c, 10), Ok(2));
    let st = common::status(&server);
    assert_eq!(
        st["stats"]["fill_bytes"].as_u64().unwrap(),
        fills,
        "none fills nothing: {st}"
    );
    // Back to write-back: the cache never serves what it held before
    // `none` (it was dropped), and writes are cached again.
    let o = common::pcache(&["mode", "--control", &ctl, "writeback"]);
    assert!(o.status.success(), "{}", common::text(&o));
    write_block(&mut c, 12, 4);
    assert_eq!(
        backing_block(&disk, 12),
        Ok(0),
        "write-back: not on the store yet"
    );
    assert_eq!(read_block(&mut c, 12), Ok(4));
    // `pcache mode` without a mode prints it.
    let o = common::pcache(&["mode", "--control", &ctl]);
    assert_eq!(common::text(&o).trim(), "mode: writeback");
    drop(c);
    server.stop();

    // --read-only refuses --mode, which would change the cache.
    let o = Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(disk.serve_args(&["--read-only", "--mode", "none"]))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        common::text(&o).contains("--mode changes the cache"),
        "{}",
        common::text(&o)
    );
}

#[test]
fn long_sequential_streams_go_around_the_cache_but_never_over_cached_data() {
    let disk = Disk::new(128 * MIB, None);
    // The default cutoff, 4 MiB. Strict order writes back one flush epoch
    // per batch: the dirty blocks below, then what came after them.
    let mut args = LAZY.to_vec();
    args.extend(["--writeback-order", "strict"]);
    let server = disk.serve(&args);
    let st = common::status(&server);
    assert_eq!(st["sequential_cutoff"], 4 * MIB, "{st}");
    let mut c = Client::connect(&disk.socket, 1, 2 << 20);
    // Dirty 4 KiB blocks scattered in 40..48 MiB, version 1.
    let scattered: Vec<u64> = (0..32)
        .map(|i| (40 * MIB / BLOCK as u64) + i * 61)
        .collect();
    for &b in &scattered {
        write_block(&mut c, b, 1);
    }
    assert_eq!(c.flush_sync(0), 0);
    // A sequential stream of 1 MiB writes over 16..80 MiB, version 2.
    let per = (MIB as usize) / BLOCK;
    for m in 16..80u64 {
        for i in 0..per {
            let b = m * MIB / BLOCK as u64 + i as u64;
            fill_block(&mut c.mem()[i * BLOCK..(i + 1) * BLOCK], b, 2);
        }
        assert_eq!(c.write_sync(0, m * MIB, 0, MIB as usize), 0);
    }
    let st = common::status(&server);
    let bypass = st["stats"]["write_bypass_bytes"].as_u64().unwrap();
    assert!(
        bypass >= 48 * MIB,
        "only {bypass} bytes went around the cache: {st}"
    );
    // Past the cutoff and clear of cached data: on the store already.
    assert_eq!(backing_block(&disk, 70 * MIB / BLOCK as u64), Ok(2));
    // Every block reads version 2, through pcache now and from the store
    // after a drain: the dirty version 1 never overwrites it.
    for b in 16 * MIB / BLOCK as u64..80 * MIB / BLOCK as u64 {
        assert_eq!(read_block(&mut c, b), Ok(2), "block {b}");
    }
    let ctl = server.control.display().to_string();
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "120"]);
    assert!(o.status.success(), "{}", common::text(&o));
    for b in 16 * MIB / BLOCK as u64..80 * MIB / BLOCK as u64 {
        assert_eq!(backing_block(&disk, b), Ok(2), "backing block {b}");
    }
    // A long sequential read of data only the store holds is not cached.
    let fills = common::status(&server)["stats"]["fill_bytes"]
        .as_u64()
        .unwrap();
    for m in 80..128u64 {
        assert_eq!(c.read_sync(0, m * MIB, 0, MIB as usize), 0);
    }
    let st = common::status(&server);
    let nofill = st["stats"]["read_nofill_bytes"].as_u64().unwrap();
    let filled = st["stats"]["fill_bytes"].as_u64().unwrap() - fills;
    assert!(nofill >= 40 * MIB, "{nofill} bytes left uncached: {st}");
    assert!(
        filled <= 8 * MIB,
        "{filled} bytes of a sequential read were cached: {st}"
    );
    drop(c);
    server.stop();
}
