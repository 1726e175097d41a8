//! Small workloads: `flush`, `discard`, `readonly`, `idle`.
//!
//! - `flush`: `count` (32) rounds of a 4 KiB O_DIRECT write at `offset_mib`
//!   (200) followed by `fdatasync`; reports the mean and max latency.
//! - `discard`: `BLKDISCARD` over `mib` (4) at `offset_mib` (208); when the
//!   disk advertises no discard (`discard_max_bytes` is 0) it reports
//!   `"supported": false` without failing.
//! - `readonly`: tries to open the disk for writing and to write a block
//!   with O_DIRECT at `offset_mib` (0); succeeds only if the guest cannot
//!   write, and reports the errors it got.
//! - `idle`: prints `AGENT-READY {"workload":"idle"}` (the instance's
//!   name) and sleeps `secs`
//!   (default 3600) so that the host can act on a quiet guest.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::pattern;
use serde_json::{json, Value};

use super::DISK;
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys::{self, AlignedBuf};

const MIB: u64 = 1 << 20;

/// `flush`.
pub fn flush(p: &Params) -> Result<Value> {
    let count: u32 = p.get("flush", "count", 32)?;
    let offset = p.get("flush", "offset_mib", 200u64)? * MIB;
    let f = sys::open(Path::new(DISK), true, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
    let mut buf = AlignedBuf::new(pattern::BLOCK);
    let (mut total, mut max) = (Duration::ZERO, Duration::ZERO);
    for i in 0..count {
        let off = offset + u64::from(i) * pattern::BLOCK as u64;
        pattern::fill(5, off, &mut buf);
        f.write_all_at(&buf, off)
            .ctx(|| format!("write {DISK} at {off}"))?;
        let t = Instant::now();
        f.sync_data().ctx(|| format!("fdatasync {DISK}"))?;
        let d = t.elapsed();
        total += d;
        max = max.max(d);
    }
    Ok(json!({
        "count": count,
        "mean_us": if count > 0 { total.as_micros() as u64 / u64::from(count) } else { 0 },
        "max_us": max.as_micros() as u64,
    }))
}

/// `discard`.
pub fn discard(p: &Params) -> Result<Value> {
    let offset = p.get("discard", "offset_mib", 208u64)? * MIB;
    let len = p.get("discard", "mib", 4u64)? * MIB;
    let max: u64 = std::fs::read_to_string("/sys/block/vda/queue/discard_max_bytes")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let f = sys::open(Path::new(DISK), true, false).ctx(|| format!("open {DISK}"))?;
    if max == 0 {
        let errno = sys::blk_discard(&f, offset, len)
            .err()
            .and_then(|e| e.raw_os_error());
        return Ok(json!({"supported": false, "discard_max_bytes": 0, "errno": errno}));
    }
    let t = Instant::now();
    sys::blk_discard(&f, offset, len).ctx(|| format!("BLKDISCARD {DISK} {offset}+{len}"))?;
    Ok(json!({
        "supported": true,
        "discard_max_bytes": max,
        "offset": offset,
        "bytes": len,
        "us": t.elapsed().as_micros() as u64,
    }))
}

/// `readonly`.
pub fn readonly(p: &Params) -> Result<Value> {
    let offset = p.get("readonly", "offset_mib", 0u64)? * MIB;
    let ro_flag = std::fs::read_to_string("/sys/block/vda/ro")
        .ok()
        .map(|s| s.trim() == "1");
    let mut report = json!({"sysfs_ro": ro_flag});
    match sys::open(Path::new(DISK), true, true) {
        Err(e) => {
            report["open_rw_error"] = json!(e.to_string());
            report["open_rw_errno"] = json!(e.raw_os_error());
        }
        Ok(f) => {
            report["open_rw_error"] = Value::Null;
            let mut buf = AlignedBuf::new(pattern::BLOCK);
            pattern::fill(6, offset, &mut buf);
            match f.write_all_at(&buf, offset).and_then(|()| f.sync_data()) {
                Ok(()) => {
                    return Err(Error::Check(format!(
                        "{DISK} accepted a write at {offset} although it should be read-only"
                    )))
                }
                Err(e) => {
                    report["write_error"] = json!(e.to_string());
                    report["write_errno"] = json!(e.raw_os_error());
                }
            }
        }
    }
    // Reading must still work.
    let r = sys::open(Path::new(DISK), false, true).ctx(|| format!("open {DISK} read-only"))?;
    let mut buf = AlignedBuf::new(pattern::BLOCK);
    r.read_exact_at(&mut buf, offset)
        .ctx(|| format!("read {DISK} at {offset}"))?;
    report["read_ok"] = json!(true);
    report["rejected"] = json!(true);
    Ok(report)
}

/// `idle`.
pub fn idle(p: &Params) -> Result<Value> {
    let secs: f64 = p.get("idle", "secs", 3600.0)?;
    super::ready(p)?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    Ok(json!({"slept_s": secs}))
}
