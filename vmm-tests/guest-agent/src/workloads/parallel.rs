//! `verify` and `randio`: O_DIRECT I/O from one thread pinned to each vCPU.
//!
//! blk-mq picks the hardware queue from the submitting CPU, so one pinned
//! thread per online vCPU puts I/O on every queue that has a CPU.
//!
//! `verify` parameters: `offset_mib` (0), `mib` (32), `bs_kib` (64),
//! `seed` (1), `write` (true). It writes the range in `bs_kib` chunks,
//! chunk `c` from the thread on CPU `c % ncpu`, flushes, then reads every
//! chunk back from the *next* CPU's thread and checks the per-block
//! pattern. With `write=0` it only reads and checks (data an earlier boot
//! wrote).
//!
//! `randio` parameters: `offset_mib` (64), `mib` (32), `bs_kib` (4),
//! `secs` (2), `read_pct` (50), `seed` (2). Random reads and writes of the
//! pattern over the range for `secs`, then every block written is read back
//! and checked.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::pattern;
use serde_json::{json, Value};

use super::{mb_per_s, verify_pattern, DISK};
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys::{self, AlignedBuf};

const MIB: u64 = 1 << 20;

/// The range a workload works on, checked against the disk's size.
fn range(name: &str, p: &Params, def_offset_mib: u64, def_mib: u64) -> Result<(u64, u64)> {
    let offset = p.get(name, "offset_mib", def_offset_mib)? * MIB;
    let len = p.get(name, "mib", def_mib)? * MIB;
    let size = sys::open(Path::new(DISK), false, false)
        .and_then(|f| sys::blk_size(&f))
        .ctx(|| format!("size of {DISK}"))?;
    if offset + len > size {
        return Err(Error::Check(format!(
            "{name}: range {offset}+{len} past the end of {DISK} ({size} bytes)"
        )));
    }
    Ok((offset, len))
}

/// Runs `f(thread_index, cpu)` on one thread per online CPU, each pinned to
/// its CPU (shifted by `shift`), and collects the results in thread order.
fn per_cpu<T: Send>(shift: usize, f: impl Fn(usize, usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let cpus = sys::online_cpus();
    let n = cpus.len().max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|t| {
                let cpu = cpus.get((t + shift) % n).copied().unwrap_or(0);
                let f = &f;
                s.spawn(move || {
                    sys::pin_to_cpu(cpu).ctx(|| format!("pin to cpu {cpu}"))?;
                    f(t, cpu)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Check("worker thread panicked".into())))
            })
            .collect()
    })
}

/// `verify`.
pub fn verify(p: &Params) -> Result<Value> {
    let (offset, len) = range("verify", p, 0, 32)?;
    let bs = p.get("verify", "bs_kib", 64u64)? * 1024;
    let seed: u64 = p.get("verify", "seed", 1)?;
    if bs == 0 || bs % pattern::BLOCK as u64 != 0 || len % bs != 0 {
        return Err(Error::Check(format!("verify: bad sizes bs={bs} len={len}")));
    }
    let chunks = len / bs;
    let nthreads = sys::online_cpus().len().max(1) as u64;
    let write = p.get_bool("verify", "write", true);

    let start = Instant::now();
    let written = per_cpu(0, |t, cpu| {
        if !write {
            return Ok(json!({"cpu": cpu, "chunks": 0}));
        }
        let f = sys::open(Path::new(DISK), true, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
        let mut buf = AlignedBuf::new(bs as usize);
        let mut n = 0u64;
        for c in (t as u64..chunks).step_by(nthreads as usize) {
            let off = offset + c * bs;
            pattern::fill(seed, off, &mut buf);
            f.write_all_at(&buf, off)
                .ctx(|| format!("write {DISK} at {off}"))?;
            n += 1;
        }
        Ok(json!({"cpu": cpu, "chunks": n}))
    })?;
    if write {
        let f = sys::open(Path::new(DISK), true, false).ctx(|| format!("open {DISK}"))?;
        f.sync_all().ctx(|| format!("fsync {DISK}"))?;
    }
    let write_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let read = per_cpu(1, |t, cpu| {
        let f = sys::open(Path::new(DISK), false, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
        let mut buf = AlignedBuf::new(bs as usize);
        let mut n = 0u64;
        for c in (t as u64..chunks).step_by(nthreads as usize) {
            let off = offset + c * bs;
            f.read_exact_at(&mut buf, off)
                .ctx(|| format!("read {DISK} at {off}"))?;
            verify_pattern(DISK, seed, off, &buf)?;
            n += 1;
        }
        Ok(json!({"cpu": cpu, "chunks": n}))
    })?;
    let read_secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "offset": offset,
        "bytes": len,
        "bs": bs,
        "seed": seed,
        "written": write,
        "write_mb_s": if write { mb_per_s(len, write_secs) } else { 0.0 },
        "read_mb_s": mb_per_s(len, read_secs),
        "writers": written,
        "readers": read,
        "verified": true,
    }))
}

/// xorshift64*: fast, good enough to pick blocks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// `randio`.
pub fn randio(p: &Params) -> Result<Value> {
    let (offset, len) = range("randio", p, 64, 32)?;
    let bs = p.get("randio", "bs_kib", 4u64)? * 1024;
    let secs: f64 = p.get("randio", "secs", 2.0)?;
    let read_pct: u64 = p.get("randio", "read_pct", 50)?;
    let seed: u64 = p.get("randio", "seed", 2)?;
    if bs == 0 || bs % pattern::BLOCK as u64 != 0 || len < bs {
        return Err(Error::Check(format!("randio: bad sizes bs={bs} len={len}")));
    }
    let slots = len / bs;
    let deadline = Duration::from_secs_f64(secs);

    let start = Instant::now();
    let threads = per_cpu(0, |t, cpu| {
        let f = sys::open(Path::new(DISK), true, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
        let mut buf = AlignedBuf::new(bs as usize);
        let mut rng = Rng((seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9)) | 1);
        let (mut reads, mut writes) = (0u64, 0u64);
        let mut written = BTreeSet::new();
        let begin = Instant::now();
        let mut cpus_seen = BTreeSet::new();
        while begin.elapsed() < deadline {
            let slot = rng.next() % slots;
            let off = offset + slot * bs;
            if rng.next() % 100 < read_pct {
                f.read_exact_at(&mut buf, off)
                    .ctx(|| format!("read {DISK} at {off}"))?;
                reads += 1;
            } else {
                pattern::fill(seed, off, &mut buf);
                f.write_all_at(&buf, off)
                    .ctx(|| format!("write {DISK} at {off}"))?;
                written.insert(slot);
                writes += 1;
            }
            if (reads + writes) % 64 == 1 {
                cpus_seen.insert(sys::current_cpu());
            }
        }
        Ok((cpu, reads, writes, written, cpus_seen))
    })?;
    let elapsed = start.elapsed().as_secs_f64();

    // Check every block any thread wrote.
    let all: BTreeSet<u64> = threads.iter().flat_map(|t| t.3.iter().copied()).collect();
    let f = sys::open(Path::new(DISK), false, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
    let mut buf = AlignedBuf::new(bs as usize);
    for slot in &all {
        let off = offset + slot * bs;
        f.read_exact_at(&mut buf, off)
            .ctx(|| format!("read {DISK} at {off}"))?;
        verify_pattern(DISK, seed, off, &buf)?;
    }
    let ops: u64 = threads.iter().map(|t| t.1 + t.2).sum();
    Ok(json!({
        "offset": offset,
        "bytes": len,
        "bs": bs,
        "secs": elapsed,
        "iops": if elapsed > 0.0 { (ops as f64 / elapsed).round() } else { 0.0 },
        "threads": threads
            .iter()
            .map(|(cpu, r, w, _, seen)| json!({"cpu": cpu, "reads": r, "writes": w, "ran_on": seen}))
            .collect::<Vec<_>>(),
        "blocks_verified": all.len(),
        "verified": true,
    }))
}
