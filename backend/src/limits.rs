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

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use throttle::{Buckets, Spec, SpecError};

/// The process's limits: the buckets every connection's queue threads share, and which queues
/// let their waiting requests go without tokens.
#[derive(Debug)]
pub struct IoLimits {
    buckets: Arc<Buckets>,
    /// Bit `q`: queue `q`'s vCPU is unplugged, its waiting requests go at once.
    released: AtomicU64,
}

impl IoLimits {
    /// Limits enforcing `spec` (possibly none).
    pub fn new(spec: Spec) -> Self {
        Self {
            buckets: Arc::new(Buckets::new(spec)),
            released: AtomicU64::new(0),
        }
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
