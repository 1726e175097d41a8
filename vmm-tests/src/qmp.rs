//! QMP for the harness: a thin layer over [`qemu_qmp::QmpClient`], the workspace's one QMP
//! implementation (the backend's QMP adapter speaks through it too). It adds what the tests
//! need around it: retrying the connection while QEMU starts, and events handed out as the JSON
//! objects QEMU sent (`{"event": ..., "data": ...}`), with a wait for the first one a predicate
//! accepts that keeps the others for later.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qemu_qmp::QmpClient;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A QMP connection in command mode.
pub struct Qmp {
    client: QmpClient,
    /// Events handed to [`Qmp::wait_event`]'s predicate and not taken, oldest first.
    skipped: VecDeque<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying until `timeout`, while QEMU creates it),
    /// reads the greeting and negotiates capabilities; `timeout` also bounds each command.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    log::trace!("QMP connect {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::io(format!("connect QMP {}", path.display()), e)),
            }
        };
        let client = QmpClient::from_stream(stream, timeout)
            .map_err(|e| Error::Qmp(format!("{}: {e}", path.display())))?;
        Ok(Qmp {
            client,
            skipped: VecDeque::new(),
        })
    }

    /// Runs `command` with `arguments` and returns its `return` member.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.client
            .execute(command, arguments)
            .map_err(|e| Error::Qmp(format!("{command}: {e}")))
    }

    /// The next event within `timeout` (a kept one first); `None` if none came.
    fn next(&mut self, timeout: Duration) -> Result<Option<Value>> {
        match self.skipped.pop_front() {
            Some(event) => Ok(Some(event)),
            None => self.next_from_qemu(timeout),
        }
    }

    /// The next event QEMU sends within `timeout`, as the JSON object it sent.
    fn next_from_qemu(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let event = self
            .client
            .next_event(timeout)
            .map_err(|e| Error::Qmp(format!("waiting for an event: {e}")))?;
        Ok(event.map(|e| json!({ "event": e.name, "data": e.data })))
    }

    /// Takes the queued events, and any that arrive within `wait`.
    pub fn events(&mut self, wait: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + wait;
        let mut events = Vec::new();
        while let Some(event) = self.next(deadline.saturating_duration_since(Instant::now()))? {
            events.push(event);
        }
        Ok(events)
    }

    /// Waits for an event for which `pred` holds; earlier events that do not match stay queued.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(i) = self.skipped.iter().position(&mut pred) {
            return self
                .skipped
                .remove(i)
                .ok_or_else(|| Error::Qmp("event queue changed".into()));
        }
        let deadline = Instant::now() + timeout;
        let mut passed = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_from_qemu(left)? {
                Some(e) if pred(&e) => break Some(e),
                Some(e) => passed.push(e),
                None => break None,
            }
        };
        self.skipped.extend(passed);
        found.ok_or_else(|| Error::Timeout {
            what: "a QMP event".into(),
            timeout,
            log: None,
        })
    }
}
