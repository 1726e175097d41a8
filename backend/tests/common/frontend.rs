//! The vhost-user frontend that drives a backend end to end, in the order QEMU uses: connect,
//! GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_OWNER,
//! GET_CONFIG, SET_FEATURES, the memory table (SET_MEM_TABLE, or one ADD_MEM_REG per region when
//! CONFIGURE_MEM_SLOTS is negotiated), then per queue SET_VRING_NUM/BASE/ADDR/CALL/KICK and
//! SET_VRING_ENABLE. Built on the `vhost` crate's `Frontend` for the messages, [`GuestMemory`] for
//! the shared memory and [`Queue`] for the rings; adds virtio-blk requests on top of `Queue`.
//!
//! Every socket read has a timeout, so a backend that stops answering fails the test.
//!
//! For live migration it also plays QEMU's part in dirty-page logging: a [`DirtyLog`] memfd
//! handed over with SET_LOG_BASE, `VHOST_F_LOG_ALL` turned on and off with SET_FEATURES, and the
//! memory table sent again while logging.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};

use super::blk::{self, feature, BlkConfig, Segment};
use super::memory::{create_memfd, GuestMemory, RegionSpec};
use super::ring::{Completion, Layout, Queue, Transfer, RING_BLOCK};

/// How long a request or a vhost-user reply may take before the test fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How guest memory is announced to the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryMessages {
    /// ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS is negotiated, else SET_MEM_TABLE.
    #[default]
    Auto,
    /// Always SET_MEM_TABLE.
    SetMemTable,
    /// Always ADD_MEM_REG (fails if CONFIGURE_MEM_SLOTS is not negotiated).
    AddMemReg,
}

/// What the frontend asks for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Queues to set up; `None`: as many as the config space says (1 without MQ).
    pub num_queues: Option<usize>,
    /// Entries per queue.
    pub queue_size: u16,
    /// Guest memory layout; region 0 holds the rings.
    pub memory: Vec<RegionSpec>,
    /// SET_MEM_TABLE or ADD_MEM_REG.
    pub memory_messages: MemoryMessages,
    /// Device features to ack when offered (VERSION_1 and PROTOCOL_FEATURES are required).
    pub features: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Protocol features to ack when offered.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Socket reply and request completion timeout.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            num_queues: None,
            queue_size: 256,
            memory: vec![RegionSpec::new(0, 64 << 20)],
            memory_messages: MemoryMessages::Auto,
            features: feature::DRIVER_KNOWN,
            event_idx: false,
            protocol_features: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::LOG_SHMFD,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// What went wrong while attaching to a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket never accepted a connection.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Last connect error.
        source: io::Error,
    },
    /// A vhost-user message failed or was refused.
    #[error("{step}: {source}")]
    Vhost {
        /// The message.
        step: &'static str,
        /// What the vhost crate reported.
        source: vhost::Error,
    },
    /// The backend does not offer something the frontend needs.
    #[error("backend does not offer {0}")]
    Missing(&'static str),
}

/// Attach-time result type.
pub type Result<T> = std::result::Result<T, Error>;

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Vhost { step, source }
}

/// A backend attached through vhost-user, with its queues running.
pub struct Device {
    frontend: Frontend,
    memory: Arc<GuestMemory>,
    /// Features the backend offered.
    pub offered_features: u64,
    /// Features acked with SET_FEATURES.
    pub acked_features: u64,
    /// Protocol features the backend offered.
    pub offered_protocol: VhostUserProtocolFeatures,
    /// Protocol features acked.
    pub acked_protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM (1 without MQ).
    pub max_queues: u64,
    /// GET_MAX_MEM_SLOTS, when negotiated.
    pub max_mem_slots: Option<u64>,
    /// The config space read at attach.
    pub config: BlkConfig,
    queues: Vec<Queue>,
    /// A second handle on the socket, to see the backend hang up and to hang up ourselves.
    watch: Option<UnixStream>,
}

/// Connects to `path`, retrying while the socket is missing or refuses, until `timeout`.
pub fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

impl Device {
    /// Attaches to the backend listening on `path` and starts the queues.
    pub fn connect(path: &Path, opts: &Options) -> Result<Self> {
        let stream = connect_socket(path, opts.timeout)?;
        let io_err = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        stream
            .set_read_timeout(Some(opts.timeout))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(opts.timeout))
            .map_err(io_err)?;
        let watch = stream.try_clone().map_err(io_err)?;
        let mut device = Self::attach(Frontend::from_stream(stream, 64), opts)?;
        device.watch = Some(watch);
        Ok(device)
    }

    /// Runs the attach sequence over an already connected frontend.
    pub fn attach(fe: Frontend, opts: &Options) -> Result<Self> {
        Self::attach_to(fe, opts, None)
    }

    /// Attaches to the (next) backend on `path` with this device's guest memory and rings, as
    /// QEMU does when a backend it lost comes back: every ring restarts at the used index the
    /// guest sees in memory, since the lost backend could not be asked for its ring base.
    /// Transfers in flight stay in flight: the next backend runs what was never used.
    pub fn reattach(&mut self, path: &Path, opts: &Options) -> Result<()> {
        let stream = connect_socket(path, opts.timeout)?;
        let io_err = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        stream
            .set_read_timeout(Some(opts.timeout))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(opts.timeout))
            .map_err(io_err)?;
        let watch = stream.try_clone().map_err(io_err)?;
        let memory = Arc::clone(&self.memory);
        let queues = std::mem::take(&mut self.queues);
        let next = Self::attach_to(
            Frontend::from_stream(stream, 64),
            opts,
            Some((memory, queues)),
        )?;
        *self = next;
        self.watch = Some(watch);
        Ok(())
    }

    /// Hangs up on the backend without stopping anything first, as a VMM that dies does. The
    /// guest memory and the rings stay, for [`Device::reattach`].
    pub fn hang_up(&mut self) {
        if let Some(watch) = &self.watch {
            let _ = watch.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits up to `timeout` for the backend to close the connection; true once it has.
    pub fn wait_hang_up(&self, timeout: Duration) -> bool {
        let Some(watch) = &self.watch else {
            return false;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(watch);
        let deadline = Instant::now() + timeout;
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: `pfd` is a valid pollfd for the call, and the count is 1.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
                return true;
            }
            if n > 0 && pfd.revents & libc::POLLIN != 0 {
                let mut byte = 0u8;
                // SAFETY: peeks one byte into `byte`, which is valid for the call.
                let r = unsafe {
                    libc::recv(
                        fd,
                        (&mut byte as *mut u8).cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if r == 0 {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// The attach sequence, over fresh memory and rings, or over `existing` ones restarted at
    /// their used index.
    fn attach_to(
        mut fe: Frontend,
        opts: &Options,
        existing: Option<(Arc<GuestMemory>, Vec<Queue>)>,
    ) -> Result<Self> {
        let offered_features = fe.get_features().map_err(step("GET_FEATURES"))?;
        if offered_features & feature::VERSION_1 == 0 {
            return Err(Error::Missing("VIRTIO_F_VERSION_1"));
        }
        if offered_features & feature::PROTOCOL_FEATURES == 0 {
            return Err(Error::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let offered_protocol = fe
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        let acked_protocol = offered_protocol & opts.protocol_features;
        fe.set_protocol_features(acked_protocol)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let max_queues = if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(step("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let max_mem_slots =
            if acked_protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                Some(fe.get_max_mem_slots().map_err(step("GET_MAX_MEM_SLOTS"))?)
            } else {
                None
            };
        fe.set_owner().map_err(step("SET_OWNER"))?;

        let config = if acked_protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let zeroes = [0u8; blk::CONFIG_SIZE];
            let (_, raw) = fe
                .get_config(
                    0,
                    blk::CONFIG_SIZE as u32,
                    VhostUserConfigFlags::empty(),
                    &zeroes,
                )
                .map_err(step("GET_CONFIG"))?;
            BlkConfig::parse(&raw)
        } else {
            return Err(Error::Missing("VHOST_USER_PROTOCOL_F_CONFIG"));
        };

        let mut wanted = opts.features | feature::VERSION_1 | feature::PROTOCOL_FEATURES;
        if opts.event_idx {
            wanted |= feature::RING_EVENT_IDX;
        }
        let acked_features = offered_features & wanted;
        fe.set_features(acked_features)
            .map_err(step("SET_FEATURES"))?;

        let (memory, existing_queues) = match existing {
            Some((memory, queues)) => (memory, Some(queues)),
            None => (Arc::new(GuestMemory::new(&opts.memory)), None),
        };
        let add_mem_reg = match opts.memory_messages {
            MemoryMessages::Auto => max_mem_slots.is_some(),
            MemoryMessages::SetMemTable => false,
            MemoryMessages::AddMemReg => true,
        };
        let regions = memory.region_infos();
        if add_mem_reg {
            for r in &regions {
                fe.add_mem_region(r).map_err(step("ADD_MEM_REG"))?;
            }
        } else {
            fe.set_mem_table(&regions).map_err(step("SET_MEM_TABLE"))?;
        }

        let num_queues = opts
            .num_queues
            .unwrap_or(if acked_features & feature::MQ != 0 {
                usize::from(config.num_queues.max(1))
            } else {
                1
            });
        let event_idx = acked_features & feature::RING_EVENT_IDX != 0;
        let queues = match existing_queues {
            Some(queues) => queues,
            None => layout_queues(
                &memory,
                num_queues,
                opts.queue_size,
                event_idx,
                opts.timeout,
            ),
        };
        for q in &queues {
            let i = q.index();
            let vring = VringConfigData {
                queue_max_size: q.size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: memory.host_addr(q.desc_table_addr()),
                used_ring_addr: memory.host_addr(q.used_addr()),
                avail_ring_addr: memory.host_addr(q.avail_addr()),
                log_addr: None,
            };
            fe.set_vring_num(i, q.size())
                .map_err(step("SET_VRING_NUM"))?;
            // A fresh ring starts at 0; a ring taken over from a lost backend at its used index.
            let base = q.used_idx_in_memory();
            fe.set_vring_base(i, base).map_err(step("SET_VRING_BASE"))?;
            fe.set_vring_addr(i, &vring)
                .map_err(step("SET_VRING_ADDR"))?;
            fe.set_vring_call(i, q.call_fd())
                .map_err(step("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, q.kick_fd())
                .map_err(step("SET_VRING_KICK"))?;
        }
        for q in &queues {
            fe.set_vring_enable(q.index(), true)
                .map_err(step("SET_VRING_ENABLE"))?;
        }

        Ok(Self {
            frontend: fe,
            memory,
            offered_features,
            acked_features,
            offered_protocol,
            acked_protocol,
            max_queues,
            max_mem_slots,
            config,
            queues,
            watch: None,
        })
    }

    /// Queue `i`.
    pub fn queue(&mut self, i: usize) -> &mut Queue {
        let n = self.queues.len();
        self.queues
            .get_mut(i)
            .unwrap_or_else(|| panic!("queue {i} not set up ({n} queues)"))
    }

    /// All queues, to hand to threads.
    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether every bit of `mask` was acked.
    pub fn has(&self, mask: u64) -> bool {
        self.acked_features & mask == mask
    }

    /// The shared guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The vhost-user frontend, for messages this type does not wrap.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// GET_CONFIG for `size` bytes at `offset`; the `vhost` crate already rejects a reply whose
    /// offset or size differs from the request.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let zeroes = vec![0u8; size as usize];
        let (_, raw) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::empty(), &zeroes)
            .map_err(step("GET_CONFIG"))?;
        Ok(raw)
    }

    /// Capacity in bytes from the config space.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity * blk::SECTOR_SIZE
    }

    /// Reads `len` bytes at `sector` on queue `q`.
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Completion {
        self.queue(q).read(sector, len)
    }

    /// Writes `data` at `sector` on queue `q`.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Completion {
        self.queue(q).write(sector, data)
    }

    /// FLUSH on queue `q`.
    pub fn flush(&mut self, q: usize) -> Completion {
        self.queue(q).flush()
    }

    /// DISCARD of `segments` on queue `q`.
    pub fn discard(&mut self, q: usize, segments: &[Segment]) -> Completion {
        self.queue(q).discard(segments)
    }

    /// WRITE_ZEROES of `segments` on queue `q`, with the unmap flag on each if `unmap`.
    pub fn write_zeroes(&mut self, q: usize, segments: &[Segment], unmap: bool) -> Completion {
        self.queue(q).write_zeroes(segments, unmap)
    }

    /// GET_ID into a `buf_len`-byte buffer on queue `q`.
    pub fn get_id(&mut self, q: usize, buf_len: u32) -> Completion {
        self.queue(q).get_id(buf_len)
    }

    /// SET_LOG_BASE: hand the backend `log`, telling it the log is `mmap_size` bytes long (QEMU
    /// sends the log's real size; a test may claim less).
    pub fn set_log_base(&mut self, log: &DirtyLog, mmap_size: u64) -> Result<()> {
        let region = VhostUserDirtyLogRegion {
            mmap_size,
            mmap_offset: 0,
            mmap_handle: log.file.as_raw_fd(),
        };
        self.frontend
            .set_log_base(0, Some(region))
            .map_err(step("SET_LOG_BASE"))
    }

    /// SET_FEATURES with `VHOST_F_LOG_ALL` set (a migration starts) or cleared (it ended or was
    /// cancelled), as QEMU toggles it.
    pub fn set_log_all(&mut self, on: bool) -> Result<()> {
        if self.offered_features & feature::LOG_ALL == 0 {
            return Err(Error::Missing("VHOST_F_LOG_ALL"));
        }
        let features = if on {
            self.acked_features | feature::LOG_ALL
        } else {
            self.acked_features & !feature::LOG_ALL
        };
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))
    }

    /// The memory table again, as a memory change makes QEMU send it: SET_MEM_TABLE of every
    /// region, or (`re_add`) REM_MEM_REG then ADD_MEM_REG of region `i`. Either way the backend
    /// maps the region anew.
    pub fn resend_memory(&mut self, re_add: Option<usize>) -> Result<()> {
        let regions = self.memory.region_infos();
        match re_add {
            None => self
                .frontend
                .set_mem_table(&regions)
                .map(drop)
                .map_err(step("SET_MEM_TABLE")),
            Some(i) => {
                let r = &regions[i];
                self.frontend
                    .remove_mem_region(r)
                    .map_err(step("REM_MEM_REG"))?;
                self.frontend
                    .add_mem_region(r)
                    .map(drop)
                    .map_err(step("ADD_MEM_REG"))
            }
        }
    }

    /// A message whose reply proves every earlier one was handled (GET_FEATURES).
    pub fn sync(&mut self) -> Result<u64> {
        self.frontend.get_features().map_err(step("GET_FEATURES"))
    }

    /// GET_VRING_BASE of queue `q`: the backend stops the ring and answers with the next
    /// available index it would have served.
    pub fn get_vring_base(&mut self, q: usize) -> Result<u32> {
        self.frontend
            .get_vring_base(q)
            .map_err(step("GET_VRING_BASE"))
    }
}

/// Guest pages per byte of a dirty log.
const PAGES_PER_LOG_BYTE: u64 = 8;
/// Bytes of guest memory per log bit.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// A dirty-page log as QEMU shares it during migration: a memfd with one bit per 4 KiB guest
/// page, bit `p % 8` of byte `p / 8` standing for the page at guest address `p * 4096`.
pub struct DirtyLog {
    file: File,
    len: u64,
}

impl DirtyLog {
    /// A zeroed log of `len` bytes.
    pub fn new(len: u64) -> Self {
        let file = create_memfd("vhost-user-blk-e2e-log");
        file.set_len(len).expect("sizing the log memfd");
        Self { file, len }
    }

    /// The log bytes a guest memory of `memory_end` bytes (highest guest address + 1) needs.
    pub fn bytes_for(memory_end: u64) -> u64 {
        memory_end
            .div_ceil(LOG_PAGE_SIZE)
            .div_ceil(PAGES_PER_LOG_BYTE)
    }

    /// The whole memfd, bytes past any size claimed to the backend included.
    pub fn bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.len as usize];
        self.file
            .read_exact_at(&mut buf, 0)
            .expect("reading the log");
        buf
    }

    /// Guest page numbers whose bit is set.
    pub fn pages(&self) -> BTreeSet<u64> {
        self.bytes()
            .iter()
            .enumerate()
            .flat_map(|(i, &b)| {
                (0..PAGES_PER_LOG_BYTE)
                    .filter(move |bit| b & (1 << bit) != 0)
                    .map(move |bit| i as u64 * PAGES_PER_LOG_BYTE + bit)
            })
            .collect()
    }

    /// Clears every bit, as QEMU does after it synced the log.
    pub fn clear(&self) {
        self.file
            .write_all_at(&vec![0u8; self.len as usize], 0)
            .expect("clearing the log");
    }
}

/// Guest page numbers that `[gpa, gpa + len)` touches.
pub fn pages_of(gpa: u64, len: u64) -> BTreeSet<u64> {
    if len == 0 {
        return BTreeSet::new();
    }
    (gpa / LOG_PAGE_SIZE..=(gpa + len - 1) / LOG_PAGE_SIZE).collect()
}

/// Region 0 holds one [`RING_BLOCK`] per queue from its second block on; the rest of every
/// region, from the first MiB boundary after the rings, is split evenly into per-queue arenas.
fn layout_queues(
    memory: &Arc<GuestMemory>,
    num_queues: usize,
    queue_size: u16,
    event_idx: bool,
    timeout: Duration,
) -> Vec<Queue> {
    assert!(num_queues > 0, "at least one queue");
    let regions = memory.regions();
    let base = regions[0].guest_addr;
    let heap0 = (base + RING_BLOCK * (num_queues as u64 + 1)).next_multiple_of(1 << 20);
    assert!(
        heap0 < regions[0].end(),
        "region 0 too small for {num_queues} queues"
    );
    let mut arenas = vec![Vec::new(); num_queues];
    for (i, r) in regions.iter().enumerate() {
        let start = if i == 0 { heap0 } else { r.guest_addr };
        let width = ((r.end() - start) / num_queues as u64) & !0xfff;
        for (q, arena) in arenas.iter_mut().enumerate() {
            let s = start + width * q as u64;
            arena.push((s, s + width));
        }
    }
    arenas
        .into_iter()
        .enumerate()
        .map(|(i, arena)| {
            Queue::new(
                Arc::clone(memory),
                i,
                queue_size,
                base + RING_BLOCK * (i as u64 + 1),
                arena,
                event_idx,
                timeout,
            )
        })
        .collect()
}

impl Transfer {
    /// A virtio-blk request: header, then `out` (device-readable data), then `in_len` bytes of
    /// device-writable data, then the status byte; one descriptor per part.
    pub fn blk(kind: u32, sector: u64, out: &[u8], in_len: u32) -> Self {
        let mut readable = vec![blk::header(kind, sector).to_vec()];
        if !out.is_empty() {
            readable.push(out.to_vec());
        }
        let mut writable = Vec::new();
        if in_len > 0 {
            writable.push(in_len);
        }
        writable.push(1);
        Self {
            readable,
            writable,
            layout: Layout::Separate,
            indirect: false,
        }
    }

    /// The same request cut by `layout`.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The same request behind an indirect table.
    pub fn indirect(mut self) -> Self {
        self.indirect = true;
        self
    }
}

/// virtio-blk requests on a queue, each submitted and completed before returning.
impl Queue {
    /// IN: `len` bytes from `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> Completion {
        self.execute(&Transfer::blk(blk::T_IN, sector, &[], len))
    }

    /// OUT: `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Completion {
        self.execute(&Transfer::blk(blk::T_OUT, sector, data, 0))
    }

    /// FLUSH.
    pub fn flush(&mut self) -> Completion {
        self.execute(&Transfer::blk(blk::T_FLUSH, 0, &[], 0))
    }

    /// DISCARD of `segments`.
    pub fn discard(&mut self, segments: &[Segment]) -> Completion {
        let data = blk::segments_bytes(segments);
        self.execute(&Transfer::blk(blk::T_DISCARD, 0, &data, 0))
    }

    /// WRITE_ZEROES of `segments`, with the unmap flag on each if `unmap`.
    pub fn write_zeroes(&mut self, segments: &[Segment], unmap: bool) -> Completion {
        let segments: Vec<Segment> = segments
            .iter()
            .map(|s| Segment {
                flags: if unmap {
                    s.flags | blk::WRITE_ZEROES_FLAG_UNMAP
                } else {
                    s.flags
                },
                ..*s
            })
            .collect();
        let data = blk::segments_bytes(&segments);
        self.execute(&Transfer::blk(blk::T_WRITE_ZEROES, 0, &data, 0))
    }

    /// GET_ID into a `buf_len`-byte buffer.
    pub fn get_id(&mut self, buf_len: u32) -> Completion {
        self.execute(&Transfer::blk(blk::T_GET_ID, 0, &[], buf_len))
    }
}
