//! A panic anywhere ends pcache, so that the next process (systemd's
//! restart, QEMU's reconnect) takes over, rather than a process that goes
//! on with a dead queue and poisoned locks; so does a system call the
//! sandbox forbids, named in the log. Both come from hooks only test
//! builds have (`PCACHE_TEST_PANIC_AT`, `PCACHE_TEST_FORBIDDEN_AT`).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::{check_block, fill_block, Client, Disk, Server};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

#[test]
fn a_panic_in_a_queue_worker_ends_the_process_and_loses_no_completed_write() {
    ends_at_the_40th_request(
        "PCACHE_TEST_PANIC_AT",
        &["a panic ends pcache", "PCACHE_TEST_PANIC_AT=40"],
    );
}

#[test]
fn a_forbidden_system_call_ends_the_process_naming_it_and_loses_no_completed_write() {
    ends_at_the_40th_request(
        "PCACHE_TEST_FORBIDDEN_AT",
        &["the sandbox refused system call ptrace (101) in thread pcache-q0"],
    );
}

/// Serve with the hook `var` set to 40; the 40th request ends the process
/// (SIGABRT) with `says` in its log, and the next process has every write
/// completed before.
fn ends_at_the_40th_request(var: &str, says: &[&str]) {
    let disk = Disk::new(32 * MIB, None);
    let log = disk.dir.path().join("stderr.log");
    let args = disk.serve_args(&["--num-queues", "1", "--cache-size", "512M"]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(&args)
        .env(var, "40")
        .stderr(std::fs::File::create(&log).unwrap());
    let mut server = Server::start_cmd(cmd, &disk.socket);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    for b in 0..39u64 {
        fill_block(&mut c.mem()[..BLOCK], b, 1);
        assert_eq!(c.write_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
    }
    // The 40th request panics its worker: sent, not waited for.
    let p = c.ptr(0);
    c.queues[0].write(39 * BLOCK as u64, p, BLOCK, 1, ReqFlags::empty());
    let mut none = [];
    c.queues[0].do_io(&mut none, 0, None, None).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "pcache still runs 10 s after {var}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "{var} must abort the process: {status}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        says.iter().all(|s| text.contains(s)),
        "the log must say why it ended ({says:?}): {text}"
    );
    drop(c);
    drop(server);
    // The next process has every write the last one completed.
    let server = disk.serve(&["--num-queues", "1"]);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    for b in 0..39u64 {
        assert_eq!(c.read_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
        assert_eq!(check_block(&c.mem()[..BLOCK], b), Ok(1), "block {b}");
    }
    drop(c);
    server.stop();
}
