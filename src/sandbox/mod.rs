//! Least privilege for `pcache serve`, in two steps.
//!
//! [`confine`] runs before the backing store is opened, so that every
//! thread librbd starts afterwards inherits it (librbd's threads block
//! every signal, so nothing can reach them later but the kernel's own
//! synchronisation): `no_new_privs`, a landlock ruleset that leaves the
//! process only the files it serves and what libraries read (`landlock`),
//! and capabilities cut to the few the second step still needs.
//!
//! [`lock_down`] runs once the medium, the backing store (with librbd's
//! config and keyring) and the sockets are open: it switches to `--user`
//! and `--group` (glibc applies that to every thread, and the kernel then
//! drops every capability everywhere), drops the remaining capabilities,
//! and installs the seccomp allowlist on every thread at once (TSYNC).
//! Each kind of thread narrows it further when it next runs ([`narrow`]).
#![allow(unsafe_code)]

mod landlock;
mod names;
mod privs;
mod seccomp;

use std::io;
use std::path::PathBuf;

pub use seccomp::{Kind, SeccompMode};

/// What the process keeps, decided from its options.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Files it reads and writes (the cache, a backing file or device).
    pub read_write: Vec<PathBuf>,
    /// Directories where it creates, and later removes, its sockets and
    /// their lock files, or creates the cache or backing file.
    pub make_in: Vec<PathBuf>,
    /// Further files or directories it only reads (librbd's config).
    pub read_only: Vec<PathBuf>,
    /// `--user`: the uid to run as once everything is open.
    pub user: Option<u32>,
    /// `--group`: the gid to run as.
    pub group: Option<u32>,
    /// `--seccomp`.
    pub seccomp: SeccompMode,
}

/// What was put in place, for the log and `status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Confinement {
    /// Landlock: "ABI N" or why not.
    pub landlock: String,
    /// Seccomp: "enforce", "log" or "off".
    pub seccomp: String,
    /// The uid and gid the process runs as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
}

/// Step one (see the module doc). Returns what landlock did.
pub fn confine(plan: &Plan) -> io::Result<String> {
    privs::no_new_privs()?;
    let landlock = landlock::restrict(&landlock::Paths {
        read_write: &plan.read_write,
        make_in: &plan.make_in,
        read_only: &plan.read_only,
    });
    privs::keep_only_what_lock_down_needs()?;
    Ok(landlock)
}

/// Step two (see the module doc).
pub fn lock_down(plan: &Plan, landlock: String) -> io::Result<Confinement> {
    privs::become_user(plan.user, plan.group)?;
    privs::drop_capabilities()?;
    seccomp::install(plan.seccomp)?;
    #[cfg(feature = "test-doubles")]
    try_reads_for_tests();
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Ok(Confinement {
        landlock,
        seccomp: plan.seccomp.to_string(),
        uid,
        gid,
    })
}

/// Narrow the calling thread's allowlist to what its kind of thread does,
/// once the process-wide list is in place (a no-op before, and after the
/// first call in a thread). Threads call it where they loop.
pub fn narrow(kind: Kind) {
    seccomp::narrow(kind)
}

/// Test builds only: `PCACHE_TEST_TRY_READ=A:B` makes the locked-down
/// process try to read each path and say on stderr whether it could.
#[cfg(feature = "test-doubles")]
fn try_reads_for_tests() {
    let Ok(paths) = std::env::var("PCACHE_TEST_TRY_READ") else {
        return;
    };
    for p in paths.split(':').filter(|p| !p.is_empty()) {
        match std::fs::read(p) {
            Ok(_) => eprintln!("test read {p}: allowed"),
            Err(e) => eprintln!("test read {p}: denied ({e})"),
        }
    }
}

/// Make a system call no allowlist has, for the tests (feature
/// `test-doubles`): the process must end and name it.
#[cfg(feature = "test-doubles")]
pub fn forbidden_call() {
    // SAFETY: ptrace(PTRACE_TRACEME) with a null address; the sandbox
    // refuses it before it does anything.
    unsafe {
        libc::ptrace(
            libc::PTRACE_TRACEME,
            0,
            std::ptr::null_mut::<libc::c_void>(),
            0,
        );
    }
}
