//! End to end in a real Linux guest: `pcache serve` behind QEMU's
//! vhost-user-blk-pci, with fio's crc32c verification and ext4 on top, then a
//! restart of the server (replaying the cache) and a second guest that must
//! read back the same files.
//!
//! Needs qemu-system-x86_64 and what images/build.sh builds the guest from
//! (Debian packages: qemu-system-x86 busybox-static fio cpio e2fsprogs, and
//! linux-image-cloud-amd64 fetched with apt-get download). scripts/test.sh
//! installs them. Without them this test fails, saying what to install.
//! The guest runs under TCG; the whole test takes a minute or two.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const QUEUES: &str = "2";
const HOST_PKGS: &str = "qemu-system-x86 busybox-static fio cpio e2fsprogs";

/// Files the first guest writes on ext4: name and size in bytes.
const FILES: &[(&str, u64)] = &[
    ("f1", 1 << 20),
    ("f5", 5 << 20),
    ("f20", 20 << 20),
    ("odd", 12_345),
];

/// A running `pcache serve`; killed (SIGKILL) if dropped without `stop`.
struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn start(dir: &Path, sock: &Path, name: &str, extra: &[&str]) -> Server {
        // A socket file left by the previous server would look like a ready
        // one.
        let _ = std::fs::remove_file(sock);
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create server log");
        let err = out.try_clone().expect("clone server log");
        let t = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
        cmd.arg("serve")
            .arg("--socket")
            .arg(sock)
            .arg("--cache")
            .arg(dir.join("cache.img"))
            .arg("--backing")
            .arg(dir.join("disk.img"))
            .args(["--num-queues", QUEUES])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        println!("guest test: starting {cmd:?}");
        let child = cmd.spawn().expect("spawn pcache serve");
        let mut server = Server {
            child: Some(child),
            log,
        };
        let deadline = t + Duration::from_secs(30);
        loop {
            if std::fs::metadata(sock).is_ok_and(|m| m.file_type().is_socket()) {
                break;
            }
            if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
                server.child = None;
                panic!(
                    "pcache serve ({name}) exited with {st} before creating {}\n{}",
                    sock.display(),
                    server.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "pcache serve ({name}) did not create {} within 30 s\n{}",
                    sock.display(),
                    server.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        println!(
            "guest test: TIMING {name} listening after {:.2} s",
            t.elapsed().as_secs_f64()
        );
        server
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(80);
        format!(
            "--- last lines of {} ---\n{}\n---",
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// SIGTERM, then the exit status must be 0 within 120 s.
    fn stop(mut self, name: &str) {
        let t = Instant::now();
        let mut child = self.child.take().expect("server running");
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "pcache serve ({name}) had already exited with {st}\n{}",
                self.log_text()
            );
        }
        let kill = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM {} failed", child.id());
        let deadline = t + Duration::from_secs(120);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "pcache serve ({name}) still running 120 s after SIGTERM\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            st.code(),
            Some(0),
            "pcache serve ({name}) exited with {st} after SIGTERM\n{}",
            self.log_text()
        );
        println!(
            "guest test: TIMING {name} exited 0 {:.2} s after SIGTERM",
            t.elapsed().as_secs_f64()
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

/// Prints every line as it comes and returns them all (without '\r').
fn pump(r: impl Read + Send + 'static, tag: &'static str) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut lines = Vec::new();
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
            lines.push(line);
        }
        lines
    })
}

/// Boots a guest on `sock` running `cmd`: its exit status and console lines.
fn run_guest(sock: &Path, cmd: &str, name: &str) -> (ExitStatus, Vec<String>) {
    let t = Instant::now();
    let mut child = Command::new(Path::new(ROOT).join("qemu/run-guest.sh"))
        .arg(sock)
        .arg(cmd)
        .env("PCACHE_GUEST_QUEUES", QUEUES)
        .env(
            "PCACHE_GUEST_TIMEOUT",
            std::env::var("PCACHE_GUEST_TIMEOUT").unwrap_or_else(|_| "240".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qemu/run-guest.sh");
    let out = pump(child.stdout.take().unwrap(), "  | ");
    let err = pump(child.stderr.take().unwrap(), "  ! ");
    let st = child.wait().expect("wait for run-guest.sh");
    let mut lines = out.join().unwrap();
    lines.extend(err.join().unwrap());
    println!(
        "guest test: TIMING {name} guest ran {:.1} s, {st}",
        t.elapsed().as_secs_f64()
    );
    (st, lines)
}

/// The `MD5 <sum> <name>` lines the guest printed.
fn md5s(lines: &[String]) -> BTreeMap<String, String> {
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
fn preflight() {
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

fn write_cmd() -> String {
    let mut c = String::from(
        "set -e\n\
         up() { echo; echo \"STEP $1 $(cut -d' ' -f1 /proc/uptime)\"; }\n\
         up fio\n\
         fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=128M --iodepth=16 \
         --ioengine=libaio --direct=1 --verify=crc32c --numjobs=1 --eta=never\n\
         up mkfs\n\
         mkfs.ext4 -q -F /dev/vda\n\
         mount /dev/vda /mnt\n\
         up write\n",
    );
    for (name, size) in FILES {
        if size % (1 << 20) == 0 {
            c += &format!(
                "dd if=/dev/urandom of=/mnt/{name} bs=1M count={} 2>/dev/null\n",
                size >> 20
            );
        } else {
            c += &format!("head -c {size} /dev/urandom >/mnt/{name}\n");
        }
    }
    c += "sync\nup md5\n";
    c += &md5_cmd();
    c += "umount /mnt\nsync\nup done\n";
    c
}

fn md5_cmd() -> String {
    let names: Vec<&str> = FILES.iter().map(|f| f.0).collect();
    format!(
        "for n in {}; do set -- $(md5sum /mnt/$n); echo \"MD5 $1 $n\"; done\n",
        names.join(" ")
    )
}

fn read_cmd() -> String {
    let mut c = String::from(
        "set -e\n\
         up() { echo; echo \"STEP $1 $(cut -d' ' -f1 /proc/uptime)\"; }\n\
         up fsck\n\
         e2fsck -fn /dev/vda\n\
         mount -o ro /dev/vda /mnt\n\
         up md5\n",
    );
    c += &md5_cmd();
    c += "umount /mnt\nup done\n";
    c
}

#[test]
fn guest_fio_and_ext4_survive_a_server_restart() {
    let t0 = Instant::now();
    preflight();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vub.sock");

    // a + b: a fresh cache, fio with verification, then ext4 with files.
    let server = Server::start(
        dir.path(),
        &sock,
        "serve-1",
        &["--cache-size", "512M", "--backing-size", "1G", "--format"],
    );
    let (st, lines) = run_guest(&sock, &write_cmd(), "guest-1 (fio + mkfs + write)");
    assert!(
        st.success(),
        "guest 1 failed ({st}): see its console above and the server log below"
    );
    let written = md5s(&lines);
    assert_eq!(
        written.len(),
        FILES.len(),
        "guest 1 printed {written:?}, expected an MD5 line for each of {FILES:?}"
    );
    // c: SIGTERM persists and exits 0.
    server.stop("serve-1");

    // d: replay the same cache, read the files back.
    let server = Server::start(dir.path(), &sock, "serve-2", &[]);
    let (st, lines) = run_guest(&sock, &read_cmd(), "guest-2 (fsck + read)");
    assert!(
        st.success(),
        "guest 2 failed ({st}): see its console above and the server log below"
    );
    let read = md5s(&lines);
    assert_eq!(
        read, written,
        "files read after the restart differ from those written"
    );
    server.stop("serve-2");
    println!(
        "guest test: TIMING total {:.1} s; md5s matched: {written:?}",
        t0.elapsed().as_secs_f64()
    );
}
