//! `guest-bench`: the cache modes' and the deferred batching's figures (host page cache,
//! throughput, interrupts per request, batch latency), measured inside a guest.
//!
//! ```text
//! cargo run --release -p vmm-bench --bin guest-bench -- [--reps 3] [--backend PATH]
//! ```
//!
//! For each cache configuration of the backend (`--cache none`,
//! `writeback`, `dontcache`, and `dontcache --defer-delay-us 0`) and each
//! workload (sequential 1 MiB writes, 4 KiB random writes, both at iodepth
//! 32 per queue from one pinned thread per vCPU, O_DIRECT in the guest), it
//! starts a fresh backend with 2 queues on one preallocated image, boots a
//! 2-vCPU guest (the VM harness: QEMU, TCG here) whose agent reads
//! `/proc/interrupts`, runs the `uring` workload and reads
//! `/proc/interrupts` again, and measures:
//!
//! - throughput, as the guest saw it (the final fsync timed in);
//! - the host page cache the image held, peak of `mincore` every 100 ms;
//! - guest interrupts per request: the delta of the `virtio*-req.N`
//!   vectors over the workload, divided by the write and flush requests
//!   the backend completed;
//! - the deferred worker's mean batch size and push-to-signal p99, from the
//!   backend's `stats` (batches-weighted mean over the queues; the worst
//!   queue's p99);
//! - the noise: CPU the rest of the host used during the run, in cores.
//!
//! Configurations alternate within each repetition (A B C D A B C D), every
//! run starts with none of the image cached, and the table shows medians
//! with [min–max]. It prints the table and the verdict on the targets
//! (dontcache's page-cache peak ≤ 64 MiB and throughput ≥ 0.9× none;
//! batching ≥ 3× fewer interrupts per request than delay 0, for ≤ 1 ms more
//! p99) as markdown, and writes every run to `--json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};
use vmm_bench::procstat;
use vmm_bench::tool_error::{self, Context, ToolError, ToolResult as Result};
use vmm_tests::agent::queue_interrupts;
use vmm_tests::backend::{backend_bin, BackendKind};
use vmm_tests::pagecache::{self, Sampler};
use vmm_tests::spread::Spread;
use vmm_tests::{setup, AgentPlan, Backend, BackendConfig, Qemu, VhostUserDisk, VmConfig};

const MIB: u64 = 1 << 20;

/// The cache modes' and the deferred batching's figures, measured in a guest (VM harness).
#[derive(Parser, Debug)]
#[command(name = "guest-bench")]
struct Args {
    /// Repetitions of the whole matrix (medians over them).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// MiB the sequential run writes in all (each thread its share, on its
    /// own slice).
    #[arg(long, default_value_t = 1024)]
    seq_mib: u64,
    /// Seconds of the random-write run.
    #[arg(long, default_value_t = 8.0)]
    rand_secs: f64,
    /// MiB the random writes spread over.
    #[arg(long, default_value_t = 1024)]
    rand_span_mib: u64,
    /// Requests in flight per guest thread (one thread per vCPU).
    #[arg(long, default_value_t = 32)]
    iodepth: u32,
    /// vCPUs, and queues of the disk.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Comma-separated configurations: none, writeback, dontcache,
    /// dontcache-d0 (`--defer-delay-us 0`).
    #[arg(long, default_value = "none,writeback,dontcache,dontcache-d0")]
    configs: String,
    /// Comma-separated workloads: seq (1 MiB sequential writes), rand
    /// (4 KiB random writes).
    #[arg(long, default_value = "seq,rand")]
    workloads: String,
    /// The vhost-user-blk binary [default: $VHOST_USER_BLK_BIN, else built].
    #[arg(long)]
    backend: Option<PathBuf>,
    /// Folder for the image, sockets and logs [default: the harness's work
    /// root, `guest-bench`].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where to write every run as JSON.
    #[arg(long, default_value = "target/guest-bench.json")]
    json: PathBuf,
}

/// A backend configuration under test.
#[derive(Debug, Clone, Serialize)]
struct Config {
    name: String,
    cache: String,
    defer_delay_us: Option<u32>,
}

impl Config {
    fn parse(s: &str) -> Result<Self> {
        let (cache, delay) = match s {
            "none" | "writeback" | "dontcache" => (s, None),
            "dontcache-d0" => ("dontcache", Some(0)),
            _ => return Err(ToolError::Check(format!("unknown configuration {s:?}"))),
        };
        Ok(Config {
            name: s.to_string(),
            cache: cache.to_string(),
            defer_delay_us: delay,
        })
    }

    fn label(&self) -> String {
        match self.defer_delay_us {
            Some(d) => format!("`--cache {} --defer-delay-us {d}`", self.cache),
            None => format!("`--cache {}`", self.cache),
        }
    }
}

/// A guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Kind {
    Seq,
    Rand,
}

impl Kind {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "seq" => Ok(Kind::Seq),
            "rand" => Ok(Kind::Rand),
            _ => Err(ToolError::Check(format!("unknown workload {s:?}"))),
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    config: String,
    workload: Kind,
    rep: u32,
    mb_s: f64,
    iops: f64,
    guest_bytes: u64,
    guest_lat_p99_us: u64,
    page_cache_peak_mib: f64,
    page_cache_samples: u64,
    interrupts: u64,
    requests: u64,
    irq_per_req: f64,
    deferred: u64,
    batches: u64,
    mean_batch: f64,
    deferred_p99_us: u64,
    signals: u64,
    noise_cores: f64,
    wall_s: f64,
}

/// The agent's plan for one run.
fn plan(args: &Args, kind: Kind) -> AgentPlan {
    let p = AgentPlan::new(&["interrupts#before", "uring", "interrupts#after"])
        .param("uring.iodepth", args.iodepth)
        .param("uring.direct", 1)
        .param("uring.offset_mib", 0)
        .param("uring.fsync", 1);
    match kind {
        Kind::Seq => p
            .param("uring.rw", "write")
            .param("uring.bs_kib", 1024)
            .param("uring.mib", args.seq_mib)
            .param("uring.total_mib", args.seq_mib)
            .param("uring.split", 1)
            .param("uring.secs", 1200),
        Kind::Rand => p
            .param("uring.rw", "randwrite")
            .param("uring.bs_kib", 4)
            .param("uring.mib", args.rand_span_mib)
            .param("uring.secs", args.rand_secs),
    }
}

fn sum_interrupts(v: &Value) -> u64 {
    queue_interrupts(v).iter().map(|(_, n)| n).sum()
}

/// One run: fresh backend, one guest boot, the figures.
fn run_one(
    args: &Args,
    kind_bin: &BackendKind,
    image: &Path,
    dir: &Path,
    cfg: &Config,
    kind: Kind,
    rep: u32,
) -> Result<Run> {
    pagecache::drop_cached(image).ctx(|| "reset the page cache".into())?;
    let (busy0, ours0) = procstat::host_busy_and_ours().ctx(|| "CPU time".into())?;
    let t0 = Instant::now();
    let mut bcfg = BackendConfig::new(image, dir)
        .queues(args.cpus as u16)
        .cache(&cfg.cache);
    if let Some(d) = cfg.defer_delay_us {
        bcfg.extra_args = vec!["--defer-delay-us".into(), d.to_string()];
    }
    let mut backend = Backend::start(kind_bin, &bcfg).ctx(|| "start the backend".into())?;
    let sampler = Sampler::start(image, Duration::from_millis(100));
    let mut vm = VmConfig::new(args.cpus, plan(args, kind))
        .disk(VhostUserDisk::new(&bcfg.socket, args.cpus as u16));
    vm.run_timeout = Duration::from_secs(1800);
    let assets = setup::guest_assets().ctx(|| "guest assets".into())?;
    let name = format!("{}-{:?}-{rep}", cfg.name, kind).to_lowercase();
    let result = Qemu::start(&vm, &assets, dir, &name)
        .and_then(|mut q| q.wait_done())
        .ctx(|| format!("guest run {name}"));
    let samples = sampler.stop();
    let run = result?;
    run.expect_all_ok().ctx(|| format!("guest run {name}"))?;
    let stats = backend.stats().ctx(|| "backend stats".into())?;
    backend
        .terminate(Duration::from_secs(10))
        .ctx(|| "stop the backend".into())?;
    let wall = t0.elapsed().as_secs_f64();
    let (busy1, ours1) = procstat::host_busy_and_ours().ctx(|| "CPU time".into())?;

    let u = run.ok("uring").ctx(|| "uring result".into())?;
    let before = run
        .ok("interrupts#before")
        .ctx(|| "interrupts before".into())?;
    let after = run
        .ok("interrupts#after")
        .ctx(|| "interrupts after".into())?;
    let interrupts = sum_interrupts(after).saturating_sub(sum_interrupts(before));
    let requests: u64 = stats.queues.iter().map(|q| q.writes + q.flushes).sum();
    let dw = |q: &vmm_tests::backend::QueueStats, k: &str| -> f64 {
        q.extra
            .get("deferred_worker")
            .and_then(|d| d.get(k))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    let batches: f64 = stats.queues.iter().map(|q| dw(q, "batches")).sum();
    let batched: f64 = stats
        .queues
        .iter()
        .map(|q| dw(q, "batches") * dw(q, "mean_batch"))
        .sum();
    let p99 = stats
        .queues
        .iter()
        .map(|q| dw(q, "latency_p99_us"))
        .fold(0.0, f64::max);
    let extra_u64 = |q: &vmm_tests::backend::QueueStats, k: &str| {
        q.extra.get(k).and_then(Value::as_u64).unwrap_or(0)
    };
    let ops = u["ops"].as_u64().unwrap_or(0);
    let bs = u["bs"].as_u64().unwrap_or(0);
    let r = Run {
        config: cfg.name.clone(),
        workload: kind,
        rep,
        mb_s: u["mb_s"].as_f64().unwrap_or(0.0),
        iops: u["iops"].as_f64().unwrap_or(0.0),
        guest_bytes: ops * bs,
        guest_lat_p99_us: u["lat_us"]["p99"].as_u64().unwrap_or(0),
        page_cache_peak_mib: samples.peak as f64 / MIB as f64,
        page_cache_samples: samples.count,
        interrupts,
        requests,
        irq_per_req: if requests > 0 {
            interrupts as f64 / requests as f64
        } else {
            0.0
        },
        deferred: stats.queues.iter().map(|q| extra_u64(q, "deferred")).sum(),
        batches: batches as u64,
        mean_batch: if batches > 0.0 {
            batched / batches
        } else {
            0.0
        },
        deferred_p99_us: p99 as u64,
        signals: stats.queues.iter().map(|q| extra_u64(q, "signals")).sum(),
        noise_cores: (((busy1 - busy0) - (ours1 - ours0)) / wall).max(0.0),
        wall_s: wall,
    };
    if r.requests == 0 || r.guest_bytes == 0 {
        return Err(ToolError::Check(format!(
            "{name}: no requests measured ({r:?})"
        )));
    }
    Ok(r)
}

/// Median and range of one figure over the runs of a cell.
fn cell(runs: &[&Run], f: impl Fn(&Run) -> f64) -> (f64, f64, f64) {
    let v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
    let s = Spread::of(&v);
    (s.median, s.min, s.max)
}

fn fmt_num(x: f64) -> String {
    if x > 0.0 && x < 0.1 {
        format!("{x:.3}")
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_cell((m, lo, hi): (f64, f64, f64)) -> String {
    format!("**{}** [{}–{}]", fmt_num(m), fmt_num(lo), fmt_num(hi))
}

/// The markdown tables and the verdicts.
fn report(args: &Args, configs: &[Config], kinds: &[Kind], runs: &[Run]) -> String {
    let mut s = String::new();
    let of = |c: &str, k: Kind| -> Vec<&Run> {
        runs.iter()
            .filter(|r| r.config == c && r.workload == k)
            .collect()
    };
    for &k in kinds {
        let title = match k {
            Kind::Seq => format!(
                "Sequential 1 MiB writes, iodepth {} × {} queues, {} MiB in all",
                args.iodepth, args.cpus, args.seq_mib
            ),
            Kind::Rand => format!(
                "4 KiB random writes, iodepth {} × {} queues, {} s over {} MiB",
                args.iodepth, args.cpus, args.rand_secs, args.rand_span_mib
            ),
        };
        let _ = writeln!(s, "#### {title}\n");
        let _ = writeln!(
            s,
            "| backend | MB/s | IOPS | guest p99 µs | host page cache peak MiB | guest IRQs / request | backend signals / request | mean batch | deferred p99 µs | noise cores |"
        );
        let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for c in configs {
            let rs = of(&c.name, k);
            if rs.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.label(),
                fmt_cell(cell(&rs, |r| r.mb_s)),
                fmt_num(cell(&rs, |r| r.iops).0),
                fmt_num(cell(&rs, |r| r.guest_lat_p99_us as f64).0),
                fmt_cell(cell(&rs, |r| r.page_cache_peak_mib)),
                fmt_cell(cell(&rs, |r| r.irq_per_req)),
                fmt_num(cell(&rs, |r| r.signals as f64 / r.requests.max(1) as f64).0),
                fmt_num(cell(&rs, |r| r.mean_batch).0),
                fmt_cell(cell(&rs, |r| r.deferred_p99_us as f64)),
                fmt_num(cell(&rs, |r| r.noise_cores).0),
            );
        }
        let _ = writeln!(s);
    }

    // Targets.
    let med = |c: &str, k: Kind, f: &dyn Fn(&Run) -> f64| cell(&of(c, k), f).0;
    let have = |c: &str, k: Kind| !of(c, k).is_empty();
    let yes = |b: bool| if b { "met" } else { "**missed**" };
    let _ = writeln!(s, "| target | measured (medians) | verdict |");
    let _ = writeln!(s, "|---|---|---|");
    if have("dontcache", Kind::Seq) {
        let peak = of("dontcache", Kind::Seq)
            .iter()
            .map(|r| r.page_cache_peak_mib)
            .fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| dontcache page-cache peak ≤ 64 MiB while writing {} MiB | worst run {:.1} MiB (writeback: {:.0} MiB) | {} |",
            args.seq_mib,
            peak,
            med("writeback", Kind::Seq, &|r| r.page_cache_peak_mib),
            yes(peak <= 64.0)
        );
    }
    for &k in kinds {
        if have("dontcache", k) && have("none", k) {
            let a = med("dontcache", k, &|r| r.mb_s);
            let b = med("none", k, &|r| r.mb_s);
            let _ = writeln!(
                s,
                "| dontcache throughput ≥ 0.9× none ({k:?}) | {a:.1} vs {b:.1} MB/s = {:.2}× | {} |",
                a / b,
                yes(a >= 0.9 * b)
            );
        }
    }
    for &k in kinds {
        if have("dontcache", k) && have("dontcache-d0", k) {
            let a = med("dontcache", k, &|r| r.irq_per_req);
            let b = med("dontcache-d0", k, &|r| r.irq_per_req);
            let la = med("dontcache", k, &|r| r.deferred_p99_us as f64);
            let lb = med("dontcache-d0", k, &|r| r.deferred_p99_us as f64);
            let ga = med("dontcache", k, &|r| r.guest_lat_p99_us as f64);
            let gb = med("dontcache-d0", k, &|r| r.guest_lat_p99_us as f64);
            let cut = if a > 0.0 { b / a } else { f64::INFINITY };
            let _ = writeln!(
                s,
                "| batching cuts IRQs/request ≥ 3× against delay 0 ({k:?}) | {b:.3} → {a:.3} = {cut:.2}× | {} |",
                yes(cut >= 3.0)
            );
            let _ = writeln!(
                s,
                "| … with p99 growing ≤ 1 ms ({k:?}) | deferred p99 {lb:.0} → {la:.0} µs ({:+.0} µs); guest p99 {gb:.0} → {ga:.0} µs ({:+.0} µs) | {} |",
                la - lb,
                ga - gb,
                yes(la - lb <= 1000.0)
            );
        }
    }
    s
}

fn run(args: &Args) -> Result<()> {
    let configs: Vec<Config> = args
        .configs
        .split(',')
        .map(Config::parse)
        .collect::<Result<_>>()?;
    let kinds: Vec<Kind> = args
        .workloads
        .split(',')
        .map(Kind::parse)
        .collect::<Result<_>>()?;
    let bin = match &args.backend {
        Some(p) => p.clone(),
        None => backend_bin().ctx(|| "find the backend".into())?,
    };
    let kind_bin = BackendKind::VhostUserBlk(bin.clone());
    let assets = setup::guest_assets().ctx(|| "guest assets".into())?;
    let _lock = setup::vm_lock().ctx(|| "VM lock".into())?;
    let dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| setup::work_root().join("guest-bench"));
    std::fs::create_dir_all(&dir).ctx(|| format!("mkdir {}", dir.display()))?;
    let span = args.seq_mib.max(args.rand_span_mib);
    let image = dir.join("disk.img");
    pagecache::prepare_image(&image, (span + 64) * MIB).ctx(|| "prepare the image".into())?;
    eprintln!(
        "guest-bench: backend {}, kernel {}, image {} ({} MiB), {} configs × {} workloads × {} reps",
        bin.display(),
        assets.kernel_release,
        image.display(),
        span + 64,
        configs.len(),
        kinds.len(),
        args.reps
    );
    let total = configs.len() * kinds.len() * args.reps as usize;
    let start = Instant::now();
    let mut runs = Vec::new();
    for rep in 1..=args.reps {
        for &k in &kinds {
            for c in &configs {
                let r = run_one(args, &kind_bin, &image, &dir, c, k, rep)?;
                let done = runs.len() + 1;
                let left = start.elapsed().as_secs_f64() / done as f64 * (total - done) as f64;
                eprintln!(
                    "[{done}/{total}] {} {:?} rep {rep}: {:.1} MB/s, {} IOPS, page cache peak {:.1} MiB, {:.3} IRQ/req, batch {:.1}, deferred p99 {} µs, guest p99 {} µs, noise {:.2} ({:.0} s; ~{:.0} s left)",
                    c.name, k, r.mb_s, r.iops, r.page_cache_peak_mib, r.irq_per_req, r.mean_batch,
                    r.deferred_p99_us, r.guest_lat_p99_us, r.noise_cores, r.wall_s, left
                );
                runs.push(r);
            }
        }
    }
    let out = json!({
        "backend": bin.display().to_string(),
        "kernel": assets.kernel_release,
        "args": format!("{args:?}"),
        "runs": runs,
    });
    std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    )
    .ctx(|| format!("write {}", args.json.display()))?;
    println!("{}", report(args, &configs, &kinds, &runs));
    eprintln!(
        "guest-bench: {} runs in {:.0} s; runs in {}",
        runs.len(),
        start.elapsed().as_secs_f64(),
        args.json.display()
    );
    let _ = std::fs::remove_file(&image);
    Ok(())
}

fn main() -> ExitCode {
    tool_error::exit_code("guest-bench", run(&Args::parse()))
}
