//! The part of librados' and librbd's C API pcache calls, loaded at run time.
//!
//! The libraries are opened with `dlopen` on first use rather than linked:
//! one pcache binary runs on hosts without Ceph, and only `--backing rbd:`
//! needs `librbd1` installed. Every function pointer is resolved once; a
//! missing symbol is an error naming it.

#![allow(unsafe_code)]
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `rados_t`.
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`.
pub type rados_ioctx_t = *mut c_void;
/// `rbd_image_t`.
pub type rbd_image_t = *mut c_void;
/// `rbd_completion_t`.
pub type rbd_completion_t = *mut c_void;
/// `rbd_callback_t`: runs on a librbd thread when an aio operation ends.
pub type rbd_callback_t = unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void);
/// `rbd_update_callback_t`: runs on a librbd thread when the image header
/// changes (resize, features, locks).
pub type rbd_update_callback_t = unsafe extern "C" fn(arg: *mut c_void);

/// `RBD_FEATURE_EXCLUSIVE_LOCK`.
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_LOCK_MODE_EXCLUSIVE`.
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

/// The library names tried, newest ABI first.
const LIBRADOS: &[&CStr] = &[c"librados.so.2", c"librados.so"];
const LIBRBD: &[&CStr] = &[c"librbd.so.1", c"librbd.so"];

/// Declares [`Api`] with one field per C function and the loader that
/// fills them in.
macro_rules! api {
    ($( $lib:ident : $name:ident ( $($arg:ty),* ) -> $ret:ty ;)*) => {
        /// Function pointers into librados and librbd.
        #[derive(Debug)]
        pub struct Api {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                pub $name: unsafe extern "C" fn($($arg),*) -> $ret,
            )*
        }

        impl Api {
            /// Resolve every function from the two opened libraries.
            fn resolve(rados: *mut c_void, rbd: *mut c_void) -> Result<Api, String> {
                Ok(Api {
                    $(
                        $name: {
                            let lib = match stringify!($lib) {
                                "rados" => rados,
                                _ => rbd,
                            };
                            let sym = symbol(lib, concat!(stringify!($name), "\0"))?;
                            // SAFETY: the symbol comes from the library that
                            // declares it with exactly this C signature
                            // (rados/librados.h, rbd/librbd.h of Ceph >= 14).
                            unsafe {
                                std::mem::transmute::<
                                    *mut c_void,
                                    unsafe extern "C" fn($($arg),*) -> $ret,
                                >(sym)
                            }
                        },
                    )*
                })
            }
        }
    };
}

api! {
    rados: rados_create(*mut rados_t, *const c_char) -> c_int;
    rados: rados_conf_read_file(rados_t, *const c_char) -> c_int;
    rados: rados_conf_set(rados_t, *const c_char, *const c_char) -> c_int;
    rados: rados_connect(rados_t) -> c_int;
    rados: rados_shutdown(rados_t) -> ();
    rados: rados_ioctx_create(rados_t, *const c_char, *mut rados_ioctx_t) -> c_int;
    rados: rados_ioctx_destroy(rados_ioctx_t) -> ();
    rados: rados_ioctx_set_namespace(rados_ioctx_t, *const c_char) -> ();
    rbd: rbd_open(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_open_read_only(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    rbd: rbd_close(rbd_image_t) -> c_int;
    rbd: rbd_get_size(rbd_image_t, *mut u64) -> c_int;
    rbd: rbd_get_features(rbd_image_t, *mut u64) -> c_int;
    rbd: rbd_read(rbd_image_t, u64, usize, *mut c_char) -> isize;
    rbd: rbd_write(rbd_image_t, u64, usize, *const c_char) -> isize;
    rbd: rbd_discard(rbd_image_t, u64, u64) -> c_int;
    rbd: rbd_write_zeroes(rbd_image_t, u64, usize, c_int, c_int) -> isize;
    rbd: rbd_flush(rbd_image_t) -> c_int;
    rbd: rbd_aio_create_completion(*mut c_void, rbd_callback_t, *mut rbd_completion_t) -> c_int;
    rbd: rbd_aio_get_return_value(rbd_completion_t) -> isize;
    rbd: rbd_aio_release(rbd_completion_t) -> ();
    rbd: rbd_aio_read(rbd_image_t, u64, usize, *mut c_char, rbd_completion_t) -> c_int;
    rbd: rbd_aio_write(rbd_image_t, u64, usize, *const c_char, rbd_completion_t) -> c_int;
    rbd: rbd_aio_flush(rbd_image_t, rbd_completion_t) -> c_int;
    rbd: rbd_aio_discard(rbd_image_t, u64, u64, rbd_completion_t) -> c_int;
    rbd: rbd_aio_write_zeroes(rbd_image_t, u64, usize, rbd_completion_t, c_int, c_int) -> c_int;
    rbd: rbd_lock_acquire(rbd_image_t, c_int) -> c_int;
    rbd: rbd_lock_release(rbd_image_t) -> c_int;
    rbd: rbd_lock_get_owners(rbd_image_t, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd: rbd_lock_get_owners_cleanup(*mut *mut c_char, usize) -> ();
    rbd: rbd_lock_break(rbd_image_t, c_int, *const c_char) -> c_int;
    rbd: rbd_is_exclusive_lock_owner(rbd_image_t, *mut c_int) -> c_int;
    rbd: rbd_update_watch(rbd_image_t, *mut u64, rbd_update_callback_t, *mut c_void) -> c_int;
    rbd: rbd_update_unwatch(rbd_image_t, u64) -> c_int;
}

/// The API, loaded on first use; the error says what to install.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    let rados = open_first(LIBRADOS)?;
    let rbd = open_first(LIBRBD)?;
    // The handles are never closed: the pointers stay valid for the
    // process's life.
    Api::resolve(rados, rbd)
}

/// `dlopen` the first of `names` that loads.
fn open_first(names: &[&CStr]) -> Result<*mut c_void, String> {
    let mut last = String::new();
    for name in names {
        // SAFETY: `name` is NUL-terminated; dlopen runs the library's
        // initialisers, which librados/librbd allow at any time.
        let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            return Ok(h);
        }
        last = dl_error();
    }
    Err(format!(
        "cannot load {} ({last}): the rbd: backing needs Ceph's client libraries \
         (Debian: apt-get install librbd1)",
        names[0].to_string_lossy()
    ))
}

/// `dlsym`, with the symbol's name in the error.
fn symbol(lib: *mut c_void, name: &str) -> Result<*mut c_void, String> {
    // SAFETY: `name` ends in NUL (the macro appends it) and `lib` is a live
    // handle from dlopen.
    let p = unsafe { libc::dlsym(lib, name.as_ptr().cast()) };
    if p.is_null() {
        return Err(format!(
            "Ceph's client library has no {} ({}): it is older than pcache needs (Ceph 14 or later)",
            name.trim_end_matches('\0'),
            dl_error()
        ));
    }
    Ok(p)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until
    // the next dl* call on this thread; we copy it at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-null, NUL-terminated (above).
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}
