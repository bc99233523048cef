//! Tests of `format/kset.rs`.

use super::*;
use crate::format::MAX_SEGS;
use rand::{rngs::StdRng, Rng, SeedableRng};

const FID: u64 = 0x0123_4567_89ab_cdef;
const NSEGS: u32 = 63;
const BACKING: u64 = 10 << 30;

fn key(i: u32) -> KeyOnMedia {
    KeyOnMedia {
        off: u64::from(i) * 8192,
        len: 4096,
        flags: if i.is_multiple_of(2) {
            KEY_FLAG_CLEAN
        } else {
            0
        },
        seg: i % NSEGS,
        seg_off: i * 4096,
        gen: u64::from(i) + 1,
        data_crc: 0xabcd_0000 | i,
    }
}

fn keys_bytes(n: u32) -> Vec<u8> {
    let mut out = vec![0u8; n as usize * KEY_BYTES];
    for (i, chunk) in out.chunks_exact_mut(KEY_BYTES).enumerate() {
        key(i as u32).encode(chunk);
    }
    out
}

/// A kset with `n` keys at LSN `lsn`, followed by `slack` zero bytes.
fn kset(n: u32, lsn: u64, slack: usize) -> Vec<u8> {
    let keys = keys_bytes(n);
    let mut buf = vec![0u8; KSET_HEADER_BYTES + keys.len() + slack];
    let len = encode_kset(&mut buf, FID, lsn, 77, &keys);
    assert_eq!(len, KSET_HEADER_BYTES + keys.len());
    buf
}

/// Re-seal `buf[..len]` after a doctored header: a CRC-valid kset.
fn reseal(buf: &mut [u8], len: usize) {
    let crc = crate::format::record_crc(&buf[..len]);
    buf[0..4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn key_round_trips_with_the_documented_layout() {
    let k = KeyOnMedia {
        off: 0x1122_3344_5566_7788,
        len: 0x99aa_bbcc,
        flags: KEY_FLAG_CLEAN,
        seg: 0x0102_0304,
        seg_off: 0x0506_0708,
        gen: 0xa1a2_a3a4_a5a6_a7a8,
        data_crc: 0xdead_beef,
    };
    let mut b = [0xffu8; KEY_BYTES];
    k.encode(&mut b);
    assert_eq!(b[0..8], k.off.to_le_bytes());
    assert_eq!(b[8..12], k.len.to_le_bytes());
    assert_eq!(b[12..16], 2u32.to_le_bytes());
    assert_eq!(b[16..20], k.seg.to_le_bytes());
    assert_eq!(b[20..24], k.seg_off.to_le_bytes());
    assert_eq!(b[24..32], k.gen.to_le_bytes());
    assert_eq!(b[32..36], k.data_crc.to_le_bytes());
    assert_eq!(b[36..40], [0; 4], "reserved bytes are written as 0");
    assert_eq!(KeyOnMedia::decode(&b), k);
}

#[test]
fn key_decode_of_a_short_buffer_reads_zero_padding() {
    let mut b = [0u8; KEY_BYTES];
    key(3).encode(&mut b);
    let k = KeyOnMedia::decode(&b[..10]);
    assert_eq!((k.off, k.gen), (key(3).off, 0));
    assert_eq!(KeyOnMedia::decode(&[]), KeyOnMedia::default());
}

#[test]
fn kset_header_has_the_documented_layout() {
    let buf = kset(2, 0x1111_2222_3333_4444, 0);
    assert_eq!(buf[0..4], crc32c::crc32c(&buf[4..]).to_le_bytes());
    assert_eq!(buf[4..8], 2u32.to_le_bytes());
    assert_eq!(buf[8..16], KSET_MAGIC.to_le_bytes());
    assert_eq!(buf[16..24], FID.to_le_bytes());
    assert_eq!(buf[24..32], 0x1111_2222_3333_4444u64.to_le_bytes());
    assert_eq!(buf[32..40], 77u64.to_le_bytes());
    assert_eq!(buf[40..48], [0; 8], "flags and next_seg of a normal kset");
    assert_eq!(buf[48..], keys_bytes(2)[..]);

    let mut last = [0xffu8; KSET_HEADER_BYTES];
    encode_last(&mut last, FID, 9, 3, 12);
    assert_eq!(last[0..4], crc32c::crc32c(&last[4..]).to_le_bytes());
    assert_eq!(last[4..8], [0; 4]);
    assert_eq!(last[40..44], KSET_FLAG_LAST.to_le_bytes());
    assert_eq!(last[44..48], 12u32.to_le_bytes());
}

#[test]
fn kset_round_trips_with_0_1_and_128_keys() {
    for n in [0u32, 1, 128] {
        let buf = kset(n, 1000 + u64::from(n), 100);
        let v = KsetView::parse(&buf, FID, 1000 + u64::from(n), NSEGS).unwrap();
        let want = KsetHeader {
            key_num: n,
            format_id: FID,
            lsn: 1000 + u64::from(n),
            epoch: 77,
            flags: 0,
            next_seg: 0,
        };
        assert_eq!(v.header, want);
        assert_eq!(v.header.bytes(), KSET_HEADER_BYTES + n as usize * KEY_BYTES);
        assert_eq!(v.keys.len(), n as usize * KEY_BYTES);
        let got: Vec<_> = v.iter().collect();
        let expect: Vec<_> = (0..n).map(key).collect();
        assert_eq!(got, expect);
        if n > 0 {
            assert_eq!(v.key(n as usize - 1), key(n - 1));
        }
    }
}

#[test]
fn largest_kset_fits_exactly_at_the_end_of_the_buffer() {
    let buf = kset(128, 5, 0);
    assert_eq!(buf.len(), crate::format::KSET_MAX_BYTES);
    assert!(KsetView::parse(&buf, FID, 5, NSEGS).is_ok());
}

#[test]
fn last_kset_round_trips() {
    let mut buf = [0u8; 64];
    encode_last(&mut buf, FID, 42, 8, NSEGS - 1);
    let v = KsetView::parse(&buf, FID, 42, NSEGS).unwrap();
    assert!(v.header.is_last());
    assert_eq!(
        v.header,
        KsetHeader {
            key_num: 0,
            format_id: FID,
            lsn: 42,
            epoch: 8,
            flags: KSET_FLAG_LAST,
            next_seg: NSEGS - 1,
        }
    );
    assert!(v.keys.is_empty());
}

#[test]
fn flipping_any_bit_of_a_kset_is_detected() {
    let good = kset(3, 17, 0);
    for bit in 0..good.len() * 8 {
        let mut buf = good.clone();
        buf[bit / 8] ^= 1 << (bit % 8);
        assert!(
            KsetView::parse(&buf, FID, 17, NSEGS).is_err(),
            "bit {bit} flip accepted"
        );
    }
    let mut last = [0u8; KSET_HEADER_BYTES];
    encode_last(&mut last, FID, 18, 0, 1);
    for bit in 0..KSET_HEADER_BYTES * 8 {
        let mut buf = last;
        buf[bit / 8] ^= 1 << (bit % 8);
        assert!(
            KsetView::parse(&buf, FID, 18, NSEGS).is_err(),
            "LAST bit {bit}"
        );
    }
}

#[test]
fn zeroed_terminator_is_no_magic() {
    assert_eq!(
        KsetView::parse(&[0u8; 4096], FID, 1, NSEGS).unwrap_err(),
        KsetEnd::NoMagic
    );
    assert_eq!(
        KsetView::parse(&[], FID, 1, NSEGS).unwrap_err(),
        KsetEnd::NoMagic
    );
}

#[test]
fn torn_kset_is_bad_crc() {
    let mut buf = kset(4, 1, 0);
    // Keys not persisted yet: the last key still holds old bytes.
    buf[KSET_HEADER_BYTES + 3 * KEY_BYTES..].fill(0);
    assert_eq!(
        KsetView::parse(&buf, FID, 1, NSEGS).unwrap_err(),
        KsetEnd::BadCrc
    );
    // Magic persisted before the word holding crc and key_num.
    let mut buf = kset(4, 1, 0);
    buf[0..8].fill(0);
    assert_eq!(
        KsetView::parse(&buf, FID, 1, NSEGS).unwrap_err(),
        KsetEnd::BadCrc
    );
}

#[test]
fn kset_of_another_format_is_wrong_format() {
    let buf = kset(2, 1, 0);
    assert_eq!(
        KsetView::parse(&buf, FID ^ 1, 1, NSEGS).unwrap_err(),
        KsetEnd::WrongFormat
    );
}

#[test]
fn kset_from_an_earlier_lap_is_wrong_lsn() {
    let buf = kset(2, 7, 0);
    assert_eq!(
        KsetView::parse(&buf, FID, 8, NSEGS).unwrap_err(),
        KsetEnd::WrongLsn { found: 7 }
    );
}

fn invalid(r: std::result::Result<KsetView<'_>, KsetEnd>) -> String {
    match r {
        Err(KsetEnd::Invalid(why)) => why,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn crc_valid_kset_with_129_keys_is_invalid() {
    let mut buf = kset(128, 1, KEY_BYTES + 10);
    buf[4..8].copy_from_slice(&129u32.to_le_bytes());
    reseal(&mut buf, KSET_HEADER_BYTES + 129 * KEY_BYTES);
    let why = invalid(KsetView::parse(&buf, FID, 1, NSEGS));
    assert!(why.contains("key_num 129"), "{why}");
}

#[test]
fn kset_longer_than_the_buffer_ends_the_log_like_a_torn_write() {
    let buf = kset(3, 1, 0);
    assert_eq!(
        KsetView::parse(&buf[..buf.len() - 1], FID, 1, NSEGS).unwrap_err(),
        KsetEnd::BadCrc
    );
    // A huge key_num is judged without overflow.
    let mut buf = kset(0, 1, 0);
    buf[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        KsetView::parse(&buf, FID, 1, NSEGS).unwrap_err(),
        KsetEnd::BadCrc
    );
    // Same in a buffer capped at the largest kset, as the engine reads.
    let mut buf = kset(128, 1, 0);
    buf[4..8].copy_from_slice(&129u32.to_le_bytes());
    assert_eq!(
        KsetView::parse(&buf, FID, 1, NSEGS).unwrap_err(),
        KsetEnd::BadCrc
    );
}

#[test]
fn header_cut_by_the_end_of_the_buffer_ends_the_log() {
    let buf = kset(0, 1, 0);
    for n in 16..KSET_HEADER_BYTES {
        assert_eq!(
            KsetView::parse(&buf[..n], FID, 1, NSEGS).unwrap_err(),
            KsetEnd::BadCrc
        );
    }
    for n in 0..16 {
        assert_eq!(
            KsetView::parse(&buf[..n], FID, 1, NSEGS).unwrap_err(),
            KsetEnd::NoMagic
        );
    }
}

#[test]
fn crc_valid_kset_with_impossible_header_fields_is_invalid() {
    // LAST with keys.
    let mut buf = kset(1, 1, 0);
    buf[40..44].copy_from_slice(&KSET_FLAG_LAST.to_le_bytes());
    let len = buf.len();
    reseal(&mut buf, len);
    assert!(invalid(KsetView::parse(&buf, FID, 1, NSEGS)).contains("LAST kset with 1 keys"));

    // LAST pointing past the last segment.
    let mut last = [0u8; KSET_HEADER_BYTES];
    encode_last(&mut last, FID, 1, 0, NSEGS);
    assert!(invalid(KsetView::parse(&last, FID, 1, NSEGS)).contains("next_seg 63"));
    encode_last(&mut last, FID, 1, 0, MAX_SEGS);
    assert!(KsetView::parse(&last, FID, 1, NSEGS).is_err());

    // Unknown flags.
    let mut buf = kset(1, 1, 0);
    buf[40..44].copy_from_slice(&2u32.to_le_bytes());
    let len = buf.len();
    reseal(&mut buf, len);
    assert!(invalid(KsetView::parse(&buf, FID, 1, NSEGS)).contains("unknown flags 0x2"));
}

#[test]
fn parse_checks_magic_then_length_then_crc_then_format_then_lsn() {
    // Wrong format and wrong LSN, but torn: the CRC is checked first.
    let mut buf = kset(1, 5, 0);
    buf[60] ^= 1;
    assert_eq!(
        KsetView::parse(&buf, FID ^ 1, 9, NSEGS).unwrap_err(),
        KsetEnd::BadCrc
    );
    // Valid CRC, wrong format and wrong LSN: format first.
    let buf = kset(1, 5, 0);
    assert_eq!(
        KsetView::parse(&buf, FID ^ 1, 9, NSEGS).unwrap_err(),
        KsetEnd::WrongFormat
    );
    // 129 keys from an earlier lap: the LSN is checked before key_num.
    let mut buf = kset(128, 5, KEY_BYTES);
    buf[4..8].copy_from_slice(&129u32.to_le_bytes());
    reseal(&mut buf, KSET_HEADER_BYTES + 129 * KEY_BYTES);
    assert_eq!(
        KsetView::parse(&buf, FID, 6, NSEGS).unwrap_err(),
        KsetEnd::WrongLsn { found: 5 }
    );
}

fn rejects(k: KeyOnMedia, field: &str) {
    match k.validate(NSEGS, BACKING, 0x5000) {
        Err(Error::Corrupt {
            what: "kset key",
            offset: 0x5000,
            detail,
        }) => assert!(detail.contains(field), "{k:?}: {detail}"),
        other => panic!("{k:?}: expected a Corrupt kset key naming {field}, got {other:?}"),
    }
}

#[test]
fn valid_keys_pass_including_every_boundary() {
    for i in 0..128 {
        key(i).validate(NSEGS, BACKING, 0).unwrap();
    }
    let edge = KeyOnMedia {
        off: BACKING - 4096,
        len: 4096,
        flags: KEY_FLAG_CLEAN,
        seg: NSEGS - 1,
        seg_off: (SEG_DATA_BYTES - 4096) as u32,
        gen: u64::MAX,
        data_crc: u32::MAX,
    };
    edge.validate(NSEGS, BACKING, 0).unwrap();
    // A whole 4 MiB region in one key.
    let region = KeyOnMedia {
        off: REGION_BYTES,
        len: REGION_BYTES as u32,
        seg_off: 0,
        ..edge
    };
    region.validate(NSEGS, BACKING, 0).unwrap();
}

#[test]
fn key_validate_rejects_unaligned_off_or_len() {
    rejects(KeyOnMedia { off: 511, ..key(1) }, "off 0x1ff");
    rejects(
        KeyOnMedia {
            len: 4097,
            ..key(1)
        },
        "len 4097",
    );
    rejects(KeyOnMedia { len: 256, ..key(1) }, "len 256");
}

#[test]
fn key_validate_rejects_zero_len() {
    rejects(KeyOnMedia { len: 0, ..key(1) }, "len 0");
}

#[test]
fn key_validate_rejects_a_key_crossing_a_4mib_region() {
    let k = KeyOnMedia {
        off: REGION_BYTES - 512,
        len: 1024,
        ..key(1)
    };
    rejects(k, "crosses a 4 MiB region");
    let whole_plus_one = KeyOnMedia {
        off: 0,
        len: REGION_BYTES as u32 + 512,
        seg_off: 0,
        ..key(1)
    };
    rejects(whole_plus_one, "crosses a 4 MiB region");
}

#[test]
fn key_validate_rejects_a_key_past_the_backing_end() {
    let k = KeyOnMedia {
        off: BACKING - 512,
        len: 1024,
        ..key(1)
    };
    rejects(k, "past the backing store");
    rejects(
        KeyOnMedia {
            off: BACKING,
            ..key(1)
        },
        "past the backing store",
    );
}

#[test]
fn key_validate_rejects_overflow_at_u64_max() {
    let k = KeyOnMedia {
        off: u64::MAX - 511,
        len: 1024,
        ..key(1)
    };
    rejects(k, "overflows");
    // Even a backing store of u64::MAX bytes does not let it wrap.
    match k.validate(NSEGS, u64::MAX, 0) {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("overflows")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn key_validate_rejects_seg_out_of_range() {
    rejects(
        KeyOnMedia {
            seg: NSEGS,
            ..key(1)
        },
        "seg 63",
    );
    rejects(
        KeyOnMedia {
            seg: u32::MAX,
            ..key(1)
        },
        "seg 4294967295",
    );
}

#[test]
fn key_validate_rejects_data_past_the_segment_data_area() {
    let k = KeyOnMedia {
        seg_off: (SEG_DATA_BYTES - 512) as u32,
        len: 1024,
        ..key(1)
    };
    rejects(k, "past the segment data area");
    let far = KeyOnMedia {
        seg_off: u32::MAX - 511,
        ..key(1)
    };
    rejects(far, "past the segment data area");
    rejects(
        KeyOnMedia {
            seg_off: 100,
            ..key(1)
        },
        "seg_off 0x64",
    );
}

#[test]
fn key_validate_rejects_unknown_flags() {
    rejects(KeyOnMedia { flags: 1, ..key(1) }, "unknown flags 0x1");
    rejects(
        KeyOnMedia {
            flags: KEY_FLAG_CLEAN | 1 << 31,
            ..key(1)
        },
        "unknown flags 0x80000000",
    );
}

#[test]
fn dataless_keys_validate_without_data_fields() {
    let zero = KeyOnMedia::dataless(REGION_BYTES, REGION_BYTES as u32, KEY_FLAG_ZERO);
    zero.validate(NSEGS, BACKING, 0).unwrap();
    assert!(zero.is_dataless());
    KeyOnMedia::dataless(4096, 512, KEY_FLAG_ZERO | KEY_FLAG_UNMAP)
        .validate(NSEGS, BACKING, 0)
        .unwrap();
    KeyOnMedia::dataless(4096, 512, KEY_FLAG_BAD)
        .validate(NSEGS, BACKING, 0)
        .unwrap();
    KeyOnMedia::dataless(4096, 512, KEY_FLAG_FORGET)
        .validate(NSEGS, BACKING, 0)
        .unwrap();
    // Dataless keys still obey the logical checks.
    rejects(
        KeyOnMedia::dataless(REGION_BYTES - 512, 1024, KEY_FLAG_ZERO),
        "crosses a 4 MiB region",
    );
}

#[test]
fn dataless_keys_with_data_fields_or_mixed_kinds_are_rejected() {
    rejects(
        KeyOnMedia {
            flags: KEY_FLAG_ZERO,
            ..key(1)
        },
        "dataless key with data fields",
    );
    rejects(
        KeyOnMedia {
            gen: 3,
            ..KeyOnMedia::dataless(0, 512, KEY_FLAG_BAD)
        },
        "dataless key with data fields",
    );
    for flags in [
        KEY_FLAG_ZERO | KEY_FLAG_BAD,
        KEY_FLAG_CLEAN | KEY_FLAG_ZERO,
        KEY_FLAG_UNMAP,
        KEY_FLAG_BAD | KEY_FLAG_UNMAP,
        KEY_FLAG_FORGET | KEY_FLAG_ZERO,
    ] {
        rejects(
            KeyOnMedia::dataless(0, 512, flags),
            "impossible flag combination",
        );
    }
}

/// Random bytes, sometimes with the kset magic, format id, LSN and a
/// valid CRC planted so every later check is reached too.
fn random_kset(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.gen_range(0..6000);
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf[..]);
    if len >= KSET_HEADER_BYTES && rng.gen_bool(0.7) {
        buf[8..16].copy_from_slice(&KSET_MAGIC.to_le_bytes());
        let key_num: u32 = match rng.gen_range(0..4) {
            0 => rng.gen(),
            1 => rng.gen_range(0..=130),
            _ => rng.gen_range(0..=((len - KSET_HEADER_BYTES) / KEY_BYTES) as u32),
        };
        buf[4..8].copy_from_slice(&key_num.to_le_bytes());
        if rng.gen_bool(0.8) {
            buf[16..24].copy_from_slice(&FID.to_le_bytes());
        }
        if rng.gen_bool(0.8) {
            buf[24..32].copy_from_slice(&1u64.to_le_bytes());
        }
        if rng.gen_bool(0.5) {
            let flags: u32 = rng.gen_range(0..3);
            buf[40..44].copy_from_slice(&flags.to_le_bytes());
            let next: u32 = rng.gen_range(0..NSEGS + 2);
            buf[44..48].copy_from_slice(&next.to_le_bytes());
        }
        let total = KSET_HEADER_BYTES + KEY_BYTES * key_num as usize;
        if total <= len && rng.gen_bool(0.9) {
            reseal(&mut buf, total);
        }
    }
    buf
}

#[test]
fn random_bytes_never_panic_kset_parse_or_key_decode() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let mut parsed = 0;
    for _ in 0..10_000 {
        let buf = random_kset(&mut rng);
        if let Ok(v) = KsetView::parse(&buf, FID, 1, NSEGS) {
            parsed += 1;
            assert_eq!(v.keys.len(), v.header.key_num as usize * KEY_BYTES);
            for k in v.iter() {
                let _ = k.validate(NSEGS, rng.gen(), 0);
            }
        }
        let n = buf.len().min(KEY_BYTES);
        let k = KeyOnMedia::decode(&buf[..n]);
        let _ = k.validate(rng.gen(), rng.gen(), 0);
    }
    assert!(parsed > 0, "no random kset got past every check");
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
fn ksets_match_the_golden_bytes_in_format_md() {
    const GOLDEN_FID: u64 = 0xefcd_ab89_6745_2301;
    let mut k = [0u8; KEY_BYTES];
    KeyOnMedia {
        off: 0x10000,
        len: 4096,
        seg: 1,
        ..Default::default()
    }
    .encode(&mut k);
    let mut kset = [0u8; KSET_HEADER_BYTES + KEY_BYTES];
    encode_kset(&mut kset, GOLDEN_FID, 1, 0, &k);
    let golden = unhex(
        "0000: 76 fa 08 ba 01 00 00 00 1a 4f 16 4e a6 94 68 67
         0010: 01 23 45 67 89 ab cd ef 01 00 00 00 00 00 00 00
         0020: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
         0030: 00 00 01 00 00 00 00 00 00 10 00 00 00 00 00 00
         0040: 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
         0050: 00 00 00 00 00 00 00 00",
    );
    assert_eq!(kset[..], golden[..]);

    let mut last = [0u8; KSET_HEADER_BYTES];
    encode_last(&mut last, GOLDEN_FID, 2, 0, 1);
    let golden = unhex(
        "0000: 1b b2 84 83 00 00 00 00 1a 4f 16 4e a6 94 68 67
         0010: 01 23 45 67 89 ab cd ef 02 00 00 00 00 00 00 00
         0020: 00 00 00 00 00 00 00 00 01 00 00 00 01 00 00 00",
    );
    assert_eq!(last[..], golden[..]);
}
