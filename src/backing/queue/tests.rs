//! Tests of the backing queue, on both engines.
use super::super::FileBacking;
use super::*;
use crate::backing::aligned::AlignedBuf;
use crate::backing::store::Backing;
use crate::testing::{FaultKind, FaultOp, FaultPlan, FaultyBacking, MemBacking};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Hides the descriptor of a store, forcing the thread pool.
struct NoUring<B>(B);

impl<B: Backing> Backing for NoUring<B> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// A scratch dir on the disk file system (O_DIRECT works there).
fn disk_dir() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&base).expect("target dir");
    tempfile::tempdir_in(base).expect("tempdir")
}

fn disk_file(dir: &Path, len: u64) -> PathBuf {
    let path = dir.join("disk");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(len))
        .expect("create");
    path
}

/// Whether this process may use io_uring at all.
fn kernel_has_uring() -> bool {
    io_uring::IoUring::new(2).is_ok()
}

/// The queue engine expected for a store with a descriptor.
fn expected_file_engine() -> QueueEngine {
    if kernel_has_uring() {
        QueueEngine::Uring
    } else {
        QueueEngine::ThreadPool
    }
}

fn wait_for_all(q: &mut BackingQueue) -> Vec<Completion> {
    let mut out = Vec::new();
    while q.in_flight() > 0 {
        q.wait(1, &mut out);
    }
    out
}

/// 256 random writes (non-overlapping, so order does not matter), a
/// flush, then reads of every written range; checks the data.
fn random_writes_then_reads(q: &mut BackingQueue, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let slots = size / 65536;
    let mut chosen: Vec<u64> = (0..slots).collect();
    // Shuffle, take 256 distinct 64 KiB slots, random length inside.
    for i in (1..chosen.len()).rev() {
        chosen.swap(i, rng.gen_range(0..=i));
    }
    let mut written: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    for (tag, &slot) in chosen.iter().take(256).enumerate() {
        let sectors = rng.gen_range(1..=128u64);
        let off = slot * 65536;
        let mut buf = AlignedBuf::new((sectors * 512) as usize);
        rng.fill(&mut buf[..]);
        written.insert(tag as u64, (off, buf.to_vec()));
        q.submit(tag as u64, IoOp::Write { off, buf });
    }
    assert_eq!(q.in_flight(), 256);
    let done = wait_for_all(q);
    assert_eq!(done.len(), 256);
    for c in &done {
        c.result.as_ref().expect("write ok");
        assert!(matches!(c.op, IoOp::Write { .. }));
    }
    q.submit(9999, IoOp::Flush);
    let flushed = wait_for_all(q);
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0].user_data, 9999);
    flushed[0].result.as_ref().expect("flush ok");

    for (&tag, (off, data)) in &written {
        q.submit(
            tag,
            IoOp::Read {
                off: *off,
                buf: AlignedBuf::new(data.len()),
            },
        );
    }
    let reads = wait_for_all(q);
    assert_eq!(reads.len(), 256);
    for c in reads {
        c.result.as_ref().expect("read ok");
        let (off, data) = &written[&c.user_data];
        match c.op {
            IoOp::Read { off: got, buf } => {
                assert_eq!(got, *off);
                assert!(buf[..] == data[..], "data of tag {}", c.user_data);
            }
            other => panic!("expected a read back, got {other:?}"),
        }
    }
}

#[test]
fn file_backing_queue_uses_io_uring_when_the_kernel_allows() {
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    let b = Arc::new(FileBacking::open(&path, false).expect("open"));
    assert!(b.is_direct());
    let q = BackingQueue::new(b, 32);
    assert_eq!(q.engine(), expected_file_engine());
    eprintln!("engine for FileBacking on this machine: {:?}", q.engine());
}

#[test]
fn uring_random_writes_then_reads_return_the_data_o_direct() {
    let dir = disk_dir();
    let size = 64 << 20;
    let path = disk_file(dir.path(), size);
    let b = Arc::new(FileBacking::open(&path, false).expect("open"));
    assert!(b.is_direct());
    // Depth 16 < 256 submissions: exercises the internal queueing.
    let mut q = BackingQueue::new(b, 16);
    assert_eq!(q.engine(), expected_file_engine());
    random_writes_then_reads(&mut q, size, 1);
}

#[test]
fn uring_random_writes_then_reads_return_the_data_buffered() {
    let dir = disk_dir();
    let size = 64 << 20;
    let path = disk_file(dir.path(), size);
    let b = Arc::new(FileBacking::open_with(&path, false, false).expect("open"));
    assert!(!b.is_direct());
    let mut q = BackingQueue::new(b, 64);
    assert_eq!(q.engine(), expected_file_engine());
    random_writes_then_reads(&mut q, size, 2);
}

#[test]
fn thread_pool_random_writes_then_reads_return_the_data() {
    let dir = disk_dir();
    let size = 64 << 20;
    let path = disk_file(dir.path(), size);
    let b = FileBacking::open(&path, false).expect("open");
    let mut q = BackingQueue::new(Arc::new(NoUring(b)), 16);
    assert_eq!(q.engine(), QueueEngine::ThreadPool);
    random_writes_then_reads(&mut q, size, 3);
}

#[test]
fn thread_pool_on_mem_backing_flush_makes_writes_durable() {
    let mem = Arc::new(MemBacking::new(32 << 20));
    let mut q = BackingQueue::new(mem.clone(), 8);
    assert_eq!(q.engine(), QueueEngine::ThreadPool);
    random_writes_then_reads(&mut q, 32 << 20, 4);
    mem.crash();
    assert!(mem.image() == mem.durable_image());
    assert_eq!(mem.flushes(), 1);
    assert_eq!(mem.writes(), 256);
}

#[test]
fn uring_data_is_visible_to_plain_reads_of_the_file() {
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    let b = Arc::new(FileBacking::open(&path, false).expect("open"));
    let mut q = BackingQueue::new(b.clone(), 8);
    let buf = AlignedBuf::from_slice(&[0xabu8; 8192]);
    q.submit(1, IoOp::Write { off: 4096, buf });
    q.submit(2, IoOp::Flush);
    let done = wait_for_all(&mut q);
    assert!(done.iter().all(|c| c.result.is_ok()));
    let contents = std::fs::read(&path).expect("read file");
    assert!(contents[4096..12288].iter().all(|&x| x == 0xab));
    assert!(contents[..4096].iter().all(|&x| x == 0));
}

#[test]
fn invalid_requests_complete_with_invalid_input_on_both_engines() {
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    let file = || FileBacking::open(&path, false).expect("open");
    let queues = [
        BackingQueue::new(Arc::new(file()), 8),
        BackingQueue::new(Arc::new(NoUring(file())), 8),
    ];
    for mut q in queues {
        let size = 1u64 << 20;
        q.submit(
            1,
            IoOp::Read {
                off: size,
                buf: AlignedBuf::new(512),
            },
        );
        q.submit(
            2,
            IoOp::Write {
                off: 100,
                buf: AlignedBuf::new(512),
            },
        );
        q.submit(
            3,
            IoOp::Write {
                off: 0,
                buf: AlignedBuf::new(100),
            },
        );
        q.submit(
            4,
            IoOp::Read {
                off: u64::MAX - 511,
                buf: AlignedBuf::new(1024),
            },
        );
        q.submit(
            5,
            IoOp::Read {
                off: 0,
                buf: AlignedBuf::new(0),
            },
        );
        let mut out = wait_for_all(&mut q);
        out.sort_by_key(|c| c.user_data);
        assert_eq!(out.len(), 5);
        for c in &out[..4] {
            let e = c.result.as_ref().expect_err("invalid");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{:?}", q.engine());
        }
        out[4].result.as_ref().expect("empty read is fine");
    }
}

#[test]
fn faulty_backing_errors_surface_as_err_completions() {
    let faulty = Arc::new(FaultyBacking::new(MemBacking::new(1 << 20), 5));
    faulty.add(FaultPlan::new(FaultOp::Write, FaultKind::Eio).every_nth(2));
    faulty.add(FaultPlan::new(FaultOp::Flush, FaultKind::Enospc));
    faulty.add(FaultPlan::new(FaultOp::Read, FaultKind::Short));
    let mut q = BackingQueue::new(faulty.clone(), 4);
    assert_eq!(q.engine(), QueueEngine::ThreadPool);
    // Submit one at a time so "every 2nd" is well defined.
    let mut results = Vec::new();
    for i in 0..6u64 {
        q.submit(
            i,
            IoOp::Write {
                off: i * 4096,
                buf: AlignedBuf::new(4096),
            },
        );
        results.extend(wait_for_all(&mut q));
    }
    let failed: Vec<bool> = results.iter().map(|c| c.result.is_err()).collect();
    assert_eq!(failed, [false, true, false, true, false, true]);
    for c in results.iter().filter(|c| c.result.is_err()) {
        let e = c.result.as_ref().expect_err("err");
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }
    q.submit(10, IoOp::Flush);
    let flush = wait_for_all(&mut q);
    let e = flush[0].result.as_ref().expect_err("flush fails");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    q.submit(
        11,
        IoOp::Read {
            off: 0,
            buf: AlignedBuf::new(4096),
        },
    );
    let read = wait_for_all(&mut q);
    let e = read[0].result.as_ref().expect_err("short read");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(faulty.injected(), 5);
}

#[test]
fn uring_errors_from_the_kernel_surface_as_err_completions() {
    // A read-only descriptor: the kernel fails writes with EBADF.
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    let b = Arc::new(FileBacking::open(&path, true).expect("open"));
    let mut q = BackingQueue::new(b, 8);
    q.submit(
        1,
        IoOp::Write {
            off: 0,
            buf: AlignedBuf::new(4096),
        },
    );
    let out = wait_for_all(&mut q);
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_err(), "{:?}", q.engine());
}

#[test]
fn uring_read_of_a_truncated_file_is_an_error_not_a_short_success() {
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    for direct in [true, false] {
        let b = Arc::new(FileBacking::open_with(&path, false, direct).expect("open"));
        let mut q = BackingQueue::new(b, 8);
        // Shrink the file behind the store's back: reads past the new
        // end get a short transfer, then end of file.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(8192))
            .expect("truncate");
        q.submit(
            1,
            IoOp::Read {
                off: 4096,
                buf: AlignedBuf::new(16384),
            },
        );
        let out = wait_for_all(&mut q);
        let e = out[0].result.as_ref().expect_err("short read is an error");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("restore");
    }
}

/// poll(2) on the notifier with a timeout; true if readable.
fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

fn notifier_becomes_readable(mut q: BackingQueue) {
    let fd = q.notifier();
    assert!(fd >= 0);
    assert!(!readable(fd, 0), "idle queue is not readable");
    q.submit(
        7,
        IoOp::Write {
            off: 0,
            buf: AlignedBuf::new(4096),
        },
    );
    // Hand it to the engine (uring submits only in poll/wait).
    let mut out = Vec::new();
    q.poll(&mut out);
    if out.is_empty() {
        assert!(readable(fd, 5000), "{:?}: notifier never fired", q.engine());
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.is_empty() && Instant::now() < deadline {
            q.poll(&mut out);
        }
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].user_data, 7);
    // poll reset it.
    assert!(
        !readable(fd, 0),
        "{:?}: notifier still readable",
        q.engine()
    );
    // Invalid requests also wake the worker.
    q.submit(
        8,
        IoOp::Write {
            off: 1,
            buf: AlignedBuf::new(512),
        },
    );
    assert!(readable(fd, 0));
    out.clear();
    q.poll(&mut out);
    assert_eq!(out.len(), 1);
    assert!(!readable(fd, 0));
}

#[test]
fn notifier_becomes_readable_when_a_completion_is_ready_uring() {
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    let b = Arc::new(FileBacking::open(&path, false).expect("open"));
    let q = BackingQueue::new(b, 8);
    assert_eq!(q.engine(), expected_file_engine());
    notifier_becomes_readable(q);
}

#[test]
fn notifier_becomes_readable_when_a_completion_is_ready_thread_pool() {
    // A delay makes sure the first poll finds nothing, so the test sees
    // the eventfd fire rather than a completion that was already there.
    let faulty = FaultyBacking::new(MemBacking::new(1 << 20), 1);
    faulty.add(FaultPlan::new(
        FaultOp::Write,
        FaultKind::Delay(Duration::from_millis(50)),
    ));
    let q = BackingQueue::new(Arc::new(faulty), 8);
    assert_eq!(q.engine(), QueueEngine::ThreadPool);
    notifier_becomes_readable(q);
}

#[test]
fn uring_submit_alone_makes_the_notifier_readable() {
    // A worker that goes back to epoll right after submitting must be
    // woken to call poll, which is what hands the SQEs to the kernel.
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    let b = Arc::new(FileBacking::open(&path, false).expect("open"));
    let mut q = BackingQueue::new(b, 8);
    if q.engine() != QueueEngine::Uring {
        return; // the thread pool starts work at submit anyway
    }
    let fd = q.notifier();
    q.submit(1, IoOp::Flush);
    assert!(readable(fd, 0));
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.is_empty() && Instant::now() < deadline {
        if readable(fd, 1000) {
            q.poll(&mut out);
        }
    }
    assert_eq!(out.len(), 1);
    out[0].result.as_ref().expect("flush ok");
}

#[test]
fn start_hands_a_read_to_the_kernel_before_any_poll() {
    // With the notifier drained after `start`, only the read finishing
    // in the kernel (or the pool) can make it readable again.
    let dir = disk_dir();
    let path = disk_file(dir.path(), 1 << 20);
    let want: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.write_all_at(&want, 8192))
        .expect("seed");
    let b = Arc::new(FileBacking::open(&path, false).expect("open"));
    let mut q = BackingQueue::new(b, 8);
    assert_eq!(q.engine(), expected_file_engine());
    let fd = q.notifier();
    q.submit(
        7,
        IoOp::Read {
            off: 8192,
            buf: AlignedBuf::new(4096),
        },
    );
    q.start();
    q.drain_notifier();
    assert!(readable(fd, 5000), "the read never completed");
    let mut out = Vec::new();
    q.poll(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].user_data, 7);
    out[0].result.as_ref().expect("read ok");
    match &out[0].op {
        IoOp::Read { buf, .. } => assert!(buf[..] == want[..]),
        _ => panic!("not a read"),
    }
}

/// Batches of random reads and writes to distinct sectors, against a
/// model, mixing `poll` and `wait`; depth 1 forces internal queueing.
fn mixed_workload_matches_a_model(q: &mut BackingQueue, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; size as usize];
    let blocks = size / 4096;
    let mut tag = 0u64;
    for _round in 0..20 {
        let mut offs: Vec<u64> = (0..blocks).collect();
        for i in (1..offs.len()).rev() {
            offs.swap(i, rng.gen_range(0..=i));
        }
        let mut expected: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
        for &block in offs.iter().take(40) {
            let off = block * 4096;
            let range = off as usize..off as usize + 4096;
            tag += 1;
            if rng.gen_bool(0.5) {
                let mut buf = AlignedBuf::new(4096);
                rng.fill(&mut buf[..]);
                model[range].copy_from_slice(&buf);
                expected.insert(tag, None);
                q.submit(tag, IoOp::Write { off, buf });
            } else {
                expected.insert(tag, Some(model[range].to_vec()));
                let buf = AlignedBuf::new(4096);
                q.submit(tag, IoOp::Read { off, buf });
            }
        }
        let mut out = Vec::new();
        while q.in_flight() > 0 {
            if rng.gen_bool(0.5) {
                q.poll(&mut out);
                std::thread::yield_now();
            } else {
                q.wait(rng.gen_range(1..8), &mut out);
            }
        }
        assert_eq!(out.len(), 40);
        for c in out {
            c.result.as_ref().expect("ok");
            let want = expected.remove(&c.user_data).expect("known tag");
            match (c.op, want) {
                (IoOp::Read { buf, .. }, Some(data)) => assert!(buf[..] == data[..]),
                (IoOp::Write { .. }, None) => {}
                (op, _) => panic!("unexpected {op:?}"),
            }
        }
    }
}

#[test]
fn mixed_workload_matches_a_model_on_both_engines() {
    let dir = disk_dir();
    let size = 4u64 << 20;
    let path = disk_file(dir.path(), size);
    let file = || FileBacking::open(&path, false).expect("open");
    for depth in [1, 4] {
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("reset");
        let mut q = BackingQueue::new(Arc::new(file()), depth);
        assert_eq!(q.engine(), expected_file_engine());
        mixed_workload_matches_a_model(&mut q, size, u64::from(depth));
    }
    let mut q = BackingQueue::new(Arc::new(MemBacking::new(size)), 1);
    assert_eq!(q.engine(), QueueEngine::ThreadPool);
    mixed_workload_matches_a_model(&mut q, size, 99);
}

#[test]
fn wait_returns_once_min_completions_are_in() {
    let faulty = FaultyBacking::new(MemBacking::new(1 << 20), 1);
    // The 2nd write is slow: wait(1) must not sit behind it.
    faulty.add(
        FaultPlan::new(FaultOp::Write, FaultKind::Delay(Duration::from_millis(500)))
            .skip_first(1)
            .max_count(1),
    );
    let mut q = BackingQueue::new(Arc::new(faulty), 8);
    q.submit(
        1,
        IoOp::Write {
            off: 0,
            buf: AlignedBuf::new(512),
        },
    );
    q.submit(
        2,
        IoOp::Write {
            off: 512,
            buf: AlignedBuf::new(512),
        },
    );
    let mut out = Vec::new();
    let started = Instant::now();
    q.wait(1, &mut out);
    assert!(!out.is_empty());
    assert!(started.elapsed() < Duration::from_millis(400));
    q.wait(usize::MAX, &mut out); // returns when nothing is in flight
    assert_eq!(out.len(), 2);
    assert_eq!(q.in_flight(), 0);
    q.wait(1, &mut out); // nothing in flight: returns at once
    assert_eq!(out.len(), 2);
}

#[test]
fn dropping_a_queue_with_ops_in_flight_is_safe_and_finishes_them() {
    let dir = disk_dir();
    let size = 16u64 << 20;
    let path = disk_file(dir.path(), size);
    let file = || FileBacking::open(&path, false).expect("open");
    let queues = [
        BackingQueue::new(Arc::new(file()), 8),
        BackingQueue::new(Arc::new(NoUring(file())), 8),
    ];
    for (round, mut q) in queues.into_iter().enumerate() {
        let byte = round as u8 + 1;
        for i in 0..64u64 {
            let buf = AlignedBuf::from_slice(&vec![byte; 65536]);
            q.submit(
                i,
                IoOp::Write {
                    off: i * 65536,
                    buf,
                },
            );
            if i == 32 {
                // Some in the kernel / threads, some still queued.
                q.poll(&mut Vec::new());
            }
        }
        assert!(q.in_flight() > 0);
        drop(q);
        let contents = std::fs::read(&path).expect("read");
        assert!(
            contents[..64 * 65536].iter().all(|&x| x == byte),
            "round {round}: submitted writes finished before drop returned"
        );
    }
}

#[test]
fn dropping_a_slow_thread_pool_queue_waits_for_the_running_op() {
    let faulty = Arc::new(FaultyBacking::new(MemBacking::new(1 << 20), 1));
    faulty.add(FaultPlan::new(
        FaultOp::Read,
        FaultKind::Delay(Duration::from_millis(100)),
    ));
    let mut q = BackingQueue::new(faulty.clone(), 4);
    for i in 0..8 {
        q.submit(
            i,
            IoOp::Read {
                off: 0,
                buf: AlignedBuf::new(4096),
            },
        );
    }
    drop(q);
    assert_eq!(faulty.inner().reads(), 8);
}

#[test]
fn large_transfers_split_and_complete() {
    // Bigger than one bounce chunk and than a typical max I/O size.
    let dir = disk_dir();
    let size = 64u64 << 20;
    let path = disk_file(dir.path(), size);
    let b = Arc::new(FileBacking::open(&path, false).expect("open"));
    let mut q = BackingQueue::new(b, 4);
    let mut data = AlignedBuf::new(32 << 20);
    rand::rngs::StdRng::seed_from_u64(8).fill(&mut data[..]);
    let expect = data.clone();
    q.submit(
        1,
        IoOp::Write {
            off: 4096,
            buf: data,
        },
    );
    q.submit(2, IoOp::Flush);
    for c in wait_for_all(&mut q) {
        c.result.expect("ok");
    }
    q.submit(
        3,
        IoOp::Read {
            off: 4096,
            buf: AlignedBuf::new(32 << 20),
        },
    );
    let out = wait_for_all(&mut q);
    match &out[0].op {
        IoOp::Read { buf, .. } => assert!(buf[..] == expect[..]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn queue_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<BackingQueue>();
    assert_send::<Completion>();
}

#[test]
fn a_ring_carries_only_the_operations_pcache_submits() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(disk_file(dir.path(), 1 << 20))
        .unwrap();
    let mut ring = match super::uring::Uring::new(std::os::fd::AsRawFd::as_raw_fd(&f), 4, None) {
        Ok(r) => r,
        Err(e) => panic!("io_uring with restrictions: {e} (a kernel of 5.10 or later has both)"),
    };
    assert_eq!(ring.nop_result(), -libc::EACCES);
}
