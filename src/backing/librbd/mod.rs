//! librados and librbd, loaded at run time (`ffi.rs`), and the raw handle
//! on an open image that the asynchronous engine
//! (`backing/queue/rbd.rs`) submits to. Opening an image is `rbd/`.
#![allow(unsafe_code)]

pub(crate) mod ffi;

use std::time::Duration;

pub(crate) use ffi::{api, rbd_completion_t};
use ffi::{rbd_image_t, Api};

/// An image handle for the asynchronous engine: plain pointers, valid while
/// the [`RbdBacking`] that gave them lives.
#[derive(Debug, Clone, Copy)]
pub struct RbdHandle {
    /// The loaded API.
    pub api: &'static Api,
    /// The open image.
    pub image: rbd_image_t,
    /// How long a read may wait for the cluster before it fails.
    pub read_timeout: Duration,
}

// SAFETY: librbd image handles may be used from any thread for I/O; the
// handle is only a pointer, kept valid by the owning RbdBacking.
unsafe impl Send for RbdHandle {}
