//! Growing the disk online.
//!
//! The new size is persisted in cache_info (its two replicas make the
//! update atomic) before requests may reach the new sectors; the
//! superblock keeps the size the cache was formatted for. A disk never
//! shrinks: data the guest wrote past the new end would be lost.

use std::sync::atomic::Ordering;

use super::cache::Engine;
use super::error::{Error, Result};
use crate::format::{self, REGION_BYTES, SECTOR_BYTES};

impl Engine {
    /// See [`Engine::grow`].
    pub(super) fn grow_to(&self, bytes: u64) -> Result<u64> {
        let old = self.size();
        if bytes == old {
            return Ok(old);
        }
        if bytes < old {
            return Err(Error::Refused(format!(
                "the backing store shrank from {old} to {bytes} bytes; pcache never shrinks a disk \
                 (the guest's data past the new end would be lost): restore the size"
            )));
        }
        if !bytes.is_multiple_of(SECTOR_BYTES) || bytes > format::MAX_DISK_BYTES {
            return Err(Error::Refused(format!(
                "new size {bytes} is not a multiple of 512 or is above {} bytes",
                format::MAX_DISK_BYTES
            )));
        }
        self.check_writable()?;
        let mut s = self.settings.lock().expect("settings lock");
        let mut info = s.info;
        info.disk_sectors = bytes / SECTOR_BYTES;
        self.write_settings(&mut s, info)?;
        // Shards first: a request checked against the new size finds them.
        self.shards.grow(bytes.div_ceil(REGION_BYTES));
        self.backing_bytes.store(bytes, Ordering::Release);
        tracing::info!(old, new = bytes, "disk grown");
        Ok(old)
    }
}
