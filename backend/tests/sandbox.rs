//! The sandbox, end to end.
//!
//! - A system call outside the allowlist kills a process under `--seccomp on` with SIGSYS, and is
//!   let through and logged under `--seccomp log`; both leave an audit record (`type=1326`) in
//!   the kernel log. The filter is the backend's own ([`sandbox::apply_seccomp`]), put on a child
//!   process: this test binary run again with [`PROBE_ENV`] set, which makes [`sandbox_probe`]
//!   sandbox itself and try the forbidden call. Nothing in the backend binary exists for tests.
//! - Under `on`, opening a file fails with `EACCES` instead of killing.
//! - Landlock leaves the image and the sockets' directories reachable and nothing else.
//! - The backend runs every thread under the filter, those a connection creates included, and a
//!   workload through every path (queues, deferred completions, discard, flush, pinning,
//!   reconnect, SIGTERM) makes no call outside the allowlist (`--seccomp log`, checked in the
//!   kernel log).

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::blk::T_FLUSH;
use common::{Backend, BackendOpts, Device, Segment, TempDir, Transfer, S_OK};
use serde_json::json;
use vhost_user_blk::sandbox::{self, FileAccess, LandlockMode, SeccompMode};

/// Set in the child: which probe [`sandbox_probe`] runs.
const PROBE_ENV: &str = "VHOST_USER_BLK_SANDBOX_PROBE";
/// Set in the child of the Landlock probe: its scratch directory.
const PROBE_DIR_ENV: &str = "VHOST_USER_BLK_SANDBOX_PROBE_DIR";

/// `SECCOMP_RET_LOG`, as the audit record's `code=` shows it.
const RET_LOG: &str = "code=0x7ffc0000";
/// `SECCOMP_RET_KILL_PROCESS`.
const RET_KILL_PROCESS: &str = "code=0x80000000";

// ---- the child side ----

/// In a child started by [`run_probe`]: sandbox this process and do what the probe says. In the
/// ordinary test run (no [`PROBE_ENV`]), nothing.
#[test]
fn sandbox_probe() {
    let Ok(probe) = std::env::var(PROBE_ENV) else {
        return;
    };
    no_core_dumps();
    match probe.as_str() {
        "seccomp-on-inet-socket" => {
            sandbox::apply_seccomp(SeccompMode::On).expect("seccomp on");
            let fd = inet_socket();
            println!("PROBE-SURVIVED socket(AF_INET) = {fd}");
        }
        "seccomp-log-inet-socket" => {
            sandbox::apply_seccomp(SeccompMode::Log).expect("seccomp log");
            let fd = inet_socket();
            println!("PROBE-SURVIVED socket(AF_INET) = {fd}");
        }
        "seccomp-on-ordinary-life" => {
            sandbox::apply_seccomp(SeccompMode::On).expect("seccomp on");
            // A thread, allocations, a unix socket, an eventfd: what the backend does.
            let worker = std::thread::spawn(|| vec![7u8; 1 << 20].iter().map(|&b| b as u64).sum());
            let sum: u64 = worker.join().expect("thread");
            // SAFETY: socket takes no pointers; the descriptor is leaked (the probe exits).
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) } >= 0;
            // SAFETY: eventfd takes no pointers.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            let open = File::open("/proc/self/status").map_err(|e| e.raw_os_error());
            println!(
                "PROBE-RESULT sum={sum} unix={unix} eventfd={} open={open:?}",
                efd >= 0
            );
        }
        "landlock" => {
            let dir = PathBuf::from(std::env::var(PROBE_DIR_ENV).expect("probe directory"));
            let access = FileAccess {
                image: Some(dir.join("files/disk.img")),
                image_writable: true,
                socket_dirs: vec![dir.join("sockets")],
                connect_dirs: Vec::new(),
                tcp_connect: false,
            };
            sandbox::restrict_file_access(LandlockMode::On, &access).expect("landlock");
            let rw = |p: &Path| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(p)
                    .map(|_| ())
                    .map_err(|e| e.kind())
            };
            let bind = |p: &Path| UnixListener::bind(p).map(|_| ()).map_err(|e| e.kind());
            let tcp = std::net::TcpListener::bind("127.0.0.1:0")
                .map(|_| ())
                .map_err(|e| e.kind());
            println!(
                "PROBE-RESULT image={:?} neighbour={:?} socket_dir={:?} image_dir_socket={:?} \
                 tcp_bind={tcp:?} etc={:?}",
                rw(&dir.join("files/disk.img")),
                rw(&dir.join("files/other.img")),
                bind(&dir.join("sockets/s.sock")),
                bind(&dir.join("files/s.sock")),
                File::open("/etc/passwd").map(|_| ()).map_err(|e| e.kind()),
            );
        }
        other => panic!("unknown probe {other}"),
    }
}

/// `socket(AF_INET, SOCK_STREAM)`: the backend never talks to a network, so it is not allowed.
fn inet_socket() -> i32 {
    // SAFETY: socket takes no pointers; the descriptor is leaked on purpose (the probe exits).
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }
}

/// A probe killed with SIGSYS would otherwise leave a core file behind.
fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit for the call to read.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

// ---- the parent side ----

/// Runs [`sandbox_probe`] in a child process with `probe` (and `env`), returns its pid and
/// output.
fn run_probe(probe: &str, env: &[(&str, &Path)]) -> (u32, Output) {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "sandbox_probe",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(PROBE_ENV, probe)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("starting the probe");
    let pid = child.id();
    let output = child.wait_with_output().expect("waiting for the probe");
    (pid, output)
}

/// What the probe printed, stdout then stderr.
fn stdout(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Where the kernel's audit records of seccomp actions can be read here, if they can: `dmesg`'s
/// `/dev/kmsg`, when no audit daemon takes them to its own log instead.
fn kernel_log_readable() -> Option<&'static str> {
    if File::open("/dev/kmsg").is_err() {
        return Some("/dev/kmsg is not readable");
    }
    let auditd = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "auditd"));
    auditd.then_some("auditd takes the audit records")
}

/// The kernel log's seccomp audit records (`type=1326`) of process `pid`.
fn seccomp_records(pid: u32) -> Vec<String> {
    let Ok(mut kmsg) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let needle = format!(" pid={pid} ");
    let mut records = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let line = String::from_utf8_lossy(&buf[..n]);
                if line.contains("type=1326") && line.contains(&needle) {
                    records.push(line.trim().to_string());
                }
            }
            // A record overwritten while we read: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    records
}

/// The seccomp records of `pid` once one matches `want` (they come through kauditd, a moment
/// after the call), or all of them after 3 s.
fn wait_for_record(pid: u32, want: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let records = seccomp_records(pid);
        if records.iter().any(|r| want(r)) || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn syscall_of(record: &str) -> Option<i64> {
    record
        .split_whitespace()
        .find_map(|f| f.strip_prefix("syscall="))
        .and_then(|n| n.parse().ok())
}

#[test]
fn unlisted_syscall_kills_the_process_under_seccomp_on() {
    let (pid, output) = run_probe("seccomp-on-inet-socket", &[]);
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGSYS),
        "socket(AF_INET) under --seccomp on must kill the process with SIGSYS; it ended with \
         {} and printed:\n{}",
        output.status,
        stdout(&output)
    );
    assert!(!stdout(&output).contains("PROBE-SURVIVED"));
    match kernel_log_readable() {
        Some(why) => eprintln!("audit record not checked: {why}"),
        None => {
            let records = wait_for_record(pid, |r| r.contains(RET_KILL_PROCESS));
            assert!(
                records.iter().any(|r| r.contains(RET_KILL_PROCESS)
                    && r.contains("sig=31")
                    && syscall_of(r) == Some(libc::SYS_socket)),
                "no audit record of the kill (syscall={}) for pid {pid}: {records:#?}",
                libc::SYS_socket
            );
        }
    }
}

#[test]
fn unlisted_syscall_is_allowed_and_logged_under_seccomp_log() {
    let (pid, output) = run_probe("seccomp-log-inet-socket", &[]);
    let out = stdout(&output);
    assert!(
        output.status.success(),
        "--seccomp log must not stop the process: {}\n{out}",
        output.status
    );
    let fd: i32 = out
        .lines()
        .find_map(|l| l.split_once("PROBE-SURVIVED socket(AF_INET) = "))
        .map(|(_, n)| n)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("the probe did not report its socket:\n{out}"));
    assert!(fd >= 0, "socket(AF_INET) failed under --seccomp log: {fd}");
    match kernel_log_readable() {
        Some(why) => eprintln!("audit record not checked: {why}"),
        None => {
            let want = |r: &str| r.contains(RET_LOG) && syscall_of(r) == Some(libc::SYS_socket);
            let records = wait_for_record(pid, want);
            assert!(
                records.iter().any(|r| want(r)),
                "no audit record of the logged socket call for pid {pid}: {records:#?}"
            );
        }
    }
}

#[test]
fn seccomp_on_lets_ordinary_work_through_and_refuses_opens() {
    let (_, output) = run_probe("seccomp-on-ordinary-life", &[]);
    let out = stdout(&output);
    assert!(output.status.success(), "{}\n{out}", output.status);
    assert!(
        out.contains(&format!(
            "PROBE-RESULT sum={} unix=true eventfd=true open=Err(Some({}))",
            7u64 << 20,
            libc::EACCES
        )),
        "a thread, memory, a unix socket pair and an eventfd work; open fails with EACCES:\n{out}"
    );
}

/// Landlock's ABI on this kernel, 0 without Landlock.
fn landlock_abi() -> i64 {
    // SAFETY: with a null attribute and LANDLOCK_CREATE_RULESET_VERSION, the call only returns
    // the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    v.max(0)
}

#[test]
fn landlock_leaves_the_image_and_socket_directories_reachable_and_nothing_else() {
    let abi = landlock_abi();
    if abi == 0 {
        eprintln!("this kernel has no Landlock: nothing to check");
        return;
    }
    let dir = TempDir::new("landlock");
    fs::create_dir_all(dir.path().join("files")).expect("files dir");
    fs::create_dir_all(dir.path().join("sockets")).expect("sockets dir");
    for name in ["disk.img", "other.img"] {
        File::create(dir.path().join("files").join(name)).expect("scratch file");
    }
    let (_, output) = run_probe("landlock", &[(PROBE_DIR_ENV, dir.path())]);
    let out = stdout(&output);
    assert!(output.status.success(), "{}\n{out}", output.status);
    let denied = format!("{:?}", Err::<(), _>(ErrorKind::PermissionDenied));
    let tcp = if abi >= 4 { denied.as_str() } else { "Ok(())" };
    let want = format!(
        "PROBE-RESULT image=Ok(()) neighbour={denied} socket_dir=Ok(()) \
         image_dir_socket={denied} tcp_bind={tcp} etc={denied}"
    );
    assert!(out.contains(&want), "want {want}, got:\n{out}");
}

// ---- the backend itself ----

/// The pid of the backend listening on `socket` (its command line names the socket).
fn backend_pid(socket: &Path) -> u32 {
    let needle = socket.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0).any(|arg| arg == needle)
                    && c.starts_with(env!("CARGO_BIN_EXE_vhost-user-blk").as_bytes())
            })
        })
        .unwrap_or_else(|| panic!("no backend process for {}", socket.display()))
}

/// `field` of each of process `pid`'s threads' status: thread name → value.
fn thread_status(pid: u32, field: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        let value = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((value("Name"), value(field)));
    }
    out
}

/// Attaches a frontend, writes, reads, flushes, discards and writes zeroes on every queue, asks
/// for `stats` over the control socket; returns the attached device.
fn workload(b: &Backend, num_queues: usize) -> Device {
    let mut d = b.connect_queues(num_queues);
    let data = vec![0xa5u8; 64 << 10];
    for q in 0..num_queues {
        let sector = 4096 * q as u64;
        assert_eq!(d.write(q, sector, &data).status, S_OK, "write on queue {q}");
        let c = d.read(q, sector, data.len() as u32);
        assert_eq!(c.status, S_OK, "read on queue {q}");
        assert!(c.data == data, "queue {q} reads back what it wrote");
        assert_eq!(d.flush(q).status, S_OK, "flush on queue {q}");
        assert_eq!(
            d.discard(q, &[Segment::new(sector, 64)]).status,
            S_OK,
            "discard on queue {q}"
        );
        assert_eq!(
            d.write_zeroes(q, &[Segment::new(sector + 64, 64)], false)
                .status,
            S_OK,
            "write-zeroes on queue {q}"
        );
        let c = d.queue(q).execute(&Transfer::blk(T_FLUSH, 0, &[], 0));
        assert_eq!(c.status, S_OK, "second flush on queue {q}");
    }
    if b.control.is_some() {
        assert!(b.stats()["queues"].is_array(), "stats");
    }
    d
}

#[test]
fn every_backend_thread_runs_under_the_filter() {
    let b = Backend::spawn(&BackendOpts {
        num_queues: 2,
        control: true,
        ..BackendOpts::default()
    });
    let pid = backend_pid(&b.socket);
    // The connection's threads (vhost-user handler, a worker and a deferred worker per queue)
    // exist while the frontend is attached; the filter was installed before they were created.
    let _attached = workload(&b, 2);
    let threads = thread_status(pid, "Seccomp");
    assert!(threads.len() >= 5, "threads: {threads:?}");
    for (name, mode) in &threads {
        assert_eq!(
            mode, "2",
            "thread {name} is not in seccomp filter mode: {threads:?}"
        );
    }
    for (name, filters) in thread_status(pid, "Seccomp_filters") {
        assert_eq!(filters, "2", "thread {name}: filters");
    }
    for (name, nnp) in thread_status(pid, "NoNewPrivs") {
        assert_eq!(nnp, "1", "thread {name}: no_new_privs");
    }
    let log = b.log();
    assert!(log.contains("seccomp filter on"), "{log}");
    if landlock_abi() > 0 {
        assert!(
            log.contains(&format!("Landlock ABI {}", landlock_abi().min(9))),
            "{log}"
        );
    }
}

#[test]
fn seccomp_off_installs_no_filter() {
    let b = Backend::spawn(&BackendOpts {
        extra_args: vec!["--seccomp".into(), "off".into()],
        ..BackendOpts::default()
    });
    let pid = backend_pid(&b.socket);
    let _attached = workload(&b, 1);
    for (name, mode) in thread_status(pid, "Seccomp") {
        assert_eq!(mode, "0", "thread {name}");
    }
}

/// Options for a backend under `--seccomp log`.
fn log_mode(opts: BackendOpts) -> BackendOpts {
    BackendOpts {
        extra_args: [
            opts.extra_args.clone(),
            vec!["--seccomp".into(), "log".into()],
        ]
        .concat(),
        ..opts
    }
}

/// Runs `workload` against `b` (started under `--seccomp log`), stops it with SIGTERM and returns
/// the system calls outside the allowlist that the kernel logged for it, but `open`/`openat`
/// (which `on` refuses with `EACCES` rather than kill: glibc's arena set-up reads
/// `/sys/devices/system/cpu/online` and copes without it).
fn unlisted_calls(mut b: Backend, workload: impl Fn(&Backend)) -> BTreeSet<i64> {
    let pid = backend_pid(&b.socket);
    workload(&b);
    // SAFETY: kill takes no pointers; `pid` is our backend.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.is_running() {
        assert!(
            Instant::now() < deadline,
            "backend ignored SIGTERM:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // kauditd prints the records a moment after the calls.
    std::thread::sleep(Duration::from_millis(300));
    let refused_opens = [
        libc::SYS_openat,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_open,
    ];
    seccomp_records(pid)
        .iter()
        .filter_map(|r| syscall_of(r))
        .filter(|nr| !refused_opens.contains(nr))
        .collect()
}

#[test]
fn the_backend_makes_no_unlisted_call_in_any_mode() {
    if let Some(why) = kernel_log_readable() {
        eprintln!("cannot read the audit records ({why}): nothing to check");
        return;
    }
    let cases = [
        (
            "writeback, io_uring, 2 queues, pinning and unplug",
            "writeback",
            "io-uring",
            2,
        ),
        ("dontcache, io_uring", "dontcache", "io-uring", 1),
        ("none (O_DIRECT), sync engine", "none", "sync", 1),
    ];
    for (what, cache, io_engine, num_queues) in cases {
        let extra_args = if num_queues == 2 {
            vec!["--queue-map".into(), "0=0,1=1".into()]
        } else {
            Vec::new()
        };
        let unlisted = unlisted_calls(
            Backend::spawn(&log_mode(BackendOpts {
                num_queues,
                cache,
                io_engine,
                control: true,
                extra_args,
                ..BackendOpts::default()
            })),
            |b| {
                let attached = workload(b, num_queues);
                if num_queues == 2 {
                    // Pinning and the unplug path: sched_setaffinity on the workers.
                    let r = b.control(&json!({"cmd": "set-cpu-affinity", "vcpu": 0, "cpus": "0"}));
                    assert_eq!(r["ok"], true, "{r}");
                    let r = b.control(&json!({"cmd": "vcpu-unplug", "vcpu": 1}));
                    assert!(r.get("error").is_none(), "{r}");
                    let r = b.control(&json!({"cmd": "vcpu-plug", "vcpu": 1}));
                    assert_eq!(r["ok"], true, "{r}");
                }
                // A second connection: a VM reboot.
                drop(attached);
                workload(b, num_queues);
            },
        );
        assert!(
            unlisted.is_empty(),
            "{what}: the backend made system calls outside the allowlist: {unlisted:?} (add them \
             to sandbox::allowed_syscalls if they are legitimate)"
        );
    }
}

/// A loop device over a file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// `None` where loop devices cannot be set up (not root, no `losetup`, a container).
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = String::from_utf8(out.stdout).ok()?;
        Some(LoopDevice(PathBuf::from(dev.trim())))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_block_device_image_makes_no_unlisted_call() {
    if let Some(why) = kernel_log_readable() {
        eprintln!("cannot read the audit records ({why}): nothing to check");
        return;
    }
    let dir = TempDir::new("sandbox-blkdev");
    let backing = dir.path().join("backing.img");
    File::create(&backing)
        .and_then(|f| f.set_len(64 << 20))
        .expect("backing file");
    let Some(dev) = LoopDevice::attach(&backing) else {
        eprintln!("cannot attach a loop device here: nothing to check");
        return;
    };
    let socket = dir.path().join("vhost.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&dev.0)
        .args(["--cache", "writeback", "--seccomp", "log"]);
    let b = Backend::start(cmd, dir, socket, dev.0.clone(), None);
    assert!(
        b.log().contains("Landlock ABI") || landlock_abi() == 0,
        "{}",
        b.log()
    );
    // Discard and write-zeroes are BLKDISCARD and BLKZEROOUT on a block device.
    let unlisted = unlisted_calls(b, |b| {
        let d = workload(b, 1);
        drop(d);
    });
    assert!(
        unlisted.is_empty(),
        "block device: the backend made system calls outside the allowlist: {unlisted:?}"
    );
}
