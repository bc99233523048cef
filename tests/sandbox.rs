//! `pcache serve` confines itself by default: every thread has
//! no_new_privs and the seccomp allowlist, the main thread no capability
//! left, landlock keeps it out of other tenants' files, and `--user` runs
//! it as that user with no capability anywhere. (The rest of the suite
//! runs with the same defaults, so every path proves its allowlist.)

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{verify_all_blocks, write_all_blocks, Client, Disk, Server};

const MIB: u64 = 1 << 20;

/// `Name:` fields of /proc/PID/task/TID/status, for every thread.
fn threads(pid: u32) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(s) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // a thread that just ended
        };
        out.push(
            s.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect(),
        );
    }
    out
}

fn write_and_verify(c: &mut Client, version: u64) {
    write_all_blocks(c, 0, 64, version);
    verify_all_blocks(c, 0, 64, |_| version);
}

#[test]
fn a_default_serve_has_seccomp_and_no_new_privs_on_every_thread_and_stays_out_of_other_files() {
    let disk = Disk::new(32 * MIB, None);
    // Another tenant's file, and one every process may read.
    let other = tempfile::tempdir().unwrap();
    let secret = other.path().join("their-cache.img");
    std::fs::write(&secret, b"not yours").unwrap();
    let log = disk.dir.path().join("stderr.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(disk.serve_args(&["--num-queues", "2", "--cache-size", "512M"]))
        .env(
            "PCACHE_TEST_TRY_READ",
            format!("{}:/etc/hostname", secret.display()),
        )
        .stderr(std::fs::File::create(&log).unwrap());
    let server = Server::start_cmd(cmd, &disk.socket);
    let mut c = Client::connect(&disk.socket, 2, 1 << 20);
    write_and_verify(&mut c, 1);
    let ts = threads(server.child.id());
    assert!(ts.len() > 4, "only {} threads", ts.len());
    for t in &ts {
        let name = &t["Name"];
        assert_eq!(t["Seccomp"], "2", "thread {name}: {t:?}");
        assert_eq!(t["NoNewPrivs"], "1", "thread {name}");
    }
    let main = ts.iter().find(|t| t["Pid"] == t["Tgid"]).unwrap();
    assert_eq!(main["CapEff"], "0000000000000000");
    assert_eq!(main["CapPrm"], "0000000000000000");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("test read {}: denied", secret.display())),
        "{text}"
    );
    assert!(text.contains("test read /etc/hostname: allowed"), "{text}");
    drop(c);
    server.stop();
}

#[test]
fn with_user_every_thread_runs_as_that_user_without_capabilities() {
    let disk = Disk::new(32 * MIB, None);
    let server = disk.serve(&["--num-queues", "1", "--user", "65534", "--group", "65534"]);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_and_verify(&mut c, 1);
    for t in threads(server.child.id()) {
        let name = &t["Name"];
        assert!(
            t["Uid"].split_whitespace().all(|u| u == "65534"),
            "thread {name}: {t:?}"
        );
        assert!(
            t["Gid"].split_whitespace().all(|g| g == "65534"),
            "thread {name}: {t:?}"
        );
        assert_eq!(t["CapEff"], "0000000000000000", "thread {name}");
        assert_eq!(t["CapPrm"], "0000000000000000", "thread {name}");
        assert_eq!(t["Seccomp"], "2", "thread {name}");
    }
    drop(c);
    server.stop();
    // What it wrote as that user is there for the next process.
    let server = disk.serve(&["--num-queues", "1"]);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    verify_all_blocks(&mut c, 0, 64, |_| 1);
    drop(c);
    server.stop();
}
