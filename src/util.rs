//! Small OS helpers shared by several modules.
#![allow(unsafe_code)]

use std::os::fd::RawFd;

/// A result whose error is anything, for commands that print it.
pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// "outer: cause: cause" for an error and its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Add 1 to an eventfd counter (wakes whoever polls it). Errors are ignored:
/// a full counter or a closed fd only means the waiter is already awake or
/// gone.
pub fn eventfd_write(fd: RawFd) {
    let v: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to an fd; no memory is shared.
    unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
}

/// Parse a size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let mult: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1G, 512M, 1048576)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Block SIGTERM and SIGINT in the calling thread (and every thread it
/// spawns afterwards), so [`wait_for_termination`] can take them.
pub fn block_termination_signals() {
    // SAFETY: builds a signal set on the stack and changes this thread's
    // signal mask; no memory is shared.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait for SIGTERM or SIGINT (blocked by [`block_termination_signals`]);
/// returns the signal number.
pub fn wait_for_termination() -> i32 {
    // SAFETY: as above; sigwait writes the signal number into a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let mut sig = 0;
        while libc::sigwait(&set, &mut sig) != 0 {}
        sig
    }
}

/// poll(2) on `fds` for up to `timeout_ms` (-1: forever); returns how many
/// are ready (0 after an interrupting signal).
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> std::io::Result<usize> {
    // SAFETY: the slice is a valid array of pollfd for the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// Set the process umask, returning the old one.
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask only changes the process's file-creation mask.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// Make `fd` non-blocking.
pub fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor the caller owns.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Give the heap's free memory back to the kernel (after a connection's
/// requests are gone, so an idle process holds little).
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_suffixes_and_rejects_garbage() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
