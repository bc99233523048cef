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

mod check;
mod kset;
mod layout;
mod meta;
mod slot;
mod superblock;

pub use check::{record_crc, Error, Result};

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
