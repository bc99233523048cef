//! pcache: a vhost-user-blk backend with a crash-safe persistent write-back
//! cache, a userspace port of Linux's dm-pcache.
//!
//! Modules, following the data path downwards:
//!
//! - [`engine`]: the cache itself (segments, index, key log, read/write/flush,
//!   writeback, GC, replay); knows sectors, not virtio.
//! - [`format`]: every on-media record, byte by byte; no threads, no I/O.
//! - [`pmem`]: the mapped cache medium and its persistence primitives.
//! - [`backing`]: the disk behind the cache (a file, a block device, a Ceph
//!   RBD image), sync and async.
//! - [`vhost`]: the vhost-user-blk backend; the only code that knows virtio.
//! - [`disk`]: one disk, the cache in front of its backing store: requests
//!   routed by the cache mode, misses and fills, the I/O memory budget,
//!   the guest's write-cache choice, and handing the disk to another host
//!   in a live migration.
//! - [`iovec`]: a request's buffers in memory shared with a guest.
//! - [`fault`]: SIGBUS from mappings of files that shrink under us (a
//!   frontend's costs its connection, the medium's stops the process).
//! - [`control`]: the runtime control socket (status, gc_percent, flush).
//! - [`metrics`]: Prometheus metrics over HTTP (`serve --metrics`).
//! - [`media`]: opening the cache and the backing store for a command, and
//!   the lock that makes one process a cache's owner.
//! - [`sockets`]: binding the vhost-user socket (never over a live one).
//! - [`serve`]: `pcache serve`, tying the above together.
//! - [`report`]: the view of an open cache shown by inspect and status.
//! - [`sandbox`]: least privilege for `pcache serve` (no_new_privs,
//!   landlock, capabilities, `--user`, seccomp allowlists).
//! - [`cli`]: the command line.
//! - `testing` (feature `test-doubles`, for the tests): backing stores that
//!   lose unflushed writes or inject faults.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod backing;
pub mod cli;
pub mod control;
pub mod crc;
pub mod disk;
pub mod engine;
pub mod fault;
pub mod format;
pub mod iovec;
pub mod media;
pub mod metrics;
pub mod pmem;
pub mod report;
pub mod sandbox;
pub mod serve;
pub mod sockets;
#[cfg(any(test, feature = "test-doubles"))]
pub mod testing;
pub mod util;
pub mod vhost;
