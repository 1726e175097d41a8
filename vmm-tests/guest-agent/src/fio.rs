//! fio jobs for the agent's `fio` workload: names, command lines, and the figures a benchmark
//! takes out of fio's JSON.
//!
//! A job is named like the host-driven benchmark's workloads, `<rw>-<bs>-qd<iodepth>-q<jobs>`
//! (`randread-4k-qd32-q2`, `write-1m-qd8-q1`): `q2` means two fio jobs, which
//! [`FioJob::args`] pins one to each vCPU (`cpus_allowed_policy=split`), so that both
//! virtqueues carry requests; the iodepth is per job. [`FioJob::parse_name`] reads such a name,
//! [`FioJob::args`] turns a job into fio's command line (io_uring, O_DIRECT, time based, one
//! group report in JSON) and [`summarize`] reads the result. The host harness uses the same
//! code to check the names it sends and to read what comes back, so both sides agree by
//! construction.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the fio initramfs (`build-initramfs.sh -F`) puts fio.
pub const FIO_BIN: &str = "/usr/bin/fio";

/// The completion-latency percentiles asked of fio (`--percentile_list`).
pub const PERCENTILES: [f64; 3] = [50.0, 99.0, 99.9];

/// Why a job or fio's output was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FioError {
    /// A job name or job parameter that makes no sense.
    #[error("fio job {job:?}: {why}")]
    BadJob {
        /// The job (name or parameter) in question.
        job: String,
        /// What is wrong with it.
        why: String,
    },
    /// fio's output is not the JSON expected.
    #[error("fio JSON: {0}")]
    BadJson(String),
}

fn bad_job(job: &str, why: impl Into<String>) -> FioError {
    FioError::BadJob {
        job: job.to_string(),
        why: why.into(),
    }
}

/// fio's `--rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
}

impl Rw {
    /// Parses fio's name for it.
    pub fn parse(s: &str) -> Option<Rw> {
        match s {
            "read" => Some(Rw::Read),
            "write" => Some(Rw::Write),
            "randread" => Some(Rw::RandRead),
            "randwrite" => Some(Rw::RandWrite),
            _ => None,
        }
    }

    /// fio's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
        }
    }

    /// Whether it reads (else it writes).
    pub fn is_read(self) -> bool {
        matches!(self, Rw::Read | Rw::RandRead)
    }

    /// Whether the offsets are random (else sequential).
    pub fn is_random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite)
    }
}

/// Parses a size: bytes, or a number with `k`, `m` or `g` (powers of 1024, either case).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// A size as a job name spells it: `1m` for whole MiB, `4k` for whole KiB, else bytes.
pub fn format_size(bytes: u64) -> String {
    if bytes > 0 && bytes % (1 << 20) == 0 {
        format!("{}m", bytes >> 20)
    } else if bytes > 0 && bytes % (1 << 10) == 0 {
        format!("{}k", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

/// Splits a comma-separated parameter into command-line words (a kernel command-line word
/// holds no spaces, so commas stand for them; empty words are dropped, and a fio argument
/// cannot itself contain a comma this way).
pub fn split_words(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// One fio run: what [`FioJob::args`] turns into fio's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FioJob {
    /// `--rw`.
    pub rw: Rw,
    /// `--bs`, bytes per request.
    pub bs: u64,
    /// `--iodepth`, requests in flight per job.
    pub iodepth: u32,
    /// `--numjobs`: one thread each (`--thread`).
    pub numjobs: u32,
    /// `--runtime`, measured, in milliseconds.
    pub runtime_ms: u64,
    /// `--ramp_time`, before the measured runtime, in milliseconds.
    pub ramp_ms: u64,
    /// The span the jobs work over, in bytes; `None`: the whole device.
    pub size: Option<u64>,
    /// `--direct`.
    pub direct: bool,
    /// `--ioengine`.
    pub ioengine: String,
    /// Pin job `i` to the `i`-th online CPU (`--cpus_allowed` with
    /// `--cpus_allowed_policy=split`).
    pub pin: bool,
    /// More fio arguments, appended last (so they override the ones above).
    pub extra: Vec<String>,
}

impl FioJob {
    /// A job with the defaults: 5 s measured after a 1 s ramp over the whole device, O_DIRECT,
    /// io_uring, pinned.
    pub fn new(rw: Rw, bs: u64, iodepth: u32, numjobs: u32) -> Self {
        FioJob {
            rw,
            bs,
            iodepth,
            numjobs,
            runtime_ms: 5000,
            ramp_ms: 1000,
            size: None,
            direct: true,
            ioengine: "io_uring".into(),
            pin: true,
            extra: Vec::new(),
        }
    }

    /// Parses a name made by [`FioJob::name`], `<rw>-<bs>-qd<iodepth>-q<jobs>`, with the
    /// defaults of [`FioJob::new`] for the rest.
    pub fn parse_name(name: &str) -> Result<Self, FioError> {
        let parts: Vec<&str> = name.split('-').collect();
        let [rw, bs, qd, q] = parts.as_slice() else {
            return Err(bad_job(
                name,
                "expected <read|write|randread|randwrite>-<bs>-qd<N>-q<N>",
            ));
        };
        let rw = Rw::parse(rw).ok_or_else(|| bad_job(name, format!("unknown rw {rw:?}")))?;
        let bs = parse_size(bs)
            .filter(|b| *b >= 512 && b % 512 == 0)
            .ok_or_else(|| bad_job(name, format!("bad block size {bs:?}")))?;
        let iodepth = qd
            .strip_prefix("qd")
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| bad_job(name, format!("bad iodepth {qd:?} (qd1..qd1024)")))?;
        let numjobs = q
            .strip_prefix('q')
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| bad_job(name, format!("bad job count {q:?} (q1..q64)")))?;
        Ok(FioJob::new(rw, bs, iodepth, numjobs))
    }

    /// The job's name, e.g. `randread-4k-qd32-q2`.
    pub fn name(&self) -> String {
        format!(
            "{}-{}-qd{}-q{}",
            self.rw.as_str(),
            format_size(self.bs),
            self.iodepth,
            self.numjobs
        )
    }

    /// Whether MiB/s rather than IOPS is the headline figure (blocks of 64 KiB and more).
    pub fn is_bandwidth(&self) -> bool {
        self.bs >= 64 << 10
    }

    /// fio's command line (without the program) for `filename`, a device of `dev_size`
    /// bytes, on the online CPUs `cpus`.
    ///
    /// Random jobs all work over the whole span; sequential jobs beyond the first each stream
    /// through their own slice (`--size` of a slice, `--offset_increment`), as the host-driven
    /// bench's queues do.
    pub fn args(
        &self,
        filename: &str,
        dev_size: u64,
        cpus: &[usize],
    ) -> Result<Vec<String>, FioError> {
        let name = self.name();
        if self.bs == 0 || self.iodepth == 0 || self.numjobs == 0 {
            return Err(bad_job(&name, "bs, iodepth and numjobs must be positive"));
        }
        let span = self.size.unwrap_or(dev_size).min(dev_size) / self.bs * self.bs;
        let slice = if self.rw.is_random() || self.numjobs == 1 {
            span
        } else {
            span / u64::from(self.numjobs) / self.bs * self.bs
        };
        if slice < self.bs {
            return Err(bad_job(
                &name,
                format!("span of {span} bytes too small for {} jobs", self.numjobs),
            ));
        }
        let mut a = vec![
            format!("--name={name}"),
            format!("--filename={filename}"),
            format!("--rw={}", self.rw.as_str()),
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
            format!("--numjobs={}", self.numjobs),
            format!("--ioengine={}", self.ioengine),
            format!("--direct={}", u8::from(self.direct)),
            "--time_based".into(),
            format!("--runtime={}ms", self.runtime_ms.max(1)),
            format!("--ramp_time={}ms", self.ramp_ms),
            format!("--size={slice}"),
            "--group_reporting".into(),
            "--output-format=json".into(),
            format!(
                "--percentile_list={}",
                PERCENTILES.map(|p| p.to_string()).join(":")
            ),
            "--thread".into(),
            "--randrepeat=0".into(),
            "--norandommap".into(),
        ];
        if slice != span {
            a.push(format!("--offset_increment={slice}"));
        }
        if self.pin && !cpus.is_empty() {
            let n = (self.numjobs as usize).min(cpus.len());
            let list: Vec<String> = cpus[..n].iter().map(usize::to_string).collect();
            a.push(format!("--cpus_allowed={}", list.join(",")));
            a.push("--cpus_allowed_policy=split".into());
        }
        a.extend(self.extra.iter().cloned());
        Ok(a)
    }
}

/// The figures of one fio run (the group report of all its jobs, in the job's direction).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FioSummary {
    /// fio's version (`fio version`).
    pub version: String,
    /// I/Os per second, all jobs.
    pub iops: f64,
    /// Bytes per second, all jobs.
    pub bw_bytes: f64,
    /// Bytes moved in the measured time.
    pub io_bytes: u64,
    /// I/Os completed in the measured time (the ramp excluded).
    pub total_ios: u64,
    /// The measured time summed over the jobs, in milliseconds (`job_runtime`).
    pub job_runtime_ms: u64,
    /// Completion latency (submission to completion) mean, in microseconds.
    pub clat_mean_us: f64,
    /// Completion latency percentiles, in microseconds, as in [`PERCENTILES`].
    pub clat_pct_us: [f64; 3],
    /// fio's user CPU, in percent of one CPU per job (`usr_cpu`).
    pub usr_cpu: f64,
    /// fio's system CPU, in percent of one CPU per job (`sys_cpu`).
    pub sys_cpu: f64,
    /// Context switches (`ctx`).
    pub ctx: u64,
    /// fio's error code for the group (0: none).
    pub error: i64,
}

impl FioSummary {
    /// fio's own CPU time over the measured time, all jobs, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        (self.usr_cpu + self.sys_cpu) / 100.0 * self.job_runtime_ms as f64 / 1000.0
    }

    /// MiB per second.
    pub fn mib_s(&self) -> f64 {
        self.bw_bytes / f64::from(1u32 << 20)
    }
}

/// The JSON document in fio's standard output (fio may print notes before it).
pub fn json_start(stdout: &str) -> Option<&str> {
    stdout.find('{').map(|i| &stdout[i..])
}

/// Takes the figures for direction `rw` out of fio's JSON (`--output-format=json
/// --group_reporting`, so one entry in `jobs`).
pub fn summarize(v: &Value, rw: Rw) -> Result<FioSummary, FioError> {
    let job = &v["jobs"][0];
    if !job.is_object() {
        return Err(FioError::BadJson("no jobs".into()));
    }
    let dir = if rw.is_read() {
        &job["read"]
    } else {
        &job["write"]
    };
    let num = |x: &Value, what: &str| {
        x.as_f64()
            .ok_or_else(|| FioError::BadJson(format!("no {what}")))
    };
    let total_ios = num(&dir["total_ios"], "total_ios")? as u64;
    if total_ios == 0 {
        return Err(FioError::BadJson(format!(
            "no {} completed",
            if rw.is_read() { "reads" } else { "writes" }
        )));
    }
    let clat = &dir["clat_ns"];
    let pct = clat["percentile"]
        .as_object()
        .ok_or_else(|| FioError::BadJson("no clat_ns.percentile".into()))?;
    let mut clat_pct_us = [0.0; 3];
    for (slot, want) in clat_pct_us.iter_mut().zip(PERCENTILES) {
        // Keys look like "99.900000": compare them as numbers.
        let ns = pct
            .iter()
            .find(|(k, _)| k.parse::<f64>().is_ok_and(|p| (p - want).abs() < 1e-6))
            .and_then(|(_, v)| v.as_f64())
            .ok_or_else(|| FioError::BadJson(format!("no clat percentile {want}")))?;
        *slot = ns / 1000.0;
    }
    Ok(FioSummary {
        version: v["fio version"].as_str().unwrap_or("").to_string(),
        iops: num(&dir["iops"], "iops")?,
        bw_bytes: num(&dir["bw_bytes"], "bw_bytes")?,
        io_bytes: num(&dir["io_bytes"], "io_bytes")? as u64,
        total_ios,
        job_runtime_ms: num(&job["job_runtime"], "job_runtime")? as u64,
        clat_mean_us: num(&clat["mean"], "clat_ns.mean")? / 1000.0,
        clat_pct_us,
        usr_cpu: num(&job["usr_cpu"], "usr_cpu")?,
        sys_cpu: num(&job["sys_cpu"], "sys_cpu")?,
        ctx: job["ctx"].as_u64().unwrap_or(0),
        error: job["error"].as_i64().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn names_round_trip() {
        for n in [
            "randread-4k-qd32-q2",
            "randwrite-4k-qd32-q2",
            "randread-4k-qd1-q1",
            "randwrite-4k-qd1-q1",
            "read-1m-qd8-q1",
            "write-1m-qd8-q1",
        ] {
            let j = FioJob::parse_name(n).expect("parse");
            assert_eq!(j.name(), n);
        }
        let j = FioJob::parse_name("randwrite-4k-qd32-q2").expect("parse");
        assert_eq!(
            (j.rw, j.bs, j.iodepth, j.numjobs),
            (Rw::RandWrite, 4096, 32, 2)
        );
        assert!(!j.is_bandwidth());
        assert!(FioJob::parse_name("read-1m-qd8-q1")
            .expect("parse")
            .is_bandwidth());
        for bad in [
            "randread-4k-qd0-q1",
            "trim-4k-qd1-q1",
            "randread-4k-qd1",
            "randread-100-qd1-q1",
            "randread-4k-qd1-q0",
            "randread-4k-32-q1",
        ] {
            assert!(FioJob::parse_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1M"), Some(MIB));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("4x"), None);
        assert_eq!(format_size(4096), "4k");
        assert_eq!(format_size(MIB), "1m");
        assert_eq!(format_size(512), "512");
    }

    #[test]
    fn words() {
        assert_eq!(
            split_words("--rate_iops=100,,--verify=crc32c"),
            vec!["--rate_iops=100", "--verify=crc32c"]
        );
        assert!(split_words("").is_empty());
    }

    #[test]
    fn random_q2_args_pin_one_job_per_cpu() {
        let j = FioJob::parse_name("randread-4k-qd32-q2").expect("parse");
        let a = j.args("/dev/vda", 1024 * MIB, &[0, 1]).expect("args");
        for want in [
            "--name=randread-4k-qd32-q2",
            "--filename=/dev/vda",
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--numjobs=2",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--runtime=5000ms",
            "--ramp_time=1000ms",
            "--size=1073741824",
            "--group_reporting",
            "--output-format=json",
            "--percentile_list=50:99:99.9",
            "--thread",
            "--cpus_allowed=0,1",
            "--cpus_allowed_policy=split",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--offset_increment")));
    }

    #[test]
    fn one_job_pins_to_the_first_cpu() {
        let j = FioJob::parse_name("randwrite-4k-qd1-q1").expect("parse");
        let a = j.args("/dev/vda", 1024 * MIB, &[0, 1]).expect("args");
        assert!(a.iter().any(|x| x == "--cpus_allowed=0"), "{a:?}");
        let mut j = j;
        j.pin = false;
        let a = j.args("/dev/vda", 1024 * MIB, &[0, 1]).expect("args");
        assert!(!a.iter().any(|x| x.starts_with("--cpus_allowed")), "{a:?}");
    }

    #[test]
    fn sequential_jobs_get_their_own_slices() {
        let mut j = FioJob::parse_name("write-1m-qd8-q2").expect("parse");
        j.runtime_ms = 2000;
        j.ramp_ms = 0;
        j.extra = vec!["--verify=0".into()];
        let a = j.args("/dev/vda", 1000 * MIB + 5, &[0, 1]).expect("args");
        assert!(a.iter().any(|x| x == "--size=524288000"), "{a:?}");
        assert!(
            a.iter().any(|x| x == "--offset_increment=524288000"),
            "{a:?}"
        );
        assert!(a.iter().any(|x| x == "--runtime=2000ms"), "{a:?}");
        assert!(a.iter().any(|x| x == "--ramp_time=0ms"), "{a:?}");
        assert_eq!(a.last().map(String::as_str), Some("--verify=0"));
        j.size = Some(MIB / 2);
        assert!(j.args("/dev/vda", 1000 * MIB, &[0, 1]).is_err());
    }

    const FIO_JSON: &str = r#"{
      "fio version" : "fio-3.33",
      "jobs" : [ {
        "jobname" : "randread-4k-qd32-q2", "error" : 0, "job_runtime" : 10000,
        "usr_cpu" : 12.5, "sys_cpu" : 37.5, "ctx" : 4242,
        "read" : { "io_bytes" : 409600000, "bw_bytes" : 40960000, "iops" : 10000.0,
                   "total_ios" : 100000,
                   "clat_ns" : { "mean" : 3200000.5,
                                 "percentile" : { "50.000000" : 3000000, "99.000000" : 9000000,
                                                  "99.900000" : 12000000 } } },
        "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "total_ios" : 0,
                    "clat_ns" : { "mean" : 0.0 } }
      } ]
    }"#;

    #[test]
    fn summarizes_fio_json() {
        let text = format!("note: something\n{FIO_JSON}");
        let v: Value = serde_json::from_str(json_start(&text).expect("json")).expect("parse");
        let s = summarize(&v, Rw::RandRead).expect("summary");
        assert_eq!(s.version, "fio-3.33");
        assert_eq!(s.total_ios, 100_000);
        assert_eq!(s.iops, 10_000.0);
        assert_eq!(s.clat_pct_us, [3000.0, 9000.0, 12000.0]);
        assert!((s.clat_mean_us - 3200.0005).abs() < 1e-9);
        assert!((s.cpu_seconds() - 5.0).abs() < 1e-9);
        assert!((s.mib_s() - 40_960_000.0 / 1_048_576.0).abs() < 1e-9);
        assert_eq!(s.ctx, 4242);
        // The write side did nothing: no figures for it.
        assert!(summarize(&v, Rw::Write).is_err());
        assert!(summarize(&serde_json::json!({}), Rw::Read).is_err());
    }
}
