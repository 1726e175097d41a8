//! A description of the machine and software a run measured, recorded
//! beside the results.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The machine and software versions.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Whether the host is itself a VM (the `hypervisor` CPU flag).
    pub virtualized: bool,
    /// Memory in GiB.
    pub mem_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// OS name.
    pub os: String,
    /// The image's file system type and mount source.
    pub image_fs: String,
    /// `git describe` of the workspace (with `-dirty`).
    pub git: String,
    /// qemu-storage-daemon version line.
    pub qsd: String,
    /// fio version.
    pub fio: String,
    /// cloud-hypervisor's vhost_user_block version, if any.
    pub ch: Option<String>,
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Describes this machine; `image` locates the file system, `workspace`
/// the git tree.
pub fn describe(
    image: &Path,
    workspace: &Path,
    qsd: &Path,
    fio: &Path,
    ch: Option<&Path>,
) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let virtualized = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|s| s.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        virtualized,
        mem_gib,
        kernel: first_line(Command::new("uname").arg("-r")),
        os,
        image_fs: mount_of(image),
        git: first_line(
            Command::new("git")
                .arg("-C")
                .arg(workspace)
                .args(["describe", "--always", "--dirty"]),
        ),
        qsd: first_line(Command::new(qsd).arg("--version")),
        fio: first_line(Command::new(fio).arg("--version")),
        ch: ch.map(|c| first_line(Command::new(c).arg("--version"))),
    }
}

/// "ext4 on /dev/vda (/)" for the mount holding `path`.
fn mount_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 || !path.starts_with(f[1]) {
            continue;
        }
        if best.as_ref().is_none_or(|(len, _)| f[1].len() >= *len) {
            best = Some((f[1].len(), format!("{} on {} ({})", f[2], f[0], f[1])));
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| "unknown".into())
}
