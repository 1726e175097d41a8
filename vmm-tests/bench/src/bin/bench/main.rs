//! `bench`: vhost-user-blk beside its peers in one interleaved run, host-driven through
//! libblkio.
//!
//! A libblkio client (`virtio-blk-vhost-user`) drives each peer's socket straight from the
//! host, no VM, over the same preallocated image; the peers alternate A B A B over the
//! repetitions and the medians, with min and max, go into `docs/benchmarks.md`,
//! `docs/bench/results.json` and `docs/bench/*.svg`. See `docs/benchmarks.md` for the method.
//!
//! ```text
//! cargo run --release -p vmm-bench --bin bench            # full run
//! cargo run --release -p vmm-bench --bin bench -- --quick # smoke test
//! ```
//!
//! - [`workload`]: what a run does (`randread-4k-qd32-q2`, ...);
//! - [`peers`]: who serves it (this backend's modes, qemu-storage-daemon,
//!   cloud-hypervisor's `vhost_user_block`, fio on the host);
//! - [`driver`]: the libblkio client that drives a vhost-user socket;
//! - [`fio`]: the no-virtualization ceiling;
//! - [`rbd`]: the Ceph cluster and image of the `*-rbd` peers;
//! - [`cache`]: the image and the page-cache reset before every run;
//! - [`runner`]: the interleaved run loop and its progress line;
//! - [`idle`]: what a connected but idle queue costs each server;
//! - [`stats`], [`report`], [`machine`]: medians, JSON, markdown, SVG.

mod cache;
mod cli;
mod driver;
mod error;
mod fio;
mod idle;
mod machine;
mod peers;
mod rbd;
mod report;
mod runner;
mod stats;
mod workload;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
