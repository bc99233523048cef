//! `pcache serve --read-only`: the guest reads what the cache holds (dirty
//! data included) and the backing store for the rest, and neither file is
//! written, not by fills, GC, writeback or a stop. Options that would
//! change the cache are refused.

mod common;

use std::hash::Hasher;
use std::io::Read;
use std::path::Path;

use common::{check_block, fill_block, Client, Disk, Server};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;
/// Blocks written (and left dirty in the cache) before the read-only run.
const WRITTEN: u64 = 256;
const DISK_BLOCKS: u64 = 16 * MIB / BLOCK as u64;

/// A hash of a whole file's bytes.
fn digest(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

/// The backing file's byte at `i` before anything is written.
fn pattern(i: u64) -> u8 {
    (i / BLOCK as u64 * 7 + 3) as u8
}

#[test]
fn read_only_serves_dirty_data_and_the_backing_store_and_writes_neither_file() {
    let disk = Disk::new(16 * MIB, Some(&pattern));
    // Written, flushed, then killed before any writeback could run: the
    // cache holds the only copy of these blocks.
    let server = disk.serve(&[
        "--writeback-idle-ms",
        "3600000",
        "--writeback-max-age",
        "3600",
    ]);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    for b in 0..WRITTEN {
        fill_block(&mut c.mem()[..BLOCK], b, 1);
        assert_eq!(c.write_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
    }
    assert_eq!(c.flush_sync(0), 0);
    drop(c);
    server.kill();
    let cache_before = digest(&disk.cache);
    let backing_before = digest(&disk.backing);

    let server = Server::start(&disk.serve_args(&["--read-only"]), &disk.socket);
    let ctl = server.control.to_str().unwrap().to_owned();
    let status = || {
        let o = common::pcache(&["status", "--control", &ctl, "--json"]);
        assert!(o.status.success(), "{}", common::text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let s = status();
    assert_eq!(s["read_only"], true, "{s}");
    assert!(
        s["dirty_bytes"].as_u64().unwrap() >= WRITTEN * BLOCK as u64,
        "the cache should still hold the dirty blocks: {s}"
    );
    let mut c = Client::connect_with(&disk.socket, 1, 1 << 20, true);
    // Twice: the second pass would hit what the first filled, if it did.
    for _ in 0..2 {
        for b in 0..DISK_BLOCKS {
            assert_eq!(c.read_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
            let data = &c.mem()[..BLOCK];
            if b < WRITTEN {
                assert_eq!(check_block(data, b), Ok(1), "dirty block {b}");
            } else {
                let want = pattern(b * BLOCK as u64);
                assert!(
                    data.iter().all(|x| *x == want),
                    "block {b} does not hold the backing store's data"
                );
            }
        }
    }
    // Writes are refused (by libblkio already: it knows the disk is
    // read-only); a FLUSH has nothing to do and succeeds.
    fill_block(&mut c.mem()[..BLOCK], 0, 2);
    assert_ne!(
        c.write_sync(0, 0, 0, BLOCK),
        0,
        "a write to a read-only disk"
    );
    assert_eq!(c.flush_sync(0), 0);
    let st = &status()["stats"];
    assert_eq!(st["fill_bytes"], 0, "read-only filled the cache: {st}");
    assert_eq!(st["write_bytes"], 0, "{st}");
    assert_eq!(st["writeback_bytes"], 0, "{st}");
    assert_eq!(st["gc_segs_freed"], 0, "{st}");
    // Settings cannot change either.
    let o = common::pcache(&["gc-percent", "--control", &ctl, "50"]);
    assert!(!o.status.success(), "gc-percent on a read-only cache");
    drop(c);
    server.stop();
    assert_eq!(digest(&disk.cache), cache_before, "the cache file changed");
    assert_eq!(
        digest(&disk.backing),
        backing_before,
        "the backing file changed"
    );

    // What would change the cache, or create files, is refused up front.
    for (extra, says) in [
        (&["--format"][..], "--format changes the cache"),
        (
            &["--gc-percent", "50"][..],
            "--gc-percent changes the cache",
        ),
        (&["--writeback-order", "strict"][..], "--writeback-order"),
    ] {
        let mut args = disk.serve_args(&["--read-only"]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = common::pcache(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", common::text(&o));
        assert!(common::text(&o).contains(says), "{}", common::text(&o));
    }
    std::fs::remove_file(&disk.cache).unwrap();
    let o = common::pcache(
        &disk
            .serve_args(&["--read-only"])
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        common::text(&o).contains("does not exist (--read-only creates nothing)"),
        "{}",
        common::text(&o)
    );
    assert!(!disk.cache.exists(), "--read-only created a cache file");
}
