//! The QEMU launcher and the accelerator probe.
//!
//! A guest gets `-machine q35`, guest RAM from a shared memfd (vhost-user
//! needs to map it: without `share=on` QEMU reports "vhost start failed"
//! and the guest hangs), one `vhost-user-blk-pci` per disk, a QMP socket,
//! and its serial console on QEMU's stdout, captured by [`Console`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use guest_agent::protocol::{self, Hello};

use crate::agent::{AgentPlan, AgentRun};
use crate::console::Console;
use crate::error::{Context, Error, Result};
use crate::process::ChildGuard;
use crate::qmp::Qmp;
use crate::setup::{self, GuestAssets};

/// The accelerator a guest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`, `-cpu host`.
    Kvm,
    /// QEMU's emulator, `-cpu max`.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The default `-cpu` model (`$VMM_TESTS_CPU` overrides it).
    pub fn cpu(self) -> String {
        if let Ok(c) = std::env::var("VMM_TESTS_CPU") {
            return c;
        }
        match self {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        }
    }
}

/// The QEMU binary: `$QEMU_BIN`, else `qemu-system-x86_64`.
pub fn qemu_bin() -> PathBuf {
    std::env::var_os("QEMU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// A vhost-user-blk disk as the VMM sees it.
#[derive(Debug, Clone)]
pub struct VhostUserDisk {
    /// The backend's socket.
    pub socket: PathBuf,
    /// Number of queues the VMM asks for.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: Option<u16>,
    /// Reconnect to the socket this many ms after losing the backend (`reconnect-ms`), so that
    /// the guest survives a backend restart.
    pub reconnect_ms: Option<u32>,
}

impl VhostUserDisk {
    /// A disk on `socket` with `num_queues` queues.
    pub fn new(socket: &Path, num_queues: u16) -> Self {
        VhostUserDisk {
            socket: socket.to_path_buf(),
            num_queues,
            queue_size: None,
            reconnect_ms: None,
        }
    }

    /// The same disk, reconnecting `ms` after losing its backend.
    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// vCPUs at boot.
    pub cpus: u32,
    /// Maximum vCPUs (for hotplug); at least `cpus`.
    pub max_cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The disks.
    pub disks: Vec<VhostUserDisk>,
    /// What the guest agent runs.
    pub plan: AgentPlan,
    /// More kernel command line words.
    pub cmdline_extra: String,
    /// How long the guest may take to start its agent.
    pub boot_timeout: Duration,
    /// How long the workloads may take, after the agent started.
    pub run_timeout: Duration,
    /// Force an accelerator instead of [`accel`]'s choice.
    pub accel: Option<Accel>,
    /// More QMP sockets, for other clients than the harness (QMP serves one client a socket):
    /// the backend's `--qmp`, for one.
    pub extra_qmp: Vec<PathBuf>,
    /// Wait for an incoming live migration on this URI (`-incoming`, e.g. `unix:PATH`) instead
    /// of booting: the guest arrives from another QEMU.
    pub incoming: Option<String>,
}

impl VmConfig {
    /// A guest with `cpus` vCPUs and 512 MiB running `plan`, no disks yet.
    pub fn new(cpus: u32, plan: AgentPlan) -> Self {
        VmConfig {
            cpus,
            max_cpus: cpus,
            memory_mib: 512,
            disks: Vec::new(),
            plan,
            cmdline_extra: String::new(),
            boot_timeout: env_secs("VMM_TESTS_BOOT_TIMEOUT", 120),
            run_timeout: env_secs("VMM_TESTS_RUN_TIMEOUT", 600),
            accel: None,
            extra_qmp: Vec::new(),
            incoming: None,
        }
    }

    /// Adds a disk.
    pub fn disk(mut self, disk: VhostUserDisk) -> Self {
        self.disks.push(disk);
        self
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut s = String::from("console=ttyS0 panic=-1 quiet");
        s.push(' ');
        s.push_str(&self.plan.cmdline());
        if !self.cmdline_extra.is_empty() {
            s.push(' ');
            s.push_str(&self.cmdline_extra);
        }
        s
    }
}

/// A duration in seconds from the environment, with a default.
pub fn env_secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// A running QEMU, killed when dropped.
pub struct Qemu {
    child: ChildGuard,
    console: Console,
    qmp_path: PathBuf,
    qmp: Option<Qmp>,
    accel: Accel,
    cfg: VmConfig,
    started: Instant,
}

/// The QEMU command line for `cfg`.
pub fn command(cfg: &VmConfig, assets: &GuestAssets, accel: Accel, qmp: &Path) -> Command {
    let mut c = Command::new(qemu_bin());
    let mem = cfg.memory_mib;
    c.args([
        "-machine",
        "q35",
        "-accel",
        accel.name(),
        "-cpu",
        &accel.cpu(),
    ])
    .args([
        "-smp",
        &format!("{},maxcpus={}", cfg.cpus, cfg.max_cpus.max(cfg.cpus)),
    ])
    .args(["-m", &format!("{mem}M")])
    .args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
    ])
    .args(["-numa", "node,memdev=mem"])
    .arg("-kernel")
    .arg(&assets.kernel)
    .arg("-initrd")
    .arg(&assets.initramfs)
    .args(["-append", &cfg.cmdline()])
    .args(["-nographic", "-no-reboot", "-net", "none"])
    .args([
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    for path in &cfg.extra_qmp {
        c.args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", path.display()),
        ]);
    }
    if let Some(uri) = &cfg.incoming {
        c.args(["-incoming", uri]);
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        c.args([
            "-chardev",
            &format!(
                "socket,id=vub{i},path={}{}",
                d.socket.display(),
                d.reconnect_ms
                    .map(|ms| format!(",reconnect-ms={ms}"))
                    .unwrap_or_default()
            ),
        ]);
        let mut dev = format!(
            "vhost-user-blk-pci,id=blk{i},chardev=vub{i},num-queues={}",
            d.num_queues
        );
        if let Some(q) = d.queue_size {
            dev.push_str(&format!(",queue-size={q}"));
        }
        c.args(["-device", &dev]);
    }
    c
}

impl Qemu {
    /// Starts QEMU in `dir` (console log `dir/<name>.console.log`, QMP
    /// socket `dir/<name>.qmp`) with the accelerator from [`accel`].
    pub fn start(cfg: &VmConfig, assets: &GuestAssets, dir: &Path, name: &str) -> Result<Self> {
        let accel = match cfg.accel {
            Some(a) => a,
            None => accel(assets)?,
        };
        Self::start_with(cfg, assets, dir, name, accel)
    }

    fn start_with(
        cfg: &VmConfig,
        assets: &GuestAssets,
        dir: &Path,
        name: &str,
        accel: Accel,
    ) -> Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut console = Console::new(&dir.join(format!("{name}.console.log")))?;
        let mut cmd = command(cfg, assets, accel, &qmp_path);
        console.note(&format!("accel {}: {cmd:?}", accel.name()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn("qemu", &mut cmd)?;
        if let Some(c) = child.child_mut() {
            if let Some(out) = c.stdout.take() {
                console.attach(out, "");
            }
            if let Some(err) = c.stderr.take() {
                console.attach(err, "qemu: ");
            }
        }
        Ok(Qemu {
            child,
            console,
            qmp_path,
            qmp: None,
            accel,
            cfg: cfg.clone(),
            started: Instant::now(),
        })
    }

    /// QEMU's process id (for its CPU time in `/proc/PID/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The console capture.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The QMP connection (connected on first use).
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.qmp_path, Duration::from_secs(10))?);
        }
        self.qmp
            .as_mut()
            .ok_or_else(|| Error::Qmp("not connected".into()))
    }

    /// Prints the last `n` console lines to stderr (for failures).
    pub fn dump_tail(&self, n: usize) {
        let lines = self.console.lines();
        eprintln!(
            "--- last {} console lines of {} ---",
            n.min(lines.len()),
            self.console.path().display()
        );
        for l in &lines[lines.len().saturating_sub(n)..] {
            eprintln!("{l}");
        }
        eprintln!("---");
    }

    fn fail<T>(&self, e: Error) -> Result<T> {
        self.dump_tail(40);
        Err(e)
    }

    /// Waits for the agent's start line. A guest that does not get there
    /// is an error ([`Error::NoGuest`]): VM tests fail, they never skip.
    pub fn wait_hello(&self) -> Result<Hello> {
        match self
            .console
            .wait_for(0, self.cfg.boot_timeout, "the guest agent to start", |l| {
                l.contains(protocol::HELLO_PREFIX)
            }) {
            Ok((_, line)) => protocol::parse_line(protocol::HELLO_PREFIX, &line)
                .ok_or_else(|| Error::Agent(format!("bad hello line: {line}"))),
            Err(e) => self.fail(Error::NoGuest(format!(
                "{} guest: {e} (after {:.1}s)",
                self.accel.name(),
                self.started.elapsed().as_secs_f64()
            ))),
        }
    }

    /// Waits for an `AGENT-READY` line from `workload`.
    pub fn wait_ready(&self, workload: &str) -> Result<()> {
        let tag = format!("\"workload\":\"{workload}\"");
        match self.console.wait_for(
            0,
            self.cfg.boot_timeout + self.cfg.run_timeout,
            "AGENT-READY",
            |l| l.contains(protocol::READY_PREFIX) && l.contains(&tag),
        ) {
            Ok(_) => Ok(()),
            Err(e) => self.fail(e),
        }
    }

    /// Waits for the agent to finish and QEMU to exit (the agent powers the
    /// guest off); returns and prints the agent's results.
    pub fn wait_done(&mut self) -> Result<AgentRun> {
        let hello = self.wait_hello()?;
        println!(
            "guest booted: kernel {} ({} vCPUs, {}) in {:.1}s",
            hello.kernel,
            hello.cpus,
            self.accel.name(),
            self.started.elapsed().as_secs_f64()
        );
        if let Err(e) =
            self.console
                .wait_for(0, self.cfg.run_timeout, "the guest agent to finish", |l| {
                    l.contains(protocol::DONE_PREFIX)
                })
        {
            let partial = AgentRun::from_lines(&self.console.lines());
            if let Ok(r) = partial {
                r.print();
            }
            return self.fail(e);
        }
        if self.child.wait_timeout(Duration::from_secs(30))?.is_none() {
            self.console.note("guest did not power off; killing QEMU");
            let _ = self.child.kill();
        }
        self.console.wait_closed(Duration::from_secs(5));
        let run = AgentRun::from_lines(&self.console.lines())?;
        run.print();
        println!(
            "VM finished in {:.1}s (console log {})",
            self.started.elapsed().as_secs_f64(),
            self.console.path().display()
        );
        Ok(run)
    }

    /// Kills QEMU.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().map(|_| ())
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }
}

/// A live migration as the source's `query-migrate` reported it at its end.
#[derive(Debug, Clone)]
pub struct Migration {
    /// `status`: `completed`, `failed` or `cancelled`.
    pub status: String,
    /// `total-time`: from `migrate` to the end.
    pub total: Duration,
    /// `downtime`: how long the guest was stopped (completed migrations only).
    pub downtime: Option<Duration>,
    /// `ram.transferred` in bytes.
    pub ram_bytes: u64,
    /// `error-desc`, when it failed.
    pub error: Option<String>,
}

impl Migration {
    fn from_query(v: &serde_json::Value) -> Self {
        let ms = |k: &str| v[k].as_u64().map(Duration::from_millis);
        Migration {
            status: v["status"].as_str().unwrap_or("").to_string(),
            total: ms("total-time").unwrap_or_default(),
            downtime: ms("downtime"),
            ram_bytes: v["ram"]["transferred"].as_u64().unwrap_or(0),
            error: v["error-desc"].as_str().map(str::to_string),
        }
    }
}

impl Qemu {
    /// Starts a live migration to `uri` (QMP `migrate`) and returns at once.
    pub fn start_migration(&mut self, uri: &str) -> Result<()> {
        self.console.note(&format!("migrating to {uri}"));
        self.qmp()?
            .execute("migrate", Some(serde_json::json!({ "uri": uri })))?;
        Ok(())
    }

    /// The migration state (`query-migrate`).
    pub fn query_migration(&mut self) -> Result<Migration> {
        let v = self.qmp()?.execute("query-migrate", None)?;
        Ok(Migration::from_query(&v))
    }

    /// Waits up to `timeout` for the migration to end (completed, failed or cancelled) and
    /// returns how it ended.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Migration> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.query_migration()?;
            if matches!(m.status.as_str(), "completed" | "failed" | "cancelled") {
                self.console.note(&format!("migration {m:?}"));
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("the migration to end (status {})", m.status),
                    timeout,
                    log: None,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Migrates to `uri` and waits up to `timeout` for it to complete; a migration that fails
    /// or is cancelled is an error.
    pub fn migrate(&mut self, uri: &str, timeout: Duration) -> Result<Migration> {
        self.start_migration(uri)?;
        let m = self.wait_migration(timeout)?;
        if m.status != "completed" {
            return Err(Error::Qmp(format!(
                "migration to {uri} {}: {}",
                m.status,
                m.error.as_deref().unwrap_or("no error given")
            )));
        }
        Ok(m)
    }

    /// Sets migration parameters (`migrate-set-parameters`), e.g. `max-bandwidth`.
    pub fn set_migration_parameters(&mut self, params: serde_json::Value) -> Result<()> {
        self.qmp()?
            .execute("migrate-set-parameters", Some(params))?;
        Ok(())
    }

    /// Cancels the migration under way (`migrate_cancel`) and waits for `cancelled`.
    pub fn cancel_migration(&mut self, timeout: Duration) -> Result<Migration> {
        self.qmp()?.execute("migrate_cancel", None)?;
        let m = self.wait_migration(timeout)?;
        if m.status != "cancelled" {
            return Err(Error::Qmp(format!(
                "migrate_cancel: the migration ended {}",
                m.status
            )));
        }
        Ok(m)
    }

    /// Whether the guest runs (`query-status`).
    pub fn status(&mut self) -> Result<String> {
        let v = self.qmp()?.execute("query-status", None)?;
        Ok(v["status"].as_str().unwrap_or("").to_string())
    }

    /// Ends QEMU with QMP `quit` (a source after its guest migrated away), killing it if it
    /// has not exited within 10 s.
    pub fn quit(&mut self) -> Result<()> {
        let _ = self.qmp()?.execute("quit", None);
        if self.child.wait_timeout(Duration::from_secs(10))?.is_none() {
            self.child.kill()?;
        }
        Ok(())
    }

    /// For the QEMU a guest last migrated to: waits for the agent to finish and QEMU to exit,
    /// and returns the agent's results from the consoles of every QEMU the guest ran on,
    /// `earlier` (in order) then this one. It waits `timeout`, or the configuration's
    /// `run_timeout`.
    pub fn wait_done_migrated(
        &mut self,
        earlier: &[&Qemu],
        timeout: Option<Duration>,
    ) -> Result<AgentRun> {
        let timeout = timeout.unwrap_or(self.cfg.run_timeout);
        if let Err(e) = self
            .console
            .wait_for(0, timeout, "the guest agent to finish", |l| {
                l.contains(protocol::DONE_PREFIX)
            })
        {
            for q in earlier {
                q.dump_tail(20);
            }
            return self.fail(e);
        }
        if self.child.wait_timeout(Duration::from_secs(30))?.is_none() {
            self.console.note("guest did not power off; killing QEMU");
            let _ = self.child.kill();
        }
        self.console.wait_closed(Duration::from_secs(5));
        let mut lines: Vec<String> = earlier.iter().flat_map(|q| q.console.lines()).collect();
        lines.extend(self.console.lines());
        let run = AgentRun::from_lines(&lines)?;
        run.print();
        Ok(run)
    }
}

/// A vCPU as QMP's `query-cpus-fast` describes it.
#[derive(Debug, Clone)]
pub struct Vcpu {
    /// The vCPU index (`cpu-index`), as the guest numbers its CPUs.
    pub index: u64,
    /// Its QOM path, which `device_del` takes as an id.
    pub qom_path: String,
    /// The host thread running it.
    pub thread_id: u64,
    /// Its topology properties (`socket-id`, `core-id`, `thread-id`, ...),
    /// which `device_add` needs to plug it back.
    pub props: serde_json::Map<String, serde_json::Value>,
}

/// What QEMU reported while a vCPU was unplugged.
#[derive(Debug, Clone)]
pub struct Unplug {
    /// From `device_del` to the eject request (`ACPI_DEVICE_OST` with
    /// status 132 for the CPU's slot), as the harness saw the events.
    pub eject_request: Option<Duration>,
    /// From `device_del` to `DEVICE_DELETED`.
    pub deleted: Duration,
    /// From the eject request to `DEVICE_DELETED`, by QMP's own event
    /// timestamps: how long the guest took to take the CPU offline.
    pub offline_by_timestamps: Option<Duration>,
}

fn event_time(ev: &serde_json::Value) -> Option<Duration> {
    let t = &ev["timestamp"];
    Some(
        Duration::from_secs(t["seconds"].as_u64()?)
            + Duration::from_micros(t["microseconds"].as_u64()?),
    )
}

impl Qemu {
    /// The vCPUs, from `query-cpus-fast`.
    pub fn vcpus(&mut self) -> Result<Vec<Vcpu>> {
        let v = self.qmp()?.execute("query-cpus-fast", None)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .map(|c| Vcpu {
                index: c["cpu-index"].as_u64().unwrap_or(0),
                qom_path: c["qom-path"].as_str().unwrap_or("").to_string(),
                thread_id: c["thread-id"].as_u64().unwrap_or(0),
                props: c["props"].as_object().cloned().unwrap_or_default(),
            })
            .collect())
    }

    /// Unplugs vCPU `index` (`device_del` of its QOM path) and waits up to
    /// `timeout` for `DEVICE_DELETED`, which comes after the guest has
    /// taken the CPU offline. Returns the timing of the events.
    pub fn unplug_vcpu(&mut self, index: u64, timeout: Duration) -> Result<(Vcpu, Unplug)> {
        let cpu = self
            .vcpus()?
            .into_iter()
            .find(|c| c.index == index)
            .ok_or_else(|| Error::Qmp(format!("no vCPU {index}")))?;
        let qmp = self.qmp()?;
        qmp.events(Duration::ZERO)?;
        let start = Instant::now();
        qmp.execute(
            "device_del",
            Some(serde_json::json!({ "id": cpu.qom_path })),
        )?;
        let slot = index.to_string();
        let mut eject = None;
        let mut eject_ts = None;
        let deleted = loop {
            let left = timeout.saturating_sub(start.elapsed());
            let ev = qmp.wait_event(left, |e| {
                matches!(
                    e["event"].as_str(),
                    Some("ACPI_DEVICE_OST" | "DEVICE_DELETED")
                )
            })?;
            match ev["event"].as_str() {
                Some("ACPI_DEVICE_OST") => {
                    let info = &ev["data"]["info"];
                    if info["slot-type"] == "CPU"
                        && info["status"] == 132
                        && info["slot"] == slot.as_str()
                    {
                        eject.get_or_insert(start.elapsed());
                        eject_ts = event_time(&ev);
                    }
                }
                _ => {
                    let path = ev["data"]["path"].as_str().unwrap_or("");
                    if path.starts_with(&cpu.qom_path) {
                        break ev;
                    }
                }
            }
        };
        let unplug = Unplug {
            eject_request: eject,
            deleted: start.elapsed(),
            offline_by_timestamps: match (eject_ts, event_time(&deleted)) {
                (Some(a), Some(b)) => b.checked_sub(a),
                _ => None,
            },
        };
        Ok((cpu, unplug))
    }

    /// Plugs a vCPU back with the topology of `cpu` (`device_add` of the
    /// accelerator's CPU model, e.g. `max-x86_64-cpu` under TCG). The guest
    /// sees it offline: the agent's `wait_cpus` workload brings it online.
    pub fn plug_vcpu(&mut self, cpu: &Vcpu, id: &str) -> Result<()> {
        let model = self.accel.cpu();
        let model = model.split(',').next().unwrap_or("max").to_string();
        let mut args = serde_json::Map::new();
        args.insert("driver".into(), format!("{model}-x86_64-cpu").into());
        args.insert("id".into(), id.into());
        for (k, v) in &cpu.props {
            if k != "node-id" {
                args.insert(k.clone(), v.clone());
            }
        }
        self.qmp()?
            .execute("device_add", Some(serde_json::Value::Object(args)))?;
        Ok(())
    }
}

static ACCEL: OnceLock<Accel> = OnceLock::new();

/// The accelerator to use: `$VMM_TESTS_ACCEL` (`kvm` or `tcg`) if set;
/// otherwise KVM if a short probe boot gets the guest agent running
/// (cached per host boot under the cache directory), else TCG.
///
/// The probe exists because `/dev/kvm` can be present and still unable to
/// boot a stock kernel (a PVM module: `-cpu host` aborts on an MSR, or the
/// decompressor dies with "KVM internal error" and QEMU stays paused).
pub fn accel(assets: &GuestAssets) -> Result<Accel> {
    if let Some(a) = ACCEL.get() {
        return Ok(*a);
    }
    let a = match std::env::var("VMM_TESTS_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        Ok(other) if !other.is_empty() => {
            return Err(Error::NoGuest(format!(
                "VMM_TESTS_ACCEL={other}: use kvm or tcg"
            )))
        }
        _ => probe_cached(assets)?,
    };
    Ok(*ACCEL.get_or_init(|| a))
}

fn probe_cached(assets: &GuestAssets) -> Result<Accel> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("accel: /dev/kvm not usable, using TCG");
        return Ok(Accel::Tcg);
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let key = format!(
        "{} {} {}",
        boot_id.trim(),
        assets.kernel_release,
        qemu_bin().display()
    );
    let cache = setup::cache_dir().join("accel-probe");
    let _lock = setup::FileLock::acquire(&setup::cache_dir().join("accel-probe.lock"))?;
    if let Ok(s) = std::fs::read_to_string(&cache) {
        if let Some(v) = s.strip_prefix(&key).map(str::trim) {
            let a = if v == "kvm" { Accel::Kvm } else { Accel::Tcg };
            println!("accel: {} (probed earlier in this host boot)", a.name());
            return Ok(a);
        }
    }
    let a = probe_kvm(assets)?;
    std::fs::write(&cache, format!("{key} {}\n", a.name()))
        .ctx(|| format!("write {}", cache.display()))?;
    Ok(a)
}

/// Boots the guest once under KVM without disks and waits (at most 20 s)
/// for the agent's start line.
pub fn probe_kvm(assets: &GuestAssets) -> Result<Accel> {
    let dir = setup::work_root().join(format!("kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ctx(|| format!("mkdir {}", dir.display()))?;
    let mut cfg = VmConfig::new(1, AgentPlan::new::<&str>(&[]));
    cfg.memory_mib = 256;
    cfg.boot_timeout = Duration::from_secs(20);
    let start = Instant::now();
    let verdict = {
        let q = Qemu::start_with(&cfg, assets, &dir, "probe", Accel::Kvm)?;
        q.console
            .wait_for(0, cfg.boot_timeout, "the KVM probe", |l| {
                l.contains(protocol::HELLO_PREFIX)
                    || l.contains("KVM internal error")
                    || l.contains("qemu: ") && (l.contains("error") || l.contains("failed"))
            })
    };
    let a = match verdict {
        Ok((_, l)) if l.contains(protocol::HELLO_PREFIX) => Accel::Kvm,
        Ok((_, l)) => {
            println!("accel: KVM probe failed ({l}), using TCG");
            Accel::Tcg
        }
        Err(e) => {
            println!("accel: KVM probe failed ({e}), using TCG");
            Accel::Tcg
        }
    };
    println!("accel: probe took {:.1}s", start.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(a)
}
