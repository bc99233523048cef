//! Replicated metadata records: cache_info, key_tail/dirty_tail positions,
//! segment_info and segment gen. Each is stored twice; the newest replica
//! with a valid CRC wins.
//!
//! Every replica starts with a 16-byte header:
//!
//! ```text
//! off  size  field
//! 0    4     crc   crc32c of bytes 4..BYTES
//! 4    4     kind  record kind tag (so a record copied to the wrong place fails)
//! 8    8     seq   64-bit sequence number, +1 per update
//! ```
//!
//! Differs from dm-pcache: a 64-bit seq (no wrap-around arithmetic), a kind
//! tag, and writers always target the slot that does not hold the newest
//! valid copy (see [`Latest::write_slot`]).

use super::check::{Error, Result};

/// Header bytes shared by every replicated record.
pub const META_HEADER_BYTES: usize = 16;

/// cache_info flag: per-key data CRC is on.
pub const CACHE_FLAG_DATA_CRC: u32 = 1 << 0;
/// cache_info flag: the cache finished its first start.
pub const CACHE_FLAG_INIT_DONE: u32 = 1 << 1;
/// cache_info flag: the guest turned its volatile write cache off
/// (virtio-blk CONFIG_WCE); kept so it holds across restarts, which the
/// frontend does not repeat.
pub const CACHE_FLAG_WRITETHROUGH: u32 = 1 << 2;
/// cache_info flag: write back one flush epoch per batch
/// (`--writeback-order strict`).
pub const CACHE_FLAG_WB_STRICT: u32 = 1 << 3;
/// cache_info flag: write back only the newest durable version of each
/// sector (`--writeback-order newest`).
pub const CACHE_FLAG_WB_NEWEST: u32 = 1 << 4;
/// segment_info type: a cache segment (data or log).
pub const SEG_INFO_TYPE_DATA: u32 = 1;

/// A record stored as two replicas.
pub trait MetaRecord: Sized + Clone {
    /// Record name for messages ("cache_info", "key_tail", ...).
    const NAME: &'static str;
    /// Kind tag stored in the header.
    const KIND: u32;
    /// Bytes of one replica, header included.
    const BYTES: usize;
    /// Write the body (bytes `META_HEADER_BYTES..BYTES`).
    fn encode_body(&self, body: &mut [u8]);
    /// Read and validate the body; `what`/`offset` are for errors.
    fn decode_body(body: &[u8], offset: u64) -> Result<Self>;

    /// Encode one replica with sequence number `seq`, CRC included.
    fn encode(&self, seq: u64) -> Vec<u8> {
        let mut buf = vec![0u8; Self::BYTES];
        put_u32(&mut buf, 4, Self::KIND);
        put_u64(&mut buf, 8, seq);
        self.encode_body(&mut buf[META_HEADER_BYTES..]);
        let crc = super::check::record_crc(&buf);
        put_u32(&mut buf, 0, crc);
        buf
    }

    /// Decode one replica read at device offset `offset`: checks CRC, kind and
    /// body. Returns the record and its seq.
    fn decode(buf: &[u8], offset: u64) -> Result<(Self, u64)> {
        let corrupt = |detail: String| Error::Corrupt {
            what: Self::NAME,
            offset,
            detail,
        };
        let Some(rec) = buf.get(..Self::BYTES) else {
            return Err(corrupt(format!(
                "buffer too short: {} bytes, need {}",
                buf.len(),
                Self::BYTES
            )));
        };
        // A zeroed slot is the normal state of a replica never written (or
        // wiped at format): say so instead of reporting a CRC mismatch.
        if rec.iter().all(|&b| b == 0) {
            return Err(corrupt("never written (all zero)".into()));
        }
        let stored = le_u32(rec, 0);
        let computed = super::check::record_crc(rec);
        if stored != computed {
            return Err(corrupt(format!(
                "crc mismatch: stored {stored:#010x}, computed {computed:#010x}"
            )));
        }
        let kind = le_u32(rec, 4);
        if kind != Self::KIND {
            return Err(corrupt(format!(
                "record kind {kind}, expected {} ({})",
                Self::KIND,
                Self::NAME
            )));
        }
        let seq = le_u64(rec, 8);
        let rec = Self::decode_body(&rec[META_HEADER_BYTES..], offset)?;
        Ok((rec, seq))
    }
}

/// The newest valid replica of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest<R> {
    /// The record.
    pub rec: R,
    /// Its sequence number.
    pub seq: u64,
    /// Which slot (0 or 1) holds it.
    pub slot: usize,
    /// Why the other slot was not used, if it was invalid (for a warning).
    pub other_error: Option<Error>,
}

impl<R> Latest<R> {
    /// Slot the next update must go to: always the one that does not hold the
    /// newest valid copy, so a torn write can only destroy the older one.
    pub fn write_slot(&self) -> usize {
        1 - self.slot
    }
}

/// Pick the newest valid replica from `slots` (read at `offsets`). Ties keep
/// slot 0. Both invalid: the error of slot 0 (or an error naming both).
pub fn pick_latest<R: MetaRecord>(slots: [&[u8]; 2], offsets: [u64; 2]) -> Result<Latest<R>> {
    let r0 = R::decode(slots[0], offsets[0]);
    let r1 = R::decode(slots[1], offsets[1]);
    let latest = |(rec, seq): (R, u64), slot, other_error| Latest {
        rec,
        seq,
        slot,
        other_error,
    };
    match (r0, r1) {
        // Strictly newer only: a tie keeps slot 0, so the choice is stable.
        (Ok(a), Ok(b)) if b.1 > a.1 => Ok(latest(b, 1, None)),
        (Ok(a), Ok(_)) => Ok(latest(a, 0, None)),
        (Ok(a), Err(e)) => Ok(latest(a, 0, Some(e))),
        (Err(e), Ok(b)) => Ok(latest(b, 1, Some(e))),
        (Err(e0), Err(e1)) => Err(Error::Corrupt {
            what: R::NAME,
            offset: offsets[0],
            detail: format!(
                "both replicas are invalid: slot 0 ({}), slot 1 ({})",
                error_detail(&e0),
                error_detail(&e1)
            ),
        }),
    }
}

/// The part of an error worth repeating inside another one.
fn error_detail(e: &Error) -> String {
    match e {
        Error::Corrupt { offset, detail, .. } => format!("at {offset:#x}: {detail}"),
        other => other.to_string(),
    }
}

/// Little-endian u32 at `buf[off..off + 4]`; callers check the length first.
pub(super) fn le_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(b)
}

/// Little-endian u64 at `buf[off..off + 8]`; callers check the length first.
pub(super) fn le_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

/// Store `v` little endian at `buf[off..off + 4]`.
pub(super) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Store `v` little endian at `buf[off..off + 8]`.
pub(super) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The body of `R` if `body` is long enough (decode_body is public, so it
/// may be handed any slice).
fn body_of<R: MetaRecord>(body: &[u8], offset: u64) -> Result<&[u8]> {
    let need = R::BYTES - META_HEADER_BYTES;
    body.get(..need).ok_or_else(|| Error::Corrupt {
        what: R::NAME,
        offset,
        detail: format!("body too short: {} bytes, need {need}", body.len()),
    })
}

/// Persistent cache settings (`cache_info`, 32 bytes).
///
/// ```text
/// 16  4  n_segs      segments owned by the cache (= superblock seg_num)
/// 20  4  flags       CACHE_FLAG_*
/// 24  1  gc_percent  0..=GC_PERCENT_MAX
/// 25  1  mode        cache mode, 0..=MODE_MAX (0 writeback)
/// 26  6  disk_sectors  size of the disk in 512-byte sectors once grown
///                      online; 0: the superblock's backing_bytes
/// ```
///
/// A build older than `mode` and `disk_sectors` reads both as reserved: it
/// runs the cache in write-back mode and, seeing the grown backing store
/// differ from the superblock, refuses to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheInfo {
    /// Segments owned by the cache.
    pub n_segs: u32,
    /// `CACHE_FLAG_*` bits.
    pub flags: u32,
    /// GC starts when this percentage of segments is in use.
    pub gc_percent: u8,
    /// Cache mode (0 writeback; see `engine::CacheMode`).
    pub mode: u8,
    /// The disk's size in sectors after it grew online; 0 if it never did.
    pub disk_sectors: u64,
}

impl CacheInfo {
    /// The size of the disk: `disk_sectors` once grown, else the size the
    /// superblock was formatted for (a smaller `disk_sectors` is corrupt).
    pub fn disk_bytes(&self, backing_bytes: u64) -> Result<u64> {
        if self.disk_sectors == 0 {
            // Every table sized by the disk assumes at most MAX_DISK_BYTES.
            if backing_bytes > super::layout::MAX_DISK_BYTES {
                return Err(Error::Corrupt {
                    what: "superblock",
                    offset: super::layout::SB_OFF,
                    detail: format!(
                        "backing size {backing_bytes} above {}",
                        super::layout::MAX_DISK_BYTES
                    ),
                });
            }
            return Ok(backing_bytes);
        }
        let bytes = self
            .disk_sectors
            .saturating_mul(super::layout::SECTOR_BYTES);
        if bytes < backing_bytes || bytes > super::layout::MAX_DISK_BYTES {
            return Err(Error::Corrupt {
                what: Self::NAME,
                offset: super::layout::CACHE_INFO_OFF[0],
                detail: format!(
                    "disk size {bytes} is below the formatted {} or above {}",
                    backing_bytes,
                    super::layout::MAX_DISK_BYTES
                ),
            });
        }
        Ok(bytes)
    }
}

/// Largest value of `disk_sectors` (48 bits).
const DISK_SECTORS_MAX: u64 = (1 << 48) - 1;

/// A position in the key log (key_tail, dirty_tail; 32 bytes on media).
///
/// ```text
/// 16  4  seg   cache segment id of a log segment
/// 20  4  off   offset inside that segment's data area
/// 24  8  lsn   log sequence number of the kset that starts there
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PosOnMedia {
    /// Log segment.
    pub seg: u32,
    /// Offset in its data area.
    pub off: u32,
    /// LSN expected at this position.
    pub lsn: u64,
}

impl PosOnMedia {
    /// Where the log goes on after a LAST kset here that links to `next`.
    pub fn in_next_segment(self, next: u32) -> PosOnMedia {
        PosOnMedia {
            seg: next,
            off: 0,
            lsn: self.lsn + 1,
        }
    }

    /// Medium byte offset of key `i` of the kset at this position.
    pub fn key_at(self, i: usize) -> u64 {
        super::layout::data_off(self.seg, self.off)
            + (super::layout::KSET_HEADER_BYTES + i * super::layout::KEY_BYTES) as u64
    }
}

impl MetaRecord for CacheInfo {
    const NAME: &'static str = "cache_info";
    const KIND: u32 = 1;
    const BYTES: usize = 32;

    fn encode_body(&self, body: &mut [u8]) {
        put_u32(body, 0, self.n_segs);
        put_u32(body, 4, self.flags);
        body[8] = self.gc_percent;
        body[9] = self.mode;
        debug_assert!(self.disk_sectors <= DISK_SECTORS_MAX);
        body[10..16].copy_from_slice(&self.disk_sectors.to_le_bytes()[..6]);
    }

    fn decode_body(body: &[u8], offset: u64) -> Result<Self> {
        let body = body_of::<Self>(body, offset)?;
        let corrupt = |detail: String| Error::Corrupt {
            what: Self::NAME,
            offset,
            detail,
        };
        let info = CacheInfo {
            n_segs: le_u32(body, 0),
            flags: le_u32(body, 4),
            gc_percent: body[8],
            mode: body[9],
            disk_sectors: {
                let mut b = [0u8; 8];
                b[..6].copy_from_slice(&body[10..16]);
                u64::from_le_bytes(b)
            },
        };
        if info.mode > super::layout::MODE_MAX {
            return Err(corrupt(format!("unknown cache mode {}", info.mode)));
        }
        if info.n_segs == 0 || info.n_segs > super::layout::MAX_SEGS {
            return Err(corrupt(format!(
                "n_segs {} out of range 1..={}",
                info.n_segs,
                super::layout::MAX_SEGS
            )));
        }
        let unknown = info.flags & !CACHE_FLAGS_KNOWN;
        if unknown != 0 {
            return Err(corrupt(format!(
                "unknown flags {unknown:#x} in {:#x}",
                info.flags
            )));
        }
        let orders = CACHE_FLAG_WB_STRICT | CACHE_FLAG_WB_NEWEST;
        if info.flags & orders == orders {
            return Err(corrupt(format!(
                "flags {:#x} name two writeback orders (strict and newest)",
                info.flags
            )));
        }
        if info.gc_percent > super::layout::GC_PERCENT_MAX {
            return Err(corrupt(format!(
                "gc_percent {} above {}",
                info.gc_percent,
                super::layout::GC_PERCENT_MAX
            )));
        }
        Ok(info)
    }
}

/// Every `CACHE_FLAG_*` bit this build knows.
const CACHE_FLAGS_KNOWN: u32 = CACHE_FLAG_DATA_CRC
    | CACHE_FLAG_INIT_DONE
    | CACHE_FLAG_WRITETHROUGH
    | CACHE_FLAG_WB_STRICT
    | CACHE_FLAG_WB_NEWEST;

/// One struct serves key_tail, dirty_tail and the writeback target; errors
/// tell them apart by offset ([`super::layout::KEY_TAIL_OFF`],
/// [`super::layout::DIRTY_TAIL_OFF`], [`super::layout::WB_TARGET_OFF`]).
impl MetaRecord for PosOnMedia {
    const NAME: &'static str = "log position";
    const KIND: u32 = 2;
    const BYTES: usize = 32;

    fn encode_body(&self, body: &mut [u8]) {
        put_u32(body, 0, self.seg);
        put_u32(body, 4, self.off);
        put_u64(body, 8, self.lsn);
    }

    /// No range checks here: seg and off are checked by the engine, which
    /// knows the segment count and the log.
    fn decode_body(body: &[u8], offset: u64) -> Result<Self> {
        let body = body_of::<Self>(body, offset)?;
        Ok(PosOnMedia {
            seg: le_u32(body, 0),
            off: le_u32(body, 4),
            lsn: le_u64(body, 8),
        })
    }
}

/// segment_info flag: `next_seg` is meaningful.
const SEG_INFO_FLAG_HAS_NEXT: u32 = 1 << 0;
/// segment_info type field (bits 1..=4, dm-pcache's GENMASK(4, 1)).
const SEG_INFO_TYPE_MASK: u32 = 0xf << SEG_INFO_TYPE_SHIFT;
/// Shift of the segment_info type field.
const SEG_INFO_TYPE_SHIFT: u32 = 1;

/// Segment info (32 bytes): type and chain link.
///
/// ```text
/// 16  4  flags     bit 0 HAS_NEXT, bits 1..4 type
/// 20  4  next_seg  next cache segment (identity mapping: seg + 1)
/// 24  8  reserved, 0
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegInfo {
    /// Flags (see layout above).
    pub flags: u32,
    /// Next segment in the chain.
    pub next_seg: u32,
}

/// Segment generation (32 bytes). A key is valid only while its gen equals
/// its segment's gen.
///
/// ```text
/// 16  8  gen
/// 24  8  reserved, 0
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegGen {
    /// Generation.
    pub gen: u64,
}

impl SegInfo {
    /// A segment_info of type `seg_type` (e.g. [`SEG_INFO_TYPE_DATA`]),
    /// linked to `next` if given.
    pub fn new(seg_type: u32, next: Option<u32>) -> SegInfo {
        let mut flags = (seg_type << SEG_INFO_TYPE_SHIFT) & SEG_INFO_TYPE_MASK;
        if next.is_some() {
            flags |= SEG_INFO_FLAG_HAS_NEXT;
        }
        SegInfo {
            flags,
            next_seg: next.unwrap_or(0),
        }
    }

    /// The segment type (bits 1..=4 of flags).
    pub fn seg_type(&self) -> u32 {
        (self.flags & SEG_INFO_TYPE_MASK) >> SEG_INFO_TYPE_SHIFT
    }

    /// The next segment of the chain, if HAS_NEXT is set.
    pub fn next(&self) -> Option<u32> {
        (self.flags & SEG_INFO_FLAG_HAS_NEXT != 0).then_some(self.next_seg)
    }
}

impl MetaRecord for SegInfo {
    const NAME: &'static str = "segment_info";
    const KIND: u32 = 3;
    const BYTES: usize = 32;

    fn encode_body(&self, body: &mut [u8]) {
        put_u32(body, 0, self.flags);
        put_u32(body, 4, self.next_seg);
        body[8..16].fill(0);
    }

    /// Rejects flag bits outside HAS_NEXT and the type field; the type value
    /// and next_seg are left to the engine, which knows the segment count.
    fn decode_body(body: &[u8], offset: u64) -> Result<Self> {
        let body = body_of::<Self>(body, offset)?;
        let info = SegInfo {
            flags: le_u32(body, 0),
            next_seg: le_u32(body, 4),
        };
        let unknown = info.flags & !(SEG_INFO_FLAG_HAS_NEXT | SEG_INFO_TYPE_MASK);
        if unknown != 0 {
            return Err(Error::Corrupt {
                what: Self::NAME,
                offset,
                detail: format!("unknown flags {unknown:#x} in {:#x}", info.flags),
            });
        }
        Ok(info)
    }
}

impl MetaRecord for SegGen {
    const NAME: &'static str = "segment_gen";
    const KIND: u32 = 4;
    const BYTES: usize = 32;

    fn encode_body(&self, body: &mut [u8]) {
        put_u64(body, 0, self.gen);
        body[8..16].fill(0);
    }

    fn decode_body(body: &[u8], offset: u64) -> Result<Self> {
        let body = body_of::<Self>(body, offset)?;
        Ok(SegGen {
            gen: le_u64(body, 0),
        })
    }
}

#[cfg(test)]
#[path = "meta_tests.rs"]
mod tests;
