//! Benchmark tools for `vhost-user-blk`, beside (not inside) the VM harness they run on.
//!
//! The binaries, each with its method and figures in `docs/`:
//!
//! - `bench`: the backend beside its peers (qemu-storage-daemon, cloud-hypervisor's
//!   `vhost_user_block`, fio on the host), host-driven through libblkio, no VM
//!   (`docs/benchmarks.md`);
//! - `guest-bench`: dd and page-cache figures measured inside a guest, per cache mode;
//! - `guest-fio`: fio inside a guest, this backend against qemu-storage-daemon
//!   (`docs/guest-fio.md`);
//! - `drain-bench`: how long a vCPU unplug's drain holds the guest.
//! - `migrate-bench`: total time and downtime of live migrations with I/O running, this backend
//!   against qemu-storage-daemon (`docs/benchmarks.md`).
//!
//! The VMs, the backend and the guest agent come from the `vmm-tests` library; this library
//! holds only what the tools share on top of it:
//!
//! - [`procstat`]: CPU time of a process and of the host, from `/proc`;
//! - [`tool_error`]: the tools' error type and exit.

pub mod procstat;
pub mod tool_error;
