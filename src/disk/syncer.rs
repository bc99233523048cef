//! The thread that makes a cache kept in a file on a real file system
//! durable (`pcache-sync`), so that no queue thread ever waits for it.
//!
//! On DAX a persist is a fence and on tmpfs an msync has nothing to write:
//! the queues do those themselves. On a file system over a disk, an msync
//! waits for the disk, so a guest's FLUSH (and, with its write cache off,
//! each write's commit) is handed here, and the answer comes back to the
//! queue's mailbox with a wake-up. Requests that arrive while one persist
//! runs are served together by the next: one msync for many flushes.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::engine::{Engine, Error as EngineError};

/// What to make durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOp {
    /// Every completed write (a guest FLUSH).
    Flush,
    /// The write of `off..off+len` (write-through as the guest sees it).
    Commit {
        /// Byte offset.
        off: u64,
        /// Bytes.
        len: u64,
    },
}

/// How a persist ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// Durable.
    Ok,
    /// The key log needs space first: ask again once the space epoch
    /// has moved past this one.
    Retry(u64),
    /// Failed (logged).
    Failed,
}

impl Synced {
    /// The outcome of an engine persist tried at space epoch `epoch`.
    pub fn of(r: Result<(), EngineError>, epoch: u64, what: &str) -> Synced {
        match r {
            Ok(()) => Synced::Ok,
            Err(e) if e.retry_from().is_some() => Synced::Retry(epoch),
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed");
                Synced::Failed
            }
        }
    }
}

/// Where a queue collects its answers.
#[derive(Debug)]
pub struct Mailbox {
    answers: Mutex<Vec<(u64, Synced)>>,
    wake: Arc<EventFd>,
}

impl Mailbox {
    /// A mailbox that signals `wake` when an answer arrives.
    pub fn new(wake: Arc<EventFd>) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            answers: Mutex::new(Vec::new()),
            wake,
        })
    }

    /// Take the answers that arrived, as (ticket, outcome).
    pub fn take(&self, out: &mut Vec<(u64, Synced)>) {
        out.append(&mut self.answers.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn post(&self, ticket: u64, s: Synced) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((ticket, s));
        let _ = self.wake.write(1);
    }
}

struct Ask {
    op: SyncOp,
    ticket: u64,
    to: Arc<Mailbox>,
}

/// The persisting thread of one disk; it ends when dropped.
pub struct Syncer {
    tx: Mutex<Option<Sender<Ask>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Syncer")
    }
}

impl Syncer {
    /// Start the thread for `engine`.
    pub fn start(engine: Arc<Engine>) -> std::io::Result<Syncer> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("pcache-sync".into())
            .spawn(move || run(&engine, &rx))?;
        Ok(Syncer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Ask for `op`; the answer goes to `to` with `ticket`.
    pub fn ask(&self, op: SyncOp, ticket: u64, to: &Arc<Mailbox>) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let sent = tx.as_ref().is_some_and(|tx| {
            tx.send(Ask {
                op,
                ticket,
                to: to.clone(),
            })
            .is_ok()
        });
        if !sent {
            to.post(ticket, Synced::Failed);
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn run(engine: &Engine, rx: &Receiver<Ask>) {
    while let Ok(first) = rx.recv() {
        crate::sandbox::narrow(crate::sandbox::Kind::Background);
        let mut asks = vec![first];
        asks.extend(rx.try_iter());
        if asks.iter().any(|a| a.op == SyncOp::Flush) {
            // One flush covers every ask that came before it started.
            let epoch = engine.space_epoch();
            let s = Synced::of(engine.flush(), epoch, "flush");
            for a in asks {
                a.to.post(a.ticket, s);
            }
            continue;
        }
        for a in asks {
            let SyncOp::Commit { off, len } = a.op else {
                continue;
            };
            let epoch = engine.space_epoch();
            let s = Synced::of(engine.commit(off, len), epoch, "commit");
            a.to.post(a.ticket, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mailbox_collects_answers_and_signals() {
        let wake = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let m = Mailbox::new(wake.clone());
        m.post(7, Synced::Ok);
        m.post(8, Synced::Retry(3));
        let mut out = Vec::new();
        m.take(&mut out);
        assert_eq!(out, [(7, Synced::Ok), (8, Synced::Retry(3))]);
        assert_eq!(wake.read().unwrap(), 2);
    }
}
