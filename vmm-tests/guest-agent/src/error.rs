//! The guest agent's error type.

use std::io;

/// Why a workload failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the agent was doing.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A kernel command line parameter has a bad value.
    #[error("bad parameter {key}={value}: {why}")]
    Param {
        /// The parameter's key.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// Data read back differs from what was written.
    #[error("data mismatch at byte offset {offset} (block {block}) on {target}")]
    Mismatch {
        /// Device or file checked.
        target: String,
        /// Byte offset of the first bad block.
        offset: u64,
        /// Pattern block number of the first bad block.
        block: u64,
    },
    /// No workload of that name exists.
    #[error("unknown workload {0:?}")]
    UnknownWorkload(String),
    /// A workload-specific check failed.
    #[error("{0}")]
    Check(String),
}

impl Error {
    /// Wraps an I/O error with what the agent was doing.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Shorthand for results of the agent.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to `io::Result`s.
pub trait Context<T> {
    /// Maps the error to [`Error::Io`] with `what` as its context.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
