//! The workloads, by name.
//!
//! A workload is a function from the parameters to a JSON value; add one by
//! writing a module and a line in [`WORKLOADS`]. A workload can run several
//! times in one boot as `name#tag`, each instance with its own parameters
//! (`agent.name#tag.key=value`).

mod cpus;
mod dontcache;
mod ext4;
mod fio;
mod info;
mod interrupts;
mod migrate;
mod misc;
mod parallel;
mod stress;
mod uring;

use guest_agent::pattern;
use serde_json::Value;

use crate::cmdline::Params;
use crate::error::{Error, Result};

/// The path of the disk under test.
pub const DISK: &str = "/dev/vda";

/// Checks that `buf`, read from `target` at byte `offset`, holds the pattern of `seed`; a
/// [`Error::Mismatch`] naming the first bad block otherwise.
fn verify_pattern(target: &str, seed: u64, offset: u64, buf: &[u8]) -> Result<()> {
    match pattern::check(seed, offset, buf) {
        None => Ok(()),
        Some(b) => {
            let at = offset + b * pattern::BLOCK as u64;
            Err(Error::Mismatch {
                target: target.into(),
                offset: at,
                block: at / pattern::BLOCK as u64,
            })
        }
    }
}

/// A workload's entry point.
type Workload = fn(&Params) -> Result<Value>;

/// Every workload the agent knows, by name.
const WORKLOADS: &[(&str, Workload)] = &[
    ("info", info::run),
    ("queue_map", info::queue_map),
    ("interrupts", interrupts::run),
    ("verify", parallel::verify),
    ("randio", parallel::randio),
    ("uring", uring::run),
    ("dontcache", dontcache::dontcache),
    ("buffered", dontcache::buffered),
    ("ext4", ext4::run),
    ("flush", misc::flush),
    ("discard", misc::discard),
    ("readonly", misc::readonly),
    ("idle", misc::idle),
    ("wait_cpus", cpus::wait_cpus),
    ("hotplug_stress", stress::hotplug_stress),
    ("fio", fio::run),
    ("migrate", migrate::run),
];

/// Runs the workload called `name`; `name#tag` runs `name` with the
/// parameters scoped to that instance (see [`Params::scoped`]).
pub fn run(name: &str, params: &Params) -> Result<Value> {
    let base = name.split('#').next().unwrap_or(name);
    let (_, f) = WORKLOADS
        .iter()
        .find(|(n, _)| *n == base)
        .ok_or_else(|| Error::UnknownWorkload(name.to_string()))?;
    f(&params.scoped(name))
}

/// Prints `AGENT-READY {"workload": <instance>}` for the host to act on.
pub fn ready(params: &Params) -> Result<()> {
    ready_as(params.instance())
}

/// Prints `AGENT-READY {"workload": <name>}`: a workload that needs the
/// host to act more than once names each step (`instance/step/N`).
pub fn ready_as(name: &str) -> Result<()> {
    use std::io::Write;
    let line = format!(
        "\n{}{}\n",
        guest_agent::protocol::READY_PREFIX,
        serde_json::json!({"workload": name})
    );
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("write console", e))
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (bytes as f64 / 1e6 / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}
