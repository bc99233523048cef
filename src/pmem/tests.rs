//! Tests of the mapped region.

use super::*;

fn file(len: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m");
    let f = File::create(&p).unwrap();
    f.set_len(len).unwrap();
    (dir, p)
}

#[test]
fn plain_file_maps_with_msync_and_round_trips() {
    let (_d, p) = file(4 << 20);
    let r = Region::open(&p, RegionOptions::default()).unwrap();
    assert_eq!(r.mode(), PersistMode::Msync);
    assert_eq!(r.durability(), Durability::File);
    r.write(4096 + 3, b"hello");
    r.persist().unwrap();
    let mut b = [0u8; 5];
    r.read(4096 + 3, &mut b);
    assert_eq!(&b, b"hello");
    drop(r);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[4099..4104], b"hello");
}

#[test]
fn persist_clears_dirty_chunks() {
    let (_d, p) = file(8 << 20);
    let r = Region::open(&p, RegionOptions::default()).unwrap();
    r.write((1 << 20) - 2, &[1, 2, 3, 4]);
    r.zero(5 << 20, 10);
    let dirty: u64 = r.dirty.iter().map(|w| w.load(Ordering::Relaxed)).sum();
    assert_eq!(dirty, 0b100011);
    r.persist().unwrap();
    assert!(r.dirty.iter().all(|w| w.load(Ordering::Relaxed) == 0));
}

#[test]
fn cache_line_flush_path_runs_on_a_plain_mapping() {
    let (_d, p) = file(1 << 20);
    let opts = RegionOptions {
        force_cache_line_flush: true,
        ..Default::default()
    };
    let r = Region::open(&p, opts).unwrap();
    assert!(matches!(r.mode(), PersistMode::CacheLine(_)));
    let data: Vec<u8> = (0..10_000).map(|i| i as u8).collect();
    r.write(77, &data);
    r.persist().unwrap();
    let mut back = vec![0u8; data.len()];
    r.read(77, &mut back);
    assert_eq!(back, data);
    assert_eq!(r.crc32c(77, data.len()), crc32c::crc32c(&data));
}

#[test]
fn non_temporal_copies_match_at_every_alignment_and_length() {
    let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut dst = vec![0u8; 9100];
    for dst_off in 0..17 {
        for src_off in [0usize, 1, 5, 16] {
            for len in [0usize, 1, 15, 16, 17, 63, 512, 513, 4096, 4097, 8191] {
                dst.fill(0xee);
                // SAFETY: both ranges lie inside their vectors, which
                // are distinct allocations.
                unsafe {
                    copy_nt(
                        dst.as_mut_ptr().add(dst_off),
                        src.as_ptr().add(src_off),
                        len,
                    )
                };
                let at = (dst_off, src_off, len);
                assert_eq!(
                    &dst[dst_off..dst_off + len],
                    &src[src_off..src_off + len],
                    "{at:?}"
                );
                assert!(dst[..dst_off].iter().all(|&b| b == 0xee), "{at:?}");
                assert!(dst[dst_off + len..].iter().all(|&b| b == 0xee), "{at:?}");
            }
        }
    }
}

#[test]
fn every_flush_instruction_this_cpu_has_works() {
    let (_d, p) = file(1 << 20);
    let r = Region::open(&p, RegionOptions::default()).unwrap();
    let mut insns = vec![FlushInsn::Clflush];
    let (clwb, clflushopt) = cpu_flush_features();
    if clflushopt {
        insns.push(FlushInsn::Clflushopt);
    }
    if clwb {
        insns.push(FlushInsn::Clwb);
    }
    for insn in insns {
        // SAFETY: the pointer is inside the live mapping.
        unsafe { flush_line(insn, r.ptr.add(128)) };
    }
}

#[test]
#[should_panic(expected = "outside the")]
fn out_of_range_access_is_refused() {
    let (_d, p) = file(1 << 20);
    let r = Region::open(&p, RegionOptions::default()).unwrap();
    r.write((1 << 20) - 1, &[0, 0]);
}

#[test]
fn directory_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Region::open(dir.path(), RegionOptions::default())
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("Cannot open") || msg.contains("not a regular file"),
        "{msg}"
    );
}
