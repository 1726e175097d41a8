//! The run loop: for each repetition, each workload, each peer (so peers
//! interleave A B A B), reset the page cache, start the peer, drive it,
//! stop it, and record one [`Sample`]; a progress line meanwhile.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::cache;
use super::driver;
use super::error::{Context, Result};
use super::fio;
use super::peers::{Kind, Peer, Programs, Server, Store};
use super::rbd::RbdImage;
use super::stats::{mean_in_flight, percentiles_us, BackendFigures, Sample};
use super::workload::{Op, Workload};
use vmm_bench::procstat;

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Peers, in the order they alternate.
    pub peers: Vec<Peer>,
    /// Repetitions of the whole matrix.
    pub reps: u32,
    /// Unmeasured warm-up per run.
    pub ramp: Duration,
    /// Measured time per run.
    pub runtime: Duration,
    /// The image of the O_DIRECT and dontcache peers.
    pub image_cold: PathBuf,
    /// The image of the buffered peers (kept in the page cache).
    pub image_hot: PathBuf,
    /// Wait up to this long before a run for the host to go idle.
    pub max_idle_wait: Duration,
    /// Its size in bytes.
    pub image_size: u64,
    /// Sockets and logs.
    pub work_dir: PathBuf,
    /// The programs.
    pub progs: Programs,
    /// The RBD image of the `*-rbd` peers, when they run.
    pub rbd: Option<RbdImage>,
}

/// Runs the plan; a failed run is recorded, not fatal.
pub fn run(plan: &Plan) -> Result<Vec<Sample>> {
    std::fs::create_dir_all(&plan.work_dir).ctx(|| format!("mkdir {}", plan.work_dir.display()))?;
    if plan.peers.iter().any(Peer::uses_image) {
        cache::prepare_image(&plan.image_cold, plan.image_size)?;
        cache::prepare_image(&plan.image_hot, plan.image_size)?;
    }
    if let Some(r) = &plan.rbd {
        r.prepare(plan.image_size)?;
    }
    let total = plan.reps as usize * plan.workloads.len() * plan.peers.len();
    let mut progress = Progress::new(total, plan);
    let mut samples = Vec::with_capacity(total);
    let mut refill = Refill::default();
    for rep in 0..plan.reps {
        for w in &plan.workloads {
            for p in &plan.peers {
                if let Some(r) = plan.rbd.as_ref().filter(|_| p.is_rbd()) {
                    if refill.before_run(w.op) {
                        r.fill(plan.image_size)?;
                    }
                }
                progress.start(rep, w, p);
                let s = run_one(plan, rep, w, p);
                progress.done(&s);
                samples.push(s);
            }
        }
    }
    progress.finish();
    Ok(samples)
}

/// When the RBD image must be rewritten (see [`RbdImage::fill`]) before a
/// run on it: whenever a write run came since it was last filled. A
/// memstore OSD keeps an object as the list of the pieces written into it
/// by default (the throw-away cluster keeps pages instead), so 4 KiB random
/// writes make every later request on that object cost more OSD CPU.
/// Refilled so, every run, read or write, of every peer starts on
/// the image as filled: read runs do not measure how many write runs came
/// before them, and a peer's write run does not measure its place in the
/// order (the first one used to write into the least fragmented objects).
#[derive(Debug)]
struct Refill {
    /// Whether the image may differ from a freshly filled one.
    written: bool,
}

impl Default for Refill {
    /// A run on a cluster of `--rbd-conf` may find the image as an earlier
    /// run's writes left it: refilled before the first run too.
    fn default() -> Self {
        Refill { written: true }
    }
}

impl Refill {
    /// Whether to refill before a run of `op` on the image; records the run.
    fn before_run(&mut self, op: Op) -> bool {
        let refill = self.written;
        self.written = op == Op::Write;
        refill
    }
}

fn run_one(plan: &Plan, rep: u32, w: &Workload, p: &Peer) -> Sample {
    let mut s = Sample {
        peer: p.name.clone(),
        workload: w.name(),
        rep,
        iops: 0.0,
        mib_s: 0.0,
        lat_us: [0.0; 3],
        backend_cpu_us: 0.0,
        backend_cores: 0.0,
        client_cpu_us: 0.0,
        cache_resident: 0.0,
        others_cores: 0.0,
        steal_cores: 0.0,
        signals_per_req: None,
        mean_batch: None,
        deferred_p99_us: None,
        osd_cpu_us: None,
        error: None,
    };
    if let Err(e) = measure(plan, w, p, &mut s) {
        s.error = Some(e.to_string());
    }
    s
}

fn measure(plan: &Plan, w: &Workload, p: &Peer, s: &mut Sample) -> Result<()> {
    let image = if p.wants_warm_cache() {
        &plan.image_hot
    } else {
        &plan.image_cold
    };
    if p.uses_image() {
        s.cache_resident = cache::reset(image, p.wants_warm_cache())?;
    }
    wait_idle(plan.max_idle_wait)?;
    let rbd = plan.rbd.as_ref().filter(|_| p.is_rbd());
    if p.is_rbd() && rbd.is_none() {
        return Err(super::error::Error::msg("no RBD image (see --rbd-conf)"));
    }
    // The OSD's CPU over the run's whole drive (ramp included, as the
    // request rate is the same then): an RBD peer's cost the backend's
    // figure leaves out.
    let osd = rbd.and_then(RbdImage::osd_pid);
    let osd0 = osd.map(|pid| (procstat::cpu_seconds(pid), Instant::now()));
    let store = match rbd {
        Some(r) => Store::Rbd(r),
        None => Store::File(image),
    };
    let (raw, pcts) = match &p.kind {
        Kind::Fio { .. } | Kind::FioRbd => {
            let direct = matches!(p.kind, Kind::Fio { direct: true });
            let f = fio::run(
                &plan.progs.fio,
                store,
                plan.image_size,
                w,
                direct,
                plan.ramp,
                plan.runtime,
            )?;
            (f.raw, f.pcts.map(|ns| ns / 1000.0))
        }
        _ => {
            let mut server = Server::start(
                p,
                &plan.progs,
                store,
                plan.image_size,
                w.queues,
                &plan.work_dir,
            )?;
            let result = driver::run(
                &server.socket,
                server.pid(),
                server.control.as_deref(),
                w,
                plan.ramp,
                plan.runtime,
            );
            let mut raw = match result {
                Ok(raw) => raw,
                Err(e) => {
                    let alive = server.check_alive().err();
                    return Err(match alive {
                        Some(dead) => super::error::Error::msg(format!("{e}; {dead}")),
                        None => e,
                    });
                }
            };
            server.stop();
            // A closed loop keeps its depth in flight: much less, by the latencies counted, and
            // the IOPS are not the backend's (a run once came out at a third of its limit with
            // normal latencies). Said here so that such a run can be told apart.
            let depth = f64::from(w.iodepth) * f64::from(w.queues);
            let in_flight = mean_in_flight(&raw.lat_ns, raw.seconds);
            if in_flight < 0.9 * depth {
                eprintln!(
                    "bench: {} {}: {in_flight:.1} of {depth} requests in flight on average by \
                     their latencies (Little's law): the requests counted and the window \
                     disagree, the IOPS of this run understate the backend",
                    p.name,
                    w.name()
                );
            }
            let pcts = percentiles_us(&mut raw.lat_ns);
            (raw, pcts)
        }
    };
    if raw.ios == 0 || raw.seconds <= 0.0 {
        return Err(super::error::Error::msg("no request completed"));
    }
    s.iops = raw.ios as f64 / raw.seconds;
    let mut osd_cores = None;
    if let (Some(pid), Some((Ok(c0), t0))) = (osd, osd0) {
        if let Ok(c1) = procstat::cpu_seconds(pid) {
            // The server's start and stop fall in the window too; the OSD
            // idles then, so this slightly understates it.
            let cores = (c1 - c0) / t0.elapsed().as_secs_f64();
            s.osd_cpu_us = Some(cores * 1e6 / s.iops);
            osd_cores = Some(cores);
        }
    }
    s.mib_s = raw.bytes as f64 / raw.seconds / f64::from(1 << 20);
    s.lat_us = pcts;
    s.backend_cpu_us = raw.backend_cpu_s * 1e6 / raw.ios as f64;
    s.backend_cores = raw.backend_cpu_s / raw.seconds;
    s.client_cpu_us = raw.client_cpu_s * 1e6 / raw.ios as f64;
    s.others_cores = noise_cores(raw.others_s, raw.seconds, osd_cores);
    s.steal_cores = raw.steal_s.max(0.0) / raw.seconds;
    if let Some((start, end)) = &raw.backend {
        let f = BackendFigures::between(start, end);
        s.signals_per_req = f.signals_per_req;
        s.mean_batch = f.mean_batch;
        s.deferred_p99_us = f.deferred_p99_us;
    }
    Ok(())
}

/// The cores the rest of the host kept busy over a run of `seconds`, from
/// the CPU seconds `others_s` not charged to the peer or its client: less
/// the cores the cluster's OSD spent (`osd_cores`), which works for the run
/// and has a column of its own.
fn noise_cores(others_s: f64, seconds: f64, osd_cores: Option<f64>) -> f64 {
    (others_s.max(0.0) / seconds - osd_cores.unwrap_or(0.0)).max(0.0)
}

/// Cores of other work below which the host counts as idle.
const IDLE_CORES: f64 = 0.25;

/// Waits, up to `limit`, until the rest of the host keeps fewer than
/// [`IDLE_CORES`] busy over a 250 ms window (this machine may be shared with
/// builds and VMs); the run goes ahead after `limit` regardless, and its
/// `others_cores` says how noisy it was.
fn wait_idle(limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let (h0, c0) = (procstat::host_cpu()?, procstat::self_cpu_seconds()?);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(250));
        let (h1, c1) = (procstat::host_cpu()?, procstat::self_cpu_seconds()?);
        let others = ((h1 - h0).busy - (c1 - c0)) / t0.elapsed().as_secs_f64();
        if others < IDLE_CORES || Instant::now() >= deadline {
            return Ok(());
        }
    }
}

/// The progress line on stderr: one line rewritten in place on a terminal,
/// one line per run otherwise.
struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    per_run: Duration,
    tty: bool,
}

impl Progress {
    fn new(total: usize, plan: &Plan) -> Self {
        Progress {
            total,
            done: 0,
            started: Instant::now(),
            per_run: plan.ramp + plan.runtime + Duration::from_millis(900),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn eta(&self) -> Duration {
        let left = (self.total - self.done) as u32;
        if self.done == 0 {
            self.per_run * left
        } else {
            self.started.elapsed() / self.done as u32 * left
        }
    }

    fn start(&mut self, rep: u32, w: &Workload, p: &Peer) {
        let eta = self.eta().as_secs();
        let line = format!(
            "[{:>3}/{}] rep {} {:<20} {:<22} eta {}m{:02}s",
            self.done + 1,
            self.total,
            rep + 1,
            w.name(),
            p.name,
            eta / 60,
            eta % 60
        );
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[K{line}");
        } else {
            let _ = write!(e, "{line}");
        }
        let _ = e.flush();
    }

    fn done(&mut self, s: &Sample) {
        self.done += 1;
        let result = match &s.error {
            Some(err) => format!("FAILED: {}", err.lines().next().unwrap_or("")),
            None => format!(
                "{:>8.1}k IOPS {:>7.1} MiB/s p99 {:>7.1}us cpu {:>5.2}us/req noise {:.2}{}",
                s.iops / 1000.0,
                s.mib_s,
                s.lat_us[1],
                s.backend_cpu_us,
                s.others_cores,
                s.signals_per_req
                    .map(|x| format!(" sig/req {x:.3}"))
                    .unwrap_or_default()
            ),
        };
        let mut e = std::io::stderr().lock();
        if self.tty && s.error.is_none() {
            // Stays on the line the next run's progress rewrites.
            let _ = write!(e, "  {result}");
        } else {
            let _ = writeln!(e, "  {result}");
        }
        let _ = e.flush();
    }

    fn finish(&self) {
        let t = self.started.elapsed().as_secs();
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(e);
        }
        let _ = writeln!(e, "bench: {} runs in {}m{:02}s", self.total, t / 60, t % 60);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_before_every_run_that_follows_a_write_run() {
        let mut r = Refill::default();
        // The image's state is unknown at first.
        assert!(r.before_run(Op::Read));
        // Reads leave it as filled.
        assert!(!r.before_run(Op::Read));
        assert!(!r.before_run(Op::Write));
        // Every peer's write run starts on a filled image, not on the
        // previous peer's writes.
        assert!(r.before_run(Op::Write));
        assert!(r.before_run(Op::Write));
        // So does the read run after the last of them.
        assert!(r.before_run(Op::Read));
        assert!(!r.before_run(Op::Read));
    }

    #[test]
    fn the_osd_is_not_noise() {
        // 5.2 CPU seconds outside the peer and client over 4 s, 1.2 cores of
        // them the OSD's: 0.1 cores of noise.
        assert!((noise_cores(5.2, 4.0, Some(1.2)) - 0.1).abs() < 1e-9);
        assert!((noise_cores(5.2, 4.0, None) - 1.3).abs() < 1e-9);
        // Clock-tick rounding can put the OSD above the rest: never negative.
        assert_eq!(noise_cores(4.0, 4.0, Some(1.2)), 0.0);
        assert_eq!(noise_cores(-0.1, 4.0, None), 0.0);
    }

    #[test]
    fn refill_starts_with_the_first_run_of_any_kind() {
        let mut r = Refill::default();
        assert!(r.before_run(Op::Write));
        assert!(r.before_run(Op::Read));
    }
}
