//! Gathering a writeback batch from the key log: the newest version of each
//! sector over a stretch of ksets from dirty_tail, and for
//! [`WritebackOrder::Newest`] the cut that leaves replaced versions out.

use super::batch::{WbExt, WbKind, WritebackOrder, LOGGED_PER_BUDGET, LOGGED_SHARE_OF_CACHE};
use crate::engine::cache::Engine;
use crate::engine::error::{Error, Result};
use crate::engine::index::ExtentMap;
use crate::format::{
    self, data_off, PosOnMedia, KEY_FLAG_BAD, KEY_FLAG_FORGET, KEY_FLAG_UNMAP, KEY_FLAG_ZERO,
    KSET_MAX_BYTES, SECTOR_BYTES,
};

/// A gathered batch.
pub(super) struct Batch {
    pub(super) map: ExtentMap<u64, WbExt>,
    /// Where dirty_tail goes once the batch is on the backing store.
    pub(super) end: PosOnMedia,
    pub(super) ksets: usize,
    /// Dirty bytes the batch's keys held when logged (superseded included).
    pub(super) logged_dirty: u64,
    /// Bytes of the batch's ZERO keys (superseded included).
    pub(super) logged_zero: u64,
    /// Dirty keys whose data failed its CRC, in log order.
    pub(super) bad: Vec<format::KeyOnMedia>,
}

impl Engine {
    /// Gather the next batch from dirty_tail: up to `budget` distinct bytes,
    /// never short of `target`, and within one flush epoch in strict order.
    /// None when nothing is dirty.
    pub(super) fn gather(&self, target: PosOnMedia, budget: u64) -> Result<Option<Batch>> {
        let order = self.writeback_order();
        let strict = order == WritebackOrder::Strict;
        let newest = order == WritebackOrder::Newest;
        // Only ksets before key_head are complete; key_head moves only
        // after a kset is persisted.
        let head = self.key_head();
        let mut pos = self.dirty_tail();
        let budget_sectors = budget / SECTOR_BYTES;
        // A hot set coalesces best over a long stretch of log; bound the
        // stretch so one pass stays bounded too.
        let capacity = self.n_segs as u64 * format::SEG_DATA_BYTES;
        let max_logged = if newest {
            // Look at all the durable dirty log: the further, the more
            // versions are replaced. The cut comes afterwards.
            capacity
        } else {
            budget
                .saturating_mul(LOGGED_PER_BUDGET)
                .min(capacity / LOGGED_SHARE_OF_CACHE)
        };
        let mut marks: Vec<Mark> = Vec::new();
        let mut map: ExtentMap<u64, WbExt> = ExtentMap::default();
        let mut epoch = None;
        let mut ksets = 0usize;
        let mut logged_dirty = 0u64;
        let mut logged_zero = 0u64;
        let mut bad = Vec::new();
        let mut buf = [0u8; KSET_MAX_BYTES];
        while pos.lsn < head.lsn {
            let must = pos.lsn < target.lsn;
            let full = !newest && map.covered() >= budget_sectors;
            if !must && (full || logged_dirty >= max_logged) {
                break;
            }
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
            // The lsn of a kset holding keys; a LAST one only links on.
            let mut kset_lsn = None;
            if h.is_last() {
                pos = pos.in_next_segment(h.next_seg);
            } else {
                if strict && !must && epoch.is_some_and(|e| e != h.epoch) {
                    break;
                }
                epoch = Some(h.epoch);
                for (i, key) in view.iter().enumerate() {
                    let at = pos.key_at(i);
                    key.validate(self.n_segs, self.size(), at)?;
                    if key.is_clean() {
                        continue;
                    }
                    // A later key for the same sectors replaces this one: only
                    // the newest version in the batch is written.
                    let start = key.off / SECTOR_BYTES;
                    if key.flags & KEY_FLAG_ZERO != 0 {
                        logged_zero += key.len as u64;
                        let unmap = key.flags & KEY_FLAG_UNMAP != 0;
                        map.insert(
                            start,
                            WbExt::dataless(&key, WbKind::Zero { unmap }, pos.lsn),
                        );
                        continue;
                    }
                    if key.flags & (KEY_FLAG_BAD | KEY_FLAG_FORGET) != 0 {
                        // Nothing to write: lost data, or already on the store.
                        map.insert(start, WbExt::dataless(&key, WbKind::Skip, pos.lsn));
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
                        // Neither this nor an older version is written: the
                        // range is marked bad before dirty_tail passes it.
                        map.insert(start, WbExt::dataless(&key, WbKind::Skip, pos.lsn));
                        bad.push(key);
                        continue;
                    }
                    map.insert(
                        start,
                        WbExt {
                            sectors: key.len / SECTOR_BYTES as u32,
                            seg: key.seg,
                            seg_off: key.seg_off,
                            kind: WbKind::Data,
                            lsn: pos.lsn,
                        },
                    );
                }
                kset_lsn = Some(pos.lsn);
                pos.off += h.bytes() as u32;
                pos.lsn += 1;
            }
            ksets += 1;
            if newest {
                marks.push(Mark::after(
                    pos,
                    ksets,
                    logged_dirty,
                    logged_zero,
                    bad.len(),
                    kset_lsn,
                ));
            }
        }
        if ksets == 0 {
            return Ok(None);
        }
        if newest {
            return Ok(Some(cut_newest(map, &marks, bad, target, budget_sectors)));
        }
        Ok(Some(Batch {
            map,
            end: pos,
            ksets,
            logged_dirty,
            logged_zero,
            bad,
        }))
    }
}

/// The state of a gather after one kset, for [`cut_newest`].
struct Mark {
    /// Position after the kset.
    end: PosOnMedia,
    ksets: usize,
    logged_dirty: u64,
    logged_zero: u64,
    bad: usize,
    /// The kset's lsn (None for a LAST kset, which holds no keys).
    lsn: Option<u64>,
}

impl Mark {
    fn after(
        end: PosOnMedia,
        ksets: usize,
        dirty: u64,
        zero: u64,
        bad: usize,
        lsn: Option<u64>,
    ) -> Mark {
        Mark {
            end,
            ksets,
            logged_dirty: dirty,
            logged_zero: zero,
            bad,
            lsn,
        }
    }
}

/// [`WritebackOrder::Newest`]: `map` holds the newest version of every
/// sector over the whole stretch gathered (all of it durable). The batch is
/// the shortest prefix of ksets (never short of `target`) whose newest
/// versions reach `budget` sectors, or the whole stretch; it writes only
/// those versions. A version replaced later in the stretch is not written:
/// the replacing key lies beyond dirty_tail, durable and dirty, and is
/// written when a pass reaches it.
fn cut_newest(
    map: ExtentMap<u64, WbExt>,
    marks: &[Mark],
    mut bad: Vec<format::KeyOnMedia>,
    target: PosOnMedia,
    budget: u64,
) -> Batch {
    let mut by_lsn: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for (_, e) in map.iter() {
        if e.kind != WbKind::Skip {
            *by_lsn.entry(e.lsn).or_default() += e.sectors as u64;
        }
    }
    let mut sectors = 0u64;
    let mut cut = marks.last().expect("at least one kset");
    for m in marks {
        sectors += m.lsn.and_then(|l| by_lsn.get(&l)).copied().unwrap_or(0);
        if sectors >= budget && m.end.lsn >= target.lsn {
            cut = m;
            break;
        }
    }
    let mut kept: ExtentMap<u64, WbExt> = ExtentMap::default();
    for (start, e) in map.iter() {
        if e.lsn < cut.end.lsn {
            kept.insert(start, *e);
        }
    }
    bad.truncate(cut.bad);
    Batch {
        map: kept,
        end: cut.end,
        ksets: cut.ksets,
        logged_dirty: cut.logged_dirty,
        logged_zero: cut.logged_zero,
        bad,
    }
}
