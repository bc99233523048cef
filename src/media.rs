//! Opening the cache medium and the backing store for a command: creating
//! and sizing files, formatting a new cache, and the lock that makes one
//! process the owner of a cache.
//!
//! A cache medium has one owner at a time: `serve` and every command that
//! writes it hold an exclusive open-file-description lock (OFD, `fcntl`
//! F_OFD_SETLK) for as long as they run, read-only commands a shared one.
//! The loser is refused with the holder's pid. The lock goes with the
//! process, however it ends. The backing store is not locked: an incoming
//! live migration opens it from a second pcache while the first still runs.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::backing::{Backing, BackingSpec};
use crate::engine::{Engine, FormatOptions, OpenOptions as EngineOpen};
use crate::format::{self, check_new_cache_size, Superblock};
use crate::pmem::{Region, RegionOptions};

use crate::util::AnyResult;

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// The only one (serve, format, writeback).
    Exclusive,
    /// With other readers (inspect, check).
    Shared,
}

/// A held lock on a file; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct Owner {
    file: File,
}

/// Lock `path` (`what` names it in the error), without waiting.
pub fn lock(path: &Path, how: Lock, what: &str) -> AnyResult<Owner> {
    // Never through a link: a lock file someone replaced with one would
    // have us open (and create) whatever it points to.
    let file = OpenOptions::new()
        .read(true)
        .write(how == Lock::Exclusive)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("Cannot open {what} {}: {e}", path.display()))?;
    lock_file(file, path, how, what)
}

/// Take `file`'s lock (`path` and `what` name it in the error).
fn lock_file(file: File, path: &Path, how: Lock, what: &str) -> AnyResult<Owner> {
    let fl = libc::flock {
        l_type: match how {
            Lock::Exclusive => libc::F_WRLCK,
            Lock::Shared => libc::F_RDLCK,
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: fcntl with a flock that lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(Owner { file });
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err(format!("Cannot lock {what} {}: {err}", path.display()).into());
    }
    let holder = match holder_pid(&file) {
        Some(pid) => format!("process {pid}"),
        None => "another process".into(),
    };
    Err(format!(
        "{what} {} is in use by {holder} ({}); refusing to open it. Nothing was changed",
        path.display(),
        match how {
            Lock::Exclusive => "a running pcache serve, or a command writing to it",
            Lock::Shared => "a running pcache serve or a command writing to it",
        }
    )
    .into())
}

/// Become the owner of the cache medium at `path` for a command that may
/// write it, before anything touches it: open it (with `create`, creating
/// a missing file, empty and mode 0600) and take its exclusive lock. A
/// refused command has changed nothing. Returns the lock and whether the
/// file was created; [`size_cache_file`] then sizes it.
pub fn claim_cache(path: &Path, create: bool) -> AnyResult<(Owner, bool)> {
    let open = |new: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if new {
            o.create_new(true).mode(0o600);
        }
        o.open(path)
    };
    let (file, created) = match open(false) {
        Ok(f) => (f, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => match open(true) {
            Ok(f) => (f, true),
            // Created by someone else meanwhile: theirs, then.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
                open(false).map_err(|e| format!("Cannot open cache {}: {e}", path.display()))?,
                false,
            ),
            Err(e) => {
                return Err(format!("Cannot create cache file {}: {e}", path.display()).into())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "Cache {} does not exist; give --cache-size to create it",
                path.display()
            )
            .into())
        }
        Err(e) => return Err(format!("Cannot open cache {}: {e}", path.display()).into()),
    };
    Ok((lock_file(file, path, Lock::Exclusive, "Cache")?, created))
}

/// The pid of a process holding a lock on `file`'s inode: OFD locks show
/// no pid in /proc/locks, but each holder's fdinfo names the lock.
fn holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let needle = format!(
        "{:02x}:{:02x}:{} ",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains(&needle))
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Does `path` hold a pcache superblock? None when the path does not exist.
pub fn holds_pcache(path: &Path) -> AnyResult<Option<Result<Superblock, format::Error>>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("Cannot read {}: {e}", path.display()).into()),
    };
    if meta.is_file() && meta.len() < format::SB_OFF + format::SB_BYTES as u64 {
        return Ok(Some(Err(format::Error::NotPcache)));
    }
    let region = Region::open(
        path,
        RegionOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let mut sb = [0u8; format::SB_BYTES];
    region.read(format::SB_OFF, &mut sb);
    Ok(Some(Superblock::decode(&sb, region.len())))
}

/// Size the cache file `owner` holds (see [`claim_cache`]) before
/// formatting: a new (empty) file takes `size`; an existing one of another
/// size only with `force`. Block and DAX devices keep their size.
pub fn size_cache_file(
    owner: &Owner,
    cache: &Path,
    size: Option<u64>,
    force: bool,
) -> AnyResult<()> {
    let m = owner
        .file
        .metadata()
        .map_err(|e| format!("Cannot read {}: {e}", cache.display()))?;
    match size {
        Some(sz) if m.is_file() && m.len() != sz => {
            check_new_cache_size(sz)?;
            if !force && m.len() > 0 {
                return Err(format!(
                    "Cache file {} is {} bytes, not {sz}; resizing it needs --force",
                    cache.display(),
                    m.len()
                )
                .into());
            }
            owner
                .file
                .set_len(sz)
                .map_err(|e| format!("Cannot size cache file {}: {e}", cache.display()))?;
            Ok(())
        }
        None if m.is_file() && m.len() == 0 => {
            Err(format!("Cache file {} is empty; give --cache-size", cache.display()).into())
        }
        _ => {
            if m.is_file() {
                format::segs_for_size(m.len())?;
            }
            Ok(())
        }
    }
}

/// Format the cache at `cache`, whose lock `owner` is (sized first, see
/// [`size_cache_file`]), for a backing store of `opts.backing_bytes`.
pub fn format_cache(
    owner: &Owner,
    cache: &Path,
    size: Option<u64>,
    opts: &FormatOptions,
) -> AnyResult<Superblock> {
    size_cache_file(owner, cache, size, opts.force)?;
    let region = Region::open(cache, RegionOptions::default())?;
    Ok(Engine::format(&region, opts)?)
}

/// Open the cache at `cache` for writing (the caller holds its lock).
pub fn open_cache(cache: &Path) -> AnyResult<Arc<Engine>> {
    let region = Arc::new(Region::open(cache, RegionOptions::default())?);
    Ok(Engine::open(region, &EngineOpen::default())?)
}

/// Open the cache at `cache` without writing anything to it.
pub fn open_cache_read_only(cache: &Path) -> AnyResult<Arc<Engine>> {
    let region = Arc::new(Region::open(
        cache,
        RegionOptions {
            read_only: true,
            ..Default::default()
        },
    )?);
    Ok(Engine::open(region, &EngineOpen { read_only: true })?)
}

/// Open the backing store `spec` for the cache at `cache` (whose lock the
/// caller holds, unless `read_only`), claiming it now if `claim` (`serve`
/// claims it later, before it first writes it). An RBD image's reads wait
/// at most `read_timeout` for the cluster.
pub fn open_backing(
    spec: &BackingSpec,
    cache: &Path,
    read_only: bool,
    claim: bool,
    read_timeout: Option<std::time::Duration>,
) -> AnyResult<Box<dyn Backing>> {
    let o = crate::backing::OpenOptions {
        read_only,
        claim,
        read_timeout,
        lock_record: (!read_only).then(|| lock_record(cache)).flatten(),
    };
    crate::backing::open(spec, &o)
        .map_err(|e| format!("Cannot open backing store {spec}: {e}").into())
}

/// Where the RBD lock owner of the pcache using `cache` is recorded: beside
/// a cache file (`CACHE.rbd-owner`). None for a device: a restart after a
/// crash then waits for the cluster to time the dead owner out.
pub fn lock_record(cache: &Path) -> Option<std::path::PathBuf> {
    let meta = std::fs::metadata(cache).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut name = cache.file_name()?.to_os_string();
    name.push(".rbd-owner");
    Some(cache.with_file_name(name))
}

/// Refuse a backing store smaller than the disk the cache holds (a larger
/// one grew: `serve` grows the disk to it).
pub fn check_backing_size(
    engine: &Engine,
    backing: &dyn Backing,
    spec: &BackingSpec,
) -> AnyResult<()> {
    let size = backing.size();
    if size < engine.size() {
        return Err(format!(
            "Backing store {} is {} bytes but the cache holds a disk of {} bytes (a disk never shrinks); refusing to use it",
            spec,
            size,
            engine.size()
        )
        .into());
    }
    Ok(())
}
