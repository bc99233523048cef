//! A guest run by libvirt, the orchestrator most QEMU hosts run, on a
//! pcache disk: a `<disk type='vhostuser'>` with `<reconnect>`, QEMU running
//! as libvirt-qemu (so pcache hands it the socket with `--socket-group`),
//! and pcache restarted under the guest while fio verifies its writes.
//!
//! The test starts `virtlogd` and `libvirtd` itself when they are not
//! running (no systemd), and stops what it started. Needs Debian's
//! `libvirt-daemon-system libvirt-clients` (scripts/test.sh installs them);
//! without them it fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use pcache::control::{request, Request};

#[path = "common/guest.rs"]
mod guest;
use guest::{preflight, serve_cmd, Server, ROOT};

const QUEUES: &str = "2";
const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("run virsh (apt-get install libvirt-clients)")
}

/// The daemons this test started, stopped when dropped.
struct Daemons(Vec<&'static str>);

impl Daemons {
    fn ensure() -> Daemons {
        for tool in ["virsh", "libvirtd", "virtlogd"] {
            let found = Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                found,
                "{tool} not found: this test runs a guest through libvirt; install \
                 `apt-get install libvirt-daemon-system libvirt-clients` (scripts/test.sh does)"
            );
        }
        let mut started = Vec::new();
        for d in ["virtlogd", "libvirtd"] {
            let running = Command::new("pgrep")
                .args(["-x", d])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !running {
                let st = Command::new(d).arg("-d").status().expect("start daemon");
                assert!(st.success(), "{d} -d failed: {st}");
                started.push(d);
            }
        }
        let t = Instant::now();
        while !virsh(&["version"]).status.success() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "libvirtd does not answer on {URI}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Daemons(started)
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = Command::new("pkill").args(["-x", d]).status();
        }
    }
}

/// A transient domain, destroyed if still running when dropped.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
    }
}

fn domain_xml(name: &str, sock: &Path, console: &Path, cmd: &str) -> String {
    let guest = Path::new(ROOT).join("target/guest");
    let b64 = base64::engine::general_purpose::STANDARD.encode(cmd);
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{k}</kernel>
    <initrd>{i}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 pcache.cmd={b64}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='{QUEUES}'/>
      <source type='unix' path='{s}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{c}'/><target port='0'/></serial>
    <console type='file'><source path='{c}'/><target type='serial' port='0'/></console>
  </devices>
</domain>
"#,
        k = guest.join("vmlinuz").display(),
        i = guest.join("initramfs.cpio.gz").display(),
        s = sock.display(),
        c = console.display(),
    )
}

const GUEST_CMD: &str = r#"set -e
d=/dev/vda
mkfs.ext4 -q -F $d 64M
mount $d /mnt
dd if=/dev/urandom of=/mnt/keep bs=1M count=4 2>/dev/null
sync
set -- $(md5sum /mnt/keep); echo "MD5 $1 before"
up() { cut -d. -f1 /proc/uptime; }
end=$(( $(up) + 45 ))
echo RESTARTS-GO
p=0
while [ $(up) -lt $end ]; do
 r=$((p % 4)); p=$((p + 1))
 fio --name=w --filename=$d --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --size=32M --offset=$((64 + 32 * r))M --randseed=$p --verify=crc32c --eta=never --output=/tmp/fio || { cat /tmp/fio; exit 1; }
 echo "PASS $p verified"
done
echo RESTARTS-STOP
echo 3 >/proc/sys/vm/drop_caches
set -- $(md5sum /mnt/keep); echo "MD5 $1 after"
umount /mnt
if dmesg | grep -iE "I/O error|blk_update|Buffer I/O"; then exit 1; fi
echo DMESG-CLEAN
"#;

fn console(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .replace('\r', "")
}

/// Wait until the console shows `text`; false after `limit`.
fn wait_console(path: &Path, text: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if console(path).contains(text) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn queues_started(ctl: &Path) -> u64 {
    request(ctl, &Request::Status)
        .ok()
        .and_then(|r| r.status)
        .map_or(0, |s| s.frontend.queues_started)
}

#[test]
fn a_libvirt_guest_verifies_its_writes_across_restarts_of_pcache() {
    preflight();
    let _daemons = Daemons::ensure();
    let dir = tempfile::tempdir().expect("tempdir");
    // QEMU runs as libvirt-qemu: it must reach the socket's directory.
    let path: PathBuf = dir.path().to_owned();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sock = path.join("disk.sock");
    let ctl = sock.with_extension("ctl");
    let cons = path.join("console.log");
    let serve = |n: usize| {
        let cmd = serve_cmd(
            &path,
            &sock,
            QUEUES,
            &[
                "--cache-size",
                "512M",
                "--backing-size",
                "1G",
                "--socket-group",
                "libvirt-qemu",
            ],
        );
        Server::start(cmd, &path, &sock, &format!("serve-{n}"))
    };
    let mut server = serve(0);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o660,
        "--socket-group makes the socket group read-write"
    );
    let name = format!("pcache-test-{}", std::process::id());
    let xml = path.join("domain.xml");
    std::fs::write(&xml, domain_xml(&name, &sock, &cons, GUEST_CMD)).unwrap();
    let o = virsh(&["create", xml.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "virsh create failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _domain = Domain(name.clone());
    assert!(
        wait_console(&cons, "RESTARTS-GO", Duration::from_secs(120)),
        "the guest did not get to its workload:\n{}",
        console(&cons)
    );
    let mut restarts = 0;
    while !console(&cons).contains("RESTARTS-STOP") && restarts < 8 {
        std::thread::sleep(Duration::from_secs(4));
        let t = Instant::now();
        while queues_started(&ctl) < 2 && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if restarts % 2 == 0 {
            server.kill();
        } else {
            server.stop_within(Duration::from_secs(60));
        }
        restarts += 1;
        server = serve(restarts);
    }
    assert!(
        wait_console(&cons, "PCACHE-GUEST-EXIT", Duration::from_secs(240)),
        "the guest did not finish:\n{}",
        console(&cons)
    );
    let out = console(&cons);
    println!("{out}");
    assert!(
        out.contains("PCACHE-GUEST-EXIT 0"),
        "the guest failed:\n{out}"
    );
    let sums: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("MD5 "))
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert!(
        sums.len() == 2 && sums[0] == sums[1],
        "the ext4 file changed: {sums:?}"
    );
    assert!(out.contains("DMESG-CLEAN"));
    assert!(restarts >= 4, "only {restarts} restarts");
    server.stop();
    println!("libvirt test: {restarts} restarts under a libvirt guest");
}
