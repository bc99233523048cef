//! `pcache resize`: the disk grows to the backing file's new size while
//! pcache serves it, the new size survives a restart, a start after the
//! file grew offline grows the disk too, and a shrink is refused.

mod common;

use common::{check_block, fill_block, Client, Disk};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

fn resize(server: &common::Server) -> (bool, String) {
    let ctl = server.control.display().to_string();
    let o = common::pcache(&["resize", "--control", &ctl, "--json"]);
    (o.status.success(), common::text(&o))
}

fn set_len(disk: &Disk, bytes: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.backing)
        .unwrap()
        .set_len(bytes)
        .unwrap();
}

/// Write version `v` of `block` and read it back.
fn write_and_check(c: &mut Client, block: u64, v: u64) {
    fill_block(&mut c.mem()[..BLOCK], block, v);
    assert_eq!(c.write_sync(0, block * BLOCK as u64, 0, BLOCK), 0);
    c.mem()[..BLOCK].fill(0);
    assert_eq!(c.read_sync(0, block * BLOCK as u64, 0, BLOCK), 0);
    assert_eq!(check_block(&c.mem()[..BLOCK], block), Ok(v));
}

#[test]
fn the_disk_grows_online_keeps_its_size_and_never_shrinks() {
    let disk = Disk::new(64 * MIB, None);
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(c.capacity, 64 * MIB);
    let last = 64 * MIB / BLOCK as u64 - 1;
    write_and_check(&mut c, last, 1);
    // Past the end: refused.
    assert_ne!(c.write_sync(0, 64 * MIB, 0, BLOCK), 0);

    // Nothing changed: resize says so.
    let (ok, out) = resize(&server);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["old_bytes"], v["new_bytes"], "{out}");

    set_len(&disk, 200 * MIB);
    let (ok, out) = resize(&server);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["old_bytes"].as_u64(), v["new_bytes"].as_u64()),
        (Some(64 * MIB), Some(200 * MIB)),
        "{out}"
    );
    // The connected client may write past the old end now (libblkio
    // keeps the capacity it read at connect, and pcache checks its own).
    let beyond = 150 * MIB / BLOCK as u64;
    write_and_check(&mut c, beyond, 2);
    drop(c);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(c.capacity, 200 * MIB, "a new client sees the new size");
    let new_last = 200 * MIB / BLOCK as u64 - 1;
    write_and_check(&mut c, new_last, 3);
    let st = common::status(&server);
    assert_eq!(st["backing_bytes"], 200 * MIB, "{st}");
    drop(c);

    // A shrink is refused, and the disk keeps its size.
    set_len(&disk, 100 * MIB);
    let (ok, out) = resize(&server);
    assert!(!ok, "{out}");
    assert!(out.contains("never shrinks"), "{out}");
    server.stop();
    // Nor does pcache start on the smaller file.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(disk.serve_args(&[]))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        common::text(&o).contains("never shrinks"),
        "{}",
        common::text(&o)
    );

    // Back to 200 MiB: the data past the old ends is there after a restart.
    set_len(&disk, 200 * MIB);
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(c.capacity, 200 * MIB);
    for (b, v) in [(last, 1), (beyond, 2), (new_last, 3)] {
        assert_eq!(c.read_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
        assert_eq!(check_block(&c.mem()[..BLOCK], b), Ok(v), "block {b}");
    }
    drop(c);
    server.stop();

    // Grown while pcache was down: the next start grows the disk.
    set_len(&disk, 300 * MIB);
    let server = disk.serve(&[]);
    let c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(c.capacity, 300 * MIB);
    drop(c);
    server.stop();
}
