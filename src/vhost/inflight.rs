//! Inflight I/O tracking for split rings (vhost-user INFLIGHT_SHMFD).
//!
//! The frontend keeps a shared memory region for the backend and hands it
//! back to the next backend after a reconnect. In it, each queue records
//! which requests were taken from the ring and not yet returned, so a new
//! pcache runs each of them once more, in the order they were taken, and
//! none twice. The layout is the vhost-user specification's ("Inflight I/O
//! tracking", `docs/interop/vhost-user.rst` in QEMU), one region per queue,
//! each rounded up to 64 bytes:
//!
//! ```text
//! queue region                      descriptor state (16 bytes, one per entry)
//! 0   u64 features (0)              0  u8  inflight (1: taken, not returned)
//! 8   u16 version (1; 0: never used) 1  u8  padding[5]
//! 10  u16 desc_num (= queue size)   6  u16 next (batch list; unused)
//! 12  u16 last_batch_head           8  u64 counter (order of taking)
//! 14  u16 used_idx
//! 16  descriptor states
//! ```
//!
//! Requests are returned one at a time: `last_batch_head` names the one
//! being returned and `used_idx` is updated after its flag is cleared, so a
//! death in between is repaired at the next start (the used ring's index
//! moved past `used_idx`: that request was returned).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::shm::SharedMap;

/// Bytes of a queue region's header.
const HEADER_BYTES: usize = 16;
/// Bytes of one descriptor state.
const DESC_BYTES: usize = 16;
/// Queue regions are aligned to this.
const ALIGN: usize = 64;
/// The only layout version there is.
const VERSION: u16 = 1;

/// Bytes of one queue's region for a ring of `queue_size` entries.
pub fn queue_region_bytes(queue_size: u16) -> usize {
    (HEADER_BYTES + DESC_BYTES * queue_size as usize).next_multiple_of(ALIGN)
}

/// The frontend's inflight region, mapped.
///
/// # Invariants
/// `map.len() >= num_queues * queue_region_bytes(queue_size)`.
pub struct InflightRegion {
    map: SharedMap,
    num_queues: u16,
    queue_size: u16,
    /// The memfd behind the mapping (kept to hand out again).
    file: File,
}

// SAFETY: the mapping is owned by the region; each queue's part is written
// by that queue's worker only (under the queue's mutex), and the frontend
// does not touch it while this backend runs.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.map.len())
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    /// A new zeroed region for `num_queues` rings of `queue_size` entries,
    /// in a sealed memfd (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<InflightRegion> {
        let len = num_queues as usize * queue_region_bytes(queue_size);
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight region for no queue",
            ));
        }
        // SAFETY: a static NUL-terminated name; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"pcache-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // No one may shrink it under a mapping (it would fault).
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(file, 0, len as u64, num_queues, queue_size)
    }

    /// Map the region the frontend hands back (SET_INFLIGHT_FD): `size`
    /// bytes at `offset` of `file`, for `num_queues` rings of `queue_size`.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightRegion> {
        let need = num_queues as u64 * queue_region_bytes(queue_size) as u64;
        if num_queues == 0 || queue_size == 0 || size < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "inflight region of {size} bytes for {num_queues} queues of {queue_size} entries (needs {need})"
                ),
            ));
        }
        let map = SharedMap::map(&file, size, offset, "inflight region")?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
            file,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true (a region covers at least one queue).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The memfd, to send to the frontend.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Queues covered.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Ring size the region was made for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of queue `q`, if the region covers it.
    pub fn queue(self: &Arc<Self>, q: usize) -> Option<InflightQueue> {
        (q < self.num_queues as usize).then(|| InflightQueue {
            base: q * queue_region_bytes(self.queue_size),
            region: self.clone(),
            counter: Arc::new(AtomicU64::new(0)),
        })
    }

    fn load<const N: usize>(&self, at: usize) -> [u8; N] {
        assert!(
            at + N <= self.map.len(),
            "inflight access out of the region"
        );
        let mut b = [0u8; N];
        // SAFETY: in bounds (checked above) of a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.map.ptr().add(at), b.as_mut_ptr(), N) };
        b
    }

    fn store(&self, at: usize, b: &[u8]) {
        assert!(
            at + b.len() <= self.map.len(),
            "inflight access out of the region"
        );
        // SAFETY: in bounds (checked above) of a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.map.ptr().add(at), b.len()) };
    }
}

/// What a queue's region says when its ring starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// The ring's next available index: the used index plus the requests
    /// still taken. None when the region was new (nothing to recover).
    pub next_avail: Option<u16>,
    /// Heads of the requests to run again, in the order they were taken.
    pub resubmit: Vec<u16>,
}

/// One queue's part of the inflight region.
#[derive(Clone, Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: usize,
    /// Orders requests as they are taken (the spec's global counter).
    counter: Arc<AtomicU64>,
}

impl InflightQueue {
    fn desc_num(&self) -> u16 {
        u16::from_le_bytes(self.region.load(self.base + 10))
    }

    fn desc_at(&self, head: u16) -> usize {
        self.base + HEADER_BYTES + head as usize * DESC_BYTES
    }

    fn set_used_idx(&self, idx: u16) {
        self.region.store(self.base + 14, &idx.to_le_bytes());
    }

    fn set_inflight(&self, head: u16, on: bool) {
        self.region.store(self.desc_at(head), &[u8::from(on)]);
    }

    /// Read the region as the ring starts, `used_idx` being the used ring's
    /// index now and `queue_size` its size, and make it consistent:
    /// a new region (or one for another ring size) is initialised and asks
    /// nothing; otherwise the request being returned when the last backend
    /// died is cleared if it was returned, and the requests still taken are
    /// listed by counter.
    pub fn recover(&self, used_idx: u16, queue_size: u16) -> Recovered {
        let r = &self.region;
        let version = u16::from_le_bytes(r.load(self.base + 8));
        let desc_num = self.desc_num();
        if version != VERSION || desc_num != queue_size || queue_size > r.queue_size {
            if version != 0 {
                tracing::warn!(
                    version,
                    desc_num,
                    queue_size,
                    "inflight region does not match the ring; starting it afresh"
                );
            }
            let size = queue_size.min(r.queue_size);
            let zero = vec![0u8; queue_region_bytes(size)];
            r.store(self.base, &zero);
            r.store(self.base + 8, &VERSION.to_le_bytes());
            r.store(self.base + 10, &size.to_le_bytes());
            self.set_used_idx(used_idx);
            self.counter.store(0, Ordering::Relaxed);
            return Recovered::default();
        }
        let seen = u16::from_le_bytes(r.load(self.base + 14));
        if seen != used_idx {
            // The last request returned made it into the used ring; its
            // flag may not have been cleared.
            let last = u16::from_le_bytes(r.load(self.base + 12));
            if last < desc_num {
                self.set_inflight(last, false);
            }
            self.set_used_idx(used_idx);
        }
        let mut taken: Vec<(u64, u16)> = (0..desc_num)
            .filter_map(|h| {
                let d: [u8; DESC_BYTES] = r.load(self.desc_at(h));
                (d[0] == 1).then(|| (u64::from_le_bytes(d[8..16].try_into().expect("8")), h))
            })
            .collect();
        taken.sort_unstable();
        let next = taken.last().map_or(0, |(c, _)| c.wrapping_add(1));
        self.counter.store(next, Ordering::Relaxed);
        Recovered {
            next_avail: Some(used_idx.wrapping_add(taken.len() as u16)),
            resubmit: taken.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// A request was taken from the ring: record its order, then mark it.
    pub fn take(&self, head: u16) {
        if head >= self.desc_num() {
            return; // not a request the ring can return either
        }
        let c = self.counter.fetch_add(1, Ordering::Relaxed);
        self.region.store(self.desc_at(head) + 8, &c.to_le_bytes());
        self.set_inflight(head, true);
    }

    /// A request is about to go into the used ring.
    pub fn returning(&self, head: u16) {
        self.region.store(self.base + 12, &head.to_le_bytes());
    }

    /// A request went into the used ring, whose index is now `used_idx`.
    pub fn returned(&self, head: u16, used_idx: u16) {
        if head < self.desc_num() {
            self.set_inflight(head, false);
        }
        self.set_used_idx(used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(q: u16, size: u16) -> Arc<InflightRegion> {
        Arc::new(InflightRegion::create(q, size).unwrap())
    }

    #[test]
    fn region_size_follows_the_spec_layout() {
        assert_eq!(queue_region_bytes(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_bytes(256) % 64, 0);
        let r = region(2, 128);
        assert_eq!(r.len(), 2 * queue_region_bytes(128));
        assert!(r.queue(2).is_none());
    }

    #[test]
    fn a_new_region_recovers_nothing_and_is_initialised() {
        let r = region(1, 8);
        let q = r.queue(0).unwrap();
        assert_eq!(q.recover(5, 8), Recovered::default());
        assert_eq!(q.recover(5, 8).next_avail, Some(5), "second start reads it");
    }

    #[test]
    fn requests_taken_and_not_returned_come_back_in_the_order_taken() {
        let r = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(0, 8);
        for h in [3, 1, 6, 2] {
            q.take(h);
        }
        q.returning(1);
        q.returned(1, 1);
        // Then the process dies. A new one maps the same memory.
        let q2 = r.queue(0).unwrap();
        let got = q2.recover(1, 8);
        assert_eq!(got.resubmit, vec![3, 6, 2]);
        assert_eq!(got.next_avail, Some(4));
        // Its own requests are ordered after the recovered ones.
        q2.take(5);
        q2.returning(3);
        q2.returned(3, 2);
        assert_eq!(r.queue(0).unwrap().recover(2, 8).resubmit, vec![6, 2, 5]);
    }

    #[test]
    fn a_death_after_the_used_ring_moved_clears_the_returned_request() {
        let r = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(10, 8);
        q.take(4);
        q.take(7);
        q.returning(4);
        // The used ring's index moved to 11; the process died before
        // `returned`.
        let got = r.queue(0).unwrap().recover(11, 8);
        assert_eq!(got.resubmit, vec![7]);
        assert_eq!(got.next_avail, Some(12));
    }

    #[test]
    fn a_region_for_another_ring_size_is_started_afresh() {
        let r = region(1, 16);
        let q = r.queue(0).unwrap();
        q.recover(0, 16);
        q.take(9);
        assert_eq!(q.recover(0, 8), Recovered::default());
        // Heads past the ring are not recorded.
        q.take(12);
        assert!(q.recover(0, 8).resubmit.is_empty());
    }

    #[test]
    fn a_mapping_too_small_for_its_queues_is_refused() {
        let r = InflightRegion::create(1, 8).unwrap();
        let f = r.file().try_clone().unwrap();
        assert!(InflightRegion::map(f, 0, 64, 2, 8).is_err());
    }
}
