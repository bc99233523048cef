//! The superblock: one 64-byte record at 4 KiB, written once, last, at format.
//!
//! ```text
//! off  size  field
//! 0    4     crc          crc32c of bytes 4..64
//! 4    4     flags        reserved, 0
//! 8    8     magic        SB_MAGIC
//! 16   4     version      FORMAT_VERSION
//! 20   4     seg_num      segments on the medium
//! 24   16    uuid         random at format
//! 40   8     cache_bytes  size of the medium at format
//! 48   8     backing_bytes size of the backing store at format
//! 56   8     reserved, 0
//! ```

use super::check::{Error, Result};
use super::layout::{FORMAT_VERSION, MAX_SEGS, SB_BYTES, SB_MAGIC, SB_OFF};
use super::meta::{le_u32, le_u64, put_u32, put_u64};

/// The decoded superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Reserved flags (0).
    pub flags: u32,
    /// Format version ([`super::layout::FORMAT_VERSION`]).
    pub version: u32,
    /// Number of segments on the medium.
    pub seg_num: u32,
    /// Identity of this format instance; its first 8 bytes are the format id
    /// stamped into every kset.
    pub uuid: [u8; 16],
    /// Size of the cache medium when it was formatted.
    pub cache_bytes: u64,
    /// Size of the backing store when it was formatted.
    pub backing_bytes: u64,
}

impl Superblock {
    /// The 8-byte format id stamped into every kset header.
    pub fn format_id(&self) -> u64 {
        u64::from_le_bytes(self.uuid[..8].try_into().expect("uuid is 16 bytes"))
    }

    /// Encode into the [`super::layout::SB_BYTES`]-byte record, CRC included.
    pub fn encode(&self) -> [u8; super::layout::SB_BYTES] {
        let mut buf = [0u8; SB_BYTES];
        put_u32(&mut buf, 4, self.flags);
        put_u64(&mut buf, 8, SB_MAGIC);
        put_u32(&mut buf, 16, self.version);
        put_u32(&mut buf, 20, self.seg_num);
        buf[24..40].copy_from_slice(&self.uuid);
        put_u64(&mut buf, 40, self.cache_bytes);
        put_u64(&mut buf, 48, self.backing_bytes);
        let crc = super::check::record_crc(&buf);
        put_u32(&mut buf, 0, crc);
        buf
    }

    /// Decode and validate the superblock read from offset `SB_OFF` of a medium
    /// of `medium_bytes` bytes. An all-zero magic is [`Error::NotPcache`]; a
    /// wrong magic, CRC, version or a seg_num that does not fit the medium (or
    /// is 0, or above MAX_SEGS) is [`Error::Corrupt`] / [`Error::Version`].
    pub fn decode(buf: &[u8], medium_bytes: u64) -> Result<Superblock> {
        let corrupt = |detail: String| Error::Corrupt {
            what: "superblock",
            offset: SB_OFF,
            detail,
        };
        let Some(rec) = buf.get(..SB_BYTES) else {
            return Err(corrupt(format!(
                "buffer too short: {} bytes, need {SB_BYTES}",
                buf.len()
            )));
        };
        let magic = le_u64(rec, 8);
        if magic == 0 {
            return Err(Error::NotPcache);
        }
        if magic != SB_MAGIC {
            return Err(corrupt(format!(
                "not a pcache superblock: magic {magic:#018x}, expected {SB_MAGIC:#018x}"
            )));
        }
        let stored = le_u32(rec, 0);
        let computed = super::check::record_crc(rec);
        if stored != computed {
            return Err(corrupt(format!(
                "crc mismatch: stored {stored:#010x}, computed {computed:#010x}"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&rec[24..40]);
        let sb = Superblock {
            flags: le_u32(rec, 4),
            version: le_u32(rec, 16),
            seg_num: le_u32(rec, 20),
            uuid,
            cache_bytes: le_u64(rec, 40),
            backing_bytes: le_u64(rec, 48),
        };
        // After the CRC: a CRC-valid record with another version was really
        // written by another build, not torn.
        if sb.version != FORMAT_VERSION {
            return Err(Error::Version { found: sb.version });
        }
        if sb.seg_num == 0 || sb.seg_num > MAX_SEGS {
            return Err(corrupt(format!(
                "seg_num {} out of range 1..={MAX_SEGS}",
                sb.seg_num
            )));
        }
        let need = super::layout::size_for_segs(sb.seg_num);
        if need > medium_bytes {
            return Err(corrupt(format!(
                "seg_num {} needs {need} bytes but the medium has {medium_bytes}",
                sb.seg_num
            )));
        }
        if sb.cache_bytes > medium_bytes {
            return Err(corrupt(format!(
                "cache_bytes {} is larger than the medium ({medium_bytes} bytes)",
                sb.cache_bytes
            )));
        }
        if need > sb.cache_bytes {
            return Err(corrupt(format!(
                "seg_num {} needs {need} bytes but cache_bytes is {}",
                sb.seg_num, sb.cache_bytes
            )));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{size_for_segs, SEG_BYTES};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const MEDIUM: u64 = 1 << 30;

    fn sb() -> Superblock {
        Superblock {
            flags: 0,
            version: FORMAT_VERSION,
            seg_num: 63,
            uuid: *b"0123456789abcdef",
            cache_bytes: MEDIUM,
            backing_bytes: 10 << 30,
        }
    }

    /// `sb` encoded, with `patch` applied and the CRC fixed up.
    fn patched(sb: Superblock, patch: impl FnOnce(&mut [u8])) -> [u8; SB_BYTES] {
        let mut buf = sb.encode();
        patch(&mut buf);
        let crc = crate::format::record_crc(&buf);
        buf[0..4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    fn detail(e: Error) -> String {
        match e {
            Error::Corrupt {
                what: "superblock",
                offset: SB_OFF,
                detail,
            } => detail,
            other => panic!("expected Corrupt superblock, got {other:?}"),
        }
    }

    #[test]
    fn superblock_round_trips() {
        assert_eq!(Superblock::decode(&sb().encode(), MEDIUM), Ok(sb()));
        // The rest of the 4 KiB block may follow; only 64 bytes count.
        let mut block = vec![0u8; 4096];
        block[..SB_BYTES].copy_from_slice(&sb().encode());
        assert_eq!(Superblock::decode(&block, MEDIUM), Ok(sb()));
    }

    #[test]
    fn superblock_has_the_documented_byte_layout() {
        let b = sb().encode();
        assert_eq!(b[0..4], crc32c::crc32c(&b[4..64]).to_le_bytes());
        assert_eq!(b[4..8], [0; 4]);
        assert_eq!(b[8..16], SB_MAGIC.to_le_bytes());
        assert_eq!(&b[8..16], b"1_ehcacp"); // "pcache_1" as a big-endian string
        assert_eq!(b[16..20], 2u32.to_le_bytes());
        assert_eq!(b[20..24], 63u32.to_le_bytes());
        assert_eq!(&b[24..40], b"0123456789abcdef");
        assert_eq!(b[40..48], MEDIUM.to_le_bytes());
        assert_eq!(b[48..56], (10u64 << 30).to_le_bytes());
        assert_eq!(b[56..64], [0; 8]);
        assert_eq!(sb().format_id(), u64::from_le_bytes(*b"01234567"));
    }

    #[test]
    fn flipping_any_bit_of_the_superblock_is_detected() {
        let good = sb().encode();
        for bit in 0..SB_BYTES * 8 {
            let mut buf = good;
            buf[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Superblock::decode(&buf, MEDIUM).is_err(),
                "bit {bit} flip accepted"
            );
        }
    }

    #[test]
    fn zeroed_device_is_not_pcache() {
        assert_eq!(
            Superblock::decode(&[0u8; 4096], MEDIUM),
            Err(Error::NotPcache)
        );
        // Zero magic wins even if other bytes hold garbage.
        let mut buf = [0xffu8; SB_BYTES];
        buf[8..16].fill(0);
        assert_eq!(Superblock::decode(&buf, MEDIUM), Err(Error::NotPcache));
    }

    #[test]
    fn foreign_magic_is_corrupt_not_pcache() {
        let buf = patched(sb(), |b| b[8] ^= 1);
        let d = detail(Superblock::decode(&buf, MEDIUM).unwrap_err());
        assert!(d.contains("not a pcache superblock: magic"), "{d}");
    }

    #[test]
    fn bad_crc_is_corrupt() {
        let mut buf = sb().encode();
        buf[0] ^= 1;
        let d = detail(Superblock::decode(&buf, MEDIUM).unwrap_err());
        assert!(d.contains("crc mismatch"), "{d}");
    }

    #[test]
    fn other_format_version_is_reported_as_version() {
        // Version 1 had no kset slots; its segments start elsewhere.
        let buf = Superblock { version: 1, ..sb() }.encode();
        assert_eq!(
            Superblock::decode(&buf, MEDIUM),
            Err(Error::Version { found: 1 })
        );
        let buf = Superblock { version: 3, ..sb() }.encode();
        assert_eq!(
            Superblock::decode(&buf, MEDIUM),
            Err(Error::Version { found: 3 })
        );
        let buf = Superblock { version: 0, ..sb() }.encode();
        assert_eq!(
            Superblock::decode(&buf, MEDIUM),
            Err(Error::Version { found: 0 })
        );
    }

    #[test]
    fn seg_num_too_big_for_the_medium_is_corrupt() {
        // The medium shrank below what the superblock describes.
        let d = detail(Superblock::decode(&sb().encode(), MEDIUM - SEG_BYTES).unwrap_err());
        assert!(d.contains("seg_num 63 needs"), "{d}");
        // Exactly enough is fine.
        let small = Superblock {
            cache_bytes: size_for_segs(63),
            ..sb()
        };
        assert_eq!(
            Superblock::decode(&small.encode(), size_for_segs(63)),
            Ok(small)
        );
    }

    #[test]
    fn seg_num_out_of_range_is_corrupt() {
        for seg_num in [0, MAX_SEGS + 1, u32::MAX] {
            let buf = Superblock { seg_num, ..sb() }.encode();
            let d = detail(Superblock::decode(&buf, u64::MAX).unwrap_err());
            assert!(d.contains("out of range"), "{seg_num}: {d}");
        }
    }

    #[test]
    fn cache_bytes_inconsistent_with_medium_or_seg_num_is_corrupt() {
        let big = Superblock {
            cache_bytes: MEDIUM + 1,
            ..sb()
        };
        let d = detail(Superblock::decode(&big.encode(), MEDIUM).unwrap_err());
        assert!(d.contains("larger than the medium"), "{d}");
        let small = Superblock {
            cache_bytes: size_for_segs(62),
            ..sb()
        };
        let d = detail(Superblock::decode(&small.encode(), MEDIUM).unwrap_err());
        assert!(d.contains("cache_bytes is"), "{d}");
        // A medium grown since format is accepted.
        assert_eq!(Superblock::decode(&sb().encode(), 2 * MEDIUM), Ok(sb()));
    }

    #[test]
    fn short_buffer_is_corrupt_not_a_panic() {
        let good = sb().encode();
        for n in 0..SB_BYTES {
            let d = detail(Superblock::decode(&good[..n], MEDIUM).unwrap_err());
            assert!(d.contains("too short"), "{d}");
        }
    }

    #[test]
    fn random_bytes_never_panic_superblock_decode() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0002);
        let mut reached_fields = 0;
        for _ in 0..10_000 {
            let len = if rng.gen_bool(0.8) {
                SB_BYTES
            } else {
                rng.gen_range(0..128)
            };
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf[..]);
            // Give most buffers the magic and a valid CRC so the field
            // checks behind them are reached too.
            if len >= SB_BYTES && rng.gen_bool(0.7) {
                buf[8..16].copy_from_slice(&SB_MAGIC.to_le_bytes());
                if rng.gen_bool(0.5) {
                    buf[16..20].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                }
                let crc = crate::format::record_crc(&buf[..SB_BYTES]);
                buf[0..4].copy_from_slice(&crc.to_le_bytes());
            }
            let medium = rng.gen::<u64>() >> rng.gen_range(0..64);
            match Superblock::decode(&buf, medium) {
                Err(Error::Corrupt { ref detail, .. }) if detail.contains("seg_num") => {
                    reached_fields += 1
                }
                _ => {}
            }
        }
        assert!(reached_fields > 0);
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
    fn superblock_matches_the_golden_bytes_in_format_md() {
        let sb = Superblock {
            flags: 0,
            version: 2,
            seg_num: 63,
            uuid: [
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
                0x66, 0x77,
            ],
            cache_bytes: 1 << 30,
            backing_bytes: 10 << 30,
        };
        let golden = unhex(
            "0000: f9 ed 4b c5 00 00 00 00 31 5f 65 68 63 61 63 70
             0010: 02 00 00 00 3f 00 00 00 01 23 45 67 89 ab cd ef
             0020: 00 11 22 33 44 55 66 77 00 00 00 40 00 00 00 00
             0030: 00 00 00 80 02 00 00 00 00 00 00 00 00 00 00 00",
        );
        assert_eq!(sb.encode()[..], golden[..]);
        assert_eq!(sb.format_id(), 0xefcd_ab89_6745_2301);
    }
}
