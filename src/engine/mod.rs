//! The cache engine: a userspace port of dm-pcache.
//!
//! It knows sectors, not descriptors: requests arrive as byte offsets and
//! buffers, and nothing here knows about virtio or sockets.
//!
//! | file | kernel counterpart | holds |
//! |---|---|---|
//! | `segment.rs` | `cache_segment.c` | allocation, refs, gens |
//! | `index.rs`, `key.rs` | `cache_key.c` (tree part) | the sharded extent index |
//! | `kset.rs` | `cache_key.c` (kset part) | open ksets, key head, log segments |
//! | `req.rs` | `cache_req.c` | read, write, miss fill, flush |
//! | `writeback.rs` | `cache_writeback.c` | dirty keys to the backing store |
//! | `gc.rs` | `cache_gc.c` | reclaiming segments from key_tail |
//! | `bad.rs` | - | ranges whose dirty data failed its CRC |
//! | `pace.rs` | - | spreading guest writes over a writeback batch |
//! | `invalidate.rs` | - | dropping everything cached, writes held back |
//! | `mode.rs` | - | cache modes, writes that go to the backing store |
//! | `verify.rs` | - | offline check of dirty data against its CRCs |
//! | `resize.rs` | - | growing the disk online |
//! | `shards.rs` | - | the table of index shards, growing with the disk |
//! | `replay.rs` | `cache_key_replay` | rebuilding state at open |
//! | `open.rs` | `cache.c`, `cache_dev.c` | format, open, tails, settings |
//!
//! Lock order (outer first): index shard -> open kset -> log head ->
//! segment map. Tail mutexes and the settings mutex are leaves.

mod around;
mod bad;
mod cache;
mod data;
mod error;
mod gc;
mod index;
mod invalidate;
mod io;
mod key;
mod kset;
mod log;
mod maintenance;
mod mode;
mod open;
mod pace;
mod placed;
mod policy;
mod record;
mod replay;
mod req;
mod resize;
mod segment;
mod shards;
mod stats;
mod status;
mod switch;
#[cfg(any(test, feature = "test-doubles"))]
mod test_helpers;
mod verify;
mod wb_state;
mod workers;
mod writeback;

pub use cache::Engine;
pub use data::{DataIn, DataOut};
pub use error::{Error, Result};
pub use index::{Extent, ExtentMap};
pub use key::CacheExt;
pub use mode::CacheMode;
pub use open::{FormatOptions, OpenOptions};
pub use placed::Placed;
pub use policy::{Gate, Observation, Reason, WritebackPolicy};
pub use req::{DataHead, Miss};
pub use segment::LOG_RESERVE_SEGS;
pub use stats::{Stats, StatsSnapshot};
pub use status::INDEX_BYTES_PER_EXTENT;
pub use verify::{BadData, DataCheck};
pub use workers::Workers;
pub use writeback::{Progress, WritebackOrder};
