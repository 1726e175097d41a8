//! CPU time of a process from `/proc/PID/stat` (all its threads, user and
//! system), and of the whole host from `/proc/stat`, in seconds: what the
//! measuring tools (`bench`, `guest-bench`, `guest-fio`, `drain-bench`)
//! charge to each process and call noise.

use std::io::{Error, ErrorKind, Result};

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::new(e.kind(), format!("read {path}: {e}")))
}

fn unparsable(path: &str, text: &str) -> Error {
    Error::new(ErrorKind::InvalidData, format!("parse {path}: {text:?}"))
}

/// The user + system CPU time `pid` has used so far, in seconds
/// (`utime + stime`, fields 14 and 15 of `/proc/PID/stat`; the resolution is
/// one clock tick, 10 ms on Linux).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    parse_stat(&text, false).ok_or_else(|| unparsable(&path, &text))
}

/// The CPU time of this process, in seconds.
pub fn self_cpu_seconds() -> Result<f64> {
    cpu_seconds(std::process::id())
}

/// The CPU time of this process and of its children that it has waited for (`cutime +
/// cstime` too: a backend or QEMU it started and reaped), in seconds.
pub fn self_and_children_cpu_seconds() -> Result<f64> {
    let path = "/proc/self/stat";
    let text = read(path)?;
    parse_stat(&text, true).ok_or_else(|| unparsable(path, &text))
}

/// The host's busy CPU seconds and this process's own plus its reaped children's: what a VM
/// tool samples at the edges of a run to charge itself, QEMU and the backend it started.
pub fn host_busy_and_ours() -> Result<(f64, f64)> {
    Ok((host_cpu()?.busy, self_and_children_cpu_seconds()?))
}

/// Host-wide CPU seconds so far, summed over CPUs.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostCpu {
    /// user + nice + system + irq + softirq.
    pub busy: f64,
    /// Time the hypervisor ran something else while we wanted to run.
    pub steal: f64,
}

impl std::ops::Sub for HostCpu {
    type Output = HostCpu;
    fn sub(self, rhs: HostCpu) -> HostCpu {
        HostCpu {
            busy: self.busy - rhs.busy,
            steal: self.steal - rhs.steal,
        }
    }
}

/// The host's CPU time so far (the `cpu` line of `/proc/stat`).
pub fn host_cpu() -> Result<HostCpu> {
    let text = read("/proc/stat")?;
    parse_host(&text).ok_or_else(|| unparsable("/proc/stat", "its cpu line"))
}

fn parse_host(text: &str) -> Option<HostCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let get = |i: usize| v.get(i).copied().unwrap_or(0) as f64 / clock_ticks();
    Some(HostCpu {
        busy: get(0) + get(1) + get(2) + get(5) + get(6),
        steal: get(7),
    })
}

fn parse_stat(text: &str, children: bool) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces and
    // parentheses: the fields that follow start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ')': state is field 3, so utime (14) is the 12th and stime (15)
    // the 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let mut ticks = utime + stime;
    if children {
        // cutime (16) and cstime (17) follow.
        let cutime: u64 = fields.next()?.parse().ok()?;
        let cstime: u64 = fields.next()?.parse().ok()?;
        ticks += cutime + cstime;
    }
    Some(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_tricky_name() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 13 20 0 3 0 1 2 3";
        let s = parse_stat(line, false).expect("parse");
        assert!((s - 300.0 / clock_ticks()).abs() < 1e-9);
        // With the reaped children's 7 + 13 ticks.
        let s = parse_stat(line, true).expect("parse");
        assert!((s - 320.0 / clock_ticks()).abs() < 1e-9);
    }

    #[test]
    fn parses_proc_stat() {
        let h = parse_host("cpu  100 0 50 1000 5 2 3 7 0 0\ncpu0 1 2 3\n").expect("parse");
        assert!((h.busy - 155.0 / clock_ticks()).abs() < 1e-9);
        assert!((h.steal - 7.0 / clock_ticks()).abs() < 1e-9);
    }

    #[test]
    fn reads_our_own_stat() {
        let own = self_cpu_seconds().expect("own");
        assert!(own >= 0.0);
        assert!(self_and_children_cpu_seconds().expect("with children") >= own);
        assert!(cpu_seconds(u32::MAX).is_err(), "no such process");
    }
}
