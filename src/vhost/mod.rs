//! The only code that knows virtio: the vhost-user-blk backend.
//!
//! - `config.rs`: feature bits and the virtio-blk config space.
//! - `request.rs`: a descriptor chain -> [`RequestKind`], parsed by
//!   byte offsets (any descriptor layout) with every length checked.
//! - `backend.rs`: the `VhostUserBackend` impl; one worker thread per queue,
//!   each with its own data head, backing queue (io_uring) and deferred list.
//!
//! It must not know the on-media format: it talks to [`crate::engine`] in
//! byte offsets and buffers.
#![allow(unsafe_code)]

mod backend;
mod config;
mod request;

pub use backend::{PcacheBlk, ServeConfig};
pub use config::{BlkConfig, PROTOCOL_FEATURES, VIRTIO_FEATURES};
pub use request::{parse, Reject, RequestKind};
