//! `dontcache` and `buffered`: buffered writes with and without
//! `RWF_DONTCACHE`, on the disk or on a file.
//!
//! Parameters (scoped by the workload's name): `path` (`/dev/vda`),
//! `offset_mib` (128), `mib` (16), `bs_kib` (1024), `seed` (3), `fsync`
//! (true), `verify` (true), `allow_unsupported` (false: an `EOPNOTSUPP`
//! from `pwritev2(RWF_DONTCACHE)` fails the workload).
//!
//! Reports throughput, whether the kernel accepted the flag, and the
//! guest's own page cache (`Cached + Buffers` in `/proc/meminfo`) before, at its peak
//! and after, which `RWF_DONTCACHE` keeps flat.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use guest_agent::pattern;
use serde_json::{json, Value};

use super::{mb_per_s, verify_pattern, DISK};
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys::{self, AlignedBuf};

const MIB: u64 = 1 << 20;

/// What to write and how.
pub struct WriteJob<'a> {
    /// Device or file.
    pub path: &'a Path,
    /// Byte offset.
    pub offset: u64,
    /// Bytes to write.
    pub len: u64,
    /// Bytes per `pwritev2`.
    pub bs: u64,
    /// Pattern seed.
    pub seed: u64,
    /// `pwritev2` flags (`RWF_DONTCACHE` or 0).
    pub flags: libc::c_int,
    /// fsync at the end.
    pub fsync: bool,
    /// Read back with O_DIRECT and check.
    pub verify: bool,
    /// Create the file if missing.
    pub create: bool,
}

/// Runs a [`WriteJob`]. An `EOPNOTSUPP` on the first write is reported as
/// `"supported": false` rather than as an error.
pub fn write_job(job: &WriteJob) -> Result<Value> {
    let name = job.path.display().to_string();
    if job.bs == 0 || job.bs % pattern::BLOCK as u64 != 0 || job.offset % pattern::BLOCK as u64 != 0
    {
        return Err(Error::Check(format!(
            "bad sizes bs={} offset={}",
            job.bs, job.offset
        )));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(job.create)
        .truncate(false)
        .open(job.path)
        .ctx(|| format!("open {name}"))?;
    let cached_before = sys::page_cache_kib();
    let mut cached_peak = cached_before.unwrap_or(0);
    let mut buf = AlignedBuf::new(job.bs as usize);
    let start = Instant::now();
    let mut done = 0u64;
    while done < job.len {
        let n = job.bs.min(job.len - done);
        let off = job.offset + done;
        pattern::fill(job.seed, off, &mut buf[..n as usize]);
        match sys::pwritev2_all(&f, &buf[..n as usize], off, job.flags) {
            Ok(()) => {}
            Err(e) if done == 0 && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Ok(json!({
                    "path": name,
                    "flags": job.flags,
                    "supported": false,
                    "errno": libc::EOPNOTSUPP,
                    "error": e.to_string(),
                }));
            }
            Err(e) => return Err(Error::io(format!("pwritev2 {name} at {off}"), e)),
        }
        done += n;
        if let Some(c) = sys::page_cache_kib() {
            cached_peak = cached_peak.max(c);
        }
    }
    if job.fsync {
        f.sync_all().ctx(|| format!("fsync {name}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cached_after = sys::page_cache_kib();

    let mut verified = false;
    if job.verify {
        let r = sys::open(job.path, false, true).ctx(|| format!("open {name} O_DIRECT"))?;
        let mut done = 0u64;
        while done < job.len {
            let n = job.bs.min(job.len - done);
            let off = job.offset + done;
            let chunk = &mut buf[..n as usize];
            r.read_exact_at(chunk, off)
                .ctx(|| format!("read {name} at {off}"))?;
            verify_pattern(&name, job.seed, off, chunk)?;
            done += n;
        }
        verified = true;
    }
    Ok(json!({
        "path": name,
        "flags": job.flags,
        "supported": true,
        "offset": job.offset,
        "bytes": job.len,
        "bs": job.bs,
        "seed": job.seed,
        "mb_s": mb_per_s(job.len, secs),
        "guest_page_cache_kib": {"before": cached_before, "peak": cached_peak, "after": cached_after},
        "verified": verified,
    }))
}

fn run(name: &str, p: &Params, flags: libc::c_int) -> Result<Value> {
    let path = p.get_str(name, "path", DISK);
    let job = WriteJob {
        path: Path::new(&path),
        offset: p.get(name, "offset_mib", 128u64)? * MIB,
        len: p.get(name, "mib", 16u64)? * MIB,
        bs: p.get(name, "bs_kib", 1024u64)? * 1024,
        seed: p.get(name, "seed", 3u64)?,
        flags,
        fsync: p.get_bool(name, "fsync", true),
        verify: p.get_bool(name, "verify", true),
        create: path != DISK,
    };
    let v = write_job(&job)?;
    if v["supported"] == json!(false) && !p.get_bool(name, "allow_unsupported", false) {
        return Err(Error::Check(format!(
            "pwritev2(RWF_DONTCACHE) on {path}: {}",
            v["error"].as_str().unwrap_or("not supported")
        )));
    }
    Ok(v)
}

/// `dontcache`: `pwritev2(RWF_DONTCACHE)`.
pub fn dontcache(p: &Params) -> Result<Value> {
    run("dontcache", p, sys::RWF_DONTCACHE)
}

/// `buffered`: plain buffered `pwritev2`, for comparison.
pub fn buffered(p: &Params) -> Result<Value> {
    run("buffered", p, 0)
}
