//! The engine's public surface for the data path (the disk layer): reads,
//! writes, zeroings, fills, flushes, pacing, and the space signals a
//! writer waiting for room listens to.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::cache::Engine;
use super::data::{DataIn, DataOut};
use super::error::Result;
use super::req::{DataHead, Miss};
use super::stats;
use crate::format::SEG_DATA_BYTES;

impl Engine {
    /// How long a guest write of `bytes` should wait before it goes into
    /// the cache (zero unless a writeback batch runs and the reclaimable
    /// space would not last until it ends).
    pub fn pace(&self, bytes: u64) -> Duration {
        if !self.pacer.active() {
            return Duration::ZERO;
        }
        let capacity = self.n_segs as u64 * SEG_DATA_BYTES;
        let dirty = self.stats.dirty_bytes.load(Ordering::Relaxed);
        let wait = self.pacer.wait_for(bytes, capacity, dirty);
        if !wait.is_zero() {
            stats::add(&self.stats.writes_paced, 1);
        }
        wait
    }

    /// Cache a guest write of `data` at logical byte `off` (dirty: written
    /// back later).
    ///
    /// On `Err(CacheFull { done })` the first `done` bytes are cached; retry
    /// the rest once space frees up (a space signal says when). On
    /// `Err(LogBusy { done })` the same, once the log closer has closed the
    /// full kset (a space signal says so too).
    pub fn write<D: DataIn + ?Sized>(&self, head: &mut DataHead, off: u64, data: &D) -> Result<()> {
        self.write_data(head, off, data)
    }

    /// Make `len` bytes at `off` read zeros (a guest's write-zeroes or
    /// discard), as a dataless key per 4 MiB region: logged like a write,
    /// so it keeps its place in log order. With `unmap`, writeback may
    /// deallocate the range on the backing store.
    ///
    /// On `Err(CacheFull { done })` the first `done` bytes are done; retry
    /// the rest once the key log has room.
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.log_zeroes(off, len, unmap)
    }

    /// Read `buf.len()` bytes at logical byte `off`. Cached pieces are
    /// copied into `buf`; the rest is appended to `misses` for the caller to
    /// read from the backing store (into `buf[miss.buf_off..]`).
    pub fn read<D: DataOut + ?Sized>(
        &self,
        off: u64,
        buf: &mut D,
        misses: &mut Vec<Miss>,
    ) -> Result<()> {
        self.read_cached(off, buf, misses)
    }

    /// Cache `data`, read from the backing store for `miss`, as clean data.
    /// Best effort: skipped when the cache is full or a write reached the
    /// region since the miss was found.
    pub fn fill(&self, head: &mut DataHead, miss: &Miss, data: &[u8]) {
        self.fill_clean(head, miss, data)
    }

    /// Drop `head`'s segment (its unused remainder is reclaimed when GC
    /// frees the segment).
    pub fn head_release(&self, head: &mut DataHead) {
        self.release_head(head)
    }

    /// Current space epoch (a space signal says when).
    pub fn space_epoch(&self) -> u64 {
        self.segs.space_epoch()
    }

    /// Register an eventfd written whenever a segment is freed.
    pub fn add_space_fd(&self, fd: RawFd) {
        self.segs.add_space_fd(fd)
    }

    /// Unregister a space eventfd.
    pub fn remove_space_fd(&self, fd: RawFd) {
        self.segs.remove_space_fd(fd)
    }

    /// After a write-through write of `data` at `off` reached the backing
    /// store: cache it as clean data; where the cache has no room, forget
    /// the range instead. In `none` mode (a switch came while it was on its
    /// way), only forget it.
    pub fn write_clean(&self, head: &mut DataHead, off: u64, data: &[u8]) -> Result<()> {
        self.cache_clean(head, off, data)
    }

    /// Per region of `off..off+len`, its write version, if no extent there
    /// holds write-back data (dirty or zeroed, or a range marked bad): a
    /// write may then go around the cache, and [`Engine::forget`] with
    /// these versions tells whether another write reached the range
    /// meanwhile.
    pub fn clean_versions(&self, off: u64, len: u64) -> Option<Vec<u64>> {
        self.versions_if_clean(off, len)
    }

    /// After a write of `off..off+len` went around the cache to the
    /// backing store: log a FORGET key per region of the range that holds
    /// anything in the cache. With `versions` (from
    /// [`Engine::clean_versions`]), stops and returns Ok(false) at a region
    /// written since: the caller then caches the write after that one.
    pub fn forget(&self, off: u64, len: u64, versions: Option<&[u64]>) -> Result<bool> {
        self.forget_range(off, len, versions)
    }

    /// Count `bytes` of a read miss left out of the cache (a long
    /// sequential read).
    pub fn note_unfilled(&self, bytes: u64) {
        stats::add(&self.stats.read_nofill_bytes, bytes);
    }

    /// Count `bytes` of a write-back mode write sent around the cache (a
    /// long sequential stream, or a migration's copy phase).
    pub fn note_bypassed(&self, bytes: u64) {
        stats::add(&self.stats.write_bypass_bytes, bytes);
    }

    /// Close every open kset, then start a new flush epoch. When it returns
    /// Ok, every write acknowledged before the call is durable.
    pub fn flush(&self) -> Result<()> {
        self.close_all()
    }

    /// Make a completed write of `off..off+len` durable now (write-through
    /// mode): close the ksets its keys went to. Other ksets stay open.
    pub fn commit(&self, off: u64, len: u64) -> Result<()> {
        self.close_for(off, len)
    }
}
