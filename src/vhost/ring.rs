//! A started virtqueue: taking requests from it and returning them, with
//! each step recorded in the frontend's inflight region when there is one.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryRegion, GuestRegionMmap,
};

use super::chain::Chain;
use super::dirty::DirtyLog;
use super::guest::{Gm, Mem, Vring};
use super::inflight::InflightQueue;

/// Completions between used-ring signals while a batch is still running.
/// Signalling each one wakes the driver once per request; signalling only
/// at the end of a batch leaves it idle until the whole batch is done.
/// Eight measured best for 4 KiB hits at QD32 (see docs/benchmarks.md).
pub const NOTIFY_BATCH: usize = 8;

/// A started ring and its part of the inflight region.
#[derive(Clone)]
pub struct Ring {
    /// The ring's state (shared with the message handler).
    pub vring: Vring,
    inflight: Option<InflightQueue>,
    log: Arc<DirtyLog>,
    mem: Gm,
}

impl Ring {
    /// A ring over guest memory `mem`, tracked in `inflight` if the
    /// frontend gave a region, its writes marked in `log` while the
    /// frontend migrates the guest.
    pub fn new(vring: Vring, inflight: Option<InflightQueue>, log: Arc<DirtyLog>, mem: Gm) -> Ring {
        Ring {
            vring,
            inflight,
            log,
            mem,
        }
    }

    /// Take the next request the driver made available, marking it taken.
    /// `mem` is the memory table loaded once for the batch.
    pub fn pop(&self, mem: &GuestMemoryLoadGuard<Mem>) -> Option<Chain> {
        let chain = self
            .vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone())?;
        if let Some(i) = &self.inflight {
            i.take(chain.head_index());
        }
        Some(chain)
    }

    /// Put a completed request in the used ring and mark it returned. A
    /// failure (a head index past the queue, which only a broken or hostile
    /// driver sends, or a used ring outside guest memory) is logged and the
    /// request dropped: returning an error would end the queue's worker and
    /// strand every request after it.
    pub fn put_used(&self, head: u16, len: u32) -> bool {
        if self.log.logging() {
            // What the request wrote into guest memory, before it is used.
            let (table, size) = {
                let st = self.vring.get_ref();
                (st.get_queue().desc_table(), st.get_queue().size())
            };
            self.log.mark_chain(&self.mem.memory(), table, size, head);
        }
        let r = match &self.inflight {
            None => self.vring.add_used(head, len),
            Some(i) => {
                i.returning(head);
                let mut st = self.vring.get_mut();
                let r = st.add_used(head, len);
                if r.is_ok() {
                    i.returned(head, st.get_queue().next_used());
                }
                r
            }
        };
        if let Err(e) = r {
            tracing::warn!(head, len, error = %e, "cannot return a request to the used ring; dropped");
            return false;
        }
        self.log.mark_used_ring(&self.vring);
        true
    }

    /// Signal the driver if it wants to be (always without EVENT_IDX).
    pub fn notify(&self) -> io::Result<()> {
        if self.vring.needs_notification().map_err(io::Error::other)? {
            self.vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Count one request put in the used ring, and signal the driver every
    /// [`NOTIFY_BATCH`] of them, not only when a batch ends: a driver waiting
    /// for completions then refills the ring while we work on the rest,
    /// instead of the two sides taking turns with the whole queue. Under
    /// EVENT_IDX a signal costs a syscall only when the driver asked for one.
    pub fn signal_every_batch(&self, pending: &mut usize) -> io::Result<()> {
        *pending += 1;
        if *pending < NOTIFY_BATCH {
            return Ok(());
        }
        *pending = 0;
        self.notify()
    }

    /// Is the ring started (not being stopped)?
    pub fn is_ready(&self) -> bool {
        self.vring.get_ref().get_queue().ready()
    }

    /// Whether the driver has made requests available that we can take
    /// now. One load from guest memory; no notification state changes. A
    /// ring being stopped (not ready) has none: what the driver added stays
    /// for whoever starts it next, and a worker polling it must not spin on
    /// requests it can no longer take. Nor on an index more than the ring
    /// holds ahead of ours: a broken driver's, from which nothing can be
    /// taken.
    pub fn avail_pending(&self, mem: &Mem) -> bool {
        let st = self.vring.get_ref();
        let q = st.get_queue();
        q.ready()
            && q.avail_idx(mem, Ordering::Acquire).is_ok_and(|avail| {
                let ahead = avail.0.wrapping_sub(q.next_avail());
                ahead != 0 && ahead <= q.size()
            })
    }
}

/// The descriptor chains of requests a previous backend took and did not
/// return, headed by `heads` in the ring `vring` describes, to run again.
///
/// virtio-queue builds chains only from an available ring, and the
/// driver's may have moved on (a slot is reused once its request is taken).
/// So the heads go into a private available ring, in a page of our own
/// placed after guest memory, and a second queue over the driver's
/// descriptor table takes them from there. The chains hold that memory
/// table, whose guest regions are the driver's own.
pub fn chains_for(vring: &Vring, mem: &Gm, heads: &[u16]) -> io::Result<Vec<(Chain, Arc<Mem>)>> {
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let guest = mem.memory();
    let (size, desc_table) = {
        let st = vring.get_ref();
        let q = st.get_queue();
        (q.size(), q.desc_table())
    };
    // Avail ring (4 + 2 * size + 2 bytes) and used ring (4 + 8 * size + 2),
    // both aligned, in pages past the last guest region.
    let avail_at = guest
        .iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
        .next_multiple_of(4096);
    let used_off = (6 + 2 * size as u64).next_multiple_of(64);
    let bytes = (used_off + 6 + 8 * size as u64).next_multiple_of(4096);
    let own = GuestRegionMmap::<super::shm::Owner>::from_range(
        GuestAddress(avail_at),
        bytes as usize,
        None,
    )
    .map_err(|e| io::Error::other(format!("cannot map a private ring: {e}")))?;
    let table: Mem = guest
        .insert_region(Arc::new(own))
        .map_err(|e| io::Error::other(format!("cannot place a private ring: {e}")))?;
    let at = |off: u64| GuestAddress(avail_at + off);
    for (i, h) in heads.iter().enumerate() {
        table
            .write_obj(*h, at(4 + 2 * i as u64))
            .map_err(io::Error::other)?;
    }
    table
        .write_obj(heads.len() as u16, at(2))
        .map_err(io::Error::other)?;
    let own_mem = GuestMemoryAtomic::new(table);
    let mut q = Queue::new(size).map_err(io::Error::other)?;
    q.set_size(size);
    q.set_desc_table_address(Some(desc_table as u32), Some((desc_table >> 32) as u32));
    q.set_avail_ring_address(Some(avail_at as u32), Some((avail_at >> 32) as u32));
    let used = avail_at + used_off;
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(true);
    let keep = own_mem.memory().into_inner();
    let mut chains = Vec::with_capacity(heads.len());
    while let Some(c) = q.pop_descriptor_chain(own_mem.memory()) {
        chains.push((c, keep.clone()));
    }
    Ok(chains)
}
