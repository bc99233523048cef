//! The landlock ruleset: what the process may open once confined.
//!
//! It reads and writes the files it serves; in the directories of its
//! sockets and of a cache or backing file it still has to create, it may
//! create and remove files and sockets; everything else it only reads, and
//! only below the system's own directories (libraries, /etc for librbd's
//! config and the resolver, /proc and /sys for sizes and CPUs, /dev/null
//! and the random devices),
//! never another tenant's files under /home, /srv, /var/lib, /tmp or
//! /dev/shm.

use std::path::Path;

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use std::path::PathBuf;

/// What the ruleset leaves, beyond the system's directories (see
/// `super::Plan`, whose fields these are).
pub struct Paths<'a> {
    /// Read and written.
    pub read_write: &'a [PathBuf],
    /// Files and sockets made and removed in.
    pub make_in: &'a [PathBuf],
    /// Only read.
    pub read_only: &'a [PathBuf],
}

/// The newest ABI this build knows; the crate downgrades to the kernel's.
const ABI_WANTED: ABI = ABI::V7;

/// Read-only system paths (those that exist). Of /dev only what libraries
/// read: /dev/shm may hold another tenant's cache.
const SYSTEM: &[&str] = &[
    "/etc",
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    "/proc",
    "/sys",
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
];

/// Restrict the calling thread (and every thread it starts afterwards).
/// Returns how it went, for the log: "ABI N", or why it did not.
pub fn restrict(plan: &Paths<'_>) -> String {
    match try_restrict(plan) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "landlock could not confine pcache; running without it");
            format!("off ({e})")
        }
    }
}

fn try_restrict(plan: &Paths<'_>) -> Result<String, Box<dyn std::error::Error>> {
    let abi = ABI_WANTED;
    let read = AccessFs::from_read(abi);
    let all = AccessFs::from_all(abi);
    let make = AccessFs::MakeReg
        | AccessFs::MakeSock
        | AccessFs::RemoveFile
        | AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::ReadDir
        | AccessFs::Truncate;
    let mut rs = Ruleset::default().handle_access(all)?.create()?;
    let file_rights = AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::Execute
        | AccessFs::IoctlDev;
    let beneath = |p: &Path,
                   a: landlock::BitFlags<AccessFs>|
     -> Result<Option<PathBeneath<PathFd>>, Box<dyn std::error::Error>> {
        // A file takes only the rights that apply to files.
        let a = if p.is_dir() { a } else { a & file_rights };
        match PathFd::new(p) {
            Ok(fd) => Ok(Some(PathBeneath::new(fd, a))),
            // A path that does not exist needs no rule.
            Err(_) if !p.exists() => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    for d in SYSTEM {
        if let Some(r) = beneath(Path::new(d), read)? {
            rs = rs.add_rule(r)?;
        }
    }
    for p in plan.read_only {
        if let Some(r) = beneath(p, read)? {
            rs = rs.add_rule(r)?;
        }
    }
    for p in plan.make_in {
        if let Some(r) = beneath(p, make)? {
            rs = rs.add_rule(r)?;
        }
    }
    for p in plan.read_write {
        if let Some(r) = beneath(p, file_rights)? {
            rs = rs.add_rule(r)?;
        }
    }
    let st = rs.restrict_self()?;
    Ok(match st.ruleset {
        RulesetStatus::FullyEnforced => format!("ABI {}", abi as i32),
        RulesetStatus::PartiallyEnforced => "partly (an older kernel)".into(),
        RulesetStatus::NotEnforced => "off (the kernel has no landlock)".into(),
    })
}
