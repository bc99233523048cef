//! Corrupted cache media: for every kind of metadata record, one bad
//! replica is survived and two are refused, with `pcache check` naming the
//! record; a damaged kset in the middle of the log is refused rather than
//! silently truncating the log; pcache never re-formats on its own.

mod common;

use std::path::Path;
use std::sync::Arc;

use pcache::engine::{DataHead, Engine, OpenOptions};
use pcache::format::{self, seg_off};
use pcache::pmem::{Region, RegionOptions};

use common::{pcache, text};

/// A formatted cache with some history: writes, flushes, settings changes.
fn cache_with_history(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cache = dir.join("cache.img");
    let backing = dir.join("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let o = pcache(&[
        "format",
        "--cache",
        cache.to_str().unwrap(),
        "--cache-size",
        "512M",
        "--backing",
        backing.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r = Arc::new(Region::open(&cache, RegionOptions::default()).unwrap());
    let e = Engine::open(r, &OpenOptions::default()).unwrap();
    let mut head = DataHead::default();
    for i in 0..40u64 {
        // One 4 MiB region per write, so each flush closes a few ksets.
        e.write(&mut head, (i % 16) << 22, &vec![i as u8 + 1; 8192])
            .unwrap();
        if i % 4 == 3 {
            e.flush().unwrap();
        }
    }
    e.set_gc_percent(33).unwrap();
    e.flush().unwrap();
    (cache, backing)
}

/// Flip one bit in place (flipping again restores it).
fn flip(path: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, off).unwrap();
}

#[test]
fn one_bad_replica_is_survived_and_two_are_named_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = cache_with_history(dir.path());
    let c = cache.to_str().unwrap();
    let seg = |s: u32, o: [u64; 2]| [seg_off(s) + o[0], seg_off(s) + o[1]];
    let records: [(&str, [u64; 2]); 7] = [
        ("cache_info", format::CACHE_INFO_OFF),
        ("key_tail", format::KEY_TAIL_OFF),
        ("dirty_tail", format::DIRTY_TAIL_OFF),
        ("writeback target", format::WB_TARGET_OFF),
        ("segment_info", seg(5, format::SEG_INFO_OFF)),
        ("segment_gen", seg(7, format::SEG_GEN_OFF)),
        ("segment_gen", seg(0, format::SEG_GEN_OFF)),
    ];
    for (name, offs) in records {
        for (slot, off) in offs.iter().enumerate() {
            flip(&cache, off + 20);
            let o = pcache(&["check", "--cache", c]);
            assert_eq!(
                o.status.code(),
                Some(0),
                "{name} slot {slot} alone bad: {}",
                text(&o)
            );
            flip(&cache, off + 20);
        }
        flip(&cache, offs[0] + 20);
        flip(&cache, offs[1] + 20);
        let o = pcache(&["check", "--cache", c]);
        assert_eq!(o.status.code(), Some(1), "{name} both bad: {}", text(&o));
        assert!(
            text(&o).contains(name),
            "check must name {name}: {}",
            text(&o)
        );
        flip(&cache, offs[0] + 20);
        flip(&cache, offs[1] + 20);
    }
    // The superblock has one copy: damaged, nothing opens and nothing is
    // re-formatted.
    flip(&cache, format::SB_OFF + 20);
    let damaged = std::fs::read(&cache).unwrap();
    let o = pcache(&["check", "--cache", c]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("superblock"), "{}", text(&o));
    let sock = dir.path().join("s.sock");
    let o = pcache(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--cache",
        c,
        "--backing",
        dir.path().join("disk.img").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--format"), "{}", text(&o));
    assert!(
        std::fs::read(&cache).unwrap() == damaged,
        "a refused cache must not be modified"
    );
}

/// Positions of the ksets in segment 0 of the log: (offset, bytes).
fn ksets_in_segment0(cache: &Path) -> Vec<(u64, u64)> {
    let b = std::fs::read(cache).unwrap();
    let base = seg_off(0) + format::SEG_DATA_OFF;
    let mut out = vec![];
    let mut off = 0u64;
    loop {
        let at = (base + off) as usize;
        let magic = u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap());
        if magic != format::KSET_MAGIC {
            break;
        }
        let n = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as u64;
        let bytes = format::KSET_HEADER_BYTES as u64 + n * format::KEY_BYTES as u64;
        out.push((base + off, bytes));
        off += bytes;
    }
    out
}

#[test]
fn a_damaged_kset_in_the_middle_of_the_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = cache_with_history(dir.path());
    let c = cache.to_str().unwrap();
    let ksets = ksets_in_segment0(&cache);
    assert!(ksets.len() >= 6, "need a few ksets, got {}", ksets.len());
    // Middle: refused, and check says where.
    let (at, len) = ksets[ksets.len() / 2];
    flip(&cache, at + len - 3);
    let o = pcache(&["check", "--cache", c]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("a kset in the middle of the log is damaged"),
        "{}",
        text(&o)
    );
    flip(&cache, at + len - 3);
    // The last kset torn (an interrupted close): the log just ends earlier.
    let (at, len) = *ksets.last().unwrap();
    flip(&cache, at + len - 3);
    let o = pcache(&["check", "--cache", c]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// A cache file cut short (by a careless `truncate`, a full disk during a
/// copy) is refused by every command that reads it, naming the cause;
/// nothing panics and nothing writes.
#[test]
fn a_cache_file_cut_short_is_refused_by_every_command_that_reads_it() {
    let d = tempfile::tempdir().unwrap();
    let (cache, backing) = cache_with_history(d.path());
    // Shorter each time: what a cut removed stays removed.
    let short = &[
        "bytes but the medium has",
        "metadata before the first segment",
    ][..];
    for (bytes, says) in [
        (256u64 << 20, short),
        (100 << 10, short),
        (8192, short),
        (4096, &["No pcache superblock"][..]),
    ] {
        std::fs::File::options()
            .write(true)
            .open(&cache)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let c = cache.to_str().unwrap();
        for args in [
            vec!["check", "--cache", c],
            vec!["inspect", "--cache", c],
            vec![
                "serve",
                "--cache",
                c,
                "--backing",
                backing.to_str().unwrap(),
            ],
        ] {
            let o = pcache(&args);
            let t = text(&o);
            assert!(!o.status.success(), "{args:?} on {bytes} bytes: {t}");
            assert!(
                says.iter().any(|s| t.contains(s)),
                "{args:?} on {bytes} bytes: {t}"
            );
            assert!(!t.contains("panic"), "{args:?} on {bytes} bytes: {t}");
            assert_eq!(std::fs::metadata(&cache).unwrap().len(), bytes);
        }
    }
}
