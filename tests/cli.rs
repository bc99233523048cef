//! The `pcache` command as a user runs it: format, inspect, check and
//! offline writeback, with their messages and exit codes.

mod common;

use std::path::Path;
use std::sync::Arc;

use pcache::engine::{DataHead, Engine, OpenOptions};
use pcache::pmem::{Region, RegionOptions};

use common::{pcache, text};

fn backing_file(dir: &Path, bytes: u64) -> String {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn format_rejects_bad_sizes_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path(), 64 << 20);
    let cache = dir.path().join("c.img");
    let cache = cache.to_str().unwrap();
    let o = pcache(&[
        "format",
        "--cache",
        cache,
        "--cache-size",
        "256M",
        "--backing",
        &backing,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("the minimum is 536870912 bytes (512 MiB)"),
        "{}",
        text(&o)
    );
    let o = pcache(&[
        "format",
        "--cache",
        cache,
        "--cache-size",
        "520M",
        "--backing",
        &backing,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("whole number of 16 MiB segments"),
        "{}",
        text(&o)
    );
    let o = pcache(&[
        "format",
        "--cache",
        cache,
        "--cache-size",
        "lots",
        "--backing",
        &backing,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = pcache(&["format", "--cache", cache, "--backing", &backing]);
    assert!(text(&o).contains("give --cache-size"), "{}", text(&o));
    let o = pcache(&[
        "format",
        "--cache",
        cache,
        "--cache-size",
        "512M",
        "--backing",
        "/nonexistent/disk",
    ]);
    assert!(
        text(&o).contains("Cannot open backing store /nonexistent/disk"),
        "{}",
        text(&o)
    );
}

#[test]
fn format_inspect_check_and_refusal_to_reformat() {
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path(), 64 << 20);
    let cache = dir.path().join("c.img");
    let cache = cache.to_str().unwrap();
    let o = pcache(&[
        "format",
        "--cache",
        cache,
        "--cache-size",
        "1G",
        "--backing",
        &backing,
        "--data-crc",
        "--gc-percent",
        "60",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("63 segments"), "{}", text(&o));

    let o = pcache(&["inspect", "--cache", cache, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["segments"], 63);
    assert_eq!(v["gc_percent"], 60);
    assert_eq!(v["data_crc"], true);
    assert_eq!(v["backing_bytes"], 64 << 20);
    assert_eq!(v["dirty_bytes"], 0);
    assert_eq!(v["key_head"], "0:0 (lsn 1)");
    assert_eq!(v["writeback_order"], "batch");
    let o = pcache(&["inspect", "--cache", cache]);
    assert!(
        text(&o).contains("gc_percent 60, writeback order batch, data_crc on"),
        "{}",
        text(&o)
    );

    let o = pcache(&["check", "--cache", cache]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("sound"), "{}", text(&o));

    let o = pcache(&["format", "--cache", cache, "--backing", &backing]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("already holds a pcache cache"),
        "{}",
        text(&o)
    );
    let o = pcache(&["format", "--cache", cache, "--backing", &backing, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn check_names_the_corrupt_record() {
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path(), 64 << 20);
    let cache = dir.path().join("c.img");
    let cache_s = cache.to_str().unwrap();
    assert!(pcache(&[
        "format",
        "--cache",
        cache_s,
        "--cache-size",
        "512M",
        "--backing",
        &backing
    ])
    .status
    .success());
    let mut bytes = std::fs::read(&cache).unwrap();
    for off in pcache::format::DIRTY_TAIL_OFF {
        bytes[off as usize + 20] ^= 1;
    }
    std::fs::write(&cache, &bytes).unwrap();
    let o = pcache(&["check", "--cache", cache_s]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("NOT sound") && text(&o).contains("dirty_tail"),
        "{}",
        text(&o)
    );
    // Not a pcache device at all.
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let o = pcache(&["check", "--cache", blank.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("No pcache superblock"), "{}", text(&o));
}

#[test]
fn offline_writeback_makes_the_backing_file_complete() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32u64 << 20;
    let backing = backing_file(dir.path(), size);
    let cache = dir.path().join("c.img");
    let cache_s = cache.to_str().unwrap();
    assert!(pcache(&[
        "format",
        "--cache",
        cache_s,
        "--cache-size",
        "512M",
        "--backing",
        &backing
    ])
    .status
    .success());
    let mut want = vec![0u8; size as usize];
    {
        let region = Arc::new(Region::open(&cache, RegionOptions::default()).unwrap());
        let e = Engine::open(region, &OpenOptions::default()).unwrap();
        let mut head = DataHead::default();
        for i in 0..300u64 {
            let off = (i * 104_729 * 512) % (size - (1 << 20));
            let len = 512 * (1 + (i as usize * 37) % 2048);
            let data: Vec<u8> = (0..len).map(|j| (i as u8) ^ (j / 512) as u8).collect();
            e.write(&mut head, off, &data).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
        }
        e.flush().unwrap();
    }
    let o = pcache(&["inspect", "--cache", cache_s, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["dirty_bytes"].as_u64().unwrap() > 0);

    let small = dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let o = pcache(&[
        "writeback",
        "--cache",
        cache_s,
        "--backing",
        small.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("refusing to use it"), "{}", text(&o));

    let o = pcache(&["writeback", "--cache", cache_s, "--backing", &backing]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("clean"), "{}", text(&o));
    assert!(
        std::fs::read(&backing).unwrap() == want,
        "backing file differs after writeback"
    );
    let o = pcache(&["inspect", "--cache", cache_s, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["dirty_bytes"], 0);
    assert_eq!(v["dirty_tail"], v["key_head"]);
}

#[test]
fn check_data_names_each_dirty_extent_that_fails_its_crc() {
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path(), 16 << 20);
    let cache = dir.path().join("c.img");
    let cache_s = cache.to_str().unwrap();
    let format = |extra: &[&str]| {
        let mut args = vec!["format", "--cache", cache_s, "--cache-size", "512M"];
        args.extend_from_slice(&["--backing", &backing, "--force"]);
        args.extend_from_slice(extra);
        assert!(pcache(&args).status.success());
    };
    format(&["--data-crc"]);
    // Ten dirty 4 KiB blocks: eight in the log (flushed), two only in the
    // open ksets' slots (completed, not flushed, then the process "dies").
    let marker = |b: u64| format!("pcache-block-{b:03}");
    {
        let region = Arc::new(Region::open(&cache, RegionOptions::default()).unwrap());
        let e = Engine::open(region, &OpenOptions::default()).unwrap();
        let mut head = DataHead::default();
        for b in 0..10u64 {
            let mut data = vec![b as u8; 4096];
            data[100..100 + 16].copy_from_slice(marker(b).as_bytes());
            e.write(&mut head, b * 4096, &data).unwrap();
            if b == 7 {
                e.flush().unwrap();
            }
        }
    }
    let check = || pcache(&["check", "--cache", cache_s, "--data"]);
    let o = check();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("sound: 10 dirty extents"), "{}", text(&o));

    // Flip a byte of block 3 (in the log) and of block 9 (in a slot).
    let mut img = std::fs::read(&cache).unwrap();
    for b in [3u64, 9] {
        let m = marker(b);
        let at = img
            .windows(m.len())
            .position(|w| w == m.as_bytes())
            .unwrap_or_else(|| panic!("block {b}'s data is not in the cache file"));
        img[at] ^= 0x20;
    }
    std::fs::write(&cache, &img).unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("guest bytes 0x3000+0x1000"), "{t}");
    assert!(t.contains("guest bytes 0x9000+0x1000"), "{t}");
    assert!(t.contains("2 of 10 dirty extents fail their CRC"), "{t}");
    // The log itself is sound: a plain check still passes.
    let o = pcache(&["check", "--cache", cache_s]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // Without data CRCs there is nothing to verify against.
    format(&[]);
    let o = check();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("without data CRCs"), "{}", text(&o));
}

#[test]
fn timeouts_out_of_range_are_refused_with_a_clear_message() {
    // Checked before anything is asked of a server: none runs here.
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("none.ctl");
    let ctl = ctl.to_str().unwrap();
    for t in ["1e300", "-1", "inf", "NaN", "86401"] {
        let t = format!("--timeout={t}");
        for cmd in [
            vec!["drain", "--control", ctl, &t],
            vec!["mode", "--control", ctl, "writethrough", &t],
            vec!["invalidate", "--control", ctl, &t],
        ] {
            let o = pcache(&cmd);
            assert_eq!(o.status.code(), Some(1), "{cmd:?}: {}", text(&o));
            assert!(
                text(&o).contains("--timeout must be a number of seconds from 0 to 86400"),
                "{cmd:?}: {}",
                text(&o)
            );
        }
    }
}
