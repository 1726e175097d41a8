//! `interrupts`: per-queue interrupt counts of the virtio devices.
//!
//! Parameters: none. Reports every `/proc/interrupts` line whose name
//! starts with `virtio` (for example `virtio0-req.1`), per CPU and in total.

use serde_json::{json, Value};

use crate::cmdline::Params;
use crate::error::{Context, Result};

/// One interrupt line.
pub struct Line {
    /// The IRQ number or name (first column).
    pub irq: String,
    /// The action name (last column), e.g. `virtio0-req.0`.
    pub name: String,
    /// Count per CPU.
    pub per_cpu: Vec<u64>,
}

/// Parses `/proc/interrupts` text, keeping the virtio lines.
pub fn parse(text: &str) -> Vec<Line> {
    let mut lines = text.lines();
    let ncpu = lines
        .next()
        .map(|h| {
            h.split_whitespace()
                .filter(|w| w.starts_with("CPU"))
                .count()
        })
        .unwrap_or(0);
    lines
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let irq = words.next()?.trim_end_matches(':').to_string();
            let rest: Vec<&str> = words.collect();
            let name = rest.last()?.to_string();
            if !name.starts_with("virtio") || rest.len() < ncpu {
                return None;
            }
            let per_cpu = rest[..ncpu]
                .iter()
                .map(|w| w.parse().unwrap_or(0))
                .collect();
            Some(Line { irq, name, per_cpu })
        })
        .collect()
}

/// `interrupts`.
pub fn run(_: &Params) -> Result<Value> {
    let text =
        std::fs::read_to_string("/proc/interrupts").ctx(|| "read /proc/interrupts".into())?;
    let lines = parse(&text);
    Ok(json!({
        "lines": lines
            .iter()
            .map(|l| json!({
                "irq": l.irq,
                "name": l.name,
                "per_cpu": l.per_cpu,
                "total": l.per_cpu.iter().sum::<u64>(),
            }))
            .collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_msix_lines() {
        let t = "           CPU0       CPU1       \n\
                 24:          0         12  PCI-MSIX-0000:00:02.0   0-edge      virtio0-config\n\
                 25:        100          3  PCI-MSIX-0000:00:02.0   1-edge      virtio0-req.0\n\
                 NMI:          0          0   Non-maskable interrupts\n";
        let l = super::parse(t);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].name, "virtio0-req.0");
        assert_eq!(l[1].per_cpu, vec![100, 3]);
    }
}
