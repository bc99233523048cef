//! The command line: subcommands, their arguments, messages and exit codes.
//!
//! Exit codes: 0 success; 1 the cache is unsound (`check`) or an operation
//! failed; 2 bad arguments (clap's own code).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::backing::{BackingQueue, BackingSpec};
use crate::engine::{FormatOptions, WritebackPolicy};
use crate::format;
use crate::media::{self, Lock};
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
    /// Serve the cached disk to a vhost-user-blk frontend (QEMU,
    /// cloud-hypervisor, libblkio). With no arguments: creates
    /// pcache-data/{cache.img (1G), disk.img (8G sparse)} if absent and
    /// listens on pcache-data/pcache.sock.
    Serve(Box<ServeArgs>),
    /// Show a running server's status (through its control socket).
    Status {
        /// Control socket (default: pcache-data/pcache.ctl).
        #[arg(long, default_value = "pcache-data/pcache.ctl")]
        control: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change gc_percent of a running server and persist it.
    GcPercent {
        /// Control socket.
        #[arg(long, default_value = "pcache-data/pcache.ctl")]
        control: PathBuf,
        /// New value, 0..=90.
        value: u8,
    },
    /// Close every open kset of a running server now.
    Flush {
        /// Control socket.
        #[arg(long, default_value = "pcache-data/pcache.ctl")]
        control: PathBuf,
    },
    /// Drop everything a running server has cached (draining first), so
    /// reads go to the backing store: after it changed behind the cache.
    Invalidate {
        /// Control socket.
        #[arg(long, default_value = "pcache-data/pcache.ctl")]
        control: PathBuf,
        /// Give up the drain after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Write back everything a running server holds dirty now, and wait
    /// until nothing is (progress on a terminal; exit 1 on a timeout).
    Drain {
        /// Control socket.
        #[arg(long, default_value = "pcache-data/pcache.ctl")]
        control: PathBuf,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or change a running server's cache mode (writeback,
    /// writethrough, writearound, none); leaving writeback writes
    /// everything back first (progress on a terminal).
    Mode {
        /// Control socket.
        #[arg(long, default_value = "pcache-data/pcache.ctl")]
        control: PathBuf,
        /// The mode to switch to; none given: print the mode.
        #[arg(value_parser = mode_names())]
        mode: Option<crate::engine::CacheMode>,
        /// Give up the drain after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a running server's disk to its backing store's size now (after
    /// the file, device or image grew) and tell the guest. A disk never
    /// shrinks.
    Resize {
        /// Control socket.
        #[arg(long, default_value = "pcache-data/pcache.ctl")]
        control: PathBuf,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a new, empty cache on a file or device-DAX device.
    Format {
        /// Cache medium: a file (created if absent), or /dev/daxX.Y.
        #[arg(long)]
        cache: PathBuf,
        /// Size of a new cache file: at least 512M, a multiple of 16M.
        #[arg(long, value_parser = parse_size)]
        cache_size: Option<u64>,
        /// Backing store the cache will front: a file, a block device or
        /// rbd:POOL/IMAGE[:conf=PATH][:id=NAME].
        #[arg(long)]
        backing: BackingSpec,
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
        /// Also verify the data CRC of every dirty extent (needs a cache
        /// formatted with --data-crc).
        #[arg(long)]
        data: bool,
    },
    /// Write every dirty key back so the backing store alone is complete.
    Writeback {
        /// Cache medium.
        #[arg(long)]
        cache: PathBuf,
        /// Backing store the cache fronts (a path or rbd:POOL/IMAGE...).
        #[arg(long)]
        backing: BackingSpec,
    },
}

/// Arguments of `pcache serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// vhost-user socket to listen on [default: pcache-data/pcache.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Cache medium: a file or /dev/daxX.Y [default: pcache-data/cache.img].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Backing store: a file, a block device, or an RBD image as
    /// rbd:POOL/IMAGE[:conf=PATH][:id=NAME] (QEMU's syntax)
    /// [default: pcache-data/disk.img].
    #[arg(long)]
    pub backing: Option<BackingSpec>,
    /// Seconds a read from an RBD image may wait for the cluster before
    /// the guest gets an I/O error (writes wait as long as it takes).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub backing_read_timeout: u64,
    /// Size of a cache file to create (at least 512M, a multiple of 16M)
    /// [default: 1G].
    #[arg(long, value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// Size of a backing file to create when it does not exist (sparse)
    /// [default: 8G for the default path].
    #[arg(long, value_parser = parse_size)]
    pub backing_size: Option<u64>,
    /// Format the cache even if it already holds a pcache cache or other
    /// data (erasing it). A new cache file is always formatted.
    #[arg(long)]
    pub format: bool,
    /// Request queues offered (QEMU's default is one per vCPU).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Largest virtqueue size accepted.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=32768))]
    pub queue_size: u16,
    /// Logical block size advertised to the guest.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,
    /// Keep a crc32c of all cached data (for a new cache).
    #[arg(long)]
    pub data_crc: bool,
    /// gc_percent (for a new cache, or changed and persisted on an existing one).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=90))]
    pub gc_percent: Option<u8>,
    /// Serve the disk read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Serial number returned to the guest (GET_ID, at most 20 bytes).
    #[arg(long, default_value = "pcache")]
    pub serial: String,
    /// Control socket [default: the vhost socket with extension .ctl].
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (ADDR is IP:PORT,
    /// e.g. 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Most microseconds a queue busy-polls after it runs dry before it
    /// sleeps. The window adapts: it grows while requests keep arriving
    /// within it and shrinks to nothing on an idle disk (0 = never poll).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub poll_us: u32,
    /// Permissions of the vhost socket, octal [default: 600, or 660 with
    /// --socket-group].
    #[arg(long, value_parser = parse_mode)]
    pub socket_mode: Option<u32>,
    /// Give the vhost socket to this group (a name or a number), so a
    /// frontend running as another user of the group can connect (libvirt
    /// runs QEMU as libvirt-qemu: use --socket-group libvirt-qemu).
    #[arg(long, value_parser = crate::sockets::parse_group)]
    pub socket_group: Option<u32>,
    /// Give the vhost socket to this user (a name or a number).
    #[arg(long, value_parser = crate::sockets::parse_user)]
    pub socket_user: Option<u32>,
    /// Run as this user (a name or a number) once the cache, the backing
    /// store (librbd's keyring included) and the sockets are open.
    #[arg(long, value_parser = crate::sockets::parse_user)]
    pub user: Option<u32>,
    /// Run as this group [default: --user's primary group].
    #[arg(long, value_parser = crate::sockets::parse_group)]
    pub group: Option<u32>,
    /// The system-call allowlist: enforce (a call outside it ends the
    /// process, naming the call), log (allowed, and logged by the kernel)
    /// or off.
    #[arg(long, default_value = "enforce", value_name = "enforce|log|off")]
    pub seccomp: crate::sandbox::SeccompMode,
    /// Write back at full speed once dirty data reaches this percent of the
    /// cache (0 = write back everything as soon as it is dirty).
    #[arg(long, default_value_t = WritebackPolicy::default().high_percent,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub writeback_high: u8,
    /// Once started by --writeback-high, write back down to this percent
    /// [default: 10 below --writeback-high].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub writeback_low: Option<u8>,
    /// Also write back once the disk has been idle this many milliseconds.
    #[arg(long, default_value_t = WritebackPolicy::default().idle.as_millis() as u64)]
    pub writeback_idle_ms: u64,
    /// Also write back dirty data older than this many seconds.
    #[arg(long, default_value_t = WritebackPolicy::default().max_age.as_secs())]
    pub writeback_max_age: u64,
    /// How writeback orders what reaches the backing store, kept in the
    /// cache: `batch` coalesces many flush epochs per backing flush (the
    /// backing store alone is consistent after each batch); `strict` writes
    /// back one flush epoch at a time (the backing store alone is always a
    /// flush boundary plus part of the next epoch); `newest` writes only the
    /// newest durable version of each block (for slow backing stores such
    /// as RBD; the backing store alone is consistent only once clean)
    /// [default: the cache's, batch for a new one].
    #[arg(long, value_parser = order_names())]
    pub writeback_order: Option<crate::engine::WritebackOrder>,
    /// Cache mode, kept in the cache: writeback, writethrough (writes
    /// complete on the cache and the backing store), writearound (writes
    /// go to the backing store only; reads fill) or none (the cache is not
    /// used). Leaving writeback writes everything back first [default: the
    /// cache's, writeback for a new one].
    #[arg(long, value_parser = mode_names())]
    pub mode: Option<crate::engine::CacheMode>,
    /// A sequential run of requests past this size goes around the cache
    /// (writes) or is not cached (reads), so a copy or a backup does not
    /// push the hot set out (0 = off).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub sequential_cutoff: u64,
    /// Memory for I/O buffers (read misses and their fills, writes on their
    /// way to the backing store, writeback): requests wait when it is all
    /// in use, so the guest never decides how much memory pcache takes. A
    /// quarter is kept for writeback (at least 4M).
    #[arg(long, default_value = "64M", value_parser = parse_io_memory)]
    pub io_memory: u64,
}

fn parse_io_memory(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v < crate::disk::MIN_IO_MEMORY {
        return Err(format!(
            "{s} is below the smallest I/O memory pcache can work with ({}M)",
            crate::disk::MIN_IO_MEMORY >> 20
        ));
    }
    Ok(v)
}

/// The cache modes by name, listed in `--help`.
fn mode_names() -> impl clap::builder::TypedValueParser<Value = crate::engine::CacheMode> {
    use clap::builder::TypedValueParser;
    let names = crate::engine::CacheMode::ALL.map(|m| m.name());
    clap::builder::PossibleValuesParser::new(names)
        .try_map(|s| s.parse::<crate::engine::CacheMode>())
}

/// The writeback orders by name, listed in `--help`.
fn order_names() -> impl clap::builder::TypedValueParser<Value = crate::engine::WritebackOrder> {
    use clap::builder::TypedValueParser;
    let names = crate::engine::WritebackOrder::ALL.map(|o| o.name());
    clap::builder::PossibleValuesParser::new(names)
        .try_map(|s| s.parse::<crate::engine::WritebackOrder>())
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("block size must be 512 or 4096, not {s}")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode like 600 or 660"))
}

impl ServeArgs {
    /// Resolve defaults into [`crate::serve::ServeOptions`].
    pub fn options(self) -> crate::serve::ServeOptions {
        let dir = Path::new(crate::serve::DEFAULT_DIR);
        let default_backing = self.backing.is_none();
        let socket = self.socket.unwrap_or_else(|| dir.join("pcache.sock"));
        crate::serve::ServeOptions {
            control: self
                .control
                .unwrap_or_else(|| crate::control::default_path(&socket)),
            socket,
            cache: self.cache.unwrap_or_else(|| dir.join("cache.img")),
            backing: self
                .backing
                .unwrap_or_else(|| BackingSpec::File(dir.join("disk.img"))),
            backing_read_timeout: Duration::from_secs(self.backing_read_timeout),
            cache_size: self.cache_size,
            backing_size: self
                .backing_size
                .or(default_backing.then_some(crate::serve::DEFAULT_BACKING_BYTES)),
            format: self.format,
            metrics: self.metrics,
            cfg: crate::vhost::ServeConfig {
                num_queues: self.num_queues,
                counters: crate::vhost::Counters::new(self.num_queues),
                queue_size: self.queue_size,
                blk_size: self.block_size,
                read_only: self.read_only,
                serial: self.serial,
                poll_us: self.poll_us,
            },
            disk: crate::disk::DiskConfig {
                sequential_cutoff: self.sequential_cutoff,
                read_only: self.read_only,
                io_memory: self.io_memory,
            },
            mode: self.mode,
            data_crc: self.data_crc,
            gc_percent: self.gc_percent,
            writeback_order: self.writeback_order,
            access: crate::sockets::Access {
                mode: self.socket_mode.unwrap_or(if self.socket_group.is_some() {
                    0o660
                } else {
                    0o600
                }),
                user: self.socket_user,
                group: self.socket_group,
            },
            user: self.user,
            group: self.group,
            seccomp: self.seccomp,
            writeback: WritebackPolicy {
                high_percent: self.writeback_high,
                low_percent: self
                    .writeback_low
                    .unwrap_or(self.writeback_high.saturating_sub(10)),
                idle: Duration::from_millis(self.writeback_idle_ms),
                max_age: Duration::from_secs(self.writeback_max_age),
            },
        }
    }
}

/// Parse arguments, run, print errors; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    abort_on_panic();
    // Nothing pcache creates (a cache, a backing file, a record beside
    // them) is for other users: guests' data lives in them.
    crate::util::set_umask(0o077);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pcache: {}", error_chain(&*e));
            1
        }
    }
}

/// A panic anywhere ends the process. A worker thread that panicked would
/// otherwise leave the rest running with its queue dead and its locks
/// poisoned; ended, the process is restarted (systemd) and the frontend
/// reconnects and runs again what was in flight (QEMU's inflight region).
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Our line first: the default report's backtrace needs calls a
        // sandboxed thread may not make.
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            "a panic ends pcache: {info}"
        );
        report(info);
        std::process::abort();
    }));
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

use crate::util::{error_chain, AnyResult};

/// Run one parsed command; returns the exit code.
pub fn run(cli: Cli) -> AnyResult<i32> {
    match cli.command {
        Command::Serve(args) => crate::serve::run(args.options()),
        Command::Status { control, json } => {
            let r = crate::control::request(&control, &crate::control::Request::Status)?;
            let Some(st) = r.status else {
                return Err(r
                    .error
                    .unwrap_or_else(|| "no status in reply".into())
                    .into());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", st.text());
            }
            Ok(0)
        }
        Command::GcPercent { control, value } => {
            control_ok(&control, &crate::control::Request::GcPercent { value })?;
            println!("gc_percent set to {value}");
            Ok(0)
        }
        Command::Flush { control } => {
            control_ok(&control, &crate::control::Request::Flush)?;
            println!("flushed");
            Ok(0)
        }
        Command::Drain {
            control,
            timeout,
            json,
        } => Ok(crate::control::drain::run(
            &control,
            0,
            seconds(timeout)?,
            json,
        )?),
        Command::Mode {
            control,
            mode,
            timeout,
            json,
        } => crate::control::mode::run(&control, mode, seconds(timeout)?, json),
        Command::Resize { control, json } => {
            let r = crate::control::request(&control, &crate::control::Request::Resize)?;
            let Some(d) = r.resized.filter(|_| r.ok) else {
                eprintln!(
                    "pcache: not resized: {}",
                    r.error.unwrap_or_else(|| "no answer".into())
                );
                return Ok(1);
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else if d.new_bytes == d.old_bytes {
                println!("unchanged: {} bytes", d.new_bytes);
            } else {
                println!(
                    "grown from {} to {} bytes; {}",
                    d.old_bytes,
                    d.new_bytes,
                    if d.guest_notified {
                        "the guest was told"
                    } else {
                        "no frontend to tell (a guest connecting now sees the new size)"
                    }
                );
            }
            Ok(0)
        }
        Command::Invalidate { control, timeout } => {
            // Most of it while the guest goes on writing; the server writes
            // back the rest with writes held.
            let code = crate::control::drain::run(
                &control,
                INVALIDATE_DIRTY_LEFT,
                seconds(timeout)?,
                false,
            )?;
            if code != 0 {
                eprintln!("pcache: not invalidated: the cache did not drain");
                return Ok(code);
            }
            control_ok(&control, &crate::control::Request::Invalidate)?;
            println!("invalidated: the cache holds nothing; reads go to the backing store");
            Ok(0)
        }
        Command::Format {
            cache,
            cache_size,
            backing,
            data_crc,
            gc_percent,
            force,
        } => {
            if let Some(sz) = cache_size {
                format::check_new_cache_size(sz)?;
            }
            // The lock first: a refused format changes nothing.
            let (owner, _) = media::claim_cache(&cache, cache_size.is_some())?;
            let b = media::open_backing(&backing, &cache, true, false, None)?;
            let sb = media::format_cache(
                &owner,
                &cache,
                cache_size,
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
                backing,
                sb.backing_bytes,
                if data_crc { "on" } else { "off" },
                gc_percent
            );
            Ok(0)
        }
        Command::Inspect { cache, json } => {
            let _owner = media::lock(&cache, Lock::Shared, "Cache")?;
            let engine = media::open_cache_read_only(&cache)?;
            let report = crate::report::Report::of(&engine);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(0)
        }
        Command::Check { cache, data } => match media::lock(&cache, Lock::Shared, "Cache")
            .and_then(|_owner| media::open_cache_read_only(&cache))
        {
            Ok(engine) if data => check_data(&cache, &engine),
            Ok(engine) => {
                let r = crate::report::Report::of(&engine);
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
            let _owner = media::lock(&cache, Lock::Exclusive, "Cache")?;
            let engine = media::open_cache(&cache)?;
            let b = media::open_backing(&backing, &cache, false, true, None)?;
            media::check_backing_size(&engine, &*b, &backing)?;
            let start = engine.stats().snapshot().dirty_bytes;
            let bar = indicatif::ProgressBar::new(start);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "writeback {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template"),
            );
            let mut q = BackingQueue::new(Arc::from(b), 64);
            engine.writeback_all(&mut q, |left| bar.set_position(start.saturating_sub(left)))?;
            bar.finish();
            println!(
                "{}: clean; {} bytes written back to {}",
                cache.display(),
                engine.stats().snapshot().writeback_bytes,
                backing
            );
            Ok(0)
        }
    }
}

/// `pcache check --data`: the log is sound (the cache opened); now every
/// dirty extent's data. Exit 1 naming each bad range, 2 without CRCs.
fn check_data(cache: &Path, engine: &crate::engine::Engine) -> AnyResult<i32> {
    let c = match engine.verify_dirty_data() {
        Ok(c) => c,
        Err(e @ crate::engine::Error::NoDataCrc) => {
            eprintln!("{}: {e}", cache.display());
            return Ok(2);
        }
        Err(e) => {
            eprintln!("{}: NOT sound: {}", cache.display(), error_chain(&e));
            return Ok(1);
        }
    };
    for b in &c.bad {
        eprintln!(
            "{}: dirty data at guest bytes {:#x}+{:#x} (medium byte {:#x}) fails its CRC",
            cache.display(),
            b.off,
            b.len,
            b.at
        );
    }
    for (off, len) in &c.marked_bad {
        eprintln!(
            "{}: guest bytes {off:#x}+{len:#x} are marked bad (their dirty data failed its CRC at writeback); reads fail until the guest writes them again",
            cache.display(),
        );
    }
    if !c.bad.is_empty() || !c.marked_bad.is_empty() {
        eprintln!(
            "{}: NOT sound: {} of {} dirty extents fail their CRC, {} ranges marked bad",
            cache.display(),
            c.bad.len(),
            c.keys,
            c.marked_bad.len()
        );
        return Ok(1);
    }
    println!(
        "{}: sound: {} dirty extents ({} bytes) match their CRCs",
        cache.display(),
        c.keys,
        c.bytes
    );
    Ok(0)
}

/// Dirty bytes `pcache invalidate` leaves to the server to write back while
/// guest writes wait.
const INVALIDATE_DIRTY_LEFT: u64 = 32 << 20;

/// A `--timeout` in seconds.
fn seconds(t: Option<f64>) -> AnyResult<Option<Duration>> {
    match t {
        Some(t) if !(t.is_finite() && (0.0..=MAX_TIMEOUT_SECS).contains(&t)) => Err(format!(
            "--timeout must be a number of seconds from 0 to {MAX_TIMEOUT_SECS}, not {t}"
        )
        .into()),
        t => Ok(t.map(Duration::from_secs_f64)),
    }
}

/// The longest `--timeout` (a day): anything longer is a typo, and a
/// timeout must fit a deadline.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;

fn control_ok(path: &Path, req: &crate::control::Request) -> AnyResult<()> {
    let r = crate::control::request(path, req)?;
    if r.ok {
        Ok(())
    } else {
        Err(r.error.unwrap_or_else(|| "request failed".into()).into())
    }
}
