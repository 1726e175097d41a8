//! The benchmark tool behind the `bench` binary (issue 7): the backend
//! beside its peers in one interleaved run, host-driven through libblkio.
//!
//! - [`workload`]: what a run does (`randread-4k-qd32-q2`, ...);
//! - [`peers`]: who serves it (this backend's modes, qemu-storage-daemon,
//!   cloud-hypervisor's `vhost_user_block`, fio on the host);
//! - [`driver`]: the libblkio client that drives a vhost-user socket;
//! - [`fio`]: the no-virtualization ceiling;
//! - [`cache`]: the image and the page-cache reset before every run;
//! - [`runner`]: the interleaved run loop and its progress line;
//! - [`stats`], [`report`], [`machine`]: medians, JSON, markdown, SVG.

pub mod cache;
pub mod cli;
pub mod driver;
pub mod error;
pub mod fio;
pub mod machine;
pub mod peers;
pub mod report;
pub mod runner;
pub mod stats;
pub mod workload;
