//! How much of a file sits in the host page cache: `mincore(2)` over a
//! read-only shared mapping, sampled on a thread.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Context, Error, Result};

/// Bytes of `path` resident in the page cache now.
pub fn resident_bytes(path: &Path) -> Result<u64> {
    let file = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let len = file
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let len = len as usize;
    // SAFETY: a new read-only shared mapping of a file we opened; we only
    // pass it to mincore and never read through it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(Error::io(
            format!("mmap {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let pages = len.div_ceil(page as usize);
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr..addr+len` is our mapping; `vec` has one byte per page.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmapping exactly what we mapped.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(Error::io(format!("mincore {}", path.display()), err));
    }
    Ok(vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page)
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
