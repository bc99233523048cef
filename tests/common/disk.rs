//! Driving the disk layer directly, as the vhost layer does: a fresh cache
//! file, a backing store of the test's choosing, and a synchronous driver
//! around a [`DiskQueue`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcache::backing::Backing;
use pcache::disk::{Disk, DiskConfig, DiskQueue, Done, Op, Request, Status, DEFAULT_IO_MEMORY};
use pcache::engine::{CacheMode, Engine, FormatOptions, OpenOptions, WritebackPolicy};
use pcache::iovec::IoVec;
use pcache::pmem::{Region, RegionOptions};

/// A formatted cache of `cache_bytes` at `path`, opened, in front of a
/// store of `backing_bytes`.
pub fn engine(path: &Path, cache_bytes: u64, backing_bytes: u64) -> Arc<Engine> {
    std::fs::File::create(path)
        .unwrap()
        .set_len(cache_bytes)
        .unwrap();
    let region = Region::open(path, RegionOptions::default()).unwrap();
    Engine::format(
        &region,
        &FormatOptions {
            backing_bytes,
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
    drop(region);
    let region = Arc::new(Region::open(path, RegionOptions::default()).unwrap());
    Engine::open(region, &OpenOptions::default()).unwrap()
}

/// A disk over a fresh 512 MiB cache in `dir` and `backing`, in `mode`,
/// with `io_memory` bytes of I/O memory and writeback as soon as anything
/// is dirty.
pub fn disk(dir: &Path, backing: Arc<dyn Backing>, mode: CacheMode, io_memory: u64) -> Arc<Disk> {
    let e = engine(&dir.join("cache.img"), 512 << 20, backing.size());
    if mode != CacheMode::Writeback {
        e.set_mode(mode, Duration::from_secs(10)).unwrap();
    }
    let cfg = DiskConfig {
        sequential_cutoff: 0,
        read_only: false,
        io_memory,
    };
    Arc::new(Disk::new(e, backing, true, cfg, WritebackPolicy::IMMEDIATE).unwrap())
}

/// [`disk`] with the default I/O memory.
pub fn default_disk(dir: &Path, backing: Arc<dyn Backing>, mode: CacheMode) -> Arc<Disk> {
    disk(dir, backing, mode, DEFAULT_IO_MEMORY)
}

/// A queue and the answers it gave.
pub struct Driver {
    pub dq: DiskQueue,
    answers: HashMap<u64, Status>,
    next: u64,
}

impl Driver {
    pub fn new(disk: &Disk) -> Driver {
        Driver {
            dq: disk.queue().unwrap(),
            answers: HashMap::new(),
            next: 1,
        }
    }

    /// Submit; returns the tag (the answer may be in already).
    pub fn submit(&mut self, op: Op, off: u64, len: u64, buf: IoVec<'static>) -> u64 {
        let tag = self.next;
        self.next += 1;
        let r = Request {
            op,
            off,
            len,
            buf,
            tag,
        };
        if let Some(s) = self.dq.submit(r) {
            self.answers.insert(tag, s);
        }
        tag
    }

    /// Handle what the queue has (waiting at most `wait` for it).
    pub fn poll(&mut self, wait: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.dq.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one pollfd we own.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, wait.as_millis() as i32) };
        let mut out: Vec<Done> = Vec::new();
        self.dq.process(&mut out);
        for d in out {
            self.answers.insert(d.tag, d.status);
        }
        while self.dq.has_background_work() {
            self.dq.background_step();
        }
    }

    /// The answer to `tag`, if it came.
    pub fn answer(&mut self, tag: u64) -> Option<Status> {
        self.answers.remove(&tag)
    }

    /// Wait for `tag`'s answer (panics after `limit`).
    pub fn wait(&mut self, tag: u64, limit: Duration) -> Status {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.answers.remove(&tag) {
                return s;
            }
            assert!(
                t0.elapsed() < limit,
                "request {tag} unanswered after {limit:?}"
            );
            self.poll(Duration::from_millis(20));
        }
    }

    /// Submit and wait.
    pub fn run(&mut self, op: Op, off: u64, len: u64, buf: IoVec<'static>) -> Status {
        let tag = self.submit(op, off, len, buf);
        self.wait(tag, Duration::from_secs(60))
    }

    /// Write `data` at `off` and wait.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Status {
        self.run(
            Op::Write,
            off,
            data.len() as u64,
            IoVec::owned(data.to_vec()),
        )
    }

    /// Read `len` bytes at `off` and wait.
    pub fn read(&mut self, off: u64, len: usize) -> (Status, Vec<u8>) {
        let buf = IoVec::owned(vec![0; len]);
        let view = buf.slice(0, len);
        let s = self.run(Op::Read, off, len as u64, buf);
        let mut out = vec![0; len];
        view.copy_out(0, &mut out);
        (s, out)
    }

    /// Flush and wait.
    pub fn flush(&mut self) -> Status {
        self.run(Op::Flush, 0, 0, IoVec::empty())
    }
}

impl AsRawFd for Driver {
    fn as_raw_fd(&self) -> i32 {
        self.dq.fd()
    }
}
