//! A frontend is input like a guest: files it hands over (the memory
//! table, the inflight region, the dirty log) that are shorter than it
//! says, offsets past their end, sizes that overflow, and a memory file
//! shrunk after pcache checked it. Each costs that connection only; the
//! process keeps serving, and the next client's writes read back.
//!
//! The frontend here is rust-vmm's vhost-user frontend speaking the real
//! protocol over pcache's socket, with memfds it makes itself.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fill_block, verify_all_blocks, write_all_blocks, Client, Disk, Server};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// Where the frontend says its memory is in its own address space.
const VMM_BASE: u64 = 0x7f00_0000_0000;

/// A memfd of `len` bytes (no seals: it can shrink).
fn memfd(len: u64) -> File {
    // SAFETY: a static NUL-terminated name; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// Connect and negotiate everything pcache offers, replies acknowledged.
fn connect(sock: &Path) -> Frontend {
    let mut f = Frontend::connect(sock, 1).expect("connect");
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    f.set_features(features).unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(pf & !VhostUserProtocolFeatures::BACKEND_REQ)
        .unwrap();
    f
}

/// One region of guest memory at guest address 0: `len` bytes stated,
/// at `offset` of `file`.
fn region(file: &File, len: u64, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: len,
        userspace_addr: VMM_BASE,
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    }
}

/// pcache with its log in a file we read.
struct Logged {
    server: Server,
    log: std::path::PathBuf,
}

impl Logged {
    fn start(disk: &Disk) -> Logged {
        let log = disk.dir.path().join("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
        cmd.args(disk.serve_args(&["--num-queues", "1", "--cache-size", "512M"]))
            .stderr(File::create(&log).unwrap());
        let server = Server::start_cmd(cmd, &disk.socket);
        Logged { server, log }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait up to 10 s for `what` in the log.
    fn wait_for(&self, what: &str) {
        let t = Instant::now();
        while !self.text().contains(what) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no {what:?} in pcache's log:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_alive(&mut self, after: &str) {
        if let Some(st) = self.server.child.try_wait().unwrap() {
            panic!("pcache ended ({st}) after {after}:\n{}", self.text());
        }
    }
}

/// The connection is closed: a message gets no answer.
fn assert_closed(f: &mut Frontend, after: &str) {
    let t = Instant::now();
    while f.get_features().is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the connection still answers after {after}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client writes blocks and reads them back: the process still serves.
fn serves_and_verifies(sock: &Path, version: u64) {
    let mut c = Client::connect(sock, 1, 1 << 20);
    write_all_blocks(&mut c, 0, 64, version);
    verify_all_blocks(&mut c, 0, 64, |_| version);
}

#[test]
fn short_overflowing_and_shrinking_frontend_files_cost_only_their_connection() {
    let disk = Disk::new(64 * MIB, None);
    let mut p = Logged::start(&disk);
    let sock = disk.socket.clone();

    // Memory tables the files do not back.
    let small = memfd(4096);
    let big = memfd(64 * MIB);
    let tables: [(&str, VhostUserMemoryRegionInfo); 3] = [
        (
            "a 4 KiB memfd stated as 64 MiB",
            region(&small, 64 * MIB, 0),
        ),
        (
            "an offset past the file's end",
            region(&big, MIB, 128 * MIB),
        ),
        ("a size that overflows", region(&big, u64::MAX - 4095, 4096)),
    ];
    for (what, r) in tables {
        let mut f = connect(&sock);
        // Refused: without REPLY_ACK the refusal shows as a closed socket.
        let _ = f.set_mem_table(&[r]);
        assert_closed(&mut f, what);
        p.assert_alive(what);
    }
    p.wait_for("refusing the frontend's memory table");

    // An inflight region and a dirty log the file does not back.
    {
        let mut f = connect(&sock);
        f.set_mem_table(&[region(&big, 64 * MIB, 0)]).unwrap();
        let inflight = VhostUserInflight::new(MIB, 0, 1, 128);
        let _ = f.set_inflight_fd(&inflight, small.as_raw_fd());
        assert_closed(&mut f, "a short inflight region");
        p.assert_alive("a short inflight region");
        p.wait_for("the frontend's inflight region is unusable");
    }
    {
        let f = connect(&sock);
        f.set_mem_table(&[region(&big, 64 * MIB, 0)]).unwrap();
        let log = VhostUserDirtyLogRegion {
            mmap_size: MIB,
            mmap_offset: 0,
            mmap_handle: small.as_raw_fd(),
        };
        let mut f = f;
        let _ = f.set_log_base(0, Some(log));
        assert_closed(&mut f, "a short dirty log");
        p.assert_alive("a short dirty log");
    }
    serves_and_verifies(&sock, 1);

    // A memory file that shrinks once its ring runs: the ring sits at
    // 32 MiB, the file is cut to 4 KiB, then the ring is kicked.
    let shrinking = memfd(64 * MIB);
    let mut f = connect(&sock);
    f.set_mem_table(&[region(&shrinking, 64 * MIB, 0)]).unwrap();
    let ring = 32 * MIB;
    f.set_vring_num(0, 128).unwrap();
    f.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 128,
            queue_size: 128,
            flags: 0,
            desc_table_addr: VMM_BASE + ring,
            avail_ring_addr: VMM_BASE + ring + 4096,
            used_ring_addr: VMM_BASE + ring + 8192,
            log_addr: None,
        },
    )
    .unwrap();
    f.set_vring_base(0, 0).unwrap();
    let (call, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    f.set_vring_call(0, &call).unwrap();
    f.set_vring_kick(0, &kick).unwrap();
    f.set_vring_enable(0, true).unwrap();
    // A message with a reply: everything before it has been handled.
    f.get_features().unwrap();
    shrinking.set_len(4096).unwrap();
    kick.write(1).unwrap();
    p.wait_for("the frontend's memory faulted");
    assert_closed(&mut f, "a memory file that shrank");
    p.assert_alive("a memory file that shrank under a running ring");

    serves_and_verifies(&sock, 2);
    p.server.stop();
}

#[test]
fn a_cache_file_truncated_under_pcache_stops_it_with_a_message_naming_the_cause() {
    use std::os::unix::process::ExitStatusExt;
    let disk = Disk::new(64 * MIB, None);
    let mut p = Logged::start(&disk);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    fill_block(&mut c.mem()[..BLOCK], 0, 1);
    assert_eq!(c.write_sync(0, 0, 0, BLOCK), 0);
    // Someone cuts the cache file to its first 4 KiB.
    File::options()
        .write(true)
        .open(&disk.cache)
        .unwrap()
        .set_len(4096)
        .unwrap();
    for b in 1..256u64 {
        fill_block(&mut c.mem()[..BLOCK], b, 1);
        let buf = c.ptr(0);
        c.queues[0].write(
            b * BLOCK as u64,
            buf,
            BLOCK,
            b as usize,
            blkio::ReqFlags::empty(),
        );
        let mut none = [];
        if c.queues[0].do_io(&mut none, 0, None, None).is_err() {
            break;
        }
        if p.server.child.try_wait().unwrap().is_some() {
            break;
        }
    }
    let t = Instant::now();
    let st = loop {
        if let Some(st) = p.server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pcache still runs on a truncated cache file"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.signal(), Some(libc::SIGBUS), "{st}");
    assert!(
        p.text().contains("the cache medium failed under us"),
        "no cause in the log:\n{}",
        p.text()
    );
}
