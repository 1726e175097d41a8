//! The disk backend under test: our `vhost-user-blk`, or
//! `qemu-storage-daemon` as a reference (`VMM_TESTS_BACKEND=qsd`).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::process::{self, ChildGuard};
use crate::setup;

/// Which program serves the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// This project's `vhost-user-blk` binary.
    VhostUserBlk(PathBuf),
    /// `qemu-storage-daemon --export type=vhost-user-blk`: no control
    /// socket, so no per-queue stats.
    Qsd(PathBuf),
}

impl BackendKind {
    /// From the environment: `VMM_TESTS_BACKEND=qsd` picks
    /// qemu-storage-daemon; otherwise our binary, see [`backend_bin`].
    pub fn from_env() -> Result<Self> {
        match std::env::var("VMM_TESTS_BACKEND").as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => Ok(BackendKind::Qsd(PathBuf::from(
                std::env::var_os("QSD_BIN").unwrap_or_else(|| "qemu-storage-daemon".into()),
            ))),
            _ => Ok(BackendKind::VhostUserBlk(backend_bin()?)),
        }
    }

    /// Whether this backend answers `stats` on a control socket.
    pub fn has_stats(&self) -> bool {
        matches!(self, BackendKind::VhostUserBlk(_))
    }
}

/// Finds (or builds) the `vhost-user-blk` binary.
///
/// `$VHOST_USER_BLK_BIN` wins. Otherwise the binary is built with
/// `cargo build -p vhost-user-blk` in the profile and target directory of
/// the running executable (a no-op when it is fresh, and it keeps
/// `cargo test -p vmm-tests` from testing a stale backend), then taken from
/// `target/<profile>/vhost-user-blk`. `VMM_TESTS_NO_BUILD=1` skips the build.
pub fn backend_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VHOST_USER_BLK_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(Error::Missing(
                p.display().to_string(),
                "check VHOST_USER_BLK_BIN".into(),
            ));
        }
        return Ok(p);
    }
    let profile = setup::profile_dir().ok_or_else(|| {
        Error::Missing(
            "the target directory".into(),
            "set VHOST_USER_BLK_BIN".into(),
        )
    })?;
    let bin = profile.join("vhost-user-blk");
    if !std::env::var("VMM_TESTS_NO_BUILD").is_ok_and(|v| v == "1") {
        if let Some(target) = profile.parent() {
            let mut cmd = setup::cargo();
            cmd.args(["build", "-p", "vhost-user-blk"]);
            if profile.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            cmd.env("CARGO_TARGET_DIR", target);
            process::run(&mut cmd)?;
        }
    }
    if bin.is_file() {
        return Ok(bin);
    }
    Err(Error::Missing(
        bin.display().to_string(),
        "build it with `cargo build -p vhost-user-blk` or set VHOST_USER_BLK_BIN".into(),
    ))
}

/// How to start the backend.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The disk image.
    pub image: PathBuf,
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    /// The control socket (our backend only).
    pub control: Option<PathBuf>,
    /// The backend's log file (stdout and stderr).
    pub log: PathBuf,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: Option<u16>,
    /// `--cache none|writeback|dontcache`.
    pub cache: Option<String>,
    /// Export the disk read-only.
    pub read_only: bool,
    /// The disk's serial.
    pub serial: Option<String>,
    /// Logical block size, 512 or 4096.
    pub logical_block_size: Option<u32>,
    /// More arguments, passed as they are (our backend only).
    pub extra_args: Vec<String>,
    /// qemu-storage-daemon's file driver `aio=` (`threads`, `io_uring`, `native`); unset: its
    /// default, `threads` (qemu-storage-daemon only).
    pub qsd_aio: Option<String>,
    /// qemu-storage-daemon's file driver `locking=off`: two daemons may open the image, as the
    /// two sides of a live migration do (qemu-storage-daemon only).
    pub qsd_locking_off: bool,
}

impl BackendConfig {
    /// A one-queue writable backend for `image`, with its socket, control
    /// socket and log in `dir`.
    pub fn new(image: &Path, dir: &Path) -> Self {
        BackendConfig {
            image: image.to_path_buf(),
            socket: dir.join("vhost-user-blk.sock"),
            control: Some(dir.join("control.sock")),
            log: dir.join("backend.log"),
            num_queues: 1,
            queue_size: None,
            cache: None,
            read_only: false,
            serial: None,
            logical_block_size: None,
            extra_args: Vec::new(),
            qsd_aio: None,
            qsd_locking_off: false,
        }
    }

    /// Sets the number of queues.
    pub fn queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    /// Sets the cache mode.
    pub fn cache(mut self, mode: &str) -> Self {
        self.cache = Some(mode.to_string());
        self
    }

    /// Makes the disk read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
}

/// Per-queue counters from the backend's `stats` command.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueStats {
    /// Queue index.
    #[serde(default)]
    pub index: u64,
    /// Requests completed.
    #[serde(default)]
    pub requests: u64,
    /// Read requests.
    #[serde(default)]
    pub reads: u64,
    /// Write requests.
    #[serde(default)]
    pub writes: u64,
    /// Flush requests.
    #[serde(default)]
    pub flushes: u64,
    /// Bytes read.
    #[serde(default)]
    pub bytes_read: u64,
    /// Bytes written.
    #[serde(default)]
    pub bytes_written: u64,
    /// Whatever else the backend reports.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The backend's `stats` reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackendStats {
    /// One entry per queue.
    pub queues: Vec<QueueStats>,
    /// Whatever else the backend reports.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A running backend, killed when dropped.
pub struct Backend {
    child: ChildGuard,
    kind: BackendKind,
    cfg: BackendConfig,
}

impl Backend {
    /// Starts the backend and waits (up to 20 s) for its socket.
    pub fn start(kind: &BackendKind, cfg: &BackendConfig) -> Result<Self> {
        // A socket left by a killed backend would fool the wait below.
        for p in std::iter::once(&cfg.socket).chain(cfg.control.iter()) {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("remove {}", p.display()), e)),
            }
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&cfg.log)
            .ctx(|| format!("open {}", cfg.log.display()))?;
        let log2 = log.try_clone().ctx(|| "clone log".into())?;
        let mut cmd = match kind {
            BackendKind::VhostUserBlk(bin) => {
                let mut c = Command::new(bin);
                c.arg("--socket-path")
                    .arg(&cfg.socket)
                    .arg("--blk-file")
                    .arg(&cfg.image)
                    .arg("--num-queues")
                    .arg(cfg.num_queues.to_string());
                if let Some(q) = cfg.queue_size {
                    c.arg("--queue-size").arg(q.to_string());
                }
                if let Some(m) = &cfg.cache {
                    c.arg("--cache").arg(m);
                }
                if cfg.read_only {
                    c.arg("--read-only");
                }
                if let Some(s) = &cfg.serial {
                    c.arg("--serial").arg(s);
                }
                if let Some(b) = cfg.logical_block_size {
                    c.arg("--logical-block-size").arg(b.to_string());
                }
                if let Some(p) = &cfg.control {
                    c.arg("--control").arg(p);
                }
                c.args(&cfg.extra_args);
                if std::env::var_os("RUST_LOG").is_none() {
                    c.env("RUST_LOG", "info");
                }
                c
            }
            BackendKind::Qsd(bin) => {
                let direct = if cfg.cache.as_deref() == Some("none") {
                    "on"
                } else {
                    "off"
                };
                let ro = if cfg.read_only { ",read-only=on" } else { "" };
                let locking = if cfg.qsd_locking_off {
                    ",locking=off"
                } else {
                    ""
                };
                let aio = cfg
                    .qsd_aio
                    .as_ref()
                    .map(|a| format!(",aio={a}"))
                    .unwrap_or_default();
                let mut export = format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}",
                    cfg.socket.display(),
                    if cfg.read_only { "off" } else { "on" },
                    cfg.num_queues
                );
                if let Some(b) = cfg.logical_block_size {
                    export.push_str(&format!(",logical-block-size={b}"));
                }
                let mut c = Command::new(bin);
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f,filename={},cache.direct={direct}{aio}{ro}{locking}",
                        cfg.image.display()
                    ))
                    .arg("--export")
                    .arg(export);
                c
            }
        };
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let name = match kind {
            BackendKind::VhostUserBlk(_) => "vhost-user-blk",
            BackendKind::Qsd(_) => "qemu-storage-daemon",
        };
        let mut child = ChildGuard::spawn(name, &mut cmd)?;
        let log_path = cfg.log.clone();
        process::wait_for_socket(&cfg.socket, Duration::from_secs(20), || {
            match child.try_wait()? {
                Some(s) => Err(Error::Exited {
                    what: name.to_string(),
                    status: s.to_string(),
                    log: Some(log_path.clone()),
                }),
                None => Ok(()),
            }
        })?;
        if let (BackendKind::VhostUserBlk(_), Some(ctl)) = (kind, &cfg.control) {
            process::wait_for_socket(ctl, Duration::from_secs(10), || Ok(()))?;
        }
        // A backend that dies right after creating its socket (a bad
        // sandbox, say) would otherwise surface as a guest that cannot
        // connect; say what happened instead.
        if let Some(s) = child.wait_timeout(Duration::from_millis(200))? {
            return Err(Error::Exited {
                what: name.to_string(),
                status: s.to_string(),
                log: Some(log_path),
            });
        }
        Ok(Backend {
            child,
            kind: kind.clone(),
            cfg: cfg.clone(),
        })
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.cfg.socket
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &BackendConfig {
        &self.cfg
    }

    /// Which program this is.
    pub fn kind(&self) -> &BackendKind {
        &self.kind
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the backend has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(s) => Err(Error::Exited {
                what: "the backend".into(),
                status: s.to_string(),
                log: Some(self.cfg.log.clone()),
            }),
            None => Ok(()),
        }
    }

    /// Sends one control command and returns the reply line as JSON.
    pub fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value> {
        let path = self
            .cfg
            .control
            .as_ref()
            .filter(|_| self.kind.has_stats())
            .ok_or_else(|| Error::Backend("this backend has no control socket".into()))?;
        let mut s = UnixStream::connect(path).ctx(|| format!("connect {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .ctx(|| "set control read timeout".into())?;
        let mut line = request.to_string();
        line.push('\n');
        s.write_all(line.as_bytes())
            .ctx(|| "send control command".into())?;
        let mut reply = String::new();
        BufReader::new(s)
            .read_line(&mut reply)
            .ctx(|| "read control reply".into())?;
        Ok(serde_json::from_str(&reply)?)
    }

    /// Per-queue counters (our backend only).
    pub fn stats(&self) -> Result<BackendStats> {
        let v = self.control(&serde_json::json!({"cmd": "stats"}))?;
        serde_json::from_value(v.clone()).map_err(|e| Error::Backend(format!("bad stats {v}: {e}")))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.cfg.log).unwrap_or_default()
    }

    /// `SIGKILL`, as a crash would.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.child.kill()
    }

    /// `SIGTERM` and wait up to `grace` (then `SIGKILL`).
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.child.terminate(grace)
    }
}
