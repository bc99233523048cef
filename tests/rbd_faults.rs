//! The Ceph cluster failing under a running pcache: the test cluster's only
//! OSD stopped while the guest writes. Writes keep completing into the
//! cache; a read the cache cannot serve fails with an I/O error after the
//! read timeout instead of hanging its queue; writeback waits; and once the
//! OSD is back everything reaches the image.
//!
//! One test in its own binary: it stops the OSD every RBD test shares.

mod common;

use std::time::{Duration, Instant};

use common::ceph::{self, Image};
use common::{
    check_block, status, verify_all_blocks, write_all_blocks, Client, Disk, TEST_BLOCK as BLOCK,
};

const MIB: u64 = 1 << 20;

/// Starts the OSD again if the test fails while it is stopped.
struct OsdGuard(bool);

impl Drop for OsdGuard {
    fn drop(&mut self) {
        if self.0 {
            ceph::start_osd();
        }
    }
}

#[test]
fn osd_down_writes_complete_into_the_cache_misses_fail_in_bounded_time_nothing_is_lost() {
    // An image whose every block holds version 7.
    let blocks = 32 * MIB / BLOCK as u64;
    let disk = Disk::on_image(Image::filled("faults", 32 * MIB, 7));
    let server = disk.serve(&["--backing-read-timeout", "3", "--sequential-cutoff", "0"]);
    let mut c = Client::connect(&disk.socket, 1, 8 << 20);
    // The first half of the disk gets version 1 (cached, dirty).
    let half = blocks / 2;
    write_all_blocks(&mut c, 0, half, 1);
    assert_eq!(c.flush_sync(0), 0);

    ceph::stop_osd();
    let mut osd = OsdGuard(true);
    // Writes to the whole first half complete at cache speed.
    let t = Instant::now();
    write_all_blocks(&mut c, 0, half, 2);
    assert_eq!(c.flush_sync(0), 0);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "writes with the OSD down took {took:?}"
    );
    // Cached data reads fine.
    verify_all_blocks(&mut c, 0, half, |_| 2);
    // A miss fails after the read timeout (3 s), not never.
    let t = Instant::now();
    let ret = c.read_sync(0, (blocks - 1) * BLOCK as u64, 0, BLOCK);
    let took = t.elapsed();
    assert_ne!(ret, 0, "a read miss succeeded with the OSD down");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "a read miss failed after {took:?}, not after the 3 s read timeout"
    );
    // Writeback cannot finish while the OSD is down: a drain times out.
    let ctl = server.control.display().to_string();
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "3"]);
    assert!(
        !o.status.success(),
        "a drain finished with the OSD down: {}",
        common::text(&o)
    );
    assert!(status(&server)["dirty_bytes"].as_u64().unwrap() > 0);

    ceph::start_osd();
    osd.0 = false;
    // The same miss now succeeds, and writeback completes.
    assert_eq!(c.read_sync(0, (blocks - 1) * BLOCK as u64, 0, BLOCK), 0);
    assert_eq!(check_block(&c.mem()[..BLOCK], blocks - 1).unwrap(), 7);
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "120"]);
    assert!(
        o.status.success(),
        "no drain within 120 s of the OSD's return: {}",
        common::text(&o)
    );
    assert_eq!(status(&server)["dirty_bytes"].as_u64(), Some(0));
    drop(c);
    server.stop();
    let image = disk.image.as_ref().expect("an rbd disk");
    image.check(|b| if b < half { 2 } else { 7 });
}
