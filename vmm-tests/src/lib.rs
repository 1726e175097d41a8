//! The VM harness of `vhost-user-blk`.
//!
//! It boots real Linux guests under QEMU (KVM when a probe boot works,
//! else TCG) or cloud-hypervisor against the backend, and runs a guest
//! agent in them:
//!
//! - [`setup`]: host packages, the guest kernel (Debian's cloud kernel from
//!   trixie-backports), the static guest agent and the initramfs, cached;
//! - [`backend`]: starts `vhost-user-blk` (or `qemu-storage-daemon` as a
//!   reference) and reads its per-queue stats;
//! - [`qemu`], [`ch`]: the VMM launchers, with [`qmp`] and [`console`];
//! - [`agent`]: what the guest agent runs and what it reported;
//! - [`pagecache`]: the host page cache an image holds (`mincore`);
//! - [`migration`]: live migration between two QEMUs, each on its own backend.
//!
//! Tests use [`vm_test`], which serialises VMs, prepares the assets, gives
//! a work directory that is kept when the test fails, and turns errors into
//! failures: a VM test fails, never skips, when no guest boots.
//!
//! The benchmark tools built on this library live in their own package,
//! `vmm-bench` (`vmm-tests/bench`).

pub mod agent;
pub mod backend;
pub mod ch;
pub mod console;
pub mod error;
pub mod migration;
pub mod pagecache;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod setup;
pub mod spread;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

pub use agent::{AgentPlan, AgentRun};
pub use backend::{Backend, BackendConfig, BackendKind, BackendStats};
pub use error::{Error, Result};
pub use qemu::{Qemu, VhostUserDisk, VmConfig};

use error::Context;

/// One VM test's environment: the VM lock, the guest assets, the backend
/// to test and a work directory.
pub struct Harness {
    /// The test's name.
    pub name: String,
    /// The work directory (images, sockets, logs).
    pub dir: PathBuf,
    /// The guest kernel and initramfs.
    pub assets: setup::GuestAssets,
    /// The backend program under test.
    pub backend_kind: BackendKind,
    keep: bool,
    vms: u32,
    _lock: setup::FileLock,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Harness {
    /// Takes the VM lock, prepares the assets and the work directory.
    pub fn new(name: &str) -> Result<Self> {
        let lock = setup::vm_lock()?;
        let assets = setup::guest_assets()?;
        let backend_kind = BackendKind::from_env()?;
        let dir = setup::work_root().join(format!(
            "{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ctx(|| format!("mkdir {}", dir.display()))?;
        println!(
            "harness: {name}: kernel {}, backend {:?}, work dir {}",
            assets.kernel_release,
            backend_kind,
            dir.display()
        );
        Ok(Harness {
            name: name.to_string(),
            dir,
            assets,
            backend_kind,
            keep: std::env::var("VMM_TESTS_KEEP").is_ok_and(|v| v == "1"),
            vms: 0,
            _lock: lock,
        })
    }

    /// Prints the tail of every backend log in the work directory.
    pub fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !name.ends_with(".log") || name.contains("console") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {} ---", p.display());
            for l in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{l}");
            }
        }
    }

    /// Keeps the work directory after the test.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// A path in the work directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a sparse image of `size` bytes in the work directory.
    pub fn image(&self, name: &str, size: u64) -> Result<PathBuf> {
        create_image(&self.path(name), size)
    }

    /// A backend configuration for `image` with files in the work directory.
    pub fn backend_config(&self, image: &Path) -> BackendConfig {
        BackendConfig::new(image, &self.dir)
    }

    /// Starts the backend under test.
    pub fn start_backend(&self, cfg: &BackendConfig) -> Result<Backend> {
        Backend::start(&self.backend_kind, cfg)
    }

    /// Starts a QEMU guest; its logs are named `vm<N>`.
    pub fn start_vm(&mut self, cfg: &VmConfig) -> Result<Qemu> {
        self.vms += 1;
        Qemu::start(cfg, &self.assets, &self.dir, &format!("vm{}", self.vms))
    }

    /// Boots a guest, runs its plan to the end and returns the results.
    pub fn run_vm(&mut self, cfg: &VmConfig) -> Result<AgentRun> {
        let mut q = self.start_vm(cfg)?;
        q.wait_done()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            eprintln!("harness: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs a VM test: a [`Harness`] for `f`, timing, and a panic with the
/// error (keeping the work directory) when `f` fails.
pub fn vm_test(name: &str, f: impl FnOnce(&mut Harness) -> Result<()>) {
    let start = Instant::now();
    let mut h = match Harness::new(name) {
        Ok(h) => h,
        Err(e) => panic!("{name}: cannot set up the VM harness: {e}"),
    };
    let setup = start.elapsed();
    let result = f(&mut h);
    println!(
        "{name}: {:.1}s (+{:.1}s waiting for the VM lock and setting up)",
        start.elapsed().saturating_sub(setup).as_secs_f64(),
        setup.as_secs_f64()
    );
    if let Err(e) = result {
        h.keep();
        h.dump_logs();
        panic!("{name}: {e}\n(work directory kept: {})", h.dir.display());
    }
}

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn create_image(path: &Path, size: u64) -> Result<PathBuf> {
    let f = std::fs::File::create(path).ctx(|| format!("create {}", path.display()))?;
    f.set_len(size)
        .ctx(|| format!("truncate {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// Runs `e2fsck -fn` on an image (read-only check); returns its output.
pub fn e2fsck(image: &Path) -> Result<String> {
    let out = process::run(Command::new("e2fsck").arg("-fn").arg(image))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Reads a file out of an ext2/3/4 image without mounting it
/// (`debugfs -R 'cat PATH'`).
pub fn debugfs_cat(image: &Path, path: &str) -> Result<Vec<u8>> {
    let out = process::run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(image),
    )?;
    Ok(out.stdout)
}
