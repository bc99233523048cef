//! Writing dirty keys back to the backing store.
//!
//! From dirty_tail, in log order, the worker gathers a batch of ksets of one
//! flush epoch, writes their dirty keys to the backing store (only the
//! newest data for each sector in the batch), flushes the backing store, and
//! only then persists the new dirty_tail. Batching several ksets per
//! backing flush differs from dm-pcache (one kset per flush); keeping a
//! batch inside one flush epoch keeps what dm-pcache guarantees: after a
//! crash the backing store holds everything up to some guest flush plus part
//! of the next epoch, never writes of a later epoch without all of an
//! earlier one.

use super::index::{Extent, ExtentMap};
use super::{stats, Engine, Error, Result};
use crate::backing::{BackingQueue, BufPool, Completion, IoOp};
use crate::format::{self, data_off, PosOnMedia, KEY_FLAG_CLEAN, KSET_MAX_BYTES, SECTOR_BYTES};

/// Most ksets in one writeback batch.
const BATCH_KSETS: usize = 64;
/// Stop adding ksets to a batch once it holds this much dirty data.
const BATCH_BYTES: u64 = 64 << 20;
/// Most bytes of backing writes in flight at once.
pub(super) const INFLIGHT_BYTES: u64 = 32 << 20;

/// What one writeback pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing was dirty (dirty_tail == key_head).
    Clean,
    /// dirty_tail moved forward.
    Advanced {
        /// Ksets consumed (LAST ones included).
        ksets: usize,
        /// Bytes written to the backing store.
        bytes: u64,
    },
}

/// A dirty extent in a batch: where its newest data lives in pmem.
#[derive(Debug, Clone, Copy)]
struct WbExt {
    sectors: u32,
    seg: u32,
    seg_off: u32,
}

impl Extent for WbExt {
    const EMPTY: WbExt = WbExt {
        sectors: 0,
        seg: 0,
        seg_off: 0,
    };
    fn len(&self) -> u32 {
        self.sectors
    }
    fn set_len(&mut self, len: u32) {
        self.sectors = len;
    }
    fn skip_front(&mut self, n: u32) {
        self.sectors -= n;
        self.seg_off += n * SECTOR_BYTES as u32;
    }
}

impl Engine {
    /// One writeback pass: write back a batch from dirty_tail and persist
    /// the new dirty_tail. On a backing error nothing moves; the caller
    /// retries later (with backoff) and the dirty data stays in the cache.
    pub fn writeback_once(&self, q: &mut BackingQueue) -> Result<Progress> {
        let mut pool = self.writeback_lock.lock().expect("writeback lock");
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let head = self.key_head();
        let start = self.dirty_tail();
        let mut pos = start;
        let mut map: ExtentMap<u64, WbExt> = ExtentMap::default();
        let mut epoch = None;
        let mut ksets = 0usize;
        let mut logged_dirty = 0u64;
        let mut buf = [0u8; KSET_MAX_BYTES];
        // Only ksets before key_head are complete; key_head moves only
        // after a kset is persisted.
        while pos.lsn < head.lsn && ksets < BATCH_KSETS && logged_dirty < BATCH_BYTES {
            let view = self.read_kset(pos, &mut buf).map_err(|end| {
                Error::Format(format::Error::Corrupt {
                    what: "key log",
                    offset: data_off(pos.seg, pos.off),
                    detail: format!(
                        "writeback found {end:?} before key_head (lsn {} < {})",
                        pos.lsn, head.lsn
                    ),
                })
            })?;
            let h = view.header;
            if h.is_last() {
                pos = PosOnMedia {
                    seg: h.next_seg,
                    off: 0,
                    lsn: pos.lsn + 1,
                };
                ksets += 1;
                continue;
            }
            if epoch.is_some_and(|e| e != h.epoch) {
                break;
            }
            epoch = Some(h.epoch);
            for (i, key) in view.iter().enumerate() {
                let at = data_off(pos.seg, pos.off)
                    + (format::KSET_HEADER_BYTES + i * format::KEY_BYTES) as u64;
                key.validate(self.n_segs, self.backing_bytes, at)?;
                if key.flags & KEY_FLAG_CLEAN != 0 {
                    continue;
                }
                logged_dirty += key.len as u64;
                if key.gen != self.segs.gen(key.seg) {
                    continue; // stale: reclaimed, so already written back
                }
                if self.data_crc
                    && self
                        .region
                        .crc32c(data_off(key.seg, key.seg_off), key.len as usize)
                        != key.data_crc
                {
                    stats::add(&self.stats.data_crc_errors, 1);
                    tracing::error!(
                        off = key.off,
                        len = key.len,
                        "dirty data failed its CRC; not writing it back"
                    );
                    continue;
                }
                map.insert(
                    key.off / SECTOR_BYTES,
                    WbExt {
                        sectors: key.len / SECTOR_BYTES as u32,
                        seg: key.seg,
                        seg_off: key.seg_off,
                    },
                );
            }
            pos.off += h.bytes() as u32;
            pos.lsn += 1;
            ksets += 1;
        }
        if ksets == 0 {
            // Nothing to do for a while, probably: give the buffers back.
            *pool = BufPool::new(INFLIGHT_BYTES as usize);
            return Ok(Progress::Clean);
        }
        let bytes = self.write_batch(q, &map, &mut pool)?;
        // dirty_tail may only pass these keys once they are durable on the
        // backing store.
        flush_backing(q)?;
        {
            let mut t = self.dirty_tail.lock().expect("dirty_tail lock");
            self.write_tail(&mut t, format::DIRTY_TAIL_OFF, pos)?;
        }
        stats::sub(&self.stats.dirty_bytes, logged_dirty);
        stats::add(&self.stats.writeback_bytes, bytes);
        self.gc_kick.kick();
        Ok(Progress::Advanced { ksets, bytes })
    }

    fn write_batch(
        &self,
        q: &mut BackingQueue,
        map: &ExtentMap<u64, WbExt>,
        pool: &mut BufPool,
    ) -> Result<u64> {
        let mut done = Vec::new();
        let mut inflight = 0u64;
        let mut total = 0u64;
        let mut first_err: Option<std::io::Error> = None;
        let reap = |done: &mut Vec<Completion>,
                    inflight: &mut u64,
                    first_err: &mut Option<std::io::Error>,
                    pool: &mut BufPool| {
            for c in done.drain(..) {
                if let IoOp::Write { buf, .. } = c.op {
                    *inflight -= buf.len() as u64;
                    pool.give(buf);
                }
                if let Err(e) = c.result {
                    first_err.get_or_insert(e);
                }
            }
        };
        let mut halted = false;
        for (start, e) in map.iter() {
            if self.halting.load(std::sync::atomic::Ordering::Relaxed) {
                halted = true;
                break;
            }
            let len = e.sectors as u64 * SECTOR_BYTES;
            while inflight > 0 && inflight + len > INFLIGHT_BYTES {
                q.wait(1, &mut done);
                reap(&mut done, &mut inflight, &mut first_err, pool);
            }
            let mut buf = pool.take(len as usize);
            self.region.read(data_off(e.seg, e.seg_off), &mut buf);
            q.submit(
                0,
                IoOp::Write {
                    off: start * SECTOR_BYTES,
                    buf,
                },
            );
            inflight += len;
            total += len;
        }
        while q.in_flight() > 0 {
            q.wait(1, &mut done);
            reap(&mut done, &mut inflight, &mut first_err, pool);
        }
        if let Some(e) = first_err {
            stats::add(&self.stats.writeback_errors, 1);
            return Err(Error::Backing(e));
        }
        if halted {
            return Err(Error::Stopping);
        }
        Ok(total)
    }

    /// Write back everything dirty now (the offline `pcache writeback`, and
    /// shutdown with draining). Closes open ksets first. `progress` gets the
    /// dirty bytes left after each pass.
    pub fn writeback_all(&self, q: &mut BackingQueue, mut progress: impl FnMut(u64)) -> Result<()> {
        self.flush()?;
        loop {
            match self.writeback_once(q)? {
                Progress::Clean => return Ok(()),
                Progress::Advanced { .. } => progress(self.stats.snapshot().dirty_bytes),
            }
        }
    }

    /// What the writeback policy looks at, now. Clears the flag set by a
    /// writer waiting for space.
    pub fn observe(&self) -> super::Observation {
        let s = &self.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        super::Observation {
            now: std::time::Instant::now(),
            dirty_bytes: load(&s.dirty_bytes),
            capacity: self.n_segs as u64 * format::SEG_DATA_BYTES,
            activity: load(&s.write_bytes)
                .wrapping_add(load(&s.read_hit_bytes))
                .wrapping_add(load(&s.read_miss_bytes))
                .wrapping_add(load(&s.flushes)),
            head_lsn: self.key_head().lsn,
            dirty_lsn: self.dirty_tail().lsn,
            space_wanted: self
                .writeback_wanted
                .swap(false, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Is there logged dirty data not yet written back?
    pub fn is_dirty(&self) -> bool {
        self.dirty_tail().lsn < self.key_head().lsn
    }
}

fn flush_backing(q: &mut BackingQueue) -> Result<()> {
    let mut done = Vec::new();
    q.submit(0, IoOp::Flush);
    while q.in_flight() > 0 {
        q.wait(1, &mut done);
    }
    for c in done {
        c.result.map_err(Error::Backing)?;
    }
    Ok(())
}
