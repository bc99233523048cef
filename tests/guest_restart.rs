//! pcache restarted again and again under a running guest, as upgrades,
//! crashes and OOM kills do: QEMU reconnects (`reconnect=1`) and the guest
//! must never see a completed write lost, a request run twice, or an I/O
//! error.
//!
//! The backing disk is slowed for real by the kernel (a block-I/O cgroup,
//! `common/throttle.rs`), the cache is on tmpfs: reads that miss wait on
//! the disk, and writeback is slower than the guest's writes, so the cache
//! fills and writers wait for space. The guest keeps an ext4 file, reads what is not cached, and runs
//! fio passes with crc32c verification over four regions while the test
//! restarts pcache, alternating SIGKILL and SIGTERM, each time waiting
//! (briefly) for reads or writes to be waiting inside pcache. At the end
//! the guest verifies every region again, re-reads the ext4 file and checks
//! its kernel log.
//!
//! Guards against: keys of open ksets lost with the process, requests in
//! flight lost or run twice across a restart (inflight region), a SIGTERM
//! that drops what the queues had taken, and the guest's I/O erroring out
//! while pcache is away.

use std::path::Path;
use std::time::{Duration, Instant};

use pcache::control::{request, Frontend, Request};

#[path = "common/guest.rs"]
mod guest;
#[path = "common/throttle.rs"]
mod throttle;

use guest::{md5s, preflight, serve_cmd_on, Guest, Server};
use throttle::{Limits, Throttle};

const QUEUES: &str = "2";
const MIB: u64 = 1 << 20;
/// Where the guest reads what is not cached (written here first, so the
/// backing disk really has to be read).
const MISS_OFF: u64 = 640 * MIB;
const MISS_LEN: u64 = 64 * MIB;
/// Restarts asked for at least.
const RESTARTS: usize = 10;
/// Seconds the guest keeps writing once the restarts begin.
const RUN_SECS: u64 = 100;

/// The guest: ext4 with a file, a reader of uncached data, a sequential
/// pass that fills the cache, then 4 KiB random passes over four small
/// regions until `RUN` seconds after the restarts began; each pass is
/// verified as it ends, the last once more after the restarts; then the
/// file is read again and the kernel log checked.
fn guest_cmd() -> String {
    format!(
        r#"set -e
d=/dev/vda
mkfs.ext4 -q -F $d 64M
mount $d /mnt
dd if=/dev/urandom of=/mnt/keep bs=1M count=2 2>/dev/null
sync
set -- $(md5sum /mnt/keep); echo "MD5 $1 before"
F="fio --filename=$d --iodepth=16 --ioengine=libaio --direct=1 --eta=never --output=/tmp/fio --verify=crc32c"
W="$F --name=w --rw=randwrite --bs=4k --size=32M"
up() {{ cut -d. -f1 /proc/uptime; }}
end=$(( $(up) + {run} ))
echo RESTARTS-GO
$F --name=miss --rw=randread --bs=4k --offset={mo}M --size={ml}M --time_based --runtime={run} --verify=0 &
m=$!
$F --name=fill --rw=write --bs=1M --offset=64M --size=384M || {{ cat /tmp/fio; exit 1; }}
echo "PASS fill verified"
p=0
while [ $(up) -lt $end ]; do
 r=$((p % 4)); p=$((p + 1))
 $W --offset=$((448 + 32 * r))M --randseed=$p || {{ cat /tmp/fio; exit 1; }}
 echo "PASS $p region $r verified"
done
echo RESTARTS-STOP
wait $m
$W --offset=$((448 + 32 * r))M --randseed=$p --verify_only || {{ cat /tmp/fio; exit 1; }}
echo "REVERIFY region $r pass $p ok"
echo 3 >/proc/sys/vm/drop_caches
set -- $(md5sum /mnt/keep); echo "MD5 $1 after"
umount /mnt
if dmesg | grep -iE "I/O error|blk_update|Buffer I/O|timeout"; then exit 1; fi
echo DMESG-CLEAN
"#,
        mo = MISS_OFF / MIB,
        ml = MISS_LEN / MIB,
        run = RUN_SECS,
    )
}

/// The frontend as pcache's status reports it (None if it does not answer).
fn frontend(ctl: &Path) -> Option<Frontend> {
    request(ctl, &Request::Status)
        .ok()
        .and_then(|r| r.status)
        .map(|s| s.frontend)
}

/// Poll the status for up to `limit` until `want` holds; what was seen last.
fn wait_for_state(ctl: &Path, limit: Duration, want: impl Fn(&Frontend) -> bool) -> Frontend {
    let end = Instant::now() + limit;
    let mut last = Frontend::default();
    while Instant::now() < end {
        if let Some(f) = frontend(ctl) {
            last = f;
            if want(&f) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last
}

#[test]
fn a_guest_verifies_every_write_across_ten_restarts_of_pcache() {
    let t0 = Instant::now();
    preflight();
    let mut dir = tempfile::tempdir().expect("tempdir");
    if std::env::var_os("PCACHE_KEEP_TEST_DIR").is_some() {
        dir.disable_cleanup(true);
        println!("restart test: keeping {}", dir.path().display());
    }
    let slow = Throttle::new(
        dir.path(),
        Limits {
            read_iops: 50,
            write_bps: 16 * MIB,
        },
    )
    .unwrap_or_else(|e| panic!("this test needs a slow backing disk: {e}"));
    println!("restart test: backing disk {} throttled", slow.device);
    let disk = dir.path().join("disk.img");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&disk).unwrap();
        f.set_len(1 << 30).unwrap();
        f.seek(SeekFrom::Start(MISS_OFF)).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let chunk: Vec<u8> = (0..MIB)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for _ in 0..MISS_LEN / MIB {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    // The cache is fast (tmpfs, as pmem would be); only the disk is slow.
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "this test keeps its cache on tmpfs at /dev/shm, which is missing"
    );
    let fast = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
    let cache = fast.path().join("cache.img");
    let sock = dir.path().join("vub.sock");
    let ctl = sock.with_extension("ctl");
    let serve = |n: usize| {
        // The sequential pass must fill the cache: no sequential cutoff.
        let cmd = serve_cmd_on(
            &cache,
            &disk,
            &sock,
            QUEUES,
            &["--cache-size", "512M", "--sequential-cutoff", "0"],
        );
        Server::start(slow.wrap(&cmd), dir.path(), &sock, &format!("serve-{n}"))
    };
    let mut server = serve(0);
    let mut g = Guest::boot(
        &sock,
        &guest_cmd(),
        "restarts",
        &[
            ("PCACHE_GUEST_QUEUES", QUEUES),
            ("PCACHE_GUEST_RECONNECT", "1"),
        ],
    );
    assert!(
        g.wait_for("RESTARTS-GO", Duration::from_secs(180)),
        "the guest did not get to its workload"
    );
    let (mut restarts, mut kills, mut terms) = (0usize, 0usize, 0usize);
    let (mut with_reads, mut with_writes) = (0usize, 0usize);
    let mut logs = Vec::new();
    while !g.printed("RESTARTS-STOP") && restarts < 4 * RESTARTS {
        std::thread::sleep(Duration::from_millis(1500));
        // QEMU reconnected and started both queues (QEMU 7.2 cannot recover
        // from a backend dying in the middle of its handshake: that window
        // is not what this test is about).
        let up = wait_for_state(&ctl, Duration::from_secs(30), |f| {
            f.queues_started == QUEUES.parse::<u64>().unwrap()
        });
        assert!(
            up.queues_started > 0,
            "QEMU did not start the queues again after restart {restarts}\n{}",
            server.log_text()
        );
        // Catch pcache holding requests: alternately reads on the slow disk
        // and writes waiting for space in a full cache.
        let f = if restarts % 2 == 0 {
            wait_for_state(&ctl, Duration::from_secs(3), |f| f.reads_waiting > 0)
        } else {
            wait_for_state(&ctl, Duration::from_secs(3), |f| f.writes_waiting > 0)
        };
        with_reads += usize::from(f.reads_waiting > 0);
        with_writes += usize::from(f.writes_waiting > 0);
        logs.push(server.log.clone());
        let how = if restarts % 3 == 1 {
            "SIGTERM"
        } else {
            "SIGKILL"
        };
        if how == "SIGTERM" {
            let took = server.stop_within(Duration::from_secs(60));
            println!("restart test: SIGTERM took {:.2} s", took.as_secs_f64());
            terms += 1;
        } else {
            server.kill();
            kills += 1;
        }
        restarts += 1;
        println!(
            "restart test: restart {restarts} by {how} with {} reads and {} writes waiting",
            f.reads_waiting, f.writes_waiting
        );
        server = serve(restarts);
    }
    let (st, lines) = g.finish();
    assert!(
        st.success(),
        "the guest failed ({st}): see its console above\n{}",
        server.log_text()
    );
    let sums = md5s(&lines);
    assert_eq!(
        sums.get("before"),
        sums.get("after"),
        "the ext4 file changed across the restarts: {sums:?}"
    );
    assert!(sums.contains_key("before"), "no MD5 lines: {sums:?}");
    let passes = lines.iter().filter(|l| l.contains("PASS ")).count();
    assert!(
        passes >= 3,
        "only {passes} fio passes completed during the restarts"
    );
    assert!(
        lines.iter().any(|l| l.contains("REVERIFY")),
        "the last region is verified again at the end"
    );
    assert!(lines.iter().any(|l| l.contains("DMESG-CLEAN")));
    logs.push(server.log.clone());
    server.stop();
    let resubmitted = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .filter(|t| t.contains("running again the requests the previous backend left"))
        .count();
    println!(
        "restart test: {restarts} restarts ({kills} SIGKILL, {terms} SIGTERM), {with_reads} with reads \
         waiting on the slow disk, {with_writes} with writes waiting for space, {resubmitted} \
         servers ran requests left by the one before; {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(restarts >= RESTARTS, "only {restarts} restarts");
    assert!(kills >= 3 && terms >= 3, "{kills} SIGKILL, {terms} SIGTERM");
    assert!(
        with_reads >= 1 && with_writes >= 1,
        "restarts never caught reads ({with_reads}) or writes ({with_writes}) waiting in pcache"
    );
    assert!(
        resubmitted >= 1,
        "no restart had requests in flight to run again"
    );
}

/// A system call the sandbox forbids ends pcache under a running guest
/// (through a hook only test builds have, in the middle of a request): the
/// log names the call, and the next pcache runs the requests the dead one
/// had taken again from QEMU's inflight region; the guest's fio passes
/// verify and its kernel sees no I/O error.
#[test]
fn a_forbidden_call_under_a_guest_ends_pcache_and_the_next_runs_its_requests_again() {
    preflight();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let cache = dir.path().join("cache.img");
    let sock = dir.path().join("vub.sock");
    let serve = |n: usize, hook: Option<&str>| {
        let mut cmd = serve_cmd_on(&cache, &disk, &sock, QUEUES, &["--cache-size", "512M"]);
        if let Some(at) = hook {
            cmd.env("PCACHE_TEST_FORBIDDEN_AT", at);
        }
        Server::start(cmd, dir.path(), &sock, &format!("serve-{n}"))
    };
    let mut first = serve(0, Some("3000"));
    let cmd = r#"F="fio --filename=/dev/vda --iodepth=16 --ioengine=libaio --direct=1 --eta=never --output=/tmp/fio --verify=crc32c --name=w --rw=randwrite --bs=4k --size=16M"
for p in 1 2 3 4 5 6; do
 $F --offset=$(( (p % 2) * 32 ))M --randseed=$p || { echo "CHECK FAILED pass $p"; cat /tmp/fio; exit 1; }
 echo "PASS $p"
done
dmesg | grep -qiE "I/O error|blk_update_request" && { echo "DMESG-ERRORS"; dmesg | tail -20; exit 1; }
echo ALL-VERIFIED"#;
    let g = Guest::boot(
        &sock,
        cmd,
        "forbidden",
        &[
            ("PCACHE_GUEST_QUEUES", QUEUES),
            ("PCACHE_GUEST_RECONNECT", "1"),
        ],
    );
    let st = first
        .ended_within(Duration::from_secs(240))
        .unwrap_or_else(|| {
            panic!(
                "pcache did not end at its forbidden call\n{}",
                first.log_text()
            )
        });
    let log = std::fs::read_to_string(&first.log).unwrap();
    assert!(
        log.contains("the sandbox refused system call ptrace (101)"),
        "pcache ended ({st}) without naming the call:\n{}",
        first.log_text()
    );
    let second = serve(1, None);
    let (st, lines) = g.finish();
    assert!(
        st.success() && lines.iter().any(|l| l.contains("ALL-VERIFIED")),
        "the guest failed ({st}) after the forbidden call\n{}",
        second.log_text()
    );
    let again = std::fs::read_to_string(&second.log).unwrap();
    assert!(
        again.contains("running again the requests the previous backend left"),
        "the next pcache ran nothing again:\n{}",
        second.log_text()
    );
    second.stop();
}
