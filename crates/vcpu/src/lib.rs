//! vCPUs as the backend sees them: which vCPU submits to each virtqueue, which host CPUs each
//! vCPU runs on, and when a vCPU goes away or comes back.
//!
//! The backend serves each virtqueue from a thread pinned where the vCPU that submits to it runs,
//! the seed's per-CPU hardware queue carried one level up. This crate holds the pieces of that
//! which know nothing of virtio or files:
//!
//! - [`cpus`]: host CPU lists (`"2-3,5"`) and thread affinity (`sched_{set,get}affinity`);
//! - [`map`]: the guest's queue → vCPU map ([`QueueMap`], `--queue-map`) and a static vCPU →
//!   host CPU map ([`VcpuAffinity`], `--cpu-affinity`) for VMMs without an adapter;
//! - [`qmp`]: a small synchronous QEMU Machine Protocol client ([`QmpClient`]);
//! - [`hotplug`]: which QMP events mean a vCPU unplug ([`classify`]);
//! - [`adapter`]: a thread that follows QEMU over QMP and reports vCPU affinity, unplug and plug
//!   as [`AdapterEvent`]s ([`QmpAdapter`]).
//!
//! With QEMU, the unplug to act on is the guest's eject request (`ACPI_DEVICE_OST`, slot-type
//! `CPU`, status 132), which comes *before* the guest takes the CPU offline; the guest's offline
//! waits for every request in flight on the queues that CPU alone served, so the backend drains
//! them there. `DEVICE_DELETED` only confirms, after the fact.
//!
//! ```no_run
//! use std::time::Duration;
//! use vcpu::{AdapterEvent, QmpAdapter, QueueMap};
//!
//! let map = QueueMap::parse("0=1,1=0", 2)?; // from the guest's /sys/block/vda/mq/*/cpu_list
//! let adapter = QmpAdapter::spawn(
//!     "/run/vm/qmp-backend.sock".into(),
//!     Duration::from_secs(1),
//!     Box::new(move |event| match event {
//!         AdapterEvent::Unplug { vcpu } => { /* disable, drain, signal map.queues_of(vcpu) */ }
//!         AdapterEvent::Affinity { vcpu, cpus } => { /* re-pin the thread of vcpu to cpus */ }
//!         AdapterEvent::Plug { .. } | AdapterEvent::Gone { .. } => {}
//!     }),
//! )?;
//! // ...
//! adapter.stop();
//! # Ok::<(), vcpu::Error>(())
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod adapter;
pub mod cpus;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake_qmp;
pub mod hotplug;
pub mod map;
pub mod qmp;

use std::io;
use std::path::PathBuf;

pub use adapter::{AdapterEvent, QmpAdapter};
pub use cpus::{
    current_thread_affinity, format_cpu_list, parse_cpu_list, set_current_thread_affinity,
    thread_affinity, CpuList, MAX_CPUS,
};
pub use hotplug::{classify, HotplugEvent};
pub use map::{QueueMap, VcpuAffinity};
pub use qmp::{QmpClient, QmpEvent, VcpuInfo};

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
    /// Connecting to a QMP socket failed (not there yet, refused, ...).
    #[error("connecting to QMP socket {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to a QMP connection failed.
    #[error("{context} on the QMP connection")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The QMP peer closed the connection (QEMU exited).
    #[error("QMP connection closed by the peer")]
    Closed,
    /// No answer in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited: the greeting, or the reply to a command.
        what: String,
        /// How long we waited.
        timeout: std::time::Duration,
    },
    /// The peer sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QMP error {class}: {desc}")]
    Qmp {
        /// The error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A reply did not have the shape the command returns.
    #[error("unexpected reply to {command}")]
    Reply {
        /// The command.
        command: String,
        /// Why it did not decode.
        #[source]
        source: serde_json::Error,
    },
    /// A thread could not be spawned.
    #[error("spawning thread {name:?}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The result of this crate's operations.
pub type Result<T> = std::result::Result<T, Error>;
