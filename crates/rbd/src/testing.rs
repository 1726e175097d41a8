//! A throw-away single-node Ceph cluster for tests: `vmm-tests/scripts/ceph-cluster.sh` started
//! once per test process, under a scratch directory, and stopped when the process exits.
//!
//! Nothing is skipped: without the Ceph daemons (`ceph-mon`, `ceph-osd`, `ceph-common`) the
//! first test that asks for the cluster fails, saying what to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The script that starts and stops the cluster.
pub const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../vmm-tests/scripts/ceph-cluster.sh"
);

/// The pool the script creates.
pub const POOL: &str = "rbd";

/// A running test cluster; see the module documentation.
#[derive(Debug)]
pub struct TestCluster {
    dir: PathBuf,
    conf: PathBuf,
}

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
static STARTED_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn stop_at_exit() {
    let dir = match STARTED_DIR.lock() {
        Ok(mut d) => d.take(),
        Err(_) => None,
    };
    if let Some(dir) = dir {
        let _ = Command::new("sh")
            .arg(SCRIPT)
            .arg("stop")
            .arg(&dir)
            .output();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

impl TestCluster {
    /// The cluster of this test process, started at the first call (about ten seconds).
    ///
    /// # Panics
    ///
    /// When the cluster cannot start, with the script's message (e.g. the Ceph packages to
    /// install).
    pub fn shared() -> &'static TestCluster {
        CLUSTER.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("vub-ceph-{}", std::process::id()));
            let out = run(Command::new("sh")
                .arg(SCRIPT)
                .arg("start")
                .arg(&dir)
                .env("CEPH_IMAGE", ""));
            if !out.status.success() {
                let _ = Command::new("sh")
                    .arg(SCRIPT)
                    .arg("stop")
                    .arg(&dir)
                    .output();
                panic!(
                    "the Ceph test cluster did not start ({}):\n{}\n(vmm-tests/scripts/\
                     install-prereqs.sh installs ceph-mon, ceph-osd and ceph-common)",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if let Ok(mut d) = STARTED_DIR.lock() {
                *d = Some(dir.clone());
            }
            // SAFETY: registers a plain function with no arguments; it runs once at exit.
            unsafe { libc::atexit(stop_at_exit) };
            TestCluster {
                conf: dir.join("ceph.conf"),
                dir,
            }
        })
    }

    /// The cluster's config file, for `conf=` and the `rbd` and `ceph` commands.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The scratch directory holding the daemons' data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Run `rbd -c CONF ARGS...`; panics with its stderr when it fails.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = run(Command::new("timeout")
            .arg("60")
            .arg("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args));
        assert!(
            out.status.success(),
            "rbd {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Create `pool/name` of `bytes` bytes. Each test process has a fresh cluster, so names
    /// only need to be unique within it (without a manager, `rbd rm` can wait forever).
    pub fn create_image(&self, name: &str, bytes: u64) {
        let spec = format!("{POOL}/{name}");
        self.rbd(&["create", "--size", &format!("{bytes}B"), &spec]);
    }

    /// The whole content of `pool/name`, through `rbd export`.
    pub fn export(&self, name: &str) -> Vec<u8> {
        let spec = format!("{POOL}/{name}");
        self.rbd(&["export", "--no-progress", &spec, "-"])
    }

    /// Freeze the OSD (requests stall until `rados_osd_op_timeout`), or thaw it.
    pub fn set_osd_frozen(&self, frozen: bool) {
        let what = if frozen { "stop-osd" } else { "start-osd" };
        let out = run(Command::new("sh").arg(SCRIPT).arg(what).arg(&self.dir));
        assert!(
            out.status.success(),
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
