//! `pcache serve`: own the cache, open the backing store, start the
//! engine's workers and the control socket, then serve one vhost-user
//! frontend after another until SIGTERM or SIGINT.
//!
//! The listening socket is bound here (never over a live one), or inherited
//! from systemd (socket activation), in which case it stays open across
//! restarts and a reconnecting frontend finds it at once. A clean stop
//! finishes what the guest's queues have taken, persists the cache, and
//! exits 0; requests it cannot finish stay in the frontend's inflight
//! region for the next process.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backing::{Backing, BackingSpec};
use crate::control::{self, ServeInfo};
use crate::disk::{Disk, DiskConfig};
use crate::engine::{Engine, FormatOptions, WritebackPolicy};
use crate::format;
use crate::media::{self, Lock, Owner};
use crate::vhost::{self, Active, ServeConfig};

/// Directory used when `serve` runs with no paths at all.
pub const DEFAULT_DIR: &str = "pcache-data";
/// Size of the cache file created by default (1 GiB).
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;
/// Size of the sparse backing file created by default (8 GiB).
pub const DEFAULT_BACKING_BYTES: u64 = 8 << 30;
/// How long a stop waits for requests the guest's queues have taken.
const STOP_BUDGET: Duration = Duration::from_secs(10);
/// How long `--mode` may take at start to write back a cache leaving
/// write-back mode.
const MODE_SWITCH_AT_START: Duration = Duration::from_secs(3600);

/// Everything `serve` was asked for, defaults resolved.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Cache medium.
    pub cache: PathBuf,
    /// Backing store.
    pub backing: BackingSpec,
    /// How long a read from an RBD image may wait for the cluster.
    pub backing_read_timeout: Duration,
    /// Size for a new cache file.
    pub cache_size: Option<u64>,
    /// Size for a new backing file.
    pub backing_size: Option<u64>,
    /// Format the cache even if it holds something.
    pub format: bool,
    /// Queues and block size.
    pub cfg: ServeConfig,
    /// The sequential cutoff, read-only, I/O memory.
    pub disk: DiskConfig,
    /// data_crc for a new cache.
    pub data_crc: bool,
    /// gc_percent for a new cache (or to set on an existing one).
    pub gc_percent: Option<u8>,
    /// Writeback order to set and persist (None keeps the cache's).
    pub writeback_order: Option<crate::engine::WritebackOrder>,
    /// Cache mode to switch to at start (`--mode`).
    pub mode: Option<crate::engine::CacheMode>,
    /// Control socket.
    pub control: PathBuf,
    /// Who may connect to the vhost socket.
    pub access: crate::sockets::Access,
    /// When to write back.
    pub writeback: WritebackPolicy,
    /// Where to serve Prometheus metrics (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// `--user`: who to run as once everything is open.
    pub user: Option<u32>,
    /// `--group`.
    pub group: Option<u32>,
    /// `--seccomp`.
    pub seccomp: crate::sandbox::SeccompMode,
}

/// Make the RBD lock record beside the cache now (the sandbox makes no
/// file there later), owned by `--user` (who writes it once the image is
/// locked). Never through a link.
fn prepare_lock_record(path: &Path, user: Option<u32>, group: Option<u32>) -> AnyResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("Cannot create {}: {e}", path.display()))?;
    if user.is_some() || group.is_some() {
        std::os::unix::fs::fchown(&f, user, group)
            .map_err(|e| format!("Cannot give {} to --user: {e}", path.display()))?;
    }
    Ok(())
}

/// What the sandbox leaves `serve` (see `crate::sandbox`).
fn sandbox_plan(o: &ServeOptions) -> crate::sandbox::Plan {
    let dir_of = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    let mut plan = crate::sandbox::Plan {
        read_write: vec![o.cache.clone()],
        make_in: vec![dir_of(&o.socket), dir_of(&o.control)],
        read_only: Vec::new(),
        user: o.user,
        group: o.group,
        seccomp: o.seccomp,
    };
    if !o.cache.exists() {
        plan.make_in.push(dir_of(&o.cache));
    }
    match &o.backing {
        BackingSpec::File(p) => {
            plan.read_write.push(p.clone());
            if !p.exists() {
                plan.make_in.push(dir_of(p));
            }
        }
        BackingSpec::Rbd(spec) => {
            if let Some(r) = media::lock_record(&o.cache).filter(|_| !o.cfg.read_only) {
                plan.read_write.push(r);
            }
            // librbd reads its config and keyring (next to it, in the
            // test cluster; under /etc/ceph otherwise, already readable).
            let conf = spec
                .conf
                .clone()
                .or_else(|| std::env::var("CEPH_CONF").ok());
            if let Some(c) = conf {
                plan.read_only.push(dir_of(Path::new(&c)));
            }
        }
    }
    plan
}

use crate::util::AnyResult;

/// Open or create the backing store.
fn open_backing(o: &ServeOptions) -> AnyResult<Box<dyn Backing>> {
    if let BackingSpec::File(path) = &o.backing {
        create_backing_file(path, o)?;
    } else if o.backing_size.is_some() {
        return Err(format!(
            "--backing-size creates backing files, not RBD images: create {} with `rbd create --size`",
            o.backing
        )
        .into());
    }
    // Claimed once we know we write it (`run`).
    media::open_backing(
        &o.backing,
        &o.cache,
        o.cfg.read_only,
        false,
        Some(o.backing_read_timeout),
    )
}

/// Create the backing file at `path` if it does not exist and
/// `--backing-size` says how big.
fn create_backing_file(path: &Path, o: &ServeOptions) -> AnyResult<()> {
    if path.exists() {
        return Ok(());
    }
    if o.cfg.read_only {
        return Err(format!(
            "Backing store {} does not exist (--read-only creates nothing)",
            path.display()
        )
        .into());
    }
    let Some(size) = o.backing_size else {
        return Err(format!(
            "Backing store {} does not exist; give --backing-size to create it",
            path.display()
        )
        .into());
    };
    if size == 0 || size % 512 != 0 {
        return Err(format!("--backing-size {size} is not a positive multiple of 512").into());
    }
    let f = std::fs::File::create(path)
        .map_err(|e| format!("Cannot create backing file {}: {e}", path.display()))?;
    f.set_len(size)?;
    println!("created {} ({size} bytes, sparse)", path.display());
    Ok(())
}

/// `pcache resize`: grow the disk to the backing store's size now, and tell
/// the connected frontend so the guest sees it.
fn resize(engine: &Engine, backing: &dyn Backing, stop: &Stop) -> Result<control::Resized, String> {
    if engine.is_read_only() {
        return Err("the cache is open read-only: it cannot grow".into());
    }
    let new = backing
        .refresh_size()
        .map_err(|e| format!("cannot read the backing store's size: {e}"))?;
    let old = engine.grow(new).map_err(|e| e.to_string())?;
    let mut guest_notified = false;
    if new != old {
        let active = stop.active.lock().expect("stop lock").clone();
        if let Some(a) = active {
            match a.notify_config_change() {
                Ok(sent) => guest_notified = sent,
                Err(e) => tracing::warn!(error = %e, "could not tell the frontend the disk grew"),
            }
        }
        tracing::info!(old, new, guest_notified, "resized");
    }
    Ok(control::Resized {
        old_bytes: old,
        new_bytes: new,
        guest_notified,
    })
}

/// Grow the disk by itself when the store says it grew (an RBD image
/// resized with `rbd resize`). The store's callback only pokes a thread,
/// which runs the same resize as `pcache resize`; the thread ends with the
/// process and holds the store only weakly, so it is still dropped (an RBD
/// image closed and unlocked) at a clean stop.
fn watch_backing_size(backing: &Arc<dyn Backing>, engine: &Arc<Engine>, stop: &Arc<Stop>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let poke = Box::new(move || {
        // Full means a resize is already due: nothing to add.
        let _ = tx.try_send(());
    });
    match backing.watch_size(poke) {
        Ok(false) => return,
        Ok(true) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the backing store's size; grow it with `pcache resize`");
            return;
        }
    }
    let (weak, engine, stop) = (Arc::downgrade(backing), engine.clone(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("pcache-resize".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                let Some(backing) = weak.upgrade() else {
                    return;
                };
                match resize(&engine, &*backing, &stop) {
                    Ok(r) if r.new_bytes != r.old_bytes => {
                        println!("the backing store grew: {} -> {} bytes", r.old_bytes, r.new_bytes)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "the backing store changed but the disk cannot follow"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the resize thread; grow the disk with `pcache resize`");
    }
}

/// Take the cache's lock, creating the file if it is new (true then). It
/// comes before the backing store: holding the cache proves the pcache
/// that used it before is gone, which lets an RBD image's stale lock go.
fn take_cache(o: &ServeOptions) -> AnyResult<(Owner, bool)> {
    if o.cfg.read_only {
        return Ok((take_cache_read_only(o)?, false));
    }
    if let Some(sz) = o.cache_size {
        format::check_new_cache_size(sz)?;
    }
    let (owner, is_new) = media::claim_cache(&o.cache, true)?;
    if is_new {
        let size = o.cache_size.or(Some(DEFAULT_CACHE_BYTES));
        media::size_cache_file(&owner, &o.cache, size, true)?;
    }
    Ok((owner, is_new))
}

/// Format the cache (whose lock we hold) when it is new or `--format` was
/// given, and open it.
fn open_cache(
    o: &ServeOptions,
    owner: &Owner,
    is_new: bool,
    backing_bytes: u64,
) -> AnyResult<Arc<Engine>> {
    if o.cfg.read_only {
        return media::open_cache_read_only(&o.cache);
    }
    let state = media::holds_pcache(&o.cache)?;
    let must_format = match &state {
        None => true,
        Some(Ok(_)) => is_new || o.format,
        Some(Err(e)) => {
            if !is_new && !o.format {
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
        media::format_cache(
            owner,
            &o.cache,
            o.cache_size,
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
            o.backing
        );
    }
    let engine = media::open_cache(&o.cache)?;
    if let Some(order) = o.writeback_order {
        engine.set_writeback_order(order)?;
    }
    if !must_format {
        if let Some(p) = o.gc_percent {
            engine.set_gc_percent(p)?;
        }
    }
    Ok(engine)
}

/// `--read-only`: open an existing cache without writing to it, and refuse
/// every option that would change it.
fn take_cache_read_only(o: &ServeOptions) -> AnyResult<Owner> {
    let changes = [
        (o.format, "--format"),
        (o.cache_size.is_some(), "--cache-size"),
        (o.gc_percent.is_some(), "--gc-percent"),
        (o.writeback_order.is_some(), "--writeback-order"),
        (o.data_crc, "--data-crc"),
        (o.mode.is_some(), "--mode"),
    ];
    if let Some((_, flag)) = changes.iter().find(|(given, _)| *given) {
        return Err(format!("{flag} changes the cache, which --read-only never writes").into());
    }
    if !o.cache.exists() {
        return Err(format!(
            "Cache {} does not exist (--read-only creates nothing)",
            o.cache.display()
        )
        .into());
    }
    // Exclusive all the same: a writer beside us would change what we read.
    let owner = media::lock(&o.cache, Lock::Exclusive, "Cache")?;
    match media::holds_pcache(&o.cache)? {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            return Err(format!(
                "{} is not a usable pcache cache ({e}); --read-only cannot format it",
                o.cache.display()
            )
            .into())
        }
        None => {
            return Err(format!(
                "{} holds no pcache cache; --read-only cannot format it",
                o.cache.display()
            )
            .into())
        }
    }
    Ok(owner)
}

/// The vhost socket before it is bound: inherited from systemd, or a path
/// claimed (so no other pcache takes it) and bound once all else is up.
enum Socket {
    Inherited(UnixListener),
    Claimed(Owner),
}

impl Socket {
    fn claim(o: &ServeOptions) -> AnyResult<Socket> {
        Ok(match crate::sockets::inherited()? {
            Some(l) => Socket::Inherited(l),
            None => Socket::Claimed(crate::sockets::claim(&o.socket)?),
        })
    }

    fn listen(self, o: &ServeOptions) -> AnyResult<Listening> {
        Ok(match self {
            Socket::Inherited(listener) => Listening {
                listener,
                bound: None,
            },
            Socket::Claimed(owner) => Listening {
                listener: crate::sockets::bind(&o.socket, &o.access, &owner)?,
                bound: Some(owner),
            },
        })
    }
}

/// The listening socket.
struct Listening {
    listener: UnixListener,
    /// Set when we bound it (and so remove it at a stop).
    bound: Option<Owner>,
}

/// What the signal thread and the accept loop share.
#[derive(Default)]
struct Stop {
    /// Set by SIGTERM/SIGINT.
    requested: AtomicBool,
    /// The session being served, to quiesce.
    active: Mutex<Option<Active>>,
}

/// Run the server. Returns on a startup error or after a clean stop.
pub fn run(o: ServeOptions) -> AnyResult<i32> {
    crate::util::block_termination_signals();
    o.writeback.validate()?;
    for p in [&o.cache, &o.socket, &o.control] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
    }
    // Claimed first (before the cache is made, and before the sandbox,
    // which hides other processes' /proc entries: a refusal names the
    // process holding the socket).
    let socket = Socket::claim(&o)?;
    let (owner, is_new) = take_cache(&o)?;
    // Before the backing store: librbd's threads inherit it.
    let plan = sandbox_plan(&o);
    if let Some(r) = media::lock_record(&o.cache).filter(|r| plan.read_write.contains(r)) {
        prepare_lock_record(&r, o.user, o.group)?;
    }
    let landlock = crate::sandbox::confine(&plan)
        .map_err(|e| format!("Cannot confine pcache (no_new_privs, capabilities): {e}"))?;
    let backing = match open_backing(&o) {
        Ok(b) => b,
        Err(e) => {
            if is_new {
                // Leave nothing behind for a start that did not happen.
                let _ = std::fs::remove_file(&o.cache);
            }
            return Err(e);
        }
    };
    let backing_bytes = backing.size();
    let engine = open_cache(&o, &owner, is_new, backing_bytes)?;
    media::check_backing_size(&engine, &*backing, &o.backing)?;
    if backing_bytes > engine.size() && !o.cfg.read_only {
        // It grew while pcache was down.
        engine.grow(backing_bytes)?;
    }
    // Bound before the vhost socket: once a frontend can connect, scrapes
    // are answered.
    let metrics = o.metrics.map(crate::metrics::http::bind).transpose()?;
    let backing: Arc<dyn Backing> = Arc::from(backing);
    // Dirty data is written back from now on, and a mode switch drains:
    // the store must be ours. Otherwise it is claimed when a guest starts
    // (a live migration's destination writes nothing before that).
    let claim_now =
        !o.cfg.read_only && (engine.is_dirty() || o.mode.is_some_and(|m| m != engine.mode()));
    if claim_now {
        backing
            .claim()
            .map_err(|e| format!("Cannot use backing store {}: {e}", o.backing))?;
    }
    let disk = Arc::new(Disk::new(
        engine.clone(),
        backing.clone(),
        claim_now,
        o.disk,
        o.writeback,
    )?);
    if let Some(m) = o.mode.filter(|m| *m != engine.mode()) {
        // Leaving write-back writes the cache back first (by the workers
        // just started), before any guest connects.
        println!("switching the cache to {m} mode");
        engine.set_mode(m, MODE_SWITCH_AT_START)?;
    }
    let info = ServeInfo {
        backing_path: o.backing.to_string(),
        num_queues: o.cfg.num_queues,
        socket: o.socket.display().to_string(),
        writeback: o.writeback,
        read_only: o.cfg.read_only,
        sequential_cutoff: o.disk.sequential_cutoff,
        io_memory: disk.io_memory(),
    };
    let stop = Arc::new(Stop::default());
    let probe: control::FrontendProbe = {
        let (stop, disk) = (stop.clone(), disk.clone());
        Arc::new(move || {
            let active = stop.active.lock().expect("stop lock").clone();
            let migration = disk.handover().status();
            match active {
                Some(a) => {
                    let (reads_waiting, writes_waiting) = a.waiting();
                    control::Frontend {
                        connected: true,
                        queues_started: a.started() as u64,
                        reads_waiting,
                        writes_waiting,
                        migration,
                    }
                }
                None => control::Frontend {
                    migration,
                    ..Default::default()
                },
            }
        })
    };
    let resize: control::Resizer = {
        let (stop, engine, backing) = (stop.clone(), engine.clone(), backing.clone());
        Arc::new(move || resize(&engine, &*backing, &stop))
    };
    watch_backing_size(&backing, &engine, &stop);
    let latency: control::LatencyProbe = {
        let counters = o.cfg.counters.clone();
        Arc::new(move || control::Latency::of(&counters.latency()))
    };
    if let Some(l) = metrics {
        serve_metrics(l, &o, &engine, probe.clone())?;
    }
    let srv = control::Server {
        engine: engine.clone(),
        info,
        frontend: probe,
        latency,
        resize,
    };
    control::spawn_server(&o.control, srv).map_err(|e| {
        format!(
            "Cannot listen on control socket {}: {e}",
            o.control.display()
        )
    })?;
    // Last: a frontend or an orchestrator that sees the socket finds the
    // control socket answering and the store claimed.
    let listening = socket.listen(&o).inspect_err(|_| {
        let _ = std::fs::remove_file(&o.control);
    })?;
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    {
        let (stop, wake) = (stop.clone(), wake.clone());
        let unlink = listening.bound.is_some().then(|| o.socket.clone());
        std::thread::Builder::new()
            .name("pcache-signals".into())
            .spawn(move || {
                let sig = crate::util::wait_for_termination();
                tracing::info!(sig, "stopping");
                let _ = sd_notify::notify(&[NotifyState::Stopping]);
                // A frontend reconnecting from now on must find the next
                // process, not this one (with socket activation the socket
                // stays, and new connections wait in it for the next one).
                if let Some(p) = unlink {
                    let _ = std::fs::remove_file(p);
                }
                stop.requested.store(true, Ordering::SeqCst);
                let _ = wake.write(1);
                let active = stop.active.lock().expect("stop lock").clone();
                if let Some(a) = active {
                    let left = a.quiesce(STOP_BUDGET);
                    if left > 0 {
                        tracing::warn!(
                            left,
                            "requests left for the next pcache (they stay in the frontend's inflight region)"
                        );
                    }
                }
            })?;
    }
    let c = crate::sandbox::lock_down(&plan, landlock)
        .map_err(|e| format!("Cannot lock pcache down (--user, --group, --seccomp): {e}"))?;
    tracing::info!(
        landlock = %c.landlock,
        seccomp = %c.seccomp,
        uid = c.uid,
        gid = c.gid,
        "sandboxed"
    );
    print_hint(&o, backing_bytes, listening.bound.is_some());
    let status = format!("serving {} through {}", o.backing, o.cache.display());
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    while let Some(stream) = accept(&listening.listener, &wake, &stop)? {
        tracing::info!("frontend connected");
        let _ = sd_notify::notify(&[NotifyState::Status("a frontend is connected")]);
        let slot = SessionSlot(&stop);
        if let Err(e) = vhost::serve(stream, disk.clone(), o.cfg.clone(), &slot) {
            tracing::error!(error = %e, "serving a frontend failed");
        }
        let _ = sd_notify::notify(&[NotifyState::Status(&status)]);
    }

    // Frontends that connected before the socket went away are served
    // until they have started, then closed like the rest. (A socket from
    // systemd keeps them waiting for the next process instead.)
    if listening.bound.is_some() {
        serve_pending(&listening.listener, &disk, &o.cfg, &stop);
    }
    // Stopping: every ring is quiesced; persist the cache and go.
    let code = match disk.shutdown() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "pcache: flush at shutdown failed: {}",
                crate::util::error_chain(&e)
            );
            1
        }
    };
    let _ = std::fs::remove_file(&o.control);
    drop(listening);
    if engine.is_read_only() {
        eprintln!("pcache: stopped (read-only: nothing was written)");
    } else {
        eprintln!("pcache: stopped, cache persisted");
    }
    Ok(code)
}

/// Answer scrapes on `l` (`--metrics`).
fn serve_metrics(
    l: std::net::TcpListener,
    o: &ServeOptions,
    engine: &Arc<Engine>,
    frontend: control::FrontendProbe,
) -> AnyResult<()> {
    let addr = l.local_addr()?;
    let registry = crate::metrics::registry(crate::metrics::Sources {
        engine: engine.clone(),
        counters: o.cfg.counters.clone(),
        frontend,
        read_only: o.cfg.read_only,
    });
    crate::metrics::http::spawn(l, move || crate::metrics::render(&registry).ok())?;
    println!("pcache: metrics at http://{addr}/metrics");
    Ok(())
}

/// Publishes the session being served to the signal thread (and refuses to
/// start one once a stop was asked for).
struct SessionSlot<'a>(&'a Stop);

impl vhost::SessionHook for SessionSlot<'_> {
    fn enter(&self, a: Active) {
        let mut slot = self.0.active.lock().expect("stop lock");
        if self.0.requested.load(Ordering::SeqCst) {
            // A frontend that connected as the stop began: let it finish
            // its handshake, then close it like the others.
            let _ = std::thread::Builder::new()
                .name("pcache-quiesce".into())
                .spawn(move || {
                    a.quiesce(STOP_BUDGET);
                });
            return;
        }
        *slot = Some(a);
    }

    fn leave(&self) {
        *self.0.active.lock().expect("stop lock") = None;
    }
}

/// Serve, and close once started, every connection already waiting.
fn serve_pending(l: &UnixListener, disk: &Arc<Disk>, cfg: &ServeConfig, stop: &Stop) {
    if l.set_nonblocking(true).is_err() {
        return;
    }
    while let Ok((stream, _)) = l.accept() {
        let _ = stream.set_nonblocking(false);
        tracing::info!("serving a frontend that connected as the stop began");
        let slot = SessionSlot(stop);
        let _ = vhost::serve(stream, disk.clone(), cfg.clone(), &slot);
    }
}

/// Wait for a frontend, or for a stop (None).
fn accept(l: &UnixListener, wake: &EventFd, stop: &Stop) -> io::Result<Option<UnixStream>> {
    loop {
        if stop.requested.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let mut fds = [
            libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if crate::util::poll(&mut fds, -1)? == 0 || fds[0].revents == 0 {
            continue;
        }
        match l.accept() {
            Ok((s, _)) => return Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(error = %e, "accepting a frontend failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn print_hint(o: &ServeOptions, backing_bytes: u64, bound: bool) {
    let sock = std::fs::canonicalize(&o.socket).unwrap_or(o.socket.clone());
    let queues = o.cfg.num_queues.min(4);
    println!(
        "pcache: serving {} ({} bytes) through cache {} on {}{}\n\
         attach a QEMU guest with:\n  \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=pcache0,path={},reconnect=1 \\\n  \
         -device vhost-user-blk-pci,chardev=pcache0,num-queues={queues}\n\
         (guest memory must be shared; num-queues at most {}, and QEMU's default is one per vCPU; \
         status: pcache status --control {})",
        o.backing,
        backing_bytes,
        o.cache.display(),
        sock.display(),
        if bound { "" } else { " (from systemd)" },
        sock.display(),
        o.cfg.num_queues,
        o.control.display()
    );
}
