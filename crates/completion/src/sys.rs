//! The system calls of the deferred worker that `vmm-sys-util` does not wrap the way it needs
//! them: a non-blocking timerfd armed from any thread through `&self` (the batching delay), and
//! CPU affinity of the calling thread (`sched_setaffinity(0, ..)`).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::{Error, Result};

/// A one-shot `CLOCK_MONOTONIC` timerfd, non-blocking, armed through `&self`.
#[derive(Debug)]
pub(crate) struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain system call with constant arguments; it returns a new fd or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by timerfd_create, is valid, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Arms the timer to expire once, `after` from now (a zero delay fires at once rather than
    /// disarming, which is what a zero `it_value` would mean to the kernel).
    pub(crate) fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `self.fd` is a valid timerfd; `spec` is a valid itimerspec that outlives the
        // call, and the old value pointer may be null.
        let ret =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry, if any (never blocks).
    pub(crate) fn clear(&self) {
        let mut ticks = 0u64;
        // SAFETY: reads at most 8 bytes into `ticks`, which is 8 bytes and lives across the call;
        // the fd is non-blocking, so EAGAIN (nothing expired) is the only expected failure.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut ticks as *mut u64).cast(),
                mem::size_of::<u64>(),
            )
        };
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Largest CPU number a `cpu_set_t` holds, plus one.
const CPU_SETSIZE: usize = libc::CPU_SETSIZE as usize;

/// Checks a CPU list before it reaches the worker: not empty, every CPU within `cpu_set_t`.
pub(crate) fn validate_cpus(cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        return Err(Error::NoCpus);
    }
    if let Some(&cpu) = cpus.iter().find(|&&cpu| cpu >= CPU_SETSIZE) {
        return Err(Error::CpuOutOfRange {
            cpu,
            max: CPU_SETSIZE - 1,
        });
    }
    Ok(())
}

/// The calling thread's CPU affinity.
#[cfg(all(test, not(loom)))]
pub(crate) fn current_affinity() -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array for which all zeroes is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

/// The CPUs in `set`, ascending.
#[cfg(all(test, not(loom)))]
pub(crate) fn cpus_of(set: &libc::cpu_set_t) -> Vec<usize> {
    // SAFETY: CPU_ISSET only reads the bit array; every index is below CPU_SETSIZE.
    (0..CPU_SETSIZE)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) })
        .collect()
}

/// Restricts the calling thread to `cpus` (checked by [`validate_cpus`]).
pub(crate) fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    validate_cpus(cpus)?;
    // SAFETY: all zeroes is a valid, empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` < CPU_SETSIZE (validated above), so the bit is inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set_current_affinity(&set).map_err(|source| Error::Affinity {
        cpus: cpus.to_vec(),
        source,
    })
}

/// Lets the calling thread run on every CPU (the kernel intersects the set with what the
/// thread's cpuset allows).
pub(crate) fn unpin_current_thread() -> io::Result<()> {
    // SAFETY: all zeroes is a valid, empty cpu_set_t.
    let mut all: libc::cpu_set_t = unsafe { mem::zeroed() };
    for cpu in 0..CPU_SETSIZE {
        // SAFETY: `cpu` < CPU_SETSIZE, so the bit is inside `all`.
        unsafe { libc::CPU_SET(cpu, &mut all) };
    }
    set_current_affinity(&all)
}

/// Sets the calling thread's affinity to `set`.
pub(crate) fn set_current_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), set) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Instant;

    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
    }

    #[test]
    fn timer_fires_once_after_its_delay_and_clears() {
        let timer = Timer::new().expect("timerfd");
        let start = Instant::now();
        timer.arm(Duration::from_millis(10)).expect("arm");
        assert!(!readable(timer.as_raw_fd(), 0));
        assert!(readable(timer.as_raw_fd(), 1000));
        assert!(start.elapsed() >= Duration::from_millis(10));
        timer.clear();
        assert!(!readable(timer.as_raw_fd(), 20));
        timer.clear(); // nothing expired: does not block
    }

    #[test]
    fn zero_delay_fires_at_once() {
        let timer = Timer::new().expect("timerfd");
        timer.arm(Duration::ZERO).expect("arm");
        assert!(readable(timer.as_raw_fd(), 1000));
    }

    #[test]
    fn cpu_lists_are_checked() {
        assert!(matches!(validate_cpus(&[]), Err(Error::NoCpus)));
        assert!(matches!(
            validate_cpus(&[0, CPU_SETSIZE]),
            Err(Error::CpuOutOfRange { .. })
        ));
        assert!(validate_cpus(&[0]).is_ok());
    }

    #[test]
    fn pin_and_restore_in_a_thread() {
        std::thread::spawn(|| {
            let before = current_affinity().expect("getaffinity");
            pin_current_thread(&[0]).expect("pin to cpu 0");
            assert_eq!(cpus_of(&current_affinity().expect("getaffinity")), vec![0]);
            set_current_affinity(&before).expect("restore");
            assert_eq!(
                cpus_of(&current_affinity().expect("getaffinity")),
                cpus_of(&before)
            );
        })
        .join()
        .expect("thread");
    }
}
