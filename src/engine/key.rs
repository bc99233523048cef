//! The in-memory form of a cached extent, and its conversion to and from the
//! on-media key.

use super::index::Extent;
use super::index::ExtentMap;
use crate::format::{
    KeyOnMedia, KEY_FLAG_BAD, KEY_FLAG_CLEAN, KEY_FLAG_FORGET, KEY_FLAG_ZERO, SECTOR_BYTES,
};

/// Extent flag: the data equals the backing store's (a read-miss fill).
pub const EXT_CLEAN: u8 = 1;
/// Extent flag: the range reads zeros; no data in the cache.
pub const EXT_ZERO: u8 = 1 << 1;
/// Extent flag: the range's newest data was lost; reads fail.
pub const EXT_BAD: u8 = 1 << 2;
/// Extent flag: the range is to be dropped from the index (never stored).
pub const EXT_FORGET: u8 = 1 << 3;

/// A cached extent as the index holds it: 24 bytes.
///
/// # Invariants
/// - `len > 0`, `seg_off + len` lies inside the segment's data area.
/// - A dataless extent (ZERO or BAD) has `seg`, `gen` and `crc` 0 and
///   points at no data: it leaves the index only when something replaces
///   it, never by a segment's gen.
/// - `orig_skip + len <= orig_len`: the extent is a slice of the key that
///   was logged, which `crc` covers (whole, from `seg_off - orig_skip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheExt {
    /// Cache segment holding the data.
    pub seg: u32,
    /// Low 32 bits of the segment gen when the data was written. Compared
    /// for equality only, so wrap-around needs 2^32 reuses of one segment.
    pub gen: u32,
    /// crc32c of the whole logged key's data (data_crc on), else 0.
    pub crc: u32,
    /// Sectors into the segment's data area.
    pub seg_off: u16,
    /// Sectors.
    pub len: u16,
    /// Sectors between the logged key's start and this extent's start.
    pub orig_skip: u16,
    /// Sectors of the logged key.
    pub orig_len: u16,
    /// `EXT_*` flags.
    pub flags: u8,
}

impl Extent for CacheExt {
    const EMPTY: CacheExt = CacheExt {
        seg: 0,
        gen: 0,
        crc: 0,
        seg_off: 0,
        len: 0,
        orig_skip: 0,
        orig_len: 0,
        flags: 0,
    };
    fn len(&self) -> u32 {
        self.len as u32
    }
    fn set_len(&mut self, len: u32) {
        debug_assert!(len > 0 && len <= self.len as u32);
        self.len = len as u16;
    }
    fn skip_front(&mut self, n: u32) {
        debug_assert!(n < self.len as u32);
        let n = n as u16;
        self.len -= n;
        self.seg_off += n;
        self.orig_skip += n;
    }
}

impl CacheExt {
    /// Build from a validated on-media key.
    pub fn from_key(k: &KeyOnMedia) -> CacheExt {
        let len = (k.len as u64 / SECTOR_BYTES) as u16;
        CacheExt {
            seg: k.seg,
            gen: k.gen as u32,
            crc: k.data_crc,
            seg_off: (k.seg_off as u64 / SECTOR_BYTES) as u16,
            len,
            orig_skip: 0,
            orig_len: len,
            flags: if k.flags & KEY_FLAG_CLEAN != 0 {
                EXT_CLEAN
            } else if k.flags & KEY_FLAG_ZERO != 0 {
                EXT_ZERO
            } else if k.flags & KEY_FLAG_BAD != 0 {
                EXT_BAD
            } else if k.flags & KEY_FLAG_FORGET != 0 {
                EXT_FORGET
            } else {
                0
            },
        }
    }

    /// Does the extent point at no data (ZERO or BAD)?
    pub fn is_dataless(&self) -> bool {
        self.flags & (EXT_ZERO | EXT_BAD | EXT_FORGET) != 0
    }

    /// Put this extent, replayed or logged at `start`, into `map`: a
    /// FORGET one only clears its range.
    pub fn apply(self, map: &mut ExtentMap<u16, CacheExt>, start: u64) {
        map.insert(start, self);
        if self.flags & EXT_FORGET != 0 {
            map.remove(start);
        }
    }

    /// Does the range read zeros?
    pub fn is_zero(&self) -> bool {
        self.flags & EXT_ZERO != 0
    }

    /// Was the range's newest data lost?
    pub fn is_bad(&self) -> bool {
        self.flags & EXT_BAD != 0
    }

    /// Is this a clean (read-miss) extent?
    pub fn is_clean(&self) -> bool {
        self.flags & EXT_CLEAN != 0
    }

    /// Byte offset of the extent's data inside its segment's data area.
    pub fn data_byte_off(&self) -> u32 {
        self.seg_off as u32 * SECTOR_BYTES as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_extent_is_24_bytes() {
        assert_eq!(std::mem::size_of::<CacheExt>(), 24);
    }

    #[test]
    fn skip_front_moves_data_and_remembers_the_logged_key() {
        let k = KeyOnMedia {
            off: 4096,
            len: 8192,
            flags: 0,
            seg: 3,
            seg_off: 1024,
            gen: 5,
            data_crc: 9,
        };
        let mut e = CacheExt::from_key(&k);
        e.skip_front(4);
        assert_eq!((e.seg_off, e.len, e.orig_skip, e.orig_len), (6, 12, 4, 16));
    }
}
