//! What a writeback batch is made of: how writeback orders what reaches
//! the backing store, and the newest version of each dirty range it holds.

use crate::engine::index::Extent;
use crate::format::{self, SECTOR_BYTES};

/// A batch covers at most this many times its budget of logged bytes, so
/// one pass over a huge cache stays bounded.
pub(super) const LOGGED_PER_BUDGET: u64 = 16;
/// A batch covers at most this share of the cache (1/n): the rest is the
/// room guest writes use while it runs, and the next batch covers what
/// they wrote. Larger batches would leave the next ones smaller, and the
/// sizes would swing between the two.
pub(super) const LOGGED_SHARE_OF_CACHE: u64 = 2;

/// How writeback orders what reaches the backing store; see the module
/// documentation. Persisted in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WritebackOrder {
    /// Coalesce many flush epochs per batch; the backing store alone is
    /// consistent at batch boundaries.
    #[default]
    Batch,
    /// One flush epoch per batch; the backing store alone is always a flush
    /// boundary plus part of the next epoch.
    Strict,
    /// Only the newest durable version of each sector is written; the
    /// backing store alone is consistent only once the cache is clean.
    Newest,
}

impl WritebackOrder {
    /// Every order.
    pub const ALL: [WritebackOrder; 3] = [
        WritebackOrder::Batch,
        WritebackOrder::Strict,
        WritebackOrder::Newest,
    ];
}

impl std::str::FromStr for WritebackOrder {
    type Err = String;

    /// An order by its name (`batch`, `strict`, `newest`).
    fn from_str(s: &str) -> Result<WritebackOrder, String> {
        WritebackOrder::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| format!("{s:?} is not a writeback order (batch, strict, newest)"))
    }
}

impl WritebackOrder {
    /// Its name, as the command line and status spell it.
    pub fn name(self) -> &'static str {
        match self {
            WritebackOrder::Batch => "batch",
            WritebackOrder::Strict => "strict",
            WritebackOrder::Newest => "newest",
        }
    }
}

impl std::fmt::Display for WritebackOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a batch writes for a range: its newest version in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WbKind {
    /// Data in the cache, at `seg`/`seg_off`.
    Data,
    /// Zeros (`unmap`: the store may deallocate).
    Zero { unmap: bool },
    /// Nothing: the newest data was lost (a range marked bad).
    Skip,
}

/// A dirty extent in a batch: what its newest version is, and for data,
/// where it lives in the cache.
#[derive(Debug, Clone, Copy)]
pub(super) struct WbExt {
    pub(super) sectors: u32,
    pub(super) seg: u32,
    pub(super) seg_off: u32,
    pub(super) kind: WbKind,
    /// The lsn of the kset holding this version.
    pub(super) lsn: u64,
}

impl Extent for WbExt {
    const EMPTY: WbExt = WbExt {
        sectors: 0,
        seg: 0,
        seg_off: 0,
        kind: WbKind::Skip,
        lsn: 0,
    };
    fn len(&self) -> u32 {
        self.sectors
    }
    fn set_len(&mut self, len: u32) {
        self.sectors = len;
    }
    fn skip_front(&mut self, n: u32) {
        self.sectors -= n;
        if self.kind == WbKind::Data {
            self.seg_off += n * SECTOR_BYTES as u32;
        }
    }
}

impl WbExt {
    /// The batch entry for a dataless key, or a key marked bad.
    pub(super) fn dataless(key: &format::KeyOnMedia, kind: WbKind, lsn: u64) -> WbExt {
        WbExt {
            sectors: key.len / SECTOR_BYTES as u32,
            seg: 0,
            seg_off: 0,
            kind,
            lsn,
        }
    }
}
