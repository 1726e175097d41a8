//! Minimal safe bindings to librbd and librados: connect to a Ceph cluster, open an RBD image,
//! and run asynchronous I/O on it whose completions arrive through an eventfd.
//!
//! No maintained crate binds librbd, so this crate declares the C functions it uses itself
//! (`sys.rs`, committed: no headers or bindgen at build time) and links `librbd` and `librados`
//! (Debian: `librbd-dev`, `librados-dev`) through `#[link]` attributes.
//!
//! - [`Cluster`] is a connected cluster handle ([`ClusterOptions`]: config file, client id,
//!   a bounded connect timeout, extra settings such as `rbd_cache`).
//! - [`Image`] is an open image, shared as `Arc<Image>` by every thread that submits to it
//!   (librbd's image handle is thread-safe; one writable handle per process also keeps the
//!   image's exclusive lock in one owner). [`Image::open_reader`] opens it again read-only on a
//!   cluster connection of its own, for reads.
//! - [`AioQueue`] is one thread's asynchronous requests on an image (its reads optionally on a
//!   reader handle). librbd calls a completion
//!   callback on one of its own threads; the callback never blocks: it records the result, pushes
//!   the request onto a lock-free list and writes the queue's eventfd when the list was empty.
//!   The owning thread waits for the eventfd in its epoll loop and collects the finished requests
//!   with [`AioQueue::reap`]. Request slots are preallocated for the queue depth; librbd itself
//!   allocates one completion object per request, which no caller can avoid.

// Tests may unwrap; the library itself may not (checked when it is built without `test`).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod sys;
pub mod testing;

use std::ffi::{c_void, CString};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicPtr, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

use log::{debug, info};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors of this crate, each naming what was being done and on which cluster, pool or image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name or value holds a NUL byte, which the C interface cannot carry.
    #[error("{what} {value:?} contains a NUL byte")]
    Nul {
        /// What the string is (pool, image, option, ...).
        what: &'static str,
        /// The string.
        value: String,
    },
    /// Creating or configuring the cluster handle failed.
    #[error("Ceph client {client}: {context}: {source}")]
    Config {
        /// The client name (`client.admin`).
        client: String,
        /// What was being done.
        context: String,
        /// The error librados returned.
        source: io::Error,
    },
    /// The monitors did not answer, or refused us.
    #[error("Ceph client {client}: connecting to the cluster ({conf}): {reason}")]
    Connect {
        /// The client name.
        client: String,
        /// The config file in use, or where it was looked for.
        conf: String,
        /// Why, in words (timeout, authentication, ...).
        reason: String,
    },
    /// The pool does not exist or cannot be opened.
    #[error("Ceph pool {pool:?}: {reason}")]
    Pool {
        /// The pool name.
        pool: String,
        /// Why, in words.
        reason: String,
    },
    /// The image (or its snapshot) does not exist or cannot be opened.
    #[error("RBD image {spec}: {reason}")]
    Open {
        /// `pool/image[@snap]`.
        spec: String,
        /// Why, in words.
        reason: String,
    },
    /// Connecting and opening the image took longer than the connect timeout.
    #[error("RBD image {spec}: no answer from the cluster within {secs} s ({conf})")]
    Timeout {
        /// `pool/image[@snap]`.
        spec: String,
        /// The timeout in seconds.
        secs: u64,
        /// The config file in use.
        conf: String,
    },
    /// A synchronous operation on an open image failed.
    #[error("RBD image {spec}: {context}: {source}")]
    Image {
        /// `pool/image[@snap]`.
        spec: String,
        /// What was being done.
        context: &'static str,
        /// The error librbd returned.
        source: io::Error,
    },
    /// Creating the completion eventfd failed.
    #[error("creating the RBD completion eventfd: {source}")]
    EventFd {
        /// The underlying error.
        source: io::Error,
    },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The default bound on connecting to the cluster and opening an image.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `RBD_FEATURE_EXCLUSIVE_LOCK`: one client at a time may write (it holds the lock).
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// `RBD_FEATURE_JOURNALING`: writes go through a journal first, which reads of a handle that
/// does not hold the exclusive lock would not see replayed.
pub const FEATURE_JOURNALING: u64 = 1 << 6;

/// The config file librados reads when none is given.
pub const DEFAULT_CONF: &str = "/etc/ceph/ceph.conf";

fn errno(ret: i64) -> io::Error {
    io::Error::from_raw_os_error(i32::try_from(-ret).unwrap_or(libc::EIO))
}

fn cstring(what: &'static str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| Error::Nul {
        what,
        value: value.to_owned(),
    })
}

/// How to reach the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The config file (`conf=`, `--ceph-conf`); `None`: librados's default search
    /// (`$CEPH_CONF`, `/etc/ceph/ceph.conf`, ...).
    pub conf: Option<PathBuf>,
    /// The client id (`id=`): the client is `client.ID`; `None`: `client.admin`.
    pub id: Option<String>,
    /// Bound on reaching the monitors and opening the image: librados's
    /// `client_mount_timeout` and `rados_mon_op_timeout`, and a deadline on the whole open.
    pub timeout: Duration,
    /// Further librados settings applied after the config file (`rbd_cache`, ...).
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            conf: None,
            id: None,
            timeout: DEFAULT_CONNECT_TIMEOUT,
            settings: Vec::new(),
        }
    }
}

impl ClusterOptions {
    fn client(&self) -> String {
        format!("client.{}", self.id.as_deref().unwrap_or("admin"))
    }

    fn conf_name(&self) -> String {
        match &self.conf {
            Some(p) => p.display().to_string(),
            None => format!("default config, {DEFAULT_CONF}"),
        }
    }
}

/// A connected cluster handle; shut down when the last [`Image`] on it is closed.
#[derive(Debug)]
pub struct Cluster {
    handle: sys::rados_t,
    client: String,
}

// SAFETY: a librados cluster handle may be used from any thread once connected; librados
// serialises access internally. The handle is only shut down in `Drop`, with `&mut self`.
unsafe impl Send for Cluster {}
// SAFETY: as above: every librados call on a connected handle is thread-safe.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Create a handle, read the config, apply the settings and connect, within
    /// `opts.timeout` for the monitors' answer.
    pub fn connect(opts: &ClusterOptions) -> Result<Cluster> {
        let client = opts.client();
        let config_err = |context: String, ret: i32| Error::Config {
            client: client.clone(),
            context,
            source: errno(ret.into()),
        };
        let cluster_name = cstring("cluster name", "ceph")?;
        let client_c = cstring("client id", &client)?;
        let mut handle: sys::rados_t = ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer, the strings are NUL-terminated and outlive
        // the call.
        let ret =
            unsafe { sys::rados_create2(&mut handle, cluster_name.as_ptr(), client_c.as_ptr(), 0) };
        if ret < 0 {
            return Err(config_err("creating the cluster handle".into(), ret));
        }
        // From here on `Drop` shuts the handle down on every error path.
        let cluster = Cluster {
            handle,
            client: client.clone(),
        };
        match &opts.conf {
            Some(path) => {
                if !path.exists() {
                    return Err(Error::Config {
                        client,
                        context: format!("reading {}", path.display()),
                        source: io::Error::from_raw_os_error(libc::ENOENT),
                    });
                }
                let path_c = cstring("config path", &path.display().to_string())?;
                // SAFETY: the handle is valid and not connected; the path is NUL-terminated.
                let ret = unsafe { sys::rados_conf_read_file(cluster.handle, path_c.as_ptr()) };
                if ret < 0 {
                    return Err(config_err(format!("reading {}", path.display()), ret));
                }
            }
            None => {
                // SAFETY: the handle is valid and not connected; NULL asks for the default
                // search path. A missing default file is not an error here: the settings may
                // name the monitors, and connecting says so if nothing does.
                let ret = unsafe { sys::rados_conf_read_file(cluster.handle, ptr::null()) };
                if ret < 0 {
                    debug!(
                        "{client}: no default Ceph config found ({})",
                        errno(ret.into())
                    );
                }
            }
        }
        let secs = opts.timeout.as_secs().max(1).to_string();
        let timeouts = [
            ("client_mount_timeout".to_owned(), secs.clone()),
            ("rados_mon_op_timeout".to_owned(), secs),
        ];
        for (key, value) in timeouts.iter().chain(&opts.settings) {
            cluster.set(key, value)?;
        }
        // SAFETY: the handle is valid and configured; connecting once is allowed.
        let ret = unsafe { sys::rados_connect(cluster.handle) };
        if ret < 0 {
            let reason = match -ret {
                libc::ETIMEDOUT => format!(
                    "no monitor answered within {} s",
                    opts.timeout.as_secs().max(1)
                ),
                libc::EACCES | libc::EPERM => {
                    format!("authentication refused ({})", errno(ret.into()))
                }
                libc::ENOENT => format!(
                    "no monitor address or key found ({}); give conf=PATH or --ceph-conf",
                    errno(ret.into())
                ),
                _ => errno(ret.into()).to_string(),
            };
            return Err(Error::Connect {
                client,
                conf: opts.conf_name(),
                reason,
            });
        }
        debug!("{client}: connected ({})", opts.conf_name());
        Ok(cluster)
    }

    fn set(&self, key: &str, value: &str) -> Result<()> {
        let key_c = cstring("Ceph option", key)?;
        let value_c = cstring("Ceph option value", value)?;
        // SAFETY: the handle is valid; both strings are NUL-terminated and outlive the call.
        let ret = unsafe { sys::rados_conf_set(self.handle, key_c.as_ptr(), value_c.as_ptr()) };
        if ret < 0 {
            return Err(Error::Config {
                client: self.client.clone(),
                context: format!("setting {key}={value}"),
                source: errno(ret.into()),
            });
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rados_create2`, every ioctx on it is destroyed (they
        // hold an `Arc<Cluster>`), and it is shut down once.
        unsafe { sys::rados_shutdown(self.handle) };
    }
}

/// What to open: `pool/image[@snap]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// A snapshot: opened read-only.
    pub snap: Option<String>,
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        Ok(())
    }
}

/// An open RBD image, shared as `Arc<Image>` by the threads that submit to it.
#[derive(Debug)]
pub struct Image {
    handle: sys::rbd_image_t,
    ioctx: sys::rados_ioctx_t,
    spec: ImageSpec,
    read_only: bool,
    size: u64,
    object_size: u64,
    /// The image's feature bits (`RBD_FEATURE_*`), read at open.
    features: u64,
    /// How the cluster was reached, for [`Image::open_reader`].
    opts: ClusterOptions,
    /// Closed early by [`Image::close`]: requests are refused, `Drop` has nothing left to do.
    closed: AtomicBool,
    /// The queues submitting to this image, so that [`Image::close`] can wait until none is
    /// inside a librbd call. Taken when a queue is created and at close only.
    queues: Mutex<Vec<Weak<Shared>>>,
    // Dropped after the image and the ioctx.
    cluster: Cluster,
}

// SAFETY: librbd image handles are thread-safe: any number of threads may submit I/O to one
// handle concurrently (QEMU's multi-queue RBD driver does). The handle is closed only in `Drop`.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Connect with `opts` and open `spec` (read-only if `read_only` or a snapshot is given),
    /// all within `opts.timeout`: a cluster that does not answer is an error, not a hang.
    pub fn open(opts: &ClusterOptions, spec: &ImageSpec, read_only: bool) -> Result<Image> {
        let (tx, rx) = mpsc::channel();
        let (o, s) = (opts.clone(), spec.clone());
        // A thread of its own, so that a hang inside librados or librbd cannot hold the caller
        // past the deadline; on timeout it is left behind (the caller gives up on the image).
        std::thread::Builder::new()
            .name("rbd-open".into())
            .spawn(move || {
                let _ = tx.send(Self::open_blocking(&o, &s, read_only));
            })
            .map_err(|source| Error::Image {
                spec: spec.to_string(),
                context: "spawning the opening thread",
                source,
            })?;
        // librados bounds the monitors' part itself; give it a little slack to say so.
        let deadline = opts.timeout + Duration::from_secs(2);
        match rx.recv_timeout(deadline) {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                spec: spec.to_string(),
                secs: opts.timeout.as_secs().max(1),
                conf: opts.conf_name(),
            }),
        }
    }

    fn open_blocking(opts: &ClusterOptions, spec: &ImageSpec, read_only: bool) -> Result<Image> {
        let cluster = Cluster::connect(opts)?;
        let pool_c = cstring("pool", &spec.pool)?;
        let image_c = cstring("image", &spec.image)?;
        let snap_c = spec
            .snap
            .as_deref()
            .map(|s| cstring("snapshot", s))
            .transpose()?;
        let mut ioctx: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: the cluster is connected, the name NUL-terminated, `ioctx` a valid
        // out-pointer.
        let ret = unsafe { sys::rados_ioctx_create(cluster.handle, pool_c.as_ptr(), &mut ioctx) };
        if ret < 0 {
            return Err(Error::Pool {
                pool: spec.pool.clone(),
                reason: match -ret {
                    libc::ENOENT => "no such pool".into(),
                    _ => errno(ret.into()).to_string(),
                },
            });
        }
        let read_only = read_only || spec.snap.is_some();
        let mut handle: sys::rbd_image_t = ptr::null_mut();
        let snap_ptr = snap_c.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: the ioctx is valid, the names NUL-terminated (the snapshot's may be NULL),
        // `handle` a valid out-pointer.
        let ret = unsafe {
            if read_only {
                sys::rbd_open_read_only(ioctx, image_c.as_ptr(), &mut handle, snap_ptr)
            } else {
                sys::rbd_open(ioctx, image_c.as_ptr(), &mut handle, snap_ptr)
            }
        };
        if ret < 0 {
            // SAFETY: the ioctx was created above and nothing else uses it.
            unsafe { sys::rados_ioctx_destroy(ioctx) };
            return Err(Error::Open {
                spec: spec.to_string(),
                reason: match (-ret, &spec.snap) {
                    (libc::ENOENT, None) => "no such image".into(),
                    (libc::ENOENT, Some(_)) => "no such image or snapshot".into(),
                    (libc::EACCES | libc::EPERM, _) => {
                        format!("access refused ({})", errno(ret.into()))
                    }
                    _ => errno(ret.into()).to_string(),
                },
            });
        }
        let mut image = Image {
            handle,
            ioctx,
            spec: spec.clone(),
            read_only,
            size: 0,
            object_size: 0,
            features: 0,
            opts: opts.clone(),
            closed: AtomicBool::new(false),
            queues: Mutex::new(Vec::new()),
            cluster,
        };
        // SAFETY: an all-zero `rbd_image_info_t` is valid (integers and byte arrays).
        let mut info: sys::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: the image is open and `info` is a writable struct of the size given.
        let ret = unsafe {
            sys::rbd_stat(
                image.handle,
                &mut info,
                std::mem::size_of::<sys::rbd_image_info_t>(),
            )
        };
        if ret < 0 {
            return Err(Error::Image {
                spec: spec.to_string(),
                context: "reading the image's size",
                source: errno(ret.into()),
            });
        }
        image.size = info.size;
        image.object_size = info.obj_size;
        let mut features = 0u64;
        // SAFETY: the image is open and `features` a valid out-pointer.
        let ret = unsafe { sys::rbd_get_features(image.handle, &mut features) };
        if ret < 0 {
            return Err(Error::Image {
                spec: spec.to_string(),
                context: "reading the image's features",
                source: errno(ret.into()),
            });
        }
        image.features = features;
        info!(
            "RBD image {spec} open{} as {}: {} bytes in objects of {} bytes",
            if read_only { " read-only" } else { "" },
            image.cluster.client,
            info.size,
            info.obj_size
        );
        Ok(image)
    }

    /// `pool/image[@snap]`.
    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    /// Whether the image is open read-only (asked for, or a snapshot).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image's size in bytes, as read at open.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's object size in bytes (a good discard granularity).
    pub fn object_size(&self) -> u64 {
        self.object_size
    }

    /// The image's feature bits (`RBD_FEATURE_*`, see [`FEATURE_EXCLUSIVE_LOCK`] and
    /// [`FEATURE_JOURNALING`]), as read at open.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Open the same image (or snapshot) again, read-only, on a cluster connection of its own,
    /// within the same timeout.
    ///
    /// librbd sends all of one client's requests to an OSD over one connection, served by one
    /// messenger thread at each end; a second client is a second connection. A read-only handle
    /// never takes the image's exclusive lock and, on the image's head, never loads its object
    /// map: its reads go to the OSDs, which order them after every write they have acknowledged
    /// to any client. So, with librbd's cache off, it reads what the writing handle wrote, and
    /// the writing handle keeps the lock to itself.
    pub fn open_reader(&self) -> Result<Image> {
        Image::open(&self.opts, &self.spec, true)
    }

    /// The image's size in bytes now (it may have been resized since open).
    pub fn current_size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: the image is open and `size` a valid out-pointer.
        let ret = unsafe { sys::rbd_get_size(self.handle, &mut size) };
        if ret < 0 {
            return Err(Error::Image {
                spec: self.spec.to_string(),
                context: "reading the image's size",
                source: errno(ret.into()),
            });
        }
        Ok(size)
    }

    /// Write back what librbd's cache holds and wait for it (`rbd_flush`); blocks.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: the image is open; `rbd_flush` is thread-safe.
        let ret = unsafe { sys::rbd_flush(self.handle) };
        if ret < 0 {
            return Err(Error::Image {
                spec: self.spec.to_string(),
                context: "flushing",
                source: errno(ret.into()),
            });
        }
        Ok(())
    }
}

impl Image {
    /// Write back librbd's cache, then close the image, releasing its exclusive lock at once
    /// (instead of leaving the next owner to wait for this client's watch to expire), for a
    /// process about to exit while the image is still shared. Requests submitted from then on
    /// fail with `ESHUTDOWN`; one already inside librbd is waited for, and librbd's close waits
    /// for those in flight.
    pub fn close(&self) -> Result<()> {
        // SeqCst, paired with `AioQueue::submit`: either a submitter sees `closed`, or this
        // thread sees its `in_call` flag and waits for it.
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let queues: Vec<Arc<Shared>> = match self.queues.lock() {
            Ok(q) => q.iter().filter_map(Weak::upgrade).collect(),
            Err(poisoned) => poisoned
                .get_ref()
                .iter()
                .filter_map(Weak::upgrade)
                .collect(),
        };
        for q in &queues {
            while q.in_call.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
        }
        let flushed = self.flush();
        // SAFETY: `closed` is set and no submitter is inside librbd, so nothing uses the handle
        // from now on; `closed` also keeps `Drop` from closing it again.
        unsafe { self.release() };
        flushed
    }

    /// # Safety
    ///
    /// Called once, with no request in flight and no use of the handle after.
    unsafe fn release(&self) {
        // SAFETY: the caller guarantees it; the handle and ioctx are released image first.
        unsafe {
            let ret = sys::rbd_close(self.handle);
            if ret < 0 {
                log::warn!("RBD image {}: closing: {}", self.spec, errno(ret.into()));
            }
            sys::rados_ioctx_destroy(self.ioctx);
        }
        // Closing releases the image's exclusive lock: the next owner need not wait.
        info!("RBD image {} closed", self.spec);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !*self.closed.get_mut() {
            // SAFETY: no request is in flight (each `AioQueue` holds an `Arc<Image>` and waits
            // for its requests before letting go), and `&mut self` means no other user.
            unsafe { self.release() };
        }
    }
}

/// One asynchronous request for [`AioQueue::submit`]. Offsets and lengths are in bytes.
#[derive(Clone, Copy, Debug)]
pub enum AioOp {
    /// Read into `iovecs[..iovcnt]` from `offset` (`rbd_aio_readv`).
    Readv {
        /// Byte offset in the image.
        offset: u64,
        /// The first of `iovcnt` iovecs.
        iovecs: *const libc::iovec,
        /// Number of iovecs.
        iovcnt: usize,
    },
    /// Write `iovecs[..iovcnt]` at `offset` (`rbd_aio_writev`).
    Writev {
        /// Byte offset in the image.
        offset: u64,
        /// The first of `iovcnt` iovecs.
        iovecs: *const libc::iovec,
        /// Number of iovecs.
        iovcnt: usize,
    },
    /// Write back librbd's cache (`rbd_aio_flush`).
    Flush,
    /// Deallocate a range (`rbd_aio_discard`).
    Discard {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read back as zeroes (`rbd_aio_write_zeroes`).
    WriteZeroes {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// What the completion callback shares with the owning thread; kept alive by the callbacks
/// still running through one `Arc` reference per request in flight.
struct Shared {
    /// The owner is inside a librbd submission (see [`Image::close`]).
    in_call: AtomicBool,
    /// Finished requests, newest first (a lock-free stack; `reap` takes all at once).
    head: AtomicPtr<Slot>,
    eventfd: EventFd,
}

/// One request in flight. Boxed, so its address stays put while librbd holds it.
struct Slot {
    /// Next finished slot on the `Shared::head` list.
    next: AtomicPtr<Slot>,
    /// librbd's return value, stored by the callback before the push.
    ret: AtomicIsize,
    /// The completion librbd holds for this request; released at reap.
    completion: AtomicPtr<c_void>,
    /// An `Arc<Shared>` reference (from `Arc::into_raw`) that the callback gives back.
    shared: AtomicPtr<Shared>,
    /// This slot's index in `AioQueue::slots`.
    index: usize,
}

/// One thread's asynchronous requests on an [`Image`]; see the crate documentation.
pub struct AioQueue {
    image: Arc<Image>,
    /// Where reads go, when not to `image`: a read-only handle on a connection of its own
    /// ([`Image::open_reader`]).
    reader: Option<Arc<Image>>,
    shared: Arc<Shared>,
    // Boxed: librbd holds each slot's address while the vector may grow.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slot>>,
    /// The caller's tag of each slot's request, by slot index.
    tags: Vec<u64>,
    free: Vec<usize>,
    in_flight: usize,
}

// SAFETY: the raw pointers inside the slots are only dereferenced by the owning thread and by
// librbd's callback, which synchronise through the atomics; moving the queue to another thread
// moves the owner with it.
unsafe impl Send for AioQueue {}

impl AioQueue {
    /// A queue on `image` with slots preallocated for `depth` requests in flight (more are
    /// allocated if more are submitted).
    pub fn new(image: Arc<Image>, depth: u32) -> Result<AioQueue> {
        Self::with_reader(image, None, depth)
    }

    /// As [`AioQueue::new`], with reads sent to `reader` (another handle on the same image,
    /// from [`Image::open_reader`]) instead of `image`; every other request goes to `image`.
    pub fn with_reader(
        image: Arc<Image>,
        reader: Option<Arc<Image>>,
        depth: u32,
    ) -> Result<AioQueue> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd { source })?;
        let shared = Arc::new(Shared {
            in_call: AtomicBool::new(false),
            head: AtomicPtr::new(ptr::null_mut()),
            eventfd,
        });
        // Both images learn of the queue, so that closing either waits for its submissions.
        for img in std::iter::once(&image).chain(reader.as_ref()) {
            match img.queues.lock() {
                Ok(mut q) => {
                    q.retain(|w| w.strong_count() > 0);
                    q.push(Arc::downgrade(&shared));
                }
                Err(poisoned) => poisoned.into_inner().push(Arc::downgrade(&shared)),
            }
        }
        let mut q = AioQueue {
            image,
            reader,
            shared,
            slots: Vec::new(),
            tags: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        };
        let depth = depth.max(1) as usize;
        q.slots.reserve(depth);
        q.tags.reserve(depth);
        q.free.reserve(depth);
        for _ in 0..depth {
            q.grow();
        }
        Ok(q)
    }

    fn grow(&mut self) {
        let index = self.slots.len();
        self.slots.push(Box::new(Slot {
            next: AtomicPtr::new(ptr::null_mut()),
            ret: AtomicIsize::new(0),
            completion: AtomicPtr::new(ptr::null_mut()),
            shared: AtomicPtr::new(ptr::null_mut()),
            index,
        }));
        self.tags.push(0);
        self.free.push(index);
    }

    /// The image this queue submits to.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The eventfd that becomes readable when a request has finished.
    pub fn eventfd(&self) -> RawFd {
        self.shared.eventfd.as_raw_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether [`AioQueue::reap`] would find a finished request now (a memory read).
    pub fn has_completions(&self) -> bool {
        !self.shared.head.load(Ordering::Acquire).is_null()
    }

    /// Start `op`, tagged `tag`. Its result always comes back through [`AioQueue::reap`], even
    /// when librbd refuses the request at once (then with that error).
    ///
    /// # Safety
    ///
    /// For `Readv` and `Writev`, the iovec array must be valid for the duration of the call and
    /// every buffer it points to valid (writable for a read), and not accessed by anyone else,
    /// until `tag` has been reaped.
    pub unsafe fn submit(&mut self, op: AioOp, tag: u64) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.grow();
                self.free.pop().unwrap_or_default()
            }
        };
        self.tags[index] = tag;
        self.in_flight += 1;
        let slot: *const Slot = &*self.slots[index];
        // SAFETY: `slot` points into a live box of `self.slots`.
        let slot_ref = unsafe { &*slot };
        slot_ref.shared.store(
            Arc::into_raw(self.shared.clone()).cast_mut(),
            Ordering::Relaxed,
        );
        slot_ref.next.store(ptr::null_mut(), Ordering::Relaxed);

        let mut completion: sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: `slot` stays valid until the callback has pushed it (the queue waits for
        // every request before dropping its slots); `completion` is a valid out-pointer.
        let ret = unsafe {
            sys::rbd_aio_create_completion(
                slot.cast_mut().cast(),
                Some(on_complete),
                &mut completion,
            )
        };
        if ret < 0 {
            // SAFETY: no completion exists, so no callback will run for this slot.
            unsafe { finish(slot, ret as isize) };
            return;
        }
        slot_ref.completion.store(completion, Ordering::Relaxed);
        // Announce the call before looking at `closed`; `Image::close` sets `closed` before
        // looking at this flag (both SeqCst): at least one side sees the other.
        let image = match (op, &self.reader) {
            (AioOp::Readv { .. }, Some(reader)) => reader,
            _ => &self.image,
        };
        self.shared.in_call.store(true, Ordering::SeqCst);
        if image.closed.load(Ordering::SeqCst) {
            self.shared.in_call.store(false, Ordering::SeqCst);
            // SAFETY: a completion exists but no request was started on it: release it here and
            // report the slot through the list.
            unsafe {
                sys::rbd_aio_release(completion);
                slot_ref
                    .completion
                    .store(ptr::null_mut(), Ordering::Relaxed);
                finish(slot, -(libc::ESHUTDOWN as isize));
            }
            return;
        }
        let h = image.handle;
        let bad_rw = match op {
            AioOp::Readv { offset, iovcnt, .. } | AioOp::Writev { offset, iovcnt, .. } => {
                libc::c_int::try_from(iovcnt).is_err() || i64::try_from(offset).is_err()
            }
            _ => false,
        };
        // SAFETY: the image is open (we hold an `Arc`, and it is not closed: see above), the
        // completion is fresh, and the caller guarantees the iovecs and buffers; librbd copies
        // the iovec array before returning and uses the buffers until the completion fires.
        let ret = unsafe {
            match op {
                _ if bad_rw => -libc::EINVAL,
                AioOp::Readv {
                    offset,
                    iovecs,
                    iovcnt,
                } => sys::rbd_aio_readv(h, iovecs, iovcnt as libc::c_int, offset, completion),
                AioOp::Writev {
                    offset,
                    iovecs,
                    iovcnt,
                } => sys::rbd_aio_writev(h, iovecs, iovcnt as libc::c_int, offset, completion),
                AioOp::Flush => sys::rbd_aio_flush(h, completion),
                AioOp::Discard { offset, len } => sys::rbd_aio_discard(h, offset, len, completion),
                AioOp::WriteZeroes { offset, len } => match usize::try_from(len) {
                    Ok(len) => sys::rbd_aio_write_zeroes(h, offset, len, completion, 0, 0),
                    Err(_) => -libc::EINVAL,
                },
            }
        };
        self.shared.in_call.store(false, Ordering::SeqCst);
        if ret < 0 {
            // librbd refused the request before queueing it: the callback will not run.
            // SAFETY: the slot is ours again; `finish` reports it through the same list.
            unsafe { finish(slot, ret as isize) };
        }
    }

    /// Report `tag` as failed with `errno` through [`AioQueue::reap`], without asking librbd:
    /// for requests refused before they reach it.
    pub fn fail(&mut self, tag: u64, errno: i32) {
        let index = self.take_slot(tag);
        let slot: *const Slot = &*self.slots[index];
        // SAFETY: the slot was just taken, holds its `Arc<Shared>` reference, and no completion
        // exists for it.
        unsafe { finish(slot, -(errno as isize)) };
    }

    fn take_slot(&mut self, tag: u64) -> usize {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.grow();
                self.free.pop().unwrap_or_default()
            }
        };
        self.tags[index] = tag;
        self.in_flight += 1;
        let slot = &self.slots[index];
        slot.shared.store(
            Arc::into_raw(self.shared.clone()).cast_mut(),
            Ordering::Relaxed,
        );
        slot.next.store(ptr::null_mut(), Ordering::Relaxed);
        index
    }

    /// Clear the eventfd and call `f(tag, result)` for each finished request: `result` is
    /// librbd's return value: the bytes read for a read, 0 or more for the rest, a negative
    /// errno on failure.
    pub fn reap(&mut self, mut f: impl FnMut(u64, isize)) {
        // Clear first: a push after this either lands before the swap below (and is taken) or
        // writes the eventfd again. EAGAIN only means nothing was signalled.
        let _ = self.shared.eventfd.read();
        let mut p = self.shared.head.swap(ptr::null_mut(), Ordering::Acquire);
        while !p.is_null() {
            // SAFETY: every pointer on the list is a slot of `self.slots` that the callback (or
            // `finish`) pushed and will not touch again; the Acquire swap orders its stores.
            let slot = unsafe { &*p };
            p = slot.next.load(Ordering::Relaxed);
            let ret = slot.ret.load(Ordering::Relaxed);
            let completion = slot.completion.swap(ptr::null_mut(), Ordering::Relaxed);
            if !completion.is_null() {
                // SAFETY: the request finished, and the completion is released once.
                unsafe { sys::rbd_aio_release(completion) };
            }
            let index = slot.index;
            self.free.push(index);
            self.in_flight -= 1;
            f(self.tags[index], ret);
        }
    }

    /// Wait up to `timeout` for every request in flight to finish, dropping their results;
    /// whether none is left.
    pub fn wait_idle_for(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.in_flight > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            let mut pfd = libc::pollfd {
                fd: self.eventfd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a timeout re-checks the list in case of a lost wakeup.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.reap(|_, _| {});
        }
        true
    }

    /// Give up on the requests still in flight, for a cluster that does not answer: their
    /// slots are leaked, since librbd may still complete them, and dropping the queue no longer
    /// waits, and the queue takes no further request. Whoever owns those requests' buffers must
    /// leak them too.
    pub fn abandon(&mut self) {
        if self.in_flight > 0 {
            log::warn!(
                "RBD image {}: abandoning {} request(s) the cluster has not answered",
                self.image.spec,
                self.in_flight
            );
        }
        std::mem::forget(std::mem::take(&mut self.slots));
        self.free.clear();
        self.in_flight = 0;
    }

    /// Block until every request in flight has finished, dropping their results.
    fn wait_idle(&mut self) {
        while self.in_flight > 0 {
            let mut pfd = libc::pollfd {
                fd: self.eventfd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a timeout re-checks the list in case of a lost wakeup.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.reap(|_, _| {});
        }
    }
}

impl Drop for AioQueue {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            debug!(
                "RBD image {}: waiting for {} request(s) before closing a queue",
                self.image.spec, self.in_flight
            );
        }
        // librbd writes into the buffers and slots until each callback has run.
        self.wait_idle();
    }
}

/// librbd's completion callback: record, push, signal. Never blocks.
unsafe extern "C" fn on_complete(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `c` is the completion librbd is finishing.
    let ret = unsafe { sys::rbd_aio_get_return_value(c) };
    // SAFETY: `arg` is the slot given at creation, alive until pushed.
    unsafe { finish(arg.cast::<Slot>().cast_const(), ret) };
}

/// Store `ret` in `slot`, push it onto its queue's finished list, write the eventfd if the list
/// was empty, and give back the slot's `Arc<Shared>` reference.
///
/// # Safety
///
/// `slot` is a slot of a live [`AioQueue`] with a request in flight whose `shared` holds an
/// `Arc::into_raw` reference, and nobody else finishes it.
unsafe fn finish(slot: *const Slot, ret: isize) {
    // SAFETY: the caller guarantees the slot is alive until the push below.
    let s = unsafe { &*slot };
    let shared_ptr = s.shared.swap(ptr::null_mut(), Ordering::Relaxed);
    // SAFETY: this is the reference taken at submit; turning it back into an `Arc` keeps
    // `Shared` alive until the end of this function, whatever the owner does meanwhile.
    let shared = unsafe { Arc::from_raw(shared_ptr.cast_const()) };
    s.ret.store(ret, Ordering::Relaxed);
    let mut head = shared.head.load(Ordering::Relaxed);
    loop {
        s.next.store(head, Ordering::Relaxed);
        match shared.head.compare_exchange_weak(
            head,
            slot.cast_mut(),
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => break,
            Err(h) => head = h,
        }
    }
    // The slot belongs to the owner again: only `shared` is used from here on.
    if head.is_null() {
        // Saturates only after 2^64 - 2 writes; the owner also re-checks the list.
        let _ = shared.eventfd.write(1);
    }
}
