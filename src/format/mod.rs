//! On-media records of a pcache device: byte layout, crc32c, replica choice.
//!
//! This module owns every byte pcache writes to the cache medium and the
//! validation of every byte it reads back. It knows nothing about threads,
//! mappings or I/O: callers hand it byte slices. `docs/format.md` is the
//! written specification; the constants below are its source of truth.
//!
//! All integers are little endian. Every record carries a crc32c
//! (`crc32c::crc32c`, the standard Castagnoli CRC) of everything after its
//! first four bytes.
//!
//! Differs from dm-pcache: 64-bit sequence numbers on replicas, a 64-bit log
//! sequence number (LSN) and the format id in every kset header, a format
//! version and UUID in the superblock, bounds checks on every field, and
//! the open ksets mirrored on the medium (`slot.rs`).

mod kset;
mod layout;
mod meta;
mod slot;
mod superblock;

pub use kset::{encode_kset, encode_last};
pub use kset::{KeyOnMedia, KsetEnd, KsetHeader, KsetView, KSET_FLAG_LAST};
pub use kset::{KEY_FLAG_BAD, KEY_FLAG_CLEAN, KEY_FLAG_FORGET, KEY_FLAG_UNMAP, KEY_FLAG_ZERO};
pub use layout::*;
pub use meta::{
    pick_latest, CacheInfo, Latest, MetaRecord, PosOnMedia, SegGen, SegInfo, CACHE_FLAG_DATA_CRC,
    CACHE_FLAG_INIT_DONE, CACHE_FLAG_WB_NEWEST, CACHE_FLAG_WB_STRICT, CACHE_FLAG_WRITETHROUGH,
    SEG_INFO_TYPE_DATA,
};
pub use slot::*;
pub use superblock::Superblock;

/// What went wrong reading a record from the medium.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The superblock area holds no pcache magic (a blank or foreign device).
    #[error("No pcache superblock (the device was never formatted as a pcache cache)")]
    NotPcache,
    /// The superblock names a format version this build cannot read.
    #[error(
        "Unsupported pcache format version {found} (this build reads version {FORMAT_VERSION}); \
         write the cache back with the pcache that made it (`pcache writeback`), then format it again"
    )]
    Version {
        /// Version found on the medium.
        found: u32,
    },
    /// A record failed its CRC or holds a field out of range.
    #[error("Corrupt {what} at offset {offset:#x}: {detail}")]
    Corrupt {
        /// Which record, e.g. "superblock", "key_tail", "kset key 3".
        what: &'static str,
        /// Byte offset of the record on the cache medium.
        offset: u64,
        /// Why it was rejected.
        detail: String,
    },
    /// The cache medium's size cannot hold a pcache device.
    #[error("Cache size {bytes} bytes is invalid: {detail}")]
    BadSize {
        /// Size that was rejected.
        bytes: u64,
        /// Why.
        detail: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// crc32c of `buf[4..]`, the coverage rule shared by every record.
pub fn record_crc(buf: &[u8]) -> u32 {
    crc32c::crc32c(&buf[4..])
}
