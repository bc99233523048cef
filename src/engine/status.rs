//! The engine's public surface for whoever reports on it (`status`,
//! `inspect`, metrics, the writeback policy): read-only views.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::cache::Engine;
use super::mode::CacheMode;
use super::stats::Stats;
use super::writeback::WritebackOrder;
use crate::format::{self, PosOnMedia, Superblock};
use crate::pmem::Region;

/// Heap bytes one extent of the index takes: 44 measured by
/// `benches/engine.rs` (a B-tree entry and its share of a node), plus the
/// allocator's share.
pub const INDEX_BYTES_PER_EXTENT: u64 = 48;

impl Engine {
    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The mapped medium.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Size of the cached device in bytes (= the backing store's size).
    pub fn size(&self) -> u64 {
        self.backing_bytes.load(Ordering::Acquire)
    }

    /// Number of segments.
    pub fn n_segs(&self) -> u32 {
        self.n_segs
    }

    /// Was the cache opened read-only (nothing is ever written to it)?
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Is per-key data CRC on?
    pub fn data_crc(&self) -> bool {
        self.data_crc
    }

    /// Current gc_percent.
    pub fn gc_percent(&self) -> u8 {
        self.gc_percent.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Segments in use.
    pub fn segs_used(&self) -> u32 {
        self.segs.used()
    }

    /// key_head: where the next kset goes.
    pub fn key_head(&self) -> PosOnMedia {
        self.log.lock().expect("log lock").pos
    }

    /// dirty_tail: the first kset not yet written back.
    pub fn dirty_tail(&self) -> PosOnMedia {
        self.dirty_tail.lock().expect("dirty_tail lock").pos
    }

    /// key_tail: the first kset not yet reclaimed by GC.
    pub fn key_tail(&self) -> PosOnMedia {
        self.key_tail.lock().expect("key_tail lock").pos
    }

    /// Has a persist failed?
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Did the guest turn its write cache off (virtio-blk CONFIG_WCE)? The
    /// frontend sets it once and does not repeat it to a restarted backend,
    /// so the cache keeps it.
    pub fn guest_writethrough(&self) -> bool {
        let s = self.settings.lock().expect("settings lock");
        s.info.flags & format::CACHE_FLAG_WRITETHROUGH != 0
    }

    /// Number of extents in the index (walks every shard).
    pub fn extent_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|(_, s)| s.lock().expect("shard lock").map.len() as u64)
            .sum()
    }

    /// Memory the extent index takes, in bytes: its table of shards, and
    /// each extent at [`INDEX_BYTES_PER_EXTENT`].
    pub fn index_bytes(&self) -> u64 {
        self.shards.bytes() + self.extent_count() * INDEX_BYTES_PER_EXTENT
    }

    /// The cache mode now.
    pub fn mode(&self) -> CacheMode {
        CacheMode::from_code(self.mode.load(Ordering::Acquire))
    }

    /// The mode a switch in progress goes to.
    pub fn switching_to(&self) -> Option<CacheMode> {
        *self.mode_target.lock().expect("mode lock")
    }

    /// Is a live migration's copy phase on?
    pub fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    /// Up to `limit` ranges (guest byte offset, bytes) marked bad, in
    /// order.
    pub fn bad_ranges(&self, limit: usize) -> Vec<(u64, u64)> {
        self.bad_list(limit)
    }

    /// How writeback orders what reaches the backing store.
    pub fn writeback_order(&self) -> WritebackOrder {
        let s = self.settings.lock().expect("settings lock");
        if s.info.flags & format::CACHE_FLAG_WB_STRICT != 0 {
            WritebackOrder::Strict
        } else if s.info.flags & format::CACHE_FLAG_WB_NEWEST != 0 {
            WritebackOrder::Newest
        } else {
            WritebackOrder::Batch
        }
    }

    /// Is there logged dirty data not yet written back?
    pub fn is_dirty(&self) -> bool {
        self.dirty_tail().lsn < self.key_head().lsn
    }
}
