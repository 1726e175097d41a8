//! Per-queue counters, written by each queue's own thread and read by the control socket.
//!
//! Every counter is a relaxed atomic owned by exactly one writer (the queue thread that serves the
//! queue), so the fast path pays an uncontended add and never takes a lock. The counters outlive a
//! connection: a VMM that reconnects keeps adding to the same totals, which is what an operator
//! reading `stats` after a VM reboot expects. The deferred workers' batch figures are reported
//! beside them ([`DeferredSnapshot`]); the workers themselves are found in `workers.rs`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one virtqueue.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueStats {
    /// Requests completed (any type, any status).
    pub requests: AtomicU64,
    /// `IN` requests completed.
    pub reads: AtomicU64,
    /// `OUT` requests completed.
    pub writes: AtomicU64,
    /// `FLUSH` requests completed.
    pub flushes: AtomicU64,
    /// `DISCARD` requests completed.
    pub discards: AtomicU64,
    /// `WRITE_ZEROES` requests completed.
    pub write_zeroes: AtomicU64,
    /// `GET_ID` requests completed.
    pub get_ids: AtomicU64,
    /// Requests completed with a status other than `OK` (malformed, unsupported, I/O errors).
    pub errors: AtomicU64,
    /// Completions that went through the deferred worker.
    pub deferred: AtomicU64,
    /// Chains returned without a status because they had no usable status byte.
    pub dropped: AtomicU64,
    /// Bytes read from the image for the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written to the image for the guest.
    pub bytes_written: AtomicU64,
    /// Requests submitted to the engine and not yet completed.
    pub in_flight: AtomicU64,
    /// Used-buffer notifications sent to the guest.
    pub signals: AtomicU64,
    /// Busy-poll sessions of the queue's thread (`--poll-us`); a window of nothing counts none.
    pub polls: AtomicU64,
    /// Of those, sessions that found a chain or a finished request to serve.
    pub poll_hits: AtomicU64,
    /// Requests that waited for tokens of the I/O limits (`--limit`).
    pub throttled: AtomicU64,
    /// Requests waiting for tokens now (counted in `in_flight` too).
    pub throttle_waiting: AtomicU64,
    /// Time those requests spent waiting for tokens, in microseconds.
    pub throttle_wait_us: AtomicU64,
    /// The queue thread's adaptive poll window now, in nanoseconds (0: it sleeps at once).
    pub poll_window_ns: AtomicU64,
    /// Reads and writes the engine ran over registered guest memory (`--fixed-buffers`).
    pub fixed_buffer_ios: AtomicU64,
}

impl QueueStats {
    /// Adds `n` to `counter`; the only writer is the queue's own thread.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` from `counter`; the only writer is the queue's own thread.
    #[inline]
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Release);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self, index: usize) -> QueueStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueStatsSnapshot {
            index,
            requests: get(&self.requests),
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            get_ids: get(&self.get_ids),
            errors: get(&self.errors),
            dropped: get(&self.dropped),
            deferred: get(&self.deferred),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            in_flight: get(&self.in_flight),
            signals: get(&self.signals),
            polls: get(&self.polls),
            poll_hits: get(&self.poll_hits),
            throttled: get(&self.throttled),
            throttle_waiting: get(&self.throttle_waiting),
            throttle_wait_us: get(&self.throttle_wait_us),
            poll_window_ns: get(&self.poll_window_ns),
            fixed_buffer_ios: get(&self.fixed_buffer_ios),
        }
    }
}

/// A copy of one queue's counters, as the control socket reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    /// Queue index.
    pub index: usize,
    /// Requests completed.
    pub requests: u64,
    /// `IN` requests completed.
    pub reads: u64,
    /// `OUT` requests completed.
    pub writes: u64,
    /// `FLUSH` requests completed.
    pub flushes: u64,
    /// `DISCARD` requests completed.
    pub discards: u64,
    /// `WRITE_ZEROES` requests completed.
    pub write_zeroes: u64,
    /// `GET_ID` requests completed.
    pub get_ids: u64,
    /// Requests completed with an error status.
    pub errors: u64,
    /// Chains returned without a status byte.
    pub dropped: u64,
    /// Completions that went through the deferred worker.
    pub deferred: u64,
    /// Bytes read for the guest.
    pub bytes_read: u64,
    /// Bytes written for the guest.
    pub bytes_written: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Used-buffer notifications sent.
    pub signals: u64,
    /// Busy-poll sessions (`--poll-us`).
    pub polls: u64,
    /// Busy-poll sessions that found work.
    pub poll_hits: u64,
    /// Requests that waited for tokens of the I/O limits.
    pub throttled: u64,
    /// Requests waiting for tokens now.
    pub throttle_waiting: u64,
    /// Time requests spent waiting for tokens, in microseconds.
    pub throttle_wait_us: u64,
    /// The adaptive poll window now, in nanoseconds (0: the thread sleeps at once).
    pub poll_window_ns: u64,
    /// Reads and writes run over registered guest memory (`--fixed-buffers`).
    pub fixed_buffer_ios: u64,
}

/// The deferred worker's batch statistics for one queue, as the control socket reports them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeferredSnapshot {
    /// Whether the worker may run (false between a vCPU unplug's disable and the re-enable).
    pub enabled: bool,
    /// Completions pushed at submission (the static form).
    pub pushed: u64,
    /// Completions deferred late by `complete_in_task` (the dynamic form).
    pub deferred_in_task: u64,
    /// Batches the worker completed.
    pub batches: u64,
    /// Mean batch size.
    pub mean_batch: f64,
    /// Largest batch.
    pub max_batch: u64,
    /// Times a pass ran past its budget and re-armed at once.
    pub rearms: u64,
    /// Synchronous drains that completed something (unplug, GET_VRING_BASE).
    pub drains: u64,
    /// Completions those drains completed.
    pub drained: u64,
    /// Waiting in the batch now.
    pub pending: u64,
    /// Push-to-completion latency, median, in microseconds.
    pub latency_p50_us: u64,
    /// Push-to-completion latency, 99th percentile, in microseconds.
    pub latency_p99_us: u64,
}

impl From<completion::Stats> for DeferredSnapshot {
    fn from(s: completion::Stats) -> Self {
        Self {
            enabled: s.enabled,
            pushed: s.pushed,
            deferred_in_task: s.deferred_in_task,
            batches: s.batches,
            mean_batch: s.mean_batch,
            max_batch: s.max_batch,
            rearms: s.rearms,
            drains: s.drains,
            drained: s.drained,
            pending: s.pending,
            latency_p50_us: s.latency_p50.as_micros() as u64,
            latency_p99_us: s.latency_p99.as_micros() as u64,
        }
    }
}

/// Counters of every queue of the device.
#[derive(Debug)]
pub struct DeviceStats {
    queues: Vec<QueueStats>,
}

impl DeviceStats {
    /// Counters for `num_queues` queues, all zero.
    pub fn new(num_queues: usize) -> Self {
        Self {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
        }
    }

    /// The counters of queue `index`.
    ///
    /// # Panics
    /// Never for an index below the device's queue count, which is all the backend asks for.
    pub fn queue(&self, index: usize) -> &QueueStats {
        &self.queues[index]
    }

    /// Number of queues counted.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Requests in flight on every queue together.
    pub fn in_flight(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| q.in_flight.load(Ordering::Acquire))
            .sum()
    }

    /// A copy of every queue's counters.
    pub fn snapshot(&self) -> Vec<QueueStatsSnapshot> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.snapshot(i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reports_each_queue_separately() {
        let stats = DeviceStats::new(2);
        QueueStats::add(&stats.queue(1).reads, 3);
        QueueStats::add(&stats.queue(1).in_flight, 2);
        let snap = stats.snapshot();
        assert_eq!(snap[0].reads, 0);
        assert_eq!(snap[1].reads, 3);
        assert_eq!(snap[1].index, 1);
        assert_eq!(stats.in_flight(), 2);
    }
}
