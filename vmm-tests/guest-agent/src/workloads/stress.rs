//! `hotplug_stress`: write-verify load while the host unplugs and re-plugs
//! a vCPU, many times over.
//!
//! Parameters: `cycles` (100: re-plugs to wait for), `cpu` (1: the vCPU the
//! host unplugs), `threads_per_cpu` (2), `offset_mib` (64), `mib` (64: the
//! span, split into one disjoint slice per thread), `bs_kib` (4), `seed`
//! (5), `timeout_secs` (120: the longest one unplug/plug cycle may take).
//!
//! Each thread has a home vCPU (the boot CPUs, round-robin) and re-pins
//! itself there whenever that vCPU is online (the kernel moves a thread off
//! a CPU that goes offline and leaves it unpinned). It writes a random block
//! of its slice with O_DIRECT, under a fresh seed, and reads it back and
//! checks it at once: a completion signalled before the data is on the disk
//! (or a completion for the wrong request) shows as a mismatch; a lost one
//! as a thread that never returns (the host's timeout, a hung task).
//!
//! The main thread prints `AGENT-READY {"workload":"<instance>"}` once the
//! load runs, then watches the vCPU: the host unplugs it, plugs it back,
//! the agent onlines it (there is no udev) and prints
//! `AGENT-READY {"workload":"<instance>/up/<n>"}` after the n-th time, for
//! the host to start the next cycle. After `cycles` it stops the load, reads
//! back every block written (each must hold its last seed) and reports the
//! request counts of `/sys/block/vda/stat` (reads, writes, flushes
//! completed) for the host to hold the backend's counters against.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_agent::pattern;
use serde_json::{json, Value};

use super::cpus::online_present;
use super::{verify_pattern, DISK};
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys::{self, AlignedBuf};

const MIB: u64 = 1 << 20;

/// What one load thread did.
struct Load {
    home: usize,
    writes: u64,
    reads: u64,
    repins: u64,
    /// Per slot of the thread's slice, the seed last written (0: never).
    seeds: Vec<u64>,
}

/// The completed-request counters of `/sys/block/vda/stat`: read I/Os,
/// write I/Os, flush requests (fields 1, 5 and 15).
fn disk_stat() -> Result<Value> {
    let text =
        std::fs::read_to_string("/sys/block/vda/stat").ctx(|| "read /sys/block/vda/stat".into())?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    Ok(json!({"reads": get(0), "writes": get(4), "discards": get(11), "flushes": get(15)}))
}

fn is_online(cpu: usize) -> bool {
    sys::online_cpus().contains(&cpu)
}

/// One load thread: write, read back, check, until `stop`.
fn load(
    home: usize,
    index: u64,
    base: u64,
    slots: u64,
    bs: u64,
    seed: u64,
    stop: &AtomicBool,
) -> Result<Load> {
    let f = sys::open(Path::new(DISK), true, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
    let mut buf = AlignedBuf::new(bs as usize);
    let mut rng = (seed ^ (index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let mut out = Load {
        home,
        writes: 0,
        reads: 0,
        repins: 0,
        seeds: vec![0; slots as usize],
    };
    let mut pinned = false;
    while !stop.load(Ordering::Relaxed) {
        if out.writes % 16 == 0 {
            // Off its CPU after an unplug, the thread runs anywhere; back
            // home once the CPU is online again.
            let here = sys::current_cpu() == home as i32;
            if !(pinned && here) && is_online(home) && sys::pin_to_cpu(home).is_ok() {
                pinned = true;
                out.repins += 1;
            }
        }
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        let slot = rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % slots;
        let off = base + slot * bs;
        let s = (seed << 40) ^ (index << 32) ^ (out.writes + 1);
        pattern::fill(s, off, &mut buf);
        f.write_all_at(&buf, off)
            .ctx(|| format!("write {DISK} at {off}"))?;
        out.writes += 1;
        out.seeds[slot as usize] = s;
        f.read_exact_at(&mut buf, off)
            .ctx(|| format!("read {DISK} at {off}"))?;
        out.reads += 1;
        verify_pattern(DISK, s, off, &buf)?;
    }
    Ok(out)
}

/// `hotplug_stress`.
pub fn hotplug_stress(p: &Params) -> Result<Value> {
    let w = "hotplug_stress";
    let cycles: u64 = p.get(w, "cycles", 100)?;
    let cpu: usize = p.get(w, "cpu", 1)?;
    let per_cpu: usize = p.get(w, "threads_per_cpu", 2)?;
    let offset = p.get(w, "offset_mib", 64u64)? * MIB;
    let span = p.get(w, "mib", 64u64)? * MIB;
    let bs = p.get(w, "bs_kib", 4u64)? * 1024;
    let seed: u64 = p.get(w, "seed", 5)?;
    let timeout = Duration::from_secs_f64(p.get(w, "timeout_secs", 120.0)?);
    let boot_cpus = sys::online_cpus();
    if !boot_cpus.contains(&cpu) {
        return Err(Error::Check(format!(
            "{w}: vCPU {cpu} is not online at the start ({boot_cpus:?})"
        )));
    }
    let nthreads = (boot_cpus.len() * per_cpu.max(1)) as u64;
    let slots = span / nthreads / bs.max(1);
    if bs == 0 || bs % pattern::BLOCK as u64 != 0 || slots == 0 {
        return Err(Error::Check(format!("{w}: bad sizes bs={bs} span={span}")));
    }
    let stat_before = disk_stat()?;
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (loads, watch) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..nthreads)
            .map(|t| {
                let home = boot_cpus[t as usize % boot_cpus.len()];
                let base = offset + t * slots * bs;
                let stop = &stop;
                s.spawn(move || {
                    let r = load(home, t, base, slots, bs, seed, stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let watch = watch_cycles(p.instance(), cpu, cycles, timeout, &stop);
        stop.store(true, Ordering::Relaxed);
        let loads: Result<Vec<Load>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Check("load thread panicked".into())))
            })
            .collect();
        (loads, watch)
    });
    let loads = loads?;
    let watch = watch?;
    let load_secs = start.elapsed().as_secs_f64();

    // Every block written must hold its last seed.
    let f = sys::open(Path::new(DISK), false, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
    let mut buf = AlignedBuf::new(bs as usize);
    let mut verified = 0u64;
    for (t, l) in loads.iter().enumerate() {
        let base = offset + t as u64 * slots * bs;
        for (slot, &s) in l.seeds.iter().enumerate() {
            if s == 0 {
                continue;
            }
            let off = base + slot as u64 * bs;
            f.read_exact_at(&mut buf, off)
                .ctx(|| format!("read {DISK} at {off}"))?;
            verify_pattern(DISK, s, off, &buf)?;
            verified += 1;
        }
    }
    Ok(json!({
        "cycles": watch.cycles,
        "offline_seen": watch.offline_seen,
        "cycle_ms": {
            "median": watch.median_ms(),
            "max": watch.cycle_ms.iter().copied().max().unwrap_or(0),
        },
        "load_secs": load_secs,
        "threads": loads
            .iter()
            .map(|l| json!({"home": l.home, "writes": l.writes, "reads": l.reads, "repins": l.repins}))
            .collect::<Vec<_>>(),
        "writes": loads.iter().map(|l| l.writes).sum::<u64>(),
        "reads": loads.iter().map(|l| l.reads).sum::<u64>(),
        "blocks_verified": verified,
        "verified": true,
        "disk_stat_before": stat_before,
        "disk_stat_after": disk_stat()?,
    }))
}

/// What the watcher saw.
struct Watch {
    cycles: u64,
    offline_seen: u64,
    /// Per cycle, from the start of the wait to the re-online, in ms.
    cycle_ms: Vec<u64>,
}

impl Watch {
    fn median_ms(&self) -> u64 {
        let mut v = self.cycle_ms.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }
}

/// Announces the load, then counts the vCPU's unplug/online cycles,
/// onlining it when it comes back and announcing each re-online.
fn watch_cycles(
    instance: &str,
    cpu: usize,
    cycles: u64,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Watch> {
    let mut w = Watch {
        cycles: 0,
        offline_seen: 0,
        cycle_ms: Vec::new(),
    };
    super::ready_as(instance)?;
    let mut online = true;
    let mut since = Instant::now();
    while w.cycles < cycles {
        if stop.load(Ordering::Relaxed) {
            // A load thread failed: its error is the result.
            return Ok(w);
        }
        // A cycle ends when the agent itself onlines the re-plugged vCPU:
        // that cannot be missed between two polls, an offline spell can.
        let onlined = online_present();
        let now = is_online(cpu);
        if online && !now {
            w.offline_seen += 1;
        }
        if onlined.contains(&cpu) {
            w.cycles += 1;
            w.cycle_ms.push(since.elapsed().as_millis() as u64);
            since = Instant::now();
            super::ready_as(&format!("{instance}/up/{}", w.cycles))?;
        }
        online = now;
        if since.elapsed() > timeout {
            return Err(Error::Check(format!(
                "vCPU {cpu}: no unplug/plug cycle for {timeout:?} after {} cycles (online: {now})",
                w.cycles
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(w)
}
