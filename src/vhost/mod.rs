//! The only code that knows virtio: the vhost-user-blk backend.
//!
//! - `config.rs`: feature bits and the virtio-blk config space.
//! - `request.rs`: a request header and lengths -> [`RequestKind`], every
//!   length and sector checked.
//! - `chain.rs`: a descriptor chain's layout, and writing answers into it.
//! - `ring.rs`: a started ring: taking and returning requests.
//! - `inflight.rs`: the frontend's inflight region (requests taken and not
//!   returned, run again by the next process).
//! - `shm.rs`: a shared mapping of a file the frontend gave (both above).
//! - `dirty.rs`: marking the guest pages we write while the frontend
//!   migrates the guest (its dirty log).
//! - `device.rs`: the device one connection sees: features, config space,
//!   per-queue state.
//! - `queue.rs`: one queue's pipeline: chains parsed into requests for the
//!   disk layer, answers into the used ring, stopping.
//! - `worker.rs`: one thread per queue, an epoll loop.
//! - `counters.rs`, `latency.rs`: requests, bytes and completion latency
//!   per queue, for metrics and status.
//! - `handler.rs`: the frontend's messages (memory, features, rings,
//!   inflight), on the vhost crate's request-handler trait.
//! - `session.rs`: one connection, from accept to close.
//! - `harness.rs` (tests and feature `fuzzing` only): one queue driven by a
//!   hostile driver without a vhost-user connection, for the chain-level
//!   tests and the fuzz targets in `fuzz/`.
//!
//! It must not know the cache: it hands each request to the disk layer
//! ([`crate::disk`]) and returns the answers.
#![allow(unsafe_code)]

mod chain;
mod config;
mod conn;
mod counters;
mod device;
mod dirty;
mod guest;
mod handler;
mod inflight;
mod latency;
mod notify;
mod poll;
mod queue;
mod request;
mod ring;
mod session;
mod shm;
mod worker;

#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
#[cfg(test)]
mod spin_tests;
#[cfg(test)]
mod tests;

pub use config::{BlkConfig, PROTOCOL_FEATURES, VIRTIO_FEATURES};
pub use conn::ServeConfig;
pub use counters::{Counters, Op, Outcome, QueueCounters};
pub use device::Device;
pub use inflight::{InflightQueue, InflightRegion, Recovered};
pub use latency::{Buckets, Histogram, BOUNDS_NS};
pub use request::{parse, Reject, RequestKind};
pub use session::{serve, Active, SessionHook};
