//! `wait_cpus`: wait for vCPU hotplug done by the host.
//!
//! Parameters: `n` (required: the number of online CPUs to wait for),
//! `timeout_secs` (120), `online` (true: bring CPUs that are present but
//! offline online, as udev would; a hot-added vCPU arrives offline).
//!
//! Prints `AGENT-READY {"workload":"<instance>"}` first, so the host knows
//! when to unplug or plug, then polls `/sys/devices/system/cpu` every 10 ms.
//! Reports the online and present CPUs and how long it waited.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cmdline::Params;
use crate::error::{Error, Result};
use crate::sys;

const CPU_SYS: &str = "/sys/devices/system/cpu";

pub(super) fn present_cpus() -> Vec<usize> {
    std::fs::read_to_string(Path::new(CPU_SYS).join("present"))
        .map(|s| sys::parse_cpu_list(&s))
        .unwrap_or_default()
}

/// Writes 1 to `cpuN/online` for every present CPU that is offline;
/// returns the CPUs it onlined.
pub(super) fn online_present() -> Vec<usize> {
    let online = sys::online_cpus();
    let mut done = Vec::new();
    for cpu in present_cpus() {
        if online.contains(&cpu) {
            continue;
        }
        let f = Path::new(CPU_SYS).join(format!("cpu{cpu}/online"));
        if std::fs::write(&f, b"1").is_ok() {
            done.push(cpu);
        }
    }
    done
}

/// `wait_cpus`.
pub fn wait_cpus(p: &Params) -> Result<Value> {
    let n: usize = p.get("wait_cpus", "n", 0)?;
    if n == 0 {
        return Err(Error::Check(
            "wait_cpus needs n=<online CPUs to wait for>".into(),
        ));
    }
    let timeout = Duration::from_secs_f64(p.get("wait_cpus", "timeout_secs", 120.0)?);
    let online = p.get_bool("wait_cpus", "online", true);
    let before = sys::online_cpus();
    super::ready(p)?;
    let start = Instant::now();
    let mut onlined = Vec::new();
    loop {
        if online {
            onlined.extend(online_present());
        }
        let now = sys::online_cpus();
        if now.len() == n {
            return Ok(json!({
                "before": before,
                "online": now,
                "present": present_cpus(),
                "onlined": onlined,
                "waited_ms": start.elapsed().as_millis() as u64,
            }));
        }
        if start.elapsed() > timeout {
            return Err(Error::Check(format!(
                "{} CPUs online after {timeout:?} ({now:?}), wanted {n}",
                now.len()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
