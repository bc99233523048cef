//! Shared helpers for tests that run a real `pcache serve` process and talk
//! to it with a real vhost-user-blk client (libblkio's `blkio` crate).
#![allow(dead_code)]

pub mod ceph;
pub mod disk;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// The block size of [`fill_block`] data.
pub const TEST_BLOCK: usize = 4096;

/// A running `pcache serve`.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
}

/// Paths of one test's disk.
pub struct Disk {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
    /// The backing file (unused for an RBD disk).
    pub backing: PathBuf,
    pub socket: PathBuf,
    /// The RBD image behind the cache, for a disk made by [`Disk::rbd`].
    pub image: Option<ceph::Image>,
}

impl Disk {
    /// A fresh directory with a backing file of `backing_bytes` filled by
    /// `fill` (or sparse zeros).
    pub fn new(backing_bytes: u64, fill: Option<&dyn Fn(u64) -> u8>) -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("disk.img");
        match fill {
            None => std::fs::File::create(&backing)
                .unwrap()
                .set_len(backing_bytes)
                .unwrap(),
            Some(f) => {
                let bytes: Vec<u8> = (0..backing_bytes).map(f).collect();
                std::fs::write(&backing, bytes).unwrap();
            }
        }
        Disk {
            cache: dir.path().join("cache.img"),
            backing,
            socket: dir.path().join("vhost.sock"),
            dir,
            image: None,
        }
    }

    /// A fresh directory and a new zeroed RBD image of `bytes` on the test
    /// cluster; the cache lives on tmpfs when there is one.
    pub fn rbd(tag: &str, bytes: u64) -> Disk {
        let image = ceph::Image::create(tag, bytes);
        Disk::on_image(image)
    }

    /// A fresh directory in front of `image`.
    pub fn on_image(image: ceph::Image) -> Disk {
        let dir = tempfile::tempdir().unwrap();
        Disk {
            cache: dir.path().join("cache.img"),
            backing: dir.path().join("unused"),
            socket: dir.path().join("vhost.sock"),
            dir,
            image: Some(image),
        }
    }

    /// What `--backing` says for this disk.
    pub fn backing_arg(&self) -> String {
        match &self.image {
            Some(i) => i.spec(),
            None => self.backing.display().to_string(),
        }
    }

    /// Start `pcache serve` on this disk with extra arguments.
    pub fn serve(&self, extra: &[&str]) -> Server {
        let mut args = self.serve_args(&[]);
        if !self.cache.exists() {
            args.extend(["--cache-size".into(), "512M".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::start(&args, &self.socket)
    }

    /// The arguments of `pcache serve` on this disk, then `extra`.
    pub fn serve_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--cache".into(),
            self.cache.display().to_string(),
            "--backing".into(),
            self.backing_arg(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

impl Server {
    /// Start the binary with `args` and wait until it listens on `socket`
    /// (a socket file left by a server that died is pcache's to replace).
    pub fn start(args: &[String], socket: &Path) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
        cmd.args(args);
        Server::start_cmd(cmd, socket)
    }

    /// Start `cmd` (pcache serve, perhaps wrapped) and wait until it
    /// listens on `socket`.
    pub fn start_cmd(mut cmd: Command, socket: &Path) -> Server {
        let child = cmd
            .env(
                "PCACHE_LOG",
                std::env::var("PCACHE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("start pcache serve");
        let mut s = Server {
            child,
            socket: socket.to_owned(),
            control: socket.with_extension("ctl"),
        };
        // A socket file is bound before it listens: wait for a connection
        // to be accepted, not for the file.
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("pcache serve exited before listening: {st}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "pcache serve did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// Send a signal.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for exit (at most 60 s).
    pub fn wait(mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("pcache serve did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and expect a clean exit.
    pub fn stop(self) {
        self.signal("TERM");
        let st = self.wait();
        assert!(st.success(), "pcache serve exited with {st} after SIGTERM");
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libblkio client with a shared memory region for its buffers.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

/// Completion of one request: user_data and ret (0 or -errno).
pub type Done = (usize, i32);

impl Client {
    /// Connect with `nq` queues and a `mem_bytes` buffer region.
    pub fn connect(socket: &Path, nq: i32, mem_bytes: usize) -> Client {
        Client::connect_with(socket, nq, mem_bytes, false)
    }

    /// The same, read-only (libblkio refuses to start a read-only device
    /// otherwise).
    pub fn connect_with(socket: &Path, nq: i32, mem_bytes: usize, read_only: bool) -> Client {
        Client::try_connect(socket, nq, mem_bytes, read_only).expect("connect to pcache")
    }

    /// Connect, or say which step failed.
    pub fn try_connect(
        socket: &Path,
        nq: i32,
        mem_bytes: usize,
        read_only: bool,
    ) -> Result<Client, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        if read_only {
            b.set_bool("read-only", true).unwrap();
        }
        b.connect().map_err(|e| format!("connect: {e}"))?;
        let capacity = b
            .get_u64("capacity")
            .map_err(|e| format!("capacity: {e}"))?;
        b.set_i32("num-queues", nq).unwrap();
        let out = b.start().map_err(|e| format!("start: {e}"))?;
        let region = b
            .alloc_mem_region(mem_bytes)
            .map_err(|e| format!("alloc mem region: {e}"))?;
        b.map_mem_region(&region)
            .map_err(|e| format!("map mem region: {e}"))?;
        Ok(Client {
            blkio: b,
            queues: out.queues,
            region,
            capacity,
        })
    }

    /// The buffer region as a slice.
    pub fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for our lifetime, and requests using
        // it are completed before the slice is used again by tests.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Pointer to byte `at` of the region.
    pub fn ptr(&self, at: usize) -> *mut u8 {
        assert!(at < self.region.len);
        (self.region.addr + at) as *mut u8
    }

    /// Wait for at least `min` completions on queue `q` (30 s timeout).
    pub fn reap(&mut self, q: usize, min: usize) -> Vec<Done> {
        let mut c: Vec<MaybeUninit<Completion>> = (0..256).map(|_| MaybeUninit::uninit()).collect();
        let mut t = Duration::from_secs(30);
        let n = self.queues[q]
            .do_io(&mut c, min, Some(&mut t), None)
            .expect("do_io");
        assert!(
            n >= min,
            "timed out waiting for {min} completions (got {n})"
        );
        (0..n)
            .map(|i| {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c[i].assume_init_read() };
                (c.user_data, c.ret)
            })
            .collect()
    }

    /// Write `len` bytes from region offset `at` to `off`, and wait.
    pub fn write_sync(&mut self, q: usize, off: u64, at: usize, len: usize) -> i32 {
        let p = self.ptr(at);
        self.queues[q].write(off, p, len, 1, ReqFlags::empty());
        self.reap(q, 1)[0].1
    }

    /// Read `len` bytes at `off` into region offset `at`, and wait.
    pub fn read_sync(&mut self, q: usize, off: u64, at: usize, len: usize) -> i32 {
        let p = self.ptr(at);
        self.queues[q].read(off, p, len, 1, ReqFlags::empty());
        self.reap(q, 1)[0].1
    }

    /// FLUSH and wait.
    pub fn flush_sync(&mut self, q: usize) -> i32 {
        self.queues[q].flush(7, ReqFlags::empty());
        self.reap(q, 1)[0].1
    }
}

/// Fill a 4 KiB block: 8-byte block number, 8-byte version, then bytes
/// derived from both, so a block can be checked on its own.
pub fn fill_block(buf: &mut [u8], block: u64, version: u64) {
    buf[..8].copy_from_slice(&block.to_le_bytes());
    buf[8..16].copy_from_slice(&version.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version;
    for chunk in buf[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
}

/// The version a block holds, or why it is not a well-formed block.
pub fn check_block(buf: &[u8], block: u64) -> Result<u64, String> {
    if buf.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    let b = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let v = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    if b != block {
        return Err(format!("block {block} holds block {b}'s data"));
    }
    let mut want = vec![0u8; buf.len()];
    fill_block(&mut want, block, v);
    if want != buf {
        return Err(format!("block {block} version {v} fails its checksum"));
    }
    Ok(v)
}

/// Write every block of the disk at QD32 (block b gets version `version`).
pub fn write_all_blocks(c: &mut Client, q: usize, blocks: u64, version: u64) {
    let qd = 32usize;
    let mut next = 0u64;
    let mut inflight = 0usize;
    while next < blocks || inflight > 0 {
        while inflight < qd && next < blocks {
            let slot = (next as usize % qd) * TEST_BLOCK;
            fill_block(&mut c.mem()[slot..slot + TEST_BLOCK], next, version);
            let p = c.ptr(slot);
            c.queues[q].write(
                next * TEST_BLOCK as u64,
                p,
                TEST_BLOCK,
                next as usize,
                ReqFlags::empty(),
            );
            next += 1;
            inflight += 1;
        }
        for (ud, ret) in c.reap(q, 1) {
            assert_eq!(ret, 0, "write of block {ud} failed");
            inflight -= 1;
        }
    }
}

/// Read every block back and check it holds `version_of(block)`.
pub fn verify_all_blocks(c: &mut Client, q: usize, blocks: u64, version_of: impl Fn(u64) -> u64) {
    let chunk = 64usize; // blocks per read
    let mut b = 0u64;
    while b < blocks {
        let n = chunk.min((blocks - b) as usize);
        assert_eq!(
            c.read_sync(q, b * TEST_BLOCK as u64, 0, n * TEST_BLOCK),
            0,
            "read at block {b}"
        );
        for i in 0..n {
            let blk = b + i as u64;
            let got = check_block(&c.mem()[i * TEST_BLOCK..(i + 1) * TEST_BLOCK], blk)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, version_of(blk), "block {blk}");
        }
        b += n as u64;
    }
}

/// Run the `pcache` binary under test with `args` and collect its output.
pub fn pcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(args)
        .output()
        .expect("run pcache")
}

/// A command's stdout followed by its stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `pcache status --json` of a running server.
pub fn status(server: &Server) -> serde_json::Value {
    let o = pcache(&[
        "status",
        "--control",
        &server.control.display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).expect("status is JSON")
}
