//! End to end in a real Linux guest: `pcache serve` behind QEMU's
//! vhost-user-blk-pci, with fio's crc32c verification and ext4 on top, then a
//! restart of the server (replaying the cache) and a second guest that must
//! read back the same files.
//!
//! Needs qemu-system-x86_64 and what images/build.sh builds the guest from
//! (Debian packages: qemu-system-x86 busybox-static fio cpio e2fsprogs, and
//! linux-image-cloud-amd64 fetched with apt-get download). scripts/test.sh
//! installs them. Without them this test fails, saying what to install.
//! The guest runs under TCG; the whole test takes a minute or two.

use std::path::Path;
use std::time::Instant;

#[path = "common/guest.rs"]
mod guest;
use guest::{md5s, preflight, serve_cmd, serve_cmd_on, Guest, Server};

mod common;

const QUEUES: &str = "2";

/// Files the first guest writes on ext4: name and size in bytes.
const FILES: &[(&str, u64)] = &[
    ("f1", 1 << 20),
    ("f5", 5 << 20),
    ("f20", 20 << 20),
    ("odd", 12_345),
];

/// Boots a guest on `sock` running `cmd`: its exit status and console lines.
fn run_guest(sock: &Path, cmd: &str, name: &str) -> (std::process::ExitStatus, Vec<String>) {
    Guest::boot(sock, cmd, name, &[("PCACHE_GUEST_QUEUES", QUEUES)]).finish()
}

/// The guest write cache as pcache's status reports it ("on" or "off").
fn write_cache(sock: &Path) -> String {
    let r = pcache::control::request(
        &sock.with_extension("ctl"),
        &pcache::control::Request::Status,
    )
    .expect("status");
    r.status.expect("a status").cache.guest_write_cache
}

/// `pcache serve` on `dir`'s cache in front of `backing` (an `rbd:` name)
/// or of `dir`'s disk.img.
fn start(dir: &Path, sock: &Path, backing: Option<&str>, name: &str, extra: &[&str]) -> Server {
    let cmd = match backing {
        Some(b) => serve_cmd_on(&dir.join("cache.img"), Path::new(b), sock, QUEUES, extra),
        None => serve_cmd(dir, sock, QUEUES, extra),
    };
    Server::start(cmd, dir, sock, name)
}

/// One guest at a time: two TCG guests at once would starve each other.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn write_cmd() -> String {
    let mut c = String::from(
        "set -e\n\
         up() { echo; echo \"STEP $1 $(cut -d' ' -f1 /proc/uptime)\"; }\n\
         up fio\n\
         fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=128M --iodepth=16 \
         --ioengine=libaio --direct=1 --verify=crc32c --numjobs=1 --eta=never\n\
         up mkfs\n\
         mkfs.ext4 -q -F /dev/vda\n\
         mount /dev/vda /mnt\n\
         up write\n",
    );
    for (name, size) in FILES {
        if size % (1 << 20) == 0 {
            c += &format!(
                "dd if=/dev/urandom of=/mnt/{name} bs=1M count={} 2>/dev/null\n",
                size >> 20
            );
        } else {
            c += &format!("head -c {size} /dev/urandom >/mnt/{name}\n");
        }
    }
    c += "sync\nup md5\n";
    c += &md5_cmd();
    c += "umount /mnt\nsync\n";
    // The guest turns its write cache off (virtio CONFIG_WCE).
    c += "echo 'write through' >/sys/block/vda/cache_type\n\
          echo \"CACHE_TYPE $(cat /sys/block/vda/cache_type)\"\nup done\n";
    c
}

fn md5_cmd() -> String {
    let names: Vec<&str> = FILES.iter().map(|f| f.0).collect();
    format!(
        "for n in {}; do set -- $(md5sum /mnt/$n); echo \"MD5 $1 $n\"; done\n",
        names.join(" ")
    )
}

fn read_cmd() -> String {
    let mut c = String::from(
        "set -e\n\
         up() { echo; echo \"STEP $1 $(cut -d' ' -f1 /proc/uptime)\"; }\n\
         up fsck\n\
         e2fsck -fn /dev/vda\n\
         mount -o ro /dev/vda /mnt\n\
         up md5\n",
    );
    c += &md5_cmd();
    c += "umount /mnt\necho \"CACHE_TYPE $(cat /sys/block/vda/cache_type)\"\nup done\n";
    c
}

#[test]
fn guest_fio_and_ext4_survive_a_server_restart() {
    fio_ext4_restart(None);
}

/// The same with the disk on an RBD image of the test cluster.
#[test]
fn guest_fio_and_ext4_survive_a_server_restart_on_rbd() {
    let image = common::ceph::Image::create("guest", 1 << 30);
    fio_ext4_restart(Some(&image.spec()));
}

fn fio_ext4_restart(backing: Option<&str>) {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    preflight();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vub.sock");

    // a + b: a fresh cache, fio with verification, then ext4 with files.
    let mut first = vec!["--cache-size", "512M", "--format"];
    if backing.is_none() {
        first.extend(["--backing-size", "1G"]);
    }
    let server = start(dir.path(), &sock, backing, "serve-1", &first);
    let (st, lines) = run_guest(&sock, &write_cmd(), "guest-1 (fio + mkfs + write)");
    assert!(
        st.success(),
        "guest 1 failed ({st}): see its console above and the server log below"
    );
    let written = md5s(&lines);
    assert_eq!(
        written.len(),
        FILES.len(),
        "guest 1 printed {written:?}, expected an MD5 line for each of {FILES:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("CACHE_TYPE write through")),
        "guest 1 could not turn its write cache off"
    );
    assert_eq!(
        write_cache(&sock),
        "off",
        "pcache did not take the guest's choice"
    );
    // c: SIGTERM persists and exits 0.
    server.stop();

    // d: replay the same cache, read the files back. The guest's write
    // cache choice held across the restart (QEMU does not repeat it).
    let server = start(dir.path(), &sock, backing, "serve-2", &[]);
    assert_eq!(write_cache(&sock), "off", "the choice was lost at restart");
    let (st, lines) = run_guest(&sock, &read_cmd(), "guest-2 (fsck + read)");
    assert!(
        lines.iter().any(|l| l.contains("CACHE_TYPE write through")),
        "a new guest sees the write cache as its owner left it"
    );
    assert!(
        st.success(),
        "guest 2 failed ({st}): see its console above and the server log below"
    );
    let read = md5s(&lines);
    assert_eq!(
        read, written,
        "files read after the restart differ from those written"
    );
    server.stop();
    println!(
        "guest test on {}: TIMING total {:.1} s; md5s matched: {written:?}",
        backing.unwrap_or("a file"),
        t0.elapsed().as_secs_f64()
    );
}
