//! Dropping everything the cache holds (`pcache invalidate`), for a
//! backing store that changed behind the cache: another host wrote it, or
//! it was restored. Guest writes wait meanwhile (as for space), the little
//! still dirty is written back, then GC frees every segment up to
//! dirty_tail (so a restart replays none of it) and the index is emptied.

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use super::cache::Engine;
use super::error::{Error, Result};

/// Resumes guest writes when dropped.
pub(super) struct Paused<'a>(&'a Engine);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.writes_paused.store(false, SeqCst);
        // Writers parked as for a full cache retry on a space signal.
        self.0.segs.notify_space();
    }
}

/// Counts one `Engine::write` in progress (see `Engine::invalidate`).
pub(super) struct Writing<'a>(&'a Engine);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, SeqCst);
    }
}

impl Engine {
    /// Enter a guest write: None while an invalidation holds writes back
    /// (the caller reports the cache full, and retries on a space signal).
    pub(super) fn writing(&self) -> Option<Writing<'_>> {
        self.writers.fetch_add(1, SeqCst);
        let w = Writing(self);
        (!self.writes_paused.load(SeqCst)).then_some(w)
    }

    /// See [`Engine::invalidate`].
    pub(super) fn drop_everything(&self, timeout: Duration) -> Result<u32> {
        self.check_writable()?;
        let _resume = self.hold_writes_and_drain(timeout)?;
        let freed = self.drop_cached()?;
        tracing::info!(segments_freed = freed, "cache invalidated");
        Ok(freed)
    }

    /// Hold guest writes back (they wait as for space) until the returned
    /// guard is dropped, and write back everything dirty. Fails, resuming
    /// writes, if that takes longer than `timeout`.
    pub(super) fn hold_writes_and_drain(&self, timeout: Duration) -> Result<Paused<'_>> {
        if self.writes_paused.swap(true, SeqCst) {
            return Err(Error::Busy(
                "an invalidation or a mode switch is already running",
            ));
        }
        let paused = Paused(self);
        // Writes that got in before the pause finish first: their keys
        // must be logged, and written back, before the caller goes on.
        while self.writers.load(SeqCst) > 0 {
            std::thread::yield_now();
        }
        self.request_drain()?;
        let t0 = Instant::now();
        while self.is_dirty() {
            self.check_writable()?;
            if t0.elapsed() >= timeout {
                return Err(Error::Busy(
                    "dirty data was still being written back at the timeout; nothing changed",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(paused)
    }

    /// With nothing dirty: free every segment up to dirty_tail (= key_head)
    /// and empty the index, but for ranges marked bad (GC logs them again;
    /// they stay). Returns the segments freed.
    pub(super) fn drop_cached(&self) -> Result<u32> {
        let freed = self.gc_once(true)?;
        for (_, shard) in self.shards.iter() {
            let mut sh = shard.lock().expect("shard lock");
            sh.map.retain(|e| e.is_bad());
            // A fill read before now may hold older data: drop it.
            sh.write_version += 1;
        }
        Ok(freed)
    }
}
