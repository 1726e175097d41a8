//! Counters of the deferred path: what was pushed, how it was batched, how long an item waited
//! from its push to the end of the pass that completed it. Recorded by whoever ran the pass (the
//! worker or `drain()`), once per pass, into fixed-size storage: nothing is allocated per item.

use std::time::Duration;

/// A snapshot of one [`DeferredCompletions`](crate::DeferredCompletions)' counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Items pushed (statically with `push`, or deferred by `complete_in_task`).
    pub pushed: u64,
    /// Of those, items deferred by `complete_in_task` (the dynamic form).
    pub deferred_in_task: u64,
    /// Batches the deferred worker completed (handler calls on the worker thread).
    pub batches: u64,
    /// Items the deferred worker completed.
    pub completed: u64,
    /// Largest batch the worker completed.
    pub max_batch: u64,
    /// Mean size of the worker's batches (`completed / batches`), 0 before the first.
    pub mean_batch: f64,
    /// Times a worker pass ran past its time budget with more waiting and re-armed at once
    /// instead of looping, so that a re-pin or a stop could get in.
    pub rearms: u64,
    /// `drain()` calls that completed at least one item.
    pub drains: u64,
    /// Items completed by `drain()`, on the caller's thread.
    pub drained: u64,
    /// Median time from push to the end of the pass that completed the item (worker or drain),
    /// to the resolution of the histogram (about 1 part in 8).
    pub latency_p50: Duration,
    /// 99th percentile of the same.
    pub latency_p99: Duration,
    /// Items waiting in the batch when the snapshot was taken.
    pub pending: u64,
    /// Whether the worker was enabled when the snapshot was taken.
    pub enabled: bool,
}

/// Sub-buckets per power of two: 2^3, so a bucket spans at most 1/8 of its lower bound.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Bucket count: exact below `SUB` microseconds, then `SUB` per octave up to 2^40 µs (12 days).
const BUCKETS: usize = (SUB + (40 - SUB_BITS as u64) * SUB) as usize;

/// A log-linear histogram of microseconds in fixed storage.
#[derive(Clone, Debug)]
pub(crate) struct Histogram {
    counts: [u64; BUCKETS],
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        let octave = 63 - u64::from(us.leading_zeros()); // >= SUB_BITS
        let sub = (us >> (octave - u64::from(SUB_BITS))) & (SUB - 1);
        let idx = SUB + (octave - u64::from(SUB_BITS)) * SUB + sub;
        (idx as usize).min(BUCKETS - 1)
    }

    /// Largest value that falls in bucket `idx`.
    fn upper(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < SUB {
            return idx;
        }
        let octave = (idx - SUB) / SUB + u64::from(SUB_BITS);
        let sub = (idx - SUB) % SUB;
        let width = 1u64 << (octave - u64::from(SUB_BITS));
        ((SUB + sub) << (octave - u64::from(SUB_BITS))) + width - 1
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[Self::index(us)] += 1;
        self.total += 1;
    }

    /// The value at quantile `q` (0..=1), as its bucket's upper bound; zero when empty.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (idx, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_micros(Self::upper(idx));
            }
        }
        Duration::from_micros(Self::upper(BUCKETS - 1))
    }
}

/// The pass-side counters, behind the deferred completion's stats mutex.
#[derive(Clone, Debug, Default)]
pub(crate) struct Recorder {
    pub(crate) deferred_in_task: u64,
    pub(crate) batches: u64,
    pub(crate) completed: u64,
    pub(crate) max_batch: u64,
    pub(crate) rearms: u64,
    pub(crate) drains: u64,
    pub(crate) drained: u64,
    pub(crate) latency: Histogram,
}

impl Recorder {
    /// A snapshot, with the batch-side figures filled in by the caller.
    pub(crate) fn snapshot(&self, pushed: u64, pending: u64, enabled: bool) -> Stats {
        Stats {
            pushed,
            deferred_in_task: self.deferred_in_task,
            batches: self.batches,
            completed: self.completed,
            max_batch: self.max_batch,
            mean_batch: if self.batches == 0 {
                0.0
            } else {
                self.completed as f64 / self.batches as f64
            },
            rearms: self.rearms,
            drains: self.drains,
            drained: self.drained,
            latency_p50: self.latency.quantile(0.50),
            latency_p99: self.latency.quantile(0.99),
            pending,
            enabled,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values_in_order() {
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 30, (1 << 40) - 1]) {
            let idx = Histogram::index(us);
            assert!(idx >= last, "index not monotonic at {us}");
            last = idx;
            assert!(Histogram::upper(idx) >= us, "{us} above its bucket");
            if idx > 0 {
                assert!(Histogram::upper(idx - 1) < us, "{us} belongs lower");
            }
        }
    }

    #[test]
    fn bucket_width_is_within_an_eighth() {
        for us in [9u64, 100, 1_000, 12_345, 1_000_000] {
            let up = Histogram::upper(Histogram::index(us));
            assert!(up - us <= us / 8 + 1, "{us} -> {up}");
        }
    }

    #[test]
    fn quantiles_of_a_known_spread() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for _ in 0..98 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(5));
        h.record(Duration::from_millis(5));
        let p50 = h.quantile(0.5);
        assert!(p50 >= Duration::from_micros(100) && p50 <= Duration::from_micros(113));
        let p99 = h.quantile(0.99);
        assert!(p99 >= Duration::from_millis(5) && p99 <= Duration::from_micros(5_700));
    }

    #[test]
    fn huge_latency_lands_in_the_last_bucket() {
        let mut h = Histogram::default();
        h.record(Duration::from_secs(u64::MAX / 4));
        assert!(h.quantile(1.0) > Duration::from_secs(1_000_000));
    }

    #[test]
    fn mean_batch_is_zero_before_the_first() {
        let r = Recorder::default();
        assert_eq!(r.snapshot(0, 0, true).mean_batch, 0.0);
    }
}
