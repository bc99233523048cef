//! Driving one queue of a [`Device`] with no vhost-user connection, as a
//! hostile driver would: the chain-level tests in `backend.rs` and the fuzz
//! targets in `fuzz/` (feature `fuzzing`) share it, so they exercise the
//! same path.
//!
//! Guest memory is one region at address 0:
//!
//! ```text
//! 0x0000 descriptor table (QUEUE_SIZE x 16 bytes)
//! 0x1000 available ring
//! 0x1400 used ring
//! 0x2000 DATA_START: buffers, up to the end of guest memory
//! ```
//!
//! (virtio-queue's `MockSplitQueue` is not used for the layout: with 256
//! entries it places the used ring over the second half of the available
//! ring.)
//!
//! A request goes through the production code: the chain is popped from a
//! real `VringRwLock`, run by `run_chain` + `end_batch` (what the worker
//! thread's `drain_avail` does for each chain) or by `handle_event` itself,
//! and anything left pending is finished by `stop_vring`. The harness reads
//! the answers where the guest would: in the used ring and guest memory.
//!
//! [`Harness::run_case`] turns arbitrary bytes into one request (guest
//! memory contents, a descriptor chain of any shape, a header), runs it and
//! checks the answer against a model of the device written independently
//! of `request::parse` (and a shadow copy of the disk for data).

use std::io;
use std::path::Path;
use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

mod case;
mod frontend;

pub use frontend::Frontends;

use super::conn::ServeConfig;
use super::counters::Counters;
use super::device::Device;
use super::guest::Vring;
use super::ring::Ring;
use crate::backing::Backing;
use crate::disk::{Disk, DiskConfig, DEFAULT_IO_MEMORY};
use crate::engine::{Engine, FormatOptions, OpenOptions, WritebackPolicy};
use crate::pmem::{Region, RegionOptions};
use crate::testing::MemBacking;
use crate::vhost::request::{status, types, HEADER_BYTES, ID_BYTES};

/// Entries in the queue.
pub const QUEUE_SIZE: u16 = 256;
/// Guest address of the descriptor table.
pub const DESC_TABLE: u64 = 0;
/// Guest address of the available ring.
pub const AVAIL_RING: u64 = 0x1000;
/// Guest address of the used ring.
pub const USED_RING: u64 = 0x1400;
/// First guest address free for buffers.
pub const DATA_START: u64 = 0x2000;
/// Size of the cache file an engine is formatted on (the minimum).
pub const CACHE_FILE_BYTES: u64 = 512 << 20;

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// One split-ring descriptor, as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// `F_*` bits (any value is allowed).
    pub flags: u16,
    /// Index of the next descriptor when `F_NEXT` is set.
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }

    /// Device-writable?
    pub fn is_write(&self) -> bool {
        self.flags & F_WRITE != 0
    }

    fn raw(&self) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            self.addr, self.len, self.flags, self.next,
        ))
    }
}

/// How to build a [`Harness`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes of guest memory (> `DATA_START`).
    pub guest_bytes: u64,
    /// Size of the (in-memory) backing store, a multiple of 512.
    pub backing_bytes: u64,
    /// Serve the disk read-only.
    pub read_only: bool,
    /// Serial returned by GET_ID.
    pub serial: String,
    /// The queue's longest polling window, µs (`ServeConfig::poll_us`).
    pub poll_us: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            guest_bytes: 256 << 10,
            backing_bytes: 8 << 20,
            read_only: false,
            serial: "pcache-hostile-0001".into(),
            poll_us: 0,
        }
    }
}

/// What became of an offered chain right after it was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Returned in the used ring with this length.
    Used(u32),
    /// Accepted, waiting (a read for the backing store, or a write or flush
    /// for cache space).
    Pending,
    /// Neither returned nor pending: its head index cannot be named in the
    /// used ring.
    Dropped,
}

/// What a case turned out to be, for the statistics of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Head index past the queue: dropped.
    Dropped,
    /// A buffer outside guest memory, or no writable byte: used length 0.
    NoStatus,
    /// Rejected with this status.
    Rejected(u8),
    /// A read that completed at once.
    ReadHit,
    /// A read that waited for the backing store.
    ReadMiss,
    /// A write.
    Write,
    /// A DISCARD or WRITE_ZEROES.
    Zeroes,
    /// A flush.
    Flush,
    /// GET_ID.
    GetId,
}

/// What [`Harness::run_case`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseReport {
    /// What the request was.
    pub class: Class,
    /// The guest rewrote the chain while the request was pending.
    pub mutated: bool,
    /// The chain went through `handle_event` (not `run_chain`).
    pub kicked: bool,
}

/// One queue of a [`Device`] over a fresh engine, with guest memory, a
/// vring, and a shadow copy of the disk.
pub struct Harness {
    // Dropped first: it releases its data heads into the engine.
    blk: Device,
    vring: Vring,
    /// A second queue on the same rings, to see chains as the device will.
    oracle: Queue,
    guest_bytes: u64,
    backing_bytes: u64,
    read_only: bool,
    serial: [u8; ID_BYTES],
    used_seen: u16,
    /// What the last submit left pending (reads, deferred), before
    /// `end_batch` could complete it.
    last_pending: (usize, usize),
    shadow: Vec<u8>,
}

fn other<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::other(e.to_string())
}

impl Harness {
    /// Format a cache at `cache` (created, `CACHE_FILE_BYTES`, unlinked
    /// once open), open an engine on it over a zeroed in-memory backing
    /// store, and build a backend with one queue.
    pub fn new(cache: &Path, o: &Options) -> io::Result<Harness> {
        assert!(o.guest_bytes > DATA_START, "guest memory too small");
        let f = std::fs::File::create(cache)?;
        f.set_len(CACHE_FILE_BYTES)?;
        drop(f);
        let opened = (|| {
            let region = Region::open(cache, RegionOptions::default()).map_err(other)?;
            Engine::format(
                &region,
                &FormatOptions {
                    backing_bytes: o.backing_bytes,
                    force: true,
                    ..Default::default()
                },
            )
            .map_err(other)?;
            drop(region);
            let region = Arc::new(Region::open(cache, RegionOptions::default()).map_err(other)?);
            Engine::open(region, &OpenOptions::default()).map_err(other)
        })();
        let _ = std::fs::remove_file(cache);
        let engine = opened?;
        let backing: Arc<dyn Backing> = Arc::new(MemBacking::new(o.backing_bytes));
        let mem = GuestMemoryMmap::<super::shm::Owner>::from_ranges(&[(
            GuestAddress(0),
            o.guest_bytes as usize,
        )])
        .map_err(other)?;
        let gm = GuestMemoryAtomic::new(mem);
        let disk = Disk::new(
            engine,
            backing,
            true,
            DiskConfig {
                sequential_cutoff: 0,
                read_only: o.read_only,
                io_memory: DEFAULT_IO_MEMORY,
            },
            WritebackPolicy::IMMEDIATE,
        )?;
        let blk = Device::new(
            Arc::new(disk),
            ServeConfig {
                num_queues: 1,
                counters: Counters::new(1),
                queue_size: QUEUE_SIZE,
                blk_size: 512,
                read_only: o.read_only,
                serial: o.serial.clone(),
                poll_us: o.poll_us,
            },
            gm.clone(),
        )?;
        let vring = Vring::new(gm, QUEUE_SIZE).map_err(other)?;
        vring.set_queue_size(QUEUE_SIZE);
        vring
            .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
            .map_err(other)?;
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        // What handle_event does on the first kick.
        blk.queues[0].lock().expect("queue lock").ring = Some(Ring::new(
            vring.clone(),
            None,
            blk.conn.log.clone(),
            blk.memory().clone(),
        ));
        let mut oracle = Queue::new(QUEUE_SIZE).map_err(other)?;
        oracle.set_size(QUEUE_SIZE);
        oracle.set_ready(true);
        oracle.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        oracle.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        oracle.set_used_ring_address(Some(USED_RING as u32), Some(0));
        let mut serial = [0u8; ID_BYTES];
        let s = o.serial.as_bytes();
        let n = s.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&s[..n]);
        Ok(Harness {
            blk,
            vring,
            oracle,
            guest_bytes: o.guest_bytes,
            backing_bytes: o.backing_bytes,
            read_only: o.read_only,
            serial,
            used_seen: 0,
            last_pending: (0, 0),
            shadow: vec![0; o.backing_bytes as usize],
        })
    }

    /// The queue's request counters.
    pub fn counters(&self) -> &Counters {
        &self.blk.conn.cfg.counters
    }

    /// Bytes of guest memory.
    pub fn guest_bytes(&self) -> u64 {
        self.guest_bytes
    }

    /// Size of the disk in bytes.
    pub fn capacity(&self) -> u64 {
        self.backing_bytes
    }

    /// Write guest memory; false (nothing written) if the range is not all
    /// inside it.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> bool {
        if !self.in_guest(addr, data.len() as u64) {
            return false;
        }
        self.blk
            .conn
            .mem
            .memory()
            .write_slice(data, GuestAddress(addr))
            .is_ok()
    }

    /// Read guest memory; None if the range is not all inside it.
    pub fn read_mem(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        if !self.in_guest(addr, len as u64) {
            return None;
        }
        let mut v = vec![0u8; len];
        self.blk
            .conn
            .mem
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .ok()?;
        Some(v)
    }

    /// Is `addr..addr+len` inside guest memory (an empty range always is)?
    pub fn in_guest(&self, addr: u64, len: u64) -> bool {
        len == 0
            || addr
                .checked_add(len)
                .is_some_and(|end| end <= self.guest_bytes)
    }

    /// Write entry `index` (< `QUEUE_SIZE`) of the descriptor table.
    pub fn set_desc(&self, index: u16, d: Desc) {
        assert!(index < QUEUE_SIZE);
        self.write_desc_at(DESC_TABLE + 16 * u64::from(index), d);
    }

    /// Write a descriptor anywhere (an indirect table); false if outside.
    pub fn write_desc_at(&self, addr: u64, d: Desc) -> bool {
        self.in_guest(addr, 16)
            && self
                .blk
                .conn
                .mem
                .memory()
                .write_obj(d.raw(), GuestAddress(addr))
                .is_ok()
    }

    /// Write `descs` at table entries 0.. linked in order (NEXT set on all
    /// but the last, `next` = the following entry), and offer entry 0.
    pub fn offer_chain(&self, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            self.set_desc(
                i as u16,
                Desc {
                    flags: if last {
                        d.flags & !F_NEXT
                    } else {
                        d.flags | F_NEXT
                    },
                    next: if last { 0 } else { i as u16 + 1 },
                    ..*d
                },
            );
        }
        self.publish(0);
    }

    /// Put `head` in the next available ring entry and make it visible.
    pub fn publish(&self, head: u16) {
        self.publish_many(&[head]);
    }

    /// Put `heads` in the next available ring entries, in order.
    pub fn publish_many(&self, heads: &[u16]) {
        let mut next = self.vring.queue_next_avail();
        for h in heads {
            let slot = AVAIL_RING + 4 + 2 * u64::from(next % QUEUE_SIZE);
            self.write_mem(slot, &h.to_le_bytes());
            next = next.wrapping_add(1);
        }
        self.write_mem(AVAIL_RING + 2, &next.to_le_bytes());
    }

    /// The descriptors of the next offered chain, walked as the device will
    /// (virtio-queue's walk: empty for a head past the queue, cut short
    /// where a descriptor cannot be read or the chain loops).
    pub fn peek_chain(&mut self) -> Vec<Desc> {
        self.peek_at(self.vring.queue_next_avail())
    }

    fn peek_at(&mut self, avail: u16) -> Vec<Desc> {
        self.oracle.set_next_avail(avail);
        let mem = self.blk.conn.mem.memory();
        match self.oracle.pop_descriptor_chain(&*mem) {
            Some(chain) => chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    flags: d.flags(),
                    next: d.next(),
                })
                .collect(),
            None => Vec::new(),
        }
    }

    /// Process the next offered chain as the worker thread does for each
    /// chain it pops (`run_chain`, then `end_batch`), and say what became
    /// of it. A `Used` entry is consumed; anything completed later is
    /// returned by [`Harness::take_used`] / [`Harness::settle`].
    pub fn submit(&mut self) -> Outcome {
        self.submit_with(true)
    }

    /// [`Harness::submit`], but without `end_batch` when `end` is false:
    /// a read that misses then stays pending until [`Harness::settle`],
    /// whatever the backing store's speed (the guest may rewrite its chain
    /// in between).
    pub fn submit_with(&mut self, end: bool) -> Outcome {
        let mem = self.blk.conn.mem.memory();
        let Some(chain) = self
            .vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone())
        else {
            return Outcome::Dropped;
        };
        let head = u32::from(chain.head_index());
        let keep = mem.clone().into_inner();
        let mut qs = self.blk.queues[0].lock().expect("queue lock");
        let (r0, d0) = qs.dq.waiting();
        let ring = qs.ring.clone().expect("ring started");
        let done = qs.run_chain(&self.blk.conn, &ring, &chain, &keep);
        let (r1, d1) = qs.dq.waiting();
        self.last_pending = ((r1 - r0) as usize, (d1 - d0) as usize);
        let pending = self.last_pending != (0, 0);
        if end && qs.end_batch(&ring) {
            let _ = ring.notify();
        }
        drop(qs);
        if done {
            let used = self.take_used();
            let (id, len) = used[0];
            assert_eq!(id, head, "used ring names another chain");
            return Outcome::Used(len);
        }
        if pending {
            Outcome::Pending
        } else {
            Outcome::Dropped
        }
    }

    /// Kick the queue: what its worker does on a kick.
    pub fn kick(&self) -> io::Result<()> {
        self.blk.on_kick(0)
    }

    /// Finish everything pending (`stop_queue`) and return the used
    /// entries not yet seen.
    pub fn settle(&mut self) -> io::Result<Vec<(u32, u32)>> {
        self.blk.stop_queue(0)?;
        // The harness goes on using the queue.
        self.blk.queues[0].lock().expect("queue lock").ring = Some(Ring::new(
            self.vring.clone(),
            None,
            self.blk.conn.log.clone(),
            self.blk.memory().clone(),
        ));
        Ok(self.take_used())
    }

    /// Used ring entries (id, len) added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let end = self.vring.get_ref().get_queue().next_used();
        let mem = self.blk.conn.mem.memory();
        let mut v = Vec::new();
        while self.used_seen != end {
            let at = USED_RING + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
            let e: VirtqUsedElem = mem.read_obj(GuestAddress(at)).expect("used ring in memory");
            v.push((e.id(), e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        v
    }

    /// (reads waiting for the backing store, writes/flushes waiting for
    /// space).
    pub fn pending(&self) -> (usize, usize) {
        let (r, w) = self.blk.queues[0].lock().expect("queue lock").dq.waiting();
        (r as usize, w as usize)
    }

    /// Mark the ring ready or not (GET_VRING_BASE makes it not ready
    /// before it stops the queue).
    pub fn set_ready(&self, ready: bool) {
        self.vring.set_queue_ready(ready);
    }

    /// Log the pages the device writes into the bitmap `file` of `bytes`
    /// (what SET_LOG_BASE and VHOST_F_LOG_ALL do), or stop logging.
    pub fn log_dirty(&self, file: Option<(&std::fs::File, u64)>) -> io::Result<()> {
        if let Some((f, bytes)) = file {
            self.blk.conn.log.set_base(f, bytes, 0)?;
        }
        self.blk.conn.log.set_logging(file.is_some());
        Ok(())
    }

    /// Negotiate VIRTIO_RING_F_EVENT_IDX or not.
    pub fn set_event_idx(&self, on: bool) {
        self.blk
            .conn
            .event_idx
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self.vring.set_queue_event_idx(on);
    }

    /// The shadow copy of the disk: what every read must return.
    pub fn shadow(&self) -> &[u8] {
        &self.shadow
    }
}
