//! The bindings against a real single-node cluster (`rbd::testing`): asynchronous writes and
//! reads through the eventfd, checked with `rbd export`; the errors a user meets at open.

// A test may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rbd::testing::{TestCluster, POOL};
use rbd::{AioOp, AioQueue, ClusterOptions, Error, Image, ImageSpec};

/// The test that freezes the OSD runs alone; the others share the cluster.
static CLUSTER_USE: RwLock<()> = RwLock::new(());

fn opts(c: &TestCluster) -> ClusterOptions {
    ClusterOptions {
        conf: Some(c.conf().to_owned()),
        ..ClusterOptions::default()
    }
}

fn cached(c: &TestCluster) -> ClusterOptions {
    ClusterOptions {
        settings: vec![("rbd_cache".into(), "true".into())],
        ..opts(c)
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        pool: POOL.into(),
        image: image.into(),
        snap: None,
    }
}

/// Wait for the eventfd, then reap until `n` results arrived.
fn wait(q: &mut AioQueue, n: usize) -> Vec<(u64, isize)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(Instant::now() < deadline, "no completion within 30 s");
        let mut pfd = libc::pollfd {
            fd: q.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        q.reap(|tag, ret| got.push((tag, ret)));
    }
    got
}

#[test]
fn aio_writes_and_reads_land_in_the_image() {
    aio_round_trip("aio", false);
}

#[test]
fn aio_writes_and_reads_land_in_the_image_through_the_cache() {
    aio_round_trip("aio-cached", true);
}

fn aio_round_trip(name: &str, cache: bool) {
    let _shared = CLUSTER_USE.read().unwrap_or_else(|e| e.into_inner());
    let c = TestCluster::shared();
    c.create_image(name, 8 << 20);
    let o = if cache { cached(c) } else { opts(c) };
    let image = Arc::new(Image::open(&o, &spec(name), false).expect("opening the image"));
    assert_eq!(image.size(), 8 << 20);
    let mut q = AioQueue::new(image.clone(), 4).expect("queue");

    let mut a: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut b = vec![0xa5u8; 4096];
    let iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    // More requests than slots: the queue grows instead of failing.
    for tag in 0..6u64 {
        // SAFETY: `iov` and both buffers outlive the wait below and are only read.
        unsafe {
            q.submit(
                AioOp::Writev {
                    offset: tag * 16384,
                    iovecs: iov.as_ptr(),
                    iovcnt: 2,
                },
                tag,
            )
        };
    }
    let mut done = wait(&mut q, 6);
    done.sort_unstable();
    assert_eq!(
        done.iter().map(|&(t, _)| t).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>(),
        "every write completes once"
    );
    assert!(
        done.iter().all(|&(_, r)| r >= 0),
        "writes succeed: {done:?}"
    );
    // SAFETY: no buffer is involved.
    unsafe { q.submit(AioOp::Flush, 99) };
    assert_eq!(wait(&mut q, 1), vec![(99, 0)]);

    let mut back = vec![0u8; 12288];
    let riov = [libc::iovec {
        iov_base: back.as_mut_ptr().cast(),
        iov_len: back.len(),
    }];
    // SAFETY: `back` outlives the wait and nothing else touches it meanwhile.
    unsafe {
        q.submit(
            AioOp::Readv {
                offset: 5 * 16384,
                iovecs: riov.as_ptr(),
                iovcnt: 1,
            },
            7,
        )
    };
    assert_eq!(wait(&mut q, 1), vec![(7, 12288)]);
    assert!(back[..8192] == a[..] && back[8192..] == b[..], "read back");

    // SAFETY: no buffer is involved.
    unsafe {
        q.submit(
            AioOp::WriteZeroes {
                offset: 0,
                len: 16384,
            },
            8,
        )
    };
    assert_eq!(wait(&mut q, 1), vec![(8, 0)]);
    drop(q);
    drop(image);

    let exported = c.export(name);
    assert_eq!(exported.len(), 8 << 20);
    assert!(exported[..16384].iter().all(|&x| x == 0), "zeroed");
    for tag in 1..6usize {
        let at = tag * 16384;
        assert!(
            exported[at..at + 8192] == a[..] && exported[at + 8192..at + 12288] == b[..],
            "write {tag} in the exported image"
        );
    }
}

#[test]
fn a_refused_request_comes_back_through_the_eventfd() {
    let _shared = CLUSTER_USE.read().unwrap_or_else(|e| e.into_inner());
    let c = TestCluster::shared();
    c.create_image("ro", 1 << 20);
    let image = Arc::new(Image::open(&opts(c), &spec("ro"), true).expect("opening rbd/ro"));
    assert!(image.read_only());
    let mut q = AioQueue::new(image, 1).expect("queue");
    let mut buf = vec![1u8; 512];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` outlives the wait.
    unsafe {
        q.submit(
            AioOp::Writev {
                offset: 0,
                iovecs: iov.as_ptr(),
                iovcnt: 1,
            },
            1,
        )
    };
    let done = wait(&mut q, 1);
    assert_eq!(done[0].0, 1);
    assert_eq!(
        done[0].1,
        -(libc::EROFS as isize),
        "a write to a read-only image"
    );
}

#[test]
fn missing_pool_and_image_are_named() {
    let _shared = CLUSTER_USE.read().unwrap_or_else(|e| e.into_inner());
    let c = TestCluster::shared();
    let e = Image::open(
        &opts(c),
        &ImageSpec {
            pool: "nopool".into(),
            image: "x".into(),
            snap: None,
        },
        false,
    )
    .expect_err("a missing pool");
    assert!(matches!(e, Error::Pool { .. }), "{e}");
    assert_eq!(e.to_string(), "Ceph pool \"nopool\": no such pool");
    let e = Image::open(&opts(c), &spec("nothere"), false).expect_err("a missing image");
    assert_eq!(e.to_string(), "RBD image rbd/nothere: no such image");
}

#[test]
fn an_unreachable_cluster_fails_within_the_timeout() {
    let dir = std::env::temp_dir().join(format!("vub-rbd-dead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("ceph.conf");
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    std::fs::write(
        &conf,
        format!("[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\n"),
    )
    .unwrap();
    let t0 = Instant::now();
    let e = Image::open(
        &ClusterOptions {
            conf: Some(conf),
            timeout: Duration::from_secs(2),
            ..ClusterOptions::default()
        },
        &spec("x"),
        false,
    )
    .expect_err("nothing answers");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(8), "gave up after {took:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("within 2 s"),
        "the error says what timed out: {msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_closed_image_refuses_requests_and_releases_its_lock() {
    let _shared = CLUSTER_USE.read().unwrap_or_else(|e| e.into_inner());
    let c = TestCluster::shared();
    c.create_image("closing", 1 << 20);
    let image = Arc::new(Image::open(&cached(c), &spec("closing"), false).expect("open"));
    let mut q = AioQueue::new(image.clone(), 2).expect("queue");
    let mut buf = vec![7u8; 4096];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let write = AioOp::Writev {
        offset: 0,
        iovecs: iov.as_ptr(),
        iovcnt: 1,
    };
    // SAFETY: `buf` outlives the wait.
    unsafe { q.submit(write, 1) };
    assert!(wait(&mut q, 1)[0].1 >= 0);
    // The write sits in librbd's cache (write-back after the first flush), and this client
    // holds the exclusive lock.
    // SAFETY: no buffer.
    unsafe { q.submit(AioOp::Flush, 2) };
    assert_eq!(wait(&mut q, 1), vec![(2, 0)]);
    buf.fill(9);
    // SAFETY: `buf` outlives the wait.
    unsafe { q.submit(write, 3) };
    assert!(wait(&mut q, 1)[0].1 >= 0);

    image.close().expect("close");
    // SAFETY: `buf` outlives the wait.
    unsafe { q.submit(write, 4) };
    assert_eq!(wait(&mut q, 1), vec![(4, -(libc::ESHUTDOWN as isize))]);
    // The cached write reached the cluster before the close.
    let exported = c.export("closing");
    assert!(
        exported[..4096].iter().all(|&x| x == 9),
        "the cached write was flushed"
    );
    // Another client takes the lock and writes at once: nobody waits for a dead owner's watch.
    let t0 = Instant::now();
    let out = std::process::Command::new("rbd")
        .arg("-c")
        .arg(c.conf())
        .args([
            "bench",
            "--io-type",
            "write",
            "--io-total",
            "4096",
            "--io-size",
            "4096",
        ])
        .arg(format!("{POOL}/closing"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    drop(q);
    drop(image);
}

#[test]
fn requests_a_frozen_osd_holds_can_be_abandoned() {
    let _alone = CLUSTER_USE.write().unwrap_or_else(|e| e.into_inner());
    let c = TestCluster::shared();
    c.create_image("abandon", 1 << 20);
    let image = Arc::new(Image::open(&opts(c), &spec("abandon"), false).expect("open"));
    let mut q = AioQueue::new(image.clone(), 1).expect("queue");
    // Leaked with the request, as an engine leaks a request's buffers.
    let buf: &'static mut [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    c.set_osd_frozen(true);
    // SAFETY: the buffer is leaked, so it stays valid whenever librbd writes it.
    unsafe {
        q.submit(
            AioOp::Readv {
                offset: 0,
                iovecs: iov.as_ptr(),
                iovcnt: 1,
            },
            1,
        )
    };
    let t0 = Instant::now();
    assert!(
        !q.wait_idle_for(Duration::from_secs(1)),
        "the OSD is frozen"
    );
    q.abandon();
    drop(q);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "dropping did not wait"
    );
    c.set_osd_frozen(false);
    // The late completion lands in the leaked slot; a new queue on the image works.
    let mut q = AioQueue::new(image, 1).expect("queue");
    let mut back = vec![1u8; 512];
    let riov = [libc::iovec {
        iov_base: back.as_mut_ptr().cast(),
        iov_len: back.len(),
    }];
    // SAFETY: `back` outlives the wait.
    unsafe {
        q.submit(
            AioOp::Readv {
                offset: 0,
                iovecs: riov.as_ptr(),
                iovcnt: 1,
            },
            2,
        )
    };
    assert_eq!(wait(&mut q, 1), vec![(2, 512)]);
}
