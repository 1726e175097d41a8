//! The registry of the threads that serve each queue on the current connection: per queue, its
//! deferred worker and the [`PinControl`] of its queue thread.
//!
//! The device publishes a connection's threads here once the frontend is accepted
//! ([`QueueWorkers::set`]). The unplug path (`hotplug.rs`) disables, drains and re-pins them
//! through it, GET_VRING_BASE drains through it (`device.rs`), and `stats` reads the deferred
//! workers' batch figures from it (`control.rs`). Like the counters, it outlives a connection:
//! between connections the last one's handles stay, so their figures stay readable. The fast path
//! never touches it: its lock is taken only by those control paths.

use std::sync::{Arc, Mutex, MutexGuard};

use completion::DeferredCompletions;
use log::warn;
use vcpu::{format_cpu_list, CpuList};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::complete::Done;
use crate::stats::DeferredSnapshot;

/// Asks one queue worker thread to re-pin itself: `vhost-user-backend` does not expose its
/// threads, so the thread applies the request in its own epoll loop (`sched_setaffinity(0, …)`).
pub struct PinControl {
    consumer: EventConsumer,
    notifier: EventNotifier,
    wanted: Mutex<Option<CpuList>>,
}

impl PinControl {
    /// A control whose eventfd is to be registered in the worker's epoll loop.
    pub fn new() -> std::io::Result<Self> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(Self {
            consumer,
            notifier,
            wanted: Mutex::new(None),
        })
    }

    /// The eventfd the worker thread listens on.
    pub fn fd(&self) -> std::os::unix::io::RawFd {
        use std::os::unix::io::AsRawFd;
        self.consumer.as_raw_fd()
    }

    /// Ask the worker to move to `cpus`.
    pub fn request(&self, cpus: CpuList) {
        *lock(&self.wanted) = Some(cpus);
        if let Err(e) = self.notifier.notify() {
            warn!("waking a queue thread to re-pin it: {e}");
        }
    }

    /// On the worker thread: apply the latest request, if any.
    pub fn apply(&self) {
        let _ = self.consumer.consume();
        if let Some(cpus) = lock(&self.wanted).take() {
            if let Err(e) = vcpu::set_current_thread_affinity(&cpus) {
                warn!(
                    "pinning a queue thread to CPUs {}: {e}",
                    format_cpu_list(&cpus)
                );
            }
        }
    }
}

/// The handles of the thread serving a queue on the current connection.
#[derive(Clone)]
struct QueueWorker {
    deferred: Arc<DeferredCompletions<Done>>,
    pin: Arc<PinControl>,
}

/// Per queue, the deferred worker and pin control of the thread serving it on the current
/// connection; see the module documentation.
pub struct QueueWorkers {
    workers: Mutex<Vec<Option<QueueWorker>>>,
}

impl QueueWorkers {
    /// A registry for `num_queues` queues, none served yet.
    pub fn new(num_queues: usize) -> Self {
        Self {
            workers: Mutex::new(vec![None; num_queues]),
        }
    }

    /// Record the deferred worker and pin control of the thread serving `queue` on the current
    /// connection.
    pub fn set(
        &self,
        queue: usize,
        deferred: Arc<DeferredCompletions<Done>>,
        pin: Arc<PinControl>,
    ) {
        if let Some(slot) = self.lock().get_mut(queue) {
            *slot = Some(QueueWorker { deferred, pin });
        }
    }

    /// The deferred worker serving `queue`, if a connection has set one up.
    pub fn deferred(&self, queue: usize) -> Option<Arc<DeferredCompletions<Done>>> {
        self.lock()
            .get(queue)
            .and_then(|w| w.as_ref().map(|w| w.deferred.clone()))
    }

    /// The pin control of the thread serving `queue`, if a connection has set one up.
    pub fn pin(&self, queue: usize) -> Option<Arc<PinControl>> {
        self.lock()
            .get(queue)
            .and_then(|w| w.as_ref().map(|w| w.pin.clone()))
    }

    /// The batch figures of every queue's deferred worker (`None` before the first connection).
    pub fn deferred_snapshot(&self) -> Vec<Option<DeferredSnapshot>> {
        self.lock()
            .iter()
            .map(|w| w.as_ref().map(|w| w.deferred.stats().into()))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<QueueWorker>>> {
        lock(&self.workers)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_found_by_queue_once_set() {
        let workers = QueueWorkers::new(2);
        assert!(workers.pin(1).is_none());
        assert!(workers.deferred_snapshot().iter().all(Option::is_none));
        let pin = Arc::new(PinControl::new().expect("pin eventfd"));
        let handler = Arc::new(|batch: &mut Vec<Done>| batch.clear());
        let deferred = Arc::new(
            DeferredCompletions::new(completion::Config::default(), handler).expect("worker"),
        );
        workers.set(1, deferred.clone(), pin.clone());
        workers.set(7, deferred.clone(), pin.clone());
        assert!(workers.pin(0).is_none());
        assert!(Arc::ptr_eq(&workers.pin(1).expect("set"), &pin));
        assert!(Arc::ptr_eq(&workers.deferred(1).expect("set"), &deferred));
        let snap = workers.deferred_snapshot();
        assert_eq!(snap.len(), 2, "a queue beyond the device is ignored");
        assert!(snap[0].is_none() && snap[1].is_some());
        deferred.shutdown();
    }
}
