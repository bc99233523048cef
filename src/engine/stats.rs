//! Counters kept by the engine, readable at any time without locks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters. All relaxed atomics: they are for humans and status.
#[derive(Debug, Default)]
pub struct Stats {
    /// Read bytes served from the cache.
    pub read_hit_bytes: AtomicU64,
    /// Read bytes served from the backing store.
    pub read_miss_bytes: AtomicU64,
    /// Read requests (pieces of at most 4 MiB) fully served from cache.
    pub read_hits: AtomicU64,
    /// Read requests needing the backing store for at least one piece.
    pub read_misses: AtomicU64,
    /// Bytes written into the cache by the guest.
    pub write_bytes: AtomicU64,
    /// Bytes inserted by miss fills.
    pub fill_bytes: AtomicU64,
    /// Bytes the guest zeroed or discarded.
    pub zeroed_bytes: AtomicU64,
    /// Bytes of sequential write streams sent around the cache.
    pub write_bypass_bytes: AtomicU64,
    /// Bytes of sequential read streams not filled into the cache.
    pub read_nofill_bytes: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Times a request found the cache full.
    pub cache_full: AtomicU64,
    /// Times a request found its kset being closed, or full and left to
    /// the log closer (a cache file whose persists wait for I/O).
    pub log_busy: AtomicU64,
    /// Writes made to wait so that a running writeback batch frees space
    /// before the cache fills.
    pub writes_paced: AtomicU64,
    /// Ksets closed.
    pub ksets_closed: AtomicU64,
    /// Dirty bytes logged but not yet written back (overwritten data too).
    pub dirty_bytes: AtomicU64,
    /// Bytes zeroed or discarded by the guest and logged, not yet passed
    /// to the backing store (they take no cache space).
    pub dirty_zero_bytes: AtomicU64,
    /// Bytes written back to the backing store.
    pub writeback_bytes: AtomicU64,
    /// Backing-store errors seen by writeback (each retried).
    pub writeback_errors: AtomicU64,
    /// Writeback batches completed (one backing flush each).
    pub writeback_batches: AtomicU64,
    /// Segments freed by GC.
    pub gc_segs_freed: AtomicU64,
    /// Data CRC mismatches found.
    pub data_crc_errors: AtomicU64,
    /// Ranges marked bad: dirty data found failing its CRC by writeback,
    /// which reads now fail on until the guest writes them again.
    pub bad_ranges_marked: AtomicU64,
    /// Stale keys skipped at replay.
    pub replay_stale_keys: AtomicU64,
    /// Keys replayed into the index at open.
    pub replay_keys: AtomicU64,
    /// Of those, keys found in the kset slots (writes completed but not yet
    /// in the log when the last process stopped).
    pub replay_staged_keys: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// See [`Stats::read_hit_bytes`].
    pub read_hit_bytes: u64,
    /// See [`Stats::read_miss_bytes`].
    pub read_miss_bytes: u64,
    /// See [`Stats::read_hits`].
    pub read_hits: u64,
    /// See [`Stats::read_misses`].
    pub read_misses: u64,
    /// See [`Stats::write_bytes`].
    pub write_bytes: u64,
    /// See [`Stats::fill_bytes`].
    pub fill_bytes: u64,
    /// See [`Stats::zeroed_bytes`].
    #[serde(default)]
    pub zeroed_bytes: u64,
    /// See [`Stats::write_bypass_bytes`].
    #[serde(default)]
    pub write_bypass_bytes: u64,
    /// See [`Stats::read_nofill_bytes`].
    #[serde(default)]
    pub read_nofill_bytes: u64,
    /// See [`Stats::flushes`].
    pub flushes: u64,
    /// See [`Stats::cache_full`].
    pub cache_full: u64,
    /// See [`Stats::log_busy`].
    #[serde(default)]
    pub log_busy: u64,
    /// See [`Stats::writes_paced`].
    #[serde(default)]
    pub writes_paced: u64,
    /// See [`Stats::ksets_closed`].
    pub ksets_closed: u64,
    /// See [`Stats::dirty_bytes`].
    pub dirty_bytes: u64,
    /// See [`Stats::dirty_zero_bytes`].
    #[serde(default)]
    pub dirty_zero_bytes: u64,
    /// See [`Stats::writeback_bytes`].
    pub writeback_bytes: u64,
    /// See [`Stats::writeback_errors`].
    pub writeback_errors: u64,
    /// See [`Stats::writeback_batches`].
    #[serde(default)]
    pub writeback_batches: u64,
    /// See [`Stats::gc_segs_freed`].
    pub gc_segs_freed: u64,
    /// See [`Stats::data_crc_errors`].
    pub data_crc_errors: u64,
    /// See [`Stats::bad_ranges_marked`].
    #[serde(default)]
    pub bad_ranges_marked: u64,
    /// See [`Stats::replay_stale_keys`].
    pub replay_stale_keys: u64,
    /// See [`Stats::replay_keys`].
    pub replay_keys: u64,
    /// See [`Stats::replay_staged_keys`].
    #[serde(default)]
    pub replay_staged_keys: u64,
}

impl Stats {
    /// Read every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            read_hit_bytes: g(&self.read_hit_bytes),
            read_miss_bytes: g(&self.read_miss_bytes),
            read_hits: g(&self.read_hits),
            read_misses: g(&self.read_misses),
            write_bytes: g(&self.write_bytes),
            fill_bytes: g(&self.fill_bytes),
            zeroed_bytes: g(&self.zeroed_bytes),
            write_bypass_bytes: g(&self.write_bypass_bytes),
            read_nofill_bytes: g(&self.read_nofill_bytes),
            flushes: g(&self.flushes),
            cache_full: g(&self.cache_full),
            log_busy: g(&self.log_busy),
            writes_paced: g(&self.writes_paced),
            ksets_closed: g(&self.ksets_closed),
            dirty_bytes: g(&self.dirty_bytes),
            dirty_zero_bytes: g(&self.dirty_zero_bytes),
            writeback_bytes: g(&self.writeback_bytes),
            writeback_errors: g(&self.writeback_errors),
            writeback_batches: g(&self.writeback_batches),
            gc_segs_freed: g(&self.gc_segs_freed),
            data_crc_errors: g(&self.data_crc_errors),
            bad_ranges_marked: g(&self.bad_ranges_marked),
            replay_stale_keys: g(&self.replay_stale_keys),
            replay_keys: g(&self.replay_keys),
            replay_staged_keys: g(&self.replay_staged_keys),
        }
    }
}

/// Subtract from a counter, stopping at zero.
pub(crate) fn sub(c: &AtomicU64, n: u64) {
    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// Add to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
