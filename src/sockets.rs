//! Binding the vhost-user socket: never over a live one, and with the
//! owner and mode that let the frontend in.
//!
//! A socket path is claimed with a lock on `<path>.lock`, held for the life
//! of the process, so two pcache processes never both bind one path. A
//! socket file already there is replaced only if nothing answers on it (a
//! socket left by a process that died); if something does, the bind is
//! refused. The claim comes first and the socket file last: once the file
//! exists, the rest of the process (its control socket, its claim on the
//! store) is ready. The socket file is created with its final mode (the
//! umask around the bind), so it never has a wider one, and is then given
//! its owner through a descriptor of the file itself: nothing follows a
//! path someone could have swapped for a link.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::media::{self, Lock, Owner};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Who may connect to the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Permission bits.
    pub mode: u32,
    /// Owner to give the socket (None: ours).
    pub user: Option<u32>,
    /// Group to give the socket (None: ours).
    pub group: Option<u32>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            mode: 0o600,
            user: None,
            group: None,
        }
    }
}

/// The lock file that claims socket path `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Claim `socket` and remove a dead socket file there. The returned owner
/// holds the claim; [`bind`] creates the socket later, once the process is
/// ready to answer on it.
pub fn claim(socket: &Path) -> AnyResult<Owner> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let lock = lock_path(socket);
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Never through a link someone left at the lock's path.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock)
            .map_err(|e| format!("Cannot create {}: {e}", lock.display()))?;
    }
    let owner = media::lock(&lock, Lock::Exclusive, "Socket path lock")?;
    match std::fs::symlink_metadata(socket) {
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                socket.display()
            )
            .into());
        }
        Ok(_) => match UnixStream::connect(socket) {
            Ok(_) => {
                return Err(format!(
                    "Something is listening on {}; refusing to take the socket over",
                    socket.display()
                )
                .into())
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %socket.display(), "replacing a socket nothing listens on");
                std::fs::remove_file(socket)?;
            }
            Err(e) => {
                return Err(format!("Cannot check {}: {e}", socket.display()).into());
            }
        },
        Err(_) => {}
    }
    Ok(owner)
}

/// Bind the socket path `owner` claimed (see [`claim`]) and apply `access`.
pub fn bind(socket: &Path, access: &Access, _owner: &Owner) -> AnyResult<UnixListener> {
    let old = crate::util::set_umask(!access.mode & 0o777);
    let l = UnixListener::bind(socket);
    crate::util::set_umask(old);
    let l = l.map_err(|e| format!("Cannot listen on {}: {e}", socket.display()))?;
    if access.user.is_some() || access.group.is_some() {
        give(socket, access).map_err(|e| {
            let _ = std::fs::remove_file(socket);
            format!(
                "Cannot give {} to user {:?} group {:?}: {e}",
                socket.display(),
                access.user,
                access.group
            )
        })?;
    }
    Ok(l)
}

/// Give the socket file at `path` the owner and group of `access`,
/// through a descriptor of the file itself (O_PATH, never following a
/// link), once it is known to be a socket. Until then only we can open
/// it: it was made with our ids.
fn give(path: &Path, access: &Access) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path; the flags are valid.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a plain C struct, all zeroes is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of our descriptor into that struct.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other("the path is no longer our socket"));
    }
    let (u, g) = (
        access.user.unwrap_or(u32::MAX),
        access.group.unwrap_or(u32::MAX),
    );
    // SAFETY: fchownat on our descriptor, empty path.
    let rc = unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), u, g, libc::AT_EMPTY_PATH) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The listening socket systemd passed (socket activation: LISTEN_FDS and
/// LISTEN_PID), if any. More than one is refused: one process serves one
/// disk.
pub fn inherited() -> AnyResult<Option<UnixListener>> {
    let fds: Vec<std::os::fd::RawFd> = sd_notify::listen_fds()
        .map_err(|e| format!("Bad socket activation variables (LISTEN_FDS): {e}"))?
        .collect();
    match fds.as_slice() {
        [] => Ok(None),
        [fd] => {
            use std::os::fd::FromRawFd;
            // SAFETY: systemd passed this fd to this process alone
            // (LISTEN_PID), and nothing else here owns it.
            let l = unsafe { UnixListener::from_raw_fd(*fd) };
            tracing::info!(fd, "listening on the socket systemd passed");
            Ok(Some(l))
        }
        more => Err(format!(
            "systemd passed {} sockets (LISTEN_FDS); pcache serves one disk on one socket",
            more.len()
        )
        .into()),
    }
}

/// A user name or number, as a uid.
pub fn parse_user(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    let name = CString::new(s).map_err(|_| format!("bad user name {s:?}"))?;
    // SAFETY: getpwnam reads a NUL-terminated name; the result is used
    // before any other call that could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(format!("no user {s:?} on this host"));
    }
    // SAFETY: non-null result of getpwnam.
    Ok(unsafe { (*pw).pw_uid })
}

/// A group name or number, as a gid.
pub fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    let name = CString::new(s).map_err(|_| format!("bad group name {s:?}"))?;
    // SAFETY: as in `parse_user`, with getgrnam.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(format!("no group {s:?} on this host"));
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn take(s: &Path) -> AnyResult<(UnixListener, Owner)> {
        let owner = claim(s)?;
        Ok((bind(s, &Access::default(), &owner)?, owner))
    }

    #[test]
    fn a_live_socket_is_never_taken_over_and_a_dead_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("v.sock");
        let (l, owner) = take(&s).unwrap();
        assert_eq!(
            std::fs::metadata(&s).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Claimed: a second bind is refused while the first holds it.
        let e = take(&s).unwrap_err().to_string();
        assert!(e.contains("in use by"), "{e}");
        drop(owner);
        // Unclaimed but still listening (another program): refused too.
        let e = take(&s).unwrap_err().to_string();
        assert!(e.contains("listening"), "{e}");
        assert!(s.exists());
        // Nothing listens any more: the claim removes the dead file, and
        // the socket is back only once bound.
        drop(l);
        let owner = claim(&s).unwrap();
        assert!(!s.exists());
        let _l = bind(&s, &Access::default(), &owner).unwrap();
        assert!(s.exists());
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("v.sock");
        std::fs::write(&s, b"data").unwrap();
        assert!(take(&s).is_err());
        assert_eq!(std::fs::read(&s).unwrap(), b"data");
    }

    #[test]
    fn users_and_groups_by_name_or_number() {
        assert_eq!(parse_user("0"), Ok(0));
        assert_eq!(parse_user("root"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(parse_group("no-such-group-pcache").is_err());
    }
}
