//! pcache in front of an RBD image restarted under a running QEMU guest
//! (`reconnect=1`), by SIGKILL and by SIGTERM in turn: each new pcache must
//! take the image's exclusive lock from the one before (released at a
//! clean stop, broken after a kill) fast enough that the guest never sees
//! an I/O error, and the guest's fio crc32c passes and an ext4 file verify
//! across the restarts. Writeback runs all along (`--writeback-high 0`), so
//! restarts also read back what already reached the image.
//!
//! Needs what tests/guest.rs needs, and the test Ceph cluster.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
#[path = "common/guest.rs"]
mod guest;

use guest::{md5s, preflight, serve_cmd_on, Guest, Server};

const QUEUES: &str = "2";
const RESTARTS: usize = 6;
/// Seconds the guest keeps writing once the restarts begin.
const RUN_SECS: u64 = 45;

fn guest_cmd() -> String {
    format!(
        r#"set -e
d=/dev/vda
mkfs.ext4 -q -F $d 64M
mount $d /mnt
dd if=/dev/urandom of=/mnt/keep bs=1M count=2 2>/dev/null
sync
set -- $(md5sum /mnt/keep); echo "MD5 $1 before"
W="fio --filename=$d --iodepth=16 --ioengine=libaio --direct=1 --eta=never --output=/tmp/fio --verify=crc32c --name=w --rw=randwrite --bs=4k --size=16M"
up() {{ cut -d. -f1 /proc/uptime; }}
end=$(( $(up) + {run} ))
echo RESTARTS-GO
p=0
while [ $(up) -lt $end ]; do
 r=$((p % 4)); p=$((p + 1))
 $W --offset=$((64 + 16 * r))M --randseed=$p || {{ cat /tmp/fio; exit 1; }}
 echo "PASS $p region $r verified"
done
echo RESTARTS-STOP
echo 3 >/proc/sys/vm/drop_caches
set -- $(md5sum /mnt/keep); echo "MD5 $1 after"
umount /mnt
if dmesg | grep -iE "I/O error|blk_update|Buffer I/O|timeout"; then exit 1; fi
echo DMESG-CLEAN
"#,
        run = RUN_SECS,
    )
}

#[test]
fn a_guest_on_rbd_verifies_every_write_across_restarts_of_pcache() {
    let t0 = Instant::now();
    preflight();
    let image = common::ceph::Image::create("restart", 256 << 20);
    let spec = image.spec();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vub.sock");
    let cache = dir.path().join("cache.img");
    let serve = |n: usize| {
        let cmd = serve_cmd_on(
            &cache,
            Path::new(&spec),
            &sock,
            QUEUES,
            &["--cache-size", "512M", "--writeback-high", "0"],
        );
        let t = Instant::now();
        let s = Server::start(cmd, dir.path(), &sock, &format!("serve-{n}"));
        (s, t.elapsed())
    };
    let (mut server, _) = serve(0);
    let mut g = Guest::boot(
        &sock,
        &guest_cmd(),
        "rbd-restarts",
        &[
            ("PCACHE_GUEST_QUEUES", QUEUES),
            ("PCACHE_GUEST_RECONNECT", "1"),
        ],
    );
    assert!(
        g.wait_for("RESTARTS-GO", Duration::from_secs(180)),
        "the guest did not get to its workload"
    );
    let mut restarts = 0;
    let mut slowest = Duration::ZERO;
    while !g.printed("RESTARTS-STOP") && restarts < 3 * RESTARTS {
        std::thread::sleep(Duration::from_secs(3));
        let how = if restarts % 2 == 0 {
            "SIGKILL"
        } else {
            "SIGTERM"
        };
        if how == "SIGKILL" {
            server.kill();
        } else {
            server.stop_within(Duration::from_secs(60));
        }
        restarts += 1;
        let (s, took) = serve(restarts);
        server = s;
        slowest = slowest.max(took);
        println!(
            "rbd restart test: restart {restarts} by {how}, serving again after {:.2} s",
            took.as_secs_f64()
        );
    }
    let (st, lines) = g.finish();
    assert!(
        st.success(),
        "the guest failed ({st}): see its console above\n{}",
        server.log_text()
    );
    let sums = md5s(&lines);
    assert!(sums.contains_key("before"), "no MD5 lines: {sums:?}");
    assert_eq!(
        sums.get("before"),
        sums.get("after"),
        "the ext4 file changed: {sums:?}"
    );
    let passes = lines.iter().filter(|l| l.contains("PASS ")).count();
    assert!(
        passes >= 3,
        "only {passes} fio passes completed during the restarts"
    );
    assert!(lines.iter().any(|l| l.contains("DMESG-CLEAN")));
    server.stop();
    assert!(
        restarts >= RESTARTS,
        "only {restarts} restarts in {RUN_SECS} s"
    );
    assert!(
        slowest < Duration::from_secs(10),
        "a restart took {slowest:?} to serve again: the image lock was not taken over at once"
    );
    println!(
        "rbd restart test: {restarts} restarts, slowest {:.2} s, {passes} verified fio passes, {:.1} s",
        slowest.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
