//! Helpers for tests that boot a real QEMU guest on a pcache disk: starting
//! and stopping `pcache serve` as a process, booting the test guest
//! (`qemu/run-guest.sh`) and reading its console as it runs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");
pub const HOST_PKGS: &str = "qemu-system-x86 busybox-static fio cpio e2fsprogs";

/// `pcache serve` on `dir`'s cache.img and disk.img, listening on `sock`.
pub fn serve_cmd(dir: &Path, sock: &Path, queues: &str, extra: &[&str]) -> Command {
    serve_cmd_on(
        &dir.join("cache.img"),
        &dir.join("disk.img"),
        sock,
        queues,
        extra,
    )
}

/// `pcache serve` on `cache` in front of `disk`, listening on `sock`.
pub fn serve_cmd_on(
    cache: &Path,
    disk: &Path,
    sock: &Path,
    queues: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(sock)
        .arg("--cache")
        .arg(cache)
        .arg("--backing")
        .arg(disk)
        .args(["--num-queues", queues])
        .args(extra)
        .env(
            "PCACHE_LOG",
            std::env::var("PCACHE_LOG").unwrap_or_else(|_| "info".into()),
        );
    cmd
}

/// Wait until something accepts connections on `sock` (a socket file that
/// exists is not enough: it is bound before it listens). Panics after
/// `limit`, or when `alive` says the server is gone.
pub fn wait_listening(sock: &Path, limit: Duration, mut alive: impl FnMut() -> Result<(), String>) {
    let t = Instant::now();
    loop {
        if UnixStream::connect(sock).is_ok() {
            return;
        }
        if let Err(why) = alive() {
            panic!("{why} before listening on {}", sock.display());
        }
        assert!(
            t.elapsed() < limit,
            "nothing listened on {} within {limit:?}",
            sock.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running `pcache serve` with its output in a log file; killed
/// (SIGKILL) if dropped without `stop`.
pub struct Server {
    child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl Server {
    /// Start `cmd` (a `pcache serve`), logging to `dir/<name>.log`, and wait
    /// until it listens on `sock`.
    pub fn start(mut cmd: Command, dir: &Path, sock: &Path, name: &str) -> Server {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create server log");
        let err = out.try_clone().expect("clone server log");
        let t = Instant::now();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd.spawn().expect("spawn pcache serve");
        let mut server = Server {
            child: Some(child),
            log,
            name: name.into(),
        };
        let mut exited = None;
        let child = server.child.as_mut().expect("child");
        let log_now = server.log.clone();
        wait_listening(sock, Duration::from_secs(30), || {
            match child.try_wait().expect("try_wait") {
                Some(st) => {
                    exited = Some(st);
                    Err(format!(
                        "pcache serve ({name}) exited with {st}\n{}",
                        tail(&log_now)
                    ))
                }
                None => Ok(()),
            }
        });
        println!(
            "guest test: TIMING {name} listening after {:.2} s",
            t.elapsed().as_secs_f64()
        );
        server
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The last lines of its log.
    pub fn log_text(&self) -> String {
        tail(&self.log)
    }

    /// Wait up to `limit` for the server to end by itself; its status.
    pub fn ended_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        let c = self.child.as_mut().expect("running");
        while t.elapsed() < limit {
            if let Some(st) = c.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, and wait for it to die.
    pub fn kill(mut self) {
        let mut c = self.child.take().expect("running");
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGTERM: the exit status must be 0 within `limit`.
    pub fn stop_within(mut self, limit: Duration) -> Duration {
        let t = Instant::now();
        let mut child = self.child.take().expect("server running");
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "pcache serve ({}) had already exited with {st}\n{}",
                self.name,
                self.log_text()
            );
        }
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -TERM {} failed", child.id());
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "pcache serve ({}) still running {limit:?} after SIGTERM\n{}",
                    self.name,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            st.code(),
            Some(0),
            "pcache serve ({}) exited with {st} after SIGTERM\n{}",
            self.name,
            self.log_text()
        );
        t.elapsed()
    }

    /// SIGTERM, exit status 0 within 120 s.
    pub fn stop(self) {
        let name = self.name.clone();
        let took = self.stop_within(Duration::from_secs(120));
        println!(
            "guest test: TIMING {name} exited 0 {:.2} s after SIGTERM",
            took.as_secs_f64()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if thread::panicking() {
                eprintln!("{}", self.log_text());
            }
        }
    }
}

/// The last 80 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(80);
    format!(
        "--- last lines of {} ---\n{}\n---",
        path.display(),
        lines[from..].join("\n")
    )
}

/// Console text by which a guest kernel says its own memory is corrupt.
const KERNEL_FAULTS: &[&str] = &[
    "Oops",
    "BUG:",
    "general protection fault",
    "Kernel panic",
    "Bad rss-counter",
    "Bad page",
    "invalid opcode",
];

/// Console text by which a guest's data check says it read back the wrong
/// bytes (fio's verification, the test scripts' own checks).
const DATA_CHECKS: &[&str] = &[
    "CHECK FAILED",
    "WRITE FAILED",
    "verify: ",
    "verify failed",
    "MISMATCH",
];

/// What every guest booted with it printed that a test must weigh after
/// those guests are gone (after a panic too): kernel faults printed once
/// [`FaultWatch::migrated`] was called, and failed data checks.
#[derive(Clone, Default)]
pub struct FaultWatch(Arc<Watched>);

#[derive(Default)]
struct Watched {
    migrated: std::sync::atomic::AtomicBool,
    faults: Mutex<Vec<String>>,
    checks: Mutex<Vec<String>>,
}

impl FaultWatch {
    /// Kernel-fault lines printed after the first migration.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Lines by which a data check failed.
    pub fn failed_checks(&self) -> Vec<String> {
        self.0
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A migration started: kernel faults from now on may be TCG's.
    pub fn migrated(&self) {
        self.0
            .migrated
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn see(&self, line: &str) {
        let keep = |v: &Mutex<Vec<String>>| {
            v.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.to_string())
        };
        if DATA_CHECKS.iter().any(|f| line.contains(f)) {
            keep(&self.0.checks);
        }
        if KERNEL_FAULTS.iter().any(|f| line.contains(f))
            && self.0.migrated.load(std::sync::atomic::Ordering::SeqCst)
        {
            keep(&self.0.faults);
        }
    }
}

/// A booted guest whose console lines arrive as they are printed.
pub struct Guest {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    name: String,
    started: Instant,
}

/// Prints every line as it comes and sends it on (without '\r').
fn pump(
    r: impl Read + Send + 'static,
    tag: &'static str,
    to: std::sync::mpsc::Sender<String>,
    watch: FaultWatch,
) {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .replace('\r', "");
            println!("{tag}{line}");
            watch.see(&line);
            let _ = to.send(line);
        }
    });
}

impl Guest {
    /// Boot the test guest on `sock` running `cmd`, with extra environment
    /// for `qemu/run-guest.sh`.
    pub fn boot(sock: &Path, cmd: &str, name: &str, env: &[(&str, &str)]) -> Guest {
        Guest::boot_watched(sock, cmd, name, env, &FaultWatch::default())
    }

    /// [`Guest::boot`], recording the guest's kernel-fault lines in `watch`.
    pub fn boot_watched(
        sock: &Path,
        cmd: &str,
        name: &str,
        env: &[(&str, &str)],
        watch: &FaultWatch,
    ) -> Guest {
        let mut c = Command::new(Path::new(ROOT).join("qemu/run-guest.sh"));
        c.arg(sock)
            .arg(cmd)
            .env(
                "PCACHE_GUEST_TIMEOUT",
                std::env::var("PCACHE_GUEST_TIMEOUT").unwrap_or_else(|_| "400".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("run qemu/run-guest.sh");
        let (tx, rx) = channel();
        pump(
            child.stdout.take().unwrap(),
            "  | ",
            tx.clone(),
            watch.clone(),
        );
        pump(child.stderr.take().unwrap(), "  ! ", tx, watch.clone());
        Guest {
            child,
            lines: rx,
            seen: Vec::new(),
            name: name.into(),
            started: Instant::now(),
        }
    }

    /// Wait up to `limit` for a console line containing `text`; false if
    /// the guest ended or the time ran out first.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(text);
                    self.seen.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return false
                }
            }
        }
    }

    /// Has a line containing `text` been printed yet? (Reads what arrived.)
    pub fn printed(&mut self, text: &str) -> bool {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.iter().any(|l| l.contains(text))
    }

    /// Wait for the guest to end: its exit status and every console line.
    pub fn finish(mut self) -> (ExitStatus, Vec<String>) {
        let st = self.child.wait().expect("wait for run-guest.sh");
        while let Ok(l) = self.lines.recv() {
            self.seen.push(l);
        }
        println!(
            "guest test: TIMING {} guest ran {:.1} s, {st}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        (st, std::mem::take(&mut self.seen))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // QEMU runs under `timeout` in a process group of its own: a
            // test that fails must not leave it running into the next.
            for pid in descendants(self.child.id()) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every process below `pid`, deepest first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            out.extend(descendants(c));
            out.push(c);
        }
    }
    out
}

/// The `MD5 <sum> <name>` lines the guest printed.
pub fn md5s(lines: &[String]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in lines {
        let Some(pos) = l.find("MD5 ") else { continue };
        let f: Vec<&str> = l[pos..].split_whitespace().collect();
        if f.len() == 3 && f[1].len() == 32 && f[1].bytes().all(|b| b.is_ascii_hexdigit()) {
            m.insert(f[2].to_owned(), f[1].to_owned());
        }
    }
    m
}

/// Fails (never skips) when the host cannot run the guest.
pub fn preflight() {
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "qemu-system-x86_64 --version failed ({}): reinstall it with `apt-get install {HOST_PKGS}` \
             (scripts/test.sh installs them)",
            o.status
        ),
        Err(e) => panic!(
            "qemu-system-x86_64 not found ({e}): this test boots a real guest; \
             install with `apt-get install {HOST_PKGS}` (scripts/test.sh installs them)"
        ),
    }
    let t = Instant::now();
    let st = Command::new(Path::new(ROOT).join("images/build.sh"))
        .stdin(Stdio::null())
        .status()
        .expect("run images/build.sh");
    assert!(
        st.success(),
        "images/build.sh failed ({st}): it needs root to apt-get install {HOST_PKGS} \
         if they are missing, and Debian's archive for `apt-get download` of \
         linux-image-*-cloud-amd64; see its messages above"
    );
    println!(
        "guest test: TIMING images/build.sh {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
