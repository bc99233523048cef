//! `pcache serve` in front of a Ceph RBD image on the test cluster
//! (`scripts/ceph-cluster.sh`, started by `scripts/test.sh`), driven by a
//! real vhost-user-blk client: the whole disk written and read back, what
//! the image alone holds after `pcache writeback` (read through
//! qemu-storage-daemon's own rbd driver), SIGKILL after a FLUSH, misses
//! served from the image, the exclusive lock, and `rbd resize` reaching the
//! disk while pcache serves.
//!
//! Without a cluster these tests fail and say how to start one.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ceph::{self, Image};
use common::{
    check_block, fill_block, pcache, status, text, verify_all_blocks, write_all_blocks, Client,
    Disk, Server, TEST_BLOCK as BLOCK,
};

const MIB: u64 = 1 << 20;

/// qemu-storage-daemon exporting `image` over vhost-user-blk with its own
/// rbd driver (no pcache), killed on drop.
struct Qsd(Child);

impl Qsd {
    fn start(image: &Image, sock: &Path) -> Qsd {
        let (pool, name) = image.name.split_once('/').expect("pool/name");
        let conf = ceph::conf();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=rbd,node-name=disk,pool={pool},image={name},conf={},user=admin,cache.direct=on",
                conf.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-storage-daemon (apt-get install qemu-system-common qemu-block-extra)");
        let mut q = Qsd(child);
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if let Ok(Some(st)) = q.0.try_wait() {
                panic!("qemu-storage-daemon exited before listening: {st} (is qemu-block-extra installed?)");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "qemu-storage-daemon did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        q
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn whole_image_through_the_cache_then_written_back_is_what_qemus_rbd_driver_reads() {
    let disk = Disk::rbd("whole", 64 * MIB);
    let server = disk.serve(&["--num-queues", "2", "--sequential-cutoff", "0"]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    assert_eq!(c.capacity, 64 * MIB);
    let blocks = 64 * MIB / BLOCK as u64;
    write_all_blocks(&mut c, 0, blocks, 1);
    verify_all_blocks(&mut c, 0, blocks, |_| 1);
    drop(c);
    server.stop();

    // A clean restart serves the same data.
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    verify_all_blocks(&mut c, 0, blocks, |_| 1);
    drop(c);
    server.stop();

    let o = pcache(&[
        "writeback",
        "--cache",
        &disk.cache.display().to_string(),
        "--backing",
        &disk.backing_arg(),
    ]);
    assert!(o.status.success(), "pcache writeback: {}", text(&o));

    // The image alone, through QEMU's own rbd driver.
    let sock = disk.dir.path().join("qsd.sock");
    let image = disk.image.as_ref().expect("an rbd disk");
    let _qsd = Qsd::start(image, &sock);
    let mut c = Client::connect(&sock, 1, 8 << 20);
    assert_eq!(c.capacity, 64 * MIB);
    verify_all_blocks(&mut c, 0, blocks, |_| 1);
}

#[test]
fn sigkill_after_a_flush_loses_nothing_and_the_next_pcache_takes_the_lock_at_once() {
    let disk = Disk::rbd("kill", 32 * MIB);
    let blocks = 32 * MIB / BLOCK as u64;
    let server = disk.serve(&["--sequential-cutoff", "0", "--writeback-high", "0"]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    write_all_blocks(&mut c, 0, blocks, 3);
    assert_eq!(c.flush_sync(0), 0);
    drop(c);
    server.kill();

    // The dead pcache still holds the image's lock as far as Ceph knows;
    // the next one on the same cache breaks it instead of waiting ~30 s
    // for the cluster to time the dead client out.
    let t = Instant::now();
    let server = disk.serve(&[]);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "restart after SIGKILL took {took:?}: the dead owner's lock was not broken"
    );
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    verify_all_blocks(&mut c, 0, blocks, |_| 3);
    drop(c);
    server.stop();
}

#[test]
fn misses_in_flight_together_come_from_the_image_then_hit() {
    let blocks = 16 * MIB / BLOCK as u64;
    let disk = Disk::on_image(Image::filled("miss", 16 * MIB, 7));
    let server = disk.serve(&[]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    // 32 single-block reads in flight at once, all misses.
    for i in 0..32usize {
        let p = c.ptr(i * BLOCK);
        c.queues[0].read(
            i as u64 * 97 * BLOCK as u64,
            p,
            BLOCK,
            i,
            blkio::ReqFlags::empty(),
        );
    }
    let mut done = 0;
    while done < 32 {
        for (i, ret) in c.reap(0, 1) {
            assert_eq!(ret, 0, "miss {i} failed");
            let got = check_block(&c.mem()[i * BLOCK..(i + 1) * BLOCK], i as u64 * 97).unwrap();
            assert_eq!(got, 7);
            done += 1;
        }
    }
    let misses = status(&server)["read_misses"].as_u64().expect("misses");
    assert!(misses >= 32, "status counted {misses} misses");
    verify_all_blocks(&mut c, 0, blocks, |_| 7);
    drop(c);
    server.stop();
}

#[test]
fn the_exclusive_lock_keeps_a_second_pcache_and_qemu_from_writing() {
    let disk = Disk::rbd("lock", 16 * MIB);
    let server = disk.serve(&[]);
    let image = disk.image.as_ref().expect("an rbd disk");
    let phase = |s: &Server| status(s)["frontend"]["migration"]["phase"].clone();
    // Nothing is claimed before a guest starts (a live migration's
    // destination waits so while the source writes).
    assert_eq!(phase(&server), "standby");
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    fill_block(&mut c.mem()[..BLOCK], 0, 1);
    assert_eq!(c.write_sync(0, 0, 0, BLOCK), 0);
    assert_eq!(phase(&server), "serving");

    // A second pcache (another cache) on the same image starts...
    let other = tempfile::tempdir().unwrap();
    let sock = other.path().join("s.sock");
    let log = other.path().join("pcache.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args([
        "serve",
        "--socket",
        &sock.display().to_string(),
        "--cache",
        &other.path().join("cache.img").display().to_string(),
        "--cache-size",
        "512M",
        "--backing",
        &disk.backing_arg(),
    ])
    .stderr(std::fs::File::create(&log).unwrap());
    let second = Server::start_cmd(cmd, &sock);
    assert_eq!(phase(&second), "standby");
    // ...but its guest cannot while the first one holds the image.
    let refused = Client::try_connect(&sock, 1, 1 << 20, false);
    assert!(refused.is_err(), "a guest started on a second pcache");
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(
        out.contains("exclusive lock is held by another client"),
        "unclear refusal: {out}"
    );
    assert_eq!(phase(&second), "standby");

    // QEMU's own driver opens the image, but its writes are refused.
    let qsd = other.path().join("qsd.sock");
    assert_ne!(qsd_write(image, &qsd), 0, "QEMU wrote behind pcache's back");

    // Once the first pcache stops cleanly the lock is free at once: the
    // second one's guest starts and reads what the first one wrote.
    drop(c);
    server.stop();
    let mut c =
        Client::try_connect(&sock, 1, 1 << 20, false).expect("the lock was not released at stop");
    assert_eq!(c.read_sync(0, 0, 0, BLOCK), 0);
    assert_eq!(check_block(&c.mem()[..BLOCK], 0), Ok(1));
    assert_eq!(phase(&second), "serving");
    assert_ne!(
        qsd_write(image, &qsd),
        0,
        "QEMU wrote behind the second pcache's back"
    );
    drop(c);
    second.stop();
    assert_eq!(
        qsd_write(image, &qsd),
        0,
        "the lock was not released at stop"
    );
}

/// One 4 KiB write to `image` through qemu-storage-daemon's rbd driver
/// (listening on `sock`): its status (0 or -errno).
fn qsd_write(image: &Image, sock: &Path) -> i32 {
    let _qsd = Qsd::start(image, sock);
    let mut c = Client::connect(sock, 1, 1 << 20);
    c.write_sync(0, 0, 0, BLOCK)
}

#[test]
fn rbd_resize_while_serving_grows_the_disk() {
    let disk = Disk::rbd("grow", 32 * MIB);
    let server = disk.serve(&[]);
    let c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(c.capacity, 32 * MIB);
    drop(c);
    let image = disk.image.as_ref().expect("an rbd disk");
    ceph::rbd(&["resize", "--no-progress", "--size", "96M", &image.name]);
    assert_eq!(image.size(), 96 * MIB);
    let t = Instant::now();
    loop {
        let size = status(&server)["backing_bytes"].as_u64();
        if size == Some(96 * MIB) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the disk is still {size:?} bytes 20 s after `rbd resize`"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = Client::connect(&disk.socket, 1, 1 << 20);
    assert_eq!(c.capacity, 96 * MIB);
    // The new end is usable.
    fill_block(&mut c.mem()[..BLOCK], 96 * MIB / BLOCK as u64 - 1, 1);
    assert_eq!(c.write_sync(0, 96 * MIB - BLOCK as u64, 0, BLOCK), 0);
    drop(c);
    server.stop();
}
