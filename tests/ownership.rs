//! One owner per cache, and no socket taken over: while a `pcache serve`
//! runs, a second serve of its cache, a serve of another cache on its
//! socket path, `format --force`, `writeback`, `inspect` and `check` of its
//! cache are all refused with the holder's pid, and the live server keeps
//! serving and verifying. The socket file appears only once the server is
//! ready.

mod common;

use std::path::Path;
use std::process::Output;

use common::{check_block, fill_block, pcache, text, Client, Disk};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

/// Write blocks `0..n` with `version`, then read them all back.
fn write_and_verify(c: &mut Client, n: u64, version: u64) {
    for b in 0..n {
        fill_block(&mut c.mem()[..BLOCK], b, version);
        assert_eq!(c.write_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
    }
    for b in 0..n {
        assert_eq!(c.read_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
        assert_eq!(check_block(&c.mem()[..BLOCK], b), Ok(version));
    }
}

#[test]
fn a_live_cache_and_its_socket_are_refused_to_everyone_else() {
    let disk = Disk::new(32 * MIB, None);
    let server = disk.serve(&["--num-queues", "1"]);
    let pid = server.child.id().to_string();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_and_verify(&mut c, 64, 1);

    let cache = disk.cache.to_str().unwrap();
    let backing = disk.backing.to_str().unwrap();
    let other_sock = disk.dir.path().join("other.sock");
    let other_sock = other_sock.to_str().unwrap();
    let in_use = |o: &Output, what: &str| {
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(o));
        assert!(
            text(o).contains(&format!("in use by process {pid}")),
            "{what} must name the holder {pid}: {}",
            text(o)
        );
    };

    // A second server on the same cache.
    let o = pcache(&[
        "serve",
        "--socket",
        other_sock,
        "--cache",
        cache,
        "--backing",
        backing,
    ]);
    in_use(&o, "second serve");
    assert!(!std::path::Path::new(other_sock).exists());

    // Another cache on the same socket path.
    let other_cache = disk.dir.path().join("other-cache.img");
    let o = pcache(&[
        "serve",
        "--socket",
        disk.socket.to_str().unwrap(),
        "--cache",
        other_cache.to_str().unwrap(),
        "--cache-size",
        "512M",
        "--backing",
        backing,
    ]);
    in_use(&o, "serve on the live socket");

    // Offline commands that write, and those that read.
    let o = pcache(&["format", "--cache", cache, "--backing", backing, "--force"]);
    in_use(&o, "format --force");
    let o = pcache(&["writeback", "--cache", cache, "--backing", backing]);
    in_use(&o, "writeback");
    let o = pcache(&["inspect", "--cache", cache]);
    in_use(&o, "inspect");
    let o = pcache(&["check", "--cache", cache]);
    assert_eq!(o.status.code(), Some(1), "check: {}", text(&o));
    assert!(text(&o).contains(&format!("in use by process {pid}")));

    // The live server never noticed.
    write_and_verify(&mut c, 64, 2);
    drop(c);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_and_verify(&mut c, 64, 3);
    drop(c);
    server.stop();

    // Once it has stopped, the cache is anyone's.
    let o = pcache(&["check", "--cache", cache]);
    assert!(o.status.success(), "{}", text(&o));
    let o = pcache(&["inspect", "--cache", cache]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_dead_socket_is_replaced_but_a_live_listener_is_not() {
    let disk = Disk::new(16 * MIB, None);
    // Something else listens on the path.
    let _other = std::os::unix::net::UnixListener::bind(&disk.socket).unwrap();
    let o = pcache(&[
        "serve",
        "--socket",
        disk.socket.to_str().unwrap(),
        "--cache",
        disk.cache.to_str().unwrap(),
        "--cache-size",
        "512M",
        "--backing",
        disk.backing.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("refusing to take the socket over"),
        "{}",
        text(&o)
    );
    drop(_other);
    // The listener is gone, its socket file stays: a dead socket.
    assert!(disk.socket.exists());
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_and_verify(&mut c, 8, 1);
    drop(c);
    server.stop();
}

#[test]
fn the_socket_appears_only_once_the_server_is_ready() {
    let disk = Disk::new(128 * MIB, None);
    // Dirty data for a mode switch at start to write back.
    let lazy = [
        "--writeback-idle-ms",
        "3600000",
        "--writeback-max-age",
        "3600",
        "--sequential-cutoff",
        "0",
    ];
    let server = disk.serve(&lazy);
    let mut c = Client::connect(&disk.socket, 1, MIB as usize);
    for i in 0..96u64 {
        c.mem()[..MIB as usize].fill(i as u8 + 1);
        assert_eq!(c.write_sync(0, i * MIB, 0, MIB as usize), 0);
    }
    drop(c);
    // Dirty bytes are counted as key sets close.
    let t = std::time::Instant::now();
    while common::status(&server)["dirty_bytes"].as_u64().unwrap() < 64 * MIB {
        assert!(t.elapsed().as_secs() < 10, "{}", common::status(&server));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.stop();

    // An orchestrator that waits for the socket file and then asks for
    // the status must get an answer, and the start must be complete.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(disk.serve_args(&["--mode", "writethrough"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !disk.socket.exists() {
        assert!(child.try_wait().unwrap().is_none(), "pcache serve exited");
        assert!(t.elapsed().as_secs() < 60, "no socket after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let reply = pcache::control::request(
        &disk.socket.with_extension("ctl"),
        &pcache::control::Request::Status,
    )
    .expect("the control socket answers once the vhost socket exists");
    let st = reply.status.expect("a status");
    assert_eq!(st.mode.to_string(), "writethrough");
    assert_eq!(st.cache.dirty_bytes, 0, "the switch wrote back first");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

/// Size, permission bits and a crc32c of every byte of `path`.
fn fingerprint(path: &std::path::Path) -> (u64, u32, u32) {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(path).unwrap();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut crc = 0u32;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
    (m.len(), m.permissions().mode(), crc)
}

#[test]
fn every_command_that_could_write_a_cache_someone_owns_is_refused_and_changes_nothing() {
    // The owner here is this test, holding the lock pcache takes: each
    // command is refused before it touches the file, so the cache keeps
    // its size, its bytes and its mode, whatever it was asked to do.
    let disk = Disk::new(32 * MIB, None);
    let cache = disk.cache.to_str().unwrap();
    let backing = disk.backing.to_str().unwrap();
    let o = pcache(&[
        "format",
        "--cache",
        cache,
        "--cache-size",
        "512M",
        "--backing",
        backing,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk.cache)
        .unwrap();
    let fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: fcntl with a flock that lives across the call.
    let r = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&held),
            libc::F_OFD_SETLK,
            &fl,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let before = fingerprint(&disk.cache);
    let me = std::process::id();
    let sock = disk.socket.to_str().unwrap();
    let serve = |extra: &[&str]| {
        let mut a = vec![
            "serve",
            "--socket",
            sock,
            "--cache",
            cache,
            "--backing",
            backing,
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let commands: Vec<Vec<String>> = vec![
        ["format", "--cache", cache, "--backing", backing, "--force"]
            .map(String::from)
            .to_vec(),
        [
            "format",
            "--cache",
            cache,
            "--cache-size",
            "1G",
            "--backing",
            backing,
            "--force",
        ]
        .map(String::from)
        .to_vec(),
        [
            "format",
            "--cache",
            cache,
            "--cache-size",
            "512M",
            "--backing",
            backing,
        ]
        .map(String::from)
        .to_vec(),
        ["writeback", "--cache", cache, "--backing", backing]
            .map(String::from)
            .to_vec(),
        serve(&[]),
        serve(&["--format", "--cache-size", "1G"]),
        serve(&["--format", "--data-crc", "--gc-percent", "50"]),
        serve(&["--mode", "writethrough"]),
        serve(&["--read-only"]),
    ];
    for args in &commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = pcache(&args);
        let what = args.join(" ");
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("in use by process {me}")),
            "{what} must name the owner {me}: {}",
            text(&o)
        );
        assert_eq!(
            fingerprint(&disk.cache),
            before,
            "{what} changed the cache it was refused"
        );
        assert!(!disk.socket.exists(), "{what} made its socket");
    }
    drop(held);
    let o = pcache(&["check", "--cache", cache]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `pcache serve` on `socket`, with a new cache and backing file in `dir`,
/// and `extra`.
fn serve_new_in(dir: &Path, socket: &Path, extra: &[&str]) -> Vec<String> {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let mut args: Vec<String> = ["serve", "--socket", socket.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    args.extend([
        "--cache".into(),
        p("cache.img"),
        "--cache-size".into(),
        "512M".into(),
        "--backing".into(),
        p("disk.img"),
        "--backing-size".into(),
        "16M".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn what_pcache_creates_is_not_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // A socket name without `.sock`: its control socket is its name
    // plus `.ctl`, not a name a sibling disk would share.
    let socket = p("vm1.disk0");
    let args = serve_new_in(dir.path(), &socket, &[]);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(&args);
    let server = common::Server::start_cmd(cmd, &socket);
    let ctl = p("vm1.disk0.ctl");
    assert!(ctl.exists(), "no control socket at {}", ctl.display());
    assert!(!p("vm1.ctl").exists());
    for f in ["cache.img", "disk.img", "vm1.disk0", "vm1.disk0.ctl"] {
        let mode = std::fs::metadata(p(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "{f} is mode {mode:o}: other users can reach it"
        );
    }
    drop(server);
}

/// The vhost socket is born with the mode asked for and given its owner
/// and group through a descriptor (nothing changes them by path), and a
/// link left where pcache keeps a lock file is never followed: the file it
/// points to stays as it was, and pcache refuses to start.
#[test]
fn a_socket_is_born_with_its_owner_and_mode_and_no_lock_link_is_followed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let serve = |socket: &Path, extra: &[&str]| serve_new_in(dir.path(), socket, extra);
    let socket = p("vm1.sock");
    let args = serve(
        &socket,
        &[
            "--socket-user",
            "65534",
            "--socket-group",
            "65534",
            "--socket-mode",
            "660",
        ],
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(&args);
    let server = common::Server::start_cmd(cmd, &socket);
    let m = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    server.stop();

    // A link where the next socket's lock file goes.
    let victim = p("victim");
    std::fs::write(&victim, b"someone else's").unwrap();
    std::os::unix::fs::symlink(&victim, p("vm2.sock.lock")).unwrap();
    let o = common::pcache(
        &serve(&p("vm2.sock"), &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!o.status.success(), "{}", common::text(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's");
    assert!(!p("vm2.sock").exists());
}
