//! The guest agent's orders (kernel command line) and results (console).

use std::fmt::Write as _;

use guest_agent::protocol::{self, Done, Hello, WorkloadResult};
use serde_json::Value;

use crate::error::{Error, Result};

pub use guest_agent::pattern;
pub use guest_agent::protocol::{EXT4_HELLO, MIGRATE_STOP};

/// The workloads for one boot and their parameters.
#[derive(Debug, Clone, Default)]
pub struct AgentPlan {
    workloads: Vec<String>,
    params: Vec<(String, String)>,
}

impl AgentPlan {
    /// A plan running `workloads` in order (see the agent's docs for the
    /// names: `info`, `verify`, `randio`, `dontcache`, `ext4`, ...).
    pub fn new<S: AsRef<str>>(workloads: &[S]) -> Self {
        AgentPlan {
            workloads: workloads.iter().map(|s| s.as_ref().to_string()).collect(),
            params: Vec::new(),
        }
    }

    /// Sets `agent.<key>=<value>`; scope a key to a workload with
    /// `"<workload>.<key>"`.
    pub fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    /// The workloads, in order.
    pub fn workloads(&self) -> &[String] {
        &self.workloads
    }

    /// The words to append to the kernel command line.
    pub fn cmdline(&self) -> String {
        let mut s = format!("{}={}", protocol::RUN_KEY, self.workloads.join(","));
        for (k, v) in &self.params {
            let _ = write!(s, " {}{k}={v}", protocol::PARAM_PREFIX);
        }
        s
    }
}

/// Everything the agent printed during one boot.
#[derive(Debug, Clone)]
pub struct AgentRun {
    /// The start line: kernel version, vCPUs, workloads.
    pub hello: Hello,
    /// One result per workload run, in order.
    pub results: Vec<WorkloadResult>,
    /// The summary.
    pub done: Done,
}

impl AgentRun {
    /// Collects the agent's lines from a console transcript.
    pub fn from_lines(lines: &[String]) -> Result<Self> {
        let hello = lines
            .iter()
            .find_map(|l| protocol::parse_line::<Hello>(protocol::HELLO_PREFIX, l))
            .ok_or_else(|| Error::Agent("no AGENT-HELLO line".into()))?;
        let results = lines
            .iter()
            .filter_map(|l| protocol::parse_line::<WorkloadResult>(protocol::RESULT_PREFIX, l))
            .collect();
        let done = lines
            .iter()
            .find_map(|l| protocol::parse_line::<Done>(protocol::DONE_PREFIX, l))
            .ok_or_else(|| Error::Agent("no AGENT-DONE line".into()))?;
        Ok(AgentRun {
            hello,
            results,
            done,
        })
    }

    /// The first result of workload `name`.
    pub fn result(&self, name: &str) -> Result<&WorkloadResult> {
        self.results
            .iter()
            .find(|r| r.workload == name)
            .ok_or_else(|| Error::Agent(format!("no result for workload {name}")))
    }

    /// The data of the first result of `name`, which must have succeeded.
    pub fn ok(&self, name: &str) -> Result<&Value> {
        let r = self.result(name)?;
        if !r.ok {
            return Err(Error::Agent(format!(
                "workload {name} failed: {}",
                r.error.as_deref().unwrap_or("?")
            )));
        }
        Ok(&r.data)
    }

    /// Fails unless every workload succeeded.
    pub fn expect_all_ok(&self) -> Result<()> {
        if self.done.ok {
            return Ok(());
        }
        let errors: Vec<String> = self
            .results
            .iter()
            .filter(|r| !r.ok)
            .map(|r| format!("{}: {}", r.workload, r.error.as_deref().unwrap_or("?")))
            .collect();
        Err(Error::Agent(format!(
            "workloads failed: {}",
            errors.join("; ")
        )))
    }

    /// Prints the kernel and every result, for the test log. Written to the process's stderr
    /// directly, not through `println!`, which `cargo test` captures and shows only for failing
    /// tests: a passing run's log must show that a guest booted and what its agent measured.
    pub fn print(&self) {
        use std::io::Write as _;
        let mut text = format!(
            "guest kernel: {} {} ({} vCPUs)\n",
            self.hello.kernel, self.hello.kernel_version, self.hello.cpus
        );
        for r in &self.results {
            let _ = writeln!(
                text,
                "agent {:<11} {} {:>6} ms {}",
                r.workload,
                if r.ok { "ok  " } else { "FAIL" },
                r.elapsed_ms,
                match &r.error {
                    Some(e) => e.clone(),
                    None => r.data.to_string(),
                }
            );
        }
        // A failed write to stderr leaves nothing to report it to.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// Per-queue totals from the guest's `interrupts` workload: the
/// `virtio*-req.N` lines, in queue order.
pub fn queue_interrupts(data: &Value) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = data["lines"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| {
                    let name = l["name"].as_str()?;
                    name.contains("-req.")
                        .then(|| (name.to_string(), l["total"].as_u64().unwrap_or(0)))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The guest's queue → vCPU map, from the `queue_map` workload's result among the console
/// `lines`, for the backend's `--queue-map` / `set-queue-map`: each queue goes to the first of
/// `boot_vcpus` in its CPU list (with hotplug room, a queue's list also names absent CPUs).
/// Returns `(queue, vcpu)` pairs in the guest's order.
pub fn guest_queue_map(lines: &[String], boot_vcpus: &[u64]) -> Result<Vec<(u64, u64)>> {
    let map = lines
        .iter()
        .filter_map(|l| protocol::parse_line::<WorkloadResult>(protocol::RESULT_PREFIX, l))
        .find(|r| r.workload == "queue_map")
        .ok_or_else(|| Error::Agent("no queue_map result".into()))?;
    Ok(map.data["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let cpus: Vec<u64> = e["cpus"]
                .as_array()?
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            let vcpu = boot_vcpus.iter().copied().find(|c| cpus.contains(c))?;
            Some((e["queue"].as_u64()?, vcpu))
        })
        .collect())
}

/// `(queue, vcpu)` pairs in the backend's `QUEUE=VCPU,...` syntax.
pub fn format_queue_map(pairs: &[(u64, u64)]) -> String {
    pairs
        .iter()
        .map(|(q, v)| format!("{q}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
