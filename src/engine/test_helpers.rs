//! Helpers for tests (feature `test-doubles`): a read that fetches its
//! misses on the caller's thread, a write that waits for room, and a check
//! of the engine's invariants.

use std::sync::atomic::Ordering;

use super::cache::Engine;
use super::error::{Error, Result};
use super::req::DataHead;
use crate::backing::Backing;

impl Engine {
    /// Read through the cache, reading misses from `backing` on this thread
    /// and filling them in. For tools and tests; queue workers use
    /// [`Engine::read`] with their own asynchronous backing queue.
    pub fn read_sync(
        &self,
        head: &mut DataHead,
        backing: &dyn Backing,
        off: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let mut misses = Vec::new();
        self.read(off, buf, &mut misses)?;
        for m in &misses {
            let piece = &mut buf[m.buf_off..m.buf_off + m.len as usize];
            backing.read_at(piece, m.off).map_err(Error::Backing)?;
            self.fill(head, m, piece);
        }
        Ok(())
    }

    /// Write, waiting for GC to free space whenever the cache is full.
    pub fn write_blocking(&self, head: &mut DataHead, off: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        loop {
            let epoch = self.segs.space_epoch();
            match self.write(head, off + done as u64, &data[done..]) {
                Err(Error::CacheFull { done: d }) => {
                    done += d as usize;
                    self.wait_for_space(epoch);
                }
                other => return other,
            }
        }
    }

    /// Check the engine's invariants (tests).
    pub fn assert_invariants(&self) {
        for (_, s) in self.shards.iter() {
            #[cfg(debug_assertions)]
            s.lock().expect("shard lock").map.assert_invariants();
            #[cfg(not(debug_assertions))]
            let _ = s;
        }
        let kt = self.key_tail();
        let dt = self.dirty_tail();
        let kh = self.key_head();
        assert!(
            kt.lsn <= dt.lsn && dt.lsn <= kh.lsn,
            "log order broken: key_tail {kt:?} dirty_tail {dt:?} key_head {kh:?}"
        );
    }

    /// Sleep until a segment is freed after the space epoch `epoch` was read
    /// (or a short timeout), kicking GC and writeback.
    pub(super) fn wait_for_space(&self, epoch: u64) {
        self.space_wanted.store(true, Ordering::Relaxed);
        self.writeback_wanted.store(true, Ordering::Relaxed);
        self.gc_kick.kick();
        self.writeback_kick.kick();
        self.segs
            .wait_space(epoch, std::time::Duration::from_millis(50));
    }
}
