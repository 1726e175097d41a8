//! `info` and `queue_map`: what the guest sees of the disk.
//!
//! Parameters: none.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys;

/// The disk's sysfs directory.
const SYS: &str = "/sys/block/vda";

fn read(rel: &str) -> Option<String> {
    std::fs::read_to_string(Path::new(SYS).join(rel))
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(rel: &str) -> Option<u64> {
    read(rel)?.parse().ok()
}

/// Waits for `/sys/block/vda` (the driver may still be probing).
pub fn wait_for_disk(timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !Path::new(SYS).exists() || !Path::new(super::DISK).exists() {
        if start.elapsed() > timeout {
            return Err(Error::Check(format!(
                "no {} after {timeout:?}",
                super::DISK
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Hardware queue index -> CPUs, from `/sys/block/vda/mq/*/cpu_list`.
fn mq_map() -> Result<Vec<(usize, Vec<usize>)>> {
    let dir = Path::new(SYS).join("mq");
    let mut map = Vec::new();
    for entry in std::fs::read_dir(&dir).ctx(|| format!("read {}", dir.display()))? {
        let entry = entry.ctx(|| format!("read {}", dir.display()))?;
        let Ok(index) = entry.file_name().to_string_lossy().parse::<usize>() else {
            continue;
        };
        let list = std::fs::read_to_string(entry.path().join("cpu_list")).unwrap_or_default();
        map.push((index, sys::parse_cpu_list(&list)));
    }
    map.sort();
    Ok(map)
}

/// `queue_map`: the queue -> CPU map only.
pub fn queue_map(_: &Params) -> Result<Value> {
    wait_for_disk(Duration::from_secs(10))?;
    let map = mq_map()?;
    Ok(json!({
        "queues": map.iter().map(|(q, cpus)| json!({"queue": q, "cpus": cpus})).collect::<Vec<_>>(),
    }))
}

/// `info`: size, queues, cache mode, read-only flag, limits, queue map.
pub fn run(_: &Params) -> Result<Value> {
    wait_for_disk(Duration::from_secs(10))?;
    let map = mq_map()?;
    let (release, version) = sys::uname();
    let size_bytes = std::fs::File::open(super::DISK)
        .and_then(|f| sys::blk_size(&f))
        .ok();
    Ok(json!({
        "kernel": release,
        "kernel_version": version,
        "cpus": sys::online_cpus(),
        "disk": super::DISK,
        "size_sectors": read_u64("size"),
        "size_bytes": size_bytes,
        "logical_block_size": read_u64("queue/logical_block_size"),
        "physical_block_size": read_u64("queue/physical_block_size"),
        "write_cache": read("queue/write_cache"),
        "fua": read_u64("queue/fua"),
        "ro": read_u64("ro").map(|v| v != 0),
        "serial": read("serial"),
        "nr_requests": read_u64("queue/nr_requests"),
        "max_hw_sectors_kb": read_u64("queue/max_hw_sectors_kb"),
        "max_segments": read_u64("queue/max_segments"),
        "discard_max_bytes": read_u64("queue/discard_max_bytes"),
        "write_zeroes_max_bytes": read_u64("queue/write_zeroes_max_bytes"),
        "num_queues": map.len(),
        "queues": map.iter().map(|(q, cpus)| json!({"queue": q, "cpus": cpus})).collect::<Vec<_>>(),
    }))
}
