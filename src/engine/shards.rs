//! The table of index shards, one per 4 MiB region, which grows with the
//! disk.
//!
//! Two levels, each slot filled once: a fixed top table of chunks of
//! [`CHUNK_REGIONS`] regions, created on first use. A lookup is two loads
//! and never takes a lock, a region's shard never moves once created, and
//! growing the disk only widens the range of regions allowed, so requests
//! in flight never see the table change under them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::index::ExtentMap;
use super::key::CacheExt;

/// One index shard: the extents of a 4 MiB region.
#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) map: ExtentMap<u16, CacheExt>,
    /// Bumped by every write into the region; a miss fill whose read
    /// started at an older version is dropped, since the backing data it
    /// read may be older than what the guest wrote meanwhile.
    pub(super) write_version: u64,
}

/// Regions per chunk (16 GiB of disk).
const CHUNK_REGIONS: usize = 4096;
/// Chunks in the top table: disks up to 16 GiB x 16384 = 256 TiB.
const CHUNKS: usize = 16384;
const _: () = assert!(
    (CHUNK_REGIONS * CHUNKS) as u64 * crate::format::REGION_BYTES == crate::format::MAX_DISK_BYTES
);

type Chunk = Box<[OnceLock<Box<Mutex<Shard>>>]>;

/// What the allocator adds to each allocation (glibc: a 16-byte header,
/// rounded up).
const MALLOC_OVERHEAD: usize = 16;

/// See the module documentation.
pub(super) struct ShardTable {
    top: Box<[OnceLock<Chunk>]>,
    /// Regions of the disk now; shards past it are never created.
    regions: AtomicU64,
}

impl ShardTable {
    /// A table for a disk of `regions` regions (at most MAX_DISK_BYTES).
    pub(super) fn new(regions: u64) -> ShardTable {
        ShardTable {
            top: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
            regions: AtomicU64::new(regions),
        }
    }

    /// The disk grew to `regions` regions.
    pub(super) fn grow(&self, regions: u64) {
        self.regions.fetch_max(regions, Ordering::Release);
    }

    fn split(region: u64) -> (usize, usize) {
        let r = region as usize;
        (r / CHUNK_REGIONS, r % CHUNK_REGIONS)
    }

    /// The shard of `region`, if it was created.
    pub(super) fn get(&self, region: u64) -> Option<&Mutex<Shard>> {
        let (c, i) = Self::split(region);
        self.top.get(c)?.get()?.get(i)?.get().map(|b| &**b)
    }

    /// The shard of `region`, created if needed. `region` must be inside
    /// the disk (callers check requests and keys against its size).
    pub(super) fn get_or_create(&self, region: u64) -> &Mutex<Shard> {
        assert!(
            region < self.regions.load(Ordering::Acquire),
            "region {region} is past the disk"
        );
        let (c, i) = Self::split(region);
        let chunk =
            self.top[c].get_or_init(|| (0..CHUNK_REGIONS).map(|_| OnceLock::new()).collect());
        chunk[i].get_or_init(Default::default)
    }

    /// Bytes the table and its shards take, but for the extents in them.
    pub(super) fn bytes(&self) -> u64 {
        let top = self.top.len() * std::mem::size_of::<OnceLock<Chunk>>();
        let slot = std::mem::size_of::<OnceLock<Box<Mutex<Shard>>>>();
        let shard = std::mem::size_of::<Mutex<Shard>>() + MALLOC_OVERHEAD;
        let chunks = self.top.iter().filter(|c| c.get().is_some()).count();
        let shards = self.iter().count();
        (top + chunks * CHUNK_REGIONS * slot + shards * shard) as u64
    }

    /// Every shard created so far, with its region, in region order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &Mutex<Shard>)> {
        self.top
            .iter()
            .enumerate()
            .filter_map(|(c, chunk)| Some((c, chunk.get()?)))
            .flat_map(|(c, chunk)| {
                chunk
                    .iter()
                    .enumerate()
                    .filter_map(move |(i, s)| Some(((c * CHUNK_REGIONS + i) as u64, &**s.get()?)))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_created_once_found_again_and_listed_in_order() {
        let t = ShardTable::new(3 * CHUNK_REGIONS as u64);
        assert!(t.get(5).is_none());
        let a = t.get_or_create(5) as *const _;
        let b = t.get_or_create(2 * CHUNK_REGIONS as u64 + 1) as *const _;
        assert_eq!(t.get(5).unwrap() as *const _, a);
        assert_eq!(t.get_or_create(5) as *const _, a);
        let regions: Vec<u64> = t.iter().map(|(r, _)| r).collect();
        assert_eq!(regions, vec![5, 2 * CHUNK_REGIONS as u64 + 1]);
        assert_eq!(t.get(2 * CHUNK_REGIONS as u64 + 1).unwrap() as *const _, b);
        assert!(t.get(u64::MAX).is_none());
    }

    #[test]
    #[should_panic(expected = "past the disk")]
    fn a_shard_past_the_disk_is_never_created() {
        ShardTable::new(10).get_or_create(10);
    }

    #[test]
    fn growing_allows_the_new_regions() {
        let t = ShardTable::new(10);
        t.grow(20);
        t.get_or_create(19);
        t.grow(15); // never shrinks
        t.get_or_create(19);
    }
}
