//! How a record read from the medium is judged: the crc every record
//! carries, and the error a bad one gives.

/// On-media format version written by this build. Version 2 added the kset
/// slots (and moved the segments after them); version 1 media are refused.
pub const FORMAT_VERSION: u32 = 2;

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
