//! The parts of the vmm-tests guest agent that the host side shares.
//!
//! The guest agent is a static binary that runs as the guest's init payload:
//! it runs the workloads named on the kernel command line against the
//! virtio-blk disk and prints one machine-readable line per workload on the
//! serial console. The host harness parses those lines with the types in
//! [`protocol`] and checks data written in the guest with the generator in
//! [`pattern`], so both sides agree by construction; [`fio`] names the
//! `fio` workload's jobs, builds fio's command line and reads its JSON for
//! both sides in the same way.

pub mod fio;
pub mod pattern;
pub mod protocol;
