//! Tests of `format/meta.rs`.

use super::*;
use crate::format::{CACHE_INFO_OFF, DIRTY_TAIL_OFF, GC_PERCENT_MAX, KEY_TAIL_OFF, MAX_SEGS};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn cache_info() -> CacheInfo {
    CacheInfo {
        n_segs: 31,
        flags: CACHE_FLAG_DATA_CRC | CACHE_FLAG_INIT_DONE,
        gc_percent: 70,
        mode: 2,
        disk_sectors: 0x0000_8765_4321_0fed,
    }
}

fn pos() -> PosOnMedia {
    PosOnMedia {
        seg: 7,
        off: 0x1234_5678,
        lsn: 0x0102_0304_0506_0708,
    }
}

fn seg_info() -> SegInfo {
    SegInfo::new(SEG_INFO_TYPE_DATA, Some(5))
}

fn seg_gen() -> SegGen {
    SegGen {
        gen: 0xdead_beef_0000_0001,
    }
}

/// Encode at `seq` and decode again.
fn round_trip<R: MetaRecord + PartialEq + std::fmt::Debug>(rec: R, seq: u64) {
    let buf = rec.encode(seq);
    assert_eq!(buf.len(), R::BYTES);
    assert_eq!(R::decode(&buf, 0).unwrap(), (rec, seq));
}

/// Decode must fail after flipping any single bit of an encoded replica.
fn every_bit_flip_fails<R: MetaRecord + std::fmt::Debug>(rec: R) {
    let good = rec.encode(42);
    for bit in 0..good.len() * 8 {
        let mut buf = good.clone();
        buf[bit / 8] ^= 1 << (bit % 8);
        assert!(
            R::decode(&buf, 0).is_err(),
            "{}: bit {bit} flip accepted",
            R::NAME
        );
    }
}

fn detail(e: &Error) -> &str {
    match e {
        Error::Corrupt { detail, .. } => detail,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn every_record_round_trips() {
    round_trip(cache_info(), 1);
    round_trip(
        CacheInfo {
            n_segs: MAX_SEGS,
            flags: 0,
            gc_percent: 0,
            ..Default::default()
        },
        u64::MAX,
    );
    round_trip(pos(), 0);
    round_trip(PosOnMedia::default(), 7);
    round_trip(seg_info(), 3);
    round_trip(SegInfo::new(SEG_INFO_TYPE_DATA, None), 3);
    round_trip(seg_gen(), 9);
    round_trip(SegGen { gen: 0 }, 0);
}

#[test]
fn records_have_the_documented_byte_layout() {
    let b = cache_info().encode(0x1122_3344_5566_7788);
    assert_eq!(b[0..4], crc32c::crc32c(&b[4..]).to_le_bytes());
    assert_eq!(b[4..8], 1u32.to_le_bytes());
    assert_eq!(b[8..16], 0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(b[16..20], 31u32.to_le_bytes());
    assert_eq!(b[20..24], 3u32.to_le_bytes());
    assert_eq!(b[24], 70);
    assert_eq!(b[25], 2);
    assert_eq!(b[26..32], [0xed, 0x0f, 0x21, 0x43, 0x65, 0x87]);

    let b = pos().encode(1);
    assert_eq!(b[4..8], 2u32.to_le_bytes());
    assert_eq!(b[16..20], 7u32.to_le_bytes());
    assert_eq!(b[20..24], 0x1234_5678u32.to_le_bytes());
    assert_eq!(b[24..32], 0x0102_0304_0506_0708u64.to_le_bytes());

    let b = seg_info().encode(1);
    assert_eq!(b[4..8], 3u32.to_le_bytes());
    // HAS_NEXT (bit 0) and type 1 in bits 1..=4.
    assert_eq!(b[16..20], 0b11u32.to_le_bytes());
    assert_eq!(b[20..24], 5u32.to_le_bytes());
    assert_eq!(b[24..32], [0; 8]);

    let b = seg_gen().encode(1);
    assert_eq!(b[4..8], 4u32.to_le_bytes());
    assert_eq!(b[16..24], 0xdead_beef_0000_0001u64.to_le_bytes());
    assert_eq!(b[24..32], [0; 8]);
}

#[test]
fn flipping_any_bit_of_any_replica_is_detected() {
    every_bit_flip_fails(cache_info());
    every_bit_flip_fails(pos());
    every_bit_flip_fails(seg_info());
    every_bit_flip_fails(seg_gen());
}

#[test]
fn zeroed_replica_is_reported_as_never_written() {
    let e = SegGen::decode(&[0u8; 32], 0x2000).unwrap_err();
    assert!(detail(&e).contains("never written"), "{e}");
    assert!(matches!(
        e,
        Error::Corrupt {
            what: "segment_gen",
            offset: 0x2000,
            ..
        }
    ));
}

#[test]
fn short_buffer_is_corrupt_not_a_panic() {
    let buf = pos().encode(1);
    for n in 0..buf.len() {
        let e = PosOnMedia::decode(&buf[..n], 0).unwrap_err();
        assert!(detail(&e).contains("too short"), "{e}");
    }
    // Longer buffers are fine: only the first BYTES bytes count.
    let mut long = buf.clone();
    long.extend_from_slice(&[0xff; 100]);
    assert_eq!(PosOnMedia::decode(&long, 0).unwrap(), (pos(), 1));
}

#[test]
fn decode_body_rejects_a_short_body() {
    assert!(CacheInfo::decode_body(&[0; 15], 0).is_err());
    assert!(PosOnMedia::decode_body(&[], 0).is_err());
    assert!(SegInfo::decode_body(&[0; 8], 0).is_err());
    assert!(SegGen::decode_body(&[0; 7], 0).is_err());
}

#[test]
fn record_copied_to_another_kind_of_slot_is_rejected() {
    // Same size, valid CRC, wrong kind: a segment gen read as a position.
    let buf = seg_gen().encode(3);
    let e = PosOnMedia::decode(&buf, 0).unwrap_err();
    assert!(detail(&e).contains("kind 4"), "{e}");
    assert!(SegInfo::decode(&pos().encode(3), 0).is_err());
    assert!(CacheInfo::decode(&seg_info().encode(3), 0).is_err());
    assert!(SegGen::decode(&cache_info().encode(3), 0).is_err());
}

/// A replica of `rec` with a valid CRC but a doctored body.
fn with_body<R: MetaRecord>(rec: R, patch: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut buf = rec.encode(1);
    patch(&mut buf);
    let crc = crate::format::record_crc(&buf);
    buf[0..4].copy_from_slice(&crc.to_le_bytes());
    buf
}

#[test]
fn cache_info_rejects_out_of_range_fields() {
    let gc = with_body(cache_info(), |b| b[24] = GC_PERCENT_MAX + 1);
    assert!(detail(&CacheInfo::decode(&gc, 0).unwrap_err()).contains("gc_percent 91"));
    let max = with_body(cache_info(), |b| b[24] = GC_PERCENT_MAX);
    assert_eq!(CacheInfo::decode(&max, 0).unwrap().0.gc_percent, 90);

    let flags = with_body(cache_info(), |b| b[20] = 0b100111);
    assert!(detail(&CacheInfo::decode(&flags, 0).unwrap_err()).contains("unknown flags 0x20"));
    let both = with_body(cache_info(), |b| b[20] = 0b11000);
    assert!(detail(&CacheInfo::decode(&both, 0).unwrap_err()).contains("two writeback orders"));

    let zero = with_body(cache_info(), |b| b[16..20].fill(0));
    assert!(detail(&CacheInfo::decode(&zero, 0).unwrap_err()).contains("n_segs 0"));

    let big = with_body(cache_info(), |b| {
        b[16..20].copy_from_slice(&(MAX_SEGS + 1).to_le_bytes())
    });
    assert!(CacheInfo::decode(&big, 0).is_err());
}

#[test]
fn seg_info_rejects_unknown_flags_and_exposes_type_and_link() {
    let info = seg_info();
    assert_eq!(info.seg_type(), SEG_INFO_TYPE_DATA);
    assert_eq!(info.next(), Some(5));
    assert_eq!(SegInfo::new(SEG_INFO_TYPE_DATA, None).next(), None);
    // All four type bits are accepted; bit 5 is not.
    let t15 = with_body(info, |b| b[16] = 0b1_1111);
    assert_eq!(SegInfo::decode(&t15, 0).unwrap().0.seg_type(), 15);
    let bad = with_body(info, |b| b[16] = 0b10_0011);
    assert!(detail(&SegInfo::decode(&bad, 0).unwrap_err()).contains("unknown flags 0x20"));
}

#[test]
fn an_unknown_cache_mode_is_corrupt_and_the_disk_size_is_checked() {
    let buf = with_body(cache_info(), |b| b[25] = 4);
    assert!(detail(&CacheInfo::decode(&buf, 0).unwrap_err()).contains("unknown cache mode 4"));
    let sb = crate::format::Superblock {
        flags: 0,
        version: 2,
        seg_num: 31,
        uuid: [0; 16],
        cache_bytes: 1 << 30,
        backing_bytes: 1 << 30,
    };
    let info = |disk_sectors| CacheInfo {
        disk_sectors,
        ..cache_info()
    };
    assert_eq!(info(0).disk_bytes(sb.backing_bytes).unwrap(), 1 << 30);
    assert_eq!(info(4 << 21).disk_bytes(sb.backing_bytes).unwrap(), 4 << 30);
    assert!(info((1 << 21) - 1).disk_bytes(sb.backing_bytes).is_err());
    assert!(info(crate::format::MAX_DISK_BYTES / 512 + 1)
        .disk_bytes(sb.backing_bytes)
        .is_err());
    // A superblock's backing size past the largest disk, with no disk size
    // of its own in cache_info: refused, not sized into the index (the
    // image fuzz target's crash).
    assert!(info(0)
        .disk_bytes(crate::format::MAX_DISK_BYTES + 512)
        .is_err());
    assert!(info(u64::MAX).disk_bytes(sb.backing_bytes).is_err());
}

/// Two replicas of `pos()` with sequence numbers `s0` and `s1`.
fn slots(s0: u64, s1: u64) -> (Vec<u8>, Vec<u8>) {
    let mut p1 = pos();
    p1.off += 512;
    (pos().encode(s0), p1.encode(s1))
}

#[test]
fn pick_latest_prefers_the_newest_valid_replica() {
    let (a, b) = slots(5, 6);
    let l = pick_latest::<PosOnMedia>([&a, &b], KEY_TAIL_OFF).unwrap();
    assert_eq!((l.slot, l.seq, l.rec.off), (1, 6, pos().off + 512));
    assert_eq!(l.other_error, None);
    let (a, b) = slots(9, 6);
    let l = pick_latest::<PosOnMedia>([&a, &b], KEY_TAIL_OFF).unwrap();
    assert_eq!((l.slot, l.seq, l.rec), (0, 9, pos()));
}

#[test]
fn pick_latest_keeps_slot_0_on_a_tie() {
    let (a, b) = slots(4, 4);
    let l = pick_latest::<PosOnMedia>([&a, &b], KEY_TAIL_OFF).unwrap();
    assert_eq!((l.slot, l.rec), (0, pos()));
}

#[test]
fn pick_latest_uses_older_replica_when_newer_is_torn() {
    let (a, mut b) = slots(5, 6);
    b[20] ^= 0x10; // torn update of slot 1
    let l = pick_latest::<PosOnMedia>([&a, &b], DIRTY_TAIL_OFF).unwrap();
    assert_eq!((l.slot, l.seq, l.rec), (0, 5, pos()));
    match l.other_error {
        Some(Error::Corrupt {
            offset, ref detail, ..
        }) => {
            assert_eq!(offset, DIRTY_TAIL_OFF[1]);
            assert!(detail.contains("crc"), "{detail}");
        }
        ref other => panic!("expected slot 1's error, got {other:?}"),
    }
    // And the other way round.
    let (mut a, b) = slots(7, 6);
    a[3] ^= 1;
    let l = pick_latest::<PosOnMedia>([&a, &b], DIRTY_TAIL_OFF).unwrap();
    assert_eq!((l.slot, l.seq), (1, 6));
    assert!(l.other_error.is_some());
}

#[test]
fn pick_latest_treats_a_zeroed_slot_as_invalid() {
    let a = cache_info().encode(1);
    let zero = [0u8; 32];
    let l = pick_latest::<CacheInfo>([&zero, &a], CACHE_INFO_OFF).unwrap();
    assert_eq!((l.slot, l.rec), (1, cache_info()));
    assert!(detail(l.other_error.as_ref().unwrap()).contains("never written"));
}

#[test]
fn pick_latest_fails_naming_both_slots_when_both_are_bad() {
    let zero = [0u8; 32];
    let mut torn = cache_info().encode(2);
    torn[30] ^= 0x80;
    let e = pick_latest::<CacheInfo>([&zero, &torn], CACHE_INFO_OFF).unwrap_err();
    let Error::Corrupt {
        what,
        offset,
        detail,
    } = e
    else {
        panic!("expected Corrupt");
    };
    assert_eq!((what, offset), ("cache_info", CACHE_INFO_OFF[0]));
    assert!(
        detail.contains("slot 0") && detail.contains("never written"),
        "{detail}"
    );
    assert!(
        detail.contains("slot 1") && detail.contains("crc"),
        "{detail}"
    );
    assert!(detail.contains("0x3000"), "{detail}");
}

#[test]
fn write_slot_is_the_slot_not_holding_the_newest_copy() {
    for (s0, s1, want) in [(1, 2, 0), (2, 1, 1), (3, 3, 1)] {
        let (a, b) = slots(s0, s1);
        let l = pick_latest::<PosOnMedia>([&a, &b], KEY_TAIL_OFF).unwrap();
        assert_eq!(l.write_slot(), want, "seqs {s0} {s1}");
    }
    // Torn newest: the next write replaces the torn slot, keeping the
    // surviving copy intact.
    let (a, mut b) = slots(1, 2);
    b[17] ^= 4;
    let l = pick_latest::<PosOnMedia>([&a, &b], KEY_TAIL_OFF).unwrap();
    assert_eq!(l.write_slot(), 1);
}

#[test]
fn alternating_updates_survive_a_torn_write_at_every_step() {
    // Simulate the writer: each update goes to write_slot with seq + 1;
    // tearing that write must leave the previous value readable.
    let mut s = [pos().encode(1), vec![0u8; 32]];
    for step in 2..10u64 {
        let cur = pick_latest::<PosOnMedia>([&s[0], &s[1]], KEY_TAIL_OFF).unwrap();
        let mut next = cur.rec;
        next.lsn += 1;
        let mut torn = s.clone();
        torn[cur.write_slot()] = next.encode(step);
        torn[cur.write_slot()][25] ^= 1;
        let after = pick_latest::<PosOnMedia>([&torn[0], &torn[1]], KEY_TAIL_OFF).unwrap();
        assert_eq!(after.rec, cur.rec);
        s[cur.write_slot()] = next.encode(step);
        let after = pick_latest::<PosOnMedia>([&s[0], &s[1]], KEY_TAIL_OFF).unwrap();
        assert_eq!((after.rec, after.seq), (next, step));
    }
}

/// Random bytes, sometimes given the right kind and a valid CRC so the
/// body checks are reached too.
fn random_replica(rng: &mut StdRng, kind: u32) -> Vec<u8> {
    let len = if rng.gen_bool(0.8) {
        32
    } else {
        rng.gen_range(0..80)
    };
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf[..]);
    if len >= 32 && rng.gen_bool(0.5) {
        if rng.gen_bool(0.9) {
            buf[4..8].copy_from_slice(&kind.to_le_bytes());
        }
        if rng.gen_bool(0.5) {
            buf[16..32].iter_mut().for_each(|b| *b &= rng.gen::<u8>());
        }
        let crc = crate::format::record_crc(&buf[..32]);
        buf[0..4].copy_from_slice(&crc.to_le_bytes());
    }
    buf
}

#[test]
fn random_bytes_never_panic_any_replica_decoder() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    let mut accepted = 0;
    for _ in 0..10_000 {
        let (ka, kb) = (rng.gen_range(1..=4), rng.gen_range(1..=4));
        let a = random_replica(&mut rng, ka);
        let b = random_replica(&mut rng, kb);
        accepted += usize::from(CacheInfo::decode(&a, 0).is_ok());
        accepted += usize::from(PosOnMedia::decode(&a, 0).is_ok());
        accepted += usize::from(SegInfo::decode(&a, 0).is_ok());
        accepted += usize::from(SegGen::decode(&a, 0).is_ok());
        let _ = CacheInfo::decode_body(&a, 0);
        let _ = SegInfo::decode_body(&a, 0);
        let _ = pick_latest::<CacheInfo>([&a, &b], CACHE_INFO_OFF);
        let _ = pick_latest::<PosOnMedia>([&a, &b], KEY_TAIL_OFF);
        let _ = pick_latest::<SegInfo>([&a, &b], [0, 4096]);
        let _ = pick_latest::<SegGen>([&a, &b], [8192, 8224]);
    }
    // The CRC fix-up must let some through, or the body checks went untested.
    assert!(accepted > 0);
}

/// Bytes from a hex dump ("0000: f5 ca ..." lines), as in docs/format.md.
fn unhex(dump: &str) -> Vec<u8> {
    dump.lines()
        .filter_map(|l| l.split_once(':'))
        .flat_map(|(_, bytes)| bytes.split_whitespace())
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

#[test]
fn replicas_match_the_golden_bytes_in_format_md() {
    let tail = unhex(
        "0000: 59 18 7d 45 02 00 00 00 01 00 00 00 00 00 00 00
         0010: 00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00",
    );
    let pos = PosOnMedia {
        seg: 0,
        off: 0,
        lsn: 1,
    };
    assert_eq!(pos.encode(1), tail);
    let info = unhex(
        "0000: 0c 73 f4 11 01 00 00 00 01 00 00 00 00 00 00 00
         0010: 3f 00 00 00 01 00 00 00 46 00 00 00 00 00 00 00",
    );
    let ci = CacheInfo {
        n_segs: 63,
        flags: CACHE_FLAG_DATA_CRC,
        gc_percent: 70,
        ..Default::default()
    };
    assert_eq!(ci.encode(1), info);
}
