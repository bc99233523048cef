//! A slow disk, for real: a block-I/O cgroup that throttles the device a
//! directory lives on, and commands started inside it. pcache's backing
//! I/O is O_DIRECT, so its reads and its writeback are held to the limits
//! by the kernel, as on a slow or busy disk.
//!
//! cgroup v1 `blkio.throttle.*` and cgroup v2 `io.max` both work. Without
//! either (or without root) the constructor fails and says what is
//! missing: a test needing a slow disk must not pass without one.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Limits on the device.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Reads per second.
    pub read_iops: u64,
    /// Written bytes per second.
    pub write_bps: u64,
}

/// A cgroup throttling one block device; removed when dropped (after the
/// processes in it are gone).
pub struct Throttle {
    dir: PathBuf,
    procs: PathBuf,
    /// The device, `major:minor`.
    pub device: String,
}

/// The whole disk a file system at `path` lives on (throttling applies to
/// disks, not partitions), as `major:minor`.
fn disk_of(path: &Path) -> Result<String, String> {
    let dev = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .dev();
    let mut id = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{id}"));
    if !sys.exists() {
        return Err(format!(
            "{} is on device {id}, which is not a block device (tmpfs?): \
             run the test with TMPDIR on a disk-backed file system",
            path.display()
        ));
    }
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev"))
            .map_err(|e| format!("parent disk of {id}: {e}"))?;
        id = parent.trim().to_owned();
    }
    Ok(id)
}

impl Throttle {
    /// Throttle the disk under `dir` with `limits`.
    pub fn new(dir: &Path, limits: Limits) -> Result<Throttle, String> {
        let device = disk_of(dir)?;
        let name = format!("pcache-test-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/blkio");
        let v2 = Path::new("/sys/fs/cgroup");
        let (cg, files): (PathBuf, Vec<(&str, String)>) =
            if v1.join("blkio.throttle.read_iops_device").exists() {
                (
                    v1.join(&name),
                    vec![
                        (
                            "blkio.throttle.read_iops_device",
                            format!("{device} {}", limits.read_iops),
                        ),
                        (
                            "blkio.throttle.write_bps_device",
                            format!("{device} {}", limits.write_bps),
                        ),
                    ],
                )
            } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
                .is_ok_and(|s| s.split_whitespace().any(|c| c == "io"))
            {
                (
                    v2.join(&name),
                    vec![(
                        "io.max",
                        format!(
                            "{device} riops={} wbps={}",
                            limits.read_iops, limits.write_bps
                        ),
                    )],
                )
            } else {
                return Err(
                    "no block-I/O cgroup controller to throttle the backing disk with: \
                     mount cgroup v1 `blkio` at /sys/fs/cgroup/blkio, or enable the cgroup v2 \
                     `io` controller in /sys/fs/cgroup/cgroup.subtree_control (needs root)"
                        .into(),
                );
            };
        std::fs::create_dir_all(&cg).map_err(|e| format!("create {}: {e}", cg.display()))?;
        let t = Throttle {
            procs: cg.join("cgroup.procs"),
            dir: cg,
            device,
        };
        for (f, v) in files {
            std::fs::write(t.dir.join(f), &v)
                .map_err(|e| format!("set {f} = {v:?} in {}: {e}", t.dir.display()))?;
        }
        Ok(t)
    }

    /// `cmd` wrapped to run inside the cgroup (it moves itself in, then
    /// execs the program, so the program's first I/O is already throttled).
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut w = Command::new("sh");
        w.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(&self.procs)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        w
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // Lift the limits first: a process killed in the cgroup may still
        // have I/O to finish (the cgroup cannot go until it has), and must
        // not be held at the test's trickle for hours.
        for f in [
            "blkio.throttle.read_iops_device",
            "blkio.throttle.write_bps_device",
        ] {
            let _ = std::fs::write(self.dir.join(f), format!("{} 0", self.device));
        }
        let _ = std::fs::write(
            self.dir.join("io.max"),
            format!("{} riops=max wbps=max", self.device),
        );
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
