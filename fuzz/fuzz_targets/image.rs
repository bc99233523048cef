//! Opening a damaged or hostile cache image: whatever its metadata says,
//! opening it (read-only, as `inspect` and `check` do) and reading through
//! the index it built must not panic, loop or allocate without bound, and
//! must never write.
//!
//! A cache is at least 512 MiB, so the input is not an image but a compact
//! description of damage to one: the first byte picks one of a few real
//! images made at start (clean ksets in the log; keys still in open kset
//! slots; zeroes, discards and data CRCs), and each following 12 bytes
//! name a record (superblock, a cache_info, key_tail, dirty_tail or
//! writeback-target replica, a kset slot's header or one of its keys, one
//! of the first ksets of the log, a segment's info or gen), an offset in
//! it, a value to write there, and whether to fix the record's CRC
//! afterwards (which sends the fuzzer past the CRC into the field checks).
//! The image is a sparse file on tmpfs; each input's changes are undone
//! before the next.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use pcache::engine::{DataHead, Engine, FormatOptions, OpenOptions};
use pcache::format::{
    data_off, pick_latest, record_crc, seg_off, MetaRecord, PosOnMedia, CACHE_INFO_OFF,
    DIRTY_TAIL_OFF, KEY_BYTES, KEY_TAIL_OFF, KSET_HEADER_BYTES, KSET_MAGIC, SB_BYTES, SB_OFF,
    SEG_GEN_OFF, SEG_INFO_OFF, SLOT_HEADER_BYTES, WB_TARGET_OFF,
};
use pcache::pmem::{Region, RegionOptions};

const CACHE_BYTES: u64 = 512 << 20;
const BACKING_BYTES: u64 = 256 << 20;

/// One base image, mapped once for the run (an input's damage is written
/// through the file and seen through the mapping), and where its records
/// are. Its file is unlinked once open: the run leaves nothing on tmpfs.
struct Base {
    file: std::fs::File,
    region: Arc<Region>,
    /// Byte offsets and lengths of the first ksets of the log.
    ksets: Vec<(u64, usize)>,
}

fn bases() -> &'static Mutex<Vec<Base>> {
    static B: OnceLock<Mutex<Vec<Base>>> = OnceLock::new();
    B.get_or_init(|| Mutex::new((0..3).map(make_base).collect()))
}

fn dir() -> PathBuf {
    let d = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    d.join(format!("pcache-fuzz-image-{}", std::process::id()))
}

/// Base `kind`: 0 flushed writes (ksets in the log), 1 writes left in open
/// kset slots, 2 zeroes, discards and data CRCs.
fn make_base(kind: u8) -> Base {
    let d = dir();
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join(format!("base{kind}.img"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(CACHE_BYTES)
        .unwrap();
    {
        let region = Region::open(&path, RegionOptions::default()).unwrap();
        Engine::format(
            &region,
            &FormatOptions {
                backing_bytes: BACKING_BYTES,
                data_crc: kind == 2,
                force: true,
                ..Default::default()
            },
        )
        .unwrap();
    }
    let region = Arc::new(Region::open(&path, RegionOptions::default()).unwrap());
    let e = Engine::open(region, &OpenOptions::default()).unwrap();
    let mut head = DataHead::default();
    for i in 0..300u64 {
        let off = (i * 7919 % 4096) << 12;
        e.write(&mut head, off, &vec![i as u8; 4096 * (1 + i as usize % 3)])
            .unwrap();
        if kind == 2 && i % 5 == 0 {
            e.write_zeroes(off + (8 << 12), 8192, i % 10 == 0).unwrap();
        }
        if kind != 1 && i % 37 == 0 {
            e.flush().unwrap();
        }
    }
    if kind != 1 {
        e.flush().unwrap();
    }
    // No shutdown: what a dead process leaves (slots still open for base 1).
    drop(e);
    let ksets = find_ksets(&path);
    let region = Arc::new(
        Region::open(
            &path,
            RegionOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&d);
    Base {
        file,
        region,
        ksets,
    }
}

/// The first ksets of the log, walked from key_tail.
fn find_ksets(path: &PathBuf) -> Vec<(u64, usize)> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let at = |o: u64, n: usize| {
        let mut v = vec![0u8; n];
        f.read_exact_at(&mut v, o).ok().map(|()| v)
    };
    let mut out = Vec::new();
    let (Some(a), Some(b)) = (
        at(KEY_TAIL_OFF[0], PosOnMedia::BYTES),
        at(KEY_TAIL_OFF[1], PosOnMedia::BYTES),
    ) else {
        return out;
    };
    let Ok(tail) = pick_latest::<PosOnMedia>([&a, &b], KEY_TAIL_OFF) else {
        return out;
    };
    let tail = tail.rec;
    let mut pos = data_off(tail.seg, tail.off);
    while out.len() < 32 {
        let Some(h) = at(pos, KSET_HEADER_BYTES) else {
            break;
        };
        let magic = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let n = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        if magic != KSET_MAGIC || n > 128 {
            break;
        }
        let len = KSET_HEADER_BYTES + n * KEY_BYTES;
        out.push((pos, len));
        pos += len as u64;
    }
    out
}

/// A record an input may damage: (offset, length).
fn record(base: &Base, what: u8, index: u8) -> Option<(u64, usize)> {
    let r = index as usize % 2;
    Some(match what % 10 {
        0 => (SB_OFF, SB_BYTES),
        1 => (CACHE_INFO_OFF[r], 64),
        2 => (KEY_TAIL_OFF[r], PosOnMedia::BYTES),
        3 => (DIRTY_TAIL_OFF[r], PosOnMedia::BYTES),
        4 => (WB_TARGET_OFF[r], 32),
        5 => (
            pcache::format::slot_off(index as usize % 16),
            SLOT_HEADER_BYTES,
        ),
        6 => (
            pcache::format::staged_key_off(index as usize % 16, (index / 16) as usize % 4),
            KEY_BYTES,
        ),
        7 => *base.ksets.get(index as usize % base.ksets.len().max(1))?,
        8 => (seg_off(index as u32 % 32) + SEG_INFO_OFF[r], 64),
        _ => (seg_off(index as u32 % 32) + SEG_GEN_OFF[r], 32),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let bases = bases().lock().unwrap();
    let base = &bases[pick as usize % bases.len()];
    let file = &base.file;
    use std::os::unix::fs::FileExt;
    // (offset, bytes before), to undo.
    let mut undo: Vec<(u64, Vec<u8>)> = Vec::new();
    for p in rest.chunks_exact(12).take(16) {
        let (what, index) = (p[0], p[1]);
        let at = u16::from_le_bytes([p[2], p[3]]) as usize;
        let value = &p[4..12];
        let Some((off, len)) = record(base, what, index) else {
            continue;
        };
        let mut rec = vec![0u8; len];
        file.read_exact_at(&mut rec, off).unwrap();
        undo.push((off, rec.clone()));
        let o = at % len;
        let n = value.len().min(len - o);
        rec[o..o + n].copy_from_slice(&value[..n]);
        if what & 0x80 != 0 && len >= 4 {
            let crc = record_crc(&rec);
            rec[..4].copy_from_slice(&crc.to_le_bytes());
        }
        file.write_all_at(&rec, off).unwrap();
    }
    let before = file.metadata().unwrap().modified().ok();
    {
        if let Ok(e) = Engine::open(base.region.clone(), &OpenOptions { read_only: true }) {
            // Read through whatever index the keys built.
            let mut buf = vec![0u8; 64 << 10];
            let mut misses = Vec::new();
            for i in 0..16u64 {
                let _ = e.read((i * 7919 % 4096) << 12, &mut buf, &mut misses);
                misses.clear();
            }
            let _ = pcache::report::Report::of(&e);
        }
    }
    // Opening read-only never writes.
    assert_eq!(
        file.metadata().unwrap().modified().ok(),
        before,
        "a read-only open wrote the image"
    );
    for (off, bytes) in undo.into_iter().rev() {
        file.write_all_at(&bytes, off).unwrap();
    }
});
