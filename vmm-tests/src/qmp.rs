//! A small QMP client: capabilities negotiation, commands, events.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Context, Error, Result};

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    /// Default timeout of a command.
    pub timeout: Duration,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying until `timeout`),
    /// reads the greeting and negotiates capabilities.
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
        let writer = stream.try_clone().ctx(|| "clone QMP socket".into())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            timeout,
        };
        let greeting = qmp.read_message(timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self, timeout: Duration) -> Result<Value> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .ctx(|| "set QMP read timeout".into())?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(Error::Qmp("connection closed".into())),
            Ok(_) => Ok(serde_json::from_str(&line)?),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(Error::Timeout {
                    what: "a QMP message".into(),
                    timeout,
                    log: None,
                })
            }
            Err(e) => Err(Error::io("read QMP", e)),
        }
    }

    /// Runs `command` with `arguments`; returns its `return` value. Events
    /// that arrive meanwhile are queued for [`Qmp::events`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .ctx(|| format!("send QMP {command}"))?;
        let start = Instant::now();
        loop {
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: format!("the reply to QMP {command}"),
                    timeout: self.timeout,
                    log: None,
                });
            }
            let m = self.read_message(left)?;
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else if let Some(r) = m.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = m.get("error") {
                return Err(Error::Qmp(format!("{command}: {e}")));
            }
        }
    }

    /// Takes the queued events, and any that arrive within `wait`.
    pub fn events(&mut self, wait: Duration) -> Result<Vec<Value>> {
        let start = Instant::now();
        loop {
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            match self.read_message(left) {
                Ok(m) => self.events.push_back(m),
                Err(Error::Timeout { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.events.drain(..).collect())
    }

    /// Waits for an event for which `pred` holds; earlier events that do
    /// not match stay queued.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(i) = self.events.iter().position(&mut pred) {
            return self
                .events
                .remove(i)
                .ok_or_else(|| Error::Qmp("event queue changed".into()));
        }
        let start = Instant::now();
        let mut skipped = Vec::new();
        let found = loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break None;
            }
            match self.read_message(left) {
                Ok(m) if m.get("event").is_some() && pred(&m) => break Some(m),
                Ok(m) => skipped.push(m),
                Err(Error::Timeout { .. }) => break None,
                Err(e) => return Err(e),
            }
        };
        self.events.extend(skipped);
        found.ok_or_else(|| Error::Timeout {
            what: "a QMP event".into(),
            timeout,
            log: None,
        })
    }
}
