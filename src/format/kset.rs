//! Keys and ksets: the records of the key log.
//!
//! Kset header (48 bytes), followed by `key_num` keys of 40 bytes:
//!
//! ```text
//! off  size  field
//! 0    4     crc        crc32c of bytes 4..48+40*key_num
//! 4    4     key_num    0..=128 (0 for a LAST kset)
//! 8    8     magic      KSET_MAGIC
//! 16   8     format_id  first 8 bytes of the superblock UUID
//! 24   8     lsn        log sequence number, +1 per kset (LAST included)
//! 32   8     epoch      flush epoch the kset was closed in
//! 40   4     flags      bit 0 LAST (the log continues at (next_seg, 0))
//! 44   4     next_seg   next log segment, LAST only
//! ```
//!
//! Key (40 bytes):
//!
//! ```text
//! 0    8     off        logical byte offset on the backing store
//! 8    4     len        bytes (multiple of 512, never crosses 4 MiB)
//! 12   4     flags      bit 1 CLEAN (filled from a read miss)
//!                         bit 2 ZERO  (the range reads zeros; no data)
//!                         bit 3 UNMAP (with ZERO: the backing store may
//!                                      deallocate the range)
//!                         bit 4 BAD   (the range's newest data was lost;
//!                                      reads fail; no data)
//!                         bit 5 FORGET (the range is no longer cached:
//!                                      reads go to the backing store,
//!                                      which holds its newest data)
//! 16   4     seg        cache segment holding the data
//! 20   4     seg_off    offset in that segment's data area
//! 24   8     gen        segment gen when the data was written
//! 32   4     data_crc   crc32c of the data (0 unless DATA_CRC)
//! 36   4     reserved, 0
//! ```
//!
//! A ZERO, BAD or FORGET key is dataless: seg, seg_off, gen and data_crc are 0 and
//! it holds no segment reference. Such keys keep their place in log order
//! like writes, so replay, writeback and GC see them where the guest put
//! them.

use super::check::{Error, Result};
use super::layout::{
    KEY_BYTES, KSET_HEADER_BYTES, KSET_KEYS_MAX, KSET_MAGIC, REGION_BYTES, SECTOR_BYTES,
    SEG_DATA_BYTES,
};
use super::meta::{le_u32, le_u64, put_u32, put_u64};

/// Kset flag: this kset only links to the next log segment.
pub const KSET_FLAG_LAST: u32 = 1;
/// Key flag: the data came from the backing store (writeback skips it).
pub const KEY_FLAG_CLEAN: u32 = 1 << 1;
/// Key flag: the range reads zeros (a discard or write-zeroes); no data.
pub const KEY_FLAG_ZERO: u32 = 1 << 2;
/// Key flag, with ZERO: the backing store may deallocate the range.
pub const KEY_FLAG_UNMAP: u32 = 1 << 3;
/// Key flag: the newest data of the range failed its CRC before it reached
/// the backing store; reads fail until the guest writes the range again.
pub const KEY_FLAG_BAD: u32 = 1 << 4;
/// Key flag: the range is no longer cached (a write went around the cache
/// to the backing store); no data.
pub const KEY_FLAG_FORGET: u32 = 1 << 5;
const KEY_FLAGS_KNOWN: u32 =
    KEY_FLAG_CLEAN | KEY_FLAG_ZERO | KEY_FLAG_UNMAP | KEY_FLAG_BAD | KEY_FLAG_FORGET;

/// A key as stored in a kset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyOnMedia {
    /// Logical byte offset.
    pub off: u64,
    /// Length in bytes.
    pub len: u32,
    /// `KEY_FLAG_*`.
    pub flags: u32,
    /// Cache segment holding the data.
    pub seg: u32,
    /// Offset in the segment's data area.
    pub seg_off: u32,
    /// Segment gen at write time.
    pub gen: u64,
    /// crc32c of the data when DATA_CRC is on.
    pub data_crc: u32,
}

impl KeyOnMedia {
    /// A dataless key (ZERO or BAD) for `len` bytes at `off`.
    pub fn dataless(off: u64, len: u32, flags: u32) -> KeyOnMedia {
        KeyOnMedia {
            off,
            len,
            flags,
            ..Default::default()
        }
    }

    /// Does the key carry no data (ZERO, BAD or FORGET)?
    pub fn is_dataless(&self) -> bool {
        self.flags & (KEY_FLAG_ZERO | KEY_FLAG_BAD | KEY_FLAG_FORGET) != 0
    }

    /// Was the data filled from the backing store (nothing to write back)?
    pub fn is_clean(&self) -> bool {
        self.flags & KEY_FLAG_CLEAN != 0
    }

    /// Encode into 40 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..KEY_BYTES];
        put_u64(out, 0, self.off);
        put_u32(out, 8, self.len);
        put_u32(out, 12, self.flags);
        put_u32(out, 16, self.seg);
        put_u32(out, 20, self.seg_off);
        put_u64(out, 24, self.gen);
        put_u32(out, 32, self.data_crc);
        put_u32(out, 36, 0);
    }

    /// Decode 40 bytes without validation. Never panics: a shorter buffer
    /// reads as if zero-padded (len 0 then fails [`KeyOnMedia::validate`]).
    pub fn decode(buf: &[u8]) -> KeyOnMedia {
        let mut b = [0u8; KEY_BYTES];
        let n = buf.len().min(KEY_BYTES);
        b[..n].copy_from_slice(&buf[..n]);
        KeyOnMedia {
            off: le_u64(&b, 0),
            len: le_u32(&b, 8),
            flags: le_u32(&b, 12),
            seg: le_u32(&b, 16),
            seg_off: le_u32(&b, 20),
            gen: le_u64(&b, 24),
            data_crc: le_u32(&b, 32),
        }
    }

    /// Check every field against the geometry: len > 0 and a multiple of
    /// 512, off a multiple of 512, off+len <= backing_bytes without overflow,
    /// the key does not cross a 4 MiB region, no unknown flags and at most
    /// one of CLEAN, ZERO, BAD and FORGET (UNMAP only with ZERO); for a key with
    /// data, seg < n_segs, seg_off multiple of 512 and seg_off+len <=
    /// SEG_DATA_BYTES; for a dataless one, all four data fields 0.
    /// `what`/`offset` name the key in the error.
    pub fn validate(&self, n_segs: u32, backing_bytes: u64, offset: u64) -> Result<()> {
        let bad = |detail: String| {
            Err(Error::Corrupt {
                what: "kset key",
                offset,
                detail,
            })
        };
        let len = u64::from(self.len);
        if len == 0 || !len.is_multiple_of(SECTOR_BYTES) {
            return bad(format!(
                "len {} is not a positive multiple of 512",
                self.len
            ));
        }
        if !self.off.is_multiple_of(SECTOR_BYTES) {
            return bad(format!("off {:#x} is not a multiple of 512", self.off));
        }
        let Some(end) = self.off.checked_add(len) else {
            return bad(format!("off {:#x} + len {} overflows", self.off, self.len));
        };
        if end > backing_bytes {
            return bad(format!(
                "off {:#x} + len {} ends past the backing store ({backing_bytes} bytes)",
                self.off, self.len
            ));
        }
        // end > off here, so end - 1 cannot underflow.
        if self.off / REGION_BYTES != (end - 1) / REGION_BYTES {
            return bad(format!(
                "off {:#x} + len {} crosses a 4 MiB region boundary",
                self.off, self.len
            ));
        }
        let unknown = self.flags & !KEY_FLAGS_KNOWN;
        if unknown != 0 {
            return bad(format!("unknown flags {unknown:#x} in {:#x}", self.flags));
        }
        let kinds = [KEY_FLAG_CLEAN, KEY_FLAG_ZERO, KEY_FLAG_BAD, KEY_FLAG_FORGET]
            .iter()
            .filter(|f| self.flags & **f != 0)
            .count();
        if kinds > 1 || (self.flags & KEY_FLAG_UNMAP != 0 && self.flags & KEY_FLAG_ZERO == 0) {
            return bad(format!("impossible flag combination {:#x}", self.flags));
        }
        if self.is_dataless() {
            if (self.seg, self.seg_off, self.gen, self.data_crc) != (0, 0, 0, 0) {
                return bad(format!(
                    "dataless key with data fields (seg {}, seg_off {:#x}, gen {}, crc {:#x})",
                    self.seg, self.seg_off, self.gen, self.data_crc
                ));
            }
            return Ok(());
        }
        if self.seg >= n_segs {
            return bad(format!("seg {} out of range (n_segs {n_segs})", self.seg));
        }
        if !u64::from(self.seg_off).is_multiple_of(SECTOR_BYTES) {
            return bad(format!(
                "seg_off {:#x} is not a multiple of 512",
                self.seg_off
            ));
        }
        if u64::from(self.seg_off) + len > SEG_DATA_BYTES {
            return bad(format!(
                "seg_off {:#x} + len {} ends past the segment data area ({SEG_DATA_BYTES} bytes)",
                self.seg_off, self.len
            ));
        }
        Ok(())
    }
}

/// A decoded kset header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KsetHeader {
    /// Keys that follow (0 for LAST).
    pub key_num: u32,
    /// Format id of the device.
    pub format_id: u64,
    /// Log sequence number.
    pub lsn: u64,
    /// Flush epoch.
    pub epoch: u64,
    /// `KSET_FLAG_*`.
    pub flags: u32,
    /// Next log segment (LAST only).
    pub next_seg: u32,
}

impl KsetHeader {
    /// Is this a LAST kset?
    pub fn is_last(&self) -> bool {
        self.flags & KSET_FLAG_LAST != 0
    }

    /// Bytes of the whole kset on media.
    pub fn bytes(&self) -> usize {
        super::layout::KSET_HEADER_BYTES + super::layout::KEY_BYTES * self.key_num as usize
    }
}

/// Why a kset read from the log is not the next valid one: where replay and
/// the workers stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KsetEnd {
    /// Magic is not KSET_MAGIC (a zero terminator, or never written).
    NoMagic,
    /// Magic matches but the CRC does not (a torn write).
    BadCrc,
    /// Written by another format of this device.
    WrongFormat,
    /// A valid kset, but not the LSN expected here (an earlier lap).
    WrongLsn {
        /// LSN found.
        found: u64,
    },
    /// CRC-valid but impossible: key_num > 128, a LAST with keys, next_seg
    /// out of range, unknown flags, or it does not fit in the buffer.
    Invalid(String),
}

/// A validated kset, borrowing its bytes.
#[derive(Debug, Clone, Copy)]
pub struct KsetView<'a> {
    /// The header.
    pub header: KsetHeader,
    /// The raw key bytes (`key_num * 40`).
    pub keys: &'a [u8],
}

impl<'a> KsetView<'a> {
    /// Key `i` (i < key_num), decoded without validation.
    pub fn key(&self, i: usize) -> KeyOnMedia {
        KeyOnMedia::decode(
            &self.keys[i * super::layout::KEY_BYTES..(i + 1) * super::layout::KEY_BYTES],
        )
    }

    /// Iterate the keys.
    pub fn iter(&self) -> impl Iterator<Item = KeyOnMedia> + 'a {
        self.keys
            .chunks_exact(super::layout::KEY_BYTES)
            .map(KeyOnMedia::decode)
    }

    /// Parse the kset at the start of `buf` (which may be longer than the
    /// kset, and is at most the rest of the segment's data area). Checks, in
    /// order: magic, that header and keys fit in `buf`, CRC, format id, LSN
    /// == `expected_lsn`, then the header fields (key_num <= 128, LAST has no
    /// keys and next_seg < n_segs, no unknown flags). Keys are not validated.
    pub fn parse(
        buf: &'a [u8],
        format_id: u64,
        expected_lsn: u64,
        n_segs: u32,
    ) -> std::result::Result<KsetView<'a>, KsetEnd> {
        let has_magic = buf.get(8..16).is_some_and(|m| le_u64(m, 0) == KSET_MAGIC);
        if !has_magic {
            return Err(KsetEnd::NoMagic);
        }
        // A header or key count that cannot fit cannot be CRC-checked: it is
        // a torn write or stale bytes (e.g. guest data that happens to hold
        // the magic), so it ends the log like a bad CRC rather than failing
        // the open as corruption.
        if buf.len() < KSET_HEADER_BYTES {
            return Err(KsetEnd::BadCrc);
        }
        let key_num = le_u32(buf, 4);
        // u64: key_num is any u32 here (its range is checked after the CRC).
        let total = KSET_HEADER_BYTES as u64 + KEY_BYTES as u64 * u64::from(key_num);
        if total > buf.len() as u64 {
            return Err(KsetEnd::BadCrc);
        }
        // total <= buf.len(), so it fits in usize.
        let kset = &buf[..total as usize];
        if le_u32(kset, 0) != super::check::record_crc(kset) {
            return Err(KsetEnd::BadCrc);
        }
        let header = KsetHeader {
            key_num,
            format_id: le_u64(kset, 16),
            lsn: le_u64(kset, 24),
            epoch: le_u64(kset, 32),
            flags: le_u32(kset, 40),
            next_seg: le_u32(kset, 44),
        };
        if header.format_id != format_id {
            return Err(KsetEnd::WrongFormat);
        }
        if header.lsn != expected_lsn {
            return Err(KsetEnd::WrongLsn { found: header.lsn });
        }
        if key_num as usize > KSET_KEYS_MAX {
            return Err(KsetEnd::Invalid(format!(
                "key_num {key_num} above {KSET_KEYS_MAX}"
            )));
        }
        let unknown = header.flags & !KSET_FLAG_LAST;
        if unknown != 0 {
            return Err(KsetEnd::Invalid(format!(
                "unknown flags {unknown:#x} in {:#x}",
                header.flags
            )));
        }
        if header.is_last() {
            if key_num != 0 {
                return Err(KsetEnd::Invalid(format!("LAST kset with {key_num} keys")));
            }
            if header.next_seg >= n_segs {
                return Err(KsetEnd::Invalid(format!(
                    "LAST kset next_seg {} out of range (n_segs {n_segs})",
                    header.next_seg
                )));
            }
        }
        Ok(KsetView {
            header,
            keys: &kset[KSET_HEADER_BYTES..],
        })
    }
}

/// Encode a normal kset into `out` (which must hold 48 + 40 * keys bytes):
/// header with key_num = keys.len() / 40, then the already-encoded key bytes,
/// CRC last. Returns the bytes written.
pub fn encode_kset(out: &mut [u8], format_id: u64, lsn: u64, epoch: u64, keys: &[u8]) -> usize {
    debug_assert!(
        keys.len().is_multiple_of(KEY_BYTES),
        "partial key in a kset"
    );
    debug_assert!(keys.len() <= KEY_BYTES * KSET_KEYS_MAX, "too many keys");
    let total = KSET_HEADER_BYTES + keys.len();
    let kset = &mut out[..total];
    kset[KSET_HEADER_BYTES..].copy_from_slice(keys);
    // keys.len() <= 128 * 40 (debug-asserted above), so this cannot truncate.
    let key_num = (keys.len() / KEY_BYTES) as u32;
    write_header(kset, key_num, format_id, lsn, epoch, 0, 0);
    total
}

/// Encode a LAST kset (header only) into `out[..48]`.
pub fn encode_last(out: &mut [u8], format_id: u64, lsn: u64, epoch: u64, next_seg: u32) {
    let kset = &mut out[..KSET_HEADER_BYTES];
    write_header(kset, 0, format_id, lsn, epoch, KSET_FLAG_LAST, next_seg);
}

/// Fill the header of `kset` (whose keys are already in place), CRC last.
fn write_header(
    kset: &mut [u8],
    key_num: u32,
    format_id: u64,
    lsn: u64,
    epoch: u64,
    flags: u32,
    next_seg: u32,
) {
    put_u32(kset, 4, key_num);
    put_u64(kset, 8, KSET_MAGIC);
    put_u64(kset, 16, format_id);
    put_u64(kset, 24, lsn);
    put_u64(kset, 32, epoch);
    put_u32(kset, 40, flags);
    put_u32(kset, 44, next_seg);
    let crc = super::check::record_crc(kset);
    put_u32(kset, 0, crc);
}

#[cfg(test)]
#[path = "kset_tests.rs"]
mod tests;
