//! The cloud-hypervisor launcher, used when `$CLOUD_HYPERVISOR_BIN` names
//! a binary.
//!
//! cloud-hypervisor has no emulator: it needs a `/dev/kvm` that boots
//! guests. The machines this project's CI runs on have a PVM `/dev/kvm`
//! that cannot boot a stock Debian kernel, so these tests skip there, with
//! a message saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_agent::protocol;

use crate::agent::AgentRun;
use crate::console::Console;
use crate::error::{Error, Result};
use crate::process::ChildGuard;
use crate::qemu::VmConfig;
use crate::setup::GuestAssets;

/// The cloud-hypervisor binary from `$CLOUD_HYPERVISOR_BIN`, if set.
pub fn ch_bin() -> Option<PathBuf> {
    std::env::var_os("CLOUD_HYPERVISOR_BIN").map(PathBuf::from)
}

/// Why cloud-hypervisor tests are skipped when no binary is given.
pub const SKIP_REASON: &str = "cloud-hypervisor: skipped, CLOUD_HYPERVISOR_BIN is not set \
(cloud-hypervisor needs a /dev/kvm that boots guests; this machine's PVM /dev/kvm does not, \
see docs/testing.md)";

/// A running cloud-hypervisor, killed when dropped.
pub struct CloudHypervisor {
    child: ChildGuard,
    console: Console,
    cfg: VmConfig,
    started: Instant,
}

/// The cloud-hypervisor command line for `cfg`.
pub fn command(bin: &Path, cfg: &VmConfig, assets: &GuestAssets, api: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("--kernel")
        .arg(&assets.kernel)
        .arg("--initramfs")
        .arg(&assets.initramfs)
        .args(["--cmdline", &cfg.cmdline()])
        .args([
            "--cpus",
            &format!("boot={},max={}", cfg.cpus, cfg.max_cpus.max(cfg.cpus)),
        ])
        .args(["--memory", &format!("size={}M,shared=on", cfg.memory_mib)])
        .args(["--serial", "tty", "--console", "off"])
        .arg("--api-socket")
        .arg(api);
    for d in &cfg.disks {
        let mut disk = format!(
            "vhost_user=true,socket={},num_queues={}",
            d.socket.display(),
            d.num_queues
        );
        if let Some(q) = d.queue_size {
            disk.push_str(&format!(",queue_size={q}"));
        }
        c.args(["--disk", &disk]);
    }
    c
}

impl CloudHypervisor {
    /// Starts cloud-hypervisor in `dir`.
    pub fn start(
        bin: &Path,
        cfg: &VmConfig,
        assets: &GuestAssets,
        dir: &Path,
        name: &str,
    ) -> Result<Self> {
        let api = dir.join(format!("{name}.api"));
        let _ = std::fs::remove_file(&api);
        let mut console = Console::new(&dir.join(format!("{name}.console.log")))?;
        let mut cmd = command(bin, cfg, assets, &api);
        console.note(&format!("{cmd:?}"));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn("cloud-hypervisor", &mut cmd)?;
        if let Some(c) = child.child_mut() {
            if let Some(out) = c.stdout.take() {
                console.attach(out, "");
            }
            if let Some(err) = c.stderr.take() {
                console.attach(err, "ch: ");
            }
        }
        Ok(CloudHypervisor {
            child,
            console,
            cfg: cfg.clone(),
            started: Instant::now(),
        })
    }

    /// The console capture.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Waits for the agent to finish and the VMM to exit; returns and
    /// prints the results.
    pub fn wait_done(&mut self) -> Result<AgentRun> {
        self.console
            .wait_for(0, self.cfg.boot_timeout, "the guest agent to start", |l| {
                l.contains(protocol::HELLO_PREFIX)
            })
            .map_err(|e| Error::NoGuest(format!("cloud-hypervisor guest: {e}")))?;
        self.console
            .wait_for(0, self.cfg.run_timeout, "the guest agent to finish", |l| {
                l.contains(protocol::DONE_PREFIX)
            })?;
        if self.child.wait_timeout(Duration::from_secs(30))?.is_none() {
            let _ = self.child.kill();
        }
        self.console.wait_closed(Duration::from_secs(5));
        let run = AgentRun::from_lines(&self.console.lines())?;
        run.print();
        println!(
            "cloud-hypervisor VM finished in {:.1}s",
            self.started.elapsed().as_secs_f64()
        );
        Ok(run)
    }
}
