//! The harness's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while setting up or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A helper command (script, cargo, mkfs, ...) failed.
    #[error("{cmd} failed ({status}): {output}")]
    Command {
        /// The command line.
        cmd: String,
        /// How it ended.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}{}", log_hint(.log))]
    Timeout {
        /// What the harness waited for.
        what: String,
        /// How long it waited.
        timeout: Duration,
        /// A log that may say why.
        log: Option<PathBuf>,
    },
    /// A process exited when it should not have.
    #[error("{what} exited early ({status}){}", log_hint(.log))]
    Exited {
        /// Which process.
        what: String,
        /// How it ended.
        status: String,
        /// Its log.
        log: Option<PathBuf>,
    },
    /// No guest could be booted, with any accelerator.
    #[error("no guest booted: {0}")]
    NoGuest(String),
    /// The QMP conversation failed.
    #[error("QMP: {0}")]
    Qmp(String),
    /// The guest agent reported a failure or an unexpected result.
    #[error("guest agent: {0}")]
    Agent(String),
    /// The backend misbehaved (no socket, bad stats, ...).
    #[error("backend: {0}")]
    Backend(String),
    /// A required binary is missing.
    #[error("{0} not found; {1}")]
    Missing(String, String),
    /// JSON that did not parse.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn log_hint(log: &Option<PathBuf>) -> String {
    match log {
        Some(p) => format!(" (see {})", p.display()),
        None => String::new(),
    }
}

impl Error {
    /// Wraps an I/O error with what the harness was doing.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Shorthand for the harness's results.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to `io::Result`s.
pub trait Context<T> {
    /// Maps the error to [`Error::Io`] with `what()` as its context.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
