//! Host CPU lists and thread affinity.
//!
//! A CPU list is written the way Linux writes one (`/sys/.../cpu_list`, `taskset -c`,
//! `cpuset.cpus`): comma-separated CPU numbers and inclusive ranges, `"2-3,5"`. Queue threads and
//! their deferred workers pin themselves with [`set_current_thread_affinity`] to the CPU set of
//! their vCPU, which comes from the vCPU thread's own affinity ([`thread_affinity`] of the
//! `thread-id` QEMU reports) or from `--cpu-affinity`.

use std::io;
use std::mem;

use crate::{Error, Result};

/// Host CPU numbers, sorted and deduplicated.
pub type CpuList = Vec<usize>;

/// How many CPUs a `cpu_set_t` holds (`CPU_SETSIZE`): CPU numbers go up to `MAX_CPUS - 1`.
pub const MAX_CPUS: usize = 1024;

const WORD_BITS: usize = libc::c_ulong::BITS as usize;

/// A `cpu_set_t`-shaped bit mask: the kernel's layout of `unsigned long` words, CPU `n` at bit
/// `n % WORD_BITS` of word `n / WORD_BITS`.
type CpuMask = [libc::c_ulong; MAX_CPUS / WORD_BITS];

// The mask is passed where the C library expects a `cpu_set_t`.
const _: () = assert!(mem::size_of::<CpuMask>() == mem::size_of::<libc::cpu_set_t>());

/// Parses a CPU list such as `"2-3,5"` into sorted, deduplicated CPU numbers.
///
/// Whitespace around entries and a trailing newline (as sysfs prints) are accepted. Errors on an
/// empty list, an empty entry, a reversed range (`"3-2"`), anything not a number, and CPUs
/// beyond [`MAX_CPUS`]` - 1`.
pub fn parse_cpu_list(s: &str) -> Result<CpuList> {
    let error = |reason: String| Error::CpuList {
        input: s.to_string(),
        reason,
    };
    let text = s.trim();
    if text.is_empty() {
        return Err(error("empty".into()));
    }
    let cpu = |part: &str| -> Result<usize> {
        let part = part.trim();
        let cpu = part
            .parse::<usize>()
            .map_err(|_| error(format!("{part:?} is not a CPU number")))?;
        if cpu >= MAX_CPUS {
            return Err(error(format!("CPU {cpu} is beyond {}", MAX_CPUS - 1)));
        }
        Ok(cpu)
    };
    let mut cpus = CpuList::new();
    for entry in text.split(',') {
        if entry.trim().is_empty() {
            return Err(error("empty entry".into()));
        }
        match entry.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (cpu(first)?, cpu(last)?);
                if first > last {
                    return Err(error(format!("reversed range {first}-{last}")));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(cpu(entry)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats CPU numbers as a CPU list, runs of consecutive CPUs as ranges: `[2, 3, 5]` →
/// `"2-3,5"`. The input need not be sorted; duplicates are dropped. An empty slice gives `""`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let first = sorted[i];
        let mut last = first;
        while i + 1 < sorted.len() && sorted[i + 1] == last + 1 {
            i += 1;
            last = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if first == last {
            out.push_str(&first.to_string());
        } else {
            out.push_str(&format!("{first}-{last}"));
        }
        i += 1;
    }
    out
}

fn to_mask(cpus: &[usize]) -> Result<CpuMask> {
    if cpus.is_empty() {
        return Err(Error::EmptyCpuSet);
    }
    let mut mask: CpuMask = [0; MAX_CPUS / WORD_BITS];
    for &cpu in cpus {
        if cpu >= MAX_CPUS {
            return Err(Error::CpuOutOfRange { cpu, max: MAX_CPUS });
        }
        mask[cpu / WORD_BITS] |= 1 << (cpu % WORD_BITS);
    }
    Ok(mask)
}

fn from_mask(mask: &CpuMask) -> CpuList {
    (0..MAX_CPUS)
        .filter(|&cpu| mask[cpu / WORD_BITS] & (1 << (cpu % WORD_BITS)) != 0)
        .collect()
}

/// Pins the calling thread to `cpus` (`sched_setaffinity(0, ..)`).
///
/// Errors on an empty list, a CPU beyond [`MAX_CPUS`], and whatever the kernel refuses (`EINVAL`
/// when none of the CPUs is online or allowed by the thread's cpuset).
pub fn set_current_thread_affinity(cpus: &[usize]) -> Result<()> {
    let mask = to_mask(cpus)?;
    // SAFETY: `mask` is a live, initialized buffer of exactly `size_of::<cpu_set_t>()` bytes with
    // the kernel's cpu mask layout; the kernel only reads it. Pid 0 is the calling thread.
    let ret = unsafe {
        libc::sched_setaffinity(
            0,
            mem::size_of::<CpuMask>(),
            mask.as_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if ret != 0 {
        return Err(Error::SetAffinity {
            cpus: format_cpu_list(cpus),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The CPUs thread `tid` may run on (`sched_getaffinity(tid, ..)`); `tid` 0 is the calling thread.
///
/// `tid` is a host thread id, such as the `thread-id` of a vCPU in QEMU's `query-cpus-fast`: it
/// names the right thread only if QEMU runs in this process's pid namespace.
pub fn thread_affinity(tid: i32) -> Result<CpuList> {
    let mut mask: CpuMask = [0; MAX_CPUS / WORD_BITS];
    // SAFETY: `mask` is a live buffer of exactly `size_of::<cpu_set_t>()` bytes that the kernel
    // fills (the C library zeroes whatever the kernel does not write); nothing else aliases it.
    let ret = unsafe {
        libc::sched_getaffinity(
            tid,
            mem::size_of::<CpuMask>(),
            mask.as_mut_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if ret != 0 {
        return Err(Error::GetAffinity {
            tid,
            source: io::Error::last_os_error(),
        });
    }
    Ok(from_mask(&mask))
}

/// The CPUs the calling thread may run on.
pub fn current_thread_affinity() -> Result<CpuList> {
    thread_affinity(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_single_cpus_ranges_and_mixes() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("2-3,5").unwrap(), vec![2, 3, 5]);
        assert_eq!(parse_cpu_list("5,2-3").unwrap(), vec![2, 3, 5]);
        assert_eq!(parse_cpu_list("1-3,2-4,4").unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(parse_cpu_list("7-7").unwrap(), vec![7]);
        assert_eq!(parse_cpu_list(" 0-1 , 3\n").unwrap(), vec![0, 1, 3]);
        assert_eq!(parse_cpu_list("1023").unwrap(), vec![1023]);
    }

    #[test]
    fn parse_rejects_empty_reversed_garbage_and_too_large() {
        for bad in [
            "",
            " ",
            "\n",
            ",",
            "1,",
            ",1",
            "1,,2",
            "3-2",
            "a",
            "1-",
            "-1",
            "1-2-3",
            "1.5",
            "0x3",
            "1 2",
            "1024",
            "0-1024",
            "99999999999999999999999",
        ] {
            let err = parse_cpu_list(bad).expect_err(bad);
            assert!(matches!(err, Error::CpuList { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn format_uses_ranges_for_runs() {
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(format_cpu_list(&[4]), "4");
        assert_eq!(format_cpu_list(&[2, 3, 5]), "2-3,5");
        assert_eq!(format_cpu_list(&[5, 3, 2, 3]), "2-3,5");
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn parse_and_format_round_trip() {
        for text in ["0", "2-3,5", "0-3,8,10-11", "1,3,5,7", "0-1023"] {
            let cpus = parse_cpu_list(text).unwrap();
            assert_eq!(format_cpu_list(&cpus), text);
            assert_eq!(parse_cpu_list(&format_cpu_list(&cpus)).unwrap(), cpus);
        }
    }

    #[test]
    fn mask_round_trip_covers_word_boundaries() {
        let cpus = vec![0, 1, 31, 32, 63, 64, 65, 511, 1023];
        assert_eq!(from_mask(&to_mask(&cpus).unwrap()), cpus);
        assert!(matches!(to_mask(&[]), Err(Error::EmptyCpuSet)));
        assert!(matches!(
            to_mask(&[1024]),
            Err(Error::CpuOutOfRange { cpu: 1024, .. })
        ));
    }

    #[test]
    fn pin_current_thread_and_read_it_back() {
        // On a thread of its own, so that nothing else runs under the changed mask; the mask is
        // restored before the thread ends anyway.
        std::thread::spawn(|| {
            let original = current_thread_affinity().unwrap();
            assert!(!original.is_empty());
            let one = vec![original[original.len() - 1]];
            set_current_thread_affinity(&one).unwrap();
            assert_eq!(current_thread_affinity().unwrap(), one);
            assert_eq!(thread_affinity(0).unwrap(), one);
            set_current_thread_affinity(&original).unwrap();
            assert_eq!(current_thread_affinity().unwrap(), original);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn affinity_of_another_thread_by_tid() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let cpus = current_thread_affinity().unwrap();
            let one = vec![cpus[0]];
            set_current_thread_affinity(&one).unwrap();
            // SAFETY: gettid takes no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            tx.send((tid, one)).unwrap();
            done_rx.recv().unwrap();
        });
        let (tid, one) = rx.recv().unwrap();
        assert_eq!(thread_affinity(tid).unwrap(), one);
        done_tx.send(()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn pinning_errors() {
        assert!(matches!(
            set_current_thread_affinity(&[]),
            Err(Error::EmptyCpuSet)
        ));
        assert!(matches!(
            set_current_thread_affinity(&[MAX_CPUS]),
            Err(Error::CpuOutOfRange { .. })
        ));
        // No thread has id -1... the kernel says ESRCH or EINVAL; either way an error with context.
        assert!(matches!(
            thread_affinity(-1),
            Err(Error::GetAffinity { tid: -1, .. })
        ));
    }
}
