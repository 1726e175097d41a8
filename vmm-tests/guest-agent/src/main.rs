//! The vmm-tests guest agent.
//!
//! Started by the initramfs's `/init` once `/proc`, `/sys` and `/dev` are
//! mounted and `virtio_blk` is loaded, it reads its orders from the kernel
//! command line (`agent.run=info,verify,... agent.<workload>.<key>=<value>`),
//! runs each workload in turn, prints an `AGENT-RESULT {json}` line per
//! workload on the console, an `AGENT-DONE {json}` line at the end, and
//! powers the guest off. See `vmm-tests/docs` (docs/testing.md) for the list
//! of workloads and their parameters.

mod cmdline;
mod error;
mod sys;
mod workloads;

use std::io::Write;
use std::time::Instant;

use guest_agent::protocol::{self, Done, Hello, WorkloadResult};

use crate::cmdline::Params;

/// Writes one protocol line with a single `write(2)` on stdout (the console).
fn emit(prefix: &str, json: &impl serde::Serialize) {
    let body = serde_json::to_string(json).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    let line = format!("\n{prefix}{body}\n");
    let mut out = std::io::stdout().lock();
    // Nothing sensible to do when the console itself fails.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn main() {
    let params = match Params::from_proc_cmdline() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("guest-agent: {e}");
            Params::default()
        }
    };
    let uname = sys::uname();
    let names = params.workloads();
    emit(
        protocol::HELLO_PREFIX,
        &Hello {
            kernel: uname.0,
            kernel_version: uname.1,
            cpus: sys::online_cpus().len(),
            workloads: names.clone(),
        },
    );

    let mut failed = Vec::new();
    for name in &names {
        let start = Instant::now();
        let outcome = workloads::run(name, &params);
        let elapsed_ms = start.elapsed().as_millis() as u64;
        let result = match outcome {
            Ok(data) => WorkloadResult {
                workload: name.clone(),
                ok: true,
                error: None,
                elapsed_ms,
                data,
            },
            Err(e) => {
                failed.push(name.clone());
                WorkloadResult {
                    workload: name.clone(),
                    ok: false,
                    error: Some(e.to_string()),
                    elapsed_ms,
                    data: serde_json::Value::Null,
                }
            }
        };
        emit(protocol::RESULT_PREFIX, &result);
        if !result.ok && params.get_bool("", "stop_on_error", false) {
            break;
        }
    }
    emit(
        protocol::DONE_PREFIX,
        &Done {
            ok: failed.is_empty(),
            workloads: names.len(),
            failed,
        },
    );
    if params.get_bool("", "poweroff", true) {
        sys::power_off();
    }
}
