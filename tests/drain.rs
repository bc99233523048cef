//! `pcache drain`: everything dirty is written back now, whatever the
//! writeback policy says, and the command returns once nothing is dirty
//! (or fails after its timeout, in front of a slow disk).

mod common;
#[path = "common/throttle.rs"]
mod throttle;

use std::io::{Read, Seek, SeekFrom};

use common::{check_block, fill_block, Client, Disk, Server};
use throttle::{Limits, Throttle};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

/// A policy that would write nothing back for an hour.
const LAZY: [&str; 6] = [
    "--writeback-idle-ms",
    "3600000",
    "--writeback-max-age",
    "3600",
    "--writeback-high",
    "100",
];

fn dirty_bytes(ctl: &str) -> u64 {
    let o = common::pcache(&["status", "--control", ctl, "--json"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["dirty_bytes"].as_u64().unwrap()
}

/// Write `n` blocks of version 1, unflushed, at QD1.
fn write_blocks(c: &mut Client, n: u64) {
    for b in 0..n {
        fill_block(&mut c.mem()[..BLOCK], b, 1);
        assert_eq!(c.write_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
    }
}

#[test]
fn drain_writes_back_everything_now_and_returns_when_nothing_is_dirty() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&LAZY);
    let ctl = server.control.to_str().unwrap().to_owned();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    let blocks = 32 * MIB / BLOCK as u64;
    write_blocks(&mut c, blocks);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(dirty_bytes(&ctl) > 0, "nothing dirty before the drain");

    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "120", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["drained"], true, "{v}");
    assert_eq!(v["dirty_bytes"], 0, "{v}");
    assert!(v["written_back_bytes"].as_u64().unwrap() >= 32 * MIB, "{v}");
    assert_eq!(dirty_bytes(&ctl), 0);

    // The backing file alone holds every block (pcache still runs: the
    // drain, not a stop, put it there).
    let mut f = std::fs::File::open(&disk.backing).unwrap();
    let mut buf = vec![0u8; BLOCK];
    for b in 0..blocks {
        f.seek(SeekFrom::Start(b * BLOCK as u64)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(check_block(&buf, b), Ok(1), "block {b} in the backing file");
    }
    // Text output says what it did.
    write_blocks(&mut c, 16);
    let o = common::pcache(&["drain", "--control", &ctl]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("drained:"),
        "{}",
        common::text(&o)
    );
    drop(c);
    server.stop();
}

#[test]
fn drain_in_front_of_a_slow_disk_times_out_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Throttle::new(
        dir.path(),
        Limits {
            read_iops: 100_000,
            write_bps: MIB,
        },
    )
    .unwrap_or_else(|e| panic!("this test needs a slow backing disk: {e}"));
    let disk = Disk {
        cache: dir.path().join("cache.img"),
        backing: dir.path().join("disk.img"),
        socket: dir.path().join("vhost.sock"),
        dir,
    };
    std::fs::File::create(&disk.backing)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(["serve", "--socket"])
        .arg(&disk.socket)
        .arg("--cache")
        .arg(&disk.cache)
        .args(["--cache-size", "512M", "--backing"])
        .arg(&disk.backing)
        .args(LAZY);
    let server = Server::start_cmd(slow.wrap(&cmd), &disk.socket);
    let ctl = server.control.to_str().unwrap().to_owned();
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    write_blocks(&mut c, 16 * MIB / BLOCK as u64);
    let t = std::time::Instant::now();
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("drain timed out after"),
        "{}",
        common::text(&o)
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(dirty_bytes(&ctl) > 0);
    // A bad timeout is a usage error.
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "soon"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    drop(c);
    server.kill();
}
