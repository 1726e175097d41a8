//! The completion step both request paths end in: write the status byte, add the used entry,
//! count the request, and, once per pass or batch, signal the guest.
//!
//! The fast path (`queue_thread.rs`) completes a request here as soon as its engine work is
//! over; the deferred path (`deferred_path.rs`) carries it as a [`Done`] through a batch and
//! completes it here after the batch's slow work. Neither path is imported: this module only
//! needs the device state and the counters.

use std::sync::{Arc, Mutex};

use log::{error, warn};
use vhost_user_backend::{VringState, VringT};
use virtio_blk::{RequestType, STATUS_OK};
use vm_memory::GuestAddress;

use crate::mem_view::MemView;
use crate::shared::{DeviceShared, GuestMem, GuestMemAtomic, Vring};
use crate::stats::QueueStats;
use crate::used_order::{self, UsedOrder};

/// A request whose engine work is over, on its way to the guest: completed at once on the fast
/// path, or carried through the deferred path's batch.
pub struct Done {
    /// The queue's index within its thread.
    pub local: usize,
    /// Descriptor head, the used entry's id.
    pub head: u16,
    /// What the request was.
    pub request_type: RequestType,
    /// Status to write.
    pub status: u8,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// Data bytes transferred.
    pub data_len: u32,
    /// Byte offset on the image.
    pub offset: u64,
    /// `(start, end)` to write back and drop from the host page cache before completing.
    pub evict: Option<(u64, u64)>,
    /// Must be durable (`fdatasync`) before completing.
    pub sync: bool,
    /// Keeps the guest memory of the status byte mapped.
    pub mem: Arc<GuestMem>,
}

/// Complete a request whose engine work (and any deferred work) is over: write its status, add
/// its used entry, count it. Signalling is the caller's, once per pass or batch. The used length
/// is the bytes written into device-writable buffers, status byte included. The used entry
/// goes out in the queue's `order` (it may wait for older requests); returns whether any used
/// entry was added, i.e. whether the guest may need a signal.
///
/// Once the frontend has gone, nothing is written to its rings or status bytes: it restarts
/// the next backend at the used index it saw, and that backend runs the request again.
pub fn complete(
    shared: &DeviceShared,
    index: usize,
    done: &Done,
    vring: &Vring,
    order: &Mutex<UsedOrder>,
) -> bool {
    let mut state = vring.get_mut();
    let mut added = false;
    if !shared.frontend_gone() {
        if let Err(e) = MemView::new(&done.mem).write_u8(done.status_addr, done.status) {
            error!(
                "queue {index}: writing status at {:#x}: {e}",
                done.status_addr.0
            );
        }
        let used_len = if done.status == STATUS_OK && done.request_type == RequestType::In {
            done.data_len + 1
        } else {
            1
        };
        added = used_order::lock(order).complete(&mut state, index, done.head, used_len);
    }
    drop(state);
    let stats = shared.stats.queue(index);
    count_done(stats, done.request_type, done.data_len, done.status);
    QueueStats::sub(&stats.in_flight, 1);
    shared.request_finished(index);
    added
}

/// Count a completed request of `request_type` that moved `data_len` bytes with `status`.
pub fn count_done(stats: &QueueStats, request_type: RequestType, data_len: u32, status: u8) {
    QueueStats::add(&stats.requests, 1);
    if status != STATUS_OK {
        QueueStats::add(&stats.errors, 1);
        return;
    }
    let counter = match request_type {
        RequestType::In => {
            QueueStats::add(&stats.bytes_read, u64::from(data_len));
            &stats.reads
        }
        RequestType::Out => {
            QueueStats::add(&stats.bytes_written, u64::from(data_len));
            &stats.writes
        }
        RequestType::Flush => &stats.flushes,
        RequestType::Discard => &stats.discards,
        RequestType::WriteZeroes => &stats.write_zeroes,
        RequestType::GetId => &stats.get_ids,
        RequestType::Unsupported(_) => return,
    };
    QueueStats::add(counter, 1);
}

/// Signal the guest for a queue if it asked to be (EVENT_IDX or the NO_INTERRUPT flag).
pub fn signal_if_needed(state: &mut VringState<GuestMemAtomic>, index: usize) -> bool {
    let needed = match state.needs_notification() {
        Ok(needed) => needed,
        Err(e) => {
            warn!("queue {index}: checking whether to notify: {e:?}");
            true
        }
    };
    if needed {
        if let Err(e) = state.signal_used_queue() {
            warn!("queue {index}: signalling the guest: {e}");
            return false;
        }
    }
    needed
}
