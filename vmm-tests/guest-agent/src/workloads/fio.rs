//! `fio`: runs fio ([`FIO_BIN`], in the initramfs built with `build-initramfs.sh -F`) on
//! `/dev/vda` and reports its figures.
//!
//! The job comes from the parameters (see [`guest_agent::fio`] for names and arguments):
//!
//! - `job`: a job name `<rw>-<bs>-qd<N>-q<N>` (`randread-4k-qd32-q2`: two jobs of iodepth
//!   32). Default: the instance's tag when it is such a name, so
//!   `agent.run=fio#randread-4k-qd32-q2,fio#read-1m-qd8-q1` needs no more; else
//!   `randread-4k-qd1-q1`;
//! - `rw` (`read`, `write`, `randread`, `randwrite`), `bs` (`4k`, `1m`, bytes), `iodepth`,
//!   `numjobs`: override the name's;
//! - `runtime` (5) and `ramp` (1): seconds (fractions allowed) measured, and before that;
//! - `size` (the whole disk): the span the jobs work over (`4k`/`1m`/`1g` or bytes);
//! - `direct` (1), `ioengine` (`io_uring`), `pin` (1: job `i` on the `i`-th online CPU,
//!   `--cpus_allowed` with `--cpus_allowed_policy=split`);
//! - `args`: more fio arguments, appended last, **commas standing for spaces** (a kernel
//!   command-line word holds none): `agent.fio.args=--rate_iops=500,--verify=0`;
//! - `full` (0): 1 also returns fio's whole JSON under `fio`.
//!
//! Right before fio starts it prints `AGENT-READY {"workload": <instance>}`, so that the host
//! can sample its own counters (the backend's CPU time) over the run. It reports the job's
//! name, fio's arguments, the [`FioSummary`] (IOPS, bandwidth, completion latency mean and
//! p50/p99/p99.9, fio's CPU usr/sys), the requests the disk completed meanwhile
//! (`/sys/block/vda/stat`, ramp included) and the wall time; it fails when fio fails, reports
//! an error, or completes nothing.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use guest_agent::fio::{self, FioJob, FioSummary, Rw, FIO_BIN};
use serde_json::{json, Value};

use super::DISK;
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys;

/// The job the parameters describe.
fn job(p: &Params) -> Result<FioJob> {
    let param = |key: &str, why: &str, v: &str| Error::Param {
        key: format!("fio.{key}"),
        value: v.to_string(),
        why: why.to_string(),
    };
    let tag = p.instance().split_once('#').map(|(_, t)| t);
    let mut job = match (p.raw("fio", "job"), tag) {
        (Some((_, name)), _) => {
            FioJob::parse_name(name).map_err(|e| param("job", &e.to_string(), name))?
        }
        (None, Some(t)) if FioJob::parse_name(t).is_ok() => {
            FioJob::parse_name(t).map_err(|e| param("job", &e.to_string(), t))?
        }
        _ => FioJob::new(Rw::RandRead, 4096, 1, 1),
    };
    if let Some((_, v)) = p.raw("fio", "rw") {
        job.rw =
            Rw::parse(v).ok_or_else(|| param("rw", "read, write, randread or randwrite", v))?;
    }
    if let Some((_, v)) = p.raw("fio", "bs") {
        job.bs = fio::parse_size(v)
            .filter(|b| *b >= 512 && b % 512 == 0)
            .ok_or_else(|| param("bs", "a multiple of 512: 4k, 1m, bytes", v))?;
    }
    if let Some((_, v)) = p.raw("fio", "size") {
        job.size = Some(fio::parse_size(v).ok_or_else(|| param("size", "4k, 1m, 1g or bytes", v))?);
    }
    job.iodepth = p.get("fio", "iodepth", job.iodepth)?;
    job.numjobs = p.get("fio", "numjobs", job.numjobs)?;
    let secs = |key: &str, default: u64| -> Result<u64> {
        let s: f64 = p.get("fio", key, default as f64 / 1000.0)?;
        if !(0.0..=86_400.0).contains(&s) {
            return Err(param(key, "seconds, 0 to 86400", &s.to_string()));
        }
        Ok((s * 1000.0).round() as u64)
    };
    job.runtime_ms = secs("runtime", job.runtime_ms)?;
    job.ramp_ms = secs("ramp", job.ramp_ms)?;
    job.direct = p.get_bool("fio", "direct", job.direct);
    job.ioengine = p.get_str("fio", "ioengine", &job.ioengine);
    job.pin = p.get_bool("fio", "pin", job.pin);
    job.extra = fio::split_words(&p.get_str("fio", "args", ""));
    Ok(job)
}

/// Completed requests of the disk: reads, writes, discards, flushes
/// (`/sys/block/vda/stat` fields 1, 5, 12 and 16).
fn disk_requests() -> Result<[u64; 4]> {
    let path = "/sys/block/vda/stat";
    let s = std::fs::read_to_string(path).ctx(|| format!("read {path}"))?;
    let f: Vec<u64> = s
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Ok([at(0), at(4), at(11), at(15)])
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `fio`.
pub fn run(p: &Params) -> Result<Value> {
    let job = job(p)?;
    let size = sys::open(Path::new(DISK), false, false)
        .and_then(|f| sys::blk_size(&f))
        .ctx(|| format!("size of {DISK}"))?;
    let args = job
        .args(DISK, size, &sys::online_cpus())
        .map_err(|e| Error::Check(e.to_string()))?;
    let before = disk_requests()?;
    super::ready(p)?;
    let start = Instant::now();
    let out = Command::new(FIO_BIN)
        .args(&args)
        .output()
        .ctx(|| format!("run {FIO_BIN} (is this the fio initramfs, build-initramfs.sh -F?)"))?;
    let wall = start.elapsed();
    let after = disk_requests()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(Error::Check(format!(
            "fio failed ({}): {}",
            out.status,
            tail(&format!("{stdout}{stderr}"), 10)
        )));
    }
    let doc: Value = fio::json_start(&stdout)
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| Error::Check(format!("fio printed no JSON: {}", tail(&stdout, 10))))?;
    let summary: FioSummary =
        fio::summarize(&doc, job.rw).map_err(|e| Error::Check(e.to_string()))?;
    if summary.error != 0 {
        return Err(Error::Check(format!(
            "fio reported error {}: {}",
            summary.error,
            tail(&stderr, 10)
        )));
    }
    let d = |i: usize| after[i].saturating_sub(before[i]);
    let mut v = json!({
        "job": job.name(),
        "args": args,
        "summary": summary,
        "disk": {
            "reads": d(0),
            "writes": d(1),
            "discards": d(2),
            "flushes": d(3),
            "requests": d(0) + d(1) + d(2) + d(3),
        },
        "wall_ms": wall.as_millis() as u64,
    });
    if !stderr.trim().is_empty() {
        v["stderr"] = tail(&stderr, 10).into();
    }
    if p.get_bool("fio", "full", false) {
        v["fio"] = doc;
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(cmdline: &str, instance: &str) -> Params {
        Params::parse(cmdline).scoped(instance)
    }

    #[test]
    fn the_tag_names_the_job() {
        let p = params(
            "agent.run=fio#randwrite-4k-qd32-q2 agent.fio.runtime=2.5 agent.fio.ramp=0",
            "fio#randwrite-4k-qd32-q2",
        );
        let j = job(&p).expect("job");
        assert_eq!(j.name(), "randwrite-4k-qd32-q2");
        assert_eq!((j.runtime_ms, j.ramp_ms), (2500, 0));
        assert!(j.direct && j.pin);
        assert_eq!(j.ioengine, "io_uring");
    }

    #[test]
    fn parameters_override_the_name() {
        let p = params(
            "agent.fio#a.job=read-1m-qd8-q1 agent.fio#a.numjobs=2 agent.fio.bs=128k \
             agent.fio#a.size=256m agent.fio.pin=0 agent.fio.args=--verify=0,--rate_iops=10",
            "fio#a",
        );
        let j = job(&p).expect("job");
        assert_eq!(j.name(), "read-128k-qd8-q2");
        assert_eq!(j.size, Some(256 << 20));
        assert!(!j.pin);
        assert_eq!(j.extra, vec!["--verify=0", "--rate_iops=10"]);
        let a = j.args(DISK, 1 << 30, &[0, 1]).expect("args");
        assert!(a.iter().any(|x| x == "--size=134217728"), "{a:?}");
        assert!(
            a.iter().any(|x| x == "--offset_increment=134217728"),
            "{a:?}"
        );
        assert!(!a.iter().any(|x| x.starts_with("--cpus_allowed")), "{a:?}");
    }

    #[test]
    fn defaults_without_a_name() {
        let j = job(&params("agent.run=fio", "fio")).expect("job");
        assert_eq!(j.name(), "randread-4k-qd1-q1");
        let j = job(&params("agent.fio#x.rw=write", "fio#x")).expect("job");
        assert_eq!(j.name(), "write-4k-qd1-q1");
    }

    #[test]
    fn bad_parameters_fail() {
        for cmdline in [
            "agent.fio.job=randread-4k-qd0-q1",
            "agent.fio.rw=trim",
            "agent.fio.bs=100",
            "agent.fio.iodepth=x",
            "agent.fio.runtime=-1",
            "agent.fio.size=lots",
        ] {
            assert!(job(&params(cmdline, "fio")).is_err(), "{cmdline}");
        }
    }
}
