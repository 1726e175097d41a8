//! Per-run samples and their summary over repetitions: medians with the
//! minimum and maximum; our backend's own counters (`stats` on its control
//! socket) at the edges of the measured window.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_tests::backend::BackendStats;

use super::error::{Context, Result};

/// One run of one workload on one peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    /// Peer name.
    pub peer: String,
    /// Workload name.
    pub workload: String,
    /// Repetition index (0-based).
    pub rep: u32,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency percentiles in microseconds: p50, p99, p99.9.
    pub lat_us: [f64; 3],
    /// Backend CPU time (user + system) per request, in microseconds.
    pub backend_cpu_us: f64,
    /// Backend CPU use in cores (CPU seconds per wall second).
    pub backend_cores: f64,
    /// Client CPU time per request, in microseconds.
    pub client_cpu_us: f64,
    /// Share of the image's pages in the page cache when the run started.
    pub cache_resident: f64,
    /// CPU cores everything else on the host kept busy during the run
    /// (another build, another VM: noise).
    #[serde(default)]
    pub others_cores: f64,
    /// CPU cores the hypervisor stole from this (virtual) host.
    #[serde(default)]
    pub steal_cores: f64,
    /// Our backend only: used-buffer notifications it sent per request it
    /// completed over the measured window (its `signals` and `requests`,
    /// summed over queues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals_per_req: Option<f64>,
    /// Our backend only: the deferred worker's mean batch over the window
    /// (completions over batches, all queues); none without a batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_batch: Option<f64>,
    /// Our backend only: the worst queue's deferred push-to-signal p99, µs,
    /// at the end of the window (cumulative over the run, ramp included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_p99_us: Option<f64>,
    /// RBD peers on a cluster the bench started: the OSD's CPU time per
    /// request, µs (over the whole drive, ramp included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub osd_cpu_us: Option<f64>,
    /// Why the run failed, if it did (its figures are then zero).
    pub error: Option<String>,
}

pub use vmm_tests::spread::Spread;

/// The summary of one (workload, peer) cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    /// Peer name.
    pub peer: String,
    /// Workload name.
    pub workload: String,
    /// Successful runs summarised.
    pub runs: usize,
    /// Failed runs.
    pub failed: usize,
    /// Requests per second.
    pub iops: Spread,
    /// MiB per second.
    pub mib_s: Spread,
    /// p50 latency, µs.
    pub p50_us: Spread,
    /// p99 latency, µs.
    pub p99_us: Spread,
    /// p99.9 latency, µs.
    pub p999_us: Spread,
    /// Backend CPU µs per request.
    pub backend_cpu_us: Spread,
    /// Backend CPU cores busy.
    pub backend_cores: Spread,
    /// Client CPU µs per request.
    pub client_cpu_us: Spread,
    /// Cores busy with other work during the runs (noise).
    #[serde(default)]
    pub others_cores: Spread,
    /// Our backend's signals per request (runs that have it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals_per_req: Option<Spread>,
    /// Our backend's deferred mean batch (runs that have it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_batch: Option<Spread>,
    /// Our backend's worst-queue deferred p99, µs (runs that have it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_p99_us: Option<Spread>,
    /// The OSD's CPU µs per request (RBD runs that have it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub osd_cpu_us: Option<Spread>,
    /// The first failure, if any.
    pub error: Option<String>,
}

impl Cell {
    /// Summarises the samples of one peer on one workload.
    pub fn of(peer: &str, workload: &str, samples: &[&Sample]) -> Cell {
        let ok: Vec<&&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
        let spread =
            |f: &dyn Fn(&Sample) -> f64| Spread::of(&ok.iter().map(|s| f(s)).collect::<Vec<_>>());
        let some = |f: &dyn Fn(&Sample) -> Option<f64>| {
            let v: Vec<f64> = ok.iter().filter_map(|s| f(s)).collect();
            (!v.is_empty()).then(|| Spread::of(&v))
        };
        Cell {
            peer: peer.into(),
            workload: workload.into(),
            runs: ok.len(),
            failed: samples.len() - ok.len(),
            iops: spread(&|s| s.iops),
            mib_s: spread(&|s| s.mib_s),
            p50_us: spread(&|s| s.lat_us[0]),
            p99_us: spread(&|s| s.lat_us[1]),
            p999_us: spread(&|s| s.lat_us[2]),
            backend_cpu_us: spread(&|s| s.backend_cpu_us),
            backend_cores: spread(&|s| s.backend_cores),
            client_cpu_us: spread(&|s| s.client_cpu_us),
            others_cores: spread(&|s| s.others_cores),
            signals_per_req: some(&|s| s.signals_per_req),
            mean_batch: some(&|s| s.mean_batch),
            deferred_p99_us: some(&|s| s.deferred_p99_us),
            osd_cpu_us: some(&|s| s.osd_cpu_us),
            error: samples.iter().find_map(|s| s.error.clone()),
        }
    }
}

/// p50, p99 and p99.9 of latencies in nanoseconds, in microseconds.
/// Sorts `lat_ns`.
pub fn percentiles_us(lat_ns: &mut [u32]) -> [f64; 3] {
    if lat_ns.is_empty() {
        return [0.0; 3];
    }
    lat_ns.sort_unstable();
    let at = |q: f64| {
        let i = ((lat_ns.len() as f64 * q).ceil() as usize).clamp(1, lat_ns.len()) - 1;
        f64::from(lat_ns[i]) / 1000.0
    };
    [at(0.50), at(0.99), at(0.999)]
}

/// The mean number of requests in flight over a window of `seconds` in which requests of
/// these latencies completed (Little's law: the sum of their latencies over the window). A
/// closed-loop client keeps its whole depth in flight, so a figure well below the depth says
/// the requests counted and the window they are divided by disagree: the client was not
/// submitting for part of the window, or counted over less of it.
pub fn mean_in_flight(lat_ns: &[u32], seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    lat_ns.iter().map(|&ns| f64::from(ns)).sum::<f64>() / 1e9 / seconds
}

/// Asks our backend for its `stats` on its control socket
/// (`{"cmd":"stats"}`, one JSON line back; see `backend/src/control.rs`).
///
/// `vmm_tests::backend::Backend::control` speaks the same protocol but
/// needs a backend it started itself; the bench starts its own servers.
pub fn query_backend(control: &Path) -> Result<BackendStats> {
    let what = || format!("backend stats on {}", control.display());
    let mut s = UnixStream::connect(control).ctx(what)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ctx(what)?;
    s.write_all(b"{\"cmd\":\"stats\"}\n").ctx(what)?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).ctx(what)?;
    let v: serde_json::Value = serde_json::from_str(&reply).ctx(what)?;
    if let Some(e) = v.get("error") {
        return Err(super::error::Error::msg(format!("{}: {e}", what())));
    }
    serde_json::from_value(v).ctx(what)
}

/// Our backend's counters at one edge of the measured window, summed over
/// its queues.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackendCounters {
    /// Requests completed.
    pub requests: u64,
    /// Used-buffer notifications sent; none if the backend does not say.
    pub signals: Option<u64>,
    /// Deferred worker batches.
    pub batches: u64,
    /// Completions those batches held (`mean_batch * batches` per queue).
    pub batched: f64,
    /// The worst queue's deferred `latency_p99_us`; none without a deferred
    /// worker that has completed a batch.
    pub deferred_p99_us: Option<u64>,
}

impl BackendCounters {
    /// Sums a `stats` reply. A queue without a deferred worker yet
    /// (`"deferred_worker": null`) counts no batch.
    pub fn of(stats: &BackendStats) -> BackendCounters {
        let mut c = BackendCounters::default();
        let mut signals = Some(0u64);
        for q in &stats.queues {
            c.requests += q.requests;
            signals = signals
                .zip(q.extra.get("signals").and_then(serde_json::Value::as_u64))
                .map(|(a, b)| a + b);
            let Some(d) = q.extra.get("deferred_worker").filter(|d| d.is_object()) else {
                continue;
            };
            let num = |k: &str| d.get(k).and_then(serde_json::Value::as_f64);
            let batches = d
                .get("batches")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            c.batches += batches;
            c.batched += num("mean_batch").unwrap_or(0.0) * batches as f64;
            if batches > 0 {
                if let Some(p99) = d.get("latency_p99_us").and_then(serde_json::Value::as_u64) {
                    c.deferred_p99_us = Some(c.deferred_p99_us.map_or(p99, |m| m.max(p99)));
                }
            }
        }
        c.signals = signals.filter(|_| !stats.queues.is_empty());
        c
    }
}

/// What a sample records of our backend's counters over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackendFigures {
    /// Signals per request over the window.
    pub signals_per_req: Option<f64>,
    /// Completions per deferred batch over the window.
    pub mean_batch: Option<f64>,
    /// The worst queue's deferred p99 at the end, µs.
    pub deferred_p99_us: Option<f64>,
}

impl BackendFigures {
    /// The figures between two edges: deltas of the sums, so a ratio of
    /// sums (every request weighs the same), not a mean of per-queue
    /// ratios.
    pub fn between(start: &BackendCounters, end: &BackendCounters) -> BackendFigures {
        let requests = end.requests.saturating_sub(start.requests);
        let signals_per_req = match (start.signals, end.signals) {
            (Some(a), Some(b)) if requests > 0 => {
                Some(b.saturating_sub(a) as f64 / requests as f64)
            }
            _ => None,
        };
        let batches = end.batches.saturating_sub(start.batches);
        let mean_batch =
            (batches > 0).then(|| (end.batched - start.batched).max(0.0) / batches as f64);
        BackendFigures {
            signals_per_req,
            mean_batch,
            deferred_p99_us: end.deferred_p99_us.map(|p| p as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_percentiles() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0, 3.0, 10.0]).median, 2.5);
        let mut v: Vec<u32> = (1..=1000).rev().map(|x| x * 1000).collect();
        assert_eq!(percentiles_us(&mut v), [500.0, 990.0, 999.0]);
    }

    fn stats(json: &str) -> BackendStats {
        serde_json::from_str(json).expect("stats JSON")
    }

    #[test]
    fn backend_deltas() {
        // The shape of backend/src/control.rs's answer, trimmed.
        let start = stats(
            r#"{"device":{"cache":"dontcache"},"queues":[
              {"index":0,"requests":100,"signals":50,"deferred_worker":
                {"batches":10,"mean_batch":4.0,"latency_p99_us":900,"pushed":40}},
              {"index":1,"requests":100,"signals":30,"deferred_worker":null}]}"#,
        );
        let end = stats(
            r#"{"queues":[
              {"index":0,"requests":1100,"signals":150,"deferred_worker":
                {"batches":30,"mean_batch":12.0,"latency_p99_us":1500}},
              {"index":1,"requests":2100,"signals":130,"deferred_worker":
                {"batches":20,"mean_batch":20.0,"latency_p99_us":2100}}]}"#,
        );
        let (a, b) = (BackendCounters::of(&start), BackendCounters::of(&end));
        assert_eq!((a.requests, a.signals, a.batches), (200, Some(80), 10));
        assert_eq!(a.batched, 40.0);
        assert_eq!(a.deferred_p99_us, Some(900));
        let f = BackendFigures::between(&a, &b);
        // (100 + 100) signals over (1000 + 2000) requests.
        assert_eq!(f.signals_per_req, Some(200.0 / 3000.0));
        // (30*12 + 20*20 - 10*4) completions over (30 + 20 - 10) batches.
        assert_eq!(f.mean_batch, Some((360.0 + 400.0 - 40.0) / 40.0));
        // The worse queue, at the end.
        assert_eq!(f.deferred_p99_us, Some(2100.0));
    }

    #[test]
    fn mean_in_flight_is_littles_law() {
        // 64 requests in flight all along a 2 s window, 10 ms each: 12800 of them.
        let full = vec![10_000_000u32; 12_800];
        assert!((mean_in_flight(&full, 2.0) - 64.0).abs() < 1e-9);
        // The same latencies, but a third of the requests in the same window: 21 in flight.
        let short = vec![10_000_000u32; 4_267];
        assert!((mean_in_flight(&short, 2.0) - 21.3).abs() < 0.1);
        assert_eq!(mean_in_flight(&full, 0.0), 0.0);
    }

    #[test]
    fn backend_deltas_without_batches_or_signals() {
        let a = BackendCounters::of(&stats(
            r#"{"queues":[{"index":0,"requests":5,"deferred_worker":{"batches":0,"mean_batch":0.0,"latency_p99_us":0}}]}"#,
        ));
        let f = BackendFigures::between(&a, &a);
        assert_eq!(f, BackendFigures::default());
        assert_eq!(a.signals, None);
        let none = BackendCounters::of(&stats(r#"{"queues":[]}"#));
        assert_eq!(none.signals, None);
    }

    #[test]
    fn cell_spreads_backend_figures_of_runs_that_have_them() {
        let mk = |spr: Option<f64>, err: Option<&str>| Sample {
            peer: "ours-dontcache-uring".into(),
            workload: "randwrite-4k-qd32-q2".into(),
            rep: 0,
            iops: 1.0,
            mib_s: 1.0,
            lat_us: [1.0; 3],
            backend_cpu_us: 1.0,
            backend_cores: 1.0,
            client_cpu_us: 1.0,
            cache_resident: 0.0,
            others_cores: 0.0,
            steal_cores: 0.0,
            signals_per_req: spr,
            mean_batch: None,
            deferred_p99_us: None,
            osd_cpu_us: None,
            error: err.map(String::from),
        };
        let v = [
            mk(Some(0.1), None),
            mk(Some(0.3), None),
            mk(None, None),
            mk(Some(9.0), Some("failed")),
        ];
        let refs: Vec<&Sample> = v.iter().collect();
        let c = Cell::of("p", "w", &refs);
        let s = c.signals_per_req.expect("spread");
        assert_eq!((s.median, s.min, s.max), (0.2, 0.1, 0.3));
        assert!(c.mean_batch.is_none());
        // Skipped in the JSON when absent; read back as absent from old files.
        let json = serde_json::to_value(&v[2]).expect("json");
        assert!(json.get("signals_per_req").is_none());
    }
}
