//! Ranges whose newest data was lost.
//!
//! When writeback finds dirty data failing its CRC, that data is the only
//! copy of what the guest wrote, and the backing store holds something
//! older. Writing either back would hand the guest wrong data without an
//! error, so the range is marked bad instead: a dataless BAD key takes the
//! place of the corrupt data in the index and in the log, and reads of it
//! fail until the guest writes (or zeroes) the range again.
//!
//! A BAD key must outlive the log it is in: when GC passes one, the part
//! of its range the index still holds as bad is logged again, before
//! key_tail moves past it, so a restart finds it again.

use super::cache::{region_of, Engine};
use super::error::Result;
use super::key::CacheExt;
use super::stats;
use crate::format::{KeyOnMedia, KEY_FLAG_BAD, REGION_BYTES, SECTOR_BYTES};

impl Engine {
    /// Mark bad what the index still holds of the dirty key `key` (whose
    /// data failed its CRC); a newer write of part of it is left alone.
    /// Returns the bytes marked.
    pub(super) fn mark_bad(&self, key: &KeyOnMedia) -> Result<u64> {
        let same_key = |e: &CacheExt| {
            !e.is_dataless()
                && !e.is_clean()
                && e.seg == key.seg
                && e.gen == key.gen as u32
                && u64::from(e.seg_off - e.orig_skip) * SECTOR_BYTES == u64::from(key.seg_off)
        };
        let bytes = self.relog_bad(key, same_key)?;
        if bytes > 0 {
            stats::add(&self.stats.bad_ranges_marked, 1);
            tracing::error!(
                off = key.off,
                len = bytes,
                "dirty data failed its CRC before writeback: the range is marked bad, \
                 and reads of it fail until the guest writes it again"
            );
        }
        Ok(bytes)
    }

    /// GC is about to pass the BAD key `key`: log again what the index
    /// still holds as bad in its range.
    pub(super) fn carry_bad(&self, key: &KeyOnMedia) -> Result<u64> {
        self.relog_bad(key, CacheExt::is_bad)
    }

    /// Under the shard lock, replace each piece of `key`'s range whose
    /// extent passes `pick` by a BAD key, in the index and in the log.
    fn relog_bad(&self, key: &KeyOnMedia, pick: impl Fn(&CacheExt) -> bool) -> Result<u64> {
        let region = region_of(key.off);
        let Some(shard) = self.shard(region) else {
            return Ok(0);
        };
        let base = region * REGION_BYTES;
        let mut sh = shard.lock().expect("shard lock");
        let start = (key.off - base) / SECTOR_BYTES;
        let mut pieces = Vec::new();
        sh.map
            .lookup(start, u64::from(key.len) / SECTOR_BYTES, |s, n, e| {
                if e.is_some_and(|(_, ext)| pick(&ext)) {
                    pieces.push((s, n));
                }
            });
        let mut ks = self.kset_for(region).lock().expect("kset lock");
        let mut marked = 0;
        for (s, n) in pieces {
            if ks.is_full() {
                self.kset_close(&mut ks)?;
            }
            let bad = KeyOnMedia::dataless(
                base + s * SECTOR_BYTES,
                (n * SECTOR_BYTES) as u32,
                KEY_FLAG_BAD,
            );
            sh.map.insert(s, CacheExt::from_key(&bad));
            sh.write_version += 1;
            self.kset_push(&mut ks, &bad);
            marked += n * SECTOR_BYTES;
        }
        if marked > 0 {
            // Durable now, not at the kset's age: the caller moves a tail
            // past the key this one replaces.
            self.kset_close(&mut ks)?;
        }
        Ok(marked)
    }

    /// See [`Engine::bad_ranges`].
    pub(super) fn bad_list(&self, limit: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (region, shard) in self.shards.iter() {
            let base = region * REGION_BYTES;
            let sh = shard.lock().expect("shard lock");
            for (s, e) in sh.map.iter().filter(|(_, e)| e.is_bad()) {
                let off = base + s * SECTOR_BYTES;
                let len = u64::from(e.len) * SECTOR_BYTES;
                if let Some(last) = out.last_mut().filter(|l| l.0 + l.1 == off) {
                    last.1 += len;
                } else if out.len() == limit {
                    return out;
                } else {
                    out.push((off, len));
                }
            }
        }
        out
    }
}
