//! The deferred path, top to bottom: a completion that must sleep leaves the fast path as a
//! [`Done`] on its queue thread's batch; the deferred worker (the `completion` crate) takes the
//! whole batch after a short delay and this handler does the batch's slow work at once —
//! writeback and eviction over the merged ranges of `dontcache` writes, one `fdatasync` for the
//! batch's flushes and writethrough writes, the error reports — then writes every status, adds
//! every used entry, and signals each queue once.
//!
//! This file holds the work, what a batch needs done; when it runs (the batching delay, the time
//! budget, the enable/disable/drain of an unplug) is the `completion` crate's, which knows
//! nothing of files or virtqueues.

use std::sync::{Arc, Mutex, OnceLock};

use completion::BatchHandler;
use log::{error, warn};
use vhost_user_backend::VringT;
use virtio_blk::{RequestType, STATUS_IOERR, STATUS_OK};

use crate::complete::{complete, signal_if_needed, Done};
use crate::shared::{DeviceShared, Vring};
use crate::stats::QueueStats;
use crate::used_order::{UsedOrder, UsedOrderMode};

/// The batch handler of one queue thread.
pub struct DeferredPath {
    shared: Arc<DeviceShared>,
    /// Global index of each of the thread's queues, by local index.
    queue_indices: Vec<usize>,
    /// The thread's vrings, handed over by the queue thread on its first event (before any
    /// completion can exist).
    vrings: OnceLock<Vec<Vring>>,
    /// Scratch reused across batches; the worker runs one batch at a time.
    scratch: Mutex<Scratch>,
    /// Per local queue, the order its used entries are published in, shared with the queue
    /// thread.
    orders: Vec<Arc<Mutex<UsedOrder>>>,
}

#[derive(Default)]
struct Scratch {
    /// The batch's `(offset, end)` ranges to write back and evict.
    ranges: Vec<(u64, u64)>,
    /// Per local queue: got a used entry in this batch.
    touched: Vec<bool>,
}

impl DeferredPath {
    /// A handler for the queue thread serving `queue_indices`, of up to `queue_size` heads each.
    pub fn new(
        shared: Arc<DeviceShared>,
        queue_indices: &[usize],
        queue_size: usize,
        used_order: UsedOrderMode,
    ) -> Self {
        Self {
            orders: queue_indices
                .iter()
                .map(|_| Arc::new(Mutex::new(UsedOrder::new(queue_size, used_order))))
                .collect(),
            shared,
            queue_indices: queue_indices.to_vec(),
            vrings: OnceLock::new(),
            scratch: Mutex::new(Scratch {
                ranges: Vec::with_capacity(256),
                touched: vec![false; queue_indices.len()],
            }),
        }
    }

    /// The used-entry order of the thread's `local`-th queue.
    pub fn used_order(&self, local: usize) -> Option<&Arc<Mutex<UsedOrder>>> {
        self.orders.get(local)
    }

    /// The thread's vrings, once its first event has handed them over.
    pub fn vrings(&self) -> Vec<Vring> {
        self.vrings.get().cloned().unwrap_or_default()
    }

    /// Give the handler the thread's vrings; later calls are no-ops.
    pub fn set_vrings(&self, vrings: &[Vring]) {
        if self.vrings.get().is_none() {
            let _ = self.vrings.set(vrings.to_vec());
        }
    }
}

impl BatchHandler<Done> for DeferredPath {
    fn complete_batch(&self, batch: &mut Vec<Done>) {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Scratch { ranges, touched } = &mut *scratch;

        // 1. Write back and drop the batch's dontcache ranges in one pass over the span they
        //    cover: sync_file_range walks only the dirty pages of the span, so the batch's
        //    writes go to the disk together, and under dontcache little else is dirty or cached.
        ranges.clear();
        ranges.extend(batch.iter().filter_map(|d| d.evict));
        if let (Some(start), Some(end)) = (
            ranges.iter().map(|r| r.0).min(),
            ranges.iter().map(|r| r.1).max(),
        ) {
            if let Err(e) = self.shared.image.writeback_and_evict(start, end - start) {
                error!("{e}");
                for d in batch.iter_mut().filter(|d| d.evict.is_some()) {
                    d.status = STATUS_IOERR;
                }
            }
        }

        // 2. One fdatasync for every flush and writethrough write of the batch.
        if batch.iter().any(|d| d.sync && d.status == STATUS_OK) {
            if let Err(e) = self.shared.image.flush() {
                error!("{e}");
                for d in batch.iter_mut().filter(|d| d.sync) {
                    d.status = STATUS_IOERR;
                }
            }
        }

        // 3. Report errors, off the fast path.
        for d in batch.iter().filter(|d| d.status != STATUS_OK) {
            warn!(
                "queue {}: {:?} request (head {}) at byte {} failed; the guest gets IOERR",
                self.queue_indices
                    .get(d.local)
                    .copied()
                    .unwrap_or(usize::MAX),
                d.request_type,
                d.head,
                d.offset
            );
        }

        // 4. Statuses and used entries, then one signal per queue.
        let Some(vrings) = self.vrings.get() else {
            error!(
                "deferred completions before the queue thread ran: {} request(s) lost",
                batch.len()
            );
            batch.clear();
            return;
        };
        touched.iter_mut().for_each(|t| *t = false);
        for d in batch.drain(..) {
            let (Some(&index), Some(vring), Some(order)) = (
                self.queue_indices.get(d.local),
                vrings.get(d.local),
                self.orders.get(d.local),
            ) else {
                error!("deferred completion for unknown local queue {}", d.local);
                continue;
            };
            if complete(&self.shared, index, &d, vring, order) {
                touched[d.local] = true;
            }
        }
        for (local, vring) in vrings.iter().enumerate() {
            if touched.get(local).copied().unwrap_or(false) && !self.shared.frontend_gone() {
                let index = self.queue_indices[local];
                if signal_if_needed(&mut vring.get_mut(), index) {
                    QueueStats::add(&self.shared.stats.queue(index).signals, 1);
                }
            }
        }
    }
}

/// Whether a write completion must wait for durability or eviction (the static form: decided
/// at submission). WRITE_ZEROES obeys writethrough as a write does.
pub fn defer_at_submission(request_type: RequestType, dontcache: bool, writeback: bool) -> bool {
    match request_type {
        RequestType::Flush => true,
        RequestType::Out => dontcache || !writeback,
        RequestType::WriteZeroes => !writeback,
        _ => false,
    }
}

/// Whether a completed request must be made durable (`fdatasync`) before the guest sees it,
/// given whether the write cache was on at its submission and is on now: a write or a
/// write-zeroes that was writethrough at either point. The guest may flip CONFIG_WCE while the
/// request is in flight, and either reading may be the one its driver relies on.
pub fn needs_sync(
    request_type: RequestType,
    writeback_at_submission: bool,
    writeback_now: bool,
) -> bool {
    matches!(request_type, RequestType::Out | RequestType::WriteZeroes)
        && !(writeback_at_submission && writeback_now)
}

/// Whether a completion that was not marked for the deferred path at submission needs it after
/// all (the dynamic form): an error to report, a range to evict, or a sync because the write
/// cache was turned off while it was in flight.
pub fn needs_deferred_path(done: &Done) -> bool {
    done.status != STATUS_OK || done.evict.is_some() || done.sync
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_defer_under_dontcache_or_writethrough_only() {
        assert!(defer_at_submission(RequestType::Out, true, true));
        assert!(defer_at_submission(RequestType::Out, false, false));
        assert!(!defer_at_submission(RequestType::Out, false, true));
        assert!(defer_at_submission(RequestType::Flush, false, true));
        assert!(!defer_at_submission(RequestType::In, true, false));
    }

    #[test]
    fn write_zeroes_defers_under_writethrough_like_a_write() {
        assert!(defer_at_submission(RequestType::WriteZeroes, false, false));
        assert!(!defer_at_submission(RequestType::WriteZeroes, false, true));
    }

    /// The guest may flip CONFIG_WCE while a write is in flight: a write that was, or has
    /// become, writethrough is synced before it completes.
    #[test]
    fn writethrough_at_submission_or_at_completion_means_fdatasync() {
        for t in [RequestType::Out, RequestType::WriteZeroes] {
            assert!(needs_sync(t, false, false), "{t:?} under writethrough");
            assert!(
                needs_sync(t, false, true),
                "{t:?} submitted writethrough, write cache turned on before it completed"
            );
            assert!(
                needs_sync(t, true, false),
                "{t:?} submitted writeback, write cache turned off before it completed"
            );
            assert!(!needs_sync(t, true, true), "{t:?} under writeback");
        }
        for t in [RequestType::In, RequestType::Discard, RequestType::GetId] {
            assert!(
                !needs_sync(t, false, false),
                "{t:?} changes nothing to sync"
            );
        }
    }

    /// A completion that must sync goes to the deferred path even when it was not marked for it
    /// at submission (the write cache was turned off while it was in flight).
    #[test]
    fn a_completion_that_must_sync_takes_the_deferred_path() {
        let done = |sync| Done {
            local: 0,
            head: 0,
            request_type: RequestType::Out,
            status: STATUS_OK,
            status_addr: vm_memory::GuestAddress(0),
            data_len: 4096,
            offset: 0,
            evict: None,
            sync,
            mem: Arc::new(crate::shared::GuestMem::new()),
        };
        assert!(needs_deferred_path(&done(true)));
        assert!(!needs_deferred_path(&done(false)));
    }
}
