//! The process under test: a scratch directory with an image and a socket path, the backend
//! started on them (stderr captured to a log file), a wait for its socket, and a kill on drop. The
//! backend's log is printed when a test panics, so a failure shows both sides.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::frontend::{self, Device, Options};

/// How long the backend may take to create its socket.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh directory named after `tag`, under cargo's per-target scratch directory (a real
    /// file system: O_DIRECT and hole punching work there, unlike on some tmpfs).
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("e2e-{}-{n}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("creating the test directory");
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Command-line options for one backend run.
#[derive(Clone, Debug)]
pub struct BackendOpts {
    /// Image size in bytes; the image is created sparse at this size before the start.
    pub size: u64,
    /// Do not create the image; pass `--size` and let the backend create it.
    pub backend_creates_image: bool,
    /// `--num-queues`.
    pub num_queues: usize,
    /// `--queue-size`.
    pub queue_size: u16,
    /// `--cache`.
    pub cache: &'static str,
    /// `--io-engine`.
    pub io_engine: &'static str,
    /// `--read-only`.
    pub read_only: bool,
    /// `--serial`.
    pub serial: Option<String>,
    /// `--logical-block-size`.
    pub logical_block_size: Option<u32>,
    /// `--control` (a path in the scratch directory).
    pub control: bool,
    /// Anything else, appended as is.
    pub extra_args: Vec<String>,
    /// Environment variables of the process (fault injection).
    pub env: Vec<(&'static str, String)>,
}

impl Default for BackendOpts {
    fn default() -> Self {
        Self {
            size: 64 << 20,
            backend_creates_image: false,
            num_queues: 1,
            queue_size: 256,
            cache: "writeback",
            io_engine: "io-uring",
            read_only: false,
            serial: None,
            logical_block_size: None,
            control: false,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running backend; killed on drop.
pub struct Backend {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its image.
    pub image: PathBuf,
    /// Its control socket, when asked for.
    pub control: Option<PathBuf>,
    log: PathBuf,
    dir: TempDir,
}

impl Backend {
    /// Starts `vhost-user-blk` with `opts` in a fresh scratch directory.
    pub fn spawn(opts: &BackendOpts) -> Self {
        let dir = TempDir::new("blk");
        let image = dir.path().join("disk.img");
        let socket = socket_path(&dir, "vhost.sock");
        let control = opts.control.then(|| socket_path(&dir, "control.sock"));
        if !opts.backend_creates_image {
            let f = File::create(&image).expect("creating the image");
            f.set_len(opts.size).expect("sizing the image");
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--blk-file")
            .arg(&image)
            .arg("--num-queues")
            .arg(opts.num_queues.to_string())
            .arg("--queue-size")
            .arg(opts.queue_size.to_string())
            .arg("--cache")
            .arg(opts.cache)
            .arg("--io-engine")
            .arg(opts.io_engine);
        if opts.backend_creates_image {
            cmd.arg("--size").arg(opts.size.to_string());
        }
        if opts.read_only {
            cmd.arg("--read-only");
        }
        if let Some(serial) = &opts.serial {
            cmd.arg("--serial").arg(serial);
        }
        if let Some(lbs) = opts.logical_block_size {
            cmd.arg("--logical-block-size").arg(lbs.to_string());
        }
        if let Some(control) = &control {
            cmd.arg("--control").arg(control);
        }
        cmd.args(&opts.extra_args);
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        Self::start(cmd, dir, socket, image, control)
    }

    /// Starts an arbitrary `cmd` that will listen on `socket` (e.g. another vhost-user-blk
    /// implementation to check the driver against), owning `dir`.
    pub fn start(
        mut cmd: Command,
        dir: TempDir,
        socket: PathBuf,
        image: PathBuf,
        control: Option<PathBuf>,
    ) -> Self {
        let log = dir.path().join("backend.log");
        let log_file = File::create(&log).expect("creating the backend log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("duplicating the log fd"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut backend = Self {
            child,
            socket,
            image,
            control,
            log,
            dir,
        };
        backend.wait_for_socket();
        backend
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let ready = fs::metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket())
                && self
                    .control
                    .as_ref()
                    .is_none_or(|c| fs::metadata(c).is_ok_and(|m| m.file_type().is_socket()));
            if ready {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("polling the backend") {
                panic!(
                    "backend exited with {status} before creating its socket; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "backend did not create {} within {STARTUP_TIMEOUT:?}; log:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Attaches a frontend with `opts`.
    pub fn connect(&self, opts: &Options) -> Device {
        Device::connect(&self.socket, opts).unwrap_or_else(|e| {
            panic!(
                "attaching to the backend: {e}; backend log:\n{}",
                self.log()
            )
        })
    }

    /// Attaches a frontend with default options and `num_queues` queues.
    pub fn connect_queues(&self, num_queues: usize) -> Device {
        self.connect(&Options {
            num_queues: Some(num_queues),
            ..Options::default()
        })
    }

    /// Everything the backend wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("polling the backend")
            .is_none()
    }

    /// The backend's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one control-socket command line and returns the one-line JSON answer.
    pub fn control(&self, command: &serde_json::Value) -> serde_json::Value {
        let path = self
            .control
            .as_ref()
            .expect("backend started without --control");
        let stream = frontend::connect_socket(path, STARTUP_TIMEOUT)
            .unwrap_or_else(|e| panic!("control socket: {e}"));
        stream
            .set_read_timeout(Some(frontend::DEFAULT_TIMEOUT))
            .expect("control read timeout");
        stream
            .set_write_timeout(Some(frontend::DEFAULT_TIMEOUT))
            .expect("control write timeout");
        let mut line = serde_json::to_vec(command).expect("encoding the command");
        line.push(b'\n');
        (&stream).write_all(&line).expect("sending the command");
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .expect("reading the answer");
        serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("control answer {answer:?} is not JSON: {e}"))
    }

    /// `{"cmd":"stats"}`.
    pub fn stats(&self) -> serde_json::Value {
        self.control(&serde_json::json!({ "cmd": "stats" }))
    }

    /// Reads `len` bytes of the image at byte `offset`, bypassing the backend.
    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = File::open(&self.image).expect("opening the image");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .expect("reading the image");
        buf
    }

    /// Writes `data` into the image at byte `offset`, bypassing the backend.
    pub fn write_image(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new()
            .write(true)
            .open(&self.image)
            .expect("opening the image");
        f.write_all_at(data, offset).expect("writing the image");
        f.sync_all().expect("syncing the image");
    }

    /// 512-byte blocks the image occupies on the host (`st_blocks`).
    pub fn image_blocks(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.image)
            .expect("stat of the image")
            .blocks()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- backend log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// `name` in `dir`, or in the system temporary directory if that path would not fit a
/// `sockaddr_un` (108 bytes).
pub fn socket_path(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path().join(name);
    if p.as_os_str().len() < 100 {
        return p;
    }
    let tag = dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::env::temp_dir().join(format!("{tag}-{name}"))
}
