//! The crate's one error type: every way talking to QEMU over QMP, or starting the adapter's
//! thread, can fail, with what was being done.

use std::io;
use std::path::PathBuf;

/// Errors of the QMP client and the vCPU adapter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to a QMP socket failed (not there yet, refused, ...).
    #[error("connecting to QMP socket {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to a QMP connection failed.
    #[error("{context} on the QMP connection")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The QMP peer closed the connection (QEMU exited).
    #[error("QMP connection closed by the peer")]
    Closed,
    /// No answer in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited: the greeting, or the reply to a command.
        what: String,
        /// How long we waited.
        timeout: std::time::Duration,
    },
    /// The peer sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QMP error {class}: {desc}")]
    Qmp {
        /// The error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A reply did not have the shape the command returns.
    #[error("unexpected reply to {command}")]
    Reply {
        /// The command.
        command: String,
        /// Why it did not decode.
        #[source]
        source: serde_json::Error,
    },
    /// A thread could not be spawned.
    #[error("spawning thread {name:?}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The result of this crate's operations.
pub type Result<T> = std::result::Result<T, Error>;
