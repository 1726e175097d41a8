//! The control socket (`--control PATH`): line-delimited JSON, one request per line, one answer
//! line each. `{"cmd":"stats"}` answers the per-queue counters, `limits show` and
//! `limits set SPEC` read and change the I/O limits; `vhost-user-blk ctl` is its client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use log::{debug, warn};
use serde::Deserialize;
use serde_json::json;

use crate::hotplug::Hotplug;
use crate::limits::IoLimits;
use crate::stats::DeviceStats;
use crate::workers::QueueWorkers;
use crate::{Error, Result};
use vcpu::QueueMap;

/// Static facts about the device that `stats` reports beside the counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// Image path.
    pub image: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Cache mode.
    pub cache: String,
    /// I/O engine.
    pub engine: String,
    /// Read-only.
    pub read_only: bool,
    /// How `dontcache` writes leave the host page cache (`rwf-dontcache`,
    /// `sync-file-range+fadvise`, or the mode's own path).
    pub eviction_path: String,
}

#[derive(Debug, Deserialize)]
struct ControlRequest {
    cmd: String,
    /// For `vcpu-unplug`, `vcpu-plug`, `set-cpu-affinity`.
    vcpu: Option<usize>,
    /// For `set-queue-map`: QUEUE=VCPU,...
    map: Option<String>,
    /// For `set-cpu-affinity`: a CPU list such as "2-3".
    cpus: Option<String>,
    /// For `limits-set`: the limits, `key=value,...` or `none`.
    spec: Option<String>,
}

/// Bind the control socket and serve it on its own thread for the life of the process.
pub fn spawn(
    path: &Path,
    stats: Arc<DeviceStats>,
    workers: Arc<QueueWorkers>,
    hotplug: Arc<Hotplug>,
    io_limits: Arc<IoLimits>,
    info: DeviceInfo,
) -> Result<()> {
    // A stale socket from an earlier run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| Error::Control {
        path: path.to_owned(),
        source,
    })?;
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(conn) => {
                        if let Err(e) = serve(conn, &stats, &workers, &hotplug, &io_limits, &info) {
                            debug!("control connection ended: {e}");
                        }
                    }
                    Err(e) => warn!("control socket accept: {e}"),
                }
            }
        })
        .map_err(|source| Error::Control {
            path: path.to_owned(),
            source,
        })?;
    Ok(())
}

fn serve(
    conn: UnixStream,
    stats: &DeviceStats,
    workers: &QueueWorkers,
    hotplug: &Hotplug,
    io_limits: &IoLimits,
    info: &DeviceInfo,
) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let answer = answer(line, stats, workers, hotplug, io_limits, info);
        writer.write_all(answer.to_string().as_bytes())?;
        writer.write_all(b"\n")?;
    }
    Ok(())
}

/// The answer to one request line.
pub fn answer(
    line: &str,
    stats: &DeviceStats,
    workers: &QueueWorkers,
    hotplug: &Hotplug,
    io_limits: &IoLimits,
    info: &DeviceInfo,
) -> serde_json::Value {
    let req = match serde_json::from_str::<ControlRequest>(line) {
        Ok(req) => req,
        // Words are accepted too, for typing at a socket by hand: `vcpu-unplug 1`.
        Err(_) if !line.starts_with('{') => match from_words(line) {
            Ok(req) => req,
            Err(e) => return json!({ "error": e }),
        },
        Err(e) => return json!({ "error": format!("bad request: {e}") }),
    };
    let need_vcpu = || {
        req.vcpu
            .ok_or_else(|| format!("'{}' needs \"vcpu\"", req.cmd))
    };
    match req.cmd.as_str() {
        "vcpu-unplug" => match need_vcpu() {
            Ok(vcpu) => json!(hotplug.unplug(vcpu)),
            Err(e) => json!({ "error": e }),
        },
        "vcpu-plug" => match need_vcpu() {
            Ok(vcpu) => {
                hotplug.plug(vcpu);
                json!({ "ok": true })
            }
            Err(e) => json!({ "error": e }),
        },
        "set-queue-map" => {
            match QueueMap::parse(req.map.as_deref().unwrap_or(""), stats.num_queues()) {
                Ok(map) => {
                    hotplug.set_queue_map(map);
                    json!({ "ok": true, "queue_map": hotplug.queue_map() })
                }
                Err(e) => json!({ "error": e.to_string() }),
            }
        }
        "set-cpu-affinity" => {
            let cpus = vcpu::parse_cpu_list(req.cpus.as_deref().unwrap_or(""));
            match (need_vcpu(), cpus) {
                (Ok(vcpu), Ok(cpus)) => {
                    hotplug.set_affinity(vcpu, cpus);
                    json!({ "ok": true })
                }
                (Err(e), _) => json!({ "error": e }),
                (_, Err(e)) => json!({ "error": e.to_string() }),
            }
        }
        "limits-show" => json!({
            "limits": io_limits.spec().to_string(),
            "group": io_limits.group().map(|p| p.display().to_string()),
            "waiting_queues": io_limits.buckets().waiting_queues(),
        }),
        // A bad specification changes nothing: the limits in force stay.
        "limits-set" => match io_limits.set(req.spec.as_deref().unwrap_or("")) {
            Ok(spec) => {
                log::info!("I/O limits are now '{spec}'");
                json!({ "ok": true, "limits": spec.to_string() })
            }
            Err(e) => json!({
                "error": format!("limits unchanged: {e}"),
                "limits": io_limits.spec().to_string(),
            }),
        },
        "stats" => {
            let deferred = workers.deferred_snapshot();
            let queues: Vec<serde_json::Value> = stats
                .snapshot()
                .into_iter()
                .map(|q| {
                    let d = deferred.get(q.index).cloned().flatten();
                    let mut v = json!(q);
                    v["deferred_worker"] = json!(d);
                    v
                })
                .collect();
            json!({
                "device": info,
                "limits": io_limits.spec().to_string(),
                "queue_map": hotplug.queue_map(),
                "queues": queues,
                "vcpus": hotplug.snapshot(),
            })
        }
        other => json!({ "error": format!("unknown command '{other}'") }),
    }
}

/// `stats`, `vcpu-unplug 1`, `set-queue-map 0=1,1=0`, `set-cpu-affinity 1 2-3`,
/// `limits show`, `limits set iops-total=2000`.
fn from_words(line: &str) -> std::result::Result<ControlRequest, String> {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or_default().to_owned();
    let mut req = ControlRequest {
        cmd,
        vcpu: None,
        map: None,
        cpus: None,
        spec: None,
    };
    let number = |w: Option<&str>| {
        w.map(|w| {
            w.parse::<usize>()
                .map_err(|_| format!("'{w}' is not a vCPU number"))
        })
        .transpose()
    };
    match req.cmd.as_str() {
        "vcpu-unplug" | "vcpu-plug" => req.vcpu = number(words.next())?,
        "set-queue-map" => req.map = words.next().map(str::to_owned),
        "set-cpu-affinity" => {
            req.vcpu = number(words.next())?;
            req.cpus = words.next().map(str::to_owned);
        }
        "limits" => match words.next() {
            None | Some("show") => req.cmd = "limits-show".into(),
            Some("set") => {
                req.cmd = "limits-set".into();
                let spec: Vec<&str> = words.collect();
                if spec.is_empty() {
                    return Err("'limits set' needs the limits: key=value,... or none".into());
                }
                req.spec = Some(spec.join(""));
            }
            Some(other) => {
                return Err(format!(
                    "'limits {other}': use 'limits show' or 'limits set SPEC'"
                ))
            }
        },
        _ => {}
    }
    Ok(req)
}

/// `vhost-user-blk ctl`: send one request to a control socket and return the answer line.
pub fn request(path: &PathBuf, request: &str) -> Result<String> {
    let io_err = |source| Error::Control {
        path: path.clone(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(io_err)?;
    // The server takes JSON or words alike.
    let line = request.trim().to_owned();
    conn.write_all(line.as_bytes()).map_err(io_err)?;
    conn.write_all(b"\n").map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(io_err)?;
    Ok(answer.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            image: "/img".into(),
            capacity: 1 << 20,
            cache: "none".into(),
            engine: "io-uring".into(),
            read_only: false,
            eviction_path: "o-direct".into(),
        }
    }

    /// A device's control state, as the server keeps it, for `queues` queues.
    struct Device {
        stats: Arc<DeviceStats>,
        workers: Arc<QueueWorkers>,
        hotplug: Hotplug,
        limits: IoLimits,
    }

    impl Device {
        fn new(queues: usize) -> Self {
            let workers = Arc::new(QueueWorkers::new(queues));
            let hotplug = Hotplug::new(
                queues,
                workers.clone(),
                QueueMap::default(),
                vcpu::VcpuAffinity::default(),
                std::time::Duration::from_millis(1),
            );
            Self {
                stats: Arc::new(DeviceStats::new(queues)),
                workers,
                hotplug,
                limits: IoLimits::new(throttle::Spec::none()),
            }
        }

        /// The control socket's answer to `line`.
        fn ask(&self, line: &str) -> serde_json::Value {
            answer(
                line,
                &self.stats,
                &self.workers,
                &self.hotplug,
                &self.limits,
                &info(),
            )
        }
    }

    #[test]
    fn stats_lists_every_queue() {
        let dev = Device::new(3);
        let v = dev.ask(r#"{"cmd":"stats"}"#);
        assert_eq!(v["queues"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["queues"][2]["index"], 2);
        assert_eq!(v["device"]["capacity"], 1 << 20);
        assert_eq!(dev.ask("stats"), v);
    }

    #[test]
    fn unknown_and_malformed_requests_get_an_error() {
        let dev = Device::new(1);
        for bad in [
            "frobnicate",
            "{not json",
            "vcpu-unplug x",
            r#"{"cmd":"vcpu-plug"}"#,
        ] {
            assert!(dev.ask(bad)["error"].is_string(), "{bad}");
        }
    }

    #[test]
    fn queue_map_is_checked_against_the_queue_count() {
        let dev = Device::new(2);
        let ok = dev.ask("set-queue-map 0=1,1=0");
        assert_eq!(ok["ok"], true, "{ok}");
        assert_eq!(dev.hotplug.queue_map(), "0=1,1=0");
        let bad = dev.ask("set-queue-map 2=0");
        assert!(bad["error"].is_string(), "{bad}");
    }

    #[test]
    fn unplug_without_a_connection_reports_an_empty_drain() {
        let dev = Device::new(2);
        let v = dev.ask("vcpu-unplug 1");
        assert_eq!(v["vcpu"], 1);
        assert_eq!(v["drained"], 0);
        let s = dev.ask("stats");
        assert_eq!(s["vcpus"][0]["online"], false, "{s}");
        dev.ask("vcpu-plug 1");
        let s = dev.ask("stats");
        assert_eq!(s["vcpus"][0]["online"], true, "{s}");
    }

    #[test]
    fn limits_are_shown_and_set_and_bad_ones_change_nothing() {
        let dev = Device::new(1);
        let ask = |line: &str| dev.ask(line);
        assert_eq!(ask("limits show")["limits"], "none");
        let set = ask("limits set iops-total=2000,iops-total-max=4000");
        assert_eq!(set["ok"], true, "{set}");
        assert_eq!(set["limits"], "iops-total=2000,iops-total-max=4000");
        for bad in [
            "limits set iops-total=0",
            "limits set iops-total=-3",
            "limits set iops-total=99999999999",
            "limits set speed=5",
            "limits set",
            "limits frob",
            r#"{"cmd":"limits-set"}"#,
            r#"{"cmd":"limits-set","spec":"bps-read-max=5"}"#,
        ] {
            let v = ask(bad);
            assert!(v["error"].is_string(), "{bad}: {v}");
        }
        let v = ask("limits set iops-total=0");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains("iops-total=0"), "{v}");
        assert_eq!(
            ask("limits")["limits"],
            "iops-total=2000,iops-total-max=4000"
        );
        assert_eq!(
            ask("stats")["limits"],
            "iops-total=2000,iops-total-max=4000"
        );
        let json = ask(r#"{"cmd":"limits-set","spec":"none"}"#);
        assert_eq!(json["limits"], "none", "{json}");
        assert_eq!(ask(r#"{"cmd":"limits-show"}"#)["limits"], "none");
    }
}
