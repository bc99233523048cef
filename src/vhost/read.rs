//! The read-miss pipeline: what the cache does not hold is read from the
//! backing store without blocking the queue, copied to the guest when it
//! is back, and only then offered to the cache (a fill).

use std::io;

use vm_memory::GuestAddressSpace;

use super::chain::{finish_read, Chain};
use super::device::Device;
use super::queue::QueueState;
use super::ring::Ring;
use crate::backing::IoOp;
use crate::engine::Miss;

/// Bits of a backing-queue user_data that name the miss inside a request.
const MISS_BITS: u32 = 20;
/// Most misses in one read: their indices must fit in a user_data.
pub(super) const MAX_MISSES: usize = 1 << MISS_BITS;
/// Times `run_fills` goes back to the ring for new requests before it
/// finishes the fills it holds.
const FILL_RING_TURNS: usize = 64;

/// A read waiting for its misses to come back from the backing store.
pub(super) struct PendingRead {
    chain: Chain,
    /// The request's bytes so far (its hits); empty when one miss is the
    /// whole request, whose backing buffer is then copied to the guest as is.
    buf: Vec<u8>,
    misses: Vec<Miss>,
    left: usize,
    failed: bool,
    /// Fill the cache with what the misses read (not for a long
    /// sequential stream).
    fill: bool,
}

/// Send a read's misses (at most [`MAX_MISSES`]) to the backing queue; the
/// request completes when the last one is back.
pub(super) fn queue_misses(
    qs: &mut QueueState,
    chain: Chain,
    buf: Vec<u8>,
    misses: Vec<Miss>,
    fill: bool,
) {
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
            fill,
        },
    );
}

/// What a read with misses keeps of its buffer until they are back: its
/// hits, or nothing when one miss is the whole request (the common case:
/// no copy and no allocation).
pub(super) fn hits_to_keep(hits: &[u8], misses: &[Miss]) -> Vec<u8> {
    match misses {
        [m] if m.buf_off == 0 && m.len == hits.len() as u64 => Vec::new(),
        _ => hits.to_vec(),
    }
}

impl Device {
    /// Handle backing completions in `qs.completions`; returns whether any
    /// request completed. Every completion is consumed, whatever happens to
    /// the used ring: one lost here would leave its read pending forever.
    pub(super) fn finish_reads(&self, qs: &mut QueueState, ring: &Ring) -> bool {
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
            let fill = p.fill;
            // The data of a miss that is the whole request goes to the
            // guest straight from the backing buffer.
            let mut whole = None;
            match (&c.result, c.op) {
                (Ok(()), IoOp::Read { buf, .. }) if p.buf.is_empty() => whole = Some(buf),
                (Ok(()), IoOp::Read { buf, .. }) => {
                    p.buf[m.buf_off..m.buf_off + m.len as usize].copy_from_slice(&buf);
                    if fill {
                        qs.fills.push((m, buf));
                    } else {
                        self.engine.note_unfilled(m.len);
                        qs.bufs.give(buf);
                    }
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
                let done = finish_read(&p.chain, p.failed, data);
                qs.track.done(&done);
                if ring.put_used(done.head, done.len) {
                    used = true;
                    // An error here resurfaces at the caller's final notify.
                    let _ = ring.signal_every_batch(&mut pending);
                }
            }
            if let Some(buf) = whole {
                if fill {
                    qs.fills.push((m, buf));
                } else {
                    self.engine.note_unfilled(m.len);
                    qs.bufs.give(buf);
                }
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
    pub(super) fn run_fills(&self, qs: &mut QueueState, ring: Option<&Ring>) -> io::Result<()> {
        // Under a steady stream of misses new fills keep coming; after this
        // many turns to the ring the rest are filled without looking, so
        // the worker gets back to its other events.
        let mut turns = FILL_RING_TURNS;
        let mem = self.mem.memory();
        loop {
            if let Some(r) = ring.filter(|_| turns > 0 && !self.is_stopping()) {
                if r.avail_pending(&mem) {
                    turns -= 1;
                    self.process_vring(qs, r)?;
                }
            }
            let Some((m, buf)) = qs.fills.pop() else {
                return Ok(());
            };
            self.engine.fill(&mut qs.head, &m, &buf);
            qs.bufs.give(buf);
        }
    }

    /// Backing completions are ready for queue `q`.
    pub(super) fn on_completions(&self, q: usize) -> io::Result<()> {
        let mut qs = self.queues[q].lock().expect("queue lock");
        let st = &mut *qs;
        st.bq.poll(&mut st.completions);
        let Some(ring) = qs.ring.clone() else {
            return Ok(());
        };
        if self.finish_reads(&mut qs, &ring) {
            ring.notify()?;
        }
        self.run_fills(&mut qs, Some(&ring))
    }
}
