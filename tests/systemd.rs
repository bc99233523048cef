//! pcache under systemd: the template units in `systemd/` pass
//! `systemd-analyze verify`, and a pcache started with a listening socket
//! it inherited (socket activation, as `systemd-socket-activate` and
//! `pcache@.socket` pass it) serves a client on that socket, tells the
//! service manager READY=1, STATUS= and STOPPING=1, and leaves the socket
//! in place when it stops (it belongs to systemd, and a reconnecting
//! frontend waits in it for the next process).
//!
//! Needs Debian's `systemd` package (systemd-analyze,
//! systemd-socket-activate); scripts/test.sh installs it. Without it the
//! tests fail and say so.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{check_block, fill_block, Client, Disk};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn need(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{tool} not found: install Debian's systemd package (apt-get install systemd; \
         scripts/test.sh does)"
    );
}

#[test]
fn the_template_units_pass_systemd_analyze_verify() {
    need("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(ROOT).join("systemd");
    // An instance of each template, the binary where this build put it.
    let service = std::fs::read_to_string(units.join("pcache@.service"))
        .unwrap()
        .replace("/usr/local/bin/pcache", env!("CARGO_BIN_EXE_pcache"));
    assert!(service.contains(env!("CARGO_BIN_EXE_pcache")));
    std::fs::write(dir.path().join("pcache@vm1-disk0.service"), service).unwrap();
    std::fs::copy(
        units.join("pcache@.socket"),
        dir.path().join("pcache@vm1-disk0.socket"),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .current_dir(dir.path())
        .args([
            "verify",
            "--man=no",
            "./pcache@vm1-disk0.service",
            "./pcache@vm1-disk0.socket",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify failed:\n{err}");
    let about_us: Vec<&str> = err.lines().filter(|l| l.contains("pcache")).collect();
    assert!(
        about_us.is_empty(),
        "warnings about the units: {about_us:?}"
    );
}

/// The service's own hardening, as `systemd-analyze security` scores it
/// without a running systemd: at most 3.0 ("OK"; docs/operations.md says
/// which settings remain open and why).
#[test]
fn the_service_unit_is_hardened() {
    need("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(ROOT).join("systemd");
    std::fs::copy(
        units.join("pcache@.service"),
        dir.path().join("pcache@vm1-disk0.service"),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .current_dir(dir.path())
        .args([
            "security",
            "--offline=true",
            "--no-pager",
            "./pcache@vm1-disk0.service",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let level: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for pcache@vm1-disk0.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
    assert!(level <= 3.0, "exposure {level} (above 3.0):\n{out}");
}

/// Messages the service manager would get, as one string each.
fn read_notes(sock: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut notes = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let note = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = note.contains(until);
            notes.push(note);
            if done {
                break;
            }
        }
    }
    notes
}

#[test]
fn an_inherited_socket_is_served_and_the_service_manager_is_told() {
    need("systemd-socket-activate");
    let disk = Disk::new(16 << 20, None);
    let notify_path = disk.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&disk.socket)
        .arg("--setenv")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(env!("CARGO_BIN_EXE_pcache"))
        .args(["serve", "--num-queues", "1", "--cache-size", "512M"])
        .arg("--socket")
        .arg(&disk.socket)
        .arg("--cache")
        .arg(&disk.cache)
        .arg("--backing")
        .arg(&disk.backing)
        .stdout(Stdio::null())
        .spawn()
        .expect("run systemd-socket-activate");
    // systemd-socket-activate binds the socket; pcache starts at the first
    // connection, which is the client's.
    let t = Instant::now();
    while !disk.socket.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no socket");
        assert!(child.try_wait().unwrap().is_none(), "activator exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    let notes = read_notes(&notify, "READY=1", Duration::from_secs(30));
    assert!(
        notes.iter().any(|n| n.contains("READY=1")),
        "no READY=1: {notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("STATUS=serving")),
        "no STATUS= line: {notes:?}"
    );
    for b in 0..32u64 {
        fill_block(&mut c.mem()[..4096], b, 9);
        assert_eq!(c.write_sync(0, b * 4096, 0, 4096), 0);
    }
    for b in 0..32u64 {
        assert_eq!(c.read_sync(0, b * 4096, 0, 4096), 0);
        assert_eq!(check_block(&c.mem()[..4096], b), Ok(9));
    }
    drop(c);
    // systemd-socket-activate exec'ed pcache: the child is pcache now.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let notes = read_notes(&notify, "STOPPING=1", Duration::from_secs(30));
    assert!(
        notes.iter().any(|n| n.contains("STOPPING=1")),
        "no STOPPING=1: {notes:?}"
    );
    let st = child.wait().unwrap();
    assert!(st.success(), "pcache exited with {st}");
    assert!(
        disk.socket.exists(),
        "the socket belongs to the service manager and must stay"
    );
}
