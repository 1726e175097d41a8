//! The backend's lifecycle: open the image, then serve one VMM connection after another on the
//! same socket, and stop cleanly on SIGINT/SIGTERM.
//!
//! `vhost-user-backend`'s per-connection state cannot be reused once a frontend disconnects, so
//! each connection gets a fresh [`BlkDevice`] and `VhostUserDaemon` over the same image and the
//! same counters: a VM reboot, or another VM, attaches without restarting us.
//!
//! A VMM that loses its backend cannot ask for the ring bases: it restarts the next backend at
//! the used index it finds in guest memory. So the two ways a connection ends differ:
//! - asked to stop (SIGINT/SIGTERM, an upgrade): no new chain is popped, every request in flight
//!   completes and is published while the VMM is still connected, and only then do we hang up;
//! - the VMM hung up (it died, or was killed): the requests in flight finish (their memory stays
//!   mapped until then) but nothing more is published to its rings, since the next backend
//!   starts below those entries and would run the requests again.
//!
//! Either way the worker threads are told to exit once nothing is in flight.
//!
//! Setup ends in the sandbox (`sandbox.rs`): Landlock once the image is open, before any thread
//! exists; the seccomp filter on every thread once the sockets are bound, before the first
//! connection is accepted.

use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use disk::{CacheMode, EngineKind, Image, ImageOptions, RbdOptions};
use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::args::BackendArgs;
use crate::control::{self, DeviceInfo};
use crate::device::{BlkDevice, DeviceSettings};
use crate::hotplug::Hotplug;
use crate::limits::IoLimits;
use crate::sandbox::{self, FileAccess};
use crate::stats::DeviceStats;
use crate::workers::QueueWorkers;
use crate::{Error, Result};
use qemu_qmp::{AdapterEvent, QmpAdapter};

/// How long in-flight requests get to finish when a connection ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the signal thread and the connection loop share.
#[derive(Default)]
struct Lifecycle {
    /// SIGINT or SIGTERM arrived.
    stopping: bool,
    /// A connection is being served (or drained).
    connected: bool,
    /// Ends the current connection.
    shutdown: Option<ShutdownHandle>,
    /// The current connection's device, to quiesce before ending the connection.
    device: Option<Arc<BlkDevice>>,
}

/// Run the backend until SIGINT/SIGTERM.
pub fn run(args: &BackendArgs) -> Result<()> {
    block_stop_signals()?;
    let Some(blk_file) = args.blk_file.clone() else {
        // clap requires it unless --print-capabilities, which main handles.
        return Err(Error::Usage("--blk-file is required"));
    };
    let image = Arc::new(
        Image::open_with(
            &ImageOptions {
                path: blk_file,
                read_only: args.read_only,
                cache: args.cache,
                size: args.size,
            },
            &RbdOptions {
                ceph_conf: args.ceph_conf.clone(),
                timeout: Some(Duration::from_secs(args.rbd_timeout)),
                connections: usize::from(
                    args.rbd_connections
                        .unwrap_or_else(|| crate::args::default_rbd_connections(args.num_queues)),
                ),
            },
        )
        .map_err(|source| Error::Image { source })?,
    );
    // An RBD image has its own engine; --io-engine chooses among the file engines (given with
    // an rbd: image, `Cli::check` refused it).
    let engine = if image.is_rbd() {
        EngineKind::Rbd
    } else {
        args.io_engine.unwrap_or(EngineKind::IoUring)
    };
    // A snapshot is served read-only even without --read-only.
    let read_only = args.read_only || image.read_only();
    if args.dontcache_eviction == "fallback" && args.cache == CacheMode::DontCache {
        image.force_dontcache_fallback();
    }
    // Mapped before the sandbox: the mapping outlives the Landlock rules, the path need not.
    let io_limits = Arc::new(match &args.limit_group {
        Some(path) => IoLimits::join_group(path, args.limit)?,
        None => IoLimits::new(args.limit.unwrap_or_default()),
    });
    match io_limits.group() {
        Some(path) => info!(
            "I/O limits of group {}: {}",
            path.display(),
            io_limits.spec()
        ),
        None if args.limit.is_some() => info!("I/O limits: {}", io_limits.spec()),
        None => {}
    }
    // Before the first thread is spawned, so that every thread inherits the domain.
    sandbox::restrict_file_access(args.landlock, &file_access(args, &image))?;
    let serial = virtio_blk::device_id(args.serial.as_deref().unwrap_or("").as_bytes());
    let settings = DeviceSettings {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        read_only,
        logical_block_size: args.logical_block_size,
        serial,
        engine,
        defer_delay: Duration::from_micros(args.defer_delay_us),
        defer_max_bytes: args.defer_max_bytes,
        page_cache_budget: args.page_cache_budget,
        strict_batching: args.strict_batching,
        poll: Duration::from_micros(args.poll_us),
        poll_fixed: args.poll_fixed,
        poll_device: args.poll_device,
        fixed_buffers: args.fixed_buffers && engine == EngineKind::IoUring,
        log_reads: !args.test_unlogged_reads,
        used_order: args.used_order,
        io_limits: io_limits.clone(),
    };
    info!(
        "image {} ({} bytes{}), cache {} (eviction path {}), engine {}, {} queue(s) of {}, deferred completion delay {} us (at once from {} bytes), polling {} us{}{}, used entries in {} order",
        image.path().display(),
        image.capacity(),
        if read_only { ", read-only" } else { "" },
        args.cache,
        image.eviction_path(),
        engine,
        args.num_queues,
        args.queue_size,
        args.defer_delay_us,
        args.defer_max_bytes,
        args.poll_us,
        match (args.poll_us, args.poll_fixed) {
            (0, _) => " (off)",
            (_, true) => " (fixed)",
            (_, false) => " at most (adaptive)",
        },
        if args.poll_device && args.poll_us > 0 {
            " through the device"
        } else {
            ""
        },
        args.used_order,
    );
    if args.fixed_buffers {
        if engine == EngineKind::IoUring {
            info!("guest memory is registered as io_uring fixed buffers: it stays pinned while connected");
        } else {
            warn!("--fixed-buffers applies to the io-uring engine only; ignored");
        }
    }
    if args.test_unlogged_reads {
        warn!("--test-unlogged-reads: a migration will lose the data of reads; tests only");
    }
    if args.page_cache_budget.is_some() && args.cache != CacheMode::Writeback {
        warn!("--page-cache-budget applies to --cache writeback only; ignored");
    }
    let stats = Arc::new(DeviceStats::new(usize::from(args.num_queues)));
    let workers = Arc::new(QueueWorkers::new(usize::from(args.num_queues)));
    let hotplug = Arc::new(
        Hotplug::new(
            usize::from(args.num_queues),
            workers.clone(),
            args.queue_map.clone().unwrap_or_default(),
            args.cpu_affinity.clone().unwrap_or_default(),
            Duration::from_micros(args.defer_delay_us),
        )
        .with_io_limits(io_limits.clone()),
    );
    // Kept alive for the life of the process: dropping it stops the adapter.
    let _qmp = match &args.qmp {
        Some(path) => Some(spawn_qmp_adapter(path.clone(), hotplug.clone())?),
        None => None,
    };
    if let Some(path) = &args.control {
        control::spawn(
            path,
            stats.clone(),
            workers.clone(),
            hotplug.clone(),
            io_limits.clone(),
            DeviceInfo {
                image: image.path().display().to_string(),
                capacity: image.capacity(),
                cache: args.cache.to_string(),
                engine: engine.to_string(),
                read_only,
                eviction_path: image.eviction_path().to_string(),
            },
        )?;
    }

    let (mut listener, socket_name, socket_file) = listen(args)?;
    let lifecycle = Arc::new(Mutex::new(Lifecycle::default()));
    spawn_signal_thread(lifecycle.clone(), socket_file, image.clone())?;
    // Set up: from here on, every thread (and each connection's) runs under the filter.
    sandbox::apply_seccomp_with(
        args.seccomp,
        sandbox::SeccompExtras {
            ceph_client: image.is_rbd(),
        },
    )?;
    info!("listening on {socket_name}");

    loop {
        serve_one(
            &hotplug,
            &settings,
            &image,
            &stats,
            &workers,
            &mut listener,
            &lifecycle,
        )?;
        let stopping = lock(&lifecycle).stopping;
        if stopping {
            info!("stopping: every in-flight request has completed");
            // As when stopped unconnected: an RBD image's cache is written back and its
            // exclusive lock released now; the process exits without dropping the image.
            if let Err(e) = image.close_before_exit() {
                error!("{e}");
            }
            return Ok(());
        }
        info!("frontend disconnected; waiting for the next one on {socket_name}");
    }
}

/// Serve one frontend from accept to disconnect, then drain its in-flight requests.
fn serve_one(
    hotplug: &Hotplug,
    settings: &DeviceSettings,
    image: &Arc<Image>,
    stats: &Arc<DeviceStats>,
    workers: &Arc<QueueWorkers>,
    listener: &mut Listener,
    lifecycle: &Mutex<Lifecycle>,
) -> Result<()> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let device = Arc::new(BlkDevice::new(
        settings,
        image.clone(),
        stats.clone(),
        workers.clone(),
        mem.clone(),
    )?);
    let mut daemon =
        VhostUserDaemon::new("vhost-user-blk".into(), device.clone(), mem).map_err(|e| {
            Error::Daemon {
                context: "creating the daemon",
                source: e.into(),
            }
        })?;
    for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let (Some(completions), Some(pin), Some(timer)) = (
            device.completion_fd(thread),
            device.pin_fd(thread),
            device.timer_fd(thread),
        ) else {
            continue;
        };
        handler
            .register_listener(completions, EventSet::IN, device.completion_event_id())
            .and_then(|()| handler.register_listener(pin, EventSet::IN, device.pin_event_id()))
            .and_then(|()| handler.register_listener(timer, EventSet::IN, device.timer_event_id()))
            .map_err(|source| Error::WorkerEvents {
                context: "registering a worker's completion, re-pin and limits-timer events",
                source,
            })?;
    }

    daemon.start(listener).map_err(|e| Error::Daemon {
        context: "accepting a frontend",
        source: e.into(),
    })?;
    info!("frontend connected");
    device.publish_workers();
    hotplug.apply_pinning();
    let stop_now = {
        let mut state = lock(lifecycle);
        state.connected = true;
        state.shutdown = daemon.shutdown_handle();
        state.device = Some(device.clone());
        state.stopping
    };
    if stop_now {
        quiesce(&device);
        daemon.request_shutdown();
    }
    match daemon.wait() {
        Ok(()) => {}
        Err(e) => warn!("connection ended: {e}"),
    }
    // Whatever completes from now on is not published: the frontend has gone, or after a
    // planned stop, nothing should be left.
    device.frontend_gone();
    {
        let mut state = lock(lifecycle);
        state.shutdown = None;
        state.device = None;
    }

    device.release_throttled();
    if !device.wait_idle(None, DRAIN_TIMEOUT) {
        error!(
            "{} request(s) still in flight {DRAIN_TIMEOUT:?} after the connection ended",
            device.in_flight()
        );
    }
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    drop(daemon);
    for q in stats.snapshot() {
        info!(
            "queue {}: {} requests ({} reads, {} writes, {} flushes, {} errors), {} bytes read, {} bytes written{}",
            q.index,
            q.requests,
            q.reads,
            q.writes,
            q.flushes,
            q.errors,
            q.bytes_read,
            q.bytes_written,
            if q.fixed_buffer_ios > 0 {
                format!(", {} over fixed buffers", q.fixed_buffer_ios)
            } else {
                String::new()
            }
        );
    }
    lock(lifecycle).connected = false;
    Ok(())
}

/// Complete and publish everything in flight while the frontend is still connected.
fn quiesce(device: &BlkDevice) {
    if !device.quiesce(DRAIN_TIMEOUT) {
        error!(
            "{} request(s) still in flight {DRAIN_TIMEOUT:?} after the stop was asked; the next \
             backend will run them again",
            device.in_flight()
        );
    }
}

/// What Landlock leaves reachable once the image is open: the image, the directories where the
/// vhost-user and control sockets are bound (and removed at exit), the QMP socket's directory.
fn file_access(args: &BackendArgs, image: &Image) -> FileAccess {
    let mut access = FileAccess {
        // An RBD image is no file: librados reaches the cluster over TCP instead.
        image: (!image.is_null() && !image.is_rbd()).then(|| image.path().to_owned()),
        image_writable: !image.read_only(),
        tcp_connect: image.is_rbd(),
        ..FileAccess::default()
    };
    for path in [&args.socket_path, &args.control].into_iter().flatten() {
        access.bind_socket(path);
    }
    if let Some(qmp) = &args.qmp {
        access.connect_socket(qmp);
    }
    access
}

/// Follow QEMU's vCPUs through QMP: affinities re-pin, eject requests drain.
fn spawn_qmp_adapter(path: PathBuf, hotplug: Arc<Hotplug>) -> Result<QmpAdapter> {
    info!("following QEMU's vCPUs through QMP at {}", path.display());
    QmpAdapter::spawn(
        path,
        Duration::from_secs(1),
        Box::new(move |event| match event {
            AdapterEvent::Affinity { vcpu, cpus } => hotplug.set_affinity(vcpu, cpus),
            AdapterEvent::Unplug { vcpu } => {
                hotplug.unplug(vcpu);
            }
            AdapterEvent::Plug { vcpu } => hotplug.plug(vcpu),
            AdapterEvent::Gone { vcpu } => info!("vCPU {vcpu} is gone"),
        }),
    )
    .map_err(|source| Error::Qmp { source })
}

/// The listening socket: `--socket-path` (created, a stale file replaced) or `--fd`.
fn listen(args: &BackendArgs) -> Result<(Listener, String, Option<PathBuf>)> {
    if let Some(path) = &args.socket_path {
        let name = path.display().to_string();
        let listener = Listener::new(path, true).map_err(|source| Error::Socket {
            path: name.clone(),
            source,
        })?;
        return Ok((listener, name, Some(path.clone())));
    }
    let Some(fd) = args.fd else {
        return Err(Error::Usage("either --socket-path or --fd is required"));
    };
    // The fd must be an open, listening unix socket; check before taking ownership of it.
    // SAFETY: fcntl(F_GETFD) only queries the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::Socket {
            path: format!("fd {fd}"),
            source: vhost::vhost_user::Error::SocketError(std::io::Error::last_os_error()),
        });
    }
    // SAFETY: the manager handed us this descriptor for our exclusive use (the vhost-user
    // backend conventions), and it was just checked to be open.
    let listener = unsafe { Listener::from_raw_fd(fd) };
    Ok((listener, format!("fd {fd}"), None))
}

fn lock(lifecycle: &Mutex<Lifecycle>) -> std::sync::MutexGuard<'_, Lifecycle> {
    lifecycle.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGINT and SIGTERM: the signals that stop the backend.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// Block SIGINT and SIGTERM in the calling thread. Called before the first thread is spawned:
/// threads inherit the mask, so that only the signal thread's sigwait sees the signals (a thread
/// that did not block them would die of them instead).
fn block_stop_signals() -> Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Signals(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Take SIGINT and SIGTERM (blocked everywhere by [`block_stop_signals`]) on a dedicated thread:
/// an idle backend exits at once; a connected one stops popping chains, completes and publishes
/// what is in flight, then ends the connection and exits.
fn spawn_signal_thread(
    lifecycle: Arc<Mutex<Lifecycle>>,
    socket_file: Option<PathBuf>,
    image: Arc<Image>,
) -> Result<()> {
    let set = stop_signals();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            info!("signal {sig}: stopping");
            let (device, handle) = {
                let mut state = lock(&lifecycle);
                state.stopping = true;
                if !state.connected {
                    if let Some(path) = &socket_file {
                        let _ = std::fs::remove_file(path);
                    }
                    // An RBD image's cache is written back and its exclusive lock released
                    // now, rather than when the cluster notices this client is gone.
                    if let Err(e) = image.close_before_exit() {
                        error!("{e}");
                    }
                    std::process::exit(0);
                }
                (state.device.clone(), state.shutdown.take())
            };
            // Outside the lock: the connection loop takes it when the connection ends.
            if let Some(device) = device {
                quiesce(&device);
            }
            if let Some(handle) = handle {
                handle.shutdown();
            }
            // The connection loop sees the connection end and returns.
        })
        .map_err(Error::Signals)?;
    Ok(())
}
