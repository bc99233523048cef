//! One thread per queue: an epoll loop over the queue's kick eventfd, its
//! disk queue (backing completions, freed space and memory, pacing), a
//! wake-up and an exit event.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost_user_backend::VringT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::Device;

/// Epoll data of each event a worker watches.
const KICK: u64 = 0;
const DISK: u64 = 1;
const WAKE: u64 = 3;
const EXIT: u64 = 4;

/// A queue's worker thread. Dropping it stops and joins the thread.
pub struct Worker {
    epoll: Arc<Epoll>,
    wake: Arc<EventFd>,
    exit: EventFd,
    /// The kick fd registered now, if any.
    kick: Option<RawFd>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start the worker of queue `q` of `dev`.
    pub fn start(dev: Arc<Device>, q: usize) -> io::Result<Worker> {
        let epoll = Arc::new(Epoll::new()?);
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let exit = EventFd::new(EFD_NONBLOCK)?;
        for (fd, data) in [
            (dev.worker_fd(q), DISK),
            (wake.as_raw_fd(), WAKE),
            (exit.as_raw_fd(), EXIT),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )?;
        }
        let (e, w) = (epoll.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name(format!("pcache-q{q}"))
            .spawn(move || run(&dev, q, &e, &w))?;
        Ok(Worker {
            epoll,
            wake,
            exit,
            kick: None,
            thread: Some(thread),
        })
    }

    /// Watch `fd` as the queue's kick (None: watch no kick).
    pub fn set_kick(&mut self, fd: Option<RawFd>) {
        if self.kick == fd {
            return;
        }
        if let Some(old) = self.kick.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, old, EpollEvent::default());
        }
        if let Some(fd) = fd {
            match self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, KICK),
            ) {
                Ok(()) => self.kick = Some(fd),
                Err(e) => tracing::error!(error = %e, "cannot watch a queue's kick"),
            }
        }
    }

    /// Make the worker look at its ring now.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(dev: &Device, q: usize, epoll: &Epoll, wake: &EventFd) {
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        crate::sandbox::narrow(crate::sandbox::Kind::Queue);
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(queue = q, error = %e, "queue worker cannot wait for events");
                return;
            }
        };
        for ev in &events[..n] {
            let r = match ev.data() {
                EXIT => return,
                KICK => {
                    let ring = dev.queues[q].lock().expect("queue lock").ring.clone();
                    match ring.map(|r| r.vring.read_kick()) {
                        Some(Ok(true)) => dev.on_kick(q),
                        _ => Ok(()),
                    }
                }
                WAKE => {
                    let _ = wake.read();
                    dev.on_kick(q)
                }
                DISK => dev.on_disk(q),
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(queue = q, error = %e, "queue worker");
            }
        }
        // Requests keep failing until the session ends and stops us.
        dev.conn.end_if_faulted();
    }
}
