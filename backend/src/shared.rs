//! What every request path of one device reads: the [`DeviceShared`] state (limits, image,
//! counters, guest memory, the guest's write-cache setting, the tuning from the command line,
//! the I/O limits) and the guest-memory and vring types the backend uses.
//!
//! The device builds one [`DeviceShared`] per connection and hands an `Arc` of it to each queue
//! thread and deferred path; this module knows nothing of them, so they can all depend on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use disk::Image;
use vhost_user_backend::VringRwLock;
use virtio_blk::{Limits, DEVICE_ID_LEN};
use vm_memory::GuestMemoryAtomic;

use crate::dirty_log::LoggedMemory;
use crate::limits::IoLimits;
use crate::stats::DeviceStats;

/// Guest memory as the backend maps it, with the dirty-page log of live migration.
pub type GuestMem = LoggedMemory;
/// The guest memory handle shared with `vhost-user-backend`, updated on memory-table changes.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// The vring type this backend uses.
pub type Vring = VringRwLock<GuestMemAtomic>;

/// State every queue thread of a device reads.
pub struct DeviceShared {
    /// Validation limits, matching what the config space advertises.
    pub limits: Limits,
    /// GET_ID answer.
    pub serial: [u8; DEVICE_ID_LEN],
    /// The disk image.
    pub image: Arc<Image>,
    /// Counters, shared across connections.
    pub stats: Arc<DeviceStats>,
    /// Whether the guest left the write cache on (CONFIG_WCE); off means writethrough.
    pub writeback: AtomicBool,
    /// Whether the driver negotiated VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: AtomicBool,
    /// Guest memory, updated by `vhost-user-backend` on every memory-table change.
    pub mem: GuestMemAtomic,
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
    /// The engines register guest memory as fixed buffers: queue threads hand them each new
    /// memory map.
    pub fixed_buffers: bool,
    /// The frontend acked `VHOST_F_LOG_ALL`: a migration is under way, and every guest page the
    /// backend writes goes to the dirty log. The fast path reads it once per completed read.
    pub logging: AtomicBool,
    /// Mark the data of reads in the dirty log while logging.
    pub log_reads: bool,
    /// Queue threads pop new chains; cleared when the device stops (SIGTERM) or its frontend
    /// is gone.
    pub taking_chains: AtomicBool,
    /// The frontend hung up: its rings are no longer ours, so nothing more is written to them
    /// (set under every vring's lock, and read under it before each used entry).
    pub frontend_gone: AtomicBool,
    /// Per queue, requests of this connection in flight: what GET_VRING_BASE and the drains
    /// wait for. The stats' counters span connections, and a request stuck since an earlier
    /// one must not hold this one's.
    pub in_flight: Vec<AtomicU64>,
    /// The I/O limits.
    pub io_limits: Arc<IoLimits>,
    /// The connection is ending: requests waiting for tokens go at once.
    pub draining: AtomicBool,
}

impl DeviceShared {
    /// A request of queue `queue` went in flight.
    pub fn request_started(&self, queue: usize) {
        if let Some(n) = self.in_flight.get(queue) {
            n.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A request of queue `queue` completed.
    pub fn request_finished(&self, queue: usize) {
        if let Some(n) = self.in_flight.get(queue) {
            // Never below 0, whatever a bug elsewhere does.
            let _ = n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        }
    }

    /// Requests of this connection in flight on `queue`, or on every queue with `None`.
    pub fn requests_in_flight(&self, queue: Option<usize>) -> u64 {
        match queue {
            Some(q) => self
                .in_flight
                .get(q)
                .map_or(0, |n| n.load(Ordering::Acquire)),
            None => self
                .in_flight
                .iter()
                .map(|n| n.load(Ordering::Acquire))
                .sum(),
        }
    }

    /// Whether queue threads may pop new chains.
    pub fn taking_chains(&self) -> bool {
        self.taking_chains.load(Ordering::Acquire)
    }

    /// Whether the frontend has gone; read under the vring's lock to decide whether to publish.
    pub fn frontend_gone(&self) -> bool {
        self.frontend_gone.load(Ordering::Acquire)
    }
}
