//! The key log: adding keys to open ksets (each stored in its slot on the
//! medium first), closing ksets into the log, flushes and commits, and the
//! log closer's work.

use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, TryLockError};
use std::time::Duration;

use super::cache::Engine;
use super::error::{Error, Result};
use super::kset::OpenKset;
use super::segment::SegKind;
use super::stats;
use crate::format::{
    data_off, encode_kset, encode_last, seal_staged, slot_off, staged_key_off, KeyOnMedia,
    PosOnMedia, KEY_BYTES, KSET_HEADER_BYTES, KSET_MAX_BYTES, SEG_DATA_BYTES, SLOT_CLOSING_OFF,
    SLOT_SEQ_OFF,
};

impl Engine {
    /// Add `key` to the open kset `ks`: store it in the kset's slot on the
    /// medium, then keep it in DRAM. Once this returns, the key survives the
    /// death of the process (a plain store into the shared mapping); it
    /// survives power loss once the kset is closed.
    pub(super) fn kset_push(&self, ks: &mut OpenKset, key: &KeyOnMedia) {
        let at = ks.n;
        let bytes = ks.push(key);
        let mut staged = *bytes;
        seal_staged(&mut staged, self.sb.format_id(), ks.slot, ks.seq);
        self.region.write(staged_key_off(ks.slot, at), &staged);
    }

    /// Start a new era in `ks`'s slot, holding no keys: store the new `seq`
    /// first (every staged key fails its crc from then on), then clear
    /// `closing`. Each is one 8-byte store.
    pub(super) fn slot_reset(&self, ks: &mut OpenKset, seq: u64) {
        let at = slot_off(ks.slot);
        self.region.write(at + SLOT_SEQ_OFF, &seq.to_le_bytes());
        self.region
            .write(at + SLOT_CLOSING_OFF, &0u64.to_le_bytes());
        ks.seq = seq;
        ks.n = 0;
        ks.dirty = 0;
        ks.zero = 0;
        ks.opened = None;
    }

    /// Append the open kset `ks` to the log.
    ///
    /// Persistence order:
    /// 1. If the kset and a following header do not fit in the current log
    ///    segment: zero the first header of a new log segment, write a LAST
    ///    kset pointing at it, persist, and move key_head there.
    /// 2. Mark the slot `closing` with the kset's LSN, then persist: the
    ///    keys' data, and the mark, are durable before the kset can be. From
    ///    the moment the kset is in the log, replay skips the slot.
    /// 3. Write the kset and a zeroed header after it (the terminator), then
    ///    persist.
    /// 4. Only then advance key_head, and empty the slot (a new era).
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
        // (2) The keys' data must be durable before the kset that points to
        // it (on a plain file this msyncs it; on DAX each writer already
        // fenced its own data, and this is one more sfence), and so must the
        // mark that the slot is going into the log as this LSN.
        self.region.write(
            slot_off(ks.slot) + SLOT_CLOSING_OFF,
            &log.pos.lsn.to_le_bytes(),
        );
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
        stats::add(&self.stats.dirty_zero_bytes, ks.zero);
        stats::add(&self.stats.ksets_closed, 1);
        self.slot_reset(ks, ks.seq + 1);
        self.writeback_kick.kick();
        Ok(())
    }

    /// Would closing a kset now wait for I/O on the caller's thread, which
    /// must not (see [`Engine::defer_log_closes`])?
    fn closes_deferred(&self) -> bool {
        self.defer_closes.load(std::sync::atomic::Ordering::Relaxed)
            && self.region.persist_waits_for_io()
    }

    /// The open kset of `region`, for a guest request's key. When closes
    /// wait for I/O, the log closer holds a kset's lock for as long as its
    /// msync takes; a request then gets `LogBusy` rather than wait for it.
    pub(super) fn kset_for_request(&self, region: u64) -> Result<MutexGuard<'_, OpenKset>> {
        let m = self.kset_for(region);
        if !self.closes_deferred() {
            return Ok(m.lock().expect("kset lock"));
        }
        match m.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => {
                // Whoever holds it may signal nothing when done: the log
                // closer, which waits for the lock, signals space after.
                self.log_waiters.store(true, Ordering::SeqCst);
                self.closer_kick.kick();
                stats::add(&self.stats.log_busy, 1);
                Err(Error::LogBusy { done: 0 })
            }
            Err(TryLockError::Poisoned(_)) => panic!("kset lock poisoned"),
        }
    }

    /// Room in `ks` for one more key of a guest request: close it if it is
    /// full, unless that would wait for I/O and closes are deferred; then
    /// the log closer is asked to, and `LogBusy` tells the caller to retry
    /// on the next space signal.
    pub(super) fn kset_room(&self, ks: &mut OpenKset) -> Result<()> {
        if !ks.is_full() {
            return Ok(());
        }
        if self.closes_deferred() {
            self.closer_kick.kick();
            stats::add(&self.stats.log_busy, 1);
            return Err(Error::LogBusy { done: 0 });
        }
        self.kset_close(ks)
    }

    /// After a guest request added a key to `ks`: close it once full, or,
    /// when closes wait for I/O, have the log closer close it ahead of need.
    pub(super) fn kset_filled(&self, ks: &mut OpenKset) {
        if self.closes_deferred() {
            if ks.nearly_full() {
                self.closer_kick.kick();
            }
        } else if ks.is_full() {
            // Best effort: a failure leaves it full, and the next append,
            // the timer or a flush closes it.
            let _ = self.kset_close(ks);
        }
    }

    /// Close the ksets the guest's requests left (nearly) full (the log
    /// closer, when closes wait for I/O), then signal space so that
    /// requests that found one full, or found one's lock taken, retry.
    pub(super) fn close_full_ksets(&self) -> Result<()> {
        // Taken before the locks: a request that finds one taken later
        // sets it again, and kicks another pass.
        let waiters = self.log_waiters.swap(false, Ordering::SeqCst);
        let mut closed = false;
        let mut result = Ok(());
        for ks in self.ksets.iter() {
            let mut ks = ks.lock().expect("kset lock");
            if self.read_only || self.has_failed() || result.is_err() || !ks.nearly_full() {
                continue;
            }
            result = self.kset_close(&mut ks);
            closed |= result.is_ok();
        }
        if closed || waiters {
            self.segs.notify_space();
        }
        result
    }

    /// See [`Engine::flush`].
    pub(super) fn close_all(&self) -> Result<()> {
        if self.read_only {
            // Nothing was written through this engine: nothing to persist.
            return Ok(());
        }
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

    /// See [`Engine::commit`].
    pub(super) fn close_for(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let first = super::cache::region_of(off);
        let last = super::cache::region_of(off + len.max(1) - 1);
        let n = self.ksets.len() as u64;
        for r in first..=last.min(first + n - 1) {
            let mut ks = self.kset_for(r).lock().expect("kset lock");
            self.kset_close(&mut ks)?;
        }
        self.persist()
    }

    /// Close ksets whose oldest key has waited `age` or more (the timer).
    pub(super) fn close_aged_ksets(&self, age: Duration) -> Result<()> {
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
