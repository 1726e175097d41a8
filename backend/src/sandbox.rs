//! The sandbox the backend enters once it is set up: Landlock confines its file access, then a
//! seccomp filter confines its system calls, on every thread.
//!
//! `server.rs` calls [`restrict_file_access`] right after the image is open, while the process
//! still has one thread, so that every thread inherits the Landlock domain (kernels before 7.0
//! cannot apply one to threads that already exist). It calls [`apply_seccomp`] once the
//! listening socket and the control socket are bound and the QMP adapter, control and signal
//! threads run, before the first connection is accepted: the filter goes onto every existing
//! thread at once (`SECCOMP_FILTER_FLAG_TSYNC`), and the threads each connection creates (queue
//! threads, deferred workers, the vhost-user handler) inherit it.
//!
//! The allowlist is what the backend calls after setup, found by tracing the end-to-end tests and
//! VM boots (`strace -f` of the backend, split at the "listening on" log line) and by running
//! with `--seccomp log`: memory management and threads (Rust std and glibc), the vhost-user
//! socket (`recvmsg`/`sendmsg` with file descriptors, guest memory `mmap`s), the fast path
//! (`io_uring_*`, `eventfd2`, `epoll_*`), the deferred path (`timerfd_*`, `fdatasync`,
//! `sync_file_range`, `fadvise64`), the image's discard and write-zeroes (`fallocate`,
//! `BLKDISCARD`/`BLKZEROOUT`), the synchronous engine (`preadv2`/`pwritev2`), thread pinning
//! (`sched_setaffinity` of the calling thread only), the disk engine's offload worker lowering
//! its own priority (`setpriority` of the calling thread only), the QMP adapter (`socket(AF_UNIX)`,
//! `connect`) and the socket file's removal at exit (`unlink`). Arguments are checked where that
//! closes a door: no executable mappings, `clone` only for threads, `socket` only `AF_UNIX`,
//! `ioctl` only the two block-range requests, `prctl` only `PR_SET_NAME`, `tgkill` only to our
//! own process, `sched_setaffinity` only on the calling thread. `open`/`openat` fail with
//! `EACCES` instead of killing the process: glibc's `malloc` reads
//! `/sys/devices/system/cpu/online` when a new thread needs an arena and falls back to
//! `sched_getaffinity` when it cannot, and nothing else opens a file after setup.
//!
//! A system call outside the list kills the process with `SIGSYS` (`--seccomp on`, the default,
//! as virtiofsd does): a backend that a guest made do something it never does is compromised,
//! and failing loudly beats carrying on. The kernel logs each kill as an audit record
//! (`type=1326 … syscall=N`, in `dmesg` or the audit log); `--seccomp log` lets every call
//! through and logs those outside the list instead, which is how to find a missing one.
//!
//! With an RBD image, librados and librbd run threads of their own, started when the image is
//! opened (before Landlock: kernels before 7.0 leave them unconfined by it). They reach the
//! cluster over TCP, so Landlock then leaves TCP `connect` allowed ([`FileAccess::tcp_connect`])
//! and the filter adds what a Ceph client calls ([`SeccompExtras::ceph_client`]).
//!
//! io_uring requests are not seen by seccomp; the disk crate restricts each ring
//! (`IORING_REGISTER_RESTRICTIONS`) to reads, writes, fsyncs and fallocates of the image's fixed
//! file, and Landlock still confines what a ring could open.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use landlock::{
    Access, AccessFs, AccessNet, LandlockStatus, PathBeneath, PathFd, RestrictSelfAttr,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use log::{info, warn};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::{Error, Result};

/// The block-range ioctls from <linux/fs.h> that discard and write-zeroes use on a block device.
mod blk_ioctl {
    use vmm_sys_util::ioctl_io_nr;

    ioctl_io_nr!(BLKDISCARD, 0x12, 119);
    ioctl_io_nr!(BLKZEROOUT, 0x12, 127);
}

/// The Landlock ABI whose file-system rights the ruleset handles: v9 adds
/// `LANDLOCK_ACCESS_FS_RESOLVE_UNIX` (connecting to a pathname socket, the QMP socket here).
const LANDLOCK_FS_ABI: ABI = ABI::V9;

/// What the seccomp filter does with a system call outside the allowlist (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SeccompMode {
    /// Kill the process with `SIGSYS` (the kernel logs an audit record of the call).
    #[default]
    On,
    /// Let the call through and log an audit record of it: for finding what the list misses.
    Log,
    /// No filter.
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// Whether Landlock confines the backend's file access (`--landlock`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LandlockMode {
    /// Confine file access where the kernel has Landlock; carry on unconfined (with a warning)
    /// where it has not.
    #[default]
    On,
    /// No Landlock ruleset.
    Off,
}

impl fmt::Display for LandlockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LandlockMode::On => "on",
            LandlockMode::Off => "off",
        })
    }
}

/// The file-system access the backend keeps once its image is open: everything else is denied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileAccess {
    /// The image (a regular file or a block device), `None` for a null image. Its descriptors
    /// are already open; the rule only keeps it reachable.
    pub image: Option<PathBuf>,
    /// Whether the image may be opened for writing.
    pub image_writable: bool,
    /// Whether TCP connections stay allowed: an RBD image's librados connects to the Ceph
    /// monitors and OSDs, again whenever a session drops. TCP `bind` stays denied.
    pub tcp_connect: bool,
    /// Directories where a unix socket is still to be bound (a stale one replaced first) and is
    /// removed at exit: the vhost-user socket's and the control socket's.
    pub socket_dirs: Vec<PathBuf>,
    /// Directories of unix sockets the backend connects to: the QMP socket's (QEMU may create it
    /// afresh, so the rule is on its directory). Only kernels with Landlock ABI 9 restrict such
    /// connections.
    pub connect_dirs: Vec<PathBuf>,
}

impl FileAccess {
    /// Allows binding and removing the unix socket `path`.
    pub fn bind_socket(&mut self, path: &Path) {
        push_unique(&mut self.socket_dirs, parent_dir(path));
    }

    /// Allows connecting to the unix socket `path`, or to one created later at that path.
    pub fn connect_socket(&mut self, path: &Path) {
        push_unique(&mut self.connect_dirs, parent_dir(path));
    }
}

fn push_unique(dirs: &mut Vec<PathBuf>, dir: PathBuf) {
    if !dirs.contains(&dir) {
        dirs.push(dir);
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Confines the calling thread, and every thread it creates from now on, to `access` with
/// Landlock (`--landlock on`); a no-op with [`LandlockMode::Off`].
///
/// Best effort: the rights the running kernel's Landlock knows are enforced, and the log says
/// which ABI that is, or that Landlock is unavailable (then the backend runs unconfined). TCP
/// `bind`/`connect` (ABI 4) and abstract unix sockets and signals to processes outside the
/// sandbox (ABI 6) are denied as well. Call it before any thread is spawned: before Linux 7.0
/// a Landlock domain cannot be put on the threads that already exist.
pub fn restrict_file_access(mode: LandlockMode, access: &FileAccess) -> Result<()> {
    if mode == LandlockMode::Off {
        warn!("Landlock is off (--landlock off): file access is not confined");
        return Ok(());
    }
    let status = landlock_ruleset(access)?;
    log_landlock_status(&status, access);
    Ok(())
}

fn landlock_ruleset(access: &FileAccess) -> Result<RestrictionStatus> {
    let err = |context: String| {
        move |source: landlock::RulesetError| Error::Sandbox {
            context: format!("Landlock: {context}"),
            source: source.into(),
        }
    };
    let mut image_rights = AccessFs::ReadFile.into();
    if access.image_writable {
        image_rights |= AccessFs::WriteFile;
    }
    let socket_rights = AccessFs::MakeSock | AccessFs::RemoveFile;

    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_FS_ABI))
        .and_then(|r| {
            r.handle_access(if access.tcp_connect {
                AccessNet::BindTcp.into()
            } else {
                AccessNet::from_all(ABI::V4)
            })
        })
        .and_then(|r| r.scope(Scope::from_all(ABI::V6)))
        .and_then(|r| r.create())
        .map_err(err("creating the ruleset".into()))?;
    let mut rules: Vec<(&Path, landlock::BitFlags<AccessFs>)> = Vec::new();
    if let Some(image) = &access.image {
        rules.push((image, image_rights));
    }
    rules.extend(
        access
            .socket_dirs
            .iter()
            .map(|d| (d.as_path(), socket_rights)),
    );
    rules.extend(
        access
            .connect_dirs
            .iter()
            .map(|d| (d.as_path(), AccessFs::ResolveUnix.into())),
    );
    for (path, rights) in rules {
        let context = || format!("allowing {rights:?} on {}", path.display());
        let fd = PathFd::new(path).map_err(|source| Error::Sandbox {
            context: format!("Landlock: opening {} for a rule", path.display()),
            source: source.into(),
        })?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(err(context()))?;
    }
    ruleset
        .all_threads(true)
        .and_then(|r| r.restrict_self())
        .map_err(err("enforcing the ruleset".into()))
}

fn log_landlock_status(status: &RestrictionStatus, access: &FileAccess) {
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        LandlockStatus::NotEnabled => {
            warn!(
                "Landlock is built into this kernel but not enabled (add it to the lsm= boot \
                 parameter): file access is not confined"
            );
            return;
        }
        LandlockStatus::NotImplemented => {
            warn!("this kernel has no Landlock: file access is not confined");
            return;
        }
    };
    let how = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "enforced as far as the kernel's ABI goes",
        RulesetStatus::NotEnforced => {
            warn!("Landlock (ABI {abi}) enforced nothing: file access is not confined");
            return;
        }
    };
    let mut allowed = Vec::new();
    if let Some(image) = &access.image {
        let rw = if access.image_writable { "rw" } else { "ro" };
        allowed.push(format!("{} ({rw})", image.display()));
    }
    allowed.extend(
        access
            .socket_dirs
            .iter()
            .map(|d| format!("{}/ (socket create/remove)", d.display())),
    );
    allowed.extend(
        access
            .connect_dirs
            .iter()
            .map(|d| format!("{}/ (socket connect)", d.display())),
    );
    info!(
        "Landlock ABI {abi} {how}: file access confined to {}; {}",
        if allowed.is_empty() {
            "nothing".to_string()
        } else {
            allowed.join(", ")
        },
        if access.tcp_connect {
            "TCP connect allowed (RBD), no TCP bind"
        } else {
            "no TCP"
        }
    );
}

/// Puts the seccomp filter of `mode` on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`);
/// threads created afterwards inherit it. A no-op with [`SeccompMode::Off`].
///
/// This also sets `PR_SET_NO_NEW_PRIVS`. Fails if a thread already has a different filter.
pub fn apply_seccomp(mode: SeccompMode) -> Result<()> {
    apply_seccomp_with(mode, SeccompExtras::default())
}

/// What the seccomp filter allows beyond the backend's own system calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeccompExtras {
    /// librados's and librbd's threads, serving an RBD image: TCP sockets to the monitors and
    /// OSDs (`socket(AF_INET/AF_INET6)`, any `setsockopt`, `getsockopt`, `getsockname`,
    /// `getpeername`), `uname` (its timers read the host name), and `accept`/`poll` for its
    /// admin socket, which it binds before the filter is on. Found with `--seccomp log` over the
    /// RBD end-to-end tests.
    pub ceph_client: bool,
}

/// As [`apply_seccomp`], allowing `extras` as well.
pub fn apply_seccomp_with(mode: SeccompMode, extras: SeccompExtras) -> Result<()> {
    if mode == SeccompMode::Off {
        warn!("seccomp is off (--seccomp off): system calls are not filtered");
        return Ok(());
    }
    let programs = seccomp_programs_with(mode, extras)?;
    for program in &programs {
        seccompiler::apply_filter_all_threads(program)
            .map_err(|e| seccomp_error("installing the filter on every thread", e))?;
    }
    match mode {
        SeccompMode::On => info!(
            "seccomp filter on ({} system calls allowed): any other kills the process with \
             SIGSYS (see the audit log or dmesg, type=1326)",
            allowed_syscalls_with(extras)?.len()
        ),
        _ => warn!(
            "seccomp filter in log mode: system calls outside the allowlist are allowed and \
             logged (audit log or dmesg, type=1326)"
        ),
    }
    Ok(())
}

/// The BPF programs [`apply_seccomp`] installs for `mode`, in order (none for
/// [`SeccompMode::Off`]).
///
/// With [`SeccompMode::On`], a filter that makes `open`/`openat` fail with `EACCES`, then the
/// allowlist (anything else kills the process); the kernel takes the stricter verdict of the
/// two. With [`SeccompMode::Log`], the allowlist alone, logging anything else (`open`/`openat`
/// included).
pub fn seccomp_programs(mode: SeccompMode) -> Result<Vec<BpfProgram>> {
    seccomp_programs_with(mode, SeccompExtras::default())
}

/// As [`seccomp_programs`], allowing `extras` as well.
pub fn seccomp_programs_with(mode: SeccompMode, extras: SeccompExtras) -> Result<Vec<BpfProgram>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| seccomp_error("no filter for this architecture", e))?;
    let compile = |rules, mismatch, matched| {
        SeccompFilter::new(rules, mismatch, matched, arch)
            .and_then(BpfProgram::try_from)
            .map_err(|e| seccomp_error("compiling the filter", e))
    };
    let mut allowed = allowed_syscalls_with(extras)?;
    match mode {
        SeccompMode::Off => Ok(Vec::new()),
        SeccompMode::Log => Ok(vec![compile(
            allowed,
            SeccompAction::Log,
            SeccompAction::Allow,
        )?]),
        SeccompMode::On => {
            let refused: BTreeMap<i64, Vec<SeccompRule>> =
                refused_opens().into_iter().map(|nr| (nr, vec![])).collect();
            allowed.extend(refused.keys().map(|&nr| (nr, vec![])));
            // The allowlist goes on last: installing a filter takes prctl and seccomp calls
            // that it does not allow.
            Ok(vec![
                compile(
                    refused,
                    SeccompAction::Allow,
                    SeccompAction::Errno(libc::EACCES as u32),
                )?,
                compile(allowed, SeccompAction::KillProcess, SeccompAction::Allow)?,
            ])
        }
    }
}

/// The system calls that fail with `EACCES` in [`SeccompMode::On`].
fn refused_opens() -> Vec<i64> {
    vec![
        libc::SYS_openat,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_open,
    ]
}

fn seccomp_error(context: &str, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Sandbox {
        context: format!("seccomp: {context}"),
        source: Box::new(source),
    }
}

/// One condition on argument `arg` of a system call.
fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, len, op, value)
        .map_err(|e| seccomp_error("building a filter condition", e))
}

/// A rule of the given conditions, all of which must hold.
fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conditions).map_err(|e| seccomp_error("building a filter rule", e))
}

/// A rule that allows the call when each listed 32-bit argument equals its value.
fn args_eq(args: &[(u8, u64)]) -> Result<SeccompRule> {
    rule(
        args.iter()
            .map(|&(arg, value)| cond(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value))
            .collect::<Result<_>>()?,
    )
}

/// Rules that allow the call when the 32-bit argument `arg` is one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>> {
    values.iter().map(|&v| args_eq(&[(arg, v)])).collect()
}

/// A rule that allows the call when none of the `bits` is set in the 32-bit argument `arg`.
fn arg_without(arg: u8, bits: u64) -> Result<Vec<SeccompRule>> {
    Ok(vec![rule(vec![cond(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(bits),
        0,
    )?])?])
}

/// The allowlist with `extras` added.
pub fn allowed_syscalls_with(extras: SeccompExtras) -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut map = allowed_syscalls()?;
    if extras.ceph_client {
        let ip = [
            libc::AF_UNIX as u64,
            libc::AF_INET as u64,
            libc::AF_INET6 as u64,
        ];
        map.insert(libc::SYS_socket, arg_in(0, &ip)?);
        for nr in [
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_uname,
            libc::SYS_ppoll,
        ] {
            map.insert(nr, Vec::new());
        }
        #[cfg(target_arch = "x86_64")]
        for nr in [libc::SYS_accept, libc::SYS_poll] {
            map.insert(nr, Vec::new());
        }
    }
    Ok(map)
}

/// The allowlist: each system call the backend makes after setup, with the conditions on its
/// arguments (an empty list allows it whatever the arguments).
pub fn allowed_syscalls() -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let any = Vec::new;
    let unix = libc::AF_UNIX as u64;
    let clone_thread = libc::CLONE_THREAD as u64;
    let exec = libc::PROT_EXEC as u64;
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    let list: Vec<(i64, Vec<SeccompRule>)> = vec![
        // Memory: the allocator, thread stacks, guest memory regions (memfds the VMM passes).
        // Nothing is ever mapped executable.
        (libc::SYS_brk, any()),
        (libc::SYS_mmap, arg_without(2, exec)?),
        (libc::SYS_mprotect, arg_without(2, exec)?),
        (libc::SYS_munmap, any()),
        (libc::SYS_mremap, any()),
        (libc::SYS_madvise, any()),
        // Threads: creation (glibc tries clone3 first), start-up, exit; locks; abort().
        (libc::SYS_clone3, any()),
        (
            libc::SYS_clone,
            vec![rule(vec![cond(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(clone_thread),
                clone_thread,
            )?])?],
        ),
        (libc::SYS_set_robust_list, any()),
        (libc::SYS_rseq, any()),
        (libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64])?),
        (libc::SYS_sigaltstack, any()),
        (libc::SYS_rt_sigprocmask, any()),
        (libc::SYS_rt_sigaction, any()),
        (libc::SYS_rt_sigreturn, any()),
        (libc::SYS_rt_sigtimedwait, any()),
        (libc::SYS_restart_syscall, any()),
        (libc::SYS_futex, any()),
        (libc::SYS_sched_yield, any()),
        (libc::SYS_gettid, any()),
        (libc::SYS_getpid, any()),
        (libc::SYS_tgkill, arg_in(0, &[pid])?),
        (libc::SYS_exit, any()),
        (libc::SYS_exit_group, any()),
        (libc::SYS_getrandom, any()),
        // Time: log timestamps and sleeps, where the vDSO falls back to the kernel.
        (libc::SYS_clock_gettime, any()),
        (libc::SYS_clock_nanosleep, any()),
        // Descriptors: eventfds, sockets, stderr.
        (libc::SYS_read, any()),
        (libc::SYS_write, any()),
        (libc::SYS_close, any()),
        (
            libc::SYS_fcntl,
            arg_in(
                1,
                &[
                    libc::F_DUPFD_CLOEXEC as u64,
                    libc::F_GETFD as u64,
                    libc::F_SETFD as u64,
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                ],
            )?,
        ),
        // Event loops: the queue threads' epoll (kicks, ring completions, re-pin requests), the
        // deferred workers' timerfd and eventfd.
        (libc::SYS_epoll_create1, any()),
        (libc::SYS_epoll_ctl, any()),
        (libc::SYS_epoll_pwait, any()),
        (libc::SYS_eventfd2, any()),
        (libc::SYS_timerfd_create, any()),
        (libc::SYS_timerfd_settime, any()),
        // The fast path's rings, one per queue, set up per connection.
        (libc::SYS_io_uring_setup, any()),
        (libc::SYS_io_uring_enter, any()),
        (libc::SYS_io_uring_register, any()),
        // The image: the synchronous engine and fallbacks, flush, discard, write-zeroes,
        // dontcache eviction.
        (libc::SYS_preadv2, any()),
        (libc::SYS_pwritev2, any()),
        (libc::SYS_fdatasync, any()),
        (libc::SYS_fallocate, any()),
        (libc::SYS_sync_file_range, any()),
        (libc::SYS_fadvise64, any()),
        (
            libc::SYS_ioctl,
            arg_in(1, &[blk_ioctl::BLKDISCARD(), blk_ioctl::BLKZEROOUT()])?,
        ),
        // vhost-user and control connections (file descriptors travel with SCM_RIGHTS), the QMP
        // adapter's (re)connections, timeouts on its socket.
        (libc::SYS_accept4, any()),
        (libc::SYS_recvmsg, any()),
        (libc::SYS_sendmsg, any()),
        (libc::SYS_recvfrom, any()),
        (libc::SYS_sendto, any()),
        (libc::SYS_shutdown, any()),
        (libc::SYS_socket, arg_in(0, &[unix])?),
        (libc::SYS_connect, any()),
        (
            libc::SYS_setsockopt,
            [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]
                .iter()
                .map(|&opt| args_eq(&[(1, libc::SOL_SOCKET as u64), (2, opt as u64)]))
                .collect::<Result<_>>()?,
        ),
        // Pinning: queue threads and deferred workers pin themselves (pid 0); the QMP adapter
        // reads the vCPU threads' affinity; glibc reads a new thread's own.
        (libc::SYS_sched_getaffinity, any()),
        (libc::SYS_sched_setaffinity, arg_in(0, &[0])?),
        // The disk engine's offload worker lowers its own priority (PRIO_PROCESS, itself).
        (
            libc::SYS_setpriority,
            vec![args_eq(&[(0, libc::PRIO_PROCESS as u64), (1, 0)])?],
        ),
        // The socket file, removed at exit.
        (libc::SYS_unlinkat, any()),
    ];
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = list.into_iter().collect();
    #[cfg(target_arch = "x86_64")]
    {
        map.insert(libc::SYS_epoll_wait, any());
        map.insert(libc::SYS_unlink, any());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_this_architecture() {
        assert_eq!(seccomp_programs(SeccompMode::Off).expect("off").len(), 0);
        assert_eq!(
            seccomp_programs(SeccompMode::Log)
                .expect("log filter")
                .len(),
            1
        );
        let on = seccomp_programs(SeccompMode::On).expect("on filters");
        assert_eq!(on.len(), 2);
        assert!(on
            .iter()
            .all(|p| !p.is_empty() && p.len() < usize::from(u16::MAX)));
    }

    #[test]
    fn tcp_sockets_and_uname_only_for_a_ceph_client() {
        let plain = allowed_syscalls().expect("allowlist");
        let ceph = allowed_syscalls_with(SeccompExtras { ceph_client: true }).expect("ceph");
        for nr in [libc::SYS_uname, libc::SYS_getsockname, libc::SYS_getsockopt] {
            assert!(
                !plain.contains_key(&nr) && ceph.contains_key(&nr),
                "syscall {nr}"
            );
        }
        // socket() stays conditioned on the family: AF_UNIX, plus AF_INET/AF_INET6 for Ceph.
        assert_eq!(plain[&libc::SYS_socket].len(), 1);
        assert_eq!(ceph[&libc::SYS_socket].len(), 3);
        for nr in [
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_bind,
            libc::SYS_listen,
        ] {
            assert!(!ceph.contains_key(&nr), "syscall {nr} stays out for Ceph");
        }
    }

    #[test]
    fn the_allowlist_has_no_process_or_file_creation() {
        let allowed = allowed_syscalls().expect("allowlist");
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_openat,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_mknodat,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_memfd_create,
        ] {
            assert!(!allowed.contains_key(&nr), "syscall {nr} is allowed");
        }
        for nr in [
            libc::SYS_io_uring_enter,
            libc::SYS_recvmsg,
            libc::SYS_mmap,
            libc::SYS_fdatasync,
            libc::SYS_clone3,
        ] {
            assert!(allowed.contains_key(&nr), "syscall {nr} is missing");
        }
    }

    #[test]
    fn socket_rules_cover_their_directory() {
        let mut access = FileAccess::default();
        access.bind_socket(Path::new("/run/vub/vhost.sock"));
        access.bind_socket(Path::new("/run/vub/control.sock"));
        access.bind_socket(Path::new("relative.sock"));
        access.connect_socket(Path::new("/run/qemu/qmp.sock"));
        assert_eq!(
            access.socket_dirs,
            vec![PathBuf::from("/run/vub"), PathBuf::from(".")]
        );
        assert_eq!(access.connect_dirs, vec![PathBuf::from("/run/qemu")]);
    }
}
