//! How much of a file sits in the host page cache (`mincore(2)`, through
//! the disk crate), sampled on a thread.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};

/// Bytes of `path` resident in the page cache now: the disk crate's `mincore` measure, the same
/// one the backend's own tests use.
pub fn resident_bytes(path: &Path) -> Result<u64> {
    disk::resident_bytes_of(path).map_err(|e| {
        Error::io(
            format!("page-cache residency of {}", path.display()),
            std::io::Error::other(e),
        )
    })
}

/// Writes back and drops every cached page of `path` (`fdatasync`, then
/// `POSIX_FADV_DONTNEED`): what a measurement that starts with nothing of
/// the image cached does first.
pub fn drop_cached(path: &Path) -> std::io::Result<()> {
    let with = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| with("open", e))?;
    f.sync_data().map_err(|e| with("fdatasync", e))?;
    // SAFETY: a valid descriptor; the advice only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(with(
            "POSIX_FADV_DONTNEED",
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// Makes `path` an image of `size` bytes written through once with a
/// pattern (so reads hit allocated blocks, not unwritten extents that read
/// as zeroes for free, and writes overwrite them), unless it is already
/// there at that size; either way with nothing of it left cached.
pub fn prepare_image(path: &Path, size: u64) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return drop_cached(path);
    }
    const MIB: u64 = 1 << 20;
    let f = std::fs::File::create(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
    let mut chunk = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i as u64 ^ (off >> 20)).wrapping_mul(0x9E37_79B9) as u8;
        }
        let len = (size - off).min(MIB) as usize;
        std::os::unix::fs::FileExt::write_all_at(&f, &chunk[..len], off)
            .map_err(|e| std::io::Error::new(e.kind(), format!("write {}: {e}", path.display())))?;
        off += MIB;
    }
    drop(f);
    drop_cached(path)
}

/// Samples [`resident_bytes`] every `interval` on a thread and keeps the
/// peak.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Samples>>,
}

/// What a [`Sampler`] saw.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Highest residency seen, in bytes.
    pub peak: u64,
    /// Last residency seen, in bytes.
    pub last: u64,
    /// Number of samples taken.
    pub count: u64,
    /// The first sampling error, if any.
    pub error: Option<String>,
}

impl Sampler {
    /// Starts sampling `path`.
    pub fn start(path: &Path, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let path: PathBuf = path.to_path_buf();
        let handle = std::thread::spawn(move || {
            let mut s = Samples::default();
            loop {
                match resident_bytes(&path) {
                    Ok(b) => {
                        s.peak = s.peak.max(b);
                        s.last = b;
                        s.count += 1;
                    }
                    Err(e) => {
                        if s.error.is_none() {
                            s.error = Some(e.to_string());
                        }
                    }
                }
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(interval);
            }
            s
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling (after one last sample) and returns what it saw.
    pub fn stop(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
