//! `pcache serve`: open (or create) the cache and the backing store, start
//! the engine's workers and the control socket, then serve one vhost-user
//! frontend after another until SIGTERM or SIGINT.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backing::{Backing, FileBacking};
use crate::cli::{check_backing_size, prepare_cache_file};
use crate::control::{self, ServeInfo};
use crate::engine::{Engine, FormatOptions, OpenOptions, Workers, WritebackPolicy};
use crate::format::{self, Superblock};
use crate::pmem::{Region, RegionOptions};
use crate::vhost::{PcacheBlk, ServeConfig};

/// Directory used when `serve` runs with no paths at all.
pub const DEFAULT_DIR: &str = "pcache-data";
/// Size of the cache file created by default (1 GiB).
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;
/// Size of the sparse backing file created by default (8 GiB).
pub const DEFAULT_BACKING_BYTES: u64 = 8 << 30;

/// Everything `serve` was asked for, defaults resolved.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Cache medium.
    pub cache: PathBuf,
    /// Backing store.
    pub backing: PathBuf,
    /// Size for a new cache file.
    pub cache_size: Option<u64>,
    /// Size for a new backing file.
    pub backing_size: Option<u64>,
    /// Format the cache even if it holds something.
    pub format: bool,
    /// Queues and block size.
    pub cfg: ServeConfig,
    /// data_crc for a new cache.
    pub data_crc: bool,
    /// gc_percent for a new cache (or to set on an existing one).
    pub gc_percent: Option<u8>,
    /// Control socket.
    pub control: PathBuf,
    /// Mode of the vhost socket.
    pub socket_mode: u32,
    /// When to write back.
    pub writeback: WritebackPolicy,
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Does `path` hold a pcache superblock?
fn holds_pcache(path: &Path) -> AnyResult<Option<Result<Superblock, format::Error>>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("Cannot read {}: {e}", path.display()).into()),
    };
    if meta.is_file() && meta.len() < format::SB_OFF + format::SB_BYTES as u64 {
        return Ok(Some(Err(format::Error::NotPcache)));
    }
    let region = Region::open(
        path,
        RegionOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let mut sb = [0u8; format::SB_BYTES];
    region.read(format::SB_OFF, &mut sb);
    Ok(Some(Superblock::decode(&sb, region.len())))
}

/// Open or create the backing store.
fn open_backing(o: &ServeOptions) -> AnyResult<FileBacking> {
    if !o.backing.exists() {
        let Some(size) = o.backing_size else {
            return Err(format!(
                "Backing store {} does not exist; give --backing-size to create it",
                o.backing.display()
            )
            .into());
        };
        if size == 0 || size % 512 != 0 {
            return Err(format!("--backing-size {size} is not a positive multiple of 512").into());
        }
        let f = std::fs::File::create(&o.backing)
            .map_err(|e| format!("Cannot create backing file {}: {e}", o.backing.display()))?;
        f.set_len(size)?;
        println!("created {} ({size} bytes, sparse)", o.backing.display());
    }
    FileBacking::open(&o.backing, o.cfg.read_only)
        .map_err(|e| format!("Cannot open backing store {}: {e}", o.backing.display()).into())
}

/// Open the cache, formatting it when it is new or `--format` was given.
fn open_cache(o: &ServeOptions, backing_bytes: u64) -> AnyResult<Arc<Engine>> {
    let state = holds_pcache(&o.cache)?;
    let must_format = match &state {
        None => true,
        Some(Ok(_)) => o.format,
        Some(Err(e)) => {
            if !o.format {
                return Err(format!(
                    "{} is not a usable pcache cache ({e}); refusing to touch it. Pass --format to format it, erasing its contents",
                    o.cache.display()
                )
                .into());
            }
            true
        }
    };
    if must_format {
        let size = o
            .cache_size
            .or(state.is_none().then_some(DEFAULT_CACHE_BYTES));
        prepare_cache_file(&o.cache, size, true)?;
        let region = Region::open(&o.cache, RegionOptions::default())?;
        Engine::format(
            &region,
            &FormatOptions {
                backing_bytes,
                data_crc: o.data_crc,
                gc_percent: o.gc_percent.unwrap_or(format::GC_PERCENT_DEFAULT),
                force: true,
            },
        )?;
        println!(
            "formatted {} for {} ({backing_bytes} bytes)",
            o.cache.display(),
            o.backing.display()
        );
    }
    let region = Arc::new(Region::open(&o.cache, RegionOptions::default())?);
    let engine = Engine::open(region, &OpenOptions::default())?;
    if !must_format {
        if let Some(p) = o.gc_percent {
            engine.set_gc_percent(p)?;
        }
    }
    Ok(engine)
}

fn bind(socket: &Path, mode: u32) -> AnyResult<Listener> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Create the socket with no group/other access, then widen if asked.
    let old = crate::util::set_umask(0o177);
    let l = Listener::new(socket, true);
    crate::util::set_umask(old);
    let l = l.map_err(|e| format!("Cannot listen on {}: {e}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Run the server. Returns only on a startup error; a signal exits the
/// process after persisting.
pub fn run(o: ServeOptions) -> AnyResult<i32> {
    crate::util::block_termination_signals();
    o.writeback.validate()?;
    if let Some(dir) = o.cache.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let backing = open_backing(&o)?;
    let backing_bytes = backing.size();
    let engine = open_cache(&o, backing_bytes)?;
    check_backing_size(&engine, backing_bytes, &o.backing)?;
    let backing: Arc<dyn Backing> = Arc::new(backing);
    let workers = Workers::start(engine.clone(), backing.clone(), o.writeback);
    let info = ServeInfo {
        backing_path: o.backing.display().to_string(),
        num_queues: o.cfg.num_queues,
        socket: o.socket.display().to_string(),
        writeback: o.writeback,
    };
    control::spawn_server(&o.control, engine.clone(), info).map_err(|e| {
        format!(
            "Cannot listen on control socket {}: {e}",
            o.control.display()
        )
    })?;
    let mut listener = bind(&o.socket, o.socket_mode)?;

    {
        let engine = engine.clone();
        let paths = (o.socket.clone(), o.control.clone());
        std::thread::Builder::new()
            .name("pcache-signals".into())
            .spawn(move || {
                let sig = crate::util::wait_for_termination();
                tracing::info!(sig, "stopping: closing open ksets");
                let code = match engine.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!(
                            "pcache: flush at shutdown failed: {}",
                            crate::cli::error_chain(&e)
                        );
                        1
                    }
                };
                drop(workers);
                let _ = std::fs::remove_file(&paths.0);
                let _ = std::fs::remove_file(&paths.1);
                eprintln!("pcache: stopped (signal {sig}), cache persisted");
                std::process::exit(code);
            })?;
    }

    let sock = std::fs::canonicalize(&o.socket).unwrap_or(o.socket.clone());
    println!(
        "pcache: serving {} ({} bytes) through cache {} on {}\n\
         attach a QEMU guest with:\n  \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=pcache0,path={} \\\n  \
         -device vhost-user-blk-pci,chardev=pcache0,num-queues=2\n\
         (guest memory must be shared; num-queues at most {}; status: pcache status --control {})",
        o.backing.display(),
        backing_bytes,
        o.cache.display(),
        sock.display(),
        sock.display(),
        o.cfg.num_queues,
        o.control.display()
    );

    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let blk = Arc::new(PcacheBlk::new(
            engine.clone(),
            backing.clone(),
            o.cfg.clone(),
            mem.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new("pcache-vhost".into(), blk.clone(), mem)
            .map_err(|e| format!("Cannot start the vhost-user daemon: {e}"))?;
        let handlers = daemon.get_epoll_handlers();
        for (h, fds) in handlers.iter().zip(blk.listeners()) {
            for (fd, data) in fds {
                h.register_listener(fd, EventSet::IN, data)?;
            }
        }
        if let Err(e) = daemon.start(&mut listener) {
            tracing::error!(error = %e, "accepting a frontend failed");
            for h in &handlers {
                h.send_exit_event();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        tracing::info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!(error = %e, "frontend connection ended with an error"),
        }
        for h in &handlers {
            h.send_exit_event();
        }
        drop(handlers);
        drop(daemon);
        // Keys written by that frontend stay in open ksets until the timer
        // or the next flush, as with any write not yet flushed.
    }
}
