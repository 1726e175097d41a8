//! The project's main job, in one command:
//!
//! ```text
//! cargo run --release -p vmm-tests --bin demo [-- OPTIONS]
//! ```
//!
//! It installs what is missing (QEMU, busybox, the guest kernel), builds
//! the backend, creates a sparse image, starts `vhost-user-blk --cache
//! dontcache` with two queues, boots a two-vCPU guest that writes with
//! `RWF_DONTCACHE` and verifies, samples the host page cache the image
//! holds (`mincore`, every 100 ms), and prints a short report: throughput,
//! the page-cache peak and the per-queue request counts.
//!
//! Options: `--size 2G` (image), `--mib 512` (data the guest writes),
//! `--queues 2`, `--cpus 2`, `--cache dontcache`, `--work-dir DIR`,
//! `--keep` (keep the image and logs).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::agent::queue_interrupts;
use vmm_tests::backend::{backend_bin, BackendKind};
use vmm_tests::pagecache::Sampler;
use vmm_tests::{create_image, setup, AgentPlan, Backend, BackendConfig, Error, Qemu, Result};
use vmm_tests::{VhostUserDisk, VmConfig};

const MIB: u64 = 1 << 20;

/// The demo's options.
struct Options {
    size: u64,
    mib: u64,
    queues: u16,
    cpus: u32,
    cache: String,
    work_dir: PathBuf,
    keep: bool,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

const USAGE: &str = "usage: demo [--size 2G] [--mib 512] [--queues 2] [--cpus 2] \
[--cache none|writeback|dontcache] [--work-dir DIR] [--keep]";

fn parse_args() -> std::result::Result<Options, String> {
    let mut o = Options {
        size: 2 << 30,
        mib: 512,
        queues: 2,
        cpus: 2,
        cache: "dontcache".into(),
        work_dir: setup::work_root().join("demo"),
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--size" => o.size = parse_size(&value("--size")?).ok_or("bad --size")?,
            "--mib" => o.mib = value("--mib")?.parse().map_err(|_| "bad --mib")?,
            "--queues" => o.queues = value("--queues")?.parse().map_err(|_| "bad --queues")?,
            "--cpus" => o.cpus = value("--cpus")?.parse().map_err(|_| "bad --cpus")?,
            "--cache" => o.cache = value("--cache")?,
            "--work-dir" => o.work_dir = PathBuf::from(value("--work-dir")?),
            "--keep" => o.keep = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if o.mib * MIB + 64 * MIB > o.size {
        return Err(format!(
            "--mib {} does not fit in --size {} with 64 MiB to spare",
            o.mib, o.size
        ));
    }
    Ok(o)
}

fn step(what: &str) {
    println!("==> {what}");
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn run(o: &Options) -> Result<()> {
    let total = Instant::now();
    step("preparing the host and the guest (QEMU, busybox, guest kernel, guest agent, initramfs)");
    let assets = setup::guest_assets()?;
    println!("    guest kernel {}", assets.kernel_release);

    step("building the backend (cargo build --release -p vhost-user-blk)");
    let kind = match std::env::var("VMM_TESTS_BACKEND").as_deref() {
        Ok("qsd") => BackendKind::from_env()?,
        _ => BackendKind::VhostUserBlk(backend_bin()?),
    };
    println!("    {kind:?}");

    let _lock = setup::vm_lock()?;
    std::fs::create_dir_all(&o.work_dir)
        .map_err(|e| Error::io(format!("mkdir {}", o.work_dir.display()), e))?;
    let image = create_image(&o.work_dir.join("disk.img"), o.size)?;
    step(&format!(
        "created a sparse {} image at {}",
        mib(o.size),
        image.display()
    ));

    let mut cfg = BackendConfig::new(&image, &o.work_dir)
        .queues(o.queues)
        .cache(&o.cache);
    cfg.log = o.work_dir.join("backend.log");
    let mut backend = Backend::start(&kind, &cfg)?;
    step(&format!(
        "backend running: --cache {} --num-queues {} (pid {}, log {})",
        o.cache,
        o.queues,
        backend.pid(),
        cfg.log.display()
    ));

    let offset_verify = o.mib + 16;
    let plan = AgentPlan::new(&["info", "dontcache", "verify", "interrupts"])
        .param("dontcache.offset_mib", 0)
        .param("dontcache.mib", o.mib)
        .param("dontcache.bs_kib", 1024)
        .param("verify.offset_mib", offset_verify)
        .param("verify.mib", 64);
    let mut vm = VmConfig::new(o.cpus, plan).disk(VhostUserDisk::new(&cfg.socket, o.queues));
    vm.run_timeout = Duration::from_secs(1800);

    let sampler = Sampler::start(&image, Duration::from_millis(100));
    step(&format!(
        "booting a {}-vCPU guest; it writes {} MiB with RWF_DONTCACHE, then verifies",
        o.cpus, o.mib
    ));
    let mut qemu = Qemu::start(&vm, &assets, &o.work_dir, "demo")?;
    let accel = qemu.accel();
    let run = qemu.wait_done();
    let samples = sampler.stop();
    let run = run?;
    run.expect_all_ok()?;
    let stats = if kind.has_stats() {
        Some(backend.stats()?)
    } else {
        None
    };
    let status = backend.terminate(Duration::from_secs(10))?;

    let dc = run.ok("dontcache")?;
    let verify = run.ok("verify")?;
    let info = run.ok("info")?;
    let write_secs = match dc["mb_s"].as_f64() {
        Some(r) if r > 0.0 => (o.mib * MIB) as f64 / 1e6 / r,
        _ => 0.0,
    };
    println!();
    println!("vhost-user-blk demo report");
    println!(
        "  guest               kernel {}, {} vCPUs, accel {}",
        run.hello.kernel,
        run.hello.cpus,
        accel.name()
    );
    println!(
        "  disk                {} on {} queues, write cache \"{}\", queue->cpu {}",
        mib(info["size_bytes"].as_u64().unwrap_or(0)),
        info["num_queues"],
        info["write_cache"].as_str().unwrap_or("?"),
        info["queues"]
    );
    println!(
        "  dontcache writes    {} MiB in {:.1} s: {} MB/s (pwritev2 RWF_DONTCACHE, 1 MiB each, and fsync); read back: {}",
        o.mib,
        write_secs,
        dc["mb_s"],
        if dc["verified"] == true { "verified" } else { "NOT verified" }
    );
    println!(
        "  verify (O_DIRECT)   64 MiB from every vCPU: write {} MB/s, read {} MB/s, {}",
        verify["write_mb_s"],
        verify["read_mb_s"],
        if verify["verified"] == true {
            "verified"
        } else {
            "NOT verified"
        }
    );
    println!(
        "  host page cache     peak {} held by the image while the guest wrote {} MiB ({} samples, every 100 ms); {} at the end",
        mib(samples.peak),
        o.mib,
        samples.count,
        mib(samples.last)
    );
    if let Some(e) = &samples.error {
        println!("                      (sampling error: {e})");
    }
    let g = &dc["guest_page_cache_kib"];
    println!(
        "  guest page cache    {} KiB before, {} KiB peak, {} KiB after",
        g["before"], g["peak"], g["after"]
    );
    match &stats {
        Some(s) => {
            for q in &s.queues {
                println!(
                    "  queue {:<2}            {} requests: {} reads, {} writes, {} flushes; {} written, {} read",
                    q.index,
                    q.requests,
                    q.reads,
                    q.writes,
                    q.flushes,
                    mib(q.bytes_written),
                    mib(q.bytes_read)
                );
            }
            if let Some(Value::Object(dev)) = s.extra.get("device") {
                println!("  backend device      {}", Value::Object(dev.clone()));
            }
        }
        None => println!("  per-queue requests  (qemu-storage-daemon keeps no per-queue stats)"),
    }
    for (name, n) in queue_interrupts(run.ok("interrupts")?) {
        println!("  guest interrupts    {name}: {n}");
    }
    println!("  backend exit        {status}");
    println!(
        "  total time          {:.1} s",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let r = run(&o);
    if !o.keep && r.is_ok() {
        let _ = std::fs::remove_dir_all(&o.work_dir);
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            eprintln!("logs kept in {}", o.work_dir.display());
            ExitCode::FAILURE
        }
    }
}
