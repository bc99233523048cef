//! The thread-pool engine of [`super::BackingQueue`]: threads calling the
//! [`Backing`] methods, for test doubles and for kernels (or seccomp
//! profiles) without io_uring.

use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::op::*;
use crate::backing::store::Backing;

/// A queued job.
struct Job {
    /// The caller's tag.
    user_data: u64,
    /// The operation.
    op: IoOp,
}

/// Jobs waiting for a thread, and whether the pool is shutting down.
struct Jobs {
    /// Not yet started, in order.
    queue: VecDeque<Job>,
    /// Set by `shutdown`: threads exit once the queue is empty.
    stop: bool,
}

/// State shared with the pool threads.
struct Shared {
    /// The job queue.
    jobs: Mutex<Jobs>,
    /// Signalled when a job is queued or the pool stops.
    wake: Condvar,
}

impl Shared {
    /// The job queue, even if a thread panicked while holding it (the
    /// queue itself is always consistent).
    pub(super) fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread-pool engine.
pub(super) struct Pool {
    /// Queue shared with the threads.
    shared: Arc<Shared>,
    /// The threads, joined on shutdown.
    threads: Vec<JoinHandle<()>>,
    /// Completions from the threads.
    rx: mpsc::Receiver<Completion>,
    /// Jobs submitted and not yet received back.
    pub(super) outstanding: usize,
    /// Jobs failed at submit because no thread could be started.
    failed: VecDeque<Completion>,
}

impl Pool {
    /// Start the threads.
    pub(super) fn new(backing: Arc<dyn Backing>, notifier: Option<Arc<OwnedFd>>) -> Pool {
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::new(),
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(POOL_THREADS);
        for i in 0..POOL_THREADS {
            let shared = shared.clone();
            let backing = backing.clone();
            let tx = tx.clone();
            let notifier = notifier.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pcache-bio-{i}"))
                .spawn(move || pool_thread(&shared, &*backing, &tx, notifier.as_deref()));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => tracing::error!("cannot start backing I/O thread {i}: {e}"),
            }
        }
        Pool {
            shared,
            threads,
            rx,
            outstanding: 0,
            failed: VecDeque::new(),
        }
    }

    /// Queue a validated operation for a thread (or fail it at once if no
    /// thread could be started).
    pub(super) fn submit(&mut self, user_data: u64, op: IoOp) {
        self.outstanding += 1;
        if self.threads.is_empty() {
            self.failed.push_back(Completion {
                user_data,
                op,
                result: Err(io::Error::other("no backing I/O thread could be started")),
            });
            return;
        }
        self.shared.lock().queue.push_back(Job { user_data, op });
        self.shared.wake.notify_one();
    }

    /// Append every completion already sent back.
    pub(super) fn try_reap(&mut self, out: &mut Vec<Completion>) {
        self.outstanding -= self.failed.len();
        out.extend(self.failed.drain(..));
        while let Ok(c) = self.rx.try_recv() {
            self.outstanding -= 1;
            out.push(c);
        }
    }

    /// Wait for one completion.
    pub(super) fn block(&mut self, out: &mut Vec<Completion>) {
        match self.rx.recv() {
            Ok(c) => {
                self.outstanding -= 1;
                out.push(c);
            }
            Err(_) => {
                // Every thread is gone (a store panicked): their jobs will
                // never complete. Stop counting them so `wait` returns.
                tracing::error!(
                    "backing I/O threads are gone; {} operations are lost",
                    self.outstanding
                );
                self.outstanding = 0;
            }
        }
    }

    /// Let the threads finish every queued job, then stop and join them.
    pub(super) fn shutdown(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Body of a pool thread: run jobs until told to stop and the queue is
/// empty.
fn pool_thread(
    shared: &Shared,
    backing: &dyn Backing,
    tx: &mpsc::Sender<Completion>,
    notifier: Option<&OwnedFd>,
) {
    loop {
        crate::sandbox::narrow(crate::sandbox::Kind::Background);
        let job = {
            let mut jobs = shared.lock();
            loop {
                if let Some(job) = jobs.queue.pop_front() {
                    break Some(job);
                }
                if jobs.stop {
                    break None;
                }
                jobs = shared.wake.wait(jobs).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(Job { user_data, mut op }) = job else {
            return;
        };
        let result = match &mut op {
            IoOp::Read { off, buf } => backing.read_at(buf, *off),
            IoOp::Write { off, buf } => backing.write_at(buf, *off),
            IoOp::Flush => backing.flush(),
            IoOp::Zeroes { off, len, unmap } => backing.write_zeroes(*off, *len, *unmap),
        };
        if tx
            .send(Completion {
                user_data,
                op,
                result,
            })
            .is_err()
        {
            // Cannot happen: the receiver outlives the threads (the queue
            // joins them before its fields are dropped). Keep draining jobs.
            continue;
        }
        if let Some(fd) = notifier {
            signal_eventfd(fd.as_raw_fd());
        }
    }
}
