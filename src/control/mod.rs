//! The runtime control socket: status, gc_percent, flush.
//!
//! Protocol: one JSON request per line, one JSON reply per line.
//!
//! ```text
//! {"cmd":"status"}                 -> {"ok":true,"status":{...}}
//! {"cmd":"gc_percent","value":50}  -> {"ok":true}
//! {"cmd":"flush"}                  -> {"ok":true}
//! anything else                    -> {"ok":false,"error":"..."}
//! ```
//!
//! It sees the engine only through its public accessors and a stats
//! snapshot.

pub mod drain;
mod latency;
pub mod mode;
mod protocol;
mod server;

pub use latency::{Latency, LatencyProbe};
pub use protocol::{
    default_path, request, Frontend, FrontendProbe, Reply, Request, Resized, Resizer, ServeInfo,
    Status,
};
pub use server::{spawn_server, status, Server};
