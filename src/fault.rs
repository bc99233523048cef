//! SIGBUS from shared mappings of files that can shrink under us.
//!
//! A file mapped shared raises SIGBUS when a page past its end is touched.
//! Two kinds of our mappings can meet that. The frontend's (guest memory,
//! the inflight region, the dirty log) are files another process owns and
//! may truncate after we checked their size (a memfd without
//! `F_SEAL_SHRINK`, a `memory-backend-file`): such a fault must cost that
//! connection, never the process. The cache medium is ours, but an
//! operator can truncate the file, and pmem reports media errors the same
//! way: that stops the process, with a line saying why.
//!
//! The handler runs on the thread's alternate signal stack (Rust gives
//! every thread it starts one). For an address inside a frontend mapping
//! it puts a private zero page where the file's page was, counts the
//! fault and returns, so the access completes on the stand-in page; every
//! request of the connection that saw a fault then fails ([`Stamp`]) and
//! the connection ends. Anything else prints what happened and dies of
//! the signal.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, Once};

/// Mappings watched at once: a connection's memory table (at most
/// `MAX_MEM_SLOTS` regions in QEMU's practice a handful), its inflight
/// region and dirty log, and the cache media.
const SLOTS: usize = 256;

/// What a watched range is.
const FREE: usize = 0;
const FRONTEND: usize = 1;
const MEDIUM: usize = 2;

/// One watched range. `kind` is written last when a range is added and
/// first when it is removed, so the handler never sees a half-made one.
struct Slot {
    kind: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    kind: AtomicUsize::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Serialises adding and removing ranges (never taken by the handler).
static EDIT: Mutex<()> = Mutex::new(());
/// Handlers running now: a range is unmapped only once none runs.
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);
/// Faults in frontend mappings since the process started.
static FRONTEND_FAULTS: AtomicU64 = AtomicU64::new(0);
/// The address of the last one.
static LAST_ADDR: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// Install the handler (once; later calls do nothing).
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a plain sigaction with a handler that only does
        // async-signal-safe work (atomics, mmap, write, sigaction).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "cannot handle SIGBUS: a frontend that shrinks its memory will end the process"
                );
            }
        }
    });
}

/// A watched range; dropping it stops watching (before the caller unmaps).
#[derive(Debug)]
pub struct Watch {
    slot: usize,
}

impl Watch {
    fn add(kind: usize, ptr: *const u8, len: usize) -> std::io::Result<Watch> {
        install();
        let _g = EDIT.lock().unwrap_or_else(|e| e.into_inner());
        let slot = TABLE
            .iter()
            .position(|s| s.kind.load(SeqCst) == FREE)
            .ok_or_else(|| std::io::Error::other("too many shared mappings to watch"))?;
        let s = &TABLE[slot];
        s.start.store(ptr as usize, SeqCst);
        s.len.store(len, SeqCst);
        s.kind.store(kind, SeqCst);
        Ok(Watch { slot })
    }

    /// Watch `len` bytes at `ptr`, mapped from a file a frontend gave us.
    pub fn frontend(ptr: *const u8, len: usize) -> std::io::Result<Watch> {
        Watch::add(FRONTEND, ptr, len)
    }

    /// Watch `len` bytes at `ptr`, the cache medium's mapping.
    pub fn medium(ptr: *const u8, len: usize) -> std::io::Result<Watch> {
        Watch::add(MEDIUM, ptr, len)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _g = EDIT.lock().unwrap_or_else(|e| e.into_inner());
        TABLE[self.slot].kind.store(FREE, SeqCst);
        // A handler that already matched this range may still replace a
        // page of it: let it finish before the caller unmaps.
        while IN_HANDLER.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
    }
}

/// The count of frontend faults at some moment; [`Stamp::intact`] says
/// whether any happened since. A connection takes one when it starts:
/// after a fault, no byte read from its guest memory can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64);

impl Stamp {
    /// Now.
    pub fn now() -> Stamp {
        Stamp(FRONTEND_FAULTS.load(SeqCst))
    }

    /// No frontend mapping has faulted since this stamp was taken.
    pub fn intact(&self) -> bool {
        FRONTEND_FAULTS.load(SeqCst) == self.0
    }
}

/// The address of the last frontend fault (0: none yet).
pub fn last_frontend_fault() -> usize {
    LAST_ADDR.load(SeqCst)
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    IN_HANDLER.fetch_add(1, SeqCst);
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    let hit = TABLE.iter().find_map(|s| {
        let kind = s.kind.load(SeqCst);
        let (start, len) = (s.start.load(SeqCst), s.len.load(SeqCst));
        (kind != FREE && addr >= start && addr - start < len).then_some((kind, start, len))
    });
    match hit {
        Some((FRONTEND, start, len)) if stand_in(addr, start, len) => {
            LAST_ADDR.store(addr, SeqCst);
            FRONTEND_FAULTS.fetch_add(1, SeqCst);
            IN_HANDLER.fetch_sub(1, SeqCst);
        }
        Some((MEDIUM, start, _)) => {
            let mut m = Msg::new();
            m.s("pcache: the cache medium failed under us at byte ");
            m.n((addr - start) as u64);
            if code == libc::BUS_MCEERR_AR || code == libc::BUS_MCEERR_AO {
                m.s(" (a media error)");
            } else {
                m.s(" (SIGBUS: the cache file was truncated by someone else?)");
            }
            m.s("; stopping\n");
            die(&m);
            IN_HANDLER.fetch_sub(1, SeqCst);
        }
        _ => {
            let mut m = Msg::new();
            m.s("pcache: SIGBUS at address 0x");
            m.hex(addr as u64);
            m.s(" (code ");
            m.n(code as u64);
            m.s("), outside every mapping pcache can recover; stopping\n");
            die(&m);
            IN_HANDLER.fetch_sub(1, SeqCst);
        }
    }
}

/// Put a private zero page (or huge page) over the file's page at `addr`,
/// inside the watched range `start..start+len`.
fn stand_in(addr: usize, start: usize, len: usize) -> bool {
    for size in [4096usize, 2 << 20, 1 << 30] {
        let base = addr & !(size - 1);
        if base < start || base + size > start + len {
            return false;
        }
        // SAFETY: replaces pages of a mapping we made of a frontend's
        // file and still hold (its Watch is alive: `IN_HANDLER` keeps the
        // owner from unmapping it meanwhile).
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

/// Print `m` and give SIGBUS its default action back: the access that
/// faulted runs again when the handler returns, and the process dies of it.
fn die(m: &Msg) {
    // SAFETY: write(2) and sigaction(2) are async-signal-safe.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// A message built without allocating (in a signal handler).
struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    fn new() -> Msg {
        Msg {
            buf: [0; 256],
            len: 0,
        }
    }

    fn s(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    fn digits(&mut self, mut v: u64, base: u64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b"0123456789abcdef"[(v % base) as usize];
            v /= base;
            if v == 0 {
                break;
            }
        }
        self.bytes(&d[i..]);
    }

    fn n(&mut self, v: u64) {
        self.digits(v, 10);
    }

    fn hex(&mut self, v: u64) {
        self.digits(v, 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_format_numbers_without_allocating() {
        let mut m = Msg::new();
        m.s("at ");
        m.n(0);
        m.s(" ");
        m.n(1234567890);
        m.s(" 0x");
        m.hex(0xdead_beef);
        assert_eq!(&m.buf[..m.len], b"at 0 1234567890 0xdeadbeef");
    }
}
