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
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{bits, BlkConfig, PROTOCOL_FEATURES, PROTOCOL_FEATURES_BIT, VIRTIO_FEATURES};
use super::request::{parse, status, RequestKind, HEADER_BYTES, ID_BYTES};
use crate::backing::{AlignedBuf, Backing, BackingQueue, Completion, IoOp};
use crate::engine::{DataHead, Engine, Error as EngineError, Miss};

type Mem = GuestMemoryMmap<()>;
type Gm = GuestMemoryAtomic<Mem>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<Mem>>;
type Vring = VringRwLock<Gm>;

/// Bits of a backing-queue user_data that name the miss inside a request.
const MISS_BITS: u32 = 20;
/// How long `stop_vring` waits for deferred writes to find space.
const STOP_DEFER_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// A read waiting for its misses to come back from the backing store.
struct PendingRead {
    chain: Chain,
    buf: Vec<u8>,
    misses: Vec<Miss>,
    left: usize,
    failed: bool,
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
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    fn drain_avail(&self, qs: &mut QueueState, vring: &Vring) -> io::Result<()> {
        let mem = self.mem.memory();
        let mut used = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            if let Some((head, len)) = self.start(qs, chain) {
                vring.add_used(head, len).map_err(io::Error::other)?;
                used = true;
            }
        }
        // Submit the reads queued above in one batch.
        qs.bq.poll(&mut qs.completions);
        if !qs.completions.is_empty() {
            used |= self.finish_reads(qs, vring)?;
        }
        if used {
            notify(vring)?;
        }
        Ok(())
    }

    /// Start one request. Returns (head, used length) when it completed at
    /// once; None when it waits for the backing store or for space.
    fn start(&self, qs: &mut QueueState, chain: Chain) -> Option<(u16, u32)> {
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
                let mut buf = vec![0u8; len as usize];
                let mut misses = Vec::new();
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
                    return Some((head, len as u32 + 1));
                }
                let id = qs.next_id;
                qs.next_id += 1;
                for (i, m) in misses.iter().enumerate() {
                    let ud = id << MISS_BITS | i as u64;
                    qs.bq.submit(
                        ud,
                        IoOp::Read {
                            off: m.off,
                            buf: AlignedBuf::new(m.len as usize),
                        },
                    );
                }
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
                None
            }
            RequestKind::Write { len, .. } => {
                let mut data = vec![0u8; len as usize];
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
            Some(st) => Some(complete(&d.chain, st)),
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
                let from = d.done as usize;
                match self.engine.write(head, off + d.done, &d.data[from..]) {
                    Ok(()) => {
                        if !self.writeback.load(Ordering::Relaxed) {
                            if let Err(e) = self.engine.commit(off, len) {
                                return match e {
                                    EngineError::CacheFull { .. } => {
                                        d.done = len;
                                        None
                                    }
                                    e => Some(fail("write-through commit", &e)),
                                };
                            }
                        }
                        Some(status::OK)
                    }
                    Err(EngineError::CacheFull { done }) => {
                        d.done += done;
                        None
                    }
                    Err(e) => Some(fail("write", &e)),
                }
            }
            RequestKind::Flush => match self.engine.flush() {
                Ok(()) => Some(status::OK),
                Err(EngineError::CacheFull { .. }) => None,
                Err(e) => Some(fail("flush", &e)),
            },
            RequestKind::Read { .. } | RequestKind::GetId => Some(status::IOERR),
        }
    }

    /// Retry deferred requests in order, as far as space allows.
    fn retry_deferred(&self, qs: &mut QueueState, vring: Option<&Vring>) -> io::Result<bool> {
        let mut used = false;
        while let Some(mut d) = qs.deferred.pop_front() {
            match self.try_run(&mut qs.head, &mut d) {
                Some(st) => {
                    let (head, len) = complete(&d.chain, st);
                    if let Some(v) = vring {
                        v.add_used(head, len).map_err(io::Error::other)?;
                        used = true;
                    }
                }
                None => {
                    qs.deferred.push_front(d);
                    break;
                }
            }
        }
        Ok(used)
    }

    /// Handle backing completions in `qs.completions`; returns whether any
    /// request completed.
    fn finish_reads(&self, qs: &mut QueueState, vring: &Vring) -> io::Result<bool> {
        let mut used = false;
        let done = std::mem::take(&mut qs.completions);
        for c in &done {
            let id = c.user_data >> MISS_BITS;
            let i = (c.user_data & ((1 << MISS_BITS) - 1)) as usize;
            let Some(p) = qs.reads.get_mut(&id) else {
                continue;
            };
            let m = p.misses[i];
            match (&c.result, &c.op) {
                (Ok(()), IoOp::Read { buf, .. }) => {
                    p.buf[m.buf_off..m.buf_off + m.len as usize].copy_from_slice(buf);
                    self.engine.fill(&mut qs.head, &m, buf);
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
                let (head, len) = finish_read(&p);
                vring.add_used(head, len).map_err(io::Error::other)?;
                used = true;
            }
        }
        let mut done = done;
        done.clear();
        qs.completions = done;
        Ok(used)
    }

    fn on_completions(&self, qs: &mut QueueState) -> io::Result<()> {
        let st = &mut *qs;
        st.bq.poll(&mut st.completions);
        let Some(vring) = qs.vring.clone() else {
            return Ok(());
        };
        if self.finish_reads(qs, &vring)? {
            notify(&vring)?;
        }
        Ok(())
    }

    fn on_space(&self, q: usize, qs: &mut QueueState) -> io::Result<()> {
        let _ = self.space_fds[q].read();
        if qs.deferred.is_empty() {
            return Ok(());
        }
        let vring = qs.vring.clone();
        if self.retry_deferred(qs, vring.as_ref())? {
            if let Some(v) = &vring {
                notify(v)?;
            }
        }
        Ok(())
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

/// Copy a finished read to the guest and write its status.
fn finish_read(p: &PendingRead) -> (u16, u32) {
    let chain = &p.chain;
    let mem = chain.memory();
    let Ok(mut w) = chain.clone().writer(mem) else {
        return (chain.head_index(), 0);
    };
    let n = w.available_bytes();
    let Ok(mut st) = w.split_at(n - 1) else {
        return (chain.head_index(), 0);
    };
    if p.failed {
        let _ = st.write_all(&[status::IOERR]);
        return (chain.head_index(), 1);
    }
    let ok = w.write_all(&p.buf).is_ok();
    let _ = st.write_all(&[if ok { status::OK } else { status::IOERR }]);
    (chain.head_index(), p.buf.len() as u32 + 1)
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
            self.finish_reads(qs, &vring)?;
        }
        let started = Instant::now();
        while !qs.deferred.is_empty() {
            let epoch = self.engine.space_epoch();
            self.retry_deferred(&mut qs, Some(&vring))?;
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
                    vring.add_used(head, len).map_err(io::Error::other)?;
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
            return self.process_vring(&mut qs, vring);
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
