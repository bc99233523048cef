//! The seccomp allowlists, built with `seccompiler`.
//!
//! One list for the whole process, installed on every thread at once
//! (TSYNC: librbd's threads included), and per kind of thread a narrower
//! one stacked on it when the thread next runs ([`narrow`]). `clone3`
//! answers ENOSYS (glibc then uses `clone`, whose flags a filter can see).
//! A call outside the lists raises SIGSYS; the handler names the call and
//! the thread, and ends the process, so that the next one (systemd's
//! restart, QEMU's reconnect) takes over through the inflight region.
//! With `--seccomp log` such calls are allowed and the kernel logs them
//! (audit, dmesg), which is how the lists are checked against a new
//! library or kernel.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

/// What `--seccomp` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A call outside the lists ends the process, naming it.
    #[default]
    Enforce,
    /// Calls outside the lists are allowed and logged by the kernel.
    Log,
    /// No filter.
    Off,
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!("{s:?}: expected enforce, log or off")),
        }
    }
}

/// Kinds of thread with a narrower list of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A vhost queue worker: guest requests, io_uring, librbd's aio calls.
    Queue,
    /// Writeback, GC, the persist syncer, backing I/O threads.
    Background,
    /// The control socket's threads.
    Control,
    /// The metrics endpoint.
    Metrics,
}

/// Every call pcache and its libraries (glibc, librbd, io_uring) make once
/// serving (x86_64).
const PROCESS: &[i64] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_membarrier,
    libc::SYS_get_mempolicy,
    libc::SYS_set_mempolicy,
    libc::SYS_mbind,
    libc::SYS_memfd_create,
    // Files already open, and the few opened later (/proc, librbd's).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_sync_file_range,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_flock,
    // Sockets: the vhost and control connections, metrics, sd_notify,
    // librbd's messengers.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    // Waiting.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // Threads and signals.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_arch_prctl,
    libc::SYS_prctl,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_restart_syscall,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    // Who and when.
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_capget,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_time,
    libc::SYS_getrandom,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrusage,
    libc::SYS_times,
    // Threads narrow their own list and drop what capabilities they have
    // left (both only ever take away).
    libc::SYS_seccomp,
    libc::SYS_capset,
];

/// Calls the queue and background threads never make (on top of what the
/// process list leaves out): no new files, sockets or memory files.
const NOT_FOR_WORKERS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_memfd_create,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_flock,
    libc::SYS_ftruncate,
];

/// Calls the control and metrics threads never make: they answer on
/// sockets they accept, and create nothing.
const NOT_FOR_SERVERS: &[i64] = &[
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_memfd_create,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_flock,
    libc::SYS_ftruncate,
];

/// 0: no filter yet; otherwise the mode's number + 1.
static INSTALLED: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static NARROWED: Cell<bool> = const { Cell::new(false) };
}

/// A filter that answers `calls` with `on_match` and everything else
/// with `otherwise`, compiled for this machine.
fn compile(
    calls: &[i64],
    otherwise: SeccompAction,
    on_match: SeccompAction,
) -> io::Result<BpfProgram> {
    let err = |e: &dyn std::fmt::Display| io::Error::other(format!("seccomp: {e}"));
    let rules: BTreeMap<i64, Vec<SeccompRule>> = calls.iter().map(|&c| (c, vec![])).collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    let filter = SeccompFilter::new(rules, otherwise, on_match, arch).map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

/// The allowlist `calls`: anything else traps (or is logged).
fn program(calls: &[i64], mode: SeccompMode) -> io::Result<BpfProgram> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    compile(calls, mismatch, SeccompAction::Allow)
}

/// `clone3` answers ENOSYS; everything else passes this filter.
fn no_clone3() -> io::Result<BpfProgram> {
    compile(
        &[libc::SYS_clone3],
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

/// Install the process list on every thread (see the module doc).
pub fn install(mode: SeccompMode) -> io::Result<()> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    install_sigsys_handler()?;
    let all = program(PROCESS, mode)?;
    let clone3 = no_clone3()?;
    let err = |e: seccompiler::Error| io::Error::other(format!("seccomp: {e}"));
    seccompiler::apply_filter_all_threads(&clone3).map_err(err)?;
    seccompiler::apply_filter_all_threads(&all).map_err(err)?;
    INSTALLED.store(mode as u8 + 1, Ordering::SeqCst);
    Ok(())
}

/// See [`super::narrow`].
pub fn narrow(kind: Kind) {
    let mode = match INSTALLED.load(Ordering::Relaxed) {
        0 => return,
        m if m == SeccompMode::Log as u8 + 1 => SeccompMode::Log,
        _ => SeccompMode::Enforce,
    };
    if NARROWED.with(|n| n.replace(true)) {
        return;
    }
    if let Err(e) = super::privs::drop_capabilities() {
        tracing::warn!(?kind, error = %e, "cannot drop this thread's capabilities");
    }
    let not: &[i64] = match kind {
        Kind::Queue | Kind::Background => NOT_FOR_WORKERS,
        Kind::Control | Kind::Metrics => NOT_FOR_SERVERS,
    };
    let calls: Vec<i64> = PROCESS
        .iter()
        .copied()
        .filter(|c| !not.contains(c))
        .collect();
    let r = program(&calls, mode).and_then(|p| {
        seccompiler::apply_filter(&p).map_err(|e| io::Error::other(format!("seccomp: {e}")))
    });
    if let Err(e) = r {
        tracing::warn!(?kind, error = %e, "cannot narrow this thread's system calls");
    }
}

fn install_sigsys_handler() -> io::Result<()> {
    // SAFETY: a sigaction whose handler only writes and aborts.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in a SIGSYS siginfo on 64-bit Linux (after
/// si_signo, si_errno, si_code, padding and `si_call_addr`).
const SI_SYSCALL_OFF: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo for SIGSYS carries the call's number at
    // SI_SYSCALL_OFF.
    let nr = unsafe { *((info as *const u8).add(SI_SYSCALL_OFF) as *const i32) };
    let mut thread = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr(), 0, 0, 0) };
    let tlen = thread.iter().position(|&b| b == 0).unwrap_or(16);
    let mut m = [0u8; 256];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(m.len() - n);
        m[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    put(b"pcache: the sandbox refused system call ");
    put(super::names::name(nr as i64).as_bytes());
    put(b" (");
    let mut d = [0u8; 12];
    let mut i = d.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        d[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&d[i..]);
    put(b") in thread ");
    put(&thread[..tlen]);
    put(b"; stopping (--seccomp log lets such calls through and logs them)\n");
    // SAFETY: write(2) and abort(3) are async-signal-safe.
    unsafe {
        libc::write(2, m.as_ptr().cast(), n);
        libc::abort();
    }
}
