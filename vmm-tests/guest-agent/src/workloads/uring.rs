//! `uring`: queue-depth I/O through io_uring, fio-style, for benchmarks.
//!
//! Parameters: `rw` (`randwrite`; also `write`, `randread`, `read`),
//! `bs_kib` (4), `iodepth` (32), `secs` (3), `offset_mib` (256), `mib`
//! (256: the span), `threads` (0 = one pinned thread per online vCPU, else
//! that many, pinned round-robin), `direct` (true: O_DIRECT),
//! `dontcache` (false: `RWF_DONTCACHE` on each write; implies buffered),
//! `fsync` (true: fsync at the end of a write run, timed in),
//! `total_mib` (0: none; else the run also ends once the threads together
//! have submitted this much, each its equal share), `split` (false; true:
//! each thread works on its own equal slice of the span, so sequential
//! threads write disjoint ranges).
//!
//! Reports per-thread and total operations, IOPS, MB/s and completion
//! latency (submission to completion) p50/p99/max in microseconds. The
//! buffers hold the pattern of their first use; this workload measures,
//! `verify` and `randio` check data.

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::pattern;
use io_uring::{opcode, types, IoUring};
use serde_json::{json, Value};

use super::{mb_per_s, DISK};
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys::{self, AlignedBuf};

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rw {
    Read,
    Write,
    RandRead,
    RandWrite,
}

impl Rw {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            _ => {
                return Err(Error::Param {
                    key: "uring.rw".into(),
                    value: s.into(),
                    why: "read, write, randread or randwrite".into(),
                })
            }
        })
    }
    fn is_write(self) -> bool {
        matches!(self, Rw::Write | Rw::RandWrite)
    }
    fn is_random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite)
    }
}

struct Job {
    rw: Rw,
    bs: u64,
    iodepth: usize,
    runtime: Duration,
    offset: u64,
    span: u64,
    direct: bool,
    flags: i32,
    fsync: bool,
    /// Requests each thread submits at most (0: no limit).
    limit_ops: u64,
    /// Threads in the run, for `split`.
    threads: u64,
    split: bool,
}

struct Outcome {
    cpu: usize,
    ops: u64,
    secs: f64,
    lat_us: Vec<u32>,
}

/// One thread's run: `iodepth` requests in flight until the time is up.
fn run_thread(job: &Job, index: usize, cpu: usize) -> Result<Outcome> {
    let file =
        sys::open(Path::new(DISK), job.rw.is_write(), job.direct).ctx(|| format!("open {DISK}"))?;
    let fd = types::Fd(file.as_raw_fd());
    let mut ring =
        IoUring::new(job.iodepth.next_power_of_two() as u32).ctx(|| "io_uring_setup".into())?;
    let (base, span) = if job.split {
        let slice = job.span / job.threads.max(1) / job.bs * job.bs;
        (job.offset + index as u64 * slice, slice)
    } else {
        (job.offset, job.span)
    };
    let slots = (span / job.bs).max(1);
    let mut bufs: Vec<AlignedBuf> = (0..job.iodepth)
        .map(|_| AlignedBuf::new(job.bs as usize))
        .collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        pattern::fill(
            index as u64,
            base + i as u64 * job.bs,
            &mut b[..job.bs as usize],
        );
    }
    let mut rng = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut seq = if job.split {
        slots - 1
    } else {
        (index as u64 * slots / 8) % slots
    };
    let mut next_offset = || {
        let slot = if job.rw.is_random() {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % slots
        } else {
            seq = (seq + 1) % slots;
            seq
        };
        base + slot * job.bs
    };
    let mut submitted = 0u64;
    let more = |submitted: u64| job.limit_ops == 0 || submitted < job.limit_ops;
    let mut started = vec![Instant::now(); job.iodepth];
    let mut lat_us = Vec::new();
    let begin = Instant::now();
    let mut in_flight = 0usize;
    let mut ops = 0u64;

    let push = |ring: &mut IoUring, bufs: &mut [AlignedBuf], slot: usize, off: u64| -> Result<()> {
        let buf = &mut bufs[slot];
        let entry = if job.rw.is_write() {
            opcode::Write::new(fd, buf.as_ptr(), job.bs as u32)
                .offset(off)
                .rw_flags(job.flags)
                .build()
        } else {
            opcode::Read::new(fd, buf.as_mut_ptr(), job.bs as u32)
                .offset(off)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the buffer belongs to this slot and is neither touched
        // nor freed until its completion has been reaped below (the loop
        // drains every request in flight before returning).
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| Error::Check("io_uring submission queue full".into()))
    };

    for (slot, start) in started.iter_mut().enumerate() {
        if !more(submitted) {
            break;
        }
        push(&mut ring, &mut bufs, slot, next_offset())?;
        *start = Instant::now();
        in_flight += 1;
        submitted += 1;
    }
    let mut failure = None;
    while in_flight > 0 {
        ring.submit_and_wait(1).ctx(|| "io_uring_enter".into())?;
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, res) in done {
            in_flight -= 1;
            lat_us.push(
                started[slot]
                    .elapsed()
                    .as_micros()
                    .min(u128::from(u32::MAX)) as u32,
            );
            if res < 0 || res as u64 != job.bs {
                if failure.is_none() {
                    failure = Some(if res < 0 {
                        Error::io(
                            format!("io_uring {DISK}"),
                            std::io::Error::from_raw_os_error(-res),
                        )
                    } else {
                        Error::Check(format!("short io_uring transfer: {res} of {}", job.bs))
                    });
                }
                continue;
            }
            ops += 1;
            if failure.is_none() && begin.elapsed() < job.runtime && more(submitted) {
                push(&mut ring, &mut bufs, slot, next_offset())?;
                started[slot] = Instant::now();
                in_flight += 1;
                submitted += 1;
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if job.rw.is_write() && job.fsync {
        file.sync_all().ctx(|| format!("fsync {DISK}"))?;
    }
    Ok(Outcome {
        cpu,
        ops,
        secs: begin.elapsed().as_secs_f64(),
        lat_us,
    })
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `uring`.
pub fn run(p: &Params) -> Result<Value> {
    let rw = Rw::parse(&p.get_str("uring", "rw", "randwrite"))?;
    let dontcache = p.get_bool("uring", "dontcache", false);
    let cpus = sys::online_cpus();
    let nthreads = match p.get("uring", "threads", 0usize)? {
        0 => cpus.len().max(1),
        n => n,
    };
    let bs = p.get("uring", "bs_kib", 4u64)? * 1024;
    let total = p.get("uring", "total_mib", 0u64)? * MIB;
    let job = Job {
        rw,
        bs,
        iodepth: p.get("uring", "iodepth", 32usize)?.max(1),
        runtime: Duration::from_secs_f64(p.get("uring", "secs", 3.0f64)?),
        offset: p.get("uring", "offset_mib", 256u64)? * MIB,
        span: p.get("uring", "mib", 256u64)? * MIB,
        direct: p.get_bool("uring", "direct", !dontcache) && !dontcache,
        flags: if dontcache { sys::RWF_DONTCACHE } else { 0 },
        fsync: p.get_bool("uring", "fsync", true),
        limit_ops: if total == 0 || bs == 0 {
            0
        } else {
            (total / nthreads as u64 / bs).max(1)
        },
        threads: nthreads as u64,
        split: p.get_bool("uring", "split", false),
    };
    if job.bs == 0 || job.bs % pattern::BLOCK as u64 != 0 || job.span < job.bs {
        return Err(Error::Check(format!(
            "uring: bad sizes bs={} span={}",
            job.bs, job.span
        )));
    }
    let size = sys::open(Path::new(DISK), false, false)
        .and_then(|f| sys::blk_size(&f))
        .ctx(|| format!("size of {DISK}"))?;
    if job.offset + job.span > size {
        return Err(Error::Check(format!(
            "uring: range past the end of {DISK} ({size} bytes)"
        )));
    }
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..nthreads)
            .map(|t| {
                let cpu = cpus.get(t % cpus.len().max(1)).copied().unwrap_or(0);
                let job = &job;
                s.spawn(move || {
                    sys::pin_to_cpu(cpu).ctx(|| format!("pin to cpu {cpu}"))?;
                    run_thread(job, t, cpu)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Check("uring thread panicked".into())))
            })
            .collect::<Result<Vec<_>>>()
    })?;

    let mut all: Vec<u32> = outcomes
        .iter()
        .flat_map(|o| o.lat_us.iter().copied())
        .collect();
    all.sort_unstable();
    let ops: u64 = outcomes.iter().map(|o| o.ops).sum();
    let secs = outcomes.iter().map(|o| o.secs).fold(0.0, f64::max);
    let mean = if all.is_empty() {
        0
    } else {
        all.iter().map(|&v| u64::from(v)).sum::<u64>() / all.len() as u64
    };
    Ok(json!({
        "rw": p.get_str("uring", "rw", "randwrite"),
        "bs": job.bs,
        "iodepth": job.iodepth,
        "direct": job.direct,
        "dontcache": dontcache,
        "split": job.split,
        "limit_ops_per_thread": job.limit_ops,
        "threads": outcomes.iter().map(|o| json!({"cpu": o.cpu, "ops": o.ops, "secs": o.secs})).collect::<Vec<_>>(),
        "ops": ops,
        "secs": secs,
        "iops": if secs > 0.0 { (ops as f64 / secs).round() } else { 0.0 },
        "mb_s": mb_per_s(ops * job.bs, secs),
        "lat_us": {
            "mean": mean,
            "p50": percentile(&all, 0.50),
            "p99": percentile(&all, 0.99),
            "max": all.last().copied().unwrap_or(0),
        },
    }))
}
