//! The guest's serial console: captured line by line from the VMM's output
//! into a log file and an in-memory buffer that tests wait on.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

#[derive(Default)]
struct State {
    lines: Vec<String>,
    /// Number of readers (stdout, stderr) still open.
    open: usize,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    log: Mutex<File>,
    echo: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A console capture. Lines from every attached stream go, in arrival
/// order, to the log file and to the buffer.
pub struct Console {
    shared: Arc<Shared>,
    path: PathBuf,
    readers: Vec<JoinHandle<()>>,
}

impl Console {
    /// Creates the capture with its log at `path`. With `VMM_TESTS_ECHO=1`
    /// every line is also echoed to stderr as it arrives.
    pub fn new(path: &Path) -> Result<Self> {
        let log = File::create(path).ctx(|| format!("create {}", path.display()))?;
        Ok(Console {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                cond: Condvar::new(),
                log: Mutex::new(log),
                echo: std::env::var("VMM_TESTS_ECHO").is_ok_and(|v| v == "1"),
            }),
            path: path.to_path_buf(),
            readers: Vec::new(),
        })
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a thread that copies `stream` into the capture, each line
    /// prefixed with `prefix`.
    pub fn attach(&mut self, stream: impl Read + Send + 'static, prefix: &'static str) {
        let shared = Arc::clone(&self.shared);
        shared.lock().open += 1;
        let handle = std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let line = format!("{prefix}{}", text.trim_end_matches(['\n', '\r']));
                        if let Ok(mut f) = shared.log.lock() {
                            let _ = writeln!(f, "{line}");
                        }
                        if shared.echo {
                            eprintln!("{line}");
                        }
                        shared.lock().lines.push(line);
                        shared.cond.notify_all();
                    }
                }
            }
            shared.lock().open -= 1;
            shared.cond.notify_all();
        });
        self.readers.push(handle);
    }

    /// Writes a line of the harness's own into the log.
    pub fn note(&self, text: &str) {
        if let Ok(mut f) = self.shared.log.lock() {
            let _ = writeln!(f, "[harness] {text}");
        }
    }

    /// A copy of every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.shared.lock().lines.clone()
    }

    /// Whether every attached stream has reached its end.
    pub fn closed(&self) -> bool {
        self.shared.lock().open == 0
    }

    /// Waits for the first line at index `from` or later that satisfies
    /// `pred`; returns its index and text. Fails when the streams close
    /// first or after `timeout`.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<(usize, String)> {
        let start = Instant::now();
        let mut next = from;
        let mut st = self.shared.lock();
        loop {
            while next < st.lines.len() {
                if pred(&st.lines[next]) {
                    return Ok((next, st.lines[next].clone()));
                }
                next += 1;
            }
            if st.open == 0 && !self.readers.is_empty() {
                return Err(Error::Exited {
                    what: format!("the VM (while waiting for {what})"),
                    status: "console closed".into(),
                    log: Some(self.path.clone()),
                });
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    timeout,
                    log: Some(self.path.clone()),
                });
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(200)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Waits up to `timeout` for every stream to close.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        let mut st = self.shared.lock();
        while st.open > 0 {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }
}
