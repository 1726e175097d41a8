//! vhost-user-blk: a virtio-blk device backend that a VMM attaches over a vhost-user socket.
//!
//! The binary is a thin shell over this library: [`args`] parses the command line, [`server`]
//! accepts one VMM connection after another, [`device`] is the virtio-blk device that
//! `vhost-user-backend` drives, [`queue_thread`] is the fast path of each queue thread,
//! [`deferred_path`] the deferred path, [`complete`] the completion step both paths end in,
//! [`used_order`] the order it publishes used entries in, [`guest_warnings`] the rate limit on
//! the warnings a guest can trigger, [`hotplug`] the vCPU pinning and unplug path, [`shared`]
//! the device state the request paths read, [`dirty_log`] the dirty-page log of live migration,
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
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
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
    /// Setting up signal handling failed.
    #[error("signal handling: {0}")]
    Signals(#[source] std::io::Error),
}

/// Result of the backend's operations.
pub type Result<T> = std::result::Result<T, Error>;
