//! Live migration between two QEMU processes on this machine, each attached to its own backend
//! process on one image: what the `migration` test and the `migrate-bench` tool share.
//!
//! The guest runs the agent's `migrate` workload (page-cache and O_DIRECT reads of a region of
//! known content, tagged writes) until the host sets its stop block; [`PingPong::run`] boots it
//! on backend A, migrates it A → B → A … over unix sockets with the load running, stops it and
//! collects the agent's verdict from the consoles of every QEMU it ran on.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_agent::protocol::{MIGRATE_STEP, MIGRATE_STOP, READY_PREFIX, RESULT_PREFIX};

use crate::agent::{pattern, AgentPlan, AgentRun};
use crate::backend::{Backend, BackendConfig, BackendKind};
use crate::error::{Error, Result};
use crate::qemu::{Migration, Qemu, VhostUserDisk, VmConfig};
use crate::Harness;

const MIB: u64 = 1 << 20;
/// The region the guest reads, filled with [`READ_SEED`]'s pattern.
pub const READ_MIB: u64 = 8;
/// The seed of the read region's pattern.
pub const READ_SEED: u64 = 31;
/// Where the host sets the stop block.
pub const STOP_MIB: u64 = 128;
/// How long one migration may take under TCG.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Size of the shared image.
pub const IMAGE_BYTES: u64 = 256 << 20;

/// The agent plan of the migration scenarios.
pub fn plan() -> AgentPlan {
    AgentPlan::new(&["migrate"])
        .param("migrate.read_mib", READ_MIB)
        .param("migrate.read_seed", READ_SEED)
        .param("migrate.stop_offset_mib", STOP_MIB)
}

/// Creates the image in the harness's directory, fills the read region with its pattern and
/// leaves the stop block clear.
pub fn prepare_image(h: &Harness) -> Result<PathBuf> {
    let image = h.image("disk.img", IMAGE_BYTES)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .map_err(|e| Error::io(format!("open {}", image.display()), e))?;
    let mut buf = vec![0u8; MIB as usize];
    for mib in 0..READ_MIB {
        pattern::fill(READ_SEED, mib * MIB, &mut buf);
        f.write_all_at(&buf, mib * MIB)
            .map_err(|e| Error::io("write the read region", e))?;
    }
    f.sync_all().map_err(|e| Error::io("fsync the image", e))?;
    Ok(image)
}

/// The stop block that tells the guest to stop its load and check everything.
pub fn stop_block() -> Vec<u8> {
    let mut block = vec![0u8; 4096];
    block[..MIGRATE_STOP.len()].copy_from_slice(MIGRATE_STOP);
    block
}

/// The stop block that moves the guest's sentinel check to `step`.
pub fn step_block(step: u64) -> Vec<u8> {
    let mut block = vec![0u8; 4096];
    block[..MIGRATE_STEP.len()].copy_from_slice(MIGRATE_STEP);
    block[MIGRATE_STEP.len()..MIGRATE_STEP.len() + 8].copy_from_slice(&step.to_le_bytes());
    block
}

/// Writes `block` (one of [`stop_block`], [`step_block`]) over the stop block of `image`.
pub fn write_control(image: &Path, block: &[u8]) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| Error::io(format!("open {}", image.display()), e))?;
    f.write_all_at(block, STOP_MIB * MIB)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write the stop block", e))
}

/// Waits for the agent on `q` to say `AGENT-READY` as `step` (`migrate/read/1`, ...); when it
/// does not, the error carries the agent's result lines (a failed check).
fn wait_step(q: &Qemu, step: &str) -> Result<()> {
    q.wait_ready(step).map_err(|e| {
        Error::Agent(format!(
            "the guest never said {step} ({e}): {}",
            agent_results(q)
        ))
    })
}

/// The agent's result lines on `q`'s console so far, joined: what a failed check reported.
fn agent_results(q: &Qemu) -> String {
    let results: Vec<String> = q
        .console()
        .lines()
        .into_iter()
        .filter(|l| l.contains(RESULT_PREFIX))
        .collect();
    results.join("; ")
}

/// Waits until the migration under way on `q` has finished its first pass over RAM (its second
/// dirty-bitmap sync: every page has been sent once), then holds it open: a switchover
/// threshold of 1 byte (1000 B/s for 1 ms) lets QEMU complete only after a sync that finds no
/// page dirty (0 would not do: QEMU then completes without a last sync), and a bandwidth of one
/// page or two per 100 ms window spaces the syncs out so that the running guest always dirties
/// some page between two of them. Syncs come back to back only while what QEMU finds dirty
/// fits in one window's budget; so the last [`SLOW_TAIL`] of the first pass already goes at
/// [`SLOW_TAIL`] per second, where the pages the guest dirtied during that pass take several
/// windows after the sync that ends it: time for the bandwidth to go down to the hold's.
fn hold_after_first_pass(q: &mut Qemu) -> Result<()> {
    q.set_migration_parameters(serde_json::json!({
        "max-bandwidth": 1024 * MIB,
        "downtime-limit": 1,
        "avail-switchover-bandwidth": 1000,
    }))?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let mut slowed = false;
    loop {
        let v = q.qmp()?.execute("query-migrate", None)?;
        let status = v["status"].as_str().unwrap_or("");
        let syncs = v["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        let remaining = v["ram"]["remaining"].as_u64().unwrap_or(u64::MAX);
        match status {
            "active" if syncs >= 2 => break,
            "active" if syncs == 1 && remaining <= SLOW_TAIL && !slowed => {
                q.set_migration_parameters(serde_json::json!({ "max-bandwidth": SLOW_TAIL }))?;
                slowed = true;
            }
            "completed" | "failed" | "cancelled" => {
                return Err(Error::Qmp(format!(
                    "the migration ended ({status}) while it was to be held open: {v}"
                )))
            }
            _ if Instant::now() > deadline => {
                return Err(Error::Qmp(format!(
                    "the migration's first pass did not end within {MIGRATION_TIMEOUT:?}: {v}"
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    q.set_migration_parameters(serde_json::json!({ "max-bandwidth": 64 << 10 }))
}

/// The end of the first pass that goes slowly (bytes left), and its bandwidth (bytes/s).
const SLOW_TAIL: u64 = 8 * MIB;

/// Waits for the agent on `q` to say `AGENT-READY` as `step` while `q`'s migration is held
/// open; fails when the migration ends first (the hold did not hold) or the guest stops (the
/// error then carries the agent's result lines).
fn wait_step_held(q: &mut Qemu, step: &str) -> Result<()> {
    let tag = format!("\"workload\":\"{step}\"");
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let lines = q.console().lines();
        if lines
            .iter()
            .any(|l| l.contains(READY_PREFIX) && l.contains(&tag))
        {
            return Ok(());
        }
        let results: Vec<&String> = lines.iter().filter(|l| l.contains(RESULT_PREFIX)).collect();
        if !results.is_empty() {
            return Err(Error::Agent(format!(
                "the guest stopped before saying {step}: {results:?}"
            )));
        }
        let m = q.query_migration()?;
        if m.status != "active" {
            return Err(Error::Qmp(format!(
                "the migration ended ({}) before the guest said {step}: it was not held open",
                m.status
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Agent(format!(
                "the guest did not say {step} within {MIGRATION_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The backends' extra arguments of the migration tests: `--test-unlogged-reads` (the data of
/// reads left out of the dirty log) when `VMM_TESTS_MIGRATION_UNLOGGED=1`, to show that the
/// tests fail without the log.
pub fn test_args_from_env() -> Vec<String> {
    if std::env::var("VMM_TESTS_MIGRATION_UNLOGGED").is_ok_and(|v| v == "1") {
        vec!["--test-unlogged-reads".into()]
    } else {
        Vec::new()
    }
}

/// One backend process named `name` (its own socket, control socket and log) of `kind` on
/// `image`, with `--cache` `cache` (qemu-storage-daemon: `cache.direct=on` for `none`) and
/// `extra_args` (ours only).
pub fn start_backend(
    h: &Harness,
    kind: &BackendKind,
    image: &Path,
    name: &str,
    cache: Option<&str>,
    extra_args: &[String],
) -> Result<Backend> {
    let mut cfg: BackendConfig = h.backend_config(image);
    cfg.cache = cache.map(str::to_string);
    cfg.socket = h.path(&format!("{name}.sock"));
    cfg.control = Some(h.path(&format!("{name}.control.sock")));
    cfg.log = h.path(&format!("{name}.log"));
    cfg.extra_args = extra_args.to_vec();
    // Two qemu-storage-daemons on one image: the active side alone writes, but QEMU's image
    // locking would refuse the second one.
    cfg.qsd_locking_off = true;
    Backend::start(kind, &cfg)
}

/// The guest's configuration on `backend`: booting, or (`incoming`) waiting for a migration.
pub fn vm_config(
    plan: &AgentPlan,
    backend: &Backend,
    memory_mib: u64,
    incoming: Option<String>,
) -> VmConfig {
    let mut cfg = VmConfig::new(2, plan.clone()).disk(VhostUserDisk::new(backend.socket(), 1));
    cfg.memory_mib = memory_mib;
    cfg.incoming = incoming;
    cfg
}

/// Starts the QEMU that waits for the guest on `backend` and waits until it listens on its
/// migration socket; returns it and the URI to migrate to.
pub fn start_target(
    h: &mut Harness,
    plan: &AgentPlan,
    backend: &Backend,
    memory_mib: u64,
    name: &str,
) -> Result<(Qemu, String)> {
    let socket = h.path(&format!("{name}.mig"));
    let uri = format!("unix:{}", socket.display());
    let mut q = h.start_vm(&vm_config(plan, backend, memory_mib, Some(uri.clone())))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if !q.running()? || Instant::now() > deadline {
            return Err(Error::Qmp(format!(
                "the destination QEMU never listened on {}",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((q, uri))
}

/// Keeps the guest's I/O going on `q` for `d`, checking the VM still runs. A guest that powered
/// off early has a failed check to report: its agent's result line says which.
pub fn run_for(q: &mut Qemu, d: Duration) -> Result<()> {
    std::thread::sleep(d);
    if !q.running()? {
        return Err(Error::Agent(format!(
            "the guest stopped early: {}",
            agent_results(q)
        )));
    }
    match q.status()?.as_str() {
        "running" => Ok(()),
        other => Err(Error::Qmp(format!("the guest is {other}, not running"))),
    }
}

/// A migration of one hop, as reported.
#[derive(Debug, Clone)]
pub struct Hop {
    /// "A -> B", ...
    pub name: String,
    /// What the source's `query-migrate` said at the end.
    pub migration: Migration,
}

/// The ping-pong scenario: a guest booted on backend `a`, migrated `hops` times between `a`
/// and `b` with its load running, `settle` of load between hops.
pub struct PingPong<'a> {
    /// The two backends.
    pub backends: [&'a Backend; 2],
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Migrations to do.
    pub hops: usize,
    /// Load time on each host before the next hop and before stopping.
    pub settle: Duration,
    /// How long the guest may take to finish once stopped (`None`: the harness's default).
    pub finish_timeout: Option<Duration>,
    /// Whether each hop runs the guest's sentinel check: the migration is held open after its
    /// first pass (a switchover threshold of 1 byte, so it cannot converge) while the guest reads into
    /// buffers that pass sent poisoned, then let finish; after the hop the guest checks them.
    /// Without the backend's dirty log that check fails on every hop. Off for timing.
    pub sentinel: bool,
}

/// What a [`PingPong`] run gave.
pub struct PingPongRun {
    /// Every hop, in order.
    pub hops: Vec<Hop>,
    /// The agent's verdict once stopped after the last hop, or why there is none.
    pub verdict: Result<AgentRun>,
}

/// The guest's checks after `hops` hops of a [`PingPong`]: every workload ok, the `migrate`
/// workload's page-cache passes, O_DIRECT rounds and verified blocks all non-zero, and its
/// sentinel checked on every hop. Returns the `migrate` workload's result for further checks.
pub fn expect_guest_checks(run: &AgentRun, hops: usize) -> Result<serde_json::Value> {
    run.expect_all_ok()?;
    let data = run.ok("migrate")?.clone();
    println!("guest checks after {hops} hops: {data}");
    for key in ["page_cache_passes", "direct_rounds", "blocks_verified"] {
        if data[key].as_u64().unwrap_or(0) == 0 {
            return Err(Error::Agent(format!("migrate: no {key}: {data}")));
        }
    }
    let checked = data["sentinel_hops"].as_u64().unwrap_or(0);
    if checked != hops as u64 {
        return Err(Error::Agent(format!(
            "migrate: the sentinel checked {checked} hops of {hops}: {data}"
        )));
    }
    Ok(data)
}

impl PingPong<'_> {
    /// Runs the scenario on `image`; `before_hops` runs on the first QEMU once the load runs
    /// (the test's cancelled migration). A failure up to the last hop is an error; after it,
    /// the verdict carries it.
    pub fn run(
        &self,
        h: &mut Harness,
        image: &Path,
        before_hops: impl FnOnce(&mut Harness, &mut Qemu) -> Result<()>,
    ) -> Result<PingPongRun> {
        self.run_with_control(h, |block| write_control(image, block), before_hops)
    }

    /// As [`PingPong::run`], on an image that is not a file on this host (an RBD image):
    /// `control` writes a block over the stop block, as [`write_control`] does for a file.
    pub fn run_with_control(
        &self,
        h: &mut Harness,
        mut control: impl FnMut(&[u8]) -> Result<()>,
        before_hops: impl FnOnce(&mut Harness, &mut Qemu) -> Result<()>,
    ) -> Result<PingPongRun> {
        let plan = plan();
        let mut current = h.start_vm(&vm_config(&plan, self.backends[0], self.memory_mib, None))?;
        current.wait_hello()?;
        current.wait_ready("migrate")?;
        run_for(&mut current, self.settle)?;
        before_hops(h, &mut current)?;
        let mut earlier = Vec::new();
        let mut hops = Vec::new();
        for hop in 0..self.hops {
            let (from, to) = (hop % 2, (hop + 1) % 2);
            let name = format!("{} -> {}", ["A", "B"][from], ["A", "B"][to]);
            let (mut target, uri) = start_target(
                h,
                &plan,
                self.backends[to],
                self.memory_mib,
                &format!("hop{}", hop + 1),
            )?;
            let n = hop as u64 + 1;
            let migration = if self.sentinel {
                current.start_migration(&uri)?;
                hold_after_first_pass(&mut current)?;
                control(&step_block(2 * n - 1))?;
                wait_step_held(&mut current, &format!("migrate/read/{n}"))?;
                current.set_migration_parameters(serde_json::json!({
                    "max-bandwidth": 1024 * MIB,
                    "downtime-limit": 300,
                    "avail-switchover-bandwidth": 0,
                }))?;
                let m = current.wait_migration(MIGRATION_TIMEOUT)?;
                if m.status != "completed" {
                    return Err(Error::Qmp(format!(
                        "migration {name} {}: {}",
                        m.status,
                        m.error.as_deref().unwrap_or("no error given")
                    )));
                }
                m
            } else {
                current.set_migration_parameters(serde_json::json!({
                    "max-bandwidth": 1024 * MIB,
                    "downtime-limit": 300,
                    "avail-switchover-bandwidth": 0,
                }))?;
                current.migrate(&uri, MIGRATION_TIMEOUT)?
            };
            println!(
                "migration {name}: {} in {} ms, downtime {} ms, {:.1} MiB of RAM sent",
                migration.status,
                migration.total.as_millis(),
                migration.downtime.map_or(-1, |d| d.as_millis() as i64),
                migration.ram_bytes as f64 / MIB as f64
            );
            hops.push(Hop { name, migration });
            current.quit()?;
            std::mem::swap(&mut current, &mut target);
            earlier.push(target);
            if self.sentinel {
                control(&step_block(2 * n))?;
                wait_step(&current, &format!("migrate/armed/{}", n + 1))?;
            }
            if hop + 1 < self.hops {
                run_for(&mut current, self.settle)?;
            }
        }
        let verdict = run_for(&mut current, self.settle)
            .and_then(|()| control(&stop_block()))
            .and_then(|()| {
                let earlier: Vec<&Qemu> = earlier.iter().collect();
                current.wait_done_migrated(&earlier, self.finish_timeout)
            });
        Ok(PingPongRun { hops, verdict })
    }
}
