//! `guest-fio`: fio inside a guest, against this backend and qemu-storage-daemon (the in-guest
//! counterpart of the host-driven `bench`).
//!
//! ```text
//! cargo run --release -p vmm-bench --bin guest-fio -- [--reps 3] [--runtime 5] [--ramp 1]
//!     [--workloads randread-4k-qd32-q2,...] [--peers ours-none,qsd-direct,...]
//!     [--backend PATH] [--json PATH]
//! ```
//!
//! The workloads are the host-driven bench's (`randread-4k-qd32-q2`, `randwrite-4k-qd32-q2`,
//! `randread-4k-qd1-q1`, `randwrite-4k-qd1-q1`, `read-1m-qd8-q1`, `write-1m-qd8-q1`): `qN` is
//! N fio jobs, job `i` pinned to vCPU `i` so that `q2` uses both virtqueues; the iodepth is per
//! job; io_uring, `direct=1` in the guest, on the raw `/dev/vda` (see
//! `guest_agent::fio`). The peers, in order: `ours-none`, `ours-writeback`,
//! `ours-dontcache` (this backend's `--cache` modes), `qsd-direct` and `qsd-buffered`
//! (qemu-storage-daemon's vhost-user-blk export, `cache.direct=on|off`, `aio=io_uring`).
//!
//! For each repetition, for each peer in order, it resets the host page cache of one
//! preallocated image (`fdatasync` + `POSIX_FADV_DONTNEED`), starts the server fresh with as
//! many queues as vCPUs, and boots ONE 2-vCPU guest (the VM harness; QEMU under TCG on this
//! project's machines) with the fio initramfs (`build-initramfs.sh -F`) whose agent runs every
//! selected workload in turn as `fio#<workload>`. While the guest runs, the host samples the
//! server's and QEMU's CPU time (`/proc/PID/stat`) and the host's (`/proc/stat`) when a
//! workload starts (its `AGENT-READY` line) and when its result arrives, which gives:
//!
//! - fio's figures as the guest saw them: IOPS, MiB/s, completion latency p50/p99/p99.9, and
//!   fio's own CPU usr+sys;
//! - the server's CPU per request: its CPU time over the window, divided by the requests the
//!   guest's disk completed meanwhile (`/sys/block/vda/stat`, fio's ramp included);
//! - the noise: CPU the rest of the host used in the window (the host's busy time less QEMU,
//!   the server and this process), in cores.
//!
//! Progress goes to stderr; the markdown section (machine and software, the command that
//! regenerates it, one table per workload with medians and [min–max]) to stdout; every run to
//! `--json`. It holds the harness's VM lock for the whole run; every server and QEMU it starts
//! is a harness guard, killed with its process group when dropped or when this process dies.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use guest_agent::fio::{FioJob, FioSummary};
use guest_agent::protocol::{self, WorkloadResult};
use serde::Serialize;
use serde_json::json;
use vmm_bench::procstat;
use vmm_bench::tool_error::{self, Context, ToolError, ToolResult as Result};
use vmm_tests::backend::{backend_bin, BackendKind};
use vmm_tests::pagecache;
use vmm_tests::qemu::qemu_bin;
use vmm_tests::spread::Spread;
use vmm_tests::{
    setup, AgentPlan, AgentRun, Backend, BackendConfig, Qemu, VhostUserDisk, VmConfig,
};

const MIB: u64 = 1 << 20;

/// The default workloads: the host-driven bench's default matrix.
const DEFAULT_WORKLOADS: &str = "randread-4k-qd32-q2,randwrite-4k-qd32-q2,randread-4k-qd1-q1,randwrite-4k-qd1-q1,read-1m-qd8-q1,write-1m-qd8-q1";

/// The default peers, in the order they run.
const DEFAULT_PEERS: &str = "ours-none,ours-writeback,ours-dontcache,qsd-direct,qsd-buffered";

/// fio in a guest against this backend and qemu-storage-daemon (VM harness).
#[derive(Parser, Debug)]
#[command(name = "guest-fio")]
struct Args {
    /// Repetitions: each boots one guest per peer (medians over them).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Seconds measured per workload.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Seconds of fio's ramp before each measurement.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Comma-separated workloads, `<rw>-<bs>-qd<D>-q<J>` (J fio jobs of iodepth D, job i pinned
    /// to vCPU i), run in this order in every guest.
    #[arg(long, default_value = DEFAULT_WORKLOADS)]
    workloads: String,
    /// Comma-separated peers, run in this order: ours-none, ours-writeback, ours-dontcache
    /// (`--cache`), qsd-direct, qsd-buffered (qemu-storage-daemon, `cache.direct=on|off`,
    /// `aio=io_uring`).
    #[arg(long, default_value = DEFAULT_PEERS)]
    peers: String,
    /// The vhost-user-blk binary [default: $VHOST_USER_BLK_BIN, else built].
    #[arg(long)]
    backend: Option<PathBuf>,
    /// qemu-storage-daemon.
    #[arg(long, env = "QSD_BIN", default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// The image's size in MiB.
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// vCPUs of the guest, and queues of the disk.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Folder for the image, sockets and logs [default: the harness's work root, `guest-fio`].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where to write every run as JSON.
    #[arg(long, default_value = "target/guest-fio.json")]
    json: PathBuf,
}

/// Who serves the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Server {
    /// This backend with `--cache <cache>`.
    Ours {
        /// `none`, `writeback` or `dontcache`.
        cache: String,
    },
    /// qemu-storage-daemon, `aio=io_uring`.
    Qsd {
        /// `cache.direct=on`.
        direct: bool,
    },
}

/// A peer: a name and its server.
#[derive(Debug, Clone, Serialize)]
struct Peer {
    name: String,
    server: Server,
}

impl Peer {
    fn parse(s: &str) -> Result<Self> {
        let server = match s {
            "ours-none" | "ours-writeback" | "ours-dontcache" => Server::Ours {
                cache: s.trim_start_matches("ours-").to_string(),
            },
            "qsd-direct" => Server::Qsd { direct: true },
            "qsd-buffered" => Server::Qsd { direct: false },
            _ => {
                return Err(ToolError::Check(format!(
                    "unknown peer {s:?} (ours-none, ours-writeback, ours-dontcache, qsd-direct, qsd-buffered)"
                )))
            }
        };
        Ok(Peer {
            name: s.to_string(),
            server,
        })
    }

    /// How the server runs, for the tables.
    fn label(&self) -> String {
        match &self.server {
            Server::Ours { cache } => format!("`--cache {cache}`"),
            Server::Qsd { direct } => format!(
                "qsd `cache.direct={}`, `aio=io_uring`",
                if *direct { "on" } else { "off" }
            ),
        }
    }
}

/// One workload in one guest.
#[derive(Debug, Clone, Serialize)]
struct WorkRun {
    peer: String,
    workload: String,
    rep: u32,
    iops: f64,
    mib_s: f64,
    total_ios: u64,
    clat_mean_us: f64,
    clat_p50_us: f64,
    clat_p99_us: f64,
    clat_p999_us: f64,
    /// fio's usr and sys CPU, percent of one vCPU per job.
    fio_usr_pct: f64,
    fio_sys_pct: f64,
    /// fio's CPU over the measured time, all jobs, µs per I/O.
    fio_cpu_us_per_io: f64,
    /// Requests the guest's disk completed from fio's start to its end (ramp included).
    disk_requests: u64,
    /// The server's CPU seconds over the window.
    backend_cpu_s: f64,
    backend_cpu_us_per_req: f64,
    /// QEMU's CPU seconds over the window (the emulated guest, under TCG).
    qemu_cpu_s: f64,
    noise_cores: f64,
    /// Host seconds from the workload's start line to its result line.
    window_s: f64,
    summary: FioSummary,
}

/// One guest boot: a peer, a repetition, every workload.
#[derive(Debug, Clone, Serialize)]
struct BootRun {
    peer: String,
    rep: u32,
    accel: String,
    guest_kernel: String,
    /// Seconds from starting the server to the agent's start line.
    boot_s: f64,
    /// Seconds from starting the server to stopping it.
    wall_s: f64,
    /// Per-queue requests the backend completed over the boot (ours only).
    queue_requests: Option<Vec<u64>>,
    workloads: Vec<WorkRun>,
}

/// CPU counters at one instant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    host: f64,
    server: f64,
    qemu: f64,
    me: f64,
}

fn sample(server: u32, qemu: u32) -> Result<Sample> {
    Ok(Sample {
        at: Instant::now(),
        host: procstat::host_cpu().ctx(|| "host CPU".into())?.busy,
        server: procstat::cpu_seconds(server).ctx(|| "the server's CPU".into())?,
        qemu: procstat::cpu_seconds(qemu).ctx(|| "QEMU's CPU".into())?,
        me: procstat::self_cpu_seconds().ctx(|| "our CPU".into())?,
    })
}

/// Sends this process's standard output to standard error until dropped: the harness prints
/// notes of its own on stdout (the accelerator it picked, ...), and stdout is for the markdown.
struct StdoutToStderr {
    saved: Option<OwnedFd>,
}

impl StdoutToStderr {
    fn new() -> Self {
        let _ = std::io::stdout().flush();
        // SAFETY: dup(2) of our own standard output; it returns a new descriptor or -1.
        let saved = unsafe { libc::dup(libc::STDOUT_FILENO) };
        if saved < 0 {
            return StdoutToStderr { saved: None };
        }
        // SAFETY: `saved` is a descriptor dup(2) just returned, which nothing else owns.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        // SAFETY: dup2(2) of our own standard error onto our standard output.
        unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) };
        StdoutToStderr { saved: Some(saved) }
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        let _ = std::io::stdout().flush();
        if let Some(fd) = &self.saved {
            // SAFETY: dup2(2) of a descriptor we own back onto our standard output.
            unsafe { libc::dup2(fd.as_raw_fd(), libc::STDOUT_FILENO) };
        }
    }
}

/// The console line's workload instance, if it is a ready or result line of `instance`.
fn line_of(line: &str, instance: &str) -> Option<bool> {
    let tag = format!("\"workload\":\"{instance}\"");
    if !line.contains(&tag) {
        return None;
    }
    if line.contains(protocol::READY_PREFIX) {
        Some(true)
    } else if line.contains(protocol::RESULT_PREFIX) {
        Some(false)
    } else {
        None
    }
}

/// The figures of one workload from its result and the samples around it.
fn work_run(
    peer: &Peer,
    rep: u32,
    job: &FioJob,
    result: &WorkloadResult,
    s0: &Sample,
    s1: &Sample,
) -> Result<WorkRun> {
    if !result.ok {
        return Err(ToolError::Check(format!(
            "{} {}: {}",
            peer.name,
            result.workload,
            result.error.as_deref().unwrap_or("failed")
        )));
    }
    let summary: FioSummary = serde_json::from_value(result.data["summary"].clone())
        .map_err(|e| ToolError::Check(format!("{}: bad summary: {e}", result.workload)))?;
    let disk_requests = result.data["disk"]["requests"].as_u64().unwrap_or(0);
    let window = s1.at.duration_since(s0.at).as_secs_f64();
    let server = s1.server - s0.server;
    let qemu = s1.qemu - s0.qemu;
    let others = (s1.host - s0.host) - server - qemu - (s1.me - s0.me);
    Ok(WorkRun {
        peer: peer.name.clone(),
        workload: job.name(),
        rep,
        iops: summary.iops,
        mib_s: summary.mib_s(),
        total_ios: summary.total_ios,
        clat_mean_us: summary.clat_mean_us,
        clat_p50_us: summary.clat_pct_us[0],
        clat_p99_us: summary.clat_pct_us[1],
        clat_p999_us: summary.clat_pct_us[2],
        fio_usr_pct: summary.usr_cpu,
        fio_sys_pct: summary.sys_cpu,
        fio_cpu_us_per_io: summary.cpu_seconds() * 1e6 / summary.total_ios.max(1) as f64,
        disk_requests,
        backend_cpu_s: server,
        backend_cpu_us_per_req: server * 1e6 / disk_requests.max(1) as f64,
        qemu_cpu_s: qemu,
        noise_cores: if window > 0.0 {
            (others / window).max(0.0)
        } else {
            0.0
        },
        window_s: window,
        summary,
    })
}

/// What every boot shares.
struct Setup<'a> {
    args: &'a Args,
    jobs: Vec<FioJob>,
    ours: PathBuf,
    assets: setup::GuestAssets,
    image: PathBuf,
    dir: PathBuf,
}

/// Waits for the agent's last line, then for QEMU to exit (the agent powers the guest off);
/// returns what the agent printed.
fn finish(q: &mut Qemu, from: usize, timeout: Duration) -> Result<AgentRun> {
    q.console()
        .wait_for(from, timeout, "the guest agent to finish", |l| {
            l.contains(protocol::DONE_PREFIX)
        })
        .ctx(|| "guest".into())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while q.running().ctx(|| "QEMU".into())? && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if q.running().ctx(|| "QEMU".into())? {
        q.console().note("guest did not power off; killing QEMU");
        q.kill().ctx(|| "kill QEMU".into())?;
    }
    q.console().wait_closed(Duration::from_secs(5));
    AgentRun::from_lines(&q.console().lines()).ctx(|| "agent output".into())
}

/// One boot: a fresh server for `peer`, one guest running every workload.
fn run_boot(st: &Setup, peer: &Peer, rep: u32) -> Result<BootRun> {
    let args = st.args;
    pagecache::drop_cached(&st.image).ctx(|| "reset the page cache".into())?;
    let t0 = Instant::now();
    let queues = args.cpus as u16;
    let mut bcfg = BackendConfig::new(&st.image, &st.dir).queues(queues);
    bcfg.log = st.dir.join(format!("{}.log", peer.name));
    let kind = match &peer.server {
        Server::Ours { cache } => {
            bcfg.cache = Some(cache.clone());
            BackendKind::VhostUserBlk(st.ours.clone())
        }
        Server::Qsd { direct } => {
            bcfg.cache = Some(if *direct { "none" } else { "writeback" }.into());
            bcfg.qsd_aio = Some("io_uring".into());
            BackendKind::Qsd(args.qsd.clone())
        }
    };
    let mut backend =
        Backend::start(&kind, &bcfg).ctx(|| format!("start {} (rep {rep})", peer.name))?;
    let instances: Vec<String> = st
        .jobs
        .iter()
        .map(|j| format!("fio#{}", j.name()))
        .collect();
    let plan = AgentPlan::new(&instances)
        .param("fio.runtime", args.runtime)
        .param("fio.ramp", args.ramp);
    let per_job = Duration::from_secs_f64(args.runtime + args.ramp) + Duration::from_secs(120);
    let mut vm = VmConfig::new(args.cpus, plan).disk(VhostUserDisk::new(&bcfg.socket, queues));
    vm.run_timeout = per_job * instances.len() as u32 + Duration::from_secs(60);
    let name = format!("{}-{rep}", peer.name);
    let mut q = Qemu::start(&vm, &st.assets, &st.dir, &name).ctx(|| format!("start {name}"))?;
    let result = (|| {
        let hello = q.wait_hello().ctx(|| format!("boot {name}"))?;
        let boot_s = t0.elapsed().as_secs_f64();
        let mut works = Vec::new();
        let mut from = 0;
        for (inst, job) in instances.iter().zip(&st.jobs) {
            let (i, line) = q
                .console()
                .wait_for(from, per_job, &format!("{inst} to start"), |l| {
                    line_of(l, inst).is_some()
                })
                .ctx(|| name.clone())?;
            let s0 = sample(backend.pid(), q.pid())?;
            let (j, line) = if line_of(&line, inst) == Some(true) {
                q.console()
                    .wait_for(i, per_job, &format!("{inst} to finish"), |l| {
                        line_of(l, inst) == Some(false)
                    })
                    .ctx(|| name.clone())?
            } else {
                (i, line)
            };
            let s1 = sample(backend.pid(), q.pid())?;
            from = j + 1;
            let result: WorkloadResult = protocol::parse_line(protocol::RESULT_PREFIX, &line)
                .ok_or_else(|| ToolError::Check(format!("{name}: bad result line {line}")))?;
            let w = work_run(peer, rep, job, &result, &s0, &s1)?;
            eprintln!(
                "    {} rep {rep} {}: {:.0} IOPS, {:.1} MiB/s, p50 {:.0} µs, p99 {:.0} µs, fio CPU {:.0}+{:.0} %, backend {:.1} µs/req, noise {:.2}",
                peer.name,
                w.workload,
                w.iops,
                w.mib_s,
                w.clat_p50_us,
                w.clat_p99_us,
                w.fio_usr_pct,
                w.fio_sys_pct,
                w.backend_cpu_us_per_req,
                w.noise_cores
            );
            works.push(w);
        }
        let run = finish(&mut q, from, per_job)?;
        run.expect_all_ok().ctx(|| name.clone())?;
        Ok((hello, boot_s, works))
    })();
    let (hello, boot_s, works) = match result {
        Ok(r) => r,
        Err(e) => {
            q.dump_tail(40);
            return Err(e);
        }
    };
    let accel = q.accel().name().to_string();
    drop(q);
    let queue_requests = if backend.kind().has_stats() {
        let stats = backend.stats().ctx(|| format!("{name}: backend stats"))?;
        Some(stats.queues.iter().map(|q| q.requests).collect::<Vec<_>>())
    } else {
        None
    };
    backend
        .terminate(Duration::from_secs(10))
        .ctx(|| format!("stop {}", peer.name))?;
    if let Some(qr) = &queue_requests {
        if st.jobs.iter().any(|j| j.numjobs >= 2) && qr.contains(&0) {
            eprintln!(
                "guest-fio: warning: {name}: a queue carried no requests ({qr:?}) although a workload ran one job per vCPU"
            );
        }
    }
    Ok(BootRun {
        peer: peer.name.clone(),
        rep,
        accel,
        guest_kernel: hello.kernel,
        boot_s,
        wall_s: t0.elapsed().as_secs_f64(),
        queue_requests,
        workloads: works,
    })
}

/// Median and range of one figure over the runs of a cell.
fn cell(runs: &[&WorkRun], f: impl Fn(&WorkRun) -> f64) -> (f64, f64, f64) {
    let v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
    let s = Spread::of(&v);
    (s.median, s.min, s.max)
}

fn fmt_num(x: f64) -> String {
    if x >= 1e5 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if x > 0.0 && x < 0.1 {
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

fn fmt_range((m, lo, hi): (f64, f64, f64)) -> String {
    format!("{} [{}–{}]", fmt_num(m), fmt_num(lo), fmt_num(hi))
}

/// A word quoted for a POSIX shell when it needs it.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,=:+@%".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// The first line a program prints for `--version`.
fn version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The host's CPU model and whether it is a VM itself.
fn host_cpu() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let vm = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{n} × {model}{}", if vm { " (a VM itself)" } else { "" })
}

/// Software and machine facts for the report.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    host_cpu: String,
    host_kernel: String,
    qemu: String,
    qsd: String,
    backend: String,
    git: String,
    guest_kernel: String,
    accel: String,
    fio: String,
}

/// The markdown section.
fn report(args: &Args, m: &Machine, peers: &[Peer], jobs: &[FioJob], boots: &[BootRun]) -> String {
    let mut s = String::new();
    let cmd: Vec<String> = std::env::args().skip(1).map(|a| shell_word(&a)).collect();
    let _ = writeln!(s, "### Run\n");
    let _ = writeln!(
        s,
        "- Regenerate: `cargo run --release -p vmm-bench --bin guest-fio --{}{}`",
        if cmd.is_empty() { "" } else { " " },
        cmd.join(" ")
    );
    let _ = writeln!(
        s,
        "- Machine: host {} ({}); guest: {} vCPUs, 512 MiB, kernel {}, {} `-accel {} -cpu max` \
         (**{}**: only ratios between peers count)",
        m.host_cpu,
        m.host_kernel,
        args.cpus,
        m.guest_kernel,
        m.qemu,
        m.accel,
        m.accel.to_uppercase()
    );
    let _ = writeln!(
        s,
        "- Software: backend `{}` (workspace at `{}`); {}; {} in the guest (io_uring, `direct=1`, `/dev/vda`)",
        m.backend, m.git, m.qsd, m.fio
    );
    let _ = writeln!(
        s,
        "- {} repetition(s), peers in order within each; one boot per peer per repetition running every workload in turn; {} s ramp + {} s measured per workload; {} MiB image, page cache dropped before each boot; figures are medians with [min–max]\n",
        args.reps, args.ramp, args.runtime, args.image_mib
    );
    let runs: Vec<&WorkRun> = boots.iter().flat_map(|b| b.workloads.iter()).collect();
    for job in jobs {
        let wname = job.name();
        let _ = writeln!(s, "### {wname}\n");
        let _ = writeln!(
            s,
            "| peer | server | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | guest fio CPU % (usr+sys) | backend CPU µs/req | noise cores |"
        );
        let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
        for p in peers {
            let rs: Vec<&WorkRun> = runs
                .iter()
                .copied()
                .filter(|r| r.peer == p.name && r.workload == wname)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let iops = cell(&rs, |r| r.iops);
            let mib = cell(&rs, |r| r.mib_s);
            let (iops, mib) = if job.is_bandwidth() {
                (fmt_num(iops.0), fmt_cell(mib))
            } else {
                (fmt_cell(iops), fmt_num(mib.0))
            };
            let backend = fmt_range(cell(&rs, |r| r.backend_cpu_us_per_req));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                p.label(),
                iops,
                mib,
                fmt_num(cell(&rs, |r| r.clat_p50_us).0),
                fmt_range(cell(&rs, |r| r.clat_p99_us)),
                fmt_num(cell(&rs, |r| r.clat_p999_us).0),
                fmt_num(cell(&rs, |r| r.fio_usr_pct + r.fio_sys_pct).0),
                backend,
                fmt_num(cell(&rs, |r| r.noise_cores).0),
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "*p50/p99/p99.9*: fio's completion latency in the guest. *guest fio CPU*: fio's usr+sys, \
         in percent of one vCPU per job. *backend CPU µs/req*: the server process's CPU time \
         (`/proc/PID/stat`) from the workload's start line to its result line, over the requests \
         the guest's disk completed meanwhile (fio's ramp included). *noise cores*: CPU the rest \
         of the host used in the same window (the host's busy time less QEMU, the server and this \
         tool); on this 2-CPU machine, runs above ~0.3 are suspect."
    );
    s
}

fn run(args: &Args) -> Result<()> {
    let peers: Vec<Peer> = args
        .peers
        .split(',')
        .filter(|s| !s.is_empty())
        .map(Peer::parse)
        .collect::<Result<_>>()?;
    let jobs: Vec<FioJob> = args
        .workloads
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|w| {
            FioJob::parse_name(w)
                .map_err(|e| ToolError::Check(e.to_string()))
                .and_then(|j| {
                    if j.name() == w {
                        Ok(j)
                    } else {
                        Err(ToolError::Check(format!(
                            "workload {w:?}: write it {:?}",
                            j.name()
                        )))
                    }
                })
        })
        .collect::<Result<_>>()?;
    if peers.is_empty() || jobs.is_empty() || args.reps == 0 {
        return Err(ToolError::Check(
            "nothing to run: give peers, workloads and at least one repetition".into(),
        ));
    }
    if !(args.runtime > 0.0 && args.ramp >= 0.0) {
        return Err(ToolError::Check(
            "--runtime must be positive and --ramp not negative".into(),
        ));
    }
    let quiet = StdoutToStderr::new();
    let ours = match &args.backend {
        Some(p) => p.clone(),
        None => backend_bin().ctx(|| "find the backend".into())?,
    };
    let assets = setup::fio_guest_assets().ctx(|| "guest assets (fio initramfs)".into())?;
    eprintln!("guest-fio: waiting for the VM lock");
    let _lock = setup::vm_lock().ctx(|| "VM lock".into())?;
    let dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| setup::work_root().join("guest-fio"));
    std::fs::create_dir_all(&dir).ctx(|| format!("mkdir {}", dir.display()))?;
    let image = dir.join("disk.img");
    pagecache::prepare_image(&image, args.image_mib * MIB).ctx(|| "prepare the image".into())?;
    let initramfs_mib = std::fs::metadata(&assets.initramfs).map_or(0, |m| m.len()) / MIB;
    let total = peers.len() * args.reps as usize;
    eprintln!(
        "guest-fio: backend {}, kernel {}, initramfs {} ({initramfs_mib} MiB), image {} ({} MiB), {} peers × {} reps = {total} boots of {} workloads",
        ours.display(),
        assets.kernel_release,
        assets.initramfs.display(),
        image.display(),
        args.image_mib,
        peers.len(),
        args.reps,
        jobs.len()
    );
    let st = Setup {
        args,
        jobs,
        ours: ours.clone(),
        assets,
        image: image.clone(),
        dir,
    };
    let start = Instant::now();
    let mut boots: Vec<BootRun> = Vec::new();
    for rep in 1..=args.reps {
        for p in &peers {
            let b = run_boot(&st, p, rep)?;
            let done = boots.len() + 1;
            let left = start.elapsed().as_secs_f64() / done as f64 * (total - done) as f64;
            eprintln!(
                "[{done}/{total}] {} rep {rep}: boot {:.1} s, {} workloads, queues {:?}, {:.0} s (~{:.0} s left)",
                p.name,
                b.boot_s,
                b.workloads.len(),
                b.queue_requests.as_deref().unwrap_or(&[]),
                b.wall_s,
                left
            );
            boots.push(b);
        }
    }
    let first = boots.first();
    let machine = Machine {
        host_cpu: host_cpu(),
        host_kernel: Command::new("uname")
            .arg("-r")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        qemu: version(&qemu_bin()),
        qsd: version(&args.qsd),
        backend: ours.display().to_string(),
        git: Command::new("git")
            .arg("-C")
            .arg(setup::workspace_dir())
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        guest_kernel: first.map(|b| b.guest_kernel.clone()).unwrap_or_default(),
        accel: first.map(|b| b.accel.clone()).unwrap_or_default(),
        fio: first
            .and_then(|b| b.workloads.first())
            .map(|w| w.summary.version.clone())
            .unwrap_or_default(),
    };
    let out = json!({
        "machine": machine,
        "args": format!("{args:?}"),
        "peers": peers,
        "workloads": st.jobs.iter().map(FioJob::name).collect::<Vec<_>>(),
        "boots": boots,
    });
    if let Some(d) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).ctx(|| format!("mkdir {}", d.display()))?;
    }
    std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    )
    .ctx(|| format!("write {}", args.json.display()))?;
    drop(quiet);
    println!("{}", report(args, &machine, &peers, &st.jobs, &boots));
    eprintln!(
        "guest-fio: {} boots in {:.0} s; runs in {}",
        boots.len(),
        start.elapsed().as_secs_f64(),
        args.json.display()
    );
    let _ = std::fs::remove_file(&image);
    Ok(())
}

fn main() -> ExitCode {
    tool_error::exit_code("guest-fio", run(&Args::parse()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        let p = Peer::parse("qsd-buffered").expect("peer");
        assert_eq!(p.server, Server::Qsd { direct: false });
        assert!(p.label().contains("cache.direct=off"));
        let p = Peer::parse("ours-dontcache").expect("peer");
        assert_eq!(
            p.server,
            Server::Ours {
                cache: "dontcache".into()
            }
        );
        assert!(Peer::parse("ours-null").is_err());
        for name in DEFAULT_PEERS.split(',') {
            assert!(Peer::parse(name).is_ok(), "{name}");
        }
        for w in DEFAULT_WORKLOADS.split(',') {
            assert_eq!(
                FioJob::parse_name(w).map(|j| j.name()).ok().as_deref(),
                Some(w)
            );
        }
    }

    #[test]
    fn console_lines() {
        let ready = r#"AGENT-READY {"workload":"fio#read-1m-qd8-q1"}"#;
        let result = r#"[  3.1] AGENT-RESULT {"workload":"fio#read-1m-qd8-q1","ok":true}"#;
        assert_eq!(line_of(ready, "fio#read-1m-qd8-q1"), Some(true));
        assert_eq!(line_of(result, "fio#read-1m-qd8-q1"), Some(false));
        assert_eq!(line_of(ready, "fio#randread-4k-qd1-q1"), None);
        assert_eq!(line_of("init: hello", "fio#read-1m-qd8-q1"), None);
    }

    #[test]
    fn medians_and_words() {
        assert_eq!(fmt_num(72_100.0), "72.1k");
        assert_eq!(fmt_num(805_000.0), "805k");
        assert_eq!(shell_word("--reps"), "--reps");
        assert_eq!(shell_word("a b"), "'a b'");
    }
}
