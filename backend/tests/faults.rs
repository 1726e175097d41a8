//! Faults around the guest: an image that fails I/O, a frontend that dies with requests in
//! flight, and SIGTERM with writes in flight.
//!
//! The failing image is the disk crate's fault injection (`DISK_FAIL_SECTORS=START-END`, read
//! when the image is opened: I/O touching those sectors fails with `EIO`). The hook is compiled
//! into the backend binary only with `disk/fault-injection`; backend/Cargo.toml turns it on for
//! every build that compiles dev-dependencies, so the plain `cargo test --workspace` runs these
//! tests against a binary that has it, while `cargo build` ships one that does not. The first
//! thing each fault test checks is the backend's "fault injection" log line, so a build without
//! the hook fails loudly instead of passing vacuously.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::blk::{T_IN, T_OUT};
use common::ring::{Ticket, UNWRITTEN_BYTE};
use common::{
    pattern, socket_path, Backend, Device, Options, Segment, TempDir, Transfer, SECTOR_SIZE,
    S_IOERR, S_OK,
};

/// The failing sectors: 4 KiB, 2 MiB into the disk.
const FAIL_START: u64 = 4096;
const FAIL_END: u64 = 4104;
const IMAGE_SIZE: u64 = 64 << 20;

/// Paths of one backend run.
struct Paths {
    dir: TempDir,
    socket: PathBuf,
    image: PathBuf,
    control: PathBuf,
}

/// The backend command on a fresh sparse image: two queues, a control socket if `control`,
/// `args` after.
fn command(tag: &str, control: bool, args: &[&str], env: &[(&str, &str)]) -> (Command, Paths) {
    let dir = TempDir::new(tag);
    let image = dir.path().join("disk.img");
    let socket = socket_path(&dir, "vhost.sock");
    let control_path = socket_path(&dir, "control.sock");
    File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("creating the image");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&image)
        .arg("--num-queues")
        .arg("2");
    if control {
        cmd.arg("--control").arg(&control_path);
    }
    cmd.args(args).env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let paths = Paths {
        dir,
        socket,
        image,
        control: control_path,
    };
    (cmd, paths)
}

/// Starts the backend through the shared driver (killed on drop, log shown on failure).
fn spawn(tag: &str, args: &[&str], env: &[(&str, &str)]) -> Backend {
    let (cmd, p) = command(tag, true, args, env);
    Backend::start(cmd, p.dir, p.socket, p.image, Some(p.control))
}

/// Polls `check` for up to 5 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn queue_stat(stats: &serde_json::Value, queue: u64, path: &[&str]) -> u64 {
    let q = stats["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["index"].as_u64() == Some(queue)))
        .unwrap_or_else(|| panic!("queue {queue} missing in {stats}"));
    let mut v = q;
    for key in path {
        v = &v[*key];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path:?} of queue {queue} missing in {stats}"))
}

/// The injection hook must be in the binary, or every assertion below would test nothing.
fn assert_injection_active(b: &Backend) {
    let wanted = format!("fault injection: sectors {FAIL_START}..{FAIL_END} fail with EIO");
    assert!(
        b.log().contains(&wanted),
        "the backend did not announce fault injection ({wanted:?}): it was built without \
         `disk/fault-injection`. backend/Cargo.toml enables it through a dev-dependency, so \
         `cargo test` builds the binary with it; check that the dev-dependency is still there. \
         Backend log:\n{}",
        b.log()
    );
}

/// An image that fails I/O on some sectors: the guest gets IOERR for each request touching
/// them and for nothing else, on every engine and cache mode; the errors are completed through
/// the deferred path (`deferred_in_task`) and counted; the other queue never notices.
#[test]
fn injected_eio_fails_only_the_requests_that_touch_the_bad_sectors() {
    let fail = format!("{FAIL_START}-{FAIL_END}");
    for (engine, cache) in [
        ("io-uring", "writeback"),
        ("io-uring", "none"),
        ("sync", "writeback"),
        ("io-uring", "dontcache"),
    ] {
        let what = format!("{engine}, cache {cache}");
        let b = spawn(
            "faults",
            &["--io-engine", engine, "--cache", cache],
            &[("DISK_FAIL_SECTORS", &fail)],
        );
        assert_injection_active(&b);
        // Known bytes from 64 sectors before the bad ones up to their end.
        let old = pattern(1, ((FAIL_END - FAIL_START + 64) * SECTOR_SIZE) as usize);
        let old_at = (FAIL_START - 64) * SECTOR_SIZE;
        b.write_image(old_at, &old);
        let mut d = b.connect_queues(2);

        let mut failures = 0u64;
        let mut expect = |c: common::Completion, status: u8, req: &str| {
            assert_eq!(c.status, status, "{what}: {req}");
            if status != S_OK {
                assert_eq!(c.used_len, 1, "{what}: {req}: used length");
                assert!(
                    c.data.iter().all(|&x| x == UNWRITTEN_BYTE),
                    "{what}: {req}: data written for a failed read"
                );
                failures += 1;
            }
        };
        let q = d.queue(0);
        expect(
            q.write(FAIL_START, &pattern(2, 4096)),
            S_IOERR,
            "write of the bad sectors",
        );
        expect(q.read(FAIL_START, 4096), S_IOERR, "read of the bad sectors");
        expect(
            q.read(FAIL_START - 4, 4096),
            S_IOERR,
            "read crossing into them",
        );
        expect(
            q.read(FAIL_END - 1, 4096),
            S_IOERR,
            "read starting on the last",
        );
        expect(
            q.discard(&[Segment::new(FAIL_START, 8)]),
            S_IOERR,
            "discard of them",
        );
        expect(
            q.write_zeroes(&[Segment::new(FAIL_START - 8, 16)], false),
            S_IOERR,
            "write-zeroes over them",
        );
        let r = q.read(FAIL_START - 8, 4096);
        expect(r.clone(), S_OK, "read just before");
        assert!(
            r.data == old[56 * 512..64 * 512],
            "{what}: data just before"
        );
        expect(
            q.write(FAIL_END, &pattern(3, 4096)),
            S_OK,
            "write just after",
        );
        expect(q.flush(), S_OK, "flush");

        // Interleaved in flight: each request gets its own answer.
        let tickets: Vec<(Ticket, u8)> = (0..32u64)
            .map(|k| {
                let bad = k % 3 == 0;
                let sector = if bad { FAIL_START } else { 8192 + 8 * k };
                let t = if k % 2 == 0 {
                    Transfer::blk(T_OUT, sector, &pattern(k, 4096), 0)
                } else {
                    Transfer::blk(T_IN, sector, &[], 4096)
                };
                (q.submit(&t), if bad { S_IOERR } else { S_OK })
            })
            .collect();
        for (t, status) in tickets {
            let c = d.queue(0).complete(t);
            expect(c, status, "interleaved request");
        }

        // The other queue, meanwhile, sees nothing wrong.
        for k in 0..8u64 {
            assert_eq!(d.write(1, 16384 + 8 * k, &pattern(k, 4096)).status, S_OK);
            assert_eq!(d.read(1, 16384 + 8 * k, 4096).status, S_OK);
        }
        assert!(
            b.image_bytes(old_at, old.len()) == old,
            "{what}: the failed requests changed the image"
        );

        let mut stats = serde_json::Value::Null;
        eventually("the error counters", || {
            stats = b.stats();
            queue_stat(&stats, 0, &["errors"]) == failures
        });
        assert_eq!(
            queue_stat(&stats, 1, &["errors"]),
            0,
            "{what}: queue 1 errors"
        );
        let in_task = queue_stat(&stats, 0, &["deferred_worker", "deferred_in_task"]);
        let pushed = queue_stat(&stats, 0, &["deferred_worker", "pushed"]);
        assert!(
            in_task > 0,
            "{what}: the errors went through complete_in_task: {stats}"
        );
        eprintln!(
            "{what}: {failures} injected failures; deferred_in_task {in_task}, pushed {pushed}"
        );
        assert!(
            b.log().contains("failed; the guest gets IOERR"),
            "{what}: the deferred path reported the errors"
        );
    }
}

/// The frontend vanishes (as with `kill -9` of QEMU: the socket closes, nothing is stopped
/// first) with writes in flight: they finish, the backend goes back to listening, and the next
/// frontend is served and finds the writes in the image.
#[test]
fn frontend_dying_mid_io_leaves_the_backend_serving_the_next() {
    // dontcache writes wait for the deferred worker, here 300 ms: in flight for sure.
    let mut b = spawn(
        "frontend-dies",
        &[
            "--cache",
            "dontcache",
            "--defer-delay-us",
            "300000",
            "--strict-batching",
        ],
        &[],
    );
    let mut d = b.connect_queues(2);
    let mut tickets = Vec::new();
    for q in 0..2usize {
        for k in 0..32u64 {
            let sector = 2048 * q as u64 + 8 * k;
            let data = pattern(100 * q as u64 + k, 4096);
            let t = d.queue(q).submit(&Transfer::blk(T_OUT, sector, &data, 0));
            tickets.push(t);
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        d.queue(0)
            .wait_used(Duration::ZERO)
            .expect_err("writes still in flight"),
        common::WaitError::Timeout
    );
    // The frontend is gone: socket, eventfds, its mappings.
    drop(d);
    drop(tickets);
    eventually("the backend to go back to listening", || {
        b.log()
            .contains("frontend disconnected; waiting for the next one")
    });
    assert!(b.is_running(), "the backend survived its frontend dying");

    let mut d = b.connect_queues(2);
    for q in 0..2usize {
        for k in 0..32u64 {
            let sector = 2048 * q as u64 + 8 * k;
            let r = d.read(1 - q, sector, 4096);
            assert_eq!(r.status, S_OK, "next frontend reads");
            assert!(
                r.data == pattern(100 * q as u64 + k, 4096),
                "the write in flight on queue {q} (request {k}) reached the image"
            );
        }
        assert_eq!(d.write(q, 1 << 16, &pattern(7, 4096)).status, S_OK);
    }
}

/// A backend process we own (for its pid).
struct Owned {
    child: Child,
    log: PathBuf,
    paths: Paths,
}

impl Owned {
    fn start(tag: &str, control: bool, args: &[&str]) -> Self {
        let (mut cmd, paths) = command(tag, control, args, &[]);
        let log = paths.dir.path().join("backend.log");
        let out = File::create(&log).expect("creating the log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("starting the backend");
        let me = Self { child, log, paths };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_socket(&me.paths.socket) {
            assert!(
                Instant::now() < deadline,
                "no socket; log:\n{}",
                me.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        me
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the backend") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the backend did not exit within {within:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- backend log ----\n{}", self.log_text());
        }
    }
}

fn is_socket(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// SIGTERM while writes are in flight: each completes (OK in the used ring, its data in the
/// image) before the process exits, with status 0.
#[test]
fn sigterm_with_writes_in_flight_completes_them_then_exits_0() {
    sigterm_with_writes_in_flight(false);
}

/// The same with `--control`.
#[test]
fn sigterm_with_a_control_socket_completes_writes_in_flight_then_exits_0() {
    sigterm_with_writes_in_flight(true);
}

fn sigterm_with_writes_in_flight(control: bool) {
    let mut b = Owned::start(
        "sigterm",
        control,
        &[
            "--cache",
            "dontcache",
            "--defer-delay-us",
            "500000",
            "--strict-batching",
        ],
    );
    let mut d = Device::connect(
        &b.paths.socket,
        &Options {
            num_queues: Some(2),
            ..Options::default()
        },
    )
    .expect("attaching");
    let mut tickets = Vec::new();
    for q in 0..2usize {
        for k in 0..32u64 {
            let sector = 4096 * q as u64 + 16 * k;
            let data = pattern(1000 + 100 * q as u64 + k, 8192);
            let t = d.queue(q).submit(&Transfer::blk(T_OUT, sector, &data, 0));
            tickets.push((q, sector, data, t));
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    for q in 0..2 {
        assert_eq!(
            d.queue(q).wait_used(Duration::ZERO),
            Err(common::WaitError::Timeout),
            "queue {q}: writes still in flight when SIGTERM is sent"
        );
    }
    b.signal(libc::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; log:\n{}",
        b.log_text()
    );
    let image = fs::read(&b.paths.image).expect("reading the image");
    for (q, sector, data, t) in tickets {
        let c = d.queue(q).complete(t);
        assert_eq!(
            (c.status, c.used_len),
            (S_OK, 1),
            "queue {q}: write at sector {sector} completed before the exit"
        );
        let at = (sector * SECTOR_SIZE) as usize;
        assert!(
            image[at..at + data.len()] == data[..],
            "queue {q}: write at sector {sector} is in the image"
        );
    }
    assert!(
        b.log_text()
            .contains("stopping: every in-flight request has completed"),
        "log:\n{}",
        b.log_text()
    );
}

/// A queue thread that polls (`--poll-us --poll-device`) while its driver never lets it idle
/// still goes back to its epoll loop at least every millisecond, so a re-pin (a vCPU's new host
/// CPUs) reaches it under load instead of waiting for the load to stop.
#[test]
fn a_polling_queue_thread_under_constant_load_still_takes_a_re_pin() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped: a re-pin needs two CPUs to move between");
        return;
    }
    let b = spawn(
        "repin-poll",
        &[
            "--cache",
            "writeback",
            "--poll-us",
            "1000",
            "--poll-device",
            "--queue-map",
            "0=0,1=0",
        ],
        &[],
    );
    let mut d = b.connect(&Options {
        num_queues: Some(1),
        ..Options::default()
    });
    let pin = |cpus: &str| {
        let r = b.control(&serde_json::json!({"cmd": "set-cpu-affinity", "vcpu": 0, "cpus": cpus}));
        assert_eq!(r["ok"], true, "set-cpu-affinity {cpus}: {r}");
    };
    pin("0");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let q = d.queue(0);
        let stop = &stop;
        let client = s.spawn(move || {
            let mut served = 0u64;
            // One read at a time, resubmitted at once: the polling thread always has the next
            // one within its window.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = q.submit(&Transfer::blk(T_IN, 8 * (served % 64), &[], 4096));
                assert_eq!(q.complete(t).status, S_OK);
                served += 1;
            }
            served
        });
        std::thread::sleep(Duration::from_millis(300));
        pin("1");
        let deadline = Instant::now() + Duration::from_secs(5);
        let moved = loop {
            let lists = worker_cpu_lists(b.pid());
            if lists.iter().any(|l| l == "1") {
                break true;
            }
            if Instant::now() > deadline {
                eprintln!("vring_worker CPUs: {lists:?}");
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let served = client.join().expect("the client thread");
        assert!(
            moved,
            "the polling queue thread took the re-pin to CPU 1 within 5 s"
        );
        assert!(
            served >= 100,
            "the client kept the queue busy: {served} reads"
        );
    });
}

/// `Cpus_allowed_list` of each of `pid`'s `vring_worker` threads (the queue threads).
fn worker_cpu_lists(pid: u32) -> Vec<String> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vring_worker")
        })
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .collect()
}
