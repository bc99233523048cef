//! The RBD engine of [`super::BackingQueue`]: librbd's asynchronous calls.
//!
//! Each operation is boxed with its buffer and handed to `rbd_aio_*`; the
//! completion callback runs on a librbd thread, files the result under the
//! shared lock and signals the queue's eventfd, so the worker collects it
//! in `poll` like an io_uring completion.
//!
//! A read the cluster does not answer within the read timeout (an OSD down,
//! the network gone) completes with `TimedOut` so the guest gets an error
//! instead of a hung queue; librbd keeps the original buffer until its own
//! completion arrives, and that late result is dropped. Writes and flushes
//! have no such limit: writeback waits for the cluster to return.

#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::op::*;
use crate::backing::aligned::AlignedBuf;
use crate::backing::librbd::{rbd_completion_t, RbdHandle};

/// How often the watchdog looks at the reads in flight.
const WATCHDOG_TICK: Duration = Duration::from_millis(250);

/// How long dropping the queue waits for operations still in librbd before
/// it leaves them behind (they own their buffers, so that is safe).
const DROP_WAIT: Duration = Duration::from_secs(10);

/// An operation in librbd's hands.
struct Op {
    shared: Arc<Shared>,
    id: u64,
    user_data: u64,
    op: IoOp,
}

/// A read in librbd's hands, as the watchdog sees it.
struct PendingRead {
    deadline: Instant,
    user_data: u64,
    off: u64,
    len: usize,
}

/// What the callbacks, the watchdog and the worker share.
struct State {
    /// Results waiting for `poll`.
    done: Vec<Completion>,
    /// Reads in flight by id.
    reads: HashMap<u64, PendingRead>,
    /// Reads already failed by the watchdog, whose librbd completion is
    /// still to come.
    expired: HashSet<u64>,
    /// Operations librbd has not called back for yet.
    in_librbd: usize,
    /// Set when the queue is dropped: the watchdog exits.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when `in_librbd` drops to 0 or `stop` is set.
    idle: Condvar,
    notifier: Option<Arc<OwnedFd>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for a callback or the watchdog, at most one tick.
    fn wait_tick<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.idle
            .wait_timeout(st, WATCHDOG_TICK)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    fn signal(&self) {
        if let Some(fd) = &self.notifier {
            signal_eventfd(fd.as_raw_fd());
        }
    }
}

/// The RBD engine.
pub(super) struct Rbd {
    handle: RbdHandle,
    shared: Arc<Shared>,
    next_id: u64,
    watchdog: Option<JoinHandle<()>>,
    /// Submitted and not yet returned by `poll`.
    pub(super) outstanding: usize,
}

impl Rbd {
    /// An engine on `handle`, signalling `notifier` on completion.
    pub(super) fn new(handle: RbdHandle, notifier: Option<Arc<OwnedFd>>) -> Rbd {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                done: Vec::new(),
                reads: HashMap::new(),
                expired: HashSet::new(),
                in_librbd: 0,
                stop: false,
            }),
            idle: Condvar::new(),
            notifier,
        });
        let watchdog = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("pcache-rbd-wd".into())
                .spawn(move || watchdog(&shared))
                .map_err(|e| {
                    tracing::error!(
                        "cannot start the RBD read watchdog ({e}); reads wait for the cluster"
                    )
                })
                .ok()
        };
        Rbd {
            handle,
            shared,
            next_id: 0,
            watchdog,
            outstanding: 0,
        }
    }

    /// Hand a validated operation to librbd.
    pub(super) fn submit(&mut self, user_data: u64, op: IoOp) {
        self.outstanding += 1;
        self.next_id += 1;
        let id = self.next_id;
        let api = self.handle.api;
        let mut c: rbd_completion_t = std::ptr::null_mut();
        let boxed = Box::into_raw(Box::new(Op {
            shared: self.shared.clone(),
            id,
            user_data,
            op,
        }));
        // SAFETY: `boxed` stays valid until the callback (or the failure
        // path below) takes it back; `c` is a valid out-pointer.
        let r = unsafe { (api.rbd_aio_create_completion)(boxed.cast(), on_complete, &mut c) };
        if r < 0 {
            // SAFETY: librbd did not keep `boxed`.
            let op = unsafe { Box::from_raw(boxed) };
            self.fail_now(*op, r);
            return;
        }
        {
            let mut st = self.shared.lock();
            st.in_librbd += 1;
            // SAFETY: nothing else touches the op before librbd has it.
            if let IoOp::Read { off, buf } = unsafe { &(*boxed).op } {
                let deadline = Instant::now() + self.handle.read_timeout;
                let (off, len) = (*off, buf.len());
                st.reads.insert(
                    id,
                    PendingRead {
                        deadline,
                        user_data,
                        off,
                        len,
                    },
                );
            }
        }
        let image = self.handle.image;
        // SAFETY: the op's buffer lives in the box, which the callback frees
        // only after librbd is done with it; the image is open while the
        // BackingQueue (which holds its store) lives.
        let r = unsafe {
            match &mut (*boxed).op {
                IoOp::Read { off, buf } => {
                    (api.rbd_aio_read)(image, *off, buf.len(), buf.as_mut_ptr().cast(), c)
                }
                IoOp::Write { off, buf } => {
                    (api.rbd_aio_write)(image, *off, buf.len(), buf.as_ptr().cast(), c)
                }
                IoOp::Flush => (api.rbd_aio_flush)(image, c),
                // Whatever `unmap` says, as the synchronous write_zeroes
                // (a partial discard may leave old data readable).
                IoOp::Zeroes { off, len, .. } => match usize::try_from(*len) {
                    Ok(n) => (api.rbd_aio_write_zeroes)(image, *off, n, c, 0, 0),
                    Err(_) => -libc::EINVAL,
                },
            }
        };
        if r < 0 {
            // Refused before it started: no callback will come.
            // SAFETY: librbd did not take the completion or the op.
            unsafe { (api.rbd_aio_release)(c) };
            // SAFETY: as above.
            let op = unsafe { Box::from_raw(boxed) };
            {
                let mut st = self.shared.lock();
                st.in_librbd -= 1;
                st.reads.remove(&id);
            }
            self.fail_now(*op, r);
        }
    }

    fn fail_now(&mut self, op: Op, r: i32) {
        let Op { user_data, op, .. } = op;
        let e = io::Error::from_raw_os_error(-r);
        let result = Err(io::Error::new(e.kind(), format!("rbd {}: {e}", op.name())));
        self.shared.lock().done.push(Completion {
            user_data,
            op,
            result,
        });
        self.shared.signal();
    }

    /// Append every finished operation.
    pub(super) fn try_reap(&mut self, out: &mut Vec<Completion>) {
        let mut st = self.shared.lock();
        self.outstanding -= st.done.len();
        out.append(&mut st.done);
    }

    /// Wait until something finishes (or a watchdog tick passes).
    pub(super) fn block(&mut self, out: &mut Vec<Completion>) {
        let mut st = self.shared.lock();
        while st.done.is_empty() {
            st = self.shared.wait_tick(st);
        }
        self.outstanding -= st.done.len();
        out.append(&mut st.done);
    }

    /// Wait (boundedly) for librbd to call back for everything, then stop
    /// the watchdog.
    pub(super) fn shutdown(&mut self) {
        let deadline = Instant::now() + DROP_WAIT;
        let mut st = self.shared.lock();
        while st.in_librbd > 0 && Instant::now() < deadline {
            st = self.shared.wait_tick(st);
        }
        if st.in_librbd > 0 {
            tracing::warn!(
                operations = st.in_librbd,
                "RBD operations still unanswered at shutdown; leaving them to librbd"
            );
        }
        st.stop = true;
        drop(st);
        self.shared.idle.notify_all();
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
    }
}

/// librbd's completion callback.
unsafe extern "C" fn on_complete(c: rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Op> leaked at submit; librbd calls back once.
    let op = unsafe { Box::from_raw(arg.cast::<Op>()) };
    let api = match crate::backing::librbd::api() {
        Ok(api) => api,
        // Loaded before any submit, so this cannot fail.
        Err(_) => return,
    };
    // SAFETY: `c` is the live completion this callback is for.
    let r = unsafe { (api.rbd_aio_get_return_value)(c) };
    // SAFETY: released once, after its value was read.
    unsafe { (api.rbd_aio_release)(c) };
    let Op {
        shared,
        id,
        user_data,
        op,
    } = *op;
    let result = if r < 0 {
        let e = io::Error::from_raw_os_error(i32::try_from(-r).unwrap_or(libc::EIO));
        Err(io::Error::new(e.kind(), format!("rbd {}: {e}", op.name())))
    } else {
        match &op {
            IoOp::Read { buf, .. } if r as usize != buf.len() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("rbd read of {} bytes returned {r}", buf.len()),
            )),
            _ => Ok(()),
        }
    };
    let mut st = shared.lock();
    st.in_librbd -= 1;
    st.reads.remove(&id);
    // A read the watchdog already failed: its result is no longer wanted.
    let late = st.expired.remove(&id);
    if !late {
        st.done.push(Completion {
            user_data,
            op,
            result,
        });
    }
    drop(st);
    if !late {
        shared.signal();
    }
    shared.idle.notify_all();
}

/// Fail reads past their deadline, until the queue stops.
fn watchdog(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        let late: Vec<u64> = st
            .reads
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if !late.is_empty() {
            for id in late {
                let Some(PendingRead {
                    user_data,
                    off,
                    len,
                    ..
                }) = st.reads.remove(&id)
                else {
                    continue;
                };
                st.expired.insert(id);
                tracing::warn!(
                    len,
                    "an RBD read got no answer within the read timeout; failing it"
                );
                // The original buffer stays with librbd; the worker gets an
                // empty one of the same size back with the error.
                st.done.push(Completion {
                    user_data,
                    op: IoOp::Read {
                        off,
                        buf: AlignedBuf::new(len),
                    },
                    result: Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the Ceph cluster did not answer the read in time",
                    )),
                });
            }
            shared.signal();
            shared.idle.notify_all();
        }
        st = shared.wait_tick(st);
    }
}
