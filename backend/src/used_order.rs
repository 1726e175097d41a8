//! The order in which a queue's used entries are published.
//!
//! A VMM that loses its backend (a crash, `kill -9`) cannot ask for the ring base: it restarts
//! the next backend at the used index it finds in guest memory, and that backend pops the
//! available ring from there. If used entries go out in completion order, a request that
//! finished early sits below that index while an older one is still in flight: the next backend
//! runs the early one again and never runs the older one. Published in available-ring order
//! instead, the used index never passes a request still in flight, so the next backend runs
//! exactly the requests that never completed: a completion that finishes early waits for the
//! older ones (`--used-order avail`).
//!
//! That wait is the price, and it is not only a crash's: behind a FLUSH waiting for
//! `fdatasync`, or a discard of gigabytes, every younger request of the queue waits to be seen
//! complete, however early it finished. So it is an option, for a VMM that reconnects
//! (`reconnect-ms`) and a guest that prefers exactness after a crash to that latency; the
//! default, `--used-order completion`, publishes each as it completes.
//!
//! One [`UsedOrder`] per queue, shared by the queue thread and its deferred worker; both take it
//! only while holding the queue's vring lock, so it is never contended. Preallocated to the
//! queue size: nothing allocates per request.

use std::collections::VecDeque;

use log::error;
use vhost_user_backend::VringState;

use std::sync::{Mutex, MutexGuard};

use crate::shared::GuestMemAtomic;

/// How used entries are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UsedOrderMode {
    /// In available-ring order: the used index never passes a request in flight, so a restart
    /// after a crash runs exactly the requests that never completed.
    Avail,
    /// As each request completes: no request waits for an older one, but a crash can make the
    /// next backend run some requests twice and lose others.
    #[default]
    Completion,
}

impl std::fmt::Display for UsedOrderMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Avail => "avail",
            Self::Completion => "completion",
        })
    }
}

/// The publication order of one queue's used entries.
pub struct UsedOrder {
    in_order: bool,
    /// Heads popped and not yet published, in available-ring order.
    order: VecDeque<u16>,
    /// Per head: its used length once complete, until it is published.
    ready: Vec<Option<u32>>,
    /// Per head: it is in `order`.
    queued: Vec<bool>,
}

impl UsedOrder {
    /// The order of a queue of up to `queue_size` heads.
    pub fn new(queue_size: usize, mode: UsedOrderMode) -> Self {
        let in_order = mode == UsedOrderMode::Avail;
        let slots = if in_order { queue_size } else { 0 };
        Self {
            in_order,
            order: VecDeque::with_capacity(slots),
            ready: vec![None; slots],
            queued: vec![false; slots],
        }
    }

    /// A chain with this head was popped. False when the head is still waiting to be published
    /// (the driver reused a head it was not given back): the chain must be left alone.
    pub fn popped(&mut self, head: u16) -> bool {
        if !self.in_order {
            return true;
        }
        let Some(queued) = self.queued.get_mut(usize::from(head)) else {
            return false;
        };
        if std::mem::replace(queued, true) {
            return false;
        }
        self.order.push_back(head);
        true
    }

    /// The chain just popped with this head will never complete (it was left alone): forget it.
    pub fn unpop(&mut self, head: u16) {
        if self.in_order && self.order.back() == Some(&head) {
            self.order.pop_back();
            self.queued[usize::from(head)] = false;
        }
    }

    /// The request at `head` completed with `used_len`: add its used entry, in available-ring
    /// order, together with the entries of younger requests that were waiting for it. Returns
    /// whether any used entry was added.
    pub fn complete(
        &mut self,
        state: &mut VringState<GuestMemAtomic>,
        index: usize,
        head: u16,
        used_len: u32,
    ) -> bool {
        if !self.in_order {
            add_used(state, index, head, used_len);
            return true;
        }
        let h = usize::from(head);
        if !self.queued.get(h).copied().unwrap_or(false) {
            // Forgotten by a ring reset: it belongs to a ring the frontend took back.
            error!(
                "queue {index}: completion of head {head}, which is not waiting to be published"
            );
            return false;
        }
        self.ready[h] = Some(used_len);
        let mut added = false;
        while let Some(&front) = self.order.front() {
            let f = usize::from(front);
            let Some(len) = self.ready[f].take() else {
                break;
            };
            self.order.pop_front();
            self.queued[f] = false;
            add_used(state, index, front, len);
            added = true;
        }
        added
    }

    /// Requests popped and not yet published.
    pub fn waiting(&self) -> usize {
        self.order.len()
    }

    /// Forget every waiting request: the frontend took the ring back while some were still in
    /// flight, and their completions must not reach the ring it hands over next.
    pub fn reset(&mut self) {
        self.order.clear();
        self.ready.iter_mut().for_each(|r| *r = None);
        self.queued.iter_mut().for_each(|q| *q = false);
    }
}

/// Lock a queue's used-entry order (only ever under its vring's lock: never contended).
pub fn lock(order: &Mutex<UsedOrder>) -> MutexGuard<'_, UsedOrder> {
    order.lock().unwrap_or_else(|e| e.into_inner())
}

fn add_used(state: &mut VringState<GuestMemAtomic>, index: usize, head: u16, len: u32) {
    if let Err(e) = state.add_used(head, len) {
        error!("queue {index}: add_used({head}): {e:?}");
    }
}
