//! What an open cache looks like from outside: the report `pcache
//! inspect` prints, which `pcache status` includes.

use crate::engine::Engine;
use crate::format;

/// What `inspect` shows.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Cache medium path.
    pub cache: String,
    /// Format version.
    pub version: u32,
    /// Superblock UUID, hex.
    pub uuid: String,
    /// Bytes of the medium.
    pub cache_bytes: u64,
    /// Size of the disk (the backing store): as formatted, or grown since.
    pub backing_bytes: u64,
    /// Segments.
    pub segments: u32,
    /// Segments in use.
    pub segments_used: u32,
    /// gc_percent.
    pub gc_percent: u8,
    /// How writeback orders what reaches the backing store.
    pub writeback_order: String,
    /// data_crc on?
    pub data_crc: bool,
    /// key_head as seg:off (lsn).
    pub key_head: String,
    /// dirty_tail as seg:off (lsn).
    pub dirty_tail: String,
    /// key_tail as seg:off (lsn).
    pub key_tail: String,
    /// Dirty bytes in the log (including overwritten data).
    pub dirty_bytes: u64,
    /// Bytes zeroed or discarded, logged and not yet passed to the backing
    /// store.
    #[serde(default)]
    pub dirty_zero_bytes: u64,
    /// Ranges marked bad (guest byte offset, bytes; at most
    /// [`BAD_RANGES_SHOWN`]): their dirty data failed its CRC before
    /// writeback, and reads of them fail until the guest writes them again.
    #[serde(default)]
    pub bad_ranges: Vec<(u64, u64)>,
    /// Extents in the index.
    pub keys: u64,
    /// Memory the extent index takes, bytes (estimated from its shards and
    /// extents; the rest of pcache's memory is bounded by --io-memory).
    #[serde(default)]
    pub index_bytes: u64,
    /// Keys replayed.
    pub keys_replayed: u64,
    /// Stale keys skipped at replay.
    pub stale_keys: u64,
    /// Of those, keys found in the kset slots (completed writes not yet in
    /// the log when the last process stopped).
    #[serde(default)]
    pub staged_keys: u64,
    /// The guest's volatile write cache: "on" (write-back, FLUSH makes
    /// writes power-safe) or "off" (the guest chose write-through).
    #[serde(default)]
    pub guest_write_cache: String,
    /// What the medium's persistence survives.
    pub durability: String,
}

/// Most bad ranges a report lists.
pub const BAD_RANGES_SHOWN: usize = 16;

fn pos(p: format::PosOnMedia) -> String {
    format!("{}:{} (lsn {})", p.seg, p.off, p.lsn)
}

impl Report {
    /// Gather from an open engine.
    pub fn of(e: &Engine) -> Report {
        let sb = e.superblock();
        let s = e.stats().snapshot();
        Report {
            cache: e.region().path().display().to_string(),
            version: sb.version,
            uuid: sb.uuid.iter().map(|b| format!("{b:02x}")).collect(),
            cache_bytes: sb.cache_bytes,
            backing_bytes: e.size(),
            segments: e.n_segs(),
            segments_used: e.segs_used(),
            gc_percent: e.gc_percent(),
            writeback_order: e.writeback_order().to_string(),
            data_crc: e.data_crc(),
            key_head: pos(e.key_head()),
            dirty_tail: pos(e.dirty_tail()),
            key_tail: pos(e.key_tail()),
            dirty_bytes: s.dirty_bytes,
            dirty_zero_bytes: s.dirty_zero_bytes,
            bad_ranges: e.bad_ranges(BAD_RANGES_SHOWN),
            keys: e.extent_count(),
            index_bytes: e.index_bytes(),
            keys_replayed: s.replay_keys,
            stale_keys: s.replay_stale_keys,
            staged_keys: s.replay_staged_keys,
            guest_write_cache: if e.guest_writethrough() { "off" } else { "on" }.into(),
            durability: e.region().durability().to_string(),
        }
    }

    /// Human-readable form.
    pub fn text(&self) -> String {
        format!(
            "cache          {}\n\
             format         version {}, uuid {}\n\
             size           {} bytes, {} segments of 16 MiB, {} used\n\
             backing        {} bytes\n\
             settings       gc_percent {}, writeback order {}, data_crc {}, guest write cache {}\n\
             key_head       {}\n\
             dirty_tail     {}\n\
             key_tail       {}\n\
             dirty          {} bytes, {} bytes of zeroes\n\
             bad ranges     {}\n\
             keys           {} extents ({} keys replayed, {} from kset slots, {} stale skipped), index {} KiB\n\
             durability     {}\n",
            self.cache,
            self.version,
            self.uuid,
            self.cache_bytes,
            self.segments,
            self.segments_used,
            self.backing_bytes,
            self.gc_percent,
            self.writeback_order,
            if self.data_crc { "on" } else { "off" },
            self.guest_write_cache,
            self.key_head,
            self.dirty_tail,
            self.key_tail,
            self.dirty_bytes,
            self.dirty_zero_bytes,
            bad_ranges(&self.bad_ranges),
            self.keys,
            self.keys_replayed,
            self.staged_keys,
            self.stale_keys,
            self.index_bytes >> 10,
            self.durability
        )
    }
}

/// Ranges marked bad, for humans.
pub fn bad_ranges(r: &[(u64, u64)]) -> String {
    if r.is_empty() {
        return "none".into();
    }
    let list: Vec<String> = r
        .iter()
        .map(|(off, len)| format!("{off:#x}+{len:#x}"))
        .collect();
    format!("{} (reads fail until rewritten)", list.join(", "))
}
