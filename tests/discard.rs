//! DISCARD and WRITE_ZEROES through a real `pcache serve` and libblkio:
//! the ranges read zeros at once and after a SIGKILL, the zeros reach the
//! backing file on a drain (deallocated where the guest allowed it), and
//! requests the device cannot take are refused.

mod common;

use std::os::unix::fs::MetadataExt;

use blkio::ReqFlags;
use common::{check_block, fill_block, Client, Disk};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const BLOCKS: u64 = DISK / BLOCK as u64;

/// A disk whose every block holds its version 1.
fn disk_of_version_1() -> Disk {
    let disk = Disk::new(DISK, None);
    let mut bytes = vec![0u8; DISK as usize];
    for (b, buf) in bytes.chunks_mut(BLOCK).enumerate() {
        fill_block(buf, b as u64, 1);
    }
    std::fs::write(&disk.backing, bytes).unwrap();
    disk
}

fn zeroes(c: &mut Client, off: u64, len: u64, discard: bool, flags: ReqFlags) -> i32 {
    if discard {
        c.queues[0].discard(off, len, 9, flags);
    } else {
        c.queues[0].write_zeroes(off, len, 9, flags);
    }
    c.reap(0, 1)[0].1
}

/// Read the whole disk and check each block against `want` (0: zeros).
fn verify(c: &mut Client, want: &[u64], when: &str) {
    let chunk = 256 * BLOCK;
    for first in (0..BLOCKS).step_by(256) {
        assert_eq!(c.read_sync(0, first * BLOCK as u64, 0, chunk), 0);
        for i in 0..256 {
            let b = first + i;
            let got = check_block(&c.mem()[i as usize * BLOCK..(i as usize + 1) * BLOCK], b)
                .unwrap_or_else(|e| panic!("{when}: {e}"));
            assert_eq!(got, want[b as usize], "{when}: block {b}");
        }
    }
}

#[test]
fn discard_and_write_zeroes_read_zeros_survive_a_kill_and_reach_the_backing_file() {
    let disk = disk_of_version_1();
    // Nothing is written back until the drain.
    let idle = [
        "--writeback-idle-ms",
        "3600000",
        "--writeback-max-age",
        "3600",
    ];
    let server = disk.serve(&idle);
    let mut c = Client::connect(&disk.socket, 1, 2 << 20);
    let mut want = vec![1u64; BLOCKS as usize];
    // Dirty data over the first 16 MiB, version 2.
    for b in 0..16 * MIB / BLOCK as u64 {
        fill_block(&mut c.mem()[..BLOCK], b, 2);
        assert_eq!(c.write_sync(0, b * BLOCK as u64, 0, BLOCK), 0);
        want[b as usize] = 2;
    }
    // A discard over dirty data, across 4 MiB regions.
    assert_eq!(zeroes(&mut c, 2 * MIB, 9 * MIB, true, ReqFlags::empty()), 0);
    // Write-zeroes that may unmap, over data only the backing file holds.
    assert_eq!(
        zeroes(&mut c, 20 * MIB, 12 * MIB, false, ReqFlags::empty()),
        0
    );
    // Write-zeroes that must keep the blocks allocated.
    assert_eq!(
        zeroes(&mut c, 40 * MIB, 4 * MIB, false, ReqFlags::NO_UNMAP),
        0
    );
    for r in [(2, 11), (20, 32), (40, 44)] {
        for b in r.0 * MIB / BLOCK as u64..r.1 * MIB / BLOCK as u64 {
            want[b as usize] = 0;
        }
    }
    // A write after a discard wins over it.
    fill_block(&mut c.mem()[..BLOCK], 600, 3);
    assert_eq!(c.write_sync(0, 600 * BLOCK as u64, 0, BLOCK), 0);
    want[600] = 3;
    verify(&mut c, &want, "right after the zeroing");

    // Out of range and oversized requests fail; nothing changes.
    assert_ne!(
        zeroes(&mut c, DISK - 4096, 8192, true, ReqFlags::empty()),
        0
    );
    assert_ne!(
        zeroes(&mut c, 0, 2048 * MIB, false, ReqFlags::empty()),
        0,
        "a range past max_write_zeroes_sectors"
    );

    // SIGKILL without a flush: the zeroing completed, so it survives.
    drop(c);
    server.kill();
    let server = disk.serve(&idle);
    let mut c = Client::connect(&disk.socket, 1, 2 << 20);
    verify(&mut c, &want, "after SIGKILL and a restart");
    let st = common::status(&server);
    assert_eq!(st["dirty_zero_bytes"], 25 * MIB, "{st}");

    let blocks_before = std::fs::metadata(&disk.backing).unwrap().blocks() * 512;
    let ctl = server.control.display().to_string();
    let o = common::pcache(&["drain", "--control", &ctl, "--timeout", "120"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let st = common::status(&server);
    assert_eq!(st["dirty_zero_bytes"], 0, "{st}");
    assert_eq!(st["dirty_bytes"], 0, "{st}");
    // The backing file alone now holds what the guest sees.
    let file = std::fs::read(&disk.backing).unwrap();
    for (b, v) in want.iter().enumerate() {
        let got = check_block(&file[b * BLOCK..(b + 1) * BLOCK], b as u64)
            .unwrap_or_else(|e| panic!("backing file: {e}"));
        assert_eq!(got, *v, "backing file block {b}");
    }
    // The discard and the unmapping write-zeroes were punched out (21 MiB
    // less block 600), the NO_UNMAP range kept its blocks.
    let blocks_after = std::fs::metadata(&disk.backing).unwrap().blocks() * 512;
    let freed = blocks_before - blocks_after;
    assert!(
        (19 * MIB..=21 * MIB).contains(&freed),
        "{freed} bytes deallocated, want about 20 MiB"
    );
    verify(&mut c, &want, "after the drain");
    drop(c);
    server.stop();
}
