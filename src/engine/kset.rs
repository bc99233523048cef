//! Open ksets and the key log.
//!
//! Keys collect in DRAM ksets, one per group of 4 MiB regions (a key goes
//! to kset `region % n_ksets`, as in dm-pcache), so keys that can overlap
//! always pass through the same kset in the order they entered the index:
//! log order equals index order, which replay relies on. A kset is closed
//! (appended to the log) when it holds 128 keys, on flush, or when its
//! first key is a second old.

use std::time::{Duration, Instant};

use super::segment::SegKind;
use super::{stats, Engine, Error, Result};
use crate::format::{
    data_off, encode_kset, encode_last, KeyOnMedia, PosOnMedia, KEY_BYTES, KSET_HEADER_BYTES,
    KSET_KEYS_MAX, KSET_MAX_BYTES, SEG_DATA_BYTES,
};

/// How long a key may wait in an open kset (1 s, as dm-pcache).
pub const KSET_MAX_AGE: Duration = Duration::from_secs(1);

/// A kset being filled in DRAM.
#[derive(Debug)]
pub struct OpenKset {
    /// `n` encoded keys.
    keys: Box<[u8]>,
    n: usize,
    /// Dirty bytes among the keys (for the dirty counter).
    dirty: u64,
    opened: Option<Instant>,
}

impl Default for OpenKset {
    fn default() -> Self {
        OpenKset {
            keys: vec![0u8; KSET_KEYS_MAX * KEY_BYTES].into_boxed_slice(),
            n: 0,
            dirty: 0,
            opened: None,
        }
    }
}

impl OpenKset {
    /// Full (must close before appending)?
    pub fn is_full(&self) -> bool {
        self.n == KSET_KEYS_MAX
    }

    /// Add a key; the caller closed the kset first if it was full.
    pub fn push(&mut self, key: &KeyOnMedia, dirty: bool) {
        debug_assert!(!self.is_full());
        let at = self.n * KEY_BYTES;
        key.encode(&mut self.keys[at..at + KEY_BYTES]);
        self.n += 1;
        if dirty {
            self.dirty += key.len as u64;
        }
        self.opened.get_or_insert_with(Instant::now);
    }

    /// Has the oldest key waited longer than `age`?
    pub fn older_than(&self, age: Duration) -> bool {
        self.opened.is_some_and(|t| t.elapsed() >= age)
    }
}

/// The head of the key log.
#[derive(Debug, Clone, Copy)]
pub struct LogHead {
    /// Where the next kset goes, with its LSN (key_head).
    pub pos: PosOnMedia,
    /// Flush epoch stamped into ksets closed now.
    pub epoch: u64,
}

impl Engine {
    /// Append the open kset `ks` to the log.
    ///
    /// Persistence order:
    /// 1. If the kset and a following header do not fit in the current log
    ///    segment: zero the first header of a new log segment, write a LAST
    ///    kset pointing at it, persist, and move key_head there.
    /// 2. Persist, so the keys' data is durable before the kset can be.
    /// 3. Write the kset and a zeroed header after it (the terminator), then
    ///    persist.
    /// 4. Only then advance key_head.
    pub(super) fn kset_close(&self, ks: &mut OpenKset) -> Result<()> {
        if ks.n == 0 {
            return Ok(());
        }
        let size = KSET_HEADER_BYTES + ks.n * KEY_BYTES;
        let fid = self.sb.format_id();
        let mut log = self.log.lock().expect("log lock");
        let room = SEG_DATA_BYTES - log.pos.off as u64;
        if room < (size + KSET_HEADER_BYTES) as u64 {
            let Some(next) = self.segs.alloc(SegKind::Log) else {
                stats::add(&self.stats.cache_full, 1);
                return Err(Error::CacheFull { done: 0 });
            };
            self.region.zero(data_off(next, 0), KSET_HEADER_BYTES);
            let mut last = [0u8; KSET_HEADER_BYTES];
            encode_last(&mut last, fid, log.pos.lsn, log.epoch, next);
            self.region.write(data_off(log.pos.seg, log.pos.off), &last);
            self.persist()?; // (1) the link is durable before anything lands in `next`
            log.pos = PosOnMedia {
                seg: next,
                off: 0,
                lsn: log.pos.lsn + 1,
            };
        }
        // The keys' data must be durable before the kset that points to it
        // (on a plain file this msyncs it; on DAX each writer already
        // fenced its own data, and this is one more sfence).
        self.persist()?;
        let mut image = [0u8; KSET_MAX_BYTES];
        let n = encode_kset(
            &mut image,
            fid,
            log.pos.lsn,
            log.epoch,
            &ks.keys[..ks.n * KEY_BYTES],
        );
        debug_assert_eq!(n, size);
        let at = data_off(log.pos.seg, log.pos.off);
        self.region.write(at, &image[..size]);
        self.region.zero(at + size as u64, KSET_HEADER_BYTES);
        self.persist()?; // (3) kset and terminator durable
        log.pos.off += size as u32; // (4)
        log.pos.lsn += 1;
        drop(log);
        stats::add(&self.stats.dirty_bytes, ks.dirty);
        stats::add(&self.stats.ksets_closed, 1);
        ks.n = 0;
        ks.dirty = 0;
        ks.opened = None;
        self.writeback_kick.kick();
        Ok(())
    }

    /// Close every open kset, then start a new flush epoch. When it returns
    /// Ok, every write acknowledged before the call is durable.
    pub fn flush(&self) -> Result<()> {
        self.check_writable()?;
        for ks in self.ksets.iter() {
            let mut ks = ks.lock().expect("kset lock");
            self.kset_close(&mut ks)?;
        }
        // Miss fills and writes whose kset was empty still need their data
        // persisted for the epoch to be complete.
        self.persist()?;
        self.log.lock().expect("log lock").epoch += 1;
        stats::add(&self.stats.flushes, 1);
        Ok(())
    }

    /// Make a completed write of `off..off+len` durable now (write-through
    /// mode): close the ksets its keys went to. Other ksets stay open.
    pub fn commit(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let first = super::region_of(off);
        let last = super::region_of(off + len.max(1) - 1);
        let n = self.ksets.len() as u64;
        for r in first..=last.min(first + n - 1) {
            let mut ks = self.kset_for(r).lock().expect("kset lock");
            self.kset_close(&mut ks)?;
        }
        self.persist()
    }

    /// Close ksets whose oldest key has waited `age` or more (the timer).
    pub fn close_aged_ksets(&self, age: Duration) -> Result<()> {
        if self.read_only || self.has_failed() {
            return Ok(());
        }
        for ks in self.ksets.iter() {
            let mut ks = ks.lock().expect("kset lock");
            if ks.older_than(age) {
                self.kset_close(&mut ks)?;
            }
        }
        Ok(())
    }
}
