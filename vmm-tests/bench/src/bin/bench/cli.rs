//! The command line: the plan a run follows, the `--quick` smoke mode, and
//! re-rendering the docs from a results file.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;

use super::error::{bail, Context, Result};
use super::idle;
use super::machine;
use super::peers::{Peer, Programs};
use super::rbd::{self, Cluster, RbdImage};
use super::report::{self, Results};
use super::runner::{self, Plan};
use super::workload::Workload;

/// Benchmarks vhost-user-blk beside its peers, host-driven through libblkio
/// (no VM), and writes docs/benchmarks.md, docs/bench/results.json and
/// docs/bench/*.svg.
#[derive(Parser, Debug)]
#[command(name = "bench")]
pub struct Args {
    /// Smoke test: one repetition of 1 s runs, results outside docs/ unless
    /// --out is given.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of the whole matrix (medians over them) [default: 3].
    #[arg(long)]
    pub reps: Option<u32>,
    /// Measured seconds per run [default: 4].
    #[arg(long)]
    pub runtime: Option<f64>,
    /// Unmeasured warm-up seconds per run [default: 0.5].
    #[arg(long)]
    pub ramp: Option<f64>,
    /// Comma-separated workloads (`randread-4k-qd32-q2`, `write-1m-qd8-q1`,
    /// the batching targets' `randwrite-4k-qd32-q2,write-1m-qd32-q2`, any
    /// `(rand)read|write-<bs>-qd<N>-q<N>`), `default` or `all`.
    #[arg(long, default_value = "default")]
    pub workloads: String,
    /// Comma-separated peers, `default`, `all` (the local-image ones) or
    /// `rbd` (see --list). The `*-rbd` peers run on their own, on one Ceph
    /// RBD image: on a throw-away cluster the bench starts
    /// (vmm-tests/scripts/ceph-cluster.sh) and stops, or on --rbd-conf's.
    #[arg(long, default_value = "default")]
    pub peers: String,
    /// RBD peers: the config file of an existing cluster to use instead of
    /// starting one (the image is created in --rbd-pool if missing).
    #[arg(long)]
    pub rbd_conf: Option<PathBuf>,
    /// RBD peers: the pool of the image.
    #[arg(long, default_value = "rbd")]
    pub rbd_pool: String,
    /// RBD peers: the image (created with --rbd-features and filled once;
    /// the same image serves every peer).
    #[arg(long, default_value = "bench")]
    pub rbd_image: String,
    /// RBD peers: the features the image is created with: `layering` (the
    /// default, see docs/benchmarks.md) or `default` (`rbd create`'s own:
    /// exclusive-lock, object-map, ... too; fio-rbd's two jobs then trade
    /// the lock on every write).
    #[arg(long, default_value = "layering")]
    pub rbd_features: String,
    /// List the workloads and peers and exit.
    #[arg(long)]
    pub list: bool,
    /// Folder of the two images (created, preallocated and filled once if
    /// missing), the sockets and the server logs [default:
    /// <workspace>/target/bench].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Image size (bytes, or with K/M/G) [default: 1G; RBD: 256M, kept in
    /// the throw-away cluster's RAM].
    #[arg(long)]
    pub image_size: Option<String>,
    /// Wait up to this many seconds before each run for the rest of the
    /// host to go idle (< 0.25 cores busy).
    #[arg(long, default_value_t = 2.0)]
    pub max_idle_wait: f64,
    /// The docs folder to write into [default: <workspace>/docs; with
    /// --quick: <work dir>/quick].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The vhost-user-blk binary [default: built with `cargo build
    /// --release -p vhost-user-blk` into this binary's target folder].
    #[arg(long)]
    pub backend: Option<PathBuf>,
    /// qemu-storage-daemon.
    #[arg(long, default_value = "qemu-storage-daemon")]
    pub qsd: PathBuf,
    /// fio.
    #[arg(long, default_value = "fio")]
    pub fio: PathBuf,
    /// cloud-hypervisor's vhost_user_block; adds the `ch-*` peers.
    #[arg(long, env = "BENCH_CH_BLOCK")]
    pub ch: Option<PathBuf>,
    /// Instead of the benchmark: for each peer, one queue busy with 4 KiB
    /// reads at iodepth 1 for a second, then connected but idle for this
    /// many seconds; prints each server's CPU over the idle window (a share
    /// of one core) and our backend's poll sessions in it. Writes nothing.
    #[arg(long, value_name = "SECONDS")]
    pub idle_cpu: Option<f64>,
    /// Re-render the docs from a results.json instead of running.
    #[arg(long)]
    pub from_json: Option<PathBuf>,
}

/// The workspace root, where the harness finds it.
pub fn workspace() -> PathBuf {
    vmm_tests::setup::workspace_dir()
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("size {s:?}: unknown suffix {c:?}"),
            };
            (&s[..i], mul)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().ctx(|| format!("size {s:?}"))?;
    n.checked_mul(mul).ctx(|| format!("size {s:?} overflows"))
}

fn pick<T: Clone>(
    spec: &str,
    defaults: Vec<T>,
    all: Vec<T>,
    name: impl Fn(&T) -> String,
    parse: impl Fn(&str) -> Result<T>,
) -> Result<Vec<T>> {
    match spec {
        "default" => Ok(defaults),
        "all" => Ok(all),
        list => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                all.iter()
                    .find(|t| name(t) == s)
                    .cloned()
                    .map_or_else(|| parse(s), Ok)
            })
            .collect(),
    }
}

fn secs(v: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v).ctx(|| format!("{what} {v}: not a duration"))
}

fn backend_binary(args: &Args) -> Result<PathBuf> {
    if let Some(b) = &args.backend {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe().ctx(|| "locate this binary")?;
    let dir = exe.parent().ctx(|| "this binary has no folder")?;
    let backend = dir.join("vhost-user-blk");
    if let Ok(cargo) = std::env::var("CARGO") {
        eprintln!("bench: building vhost-user-blk (release)");
        let status = Command::new(cargo)
            .current_dir(workspace())
            .args(["build", "--release", "-p", "vhost-user-blk"])
            .status()
            .ctx(|| "run cargo build -p vhost-user-blk")?;
        if !status.success() {
            bail!("cargo build --release -p vhost-user-blk failed ({status}); pass --backend PATH");
        }
    }
    if !backend.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p vhost-user-blk` or pass --backend",
            backend.display()
        );
    }
    Ok(backend)
}

/// Runs the tool.
pub fn main() -> Result<()> {
    let args = Args::parse();
    let with_ch = args.ch.is_some();
    if args.list {
        println!("workloads (default marked *):");
        let defaults = Workload::defaults();
        for w in Workload::all() {
            let d = if defaults.contains(&w) { "*" } else { " " };
            println!("  {d} {}", w.name());
        }
        println!(
            "peers (default marked *; ch-* need --ch or BENCH_CH_BLOCK; *-rbd run alone, `--peers rbd`):"
        );
        let defaults = Peer::defaults(true);
        for p in Peer::all(true) {
            let d = if defaults.contains(&p) { "*" } else { " " };
            println!("  {d} {}", p.name);
        }
        return Ok(());
    }
    let ws = workspace();
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| ws.join("target").join("bench"));
    let image_cold = work_dir.join("image-cold.raw");
    let image_hot = work_dir.join("image-hot.raw");
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            work_dir.join("quick")
        } else {
            ws.join("docs")
        }
    });
    if let Some(json) = &args.from_json {
        let text = std::fs::read_to_string(json).ctx(|| format!("read {}", json.display()))?;
        let mut r: Results =
            serde_json::from_str(&text).ctx(|| format!("parse {}", json.display()))?;
        r.summarise();
        report::write_all(&r, &out)?;
        eprintln!("bench: rewrote {}", out.display());
        return Ok(());
    }
    let rbd_run = args.peers == "rbd";
    let image_size =
        parse_size(
            args.image_size
                .as_deref()
                .unwrap_or(if rbd_run { "256M" } else { "1G" }),
        )?;
    let workloads = pick(
        &args.workloads,
        Workload::defaults(),
        Workload::all(),
        Workload::name,
        Workload::parse,
    )?;
    let peers = if rbd_run {
        Peer::rbd()
    } else {
        pick(
            &args.peers,
            Peer::defaults(with_ch),
            Peer::all(with_ch)
                .into_iter()
                .filter(|p| args.peers != "all" || !p.is_rbd())
                .collect(),
            |p| p.name.clone(),
            |s| bail!("unknown peer {s:?} (see --list)"),
        )?
    };
    let rbd_peers = peers.iter().filter(|p| p.is_rbd()).count();
    if rbd_peers > 0 && rbd_peers < peers.len() {
        bail!("the *-rbd peers run on their own (--peers rbd, or a list of *-rbd peers only)");
    }
    // Hold the cluster (if the bench starts one) until the run ends.
    let (rbd, _cluster) = if rbd_peers > 0 {
        let (r, c) = rbd_target(&args, &ws, &work_dir, image_size, &peers)?;
        (Some(r), c)
    } else {
        (None, None)
    };
    let (reps, runtime, ramp) = if args.quick {
        (1, 1.0, 0.2)
    } else {
        (3, 4.0, 0.5)
    };
    let plan = Plan {
        workloads,
        peers,
        reps: args.reps.unwrap_or(reps),
        ramp: secs(args.ramp.unwrap_or(ramp), "--ramp")?,
        runtime: secs(args.runtime.unwrap_or(runtime), "--runtime")?,
        image_cold: image_cold.clone(),
        image_hot,
        max_idle_wait: secs(args.max_idle_wait, "--max-idle-wait")?,
        image_size,
        work_dir: work_dir.clone(),
        progs: Programs {
            backend: backend_binary(&args)?,
            qsd: args.qsd.clone(),
            fio: args.fio.clone(),
            ch: args.ch.clone(),
        },
        rbd: rbd.clone(),
    };
    if let Some(idle) = args.idle_cpu {
        return idle::run_all(&plan, secs(idle, "--idle-cpu")?);
    }
    eprintln!(
        "bench: {} workloads × {} peers × {} reps, {:.1}+{:.1} s per run; backend {}",
        plan.workloads.len(),
        plan.peers.len(),
        plan.reps,
        plan.ramp.as_secs_f64(),
        plan.runtime.as_secs_f64(),
        plan.progs.backend.display()
    );
    let samples = runner::run(&plan)?;
    let mut r = Results {
        command: command_line(),
        finished_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: machine::describe(
            &image_cold,
            &ws,
            &plan.progs.qsd,
            &plan.progs.fio,
            plan.progs.ch.as_deref(),
        ),
        reps: plan.reps,
        ramp_s: plan.ramp.as_secs_f64(),
        runtime_s: plan.runtime.as_secs_f64(),
        image: match &rbd {
            Some(r) => format!(
                "{}/{}{}",
                r.pool,
                r.image,
                if r.osd_pid_file.is_some() {
                    ", on a throw-away cluster: one monitor, one memstore OSD, 127.0.0.1"
                } else {
                    ""
                }
            ),
            None => work_dir.display().to_string(),
        },
        image_size,
        workloads: plan.workloads.iter().map(Workload::name).collect(),
        peers: plan.peers.iter().map(|p| p.name.clone()).collect(),
        samples,
        cells: Vec::new(),
    };
    r.summarise();
    report::write_all(&r, &out)?;
    println!("{}", report::markdown(&r));
    eprintln!(
        "bench: wrote {}/benchmarks.md and {}/bench/",
        out.display(),
        out.display()
    );
    Ok(())
}

/// The RBD image of an RBD run, after checking that the peers' programs
/// can reach it: on --rbd-conf's cluster, or on a throw-away one started in
/// `<work dir>/ceph` (returned, stopped when dropped).
fn rbd_target(
    args: &Args,
    ws: &std::path::Path,
    work_dir: &std::path::Path,
    image_size: u64,
    peers: &[Peer],
) -> Result<(RbdImage, Option<Cluster>)> {
    if peers.iter().any(|p| p.name == "qsd-rbd") {
        if let Some(why) = rbd::qsd_rbd_missing(&args.qsd) {
            bail!("qsd-rbd: {why}");
        }
    }
    if peers.iter().any(|p| p.name == "fio-rbd") {
        if let Some(why) = rbd::fio_rbd_missing(&args.fio) {
            bail!("fio-rbd: {why}");
        }
    }
    std::fs::create_dir_all(work_dir).ctx(|| format!("mkdir {}", work_dir.display()))?;
    let (conf, osd_pid_file, cluster) = match &args.rbd_conf {
        Some(conf) => (conf.clone(), None, None),
        None => {
            // The memstore holds the image (and RADOS's overhead) in RAM.
            let store_mb = (image_size >> 20) * 2 + 512;
            let c = Cluster::start(ws, &work_dir.join("ceph"), &args.rbd_pool, store_mb)?;
            (c.conf(), Some(c.osd_pid_file()), Some(c))
        }
    };
    let image = RbdImage {
        conf,
        pool: args.rbd_pool.clone(),
        image: args.rbd_image.clone(),
        osd_pid_file,
        fio_conf: work_dir.join("fio-rbd.conf"),
        features: args.rbd_features.clone(),
    };
    image.write_fio_conf()?;
    image.prepare(image_size)?;
    Ok((image, cluster))
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut s = String::from("cargo run --release -p vmm-bench --bin bench");
    if !args.is_empty() {
        s.push_str(" -- ");
        s.push_str(&args.join(" "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert!(parse_size("1X").is_err());
    }

    #[test]
    fn picks_batching_workloads_and_new_peers() {
        let w = pick(
            "randwrite-4k-qd32-q2,write-1m-qd32-q2",
            Workload::defaults(),
            Workload::all(),
            Workload::name,
            Workload::parse,
        )
        .expect("workloads");
        let names: Vec<String> = w.iter().map(Workload::name).collect();
        assert_eq!(names, ["randwrite-4k-qd32-q2", "write-1m-qd32-q2"]);
        let all = pick(
            "all",
            vec![],
            Workload::all(),
            Workload::name,
            Workload::parse,
        )
        .expect("all");
        assert!(all.iter().any(|w| w.name() == "write-1m-qd32-q2"));
        let peers = pick(
            "ours-dontcache-uring, ours-dontcache-d0-uring,ours-none-uring-pollfixed",
            Peer::defaults(false),
            Peer::all(false),
            |p| p.name.clone(),
            |s| bail!("unknown peer {s:?} (see --list)"),
        )
        .expect("peers");
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ours-dontcache-uring",
                "ours-dontcache-d0-uring",
                "ours-none-uring-pollfixed"
            ]
        );
        let bad = pick(
            "ours-dontcache-d1-uring",
            vec![],
            Peer::all(false),
            |p| p.name.clone(),
            |s| bail!("unknown peer {s:?} (see --list)"),
        );
        assert!(bad.is_err());
    }
}
