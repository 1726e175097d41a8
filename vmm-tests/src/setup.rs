//! Everything a VM needs before it boots: host packages, the guest kernel,
//! the guest agent and the initramfs; plus the directories and locks the
//! tests share.
//!
//! The first VM test on a fresh machine runs `scripts/install-prereqs.sh`
//! and `scripts/fetch-guest-kernel.sh` (both idempotent and quick when
//! everything is there), builds the guest agent as a static binary and
//! packs the initramfs. The results are cached under [`cache_dir`], keyed by
//! content, and the whole step runs under a file lock, so parallel test
//! binaries do it once.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{Context, Error, Result};
use crate::process;

/// Default root of the persistent cache.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/vhost-user-blk/vmm-tests";

/// The modules packed into the initramfs (with their dependencies).
/// `xfs` is left out: loading it takes about 8 s under TCG; add it here
/// when a test needs it.
pub const INITRAMFS_MODULES: &str = "virtio_blk";

/// The persistent cache: `$VMM_TESTS_CACHE_DIR`, else [`DEFAULT_CACHE_DIR`].
pub fn cache_dir() -> PathBuf {
    std::env::var_os("VMM_TESTS_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

/// The `vmm-tests` crate's directory (scripts live under it).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace root.
pub fn workspace_dir() -> PathBuf {
    let c = crate_dir();
    c.parent().map(Path::to_path_buf).unwrap_or(c)
}

/// The profile directory of the running executable (`target/debug` for a
/// test binary in `target/debug/deps`, `target/release` for the demo).
pub fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// Where VM work directories (images, logs, sockets) go:
/// `$VMM_TESTS_WORK_DIR`, else `<profile dir>/vmm-tests`, else the
/// system's temporary directory.
pub fn work_root() -> PathBuf {
    if let Some(d) = std::env::var_os("VMM_TESTS_WORK_DIR") {
        return PathBuf::from(d);
    }
    profile_dir()
        .map(|d| d.join("vmm-tests"))
        .unwrap_or_else(|| std::env::temp_dir().join("vmm-tests"))
}

/// An exclusive `flock(2)` on a file, released on drop.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` is ours.
    pub fn acquire(path: &Path) -> Result<Self> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).ctx(|| format!("mkdir {}", p.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ctx(|| format!("open lock {}", path.display()))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(format!("flock {}", path.display()), e));
            }
        }
    }
}

/// Serialises VMs across threads and processes: two TCG guests on two
/// cores would only slow each other past their timeouts. Each VM test
/// holds this for its whole run, so `cargo test --workspace` works without
/// `--test-threads=1`.
pub fn vm_lock() -> Result<FileLock> {
    FileLock::acquire(&cache_dir().join("vm.lock"))
}

/// 64-bit FNV-1a, a stable content hash for cache keys.
pub fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// FNV-1a's offset basis.
pub const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// The kernel's modules directory (`usr/lib/modules/<release>`).
    pub kernel_dir: PathBuf,
    /// The kernel release (the ABI), e.g. `7.3.4+deb13-cloud-amd64`.
    pub kernel_release: String,
    /// The initramfs (uncompressed newc cpio).
    pub initramfs: PathBuf,
    /// The static guest agent packed into it.
    pub agent: PathBuf,
}

fn script(name: &str) -> PathBuf {
    crate_dir().join("scripts").join(name)
}

/// Runs `scripts/install-prereqs.sh` unless `VMM_TESTS_SKIP_PREREQS=1`.
pub fn install_prereqs() -> Result<()> {
    if std::env::var("VMM_TESTS_SKIP_PREREQS").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    process::run(&mut Command::new(script("install-prereqs.sh")))?;
    Ok(())
}

/// Runs `scripts/fetch-guest-kernel.sh`; returns the kernel directory.
pub fn fetch_kernel() -> Result<PathBuf> {
    let out = process::run(
        Command::new(script("fetch-guest-kernel.sh")).env("VMM_TESTS_CACHE_DIR", cache_dir()),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| {
            Error::Missing(
                "guest kernel".into(),
                "fetch-guest-kernel.sh printed nothing".into(),
            )
        })?;
    if !dir.join("vmlinuz").is_file() {
        return Err(Error::Missing(
            dir.join("vmlinuz").display().to_string(),
            "fetch-guest-kernel.sh did not produce it".into(),
        ));
    }
    Ok(dir)
}

/// The `cargo` to run nested builds with: `$CARGO` (set by cargo for the
/// programs it runs), else `cargo` from `PATH`.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Flags meant for the outer build must not leak into ours.
    for v in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(v);
    }
    c.current_dir(workspace_dir());
    c
}

/// Builds the static guest agent (`$VMM_TESTS_AGENT_BIN` skips the build)
/// in its own target directory under the cache, one per checkout: two
/// checkouts sharing one would overwrite each other's binary behind cargo's
/// back, and a test would boot the other checkout's agent.
pub fn build_agent() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMM_TESTS_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target = "x86_64-unknown-linux-gnu";
    let checkout = fnv1a(env!("CARGO_MANIFEST_DIR").as_bytes(), FNV_OFFSET);
    let dir = cache_dir()
        .join("guest-agent-target")
        .join(format!("{checkout:016x}"));
    process::run(
        cargo()
            .args([
                "build",
                "--release",
                "-p",
                "guest-agent",
                "--target",
                target,
            ])
            .env("CARGO_TARGET_DIR", &dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    Ok(dir.join(target).join("release").join("guest-agent"))
}

/// The fio the `fio` initramfs variant carries (Debian's package on the host).
pub const FIO_BIN: &str = "/usr/bin/fio";

/// What an initramfs holds besides busybox, the agent, `mke2fs` and the modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitramfsVariant {
    /// Nothing more: what the VM tests boot (a few MB, quick to load under TCG).
    Default,
    /// Also [`FIO_BIN`] with its shared libraries (`build-initramfs.sh -F`, about 90 MB), for
    /// the agent's `fio` workload. Cached beside the default one as `initramfs-fio-<hash>.cpio`.
    Fio,
}

/// Packs the initramfs for `kernel_dir` and `agent`, cached by content.
pub fn build_initramfs(kernel_dir: &Path, agent: &Path) -> Result<PathBuf> {
    build_initramfs_variant(kernel_dir, agent, InitramfsVariant::Default)
}

/// Packs the initramfs `variant` for `kernel_dir` and `agent`, cached by content (the agent,
/// the script, the kernel and its directory, the modules, and for [`InitramfsVariant::Fio`]
/// the fio binary).
pub fn build_initramfs_variant(
    kernel_dir: &Path,
    agent: &Path,
    variant: InitramfsVariant,
) -> Result<PathBuf> {
    let mut files = vec![
        agent.to_path_buf(),
        script("build-initramfs.sh"),
        kernel_dir.join("vmlinuz"),
    ];
    if variant == InitramfsVariant::Fio {
        files.push(PathBuf::from(FIO_BIN));
    }
    let mut h = FNV_OFFSET;
    for f in &files {
        let data = std::fs::read(f).ctx(|| format!("read {}", f.display()))?;
        h = fnv1a(&data, h);
    }
    h = fnv1a(kernel_dir.as_os_str().as_encoded_bytes(), h);
    h = fnv1a(INITRAMFS_MODULES.as_bytes(), h);
    let name = match variant {
        InitramfsVariant::Default => format!("initramfs-{h:016x}.cpio"),
        InitramfsVariant::Fio => format!("initramfs-fio-{h:016x}.cpio"),
    };
    let out = cache_dir().join("initramfs").join(name);
    if out.is_file() {
        return Ok(out);
    }
    let mut cmd = Command::new(script("build-initramfs.sh"));
    cmd.arg("-k")
        .arg(kernel_dir)
        .arg("-a")
        .arg(agent)
        .arg("-o")
        .arg(&out)
        .arg("-m")
        .arg(INITRAMFS_MODULES);
    if variant == InitramfsVariant::Fio {
        cmd.arg("-F");
    }
    process::run(&mut cmd)?;
    Ok(out)
}

static ASSETS: OnceLock<std::result::Result<GuestAssets, String>> = OnceLock::new();
static FIO_ASSETS: OnceLock<std::result::Result<GuestAssets, String>> = OnceLock::new();

/// Prepares (once per process, under a file lock across processes) and
/// returns the guest's kernel and initramfs.
pub fn guest_assets() -> Result<GuestAssets> {
    ASSETS
        .get_or_init(|| prepare().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::NoGuest)
}

/// The guest's kernel with the fio initramfs ([`InitramfsVariant::Fio`]): [`guest_assets`]
/// with the other initramfs, packed once per process under the same file lock as the rest.
pub fn fio_guest_assets() -> Result<GuestAssets> {
    FIO_ASSETS
        .get_or_init(|| {
            let base = guest_assets().map_err(|e| e.to_string())?;
            let _lock =
                FileLock::acquire(&cache_dir().join("setup.lock")).map_err(|e| e.to_string())?;
            let initramfs =
                build_initramfs_variant(&base.kernel_dir, &base.agent, InitramfsVariant::Fio)
                    .map_err(|e| e.to_string())?;
            Ok(GuestAssets { initramfs, ..base })
        })
        .clone()
        .map_err(Error::NoGuest)
}

fn prepare() -> Result<GuestAssets> {
    let _lock = FileLock::acquire(&cache_dir().join("setup.lock"))?;
    install_prereqs()?;
    let kernel_dir = fetch_kernel()?;
    let agent = build_agent()?;
    let initramfs = build_initramfs(&kernel_dir, &agent)?;
    let kernel_release = kernel_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(GuestAssets {
        kernel: kernel_dir.join("vmlinuz"),
        kernel_dir,
        kernel_release,
        initramfs,
        agent,
    })
}
