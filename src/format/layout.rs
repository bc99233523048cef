//! Where every record lives on the cache medium, and the geometry it implies.
//!
//! ```text
//! device offset        content
//! 0      .. 4 KiB      unused (room for labels)
//! 4 KiB  .. 8 KiB      superblock (one copy, written last at format)
//! 8 KiB  .. 12 KiB     cache_info replica 0
//! 12 KiB .. 16 KiB     cache_info replica 1
//! 16 KiB .. 20 KiB     cache_ctrl: key_tail r0 @+0, r1 @+32, dirty_tail r0 @+64, r1 @+96
//! 20 KiB .. 148 KiB    kset slots: 16 x 8 KiB (the open ksets, see slot.rs)
//! 148 KiB + i * 16 MiB segment i
//!
//! segment offset       content
//! 0      .. 4 KiB      segment_info replica 0
//! 4 KiB  .. 8 KiB      segment_info replica 1
//! 8 KiB  .. 12 KiB     segment gen: replica 0 @+0, replica 1 @+32
//! 12 KiB .. 16 MiB     data area (cached payload, or ksets for a log segment)
//! ```

use super::check::{Error, Result};

/// One logical sector, the unit of every key offset and length.
pub const SECTOR_BYTES: u64 = 512;
/// Logical region covered by one index shard and one kset (4 MiB, as dm-pcache).
pub const REGION_BYTES: u64 = 4 << 20;
/// log2 of [`REGION_BYTES`].
pub const REGION_SHIFT: u32 = 22;

/// Superblock offset.
pub const SB_OFF: u64 = 4096;
/// Bytes of the superblock record (the rest of its 4 KiB block is zero).
pub const SB_BYTES: usize = 64;
/// cache_info replica offsets (4 KiB stride, as dm-pcache after its Dec 2025 fix).
pub const CACHE_INFO_OFF: [u64; 2] = [8192, 12288];
/// Start of the cache_ctrl block.
pub const CTRL_OFF: u64 = 16384;
/// key_tail replica offsets.
pub const KEY_TAIL_OFF: [u64; 2] = [CTRL_OFF, CTRL_OFF + 32];
/// dirty_tail replica offsets.
pub const DIRTY_TAIL_OFF: [u64; 2] = [CTRL_OFF + 64, CTRL_OFF + 96];
/// writeback target replica offsets: where the batch being written back
/// ends. All zero on a cache formatted before the record existed.
pub const WB_TARGET_OFF: [u64; 2] = [CTRL_OFF + 128, CTRL_OFF + 160];
/// Bytes of metadata before segment 0: dm-pcache's 20 KiB, then the kset
/// slots (148 KiB).
pub const SEGMENTS_OFF: u64 = KSET_SLOTS_OFF + KSET_SLOTS as u64 * KSET_SLOT_BYTES;

/// Open ksets, one slot each (a key of 4 MiB region r goes to r % 16).
pub const KSET_SLOTS: usize = 16;
/// Bytes of one slot (64-byte header + 128 keys, rounded up to 8 KiB).
pub const KSET_SLOT_BYTES: u64 = 8192;
/// Device offset of slot 0 (after the cache_ctrl block).
pub const KSET_SLOTS_OFF: u64 = 20480;
/// Offset of `seq` in a slot.
pub const SLOT_SEQ_OFF: u64 = 0;
/// Offset of `closing` in a slot.
pub const SLOT_CLOSING_OFF: u64 = 8;
/// Offset of the first staged key in a slot.
pub const SLOT_KEYS_OFF: u64 = 64;
/// Bytes of a slot's header.
pub const SLOT_HEADER_BYTES: usize = 16;

/// Device offset of slot `i`.
pub const fn slot_off(i: usize) -> u64 {
    KSET_SLOTS_OFF + i as u64 * KSET_SLOT_BYTES
}

/// Device offset of staged key `k` of slot `i`.
pub const fn staged_key_off(i: usize, k: usize) -> u64 {
    slot_off(i) + SLOT_KEYS_OFF + (k * KEY_BYTES) as u64
}

/// Bytes of one segment (16 MiB, as dm-pcache).
pub const SEG_BYTES: u64 = 16 << 20;
/// segment_info replica offsets inside a segment.
pub const SEG_INFO_OFF: [u64; 2] = [0, 4096];
/// Segment gen replica offsets inside a segment.
pub const SEG_GEN_OFF: [u64; 2] = [8192, 8192 + 32];
/// Offset of the data area inside a segment.
pub const SEG_DATA_OFF: u64 = 12288;
/// Bytes of a segment's data area (16 MiB - 12 KiB).
pub const SEG_DATA_BYTES: u64 = SEG_BYTES - SEG_DATA_OFF;

/// Smallest cache medium accepted (512 MiB, as dm-pcache).
pub const MIN_CACHE_BYTES: u64 = 512 << 20;
/// Most segments one cache may have (16 TiB of cache, as dm-pcache).
pub const MAX_SEGS: u32 = 1 << 20;

/// Bytes of a kset header.
pub const KSET_HEADER_BYTES: usize = 48;
/// Bytes of one key on media.
pub const KEY_BYTES: usize = 40;
/// Most keys in one kset (128, as dm-pcache).
pub const KSET_KEYS_MAX: usize = 128;
/// Bytes of the largest kset.
pub const KSET_MAX_BYTES: usize = KSET_HEADER_BYTES + KEY_BYTES * KSET_KEYS_MAX;
/// Kset magic ("pcKSET01" read as a little-endian u64 would be fine too; any
/// constant that a zeroed medium cannot hold works).
pub const KSET_MAGIC: u64 = 0x676894A64E164F1A;
/// Superblock magic. Differs from dm-pcache's value on purpose: the layouts
/// are not compatible, and neither implementation must mistake the other.
pub const SB_MAGIC: u64 = 0x70636163_68655F31; // "pcache_1"
pub use super::check::FORMAT_VERSION;

/// Largest disk (backing store) a cache can front: 256 TiB.
pub const MAX_DISK_BYTES: u64 = 256 << 40;
/// Largest cache mode number in cache_info.
pub const MODE_MAX: u8 = 3;

/// gc_percent written at format when none is given (70, as dm-pcache).
pub const GC_PERCENT_DEFAULT: u8 = 70;
/// Largest gc_percent accepted (90, as dm-pcache).
pub const GC_PERCENT_MAX: u8 = 90;

/// Device offset of segment `seg`.
pub const fn seg_off(seg: u32) -> u64 {
    SEGMENTS_OFF + seg as u64 * SEG_BYTES
}

/// Device offset of byte `off` of segment `seg`'s data area.
pub const fn data_off(seg: u32, off: u32) -> u64 {
    seg_off(seg) + SEG_DATA_OFF + off as u64
}

/// Number of segments a medium of `cache_bytes` holds
/// (floor((size - 148 KiB) / 16 MiB)), or why it cannot be used.
pub fn segs_for_size(cache_bytes: u64) -> Result<u32> {
    if cache_bytes < MIN_CACHE_BYTES {
        return Err(Error::BadSize {
            bytes: cache_bytes,
            detail: format!("the minimum is {MIN_CACHE_BYTES} bytes (512 MiB)"),
        });
    }
    let n = (cache_bytes - SEGMENTS_OFF) / SEG_BYTES;
    if n > MAX_SEGS as u64 {
        return Err(Error::BadSize {
            bytes: cache_bytes,
            detail: format!("at most {MAX_SEGS} segments (16 TiB) are supported"),
        });
    }
    Ok(n as u32)
}

/// Check a size asked for a new cache file: at least 512 MiB and a whole
/// number of 16 MiB segments, so no space is silently left unused.
pub fn check_new_cache_size(cache_bytes: u64) -> Result<u32> {
    if !cache_bytes.is_multiple_of(SEG_BYTES) {
        let n = cache_bytes / SEG_BYTES;
        return Err(Error::BadSize {
            bytes: cache_bytes,
            detail: format!(
                "it must be a whole number of 16 MiB segments; the nearest sizes are {} and {} bytes",
                n * SEG_BYTES,
                (n + 1) * SEG_BYTES
            ),
        });
    }
    segs_for_size(cache_bytes)
}

/// Smallest medium holding `segs` segments.
pub const fn size_for_segs(segs: u32) -> u64 {
    SEGMENTS_OFF + segs as u64 * SEG_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{MetaRecord, PosOnMedia, SegGen};

    const MIB: u64 = 1 << 20;

    fn bad_size(r: Result<u32>) -> String {
        match r {
            Err(Error::BadSize { detail, .. }) => detail,
            other => panic!("expected BadSize, got {other:?}"),
        }
    }

    #[test]
    fn medium_of_511_mib_is_too_small() {
        assert!(bad_size(segs_for_size(511 * MIB)).contains("minimum"));
        assert!(check_new_cache_size(511 * MIB).is_err());
        assert!(bad_size(segs_for_size(MIN_CACHE_BYTES - 1)).contains("minimum"));
    }

    #[test]
    fn medium_of_512_mib_holds_31_segments() {
        // 148 KiB of metadata leave room for 31 whole segments, as dm-pcache's 20.
        assert_eq!(segs_for_size(512 * MIB), Ok(31));
        assert_eq!(check_new_cache_size(512 * MIB), Ok(31));
        assert!(size_for_segs(31) <= 512 * MIB && size_for_segs(32) > 512 * MIB);
    }

    #[test]
    fn new_cache_of_512_mib_plus_1_fails_naming_the_nearest_sizes() {
        assert_eq!(segs_for_size(512 * MIB + 1), Ok(31));
        let d = bad_size(check_new_cache_size(512 * MIB + 1));
        assert!(d.contains(&(512 * MIB).to_string()), "{d}");
        assert!(d.contains(&(528 * MIB).to_string()), "{d}");
    }

    #[test]
    fn medium_of_1_gib_holds_63_segments() {
        assert_eq!(segs_for_size(1024 * MIB), Ok(63));
        assert_eq!(check_new_cache_size(1024 * MIB), Ok(63));
    }

    #[test]
    fn segment_count_is_capped_at_max_segs() {
        assert_eq!(segs_for_size(size_for_segs(MAX_SEGS)), Ok(MAX_SEGS));
        assert!(bad_size(segs_for_size(size_for_segs(MAX_SEGS + 1))).contains("at most"));
        assert!(segs_for_size(u64::MAX).is_err());
        // 16 TiB is one segment short of MAX_SEGS (the 148 KiB header).
        assert_eq!(check_new_cache_size(16 << 40), Ok(MAX_SEGS - 1));
    }

    #[test]
    fn segment_and_data_offsets_follow_the_map() {
        assert_eq!(seg_off(0), 148 * 1024);
        assert_eq!(seg_off(3), 148 * 1024 + 48 * MIB);
        assert_eq!(data_off(0, 0), 160 * 1024);
        assert_eq!(data_off(2, 512), 148 * 1024 + 32 * MIB + 12 * 1024 + 512);
        assert_eq!(seg_off(MAX_SEGS), size_for_segs(MAX_SEGS));
        assert_eq!(SEG_DATA_BYTES, 16 * MIB - 12 * 1024);
    }

    #[test]
    fn metadata_records_do_not_overlap() {
        let rec = PosOnMedia::BYTES as u64;
        // Device header: label, superblock, cache_info x2, ctrl, segments.
        assert!(SB_OFF + SB_BYTES as u64 <= CACHE_INFO_OFF[0]);
        assert_eq!(CACHE_INFO_OFF[1] - CACHE_INFO_OFF[0], 4096);
        assert!(CACHE_INFO_OFF[1] + 4096 <= CTRL_OFF);
        let ctrl = [
            KEY_TAIL_OFF[0],
            KEY_TAIL_OFF[1],
            DIRTY_TAIL_OFF[0],
            DIRTY_TAIL_OFF[1],
            WB_TARGET_OFF[0],
            WB_TARGET_OFF[1],
        ];
        for w in ctrl.windows(2) {
            assert!(w[0] + rec <= w[1]);
        }
        assert!(ctrl[5] + rec <= KSET_SLOTS_OFF);
        // Segment header: segment_info x2, gen x2, data area.
        assert!(SEG_INFO_OFF[0] + rec <= SEG_INFO_OFF[1]);
        assert!(SEG_INFO_OFF[1] + rec <= SEG_GEN_OFF[0]);
        assert!(SEG_GEN_OFF[0] + SegGen::BYTES as u64 <= SEG_GEN_OFF[1]);
        assert!(SEG_GEN_OFF[1] + SegGen::BYTES as u64 <= SEG_DATA_OFF);
    }

    #[test]
    fn geometry_constants_are_consistent() {
        assert_eq!(1u64 << REGION_SHIFT, REGION_BYTES);
        assert_eq!(KSET_MAX_BYTES, 48 + 40 * 128);
        assert_eq!(SEG_DATA_OFF % SECTOR_BYTES, 0);
        assert_eq!(SEGMENTS_OFF % 4096, 0);
        // A largest kset plus a LAST and a terminator fit in one segment.
        assert!((KSET_MAX_BYTES + 2 * KSET_HEADER_BYTES) as u64 <= SEG_DATA_BYTES);
    }

    #[test]
    fn record_crc_is_standard_crc32c_of_bytes_after_the_first_four() {
        // Check value of CRC-32C (Castagnoli): crc32c("123456789") = 0xE3069283.
        let mut buf = *b"\xff\xff\xff\xff123456789";
        assert_eq!(crate::format::record_crc(&buf), 0xE306_9283);
        buf[0] = 0;
        assert_eq!(crate::format::record_crc(&buf), 0xE306_9283);
    }
}
