//! Rebuilding the in-memory state from the key log at open.
//!
//! Walk from key_tail, one kset at a time, each with the next LSN. The log
//! ends at the first kset that is not the one expected there (no magic, a
//! torn CRC, another format's, or an earlier lap's LSN). A kset that passes
//! its CRC but holds an impossible key is corruption, and the open fails:
//! skipping it could hide dirty data.
//!
//! Each key whose gen equals its segment's gen goes into the index (log
//! order is write order for overlapping keys) and takes a segment reference
//! that GC drops later. A dataless key (zeros, a range marked bad or
//! forgotten) goes into the index with no reference, or clears its range.
//! A key with an older gen is stale and is skipped: its segment was
//! reclaimed (GC persists key_tail past a key before it can free the key's
//! segment, so only caches written by builds before that find such keys,
//! and kset slots holding keys of a segment reclaimed since).
//! Differs from dm-pcache: the gen is checked before any data CRC, so a
//! stale key in a reused segment never fails the open.
//!
//! After the log, the kset slots: the keys the open ksets held when the
//! last process stopped, which completed writes but never reached the log.
//! A slot whose keys went into the log (its `closing` LSN is before the
//! log's end) is skipped; otherwise its keys, up to the first one that
//! fails its crc, are newer than every logged key of their regions and go
//! into the index after them. The caller appends them to the log.

use std::sync::atomic::Ordering;

use super::cache::{region_of, Engine};
use super::error::Result;
use super::key::CacheExt;
use crate::format::{
    self, data_off, decode_staged, slot_off, staged_key_off, KeyOnMedia, KsetEnd, KsetView,
    PosOnMedia, SlotHeader, KEY_BYTES, KSET_MAX_BYTES, KSET_SLOTS, REGION_BYTES, SECTOR_BYTES,
    SEG_DATA_BYTES, SLOT_HEADER_BYTES, SLOT_KEYS_MAX,
};

/// Why the log ended where it did (for `check` and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEnd {
    /// key_head: the position after the last valid kset.
    pub head: PosOnMedia,
    /// What was found there.
    pub reason: KsetEnd,
}

/// Keys found in the kset slots at open: per slot, its era and its keys in
/// order (empty for a slot with nothing to replay).
pub(super) type Staged = Vec<(u64, Vec<KeyOnMedia>)>;

/// Keys gathered before they are inserted into the index, in parallel by
/// shard (64 Ki keys: 2.5 MiB of buffer).
const REPLAY_BATCH: usize = 64 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Free,
    Log,
    Data,
}

impl Engine {
    /// Read the kset at `pos` with the LSN it must have.
    pub(super) fn read_kset<'a>(
        &self,
        pos: PosOnMedia,
        buf: &'a mut [u8; KSET_MAX_BYTES],
    ) -> std::result::Result<KsetView<'a>, KsetEnd> {
        let room = (SEG_DATA_BYTES - pos.off as u64).min(KSET_MAX_BYTES as u64) as usize;
        self.region
            .read(data_off(pos.seg, pos.off), &mut buf[..room]);
        KsetView::parse(&buf[..room], self.sb.format_id(), pos.lsn, self.n_segs)
    }

    /// Insert replayed keys into the index. Each thread owns the shards
    /// whose number is its own modulo the thread count and takes them in
    /// batch order, so every shard still sees its keys in log order.
    fn insert_batch(&self, batch: &[(u64, u64, CacheExt)]) {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4) as u64;
        let insert = |t: u64| {
            for (region, start, ext) in batch {
                if region % threads == t {
                    let mut sh = self.shard_or_create(*region).lock().expect("shard lock");
                    ext.apply(&mut sh.map, *start);
                }
            }
        };
        if threads == 1 || batch.len() < 4096 {
            for t in 0..threads {
                insert(t);
            }
            return;
        }
        std::thread::scope(|s| {
            for t in 1..threads {
                s.spawn(move || insert(t));
            }
            insert(0);
        });
    }

    /// After the log ended at `end`, look for a valid kset with a higher
    /// LSN: in the rest of `end`'s segment and at the start of every segment
    /// not already in the log. Kset closes are serialised and each is
    /// persisted before the next is written, so after a torn tail there is
    /// none; finding one means a kset in the middle of the log is damaged,
    /// and replaying only up to it would silently drop later writes.
    fn find_later_kset(&self, end: PosOnMedia, uses: &[Use]) -> Option<((u32, u32), u64)> {
        let fid = self.sb.format_id();
        let mut buf = [0u8; KSET_MAX_BYTES];
        let mut probe = |seg: u32, off: u32| -> Option<u64> {
            let room = (SEG_DATA_BYTES - off as u64).min(KSET_MAX_BYTES as u64) as usize;
            if room < format::KSET_HEADER_BYTES {
                return None;
            }
            self.region
                .read(data_off(seg, off), &mut buf[..format::KSET_HEADER_BYTES]);
            if u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")) != format::KSET_MAGIC {
                return None;
            }
            let lsn = u64::from_le_bytes(buf[24..32].try_into().expect("8 bytes"));
            if lsn <= end.lsn {
                return None;
            }
            self.region.read(data_off(seg, off), &mut buf[..room]);
            KsetView::parse(&buf[..room], fid, lsn, self.n_segs)
                .ok()
                .map(|_| lsn)
        };
        // Scan the rest of the segment in chunks for the magic at 8-byte
        // aligned offsets (ksets are 48 + 40n bytes from an aligned start),
        // with a vectorised search: up to 16 MiB on every open.
        const CHUNK: usize = 64 << 10;
        let magic = format::KSET_MAGIC.to_le_bytes();
        let finder = memchr::memmem::Finder::new(&magic);
        let mut chunk = vec![0u8; CHUNK];
        let mut base = end.off as u64 + 8;
        while base + format::KSET_HEADER_BYTES as u64 <= SEG_DATA_BYTES {
            let n = (SEG_DATA_BYTES - base).min(CHUNK as u64) as usize;
            self.region
                .read(data_off(end.seg, base as u32), &mut chunk[..n]);
            // The magic sits 8 bytes into a header that starts at an
            // offset from `base` that is a multiple of 8.
            for p in finder.find_iter(&chunk[..n]) {
                if p < 8 || (p - 8) % 8 != 0 {
                    continue;
                }
                let off = (base + (p - 8) as u64) as u32;
                if let Some(lsn) = probe(end.seg, off) {
                    return Some(((end.seg, off), lsn));
                }
            }
            // Step back 8 so a header straddling the chunk edge is seen.
            base += (n as u64).saturating_sub(8).max(8);
        }
        (0..self.n_segs)
            .filter(|s| *s != end.seg && uses[*s as usize] != Use::Log)
            .find_map(|s| probe(s, 0).map(|lsn| ((s, 0), lsn)))
    }

    /// Validate a replayed key found at device offset `at` and, unless it
    /// is stale, take its segment reference and queue it for the index.
    /// Returns whether it was taken.
    fn take_key(&self, key: &KeyOnMedia, at: u64, r: &mut Replay) -> Result<bool> {
        key.validate(self.n_segs, self.size(), at)?;
        if key.is_dataless() {
            // No data, no segment reference: it only replaces what it covers.
            self.queue_for_index(key, r);
            return Ok(true);
        }
        if key.gen != self.segs.gen(key.seg) {
            r.stale += 1;
            return Ok(false);
        }
        match r.uses[key.seg as usize] {
            Use::Log => {
                return Err(format::Error::Corrupt {
                    what: "kset key",
                    offset: at,
                    detail: format!("points into log segment {}", key.seg),
                }
                .into());
            }
            Use::Free => {
                r.uses[key.seg as usize] = Use::Data;
                self.segs.mark_used(key.seg);
            }
            Use::Data => {}
        }
        self.segs.get_ref(key.seg);
        self.queue_for_index(key, r);
        Ok(true)
    }

    fn queue_for_index(&self, key: &KeyOnMedia, r: &mut Replay) {
        let region = region_of(key.off);
        let start = (key.off & (REGION_BYTES - 1)) / SECTOR_BYTES;
        r.batch.push((region, start, CacheExt::from_key(key)));
        if r.batch.len() == REPLAY_BATCH {
            self.insert_batch(&r.batch);
            r.batch.clear();
        }
        r.keys += 1;
    }

    /// Replay the log, then the kset slots. Returns where the log ends and
    /// the slots' keys, which are in the index but not yet in the log.
    pub(super) fn replay(&self) -> Result<(LogEnd, Staged)> {
        let key_tail = self.key_tail();
        let dirty_tail = self.dirty_tail();
        let mut pos = key_tail;
        let mut r = Replay {
            uses: vec![Use::Free; self.n_segs as usize],
            batch: Vec::with_capacity(REPLAY_BATCH),
            keys: 0,
            stale: 0,
        };
        r.uses[pos.seg as usize] = Use::Log;
        let mut seen_dirty = false;
        let mut dirty_bytes = 0u64;
        let mut zero_bytes = 0u64;
        let mut max_epoch = 0u64;
        let mut buf = [0u8; KSET_MAX_BYTES];
        let corrupt = |pos: PosOnMedia, detail: String| -> super::error::Error {
            format::Error::Corrupt {
                what: "key log",
                offset: data_off(pos.seg, pos.off),
                detail,
            }
            .into()
        };
        let reason = loop {
            if (pos.seg, pos.off) == (dirty_tail.seg, dirty_tail.off) && pos.lsn == dirty_tail.lsn {
                seen_dirty = true;
            }
            let view = match self.read_kset(pos, &mut buf) {
                Ok(v) => v,
                Err(KsetEnd::Invalid(why)) => {
                    return Err(corrupt(
                        pos,
                        format!("kset with lsn {} is invalid: {why}", pos.lsn),
                    ))
                }
                Err(end) => break end,
            };
            let h = view.header;
            max_epoch = max_epoch.max(h.epoch);
            if h.is_last() {
                let next = h.next_seg;
                if r.uses[next as usize] != Use::Free {
                    return Err(corrupt(
                        pos,
                        format!("LAST kset links to segment {next}, which the log already uses"),
                    ));
                }
                r.uses[next as usize] = Use::Log;
                pos = pos.in_next_segment(next);
                continue;
            }
            for (i, key) in view.iter().enumerate() {
                let at = pos.key_at(i);
                if self.take_key(&key, at, &mut r)? && seen_dirty {
                    dirty_bytes += super::kset::dirty_data_bytes(&key);
                    zero_bytes += super::kset::dirty_zero_bytes(&key);
                }
            }
            pos.off += h.bytes() as u32;
            pos.lsn += 1;
        };
        if let Some((at, lsn)) = self.find_later_kset(pos, &r.uses) {
            return Err(corrupt(
                pos,
                format!(
                    "the log ends here ({reason:?}) but a later kset (lsn {lsn}) is at segment {}:{}; a kset in the middle of the log is damaged",
                    at.0, at.1
                ),
            ));
        }
        if !seen_dirty {
            return Err(format::Error::Corrupt {
                what: "dirty_tail",
                offset: format::DIRTY_TAIL_OFF[0],
                detail: format!(
                    "dirty_tail {}:{} lsn {} is not on the key log (key_tail {}:{} lsn {}, log ends at {}:{} lsn {})",
                    dirty_tail.seg, dirty_tail.off, dirty_tail.lsn, key_tail.seg, key_tail.off, key_tail.lsn, pos.seg, pos.off, pos.lsn
                ),
            }
            .into());
        }
        // The slots' keys are newer than every logged key of their regions,
        // so they go into the index after the whole log.
        self.insert_batch(&r.batch);
        r.batch.clear();
        let staged = self.replay_slots(pos.lsn, &mut r)?;
        self.insert_batch(&r.batch);
        for (seg, u) in r.uses.iter().enumerate() {
            if *u == Use::Log {
                self.segs.mark_used(seg as u32);
            }
        }
        // Ksets written after this open must not share an epoch with ones
        // written before the crash, or writeback could batch across it.
        let mut log = self.log.lock().expect("log lock");
        log.pos = pos;
        log.epoch = max_epoch + 1;
        drop(log);
        self.stats.dirty_bytes.store(dirty_bytes, Ordering::Relaxed);
        self.stats
            .dirty_zero_bytes
            .store(zero_bytes, Ordering::Relaxed);
        self.stats.replay_keys.store(r.keys, Ordering::Relaxed);
        self.stats
            .replay_stale_keys
            .store(r.stale, Ordering::Relaxed);
        Ok((LogEnd { head: pos, reason }, staged))
    }

    /// Read every kset slot. A slot whose keys went into the log before
    /// `log_end_lsn` is skipped; the others' keys are read up to the first
    /// that fails its crc, validated and queued for the index like logged
    /// keys (a key that passes its crc but is impossible fails the open).
    fn replay_slots(&self, log_end_lsn: u64, r: &mut Replay) -> Result<Staged> {
        let fid = self.sb.format_id();
        let mut staged = Vec::with_capacity(KSET_SLOTS);
        for slot in 0..KSET_SLOTS {
            let mut hb = [0u8; SLOT_HEADER_BYTES];
            self.region.read(slot_off(slot), &mut hb);
            let h = SlotHeader::decode(&hb);
            let mut keys = Vec::new();
            if h.seq != 0 && !h.logged_before(log_end_lsn) {
                for k in 0..SLOT_KEYS_MAX {
                    let at = staged_key_off(slot, k);
                    let mut kb = [0u8; KEY_BYTES];
                    self.region.read(at, &mut kb);
                    let Some(key) = decode_staged(&kb, fid, slot, h.seq) else {
                        break;
                    };
                    // A stale key (its segment reclaimed since) is dropped.
                    if self.take_key(&key, at, r)? {
                        keys.push(key);
                    }
                }
            }
            staged.push((h.seq, keys));
        }
        Ok(staged)
    }
}

/// State of one replay: segment uses, keys waiting for the index, counts.
struct Replay {
    uses: Vec<Use>,
    batch: Vec<(u64, u64, CacheExt)>,
    keys: u64,
    stale: u64,
}
