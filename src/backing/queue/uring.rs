//! The io_uring engine of [`super::BackingQueue`]: reads, writes and
//! fdatasyncs go straight to the kernel, batched per `poll`/`wait` call.

use std::time::Duration;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring, Probe};

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use super::op::*;
use crate::backing::aligned::AlignedBuf;

/// An operation owned by the ring engine from `queue` until its CQE is
/// reaped: the slot owns the buffer the kernel reads or writes.
struct Slot {
    /// The caller's tag.
    user_data: u64,
    /// The operation and its buffer.
    op: IoOp,
    /// Bytes transferred so far (reads and writes continue after a short
    /// transfer).
    done: usize,
    /// Resubmissions after EINTR/EAGAIN.
    retries: u32,
    /// A write-zeroes the store cannot fallocate: zeros are written
    /// instead, `done` bytes so far.
    writing_zeros: bool,
}

/// The io_uring engine.
///
/// Invariant for memory safety: while an SQE for slot `i` is in the
/// submission ring or in the kernel (`in_kernel` counts them), `slots[i]`
/// stays `Some` and its buffer is neither freed nor accessed; only the reap
/// of that SQE's CQE (user_data `i`) may remove it. `Drop` waits for all
/// CQEs, or leaks the slots if it cannot.
pub(super) struct Uring {
    /// The ring.
    ring: IoUring,
    /// The store's descriptor (kept open by `BackingQueue::backing`).
    fd: RawFd,
    /// Operations by slot index (the SQE user_data).
    slots: Vec<Option<Slot>>,
    /// Free slot indices.
    free: Vec<usize>,
    /// Slots whose next SQE is still to be pushed, in order.
    pending: VecDeque<usize>,
    /// SQEs pushed whose CQE has not been reaped.
    in_kernel: usize,
    /// Occupied slots (operations not yet completed to the caller).
    pub(super) live: usize,
    /// Most SQEs in the kernel at once: the SQ size, which keeps the CQ
    /// (twice as big) from ever overflowing.
    pub(super) limit: usize,
    /// Scratch for reaped CQEs (user_data, result).
    reaped: Vec<(u64, i32)>,
    /// The kernel has IORING_OP_FALLOCATE (write-zeroes without moving data).
    fallocate: bool,
}

/// Zeros written by a write-zeroes the store cannot fallocate, a piece at a
/// time (the kernel only reads them, from any number of SQEs at once).
static ZEROS: std::sync::OnceLock<AlignedBuf> = std::sync::OnceLock::new();
/// Bytes of [`ZEROS`].
const ZEROS_BYTES: usize = 1 << 20;

fn zeros() -> &'static AlignedBuf {
    ZEROS.get_or_init(|| AlignedBuf::new(ZEROS_BYTES))
}

/// Logged once: a store that cannot fallocate.
static LOGGED_ZERO_FALLBACK: AtomicBool = AtomicBool::new(false);

impl Uring {
    /// Set up a ring of `depth` entries for `fd`, check the opcodes we need
    /// and register the notifier.
    pub(super) fn new(fd: RawFd, depth: u32, notifier: Option<RawFd>) -> io::Result<Uring> {
        // Created disabled, so the operations it may carry are fixed before
        // it runs: seccomp does not see what a ring does.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(depth.clamp(1, MAX_RING_ENTRIES))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io::Error::new(e.kind(), format!("kernel too old to probe: {e}")))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel lacks IORING_OP_{name}"),
                ));
            }
        }
        let fallocate = probe.is_supported(opcode::Fallocate::CODE);
        if let Some(efd) = notifier {
            ring.submitter().register_eventfd(efd)?;
        }
        let mut allowed = vec![
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
        ];
        if fallocate {
            allowed.push(Restriction::sqe_op(opcode::Fallocate::CODE));
        }
        ring.submitter().register_restrictions(&mut allowed)?;
        ring.submitter().register_enable_rings()?;
        let limit = ring.params().sq_entries() as usize;
        Ok(Uring {
            ring,
            fd,
            slots: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            in_kernel: 0,
            live: 0,
            limit,
            reaped: Vec::new(),
            fallocate,
        })
    }

    /// Take ownership of a validated, non-empty operation.
    pub(super) fn queue(&mut self, user_data: u64, op: IoOp) {
        let slot = Slot {
            writing_zeros: matches!(op, IoOp::Zeroes { .. }) && !self.fallocate,
            user_data,
            op,
            done: 0,
            retries: 0,
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(slot);
                idx
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.live += 1;
        self.pending.push_back(idx);
    }

    /// Push pending SQEs (up to the limit), submit them, reap completions;
    /// repeat while reaping made room for more or queued resubmissions, so
    /// nothing is left pending that no future completion would wake us for.
    pub(super) fn poll(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        loop {
            self.push_pending();
            let submitted = self.submit(0);
            // Reap even if the submit failed: EBUSY means the kernel wants
            // completions consumed before it takes more.
            let reaped = self.reap(out);
            submitted?;
            if reaped == 0 || self.pending.is_empty() || self.in_kernel >= self.limit {
                return Ok(());
            }
        }
    }

    /// Sleep in the kernel until a completion arrives (or, if the last
    /// submission failed, a little while before retrying).
    pub(super) fn block(&mut self, submit_failed: bool) {
        if self.in_kernel == 0 || submit_failed {
            // Nothing can wake us (or the kernel is refusing work): back off.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        if let Err(e) = self.submit(1) {
            tracing::debug!("io_uring_enter while waiting: {e}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `io_uring_enter`: submit what is in the SQ and wait for `want`
    /// completions. EINTR is not an error (the caller loops anyway).
    pub(super) fn submit(&mut self, want: usize) -> io::Result<()> {
        if want == 0 && self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Move pending operations into the SQ while the kernel has room.
    pub(super) fn push_pending(&mut self) {
        let mut sq = self.ring.submission();
        while self.in_kernel < self.limit {
            let Some(&idx) = self.pending.front() else {
                break;
            };
            let Some(entry) = sqe_for(self.fd, &mut self.slots, idx) else {
                // Cannot happen (pending slots are occupied); drop the entry
                // rather than submit garbage.
                self.pending.pop_front();
                continue;
            };
            // SAFETY: the entry points at the heap buffer of `slots[idx]`
            // (or at nothing, for fsync) and at `self.fd`. By the `Uring`
            // invariant that slot, and so its buffer, stays allocated and
            // untouched until the CQE with user_data `idx` is reaped; the
            // heap address does not change when the `Slot` or `slots` moves.
            // The descriptor stays open because `BackingQueue` keeps the
            // store alive until `drain_for_drop` has reaped every CQE.
            if unsafe { sq.push(&entry) }.is_err() {
                break; // SQ full: the rest waits for the next round
            }
            self.pending.pop_front();
            self.in_kernel += 1;
        }
    }

    /// Reap every available CQE, finishing or resubmitting its operation.
    /// Returns the number of CQEs reaped.
    pub(super) fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.reaped.clear();
        self.reaped.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let count = self.reaped.len();
        for i in 0..count {
            let (user_data, res) = self.reaped[i];
            self.in_kernel = self.in_kernel.saturating_sub(1);
            self.handle_cqe(user_data, res, out);
        }
        count
    }

    /// Account for one CQE of slot `idx`.
    pub(super) fn handle_cqe(&mut self, idx: u64, res: i32, out: &mut Vec<Completion>) {
        let idx = idx as usize;
        let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            tracing::error!("io_uring completion for unknown slot {idx} (ignored)");
            return;
        };
        let total = slot.op.range().1 as usize;
        let zeroes = matches!(slot.op, IoOp::Zeroes { .. });
        let result = if res < 0 {
            if (res == -libc::EINTR || res == -libc::EAGAIN) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                self.pending.push_front(idx);
                return;
            }
            if zeroes
                && !slot.writing_zeros
                && matches!(-res, libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV)
            {
                // The file system or device cannot zero a range (tmpfs has
                // no ZERO_RANGE, some devices no discard): write the zeros.
                if !LOGGED_ZERO_FALLBACK.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        error = %errno_error(res),
                        "fallocate cannot zero the backing store; writing zeros instead"
                    );
                }
                slot.writing_zeros = true;
                self.pending.push_front(idx);
                return;
            }
            Err(errno_error(res))
        } else if matches!(slot.op, IoOp::Flush) || (zeroes && !slot.writing_zeros) {
            Ok(())
        } else if res == 0 {
            // No progress: the file shrank under us (read) or the device
            // takes no more (write). Never report a partial transfer as Ok.
            let remaining = total - slot.done;
            Err(match slot.op {
                IoOp::Read { off, .. } => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at offset {} with {remaining} bytes left to read",
                        off + slot.done as u64
                    ),
                ),
                _ => io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!(
                        "write made no progress with {remaining} bytes left at offset {}",
                        slot.op_offset() + slot.done as u64
                    ),
                ),
            })
        } else {
            slot.done += res as usize;
            if slot.done < total {
                // Short transfer: continue with the rest.
                self.pending.push_front(idx);
                return;
            }
            Ok(())
        };
        self.finish(idx, result, out);
    }

    /// Hand slot `idx` back to the caller with `result`.
    pub(super) fn finish(&mut self, idx: usize, result: io::Result<()>, out: &mut Vec<Completion>) {
        if let Some(slot) = self.slots[idx].take() {
            self.free.push(idx);
            self.live -= 1;
            out.push(Completion {
                user_data: slot.user_data,
                op: slot.op,
                result,
            });
        }
    }

    /// Before the ring and the buffers go away: let every operation run to
    /// completion. If the kernel keeps refusing, leak the buffers instead
    /// (memory it may still write must never be freed).
    pub(super) fn drain_for_drop(&mut self) {
        let mut sink = Vec::new();
        let mut failures = 0;
        while self.live > 0 {
            if self.in_kernel == 0 && self.pending.is_empty() {
                // Cannot happen (a live slot is pending or in the kernel);
                // if it did, the kernel holds no buffer and freeing is safe.
                break;
            }
            sink.clear();
            let result = self.poll(&mut sink).and_then(|()| {
                if self.live > 0 && self.in_kernel > 0 {
                    self.submit(1)
                } else {
                    Ok(())
                }
            });
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_DROP_ENTER_FAILURES {
                        tracing::error!(
                            "io_uring keeps failing ({e}) while dropping a backing \
                             queue; leaking {} in-flight buffers",
                            self.live
                        );
                        std::mem::forget(std::mem::take(&mut self.slots));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

impl Slot {
    /// The operation's starting offset (0 for flush).
    pub(super) fn op_offset(&self) -> u64 {
        self.op.range().0
    }
}

/// The SQE for the next piece of slot `idx`: the rest of its transfer (at
/// most `MAX_SQE_BYTES`), or the fdatasync.
fn sqe_for(fd: RawFd, slots: &mut [Option<Slot>], idx: usize) -> Option<squeue::Entry> {
    let slot = slots.get_mut(idx)?.as_mut()?;
    let done = slot.done;
    let writing_zeros = slot.writing_zeros;
    let entry = match &mut slot.op {
        IoOp::Read { off, buf } => {
            let len = (buf.len() - done).min(MAX_SQE_BYTES);
            // wrapping_add: in bounds (done < len), no unsafe needed.
            let ptr = buf.as_mut_ptr().wrapping_add(done);
            // Issued inline by io_uring_enter, not punted to io-wq
            // (IOSQE_ASYNC): with `start` after each request, inline
            // issue puts each read on the device at once; io-wq added a
            // thread switch and issued a whole batch only after it.
            opcode::Read::new(types::Fd(fd), ptr, len as u32)
                .offset(*off + done as u64)
                .build()
        }
        IoOp::Write { off, buf } => {
            let len = (buf.len() - done).min(MAX_SQE_BYTES);
            let ptr = buf.as_ptr().wrapping_add(done);
            opcode::Write::new(types::Fd(fd), ptr, len as u32)
                .offset(*off + done as u64)
                .build()
        }
        IoOp::Flush => opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        IoOp::Zeroes { off, len, .. } if writing_zeros => {
            let n = (*len as usize - done).min(ZEROS_BYTES);
            // The kernel only reads ZEROS, which lives for the whole process.
            opcode::Write::new(types::Fd(fd), zeros().as_ptr(), n as u32)
                .offset(*off + done as u64)
                .build()
        }
        IoOp::Zeroes { off, len, unmap } => {
            // A punched hole reads zeros (a block device may unmap it);
            // ZERO_RANGE keeps the blocks. Neither changes the size.
            let mode = libc::FALLOC_FL_KEEP_SIZE
                | if *unmap {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
            opcode::Fallocate::new(types::Fd(fd), *len)
                .offset(*off)
                .mode(mode)
                .build()
        }
    };
    Some(entry.user_data(idx as u64))
}

#[cfg(test)]
impl Uring {
    /// Submit one NOP, an operation pcache never uses; its result.
    pub(super) fn nop_result(&mut self) -> i32 {
        let e = opcode::Nop::new().build().user_data(u64::MAX);
        // SAFETY: a NOP carries no buffer.
        unsafe { self.ring.submission().push(&e) }.expect("a free entry");
        self.ring.submit_and_wait(1).expect("submit");
        self.ring
            .completion()
            .next()
            .expect("a completion")
            .result()
    }
}
