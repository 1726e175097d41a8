//! Per-queue-thread deferred, batched completions: the Linux block layer's task-context bio
//! completion from the series "block: enable RWF_DONTCACHE for block devices"
//! (`BIO_COMPLETE_IN_TASK`, `bio_complete_in_task()`, a per-CPU batch drained by a delayed work
//! item, and its CPU-hotplug disable/drain) carried one level up, into a vhost-user-blk backend.
//!
//! A queue thread completes plain requests on its fast path. A request whose completion must
//! sleep (a `dontcache` write waiting for writeback and eviction, an error to report, a page-cache
//! budget exceeded) is [`push`](DeferredCompletions::push)ed, or deferred by
//! [`complete_in_task`](DeferredCompletions::complete_in_task), onto the thread's batch; a
//! deferred worker thread, pinned to the same CPUs, takes the whole batch after a short delay and
//! hands it to a [`BatchHandler`], which does the batch's slow work at once and signals the guest
//! once. On vCPU unplug the backend [`disable`](DeferredCompletions::disable)s the worker (waiting
//! for a running pass), [`drain`](DeferredCompletions::drain)s the rest on its own thread, and
//! signals; on plug it [`enable`](DeferredCompletions::enable)s it again.
//!
//! The crate knows nothing of files or virtio: the work it runs is the handler's.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use completion::{Config, DeferredCompletions};
//!
//! let handler = |batch: &mut Vec<u32>| {
//!     for _request in batch.drain(..) { /* evict, write the status, add used */ }
//!     /* signal the guest once */
//! };
//! let deferred = DeferredCompletions::new(
//!     Config { delay: Duration::from_millis(1), ..Config::default() },
//!     Arc::new(handler),
//! )?;
//! deferred.push(1);
//! assert_eq!(deferred.complete_in_task(2, |_| false), Some(2)); // completed on the fast path
//! deferred.disable(); // vCPU unplug: no worker pass from here on
//! deferred.drain(); // complete what is left, here
//! deferred.enable(); // plug
//! # Ok::<(), completion::Error>(())
//! ```
//!
//! Model-check the batch hand-off with
//! `RUSTFLAGS="--cfg loom" cargo test -p completion --release loom`.

mod batch;
mod deferred;
mod stats;
mod sync;
mod sys;

use std::io;

pub use deferred::{BatchHandler, Config, DeferredCompletions};
pub use stats::Stats;

/// Errors of setting up a deferred completion worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The worker's delay timer could not be created.
    #[error("creating the deferred worker's timerfd")]
    TimerFd(#[source] io::Error),
    /// The worker's wake-up eventfd could not be created.
    #[error("creating the deferred worker's eventfd")]
    EventFd(#[source] io::Error),
    /// The worker's epoll could not be created or set up.
    #[error("setting up the deferred worker's epoll")]
    Epoll(#[source] io::Error),
    /// The worker thread could not be spawned.
    #[error("spawning the deferred worker thread {name:?}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The worker thread's name holds a NUL byte.
    #[error("deferred worker thread name {0:?} contains a NUL byte")]
    ThreadName(String),
    /// A CPU list to pin to was empty.
    #[error("empty CPU list for the deferred worker")]
    NoCpus,
    /// A CPU to pin to is beyond what a `cpu_set_t` holds.
    #[error("CPU {cpu} is beyond the largest CPU number a cpu set holds ({max})")]
    CpuOutOfRange {
        /// The CPU asked for.
        cpu: usize,
        /// The largest CPU number allowed.
        max: usize,
    },
    /// `sched_setaffinity` refused the CPU list.
    #[error("pinning the deferred worker to CPUs {cpus:?}")]
    Affinity {
        /// The CPUs asked for.
        cpus: Vec<usize>,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The result of this crate's fallible calls.
pub type Result<T> = std::result::Result<T, Error>;
