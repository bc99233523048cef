//! The command line: subcommands, their arguments, messages and exit codes.
//!
//! Exit codes: 0 success; 1 the cache is unsound (`check`) or an operation
//! failed; 2 bad arguments (clap's own code).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::backing::{Backing, BackingQueue, FileBacking};
use crate::engine::{Engine, FormatOptions, OpenOptions};
use crate::format::{self, check_new_cache_size};
use crate::pmem::{Region, RegionOptions};
use crate::util::parse_size;

/// pcache: a persistent write-back cache for virtual disks (a userspace dm-pcache).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new, empty cache on a file or device-DAX device.
    Format {
        /// Cache medium: a file (created if absent), or /dev/daxX.Y.
        #[arg(long)]
        cache: PathBuf,
        /// Size of a new cache file: at least 512M, a multiple of 16M.
        #[arg(long, value_parser = parse_size)]
        cache_size: Option<u64>,
        /// Backing store (file or block device) the cache will front.
        #[arg(long)]
        backing: PathBuf,
        /// Keep a crc32c of all cached data and check it on every hit.
        #[arg(long)]
        data_crc: bool,
        /// Start GC when this percentage of segments is used (0..=90).
        #[arg(long, default_value_t = format::GC_PERCENT_DEFAULT)]
        gc_percent: u8,
        /// Overwrite a medium that already holds a pcache cache (its dirty
        /// data is lost).
        #[arg(long)]
        force: bool,
    },
    /// Show a cache's superblock, settings, log positions and usage.
    Inspect {
        /// Cache medium.
        #[arg(long)]
        cache: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate every record and the whole key log. Exit 0 when sound.
    Check {
        /// Cache medium.
        #[arg(long)]
        cache: PathBuf,
    },
    /// Write every dirty key back so the backing store alone is complete.
    Writeback {
        /// Cache medium.
        #[arg(long)]
        cache: PathBuf,
        /// Backing store recorded in the cache.
        #[arg(long)]
        backing: PathBuf,
    },
}

/// Parse arguments, run, print errors; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pcache: {}", error_chain(&*e));
            1
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// "outer: cause: cause" for an error and its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Run one parsed command; returns the exit code.
pub fn run(cli: Cli) -> AnyResult<i32> {
    match cli.command {
        Command::Format {
            cache,
            cache_size,
            backing,
            data_crc,
            gc_percent,
            force,
        } => {
            let b = FileBacking::open(&backing, true)
                .map_err(|e| format!("Cannot open backing store {}: {e}", backing.display()))?;
            prepare_cache_file(&cache, cache_size, force)?;
            let region = Region::open(&cache, RegionOptions::default())?;
            let sb = Engine::format(
                &region,
                &FormatOptions {
                    backing_bytes: b.size(),
                    data_crc,
                    gc_percent,
                    force,
                },
            )?;
            println!(
                "formatted {}: {} segments ({} MiB of cache) for {} ({} bytes), data_crc {}, gc_percent {}",
                cache.display(),
                sb.seg_num,
                (sb.seg_num as u64 * format::SEG_BYTES) >> 20,
                backing.display(),
                sb.backing_bytes,
                if data_crc { "on" } else { "off" },
                gc_percent
            );
            Ok(0)
        }
        Command::Inspect { cache, json } => {
            let engine = open_read_only(&cache)?;
            let report = Report::of(&engine);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(0)
        }
        Command::Check { cache } => match open_read_only(&cache) {
            Ok(engine) => {
                let r = Report::of(&engine);
                println!(
                    "{}: sound: {} keys replayed ({} stale skipped), log {} .. {}, {} dirty bytes",
                    cache.display(),
                    r.keys_replayed,
                    r.stale_keys,
                    r.key_tail,
                    r.key_head,
                    r.dirty_bytes
                );
                Ok(0)
            }
            Err(e) => {
                eprintln!("{}: NOT sound: {}", cache.display(), error_chain(&*e));
                Ok(1)
            }
        },
        Command::Writeback { cache, backing } => {
            let region = Arc::new(Region::open(&cache, RegionOptions::default())?);
            let engine = Engine::open(region, &OpenOptions::default())?;
            let b = FileBacking::open(&backing, false)
                .map_err(|e| format!("Cannot open backing store {}: {e}", backing.display()))?;
            check_backing_size(&engine, b.size(), &backing)?;
            let start = engine.stats().snapshot().dirty_bytes;
            let bar = indicatif::ProgressBar::new(start);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "writeback {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template"),
            );
            let mut q = BackingQueue::new(Arc::new(b), 64);
            engine.writeback_all(&mut q, |left| bar.set_position(start.saturating_sub(left)))?;
            bar.finish();
            println!(
                "{}: clean; {} bytes written back to {}",
                cache.display(),
                engine.stats().snapshot().writeback_bytes,
                backing.display()
            );
            Ok(0)
        }
    }
}

/// Refuse a backing store whose size differs from the one formatted for.
pub fn check_backing_size(engine: &Engine, size: u64, path: &Path) -> AnyResult<()> {
    if size != engine.size() {
        return Err(format!(
            "Backing store {} is {} bytes but the cache was formatted for {} bytes; refusing to use it",
            path.display(),
            size,
            engine.size()
        )
        .into());
    }
    Ok(())
}

fn open_read_only(cache: &Path) -> AnyResult<Arc<Engine>> {
    let region = Arc::new(Region::open(
        cache,
        RegionOptions {
            read_only: true,
            ..Default::default()
        },
    )?);
    Ok(Engine::open(
        region,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?)
}

/// Create or size a cache file before formatting.
pub fn prepare_cache_file(cache: &Path, size: Option<u64>, force: bool) -> AnyResult<()> {
    let meta = std::fs::metadata(cache).ok();
    match (meta, size) {
        (None, None) => Err(format!(
            "Cache {} does not exist; give --cache-size to create it",
            cache.display()
        )
        .into()),
        (None, Some(sz)) => {
            check_new_cache_size(sz)?;
            let f = std::fs::File::create(cache)
                .map_err(|e| format!("Cannot create cache file {}: {e}", cache.display()))?;
            f.set_len(sz)?;
            Ok(())
        }
        (Some(m), Some(sz)) if m.is_file() && m.len() != sz => {
            check_new_cache_size(sz)?;
            if !force && m.len() > 0 {
                return Err(format!(
                    "Cache file {} is {} bytes, not {sz}; resizing it needs --force",
                    cache.display(),
                    m.len()
                )
                .into());
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(cache)?
                .set_len(sz)?;
            Ok(())
        }
        (Some(m), _) => {
            if m.is_file() {
                format::segs_for_size(m.len())?;
            }
            Ok(())
        }
    }
}

/// What `inspect` shows.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Cache medium path.
    pub cache: String,
    /// Format version.
    pub version: u32,
    /// Superblock UUID, hex.
    pub uuid: String,
    /// Bytes of the medium.
    pub cache_bytes: u64,
    /// Backing store size recorded at format.
    pub backing_bytes: u64,
    /// Segments.
    pub segments: u32,
    /// Segments in use.
    pub segments_used: u32,
    /// gc_percent.
    pub gc_percent: u8,
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
    /// Extents in the index.
    pub keys: u64,
    /// Keys replayed.
    pub keys_replayed: u64,
    /// Stale keys skipped at replay.
    pub stale_keys: u64,
    /// What the medium's persistence survives.
    pub durability: String,
}

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
            backing_bytes: sb.backing_bytes,
            segments: e.n_segs(),
            segments_used: e.segs_used(),
            gc_percent: e.gc_percent(),
            data_crc: e.data_crc(),
            key_head: pos(e.key_head()),
            dirty_tail: pos(e.dirty_tail()),
            key_tail: pos(e.key_tail()),
            dirty_bytes: s.dirty_bytes,
            keys: e.extent_count(),
            keys_replayed: s.replay_keys,
            stale_keys: s.replay_stale_keys,
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
             settings       gc_percent {}, data_crc {}\n\
             key_head       {}\n\
             dirty_tail     {}\n\
             key_tail       {}\n\
             dirty          {} bytes\n\
             keys           {} extents ({} keys replayed, {} stale skipped)\n\
             durability     {}\n",
            self.cache,
            self.version,
            self.uuid,
            self.cache_bytes,
            self.segments,
            self.segments_used,
            self.backing_bytes,
            self.gc_percent,
            if self.data_crc { "on" } else { "off" },
            self.key_head,
            self.dirty_tail,
            self.key_tail,
            self.dirty_bytes,
            self.keys,
            self.keys_replayed,
            self.stale_keys,
            self.durability
        )
    }
}
