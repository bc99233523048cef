//! One virtio-blk request from a hostile guest per input: the input decides
//! guest memory contents, the descriptor chain (count, addresses, lengths,
//! flags, links, indirect tables, head index), the header, whether the chain
//! goes through `handle_event` or the per-chain path, EVENT_IDX, and whether
//! the guest rewrites the chain while the request is pending.
//!
//! `Harness::run_case` is the same code the property test in
//! `src/vhost/backend.rs` runs: it panics (a crash here) if the backend
//! panics, or if its answer disagrees with the model of the device (used
//! length, status byte, data against a shadow of the disk).
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use pcache::vhost::harness::{Harness, Options};

/// A read-write and a read-only disk, built once per process (an engine
/// needs a 512 MiB cache file; formatting one per input would dominate).
struct Disks {
    rw: Harness,
    ro: Harness,
}

fn disks() -> &'static Mutex<Disks> {
    static D: OnceLock<Mutex<Disks>> = OnceLock::new();
    D.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let pid = std::process::id();
        let rw = Harness::new(
            &dir.join(format!("pcache-fuzz-{pid}-rw.img")),
            &Options::default(),
        )
        .expect("read-write harness");
        let ro = Harness::new(
            &dir.join(format!("pcache-fuzz-{pid}-ro.img")),
            &Options {
                read_only: true,
                ..Options::default()
            },
        )
        .expect("read-only harness");
        Mutex::new(Disks { rw, ro })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut d = disks().lock().unwrap_or_else(|e| e.into_inner());
    // Bit 7 of the first byte (unused by run_case) picks the disk.
    if data.first().is_some_and(|b| b & 0x80 != 0) {
        d.ro.run_case(data);
    } else {
        d.rw.run_case(data);
    }
});
