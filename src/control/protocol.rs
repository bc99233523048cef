//! The control socket's protocol: requests and replies (one JSON object
//! per line each way), what `status` reports, and the client side.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{CacheMode, StatsSnapshot};
use crate::report::Report;

use super::latency::Latency;

/// Facts about the running server that the engine does not know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeInfo {
    /// Backing store path.
    pub backing_path: String,
    /// Queues offered to the frontend.
    pub num_queues: u16,
    /// vhost-user socket.
    pub socket: String,
    /// When writeback runs.
    pub writeback: crate::engine::WritebackPolicy,
    /// Served read-only (`--read-only`): neither the cache nor the backing
    /// store is written.
    #[serde(default)]
    pub read_only: bool,
    /// Sequential cutoff in bytes (0: off).
    #[serde(default)]
    pub sequential_cutoff: u64,
    /// Bytes of I/O memory (`--io-memory`).
    #[serde(default)]
    pub io_memory: u64,
}

/// What the frontend connection is doing right now.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Frontend {
    /// Is a frontend connected?
    pub connected: bool,
    /// Queues it has started.
    pub queues_started: u64,
    /// Reads waiting on the backing store.
    pub reads_waiting: u64,
    /// Writes and flushes waiting for space in the cache.
    pub writes_waiting: u64,
    /// Who writes the disk: the live migration phase, and the last
    /// switchover.
    #[serde(default)]
    pub migration: crate::disk::HandoverStatus,
}

/// Reads the frontend's state when status is asked for.
pub type FrontendProbe = Arc<dyn Fn() -> Frontend + Send + Sync>;

/// Everything `pcache status` shows: what `pcache inspect` shows, plus the
/// live counters and the server's own facts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The cache, as `inspect` reports it.
    #[serde(flatten)]
    pub cache: Report,
    /// Cache mode.
    #[serde(default)]
    pub mode: CacheMode,
    /// A mode switch in progress goes to this mode (after a drain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switching_to: Option<CacheMode>,
    /// Read requests fully served from the cache.
    pub read_hits: u64,
    /// Read requests that needed the backing store.
    pub read_misses: u64,
    /// Has a persist failed (the cache then refuses writes)?
    pub failed: bool,
    /// The server's own facts.
    #[serde(flatten)]
    pub serve: ServeInfo,
    /// The frontend connection, now.
    #[serde(default)]
    pub frontend: Frontend,
    /// Completion latency of the guest's requests.
    #[serde(default)]
    pub latency: Latency,
    /// All engine counters.
    pub stats: StatsSnapshot,
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Report status.
    Status,
    /// Set gc_percent.
    GcPercent {
        /// New value, 0..=90.
        value: u8,
    },
    /// Close every open kset now.
    Flush,
    /// Write back everything now (see `Engine::request_drain`).
    Drain,
    /// Drop everything cached (see `Engine::invalidate`).
    Invalidate,
    /// Re-read the backing store's size and grow the disk to it.
    Resize,
    /// Switch the cache mode: `prepare` announces it (and starts a drain
    /// when it leaves write-back), then without it the switch is made.
    Mode {
        /// Target mode.
        mode: CacheMode,
        /// Only announce it.
        #[serde(default)]
        prepare: bool,
    },
}

/// What a resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resized {
    /// Size before, bytes.
    pub old_bytes: u64,
    /// Size now, bytes.
    pub new_bytes: u64,
    /// Was a connected frontend told (so the guest sees the new size)?
    pub guest_notified: bool,
}

/// Grows the disk to the backing store's size; the server provides it.
pub type Resizer = Arc<dyn Fn() -> Result<Resized, String> + Send + Sync>;

/// A control reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Did it work?
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// For `resize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resized: Option<Resized>,
}

/// Send one request to the control socket at `path`.
pub fn request(path: &Path, req: &Request) -> io::Result<Reply> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("Cannot connect to control socket {}: {e}", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_string(req).map_err(io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply {reply:?}: {e}"),
        )
    })
}

/// Default control socket beside a vhost socket: `X.sock` -> `X.ctl`; any
/// other name gets `.ctl` appended (`vm1.disk0` -> `vm1.disk0.ctl`), so
/// `vm1.disk0` and `vm1.disk1` never share one.
pub fn default_path(socket: &Path) -> PathBuf {
    if socket.extension().is_some_and(|e| e == "sock") {
        return socket.with_extension("ctl");
    }
    let mut name = socket.as_os_str().to_owned();
    name.push(".ctl");
    PathBuf::from(name)
}

fn migration_text(m: &crate::disk::HandoverStatus) -> String {
    use crate::disk::Phase;
    let what = match m.phase {
        Phase::Standby => "standby (the backing store is not written until a guest starts)",
        Phase::Serving => "none",
        Phase::Copying => {
            "copying the guest: writes go through to the backing store, the cache drains"
        }
        Phase::SwitchingOver => "switching over: writing back what is left",
        Phase::HandedOver => {
            "handed over: the backing store holds every write, the cache was emptied"
        }
    };
    match m.last_switchover {
        Some(s) => format!(
            "{what}; last switchover wrote back {} bytes in {} ms",
            s.dirty_bytes, s.millis
        ),
        None => what.into(),
    }
}

impl Status {
    /// Human-readable form.
    pub fn text(&self) -> String {
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                a as f64 * 100.0 / b as f64
            }
        };
        format!(
            "cache        {} ({} bytes, {} segments, {} used = {:.0}%)\n\
             backing      {} ({} bytes)\n\
             socket       {} ({} queues)\n\
             mode         {}\n\
             gc_percent   {}\n\
             data_crc     {}\n\
             write cache  {} (the guest's choice)\n\
             key_head     {}\n\
             dirty_tail   {}\n\
             key_tail     {}\n\
             dirty        {} bytes, {} bytes of zeroes\n\
             bad ranges   {}\n\
             reads        {} hits, {} misses\n\
             frontend     {}\n\
             migration    {}\n\
             latency      {}\n\
             writeback    {} bytes written in {} batches, {} errors, {} order; runs {}\n\
             pressure     {} writes paced behind writeback, {} found the cache full\n\
             durability   {}\n\
             state        {}\n",
            self.cache.cache,
            self.cache.cache_bytes,
            self.cache.segments,
            self.cache.segments_used,
            pct(self.cache.segments_used as u64, self.cache.segments as u64),
            self.serve.backing_path,
            self.cache.backing_bytes,
            self.serve.socket,
            self.serve.num_queues,
            match self.switching_to {
                Some(to) => format!("{} (switching to {to}: writing back first)", self.mode),
                None => self.mode.to_string(),
            } + &if self.serve.sequential_cutoff > 0 {
                format!(
                    "; sequential cutoff {} bytes ({} bytes of writes went around the cache, {} bytes of reads were not cached)",
                    self.serve.sequential_cutoff,
                    self.stats.write_bypass_bytes,
                    self.stats.read_nofill_bytes
                )
            } else {
                "; no sequential cutoff".into()
            },
            self.cache.gc_percent,
            if self.cache.data_crc { "on" } else { "off" },
            self.cache.guest_write_cache,
            self.cache.key_head,
            self.cache.dirty_tail,
            self.cache.key_tail,
            self.cache.dirty_bytes,
            self.cache.dirty_zero_bytes,
            crate::report::bad_ranges(&self.cache.bad_ranges),
            self.read_hits,
            self.read_misses,
            if self.frontend.connected {
                format!(
                    "connected, {} queues started; {} reads waiting on the backing store, {} writes waiting for space",
                    self.frontend.queues_started,
                    self.frontend.reads_waiting,
                    self.frontend.writes_waiting
                )
            } else {
                "none connected".into()
            },
            migration_text(&self.frontend.migration),
            self.latency.text(),
            self.stats.writeback_bytes,
            self.stats.writeback_batches,
            self.stats.writeback_errors,
            self.cache.writeback_order,
            self.serve.writeback,
            self.stats.writes_paced,
            self.stats.cache_full,
            self.cache.durability,
            if self.failed {
                "FAILED (restart pcache)"
            } else if self.serve.read_only {
                "ok, read-only (nothing is written to the cache or the backing store)"
            } else {
                "ok"
            },
        )
    }
}

#[cfg(test)]
mod path_tests {
    use super::default_path;
    use std::path::Path;

    #[test]
    fn control_paths_of_two_disks_never_collide() {
        let p = |s: &str| default_path(Path::new(s));
        assert_eq!(p("/run/pcache/vm1.sock"), Path::new("/run/pcache/vm1.ctl"));
        assert_eq!(
            p("/run/pcache/vm1.disk0"),
            Path::new("/run/pcache/vm1.disk0.ctl")
        );
        assert_eq!(
            p("/run/pcache/vm1.disk1"),
            Path::new("/run/pcache/vm1.disk1.ctl")
        );
        assert_eq!(p("/run/pcache/vm1"), Path::new("/run/pcache/vm1.ctl"));
        assert_eq!(p("disk0.sock.d/x"), Path::new("disk0.sock.d/x.ctl"));
    }
}
