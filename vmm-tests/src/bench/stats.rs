//! Per-run samples and their summary over repetitions: medians with the
//! minimum and maximum.

use serde::{Deserialize, Serialize};

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
    /// Why the run failed, if it did (its figures are then zero).
    pub error: Option<String>,
}

/// Median, minimum and maximum of one figure over the repetitions.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; zeroes for none.
    pub fn of(values: &[f64]) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

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
    /// The first failure, if any.
    pub error: Option<String>,
}

impl Cell {
    /// Summarises the samples of one peer on one workload.
    pub fn of(peer: &str, workload: &str, samples: &[&Sample]) -> Cell {
        let ok: Vec<&&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
        let spread =
            |f: &dyn Fn(&Sample) -> f64| Spread::of(&ok.iter().map(|s| f(s)).collect::<Vec<_>>());
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
}
