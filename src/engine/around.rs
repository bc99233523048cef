//! Writes that went to the backing store around the cache: which regions
//! hold nothing written in write-back mode (so a write may go around),
//! forgetting a range after such a write, and the clean copy a
//! write-through write leaves in the cache.

use super::cache::{check_range, region_of, Engine};
use super::error::{Error, Result};
use super::key::CacheExt;
use super::mode::CacheMode;
use super::req::DataHead;
use crate::format::{KeyOnMedia, KEY_FLAG_CLEAN, KEY_FLAG_FORGET, REGION_BYTES, SECTOR_BYTES};

impl Engine {
    /// See [`Engine::clean_versions`].
    pub(super) fn versions_if_clean(&self, off: u64, len: u64) -> Option<Vec<u64>> {
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

    /// See [`Engine::forget`].
    pub(super) fn forget_range(
        &self,
        off: u64,
        len: u64,
        versions: Option<&[u64]>,
    ) -> Result<bool> {
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
        let mut ks = self.kset_for_request(region)?;
        self.kset_room(&mut ks)?;
        CacheExt::from_key(&key).apply(&mut sh.map, start);
        self.kset_push(&mut ks, &key);
        self.kset_filled(&mut ks);
        Ok(true)
    }

    /// See [`Engine::write_clean`].
    pub(super) fn cache_clean(&self, head: &mut DataHead, off: u64, data: &[u8]) -> Result<()> {
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
