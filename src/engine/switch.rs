//! Cache modes, and the writes that go to the backing store themselves.
//!
//! - `writeback`: writes complete once in the cache; writeback passes them
//!   on later.
//! - `writethrough`: a write goes to the backing store, then into the cache
//!   as clean data; it completes once on both.
//! - `writearound`: a write goes to the backing store and the cache forgets
//!   the range (a FORGET key); reads fill the cache.
//! - `none`: the cache is not used: reads and writes go to the backing
//!   store (a write still forgets what the cache held of its range, so a
//!   later mode never serves stale data).
//!
//! Only write-back leaves dirty data, so leaving it drains the cache with
//! writes held back (like an invalidation), and every other mode keeps a
//! simple rule: the backing store holds every completed write, and
//! nothing written back later can overwrite it.
//!
//! In write-back mode a write of a long sequential stream may also go
//! around the cache (`--sequential-cutoff`), but only over a range holding
//! no data written in write-back mode: the log, not the index, drives
//! writeback, so older dirty data of the range would otherwise reach the
//! backing store after the write and overwrite it. While a live migration
//! copies the guest ([`Engine::set_handing_over`]) every write does the
//! same, and writeback drains: the cache then holds little dirty data when
//! the guest stops, and the switchover waits only for that.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::cache::Engine;
use super::error::Result;
use super::mode::CacheMode;

impl Engine {
    /// See [`Engine::prepare_mode`].
    pub(super) fn announce_mode(&self, mode: CacheMode) -> Result<()> {
        self.check_writable()?;
        if mode == self.mode() {
            return Ok(());
        }
        *self.mode_target.lock().expect("mode lock") = Some(mode);
        if self.mode() == CacheMode::Writeback {
            self.request_drain()?;
        }
        Ok(())
    }

    /// See [`Engine::set_mode`].
    pub(super) fn change_mode(&self, mode: CacheMode, timeout: Duration) -> Result<()> {
        self.check_writable()?;
        let from = self.mode();
        let result = self.switch_mode(from, mode, timeout);
        *self.mode_target.lock().expect("mode lock") = None;
        if result.is_ok() && from != mode {
            tracing::info!(%from, to = %mode, "cache mode changed");
        }
        result
    }

    fn switch_mode(&self, from: CacheMode, to: CacheMode, timeout: Duration) -> Result<()> {
        if from == to {
            return Ok(());
        }
        *self.mode_target.lock().expect("mode lock") = Some(to);
        let _held = if from == CacheMode::Writeback || to == CacheMode::None {
            Some(self.hold_writes_and_drain(timeout)?)
        } else {
            None
        };
        let mut s = self.settings.lock().expect("settings lock");
        let mut info = s.info;
        info.mode = to.code();
        self.write_settings(&mut s, info)?;
        self.mode.store(to.code(), Ordering::Release);
        drop(s);
        if to == CacheMode::None {
            self.drop_cached()?;
        }
        Ok(())
    }
}
