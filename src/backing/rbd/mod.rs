//! Ceph RBD images as backing stores, through librbd's C API.
//!
//! `spec.rs` parses the `rbd:` name QEMU users know, `image.rs` opens an
//! image (taking its exclusive lock) and implements the synchronous
//! [`Backing`](super::Backing) trait; librados and librbd themselves are
//! loaded by `backing/librbd`, and the asynchronous engine the queue
//! workers use is `backing/queue/rbd.rs`.

mod image;
mod spec;

pub use image::{RbdBacking, DEFAULT_READ_TIMEOUT};
pub use spec::{RbdSpec, PREFIX};
