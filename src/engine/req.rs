//! The request paths: write, read (hits and misses), miss fill.
//!
//! Every request is cut at 4 MiB logical boundaries, so each piece touches
//! one index shard and one kset.
//!
//! Reads never block on the backing store: [`Engine::read`] copies what is
//! cached and returns the gaps as [`Miss`]es. The caller reads those from
//! the backing store however it likes (a queue worker's io_uring) and may
//! then hand the data to [`Engine::fill`] to cache it as clean data.

use std::sync::atomic::{fence, Ordering};

use super::cache::{check_range, region_of, Engine};
use super::data::{DataIn, DataOut};
use super::error::{Error, Result};
use super::key::CacheExt;
use super::mode::CacheMode;
use super::segment::SegKind;
use super::stats;
use crate::format::{
    data_off, KeyOnMedia, KEY_FLAG_CLEAN, KEY_FLAG_UNMAP, KEY_FLAG_ZERO, REGION_BYTES,
    SECTOR_BYTES, SEG_DATA_BYTES,
};

/// A caller's current data segment and the next free byte in it. Each queue
/// worker owns one, so writers never contend for space (dm-pcache keeps one
/// per CPU).
///
/// # Invariants
/// - While `seg` is Some, the head holds one reference on it.
#[derive(Debug, Default)]
pub struct DataHead {
    seg: Option<u32>,
    off: u32,
    gen: u64,
}

impl DataHead {
    /// Where in its segment's data area the next allocation starts.
    pub(super) fn next_off(&self) -> u32 {
        if self.seg.is_some() {
            self.off
        } else {
            0
        }
    }
}

/// A piece of a read that the cache did not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Miss {
    /// Logical byte offset.
    pub off: u64,
    /// Bytes.
    pub len: u64,
    /// Offset of this piece in the caller's buffer.
    pub buf_off: usize,
    /// Shard write version when the miss was found.
    version: u64,
}

impl Miss {
    /// The part of this miss `skip..skip+len` bytes in (a piece of it
    /// read on its own).
    pub fn part(&self, skip: u64, len: u64) -> Miss {
        debug_assert!(skip + len <= self.len);
        Miss {
            off: self.off + skip,
            len,
            buf_off: self.buf_off + skip as usize,
            version: self.version,
        }
    }
}

/// Space handed out by a data head.
pub(super) struct Alloc {
    pub seg: u32,
    pub off: u32,
    pub len: u32,
    pub gen: u64,
}

impl Engine {
    /// Carve up to `want` bytes out of `head`'s segment, taking a segment
    /// reference for the key that will point there. May return less than
    /// `want` (the end of a segment); `None` when the cache is full.
    pub(super) fn data_alloc(&self, head: &mut DataHead, want: u32) -> Option<Alloc> {
        let seg = match head.seg {
            Some(s) => s,
            None => {
                let s = self.segs.alloc(SegKind::Data)?;
                if self.gc_wanted(false) {
                    // Past gc_percent: free clean segments before writers
                    // find the cache full.
                    self.gc_kick.kick();
                }
                self.segs.get_ref(s); // the head's reference
                head.seg = Some(s);
                head.off = 0;
                head.gen = self.segs.gen(s);
                s
            }
        };
        let room = SEG_DATA_BYTES as u32 - head.off;
        let len = want.min(room);
        let a = Alloc {
            seg,
            off: head.off,
            len,
            gen: head.gen,
        };
        self.segs.get_ref(seg); // the key's reference
        head.off += len;
        if head.off == SEG_DATA_BYTES as u32 {
            self.head_release(head);
        }
        Some(a)
    }

    /// See [`Engine::head_release`].
    pub(super) fn release_head(&self, head: &mut DataHead) {
        if let Some(seg) = head.seg.take() {
            if let Err(e) = self.segs.put_ref(&self.region, seg) {
                self.note_persist_error(e);
            }
        }
    }

    fn note_persist_error(&self, e: std::io::Error) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "persist to the cache medium failed; refusing writes until restart");
        }
    }

    /// See [`Engine::write`].
    pub(super) fn write_data<D: DataIn + ?Sized>(
        &self,
        head: &mut DataHead,
        off: u64,
        data: &D,
    ) -> Result<()> {
        self.write_flagged(head, off, data, 0)
    }

    /// [`Engine::write`], logging keys with `flags` (CLEAN: the backing
    /// store already holds the data).
    pub(super) fn write_flagged<D: DataIn + ?Sized>(
        &self,
        head: &mut DataHead,
        off: u64,
        data: &D,
        flags: u32,
    ) -> Result<()> {
        self.check_writable()?;
        let len = data.len() as u64;
        check_range(off, len, self.size())?;
        let Some(_writing) = self.writing() else {
            // An invalidation runs: wait as for space.
            return Err(Error::CacheFull { done: 0 });
        };
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let region_left = REGION_BYTES - (pos & (REGION_BYTES - 1));
            let want = (len - done).min(region_left) as u32;
            let Some(a) = self.data_alloc(head, want) else {
                stats::add(&self.stats.cache_full, 1);
                self.space_wanted.store(true, Ordering::Relaxed);
                self.writeback_wanted.store(true, Ordering::Relaxed);
                self.gc_kick.kick();
                return Err(Error::CacheFull { done });
            };
            // Data first, fenced: it reaches the medium before any kset
            // that points to it can.
            let at = data_off(a.seg, a.off);
            data.store(&self.region, at, done as usize, a.len as usize);
            if !data.intact() {
                self.put_key_ref(a.seg);
                return Err(Error::SourceFaulted);
            }
            self.region.fence();
            // Of our copy: a guest may change its buffer meanwhile.
            let crc = if self.data_crc {
                self.region.crc32c(at, a.len as usize)
            } else {
                0
            };
            let key = KeyOnMedia {
                off: pos,
                len: a.len,
                flags,
                seg: a.seg,
                seg_off: a.off,
                gen: a.gen,
                data_crc: crc,
            };
            if let Err(e) = self.key_insert(&key, None) {
                self.put_key_ref(a.seg);
                return Err(e.with_done(done));
            }
            done += a.len as u64;
        }
        stats::add(&self.stats.write_bytes, len);
        Ok(())
    }

    /// See [`Engine::write_zeroes`].
    pub(super) fn log_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(off, len, self.size())?;
        let Some(_writing) = self.writing() else {
            return Err(Error::CacheFull { done: 0 });
        };
        let flags = KEY_FLAG_ZERO | if unmap { KEY_FLAG_UNMAP } else { 0 };
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let region_left = REGION_BYTES - (pos & (REGION_BYTES - 1));
            let n = (len - done).min(region_left);
            let key = KeyOnMedia::dataless(pos, n as u32, flags);
            if let Err(e) = self.key_insert(&key, None) {
                return Err(e.with_done(done));
            }
            done += n;
        }
        stats::add(&self.stats.zeroed_bytes, len);
        Ok(())
    }

    pub(super) fn put_key_ref(&self, seg: u32) {
        if let Err(e) = self.segs.put_ref(&self.region, seg) {
            self.note_persist_error(e);
        }
    }

    /// Insert `key` into the index and append it to its kset, under the
    /// shard lock so log order equals index order. With `fill_version`,
    /// the insert is skipped (Ok(false)) when a write reached the region
    /// since that version.
    pub(super) fn key_insert(&self, key: &KeyOnMedia, fill_version: Option<u64>) -> Result<bool> {
        let region = region_of(key.off);
        let shard = self.shard_or_create(region);
        let mut sh = shard.lock().expect("shard lock");
        if let Some(v) = fill_version {
            if sh.write_version != v {
                return Ok(false);
            }
        }
        let mut ks = self.kset_for_request(region)?;
        self.kset_room(&mut ks)?;
        let start = (key.off & (REGION_BYTES - 1)) / SECTOR_BYTES;
        CacheExt::from_key(key).apply(&mut sh.map, start);
        // Anything but a fill makes fills read before it stale (a
        // write-through write logs clean data too).
        if fill_version.is_none() {
            sh.write_version += 1;
        }
        self.kset_push(&mut ks, key);
        self.kset_filled(&mut ks);
        Ok(true)
    }

    /// See [`Engine::read`].
    pub(super) fn read_cached<D: DataOut + ?Sized>(
        &self,
        off: u64,
        buf: &mut D,
        misses: &mut Vec<Miss>,
    ) -> Result<()> {
        let len = buf.len() as u64;
        check_range(off, len, self.size())?;
        if self.mode() == CacheMode::None {
            // The cache is not used: all of it from the backing store.
            misses.push(Miss {
                off,
                len,
                buf_off: 0,
                version: 0,
            });
            stats::add(&self.stats.read_miss_bytes, len);
            stats::add(&self.stats.read_misses, 1);
            return Ok(());
        }
        let first_miss = misses.len();
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let region_left = REGION_BYTES - (pos & (REGION_BYTES - 1));
            let n = (len - done).min(region_left);
            self.read_piece(pos, buf, done as usize, n as usize, misses)?;
            done += n;
        }
        let missed: u64 = misses[first_miss..].iter().map(|m| m.len).sum();
        stats::add(&self.stats.read_miss_bytes, missed);
        stats::add(&self.stats.read_hit_bytes, len - missed);
        if missed == 0 {
            stats::add(&self.stats.read_hits, 1);
        } else {
            stats::add(&self.stats.read_misses, 1);
        }
        Ok(())
    }

    /// Bytes `buf_base..buf_base+piece_len` of `buf`, read from logical
    /// `pos`, inside one 4 MiB region.
    fn read_piece<D: DataOut + ?Sized>(
        &self,
        pos: u64,
        buf: &mut D,
        buf_base: usize,
        piece_len: usize,
        misses: &mut Vec<Miss>,
    ) -> Result<()> {
        let region = region_of(pos);
        let base = region << crate::format::REGION_SHIFT;
        let Some(shard) = self.shard(region) else {
            misses.push(Miss {
                off: pos,
                len: piece_len as u64,
                buf_off: buf_base,
                version: 0,
            });
            return Ok(());
        };
        let mut sh = shard.lock().expect("shard lock");
        let version = sh.write_version;
        let start = (pos - base) / SECTOR_BYTES;
        let sectors = piece_len as u64 / SECTOR_BYTES;
        // Pieces: (sector in region, sectors, extent start, extent)
        let mut pieces: smallvec_lite::Inline<Piece> = Default::default();
        sh.map
            .lookup(start, sectors, |s, n, e| pieces.push((s, n, e)));
        let mut stale = Vec::new();
        let mut result = Ok(());
        let gap = |s: u64, n: u64, misses: &mut Vec<Miss>| {
            let off = base + s * SECTOR_BYTES;
            let buf_off = buf_base + ((s - start) * SECTOR_BYTES) as usize;
            // Merge with the previous miss when contiguous.
            if let Some(last) = misses.last_mut() {
                if last.off + last.len == off
                    && last.version == version
                    && last.buf_off + last.len as usize == buf_off
                {
                    last.len += n * SECTOR_BYTES;
                    return;
                }
            }
            misses.push(Miss {
                off,
                len: n * SECTOR_BYTES,
                buf_off,
                version,
            });
        };
        let mut hits: smallvec_lite::Inline<(u64, u64, u32, u64)> = Default::default();
        // The piece at sector `s` of the region, `n` sectors, cannot be read.
        let lost = |s: u64, n: u64| Error::DataCorrupt {
            off: base + s * SECTOR_BYTES,
            len: n * SECTOR_BYTES,
        };
        for &(s, n, e) in pieces.iter() {
            let Some((ext_start, ext)) = e else {
                gap(s, n, misses);
                continue;
            };
            if ext.is_bad() {
                tracing::warn!(
                    off = base + s * SECTOR_BYTES,
                    len = n * SECTOR_BYTES,
                    "read of a range whose newest data was lost (failed its CRC before writeback)"
                );
                result = Err(lost(s, n));
                break;
            }
            if ext.is_zero() {
                let b = buf_base + ((s - start) * SECTOR_BYTES) as usize;
                buf.zero(b, (n * SECTOR_BYTES) as usize);
                continue;
            }
            let seg_gen = self.segs.gen(ext.seg);
            if seg_gen as u32 != ext.gen {
                // Lazy invalidation: the segment was reclaimed.
                stale.push(ext_start);
                gap(s, n, misses);
                continue;
            }
            if self.data_crc && !self.ext_crc_ok(&ext) {
                stats::add(&self.stats.data_crc_errors, 1);
                let off = base + s * SECTOR_BYTES;
                if ext.is_clean() {
                    tracing::warn!(
                        off,
                        len = n * SECTOR_BYTES,
                        "cached clean data failed its CRC; refetching from the backing store"
                    );
                    stale.push(ext_start);
                    gap(s, n, misses);
                    continue;
                }
                tracing::error!(
                    off,
                    len = n * SECTOR_BYTES,
                    "cached dirty data failed its CRC; failing the read"
                );
                result = Err(lost(s, n));
                break;
            }
            let b = buf_base + ((s - start) * SECTOR_BYTES) as usize;
            let blen = (n * SECTOR_BYTES) as usize;
            buf.load(
                &self.region,
                data_off(ext.seg, ext.data_byte_off()),
                b,
                blen,
            );
            hits.push((s, n, ext.seg, seg_gen));
        }
        // A segment reclaimed and reused while we copied would have bumped
        // its gen first; re-check after the copy (a seqlock read).
        fence(Ordering::Acquire);
        for &(s, n, seg, g) in hits.iter() {
            if self.segs.gen(seg) != g {
                gap(s, n, misses);
            }
        }
        for s in stale {
            sh.map.remove(s);
        }
        result
    }

    /// Does an extent's logged key still match its data CRC?
    fn ext_crc_ok(&self, ext: &CacheExt) -> bool {
        let key_off = (ext.seg_off - ext.orig_skip) as u64 * SECTOR_BYTES;
        let len = ext.orig_len as usize * SECTOR_BYTES as usize;
        self.region.crc32c(data_off(ext.seg, key_off as u32), len) == ext.crc
    }

    /// See [`Engine::fill`].
    pub(super) fn fill_clean(&self, head: &mut DataHead, miss: &Miss, data: &[u8]) {
        if self.check_writable().is_err()
            || data.len() as u64 != miss.len
            || self.mode() == CacheMode::None
        {
            return;
        }
        let mut done = 0u64;
        while done < miss.len {
            let pos = miss.off + done;
            let region_left = REGION_BYTES - (pos & (REGION_BYTES - 1));
            let want = (miss.len - done).min(region_left) as u32;
            let Some(a) = self.data_alloc(head, want) else {
                return;
            };
            let piece = &data[done as usize..(done + a.len as u64) as usize];
            self.region.write(data_off(a.seg, a.off), piece);
            self.region.fence();
            let key = KeyOnMedia {
                off: pos,
                len: a.len,
                flags: KEY_FLAG_CLEAN,
                seg: a.seg,
                seg_off: a.off,
                gen: a.gen,
                data_crc: if self.data_crc {
                    crc32c::crc32c(piece)
                } else {
                    0
                },
            };
            match self.key_insert(&key, Some(miss.version)) {
                Ok(true) => stats::add(&self.stats.fill_bytes, a.len as u64),
                Ok(false) | Err(_) => {
                    self.put_key_ref(a.seg);
                    return;
                }
            }
            done += a.len as u64;
        }
    }
}

/// A piece of a lookup: (sector in region, sectors, (extent start, extent)
/// or None for a gap).
type Piece = (u64, u64, Option<(u64, CacheExt)>);

/// A tiny inline vector, so a read allocates nothing in the common case of
/// a handful of pieces.
mod smallvec_lite {
    /// Up to 8 items inline, then a Vec.
    pub struct Inline<T: Copy> {
        inline: [Option<T>; 8],
        n: usize,
        more: Vec<T>,
    }

    impl<T: Copy> Default for Inline<T> {
        fn default() -> Self {
            Inline {
                inline: [None; 8],
                n: 0,
                more: Vec::new(),
            }
        }
    }

    impl<T: Copy> Inline<T> {
        pub fn push(&mut self, p: T) {
            if self.n < 8 {
                self.inline[self.n] = Some(p);
                self.n += 1;
            } else {
                self.more.push(p);
            }
        }

        pub fn iter(&self) -> impl Iterator<Item = &T> {
            self.inline[..self.n]
                .iter()
                .flatten()
                .chain(self.more.iter())
        }
    }
}
