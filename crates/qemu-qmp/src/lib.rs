//! QEMU as the backend sees it: a QEMU Machine Protocol (QMP) client, which QMP events mean a
//! vCPU unplug, and a thread that follows a VM's vCPUs and reports where each runs and when it
//! goes away or comes back.
//!
//! The vCPU maps and thread pinning that act on these reports live in the `vcpu` crate, which
//! knows no VMM; this crate is the QEMU side only:
//!
//! - [`qmp`]: a small synchronous QMP client ([`QmpClient`]);
//! - [`hotplug`]: which QMP events mean a vCPU unplug ([`classify`]);
//! - [`adapter`]: a thread that follows QEMU over QMP and reports vCPU affinity, unplug and plug
//!   as [`AdapterEvent`]s ([`QmpAdapter`]);
//! - [`error`]: the crate's [`Error`].
//!
//! With QEMU, the unplug to act on is the guest's eject request (`ACPI_DEVICE_OST`, slot-type
//! `CPU`, status 132), which comes *before* the guest takes the CPU offline; the guest's offline
//! waits for every request in flight on the queues that CPU alone served, so the backend drains
//! them there. `DEVICE_DELETED` only confirms, after the fact.
//!
//! ```no_run
//! use std::time::Duration;
//! use qemu_qmp::{AdapterEvent, QmpAdapter};
//! use vcpu::QueueMap;
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
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod adapter;
pub mod error;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake_qmp;
pub mod hotplug;
pub mod qmp;

pub use adapter::{AdapterEvent, QmpAdapter};
pub use error::{Error, Result};
pub use hotplug::{classify, HotplugEvent};
pub use qmp::{QmpClient, QmpEvent, VcpuInfo};
