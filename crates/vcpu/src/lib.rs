//! vCPUs as the backend sees them: which vCPU submits to each virtqueue, and which host CPUs
//! each vCPU runs on.
//!
//! The backend serves each virtqueue from a thread pinned where the vCPU that submits to it runs,
//! the per-CPU hardware queue of blk-mq carried one level up, from the guest's queues to the
//! host's threads. This crate holds the pieces of that which know nothing of virtio, files or
//! any VMM:
//!
//! - [`cpus`]: host CPU lists (`"2-3,5"`) and thread affinity (`sched_{set,get}affinity`);
//! - [`map`]: the guest's queue → vCPU map ([`QueueMap`], `--queue-map`) and a static vCPU →
//!   host CPU map ([`VcpuAffinity`], `--cpu-affinity`) for VMMs without an adapter.
//!
//! Where each vCPU runs, and when one goes away, comes from a VMM adapter: the `qemu-qmp` crate
//! follows QEMU over QMP and reports it in these terms.
//!
//! ```
//! use vcpu::{format_cpu_list, QueueMap, VcpuAffinity};
//!
//! let map = QueueMap::parse("0=1,1=0", 2)?; // from the guest's /sys/block/vda/mq/*/cpu_list
//! assert_eq!(map.queues_of(1), [0]);
//! let affinity = VcpuAffinity::parse("0=2-3;1=5")?;
//! assert_eq!(affinity.get(1).map(|cpus| format_cpu_list(cpus)).as_deref(), Some("5"));
//! # Ok::<(), vcpu::Error>(())
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cpus;
pub mod map;

use std::io;

pub use cpus::{
    current_thread_affinity, format_cpu_list, parse_cpu_list, set_current_thread_affinity,
    thread_affinity, CpuList, MAX_CPUS,
};
pub use map::{QueueMap, VcpuAffinity};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host CPU list (`"2-3,5"`) did not parse.
    #[error("invalid CPU list {input:?}: {reason}")]
    CpuList {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--queue-map` (`QUEUE=VCPU,...`) did not parse or does not fit the queues.
    #[error("invalid queue map {input:?}: {reason}")]
    QueueMap {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--cpu-affinity` (`VCPU=CPUS;...`) did not parse.
    #[error("invalid vCPU affinity {input:?}: {reason}")]
    VcpuAffinity {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An empty CPU set cannot be pinned to.
    #[error("cannot pin a thread to an empty CPU set")]
    EmptyCpuSet,
    /// A CPU number beyond what a `cpu_set_t` holds.
    #[error("CPU {cpu} is beyond the {max} CPUs a cpu_set_t holds")]
    CpuOutOfRange {
        /// The CPU number.
        cpu: usize,
        /// The limit, [`MAX_CPUS`].
        max: usize,
    },
    /// `sched_setaffinity` of the calling thread failed.
    #[error("pinning the current thread to CPUs {cpus}")]
    SetAffinity {
        /// The CPU list asked for, formatted.
        cpus: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `sched_getaffinity` of a thread failed (`ESRCH`: no such thread).
    #[error("reading the CPU affinity of thread {tid}")]
    GetAffinity {
        /// The thread id (0: the calling thread).
        tid: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The result of this crate's operations.
pub type Result<T> = std::result::Result<T, Error>;
