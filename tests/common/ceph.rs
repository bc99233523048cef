//! The test Ceph cluster (started by `scripts/test.sh` with
//! `scripts/ceph-cluster.sh`) and throwaway RBD images on it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The cluster's configuration file. Panics, saying how to get a cluster,
/// when there is none: an RBD test never passes without Ceph.
pub fn conf() -> PathBuf {
    let conf = std::env::var_os("PCACHE_TEST_CEPH_CONF").unwrap_or_else(|| {
        panic!(
            "the RBD tests need a Ceph cluster: run them through scripts/test.sh, which starts one, \
             or start one with `scripts/ceph-cluster.sh start DIR` and set \
             PCACHE_TEST_CEPH_CONF=DIR/ceph.conf"
        )
    });
    let conf = PathBuf::from(conf);
    assert!(
        conf.exists(),
        "PCACHE_TEST_CEPH_CONF={} does not exist: is the test cluster running?",
        conf.display()
    );
    conf
}

/// The directory the cluster lives in (for scripts/ceph-cluster.sh).
pub fn cluster_dir() -> PathBuf {
    conf().parent().expect("conf in a directory").to_owned()
}

/// Run `rbd -c CONF args...`, panicking with its output on failure.
pub fn rbd(args: &[&str]) -> String {
    let conf = conf();
    let out = Command::new("rbd")
        .arg("-c")
        .arg(&conf)
        .args(args)
        .output()
        .expect("run rbd (apt-get install ceph-common)");
    assert!(
        out.status.success(),
        "rbd {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An image in pool `rbd`, removed on drop.
pub struct Image {
    /// `rbd/NAME`.
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Image {
    /// A new, zeroed image of `bytes` (a multiple of 1 MiB).
    pub fn create(tag: &str, bytes: u64) -> Image {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("rbd/{tag}-{}-{n}", std::process::id());
        rbd(&["create", "--size", &format!("{}M", bytes >> 20), &name]);
        Image { name }
    }

    /// A new image of `bytes` whose every 4 KiB block holds
    /// [`super::fill_block`] data of `version`.
    pub fn filled(tag: &str, bytes: u64, version: u64) -> Image {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let mut data = vec![0u8; bytes as usize];
        for (b, block) in data.chunks_mut(super::TEST_BLOCK).enumerate() {
            super::fill_block(block, b as u64, version);
        }
        std::fs::write(&src, &data).unwrap();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("rbd/{tag}-{}-{n}", std::process::id());
        rbd(&["import", "--no-progress", &src.display().to_string(), &name]);
        Image { name }
    }

    /// What `--backing` takes for this image.
    pub fn spec(&self) -> String {
        format!("rbd:{}:conf={}", self.name, conf().display())
    }

    /// The image's contents, read by the rbd tool (no pcache involved).
    pub fn export(&self) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("export.img");
        rbd(&[
            "export",
            "--no-progress",
            &self.name,
            &out.display().to_string(),
        ]);
        std::fs::read(&out).unwrap()
    }

    /// Check that the image (read by the rbd tool) holds
    /// `version_of(block)` in every 4 KiB block of [`super::fill_block`]
    /// data.
    pub fn check(&self, version_of: impl Fn(u64) -> u64) {
        let bytes = self.export();
        for (b, chunk) in bytes.chunks(super::TEST_BLOCK).enumerate() {
            let got = super::check_block(chunk, b as u64)
                .unwrap_or_else(|e| panic!("image {}: {e}", self.name));
            assert_eq!(got, version_of(b as u64), "image {} block {b}", self.name);
        }
    }

    /// The image's size as Ceph reports it.
    pub fn size(&self) -> u64 {
        let info = rbd(&["info", "--format", "json", &self.name]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        v["size"].as_u64().expect("size in rbd info")
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Best effort: the cluster is thrown away after the run anyway.
        let _ = Command::new("rbd")
            .arg("-c")
            .arg(conf())
            .args(["rm", "--no-progress", &self.name])
            .output();
    }
}

/// Stop the cluster's only OSD (every RBD operation then waits).
pub fn stop_osd() {
    cluster_script("stop-osd");
}

/// Start it again and wait until it is up.
pub fn start_osd() {
    cluster_script("start-osd");
}

fn cluster_script(cmd: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh");
    let out = Command::new(&script)
        .arg(cmd)
        .arg(cluster_dir())
        .output()
        .expect("run scripts/ceph-cluster.sh");
    assert!(
        out.status.success(),
        "ceph-cluster.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
