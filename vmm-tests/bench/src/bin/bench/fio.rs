//! fio on the host, straight on the image: the ceiling without any
//! virtualization. Same workload, one fio job per queue, io_uring, the page
//! cache left as the benchmark set it (`--invalidate=0`). On an RBD image,
//! fio's `rbd` engine instead: librbd straight from fio, one image handle
//! per job.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::driver::RawRun;
use super::error::{bail, Context, Result};
use super::peers::Store;
use super::workload::{Op, Pattern, Workload};
use vmm_bench::procstat::host_cpu;

/// What fio measured, in the driver's terms, plus its percentiles.
pub struct FioRun {
    /// Counts and CPU (fio's own, user + system, as both "backend" and client).
    pub raw: RawRun,
    /// Completion latency p50, p99, p99.9 in nanoseconds.
    pub pcts: [f64; 3],
}

/// Runs `w` with fio on `store` (`direct` applies to a file only).
pub fn run(
    fio: &Path,
    store: Store<'_>,
    image_size: u64,
    w: &Workload,
    direct: bool,
    ramp: Duration,
    runtime: Duration,
) -> Result<FioRun> {
    let rw = match (w.pattern, w.op) {
        (Pattern::Random, Op::Read) => "randread",
        (Pattern::Random, Op::Write) => "randwrite",
        (Pattern::Sequential, Op::Read) => "read",
        (Pattern::Sequential, Op::Write) => "write",
    };
    let mut cmd = Command::new(fio);
    cmd.arg("--name=bench");
    let rbd = match store {
        Store::Rbd(r) => Some(r),
        Store::File(_) => None,
    };
    match store {
        Store::File(image) => {
            cmd.arg(format!("--filename={}", image.display()))
                .arg("--ioengine=io_uring")
                .arg(format!("--direct={}", u8::from(direct)))
                .arg("--invalidate=0");
        }
        Store::Rbd(r) => {
            // fio's rbd engine reads librados's default config: point it at
            // the cluster's, with librbd's cache off as for the other RBD
            // peers.
            cmd.env("CEPH_CONF", &r.fio_conf)
                .arg("--ioengine=rbd")
                .arg("--clientname=admin")
                .arg(format!("--pool={}", r.pool))
                .arg(format!("--rbdname={}", r.image));
        }
    }
    cmd.arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.block_size))
        .arg(format!("--iodepth={}", w.iodepth))
        .arg(format!("--numjobs={}", w.queues))
        .arg("--time_based")
        .arg(format!("--runtime={}ms", runtime.as_millis().max(1)))
        .arg(format!("--ramp_time={}ms", ramp.as_millis()))
        .arg("--group_reporting")
        .arg("--output-format=json")
        .arg("--percentile_list=50:99:99.9")
        .arg("--randrepeat=0")
        .arg("--norandommap")
        .arg("--thread");
    if w.pattern == Pattern::Sequential && w.queues > 1 {
        // Each job streams through its own slice, as the driver's queues do.
        let slice = image_size / u64::from(w.queues) / w.block_size * w.block_size;
        cmd.arg(format!("--size={slice}"))
            .arg(format!("--offset_increment={slice}"));
    } else {
        cmd.arg(format!("--size={image_size}"));
    }
    let (h0, c0, t0) = (host_cpu()?, children_cpu_seconds(), Instant::now());
    let out = cmd.output().ctx(|| format!("run {}", fio.display()))?;
    let (h1, c1, wall) = (
        host_cpu()?,
        children_cpu_seconds(),
        t0.elapsed().as_secs_f64(),
    );
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json = text
        .find('{')
        .map(|i| &text[i..])
        .ctx(|| "fio printed no JSON")?;
    let v: Value = serde_json::from_str(json).ctx(|| "parse fio's JSON")?;
    let mut run = parse(&v, w)?;
    // The host's busy time less fio's own over fio's whole life, scaled to
    // the measured window.
    let host = h1 - h0;
    let share = if wall > 0.0 {
        run.raw.seconds / wall
    } else {
        0.0
    };
    run.raw.others_s = (host.busy - (c1 - c0)).max(0.0) * share;
    if rbd.is_some() {
        // librbd works in its own threads, which fio's per-job CPU figures
        // leave out: charge fio the whole process's, scaled to the window.
        run.raw.backend_cpu_s = (c1 - c0) * share;
        run.raw.client_cpu_s = run.raw.backend_cpu_s;
    }
    run.raw.steal_s = host.steal * share;
    Ok(run)
}

/// User + system CPU seconds of this process's reaped children.
fn children_cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer it is given,
    // which points to a properly sized, writable value.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded, so it initialised the value.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn parse(v: &Value, w: &Workload) -> Result<FioRun> {
    let job = &v["jobs"][0];
    let dir = match w.op {
        Op::Read => &job["read"],
        Op::Write => &job["write"],
    };
    let num = |x: &Value, what: &str| x.as_f64().ctx(|| format!("fio JSON: no {what}"));
    let ios = num(&dir["total_ios"], "total_ios")?;
    let bytes = num(&dir["io_bytes"], "io_bytes")?;
    let iops = num(&dir["iops"], "iops")?;
    // job_runtime is summed over the jobs of the group.
    let runtime_s = num(&job["job_runtime"], "job_runtime")? / 1000.0;
    let cpu_pct = num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?;
    let cpu_s = cpu_pct / 100.0 * runtime_s;
    let p = &dir["clat_ns"]["percentile"];
    let pct = |k: &str| num(&p[k], &format!("clat percentile {k}"));
    let pcts = [pct("50.000000")?, pct("99.000000")?, pct("99.900000")?];
    let seconds = if iops > 0.0 { ios / iops } else { 0.0 };
    Ok(FioRun {
        raw: RawRun {
            ios: ios as u64,
            bytes: bytes as u64,
            seconds,
            lat_ns: Vec::new(),
            backend_cpu_s: cpu_s,
            client_cpu_s: cpu_s,
            others_s: 0.0,
            steal_s: 0.0,
            backend: None,
        },
        pcts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let v: Value = serde_json::from_str(
            r#"{"jobs":[{"usr_cpu":20.0,"sys_cpu":30.0,"job_runtime":2000,
            "read":{"iops":1000.0,"total_ios":1000,"io_bytes":4096000,
            "clat_ns":{"percentile":{"50.000000":8000,"99.000000":9000,"99.900000":10000}}}}]}"#,
        )
        .expect("test JSON");
        let w = Workload::rand4k(Op::Read, 8, 2);
        let r = parse(&v, &w).expect("parse");
        assert_eq!(r.raw.ios, 1000);
        assert!((r.raw.backend_cpu_s - 1.0).abs() < 1e-9);
        assert_eq!(r.pcts, [8000.0, 9000.0, 10000.0]);
    }
}
