//! The Ceph RBD image the `*-rbd` peers share: a throw-away single-node
//! cluster started with `vmm-tests/scripts/ceph-cluster.sh` (and stopped when
//! the run ends), or an existing cluster given by its config file; the bench
//! image in it, created and filled once.
//!
//! The image is created with the `layering` feature only unless asked
//! otherwise (`--rbd-features default`): fio's rbd engine opens the image
//! once per job, and with `exclusive-lock` on, its two jobs would trade the
//! lock on every write, measuring the lock hand-over rather than the I/O
//! path. Every peer then runs on that same image.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::error::{bail, Context, Result};

/// The image the RBD peers serve.
#[derive(Clone, Debug)]
pub struct RbdImage {
    /// The cluster's config file (`ceph.conf`).
    pub conf: PathBuf,
    /// The pool.
    pub pool: String,
    /// The image's name.
    pub image: String,
    /// The OSD's pid file, when the cluster is ours (its CPU is sampled).
    pub osd_pid_file: Option<PathBuf>,
    /// The config fio's rbd engine reads: `conf` with librbd's cache off.
    pub fio_conf: PathBuf,
    /// `rbd create --image-feature` (comma-separated), or `default` for
    /// `rbd create`'s own feature set.
    pub features: String,
}

impl RbdImage {
    /// The backend's `--blk-file` spec.
    pub fn spec(&self) -> String {
        format!(
            "rbd:{}/{}:conf={}",
            self.pool,
            self.image,
            self.conf.display()
        )
    }

    /// The OSD's process id, if the cluster is ours and it runs.
    pub fn osd_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.osd_pid_file.as_ref()?).ok()?;
        text.trim().parse().ok()
    }

    fn rbd(&self, args: &[&str]) -> Result<Output> {
        // `-k`: an `rbd` stuck in librados (a full memstore does that to a fill) ignores the
        // TERM; the KILL ten seconds later ends it, so the run fails instead of hanging.
        let out = Command::new("timeout")
            .args(["-k", "10", "120"])
            .arg("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .ctx(|| "run rbd (install ceph-common: vmm-tests/scripts/install-prereqs.sh)")?;
        Ok(out)
    }

    /// Writes [`RbdImage::fio_conf`]: the cluster's config with librbd's
    /// cache turned off for clients (a second `[client]` section adds to
    /// the first).
    pub fn write_fio_conf(&self) -> Result<()> {
        let conf =
            std::fs::read_to_string(&self.conf).ctx(|| format!("read {}", self.conf.display()))?;
        let text = format!(
            "{conf}\n# Added by the bench for fio's rbd engine.\n[client]\nrbd cache = false\n"
        );
        std::fs::write(&self.fio_conf, text).ctx(|| format!("write {}", self.fio_conf.display()))
    }

    fn name(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }

    /// Creates the image with `size` bytes and [`RbdImage::features`] and
    /// fills it once with non-zero data (`rbd bench`, sequential 4 MiB
    /// writes), unless an image of that size and those features marked as
    /// filled is there already.
    pub fn prepare(&self, size: u64) -> Result<()> {
        let name = self.name();
        let filled = format!("{size} {}", self.features);
        let meta = self.rbd(&["image-meta", "get", &name, "bench.filled"])?;
        if meta.status.success() && String::from_utf8_lossy(&meta.stdout).trim() == filled {
            return Ok(());
        }
        let _ = self.rbd(&["rm", "--no-progress", &name]);
        let size_arg = format!("{}M", size >> 20);
        let mut create_args = vec!["create", "--size", &size_arg, &name];
        if self.features != "default" {
            create_args.extend(["--image-feature", &self.features]);
        }
        let create = self.rbd(&create_args)?;
        if !create.status.success() {
            bail!(
                "rbd create {name}: {}",
                String::from_utf8_lossy(&create.stderr).trim()
            );
        }
        eprintln!("bench: filling rbd image {name} ({} MiB) once", size >> 20);
        self.fill(size)?;
        let mark = self.rbd(&["image-meta", "set", &name, "bench.filled", &filled])?;
        if !mark.status.success() {
            bail!(
                "rbd image-meta set {name}: {}",
                String::from_utf8_lossy(&mark.stderr).trim()
            );
        }
        Ok(())
    }

    /// Writes the whole image once, sequentially in 4 MiB requests (each
    /// replaces a whole RADOS object). memstore's default keeps an object as
    /// the list of the pieces written into it, so 4 KiB random writes make
    /// every later request on that object cost more OSD CPU (the throw-away
    /// cluster keeps pages instead, a cluster of `--rbd-conf` may not):
    /// refilled before every run that follows a write run, each run starts
    /// on the same image, whatever ran before it.
    pub fn fill(&self, size: u64) -> Result<()> {
        let name = self.name();
        let fill = self.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-pattern",
            "seq",
            "--io-size",
            "4M",
            "--io-threads",
            "4",
            "--io-total",
            &size.to_string(),
            &name,
        ])?;
        if !fill.status.success() {
            bail!(
                "rbd bench (fill) {name}: {}",
                String::from_utf8_lossy(&fill.stderr).trim()
            );
        }
        Ok(())
    }
}

/// A throw-away cluster this run started; stopped when dropped.
pub struct Cluster {
    script: PathBuf,
    dir: PathBuf,
}

impl Cluster {
    /// Starts a cluster in `dir` with a memstore of `store_mb` MiB and an
    /// empty pool `pool`.
    pub fn start(workspace: &Path, dir: &Path, pool: &str, store_mb: u64) -> Result<Cluster> {
        let script = workspace.join("vmm-tests/scripts/ceph-cluster.sh");
        std::fs::create_dir_all(dir).ctx(|| format!("mkdir {}", dir.display()))?;
        // A cluster a previous, interrupted run left behind.
        let _ = Command::new(&script).arg("stop").arg(dir).output();
        eprintln!(
            "bench: starting a throw-away Ceph cluster in {}",
            dir.display()
        );
        let out = Command::new(&script)
            .arg("start")
            .arg(dir)
            .env("CEPH_POOL", pool)
            .env("CEPH_IMAGE", "")
            .env("CEPH_STORE_MB", store_mb.to_string())
            .output()
            .ctx(|| format!("run {}", script.display()))?;
        let cluster = Cluster {
            script,
            dir: dir.to_path_buf(),
        };
        if !out.status.success() {
            bail!(
                "ceph-cluster.sh start failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(cluster)
    }

    /// Its config file.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// The OSD's pid file.
    pub fn osd_pid_file(&self) -> PathBuf {
        self.dir.join("run/osd.0.pid")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

/// Whether qemu-storage-daemon has its rbd block driver (Debian ships it in
/// `qemu-block-extra`, a module QEMU loads on demand): the error to show
/// when it does not.
pub fn qsd_rbd_missing(qsd: &Path) -> Option<String> {
    let out = Command::new(qsd)
        .args([
            "--blockdev",
            "driver=rbd,node-name=probe,pool=p,image=i,conf=/nonexistent",
        ])
        .output();
    match out {
        Err(e) => Some(format!("run {}: {e}", qsd.display())),
        Ok(o) => {
            // With the driver, the probe gets as far as reading the config.
            let err = String::from_utf8_lossy(&o.stderr);
            (!err.contains("conf file")).then(|| {
                format!(
                    "{} has no rbd block driver ({}): install qemu-block-extra, from \
                     bookworm-backports like qemu-system-x86 \
                     (apt-get install -t bookworm-backports qemu-block-extra)",
                    qsd.display(),
                    err.trim()
                )
            })
        }
    }
}

/// Whether fio has its rbd engine: the error to show when it does not.
pub fn fio_rbd_missing(fio: &Path) -> Option<String> {
    match Command::new(fio).arg("--enghelp=rbd").output() {
        Err(e) => Some(format!("run {}: {e}", fio.display())),
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rbdname") => {
            None
        }
        Ok(_) => Some(format!(
            "{} has no rbd engine (built without librbd)",
            fio.display()
        )),
    }
}
