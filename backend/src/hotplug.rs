//! vCPU affinity and hotplug, top to bottom: where each queue thread (and its deferred worker)
//! runs, and the unplug path — disable the departing vCPU's deferred workers (waiting for a
//! running pass), drain their batches on the caller's thread, signal, re-home the queues — so
//! that the requests the departing vCPU submitted complete at once, once, and before its CPU goes
//! offline (the guest's offline waits for them).
//!
//! The queue → vCPU map is the guest's (blk-mq derives it from the MSI-X vectors' managed
//! affinity), so it comes from `--queue-map` or the control socket; without it every queue is
//! pinned nowhere and an unplug drains every queue — correct, only less targeted. A vCPU's host
//! CPUs come from QEMU through QMP (`--qmp`), or from `--cpu-affinity`. A wrong map costs
//! locality, never correctness: a drain completes everything the drained workers hold, whatever
//! queue it belongs to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::info;
use serde::Serialize;
use vcpu::{format_cpu_list, CpuList, QueueMap, VcpuAffinity};

use crate::limits::IoLimits;
use crate::workers::QueueWorkers;

/// Most drain latencies kept per vCPU for the percentiles.
const LATENCY_WINDOW: usize = 1024;

/// What an unplug did, as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    /// The departing vCPU.
    pub vcpu: usize,
    /// The queues whose deferred workers were drained.
    pub queues: Vec<usize>,
    /// Completions the drain completed (and signalled).
    pub drained: usize,
    /// From the unplug event to the last signal, in microseconds.
    pub latency_us: u64,
}

#[derive(Debug, Default)]
struct VcpuRecord {
    online: bool,
    drains: u64,
    drained: u64,
    latencies_us: Vec<u64>,
    last_latency_us: Option<u64>,
}

/// Per-vCPU figures for `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct VcpuSnapshot {
    /// vCPU index.
    pub vcpu: usize,
    /// Whether it is plugged.
    pub online: bool,
    /// Host CPUs its queue threads are pinned to (empty: unknown, unpinned).
    pub cpus: String,
    /// Queues the guest submits from it (per the queue map).
    pub queues: Vec<usize>,
    /// Unplug drains.
    pub drains: u64,
    /// Completions those drains completed.
    pub drained: u64,
    /// Drain latency, median of the recent drains, microseconds.
    pub drain_latency_p50_us: Option<u64>,
    /// Drain latency, 99th percentile of the recent drains, microseconds.
    pub drain_latency_p99_us: Option<u64>,
    /// The last drain's latency, microseconds.
    pub last_drain_latency_us: Option<u64>,
}

#[derive(Debug)]
struct State {
    map: QueueMap,
    affinity: VcpuAffinity,
    vcpus: BTreeMap<usize, VcpuRecord>,
}

/// Process-wide vCPU state; acts on the current connection's queue threads through the handles
/// that [`QueueWorkers`] keeps.
pub struct Hotplug {
    num_queues: usize,
    workers: Arc<QueueWorkers>,
    /// Where unpinned threads run: the process's affinity at start.
    default_cpus: CpuList,
    /// `--defer-delay-us`: the batching delay of queues whose vCPU is online.
    batch_delay: Duration,
    state: Mutex<State>,
    /// The I/O limits, whose waiting requests an unplug lets go at once.
    io_limits: Option<Arc<IoLimits>>,
}

impl Hotplug {
    /// vCPU state with the map and affinities from the command line (either may be empty).
    pub fn new(
        num_queues: usize,
        workers: Arc<QueueWorkers>,
        map: QueueMap,
        affinity: VcpuAffinity,
        batch_delay: Duration,
    ) -> Self {
        let default_cpus = vcpu::current_thread_affinity().unwrap_or_default();
        let mut vcpus = BTreeMap::new();
        for v in map
            .vcpus()
            .into_iter()
            .chain(affinity.iter().map(|(v, _)| v))
        {
            vcpus.entry(v).or_insert_with(|| VcpuRecord {
                online: true,
                ..VcpuRecord::default()
            });
        }
        Self {
            num_queues,
            workers,
            default_cpus,
            batch_delay,
            state: Mutex::new(State {
                map,
                affinity,
                vcpus,
            }),
            io_limits: None,
        }
    }

    /// Let an unplug release the requests of the departing vCPU's queues that wait for tokens
    /// of `io_limits`: the guest's CPU offline waits for them, and a limit must not hold it up.
    pub fn with_io_limits(mut self, io_limits: Arc<IoLimits>) -> Self {
        self.io_limits = Some(io_limits);
        self
    }

    /// Replace the queue map (the guest's, read from its sysfs) and re-pin.
    pub fn set_queue_map(&self, map: QueueMap) {
        {
            let mut state = self.lock();
            info!("queue map is now '{map}'");
            for v in map.vcpus() {
                state.vcpus.entry(v).or_insert_with(|| VcpuRecord {
                    online: true,
                    ..VcpuRecord::default()
                });
            }
            state.map = map;
        }
        self.apply_pinning();
    }

    /// vCPU `vcpu` runs on `cpus` (from QMP or the control socket): re-pin its queue threads.
    pub fn set_affinity(&self, vcpu: usize, cpus: CpuList) {
        {
            let mut state = self.lock();
            if state.affinity.get(vcpu) == Some(&cpus) {
                return;
            }
            info!("vCPU {vcpu} runs on host CPUs {}", format_cpu_list(&cpus));
            state.affinity.set(vcpu, cpus);
            state.vcpus.entry(vcpu).or_insert_with(|| VcpuRecord {
                online: true,
                ..VcpuRecord::default()
            });
        }
        self.apply_pinning();
    }

    /// vCPU `vcpu` is being unplugged: (1) disable the deferred workers of its queues, waiting
    /// for a running pass; (2) drain their batches here, completing everything; (3) the drain
    /// signals the used buffers; (4) re-home the queues onto a surviving vCPU's CPUs and
    /// re-enable. Without a queue map, every queue is drained.
    pub fn unplug(&self, vcpu: usize) -> DrainReport {
        let start = Instant::now();
        let queues = {
            let state = self.lock();
            let mapped = state.map.queues_of(vcpu);
            if state.map.is_empty() {
                (0..self.num_queues).collect()
            } else {
                mapped
            }
        };
        let mut workers = Vec::new();
        for &q in &queues {
            if let Some(w) = self.workers.deferred(q) {
                if !workers.iter().any(|x| Arc::ptr_eq(x, &w)) {
                    workers.push(w);
                }
            }
        }
        if let Some(limits) = &self.io_limits {
            limits.release(&queues, true);
        }
        for w in &workers {
            w.disable();
        }
        let drained: usize = workers.iter().map(|w| w.drain()).sum();
        let latency = start.elapsed();
        {
            let mut state = self.lock();
            let record = state.vcpus.entry(vcpu).or_default();
            record.online = false;
            record.drains += 1;
            record.drained += drained as u64;
            let us = duration_us(latency);
            if record.latencies_us.len() == LATENCY_WINDOW {
                record.latencies_us.remove(0);
            }
            record.latencies_us.push(us);
            record.last_latency_us = Some(us);
        }
        // Re-home, then let the workers run again from their new CPUs.
        self.apply_pinning();
        for w in &workers {
            w.enable();
        }
        let report = DrainReport {
            vcpu,
            queues,
            drained,
            latency_us: duration_us(latency),
        };
        info!(
            "vCPU {vcpu} unplugged: drained {} completion(s) of queue(s) {:?} in {} us",
            report.drained, report.queues, report.latency_us
        );
        report
    }

    /// vCPU `vcpu` is back: re-home its queues to it and re-pin.
    pub fn plug(&self, vcpu: usize) {
        let back: Vec<usize> = {
            let mut state = self.lock();
            state.vcpus.entry(vcpu).or_default().online = true;
            // Without a map every queue was released; only once no vCPU is away do they wait
            // for tokens again.
            (0..self.num_queues)
                .filter(|&q| !Self::vcpu_away(&state, q))
                .collect()
        };
        if let Some(limits) = &self.io_limits {
            limits.release(&back, false);
        }
        info!("vCPU {vcpu} plugged");
        self.apply_pinning();
    }

    /// Place every queue thread and deferred worker of the current connection where its queue's
    /// vCPU runs: its own vCPU's CPUs while online, a surviving vCPU's after an unplug, the
    /// process's CPUs without a map or an affinity. A queue whose vCPU is going away (or, without
    /// a map, any queue while some vCPU is away) stops batching: between QEMU's eject request
    /// and the CPU offline the guest still submits from that vCPU, and its offline waits for
    /// those requests too, so they must not wait out a batch delay.
    pub fn apply_pinning(&self) {
        let state = self.lock();
        for q in 0..self.num_queues {
            let cpus = self.cpus_for_queue(&state, q);
            if let Some(pin) = self.workers.pin(q) {
                pin.request(cpus.clone());
            }
            if let Some(deferred) = self.workers.deferred(q) {
                deferred.set_cpus(Some(cpus));
                deferred.set_delay(if Self::vcpu_away(&state, q) {
                    Duration::ZERO
                } else {
                    self.batch_delay
                });
            }
        }
    }

    /// Whether the vCPU that submits to `queue` is unplugged (any vCPU, without a map).
    fn vcpu_away(state: &State, queue: usize) -> bool {
        let offline = |v: usize| state.vcpus.get(&v).is_some_and(|r| !r.online);
        if state.map.is_empty() {
            state.vcpus.keys().any(|&v| offline(v))
        } else {
            state.map.vcpu_of(queue).is_some_and(offline)
        }
    }

    fn cpus_for_queue(&self, state: &State, queue: usize) -> CpuList {
        let online = |v: &usize| state.vcpus.get(v).is_none_or(|r| r.online);
        let home = state.map.vcpu_of(queue).filter(online).or_else(|| {
            // Its vCPU is gone: the lowest-numbered surviving vCPU of the map takes the queue.
            state.map.vcpu_of(queue)?;
            state.map.vcpus().into_iter().find(online)
        });
        home.and_then(|v| state.affinity.get(v).cloned())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| self.default_cpus.clone())
    }

    /// Per-vCPU figures.
    pub fn snapshot(&self) -> Vec<VcpuSnapshot> {
        let state = self.lock();
        let vcpus: BTreeSet<usize> = state.vcpus.keys().copied().collect();
        vcpus
            .into_iter()
            .map(|v| {
                let r = &state.vcpus[&v];
                let mut sorted = r.latencies_us.clone();
                sorted.sort_unstable();
                let pct =
                    |p: usize| (!sorted.is_empty()).then(|| sorted[(sorted.len() - 1) * p / 100]);
                let queues = state.map.queues_of(v);
                let cpus = queues
                    .first()
                    .map(|&q| self.cpus_for_queue(&state, q))
                    .or_else(|| state.affinity.get(v).cloned())
                    .unwrap_or_default();
                VcpuSnapshot {
                    vcpu: v,
                    online: r.online,
                    cpus: format_cpu_list(&cpus),
                    queues,
                    drains: r.drains,
                    drained: r.drained,
                    drain_latency_p50_us: pct(50),
                    drain_latency_p99_us: pct(99),
                    last_drain_latency_us: r.last_latency_us,
                }
            })
            .collect()
    }

    /// The queue map in its command-line syntax.
    pub fn queue_map(&self) -> String {
        self.lock().map.to_string()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
