//! Test doubles (feature `test-doubles`; the tests turn it on, the binary
//! never has it): [`MemBacking`], an in-memory disk whose unflushed writes
//! a simulated crash loses, and [`FaultyBacking`], which wraps a store and
//! injects errors and delays. The power-failure tracker of the cache medium
//! is `pmem::tracked`, behind the same feature.

mod faulty;
mod mem;

pub use faulty::{FaultKind, FaultOp, FaultPlan, FaultyBacking};
pub use mem::MemBacking;
