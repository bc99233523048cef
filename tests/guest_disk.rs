//! What a guest does to its disk besides reading and writing, in a real
//! QEMU guest on pcache: `blkdiscard -z` reads zeros at once and the zeros
//! reach the backing file after a drain; `pcache resize` under the running
//! guest changes `/sys/block/vda/size` without a reboot; `blkdiscard` and
//! `fstrim` on ext4 succeed.
//!
//! Needs what tests/guest.rs needs (scripts/test.sh installs it), plus
//! util-linux's blkdiscard and fstrim in the guest image (images/build.sh
//! copies them). The guest runs under TCG.

use std::time::{Duration, Instant};

#[path = "common/guest.rs"]
mod guest;
use guest::{preflight, serve_cmd, Guest, Server};

const MIB: u64 = 1 << 20;
const GROWN: u64 = 384 * MIB;

/// The guest's script (util-linux's programs by path: busybox's shell
/// prefers its own applets, whose blkdiscard has no -z). It waits (up to 180 s) for the host to grow the
/// disk between the zeroing and the rest.
fn cmd() -> String {
    "set -e\n\
     echo \"LIMITS discard $(cat /sys/block/vda/queue/discard_max_bytes) \
     write_zeroes $(cat /sys/block/vda/queue/write_zeroes_max_bytes)\"\n\
     dd if=/dev/urandom of=/dev/vda bs=1M count=8 2>/dev/null\n\
     sync\n\
     /usr/sbin/blkdiscard -z -o 1048576 -l 4194304 /dev/vda\n\
     echo 3 > /proc/sys/vm/drop_caches\n\
     z=$(head -c 4194304 /dev/zero | md5sum)\n\
     [ \"$(dd if=/dev/vda bs=1M skip=1 count=4 2>/dev/null | md5sum)\" = \"$z\" ] && echo ZEROS_READ\n\
     [ \"$(dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum)\" != \"$(head -c 1048576 /dev/zero | md5sum)\" ] && echo DATA_KEPT\n\
     old=$(cat /sys/block/vda/size)\n\
     echo \"ZEROED size $old\"\n\
     i=0\n\
     while [ \"$(cat /sys/block/vda/size)\" = \"$old\" ]; do\n\
       sleep 1; i=$((i+1)); [ $i -lt 180 ] || { echo NO_RESIZE; exit 3; }\n\
     done\n\
     echo \"NEW_SIZE $(cat /sys/block/vda/size)\"\n\
     /usr/sbin/blkdiscard -o 16777216 -l 16777216 /dev/vda && echo DISCARD_OK\n\
     mkfs.ext4 -q -F /dev/vda\n\
     mount /dev/vda /mnt\n\
     dd if=/dev/urandom of=/mnt/f bs=1M count=32 2>/dev/null\n\
     sync\n\
     rm /mnt/f\n\
     sync\n\
     /usr/sbin/fstrim -v /mnt\n\
     echo FSTRIM_OK\n\
     umount /mnt\n"
        .into()
}

fn ctl(dir: &std::path::Path) -> String {
    dir.join("vub.ctl").display().to_string()
}

fn pcache(args: &[&str]) -> (bool, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(args)
        .output()
        .expect("run pcache");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn guest_zeroes_discards_trims_and_sees_its_disk_grow() {
    let t0 = Instant::now();
    preflight();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vub.sock");
    let server = Server::start(
        serve_cmd(
            dir.path(),
            &sock,
            "1",
            &[
                "--cache-size",
                "512M",
                "--backing-size",
                "256M", // grown to GROWN below
                "--format",
                // Nothing reaches the disk before the test's drain.
                "--writeback-idle-ms",
                "3600000",
                "--writeback-max-age",
                "3600",
            ],
        ),
        dir.path(),
        &sock,
        "serve",
    );
    let mut g = Guest::boot(&sock, &cmd(), "guest", &[("PCACHE_GUEST_QUEUES", "1")]);
    assert!(
        g.wait_for("ZEROED", Duration::from_secs(300)),
        "the guest never got to its zeroing; see its console above"
    );
    assert!(
        g.printed("ZEROS_READ"),
        "the zeroed range did not read zeros"
    );
    assert!(
        g.printed("DATA_KEPT"),
        "data next to the zeroed range was lost"
    );

    // The zeros reach the backing file.
    let (ok, out) = pcache(&["drain", "--control", &ctl(dir.path()), "--timeout", "120"]);
    assert!(ok, "{out}");
    let disk = std::fs::read(dir.path().join("disk.img")).expect("read disk.img");
    assert!(
        disk[MIB as usize..5 * MIB as usize].iter().all(|b| *b == 0),
        "the backing file does not hold the zeros after the drain"
    );
    assert!(
        disk[..MIB as usize].iter().any(|b| *b != 0),
        "the guest's data did not reach the backing file"
    );

    // Grow the disk under the running guest.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("disk.img"))
        .expect("open disk.img")
        .set_len(GROWN)
        .expect("grow disk.img");
    let (ok, out) = pcache(&["resize", "--control", &ctl(dir.path()), "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("resize JSON");
    assert_eq!(v["new_bytes"], GROWN, "{out}");
    assert_eq!(v["guest_notified"], true, "QEMU was not told: {out}");

    let (st, lines) = g.finish();
    assert!(
        st.success(),
        "the guest failed ({st}); see its console above and the server log below"
    );
    let has = |t: &str| lines.iter().any(|l| l.contains(t));
    let limits = lines
        .iter()
        .find(|l| l.contains("LIMITS"))
        .expect("a LIMITS line");
    assert!(
        !limits.contains("discard 0 ") && !limits.ends_with("write_zeroes 0"),
        "the guest sees no discard or write-zeroes: {limits}"
    );
    assert!(
        has(&format!("NEW_SIZE {}", GROWN / 512)),
        "the guest did not see the new size"
    );
    assert!(has("DISCARD_OK") && has("FSTRIM_OK") && has("trimmed"));
    let st = {
        let r = pcache::control::request(
            &dir.path().join("vub.ctl"),
            &pcache::control::Request::Status,
        )
        .expect("status");
        r.status.expect("a status")
    };
    assert!(st.stats.zeroed_bytes > 16 * MIB, "{:?}", st.stats);
    server.stop();
    println!(
        "guest disk test: TIMING total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
