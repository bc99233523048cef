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

use super::key::CacheExt;
use super::{check_range, region_of, stats, DataHead, Engine, Error, Result};
use crate::format::{KeyOnMedia, KEY_FLAG_CLEAN, KEY_FLAG_FORGET, REGION_BYTES, SECTOR_BYTES};

/// How the cache handles writes; persisted in the cache.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Writes complete in the cache and are written back later.
    #[default]
    Writeback,
    /// Writes complete once on the backing store and in the cache.
    Writethrough,
    /// Writes go to the backing store only; reads fill the cache.
    Writearound,
    /// The cache is not used.
    None,
}

impl CacheMode {
    /// The number stored in cache_info.
    pub fn code(self) -> u8 {
        match self {
            CacheMode::Writeback => 0,
            CacheMode::Writethrough => 1,
            CacheMode::Writearound => 2,
            CacheMode::None => 3,
        }
    }

    /// From cache_info (validated there, so never out of range).
    pub fn from_code(c: u8) -> CacheMode {
        match c {
            1 => CacheMode::Writethrough,
            2 => CacheMode::Writearound,
            3 => CacheMode::None,
            _ => CacheMode::Writeback,
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writearound => "writearound",
            CacheMode::None => "none",
        })
    }
}

impl Engine {
    /// The cache mode now.
    pub fn mode(&self) -> CacheMode {
        CacheMode::from_code(self.mode.load(Ordering::Acquire))
    }

    /// Start (`true`) or end a live migration's copy phase: writes go to the
    /// backing store where the cache holds nothing dirty of their range,
    /// and writeback writes everything back, while it lasts. The mode
    /// itself does not change, so a cancelled migration is back in it at
    /// once.
    pub fn set_handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::SeqCst);
        if on {
            self.writeback_kick.kick();
        }
    }

    /// Is a live migration's copy phase on?
    pub fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    /// The mode a switch in progress goes to.
    pub fn switching_to(&self) -> Option<CacheMode> {
        *self.mode_target.lock().expect("mode lock")
    }

    /// Announce a switch to `mode` (status shows it) and, when it leaves
    /// write-back, start writing everything back now. The caller waits
    /// for the drain, then calls [`Engine::set_mode`].
    pub fn prepare_mode(&self, mode: CacheMode) -> Result<()> {
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

    /// Switch to `mode` and persist it. Leaving write-back holds writes
    /// back and writes back what is still dirty first (failing, with
    /// nothing changed, after `timeout`); entering `none` also drops what
    /// the cache holds.
    pub fn set_mode(&self, mode: CacheMode, timeout: Duration) -> Result<()> {
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

    /// Per region of `off..off+len`, its write version, if no extent there
    /// holds write-back data (dirty or zeroed, or a range marked bad): a
    /// write may then go around the cache, and [`Engine::forget`] with
    /// these versions tells whether another write reached the range
    /// meanwhile.
    pub fn clean_versions(&self, off: u64, len: u64) -> Option<Vec<u64>> {
        let mut out = Vec::new();
        for_each_region(off, len, |pos, n| {
            let Some(shard) = self.shard(region_of(pos)) else {
                out.push(0);
                return true;
            };
            let sh = shard.lock().expect("shard lock");
            let start = (pos & (REGION_BYTES - 1)) / SECTOR_BYTES;
            let mut clean = true;
            sh.map.lookup(start, n / SECTOR_BYTES, |_, _, e| {
                if let Some((_, ext)) = e {
                    clean &= ext.is_clean();
                }
            });
            out.push(sh.write_version);
            clean
        })
        .then_some(out)
    }

    /// After a write of `off..off+len` went around the cache to the
    /// backing store: log a FORGET key per region of the range that holds
    /// anything in the cache. With `versions` (from
    /// [`Engine::clean_versions`]), stops and returns Ok(false) at a region
    /// written since: the caller then caches the write after that one.
    pub fn forget(&self, off: u64, len: u64, versions: Option<&[u64]>) -> Result<bool> {
        self.check_writable()?;
        check_range(off, len, self.size())?;
        let mut i = 0;
        let mut result = Ok(true);
        for_each_region(off, len, |pos, n| {
            let want = versions.map(|v| v[i]);
            i += 1;
            match self.forget_piece(pos, n, want) {
                Ok(true) => true,
                other => {
                    result = other;
                    false
                }
            }
        });
        result
    }

    fn forget_piece(&self, pos: u64, n: u64, version: Option<u64>) -> Result<bool> {
        let region = region_of(pos);
        let Some(shard) = self.shard(region) else {
            // Nothing cached, and no write since (it would have made it).
            return Ok(version.is_none_or(|v| v == 0));
        };
        let mut sh = shard.lock().expect("shard lock");
        if version.is_some_and(|v| v != sh.write_version) {
            return Ok(false);
        }
        let start = (pos & (REGION_BYTES - 1)) / SECTOR_BYTES;
        let mut cached = false;
        sh.map
            .lookup(start, n / SECTOR_BYTES, |_, _, e| cached |= e.is_some());
        // Fills read before now may hold older data.
        sh.write_version += 1;
        if !cached {
            return Ok(true);
        }
        let key = KeyOnMedia::dataless(pos, n as u32, KEY_FLAG_FORGET);
        let mut ks = self.kset_for(region).lock().expect("kset lock");
        self.kset_room(&mut ks)?;
        CacheExt::from_key(&key).apply(&mut sh.map, start);
        self.kset_push(&mut ks, &key);
        self.kset_filled(&mut ks);
        Ok(true)
    }

    /// After a write-through write of `data` at `off` reached the backing
    /// store: cache it as clean data; where the cache has no room, forget
    /// the range instead. In `none` mode (a switch came while it was on its
    /// way), only forget it.
    pub fn write_clean(&self, head: &mut DataHead, off: u64, data: &[u8]) -> Result<()> {
        if self.mode() == CacheMode::None {
            return self.forget(off, data.len() as u64, None).map(|_| ());
        }
        match self.write_flagged(head, off, data, KEY_FLAG_CLEAN) {
            Err(Error::CacheFull { done }) => {
                let rest = off + done;
                self.forget(rest, data.len() as u64 - done, None)
                    .map(|_| ())
                    .map_err(|e| e.with_done(0))
            }
            other => other,
        }
    }
}

/// Call `f(pos, len)` for each piece of `off..off+len` cut at 4 MiB region
/// boundaries, while it returns true; returns whether every call did.
fn for_each_region(off: u64, len: u64, mut f: impl FnMut(u64, u64) -> bool) -> bool {
    let mut done = 0;
    while done < len {
        let pos = off + done;
        let n = (len - done).min(REGION_BYTES - (pos & (REGION_BYTES - 1)));
        if !f(pos, n) {
            return false;
        }
        done += n;
    }
    true
}
