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

use super::device::{Device, ServeConfig};
use super::ring::Ring;
use super::Vring;
use crate::backing::{Backing, MemBacking};
use crate::engine::{Engine, FormatOptions, OpenOptions, Workers, WritebackPolicy};
use crate::pmem::{Region, RegionOptions};
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
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

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
    /// Run writeback and GC, so a full cache frees space.
    pub workers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            guest_bytes: 256 << 10,
            backing_bytes: 8 << 20,
            read_only: false,
            serial: "pcache-hostile-0001".into(),
            workers: true,
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
    _workers: Option<Workers>,
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
        let workers = o
            .workers
            .then(|| Workers::start(engine.clone(), backing.clone(), WritebackPolicy::IMMEDIATE));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), o.guest_bytes as usize)])
            .map_err(other)?;
        let gm = GuestMemoryAtomic::new(mem);
        let blk = Device::new(
            engine,
            backing,
            ServeConfig {
                num_queues: 1,
                queue_size: QUEUE_SIZE,
                blk_size: 512,
                read_only: o.read_only,
                serial: o.serial.clone(),
                poll_us: 0,
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
        blk.queues[0].lock().expect("queue lock").ring = Some(Ring::new(vring.clone(), None));
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
            _workers: workers,
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
        let mem = self.blk.mem.memory();
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
        let mem = self.blk.mem.memory();
        let Some(chain) = self
            .vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone())
        else {
            return Outcome::Dropped;
        };
        let head = u32::from(chain.head_index());
        let mut qs = self.blk.queues[0].lock().expect("queue lock");
        let (r0, d0) = (qs.reads.len(), qs.deferred.len());
        let ring = qs.ring.clone().expect("ring started");
        let done = self.blk.run_chain(&mut qs, &ring, chain);
        self.last_pending = (qs.reads.len() - r0, qs.deferred.len() - d0);
        let pending = self.last_pending != (0, 0);
        if end && self.blk.end_batch(&mut qs, &ring) {
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
        self.blk.queues[0].lock().expect("queue lock").ring =
            Some(Ring::new(self.vring.clone(), None));
        Ok(self.take_used())
    }

    /// Used ring entries (id, len) added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let end = self.vring.get_ref().get_queue().next_used();
        let mem = self.blk.mem.memory();
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
        let qs = self.blk.queues[0].lock().expect("queue lock");
        (qs.reads.len(), qs.deferred.len())
    }

    /// Negotiate VIRTIO_RING_F_EVENT_IDX or not.
    pub fn set_event_idx(&self, on: bool) {
        self.blk
            .event_idx
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self.vring.set_queue_event_idx(on);
    }

    /// The shadow copy of the disk: what every read must return.
    pub fn shadow(&self) -> &[u8] {
        &self.shadow
    }

    /// Build one request from `data` (any bytes), run it, check the answer
    /// against the model, and finish it. Panics on any disagreement.
    pub fn run_case(&mut self, data: &[u8]) -> CaseReport {
        let mut inp = Input { b: data, i: 0 };
        let mode = inp.u8();
        let kicked = mode & 1 != 0;
        let event_idx = mode & 2 != 0;
        // Rewriting the chain while a request is pending is only done on
        // the submit path, where the harness controls when it finishes.
        let mutate = mode & 4 != 0 && !kicked;
        let indirect = mode & 0x38 == 0x38;
        let chaos = mode & 0x40 != 0;
        self.set_event_idx(event_idx);

        // A clean slate: no descriptors from the last case, zeroed buffers.
        let zeros = vec![0u8; (self.guest_bytes - DATA_START) as usize];
        self.write_mem(DESC_TABLE, &[0u8; 16 * QUEUE_SIZE as usize]);
        self.write_mem(DATA_START, &zeros);

        let hdr = self.gen_header(&mut inp);
        let mut descs = if chaos {
            self.gen_chaos(&mut inp)
        } else {
            self.gen_shaped(&mut inp, &hdr)
        };
        if kicked {
            // Through handle_event, a buffer over the rings could make the
            // device pop chains this case did not offer; keep writable
            // buffers off them (submit pops exactly one chain).
            for d in &mut descs {
                if d.is_write() && d.addr < DATA_START {
                    d.addr += DATA_START;
                }
            }
        }
        if indirect {
            let table = DATA_START + (u64::from(inp.u32()) % (self.data_bytes() - 16)) / 16 * 16;
            for (i, d) in descs.iter().enumerate() {
                self.write_desc_at(table + 16 * i as u64, *d);
            }
            let len = if inp.u8().is_multiple_of(8) {
                inp.u32()
            } else {
                16 * descs.len() as u32
            };
            self.set_desc(
                0,
                Desc {
                    addr: table,
                    len,
                    flags: F_INDIRECT,
                    next: 0,
                },
            );
        } else {
            for (i, d) in descs.iter().enumerate() {
                self.set_desc(i as u16, *d);
            }
        }
        let head = if inp.u8().is_multiple_of(32) {
            inp.u16() % (QUEUE_SIZE + 16)
        } else {
            0
        };
        self.publish(head);

        // Header, then data, through the readable buffers in chain order;
        // garbage in the writable ones (the device must overwrite it).
        let walk = self.peek_chain();
        let seed = inp.u64();
        let mut stream = hdr.to_vec();
        let readable: u64 = walk
            .iter()
            .filter(|d| !d.is_write())
            .map(|d| u64::from(d.len))
            .sum();
        let mut x = seed | 1;
        while (stream.len() as u64) < readable.min(1 << 24) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            stream.extend_from_slice(&x.to_le_bytes());
        }
        let mut at = 0usize;
        for d in &walk {
            if d.is_write() {
                let n = u64::from(d.len).min(self.guest_bytes) as usize;
                self.fill_off_rings(d.addr, &vec![0xA5; n]);
            } else {
                let n = (d.len as usize).min(stream.len().saturating_sub(at));
                self.fill_off_rings(d.addr, &stream[at..at + n]);
                at += n;
            }
        }

        // The model looks at the final state, as the device will.
        let walk = self.peek_chain();
        // Device-readable buffers clear of every writable one: the device
        // must leave them as they are.
        let untouchable: Vec<(Desc, Vec<u8>)> = walk
            .iter()
            .filter(|d| !d.is_write() && d.len > 0 && d.addr >= DATA_START)
            .filter(|d| {
                let (a, b) = (d.addr, d.addr.saturating_add(u64::from(d.len)));
                walk.iter().filter(|w| w.is_write()).all(|w| {
                    let (c, e) = (w.addr, w.addr.saturating_add(u64::from(w.len)));
                    b <= c || e <= a
                })
            })
            .filter_map(|d| Some((*d, self.read_mem(d.addr, d.len as usize)?)))
            .collect();
        let expect = self.model(head, &walk);
        let relaxed = walk
            .iter()
            .any(|d| d.is_write() && d.len > 0 && d.addr < DATA_START);
        let avail = self.vring.queue_next_avail();

        let outcome = if kicked {
            self.kick().expect("handle_event never fails on a chain");
            let used = self.take_used();
            match used.as_slice() {
                [] => {
                    let (r, d) = self.pending();
                    if r + d > 0 {
                        Outcome::Pending
                    } else {
                        Outcome::Dropped
                    }
                }
                [(id, len)] => {
                    assert_eq!(*id, u32::from(head), "used ring names another chain");
                    Outcome::Used(*len)
                }
                more => panic!("one chain offered, {} returned: {more:?}", more.len()),
            }
        } else {
            self.submit_with(!mutate)
        };

        let describe = || format!("head {head} chain {walk:?} header {hdr:02x?} expect {expect:?}");
        let mut mutated = false;
        let len = match outcome {
            Outcome::Used(len) => len,
            Outcome::Dropped => {
                assert_eq!(expect, Expect::Dropped, "dropped: {}", describe());
                assert_eq!(self.pending(), (0, 0));
                return CaseReport {
                    class: Class::Dropped,
                    mutated,
                    kicked,
                };
            }
            Outcome::Pending => {
                // What was pending when it was accepted: on the submit
                // path, end_batch may have finished it since.
                let (r, d) = if kicked {
                    self.pending()
                } else {
                    self.last_pending
                };
                match expect {
                    Expect::Read { .. } => assert_eq!((r, d), (1, 0), "{}", describe()),
                    Expect::Write { .. } | Expect::Flush => {
                        assert_eq!((r, d), (0, 1), "{}", describe())
                    }
                    _ => panic!("pending, but not a valid read or write: {}", describe()),
                }
                if mutate {
                    // A hostile guest rewrites the chain under the device.
                    mutated = true;
                    let n = 1 + inp.u8() % 4;
                    for i in 0..u16::from(n) {
                        let d = self.gen_desc(&mut inp, i, n.into(), 0);
                        self.set_desc(i, d);
                        if indirect {
                            self.set_desc(0, d);
                        }
                    }
                }
                let used = self.settle().expect("stop_vring");
                assert_eq!(self.pending(), (0, 0), "settle left requests pending");
                match used.as_slice() {
                    [(id, len)] => {
                        assert_eq!(*id, u32::from(head));
                        *len
                    }
                    other => panic!("pending request finished as {other:?}: {}", describe()),
                }
            }
        };

        if mutated {
            // Only sanity: what it wrote fits what the chain now offers.
            let now = self.peek_at(avail);
            let w: u64 = now
                .iter()
                .filter(|d| d.is_write())
                .map(|d| u64::from(d.len))
                .sum();
            let in_mem = now
                .iter()
                .filter(|d| d.is_write())
                .all(|d| self.in_guest(d.addr, d.len.into()));
            assert!(
                u64::from(len) <= if in_mem { w } else { 0 },
                "used len {len} > {w} writable bytes after the guest rewrote the chain"
            );
            // The write itself went through (its data was copied at start).
            if let Expect::Write { off, ref data } = expect {
                self.shadow[off as usize..off as usize + data.len()].copy_from_slice(data);
            }
            return CaseReport {
                class: expect.class(outcome),
                mutated,
                kicked,
            };
        }

        assert_eq!(self.pending(), (0, 0), "requests left pending");
        for (d, before) in &untouchable {
            let now = self
                .read_mem(d.addr, d.len as usize)
                .expect("was in memory");
            assert!(
                now == *before,
                "the device wrote into readable buffer {d:?}: {}",
                describe()
            );
        }
        let w: u64 = walk
            .iter()
            .filter(|d| d.is_write())
            .map(|d| u64::from(d.len))
            .sum();
        assert!(u64::from(len) <= w, "used len {len} > {w} writable bytes");
        assert_eq!(len, expect.used_len(), "used length: {}", describe());
        if len == 0 {
            return CaseReport {
                class: expect.class(outcome),
                mutated,
                kicked,
            };
        }
        let wdescs: Vec<Desc> = walk
            .iter()
            .filter(|d| d.is_write() && d.len > 0)
            .copied()
            .collect();
        let last = wdescs.last().expect("a writable byte");
        let st = self
            .read_mem(last.addr + u64::from(last.len) - 1, 1)
            .expect("in memory")[0];
        if !relaxed {
            assert_eq!(st, expect.status(), "status byte: {}", describe());
        }
        let overlap = {
            let mut r: Vec<(u64, u64)> = wdescs
                .iter()
                .map(|d| (d.addr, d.addr + u64::from(d.len)))
                .collect();
            r.sort();
            r.windows(2).any(|p| p[1].0 < p[0].1)
        };
        let checkable = !relaxed && !overlap;
        match &expect {
            Expect::Read { off, len } if checkable => {
                let got = self.gather(&wdescs, *len as usize);
                let want = &self.shadow[*off as usize..(*off + *len) as usize];
                if got != want {
                    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    panic!(
                        "read of {len} bytes at {off} differs from the disk at byte {at}: {}",
                        describe()
                    );
                }
            }
            Expect::GetId { n } if checkable => {
                let got = self.gather(&wdescs, *n);
                assert_eq!(got, &self.serial[..*n], "GET_ID data: {}", describe());
            }
            Expect::Write { off, data } if st == status::OK || relaxed => {
                self.shadow[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            _ => {}
        }
        CaseReport {
            class: expect.class(outcome),
            mutated,
            kicked,
        }
    }

    fn data_bytes(&self) -> u64 {
        self.guest_bytes - DATA_START
    }

    /// Write what falls inside guest memory and outside the rings.
    fn fill_off_rings(&self, addr: u64, data: &[u8]) {
        let start = addr.max(DATA_START);
        let end = addr.saturating_add(data.len() as u64).min(self.guest_bytes);
        if start < end {
            let from = (start - addr) as usize;
            self.write_mem(start, &data[from..from + (end - start) as usize]);
        }
    }

    /// The first `n` bytes of the buffers `ds`, in order.
    fn gather(&self, ds: &[Desc], n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        for d in ds {
            let k = (d.len as usize).min(n - v.len());
            v.extend(self.read_mem(d.addr, k).expect("in memory"));
            if v.len() == n {
                break;
            }
        }
        v
    }

    fn gen_header(&self, inp: &mut Input) -> [u8; HEADER_BYTES] {
        let ty = match inp.u8() % 10 {
            0..=2 => types::IN,
            3..=5 => types::OUT,
            6 => types::FLUSH,
            7 => types::GET_ID,
            8 => [2, 3, 5, 11, 13, 0xffff_ffff][inp.u8() as usize % 6],
            _ => inp.u32(),
        };
        let sectors = self.backing_bytes / 512;
        let sector = match inp.u8() % 8 {
            0..=4 => u64::from(inp.u16()) % (sectors + 8),
            5 => sectors.saturating_sub(u64::from(inp.u8() % 16)),
            6 => u64::MAX / 512 + u64::from(inp.u8()),
            _ => inp.u64(),
        };
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[4..8].copy_from_slice(&inp.u32().to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// A well-formed layout with random splits: header pieces, data pieces
    /// (readable for a write, writable otherwise), a status byte of its own
    /// or at the end of the last data piece.
    fn gen_shaped(&self, inp: &mut Input, hdr: &[u8; HEADER_BYTES]) -> Vec<Desc> {
        let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let data_len = match inp.u8() % 8 {
            0 => 0,
            1..=5 => 512 * u32::from(1 + inp.u8() % 8),
            6 => 512 * u32::from(1 + inp.u8() % 128),
            _ => u32::from(inp.u16()) % 8192,
        };
        let mut cursor = DATA_START + u64::from(inp.u16()) % 4096;
        let mut place = |len: u32, inp: &mut Input| {
            let gap = match inp.u8() % 8 {
                0 => 0,
                1 => u64::from(inp.u8()),
                _ => 1 + u64::from(inp.u8() % 64),
            };
            let mut at = cursor;
            if at + u64::from(len) > self.guest_bytes {
                at = DATA_START + u64::from(inp.u16()) % 4096;
            }
            cursor = at + u64::from(len) + gap;
            at
        };
        let mut out = Vec::new();
        for p in split(16, 1 + inp.u8() % 3, inp) {
            out.push(Desc::r(place(p, inp), p));
        }
        // Now and then the data points the wrong way (a read's readable, a
        // write's writable): such a request moves no data, and the device
        // must neither store into nor take from those buffers.
        let data_write = (ty != types::OUT) ^ inp.u8().is_multiple_of(16);
        let mut data = Vec::new();
        for p in split(data_len, 1 + inp.u8() % 6, inp) {
            let d = Desc {
                addr: 0,
                len: p,
                flags: if data_write { F_WRITE } else { 0 },
                next: 0,
            };
            data.push(d);
        }
        let merge = data_write && !data.is_empty() && inp.u8().is_multiple_of(3);
        if merge {
            data.last_mut().expect("not empty").len += 1;
        }
        for mut d in data {
            d.addr = place(d.len, inp);
            out.push(d);
        }
        if !merge {
            out.push(Desc::w(place(1, inp), 1));
        }
        // Now and then one buffer is moved somewhere hostile.
        if inp.u8().is_multiple_of(8) {
            let i = inp.u8() as usize % out.len();
            out[i].addr = self.hostile_addr(inp);
        }
        link(&mut out);
        out
    }

    /// Anything: counts, lengths, addresses, flags and links at random.
    fn gen_chaos(&self, inp: &mut Input) -> Vec<Desc> {
        let n = 1 + u16::from(inp.u8() % 10);
        let split = u16::from(inp.u8()) % (n + 1);
        (0..n).map(|i| self.gen_desc(inp, i, n, split)).collect()
    }

    fn gen_desc(&self, inp: &mut Input, i: u16, n: u16, split: u16) -> Desc {
        let addr = match inp.u8() % 16 {
            0..=10 => DATA_START + u64::from(inp.u32()) % self.data_bytes(),
            11 => u64::from(inp.u32()) % self.guest_bytes,
            _ => self.hostile_addr(inp),
        };
        let len = match inp.u8() % 16 {
            0..=4 => u32::from(inp.u8() % 24),
            5..=9 => 512 * u32::from(1 + inp.u8() % 8),
            10 | 11 => u32::from(inp.u16()) % 4096,
            12 => 1,
            13 => 0,
            14 => 16,
            _ => inp.u32(),
        };
        let f = inp.u8();
        let mut flags = if i < split { 0 } else { F_WRITE };
        match f % 16 {
            0 => flags ^= F_WRITE,
            1 => flags = u16::from(inp.u8()),
            _ => {}
        }
        if i + 1 < n {
            flags |= F_NEXT;
        } else if f % 16 != 1 {
            flags &= !F_NEXT;
        }
        let next = if f / 16 == 0 {
            inp.u16() % (QUEUE_SIZE + 8)
        } else {
            i + 1
        };
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }

    fn hostile_addr(&self, inp: &mut Input) -> u64 {
        match inp.u8() % 4 {
            0 => self.guest_bytes - u64::from(inp.u8() % 32),
            1 => self.guest_bytes + u64::from(inp.u16()),
            2 => u64::MAX - u64::from(inp.u16()),
            _ => inp.u64(),
        }
    }

    /// What the device must answer for `walk`, from the virtio-blk spec
    /// (header = first 16 readable bytes, status = last writable byte,
    /// data in between, any layout), not from `request::parse`.
    fn model(&self, head: u16, walk: &[Desc]) -> Expect {
        if head >= QUEUE_SIZE {
            return Expect::Dropped;
        }
        if walk.iter().any(|d| !self.in_guest(d.addr, d.len.into())) {
            return Expect::NoStatus;
        }
        let readable: Vec<Desc> = walk.iter().filter(|d| !d.is_write()).copied().collect();
        let r: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        let w: u64 = walk
            .iter()
            .filter(|d| d.is_write())
            .map(|d| u64::from(d.len))
            .sum();
        if w == 0 {
            return Expect::NoStatus;
        }
        if r < HEADER_BYTES as u64 {
            return Expect::Status(status::IOERR);
        }
        let h = self.gather(&readable, HEADER_BYTES);
        let ty = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let range = |len: u64| -> Option<u64> {
            // At most seg_max x size_max (128 x 128 KiB) of data.
            if !len.is_multiple_of(512) || len > 16 << 20 {
                return None;
            }
            let off = sector.checked_mul(512)?;
            (off.checked_add(len)? <= self.backing_bytes).then_some(off)
        };
        match ty {
            types::IN => match range(w - 1) {
                Some(off) => Expect::Read { off, len: w - 1 },
                None => Expect::Status(status::IOERR),
            },
            types::OUT if self.read_only => Expect::Status(status::IOERR),
            types::OUT => match range(r - HEADER_BYTES as u64) {
                Some(off) => {
                    let all = self.gather(&readable, r as usize);
                    Expect::Write {
                        off,
                        data: all[HEADER_BYTES..].to_vec(),
                    }
                }
                None => Expect::Status(status::IOERR),
            },
            types::FLUSH => Expect::Flush,
            types::GET_ID => Expect::GetId {
                n: (w - 1).min(ID_BYTES as u64) as usize,
            },
            _ => Expect::Status(status::UNSUPP),
        }
    }
}

/// The model's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Dropped,
    NoStatus,
    Status(u8),
    Read { off: u64, len: u64 },
    Write { off: u64, data: Vec<u8> },
    Flush,
    GetId { n: usize },
}

impl Expect {
    fn used_len(&self) -> u32 {
        match self {
            Expect::Dropped | Expect::NoStatus => 0,
            Expect::Status(_) | Expect::Write { .. } | Expect::Flush => 1,
            Expect::Read { len, .. } => *len as u32 + 1,
            Expect::GetId { n } => *n as u32 + 1,
        }
    }

    fn status(&self) -> u8 {
        match self {
            Expect::Status(s) => *s,
            _ => status::OK,
        }
    }

    fn class(&self, o: Outcome) -> Class {
        match self {
            Expect::Dropped => Class::Dropped,
            Expect::NoStatus => Class::NoStatus,
            Expect::Status(s) => Class::Rejected(*s),
            Expect::Read { .. } if o == Outcome::Pending => Class::ReadMiss,
            Expect::Read { .. } => Class::ReadHit,
            Expect::Write { .. } => Class::Write,
            Expect::Flush => Class::Flush,
            Expect::GetId { .. } => Class::GetId,
        }
    }
}

/// Set NEXT on all but the last descriptor, linking entry i to i + 1.
fn link(ds: &mut [Desc]) {
    let n = ds.len();
    for (i, d) in ds.iter_mut().enumerate() {
        if i + 1 < n {
            d.flags |= F_NEXT;
            d.next = i as u16 + 1;
        } else {
            d.flags &= !F_NEXT;
            d.next = 0;
        }
    }
}

/// `total` cut into at most `pieces` random, possibly odd-sized, non-empty
/// lengths (none if `total` is 0).
fn split(total: u32, pieces: u8, inp: &mut Input) -> Vec<u32> {
    let mut cuts: Vec<u32> = (1..pieces)
        .filter(|_| total > 1)
        .map(|_| 1 + inp.u32() % (total - 1))
        .collect();
    cuts.push(0);
    cuts.push(total);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| w[1] - w[0])
        .filter(|&l| l > 0)
        .collect()
}

/// Bytes read as numbers; zeros once they run out.
struct Input<'a> {
    b: &'a [u8],
    i: usize,
}

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for o in &mut out {
            *o = self.b.get(self.i).copied().unwrap_or(0);
            self.i += 1;
        }
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}
