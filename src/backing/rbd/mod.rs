//! Ceph RBD images as backing stores, through librbd's C API.
//!
//! `spec.rs` parses the `rbd:` name QEMU users know, `ffi.rs` loads librados
//! and librbd at run time, `image.rs` opens an image (taking its exclusive
//! lock) and implements the synchronous [`Backing`](super::Backing) trait;
//! the asynchronous engine the queue workers use is
//! `backing/queue/rbd.rs`.

mod ffi;
mod image;
mod spec;

pub(crate) use ffi::{api, rbd_completion_t};
pub use image::{RbdBacking, RbdHandle, DEFAULT_READ_TIMEOUT};
pub use spec::{RbdSpec, PREFIX};
