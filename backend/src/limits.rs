//! I/O limits (`--limit`, `ctl limits set`): the device's token buckets as the process holds
//! them, and the timer a queue thread sleeps on while its requests wait for tokens.
//!
//! The buckets themselves are the `throttle` crate's. They outlive connections, like the
//! counters: a VMM that reconnects finds the limits the operator last set. Each queue thread
//! takes tokens on its own fast path; a request that finds none waits in its queue's FIFO,
//! counted in flight, and the thread's timerfd (in the same epoll loop as its kicks) wakes it
//! when tokens are due, and at least every refill period ([`throttle::MAX_SLEEP_NS`]) so that a
//! change of limits, or a drain, reaches waiting requests in time. A drain — GET_VRING_BASE, the
//! end of a connection (the VMM left, or SIGTERM), a vCPU unplug — does not wait for tokens: the
//! waiting requests go at once, still accounted, so that the requests after them pay.
//!
//! With `--limit-group PATH`, the buckets live in a file that every member of the group maps
//! (`MAP_SHARED`), so that the disks of several backend processes share one limit.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use throttle::{Buckets, SharedState, Spec, SpecError};

use crate::Error;

/// The process's limits: the buckets every connection's queue threads share, and which queues
/// let their waiting requests go without tokens.
#[derive(Debug)]
pub struct IoLimits {
    buckets: Arc<Buckets>,
    /// Bit `q`: queue `q`'s vCPU is unplugged, its waiting requests go at once.
    released: AtomicU64,
    /// The group's file, when the limits are shared with other processes.
    group: Option<PathBuf>,
}

impl IoLimits {
    /// Limits enforcing `spec` (possibly none).
    pub fn new(spec: Spec) -> Self {
        Self {
            buckets: Arc::new(Buckets::new(spec)),
            released: AtomicU64::new(0),
            group: None,
        }
    }

    /// Limits shared with every backend that maps the group file `path` (created if missing).
    /// A new group takes `spec`; an existing one keeps its limits, and a `spec` that differs
    /// from them is refused.
    pub fn join_group(path: &Path, spec: Option<Spec>) -> crate::Result<Self> {
        let fail = |reason: String| Error::LimitGroup {
            path: path.to_owned(),
            reason,
        };
        let state = map_group(path).map_err(|e| fail(e.to_string()))?;
        let buckets = Buckets::join(state, spec).map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            buckets: Arc::new(buckets),
            released: AtomicU64::new(0),
            group: Some(path.to_owned()),
        })
    }

    /// The group's file, if the limits are a group's.
    pub fn group(&self) -> Option<&Path> {
        self.group.as_deref()
    }

    /// The buckets, for a queue thread's [`throttle::Queue`].
    pub fn buckets(&self) -> &Arc<Buckets> {
        &self.buckets
    }

    /// The limits in force.
    pub fn spec(&self) -> Spec {
        self.buckets.spec()
    }

    /// Parse `text` and enforce it from now on; on a bad specification nothing changes.
    pub fn set(&self, text: &str) -> Result<Spec, SpecError> {
        let spec = Spec::parse(text)?;
        self.buckets.set(spec);
        Ok(spec)
    }

    /// Let the waiting requests of `queues` go without tokens (`true`), or wait again.
    pub fn release(&self, queues: &[usize], release: bool) {
        let mask = queues
            .iter()
            .filter(|&&q| q < 64)
            .fold(0u64, |m, &q| m | 1 << q);
        if release {
            self.released.fetch_or(mask, Ordering::Relaxed);
        } else {
            self.released.fetch_and(!mask, Ordering::Relaxed);
        }
    }

    /// Whether queue `queue`'s waiting requests go without tokens.
    pub fn is_released(&self, queue: usize) -> bool {
        queue < 64 && self.released.load(Ordering::Relaxed) & (1 << queue) != 0
    }
}

/// Map the group file `path` (created, and sized, if needed) for the rest of the process.
fn map_group(path: &Path) -> std::io::Result<&'static SharedState> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let size = SharedState::SIZE;
    if file.metadata()?.len() < size as u64 {
        // Zeroes: the state of a group nobody has set up yet.
        file.set_len(size as u64)?;
    }
    // SAFETY: a fresh shared read-write mapping of `size` bytes of an open file at least that
    // long; the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the mapping is page-aligned (more than `SharedState`'s 64 bytes), `size` bytes
    // long, and never unmapped, so the reference lives as long as the process. `SharedState`
    // is atomics only: every bit pattern is a valid value (a foreign file is refused by its
    // header), and other processes writing it concurrently is what atomics are for. The
    // mapping keeps the file's pages once `file` is closed.
    Ok(unsafe { &*ptr.cast::<SharedState>() })
}

/// A non-blocking `CLOCK_MONOTONIC` timerfd armed at absolute instants: the wake-up of a queue
/// thread whose requests wait for tokens.
#[derive(Debug)]
pub struct WakeTimer {
    fd: OwnedFd,
    /// The instant it is armed for, if armed.
    armed: Option<u64>,
}

impl WakeTimer {
    /// A disarmed timer.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, armed: None })
    }

    /// The descriptor to register in the thread's epoll loop.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fire at `at` (nanoseconds, `CLOCK_MONOTONIC`) unless already armed to fire sooner.
    pub fn arm(&mut self, at: u64) -> std::io::Result<()> {
        if self.armed.is_some_and(|t| t <= at) {
            return Ok(());
        }
        // A zero it_value would disarm: the clock never reads 0, but keep the timer armed.
        let at = at.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec; a null old-value pointer is allowed.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.armed = Some(at);
        Ok(())
    }

    /// The timer fired (or the thread woke for another reason): consume the expiration, if
    /// any, and count the timer as disarmed.
    pub fn fired(&mut self) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count`; the descriptor is non-blocking, so a timer that
        // has not expired yet answers EAGAIN, which is fine.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        self.armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_spec_leaves_the_limits_alone() {
        let limits = IoLimits::new(Spec::parse("iops-total=100").expect("valid"));
        assert!(limits.set("iops-total=0").is_err());
        assert!(limits.set("iops-total=5,frobs=1").is_err());
        assert_eq!(limits.spec().to_string(), "iops-total=100");
        assert!(limits.set("bps-write=1048576").is_ok());
        assert_eq!(limits.spec().to_string(), "bps-write=1048576");
    }

    #[test]
    fn group_members_see_one_limit() {
        let dir = std::env::temp_dir().join(format!("limits-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("group");
        let spec = Spec::parse("iops-total=300").expect("valid");
        let first = IoLimits::join_group(&path, Some(spec)).expect("a new group");
        let second = IoLimits::join_group(&path, None).expect("joining");
        assert_eq!(second.spec(), spec);
        assert_eq!(second.group(), Some(path.as_path()));
        assert!(second.set("iops-total=400").is_ok());
        assert_eq!(first.spec().to_string(), "iops-total=400");
        let e = IoLimits::join_group(&path, Some(spec)).expect_err("other limits");
        assert!(e.to_string().contains("iops-total=400"), "{e}");
        std::fs::write(dir.join("foreign"), vec![7u8; 4096]).expect("write");
        let e = IoLimits::join_group(&dir.join("foreign"), None).expect_err("foreign");
        assert!(e.to_string().contains("not a limit group"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn released_queues_are_tracked_per_queue() {
        let limits = IoLimits::new(Spec::none());
        limits.release(&[1, 3], true);
        assert!(limits.is_released(1) && limits.is_released(3));
        assert!(!limits.is_released(0) && !limits.is_released(64));
        limits.release(&[1], false);
        assert!(!limits.is_released(1) && limits.is_released(3));
    }

    #[test]
    fn the_timer_fires_at_the_instant_it_was_armed_for() {
        let mut timer = WakeTimer::new().expect("timerfd");
        let start = throttle::now();
        timer.arm(start + 20_000_000).expect("arm");
        // Arming later does not postpone it.
        timer.arm(start + 500_000_000).expect("arm");
        let mut pfd = libc::pollfd {
            fd: timer.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        let waited = throttle::now() - start;
        assert_eq!(n, 1);
        assert!((20_000_000..400_000_000).contains(&waited), "{waited} ns");
        timer.fired();
        // Consumed: not readable any more, and reading again does not block.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
        timer.fired();
    }
}
