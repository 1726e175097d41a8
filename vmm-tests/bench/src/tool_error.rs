//! The error type of the harness's measuring tools (`guest-bench`, `guest-fio`, `drain-bench`):
//! what the tool was doing, and what failed under it.

/// Why a tool's run failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The VM harness failed (guest, backend, QMP).
    #[error("{what}: {source}")]
    Harness {
        /// What the tool was doing.
        what: String,
        /// The harness's error.
        source: vmm_tests::Error,
    },
    /// libblkio failed.
    #[error("{what}: {source}")]
    Blkio {
        /// What the tool was doing.
        what: String,
        /// libblkio's error.
        source: blkio::Error,
    },
    /// A file, socket or system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What the tool was doing.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An argument or a result that makes no sense: lost or doubled completions, a bad reply.
    #[error("{0}")]
    Check(String),
}

/// A tool's result.
pub type ToolResult<T> = std::result::Result<T, ToolError>;

/// A tool's exit: success, or its error on stderr after the tool's name, and failure.
pub fn exit_code(tool: &str, result: ToolResult<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Adds what the tool was doing to a harness, libblkio or I/O error.
pub trait Context<T> {
    /// The error, if any, with `what` the tool was doing.
    fn ctx(self, what: impl FnOnce() -> String) -> ToolResult<T>;
}

impl<T> Context<T> for vmm_tests::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> ToolResult<T> {
        self.map_err(|source| ToolError::Harness {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for blkio::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> ToolResult<T> {
        self.map_err(|source| ToolError::Blkio {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> ToolResult<T> {
        self.map_err(|source| ToolError::Io {
            what: what(),
            source,
        })
    }
}
