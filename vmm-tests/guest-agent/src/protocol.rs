//! The console protocol between the guest agent and the host harness.
//!
//! The agent writes each line with a single `write(2)` so that kernel
//! messages on the same console do not split it. The host looks for the
//! prefixes anywhere in a console line and parses the JSON after them.

use serde::{Deserialize, Serialize};

/// Kernel command line key naming the workloads to run, comma separated,
/// in order: `agent.run=info,verify,interrupts`.
pub const RUN_KEY: &str = "agent.run";

/// Prefix of every other agent parameter on the kernel command line:
/// `agent.<workload>.<key>=<value>` or `agent.<key>=<value>`.
pub const PARAM_PREFIX: &str = "agent.";

/// Printed once when the agent starts, followed by a [`Hello`] in JSON.
pub const HELLO_PREFIX: &str = "AGENT-HELLO ";

/// Printed after each workload, followed by a [`WorkloadResult`] in JSON.
pub const RESULT_PREFIX: &str = "AGENT-RESULT ";

/// Printed by workloads that wait for the host (for example `idle`),
/// followed by a JSON object naming the workload.
pub const READY_PREFIX: &str = "AGENT-READY ";

/// Printed once after the last workload, followed by a [`Done`] in JSON;
/// the agent then powers the guest off.
pub const DONE_PREFIX: &str = "AGENT-DONE ";

/// What the `ext4` workload writes to `/hello.txt`.
pub const EXT4_HELLO: &str = "hello from the vmm-tests guest agent\n";

/// What the host writes at the start of the `migrate` workload's stop block once it is done
/// migrating the VM.
pub const MIGRATE_STOP: &[u8] = b"MIGRATION-TEST-STOP";

/// What the host writes at the start of the `migrate` workload's stop block to move the guest's
/// sentinel check one step on; the step number follows, 8 bytes little-endian. Step `2n - 1`:
/// read the sentinel buffers now (the host holds hop `n`'s migration open after its first pass);
/// step `2n`: hop `n` is done, check them from memory and poison them again.
pub const MIGRATE_STEP: &[u8] = b"MIGRATION-TEST-STEP";

/// What the agent says when it starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// The guest kernel's release (`uname -r`).
    pub kernel: String,
    /// The guest kernel's version string (`uname -v`).
    pub kernel_version: String,
    /// Number of online vCPUs.
    pub cpus: usize,
    /// The workloads the agent is going to run.
    pub workloads: Vec<String>,
}

/// The outcome of one workload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkloadResult {
    /// Workload name as given on the command line.
    pub workload: String,
    /// Whether the workload succeeded.
    pub ok: bool,
    /// The error, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall time the workload took, in milliseconds.
    pub elapsed_ms: u64,
    /// Workload-specific results.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// The agent's summary line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Done {
    /// True when every workload succeeded.
    pub ok: bool,
    /// Number of workloads run.
    pub workloads: usize,
    /// Names of the workloads that failed.
    pub failed: Vec<String>,
}

/// Parses the JSON following `prefix` in a console line, if the line holds it.
pub fn parse_line<T: serde::de::DeserializeOwned>(prefix: &str, line: &str) -> Option<T> {
    let at = line.find(prefix)?;
    serde_json::from_str(line[at + prefix.len()..].trim()).ok()
}
