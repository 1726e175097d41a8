//! How much of a file sits in the host page cache (`mincore(2)`, through
//! the disk crate), sampled on a thread.

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
