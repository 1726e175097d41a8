//! CPU time of a process from `/proc/PID/stat` (all its threads, user and
//! system), in seconds.

use super::error::{Context, Result};

/// The user + system CPU time `pid` has used so far, in seconds
/// (`utime + stime`, fields 14 and 15 of `/proc/PID/stat`; the resolution is
/// one clock tick, 10 ms on Linux).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).ctx(|| format!("read {path}"))?;
    parse_stat(&text).ctx(|| format!("parse {path}: {text:?}"))
}

/// The CPU time of this process, in seconds.
pub fn self_cpu_seconds() -> Result<f64> {
    cpu_seconds(std::process::id())
}

fn parse_stat(text: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces and
    // parentheses: the fields that follow start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ')': state is field 3, so utime (14) is the 12th and stime (15)
    // the 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
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
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        let s = parse_stat(line).unwrap();
        assert!((s - 300.0 / clock_ticks()).abs() < 1e-9);
    }

    #[test]
    fn reads_our_own_stat() {
        assert!(self_cpu_seconds().unwrap() >= 0.0);
    }
}
