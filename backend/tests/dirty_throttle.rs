//! Nothing slow on a queue thread, buffered writes: while a queue's buffered writes
//! (`--cache writeback`) are held by the kernel's dirty throttling, the 4 KiB reads on the same
//! queue complete in about the time of reads on a queue that has no write at all.
//!
//! The yardstick is that second queue, read in turn with the first during the same writes, and
//! not the reads' idle time: writeback through a loop device takes CPU, and on a small shared
//! host that alone delays reads on any queue by a millisecond or more, whatever the backend
//! does. What the backend answers for is the difference between its two queues.
//!
//! Dirty throttling is made to happen, and only to this test's writes, on a file system of its
//! own: an ext4 image on a loop device, whose writeback device gets a strict dirty limit of
//! 1 MiB (`/sys/class/bdi/<dev>/strict_limit` and `max_bytes`). Nothing else on the host is
//! throttled, and the limits go back as they were when the test ends. That takes root, a free
//! loop device and `mkfs.ext4`; without them the test says so and does nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::blk::{T_IN, T_OUT};
use common::{socket_path, Backend, Options, TempDir, Transfer, S_OK};

/// The file system's size (sparse) and the image's.
const FS_SIZE: u64 = 1 << 30;
const IMAGE_SIZE: u64 = 512 << 20;
/// The reads' sectors: a 64 KiB range, written (so cached) before the measurement.
const READ_SECTORS: u64 = 128;
/// Writes kept in flight at once (three descriptors each, in a ring of 256).
const WRITES_IN_FLIGHT: usize = 64;

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// An ext4 file system on a loop device, mounted, with a strict dirty limit on its device;
/// undone on drop.
struct ThrottledFs {
    mnt: PathBuf,
    loop_dev: Option<String>,
    mounted: bool,
    /// The device's `strict_limit` and `max_ratio` before the test, to put back.
    bdi: Option<(PathBuf, String, String)>,
}

impl ThrottledFs {
    fn new(dir: &Path) -> Result<Self, String> {
        let backing = dir.join("fs.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(FS_SIZE))
            .map_err(|e| format!("creating {}: {e}", backing.display()))?;
        run(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(&backing))?;
        let mut fs = Self {
            mnt: dir.join("mnt"),
            loop_dev: None,
            mounted: false,
            bdi: None,
        };
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&backing))?;
        fs.loop_dev = Some(dev.clone());
        std::fs::create_dir_all(&fs.mnt).map_err(|e| e.to_string())?;
        run(Command::new("mount")
            .args(["-o", "noatime"])
            .arg(&dev)
            .arg(&fs.mnt))?;
        fs.mounted = true;
        let name = Path::new(&dev)
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("loop device name")?
            .to_string();
        let majmin = std::fs::read_to_string(format!("/sys/block/{name}/dev"))
            .map_err(|e| format!("{name}: {e}"))?;
        let bdi = PathBuf::from(format!("/sys/class/bdi/{}", majmin.trim()));
        let read = |f: &str| {
            std::fs::read_to_string(bdi.join(f))
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("{}/{f}: {e}", bdi.display()))
        };
        fs.bdi = Some((bdi.clone(), read("strict_limit")?, read("max_ratio")?));
        let write = |f: &str, v: &str| {
            std::fs::write(bdi.join(f), v).map_err(|e| format!("{}/{f}: {e}", bdi.display()))
        };
        write("strict_limit", "1")?;
        write("max_bytes", "1048576")?;
        Ok(fs)
    }
}

impl Drop for ThrottledFs {
    fn drop(&mut self) {
        if let Some((bdi, strict, ratio)) = &self.bdi {
            let _ = std::fs::write(bdi.join("max_ratio"), ratio);
            let _ = std::fs::write(bdi.join("strict_limit"), strict);
        }
        if self.mounted {
            // The killed backend's ring lets go of the image a little after the process ends.
            let mut last = Ok(String::new());
            for _ in 0..50 {
                last = run(Command::new("umount").arg(&self.mnt));
                if last.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if let Err(e) = last {
                eprintln!("leaving {} mounted: {e}", self.mnt.display());
            }
        }
        if let Some(dev) = &self.loop_dev {
            let _ = run(Command::new("losetup").arg("-d").arg(dev));
        }
    }
}

fn percentile(v: &[Duration], pct: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * pct / 100).min(v.len() - 1)]
}

fn p99(v: Vec<Duration>) -> Duration {
    percentile(&v, 99)
}

fn summary(v: &[Duration]) -> String {
    format!(
        "p50 {:?} p90 {:?} p99 {:?} max {:?}",
        percentile(v, 50),
        percentile(v, 90),
        percentile(v, 99),
        percentile(v, 100)
    )
}

#[test]
fn reads_complete_in_time_while_the_queues_buffered_writes_are_throttled() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a loop device and its dirty limits");
        return;
    }
    let fs_dir = TempDir::new("dirty-throttle-fs");
    let fs = match ThrottledFs::new(fs_dir.path()) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("skipped: no throttled file system: {e}");
            return;
        }
    };
    let image = fs.mnt.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("creating the image");

    let dir = TempDir::new("dirty-throttle");
    let socket = socket_path(&dir, "vhost.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&image)
        // Used entries as each completes: in available-ring order, the reads' entries would
        // wait for the writes' whatever the queue thread does.
        .args(["--num-queues", "2", "--cache", "writeback"])
        .args(["--used-order", "completion"])
        .env("RUST_LOG", "info");
    let b = Backend::start(cmd, dir, socket, image.clone(), None);
    let mut d = b.connect(&Options {
        num_queues: Some(2),
        timeout: Duration::from_secs(60),
        ..Options::default()
    });
    let (writing, other) = d.queues_mut().split_at_mut(1);
    let (q, other) = (&mut writing[0], &mut other[0]);
    let block = vec![0x5a_u8; 4096];
    for s in (0..READ_SECTORS).step_by(8) {
        assert_eq!(q.execute(&Transfer::blk(T_OUT, s, &block, 0)).status, S_OK);
    }
    let read = |q: &mut common::Queue, n: u64| {
        let t0 = Instant::now();
        let c = q.execute(&Transfer::blk(T_IN, (n * 8) % READ_SECTORS, &[], 4096));
        assert_eq!(c.status, S_OK, "a 4 KiB read");
        t0.elapsed()
    };
    for n in 0..20 {
        read(q, n);
        read(other, n);
    }
    // Sectors for the writes: spread over the image past the reads' range, a fixed sequence.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_sector = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        READ_SECTORS + (x % ((IMAGE_SIZE / 4096) - READ_SECTORS / 8)) * 8
    };
    // The host is shared: a p99 over a few hundred reads moves by 2x between runs on its own.
    // Up to three attempts; a queue held by its writes fails all three.
    let mut outcomes = Vec::new();
    for _attempt in 0..3 {
        let started = Instant::now();
        let mut during = Vec::new();
        let mut beside = Vec::new();
        let mut writes = 0_usize;
        let mut n = 0;
        while started.elapsed() < Duration::from_secs(3) {
            // A batch of writes in flight, reads while any is, then the batch completed (the
            // driver's buffer arena is reused only once the queue is idle).
            let batch: Vec<_> = (0..WRITES_IN_FLIGHT)
                .map(|_| q.submit(&Transfer::blk(T_OUT, next_sector(), &block, 0)))
                .collect();
            while batch.iter().any(|t| !q.is_complete(t)) {
                during.push(read(q, n));
                beside.push(read(other, n));
                n += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            for t in batch {
                assert_eq!(q.complete(t).status, S_OK, "a buffered write");
                writes += 1;
            }
        }
        let took = started.elapsed();
        let outcome = if during.is_empty() {
            format!("{writes} writes in {took:?}, no read while any was in flight")
        } else {
            format!(
                "{writes} writes in {took:?}; {} reads meanwhile on that queue: {}; on the \
                 other queue: {}",
                during.len(),
                summary(&during),
                summary(&beside)
            )
        };
        eprintln!("{outcome}");
        if during.len() >= 20 && p99(during) <= 2 * p99(beside) {
            drop(d);
            drop(b);
            drop(fs);
            return;
        }
        outcomes.push(outcome);
    }
    drop(d);
    drop(b);
    drop(fs);
    panic!(
        "4 KiB reads on a queue whose buffered writes are throttled: p99 beyond twice that of \
         reads on another queue in every attempt:\n{}",
        outcomes.join("\n")
    );
}
