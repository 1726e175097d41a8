//! vhost-user-blk: a virtio-blk device backend that a VMM attaches over a vhost-user socket.
//!
//! The binary is a thin shell over this library: [`args`] parses the command line, [`server`]
//! accepts one VMM connection after another, [`device`] is the virtio-blk device that
//! `vhost-user-backend` drives, [`queue_thread`] is the fast path of each queue thread,
//! [`limits`] the I/O limits it enforces, [`deferred_path`] the deferred path, [`complete`] the
//! completion step both paths end in, [`used_order`] the order it publishes used entries in,
//! [`guest_warnings`] the rate limit on the warnings a guest can trigger, [`hotplug`] the vCPU
//! pinning and unplug path, [`shared`]
//! the device state the request paths read, [`dirty_log`] the dirty-page log of live migration,
//! [`mem_view`] the guest-memory view the fast path resolves addresses through,
//! [`stats`] the counters, [`workers`] the registry of the threads serving each queue,
//! [`control`] the control socket that reports them and takes commands, and [`sandbox`] the
//! Landlock ruleset and seccomp filter the backend confines itself with.

pub mod args;
pub mod complete;
pub mod control;
pub mod deferred_path;
pub mod device;
pub mod dirty_log;
pub mod guest_warnings;
pub mod hotplug;
pub mod limits;
pub mod mem_view;
pub mod queue_thread;
pub mod sandbox;
pub mod server;
pub mod shared;
pub mod stats;
pub mod used_order;
pub mod workers;

use std::path::PathBuf;

/// Errors of the backend process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened.
    #[error("opening the image: {source}")]
    Image {
        /// The disk crate's error, which names the path.
        #[source]
        source: disk::Error,
    },
    /// An I/O engine could not be created.
    #[error("creating the I/O engine: {source}")]
    Engine {
        /// The disk crate's error.
        #[source]
        source: disk::Error,
    },
    /// A deferred completion worker could not be started.
    #[error("starting the deferred completion worker: {source}")]
    Deferred {
        /// The completion crate's error.
        #[source]
        source: completion::Error,
    },
    /// The vhost-user socket could not be set up.
    #[error("vhost-user socket {path}: {source}")]
    Socket {
        /// Socket path (or `fd N`).
        path: String,
        /// The vhost-user error.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// A required option is missing (clap checks most; these depend on each other).
    #[error("{0}")]
    Usage(&'static str),
    /// The vhost-user daemon could not be created, set up or started.
    #[error("vhost-user daemon: {context}: {source}")]
    Daemon {
        /// What was being done.
        context: &'static str,
        /// What `vhost-user-backend` reported.
        #[source]
        source: DaemonError,
    },
    /// A worker thread's events could not be set up.
    #[error("{context}: {source}")]
    WorkerEvents {
        /// Which event.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The QMP adapter could not be started.
    #[error("QMP adapter: {source}")]
    Qmp {
        /// The qemu-qmp crate's error.
        #[source]
        source: qemu_qmp::Error,
    },
    /// The control socket failed.
    #[error("control socket {}: {source}", path.display())]
    Control {
        /// Socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The sandbox (Landlock ruleset or seccomp filter) could not be set up.
    #[error("sandbox: {context}: {source}")]
    Sandbox {
        /// What was being set up.
        context: String,
        /// The `landlock` or `seccompiler` error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The limit group's file could not be joined.
    #[error("limit group {}: {reason}", path.display())]
    LimitGroup {
        /// The group's file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Setting up signal handling failed.
    #[error("signal handling: {0}")]
    Signals(#[source] std::io::Error),
}

/// An error of `vhost-user-backend`'s daemon, which does not implement `std::error::Error`
/// itself: kept with its own source, so that the chain reaches the root cause.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Creating the per-connection handler failed.
    #[error("creating the handler: {0}")]
    Handler(#[source] vhost_user_backend::VhostUserHandlerError),
    /// The vhost-user protocol layer failed (listener, request handler).
    #[error("{what}: {source}")]
    Vhost {
        /// What failed.
        what: &'static str,
        /// The vhost crate's error.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// A thread or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon thread could not be joined (it panicked).
    #[error("the daemon thread panicked")]
    Panicked,
}

impl From<vhost_user_backend::Error> for DaemonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        use vhost_user_backend::Error as E;
        match e {
            E::NewVhostUserHandler(source) => Self::Handler(source),
            E::CreateBackendListener(source) => Self::Vhost {
                what: "creating the backend listener",
                source,
            },
            E::CreateBackendReqHandler(source) => Self::Vhost {
                what: "creating the request handler",
                source,
            },
            E::CreateVhostUserListener(source) => Self::Vhost {
                what: "creating the listener",
                source,
            },
            E::HandleRequest(source) => Self::Vhost {
                what: "handling a request",
                source,
            },
            E::StartDaemon(source) => Self::Io {
                what: "starting the daemon thread",
                source,
            },
            E::WaitDaemon(_) => Self::Panicked,
        }
    }
}

/// Result of the backend's operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The root cause of a start-up failure is reachable through `source()`, not only folded
    /// into a message.
    #[test]
    fn a_daemon_error_keeps_its_root_cause() {
        let root = std::io::Error::from_raw_os_error(libc::EMFILE);
        let e = Error::Daemon {
            context: "accepting a frontend",
            source: vhost_user_backend::Error::StartDaemon(root).into(),
        };
        let mut chain: Vec<&dyn std::error::Error> = Vec::new();
        let mut next: Option<&dyn std::error::Error> = Some(&e);
        while let Some(err) = next {
            chain.push(err);
            next = err.source();
        }
        assert_eq!(chain.len(), 3, "error, daemon error, I/O error: {chain:?}");
        let io = chain[2]
            .downcast_ref::<std::io::Error>()
            .expect("the root is the I/O error");
        assert_eq!(io.raw_os_error(), Some(libc::EMFILE));
        assert!(e.to_string().contains("accepting a frontend"), "{e}");
    }
}
