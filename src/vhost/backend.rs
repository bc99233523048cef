//! The vhost-user-blk backend: one worker thread per queue.
//!
//! Each queue has its own state behind its own mutex (locked only by its
//! worker thread, and by the control thread in `stop_vring`): a data head, a
//! backing queue (io_uring) for read misses, the requests waiting on it, and
//! the writes deferred because the cache was full. No lock is shared by all
//! queues on the data path.
//!
//! Events per worker thread (epoll `data` values; 0 is the thread's vring,
//! `num_queues` the framework's exit event):
//! - `num_queues + 1 + 2q`: queue q's backing completions are ready;
//! - `num_queues + 2 + 2q`: the engine freed space (retry deferred writes).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{bits, BlkConfig, PROTOCOL_FEATURES, PROTOCOL_FEATURES_BIT, VIRTIO_FEATURES};
use super::request::{parse, status, RequestKind, HEADER_BYTES, ID_BYTES};
use crate::backing::{AlignedBuf, Backing, BackingQueue, BufPool, Completion, IoOp};
use crate::engine::{DataHead, Engine, Error as EngineError, Miss};

type Mem = GuestMemoryMmap<()>;
type Gm = GuestMemoryAtomic<Mem>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<Mem>>;
type Vring = VringRwLock<Gm>;

#[cfg(any(test, feature = "fuzzing"))]
#[path = "harness.rs"]
pub mod harness;

/// Bits of a backing-queue user_data that name the miss inside a request.
const MISS_BITS: u32 = 20;
/// How long `stop_vring` waits for deferred writes to find space.
const STOP_DEFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Completions between used-ring signals while a batch is still running.
/// Signalling each one wakes the driver once per request; signalling only
/// at the end of a batch leaves it idle until the whole batch is done.
/// Eight measured best for 4 KiB hits at QD32 (see docs/benchmarks.md).
const NOTIFY_BATCH: usize = 8;
/// Times `run_fills` goes back to the ring for new requests before it
/// finishes the fills it holds.
const FILL_RING_TURNS: usize = 64;

/// Idle backing-read buffers a queue keeps for reuse.
const MISS_BUFS_HELD: usize = 4 << 20;

/// What the backend serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Request queues offered.
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Logical block size advertised (512 or 4096).
    pub blk_size: u32,
    /// Refuse writes.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes are sent).
    pub serial: String,
    /// After the ring runs dry, keep polling it this long before going back
    /// to sleep on the kick eventfd (0: never poll). Saves a wake-up per
    /// request when requests arrive close together, at the cost of CPU.
    pub poll_us: u32,
}

/// A read waiting for its misses to come back from the backing store.
struct PendingRead {
    chain: Chain,
    /// The request's bytes so far (its hits); empty when one miss is the
    /// whole request, whose backing buffer is then copied to the guest as is.
    buf: Vec<u8>,
    misses: Vec<Miss>,
    left: usize,
    failed: bool,
}

/// Where a request laid out as Linux and libblkio lay them out keeps its
/// parts: a 16-byte header descriptor (a write's data may follow in it),
/// at most one data descriptor, and a 1-byte status descriptor.
struct SimpleLayout {
    /// Guest address of the header.
    hdr: u64,
    /// The data's guest address, length and whether the device writes it.
    data: Option<(u64, usize, bool)>,
    /// Guest address of the status byte.
    status: u64,
}

impl SimpleLayout {
    /// The chain's layout, if it is the simple one; None for anything else.
    /// One walk over at most three descriptors, with no allocation.
    fn of(chain: &Chain) -> Option<SimpleLayout> {
        // (address, length, device-writable) of each descriptor.
        let mut d = [(0u64, 0usize, false); 3];
        let mut n = 0;
        for desc in chain.clone() {
            if n == d.len() {
                return None;
            }
            d[n] = (desc.addr().0, desc.len() as usize, desc.is_write_only());
            n += 1;
        }
        match (n, d[0], d[1], d[2]) {
            (2, (h, hl, false), (s, 1, true), _) if hl >= HEADER_BYTES => Some(SimpleLayout {
                hdr: h,
                data: (hl > HEADER_BYTES)
                    .then(|| (h + HEADER_BYTES as u64, hl - HEADER_BYTES, false)),
                status: s,
            }),
            (3, (h, HEADER_BYTES, false), (a, l, w), (s, 1, true)) => Some(SimpleLayout {
                hdr: h,
                data: Some((a, l, w)),
                status: s,
            }),
            _ => None,
        }
    }
}

/// A write or flush waiting for free space.
struct Deferred {
    chain: Chain,
    kind: RequestKind,
    data: Vec<u8>,
    done: u64,
}

/// Per-queue state, owned by that queue's worker thread.
struct QueueState {
    head: DataHead,
    bq: BackingQueue,
    vring: Option<Vring>,
    reads: HashMap<u64, PendingRead>,
    deferred: VecDeque<Deferred>,
    next_id: u64,
    completions: Vec<Completion>,
    /// Data buffer reused by requests that complete at once (most of
    /// them), so they neither allocate nor zero a buffer.
    scratch: Vec<u8>,
    /// Aligned buffers for backing reads, reused.
    bufs: BufPool,
    /// Backing data read for completed misses, to go into the cache once
    /// the guest has been told (`run_fills`).
    fills: Vec<(Miss, AlignedBuf)>,
}

/// The vhost-user-blk backend for one frontend connection. The engine and
/// backing store outlive it; a new one is built for each connection.
pub struct PcacheBlk {
    engine: Arc<Engine>,
    cfg: ServeConfig,
    mem: Gm,
    event_idx: AtomicBool,
    /// Cache mode the guest sees: writeback (FLUSH needed) or writethrough.
    writeback: AtomicBool,
    acked: AtomicU64,
    queues: Vec<Mutex<QueueState>>,
    space_fds: Vec<EventFd>,
}

impl PcacheBlk {
    /// A backend serving `engine` (reads that miss go to `backing`).
    pub fn new(
        engine: Arc<Engine>,
        backing: Arc<dyn Backing>,
        cfg: ServeConfig,
        mem: Gm,
    ) -> io::Result<PcacheBlk> {
        let mut queues = Vec::new();
        let mut space_fds = Vec::new();
        for _ in 0..cfg.num_queues {
            queues.push(Mutex::new(QueueState {
                head: DataHead::default(),
                bq: BackingQueue::new(backing.clone(), 128),
                vring: None,
                reads: HashMap::new(),
                deferred: VecDeque::new(),
                next_id: 1,
                completions: Vec::new(),
                scratch: Vec::new(),
                bufs: BufPool::new(MISS_BUFS_HELD),
                fills: Vec::new(),
            }));
            let fd = EventFd::new(EFD_NONBLOCK)?;
            engine.add_space_fd(std::os::fd::AsRawFd::as_raw_fd(&fd));
            space_fds.push(fd);
        }
        Ok(PcacheBlk {
            engine,
            cfg,
            mem,
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            acked: AtomicU64::new(0),
            queues,
            space_fds,
        })
    }

    /// The (fd, epoll data) pairs each worker thread must watch, by queue.
    pub fn listeners(&self) -> Vec<[(std::os::fd::RawFd, u64); 2]> {
        let nq = self.cfg.num_queues as u64;
        (0..self.queues.len())
            .map(|q| {
                let bq_fd = self.queues[q].lock().expect("queue lock").bq.notifier();
                let space_fd = std::os::fd::AsRawFd::as_raw_fd(&self.space_fds[q]);
                [
                    (bq_fd, nq + 1 + 2 * q as u64),
                    (space_fd, nq + 2 + 2 * q as u64),
                ]
            })
            .collect()
    }

    fn capacity(&self) -> u64 {
        self.engine.size()
    }

    /// Process everything available on `vring`, following the EVENT_IDX
    /// protocol: with notifications disabled, drain the ring; re-enable
    /// them; if the driver added requests in between (enable returns true),
    /// drain again. One pass is not enough: a request added after the last
    /// pop but before re-enabling would otherwise wait for the next kick.
    fn process_vring(&self, qs: &mut QueueState, vring: &Vring) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            self.drain_avail(qs, vring)?;
            if self.poll_for_more(qs, vring) {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Busy-poll the avail ring for up to `poll_us` (with notifications
    /// still off under EVENT_IDX); true as soon as a request shows up. The
    /// window restarts with every batch found, so it adapts to a busy guest
    /// and costs one window after the last request.
    fn poll_for_more(&self, qs: &mut QueueState, vring: &Vring) -> bool {
        // With backing reads in flight, sleep instead: their completions
        // wake the worker, and the kernel needs the CPU to complete them
        // (spinning cost 5-10 % of all-miss IOPS when measured).
        if self.cfg.poll_us == 0 || qs.bq.in_flight() > 0 {
            return false;
        }
        let deadline = Instant::now() + Duration::from_micros(self.cfg.poll_us as u64);
        let mem = self.mem.memory();
        loop {
            if avail_pending(vring, &mem) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn drain_avail(&self, qs: &mut QueueState, vring: &Vring) -> io::Result<()> {
        let mem = self.mem.memory();
        let mut pending = 0;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            if self.run_chain(qs, vring, chain) {
                signal_every_batch(&mut pending, vring)?;
            }
        }
        if self.end_batch(qs, vring) || pending > 0 {
            notify(vring)?;
        }
        Ok(())
    }

    /// Start one popped chain; put it in the used ring if it completed.
    /// Returns whether it did.
    fn run_chain(&self, qs: &mut QueueState, vring: &Vring, chain: Chain) -> bool {
        match self.start(qs, chain) {
            Some((head, len)) => put_used(vring, head, len),
            None => false,
        }
    }

    /// After a batch of `run_chain`: submit the reads it queued in one go
    /// and complete any already back. Returns whether any request completed.
    fn end_batch(&self, qs: &mut QueueState, vring: &Vring) -> bool {
        // Most batches are all hits: with nothing in flight there is nothing
        // to submit or reap, so skip the syscalls. A notifier left readable
        // by an earlier completion brings the worker to `on_completions`.
        if qs.bq.in_flight() == 0 {
            return false;
        }
        qs.bq.poll(&mut qs.completions);
        !qs.completions.is_empty() && self.finish_reads(qs, vring)
    }

    /// Start one request. Returns (head, used length) when it completed at
    /// once; None when it waits for the backing store or for space.
    fn start(&self, qs: &mut QueueState, chain: Chain) -> Option<(u16, u32)> {
        let chain = match self.start_simple(qs, chain) {
            Ok(done) => return done,
            Err(chain) => chain,
        };
        let head = chain.head_index();
        let mem = chain.memory();
        let (mut r, mut w) = match (chain.clone().reader(mem), chain.clone().writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                // Buffers outside guest memory: nothing can be written back,
                // not even a status. Return the chain so the ring moves on.
                tracing::warn!(head, "request with descriptors outside guest memory");
                return Some((head, 0));
            }
        };
        if w.available_bytes() == 0 {
            tracing::warn!(head, "request without a status byte");
            return Some((head, 0));
        }
        let data_w = w.available_bytes() - 1;
        let Ok(mut st) = w.split_at(data_w) else {
            return Some((head, 0));
        };
        let mut hdr = [0u8; HEADER_BYTES];
        let header =
            (r.available_bytes() >= HEADER_BYTES && r.read_exact(&mut hdr).is_ok()).then_some(hdr);
        let kind = match parse(
            header,
            r.available_bytes(),
            data_w,
            self.capacity(),
            self.cfg.read_only,
        ) {
            Ok(k) => k,
            Err(why) => {
                tracing::debug!(head, ?why, "rejected request");
                let _ = st.write_all(&[why.status()]);
                return Some((head, 1));
            }
        };
        match kind {
            RequestKind::Read { off, len } => {
                // Through a buffer of our own: the usual layout, read
                // straight into guest memory, took `start_simple`.
                let mut misses = Vec::new();
                let mut buf = std::mem::take(&mut qs.scratch);
                // Every byte is overwritten (hits now, misses on completion).
                buf.resize(len as usize, 0);
                if let Err(e) = self.engine.read(off, &mut buf, &mut misses) {
                    tracing::warn!(off, len, error = %e, "read failed");
                    let _ = st.write_all(&[status::IOERR]);
                    return Some((head, 1));
                }
                if misses.is_empty() {
                    let s = if w.write_all(&buf).is_ok() {
                        status::OK
                    } else {
                        status::IOERR
                    };
                    let _ = st.write_all(&[s]);
                    keep_scratch(qs, buf);
                    return Some((head, len as u32 + 1));
                }
                if misses.len() > MAX_MISSES {
                    tracing::warn!(off, len, n = misses.len(), "read with too many misses");
                    let _ = st.write_all(&[status::IOERR]);
                    return Some((head, 1));
                }
                queue_misses(qs, chain, buf, misses);
                None
            }
            RequestKind::Write { len, .. } => {
                // Copied out first: the usual layout, written straight from
                // guest memory, took `start_simple`.
                let mut data = std::mem::take(&mut qs.scratch);
                data.resize(len as usize, 0);
                if r.read_exact(&mut data).is_err() {
                    let _ = st.write_all(&[status::IOERR]);
                    return Some((head, 1));
                }
                self.run_or_defer(qs, chain, kind, data)
            }
            RequestKind::Flush => self.run_or_defer(qs, chain, kind, Vec::new()),
            RequestKind::GetId => {
                let mut id = [0u8; ID_BYTES];
                let s = self.cfg.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let n = data_w.min(ID_BYTES);
                let ok = w.write_all(&id[..n]).is_ok();
                let _ = st.write_all(&[if ok { status::OK } else { status::IOERR }]);
                Some((head, n as u32 + 1))
            }
        }
    }

    /// Start a request laid out as Linux and libblkio lay them out: a
    /// 16-byte header descriptor (a write's data may follow in it), at most
    /// one data descriptor, and a 1-byte status descriptor. One walk of the
    /// chain, no Reader or Writer (their allocations and repeated walks were
    /// a tenth of the server's time on 4 KiB hits). Err(chain), with nothing
    /// done, for any other layout, an ID request or memory it cannot map:
    /// `start` then takes the general path.
    #[allow(clippy::result_large_err)] // the chain goes back by value, once
    fn start_simple(&self, qs: &mut QueueState, chain: Chain) -> Result<Option<(u16, u32)>, Chain> {
        let Some(SimpleLayout {
            hdr,
            data,
            status: st,
        }) = SimpleLayout::of(&chain)
        else {
            return Err(chain);
        };
        let head = chain.head_index();
        let mem = chain.memory();
        // Map header, data and status once; together they are exactly the
        // descriptors' bytes. As on the general path, any of them outside
        // guest memory means no status at all, before the header is read
        // (a range spanning two regions also lands there).
        let map = |a: u64, l: usize| mem.get_slice(GuestAddress(a), l).ok();
        let Some(hdr) = map(hdr, HEADER_BYTES) else {
            return Err(chain);
        };
        let data = match data {
            Some((a, l, w)) => match map(a, l) {
                Some(vs) => Some((vs.ptr_guard_mut().as_ptr(), l, w)),
                None => return Err(chain),
            },
            None => None,
        };
        let Some(st) = map(st, 1) else {
            return Err(chain);
        };
        let Ok(header) = hdr.read_obj::<[u8; HEADER_BYTES]>(0) else {
            return Err(chain);
        };
        let set = |s: u8| {
            let _ = st.write_obj(s, 0);
        };
        let (readable, writable) = match data {
            Some((_, l, false)) => (l, 0),
            Some((_, l, true)) => (0, l),
            None => (0, 0),
        };
        let kind = match parse(
            Some(header),
            readable,
            writable,
            self.capacity(),
            self.cfg.read_only,
        ) {
            Ok(RequestKind::GetId) => return Err(chain),
            Ok(k) => k,
            Err(why) => {
                tracing::debug!(head, ?why, "rejected request");
                set(why.status());
                return Ok(Some((head, 1)));
            }
        };
        // The data, if it points the way the request moves data (a read's
        // must be device-writable, a write's device-readable) and so is
        // the length parse took. A read whose only data is readable, say,
        // goes to the general path, which leaves those bytes alone.
        let data_slice = |len: u64, writable: bool| match data {
            Some((p, l, w)) if w == writable && l as u64 == len => Some((p, l)),
            _ => None,
        };
        match kind {
            RequestKind::Read { off, len } => {
                let Some((p, l)) = data_slice(len, true) else {
                    return Err(chain);
                };
                // SAFETY: `get_slice` checked that the bytes lie in one mapped
                // guest memory region, which the chain's guard on the memory
                // table keeps mapped; the guest may write them concurrently,
                // as with any device DMA; we only store into them.
                let direct = unsafe { std::slice::from_raw_parts_mut(p, l) };
                let mut misses = Vec::new();
                if let Err(e) = self.engine.read(off, direct, &mut misses) {
                    tracing::warn!(off, len, error = %e, "read failed");
                    set(status::IOERR);
                    return Ok(Some((head, 1)));
                }
                if misses.is_empty() {
                    set(status::OK);
                    return Ok(Some((head, len as u32 + 1)));
                }
                if misses.len() > MAX_MISSES {
                    tracing::warn!(off, len, n = misses.len(), "read with too many misses");
                    set(status::IOERR);
                    return Ok(Some((head, 1)));
                }
                let buf = hits_to_keep(direct, &misses);
                queue_misses(qs, chain, buf, misses);
                Ok(None)
            }
            RequestKind::Write { off, len } => {
                let Some((p, l)) = data_slice(len, false) else {
                    return Err(chain);
                };
                // SAFETY: as for a read; we only load from these bytes, and a
                // guest changing them meanwhile gets a mix, as it asked for.
                let direct = unsafe { std::slice::from_raw_parts(p as *const u8, l) };
                if !qs.deferred.is_empty() {
                    let data = direct.to_vec();
                    return Ok(self.run_or_defer(qs, chain, kind, data));
                }
                let mut done = 0;
                if let Some(s) = self.write_from(&mut qs.head, off, len, direct, &mut done) {
                    set(s);
                    return Ok(Some((head, 1)));
                }
                let data = direct.to_vec();
                qs.deferred.push_back(Deferred {
                    chain,
                    kind,
                    data,
                    done,
                });
                Ok(None)
            }
            RequestKind::Flush => Ok(self.run_or_defer(qs, chain, kind, Vec::new())),
            RequestKind::GetId => Err(chain),
        }
    }

    /// Run a write or flush, or queue it behind earlier deferred ones (so a
    /// flush never overtakes a write the guest saw queued before it).
    fn run_or_defer(
        &self,
        qs: &mut QueueState,
        chain: Chain,
        kind: RequestKind,
        data: Vec<u8>,
    ) -> Option<(u16, u32)> {
        let mut d = Deferred {
            chain,
            kind,
            data,
            done: 0,
        };
        if !qs.deferred.is_empty() {
            qs.deferred.push_back(d);
            return None;
        }
        match self.try_run(&mut qs.head, &mut d) {
            Some(st) => {
                let done = complete(&d.chain, st);
                keep_scratch(qs, d.data);
                Some(done)
            }
            None => {
                qs.deferred.push_back(d);
                None
            }
        }
    }

    /// One attempt at a write or flush: Some(status) when done, None when the
    /// cache is full (progress is kept in `d.done`).
    fn try_run(&self, head: &mut DataHead, d: &mut Deferred) -> Option<u8> {
        match d.kind {
            RequestKind::Write { off, len } => {
                self.write_from(head, off, len, &d.data, &mut d.done)
            }
            RequestKind::Flush => match self.engine.flush() {
                Ok(()) => Some(status::OK),
                Err(EngineError::CacheFull { .. }) => None,
                Err(e) => Some(fail("flush", &e)),
            },
            RequestKind::Read { .. } | RequestKind::GetId => Some(status::IOERR),
        }
    }

    /// Write `data` (the whole request) from byte `done` on: Some(status)
    /// when finished, None when the cache is full (`done` says how far it
    /// got).
    fn write_from(
        &self,
        head: &mut DataHead,
        off: u64,
        len: u64,
        data: &[u8],
        done: &mut u64,
    ) -> Option<u8> {
        match self
            .engine
            .write(head, off + *done, &data[*done as usize..])
        {
            Ok(()) => {
                if !self.writeback.load(Ordering::Relaxed) {
                    if let Err(e) = self.engine.commit(off, len) {
                        return match e {
                            EngineError::CacheFull { .. } => {
                                *done = len;
                                None
                            }
                            e => Some(fail("write-through commit", &e)),
                        };
                    }
                }
                Some(status::OK)
            }
            Err(EngineError::CacheFull { done: d }) => {
                *done += d;
                None
            }
            Err(e) => Some(fail("write", &e)),
        }
    }

    /// Retry deferred requests in order, as far as space allows.
    fn retry_deferred(&self, qs: &mut QueueState, vring: Option<&Vring>) -> bool {
        let mut used = false;
        while let Some(mut d) = qs.deferred.pop_front() {
            match self.try_run(&mut qs.head, &mut d) {
                Some(st) => {
                    let (head, len) = complete(&d.chain, st);
                    if let Some(v) = vring {
                        used |= put_used(v, head, len);
                    }
                }
                None => {
                    qs.deferred.push_front(d);
                    break;
                }
            }
        }
        used
    }

    /// Handle backing completions in `qs.completions`; returns whether any
    /// request completed. Every completion is consumed, whatever happens to
    /// the used ring: one lost here would leave its read pending forever.
    fn finish_reads(&self, qs: &mut QueueState, vring: &Vring) -> bool {
        let mut used = false;
        let mut pending = 0;
        let mut done = std::mem::take(&mut qs.completions);
        for c in done.drain(..) {
            let id = c.user_data >> MISS_BITS;
            let i = (c.user_data & ((1 << MISS_BITS) - 1)) as usize;
            let Some(p) = qs.reads.get_mut(&id) else {
                continue;
            };
            let m = p.misses[i];
            // The data of a miss that is the whole request goes to the
            // guest straight from the backing buffer.
            let mut whole = None;
            match (&c.result, c.op) {
                (Ok(()), IoOp::Read { buf, .. }) if p.buf.is_empty() => whole = Some(buf),
                (Ok(()), IoOp::Read { buf, .. }) => {
                    p.buf[m.buf_off..m.buf_off + m.len as usize].copy_from_slice(&buf);
                    qs.fills.push((m, buf));
                }
                (Err(e), _) => {
                    tracing::warn!(off = m.off, len = m.len, error = %e, "backing read failed");
                    p.failed = true;
                }
                _ => p.failed = true,
            }
            p.left -= 1;
            if p.left == 0 {
                let p = qs.reads.remove(&id).expect("present");
                let data = whole.as_deref().unwrap_or(&p.buf);
                let (head, len) = finish_read(&p.chain, p.failed, data);
                if put_used(vring, head, len) {
                    used = true;
                    // An error here resurfaces at the caller's final notify.
                    let _ = signal_every_batch(&mut pending, vring);
                }
            }
            if let Some(buf) = whole {
                qs.fills.push((m, buf));
            }
        }
        qs.completions = done;
        used
    }

    /// Put the data of completed misses into the cache. Done after the
    /// guest has been signalled, and behind new requests: the guest does
    /// not wait for a fill (a copy into the medium and an index insert), so
    /// before each one, requests the driver queued meanwhile are started
    /// first. Under a stream of misses this keeps the backing store busy
    /// instead of idle while a whole batch of fills runs.
    fn run_fills(&self, qs: &mut QueueState, vring: Option<&Vring>) -> io::Result<()> {
        // Under a steady stream of misses new fills keep coming; after this
        // many turns to the ring the rest are filled without looking, so
        // the worker gets back to its other events.
        let mut turns = FILL_RING_TURNS;
        let mem = self.mem.memory();
        loop {
            if let Some(v) = vring.filter(|_| turns > 0) {
                if avail_pending(v, &mem) {
                    turns -= 1;
                    self.process_vring(qs, v)?;
                }
            }
            let Some((m, buf)) = qs.fills.pop() else {
                return Ok(());
            };
            self.engine.fill(&mut qs.head, &m, &buf);
            qs.bufs.give(buf);
        }
    }

    fn on_completions(&self, qs: &mut QueueState) -> io::Result<()> {
        let st = &mut *qs;
        st.bq.poll(&mut st.completions);
        let Some(vring) = qs.vring.clone() else {
            return Ok(());
        };
        if self.finish_reads(qs, &vring) {
            notify(&vring)?;
        }
        self.run_fills(qs, Some(&vring))
    }

    fn on_space(&self, q: usize, qs: &mut QueueState) -> io::Result<()> {
        let _ = self.space_fds[q].read();
        if qs.deferred.is_empty() {
            return Ok(());
        }
        let vring = qs.vring.clone();
        if self.retry_deferred(qs, vring.as_ref()) {
            if let Some(v) = &vring {
                notify(v)?;
            }
        }
        Ok(())
    }
}

/// Most misses in one read: their indices must fit in a user_data.
const MAX_MISSES: usize = 1 << MISS_BITS;

/// Send a read's misses (at most [`MAX_MISSES`]) to the backing queue; the
/// request completes when the last one is back.
fn queue_misses(qs: &mut QueueState, chain: Chain, buf: Vec<u8>, misses: Vec<Miss>) {
    let id = qs.next_id;
    qs.next_id += 1;
    for (i, m) in misses.iter().enumerate() {
        let ud = id << MISS_BITS | i as u64;
        qs.bq.submit(
            ud,
            IoOp::Read {
                off: m.off,
                buf: qs.bufs.take(m.len as usize),
            },
        );
    }
    // On the device now, not at the end of the batch: under a stream of
    // misses the device then works while the rest of the batch is parsed
    // (all-miss reads at QD32: about +18 %, level with qemu-storage-daemon,
    // which also submits each request on its own).
    qs.bq.start();
    let left = misses.len();
    qs.reads.insert(
        id,
        PendingRead {
            chain,
            buf,
            misses,
            left,
            failed: false,
        },
    );
}

/// What a read with misses keeps of its buffer until they are back: its
/// hits, or nothing when one miss is the whole request (the common case:
/// no copy and no allocation).
fn hits_to_keep(hits: &[u8], misses: &[Miss]) -> Vec<u8> {
    match misses {
        [m] if m.buf_off == 0 && m.len == hits.len() as u64 => Vec::new(),
        _ => hits.to_vec(),
    }
}

/// Keep a buffer for the next request, unless it is unusually large (each
/// idle queue would hold on to it).
fn keep_scratch(qs: &mut QueueState, buf: Vec<u8>) {
    if buf.capacity() <= 1 << 20 {
        qs.scratch = buf;
    }
}

fn fail(what: &str, e: &EngineError) -> u8 {
    tracing::warn!(error = %e, "{what} failed");
    status::IOERR
}

/// Write the status byte of a request with no data to return.
fn complete(chain: &Chain, st: u8) -> (u16, u32) {
    let mem = chain.memory();
    if let Ok(mut w) = chain.clone().writer(mem) {
        let n = w.available_bytes();
        if n > 0 {
            if let Ok(mut s) = w.split_at(n - 1) {
                let _ = s.write_all(&[st]);
                return (chain.head_index(), 1);
            }
        }
    }
    (chain.head_index(), 0)
}

/// Copy a finished read's `data` to the guest and write its status
/// (IOERR, with no data, when `failed`).
///
/// The chain is walked again from guest memory, which the guest may have
/// rewritten while the read was in flight: nothing about its layout at
/// `start` can be assumed (it may have no writable byte left, or fewer
/// than the data needs).
fn finish_read(chain: &Chain, failed: bool, data: &[u8]) -> (u16, u32) {
    let head = chain.head_index();
    let mem = chain.memory();
    // The usual layout, mapped once; anything else takes the Writer below.
    if let Some(SimpleLayout {
        data: Some((a, l, true)),
        status,
        ..
    }) = SimpleLayout::of(chain)
    {
        if let (Ok(dst), Ok(st)) = (
            mem.get_slice(GuestAddress(a), l),
            mem.get_slice(GuestAddress(status), 1),
        ) {
            if failed || l != data.len() {
                let _ = st.write_obj(status::IOERR, 0);
                return (head, 1);
            }
            // SAFETY: as in `start_simple`: `get_slice` checked the bytes lie
            // in one mapped region, kept mapped by the chain's guard on the
            // memory table; we only store into them.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.ptr_guard_mut().as_ptr(), l) };
            dst.copy_from_slice(data);
            let _ = st.write_obj(status::OK, 0);
            return (head, l as u32 + 1);
        }
    }
    let Ok(mut w) = chain.clone().writer(mem) else {
        return (head, 0);
    };
    let Some(data_w) = w.available_bytes().checked_sub(1) else {
        return (head, 0);
    };
    let Ok(mut st) = w.split_at(data_w) else {
        return (head, 0);
    };
    if failed {
        let _ = st.write_all(&[status::IOERR]);
        return (head, 1);
    }
    let ok = data_w == data.len() && w.write_all(data).is_ok();
    let _ = st.write_all(&[if ok { status::OK } else { status::IOERR }]);
    (head, w.bytes_written() as u32 + 1)
}

/// Put a completed chain in the used ring. A failure (a head index past
/// the queue, which only a broken or hostile driver sends, or a used ring
/// outside guest memory) is logged and the chain dropped: returning an
/// error would end the queue's worker thread and strand every request
/// after it.
fn put_used(vring: &Vring, head: u16, len: u32) -> bool {
    match vring.add_used(head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(head, len, error = %e, "cannot return a request to the used ring; dropped");
            false
        }
    }
}

/// Count one request put in the used ring, and signal the driver every
/// [`NOTIFY_BATCH`] of them, not only when a batch ends: a driver waiting
/// for completions then refills the ring while we work on the rest,
/// instead of the two sides taking turns with the whole queue. Under
/// EVENT_IDX a signal costs a syscall only when the driver asked for one.
fn signal_every_batch(pending: &mut usize, vring: &Vring) -> io::Result<()> {
    *pending += 1;
    if *pending < NOTIFY_BATCH {
        return Ok(());
    }
    *pending = 0;
    notify(vring)
}

/// Whether the driver has made requests available that we have not popped
/// yet. One load from guest memory; no notification state changes.
fn avail_pending(vring: &Vring, mem: &Mem) -> bool {
    let st = vring.get_ref();
    let q = st.get_queue();
    q.avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|avail| avail.0 != q.next_avail())
}

fn notify(vring: &Vring) -> io::Result<()> {
    if vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

impl Drop for PcacheBlk {
    fn drop(&mut self) {
        for fd in &self.space_fds {
            self.engine
                .remove_space_fd(std::os::fd::AsRawFd::as_raw_fd(fd));
        }
        for q in &self.queues {
            let mut qs = q.lock().expect("queue lock");
            let mut head = std::mem::take(&mut qs.head);
            self.engine.head_release(&mut head);
        }
    }
}

impl VhostUserBackend for PcacheBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.cfg.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size as usize
    }

    fn features(&self) -> u64 {
        let ro = if self.cfg.read_only { bits::RO } else { 0 };
        VIRTIO_FEATURES | ro | PROTOCOL_FEATURES_BIT
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        // Without FLUSH the driver cannot ask for durability: be writethrough.
        self.writeback
            .store(features & bits::FLUSH != 0, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        BlkConfig {
            capacity: self.capacity() / 512,
            blk_size: self.cfg.blk_size,
            num_queues: self.cfg.num_queues,
            writeback: u8::from(self.writeback.load(Ordering::Relaxed)),
        }
        .read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte (offset 32) is writable, with CONFIG_WCE.
        let wb = 32u32;
        if self.acked.load(Ordering::Relaxed) & bits::CONFIG_WCE == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "config space is read-only without CONFIG_WCE",
            ));
        }
        if let Some(i) = wb.checked_sub(offset) {
            if let Some(v) = buf.get(i as usize) {
                self.writeback.store(*v != 0, Ordering::Relaxed);
                if *v == 0 {
                    // Switching to writethrough: make what is cached durable.
                    self.engine.flush().map_err(io::Error::other)?;
                }
            }
        }
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic we share; each batch
        // loads a fresh snapshot with `memory()`.
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, worker threads never leave their epoll loop and the
        // daemon cannot be dropped after a frontend disconnects.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Finish every accepted request before the frontend reads the ring
        // base, so no used-ring write lands after it.
        let Some(q) = self.queues.get(queue_index as usize) else {
            return Ok(());
        };
        let mut qs = q.lock().expect("queue lock");
        let Some(vring) = qs.vring.clone() else {
            return Ok(());
        };
        while !qs.reads.is_empty() {
            let qs = &mut *qs;
            qs.bq.wait(1, &mut qs.completions);
            self.finish_reads(qs, &vring);
            // The ring is stopping: no new requests, just the fills.
            self.run_fills(qs, None)?;
        }
        let started = Instant::now();
        while !qs.deferred.is_empty() {
            let epoch = self.engine.space_epoch();
            self.retry_deferred(&mut qs, Some(&vring));
            if qs.deferred.is_empty() {
                break;
            }
            if started.elapsed() > STOP_DEFER_TIMEOUT {
                tracing::error!(
                    n = qs.deferred.len(),
                    "cache stayed full while stopping a queue; failing deferred requests"
                );
                while let Some(d) = qs.deferred.pop_front() {
                    let (head, len) = complete(&d.chain, status::IOERR);
                    put_used(&vring, head, len);
                }
                break;
            }
            self.engine.wait_for_space(epoch);
        }
        notify(&vring)
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let q = thread_id;
        let Some(state) = self.queues.get(q) else {
            return Ok(());
        };
        let mut qs = state.lock().expect("queue lock");
        let nq = self.cfg.num_queues as u64;
        let ev = device_event as u64;
        if ev == 0 {
            let vring = &vrings[0];
            if qs.vring.is_none() {
                qs.vring = Some(vring.clone());
            }
            self.process_vring(&mut qs, vring)?;
            return self.run_fills(&mut qs, Some(vring));
        }
        if ev == nq + 1 + 2 * q as u64 {
            return self.on_completions(&mut qs);
        }
        if ev == nq + 2 + 2 * q as u64 {
            return self.on_space(q, &mut qs);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Hostile guests: every chain gets a sane completion, none crashes the
    //! backend. Each test runs chains through [`harness::Harness`].

    use std::sync::atomic::{AtomicUsize, Ordering};

    use rand::{Rng, RngCore, SeedableRng};

    use super::harness::{
        Class, Desc, Harness, Options, Outcome, F_INDIRECT, F_NEXT, F_WRITE, QUEUE_SIZE,
    };
    use super::status;
    use crate::vhost::request::types;

    const SERIAL: &str = "pcache-hostile-0001";

    fn harness(o: Options) -> Harness {
        static N: AtomicUsize = AtomicUsize::new(0);
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let name = format!(
            "pcache-vhost-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        Harness::new(&dir.join(name), &o).expect("harness")
    }

    fn rw() -> Harness {
        harness(Options::default())
    }

    fn hdr(ty: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// Offer `descs` (table entries 0.., linked in order), run the chain,
    /// finish it if it waits, and return the used length.
    fn run(h: &mut Harness, descs: &[Desc]) -> u32 {
        h.offer_chain(descs);
        let len = match h.submit() {
            Outcome::Used(len) => len,
            Outcome::Pending => match h.settle().expect("settle").as_slice() {
                [(id, len)] => {
                    assert_eq!(*id, 0);
                    *len
                }
                other => panic!("pending chain finished as {other:?}"),
            },
            Outcome::Dropped => panic!("chain dropped"),
        };
        assert_eq!(h.pending(), (0, 0));
        len
    }

    fn byte(h: &Harness, addr: u64) -> u8 {
        h.read_mem(addr, 1).expect("in guest memory")[0]
    }

    /// A request with a one-descriptor header at 0x2000, data buffers as
    /// given, and a status byte at 0x3000 (pre-set to 0xEE). Returns (used
    /// len, status byte).
    fn request(h: &mut Harness, header: [u8; 16], data: &[Desc]) -> (u32, u8) {
        assert!(h.write_mem(0x2000, &header));
        assert!(h.write_mem(0x3000, &[0xEE]));
        let mut descs = vec![Desc::r(0x2000, 16)];
        descs.extend_from_slice(data);
        descs.push(Desc::w(0x3000, 1));
        let len = run(h, &descs);
        (len, byte(h, 0x3000))
    }

    #[test]
    fn out_of_range_sectors_get_ioerr() {
        let mut h = rw();
        let cap = h.capacity() / 512;
        for (ty, sector, n) in [
            (types::IN, cap, 512),
            (types::IN, cap - 1, 1024),
            (types::IN, cap + 1000, 4096),
            (types::OUT, cap, 512),
            (types::OUT, cap - 7, 4096),
        ] {
            let data = if ty == types::IN {
                Desc::w(0x4000, n)
            } else {
                Desc::r(0x4000, n)
            };
            let got = request(&mut h, hdr(ty, sector), &[data]);
            assert_eq!(got, (1, status::IOERR), "type {ty} sector {sector} len {n}");
        }
        // The last sector itself is fine.
        let got = request(&mut h, hdr(types::IN, cap - 1), &[Desc::w(0x4000, 512)]);
        assert_eq!(got, (513, status::OK));
    }

    #[test]
    fn sector_times_512_overflow_gets_ioerr() {
        let mut h = rw();
        for sector in [u64::MAX / 512 + 1, u64::MAX, 1 << 55, u64::MAX / 512] {
            let got = request(&mut h, hdr(types::IN, sector), &[Desc::w(0x4000, 512)]);
            assert_eq!(got, (1, status::IOERR), "read at sector {sector:#x}");
            let got = request(&mut h, hdr(types::OUT, sector), &[Desc::r(0x4000, 512)]);
            assert_eq!(got, (1, status::IOERR), "write at sector {sector:#x}");
        }
    }

    #[test]
    fn data_length_not_a_multiple_of_512_gets_ioerr() {
        let mut h = rw();
        for n in [1, 100, 511, 513, 1000, 4095] {
            let got = request(&mut h, hdr(types::OUT, 0), &[Desc::r(0x4000, n)]);
            assert_eq!(got, (1, status::IOERR), "write of {n} bytes");
            let got = request(&mut h, hdr(types::IN, 0), &[Desc::w(0x4000, n)]);
            assert_eq!(got, (1, status::IOERR), "read of {n} bytes");
        }
        // Two odd pieces that add up to 512 are one aligned request.
        let got = request(
            &mut h,
            hdr(types::OUT, 0),
            &[Desc::r(0x4000, 100), Desc::r(0x5000, 412)],
        );
        assert_eq!(got, (1, status::OK));
    }

    #[test]
    fn write_on_a_read_only_disk_gets_ioerr() {
        let mut h = harness(Options {
            read_only: true,
            ..Options::default()
        });
        assert!(h.write_mem(0x4000, &[0x5A; 4096]));
        let got = request(&mut h, hdr(types::OUT, 8), &[Desc::r(0x4000, 4096)]);
        assert_eq!(got, (1, status::IOERR));
        // Reads and flushes still work, and the write left no trace.
        let got = request(&mut h, hdr(types::IN, 8), &[Desc::w(0x4000, 4096)]);
        assert_eq!(got, (4097, status::OK));
        assert_eq!(h.read_mem(0x4000, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(request(&mut h, hdr(types::FLUSH, 0), &[]), (1, status::OK));
    }

    #[test]
    fn unknown_type_gets_unsupp() {
        let mut h = rw();
        // DISCARD (11) and WRITE_ZEROES (13) are not offered either.
        for ty in [2, 3, 5, 7, 9, 11, 13, 16, 0x8000_0000, u32::MAX] {
            let got = request(&mut h, hdr(ty, 0), &[Desc::w(0x4000, 512)]);
            assert_eq!(got, (1, status::UNSUPP), "type {ty}");
        }
    }

    #[test]
    fn descriptors_outside_guest_memory_complete_with_used_len_0() {
        let mut h = rw();
        let end = h.guest_bytes();
        assert!(h.write_mem(0x2000, &hdr(types::IN, 0)));
        let status = Desc::w(0x3000, 1);
        let chains: Vec<Vec<Desc>> = vec![
            // Header past the end, straddling it, or wrapping the address space.
            vec![Desc::r(end, 16), status],
            vec![Desc::r(end - 8, 16), status],
            vec![Desc::r(u64::MAX - 7, 16), status],
            vec![Desc::r(u64::MAX, 1), status],
            // Data buffers outside.
            vec![Desc::r(0x2000, 16), Desc::w(end, 512), status],
            vec![Desc::r(0x2000, 16), Desc::w(end - 511, 512), status],
            vec![Desc::r(0x2000, 16), Desc::w(0x4000, u32::MAX), status],
            vec![Desc::r(0x2000, 16), Desc::r(1 << 40, 512), status],
            // The status byte outside.
            vec![Desc::r(0x2000, 16), Desc::w(0x4000, 512), Desc::w(end, 1)],
            vec![Desc::r(0x2000, 16), Desc::w(u64::MAX, 1)],
        ];
        for c in chains {
            assert!(h.write_mem(0x3000, &[0xEE]));
            assert_eq!(run(&mut h, &c), 0, "chain {c:?}");
            assert_eq!(byte(&h, 0x3000), 0xEE, "nothing written for {c:?}");
        }
        // An indirect table outside memory, or of a length that is not a
        // whole number of descriptors: the walk ends, leaving no status.
        for table in [
            Desc {
                addr: end,
                len: 64,
                flags: F_INDIRECT,
                next: 0,
            },
            Desc {
                addr: u64::MAX - 15,
                len: 32,
                flags: F_INDIRECT,
                next: 0,
            },
            Desc {
                addr: 0x8000,
                len: 40,
                flags: F_INDIRECT,
                next: 0,
            },
        ] {
            assert_eq!(run(&mut h, &[table]), 0, "indirect {table:?}");
        }
    }

    #[test]
    fn data_pointing_the_wrong_way_is_neither_read_into_nor_written_from() {
        // Found by the fuzzer: a read whose only data is device-readable (or
        // a write whose only data is device-writable) is a zero-length
        // request; its buffer must be left alone and the disk unchanged.
        let mut h = rw();
        assert!(h.write_mem(0x4000, &[0x5A; 4096]));
        let got = request(&mut h, hdr(types::OUT, 8), &[Desc::r(0x4000, 4096)]);
        assert_eq!(got, (1, status::OK));
        let read_back = |h: &mut Harness| {
            assert!(h.write_mem(0x6000, &[0; 4096]));
            let got = request(h, hdr(types::IN, 8), &[Desc::w(0x6000, 4096)]);
            assert_eq!(got, (4097, status::OK));
            h.read_mem(0x6000, 4096).unwrap()
        };
        assert!(read_back(&mut h) == [0x5A; 4096]);
        // A read with its data in the header's readable descriptor...
        let mut one = hdr(types::IN, 8).to_vec();
        one.extend_from_slice(&[0xAB; 4096]);
        assert!(h.write_mem(0x8000, &one));
        assert!(h.write_mem(0x3000, &[0xEE]));
        let len = run(&mut h, &[Desc::r(0x8000, 16 + 4096), Desc::w(0x3000, 1)]);
        assert_eq!((len, byte(&h, 0x3000)), (1, status::OK));
        assert!(h.read_mem(0x8010, 4096).unwrap() == [0xAB; 4096]);
        // ... or in a readable descriptor of its own.
        assert!(h.write_mem(0x4000, &[0xAB; 4096]));
        let got = request(&mut h, hdr(types::IN, 8), &[Desc::r(0x4000, 4096)]);
        assert_eq!(got, (1, status::OK));
        assert!(h.read_mem(0x4000, 4096).unwrap() == [0xAB; 4096]);
        // A write whose data the device may only write: nothing is written.
        assert!(h.write_mem(0x4000, &[0xC3; 4096]));
        let got = request(&mut h, hdr(types::OUT, 8), &[Desc::w(0x4000, 4096)]);
        assert_eq!(got, (1, status::OK));
        assert!(h.read_mem(0x4000, 4096).unwrap() == [0xC3; 4096]);
        assert!(read_back(&mut h) == [0x5A; 4096]);
    }

    #[test]
    fn chain_without_a_writable_byte_gets_used_len_0() {
        let mut h = rw();
        assert!(h.write_mem(0x2000, &hdr(types::IN, 0)));
        assert_eq!(run(&mut h, &[Desc::r(0x2000, 16)]), 0);
        assert_eq!(run(&mut h, &[Desc::r(0x2000, 16), Desc::w(0x3000, 0)]), 0);
        assert_eq!(run(&mut h, &[Desc::r(0x2000, 16), Desc::r(0x4000, 512)]), 0);
        assert_eq!(run(&mut h, &[Desc::r(0x2000, 0)]), 0);
        // A descriptor loop without a writable byte ends at the queue size.
        h.set_desc(
            0,
            Desc {
                addr: 0x2000,
                len: 16,
                flags: F_NEXT,
                next: 0,
            },
        );
        h.publish(0);
        assert_eq!(h.submit(), Outcome::Used(0));
        // A chain of nothing but empty descriptors.
        let empty: Vec<Desc> = (0..QUEUE_SIZE).map(|_| Desc::w(0, 0)).collect();
        assert_eq!(run(&mut h, &empty), 0);
    }

    /// `total` bytes at `addr` as descriptors of the given sizes (the last
    /// one takes the rest), each followed by a gap.
    fn pieces(addr: u64, sizes: &[u32], total: u32, flags: u16) -> Vec<Desc> {
        let mut out = Vec::new();
        let (mut at, mut left) = (addr, total);
        for (i, &s) in sizes.iter().enumerate() {
            let n = if i + 1 == sizes.len() {
                left
            } else {
                s.min(left)
            };
            if n == 0 {
                continue;
            }
            out.push(Desc {
                addr: at,
                len: n,
                flags,
                next: 0,
            });
            at += u64::from(n) + 3;
            left -= n;
        }
        out
    }

    /// Write `data` at `sector` through a header split as `hs` and data
    /// split as `ds`; the status byte is its own descriptor, or comes first
    /// in the chain when `status_first` (readable after writable).
    fn write_split(
        h: &mut Harness,
        sector: u64,
        data: &[u8],
        hs: &[u32],
        ds: &[u32],
        status_first: bool,
    ) {
        let header = pieces(0x2000, hs, 16, 0);
        let body = pieces(0x3000, ds, data.len() as u32, 0);
        let mut hb = Vec::new();
        hb.extend_from_slice(&hdr(types::OUT, sector));
        hb.extend_from_slice(data);
        let mut at = 0;
        for d in header.iter().chain(&body) {
            assert!(h.write_mem(d.addr, &hb[at..at + d.len as usize]));
            at += d.len as usize;
        }
        let st = Desc::w(0x1_F000, 1);
        let mut chain = Vec::new();
        if status_first {
            chain.push(st);
        }
        chain.extend(header);
        chain.extend(body);
        if !status_first {
            chain.push(st);
        }
        assert!(h.write_mem(0x1_F000, &[0xEE]));
        assert_eq!(run(h, &chain), 1);
        assert_eq!(byte(h, 0x1_F000), status::OK);
    }

    /// Read `len` bytes at `sector` into buffers split as `ds`, the status
    /// byte sharing the last data descriptor when `merge`.
    fn read_split(
        h: &mut Harness,
        sector: u64,
        len: u32,
        hs: &[u32],
        ds: &[u32],
        merge: bool,
    ) -> Vec<u8> {
        let header = pieces(0x2000, hs, 16, 0);
        let h16 = hdr(types::IN, sector);
        let mut at = 0;
        for d in &header {
            assert!(h.write_mem(d.addr, &h16[at..at + d.len as usize]));
            at += d.len as usize;
        }
        let mut body = pieces(0x8000, ds, len + u32::from(merge), F_WRITE);
        for d in &body {
            assert!(h.write_mem(d.addr, &vec![0xA5; d.len as usize]));
        }
        if !merge {
            body.push(Desc::w(0x1_F000, 1));
        }
        let last = *body.last().unwrap();
        let st_addr = last.addr + u64::from(last.len) - 1;
        let mut chain = header;
        chain.extend(body.iter().copied());
        assert_eq!(run(h, &chain), len + 1);
        assert_eq!(byte(h, st_addr), status::OK);
        let mut got = Vec::new();
        for d in &body {
            got.extend(h.read_mem(d.addr, d.len as usize).unwrap());
        }
        got.truncate(len as usize);
        got
    }

    #[test]
    fn header_and_data_split_across_odd_descriptors_round_trip() {
        let mut h = rw();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + i / 509) as u8).collect();
        // Fixed awkward layouts first.
        write_split(
            &mut h,
            40,
            &data[..4096],
            &[3, 13],
            &[1, 511, 1000, 2584],
            false,
        );
        assert_eq!(
            read_split(&mut h, 40, 4096, &[1, 1, 14], &[7, 4089], true),
            &data[..4096]
        );
        write_split(&mut h, 100, &data, &[16], &[8191, 1], true);
        assert_eq!(
            read_split(&mut h, 100, 8192, &[15, 1], &[1; 1], false),
            data
        );
        // A read straddling written and never-written sectors (a partial
        // hit: the rest comes from the backing store).
        let mut want = vec![0u8; 2048];
        want[1024..].copy_from_slice(&data[..1024]);
        assert_eq!(
            read_split(&mut h, 98, 2048, &[5, 11], &[333, 1715], false),
            want
        );

        // Then random layouts, each write read back through another.
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0001);
        let cuts = |rng: &mut rand::rngs::StdRng, total: u32, max: usize| -> Vec<u32> {
            let n = rng.gen_range(1..=max);
            (0..n).map(|_| rng.gen_range(1..=total)).collect()
        };
        for round in 0..40 {
            let sectors = rng.gen_range(1..=16u32);
            let len = sectors * 512;
            let sector = rng.gen_range(0..(h.capacity() / 512 - u64::from(sectors)));
            let mut buf = vec![0u8; len as usize];
            rng.fill_bytes(&mut buf);
            let (hs, ds) = (cuts(&mut rng, 16, 4), cuts(&mut rng, len, 8));
            write_split(&mut h, sector, &buf, &hs, &ds, rng.gen());
            let (hs, ds) = (cuts(&mut rng, 16, 4), cuts(&mut rng, len, 8));
            let got = read_split(&mut h, sector, len, &hs, &ds, rng.gen());
            assert!(
                got == buf,
                "round {round}: {len} bytes at sector {sector} differ"
            );
        }
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mut h = rw();
        let mut want = [0u8; 20];
        want[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
        for (buf, used) in [(20u32, 21u32), (8, 9), (40, 21), (0, 1)] {
            assert!(h.write_mem(0x4000, &[0xA5; 40]));
            let data = if buf > 0 {
                vec![Desc::w(0x4000, buf)]
            } else {
                vec![]
            };
            let got = request(&mut h, hdr(types::GET_ID, 0), &data);
            assert_eq!(got, (used, status::OK), "buffer of {buf}");
            let n = (used - 1) as usize;
            assert_eq!(h.read_mem(0x4000, n).unwrap(), &want[..n]);
        }
        // Split over odd buffers, the status byte sharing the last.
        assert!(h.write_mem(0x2000, &hdr(types::GET_ID, 0)));
        let chain = [
            Desc::r(0x2000, 16),
            Desc::w(0x4000, 3),
            Desc::w(0x5000, 17),
            Desc::w(0x6000, 1),
        ];
        assert_eq!(run(&mut h, &chain), 21);
        let mut got = h.read_mem(0x4000, 3).unwrap();
        got.extend(h.read_mem(0x5000, 17).unwrap());
        assert_eq!(got, want);
        assert_eq!(byte(&h, 0x6000), status::OK);
    }

    #[test]
    fn head_index_past_the_queue_is_dropped_and_the_queue_keeps_working() {
        let mut h = rw();
        assert!(h.write_mem(0x2000, &hdr(types::FLUSH, 0)));
        h.set_desc(
            0,
            Desc {
                addr: 0x2000,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
        );
        h.set_desc(1, Desc::w(0x3000, 1));
        // Through the worker's own path: a bad head, then a good chain.
        h.publish_many(&[QUEUE_SIZE, u16::MAX, 0]);
        h.kick().expect("a bad head must not end the worker");
        assert_eq!(h.take_used(), vec![(0, 1)]);
        assert_eq!(byte(&h, 0x3000), status::OK);
        // And through submit.
        h.publish(QUEUE_SIZE + 3);
        assert_eq!(h.submit(), Outcome::Dropped);
        h.publish(0);
        assert_eq!(h.submit(), Outcome::Used(1));
    }

    #[test]
    fn guest_rewriting_a_pending_read_gets_a_sane_completion() {
        let mut h = rw();
        // A read that misses fills the cache: each round reads elsewhere.
        let mut sector = 1000;
        let mut read = |h: &mut Harness| {
            sector += 8;
            assert!(h.write_mem(0x2000, &hdr(types::IN, sector)));
            h.offer_chain(&[
                Desc::r(0x2000, 16),
                Desc::w(0x4000, 4096),
                Desc::w(0x3000, 1),
            ]);
            // Nothing is cached there: the read waits for the backing store.
            assert_eq!(h.submit_with(false), Outcome::Pending);
            assert_eq!(h.pending(), (1, 0));
        };
        // Every writable descriptor turned readable: no status byte left.
        let linked = |d: Desc| Desc {
            flags: d.flags | F_NEXT,
            next: 2,
            ..d
        };
        read(&mut h);
        h.set_desc(1, linked(Desc::r(0x4000, 4096)));
        h.set_desc(2, Desc::r(0x3000, 1));
        assert_eq!(h.settle().unwrap(), vec![(0, 0)]);
        // Fewer writable bytes than the data: IOERR, nothing but the status.
        read(&mut h);
        h.set_desc(1, linked(Desc::w(0x4000, 512)));
        assert!(h.write_mem(0x4000, &[0xA5; 512]));
        assert_eq!(h.settle().unwrap(), vec![(0, 1)]);
        assert_eq!(byte(&h, 0x3000), status::IOERR);
        assert_eq!(h.read_mem(0x4000, 512).unwrap(), vec![0xA5; 512]);
        // More writable bytes than the data: IOERR too.
        read(&mut h);
        h.set_desc(1, linked(Desc::w(0x4000, 8192)));
        assert_eq!(h.settle().unwrap(), vec![(0, 1)]);
        assert_eq!(byte(&h, 0x3000), status::IOERR);
        // Buffers moved outside guest memory.
        read(&mut h);
        h.set_desc(1, linked(Desc::w(h.guest_bytes(), 4096)));
        assert_eq!(h.settle().unwrap(), vec![(0, 0)]);
        // The chain cut short: the header alone.
        read(&mut h);
        h.set_desc(0, Desc::r(0x2000, 16));
        assert_eq!(h.settle().unwrap(), vec![(0, 0)]);
        // Left alone, it completes normally.
        read(&mut h);
        assert_eq!(h.settle().unwrap(), vec![(0, 4097)]);
        assert_eq!(byte(&h, 0x3000), status::OK);
    }

    /// Runs `cases` random chains through `Harness::run_case` (which checks
    /// each answer against its model and a shadow of the disk) and returns
    /// how many fell in each class.
    fn random_chains(
        h: &mut Harness,
        seed: u64,
        cases: usize,
    ) -> std::collections::BTreeMap<Class, usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut seen = std::collections::BTreeMap::new();
        let mut buf = Vec::new();
        for i in 0..cases {
            let n = rng.gen_range(0..256);
            buf.resize(n, 0);
            rng.fill_bytes(&mut buf);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run_case(&buf)));
            match r {
                Ok(rep) => *seen.entry(rep.class).or_insert(0) += 1,
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    panic!("case {i} (seed {seed:#x}) input {buf:02x?}: {msg}");
                }
            }
        }
        seen
    }

    #[test]
    fn ten_thousand_random_chains_never_panic_and_always_complete_sanely() {
        let mut h = rw();
        let seen = random_chains(&mut h, 0x0bad_c0de_0000_0001, 10_000);
        eprintln!("classes: {seen:?}");
        // The generator reaches every kind of answer, not just rejections.
        for (class, min) in [
            (Class::Dropped, 10),
            (Class::NoStatus, 200),
            (Class::Rejected(status::IOERR), 200),
            (Class::Rejected(status::UNSUPP), 50),
            (Class::ReadHit, 50),
            (Class::ReadMiss, 50),
            (Class::Write, 200),
            (Class::Flush, 50),
            (Class::GetId, 50),
        ] {
            let n = seen.get(&class).copied().unwrap_or(0);
            assert!(
                n >= min,
                "only {n} cases of {class:?} (want {min}): {seen:?}"
            );
        }
    }

    #[test]
    fn random_chains_on_a_read_only_disk() {
        let mut h = harness(Options {
            read_only: true,
            ..Options::default()
        });
        let seen = random_chains(&mut h, 0x0bad_c0de_0000_0002, 1_000);
        assert!(!seen.contains_key(&Class::Write), "{seen:?}");
    }
}
