//! The backing store: the disk behind the cache.
//!
//! [`Backing`] is the small synchronous trait every store implements: a raw
//! file or block device ([`FileBacking`]) and a Ceph RBD image
//! ([`RbdBacking`]); the test doubles live in `crate::testing`.
//! [`BackingQueue`] is the asynchronous
//! side: one per worker thread, on io_uring when the store exposes a file
//! descriptor and the kernel allows it, on librbd's asynchronous calls for
//! an RBD image, on a small thread pool otherwise. [`BackingSpec`] is what
//! `--backing` names, and [`open`] opens it.
//!
//! This module knows nothing about the cache.

mod aligned;
pub mod arena;
mod file;
pub(crate) mod librbd;
mod queue;
mod rbd;
mod spec;
mod store;

pub use aligned::{AlignedBuf, BufPool, Home, IO_ALIGN};
pub use arena::Arena;
#[cfg(any(test, feature = "test-doubles"))]
pub(crate) use file::check_range;
pub use file::FileBacking;
pub use librbd::RbdHandle;
pub use queue::{BackingQueue, Completion, IoOp, QueueEngine};
pub use rbd::{RbdBacking, RbdSpec, DEFAULT_READ_TIMEOUT};
pub use spec::BackingSpec;
pub use store::{write_zeros, Backing};

use std::io;

/// How to open a backing store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-only (an RBD image is then not locked).
    pub read_only: bool,
    /// Claim the store ([`Backing::claim`]) once open, unless read-only.
    pub claim: bool,
    /// How long an RBD read may wait for the cluster ([`DEFAULT_READ_TIMEOUT`]
    /// if `None`).
    pub read_timeout: Option<std::time::Duration>,
    /// Where an RBD image's lock owner is recorded (see
    /// [`RbdBacking::open`]); the caller holds the cache whose previous
    /// owner wrote it.
    pub lock_record: Option<std::path::PathBuf>,
}

/// Open the store `spec` names.
pub fn open(spec: &BackingSpec, o: &OpenOptions) -> io::Result<Box<dyn Backing>> {
    Ok(match spec {
        BackingSpec::File(p) => Box::new(FileBacking::open(p, o.read_only)?),
        BackingSpec::Rbd(r) => {
            let mut b = RbdBacking::open(r, o.read_only, o.lock_record.as_deref())?;
            b.set_read_timeout(o.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT));
            if o.claim && !o.read_only {
                b.claim()?;
            }
            Box::new(b)
        }
    })
}
