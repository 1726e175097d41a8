//! `bench`: vhost-user-blk beside its peers (issue 7).
//!
//! A libblkio client (`virtio-blk-vhost-user`) drives each peer's socket
//! straight from the host, no VM, over the same preallocated image; the
//! peers alternate A B A B over the repetitions and the medians, with min
//! and max, go into `docs/benchmarks.md`, `docs/bench/results.json` and
//! `docs/bench/*.svg`. See `docs/benchmarks.md` for the method.
//!
//! ```text
//! cargo run --release -p vmm-tests --bin bench            # full run
//! cargo run --release -p vmm-tests --bin bench -- --quick # smoke test
//! ```

#[path = "../bench/mod.rs"]
mod bench;

use std::process::ExitCode;

fn main() -> ExitCode {
    match bench::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
