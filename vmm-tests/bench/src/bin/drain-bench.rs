//! `drain-bench`: how long a vCPU unplug's drain takes, host-side, without a VM.
//!
//! ```text
//! cargo run --release -p vmm-bench --bin drain-bench -- [--cycles 200] [--backend PATH]
//! ```
//!
//! It starts the backend with `--cache dontcache` (every write is deferred
//! at submission), a long `--defer-delay-us` (1 s: nothing completes on
//! the timer during a cycle) and a control socket, and attaches libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate, as `bench` does) as
//! the frontend, one client thread per queue. Each cycle:
//!
//! 1. the client threads submit `--pending` 4 KiB writes on their queues;
//! 2. the tool polls `stats` until every one of them waits in a deferred
//!    batch (`deferred_worker.pending`);
//! 3. it sends `vcpu-unplug N` on the control socket and notes the time;
//!    the backend answers with its drain report (`latency_us`: from the
//!    event to the last signal);
//! 4. the client threads note when the last of their completions arrives
//!    (waiting on the queue's completion eventfd, as a guest's interrupt
//!    would wake it): the client-observed latency, from sending the command
//!    to the last used buffer seen;
//! 5. `vcpu-plug N`.
//!
//! Two scenarios: `no-map` (no queue map: an unplug drains every queue,
//! writes pending on both) and `map` (`--queue-map 0=1,1=0`, the map Linux
//! 7.3 builds for 2 vCPUs and 2 queues: unplugging vCPU 1 drains queue 0,
//! where the writes wait). A cycle whose completions arrive before the
//! command (the timer fired first) is counted apart and left out. Every
//! cycle checks that the drain completed exactly what was pending, and the
//! end checks the backend's write count against what the client submitted.
//! It prints p50/p99/max per scenario as markdown and writes every sample to
//! `--json`. No QMP is involved: QMP's own event delay is not in these
//! figures.

use std::io::{BufRead, BufReader, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};
use vmm_bench::procstat;
use vmm_bench::tool_error::{self, Context, ToolError, ToolResult as Result};
use vmm_tests::backend::{backend_bin, BackendKind};
use vmm_tests::spread::percentile;
use vmm_tests::{setup, Backend, BackendConfig};

const DRIVER: &str = "virtio-blk-vhost-user";
const BS: usize = 4096;

/// Drain latency on vCPU unplug, host-side through libblkio.
#[derive(Parser, Debug)]
#[command(name = "drain-bench")]
struct Args {
    /// Unplug/plug cycles per scenario.
    #[arg(long, default_value_t = 200)]
    cycles: u32,
    /// Writes pending per loaded queue at each unplug.
    #[arg(long, default_value_t = 8)]
    pending: u32,
    /// The backend's `--defer-delay-us`.
    #[arg(long, default_value_t = 1_000_000)]
    defer_delay_us: u64,
    /// Microseconds to wait, once every write is pending, before the
    /// unplug (lets the writes' own writeback finish first).
    #[arg(long, default_value_t = 0)]
    settle_us: u64,
    /// Comma-separated scenarios: no-map, map.
    #[arg(long, default_value = "no-map,map")]
    scenarios: String,
    /// The vhost-user-blk binary [default: $VHOST_USER_BLK_BIN, else built].
    #[arg(long)]
    backend: Option<PathBuf>,
    /// Folder for the image, sockets and log [default: the harness's work
    /// root, `drain-bench`].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where to write every sample as JSON.
    #[arg(long, default_value = "target/drain-bench.json")]
    json: PathBuf,
}

/// What one scenario measured.
#[derive(Debug, Default, Serialize)]
struct Scenario {
    name: String,
    queue_map: Option<String>,
    vcpu: usize,
    loaded_queues: Vec<usize>,
    /// The backend's `latency_us` per counted cycle.
    backend_us: Vec<u64>,
    /// From sending `vcpu-unplug` to the last completion, per counted cycle.
    client_us: Vec<u64>,
    /// Cycles whose completions came before the command (left out).
    timer_first: u32,
    submitted: u64,
    completed: u64,
    backend_writes: u64,
    noise_cores: f64,
    wall_s: f64,
}

/// Orders to a client thread.
enum Order {
    /// Submit this many writes, then wait for them all.
    Submit(u32),
    Quit,
}

/// A client thread's report on one cycle.
struct Cycle {
    submitted_at: Instant,
    /// Arrival time of each completion.
    arrivals: Vec<Instant>,
    errors: u32,
}

/// A libblkio queue moved into its client thread.
struct SendQueue(Blkioq);

// SAFETY: each queue is used by exactly one thread: created by `start`,
// moved into its client thread and dropped there. The raw pointers that keep
// it from being `Send` point into the shared memory region, which outlives
// every client thread (they are joined before it is unmapped).
unsafe impl Send for SendQueue {}

/// One client thread: on each order, submit the writes, then wait (on the
/// completion eventfd, no polling) for all of them.
fn client(
    q: SendQueue,
    index: usize,
    buf: usize,
    orders: mpsc::Receiver<Order>,
    reports: mpsc::Sender<(usize, Cycle)>,
) -> Result<()> {
    let SendQueue(mut q) = q;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..256).map(|_| MaybeUninit::uninit()).collect();
    let mut seq = 0u64;
    while let Ok(Order::Submit(n)) = orders.recv() {
        for i in 0..n as usize {
            // Each queue writes its own 64 MiB slice, cycling.
            let off = (index as u64) * (64 << 20) + (seq % 16384) * BS as u64;
            seq += 1;
            q.write(off, (buf + i * BS) as *const u8, BS, i, ReqFlags::empty());
        }
        let mut t = Duration::ZERO;
        let mut got = q
            .do_io(&mut completions, 0, Some(&mut t), None)
            .or_else(|e| {
                if e.errno() == blkio::Errno::TIME {
                    Ok(0)
                } else {
                    Err(e)
                }
            })
            .ctx(|| format!("queue {index}: submit"))?;
        let submitted_at = Instant::now();
        let mut cycle = Cycle {
            submitted_at,
            arrivals: Vec::new(),
            errors: 0,
        };
        loop {
            let now = Instant::now();
            for c in &completions[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                if c.ret != 0 {
                    cycle.errors += 1;
                }
                cycle.arrivals.push(now);
            }
            if cycle.arrivals.len() >= n as usize {
                break;
            }
            let mut timeout = Duration::from_secs(5);
            got = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
                Ok(g) => g,
                Err(e) if e.errno() == blkio::Errno::TIME => {
                    return Err(ToolError::Check(format!(
                        "queue {index}: {} of {n} completions after 5 s: lost",
                        cycle.arrivals.len()
                    )))
                }
                Err(e) => {
                    return Err(ToolError::Blkio {
                        what: format!("queue {index}: do_io"),
                        source: e,
                    })
                }
            };
        }
        if reports.send((index, cycle)).is_err() {
            break;
        }
    }
    Ok(())
}

/// One line-delimited JSON request on the control socket.
fn control(s: &mut BufReader<UnixStream>, req: &Value) -> Result<Value> {
    let mut line = req.to_string();
    line.push('\n');
    s.get_mut()
        .write_all(line.as_bytes())
        .ctx(|| format!("send {req}"))?;
    let mut reply = String::new();
    s.read_line(&mut reply).ctx(|| format!("reply to {req}"))?;
    serde_json::from_str(&reply)
        .map_err(|e| ToolError::Check(format!("bad reply {reply:?} to {req}: {e}")))
}

fn deferred_pending(stats: &Value) -> u64 {
    stats["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| q["deferred_worker"]["pending"].as_u64().unwrap_or(0))
        .sum()
}

fn scenario(args: &Args, kind: &BackendKind, dir: &Path, name: &str) -> Result<Scenario> {
    let (map, vcpu, loaded): (Option<&str>, usize, Vec<usize>) = match name {
        "no-map" => (None, 1, vec![0, 1]),
        "map" => (Some("0=1,1=0"), 1, vec![0]),
        _ => return Err(ToolError::Check(format!("unknown scenario {name:?}"))),
    };
    let image = dir.join("drain.img");
    vmm_tests::create_image(&image, 256 << 20).ctx(|| "create the image".into())?;
    let mut cfg = BackendConfig::new(&image, dir).queues(2).cache("dontcache");
    cfg.log = dir.join(format!("backend-{name}.log"));
    // Strict batching: every write waits in the batch for the unplug, however few are in flight.
    cfg.extra_args = vec![
        "--defer-delay-us".into(),
        args.defer_delay_us.to_string(),
        "--strict-batching".into(),
    ];
    if let Some(m) = map {
        cfg.extra_args.push("--queue-map".into());
        cfg.extra_args.push(m.into());
    }
    let (busy0, ours0) = procstat::host_busy_and_ours().ctx(|| "CPU time".into())?;
    let t0 = Instant::now();
    let mut backend = Backend::start(kind, &cfg).ctx(|| "start the backend".into())?;
    let ctl_path = cfg.control.clone().unwrap_or_default();
    let mut ctl = BufReader::new(
        UnixStream::connect(&ctl_path).ctx(|| format!("connect {}", ctl_path.display()))?,
    );
    ctl.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ctx(|| "control read timeout".into())?;

    let mut b = Blkio::new(DRIVER).ctx(|| format!("blkio: new {DRIVER}"))?;
    let sock = cfg.socket.to_string_lossy().into_owned();
    b.set_str("path", &sock).ctx(|| "blkio: path".into())?;
    b.connect().ctx(|| format!("blkio: connect {sock}"))?;
    b.set_i32("num-queues", 2)
        .ctx(|| "blkio: num-queues".into())?;
    b.set_i32("queue-size", 256)
        .ctx(|| "blkio: queue-size".into())?;
    let mut out = b.start().ctx(|| "blkio: start".into())?;
    let per_queue = args.pending as usize * BS;
    let len = (2 * per_queue).div_ceil(1 << 21) * (1 << 21);
    let region = b
        .alloc_mem_region(len)
        .ctx(|| format!("blkio: allocate {len} bytes"))?;
    b.map_mem_region(&region)
        .ctx(|| "blkio: map region".into())?;

    let mut sc = Scenario {
        name: name.into(),
        queue_map: map.map(str::to_owned),
        vcpu,
        loaded_queues: loaded.clone(),
        ..Scenario::default()
    };
    let queues: Vec<SendQueue> = out.queues.drain(..).map(SendQueue).collect();
    let result = std::thread::scope(|s| -> Result<()> {
        let (rep_tx, rep_rx) = mpsc::channel();
        let mut order_tx = Vec::new();
        let mut handles = Vec::new();
        for (i, q) in queues.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            order_tx.push(tx);
            let rep_tx = rep_tx.clone();
            let buf = region.addr + i * per_queue;
            handles.push(s.spawn(move || client(q, i, buf, rx, rep_tx)));
        }
        drop(rep_tx);
        let body = (|| -> Result<()> {
            for cycle in 0..args.cycles {
                for &q in &loaded {
                    order_tx[q]
                        .send(Order::Submit(args.pending))
                        .map_err(|_| ToolError::Check(format!("client {q} is gone")))?;
                }
                let want = args.pending as u64 * loaded.len() as u64;
                sc.submitted += want;
                // Every write waits in a deferred batch before the unplug.
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let st = control(&mut ctl, &json!({"cmd": "stats"}))?;
                    if deferred_pending(&st) >= want {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(ToolError::Check(format!(
                            "cycle {cycle}: only {} of {want} completions pending after 5 s",
                            deferred_pending(&st)
                        )));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                std::thread::sleep(Duration::from_micros(args.settle_us));
                let sent = Instant::now();
                let report = control(&mut ctl, &json!({"cmd": "vcpu-unplug", "vcpu": vcpu}))?;
                let mut last = sent;
                let mut early = false;
                for _ in &loaded {
                    let (q, c) = rep_rx
                        .recv_timeout(Duration::from_secs(10))
                        .map_err(|_| ToolError::Check(format!("cycle {cycle}: no report")))?;
                    if c.errors > 0 {
                        return Err(ToolError::Check(format!(
                            "cycle {cycle}: queue {q}: {} writes failed",
                            c.errors
                        )));
                    }
                    sc.completed += c.arrivals.len() as u64;
                    for &a in &c.arrivals {
                        early |= a < sent;
                        last = last.max(a);
                    }
                    let _ = c.submitted_at;
                }
                control(&mut ctl, &json!({"cmd": "vcpu-plug", "vcpu": vcpu}))?;
                let drained = report["drained"].as_u64();
                if early {
                    sc.timer_first += 1;
                    continue;
                }
                if drained != Some(want) {
                    return Err(ToolError::Check(format!(
                        "cycle {cycle}: the drain completed {drained:?}, {want} were pending ({report})"
                    )));
                }
                sc.backend_us
                    .push(report["latency_us"].as_u64().ok_or_else(|| {
                        ToolError::Check(format!("cycle {cycle}: no latency_us in {report}"))
                    })?);
                sc.client_us
                    .push(last.duration_since(sent).as_micros() as u64);
            }
            Ok(())
        })();
        for tx in &order_tx {
            let _ = tx.send(Order::Quit);
        }
        for h in handles {
            h.join()
                .map_err(|_| ToolError::Check("client thread panicked".into()))??;
        }
        body
    });
    b.unmap_mem_region(&region);
    drop(b);
    let st = control(&mut ctl, &json!({"cmd": "stats"}));
    drop(ctl);
    result?;
    let st = st?;
    sc.backend_writes = st["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| q["writes"].as_u64().unwrap_or(0))
        .sum();
    backend
        .terminate(Duration::from_secs(10))
        .ctx(|| "stop the backend".into())?;
    let (busy1, ours1) = procstat::host_busy_and_ours().ctx(|| "CPU time".into())?;
    sc.wall_s = t0.elapsed().as_secs_f64();
    sc.noise_cores = (((busy1 - busy0) - (ours1 - ours0)) / sc.wall_s).max(0.0);
    if sc.completed != sc.submitted || sc.backend_writes != sc.submitted {
        return Err(ToolError::Check(format!(
            "{name}: submitted {}, completed {}, backend wrote {}",
            sc.submitted, sc.completed, sc.backend_writes
        )));
    }
    Ok(sc)
}

fn run(args: &Args) -> Result<()> {
    let bin = match &args.backend {
        Some(p) => p.clone(),
        None => backend_bin().ctx(|| "find the backend".into())?,
    };
    let kind = BackendKind::VhostUserBlk(bin.clone());
    let dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| setup::work_root().join("drain-bench"));
    std::fs::create_dir_all(&dir).ctx(|| format!("mkdir {}", dir.display()))?;
    let mut out = Vec::new();
    for name in args.scenarios.split(',') {
        let sc = scenario(args, &kind, &dir, name)?;
        eprintln!(
            "drain-bench: {name}: {} cycles counted, {} left out (timer first), backend p50 {} p99 {} µs, client p50 {} p99 {} µs, noise {:.2}",
            sc.backend_us.len(),
            sc.timer_first,
            percentile(&sc.backend_us, 0.5),
            percentile(&sc.backend_us, 0.99),
            percentile(&sc.client_us, 0.5),
            percentile(&sc.client_us, 0.99),
            sc.noise_cores
        );
        out.push(sc);
    }
    println!(
        "| scenario | cycles (left out) | pending per unplug | backend `latency_us` p50 / p99 / max | client-observed p50 / p99 / max µs | p99 ≤ 2 ms | completions submitted = completed = backend writes | noise cores |"
    );
    println!("|---|--:|--:|--:|--:|---|---|--:|");
    for sc in &out {
        let b99 = percentile(&sc.backend_us, 0.99);
        let c99 = percentile(&sc.client_us, 0.99);
        println!(
            "| {}{} | {} ({}) | {} on queue(s) {:?} | {} / **{}** / {} | {} / **{}** / {} | {} | {} = {} = {} | {:.2} |",
            sc.name,
            sc.queue_map
                .as_deref()
                .map(|m| format!(" (`--queue-map {m}`)"))
                .unwrap_or_default(),
            sc.backend_us.len(),
            sc.timer_first,
            args.pending as usize * sc.loaded_queues.len(),
            sc.loaded_queues,
            percentile(&sc.backend_us, 0.5),
            b99,
            sc.backend_us.iter().max().copied().unwrap_or(0),
            percentile(&sc.client_us, 0.5),
            c99,
            sc.client_us.iter().max().copied().unwrap_or(0),
            if b99.max(c99) <= 2000 { "met" } else { "**missed**" },
            sc.submitted,
            sc.completed,
            sc.backend_writes,
            sc.noise_cores
        );
    }
    std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&json!({
            "backend": bin.display().to_string(),
            "args": format!("{args:?}"),
            "scenarios": out,
        }))
        .unwrap_or_default(),
    )
    .ctx(|| format!("write {}", args.json.display()))?;
    Ok(())
}

fn main() -> ExitCode {
    tool_error::exit_code("drain-bench", run(&Args::parse()))
}
