//! The virtio-blk device as `vhost-user-backend` sees it: features, config space, the queue to
//! thread map, and the dispatch of each worker thread's events to its [`QueueThread`].
//!
//! One [`BlkDevice`] serves one vhost-user connection: `vhost-user-backend`'s per-connection
//! state cannot be reused, so the server builds a fresh device (and fresh engines) for each
//! frontend that connects, over the same image and the same counters.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use disk::{CacheMode, EngineKind, Image};
use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_blk::{device_features, BlkConfig, FeatureOptions, Limits, DEVICE_ID_LEN};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::deferred_path::DeferredPath;
use crate::dirty_log::{self, DirtyBitmap};
use crate::limits::{IoLimits, WakeTimer};
use crate::queue_thread::QueueThread;
use crate::shared::{DeviceShared, GuestMemAtomic, Vring};
use crate::stats::DeviceStats;
use crate::used_order::UsedOrderMode;
use crate::workers::{PinControl, QueueWorkers};
use crate::{Error, Result};
use completion::DeferredCompletions;

/// Largest single data segment we accept (and advertise as `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most sectors one discard or write-zeroes range may cover (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Most ranges one discard or write-zeroes request may carry.
pub const MAX_RANGES: u32 = 16;

/// How the device is set up; fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Expose the disk read-only.
    pub read_only: bool,
    /// Logical block size the guest sees (512 or 4096).
    pub logical_block_size: u32,
    /// GET_ID answer, NUL-padded.
    pub serial: [u8; DEVICE_ID_LEN],
    /// Which I/O engine each queue thread gets.
    pub engine: EngineKind,
    /// How long the deferred worker lets completions accumulate (0: at once).
    pub defer_delay: Duration,
    /// Bytes to write back at which a batch is taken before its delay (0: never).
    pub defer_max_bytes: u64,
    /// Under `writeback`: bytes written after which a completion evicts what was written.
    pub page_cache_budget: Option<u64>,
    /// Always wait out the batching delay, even when nothing else is in flight to batch with.
    pub strict_batching: bool,
    /// The longest a queue thread busy-polls its rings after work before sleeping (0: never).
    pub poll: Duration,
    /// Poll the whole window after every event instead of adapting it.
    pub poll_fixed: bool,
    /// Keep polling while requests are at the device.
    pub poll_device: bool,
    /// Register guest memory as the io_uring engines' fixed buffers.
    pub fixed_buffers: bool,
    /// Mark the data of reads in the dirty log while migrating (off only in tests that show
    /// a migration goes wrong without it).
    pub log_reads: bool,
    /// The order in which used entries are published.
    pub used_order: UsedOrderMode,
    /// The I/O limits, shared by every connection.
    pub io_limits: Arc<IoLimits>,
}

/// A virtio-blk device for one vhost-user connection.
pub struct BlkDevice {
    settings: DeviceSettings,
    config: BlkConfig,
    features: u64,
    shared: Arc<DeviceShared>,
    /// One entry per worker thread; each is locked only by its own thread's events, so the lock
    /// is uncontended.
    threads: Vec<Mutex<QueueThread>>,
    /// Per worker thread, the bitmask of queues it serves.
    queue_masks: Vec<u64>,
    /// Per worker thread, how the hotplug path asks it to re-pin itself.
    pins: Vec<Arc<PinControl>>,
    /// Where this connection's threads are published for the unplug path, GET_VRING_BASE and
    /// `stats`; shared across connections.
    workers: Arc<QueueWorkers>,
    /// The regions' dirty bitmaps as of the last memory-table change, so that the log they
    /// carry can be installed on the regions of the next one.
    bitmaps: Mutex<Vec<DirtyBitmap>>,
}

impl BlkDevice {
    /// A device over `image` for one connection, with one worker thread per queue.
    pub fn new(
        settings: &DeviceSettings,
        image: Arc<Image>,
        stats: Arc<DeviceStats>,
        workers: Arc<QueueWorkers>,
        mem: GuestMemAtomic,
    ) -> Result<Self> {
        let num_queues = usize::from(settings.num_queues);
        let capacity_sectors = image.capacity() >> virtio_blk::SECTOR_SHIFT;
        // Leave room for the header and status descriptors, as QEMU does.
        let seg_max = u32::from(settings.queue_size).saturating_sub(2).max(1);
        let block_sectors = settings.logical_block_size >> virtio_blk::SECTOR_SHIFT;
        let config = BlkConfig {
            capacity_sectors,
            size_max: SIZE_MAX,
            seg_max,
            blk_size: settings.logical_block_size,
            min_io_size: 1,
            writeback: 1,
            num_queues: settings.num_queues,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGES,
            discard_sector_alignment: block_sectors,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGES,
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        };
        let limits = Limits {
            capacity_sectors,
            seg_max,
            size_max: SIZE_MAX,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGES,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGES,
            discard_sector_alignment: block_sectors,
            write_zeroes_may_unmap: true,
            read_only: settings.read_only,
            logical_block_size: settings.logical_block_size,
        };
        let features = device_features(&FeatureOptions {
            read_only: settings.read_only,
            num_queues: settings.num_queues,
        }) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();

        let shared = Arc::new(DeviceShared {
            limits,
            serial: settings.serial,
            image: image.clone(),
            stats,
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            mem,
            page_cache_budget: settings.page_cache_budget,
            strict_batching: settings.strict_batching,
            poll: settings.poll,
            poll_fixed: settings.poll_fixed,
            poll_device: settings.poll_device,
            fixed_buffers: settings.fixed_buffers,
            logging: AtomicBool::new(false),
            log_reads: settings.log_reads,
            taking_chains: AtomicBool::new(true),
            frontend_gone: AtomicBool::new(false),
            in_flight: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
            io_limits: settings.io_limits.clone(),
            draining: AtomicBool::new(false),
        });

        let queue_masks: Vec<u64> = (0..num_queues).map(|q| 1u64 << q).collect();
        let mut threads = Vec::with_capacity(queue_masks.len());
        let mut pins = Vec::with_capacity(queue_masks.len());
        for (worker, mask) in queue_masks.iter().enumerate() {
            pins.push(Arc::new(PinControl::new().map_err(|source| {
                Error::WorkerEvents {
                    context: "creating a worker's re-pin eventfd",
                    source,
                }
            })?));
            let queues: Vec<usize> = (0..num_queues).filter(|q| mask & (1 << q) != 0).collect();
            let depth = u32::from(settings.queue_size) * queues.len() as u32;
            let options = disk::EngineOptions {
                fixed_buffers: settings.fixed_buffers,
                worker,
            };
            let engine = disk::new_engine_with(settings.engine, image.clone(), depth, options)
                .map_err(|source| Error::Engine { source })?;
            let deferred_path = Arc::new(DeferredPath::new(
                shared.clone(),
                &queues,
                usize::from(settings.queue_size),
                settings.used_order,
            ));
            let deferred = Arc::new(
                DeferredCompletions::new(
                    completion::Config {
                        delay: settings.defer_delay,
                        // Strict batching waits out the delay whatever the batch holds.
                        max_weight: if settings.strict_batching {
                            0
                        } else {
                            settings.defer_max_bytes
                        },
                        name: format!("deferred-q{}", queues[0]),
                        ..completion::Config::default()
                    },
                    deferred_path.clone(),
                )
                .map_err(|source| Error::Deferred { source })?,
            );
            let timer = WakeTimer::new().map_err(|source| Error::WorkerEvents {
                context: "creating a worker's I/O limits timerfd",
                source,
            })?;
            threads.push(Mutex::new(QueueThread::new(
                engine,
                &queues,
                usize::from(settings.queue_size),
                shared.clone(),
                deferred,
                deferred_path,
                timer,
            )));
        }

        Ok(Self {
            settings: settings.clone(),
            config,
            features,
            shared,
            threads,
            queue_masks,
            pins,
            workers,
            bitmaps: Mutex::new(Vec::new()),
        })
    }

    /// The epoll id of a worker's re-pin eventfd.
    pub fn pin_event_id(&self) -> u64 {
        u64::from(self.settings.num_queues) + 2
    }

    /// The re-pin eventfd of worker thread `thread`, to register with its epoll loop.
    pub fn pin_fd(&self, thread: usize) -> Option<RawFd> {
        self.pins.get(thread).map(|p| p.fd())
    }

    /// The epoll id of a worker's engine completion eventfd: past the queue ids and the id
    /// `vhost-user-backend` reserves for its exit and vring-enable events (`num_queues`).
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.settings.num_queues) + 1
    }

    /// The engine completion eventfd of worker thread `thread`, to register with its epoll loop.
    pub fn completion_fd(&self, thread: usize) -> Option<RawFd> {
        self.threads.get(thread).map(|t| lock(t).completion_fd())
    }

    /// The epoll id of a worker's I/O limits timerfd.
    pub fn timer_event_id(&self) -> u64 {
        u64::from(self.settings.num_queues) + 3
    }

    /// The I/O limits timerfd of worker thread `thread`, to register with its epoll loop.
    pub fn timer_fd(&self, thread: usize) -> Option<RawFd> {
        self.threads.get(thread).map(|t| lock(t).timer_fd())
    }

    /// The connection is ending: let requests waiting for tokens go at once (accounted), so
    /// that the drain does not wait for the limits. Their threads see it on their next wake-up,
    /// within the refill period.
    pub fn release_throttled(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Make this connection's queue threads the ones that `stats`, GET_VRING_BASE and the hotplug
    /// path see.
    /// Called once the frontend is accepted, so that between connections the last one's figures
    /// stay readable.
    pub fn publish_workers(&self) {
        for ((thread, mask), pin) in self.threads.iter().zip(&self.queue_masks).zip(&self.pins) {
            let deferred = lock(thread).deferred().clone();
            for q in (0..64).filter(|q| mask & (1u64 << q) != 0) {
                self.workers.set(q, deferred.clone(), pin.clone());
            }
        }
    }

    /// Number of worker threads.
    pub fn num_threads(&self) -> usize {
        self.threads.len()
    }

    /// A planned stop (SIGTERM) while the frontend is still connected: pop no new chains,
    /// complete what the deferred workers hold at once rather than after their delay, and wait
    /// up to `timeout` for every request in flight to complete — and be published, since the
    /// frontend is still there to read it. The frontend restarts the next backend at the used
    /// index it finds, so whatever is published before the hang-up is never run twice. Returns
    /// whether the device went idle.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        self.shared.taking_chains.store(false, Ordering::Release);
        // Requests waiting for tokens go at once (still counted against the limits): a planned
        // stop must not wait for a rate.
        self.release_throttled();
        let deferred: Vec<_> = self
            .threads
            .iter()
            .map(|t| lock(t).deferred().clone())
            .collect();
        let deadline = Instant::now() + timeout;
        loop {
            // Completions reaped after a drain land in the batch again: drain until idle.
            for d in &deferred {
                d.drain();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.wait_idle(None, left.min(Duration::from_millis(5))) {
                return true;
            }
            if left.is_zero() {
                return false;
            }
        }
    }

    /// The frontend hung up without stopping the rings (it died, or was killed): it reads the
    /// used index of each ring as it is now and restarts the next backend from there, so a used
    /// entry added from now on would make that backend run the request again. Requests in
    /// flight may still finish (their memory stays mapped until then), but from here on
    /// nothing is written to the rings or to the status bytes of the gone frontend.
    pub fn frontend_gone(&self) {
        self.shared.taking_chains.store(false, Ordering::Release);
        // Under each vring's lock, so that a completion that checked the flag before it has
        // published before this returns, and every later one sees it.
        let vrings: Vec<Vring> = self.threads.iter().flat_map(|t| lock(t).vrings()).collect();
        let guards: Vec<_> = vrings.iter().map(|v| v.get_mut()).collect();
        self.shared.frontend_gone.store(true, Ordering::Release);
        drop(guards);
    }

    /// Requests of this connection in flight.
    pub fn in_flight(&self) -> u64 {
        self.shared.requests_in_flight(None)
    }

    /// Wait until no request of this connection is in flight on `queue` (or on every queue when
    /// `None`), up to `timeout`. Returns whether the device went idle.
    pub fn wait_idle(&self, queue: Option<usize>, timeout: Duration) -> bool {
        let in_flight = || self.shared.requests_in_flight(queue);
        let deadline = Instant::now() + timeout;
        while in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }
}

fn lock(thread: &Mutex<QueueThread>) -> std::sync::MutexGuard<'_, QueueThread> {
    // A panic on a queue thread aborts the process (panic = "abort" in release); in tests a
    // poisoned lock still holds consistent slots, so keep serving.
    thread.lock().unwrap_or_else(|e| e.into_inner())
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = DirtyBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acked features {features:#x}");
        // `vhost-user-backend` installs the log (SET_LOG_BASE) but ignores LOG_ALL: logging
        // starts with LOG_ALL and stops when it goes away again (a cancelled or failed
        // migration). The log may come before or after it.
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.shared.logging.swap(log_all, Ordering::Relaxed) != log_all {
            dirty_log::switch(&self.shared.mem.memory(), log_all);
            info!(
                "dirty-page logging {}",
                if log_all {
                    "on: a migration is under way"
                } else {
                    "off"
                }
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = self.config.clone();
        config.writeback = u8::from(self.shared.writeback.load(Ordering::Relaxed));
        config.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only the write-cache byte is writable (VIRTIO_BLK_F_CONFIG_WCE); ignore the rest, as
        // an error here would end the connection.
        if offset == virtio_blk::WRITEBACK_OFFSET && buf.len() == 1 {
            let writeback = buf[0] != 0;
            info!(
                "guest set the write cache to {}",
                if writeback {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
            self.shared.writeback.store(writeback, Ordering::Relaxed);
        } else {
            warn!(
                "ignoring a config write of {} bytes at offset {offset}",
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> std::io::Result<()> {
        // The handle is the one we were built with; queue threads load it on every pass. While
        // logging, the regions this change brings in start without the log: install it. The
        // frontend waits for our reply before the guest can use them, so nothing is written
        // there unlogged.
        let mem = mem.memory();
        let mut bitmaps = self.bitmaps.lock().unwrap_or_else(|e| e.into_inner());
        let logging = self.shared.logging.load(Ordering::Relaxed);
        dirty_log::carry_over(&bitmaps, &mem, logging)?;
        *bitmaps = dirty_log::bitmaps(&mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.queue_masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair for each thread: one shared pair would stop only the first thread.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("creating an exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: the ring is no longer ready, so nothing new is popped; complete what the
        // deferred worker holds now rather than after its delay, and wait for what is in flight,
        // so that the frontend gets every used entry before it takes the ring back. Requests
        // waiting for tokens of the I/O limits are in flight too: their thread sees the ring
        // stopped on its next wake-up (within the refill period) and lets them go at once.
        if let Some(deferred) = self.workers.deferred(queue_index as usize) {
            deferred.drain();
        }
        if !self.wait_idle(Some(queue_index as usize), Duration::from_secs(30)) {
            warn!("queue {queue_index}: requests still in flight after 30 s at GET_VRING_BASE");
            // Their completions must not reach the ring the frontend hands over next.
            for thread in &self.threads {
                lock(thread).forget_unpublished(queue_index as usize);
            }
        }
        // An RBD image is shared with other hosts: at the end of a live migration the
        // destination's backend, another librbd client, reads what the guest wrote here, and a
        // read does not move the exclusive lock (which would have made librbd write back).
        // Writes the guest saw complete may still sit in librbd's cache (writeback policy) or be
        // on their way to the OSDs (writearound, librbd's default): write them back before the
        // frontend takes the ring. Nothing to do without librbd's cache; a file's page cache is
        // the host's own.
        if self.shared.image.is_rbd() && self.shared.image.cache_mode() == CacheMode::Writeback {
            if let Err(e) = self.shared.image.flush() {
                warn!("queue {queue_index}: writing librbd's cache back at GET_VRING_BASE: {e}");
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} for event {device_event}");
        }
        let Some(thread) = self.threads.get(thread_id) else {
            return Err(std::io::Error::other(format!(
                "event for unknown worker thread {thread_id}"
            )));
        };
        let mut thread = lock(thread);
        if usize::from(device_event) < vrings.len() {
            thread.on_kick();
            thread.process_queue(usize::from(device_event), vrings);
            thread.poll(vrings);
            thread.going_to_sleep();
        } else if u64::from(device_event) == self.completion_event_id() {
            thread.reap(vrings);
            thread.poll(vrings);
            thread.going_to_sleep();
        } else if u64::from(device_event) == self.timer_event_id() {
            thread.serve_waiting(vrings);
            thread.going_to_sleep();
        } else if u64::from(device_event) == self.pin_event_id() {
            if let Some(pin) = self.pins.get(thread_id) {
                pin.apply();
            }
        } else {
            warn!("unknown event {device_event} on worker thread {thread_id}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::stats::QueueStats;
    use crate::used_order::UsedOrderMode;

    fn settings() -> DeviceSettings {
        DeviceSettings {
            num_queues: 2,
            queue_size: 16,
            read_only: false,
            logical_block_size: 512,
            serial: [0; DEVICE_ID_LEN],
            engine: EngineKind::Sync,
            defer_delay: Duration::ZERO,
            defer_max_bytes: 0,
            page_cache_budget: None,
            strict_batching: false,
            poll: Duration::ZERO,
            poll_fixed: false,
            poll_device: false,
            fixed_buffers: false,
            log_reads: true,
            used_order: UsedOrderMode::Avail,
            io_limits: Arc::new(crate::limits::IoLimits::new(throttle::Spec::none())),
        }
    }

    /// A request stuck since an earlier connection stays counted in the process-wide stats; it
    /// must not hold this connection's GET_VRING_BASE (and with it the VMM's main loop).
    #[test]
    fn get_vring_base_waits_only_for_this_connections_requests() {
        let image = Arc::new(Image::open(&disk::ImageOptions::new("null:1M")).expect("null image"));
        let stats = Arc::new(DeviceStats::new(2));
        // What an earlier connection left in flight on queue 0.
        QueueStats::add(&stats.queue(0).in_flight, 1);
        let device = BlkDevice::new(
            &settings(),
            image,
            stats.clone(),
            Arc::new(QueueWorkers::new(2)),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .expect("a device");
        let start = Instant::now();
        device.stop_vring(0).expect("GET_VRING_BASE");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "GET_VRING_BASE took {:?} for a request of an earlier connection",
            start.elapsed()
        );
        assert!(
            device.wait_idle(None, Duration::ZERO),
            "this connection is idle"
        );
        assert_eq!(stats.in_flight(), 1, "the earlier request is still counted");
    }
}
