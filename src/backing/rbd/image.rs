//! [`RbdBacking`]: an open RBD image as the backing store.
//!
//! Opening connects to the cluster and opens the image. Before writing,
//! the owner claims it ([`Backing::claim`]: the image's exclusive lock,
//! kept until [`Backing::hand_off`] or the store is dropped): nobody writes
//! behind the cache. Opening alone takes nothing, so a live migration's
//! destination can open the image while the source still writes it. The
//! synchronous [`Backing`] methods use librbd's blocking calls (offline
//! commands, the thread-pool engine); the queue workers use the
//! asynchronous engine in `backing/queue/rbd.rs` through
//! [`RbdBacking::handle`].

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::spec::RbdSpec;
use crate::backing::librbd::ffi::{self, rados_ioctx_t, rados_t, rbd_image_t, Api};
use crate::backing::librbd::RbdHandle;
use crate::backing::store::Backing;

/// Offsets and lengths are multiples of this.
const SECTOR: u64 = 512;

/// How long a queued read waits for the cluster by default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest piece one librbd call moves (its lengths are `size_t` but its
/// results are `ssize_t`/`int`).
const MAX_CALL_BYTES: usize = 1 << 30;

/// A callback run (on a librbd thread) when the image's header changes.
type UpdateFn = Box<dyn Fn() + Send + Sync>;

/// An RBD image opened as a backing store.
pub struct RbdBacking {
    api: &'static Api,
    cluster: rados_t,
    ioctx: rados_ioctx_t,
    image: rbd_image_t,
    spec: RbdSpec,
    read_only: bool,
    size: AtomicU64,
    read_timeout: Duration,
    /// The registered header watch: its handle and the boxed callback
    /// librbd holds a pointer to.
    watch: Mutex<Option<(u64, *mut UpdateFn)>>,
    /// Where our lock owner name is kept while we hold the lock.
    lock_record: Option<std::path::PathBuf>,
}

// SAFETY: librados/librbd handles are thread-safe for the calls made here;
// the watch pointer is only touched under its mutex.
unsafe impl Send for RbdBacking {}
// SAFETY: as above.
unsafe impl Sync for RbdBacking {}

impl std::fmt::Debug for RbdBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdBacking")
            .field("image", &self.spec.image_name())
            .field("read_only", &self.read_only)
            .field("size", &self.size.load(Ordering::Relaxed))
            .finish()
    }
}

/// An error from a librados/librbd call: `what` failed with `-ret`.
fn ceph_error(what: &str, ret: i64) -> io::Error {
    let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
    let os = io::Error::from_raw_os_error(errno);
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

impl RbdBacking {
    /// Connect and open the image `spec` names. Unless `read_only`, the
    /// image must have the exclusive-lock feature; the lock itself is taken
    /// by [`Backing::claim`].
    ///
    /// `lock_record` is a file where the lock's owner is kept while we hold
    /// it. The caller promises that whoever wrote it is dead (it holds the
    /// cache that process held), so a lock still held by that owner is
    /// broken at once instead of after the cluster's watch timeout (30 s):
    /// a pcache restarted after a crash serves again in a second.
    pub fn open(
        spec: &RbdSpec,
        read_only: bool,
        lock_record: Option<&Path>,
    ) -> io::Result<RbdBacking> {
        let api = ffi::api().map_err(io::Error::other)?;
        let name = spec.image_name();
        if spec.snapshot.is_some() && !read_only {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: a snapshot is read-only; pcache needs a writable image"),
            ));
        }
        let mut b = RbdBacking {
            api,
            cluster: ptr::null_mut(),
            ioctx: ptr::null_mut(),
            image: ptr::null_mut(),
            spec: spec.clone(),
            read_only,
            size: AtomicU64::new(0),
            read_timeout: DEFAULT_READ_TIMEOUT,
            watch: Mutex::new(None),
            lock_record: lock_record.map(Path::to_path_buf),
        };
        // From here on Drop tears down whatever was set up.
        b.connect()?;
        b.open_image()?;
        b.refresh_size()?;
        if !read_only {
            b.check_lockable()?;
        }
        Ok(b)
    }

    /// Refuse an image without the exclusive-lock feature: nothing would
    /// keep other clients from writing behind the cache.
    fn check_lockable(&self) -> io::Result<()> {
        let name = self.spec.image_name();
        let mut features = 0u64;
        // SAFETY: open image, valid out pointer.
        let r = unsafe { (self.api.rbd_get_features)(self.image, &mut features) };
        if r < 0 {
            return Err(ceph_error("rbd_get_features", r.into()));
        }
        if features & ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "image {name} has no exclusive-lock feature, so nothing would keep other \
                     clients from writing behind the cache; enable it with \
                     `rbd feature enable {name} exclusive-lock`"
                ),
            ));
        }
        if let Ok(owners) = self.lock_owners() {
            if !owners.is_empty() {
                tracing::info!(
                    image = %name,
                    ?owners,
                    "the image's exclusive lock is held by another client; pcache takes it when its guest starts (as a live migration's destination does)"
                );
            }
        }
        Ok(())
    }

    fn connect(&mut self) -> io::Result<()> {
        let id = self
            .spec
            .id
            .as_deref()
            .map(|s| cstring("id", s))
            .transpose()?;
        // SAFETY: `self.cluster` is a valid out-pointer; `id` is NUL-terminated
        // or NULL (librados then uses "admin").
        let r = unsafe {
            (self.api.rados_create)(
                &mut self.cluster,
                id.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        };
        if r < 0 {
            self.cluster = ptr::null_mut();
            return Err(ceph_error("rados_create", r.into()));
        }
        let conf = self
            .spec
            .conf
            .as_deref()
            .map(|s| cstring("conf", s))
            .transpose()?;
        // SAFETY: live cluster handle; `conf` NUL-terminated or NULL (the
        // default search: $CEPH_CONF, /etc/ceph/ceph.conf, ...).
        let r = unsafe {
            (self.api.rados_conf_read_file)(
                self.cluster,
                conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        };
        if r < 0 {
            let which = self
                .spec
                .conf
                .as_deref()
                .unwrap_or("the default Ceph configuration");
            return Err(ceph_error(&format!("cannot read {which}"), r.into()));
        }
        // pcache is the cache: librbd's own in-memory write-back cache
        // would only hold writes a second time, volatile, and hide the
        // image's real write rate from writeback's pacing until the flush.
        // (QEMU turns it off the same way for cache.direct=on.) A name's
        // own :rbd_cache=... still wins.
        self.conf_set("rbd_cache", "false")?;
        for (k, v) in &self.spec.options {
            self.conf_set(k, v)?;
        }
        // SAFETY: live, configured cluster handle.
        let r = unsafe { (self.api.rados_connect)(self.cluster) };
        if r < 0 {
            return Err(ceph_error("cannot connect to the Ceph cluster", r.into()));
        }
        let pool = cstring("pool", &self.spec.pool)?;
        // SAFETY: connected cluster; valid out-pointer.
        let r =
            unsafe { (self.api.rados_ioctx_create)(self.cluster, pool.as_ptr(), &mut self.ioctx) };
        if r < 0 {
            self.ioctx = ptr::null_mut();
            return Err(ceph_error(&format!("pool {}", self.spec.pool), r.into()));
        }
        if let Some(ns) = &self.spec.namespace {
            let ns = cstring("namespace", ns)?;
            // SAFETY: live ioctx; NUL-terminated string (copied by librados).
            unsafe { (self.api.rados_ioctx_set_namespace)(self.ioctx, ns.as_ptr()) };
        }
        Ok(())
    }

    /// Set Ceph option `key` on the (not yet connected) cluster handle.
    fn conf_set(&self, key: &str, value: &str) -> io::Result<()> {
        let (k, v) = (cstring("option", key)?, cstring("value", value)?);
        // SAFETY: live cluster handle, NUL-terminated strings (copied).
        let r = unsafe { (self.api.rados_conf_set)(self.cluster, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(ceph_error(&format!("Ceph option {key}={value}"), r.into()));
        }
        Ok(())
    }

    fn open_image(&mut self) -> io::Result<()> {
        let image = cstring("image", &self.spec.image)?;
        let snap = self
            .spec
            .snapshot
            .as_deref()
            .map(|s| cstring("snapshot", s))
            .transpose()?;
        let snap = snap.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        let open = if self.read_only {
            self.api.rbd_open_read_only
        } else {
            self.api.rbd_open
        };
        // SAFETY: live ioctx, NUL-terminated names, valid out-pointer.
        let r = unsafe { open(self.ioctx, image.as_ptr(), &mut self.image, snap) };
        if r < 0 {
            self.image = ptr::null_mut();
            return Err(ceph_error(
                &format!("cannot open image {}", self.spec.image_name()),
                r.into(),
            ));
        }
        Ok(())
    }

    fn query_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        let r = unsafe { (self.api.rbd_get_size)(self.image, &mut size) };
        if r < 0 {
            return Err(ceph_error("rbd_get_size", r.into()));
        }
        Ok(size)
    }

    /// Take the exclusive lock, refusing if another client holds it (but
    /// breaking it if the holder is the dead owner our lock record names).
    fn lock(&self) -> io::Result<()> {
        let record = self.lock_record.as_deref();
        let name = self.spec.image_name();
        if let Some(dead) = record.and_then(|p| std::fs::read_to_string(p).ok()) {
            let dead = dead.trim();
            if !dead.is_empty() && self.lock_owners().unwrap_or_default() == [dead] {
                let c = cstring("owner", dead)?;
                // SAFETY: open image, NUL-terminated owner.
                let r = unsafe {
                    (self.api.rbd_lock_break)(self.image, ffi::RBD_LOCK_MODE_EXCLUSIVE, c.as_ptr())
                };
                if r < 0 && r != -libc::ENOENT {
                    tracing::warn!(
                        owner = dead,
                        "cannot break the lock of the previous pcache: {}",
                        io::Error::from_raw_os_error(-r)
                    );
                } else {
                    tracing::info!(owner = dead, "broke the exclusive lock the previous pcache on this cache left behind (it is dead)");
                }
            }
        }
        // SAFETY: open image.
        let r = unsafe { (self.api.rbd_lock_acquire)(self.image, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        match -r {
            0 => {
                if let Some(p) = record {
                    self.record_owner(p);
                }
                Ok(())
            }
            _ => {
                let owners = self.lock_owners().unwrap_or_default();
                let who = if owners.is_empty() {
                    "another client".to_string()
                } else {
                    format!("another client ({})", owners.join(", "))
                };
                Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "image {name} is in use: its exclusive lock is held by {who} \
                         ({}); pcache will not write behind another client",
                        io::Error::from_raw_os_error(-r)
                    ),
                ))
            }
        }
    }

    /// Write our own lock owner name to `path`, for the next pcache on
    /// this cache; in place, in a file that exists before the sandbox
    /// (which lets pcache make no file beside its cache). A torn or failed
    /// write only costs a slower restart.
    fn record_owner(&self, path: &Path) {
        let owners = self.lock_owners().unwrap_or_default();
        let [me] = owners.as_slice() else {
            tracing::warn!(?owners, "cannot tell our own lock owner name");
            return;
        };
        let written = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{me}\n").as_bytes()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "cannot record the lock owner ({e}); a restart after a crash will wait for the cluster to time the lock out");
        }
    }

    /// Who holds the exclusive lock now.
    pub fn lock_owners(&self) -> io::Result<Vec<String>> {
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut n: usize = owners.len();
        // SAFETY: open image; `owners` has room for `n` pointers.
        let r = unsafe {
            (self.api.rbd_lock_get_owners)(self.image, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        if r < 0 {
            return Err(ceph_error("rbd_lock_get_owners", r.into()));
        }
        let out = owners[..n.min(owners.len())]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd filled these with NUL-terminated strings.
            .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: frees exactly the strings librbd allocated above.
        unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(out)
    }

    /// Whether this client holds the image's exclusive lock.
    pub fn is_lock_owner(&self) -> io::Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: open image, valid out-pointer.
        let r = unsafe { (self.api.rbd_is_exclusive_lock_owner)(self.image, &mut owner) };
        if r < 0 {
            return Err(ceph_error("rbd_is_exclusive_lock_owner", r.into()));
        }
        Ok(owner != 0)
    }

    /// The image's name in `rbd:` syntax.
    pub fn spec(&self) -> &RbdSpec {
        &self.spec
    }

    /// The raw handle for the asynchronous engine.
    pub fn handle(&self) -> RbdHandle {
        RbdHandle {
            api: self.api,
            image: self.image,
            read_timeout: self.read_timeout,
        }
    }

    /// How long a queued read may wait for the cluster before it fails
    /// with `TimedOut` (writes and flushes wait as long as it takes).
    pub fn set_read_timeout(&mut self, t: Duration) {
        self.read_timeout = t;
    }

    /// Run `f` whenever the image's header changes (another client resized
    /// it, for one). `f` runs on a librbd thread and must not call back into
    /// this image: hand the work to another thread. Replaces an earlier
    /// callback.
    pub fn watch_updates(&self, f: UpdateFn) -> io::Result<()> {
        self.unwatch();
        let arg = Box::into_raw(Box::new(f));
        let mut handle = 0u64;
        // SAFETY: open image; `arg` stays valid until `unwatch` frees it
        // after rbd_update_unwatch has returned.
        let r =
            unsafe { (self.api.rbd_update_watch)(self.image, &mut handle, on_update, arg.cast()) };
        if r < 0 {
            // SAFETY: librbd did not keep `arg`; we own it again.
            drop(unsafe { Box::from_raw(arg) });
            return Err(ceph_error("rbd_update_watch", r.into()));
        }
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some((handle, arg));
        Ok(())
    }

    fn unwatch(&self) {
        let w = self.watch.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((handle, arg)) = w {
            // SAFETY: open image; the handle came from rbd_update_watch.
            let r = unsafe { (self.api.rbd_update_unwatch)(self.image, handle) };
            if r < 0 {
                // librbd may still call it: leak rather than free.
                tracing::warn!("rbd_update_unwatch: {}", io::Error::from_raw_os_error(-r));
                return;
            }
            // SAFETY: unwatched: librbd no longer calls back with `arg`.
            drop(unsafe { Box::from_raw(arg) });
        }
    }

    fn check_range(&self, off: u64, len: usize) -> io::Result<()> {
        let size = self.size.load(Ordering::Relaxed);
        let ok = off.is_multiple_of(SECTOR)
            && (len as u64).is_multiple_of(SECTOR)
            && off.checked_add(len as u64).is_some_and(|end| end <= size);
        if ok {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at offset {off}: misaligned or beyond the end of the image ({size} bytes)"),
            ))
        }
    }
}

unsafe extern "C" fn on_update(arg: *mut c_void) {
    // SAFETY: `arg` is the boxed callback registered in `watch_updates`,
    // alive until unwatched.
    let f = unsafe { &*arg.cast::<UpdateFn>() };
    f();
}

impl Backing for RbdBacking {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn refresh_size(&self) -> io::Result<u64> {
        let size = self.query_size()?;
        if size % SECTOR != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: its size {size} is not a multiple of {SECTOR} bytes",
                    self.spec.image_name()
                ),
            ));
        }
        self.size.store(size, Ordering::Relaxed);
        Ok(size)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check_range(off, buf.len())?;
        for (i, chunk) in buf.chunks_mut(MAX_CALL_BYTES).enumerate() {
            let at = off + (i * MAX_CALL_BYTES) as u64;
            // SAFETY: open image; `chunk` is writable for its length.
            let r = unsafe {
                (self.api.rbd_read)(self.image, at, chunk.len(), chunk.as_mut_ptr().cast())
            };
            if r < 0 {
                return Err(ceph_error("rbd read", r as i64));
            }
            if r as usize != chunk.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("rbd read of {} bytes at {at} returned {r}", chunk.len()),
                ));
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the image is open read-only",
            ));
        }
        self.check_range(off, buf.len())?;
        for (i, chunk) in buf.chunks(MAX_CALL_BYTES).enumerate() {
            let at = off + (i * MAX_CALL_BYTES) as u64;
            // SAFETY: open image; `chunk` is readable for its length.
            let r =
                unsafe { (self.api.rbd_write)(self.image, at, chunk.len(), chunk.as_ptr().cast()) };
            if r < 0 {
                return Err(ceph_error("rbd write", r as i64));
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: open image.
        let r = unsafe { (self.api.rbd_flush)(self.image) };
        if r < 0 {
            return Err(ceph_error("rbd flush", r.into()));
        }
        Ok(())
    }

    /// `rbd_write_zeroes` whatever `unmap` says: it deallocates whole
    /// objects and zeroes the rest, while a plain discard of part of an
    /// object may leave the old data readable (`rbd_skip_partial_discard`).
    fn write_zeroes(&self, off: u64, len: u64, _unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the image is open read-only",
            ));
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_CALL_BYTES as u64);
            self.check_range(off + done, n as usize)?;
            // SAFETY: open image.
            let r =
                unsafe { (self.api.rbd_write_zeroes)(self.image, off + done, n as usize, 0, 0) };
            if r < 0 {
                return Err(ceph_error("rbd write_zeroes", r as i64));
            }
            done += n;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "rbd image {}{}",
            self.spec.image_name(),
            if self.read_only { " (read-only)" } else { "" }
        )
    }

    fn rbd(&self) -> Option<RbdHandle> {
        Some(self.handle())
    }

    fn watch_size(&self, f: Box<dyn Fn() + Send + Sync>) -> io::Result<bool> {
        self.watch_updates(f)?;
        Ok(true)
    }

    fn claim(&self) -> io::Result<()> {
        if self.read_only || self.is_lock_owner()? {
            return Ok(());
        }
        self.lock()
    }

    fn hand_off(&self) -> io::Result<()> {
        self.flush()?;
        if !self.read_only && self.is_lock_owner()? {
            // SAFETY: open image.
            let r = unsafe { (self.api.rbd_lock_release)(self.image) };
            if r < 0 {
                return Err(ceph_error("rbd_lock_release", r.into()));
            }
            // Not ours any more: a later pcache on this cache must not
            // take the next owner for a dead predecessor.
            if let Some(p) = &self.lock_record {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(p);
            }
        }
        Ok(())
    }

    fn release(&self) -> io::Result<()> {
        self.unwatch();
        self.hand_off()
    }
}

impl Drop for RbdBacking {
    fn drop(&mut self) {
        self.unwatch();
        // SAFETY: each handle is released once, in reverse order of
        // creation, and only if it was created. rbd_close waits for
        // outstanding asynchronous operations.
        unsafe {
            if !self.image.is_null() {
                let mut owner: c_int = 0;
                if !self.read_only
                    && (self.api.rbd_is_exclusive_lock_owner)(self.image, &mut owner) == 0
                    && owner != 0
                {
                    let _ = (self.api.rbd_lock_release)(self.image);
                }
                let r = (self.api.rbd_close)(self.image);
                if r < 0 {
                    tracing::warn!("rbd_close: {}", io::Error::from_raw_os_error(-r));
                }
            }
            if !self.ioctx.is_null() {
                (self.api.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.api.rados_shutdown)(self.cluster);
            }
        }
    }
}
