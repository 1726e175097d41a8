//! The idle-queue check (`bench --idle-cpu SECONDS`): what a connected
//! queue costs its backend when the guest stops sending requests.
//!
//! For each peer: start the server with one queue, connect libblkio as a
//! VMM would, keep one 4 KiB random read in flight for a busy second (so
//! that any polling the backend does is fully engaged), then send nothing
//! for `idle` seconds with the connection open, and print the server's CPU
//! over that idle window as a share of one core (and, for our backend, the
//! poll sessions its `stats` counted meanwhile).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};

use super::driver::{self, CpuSnap};
use super::error::{bail, Context, Result};
use super::peers::{Kind, Peer, Server, Store};
use super::runner::Plan;
use super::stats::query_backend;

/// What one idle check measured.
#[derive(Clone, Debug)]
pub struct IdleRun {
    /// Requests completed in the busy phase.
    pub busy_ios: u64,
    /// Length of the busy phase, seconds.
    pub busy_s: f64,
    /// The server's CPU in the busy phase, seconds.
    pub busy_cpu_s: f64,
    /// Length of the idle window, seconds.
    pub idle_s: f64,
    /// The server's CPU in the idle window, seconds.
    pub idle_cpu_s: f64,
    /// Poll sessions our backend counted in the idle window (ours only).
    pub idle_polls: Option<u64>,
}

/// The sum of `polls` over the queues of a `stats` reply.
fn polls(control: &std::path::Path) -> Result<u64> {
    let s = query_backend(control)?;
    Ok(s.queues
        .iter()
        .filter_map(|q| q.extra.get("polls").and_then(serde_json::Value::as_u64))
        .sum())
}

/// Runs the check on `peer` (a server, not fio) with the plan's programs
/// and cold image.
pub fn run(plan: &Plan, peer: &Peer, busy: Duration, idle: Duration) -> Result<IdleRun> {
    let image = if peer.wants_warm_cache() {
        &plan.image_hot
    } else {
        &plan.image_cold
    };
    let server = Server::start(
        peer,
        &plan.progs,
        Store::File(image),
        plan.image_size,
        1,
        &plan.work_dir,
    )?;
    let pid = server.pid();
    let mut blkio = driver::connect(&server.socket, 1)?;
    let mut out = blkio
        .start()
        .ctx(|| format!("{}: start {}", driver::DRIVER, server.socket.display()))?;
    let capacity = blkio.get_u64("capacity").ctx(|| "blkio: capacity")?;
    let region = blkio
        .alloc_mem_region(1 << 16)
        .ctx(|| "blkio: allocate the buffer")?;
    blkio
        .map_mem_region(&region)
        .ctx(|| "blkio: map the buffer into the backend")?;
    let result = (|| -> Result<IdleRun> {
        let Some(q) = out.queues.first_mut() else {
            bail!("blkio started no queue");
        };
        let blocks = capacity / 4096;
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut completions = [MaybeUninit::<Completion>::uninit(); 1];
        let c0 = CpuSnap::take(pid)?;
        let t0 = Instant::now();
        let mut busy_ios = 0u64;
        while t0.elapsed() < busy {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let offset = (rng % blocks) * 4096;
            q.read(offset, region.addr as *mut u8, 4096, 0, ReqFlags::empty());
            let mut timeout = Duration::from_secs(10);
            let n = q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(|e| super::error::Error::msg(format!("do_io: {e}")))?;
            if n != 1 {
                bail!("no completion within 10 s");
            }
            // SAFETY: do_io initialised the first `n` (= 1) entries.
            let c = unsafe { completions[0].assume_init_ref() };
            if c.ret != 0 {
                bail!("read failed: {}", std::io::Error::from_raw_os_error(-c.ret));
            }
            busy_ios += 1;
        }
        let busy_s = t0.elapsed().as_secs_f64();
        let c1 = CpuSnap::take(pid)?;
        // Let the last poll window run out before the idle window opens.
        std::thread::sleep(Duration::from_millis(50));
        let p0 = server.control.as_deref().map(polls).transpose()?;
        let i0 = CpuSnap::take(pid)?;
        let t1 = Instant::now();
        std::thread::sleep(idle);
        let idle_s = t1.elapsed().as_secs_f64();
        let i1 = CpuSnap::take(pid)?;
        let p1 = server.control.as_deref().map(polls).transpose()?;
        Ok(IdleRun {
            busy_ios,
            busy_s,
            busy_cpu_s: c1.backend - c0.backend,
            idle_s,
            idle_cpu_s: i1.backend - i0.backend,
            idle_polls: p0.zip(p1).map(|(a, b)| b.saturating_sub(a)),
        })
    })();
    blkio.unmap_mem_region(&region);
    drop(blkio);
    server.stop();
    result
}

/// Runs the check on every server peer of the plan and prints one line
/// each.
pub fn run_all(plan: &Plan, idle: Duration) -> Result<()> {
    std::fs::create_dir_all(&plan.work_dir).ctx(|| format!("mkdir {}", plan.work_dir.display()))?;
    super::cache::prepare_image(&plan.image_cold, plan.image_size)?;
    super::cache::prepare_image(&plan.image_hot, plan.image_size)?;
    println!(
        "| peer | busy: QD1 4 KiB reads/s | busy: server CPU µs/req | idle: server CPU, % of a core over {:.0} s | idle: polls |",
        idle.as_secs_f64()
    );
    println!("|---|--:|--:|--:|--:|");
    // fio has no server to sit idle.
    for p in plan
        .peers
        .iter()
        .filter(|p| !matches!(p.kind, Kind::Fio { .. } | Kind::FioRbd))
    {
        match run(plan, p, Duration::from_secs(1), idle) {
            Ok(r) => println!(
                "| {} | {:.1}k | {:.1} | {:.3} % | {} |",
                p.name,
                r.busy_ios as f64 / r.busy_s / 1000.0,
                r.busy_cpu_s * 1e6 / r.busy_ios.max(1) as f64,
                r.idle_cpu_s / r.idle_s * 100.0,
                r.idle_polls
                    .map_or_else(|| "—".to_string(), |n| n.to_string()),
            ),
            Err(e) => println!("| {} | failed: {e} | | | |", p.name),
        }
    }
    Ok(())
}
