//! What every request path of one device reads: the [`DeviceShared`] state (limits, image,
//! counters, guest memory, the guest's write-cache setting, the tuning from the command line)
//! and the guest-memory and vring types the backend uses.
//!
//! The device builds one [`DeviceShared`] per connection and hands an `Arc` of it to each queue
//! thread and deferred path; this module knows nothing of them, so they can all depend on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use disk::Image;
use vhost_user_backend::VringRwLock;
use virtio_blk::{Limits, DEVICE_ID_LEN};
use vm_memory::GuestMemoryAtomic;

use crate::dirty_log::LoggedMemory;
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
    /// How long a queue thread busy-polls its rings after work before sleeping (0: never).
    pub poll: Duration,
    /// Keep polling while requests are at the device.
    pub poll_device: bool,
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
}

impl DeviceShared {
    /// Whether queue threads may pop new chains.
    pub fn taking_chains(&self) -> bool {
        self.taking_chains.load(Ordering::Acquire)
    }

    /// Whether the frontend has gone; read under the vring's lock to decide whether to publish.
    pub fn frontend_gone(&self) -> bool {
        self.frontend_gone.load(Ordering::Acquire)
    }
}
