//! A hostile frontend's messages, straight into the message handler (no
//! socket: the framing is the vhost crate's, fuzzed by its own project):
//! well-formed messages in any order, with memfds of any size standing for
//! guest memory, the inflight region and the dirty log, stated sizes and
//! offsets that lie, overflowing addresses, rings placed anywhere, and
//! files that shrink after they were mapped. Every input is one fresh
//! connection on one shared disk; none may end the process.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserLog, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::super::conn::ServeConfig;
use super::super::counters::Counters;
use super::super::device::Device;
use super::super::handler::Handler;
use super::super::shm::Owner;
use crate::backing::Backing;
use crate::disk::{Disk, DiskConfig, DEFAULT_IO_MEMORY};
use crate::engine::{Engine, FormatOptions, OpenOptions, WritebackPolicy};
use crate::pmem::{Region, RegionOptions};
use crate::testing::MemBacking;

/// Largest memfd an input makes (sparse: costs nothing until touched).
const MAX_FILE: u64 = 64 << 20;
/// Messages per input.
const MAX_MESSAGES: usize = 48;

/// The disk every connection is made to, and its queue count.
pub struct Frontends {
    disk: Arc<Disk>,
}

/// Reads the input a field at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }

    /// A size or offset: small, page-ish, near a file's end, or anything.
    fn size(&mut self, file: u64) -> u64 {
        match self.u8() % 4 {
            0 => u64::from(self.u8()) << 12,
            1 => file,
            2 => file.wrapping_add(u64::from(self.u8()) << 12),
            _ => self.u64(),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A descriptor of `e` of our own, as a frontend hands one over.
fn file_of(e: &EventFd) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup of a live descriptor.
    let fd = unsafe { libc::dup(e.as_raw_fd()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn memfd(len: u64) -> io::Result<File> {
    // SAFETY: a static NUL-terminated name; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"pcache-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len)?;
    Ok(f)
}

impl Frontends {
    /// A disk on a cache at `cache` (512 MiB, unlinked once open) over an
    /// in-memory backing store.
    pub fn new(cache: &Path) -> io::Result<Frontends> {
        let other = |e: &dyn std::fmt::Display| io::Error::other(e.to_string());
        let f = File::create(cache)?;
        f.set_len(512 << 20)?;
        drop(f);
        let opened = (|| {
            let region = Region::open(cache, RegionOptions::default()).map_err(|e| other(&e))?;
            Engine::format(
                &region,
                &FormatOptions {
                    backing_bytes: 64 << 20,
                    force: true,
                    ..Default::default()
                },
            )
            .map_err(|e| other(&e))?;
            drop(region);
            let region =
                Arc::new(Region::open(cache, RegionOptions::default()).map_err(|e| other(&e))?);
            Engine::open(region, &OpenOptions::default()).map_err(|e| other(&e))
        })();
        let _ = std::fs::remove_file(cache);
        let backing: Arc<dyn Backing> = Arc::new(MemBacking::new(64 << 20));
        let disk = Disk::new(
            opened?,
            backing,
            true,
            DiskConfig {
                sequential_cutoff: 0,
                read_only: false,
                io_memory: DEFAULT_IO_MEMORY,
            },
            WritebackPolicy::IMMEDIATE,
        )?;
        Ok(Frontends {
            disk: Arc::new(disk),
        })
    }

    /// One connection: the messages `data` describes, then the close.
    pub fn run(&self, data: &[u8]) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<Owner>::new());
        let cfg = ServeConfig {
            num_queues: 2,
            counters: Counters::new(2),
            queue_size: 256,
            blk_size: 512,
            read_only: false,
            serial: "fuzz".into(),
            poll_us: 0,
        };
        let Ok(dev) = Device::new(self.disk.clone(), cfg, mem) else {
            return;
        };
        let Ok(mut h) = Handler::new(Arc::new(dev)) else {
            return;
        };
        let mut input = Input(data);
        // Files made so far (a later message may shrink one), and the
        // eventfds handed over as kicks.
        let mut files: Vec<File> = Vec::new();
        let mut kicks: Vec<EventFd> = Vec::new();
        for _ in 0..MAX_MESSAGES {
            if input.is_empty() {
                break;
            }
            let _ = message(&mut h, &mut input, &mut files, &mut kicks);
        }
        h.stop_all();
    }
}

/// Send one message; its answer does not matter, only that the process
/// lives.
fn message(
    h: &mut Handler,
    input: &mut Input<'_>,
    files: &mut Vec<File>,
    kicks: &mut Vec<EventFd>,
) -> Result<(), Box<dyn std::error::Error>> {
    let q = u32::from(input.u8() % 3);
    let mut new_file = |input: &mut Input<'_>| -> io::Result<(File, u64)> {
        let len = (u64::from(input.u8()) << 16) % MAX_FILE;
        let f = memfd(len)?;
        files.push(f.try_clone()?);
        Ok((f, len))
    };
    match input.u8() % 16 {
        0 => h.set_owner()?,
        1 => h.set_features(input.u64())?,
        2 => h.set_protocol_features(input.u64())?,
        3 | 4 => {
            let n = 1 + input.u8() as usize % 3;
            let (mut regions, mut fds) = (Vec::new(), Vec::new());
            for _ in 0..n {
                let (f, len) = new_file(input)?;
                let (gpa, size, off) = (input.size(len), input.size(len), input.size(len));
                regions.push(VhostUserMemoryRegion::new(gpa, size, input.size(len), off));
                fds.push(f);
            }
            h.set_mem_table(&regions, fds, None)?;
        }
        5 => {
            let (f, len) = new_file(input)?;
            let r = VhostUserSingleMemoryRegion::new(
                input.size(len),
                input.size(len),
                input.size(len),
                input.size(len),
            );
            h.add_mem_region(&r, f, None)?;
        }
        6 => {
            let r = VhostUserSingleMemoryRegion::new(input.u64(), input.u64(), 0, 0);
            h.remove_mem_region(&r)?;
        }
        7 => h.set_vring_num(q, u32::from(input.u8()) << (input.u8() % 4))?,
        8 => {
            let (d, u, a) = (
                input.u64() % MAX_FILE,
                input.u64() % MAX_FILE,
                input.u64() % MAX_FILE,
            );
            h.set_vring_addr(q, VhostUserVringAddrFlags::empty(), d, u, a, 0)?;
        }
        9 => h.set_vring_base(q, u32::from(input.u8()))?,
        10 => {
            let k = EventFd::new(0)?;
            let c = EventFd::new(0)?;
            h.set_vring_call(q as u8, Some(file_of(&c)?))?;
            h.set_vring_kick(q as u8, Some(file_of(&k)?))?;
            h.set_vring_enable(q, input.u8().is_multiple_of(2))?;
            let _ = k.write(1);
            kicks.push(k);
        }
        11 => {
            let _ = h.get_vring_base(q)?;
        }
        12 => {
            let (f, len) = new_file(input)?;
            let m = VhostUserInflight::new(
                input.size(len),
                input.size(len),
                u16::from(input.u8() % 4),
                u16::from(input.u8()) << (input.u8() % 3),
            );
            h.set_inflight_fd(&m, f)?;
        }
        13 => {
            let (f, len) = new_file(input)?;
            let log = VhostUserLog::new(input.size(len), input.size(len));
            h.set_log_base(&log, f)?;
            h.set_features(input.u64() | (1 << 26))?;
        }
        14 => {
            // A file already mapped shrinks, then every ring is kicked.
            if let Some(f) = files.get(input.u8() as usize % files.len().max(1)) {
                f.set_len(u64::from(input.u8()) << 12)?;
            }
            for k in kicks.iter() {
                let _ = k.write(1);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        _ => {
            let off = u32::from(input.u8());
            let size = u32::from(input.u8());
            let _ = h.get_config(off, size, VhostUserConfigFlags::empty());
            let buf = [input.u8(); 8];
            let _ = h.set_config(
                off,
                &buf[..size as usize % 9],
                VhostUserConfigFlags::empty(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker woken by an old kick reads the new one: a blocking eventfd
    /// from the frontend would hang it, holding the ring (found by the
    /// `frontend` fuzz target). Kick and call fds are made non-blocking.
    #[test]
    fn kick_and_call_fds_a_frontend_gives_are_made_non_blocking() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let f = Frontends::new(&dir.path().join("cache.img")).unwrap();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<Owner>::new());
        let cfg = ServeConfig {
            num_queues: 1,
            counters: Counters::new(1),
            queue_size: 256,
            blk_size: 512,
            read_only: false,
            serial: "t".into(),
            poll_us: 0,
        };
        let mut h = Handler::new(Arc::new(Device::new(f.disk.clone(), cfg, mem).unwrap())).unwrap();
        let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        h.set_vring_kick(0, Some(file_of(&kick).unwrap())).unwrap();
        h.set_vring_call(0, Some(file_of(&call).unwrap())).unwrap();
        for e in [&kick, &call] {
            // SAFETY: F_GETFL on a live descriptor.
            let flags = unsafe { libc::fcntl(e.as_raw_fd(), libc::F_GETFL) };
            assert_ne!(flags & libc::O_NONBLOCK, 0);
        }
        h.stop_all();
    }
}
