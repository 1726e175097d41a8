//! The control socket (`--control PATH`): line-delimited JSON, one request per line, one answer
//! line each. `{"cmd":"stats"}` answers the per-queue counters; `vhost-user-blk ctl` is its
//! client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use log::{debug, warn};
use serde::Deserialize;
use serde_json::json;

use crate::stats::DeviceStats;
use crate::{Error, Result};

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
}

/// Bind the control socket and serve it on its own thread for the life of the process.
pub fn spawn(path: &Path, stats: Arc<DeviceStats>, info: DeviceInfo) -> Result<()> {
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
                        if let Err(e) = serve(conn, &stats, &info) {
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

fn serve(conn: UnixStream, stats: &DeviceStats, info: &DeviceInfo) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let answer = answer(line, stats, info);
        writer.write_all(answer.to_string().as_bytes())?;
        writer.write_all(b"\n")?;
    }
    Ok(())
}

/// The answer to one request line.
pub fn answer(line: &str, stats: &DeviceStats, info: &DeviceInfo) -> serde_json::Value {
    let cmd = match serde_json::from_str::<ControlRequest>(line) {
        Ok(req) => req.cmd,
        // A bare word is accepted too, for typing at a socket by hand.
        Err(_) if !line.starts_with('{') => line.to_owned(),
        Err(e) => return json!({ "error": format!("bad request: {e}") }),
    };
    match cmd.as_str() {
        "stats" => {
            let deferred = stats.deferred_snapshot();
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
            json!({ "device": info, "queues": queues })
        }
        other => json!({ "error": format!("unknown command '{other}'") }),
    }
}

/// `vhost-user-blk ctl`: send one request to a control socket and return the answer line.
pub fn request(path: &PathBuf, request: &str) -> Result<String> {
    let io_err = |source| Error::Control {
        path: path.clone(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(io_err)?;
    let line = if request.trim_start().starts_with('{') {
        request.trim().to_owned()
    } else {
        json!({ "cmd": request.trim() }).to_string()
    };
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

    #[test]
    fn stats_lists_every_queue() {
        let stats = DeviceStats::new(3);
        let v = answer(r#"{"cmd":"stats"}"#, &stats, &info());
        assert_eq!(v["queues"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["queues"][2]["index"], 2);
        assert_eq!(v["device"]["capacity"], 1 << 20);
        assert_eq!(answer("stats", &stats, &info()), v);
    }

    #[test]
    fn unknown_and_malformed_requests_get_an_error() {
        let stats = DeviceStats::new(1);
        assert!(answer("frobnicate", &stats, &info())["error"].is_string());
        assert!(answer("{not json", &stats, &info())["error"].is_string());
    }
}
