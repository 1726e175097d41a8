//! RBD images end to end: the backend serves `rbd:` images of a real single-node Ceph cluster
//! (`rbd::testing`, one per test binary, started by the first test that needs it) to the
//! in-process frontend, and the tests check what a guest sees and what the cluster holds
//! (`rbd export`): data, flush, discard, write-zeroes, GET_ID, read-only images and snapshots,
//! a cluster failing requests, two backends handing the image over, and the start-up errors.

#![cfg(feature = "rbd")]
// A test may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use common::blk::{self, feature};
use common::{pattern, socket_path, Backend, Device, Segment, TempDir, SECTOR_SIZE, S_IOERR, S_OK};
use rbd::testing::{TestCluster, POOL};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-blk");

/// Tests share one cluster; the one that freezes its OSD runs alone (the others would stall).
static CLUSTER_USE: RwLock<()> = RwLock::new(());

fn shared_cluster() -> (RwLockReadGuard<'static, ()>, &'static TestCluster) {
    let guard = CLUSTER_USE.read().unwrap_or_else(|e| e.into_inner());
    (guard, TestCluster::shared())
}

fn exclusive_cluster() -> (RwLockWriteGuard<'static, ()>, &'static TestCluster) {
    let guard = CLUSTER_USE.write().unwrap_or_else(|e| e.into_inner());
    (guard, TestCluster::shared())
}

/// Start the backend on `rbd:rbd/IMAGE:conf=...` with `extra` options.
fn spawn_rbd(image: &str, conf: Option<PathBuf>, extra: &[&str]) -> Backend {
    let c = TestCluster::shared();
    let dir = TempDir::new("rbd");
    let socket = socket_path(&dir, "vhost.sock");
    let conf = conf.unwrap_or_else(|| c.conf().to_owned());
    let spec = format!("rbd:{POOL}/{image}:conf={}", conf.display());
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&spec)
        .args(extra);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    Backend::start(cmd, dir, socket, PathBuf::from(spec), None)
}

/// Stop a backend with SIGTERM and wait for it, so that it closes the image and releases its
/// exclusive lock: after a SIGKILL the next writer waits for the dead owner's watch to expire
/// (30 s by default), as it would after a crash. Returns its log.
fn stop(mut b: Backend) -> String {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(b.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.is_running() {
        assert!(
            Instant::now() < deadline,
            "backend ignored SIGTERM:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.log()
}

#[test]
fn data_flush_and_get_id_round_trip_through_the_cluster() {
    let (_shared, c) = shared_cluster();
    for cache in ["none", "writeback"] {
        let image = format!("rw-{cache}");
        c.create_image(&image, 16 << 20);
        let b = spawn_rbd(
            &image,
            None,
            &[
                "--num-queues",
                "2",
                "--cache",
                cache,
                "--serial",
                "rbd-e2e-1",
            ],
        );
        let mut d = b.connect_queues(2);
        assert_eq!(d.capacity_bytes(), 16 << 20, "capacity from the image");
        assert!(b.log().contains("engine rbd"), "the RBD engine serves it");
        // Queue 1 reads through a connection of its own, unless librbd's cache is on.
        let connections = if cache == "none" {
            "2 cluster connections"
        } else {
            "one cluster connection for all I/O instead of 2: librbd's cache"
        };
        assert!(b.log().contains(connections), "{cache}: {}", b.log());
        let seed = if cache == "none" { 1 } else { 100 };
        // Two queues, several objects (4 MiB each), a request across an object boundary.
        let writes = [
            (0usize, 0u64, 64usize << 10),
            (1, 8192 - 16, 16 << 10),
            (0, (4 << 20) / 512 * 3 - 8, 128 << 10),
        ];
        for (i, &(q, sector, len)) in writes.iter().enumerate() {
            let w = d.write(q, sector, &pattern(seed + i as u64, len));
            assert_eq!(w.status, S_OK, "write {i} ({cache})");
        }
        assert_eq!(d.flush(1).status, S_OK, "flush ({cache})");
        for (i, &(q, sector, len)) in writes.iter().enumerate() {
            let r = d.read(1 - q, sector, len as u32);
            assert_eq!(r.status, S_OK, "read {i} ({cache})");
            assert!(
                r.data == pattern(seed + i as u64, len),
                "read {i} back ({cache})"
            );
        }
        let id = d.get_id(0, blk::ID_BYTES as u32);
        assert_eq!(id.status, S_OK);
        assert_eq!(&id.data[..9], b"rbd-e2e-1");
        // What the cluster holds, seen by another client, after the flush.
        let exported = c.export(&image);
        for (i, &(_, sector, len)) in writes.iter().enumerate() {
            let at = (sector * SECTOR_SIZE) as usize;
            assert!(
                exported[at..at + len] == pattern(seed + i as u64, len)[..],
                "write {i} in the exported image ({cache})"
            );
        }
        drop(d);
        stop(b);
    }
}

#[test]
fn reads_through_every_connection_see_the_writes_just_completed() {
    // An image with `rbd create`'s default features (exclusive-lock, object-map, ...) and four
    // queue threads on four cluster connections, queue i reading through connection i. A write
    // completes through the first (the lock owner, which also keeps the object map); a read
    // right after it, on any queue, must see it, including in objects that did not exist when
    // the read-only connections opened the image (they must not trust an object map of their
    // own).
    let (_shared, c) = shared_cluster();
    c.create_image("conns", 16 << 20);
    let features =
        String::from_utf8_lossy(&c.rbd(&["info", &format!("{POOL}/conns")])).into_owned();
    assert!(
        features.contains("exclusive-lock") && features.contains("object-map"),
        "the test needs an image with the default features: {features}"
    );
    let b = spawn_rbd(
        "conns",
        None,
        &["--num-queues", "4", "--rbd-connections", "4"],
    );
    let mut d = b.connect_queues(4);
    assert!(b.log().contains("4 cluster connections"), "{}", b.log());
    let object = (4u64 << 20) / SECTOR_SIZE;
    for k in 0..4u64 {
        let sector = k * object + 8 * k;
        let len = 16usize << 10;
        for (round, q) in [(0u64, k as usize), (1, (k as usize + 1) % 4)] {
            let seed = 60 + 10 * k + round;
            assert_eq!(
                d.write(q, sector, &pattern(seed, len)).status,
                S_OK,
                "write {k}.{round} on queue {q}"
            );
            for rq in 0..4 {
                let r = d.read(rq, sector, len as u32);
                assert_eq!(r.status, S_OK, "read {k}.{round} on queue {rq}");
                assert!(
                    r.data == pattern(seed, len),
                    "queue {rq} reads write {k}.{round} (written on queue {q}) back"
                );
            }
        }
    }
    drop(d);
    stop(b);
    // The backend's one writing handle kept the lock: the image is free again, and whole.
    let exported = c.export("conns");
    for k in 0..4u64 {
        let at = ((k * object + 8 * k) * SECTOR_SIZE) as usize;
        assert!(
            exported[at..at + (16 << 10)] == pattern(60 + 10 * k + 1, 16 << 10)[..],
            "object {k}'s last write in the exported image"
        );
    }
}

#[test]
fn write_zeroes_and_discard_reach_the_image() {
    let (_shared, c) = shared_cluster();
    c.create_image("zero", 8 << 20);
    let b = spawn_rbd("zero", None, &[]);
    let mut d = b.connect_queues(1);
    let data = pattern(7, 256 << 10);
    assert_eq!(d.write(0, 0, &data).status, S_OK);
    for (unmap, sector) in [(false, 8u64), (true, 200)] {
        let z = d.write_zeroes(0, &[Segment::new(sector, 16)], unmap);
        assert_eq!(z.status, S_OK, "write-zeroes unmap={unmap}");
        let r = d.read(0, sector, 16 * 512);
        assert!(r.data.iter().all(|&x| x == 0), "zeroes read back");
    }
    // Discard a whole object's worth: advisory, but it must succeed and not touch neighbours.
    assert_eq!(
        d.discard(0, &[Segment::new((4 << 20) / 512, 8192)]).status,
        S_OK
    );
    assert_eq!(d.flush(0).status, S_OK);
    let exported = c.export("zero");
    let mut expect = data.clone();
    for sector in [8usize, 200] {
        expect[sector * 512..(sector + 16) * 512].fill(0);
    }
    assert!(
        exported[..data.len()] == expect[..],
        "zeroed ranges, and only them, in the exported image"
    );
}

#[test]
fn read_only_and_snapshots_refuse_writes() {
    let (_shared, c) = shared_cluster();
    c.create_image("ro", 4 << 20);
    // Fill the image through the backend, snapshot it, then change it.
    let first = pattern(21, 8192);
    {
        let b = spawn_rbd("ro", None, &[]);
        let mut d = b.connect_queues(1);
        assert_eq!(d.write(0, 0, &first).status, S_OK);
        assert_eq!(d.flush(0).status, S_OK);
        drop(d);
        stop(b);
    }
    c.rbd(&["snap", "create", &format!("{POOL}/ro@s1")]);
    {
        let b = spawn_rbd("ro", None, &[]);
        let mut d = b.connect_queues(1);
        assert_eq!(d.write(0, 0, &pattern(22, 8192)).status, S_OK);
        assert_eq!(d.flush(0).status, S_OK);
        drop(d);
        stop(b);
    }

    for (image, what) in [("ro@s1", "snapshot"), ("ro", "--read-only")] {
        let extra: &[&str] = if what == "--read-only" {
            &["--read-only"]
        } else {
            &[]
        };
        let b = spawn_rbd(image, None, extra);
        let mut d = b.connect_queues(1);
        assert!(
            d.offered_features & feature::RO != 0,
            "{what}: VIRTIO_BLK_F_RO"
        );
        let r = d.read(0, 0, 8192);
        assert_eq!(r.status, S_OK, "{what}: reads work");
        let expect = if what == "snapshot" {
            first.clone()
        } else {
            pattern(22, 8192)
        };
        assert!(r.data == expect, "{what}: the right content");
        let w = d.write(0, 0, &pattern(23, 4096));
        assert_eq!((w.status, w.used_len), (S_IOERR, 1), "{what}: OUT refused");
        let z = d.write_zeroes(0, &[Segment::new(0, 8)], false);
        assert_eq!(z.status, S_IOERR, "{what}: WRITE_ZEROES refused");
    }
    assert!(
        c.export("ro")[..8192] == pattern(22, 8192)[..],
        "the image is unchanged by the refused writes"
    );
}

#[test]
fn a_stalled_osd_fails_only_the_requests_it_stalls_and_serving_resumes() {
    let (_alone, c) = exclusive_cluster();
    c.create_image("fail", 4 << 20);
    // A client config with a short OSD timeout: requests stalled longer fail with ETIMEDOUT.
    let dir = TempDir::new("rbd-conf");
    let conf = dir.path().join("client.conf");
    let mut text = std::fs::read_to_string(c.conf()).unwrap();
    text.push_str("\n[client]\nrados osd op timeout = 3\n");
    std::fs::write(&conf, text).unwrap();

    let b = spawn_rbd("fail", Some(conf), &[]);
    let mut d = b.connect_queues(1);
    let before = pattern(31, 4096);
    assert_eq!(d.write(0, 0, &before).status, S_OK);

    c.set_osd_frozen(true);
    let t0 = Instant::now();
    let r = d.read(0, 0, 4096);
    let waited = t0.elapsed();
    c.set_osd_frozen(false);
    assert_eq!(
        r.status, S_IOERR,
        "a read the OSD never answers fails after the timeout"
    );
    assert!(
        waited >= Duration::from_secs(2),
        "it failed by the timeout ({waited:?}), not at once"
    );

    // The OSD is back: the same device keeps serving.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = d.read(0, 0, 4096);
        if r.status == S_OK {
            assert!(r.data == before, "the data survived");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads still fail 30 s after the OSD came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = pattern(32, 4096);
    assert_eq!(d.write(0, 8, &after).status, S_OK, "writes work again");
    assert_eq!(d.flush(0).status, S_OK);
    assert!(c.export("fail")[4096..8192] == after[..]);
}

/// Reads 4 KiB at `sector` on queues 0 and 1 of `d` (each reading through its own connection)
/// and checks they hold `pattern(seed, 4096)`.
fn assert_both_queues_read(d: &mut Device, sector: u64, seed: u64, what: &str) {
    for q in 0..2 {
        let r = d.read(q, sector, 4096);
        assert!(
            r.status == S_OK && r.data == pattern(seed, 4096),
            "{what} (queue {q})"
        );
    }
}

#[test]
fn two_backends_hand_the_image_over() {
    let (_shared, c) = shared_cluster();
    c.create_image("handover", 4 << 20);
    // Two queues each: each backend reads through two connections, and writes through one.
    let a = spawn_rbd("handover", None, &["--num-queues", "2"]);
    let mut da = a.connect_queues(2);
    assert_eq!(da.write(0, 0, &pattern(41, 4096)).status, S_OK);
    assert_eq!(da.flush(0).status, S_OK);

    // A second process writes: librbd asks the first for the exclusive lock and gets it.
    let b = spawn_rbd("handover", None, &["--num-queues", "2"]);
    let mut db = b.connect_queues(2);
    assert_both_queues_read(&mut db, 0, 41, "B sees A's data");
    assert_eq!(db.write(1, 8, &pattern(42, 4096)).status, S_OK);
    assert_eq!(db.flush(0).status, S_OK);

    // And back: A writes again, after B.
    assert_both_queues_read(&mut da, 8, 42, "A sees B's data");
    assert_eq!(da.write(0, 16, &pattern(43, 4096)).status, S_OK);
    assert_eq!(da.flush(0).status, S_OK);
    drop(db);
    stop(b);

    let exported = c.export("handover");
    for (i, seed) in [41u64, 42, 43].into_iter().enumerate() {
        assert!(
            exported[i * 4096..(i + 1) * 4096] == pattern(seed, 4096)[..],
            "write {i} in the image"
        );
    }
}

#[test]
fn a_backend_stopped_while_connected_releases_the_lock_at_once() {
    // SIGTERM with the frontend still connected (a VMM that stops its backend before itself):
    // the backend drains, then must close the image, handing the exclusive lock back at once.
    // Otherwise the next writer waits for the cluster to expire the dead client's watch
    // (osd_client_watch_timeout, 30 s).
    let (_shared, c) = shared_cluster();
    c.create_image("stop-connected", 4 << 20);
    let a = spawn_rbd("stop-connected", None, &["--num-queues", "2"]);
    let mut da = a.connect_queues(2);
    assert_eq!(da.write(0, 0, &pattern(71, 4096)).status, S_OK);
    let log = stop(a);
    assert!(
        log.contains("RBD image rbd/stop-connected closed"),
        "the backend closed the image before exiting:\n{log}"
    );
    drop(da);

    let b = spawn_rbd("stop-connected", None, &[]);
    let mut db = b.connect_queues(1);
    let t0 = Instant::now();
    assert_eq!(db.write(0, 8, &pattern(72, 4096)).status, S_OK);
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the next writer took the lock in {waited:?}, not after the dead owner's watch expired"
    );
    drop(db);
    stop(b);
}

#[test]
fn a_writeback_backend_writes_its_cache_back_when_the_frontend_stops_the_ring() {
    // Live migration's hand-over: QEMU stops the source's rings (GET_VRING_BASE) and the
    // destination's backend, another librbd client, reads what the guest wrote before it writes
    // anything itself (a read does not move the exclusive lock). What sits in the source's
    // librbd cache then has to be in the cluster by the time GET_VRING_BASE is answered. The
    // client config picks librbd's writeback policy (its default, writearound, acknowledges a
    // write while it is still on its way to the OSD: the same hazard, for a shorter time) and
    // a long dirty age, so that librbd does not write the data back on its own while the test
    // looks.
    let (_shared, c) = shared_cluster();
    c.create_image("wb-stop", 4 << 20);
    let dir = TempDir::new("rbd-conf");
    let conf = dir.path().join("client.conf");
    let mut text = std::fs::read_to_string(c.conf()).unwrap();
    text.push_str("\n[client]\nrbd cache policy = writeback\nrbd cache max dirty age = 60\n");
    std::fs::write(&conf, text).unwrap();

    let a = spawn_rbd("wb-stop", Some(conf.clone()), &["--cache", "writeback"]);
    let mut da = a.connect_queues(1);
    // librbd's cache stays write-through until the first flush (as a guest's first fsync).
    assert_eq!(da.flush(0).status, S_OK);
    let data = pattern(51, 64 << 10);
    assert_eq!(da.write(0, 0, &data).status, S_OK);
    assert!(
        c.export("wb-stop")[..data.len()] != data[..],
        "the write waits in A's librbd cache (the test shows nothing otherwise)"
    );
    da.get_vring_base(0).unwrap();

    // The destination opens the image while A still holds it, and reads first.
    let b = spawn_rbd("wb-stop", Some(conf), &["--cache", "writeback"]);
    let mut db = b.connect_queues(1);
    let r = db.read(0, 0, data.len() as u32);
    assert_eq!(r.status, S_OK);
    assert!(
        r.data == data,
        "the destination reads what the guest wrote before the ring stopped"
    );
    assert!(
        c.export("wb-stop")[..data.len()] == data[..],
        "the cluster holds it"
    );
    drop(db);
    stop(b);
    drop(da);
    stop(a);
}

/// Run the backend to its exit; returns (status code, stderr).
fn run_to_exit(args: &[&str]) -> (Option<i32>, String, Duration) {
    let dir = TempDir::new("rbd-exit");
    let socket = socket_path(&dir, "vhost.sock");
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .arg("--socket-path")
        .arg(&socket)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed(),
    )
}

#[test]
fn bad_specs_exit_with_status_2_and_say_why() {
    let long = format!("rbd:rbd/{}", "x".repeat(4096));
    for (spec, says) in [
        ("rbd:", "no POOL/IMAGE after rbd:"),
        ("rbd:/img", "empty pool name"),
        ("rbd:img", "the pool is required"),
        ("rbd:rbd/img:cache=on", "unknown option \"cache\""),
        (long.as_str(), "longer than 1024 bytes"),
    ] {
        let (code, stderr, _) = run_to_exit(&["--blk-file", spec]);
        assert_eq!(code, Some(2), "{spec:.40}: {stderr}");
        assert!(stderr.contains(says), "{spec:.40}: {stderr}");
        assert!(
            stderr.len() < 400 && stderr.trim().lines().count() <= 3,
            "a short message: {stderr}"
        );
    }
}

#[test]
fn missing_images_pools_unreachable_clusters_and_bad_auth_stop_the_start_with_one_line() {
    let (_shared, c) = shared_cluster();
    let conf = c.conf().display().to_string();
    let unreachable = TempDir::new("rbd-dead");
    let dead_conf = unreachable.path().join("ceph.conf");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &dead_conf,
        format!("[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\n"),
    )
    .unwrap();
    let dead = dead_conf.display().to_string();
    // A client that insists on cephx with a key the cluster does not know.
    let auth_conf = unreachable.path().join("cephx.conf");
    let keyring = unreachable.path().join("bad.keyring");
    std::fs::write(
        &keyring,
        "[client.admin]\n\tkey = AQBm4zNlAAAAABAAsjVq0dPvxL5cUj8aAbeCvQ==\n",
    )
    .unwrap();
    let mut text = std::fs::read_to_string(c.conf()).unwrap();
    text = text
        .replace(
            "auth client required = none",
            "auth client required = cephx",
        )
        .replace("auth supported = none", "");
    text.push_str(&format!("\n[client]\nkeyring = {}\n", keyring.display()));
    std::fs::write(&auth_conf, text).unwrap();
    let auth = auth_conf.display().to_string();
    for (spec, extra, says) in [
        (
            format!("rbd:rbd/absent:conf={conf}"),
            vec![],
            "RBD image rbd/absent: no such image",
        ),
        (
            format!("rbd:nopool/x:conf={conf}"),
            vec![],
            "Ceph pool \"nopool\": no such pool",
        ),
        (
            format!("rbd:rbd/x:conf={dead}"),
            vec!["--rbd-timeout", "2"],
            "no monitor answered within 2 s",
        ),
        (
            format!("rbd:rbd/x:conf={auth}"),
            vec![],
            "authentication refused",
        ),
        (
            format!("rbd:rbd/x:conf={conf}"),
            vec!["--cache", "dontcache"],
            "--cache dontcache has no meaning for RBD images",
        ),
    ] {
        let mut args = vec!["--blk-file", spec.as_str()];
        args.extend(extra);
        let (code, stderr, took) = run_to_exit(&args);
        assert_eq!(code, Some(1), "{spec}: {stderr}");
        assert!(stderr.contains(says), "{spec}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(took < Duration::from_secs(10), "{spec}: took {took:?}");
    }
}
