//! A hostile frontend: well-formed vhost-user messages in any order, with
//! memfds of any size for guest memory, the inflight region and the dirty
//! log, sizes and offsets that lie or overflow, rings anywhere, and files
//! that shrink once mapped (`pcache::vhost::harness::Frontends`). One
//! connection per input, on one disk for the whole run; none may end the
//! process.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pcache::vhost::harness::Frontends;

fn frontends() -> &'static Frontends {
    static F: OnceLock<Frontends> = OnceLock::new();
    F.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Frontends::new(&dir.join(format!("pcache-fuzz-frontend-{}.img", std::process::id())))
            .expect("a disk to connect to")
    })
}

fuzz_target!(|data: &[u8]| {
    frontends().run(data);
});
