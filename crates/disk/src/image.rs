//! The disk image: a regular file, a block device, a null image, or a Ceph RBD image; its cache
//! mode, and the synchronous operations on it.
//!
//! An RBD image (`rbd:POOL/IMAGE`) is one more kind of backing rather than a type of its own, so
//! that the device, the deferred path and the stats keep using one `Arc<Image>`: it has no file
//! descriptor (like a null image), its capacity comes from librbd, [`Image::flush`] is
//! `rbd_flush`, and page-cache eviction has nothing to do. Its I/O goes through the RBD engine,
//! which [`crate::new_engine`] picks for it.
//!
//! An [`Image`] is opened once by the backend and shared as `Arc<Image>`: each queue thread's
//! engine submits I/O against its file descriptor, and the deferred workers call
//! [`Image::flush`] and [`Image::writeback_and_evict`] over the merged ranges of a batch. The
//! engines also fall back here, synchronously, to finish what the kernel left short (partial
//! transfers, reads past the end of a file, unaligned buffers under `O_DIRECT`, file systems
//! without `FALLOC_FL_ZERO_RANGE`).
//!
//! `RWF_DONTCACHE` is probed once at open with a small `preadv2` of the first block: the flags
//! are checked before any data moves, so the answer is valid for empty and read-only files too.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{debug, info, warn};

use crate::rbd_image::{RbdOptions, RbdSpec};
use crate::{iov, sys, CacheMode, Error, Op, Result, RWF_DONTCACHE};

/// Path prefix of a null image (`null:1G`): I/O completes without touching anything.
const NULL_PREFIX: &str = "null";

/// Most iovecs one `preadv2`/`pwritev2` accepts (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Size of the static zero buffer used when zeroes must be written out.
const ZERO_CHUNK: usize = 64 * 1024;

/// How many times [`ZERO_CHUNK`] one zero-writing `pwritev` repeats.
const ZERO_IOVS: usize = 16;

/// Page-aligned zeroes, for writing zeroes under `O_DIRECT` without allocating.
#[repr(C, align(4096))]
struct Zeroes([u8; ZERO_CHUNK]);

static ZEROES: Zeroes = Zeroes([0; ZERO_CHUNK]);

/// What to open, and how (`--blk-file`, `--read-only`, `--cache`, `--size`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// A regular file, a block device, or `null:SIZE` (`null` alone takes `size`).
    pub path: PathBuf,
    /// Open read-only: writes, discards and write-zeroes then fail with `EBADF`.
    pub read_only: bool,
    /// How I/O uses the host page cache.
    pub cache: CacheMode,
    /// Create a sparse regular file of this many bytes when `path` is missing. When the image
    /// exists with another size, the image is kept as it is and a warning is logged.
    pub size: Option<u64>,
}

impl ImageOptions {
    /// Options for `path`, read-write, `writeback`, no size.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ImageOptions {
            path: path.into(),
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    File,
    BlockDevice,
    Null,
    Rbd,
}

/// How the pages that image I/O brings into the host page cache leave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionPath {
    /// A null image: nothing is read or written.
    Null,
    /// `--cache none`: `O_DIRECT` keeps data out of the page cache.
    Direct,
    /// `--cache writeback`: pages stay until the kernel reclaims them, or the page-cache budget
    /// calls [`Image::writeback_and_evict`].
    PageCache,
    /// `--cache dontcache` with `RWF_DONTCACHE`: the kernel drops pages once written back.
    RwfDontCache,
    /// `--cache dontcache` without `RWF_DONTCACHE`: buffered I/O, then
    /// [`Image::writeback_and_evict`] (`sync_file_range` + `POSIX_FADV_DONTNEED`).
    WritebackAndEvict,
    /// An RBD image: no host page cache is involved (librbd's own cache, if on, is bounded by
    /// its `rbd_cache_size`).
    Librbd,
}

impl fmt::Display for EvictionPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EvictionPath::Null => "null",
            EvictionPath::Direct => "o-direct",
            EvictionPath::PageCache => "page-cache",
            EvictionPath::RwfDontCache => "rwf-dontcache",
            EvictionPath::WritebackAndEvict => "sync-file-range+fadvise",
            EvictionPath::Librbd => "librbd",
        })
    }
}

/// An open disk image, shared as `Arc<Image>` by the queue threads and deferred workers.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    backing: Backing,
    /// The image's descriptor (`O_DIRECT` under [`CacheMode::None`]); `None` for a null image.
    file: Option<File>,
    /// A second, buffered descriptor under [`CacheMode::None`] for I/O that does not meet the
    /// direct-I/O alignment (firmware and boot loaders issue such requests).
    buffered: Option<File>,
    capacity: u64,
    read_only: bool,
    cache: CacheMode,
    logical_block_size: u32,
    dio_mem_align: u32,
    dio_offset_align: u32,
    dontcache_supported: bool,
    /// Whether `RWF_DONTCACHE` is used: supported, and neither refused at run time nor turned
    /// off with [`Image::force_dontcache_fallback`].
    dontcache_on: AtomicBool,
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::FaultInjector,
    /// The open RBD image, for an `rbd:` spec.
    #[cfg(feature = "rbd")]
    rbd: Option<std::sync::Arc<::rbd::Image>>,
    /// Read-only handles on the same RBD image, each on a cluster connection of its own (see
    /// [`Image::rbd_reader`]).
    #[cfg(feature = "rbd")]
    rbd_readers: Vec<std::sync::Arc<::rbd::Image>>,
}

impl Image {
    /// Open (or create) the image that `opts` describes.
    ///
    /// - `null:SIZE` (or `null` with `opts.size`): a null image of that capacity. Reads succeed
    ///   and leave the buffers untouched; writes and everything else succeed at once.
    /// - A missing path is created as a sparse regular file of `opts.size` bytes; without a size
    ///   it is an error.
    /// - A block device's capacity comes from `BLKGETSIZE64`.
    /// - `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]`: see [`Image::open_with`].
    pub fn open(opts: &ImageOptions) -> Result<Image> {
        Self::open_with(opts, &RbdOptions::default())
    }

    /// As [`Image::open`], with the connection settings of `rbd:` images that the spec does not
    /// carry. An RBD image is connected to and opened within the timeout (10 s by default);
    /// `@SNAP` or `opts.read_only` open it read-only; `opts.size` is ignored (the image has its
    /// size); [`CacheMode::None`] turns librbd's cache off (`rbd_cache=false`),
    /// [`CacheMode::Writeback`] on, and [`CacheMode::DontCache`] is refused.
    pub fn open_with(opts: &ImageOptions, rbd_opts: &RbdOptions) -> Result<Image> {
        if let Some(spec) = opts.path.to_str().filter(|p| RbdSpec::is_rbd(p)) {
            return Self::open_rbd(opts, spec, rbd_opts);
        }
        if let Some(spec) = null_spec(&opts.path) {
            return Self::open_null(opts, spec);
        }
        let path = opts.path.clone();
        let missing = match std::fs::metadata(&path) {
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(source) => return Err(Error::Open { path, source }),
        };
        if missing {
            let size = opts
                .size
                .ok_or_else(|| Error::Missing { path: path.clone() })?;
            create_sparse(&path, size)?;
        }

        let file = open_fd(&path, opts.read_only, opts.cache == CacheMode::None)?;
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        let backing = if ft.is_block_device() {
            Backing::BlockDevice
        } else if ft.is_file() {
            Backing::File
        } else {
            return Err(Error::UnsupportedFileType { path });
        };
        let fd = file.as_raw_fd();
        let (capacity, logical_block_size) = match backing {
            Backing::BlockDevice => {
                let size = sys::blk_size(fd).map_err(|source| Error::Size {
                    path: path.clone(),
                    source,
                })?;
                let lbs = sys::blk_logical_block_size(fd).unwrap_or(512);
                (size, lbs)
            }
            _ => (meta.len(), 512),
        };
        if let Some(size) = opts.size.filter(|&s| s != capacity) {
            warn!(
                "{}: exists with {capacity} bytes; keeping it and ignoring the requested size \
                 of {size} bytes",
                path.display()
            );
        }

        let (buffered, (dio_mem_align, dio_offset_align)) = if opts.cache == CacheMode::None {
            let align = sys::dio_alignment(fd).unwrap_or(match backing {
                Backing::BlockDevice => (logical_block_size, logical_block_size),
                _ => (512, 512),
            });
            (Some(open_fd(&path, opts.read_only, false)?), align)
        } else {
            (None, (1, 1))
        };

        let probe_fd = buffered.as_ref().unwrap_or(&file).as_raw_fd();
        let dontcache_supported = probe_dontcache(probe_fd, &path);

        let image = Image {
            path,
            backing,
            file: Some(file),
            buffered,
            capacity,
            read_only: opts.read_only,
            cache: opts.cache,
            logical_block_size,
            dio_mem_align,
            dio_offset_align,
            dontcache_supported,
            dontcache_on: AtomicBool::new(dontcache_supported),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::FaultInjector::from_env(),
            #[cfg(feature = "rbd")]
            rbd: None,
            #[cfg(feature = "rbd")]
            rbd_readers: Vec::new(),
        };
        image.log_opened();
        Ok(image)
    }

    fn open_null(opts: &ImageOptions, spec: &str) -> Result<Image> {
        let capacity = if spec.is_empty() {
            opts.size.ok_or_else(|| Error::Missing {
                path: opts.path.clone(),
            })?
        } else {
            parse_size(spec)?
        };
        let image = Image {
            path: opts.path.clone(),
            backing: Backing::Null,
            file: None,
            buffered: None,
            capacity,
            read_only: opts.read_only,
            cache: opts.cache,
            logical_block_size: 512,
            dio_mem_align: 1,
            dio_offset_align: 1,
            dontcache_supported: false,
            dontcache_on: AtomicBool::new(false),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::FaultInjector::from_env(),
            #[cfg(feature = "rbd")]
            rbd: None,
            #[cfg(feature = "rbd")]
            rbd_readers: Vec::new(),
        };
        image.log_opened();
        Ok(image)
    }

    fn open_rbd(opts: &ImageOptions, spec_str: &str, rbd_opts: &RbdOptions) -> Result<Image> {
        let spec = RbdSpec::parse(spec_str)?;
        if opts.cache == CacheMode::DontCache {
            return Err(Error::RbdCache {
                spec: spec.to_string(),
                cache: opts.cache,
            });
        }
        #[cfg(not(feature = "rbd"))]
        {
            let _ = rbd_opts;
            Err(Error::RbdUnsupported {
                spec: spec.to_string(),
            })
        }
        #[cfg(feature = "rbd")]
        {
            let cluster = ::rbd::ClusterOptions {
                conf: spec.conf.clone().or_else(|| rbd_opts.ceph_conf.clone()),
                id: spec.id.clone(),
                timeout: rbd_opts.timeout.unwrap_or(::rbd::DEFAULT_CONNECT_TIMEOUT),
                settings: vec![(
                    "rbd_cache".into(),
                    (opts.cache == CacheMode::Writeback).to_string(),
                )],
            };
            let rbd_spec = ::rbd::ImageSpec {
                pool: spec.pool.clone(),
                image: spec.image.clone(),
                snap: spec.snap.clone(),
            };
            let rbd =
                ::rbd::Image::open(&cluster, &rbd_spec, opts.read_only).map_err(|source| {
                    Error::Rbd {
                        context: format!("opening {spec}"),
                        source: Box::new(source),
                    }
                })?;
            let connections = rbd_connections(&spec, opts, rbd_opts, &rbd);
            let rbd_readers = open_readers(&rbd, connections - 1).map_err(|source| Error::Rbd {
                context: format!("opening {spec} again on a connection of its own"),
                source: Box::new(source),
            })?;
            if connections > 1 {
                info!(
                    "{spec}: {connections} cluster connections: queue thread i reads through \
                     connection i mod {connections}; every write, flush and discard goes \
                     through the first"
                );
            }
            if opts.size.is_some_and(|s| s != rbd.size()) {
                warn!(
                    "{spec}: the image has {} bytes; ignoring the requested size",
                    rbd.size()
                );
            }
            let image = Image {
                path: PathBuf::from(spec_str),
                backing: Backing::Rbd,
                file: None,
                buffered: None,
                capacity: rbd.size(),
                read_only: rbd.read_only(),
                cache: opts.cache,
                logical_block_size: 512,
                dio_mem_align: 1,
                dio_offset_align: 1,
                dontcache_supported: false,
                dontcache_on: AtomicBool::new(false),
                #[cfg(feature = "fault-injection")]
                faults: crate::fault::FaultInjector::from_env(),
                rbd: Some(std::sync::Arc::new(rbd)),
                rbd_readers,
            };
            image.log_opened();
            Ok(image)
        }
    }

    fn log_opened(&self) {
        let what = match self.backing {
            Backing::File => "regular file",
            Backing::BlockDevice => "block device",
            Backing::Null => "null image",
            Backing::Rbd => "RBD image",
        };
        info!(
            "{}: {what} of {} bytes{}, cache={}, eviction path {} (RWF_DONTCACHE {})",
            self.path.display(),
            self.capacity,
            if self.read_only { ", read-only" } else { "" },
            self.cache,
            self.eviction_path(),
            if self.dontcache_supported {
                "supported"
            } else {
                "not supported"
            },
        );
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.backing == Backing::BlockDevice
    }

    /// Whether the image is a null image.
    pub fn is_null(&self) -> bool {
        self.backing == Backing::Null
    }

    /// Before the process exits with the image still shared: an RBD image writes back librbd's
    /// cache and is closed, releasing its exclusive lock for the next owner at once (requests
    /// submitted after this fail with `ESHUTDOWN`); nothing to do for the other kinds (the
    /// kernel closes their descriptors).
    pub fn close_before_exit(&self) -> Result<()> {
        #[cfg(feature = "rbd")]
        if let Some(rbd) = &self.rbd {
            for reader in &self.rbd_readers {
                // Read-only: nothing to write back, no lock to hand over; a failure to close
                // one only costs its connection until the process exits.
                if let Err(e) = reader.close() {
                    warn!("{}: closing a read connection: {e}", self.path.display());
                }
            }
            return rbd.close().map_err(|source| Error::Flush {
                path: self.path.clone(),
                source: io::Error::other(source),
            });
        }
        Ok(())
    }

    /// Whether the image is a Ceph RBD image (`rbd:`).
    pub fn is_rbd(&self) -> bool {
        self.backing == Backing::Rbd
    }

    /// The open RBD image, for the RBD engine.
    #[cfg(feature = "rbd")]
    pub fn rbd_image(&self) -> Option<&std::sync::Arc<::rbd::Image>> {
        self.rbd.as_ref()
    }

    /// The handle that queue thread `worker` reads an RBD image through: `None` for the
    /// main handle (the one every write goes through), else one of the read-only handles,
    /// thread `worker` taking connection `worker` mod the number of connections.
    #[cfg(feature = "rbd")]
    pub fn rbd_reader(&self, worker: usize) -> Option<&std::sync::Arc<::rbd::Image>> {
        match worker % (self.rbd_readers.len() + 1) {
            0 => None,
            c => self.rbd_readers.get(c - 1),
        }
    }

    /// Cluster connections open for an RBD image (0 for other images).
    pub fn rbd_connections(&self) -> usize {
        #[cfg(feature = "rbd")]
        if self.rbd.is_some() {
            return self.rbd_readers.len() + 1;
        }
        0
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The cache mode the image was opened with.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// Whether the image's file system accepts `RWF_DONTCACHE` (probed once at open).
    pub fn dontcache_supported(&self) -> bool {
        self.dontcache_supported
    }

    /// Whether `dontcache` I/O currently carries `RWF_DONTCACHE`: the cache mode is
    /// [`CacheMode::DontCache`], the probe succeeded, and the flag was neither refused at run
    /// time nor turned off with [`Image::force_dontcache_fallback`].
    pub fn dontcache_active(&self) -> bool {
        self.cache == CacheMode::DontCache && self.dontcache_on.load(Ordering::Relaxed)
    }

    /// Stop using `RWF_DONTCACHE`, so that `dontcache` relies on [`Image::writeback_and_evict`]
    /// alone (to test and measure the fallback on a file system that has the flag).
    pub fn force_dontcache_fallback(&self) {
        if self.dontcache_on.swap(false, Ordering::Relaxed) {
            info!(
                "{}: RWF_DONTCACHE turned off; eviction path {}",
                self.path.display(),
                self.eviction_path()
            );
        }
    }

    /// How pages this image's I/O brings into the host page cache leave it.
    pub fn eviction_path(&self) -> EvictionPath {
        match (self.backing, self.cache) {
            (Backing::Null, _) => EvictionPath::Null,
            (Backing::Rbd, _) => EvictionPath::Librbd,
            (_, CacheMode::None) => EvictionPath::Direct,
            (_, CacheMode::Writeback) => EvictionPath::PageCache,
            (_, CacheMode::DontCache) if self.dontcache_active() => EvictionPath::RwfDontCache,
            (_, CacheMode::DontCache) => EvictionPath::WritebackAndEvict,
        }
    }

    /// The block device's logical block size; 512 for regular files and null images.
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Direct-I/O alignment `(memory, file offset and length)` under [`CacheMode::None`]
    /// (`statx(STATX_DIOALIGN)`); `(1, 1)` otherwise. Requests that do not meet it are served
    /// through a buffered descriptor instead of failing.
    pub fn direct_io_alignment(&self) -> (u32, u32) {
        (self.dio_mem_align, self.dio_offset_align)
    }

    /// The image's file descriptor; -1 for a null image.
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// `fdatasync` the image (FLUSH); `rbd_flush` an RBD image. A no-op on a null image.
    pub fn flush(&self) -> Result<()> {
        self.flush_io().map_err(|source| Error::Flush {
            path: self.path.clone(),
            source,
        })
    }

    /// Deallocate a range (DISCARD): `fallocate(PUNCH_HOLE | KEEP_SIZE)` on a file,
    /// `BLKDISCARD` on a block device. A file system without hole punching is not an error:
    /// discard is advisory.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_io(offset, len)
            .map_err(|source| Error::Discard {
                path: self.path.clone(),
                offset,
                len,
                source,
            })
    }

    /// Make a range read back as zeroes (WRITE_ZEROES): `fallocate(ZERO_RANGE)`, or
    /// `fallocate(PUNCH_HOLE)` when `unmap` allows deallocating, on a file (writing zeroes out
    /// where the file system has neither); `BLKZEROOUT` on a block device.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.write_zeroes_io(offset, len, unmap)
            .map_err(|source| Error::WriteZeroes {
                path: self.path.clone(),
                offset,
                len,
                source,
            })
    }

    /// Write a range back and evict it from the host page cache:
    /// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`, then `POSIX_FADV_DONTNEED`.
    /// `len == 0` means to the end of the image. The deferred worker calls this over the merged
    /// ranges of a batch for `dontcache` writes and for the page-cache budget.
    pub fn writeback_and_evict(&self, offset: u64, len: u64) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let fd = file.as_raw_fd();
        sys::sync_file_range_wait(fd, offset, len)
            .and_then(|()| sys::fadvise_dontneed(fd, offset, len))
            .map_err(|source| Error::Evict {
                path: self.path.clone(),
                offset,
                len,
                source,
            })
    }

    /// Bytes of the image resident in the host page cache (`mincore` over mappings of the
    /// image, 1 GiB at a time), at page granularity. 0 for a null image.
    pub fn resident_bytes(&self) -> Result<u64> {
        self.resident_bytes_in(0, self.capacity)
    }

    /// Bytes of `[offset, offset + len)` resident in the host page cache, at page granularity.
    pub fn resident_bytes_in(&self, offset: u64, len: u64) -> Result<u64> {
        let Some(file) = &self.file else {
            return Ok(0);
        };
        resident_in(file.as_raw_fd(), self.capacity, offset, len).map_err(|source| {
            Error::Residency {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Fail I/O touching sectors `range` (512-byte sectors, end exclusive) with `EIO`, or stop
    /// failing with `None`. The `DISK_FAIL_SECTORS=START-END` environment variable sets the same
    /// at open.
    #[cfg(feature = "fault-injection")]
    pub fn set_fail_sectors(&self, range: Option<std::ops::Range<u64>>) {
        self.faults.set(range);
    }

    // ---- for the engines ------------------------------------------------------------------

    /// The `rw_flags` for a read or write now.
    pub(crate) fn rw_flags(&self) -> i32 {
        if self.dontcache_active() {
            RWF_DONTCACHE
        } else {
            0
        }
    }

    /// Whether data I/O goes through `O_DIRECT`.
    pub(crate) fn is_direct(&self) -> bool {
        self.buffered.is_some()
    }

    /// Whether `iov` at `offset` can go through the `O_DIRECT` descriptor.
    pub(crate) fn dio_aligned(&self, iov: &[libc::iovec], offset: u64) -> bool {
        !self.is_direct()
            || iov::dio_aligned(iov, 0, offset, self.dio_mem_align, self.dio_offset_align)
    }

    /// `RWF_DONTCACHE` was refused at run time: stop using it.
    pub(crate) fn dontcache_refused(&self) {
        if self.dontcache_on.swap(false, Ordering::Relaxed) {
            warn!(
                "{}: RWF_DONTCACHE refused at run time; eviction path now {}",
                self.path.display(),
                self.eviction_path()
            );
        }
    }

    /// Waits out the injected delay of a read run off the queue thread (nothing without fault
    /// injection).
    #[inline]
    pub(crate) fn delay_offloaded_read(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(d) = self.faults.read_delay() {
            std::thread::sleep(d);
        }
    }

    /// `EIO` when fault injection covers `[offset, offset + len)`.
    #[inline]
    pub(crate) fn check_fault(&self, _offset: u64, _len: u64) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        if self.faults.hits(_offset, _len) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// Run `op` to the end on the calling thread. The buffers of a read or write are `op`'s, and
    /// their guard keeps them mapped, for the whole call.
    pub(crate) fn execute(&self, op: &Op) -> io::Result<u32> {
        match op {
            Op::Read { offset, bufs } | Op::Write { offset, bufs } => {
                let write = matches!(op, Op::Write { .. });
                let iov = bufs.iovecs();
                let len = iov::total_len(iov)?;
                self.check_fault(*offset, len.into())?;
                // SAFETY: `IoBuffers::new` promised the buffers valid while their guard lives,
                // and `op` holds the guard across the call.
                unsafe { self.rw_sync(write, iov, *offset, 0, self.rw_flags()) }
            }
            Op::Flush => self.flush_io().map(|()| 0),
            Op::Discard { offset, len } => self.discard_io(*offset, *len).map(|()| 0),
            Op::WriteZeroes { offset, len, unmap } => {
                self.write_zeroes_io(*offset, *len, *unmap).map(|()| 0)
            }
        }
    }

    /// Move the bytes of `iov` after the first `done` to or from the image at `offset`,
    /// synchronously and to the end: short transfers are continued, a read that meets the end of
    /// the file fills the rest with zeroes, a buffer that `O_DIRECT` refuses is moved through the
    /// buffered descriptor. Returns the total length of `iov`.
    ///
    /// # Safety
    ///
    /// Every buffer of `iov` must be valid (writable for a read) and not accessed by anyone else
    /// for the duration of the call.
    pub(crate) unsafe fn rw_sync(
        &self,
        write: bool,
        iov: &[libc::iovec],
        offset: u64,
        mut done: usize,
        mut flags: i32,
    ) -> io::Result<u32> {
        let total = iov::total_len(iov)?;
        if self.backing == Backing::Rbd {
            // RBD data moves through the RBD engine only.
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let Some(file) = &self.file else {
            if write && self.read_only {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            return Ok(total);
        };
        let total_usize = total as usize;
        let mut force_buffered = false;
        while done < total_usize {
            let fd = match &self.buffered {
                Some(b)
                    if force_buffered
                        || !iov::dio_aligned(
                            iov,
                            done,
                            offset,
                            self.dio_mem_align,
                            self.dio_offset_align,
                        ) =>
                {
                    b.as_raw_fd()
                }
                _ => file.as_raw_fd(),
            };
            let direct = self.buffered.is_some() && fd == file.as_raw_fd();
            let (idx, within) = iov::locate(iov, done);
            let single;
            let (ptr, cnt) = if within == 0 {
                (iov[idx..].as_ptr(), (iov.len() - idx).min(IOV_MAX))
            } else {
                single = libc::iovec {
                    // SAFETY: `within < iov_len`, so the pointer stays inside the buffer.
                    iov_base: unsafe { iov[idx].iov_base.cast::<u8>().add(within) }.cast(),
                    iov_len: iov[idx].iov_len - within,
                };
                (&single as *const libc::iovec, 1)
            };
            let pos = offset + done as u64;
            let res = if write {
                // SAFETY: `ptr[..cnt]` are iovecs of (a tail of) `iov`, whose buffers the caller
                // guarantees.
                unsafe { sys::pwritev2(fd, ptr, cnt, pos, flags) }
            } else {
                // SAFETY: as above; the buffers are writable.
                unsafe { sys::preadv2(fd, ptr, cnt, pos, flags) }
            };
            match res {
                Ok(0) if !write => {
                    // End of file: the guest reads zeroes past it.
                    // SAFETY: the caller guarantees the buffers writable.
                    unsafe { iov::zero_fill(iov, done) };
                    done = total_usize;
                }
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                Ok(n) => done += n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EINVAL) if direct => {
                        debug!(
                            "{}: O_DIRECT refused {} bytes at {pos}; using the buffered fd",
                            self.path.display(),
                            total_usize - done
                        );
                        force_buffered = true;
                    }
                    Some(libc::EOPNOTSUPP) if flags & RWF_DONTCACHE != 0 => {
                        self.dontcache_refused();
                        flags &= !RWF_DONTCACHE;
                    }
                    _ => return Err(e),
                },
            }
        }
        Ok(total)
    }

    fn flush_io(&self) -> io::Result<()> {
        #[cfg(feature = "rbd")]
        if let Some(rbd) = &self.rbd {
            return rbd.flush().map_err(io::Error::other);
        }
        match &self.file {
            Some(file) => sys::fdatasync(file.as_raw_fd()),
            None => Ok(()),
        }
    }

    pub(crate) fn discard_io(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_fault(offset, len)?;
        let Some(file) = &self.file else {
            return self.null_modify();
        };
        if len == 0 {
            return Ok(());
        }
        let fd = file.as_raw_fd();
        let res = match self.backing {
            Backing::BlockDevice => sys::blk_discard(fd, offset, len),
            _ => sys::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
        };
        match res {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                debug!("{}: discard not supported; ignored", self.path.display());
                Ok(())
            }
            other => other,
        }
    }

    pub(crate) fn write_zeroes_io(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_fault(offset, len)?;
        let Some(file) = &self.file else {
            return self.null_modify();
        };
        if len == 0 {
            return Ok(());
        }
        let fd = file.as_raw_fd();
        if self.backing == Backing::BlockDevice {
            return sys::blk_zeroout(fd, offset, len);
        }
        match sys::fallocate(fd, zeroes_mode(unmap), offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes_by_writing(offset, len)
            }
            other => other,
        }
    }

    /// Write zeroes out, 1 MiB per `pwritev` from a static zero buffer.
    pub(crate) fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk_max = (ZERO_CHUNK * ZERO_IOVS) as u64;
        let mut iovs = [libc::iovec {
            iov_base: ZEROES.0.as_ptr() as *mut libc::c_void,
            iov_len: ZERO_CHUNK,
        }; ZERO_IOVS];
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let chunk = (end - pos).min(chunk_max) as usize;
            let n = chunk.div_ceil(ZERO_CHUNK);
            for (i, v) in iovs.iter_mut().enumerate().take(n) {
                v.iov_len = (chunk - i * ZERO_CHUNK).min(ZERO_CHUNK);
            }
            // SAFETY: a write only reads its buffers, and every iovec points into the static
            // zero buffer with a length within it.
            unsafe { self.rw_sync(true, &iovs[..n], pos, 0, 0) }?;
            pos += chunk as u64;
        }
        Ok(())
    }

    fn null_modify(&self) -> io::Result<()> {
        if self.backing == Backing::Rbd {
            // RBD discards and write-zeroes go through the RBD engine only.
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        } else {
            Ok(())
        }
    }
}

/// The `fallocate` mode of WRITE_ZEROES.
pub(crate) fn zeroes_mode(unmap: bool) -> i32 {
    if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

/// Bytes of the file or block device at `path` resident in the host page cache (`mincore`),
/// without opening it as an [`Image`]: for reports and tests that watch an image from outside.
pub fn resident_bytes_of(path: &Path) -> Result<u64> {
    let err = |source| Error::Residency {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    let size = if meta.file_type().is_block_device() {
        sys::blk_size(file.as_raw_fd()).map_err(err)?
    } else {
        meta.len()
    };
    resident_in(file.as_raw_fd(), size, 0, size).map_err(err)
}

fn resident_in(fd: RawFd, size: u64, offset: u64, len: u64) -> io::Result<u64> {
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return Ok(0);
    }
    let page = sys::page_size();
    let start = offset / page * page;
    let pages = sys::resident_pages(fd, start, end - start)?;
    Ok((pages * page).min(end - offset))
}

/// Parse a size: bytes with an optional binary suffix (`K`, `M`, `G`, `T`, `P`, optionally
/// followed by `iB` or `B`; any case), e.g. `512`, `64K`, `1G`, `2GiB`.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || Error::ParseSize(s.to_owned());
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let num: u64 = num.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_lowercase();
    let unit = suffix
        .strip_suffix("ib")
        .or_else(|| suffix.strip_suffix('b'))
        .unwrap_or(&suffix);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad()),
    };
    if unit.is_empty() && !suffix.is_empty() && suffix != "b" {
        return Err(bad());
    }
    num.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// The size part of a null image path (`null:1G` → `1G`, `null` → empty).
fn null_spec(path: &Path) -> Option<&str> {
    let s = path.to_str()?;
    let rest = s.strip_prefix(NULL_PREFIX)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix(':')
    }
}

fn create_sparse(path: &Path, size: u64) -> Result<()> {
    let err = |source| Error::Create {
        path: path.to_owned(),
        size,
        source,
    };
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
    {
        Ok(f) => {
            f.set_len(size).map_err(err)?;
            info!("{}: created sparse image of {size} bytes", path.display());
            Ok(())
        }
        // Someone created it in between: open what is there.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

fn open_fd(path: &Path, read_only: bool, direct: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })
}

/// Whether `RWF_DONTCACHE` is accepted on `fd`. The kernel checks the flags before it moves any
/// data, so one small read at offset 0 answers for empty files too; `EOPNOTSUPP` (no support in
/// the file system, or a kernel older than 6.14) and `EINVAL` mean no.
fn probe_dontcache(fd: RawFd, path: &Path) -> bool {
    let mut scratch = [0u8; 512];
    let iov = libc::iovec {
        iov_base: scratch.as_mut_ptr().cast(),
        iov_len: scratch.len(),
    };
    // SAFETY: one iovec over `scratch`, which lives across the call and nothing else touches.
    match unsafe { sys::preadv2(fd, &iov, 1, 0, RWF_DONTCACHE) } {
        Ok(_) => true,
        Err(e) => {
            if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
                warn!(
                    "{}: probing RWF_DONTCACHE failed: {e}; assuming unsupported",
                    path.display()
                );
            }
            false
        }
    }
}

/// How many cluster connections to open for the RBD image `rbd`: what was asked
/// ([`RbdOptions::connections`]), or 1 where more would not be safe: with librbd's cache on
/// (the cache is per handle, and a second handle would read around the first's dirty data), or
/// with journaling on a writable image (reads of a handle that does not hold the exclusive lock
/// would not see the journal replayed).
#[cfg(feature = "rbd")]
fn rbd_connections(
    spec: &RbdSpec,
    opts: &ImageOptions,
    rbd_opts: &RbdOptions,
    rbd: &::rbd::Image,
) -> usize {
    let asked = rbd_opts.connections.max(1);
    if asked == 1 {
        return 1;
    }
    let why_not = if opts.cache == CacheMode::Writeback {
        Some("librbd's cache (--cache writeback) is per connection")
    } else if !rbd.read_only() && rbd.features() & ::rbd::FEATURE_JOURNALING != 0 {
        Some("the image has journaling, which only the lock owner's reads see replayed")
    } else {
        None
    };
    match why_not {
        Some(why) => {
            info!("{spec}: one cluster connection for all I/O instead of {asked}: {why}");
            1
        }
        None => asked,
    }
}

/// Open `n` read-only handles on `rbd`'s image, each on a connection of its own, in parallel
/// (each open waits for the monitors and the OSD).
#[cfg(feature = "rbd")]
fn open_readers(
    rbd: &::rbd::Image,
    n: usize,
) -> std::result::Result<Vec<std::sync::Arc<::rbd::Image>>, ::rbd::Error> {
    std::thread::scope(|s| {
        let opening: Vec<_> = (0..n).map(|_| s.spawn(|| rbd.open_reader())).collect();
        opening
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r.map(std::sync::Arc::new),
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::testutil::{fill_pattern, AlignedBuf, TempDir};

    const EXT4_SUPER_MAGIC: i64 = 0xEF53;
    const TMPFS_MAGIC: i64 = 0x0102_1994;

    fn opts(path: &Path, cache: CacheMode, size: Option<u64>) -> ImageOptions {
        ImageOptions {
            path: path.to_owned(),
            read_only: false,
            cache,
            size,
        }
    }

    fn write_at(image: &Image, offset: u64, data: &[u8]) {
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // SAFETY: `data` outlives the call; a write only reads it.
        unsafe { image.rw_sync(true, &iov, offset, 0, image.rw_flags()) }.unwrap();
    }

    fn read_at(image: &Image, offset: u64, buf: &mut [u8]) {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` is exclusively ours for the call.
        unsafe { image.rw_sync(false, &iov, offset, 0, image.rw_flags()) }.unwrap();
    }

    #[test]
    fn parse_size_accepts_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("3mb").unwrap(), 3 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn missing_image_without_size_is_an_error() {
        let dir = TempDir::new();
        let err = Image::open(&opts(&dir.join("none.img"), CacheMode::Writeback, None));
        assert!(matches!(err, Err(Error::Missing { .. })));
    }

    #[test]
    fn missing_image_is_created_sparse() {
        let dir = TempDir::new();
        let path = dir.join("new.img");
        let image = Image::open(&opts(&path, CacheMode::Writeback, Some(64 << 20))).unwrap();
        assert_eq!(image.capacity(), 64 << 20);
        assert!(!image.is_block_device());
        assert!(!image.is_null());
        assert_eq!(image.path(), path);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert_eq!(meta.blocks(), 0, "a new image is sparse");
    }

    #[test]
    fn existing_image_keeps_its_size() {
        let dir = TempDir::new();
        let path = dir.join("old.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let image = Image::open(&opts(&path, CacheMode::Writeback, Some(1 << 20))).unwrap();
        assert_eq!(image.capacity(), 8192);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
    }

    #[test]
    fn directory_is_refused() {
        let dir = TempDir::new();
        let err = Image::open(&opts(dir.path(), CacheMode::Writeback, None));
        assert!(matches!(
            err,
            Err(Error::UnsupportedFileType { .. }) | Err(Error::Open { .. })
        ));
    }

    #[test]
    fn null_image_takes_its_size_from_the_path() {
        let image = Image::open(&ImageOptions::new("null:1G")).unwrap();
        assert!(image.is_null());
        assert_eq!(image.capacity(), 1 << 30);
        assert_eq!(image.as_raw_fd(), -1);
        assert_eq!(image.eviction_path(), EvictionPath::Null);
        image.flush().unwrap();
        image.discard(0, 4096).unwrap();
        image.write_zeroes(0, 4096, true).unwrap();
        image.writeback_and_evict(0, 0).unwrap();
        assert_eq!(image.resident_bytes().unwrap(), 0);

        let sized = Image::open(&ImageOptions {
            size: Some(4096),
            ..ImageOptions::new("null")
        })
        .unwrap();
        assert_eq!(sized.capacity(), 4096);
        assert!(Image::open(&ImageOptions::new("null")).is_err());
    }

    #[test]
    fn read_only_image_refuses_modification() {
        let dir = TempDir::new();
        let path = dir.join("ro.img");
        drop(Image::open(&opts(&path, CacheMode::Writeback, Some(1 << 20))).unwrap());
        let image = Image::open(&ImageOptions {
            read_only: true,
            ..opts(&path, CacheMode::Writeback, None)
        })
        .unwrap();
        assert!(image.read_only());
        assert!(matches!(image.discard(0, 4096), Err(Error::Discard { .. })));
        assert!(matches!(
            image.write_zeroes(0, 4096, false),
            Err(Error::WriteZeroes { .. })
        ));
        let data = [1u8; 512];
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // SAFETY: `data` outlives the call; a write only reads it.
        let err = unsafe { image.rw_sync(true, &iov, 0, 0, 0) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn discard_punches_a_hole() {
        let dir = TempDir::new();
        let path = dir.join("discard.img");
        let image = Image::open(&opts(&path, CacheMode::Writeback, Some(4 << 20))).unwrap();
        let mut data = vec![0u8; 1 << 20];
        fill_pattern(&mut data, 1);
        write_at(&image, 1 << 20, &data);
        image.flush().unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        assert!(before >= 2048, "1 MiB written: {before} blocks");
        image.discard(1 << 20, 1 << 20).unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(after < before / 4, "blocks {before} -> {after}");
        let mut back = vec![1u8; 4096];
        read_at(&image, 1 << 20, &mut back);
        assert!(back.iter().all(|&b| b == 0));
        assert_eq!(image.capacity(), 4 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
    }

    #[test]
    fn write_zeroes_reads_back_zeroes() {
        let dir = TempDir::new();
        let path = dir.join("zeroes.img");
        let image = Image::open(&opts(&path, CacheMode::Writeback, Some(1 << 20))).unwrap();
        for unmap in [false, true] {
            let mut data = vec![0u8; 64 << 10];
            fill_pattern(&mut data, 3);
            write_at(&image, 0, &data);
            image.write_zeroes(4096, 32 << 10, unmap).unwrap();
            let mut back = vec![0u8; 64 << 10];
            read_at(&image, 0, &mut back);
            assert!(back[..4096] == data[..4096]);
            assert!(back[4096..(36 << 10)].iter().all(|&b| b == 0));
            assert!(back[(36 << 10)..] == data[(36 << 10)..]);
        }
    }

    #[test]
    fn writing_zeroes_out_covers_partial_chunks() {
        let dir = TempDir::new();
        let path = dir.join("zero-out.img");
        let image = Image::open(&opts(&path, CacheMode::None, Some(4 << 20))).unwrap();
        let mut data = AlignedBuf::new(3 << 20);
        fill_pattern(data.as_mut(), 9);
        write_at(&image, 0, data.as_ref());
        // 1 MiB + 68 KiB + 512: full pwritevs, then a partial one, through O_DIRECT and (for the
        // unaligned tail) the buffered descriptor.
        let len = (1 << 20) + (68 << 10) + 512;
        image.write_zeroes_by_writing(512, len).unwrap();
        let mut back = AlignedBuf::new(3 << 20);
        read_at(&image, 0, back.as_mut());
        let end = 512 + len as usize;
        assert!(back.as_ref()[..512] == data.as_ref()[..512]);
        assert!(back.as_ref()[512..end].iter().all(|&b| b == 0));
        assert!(back.as_ref()[end..] == data.as_ref()[end..]);
    }

    #[test]
    fn direct_io_serves_aligned_and_unaligned_buffers() {
        let dir = TempDir::new();
        let path = dir.join("direct.img");
        let image = Image::open(&opts(&path, CacheMode::None, Some(1 << 20))).unwrap();
        assert!(image.is_direct());
        assert_eq!(image.eviction_path(), EvictionPath::Direct);
        let (mem, off) = image.direct_io_alignment();
        assert!(mem >= 1 && off >= 1);
        let mut data = AlignedBuf::new(8192);
        fill_pattern(data.as_mut(), 5);
        write_at(&image, 4096, data.as_ref());
        // An unaligned buffer goes through the buffered descriptor.
        let mut odd = vec![0u8; 4097];
        read_at(&image, 4096, &mut odd[1..]);
        assert!(odd[1..] == data.as_ref()[..4096]);
    }

    #[test]
    fn read_past_end_of_file_is_zero_filled() {
        let dir = TempDir::new();
        let path = dir.join("short.img");
        std::fs::write(&path, [9u8; 1000]).unwrap();
        let image = Image::open(&opts(&path, CacheMode::Writeback, None)).unwrap();
        let mut buf = [1u8; 4096];
        read_at(&image, 512, &mut buf);
        assert!(buf[..488].iter().all(|&b| b == 9));
        assert!(buf[488..].iter().all(|&b| b == 0));
    }

    #[test]
    fn writeback_and_evict_empties_the_page_cache() {
        let dir = TempDir::new();
        let path = dir.join("evict.img");
        let image = Image::open(&opts(&path, CacheMode::Writeback, Some(16 << 20))).unwrap();
        let mut data = vec![0u8; 8 << 20];
        fill_pattern(&mut data, 7);
        write_at(&image, 4 << 20, &data);
        let resident = image.resident_bytes_in(4 << 20, 8 << 20).unwrap();
        assert!(resident >= 7 << 20, "just written: {resident} resident");
        assert_eq!(
            resident_bytes_of(&path).unwrap(),
            image.resident_bytes().unwrap()
        );
        image.writeback_and_evict(4 << 20, 8 << 20).unwrap();
        let after = image.resident_bytes_in(4 << 20, 8 << 20).unwrap();
        assert!(after <= 64 << 10, "after eviction: {after} resident");
        let mut back = vec![0u8; 8 << 20];
        read_at(&image, 4 << 20, &mut back);
        assert!(back == data);
    }

    #[test]
    fn dontcache_probe_on_ext4_is_true() {
        let dir = TempDir::new();
        if sys::fs_magic(dir.path()).unwrap() != EXT4_SUPER_MAGIC {
            eprintln!("skipped: {} is not on ext4", dir.path().display());
            return;
        }
        let path = dir.join("dc.img");
        let image = Image::open(&opts(&path, CacheMode::DontCache, Some(0))).unwrap();
        assert!(image.dontcache_supported(), "ext4 on Linux >= 6.14");
        assert!(image.dontcache_active());
        assert_eq!(image.eviction_path(), EvictionPath::RwfDontCache);
        image.force_dontcache_fallback();
        assert!(image.dontcache_supported());
        assert!(!image.dontcache_active());
        assert_eq!(image.eviction_path(), EvictionPath::WritebackAndEvict);
        // Under O_DIRECT the probe goes through the buffered descriptor.
        let direct = Image::open(&opts(&path, CacheMode::None, None)).unwrap();
        assert!(direct.dontcache_supported());
        assert!(!direct.dontcache_active());
    }

    #[test]
    fn dontcache_probe_on_tmpfs_is_false() {
        let shm = Path::new("/dev/shm");
        if sys::fs_magic(shm).ok() != Some(TMPFS_MAGIC) {
            eprintln!("skipped: no tmpfs at /dev/shm");
            return;
        }
        let dir = TempDir::new_in(shm);
        let image = Image::open(&opts(
            &dir.join("dc.img"),
            CacheMode::DontCache,
            Some(1 << 20),
        ))
        .unwrap();
        assert!(!image.dontcache_supported());
        assert_eq!(image.eviction_path(), EvictionPath::WritebackAndEvict);
        // The fallback still writes, and eviction still works.
        let data = [3u8; 4096];
        write_at(&image, 0, &data);
        image.writeback_and_evict(0, 4096).unwrap();
        // tmpfs has no ZERO_RANGE: write-zeroes writes zeroes out.
        image.write_zeroes(0, 4096, false).unwrap();
        let mut back = [1u8; 4096];
        read_at(&image, 0, &mut back);
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn dontcache_write_leaves_little_in_the_page_cache() {
        let dir = TempDir::new();
        let path = dir.join("dc-write.img");
        let image = Image::open(&opts(&path, CacheMode::DontCache, Some(8 << 20))).unwrap();
        if !image.dontcache_supported() {
            eprintln!("skipped: no RWF_DONTCACHE here");
            return;
        }
        let mut data = vec![0u8; 8 << 20];
        fill_pattern(&mut data, 11);
        write_at(&image, 0, &data);
        // The kernel drops the pages once written back; waiting for writeback is the caller's.
        image.writeback_and_evict(0, 0).unwrap();
        assert!(image.resident_bytes().unwrap() <= 64 << 10);
    }

    /// A loop device over a file, detached on drop.
    struct LoopDevice(PathBuf);

    impl LoopDevice {
        /// `None` where loop devices cannot be set up (not root, no `losetup`, a container).
        fn attach(file: &Path) -> Option<LoopDevice> {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
            let dev = String::from_utf8(out.stdout).ok()?;
            Some(LoopDevice(PathBuf::from(dev.trim())))
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn block_device_uses_block_ioctls() {
        let dir = TempDir::new();
        let backing = dir.join("backing.img");
        let mut data = vec![0u8; 4 << 20];
        fill_pattern(&mut data, 13);
        std::fs::write(&backing, &data).unwrap();
        let Some(dev) = LoopDevice::attach(&backing) else {
            eprintln!("skipped: cannot attach a loop device here");
            return;
        };
        for cache in [CacheMode::Writeback, CacheMode::None] {
            let image = Image::open(&opts(&dev.0, cache, Some(1 << 20))).unwrap();
            assert!(image.is_block_device());
            assert_eq!(image.capacity(), 4 << 20, "BLKGETSIZE64");
            assert_eq!(image.logical_block_size(), 512, "BLKSSZGET");
            let mut src = AlignedBuf::new(64 << 10);
            src.as_mut().copy_from_slice(&data[..64 << 10]);
            write_at(&image, 0, src.as_ref());
            let mut back = AlignedBuf::new(64 << 10);
            read_at(&image, 0, back.as_mut());
            assert!(back.as_ref() == src.as_ref(), "{cache}: read back");
            image.write_zeroes(4096, 8192, false).unwrap();
            read_at(&image, 0, back.as_mut());
            assert!(back.as_ref()[..4096] == data[..4096]);
            assert!(
                back.as_ref()[4096..12288].iter().all(|&b| b == 0),
                "BLKZEROOUT"
            );
            assert!(back.as_ref()[12288..] == data[12288..64 << 10]);
            image.discard(1 << 20, 1 << 20).unwrap();
            image.flush().unwrap();
            image.writeback_and_evict(0, 0).unwrap();
            assert!(resident_bytes_of(&dev.0).unwrap() <= image.capacity());

            // The io_uring engine runs the block ioctls at submission.
            let image = std::sync::Arc::new(image);
            let mut engine = crate::new_engine(crate::EngineKind::IoUring, image, 4).unwrap();
            let ops = [
                Op::Discard {
                    offset: 0,
                    len: 4096,
                },
                Op::WriteZeroes {
                    offset: 8192,
                    len: 4096,
                    unmap: true,
                },
                Op::Flush,
            ];
            let n = ops.len();
            for (i, op) in ops.into_iter().enumerate() {
                engine.submit(op, i as u64).unwrap();
            }
            engine.commit().unwrap();
            let mut done = 0;
            while done < n {
                engine
                    .reap(&mut |c| {
                        assert!(c.result.is_ok(), "{cache}: {c:?}");
                        done += 1;
                    })
                    .unwrap();
            }
        }
    }
}
