//! Disk images, cache modes and I/O engines for the vhost-user-blk backend.
//!
//! This crate sits under the queue threads in the data flow: a queue thread parses a request
//! (`virtio-blk`), turns it into an [`Op`] whose [`IoBuffers`] point straight into guest memory
//! and keep it mapped, hands it to its own [`Engine`] with [`Engine::submit`], pushes the batch
//! to the kernel with [`Engine::commit`] and, when [`Engine::completion_fd`] becomes readable in
//! its epoll loop, collects the results, buffers handed back, with [`Engine::reap`].
//!
//! - [`Image`] is the disk: a regular file (created sparse when missing), a block device, a
//!   null image for measuring the virtqueue path alone, or a Ceph RBD image (`rbd:POOL/IMAGE`). It is shared as `Arc<Image>` by every queue
//!   thread and by the deferred workers, which call its synchronous operations
//!   ([`Image::flush`], [`Image::writeback_and_evict`], ...).
//! - [`CacheMode`] selects O_DIRECT, buffered, or buffered with drop-behind (`RWF_DONTCACHE`,
//!   probed once at open, or the `sync_file_range` + `POSIX_FADV_DONTNEED` fallback).
//! - Three engines: io_uring (one ring per queue thread), a synchronous one for hosts without
//!   io_uring, and, for `rbd:` images (the `rbd` feature), librbd's asynchronous API. None
//!   allocates per request while the requests in flight stay within the queue depth given to
//!   [`new_engine`] (librbd itself allocates a completion object per request).
//!
//! With the `fault-injection` feature, an image can be told to fail I/O that touches a range of
//! sectors with `EIO` (see `Image::set_fail_sectors`), for the fault tests.

// Tests may unwrap; the library itself may not (checked when it is built without `test`).
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

mod buffers;
#[cfg(feature = "fault-injection")]
mod fault;
mod image;
mod iov;
mod offload;
mod rbd_image;
mod sync_engine;
mod sys;
#[cfg(test)]
mod testutil;
mod uring;

pub use buffers::{IoBuffers, MemoryGuard};
pub use image::{parse_size, resident_bytes_of, EvictionPath, Image, ImageOptions};
#[cfg(feature = "rbd")]
pub use rbd_image::RbdEngine;
pub use rbd_image::{RbdOptions, RbdSpec, RBD_PREFIX};
pub use sync_engine::SyncEngine;
pub use uring::UringEngine;

/// `RWF_DONTCACHE` (Linux 6.14+): buffered I/O whose pages are dropped once written back.
pub const RWF_DONTCACHE: i32 = 0x80;

/// Sector size used by [`Image`] for fault-injection ranges and capacity reports.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of this crate; each carries the context (path, offset, length) a user needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image path does not exist and no size was given to create it.
    #[error("{path} does not exist; give a size to create it")]
    Missing {
        /// The image path.
        path: PathBuf,
    },
    /// Creating a missing image file failed.
    #[error("creating {path} ({size} bytes): {source}")]
    Create {
        /// The image path.
        path: PathBuf,
        /// The requested size in bytes.
        size: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Opening the image failed.
    #[error("opening {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    UnsupportedFileType {
        /// The image path.
        path: PathBuf,
    },
    /// Reading the size of the image failed.
    #[error("reading the size of {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A size string (`--size`, `null:SIZE`) could not be parsed.
    #[error("invalid size {0:?} (expected bytes with an optional K, M, G or T suffix)")]
    ParseSize(String),
    /// A cache mode string could not be parsed.
    #[error("invalid cache mode {0:?} (expected none, writeback or dontcache)")]
    ParseCacheMode(String),
    /// An engine kind string could not be parsed.
    #[error("invalid I/O engine {0:?} (expected io-uring or sync)")]
    ParseEngineKind(String),
    /// `fdatasync` failed.
    #[error("flushing {path}: {source}")]
    Flush {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Discarding a range failed.
    #[error("discarding {len} bytes at offset {offset} of {path}: {source}")]
    Discard {
        /// The image path.
        path: PathBuf,
        /// Byte offset of the range.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Zeroing a range failed.
    #[error("writing zeroes to {len} bytes at offset {offset} of {path}: {source}")]
    WriteZeroes {
        /// The image path.
        path: PathBuf,
        /// Byte offset of the range.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing back or evicting a range from the host page cache failed.
    #[error("writing back and evicting {len} bytes at offset {offset} of {path}: {source}")]
    Evict {
        /// The image path.
        path: PathBuf,
        /// Byte offset of the range.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Counting the resident pages of an image failed.
    #[error("counting page-cache residency of {path}: {source}")]
    Residency {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Setting up an io_uring failed (old kernel, seccomp, `io_uring_disabled` sysctl, ...).
    #[error("setting up an io_uring of {entries} entries: {source}")]
    RingSetup {
        /// Requested submission queue entries.
        entries: u32,
        /// The underlying error.
        source: io::Error,
    },
    /// Restricting an io_uring to the engine's operations, or enabling it, failed.
    #[error("restricting the io_uring to the engine's operations: {source}")]
    RingRestrict {
        /// The underlying error.
        source: io::Error,
    },
    /// Creating or registering the completion eventfd failed.
    #[error("setting up the completion eventfd: {source}")]
    EventFd {
        /// The underlying error.
        source: io::Error,
    },
    /// An `rbd:` image spec is malformed.
    #[error("invalid RBD image spec {spec:?}: {reason}")]
    RbdSpec {
        /// The spec as given (shortened when long).
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An `rbd:` image was asked of a build without the `rbd` feature.
    #[error("{spec}: this build has no RBD support (built without the rbd feature)")]
    RbdUnsupported {
        /// The spec.
        spec: String,
    },
    /// A cache mode that has no meaning for RBD images.
    #[error("{spec}: --cache {cache} has no meaning for RBD images (librbd has no page-cache drop-behind); use none (rbd_cache=false) or writeback (rbd_cache=true)")]
    RbdCache {
        /// The spec.
        spec: String,
        /// The refused cache mode.
        cache: CacheMode,
    },
    /// Connecting to the cluster, opening or flushing an RBD image failed.
    #[cfg(feature = "rbd")]
    #[error("{context}: {source}")]
    Rbd {
        /// What was being done.
        context: String,
        /// The librbd error, which names the cluster, pool or image (boxed: it is large, and
        /// every `Result` of this crate would carry its size).
        source: Box<::rbd::Error>,
    },
    /// `io_uring_enter` failed for a reason other than a full ring.
    #[error("submitting to the io_uring of {path}: {source}")]
    Submit {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// How image I/O uses the host page cache (`--cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `O_DIRECT`: no host page cache.
    None,
    /// Buffered I/O: fast, but a guest can fill host memory with its data.
    #[default]
    Writeback,
    /// Buffered with drop-behind: `RWF_DONTCACHE` where supported, else buffered I/O followed by
    /// [`Image::writeback_and_evict`] in the deferred worker.
    DontCache,
}

impl FromStr for CacheMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            "dontcache" => Ok(CacheMode::DontCache),
            _ => Err(Error::ParseCacheMode(s.to_owned())),
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::DontCache => "dontcache",
        })
    }
}

/// Which [`Engine`] a queue thread runs (`--io-engine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// One io_uring per queue thread.
    #[default]
    IoUring,
    /// Blocking `preadv2`/`pwritev2` on the queue thread, for hosts without io_uring.
    Sync,
    /// librbd's asynchronous API: always used for `rbd:` images, never for files.
    Rbd,
}

impl FromStr for EngineKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "io-uring" | "io_uring" => Ok(EngineKind::IoUring),
            "sync" => Ok(EngineKind::Sync),
            _ => Err(Error::ParseEngineKind(s.to_owned())),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io-uring",
            EngineKind::Sync => "sync",
            EngineKind::Rbd => "rbd",
        })
    }
}

/// One request for an [`Engine`]. Offsets and lengths are in bytes.
///
/// `Read` and `Write` own their buffers: the engine keeps them, and the memory their guard keeps
/// mapped, until it hands them back in the request's [`Completion`].
#[derive(Debug)]
pub enum Op {
    /// Read into `bufs` from `offset`.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Where the data goes.
        bufs: IoBuffers,
    },
    /// Write `bufs` at `offset`.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// The data.
        bufs: IoBuffers,
    },
    /// `fdatasync` the image.
    Flush,
    /// Deallocate a range (advisory: unsupported file systems report success).
    Discard {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read back as zeroes, deallocating it when `unmap` allows.
    WriteZeroes {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Whether the range may be deallocated.
        unmap: bool,
    },
}

impl Op {
    /// The buffers of a `Read` or `Write`; `None` for the other operations.
    pub fn into_buffers(self) -> Option<IoBuffers> {
        match self {
            Op::Read { bufs, .. } | Op::Write { bufs, .. } => Some(bufs),
            _ => None,
        }
    }
}

/// A finished request, handed to the callback of [`Engine::reap`].
#[derive(Debug)]
pub struct Completion {
    /// The `user_data` given to [`Engine::submit`].
    pub user_data: u64,
    /// Bytes transferred for `Read` and `Write` (always the full length on success); 0 for the
    /// other operations. An error is this request's alone: the engine keeps serving.
    pub result: std::result::Result<u32, io::Error>,
    /// The buffers of a `Read` or `Write`, handed back: the engine and the kernel are done with
    /// them. `None` for the other operations.
    pub bufs: Option<IoBuffers>,
    /// Whether the kernel moved the data through the engine's registered buffers
    /// (`READ_FIXED`/`WRITE_FIXED`, see [`EngineOptions::fixed_buffers`]) rather than pinning
    /// the request's pages for it alone.
    pub fixed_buffers: bool,
}

/// [`Engine::submit`] could not take a request; its buffers come back with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SubmitError {
    /// Why: the engine failed (the ring could not be entered), not the request.
    pub error: Error,
    /// The request's buffers, untouched by the kernel.
    pub bufs: Option<IoBuffers>,
}

/// An I/O engine: one per queue thread, never shared.
///
/// The engine owns the buffers of every request it holds: it drops them (and their guard) only
/// after the kernel is done with them, when it hands them back at completion, and its drop waits
/// for the kernel too.
pub trait Engine: Send {
    /// Queue `op`; it may execute at once (the sync engine does, and io_uring's does for buffered
    /// writes and null images). When the submission ring is full, what is queued is submitted
    /// first to make room: a request is never dropped.
    ///
    /// A request finished within `submit` or [`Engine::commit`] is reported by the next reap, and
    /// by [`Engine::has_completions`] at once, but the completion fd need not be signalled for
    /// it: the caller reaps after its pass of submissions, before it sleeps on the fd. Signalling
    /// it would cost an eventfd write and a read per request, on a path whose whole round trip
    /// at iodepth 1 takes a few tens of microseconds.
    ///
    /// An error concerns the engine (the ring could not be entered), not the request, and gives
    /// the request's buffers back; a request's own failure is reported in its [`Completion`].
    fn submit(&mut self, op: Op, user_data: u64) -> std::result::Result<(), SubmitError>;

    /// Push everything queued to the kernel: one `io_uring_enter` per pass of the queue thread.
    fn commit(&mut self) -> Result<()>;

    /// An eventfd that becomes readable when completions are ready; register it in the queue
    /// thread's epoll loop.
    fn completion_fd(&self) -> std::os::unix::io::RawFd;

    /// Clear the eventfd and call `f` once for each finished request: what the caller does when
    /// the eventfd woke it.
    ///
    /// Short transfers are finished before they are reported; reads past the end of a file
    /// complete with zeroes.
    fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> Result<()>;

    /// [`Engine::reap`], but leaving the eventfd as it is: what a caller that was not woken by it
    /// does (right after submitting, or when polling found completions), sparing a read of the
    /// eventfd per pass. A signal left on the eventfd for completions reported here wakes the
    /// caller's epoll loop once more, where [`Engine::reap`] clears it.
    fn reap_polled(&mut self, f: &mut dyn FnMut(Completion)) -> Result<()> {
        self.reap(f)
    }

    /// Whether [`Engine::reap`] would find a finished request now. A memory read, no system
    /// call: what a polling queue thread checks between passes.
    fn has_completions(&mut self) -> bool;

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Which kind of engine this is.
    fn kind(&self) -> EngineKind;

    /// The memory requests' buffers point into changed: `regions` are its host address ranges
    /// (the whole of guest memory), kept mapped for as long as `guard` lives. An engine made
    /// with [`EngineOptions::fixed_buffers`] registers them with the kernel (replacing what it
    /// registered before, once no request in flight uses that) and holds `guard` meanwhile; the
    /// others ignore it. A registration the kernel refuses leaves requests unregistered.
    fn set_memory(&mut self, regions: &[libc::iovec], guard: &MemoryGuard) {
        let _ = (regions, guard);
    }
}

/// How an engine is set up beyond its kind and queue depth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// io_uring only: register the memory given to [`Engine::set_memory`] as the ring's fixed
    /// buffers, and move the data of a request whose buffer is one segment inside it with
    /// `READ_FIXED`/`WRITE_FIXED`, sparing the kernel the pinning of its pages per request. The
    /// price: all that memory stays pinned (allocated, resident, and counted against
    /// `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`) while it is registered.
    pub fixed_buffers: bool,
    /// The queue thread's number in its device: an RBD image open on several cluster
    /// connections reads through connection `worker` mod their number.
    pub worker: usize,
}

/// Create the engine of one queue thread over `image`.
///
/// `queue_depth` is the number of requests the thread keeps in flight (the virtqueue size);
/// the engine preallocates for that many and allocates only if more are submitted.
pub fn new_engine(
    kind: EngineKind,
    image: Arc<Image>,
    queue_depth: u32,
) -> Result<Box<dyn Engine>> {
    new_engine_with(kind, image, queue_depth, EngineOptions::default())
}

/// [`new_engine`] with `options`.
pub fn new_engine_with(
    kind: EngineKind,
    image: Arc<Image>,
    queue_depth: u32,
    options: EngineOptions,
) -> Result<Box<dyn Engine>> {
    // An RBD image has one engine, whatever was asked; a file never gets it.
    #[cfg(feature = "rbd")]
    if let Some(rbd) = image.rbd_image() {
        let reader = image.rbd_reader(options.worker).cloned();
        return Ok(Box::new(RbdEngine::with_reader(
            rbd.clone(),
            reader,
            queue_depth,
        )?));
    }
    Ok(match kind {
        EngineKind::IoUring | EngineKind::Rbd => {
            Box::new(UringEngine::with_options(image, queue_depth, options)?)
        }
        EngineKind::Sync => Box::new(SyncEngine::new(image, queue_depth)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_mode_parses_and_displays() {
        for (s, m) in [
            ("none", CacheMode::None),
            ("writeback", CacheMode::Writeback),
            ("dontcache", CacheMode::DontCache),
        ] {
            assert_eq!(s.parse::<CacheMode>().unwrap(), m);
            assert_eq!(m.to_string(), s);
        }
        assert!("direct".parse::<CacheMode>().is_err());
    }

    #[test]
    fn image_is_shared_and_engines_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Image>();
        send::<Box<dyn Engine>>();
        send::<UringEngine>();
        send::<SyncEngine>();
    }

    #[test]
    fn engine_kind_parses_both_spellings() {
        assert_eq!(
            "io-uring".parse::<EngineKind>().unwrap(),
            EngineKind::IoUring
        );
        assert_eq!(
            "io_uring".parse::<EngineKind>().unwrap(),
            EngineKind::IoUring
        );
        assert_eq!("sync".parse::<EngineKind>().unwrap(), EngineKind::Sync);
        assert_eq!(EngineKind::IoUring.to_string(), "io-uring");
        assert!("aio".parse::<EngineKind>().is_err());
    }
}
