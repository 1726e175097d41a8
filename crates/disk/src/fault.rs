//! Fault injection for the fault tests (feature `fault-injection`): I/O that touches a chosen
//! range of sectors fails with `EIO`, at submission, in both engines and in the synchronous
//! image operations, so that error completions can be driven through the backend's deferred path.
//!
//! The range is set at open from `DISK_FAIL_SECTORS=START-END` (512-byte sectors, end
//! exclusive) or at any time with `Image::set_fail_sectors`.
//!
//! `DISK_OFFLOAD_READ_DELAY_MS=N` makes every read run off the queue thread (the io_uring
//! engine's offload worker) wait `N` ms before it starts, so that a test can hold reads in
//! flight while it stops the device.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use log::warn;

use crate::SECTOR_SIZE;

/// The environment variable read at open.
pub(crate) const ENV: &str = "DISK_FAIL_SECTORS";

/// The environment variable read at open for the delay of offloaded reads, in milliseconds.
pub(crate) const READ_DELAY_ENV: &str = "DISK_OFFLOAD_READ_DELAY_MS";

/// A range of failing sectors; empty (`start >= end`) means none. And the delay of offloaded
/// reads (0: none).
#[derive(Debug, Default)]
pub(crate) struct FaultInjector {
    start: AtomicU64,
    end: AtomicU64,
    read_delay_ms: u64,
}

impl FaultInjector {
    /// The range of [`ENV`], if set and valid.
    pub(crate) fn from_env() -> Self {
        let mut faults = FaultInjector::default();
        if let Ok(ms) = std::env::var(READ_DELAY_ENV) {
            match ms.trim().parse() {
                Ok(ms) => {
                    warn!("fault injection: offloaded reads wait {ms} ms before they start");
                    faults.read_delay_ms = ms;
                }
                Err(_) => warn!("fault injection: ignoring {READ_DELAY_ENV}={ms:?} (expected ms)"),
            }
        }
        if let Ok(spec) = std::env::var(ENV) {
            match parse(&spec) {
                Some(range) => {
                    warn!("fault injection: sectors {range:?} fail with EIO");
                    faults.set(Some(range));
                }
                None => warn!("fault injection: ignoring {ENV}={spec:?} (expected START-END)"),
            }
        }
        faults
    }

    /// Fail sectors `range`, or nothing with `None`.
    pub(crate) fn set(&self, range: Option<Range<u64>>) {
        let range = range.unwrap_or(0..0);
        // Empty first, so that a reader never sees the new start with the old end.
        self.end.store(0, Ordering::Relaxed);
        self.start.store(range.start, Ordering::Relaxed);
        self.end.store(range.end, Ordering::Release);
    }

    /// How long an offloaded read waits before it starts, if at all.
    pub(crate) fn read_delay(&self) -> Option<Duration> {
        (self.read_delay_ms > 0).then(|| Duration::from_millis(self.read_delay_ms))
    }

    /// Whether `[offset, offset + len)` (bytes) touches a failing sector.
    pub(crate) fn hits(&self, offset: u64, len: u64) -> bool {
        let end = self.end.load(Ordering::Acquire);
        let start = self.start.load(Ordering::Relaxed);
        if start >= end {
            return false;
        }
        let first = offset / SECTOR_SIZE;
        let last = offset.saturating_add(len.max(1)).div_ceil(SECTOR_SIZE);
        first < end && last > start
    }
}

fn parse(spec: &str) -> Option<Range<u64>> {
    let (a, b) = spec.trim().split_once('-')?;
    Some(a.trim().parse().ok()?..b.trim().parse().ok()?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{new_engine, EngineKind, Image, ImageOptions, IoBuffers, Op};

    #[test]
    fn hits_only_overlapping_sectors() {
        let f = FaultInjector::default();
        assert!(!f.hits(0, 1 << 20));
        f.set(Some(8..16));
        assert!(!f.hits(0, 4096));
        assert!(f.hits(0, 4097));
        assert!(f.hits(15 * 512, 512));
        assert!(!f.hits(16 * 512, 512));
        f.set(None);
        assert!(!f.hits(8 * 512, 512));
        assert_eq!(parse("3-9"), Some(3..9));
        assert_eq!(parse("x"), None);
    }

    #[test]
    fn injected_failure_is_eio_and_the_engine_keeps_serving() {
        for kind in [EngineKind::IoUring, EngineKind::Sync] {
            let image = Arc::new(Image::open(&ImageOptions::new("null:1M")).unwrap());
            image.set_fail_sectors(Some(0..1));
            let mut engine = new_engine(kind, Arc::clone(&image), 4).unwrap();
            let read = |offset| {
                let mut buf = vec![0u8; 512];
                let iov = vec![libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: the iovec covers the heap bytes of `buf`, which the guard owns.
                let bufs = unsafe { IoBuffers::new(iov, Some(Arc::new(buf))) };
                Op::Read { offset, bufs }
            };
            engine.submit(read(0), 1).unwrap();
            engine.submit(read(512), 2).unwrap();
            engine.commit().unwrap();
            let mut done = Vec::new();
            engine.reap(&mut |c| done.push(c)).unwrap();
            done.sort_by_key(|c| c.user_data);
            let err = done[0].result.as_ref().unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{kind}");
            assert_eq!(done[1].result.as_ref().unwrap(), &512, "{kind}");
            assert!(
                done.iter().all(|c| c.bufs.is_some()),
                "{kind}: failed or not"
            );
            assert!(image.discard(0, 512).is_err());
        }
    }
}
