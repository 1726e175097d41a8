//! Restarts and disconnects with requests in flight, seen from the guest: the test frontend
//! acts as QEMU does when it loses its backend — it cannot ask for the ring base any more, so it
//! restarts each ring of the next backend at the used index it finds in guest memory — and the
//! guest must see every request it made completed exactly once: none lost (a chain below the
//! used index that nobody ran), none repeated (a used entry for a head already returned).
//!
//! Requests are made to complete out of order without touching the disk: under `--cache
//! writeback`, a FLUSH waits for the deferred worker (held here for 300 ms by
//! `--defer-delay-us` and `--strict-batching`) while the writes behind it complete at once.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::blk::{T_FLUSH, T_OUT};
use common::{pattern, socket_path, Backend, Device, Options, TempDir, Transfer, SECTOR_SIZE};

/// How long the deferred worker holds a FLUSH (and `dontcache` writes) before completing it.
const HOLD_US: &str = "300000";
const IMAGE_SIZE: u64 = 64 << 20;

/// One image and one socket path that backend after backend serves.
struct Run {
    /// Holds the image and the socket; removed on drop.
    _dir: TempDir,
    socket: PathBuf,
    image: PathBuf,
}

impl Run {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("creating the image");
        let socket = socket_path(&dir, "vhost.sock");
        Self {
            _dir: dir,
            socket,
            image,
        }
    }

    /// A backend on the run's image and socket, one queue, `args` after the defaults.
    fn start(&self, args: &[&str]) -> Backend {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
        cmd.arg("--socket-path")
            .arg(&self.socket)
            .arg("--blk-file")
            .arg(&self.image)
            .arg("--num-queues")
            .arg("1")
            .args(args)
            .env("RUST_LOG", "info");
        // Each backend logs into its own directory; the image and socket are the run's.
        let _ = std::fs::remove_file(&self.socket);
        Backend::start(
            cmd,
            TempDir::new("log"),
            self.socket.clone(),
            self.image.clone(),
            None,
        )
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let image = std::fs::read(&self.image).expect("reading the image");
        image[offset as usize..offset as usize + len].to_vec()
    }
}

fn options() -> Options {
    Options {
        num_queues: Some(1),
        ..Options::default()
    }
}

/// Writeback, with FLUSH held by the deferred worker: writes submitted after a flush complete
/// before it. Used entries in available-ring order, the option that makes a crash exact.
const OUT_OF_ORDER: &[&str] = &[
    "--cache",
    "writeback",
    "--defer-delay-us",
    HOLD_US,
    "--strict-batching",
    "--used-order",
    "avail",
];

/// The requests one test makes: a FLUSH, then `WRITES` 4 KiB writes, each a known pattern.
const WRITES: u64 = 8;

fn write_sector(k: u64) -> u64 {
    64 + 8 * k
}

/// Submits the FLUSH and the writes on queue 0; returns every head, the flush's first.
fn submit_flush_then_writes(d: &mut Device) -> Vec<u16> {
    let q = d.queue(0);
    let mut heads = vec![q.submit(&Transfer::blk(T_FLUSH, 0, &[], 0)).head()];
    for k in 0..WRITES {
        let data = pattern(k, 4096);
        heads.push(
            q.submit(&Transfer::blk(T_OUT, write_sector(k), &data, 0))
                .head(),
        );
    }
    heads
}

/// Submits `WRITES` writes (held together by the deferred worker under `dontcache`).
fn submit_writes(d: &mut Device) -> Vec<u16> {
    let q = d.queue(0);
    (0..WRITES)
        .map(|k| {
            let data = pattern(k, 4096);
            q.submit(&Transfer::blk(T_OUT, write_sector(k), &data, 0))
                .head()
        })
        .collect()
}

/// Every used entry queue 0 returns until each of `heads` has one and nothing more comes for
/// `quiet`, counted per head (entries for other heads too), up to `timeout` in all.
fn used_counts(
    d: &mut Device,
    heads: &[u16],
    quiet: Duration,
    timeout: Duration,
) -> HashMap<u32, usize> {
    let deadline = Instant::now() + timeout;
    let mut counts: HashMap<u32, usize> = HashMap::new();
    loop {
        let all = heads.iter().all(|h| counts.contains_key(&u32::from(*h)));
        let wait = if all {
            quiet
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match d.queue(0).wait_used(wait) {
            Ok(u) => *counts.entry(u.id).or_default() += 1,
            Err(_) => return counts,
        }
    }
}

fn assert_exactly_once(counts: &HashMap<u32, usize>, heads: &[u16], what: &str) {
    for h in heads {
        assert_eq!(
            counts.get(&u32::from(*h)).copied().unwrap_or(0),
            1,
            "{what}: head {h} (used entries per head: {counts:?})"
        );
    }
    assert_eq!(
        counts.len(),
        heads.len(),
        "{what}: used entries for heads never submitted: {counts:?}"
    );
}

fn assert_writes_in_image(run: &Run, what: &str) {
    for k in 0..WRITES {
        assert!(
            run.image_bytes(write_sector(k) * SECTOR_SIZE, 4096) == pattern(k, 4096),
            "{what}: write {k} is in the image"
        );
    }
}

fn signal(b: &Backend, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(b.pid()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child, which has not been reaped (the Backend owns it).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

fn wait_exit(b: &mut Backend, within: Duration) {
    let deadline = Instant::now() + within;
    while b.is_running() {
        assert!(
            Instant::now() < deadline,
            "the backend did not exit within {within:?}; log:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to 5 s) until the backend's log contains `line`.
fn wait_log(b: &Backend, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.log().contains(line) {
        assert!(
            Instant::now() < deadline,
            "no {line:?} in the log:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM (an upgrade) with a FLUSH held and the writes behind it done: the backend completes
/// and publishes everything while QEMU is still connected, then hangs up; the used index QEMU
/// finds at the hang-up is final, and the next backend has nothing left to run.
#[test]
fn sigterm_publishes_everything_before_hanging_up() {
    let run = Run::new("sigterm-order");
    let mut b1 = run.start(OUT_OF_ORDER);
    let mut d = b1.connect(&options());
    let heads = submit_flush_then_writes(&mut d);
    std::thread::sleep(Duration::from_millis(50));

    signal(&b1, libc::SIGTERM);
    assert!(
        d.wait_hang_up(Duration::from_secs(30)),
        "the backend hung up after SIGTERM; log:\n{}",
        b1.log()
    );
    // What QEMU reads when it sees the hang-up, and restarts the next backend from.
    let base = d.queue(0).used_idx_in_memory();
    wait_exit(&mut b1, Duration::from_secs(30));
    assert_eq!(
        d.queue(0).used_idx_in_memory(),
        base,
        "the backend published used entries after it hung up; log:\n{}",
        b1.log()
    );
    assert_eq!(
        base,
        heads.len() as u16,
        "every request was published before the hang-up"
    );

    let b2 = run.start(OUT_OF_ORDER);
    d.reattach(&run.socket, &options())
        .unwrap_or_else(|e| panic!("reattaching: {e}; log:\n{}", b2.log()));
    let counts = used_counts(
        &mut d,
        &heads,
        Duration::from_millis(500),
        Duration::from_secs(10),
    );
    assert_exactly_once(&counts, &heads, "SIGTERM, then the next backend");
    assert_writes_in_image(&run, "SIGTERM");
}

/// QEMU goes away (hangs up without stopping the rings) with writes held by the deferred
/// worker: they finish on the image, but nothing more is published to the rings of the gone
/// frontend; the next frontend session, restarted at the used index, runs them again and
/// every request completes exactly once.
#[test]
fn nothing_is_published_after_the_frontend_hangs_up() {
    let run = Run::new("hang-up");
    let b = run.start(&[
        "--cache",
        "dontcache",
        "--defer-delay-us",
        HOLD_US,
        "--strict-batching",
    ]);
    let mut d = b.connect(&options());
    let heads = submit_writes(&mut d);
    std::thread::sleep(Duration::from_millis(50));
    d.hang_up();
    let base = d.queue(0).used_idx_in_memory();
    wait_log(&b, "frontend disconnected; waiting for the next one");
    assert_eq!(
        d.queue(0).used_idx_in_memory(),
        base,
        "the backend published used entries to a frontend that had hung up; log:\n{}",
        b.log()
    );

    d.reattach(&run.socket, &options())
        .unwrap_or_else(|e| panic!("reattaching: {e}; log:\n{}", b.log()));
    let counts = used_counts(
        &mut d,
        &heads,
        Duration::from_millis(500),
        Duration::from_secs(10),
    );
    assert_exactly_once(&counts, &heads, "hang-up, then the next session");
    assert_writes_in_image(&run, "hang-up");
}

/// SIGKILL (a crash) with the writes done and the FLUSH before them still held: the used index
/// the next backend starts from must not have passed the flush, or it would run the writes
/// behind the index again and never run the flush. Every request completes exactly once.
#[test]
fn sigkill_with_completions_out_of_order_loses_and_repeats_nothing() {
    let run = Run::new("sigkill-order");
    let mut b1 = run.start(OUT_OF_ORDER);
    let mut d = b1.connect(&options());
    let heads = submit_flush_then_writes(&mut d);
    // The writes are done on the image well before the flush is let go.
    std::thread::sleep(Duration::from_millis(100));
    signal(&b1, libc::SIGKILL);
    wait_exit(&mut b1, Duration::from_secs(10));

    let b2 = run.start(OUT_OF_ORDER);
    d.reattach(&run.socket, &options())
        .unwrap_or_else(|e| panic!("reattaching: {e}; log:\n{}", b2.log()));
    let counts = used_counts(
        &mut d,
        &heads,
        Duration::from_millis(500),
        Duration::from_secs(10),
    );
    assert_exactly_once(&counts, &heads, "SIGKILL, then the next backend");
    assert_writes_in_image(&run, "SIGKILL");
}

/// The same when the frontend hangs up instead: the used index it reads at the hang-up must not
/// have passed the held FLUSH.
#[test]
fn hang_up_with_completions_out_of_order_loses_and_repeats_nothing() {
    let run = Run::new("hang-up-order");
    let b = run.start(OUT_OF_ORDER);
    let mut d = b.connect(&options());
    let heads = submit_flush_then_writes(&mut d);
    std::thread::sleep(Duration::from_millis(100));
    d.hang_up();
    wait_log(&b, "frontend disconnected; waiting for the next one");

    d.reattach(&run.socket, &options())
        .unwrap_or_else(|e| panic!("reattaching: {e}; log:\n{}", b.log()));
    let counts = used_counts(
        &mut d,
        &heads,
        Duration::from_millis(500),
        Duration::from_secs(10),
    );
    assert_exactly_once(&counts, &heads, "hang-up, then the next session");
    assert_writes_in_image(&run, "hang-up");
}
