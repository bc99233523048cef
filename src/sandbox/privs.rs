//! `no_new_privs`, the switch to `--user`/`--group`, and capabilities.
#![allow(unsafe_code)]

use std::io;

/// Capabilities [`super::lock_down`] may still use after
/// [`super::confine`]: giving the vhost socket to its user and group
/// (CHOWN), switching ids (SETUID, SETGID), binding a metrics port below 1024, and reaching files of other
/// users as root does (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER). librbd's
/// threads keep these; seccomp refuses the calls that would use them.
const KEPT: &[u32] = &[
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    CAP_SETGID,
    CAP_SETUID,
    CAP_NET_BIND_SERVICE,
];

// From linux/capability.h.
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_FOWNER: u32 = 3;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_NET_BIND_SERVICE: u32 = 10;

/// Highest capability number the kernel may know.
const CAP_LAST: u32 = 63;

/// Set `no_new_privs` (inherited by every thread started afterwards; the
/// seccomp TSYNC in `lock_down` sets it on every other).
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

fn capget() -> io::Result<[CapData; 2]> {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget with a v3 header and two data words, as the ABI says.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(d)
}

fn capset(d: [CapData; 2]) -> io::Result<()> {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    // SAFETY: capset with a v3 header and two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Keep only [`KEPT`] (of what the thread has), in the permitted,
/// effective and bounding sets; nothing inheritable or ambient. Threads
/// started afterwards (librbd's, the engine's) inherit this.
pub fn keep_only_what_lock_down_needs() -> io::Result<()> {
    let mut d = capget()?;
    if d.iter().all(|w| w.permitted == 0) {
        return Ok(()); // not root: nothing to drop
    }
    let mut keep = [0u32; 2];
    for &c in KEPT {
        keep[(c / 32) as usize] |= 1 << (c % 32);
    }
    for c in 0..=CAP_LAST {
        if keep[(c / 32) as usize] & (1 << (c % 32)) == 0 {
            // SAFETY: prctl with integer arguments; EINVAL past the
            // kernel's last capability is expected.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    for (w, k) in d.iter_mut().zip(keep) {
        w.permitted &= k;
        w.effective &= k;
        w.inheritable = 0;
    }
    capset(d)
}

/// Switch to `user` and `group` (both real, effective and saved; the
/// supplementary groups become just `group`). glibc applies each call to
/// every thread, and the kernel clears a thread's capabilities when its
/// uids leave 0.
pub fn become_user(user: Option<u32>, group: Option<u32>) -> io::Result<()> {
    let err = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    if let Some(g) = group.or_else(|| user.map(primary_group)) {
        // SAFETY: one gid from a local.
        if unsafe { libc::setgroups(1, &g) } != 0 {
            return Err(err("setgroups"));
        }
        // SAFETY: plain ids.
        if unsafe { libc::setresgid(g, g, g) } != 0 {
            return Err(err("setresgid"));
        }
    }
    if let Some(u) = user {
        // SAFETY: plain ids.
        if unsafe { libc::setresuid(u, u, u) } != 0 {
            return Err(err("setresuid"));
        }
    }
    Ok(())
}

/// The primary group of `uid` (its own uid if it has no passwd entry).
fn primary_group(uid: u32) -> u32 {
    // SAFETY: getpwuid_r into buffers we own, read only on success.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut out = std::ptr::null_mut();
        if libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) == 0
            && !out.is_null()
        {
            pw.pw_gid
        } else {
            uid
        }
    }
}

/// Drop every capability this thread has left (after [`become_user`] to
/// another user there are none).
pub fn drop_capabilities() -> io::Result<()> {
    if capget()?.iter().all(|w| w.permitted == 0) {
        return Ok(());
    }
    capset([CapData::default(); 2])
}
