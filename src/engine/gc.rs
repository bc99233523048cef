//! Garbage collection: reclaiming segments from key_tail.
//!
//! When the share of used segments reaches gc_percent (or a writer found
//! the cache full), GC walks the log from key_tail up to dirty_tail (never
//! past it: those keys are not written back yet) and drops one segment
//! reference per key; a data segment whose last reference goes is
//! invalidated and freed. Log segments are freed when key_tail leaves them.
//! Eviction is FIFO in log order, as in dm-pcache.

use super::cache::Engine;
use super::error::{Error, Result};
use super::stats;
use crate::format::{self, data_off, KSET_MAX_BYTES};

/// Persist key_tail at least this often (in ksets) during a GC pass.
///
/// The references of the keys passed are dropped only once key_tail is
/// persisted past them, so a data segment is never freed (its gen bumped)
/// while a key of it can still be replayed. Otherwise a crash could replay
/// an older key of a sector (of a segment still in use, or a dataless one)
/// without the newer key that replaced it, which would be skipped as stale:
/// the sector would read older data. References live in memory only, so a
/// crash after the persist and before the drops loses nothing.
const TAIL_PERSIST_KSETS: usize = 32;

impl Engine {
    pub(super) fn gc_wanted(&self, forced: bool) -> bool {
        let used = self.segs.used() as u64;
        let pct = self.gc_percent() as u64;
        forced || used * 100 >= self.n_segs as u64 * pct
    }

    /// See [`Engine::gc_once`].
    pub(super) fn gc_pass(&self, forced: bool) -> Result<u32> {
        let _pass = self.gc_lock.lock().expect("gc lock");
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let dirty = self.dirty_tail();
        let mut tail = self.key_tail.lock().expect("key_tail lock");
        let mut pos = tail.pos;
        let mut freed = 0u32;
        let mut log_freed = 0u32;
        let mut data_freed = false;
        let mut since_persist = 0usize;
        // References of keys key_tail passed, dropped once it is persisted.
        let mut passed: Vec<u32> = Vec::new();
        let mut drop_refs = |passed: &mut Vec<u32>| -> Result<()> {
            for seg in passed.drain(..) {
                let before = self.segs.used();
                self.segs
                    .put_ref(&self.region, seg)
                    .map_err(Error::Persist)?;
                if self.segs.used() < before {
                    freed += 1;
                    data_freed = true;
                }
            }
            Ok(())
        };
        let mut buf = [0u8; KSET_MAX_BYTES];
        let used_before = self.segs.used();
        while pos.lsn < dirty.lsn && self.gc_wanted(forced) {
            let view = self.read_kset(pos, &mut buf).map_err(|end| {
                Error::Format(format::Error::Corrupt {
                    what: "key log",
                    offset: data_off(pos.seg, pos.off),
                    detail: format!(
                        "GC found {end:?} before dirty_tail (lsn {} < {})",
                        pos.lsn, dirty.lsn
                    ),
                })
            })?;
            let h = view.header;
            if h.is_last() {
                let old = pos.seg;
                pos = pos.in_next_segment(h.next_seg);
                // key_tail must leave the segment durably before it can be
                // reused and overwritten.
                self.write_tail(&mut tail, format::KEY_TAIL_OFF, pos)?;
                since_persist = 0;
                drop_refs(&mut passed)?;
                self.segs.free(old);
                log_freed += 1;
                continue;
            }
            for (i, key) in view.iter().enumerate() {
                let at = pos.key_at(i);
                key.validate(self.n_segs, self.size(), at)?;
                if key.flags & format::KEY_FLAG_BAD != 0 {
                    // Before key_tail can pass it (see bad.rs).
                    self.carry_bad(&key)?;
                }
                if key.is_dataless() {
                    continue; // holds no reference
                }
                // A key holds a reference only while its gen is current
                // (which it stays while the reference is held).
                if key.gen == self.segs.gen(key.seg) {
                    passed.push(key.seg);
                }
            }
            pos.off += h.bytes() as u32;
            pos.lsn += 1;
            since_persist += 1;
            if since_persist >= TAIL_PERSIST_KSETS {
                self.write_tail(&mut tail, format::KEY_TAIL_OFF, pos)?;
                since_persist = 0;
                drop_refs(&mut passed)?;
            }
        }
        if pos != tail.pos {
            self.write_tail(&mut tail, format::KEY_TAIL_OFF, pos)?;
        }
        drop_refs(&mut passed)?;
        freed += log_freed;
        drop(tail);
        if data_freed {
            self.sweep_stale();
        }
        if freed > 0 {
            stats::add(&self.stats.gc_segs_freed, freed as u64);
            tracing::debug!(freed, used_before, used = self.segs.used(), "gc pass");
        }
        Ok(freed)
    }

    /// Drop index extents whose segment was reclaimed, so DRAM use follows
    /// the cache's contents rather than everything ever cached.
    fn sweep_stale(&self) {
        for (_, shard) in self.shards.iter() {
            let mut sh = shard.lock().expect("shard lock");
            sh.map
                .retain(|e| e.is_dataless() || self.segs.gen(e.seg) as u32 == e.gen);
        }
    }
}
