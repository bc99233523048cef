//! Write-through without a bounce buffer: the data is copied into the
//! cache first, the backing store is written from that copy, and the copy
//! becomes visible (a clean key) only once the store has it.
//!
//! Until then nothing points at the copy: a crash leaves unreferenced
//! space, reclaimed with its segment. A [`Placed`] holds the reference a
//! key would hold, so GC cannot free the segment under it; the address
//! lent for the backing write holds one more ([`Engine::pin_placed`]), so
//! the kernel may go on reading it even after the request is abandoned.

use super::cache::{check_range, Engine};
use super::error::{Error, Result};
use super::mode::CacheMode;
use super::req::{Alloc, DataHead};
use super::stats;
use crate::format::{data_off, KeyOnMedia, KEY_FLAG_CLEAN, REGION_BYTES, SEGMENTS_OFF, SEG_BYTES};
use crate::iovec::IoVec;

/// Bytes copied into the cache for a write-through write, not visible yet.
/// Give it to [`Engine::publish_placed`] or [`Engine::discard_placed`]:
/// dropping it otherwise keeps its segment until the next start.
#[must_use]
#[derive(Debug)]
pub struct Placed {
    off: u64,
    seg: u32,
    seg_off: u32,
    len: u32,
    gen: u64,
    crc: u32,
}

impl Placed {
    /// Logical byte offset.
    pub fn off(&self) -> u64 {
        self.off
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Never empty; for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Engine {
    /// Copy up to `len` bytes of `data` from byte `at` into the cache for
    /// logical `off`, without making them visible. Takes less than `len`
    /// at a 4 MiB region's or a segment's end. None when the cache is not
    /// taking writes now (full, paused, read-only, failed, mode none) or
    /// the head's next byte is not aligned to `align`: the caller then
    /// writes through a buffer of its own.
    pub fn place(
        &self,
        head: &mut DataHead,
        off: u64,
        data: &IoVec<'_>,
        at: usize,
        len: usize,
        align: usize,
    ) -> Option<Placed> {
        if len == 0
            || self.check_writable().is_err()
            || check_range(off, len as u64, self.size()).is_err()
            || self.mode() == CacheMode::None
            || !(head.next_off() as usize).is_multiple_of(align)
        {
            return None;
        }
        let _writing = self.writing()?;
        let region_left = REGION_BYTES - (off & (REGION_BYTES - 1));
        let want = (len as u64).min(region_left) as u32;
        let Alloc {
            seg,
            off: seg_off,
            len,
            gen,
        } = self.data_alloc(head, want)?;
        let at_medium = data_off(seg, seg_off);
        self.region.write_iov(at_medium, data, at, len as usize);
        if !data.intact() {
            // The fallback copy fails the same check.
            self.put_key_ref(seg);
            return None;
        }
        self.region.fence();
        let crc = if self.data_crc {
            self.region.crc32c(at_medium, len as usize)
        } else {
            0
        };
        Some(Placed {
            off,
            seg,
            seg_off,
            len,
            gen,
            crc,
        })
    }

    /// The address of `p`'s bytes, for the backing store's write. Takes a
    /// reference on their segment, dropped by [`Engine::unpin_placed`] with
    /// that address once the write no longer reads them.
    pub fn pin_placed(&self, p: &Placed) -> *mut u8 {
        self.segs.get_ref(p.seg);
        self.region
            .address(data_off(p.seg, p.seg_off), p.len as usize)
    }

    /// Drop the reference [`Engine::pin_placed`] took for `addr`.
    pub fn unpin_placed(&self, addr: *const u8) {
        let base = self.region.address(0, 0) as usize;
        let seg = ((addr as usize - base) as u64 - SEGMENTS_OFF) / SEG_BYTES;
        self.put_key_ref(seg as u32);
    }

    /// The backing store holds `p`'s bytes: make them visible as clean
    /// data (with the cache's mode now none: forget the range instead).
    /// Ok means `p` is done with; an error that asks for a retry
    /// (`retry_from`) means: try again on the next space signal.
    pub fn publish_placed(&self, p: &Placed) -> Result<()> {
        self.check_writable()?;
        if self.mode() == CacheMode::None {
            self.forget(p.off, p.len as u64, None)?;
            self.put_key_ref(p.seg);
            return Ok(());
        }
        let Some(_writing) = self.writing() else {
            return Err(Error::CacheFull { done: 0 });
        };
        let key = KeyOnMedia {
            off: p.off,
            len: p.len,
            flags: KEY_FLAG_CLEAN,
            seg: p.seg,
            seg_off: p.seg_off,
            gen: p.gen,
            data_crc: p.crc,
        };
        self.key_insert(&key, None)?;
        stats::add(&self.stats.write_bytes, p.len as u64);
        Ok(())
    }

    /// Give `p` up (its backing write failed, or its request was
    /// abandoned): the space goes back with its segment.
    pub fn discard_placed(&self, p: Placed) {
        self.put_key_ref(p.seg);
    }
}
