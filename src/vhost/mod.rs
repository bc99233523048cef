//! The only code that knows virtio: the vhost-user-blk backend.
//!
//! - `config.rs`: feature bits and the virtio-blk config space.
//! - `request.rs`: a descriptor chain -> [`RequestKind`], parsed by
//!   byte offsets (any descriptor layout) with every length checked.
//! - `backend.rs`: the `VhostUserBackend` impl; one worker thread per queue,
//!   each with its own data head, backing queue (io_uring) and deferred list.
//! - `harness.rs` (tests and feature `fuzzing` only): one queue driven by a
//!   hostile driver without a vhost-user daemon, for the chain-level tests
//!   and the fuzz targets in `fuzz/`.
//!
//! It must not know the on-media format: it talks to [`crate::engine`] in
//! byte offsets and buffers.
#![allow(unsafe_code)]

mod backend;
mod config;
mod request;

#[cfg(any(test, feature = "fuzzing"))]
pub use backend::harness;
pub use backend::{PcacheBlk, ServeConfig};
pub use config::{BlkConfig, PROTOCOL_FEATURES, VIRTIO_FEATURES};
pub use request::{parse, Reject, RequestKind};
