//! Dirty-page logging as QEMU uses it during live migration, driven through the test frontend:
//! a memfd log handed over with SET_LOG_BASE, `VHOST_F_LOG_ALL` turned on and off, reads of
//! known sizes at known guest addresses across page boundaries. While logging, exactly the pages
//! the backend wrote (the data buffers, the status byte, the used ring) are set, and nothing
//! else; with logging off nothing is; a memory-table change keeps logging; a log too small for
//! guest memory or a malformed SET_LOG_BASE is refused with a clear error; and GET_VRING_BASE
//! returns only once every request in flight is completed, logged and published.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::blk::{self, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use common::frontend::{pages_of, DirtyLog};
use common::ring::link;
use common::{pattern, Backend, BackendOpts, Desc, Device, Options, RegionSpec, S_OK};

/// Guest memory of the default test frontend (one region at 0).
const MEM: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Offset of the `writeback` byte in the virtio-blk config space.
const WRITEBACK_OFFSET: u32 = 32;

/// A device-writable buffer: guest address and length.
type Buf = (u64, u32);

/// A request built from raw descriptors at chosen guest addresses: the header from the queue's
/// arena (device-readable, never logged), `out` data likewise, then `bufs` device-writable and
/// the status byte at `status`.
struct Raw {
    kind: u32,
    sector: u64,
    out: Vec<u8>,
    bufs: Vec<Buf>,
    status: u64,
}

impl Raw {
    fn read(sector: u64, bufs: &[Buf], status: u64) -> Self {
        Self {
            kind: T_IN,
            sector,
            out: Vec::new(),
            bufs: bufs.to_vec(),
            status,
        }
    }

    /// The pages this request lets the device write.
    fn written_pages(&self) -> BTreeSet<u64> {
        let mut pages = pages_of(self.status, 1);
        for &(addr, len) in &self.bufs {
            pages.extend(pages_of(addr, u64::from(len)));
        }
        pages
    }
}

/// Puts each request's chain at its own descriptor slots and publishes them all, without
/// waiting: they are in flight together.
fn submit_raw(dev: &mut Device, requests: &[Raw]) {
    let q = dev.queue(0);
    q.reset_arena();
    let mut next_slot = 0u16;
    let mut chains = Vec::new();
    for r in requests {
        let header = q.alloc_bytes(&blk::header(r.kind, r.sector), 16);
        let mut descs = vec![Desc::readable(header, 16)];
        if !r.out.is_empty() {
            let out = q.alloc_bytes(&r.out, 512);
            descs.push(Desc::readable(out, r.out.len() as u32));
        }
        descs.extend(r.bufs.iter().map(|&(a, l)| Desc::writable(a, l)));
        descs.push(Desc::writable(r.status, 1));
        let slots: Vec<u16> = (next_slot..next_slot + descs.len() as u16).collect();
        next_slot += descs.len() as u16;
        chains.push((slots[0], link(&descs, &slots)));
    }
    for (first, chain) in chains {
        q.submit_chain_at(first, &chain);
    }
}

/// Submits `requests` together and waits for all their used entries.
fn run_raw(dev: &mut Device, requests: &[Raw]) {
    submit_raw(dev, requests);
    for _ in requests {
        dev.queue(0)
            .wait_used(TIMEOUT)
            .unwrap_or_else(|e| panic!("no used entry: {e:?}"));
    }
}

/// The pages of queue 0's used ring (flags, index, entries, avail_event).
fn used_ring_pages(dev: &mut Device) -> BTreeSet<u64> {
    let q = dev.queue(0);
    pages_of(q.used_addr(), 6 + 8 * u64::from(q.size()))
}

fn spawn(io_engine: &'static str, cache: &'static str, extra: &[&str]) -> Backend {
    Backend::spawn(&BackendOpts {
        io_engine,
        cache,
        control: true,
        serial: Some("migrating-serial-01".into()),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..BackendOpts::default()
    })
}

/// A device with a log twice the size guest memory needs (the tail must stay clear), logging.
fn logging(backend: &Backend) -> (Device, DirtyLog) {
    let mut dev = backend.connect_queues(1);
    let needed = DirtyLog::bytes_for(MEM);
    let log = DirtyLog::new(2 * needed);
    dev.set_log_base(&log, 2 * needed).expect("SET_LOG_BASE");
    dev.set_log_all(true).expect("LOG_ALL on");
    (dev, log)
}

/// Reads of known sizes at known guest addresses, GET_ID into a buffer across a page boundary:
/// after each, the log holds exactly the pages of its data buffers, its status byte and the used
/// ring; and the data is the image's.
fn exact_pages(io_engine: &'static str, cache: &'static str) {
    let backend = spawn(io_engine, cache, &[]);
    let image = pattern(7, 256 << 10);
    backend.write_image(0, &image);
    let (mut dev, log) = logging(&backend);
    let used = used_ring_pages(&mut dev);

    let cases = [
        // One page's worth straddling two pages.
        Raw::read(0, &[(0x0080_0800, 4096)], 0x0081_0000),
        // Three segments: across a boundary, inside one page, across another; the status byte
        // the last of its page.
        Raw::read(
            8,
            &[(0x0090_0f00, 512), (0x0092_0000, 1024), (0x0093_0e00, 2560)],
            0x0094_0fff,
        ),
        // 64 KiB into 16 pages plus one (unaligned start).
        Raw::read(16, &[(0x00a0_0200, 64 << 10)], 0x00b0_0000),
        // A sector at the very end of guest memory.
        Raw::read(3, &[(MEM - 512, 512)], 0x00c0_0010),
    ];
    for (i, r) in cases.iter().enumerate() {
        log.clear();
        run_raw(&mut dev, std::slice::from_ref(r));
        let mut expected = r.written_pages();
        expected.extend(&used);
        assert_eq!(
            log.pages(),
            expected,
            "case {i} ({io_engine}, cache {cache}): logged pages differ from the pages written;\nbackend log:\n{}",
            backend.log()
        );
        let mem = dev.memory();
        assert_eq!(mem.read(r.status, 1)[0], S_OK, "case {i}: status");
        let mut at = r.sector as usize * 512;
        for &(addr, len) in &r.bufs {
            assert!(
                mem.read(addr, len as usize) == image[at..at + len as usize],
                "case {i}: data at {addr:#x} is not the image's"
            );
            at += len as usize;
        }
    }

    // GET_ID: the serial through vm-memory, across a page boundary.
    log.clear();
    let get_id = Raw {
        kind: T_GET_ID,
        sector: 0,
        out: Vec::new(),
        bufs: vec![(0x00d0_0ff6, 20)],
        status: 0x00d1_0000,
    };
    run_raw(&mut dev, std::slice::from_ref(&get_id));
    let mut expected = get_id.written_pages();
    expected.extend(&used);
    assert_eq!(log.pages(), expected, "GET_ID");
    assert_eq!(&dev.memory().read(0x00d0_0ff6, 19), b"migrating-serial-01");

    // Nothing past what guest memory needs: the backend never wrote the log's tail.
    let bytes = log.bytes();
    let needed = DirtyLog::bytes_for(MEM) as usize;
    assert!(
        bytes[needed..].iter().all(|&b| b == 0),
        "the backend set bits past the guest memory's pages"
    );
}

#[test]
fn io_uring_reads_log_exactly_the_pages_written() {
    exact_pages("io-uring", "writeback");
}

#[test]
fn sync_engine_reads_log_exactly_the_pages_written() {
    exact_pages("sync", "writeback");
}

#[test]
fn o_direct_reads_through_bounce_buffers_log_exactly_the_pages_written() {
    // Buffers not 512-aligned go through the bounce path under O_DIRECT.
    exact_pages("io-uring", "none");
}

/// A log handed over without `LOG_ALL` sets nothing, nor does one after `LOG_ALL` went away
/// again (a cancelled migration); `LOG_ALL` back on logs again with the same log.
#[test]
fn logging_off_sets_nothing() {
    let backend = spawn("io-uring", "writeback", &[]);
    let mut dev = backend.connect_queues(1);
    let log = DirtyLog::new(DirtyLog::bytes_for(MEM));
    dev.set_log_base(&log, DirtyLog::bytes_for(MEM))
        .expect("SET_LOG_BASE");
    let read = Raw::read(0, &[(0x0080_0800, 8192)], 0x0081_0000);

    run_raw(&mut dev, std::slice::from_ref(&read));
    assert_eq!(log.pages(), BTreeSet::new(), "logged before LOG_ALL");

    dev.set_log_all(true).expect("LOG_ALL on");
    run_raw(&mut dev, std::slice::from_ref(&read));
    assert!(
        log.pages().is_superset(&read.written_pages()),
        "not logged with LOG_ALL on"
    );

    dev.set_log_all(false).expect("LOG_ALL off");
    log.clear();
    run_raw(&mut dev, std::slice::from_ref(&read));
    dev.get_id(0, 20);
    dev.write(0, 8, &[1u8; 4096]);
    assert_eq!(
        log.pages(),
        BTreeSet::new(),
        "logged after LOG_ALL went off"
    );
    assert!(backend.log().contains("dirty-page logging off"));

    dev.set_log_all(true).expect("LOG_ALL on again");
    run_raw(&mut dev, std::slice::from_ref(&read));
    assert!(
        log.pages().is_superset(&read.written_pages()),
        "not logged with LOG_ALL on again"
    );
}

/// Regions mapped anew while logging (ADD_MEM_REG after REM_MEM_REG, or a whole SET_MEM_TABLE)
/// are logged too: the frontend does not send the log again.
#[test]
fn memory_table_change_keeps_logging() {
    let backend = spawn("io-uring", "writeback", &[]);
    let image = pattern(9, 16 << 10);
    backend.write_image(0, &image);
    let high = 0x1_0000_0000u64;
    let mut dev = backend.connect(&Options {
        num_queues: Some(1),
        memory: vec![
            RegionSpec::new(0, 32 << 20),
            RegionSpec::new(high, 32 << 20),
        ],
        ..Options::default()
    });
    let needed = DirtyLog::bytes_for(high + (32 << 20));
    let log = DirtyLog::new(needed);
    dev.set_log_base(&log, needed).expect("SET_LOG_BASE");
    dev.set_log_all(true).expect("LOG_ALL on");
    let used = used_ring_pages(&mut dev);
    let read = Raw::read(
        0,
        &[(0x0100_0800, 4096), (high + 0x0020_0f00, 4096)],
        high + 0x0030_0000,
    );

    for (what, re_add) in [("ADD_MEM_REG", Some(1)), ("SET_MEM_TABLE", None)] {
        dev.resend_memory(re_add)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        log.clear();
        run_raw(&mut dev, std::slice::from_ref(&read));
        let mut expected = read.written_pages();
        expected.extend(&used);
        assert_eq!(
            log.pages(),
            expected,
            "after {what}: backend log:\n{}",
            backend.log()
        );
        assert!(dev.memory().read(high + 0x0020_0f00, 4096) == image[4096..8192]);
    }
}

/// A log too small for guest memory is refused with an error that says so, and nothing is
/// written to it; the backend serves the next frontend.
#[test]
fn log_smaller_than_guest_memory_is_refused() {
    let backend = spawn("io-uring", "writeback", &[]);
    let mut dev = backend.connect_queues(1);
    let claimed = DirtyLog::bytes_for(MEM) / 2;
    let log = DirtyLog::new(4 * DirtyLog::bytes_for(MEM));
    let err = dev
        .set_log_base(&log, claimed)
        .expect_err("a log covering half of guest memory was accepted");
    assert!(err.to_string().contains("SET_LOG_BASE"), "{err}");
    assert!(
        backend
            .log()
            .contains("the dirty log does not cover guest memory region 0x0+0x4000000"),
        "no clear error in the backend log:\n{}",
        backend.log()
    );
    assert!(log.bytes().iter().all(|&b| b == 0), "the log was written");
    drop(dev);
    let mut next = backend.connect_queues(1);
    assert_eq!(next.read(0, 0, 4096).status, S_OK);
}

/// SET_LOG_BASE without its file descriptor ends the connection with an error in the backend's
/// log; the backend serves the next frontend.
#[test]
fn malformed_set_log_base_is_refused() {
    let backend = spawn("io-uring", "writeback", &[]);
    let mut dev = backend.connect_queues(1);
    // Negotiated LOG_SHMFD but no region: the vhost crate sends the bare u64 form, no fd.
    let sent = vhost::VhostBackend::set_log_base(dev.frontend(), 0, None);
    assert!(sent.is_ok(), "{sent:?}");
    assert!(dev.sync().is_err(), "the connection survived");
    let deadline = Instant::now() + TIMEOUT;
    while !backend.log().contains("connection ended") {
        assert!(Instant::now() < deadline, "no error:\n{}", backend.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        backend.log().contains("attached fds"),
        "the error does not say what was wrong:\n{}",
        backend.log()
    );
    drop(dev);
    let mut next = backend.connect_queues(1);
    assert_eq!(next.read(0, 0, 4096).status, S_OK);
}

/// GET_VRING_BASE while logging: reads on the fast path and flushes and writethrough writes held
/// by the deferred worker are all completed, logged and published before the reply, well before
/// the worker's delay would have run out.
fn stop_drains_logged(extra: &[&str]) {
    let backend = spawn(
        "io-uring",
        "writeback",
        &[&["--defer-delay-us", "2000000", "--strict-batching"], extra].concat(),
    );
    let image = pattern(11, 256 << 10);
    backend.write_image(0, &image);
    let (mut dev, log) = logging(&backend);
    // Writethrough: every write waits for the deferred worker's fdatasync.
    let config = dev.frontend();
    vhost::vhost_user::VhostUserFrontend::set_config(
        config,
        WRITEBACK_OFFSET,
        vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
        &[0],
    )
    .expect("SET_CONFIG writethrough");
    log.clear();

    let mut requests = Vec::new();
    for i in 0..8u64 {
        requests.push(Raw::read(
            i * 16,
            &[(0x0080_0800 + i * 0x2_0000, 8192)],
            0x0100_0000 + i * 0x1001,
        ));
    }
    requests.push(Raw {
        kind: T_FLUSH,
        sector: 0,
        out: Vec::new(),
        bufs: Vec::new(),
        status: 0x0110_0fff,
    });
    requests.push(Raw {
        kind: T_OUT,
        sector: 256,
        out: vec![0x5a; 4096],
        bufs: Vec::new(),
        status: 0x0120_0000,
    });
    submit_raw(&mut dev, &requests);
    // Wait until the backend took every chain: the reads done, the flush and the write held
    // by the deferred worker for its delay.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stats = backend.stats();
        let q = &stats["queues"][0];
        if q["requests"].as_u64() == Some(8) && q["in_flight"].as_u64() == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend did not take the requests: {stats}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    let next_avail = dev.get_vring_base(0).expect("GET_VRING_BASE");
    let took = start.elapsed();
    assert_eq!(
        next_avail,
        requests.len() as u32,
        "not every request was taken"
    );
    assert!(
        took < Duration::from_millis(1500),
        "GET_VRING_BASE waited {took:?}: the deferred batch was not drained"
    );

    // Every used entry is there already: none may arrive after the reply.
    let used = used_ring_pages(&mut dev);
    let q = dev.queue(0);
    let mut ids = BTreeSet::new();
    for _ in &requests {
        let u = q
            .wait_used(Duration::ZERO)
            .expect("a request completed after GET_VRING_BASE");
        ids.insert(u.id);
    }
    assert_eq!(ids.len(), requests.len());
    let mut expected = used;
    for r in &requests {
        expected.extend(r.written_pages());
        assert_eq!(dev.memory().read(r.status, 1)[0], S_OK);
    }
    assert_eq!(log.pages(), expected, "backend log:\n{}", backend.log());
    for (i, r) in requests.iter().take(8).enumerate() {
        let (addr, len) = r.bufs[0];
        let at = i * 16 * 512;
        assert!(dev.memory().read(addr, len as usize) == image[at..at + len as usize]);
    }
}

#[test]
fn get_vring_base_completes_logs_and_publishes_everything_in_flight() {
    stop_drains_logged(&[]);
}

#[test]
fn get_vring_base_with_polling_completes_logs_and_publishes_everything_in_flight() {
    stop_drains_logged(&["--poll-us", "200"]);
}

/// GET_VRING_BASE while reads are still running: guest buffers not aligned for O_DIRECT make the
/// io_uring engine run the reads off the queue thread, where fault injection holds each for
/// 500 ms, so they are in flight when GET_VRING_BASE is sent. The reply waits for them, and by
/// then their data, status bytes and used entries are written, logged and published.
#[test]
fn get_vring_base_waits_for_reads_in_flight_then_logs_and_publishes_them() {
    let backend = Backend::spawn(&BackendOpts {
        io_engine: "io-uring",
        cache: "none",
        control: true,
        env: vec![("DISK_OFFLOAD_READ_DELAY_MS", "500".into())],
        ..BackendOpts::default()
    });
    let image = pattern(12, 64 << 10);
    backend.write_image(0, &image);
    let (mut dev, log) = logging(&backend);
    log.clear();

    // Odd guest addresses: not aligned for O_DIRECT, so offloaded.
    let requests: Vec<Raw> = (0..2u64)
        .map(|i| {
            Raw::read(
                i * 16,
                &[(0x0080_0801 + i * 0x2_0000, 4096)],
                0x0100_0000 + i * 0x1001,
            )
        })
        .collect();
    submit_raw(&mut dev, &requests);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stats = backend.stats();
        let q = &stats["queues"][0];
        if q["in_flight"].as_u64() == Some(requests.len() as u64) {
            assert_eq!(
                q["requests"].as_u64(),
                Some(0),
                "a read completed early: {stats}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend did not take the reads: {stats}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        log.pages().is_empty(),
        "logged before the reads completed: {:?}",
        log.pages()
    );
    let start = Instant::now();
    let next_avail = dev.get_vring_base(0).expect("GET_VRING_BASE");
    let took = start.elapsed();
    assert_eq!(next_avail, requests.len() as u32);
    assert!(
        took >= Duration::from_millis(100),
        "GET_VRING_BASE answered in {took:?}, before the reads it found in flight could complete"
    );

    let used = used_ring_pages(&mut dev);
    let q = dev.queue(0);
    let mut ids = BTreeSet::new();
    for _ in &requests {
        let u = q
            .wait_used(Duration::ZERO)
            .expect("a read completed after GET_VRING_BASE");
        ids.insert(u.id);
    }
    assert_eq!(ids.len(), requests.len());
    let mut expected = used;
    for (i, r) in requests.iter().enumerate() {
        expected.extend(r.written_pages());
        assert_eq!(dev.memory().read(r.status, 1)[0], S_OK);
        let (addr, len) = r.bufs[0];
        let at = i * 16 * 512;
        assert!(dev.memory().read(addr, len as usize) == image[at..at + len as usize]);
    }
    assert_eq!(log.pages(), expected, "backend log:\n{}", backend.log());
}
