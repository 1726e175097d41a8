//! `migrate`: I/O that keeps going while the host live-migrates the VM, and checks afterwards
//! that the guest memory the backend wrote made it to the destination and that no write was lost.
//!
//! Parameters: `read_offset_mib` (0) and `read_mib` (8): a region the host filled with the
//! pattern of `read_seed` (31) before boot; `write_offset_mib` (64) and `write_mib` (16): where
//! the writer writes tagged blocks of `bs_kib` (4) under seeds from `seed` (33); `stop_offset_mib`
//! (128): a block the host starts with `MIGRATE_STOP` when it is done migrating; `max_secs` (600).
//!
//! - The page-cache reader drops the read region from the guest's page cache
//!   (`POSIX_FADV_DONTNEED`), reads it back (the backend writes fresh page-cache pages by DMA),
//!   checks it, then checks it twice more from the cache without I/O. A page the backend wrote
//!   that the migration did not send again (a read not in the dirty log) is stale on the
//!   destination: the next check from the cache fails on it.
//! - The direct reader keeps 32 buffers of 64 KiB: each round poisons each buffer (a vCPU write,
//!   which QEMU tracks itself), reads a chunk of the region into it with `O_DIRECT` (a DMA write
//!   only the backend's log reports), checks it, and at the end of the round checks every buffer
//!   again from memory: a buffer still poisoned on the destination is a read the log lost.
//! - The writer writes a random block of its region under a fresh seed with `O_DIRECT`, reads it
//!   back and checks it, and remembers each block's last seed and its longest round (write and
//!   read back, in guest time: a migration's downtime does not count, a stall after it does).
//!
//! - The sentinel makes one check per hop that cannot pass without the dirty log. It keeps
//!   16 buffers of 64 KiB, poisoned by a vCPU write before the hop's migration starts, so QEMU's
//!   first pass sends them poisoned. The host holds the migration open after that first pass and
//!   writes step `2n - 1` into the stop block (`MIGRATE_STEP`); the sentinel then reads a chunk
//!   of the region into each buffer with `O_DIRECT`, checks it, and says
//!   `AGENT-READY {"workload":"<instance>/read/<n>"}`. Nothing in the guest writes those pages
//!   again, so only the backend's dirty log makes QEMU send them once more: without it the
//!   destination holds the poison. After the hop the host writes step `2n`; the sentinel checks
//!   every buffer from memory, poisons them again and says `<instance>/armed/<n + 1>`.
//!
//! It prints `AGENT-READY {"workload":"<instance>"}` once all three run, and stops them when the
//! stop block holds the magic. It then checks the region from the cache and every buffer once
//! more, reads back every block written (each must hold its last seed), and reports how many
//! passes each did, the hops the sentinel checked (`sentinel_hops`) and the writer's longest
//! round (`max_write_ms`).

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guest_agent::pattern;
use serde_json::{json, Value};

use super::{ready, ready_as, verify_pattern, DISK};
use crate::cmdline::Params;
use crate::error::{Context, Error, Result};
use crate::sys::{self, AlignedBuf};

const MIB: u64 = 1 << 20;

use guest_agent::protocol::{MIGRATE_STEP as STEP_MAGIC, MIGRATE_STOP as STOP_MAGIC};

/// The byte that poisons a direct reader's buffer before each read.
const POISON: u8 = 0xd7;

/// Bytes per direct read.
const CHUNK: usize = 64 << 10;

/// Direct-read buffers kept between checks.
const BUFFERS: usize = 32;

/// Sentinel buffers (of [`CHUNK`] bytes each).
const SENTINELS: usize = 16;

/// The read region and its pattern.
#[derive(Clone, Copy)]
struct Region {
    offset: u64,
    len: u64,
    seed: u64,
}

/// Checks the whole region through the page cache (`pread` of the buffered device).
fn check_cached(f: &std::fs::File, r: Region, buf: &mut [u8]) -> Result<()> {
    let mut done = 0u64;
    while done < r.len {
        let n = (buf.len() as u64).min(r.len - done) as usize;
        let off = r.offset + done;
        f.read_exact_at(&mut buf[..n], off)
            .ctx(|| format!("read {DISK} at {off}"))?;
        verify_pattern(DISK, r.seed, off, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// Drop, read back, check, check twice more from the cache, until `stop`; then check once more
/// from the cache. Returns the passes that read from the disk.
fn page_cache_reader(r: Region, stop: &AtomicBool, passes: &AtomicU64) -> Result<()> {
    let f = sys::open(Path::new(DISK), false, false).ctx(|| format!("open {DISK}"))?;
    let mut buf = vec![0u8; 256 << 10];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: plain fadvise on an open descriptor.
        let rc = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                r.offset as libc::off_t,
                r.len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                "posix_fadvise(DONTNEED)",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        check_cached(&f, r, &mut buf)?;
        for _ in 0..2 {
            check_cached(&f, r, &mut buf)?;
        }
        passes.fetch_add(1, Ordering::Relaxed);
    }
    check_cached(&f, r, &mut buf)
}

/// Checks that direct buffer `buf` holds the region's chunk at `off`.
fn check_direct(buf: &[u8], off: u64, r: Region) -> Result<()> {
    if buf.iter().all(|&b| b == POISON) {
        return Err(Error::Check(format!(
            "direct read of {DISK} at {off}: the buffer still holds the poison after the read \
             completed (the backend's write of it was lost)"
        )));
    }
    verify_pattern(DISK, r.seed, off, buf)
}

/// Poison, read with O_DIRECT, check; every buffer again at the end of each round and once
/// more at the end.
fn direct_reader(r: Region, stop: &AtomicBool, rounds: &AtomicU64) -> Result<()> {
    let f = sys::open(Path::new(DISK), false, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
    let chunks = (r.len / CHUNK as u64).max(1);
    let mut bufs: Vec<(AlignedBuf, u64)> = (0..BUFFERS)
        .map(|_| (AlignedBuf::new(CHUNK), u64::MAX))
        .collect();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    while !stop.load(Ordering::Relaxed) {
        for (buf, at) in bufs.iter_mut() {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            let off = r.offset + (rng.wrapping_mul(0x9E37_79B9_7F4A_7C15) % chunks) * CHUNK as u64;
            buf.fill(POISON);
            f.read_exact_at(buf, off)
                .ctx(|| format!("read {DISK} at {off}"))?;
            check_direct(buf, off, r)?;
            *at = off;
        }
        for (buf, at) in &bufs {
            check_direct(buf, *at, r)?;
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    for (buf, at) in bufs.iter().filter(|(_, at)| *at != u64::MAX) {
        check_direct(buf, *at, r)?;
    }
    Ok(())
}

/// Write a random block under a fresh seed, read it back, check; until `stop`. Returns each
/// block's last seed (0: never written) and the longest round.
fn writer(
    base: u64,
    len: u64,
    bs: u64,
    seed: u64,
    stop: &AtomicBool,
) -> Result<(Vec<u64>, Duration)> {
    let f = sys::open(Path::new(DISK), true, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
    let slots = len / bs;
    let mut seeds = vec![0u64; slots as usize];
    let mut buf = AlignedBuf::new(bs as usize);
    let mut rng = seed | 1;
    let mut n = 0u64;
    let mut longest = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        let slot = rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % slots;
        let off = base + slot * bs;
        n += 1;
        let s = (seed << 32) ^ n;
        pattern::fill(s, off, &mut buf);
        f.write_all_at(&buf, off)
            .ctx(|| format!("write {DISK} at {off}"))?;
        seeds[slot as usize] = s;
        buf.fill(POISON);
        f.read_exact_at(&mut buf, off)
            .ctx(|| format!("read {DISK} at {off}"))?;
        verify_pattern(DISK, s, off, &buf)?;
        longest = longest.max(round.elapsed());
    }
    Ok((seeds, longest))
}

/// What the host wrote into the stop block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// Nothing yet.
    Run,
    /// A sentinel step.
    Step(u64),
    /// Stop and check.
    Stop,
}

/// Reads the stop block.
fn control(f: &std::fs::File, at: u64, buf: &mut AlignedBuf) -> Result<Control> {
    f.read_exact_at(&mut buf[..pattern::BLOCK], at)
        .ctx(|| format!("read {DISK} at {at}"))?;
    if buf.starts_with(STOP_MAGIC) {
        return Ok(Control::Stop);
    }
    if let Some(rest) = buf.strip_prefix(STEP_MAGIC) {
        let mut n = [0u8; 8];
        n.copy_from_slice(&rest[..8]);
        return Ok(Control::Step(u64::from_le_bytes(n)));
    }
    Ok(Control::Run)
}

/// The sentinel buffers, the hop they are armed for, and where each was read from.
struct Sentinel {
    bufs: Vec<(AlignedBuf, u64)>,
    hop: u64,
    read: bool,
    checked: u64,
}

impl Sentinel {
    /// Buffers poisoned by a vCPU write, armed for hop 1.
    fn new(r: Region) -> Self {
        let chunks = (r.len / CHUNK as u64).max(1);
        let bufs = (0..SENTINELS as u64)
            .map(|i| {
                let mut b = AlignedBuf::new(CHUNK);
                b.fill(POISON);
                (b, r.offset + (i * 7 % chunks) * CHUNK as u64)
            })
            .collect();
        Sentinel {
            bufs,
            hop: 1,
            read: false,
            checked: 0,
        }
    }

    /// Acts on step `step` of the host (a step seen before is ignored).
    fn step(&mut self, step: u64, f: &std::fs::File, r: Region, instance: &str) -> Result<()> {
        if !self.read && step == 2 * self.hop - 1 {
            for (buf, off) in self.bufs.iter_mut() {
                f.read_exact_at(buf, *off)
                    .ctx(|| format!("read {DISK} at {off}"))?;
                check_direct(buf, *off, r)?;
            }
            self.read = true;
            ready_as(&format!("{instance}/read/{}", self.hop))
        } else if self.read && step == 2 * self.hop {
            self.check(r).map_err(|e| {
                Error::Check(format!(
                    "sentinel after hop {}: {e} (read while the migration ran, after its \
                     first pass, and never written by the guest: only the dirty log makes \
                     QEMU send it again)",
                    self.hop
                ))
            })?;
            self.checked += 1;
            for (buf, _) in self.bufs.iter_mut() {
                buf.fill(POISON);
            }
            self.hop += 1;
            self.read = false;
            ready_as(&format!("{instance}/armed/{}", self.hop))
        } else {
            Ok(())
        }
    }

    /// Checks every buffer from memory, if they were read.
    fn check(&self, r: Region) -> Result<()> {
        if self.read {
            for (buf, off) in &self.bufs {
                check_direct(buf, *off, r)?;
            }
        }
        Ok(())
    }
}

/// Tells the other threads to stop when `r` is an error.
fn stop_on_error<T>(stop: &AtomicBool, r: Result<T>) -> Result<T> {
    if r.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    r
}

/// `migrate`.
pub fn run(p: &Params) -> Result<Value> {
    let w = "migrate";
    let region = Region {
        offset: p.get(w, "read_offset_mib", 0u64)? * MIB,
        len: p.get(w, "read_mib", 8u64)? * MIB,
        seed: p.get(w, "read_seed", 31u64)?,
    };
    let write_offset = p.get(w, "write_offset_mib", 64u64)? * MIB;
    let write_len = p.get(w, "write_mib", 16u64)? * MIB;
    let bs = p.get(w, "bs_kib", 4u64)? * 1024;
    let seed: u64 = p.get(w, "seed", 33)?;
    let stop_at = p.get(w, "stop_offset_mib", 128u64)? * MIB;
    let max = Duration::from_secs(p.get(w, "max_secs", 600u64)?);
    if bs == 0 || bs % pattern::BLOCK as u64 != 0 || write_len < bs || region.len < CHUNK as u64 {
        return Err(Error::Check(format!(
            "{w}: bad sizes bs={bs} write={write_len} read={}",
            region.len
        )));
    }
    let control =
        sys::open(Path::new(DISK), false, true).ctx(|| format!("open {DISK} O_DIRECT"))?;
    let mut stop_buf = AlignedBuf::new(pattern::BLOCK);
    if self::control(&control, stop_at, &mut stop_buf)? != Control::Run {
        return Err(Error::Check(format!(
            "{w}: the stop block is set before the start"
        )));
    }
    let mut sentinel = Sentinel::new(region);

    let stop = AtomicBool::new(false);
    let (cache_passes, direct_rounds) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    let (cached, direct, written, waited) = std::thread::scope(|s| {
        let stop = &stop;
        let (cache_passes, direct_rounds) = (&cache_passes, &direct_rounds);
        let cached =
            s.spawn(move || stop_on_error(stop, page_cache_reader(region, stop, cache_passes)));
        let direct =
            s.spawn(move || stop_on_error(stop, direct_reader(region, stop, direct_rounds)));
        let written =
            s.spawn(move || stop_on_error(stop, writer(write_offset, write_len, bs, seed, stop)));
        // Every thread has done a pass before the host is told to start.
        let waited = (|| -> Result<()> {
            while cache_passes.load(Ordering::Relaxed) == 0
                || direct_rounds.load(Ordering::Relaxed) == 0
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            ready(p)?;
            while !stop.load(Ordering::Relaxed) {
                match self::control(&control, stop_at, &mut stop_buf)? {
                    Control::Stop => break,
                    Control::Step(n) => sentinel.step(n, &control, region, p.instance())?,
                    Control::Run => {}
                }
                if start.elapsed() > max {
                    return Err(Error::Check(format!(
                        "{w}: the host did not set the stop block within {max:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        fn panicked<T>() -> Result<T> {
            Err(Error::Check("a load thread panicked".into()))
        }
        (
            cached.join().unwrap_or_else(|_| panicked()),
            direct.join().unwrap_or_else(|_| panicked()),
            written.join().unwrap_or_else(|_| panicked()),
            waited,
        )
    });
    cached?;
    direct?;
    let (seeds, longest_write) = written?;
    waited?;
    let load_secs = start.elapsed().as_secs_f64();
    sentinel
        .check(region)
        .map_err(|e| Error::Check(format!("sentinel at the end: {e}")))?;

    // Every block written holds its last seed.
    let mut buf = AlignedBuf::new(bs as usize);
    let mut verified = 0u64;
    for (slot, &s) in seeds.iter().enumerate().filter(|(_, &s)| s != 0) {
        let off = write_offset + slot as u64 * bs;
        control
            .read_exact_at(&mut buf, off)
            .ctx(|| format!("read {DISK} at {off}"))?;
        verify_pattern(DISK, s, off, &buf)?;
        verified += 1;
    }
    Ok(json!({
        "load_secs": load_secs,
        "page_cache_passes": cache_passes.load(Ordering::Relaxed),
        "direct_rounds": direct_rounds.load(Ordering::Relaxed),
        "blocks_verified": verified,
        "sentinel_hops": sentinel.checked,
        "max_write_ms": longest_write.as_secs_f64() * 1000.0,
    }))
}
