//! End to end through a real vhost-user frontend: each test starts the `vhost-user-blk` binary on
//! a scratch image, attaches the driver in `common/` (memfd guest memory, our own split rings)
//! over the unix socket as QEMU would, and checks what a guest would see: data, status bytes,
//! used lengths, config space; and what the host sees: the image's bytes and allocated blocks.

mod common;

use std::time::{Duration, Instant};

use common::blk::{self, feature, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use common::{
    pattern, Backend, BackendOpts, Layout, MemoryMessages, Options, RegionSpec, Segment, Transfer,
    SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP,
};
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};

fn spawn(opts: BackendOpts) -> Backend {
    Backend::spawn(&opts)
}

// ---- round trips ----

/// Writes a distinct pattern through every queue, reads each back through another queue, and
/// checks the bytes landed at the right offset of the image.
fn round_trip_on_every_queue(
    io_engine: &'static str,
    cache: &'static str,
    num_queues: usize,
    extra_args: &[&str],
) {
    let b = spawn(BackendOpts {
        num_queues,
        io_engine,
        cache,
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(num_queues);
    assert_eq!(
        usize::from(d.config.num_queues),
        num_queues,
        "config num_queues"
    );
    assert_eq!(d.num_queues(), num_queues);
    let len = 64 << 10;
    let sector_of = |q: usize| 2048 * q as u64 + 8;
    for q in 0..num_queues {
        let c = d.write(q, sector_of(q), &pattern(q as u64, len));
        assert_eq!(c.status, S_OK, "write on queue {q}");
        assert_eq!(
            c.used_len, 1,
            "write on queue {q} writes only the status byte"
        );
    }
    for q in 0..num_queues {
        let reader = (q + 1) % num_queues;
        let c = d.read(reader, sector_of(q), len as u32);
        assert_eq!(c.status, S_OK, "read on queue {reader}");
        assert_eq!(
            c.used_len,
            len as u32 + 1,
            "read on queue {reader}: data + status"
        );
        assert!(
            c.data == pattern(q as u64, len),
            "queue {reader} read back what queue {q} wrote"
        );
        assert!(
            b.image_bytes(sector_of(q) * SECTOR_SIZE, len) == pattern(q as u64, len),
            "queue {q}'s write is in the image at sector {}",
            sector_of(q)
        );
    }
}

macro_rules! round_trip_tests {
    ($($name:ident: $engine:literal, $cache:literal, $queues:literal $(, $extra:literal)*;)*) => {$(
        #[test]
        fn $name() {
            round_trip_on_every_queue($engine, $cache, $queues, &[$($extra),*]);
        }
    )*};
}

round_trip_tests! {
    io_uring_cache_none_round_trips_on_each_of_two_queues: "io-uring", "none", 2;
    io_uring_cache_none_round_trips_on_each_of_four_queues: "io-uring", "none", 4;
    io_uring_writeback_round_trips_on_each_of_two_queues: "io-uring", "writeback", 2;
    io_uring_writeback_round_trips_on_each_of_four_queues: "io-uring", "writeback", 4;
    sync_cache_none_round_trips_on_each_of_two_queues: "sync", "none", 2;
    sync_cache_none_round_trips_on_each_of_four_queues: "sync", "none", 4;
    sync_writeback_round_trips_on_each_of_two_queues: "sync", "writeback", 2;
    sync_writeback_round_trips_on_each_of_four_queues: "sync", "writeback", 4;
    io_uring_dontcache_round_trips_on_each_of_two_queues: "io-uring", "dontcache", 2;
    sync_dontcache_round_trips_on_each_of_two_queues: "sync", "dontcache", 2;
    io_uring_cache_none_round_trips_over_fixed_buffers: "io-uring", "none", 2, "--fixed-buffers";
    io_uring_writeback_round_trips_over_fixed_buffers: "io-uring", "writeback", 2, "--fixed-buffers";
}

/// 32 requests in flight on each of four queues at once, from four threads, with and without
/// EVENT_IDX: every one completes with its own data.
#[test]
fn many_requests_in_flight_on_every_queue_all_complete() {
    many_requests_in_flight(&[]);
}

/// The same with queue polling: the threads serve chains and completions without kicks or
/// eventfd wake-ups, and every request still completes once, with its own data.
#[test]
fn many_requests_in_flight_all_complete_with_polling() {
    many_requests_in_flight(&["--poll-us", "200"]);
    many_requests_in_flight(&["--poll-us", "200", "--poll-device"]);
}

/// The same over fixed buffers, with and without polling.
#[test]
fn many_requests_in_flight_all_complete_over_fixed_buffers() {
    many_requests_in_flight(&["--fixed-buffers"]);
    many_requests_in_flight(&["--poll-us", "200", "--fixed-buffers"]);
}

fn many_requests_in_flight(extra_args: &[&str]) {
    for event_idx in [false, true] {
        let b = spawn(BackendOpts {
            num_queues: 4,
            cache: "none",
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            ..BackendOpts::default()
        });
        let mut d = b.connect(&Options {
            event_idx,
            ..Options::default()
        });
        assert_eq!(
            d.has(feature::RING_EVENT_IDX),
            event_idx,
            "EVENT_IDX negotiated"
        );
        std::thread::scope(|s| {
            for q in d.queues_mut() {
                s.spawn(move || {
                    let i = q.index() as u64;
                    let sector = |k: u64| (i * 64 + k) * 8;
                    for round in 0..4u64 {
                        let writes: Vec<_> = (0..32)
                            .map(|k| {
                                let data = pattern(i << 32 | round << 16 | k, 4096);
                                q.submit(&Transfer::blk(T_OUT, sector(k), &data, 0))
                            })
                            .collect();
                        for t in writes.into_iter().rev() {
                            assert_eq!(q.complete(t).status, S_OK, "write on queue {i}");
                        }
                        let reads: Vec<_> = (0..32)
                            .map(|k| q.submit(&Transfer::blk(T_IN, sector(k), &[], 4096)))
                            .collect();
                        for (k, t) in (0..).zip(reads) {
                            let c = q.complete(t);
                            assert_eq!(c.status, S_OK, "read on queue {i}");
                            assert!(
                                c.data == pattern(i << 32 | round << 16 | k, 4096),
                                "queue {i} round {round} request {k} read back its data"
                            );
                        }
                    }
                });
            }
        });
    }
}

// ---- descriptor layouts (virtio 1.2 §2.7.4.1: no assumption about framing) ----

#[test]
fn header_split_over_two_descriptors_is_served() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    let data = pattern(1, 4096);
    let q = d.queue(0);
    let w = q.execute(
        &Transfer::blk(T_OUT, 64, &data, 0).with_layout(Layout::Cuts {
            readable: vec![4, 12, 4096],
            writable: vec![1],
        }),
    );
    assert_eq!(w.status, S_OK);
    let r = q.execute(
        &Transfer::blk(T_IN, 64, &[], 4096).with_layout(Layout::Cuts {
            readable: vec![8, 8],
            writable: vec![4096, 1],
        }),
    );
    assert_eq!(r.status, S_OK);
    assert_eq!(r.used_len, 4097);
    assert!(r.data == data, "read back through a split header");
}

#[test]
fn data_and_status_in_one_descriptor_are_served() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    let data = pattern(2, 8192);
    let q = d.queue(0);
    assert_eq!(q.write(16, &data).status, S_OK);
    let r = q.execute(
        &Transfer::blk(T_IN, 16, &[], 8192).with_layout(Layout::Cuts {
            readable: vec![16],
            writable: vec![8193],
        }),
    );
    assert_eq!(
        r.status, S_OK,
        "status is the last byte of the merged descriptor"
    );
    assert_eq!(r.used_len, 8193);
    assert!(r.data == data);
}

#[test]
fn data_spread_over_many_descriptors_is_served() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    let segs = (d.config.seg_max as usize).clamp(1, 8);
    let data = pattern(3, 4096 * segs);
    let q = d.queue(0);
    let mut readable = vec![16];
    readable.extend(std::iter::repeat_n(4096, segs));
    let w = q.execute(
        &Transfer::blk(T_OUT, 128, &data, 0).with_layout(Layout::Cuts {
            readable,
            writable: vec![1],
        }),
    );
    assert_eq!(w.status, S_OK, "write in {segs} data descriptors");
    let mut writable = vec![4096; segs];
    writable.push(1);
    let r = q.execute(
        &Transfer::blk(T_IN, 128, &[], 4096 * segs as u32).with_layout(Layout::Cuts {
            readable: vec![16],
            writable,
        }),
    );
    assert_eq!(r.status, S_OK, "read in {segs} data descriptors");
    assert_eq!(r.used_len, 4096 * segs as u32 + 1);
    assert!(r.data == data);
}

#[test]
fn header_and_data_in_one_descriptor_are_served_with_writeback_cache() {
    let b = spawn(BackendOpts {
        cache: "writeback",
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(1);
    let data = pattern(4, 4096);
    let q = d.queue(0);
    let w = q.execute(&Transfer::blk(T_OUT, 8, &data, 0).with_layout(Layout::Merged));
    assert_eq!(w.status, S_OK);
    let r = q.execute(&Transfer::blk(T_IN, 8, &[], 4096).with_layout(Layout::Merged));
    assert_eq!(r.status, S_OK);
    assert_eq!(r.used_len, 4097);
    assert!(r.data == data);
}

/// Guest buffers need no alignment (virtio 1.2 §2.7.4.1): with O_DIRECT underneath, a header
/// and data sharing one descriptor, or data cut at odd lengths, must still work.
#[test]
fn unaligned_guest_buffers_are_served_with_cache_none() {
    for io_engine in ["io-uring", "sync"] {
        let b = spawn(BackendOpts {
            cache: "none",
            io_engine,
            ..BackendOpts::default()
        });
        let mut d = b.connect_queues(1);
        let data = pattern(18, 4096);
        let q = d.queue(0);
        let w = q.execute(&Transfer::blk(T_OUT, 8, &data, 0).with_layout(Layout::Merged));
        assert_eq!(
            w.status, S_OK,
            "{io_engine}: data 16 bytes into its descriptor"
        );
        let r = q.execute(
            &Transfer::blk(T_IN, 8, &[], 4096).with_layout(Layout::Cuts {
                readable: vec![16],
                writable: vec![100, 3997],
            }),
        );
        assert_eq!(r.status, S_OK, "{io_engine}: data cut at 100 bytes");
        assert_eq!(r.used_len, 4097);
        assert!(r.data == data, "{io_engine}: unaligned round trip");
        assert!(b.image_bytes(8 * SECTOR_SIZE, 4096) == data);
    }
}

#[test]
fn indirect_chains_are_served() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    assert!(
        d.has(feature::RING_INDIRECT_DESC),
        "backend offers VIRTIO_RING_F_INDIRECT_DESC"
    );
    let data = pattern(5, 16384);
    let q = d.queue(0);
    let w = q.execute(&Transfer::blk(T_OUT, 256, &data, 0).indirect());
    assert_eq!(w.status, S_OK);
    let r = q.execute(&Transfer::blk(T_IN, 256, &[], 16384).indirect());
    assert_eq!(r.status, S_OK);
    assert_eq!(r.used_len, 16385);
    assert!(r.data == data);
}

/// Guest memory in two regions with a hole between them, announced both ways; data buffers sit
/// in both regions (the second at a non-zero memfd offset).
#[test]
fn guest_memory_in_two_regions_works_with_set_mem_table_and_add_mem_reg() {
    let b = spawn(BackendOpts::default());
    for memory_messages in [MemoryMessages::SetMemTable, MemoryMessages::AddMemReg] {
        let mut d = b.connect(&Options {
            num_queues: Some(1),
            memory: vec![
                RegionSpec::new(0, 8 << 20),
                RegionSpec::new(4 << 30, 16 << 20),
            ],
            memory_messages,
            ..Options::default()
        });
        let q = d.queue(0);
        // Enough requests to walk the arena from region 0 into region 1.
        for k in 0..16u64 {
            let data = pattern(k, 1 << 20);
            assert_eq!(
                q.write(k * 2048, &data).status,
                S_OK,
                "{memory_messages:?} write {k}"
            );
            let r = q.read(k * 2048, 1 << 20);
            assert_eq!(r.status, S_OK, "{memory_messages:?} read {k}");
            assert!(r.data == data, "{memory_messages:?} request {k} round trip");
        }
    }
}

/// With `--fixed-buffers`, reads and writes go through the registered guest memory (the
/// per-queue count says so) and move the right data: before a memory-table change, across one
/// with requests in flight, and after changes sent both ways (the backend maps the regions
/// anew and registers the new mappings). Without the option, nothing goes that way.
#[test]
fn fixed_buffers_carry_requests_across_memory_table_changes() {
    let fixed_ios = |b: &Backend| {
        let stats = b.stats();
        stats["queues"][0]["fixed_buffer_ios"]
            .as_u64()
            .unwrap_or_else(|| panic!("no fixed_buffer_ios in {stats}"))
    };
    let memory = vec![
        RegionSpec::new(0, 8 << 20),
        RegionSpec::new(4 << 30, 16 << 20),
    ];
    for fixed in [true, false] {
        let b = spawn(BackendOpts {
            cache: "none",
            control: true,
            extra_args: if fixed {
                vec!["--fixed-buffers".into()]
            } else {
                Vec::new()
            },
            ..BackendOpts::default()
        });
        let mut d = b.connect(&Options {
            num_queues: Some(1),
            memory: memory.clone(),
            ..Options::default()
        });
        let mut ios = 0;
        let data = |k: u64| pattern(k, 256 << 10);
        let sector = |k: u64| k * 512;
        // Enough requests to walk the arena from region 0 into region 1.
        for k in 0..24u64 {
            let q = d.queue(0);
            assert_eq!(q.write(sector(k), &data(k)).status, S_OK, "write {k}");
            let r = q.read(sector(k), 256 << 10);
            assert_eq!(r.status, S_OK, "read {k}");
            assert!(r.data == data(k), "request {k} round trip");
            ios += 2;
        }
        let expect = |ios: u64| if fixed { ios } else { 0 };
        assert_eq!(
            fixed_ios(&b),
            expect(ios),
            "fixed {fixed}: before the change"
        );
        // SET_MEM_TABLE replaces the map at once, with requests in flight; REM_MEM_REG then
        // ADD_MEM_REG leaves a moment without the region, so nothing is in flight across it.
        for (change, re_add) in [None, Some(1)].into_iter().enumerate() {
            let q = d.queue(0);
            let in_flight = if re_add.is_none() { 8 } else { 0 };
            let reads: Vec<_> = (0..in_flight)
                .map(|k| q.submit(&Transfer::blk(T_IN, sector(k), &[], 256 << 10)))
                .collect();
            d.resend_memory(re_add).expect("memory table sent again");
            let q = d.queue(0);
            for (k, t) in (0..).zip(reads) {
                let c = q.complete(t);
                assert_eq!(c.status, S_OK, "change {change}: read {k} in flight");
                assert!(c.data == data(k), "change {change}: read {k} in flight");
            }
            for k in in_flight..24u64 {
                let r = q.read(sector(k), 256 << 10);
                assert_eq!(r.status, S_OK, "change {change}: read {k}");
                assert!(r.data == data(k), "change {change}: read {k} after");
            }
            ios += 24;
            assert_eq!(
                fixed_ios(&b),
                expect(ios),
                "fixed {fixed}: after change {change}"
            );
        }
    }
}

// ---- the other request types ----

#[test]
fn flush_completes_ok_writing_only_the_status_byte() {
    for cache in ["none", "writeback"] {
        let b = spawn(BackendOpts {
            cache,
            ..BackendOpts::default()
        });
        let mut d = b.connect_queues(1);
        assert!(
            d.has(feature::FLUSH),
            "FLUSH is advertised with cache {cache}"
        );
        assert_eq!(d.write(0, 0, &pattern(6, 4096)).status, S_OK);
        let c = d.flush(0);
        assert_eq!(c.status, S_OK, "flush with cache {cache}");
        assert_eq!(c.used_len, 1);
    }
}

#[test]
fn discard_releases_the_image_blocks_of_the_range() {
    for io_engine in ["io-uring", "sync"] {
        let b = spawn(BackendOpts {
            io_engine,
            cache: "none",
            ..BackendOpts::default()
        });
        let mut d = b.connect_queues(1);
        assert!(d.has(feature::DISCARD), "DISCARD is advertised");
        let start = 4096u64;
        assert_eq!(d.write(0, start, &pattern(7, 1 << 20)).status, S_OK);
        assert_eq!(d.flush(0).status, S_OK);
        let before = b.image_blocks();
        assert!(before >= 2048, "1 MiB written: {before} blocks allocated");
        let c = d.discard(0, &[Segment::new(start, 2048)]);
        assert_eq!(c.status, S_OK, "discard with {io_engine}");
        assert_eq!(c.used_len, 1);
        let after = b.image_blocks();
        assert!(
            after + 2048 <= before,
            "discard of 1 MiB with {io_engine} released its blocks: {before} -> {after}"
        );
    }
}

/// With the guest's write cache off (CONFIG_WCE 0: writethrough), a WRITE_ZEROES is made durable
/// before it completes, as a write is: both complete through the deferred path, the one that
/// syncs.
#[test]
fn write_zeroes_obeys_writethrough_like_a_write() {
    let b = spawn(BackendOpts {
        control: true,
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(1);
    assert!(d.has(feature::CONFIG_WCE), "CONFIG_WCE is advertised");
    d.frontend()
        .set_config(
            blk::WRITEBACK_OFFSET,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &[0],
        )
        .expect("turning the write cache off");
    assert_eq!(
        d.get_config(blk::WRITEBACK_OFFSET, 1).expect("GET_CONFIG"),
        vec![0],
        "the write cache reads as off"
    );
    let deferred = |b: &Backend| {
        b.stats()["queues"][0]["deferred"]
            .as_u64()
            .expect("the deferred count")
    };
    assert_eq!(d.write(0, 64, &pattern(3, 4096)).status, S_OK);
    assert_eq!(deferred(&b), 1, "a writethrough write is synced");
    let c = d.write_zeroes(0, &[Segment::new(64, 8)], false);
    assert_eq!(c.status, S_OK);
    assert_eq!(deferred(&b), 2, "a writethrough write-zeroes is synced too");
    assert_eq!(d.read(0, 64, 4096).data, vec![0; 4096]);
}

#[test]
fn write_zeroes_reads_back_zeroes_and_leaves_the_neighbours() {
    for io_engine in ["io-uring", "sync"] {
        let b = spawn(BackendOpts {
            io_engine,
            ..BackendOpts::default()
        });
        let mut d = b.connect_queues(1);
        assert!(d.has(feature::WRITE_ZEROES), "WRITE_ZEROES is advertised");
        let data = pattern(8, 128 << 10);
        assert_eq!(d.write(0, 1024, &data).status, S_OK);
        let c = d.write_zeroes(0, &[Segment::new(1024 + 8, 64)], false);
        assert_eq!(c.status, S_OK, "write-zeroes with {io_engine}");
        assert_eq!(c.used_len, 1);
        let r = d.read(0, 1024, 128 << 10);
        assert_eq!(r.status, S_OK);
        let (lo, hi) = (8 * 512, (8 + 64) * 512);
        assert!(r.data[..lo] == data[..lo], "bytes before the range kept");
        assert!(
            r.data[lo..hi].iter().all(|&x| x == 0),
            "the range reads as zeroes"
        );
        assert!(r.data[hi..] == data[hi..], "bytes after the range kept");
    }
}

#[test]
fn write_zeroes_with_unmap_reads_back_zeroes_and_releases_blocks() {
    for io_engine in ["io-uring", "sync"] {
        let b = spawn(BackendOpts {
            io_engine,
            cache: "none",
            ..BackendOpts::default()
        });
        let mut d = b.connect_queues(1);
        let start = 8192u64;
        assert_eq!(d.write(0, start, &pattern(9, 1 << 20)).status, S_OK);
        assert_eq!(d.flush(0).status, S_OK);
        let before = b.image_blocks();
        let c = d.write_zeroes(0, &[Segment::new(start, 2048)], true);
        assert_eq!(c.status, S_OK, "write-zeroes with unmap, {io_engine}");
        assert_eq!(c.used_len, 1);
        let r = d.read(0, start, 1 << 20);
        assert_eq!(r.status, S_OK);
        assert!(
            r.data.iter().all(|&x| x == 0),
            "unmapped range reads as zeroes"
        );
        if d.config.write_zeroes_may_unmap != 0 {
            let after = b.image_blocks();
            assert!(
                after + 2048 <= before,
                "write-zeroes with unmap (may_unmap advertised, {io_engine}) released the \
                 blocks: {before} -> {after}"
            );
        }
    }
}

#[test]
fn get_id_returns_the_serial_nul_padded() {
    let serial = "e2e-serial-0042";
    let b = spawn(BackendOpts {
        serial: Some(serial.to_owned()),
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(1);
    let c = d.get_id(0, blk::ID_BYTES as u32);
    assert_eq!(c.status, S_OK);
    assert_eq!(c.used_len, blk::ID_BYTES as u32 + 1, "20 ID bytes + status");
    assert_eq!(&c.data[..serial.len()], serial.as_bytes());
    assert!(
        c.data[serial.len()..].iter().all(|&x| x == 0),
        "ID NUL-padded to 20 bytes: {:?}",
        c.data
    );
}

#[test]
fn get_id_into_a_four_byte_buffer_writes_four_bytes() {
    let serial = "abcdefgh";
    let b = spawn(BackendOpts {
        serial: Some(serial.to_owned()),
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(1);
    // The driver's guard check fails the completion if a fifth byte lands past the buffer.
    let c = d.get_id(0, 4);
    assert_eq!(c.status, S_OK);
    assert_eq!(c.used_len, 5, "4 ID bytes + status");
    assert_eq!(c.data, b"abcd");
}

// ---- read-only ----

#[test]
fn read_only_rejects_writes_discards_and_write_zeroes_with_ioerr() {
    let b = spawn(BackendOpts {
        read_only: true,
        ..BackendOpts::default()
    });
    let original = pattern(10, 8192);
    b.write_image(0, &original);
    let mut d = b.connect_queues(1);
    assert!(
        d.offered_features & feature::RO != 0,
        "VIRTIO_BLK_F_RO offered"
    );
    let r = d.read(0, 0, 8192);
    assert_eq!(r.status, S_OK, "reads work on a read-only disk");
    assert!(r.data == original);

    let w = d.write(0, 0, &pattern(11, 4096));
    assert_eq!(
        (w.status, w.used_len),
        (S_IOERR, 1),
        "OUT on a read-only disk"
    );
    let c = d.discard(0, &[Segment::new(0, 8)]);
    assert_eq!(
        (c.status, c.used_len),
        (S_IOERR, 1),
        "DISCARD on a read-only disk"
    );
    for unmap in [false, true] {
        let c = d.write_zeroes(0, &[Segment::new(0, 8)], unmap);
        assert_eq!(
            (c.status, c.used_len),
            (S_IOERR, 1),
            "WRITE_ZEROES (unmap {unmap}) on a read-only disk"
        );
    }
    assert!(b.image_bytes(0, 8192) == original, "image unchanged");
    let r = d.read(0, 0, 8192);
    assert_eq!(r.status, S_OK, "reads still work after the rejections");
    assert!(r.data == original);
}

// ---- capacity edges ----

#[test]
fn last_sector_reads_and_writes() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    let last = d.config.capacity - 1;
    let data = pattern(12, 512);
    assert_eq!(d.write(0, last, &data).status, S_OK);
    let r = d.read(0, last, 512);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data);
    assert!(b.image_bytes(last * 512, 512) == data);
}

#[test]
fn requests_past_the_capacity_are_ioerr() {
    let b = spawn(BackendOpts::default());
    let size = BackendOpts::default().size;
    let mut d = b.connect_queues(1);
    let cap = d.config.capacity;
    assert_eq!(cap * SECTOR_SIZE, size, "capacity is the image size");
    for (what, sector, len) in [
        ("one sector past the end", cap, 512),
        ("crossing the end", cap - 1, 1024),
        ("far past the end", cap + (1 << 30), 512),
    ] {
        let r = d.read(0, sector, len);
        assert_eq!((r.status, r.used_len), (S_IOERR, 1), "read {what}");
        let w = d.write(0, sector, &pattern(13, len as usize));
        assert_eq!((w.status, w.used_len), (S_IOERR, 1), "write {what}");
    }
    let c = d.discard(0, &[Segment::new(cap - 4, 8)]);
    assert_eq!(c.status, S_IOERR, "discard crossing the end");
    let c = d.write_zeroes(0, &[Segment::new(cap, 1)], false);
    assert_eq!(c.status, S_IOERR, "write-zeroes past the end");
    let len = std::fs::metadata(&b.image).expect("stat image").len();
    assert_eq!(len, size, "a rejected write does not grow the image");
    assert_eq!(d.read(0, cap - 1, 512).status, S_OK, "queue still serves");
}

#[test]
fn sectors_whose_byte_offset_overflows_are_ioerr() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    for (what, sector, len) in [
        ("sector * 512 overflows u64", u64::MAX / 512 + 1, 512u32),
        ("sector u64::MAX", u64::MAX, 512),
        ("offset + len overflows u64", u64::MAX / 512, 1024),
        (
            "offset + len wraps to a small number",
            (u64::MAX - 511) / 512,
            4096,
        ),
    ] {
        let r = d.read(0, sector, len);
        assert_eq!((r.status, r.used_len), (S_IOERR, 1), "read: {what}");
        let w = d.write(0, sector, &pattern(14, len as usize));
        assert_eq!((w.status, w.used_len), (S_IOERR, 1), "write: {what}");
    }
    let c = d.discard(0, &[Segment::new(u64::MAX / 512 + 1, 8)]);
    assert_eq!(c.status, S_IOERR, "discard at an overflowing sector");
    let c = d.write_zeroes(0, &[Segment::new(u64::MAX, 1)], false);
    assert_eq!(c.status, S_IOERR, "write-zeroes at sector u64::MAX");
    assert_eq!(d.read(0, 0, 512).status, S_OK, "queue still serves");
}

// ---- unknown types ----

#[test]
fn unknown_request_types_are_unsupp() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    let mut kinds = vec![2u32, 3, 0xff, 0x1234_5678];
    if d.offered_features & (1 << 16) == 0 {
        kinds.push(blk::T_SECURE_ERASE);
    }
    for kind in kinds {
        let c = d.queue(0).execute(&Transfer::blk(kind, 0, &[], 0));
        assert_eq!(
            (c.status, c.used_len),
            (S_UNSUPP, 1),
            "request type {kind:#x}"
        );
    }
    assert_eq!(d.read(0, 0, 512).status, S_OK, "queue still serves");
}

// ---- used length ----

/// The used length is the bytes the device wrote into device-writable buffers, status included
/// (virtio 1.2 §2.7.8.2), whatever the framing.
#[test]
fn used_len_counts_the_bytes_written_including_the_status() {
    let b = spawn(BackendOpts {
        serial: Some("used-len".to_owned()),
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(1);
    let q = d.queue(0);
    assert_eq!(q.write(0, &pattern(15, 4096)).used_len, 1, "OUT");
    assert_eq!(q.flush().used_len, 1, "FLUSH");
    assert_eq!(q.read(0, 4096).used_len, 4097, "IN 4096");
    assert_eq!(q.read(0, 512).used_len, 513, "IN 512");
    let split = Transfer::blk(T_IN, 0, &[], 4096).with_layout(Layout::Cuts {
        readable: vec![16],
        writable: vec![1024, 1024, 2048, 1],
    });
    assert_eq!(
        q.execute(&split).used_len,
        4097,
        "IN in three data descriptors"
    );
    let merged = Transfer::blk(T_IN, 0, &[], 4096).with_layout(Layout::Cuts {
        readable: vec![16],
        writable: vec![4097],
    });
    assert_eq!(
        q.execute(&merged).used_len,
        4097,
        "IN with data and status merged"
    );
    assert_eq!(q.get_id(20).used_len, 21, "GET_ID 20");
    let flush_with_status_only = Transfer::blk(T_FLUSH, 0, &[], 0);
    assert_eq!(q.execute(&flush_with_status_only).used_len, 1);
    let get_id = Transfer::blk(T_GET_ID, 0, &[], 20).indirect();
    assert_eq!(
        q.execute(&get_id).used_len,
        21,
        "GET_ID through an indirect table"
    );
}

// ---- config space and features ----

#[test]
fn get_config_answers_every_offset_and_size_with_exactly_that_many_bytes() {
    let b = spawn(BackendOpts {
        num_queues: 2,
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(2);
    let full = d
        .get_config(0, blk::CONFIG_SIZE as u32)
        .expect("GET_CONFIG 0+96");
    assert_eq!(full.len(), blk::CONFIG_SIZE);
    assert_eq!(full, d.config.raw, "same answer as at attach");
    for offset in 0..blk::CONFIG_SIZE as u32 {
        for size in 1..=blk::CONFIG_SIZE as u32 - offset {
            let got = d
                .get_config(offset, size)
                .unwrap_or_else(|e| panic!("GET_CONFIG {offset}+{size}: {e}"));
            let (o, s) = (offset as usize, size as usize);
            assert_eq!(got, full[o..o + s], "GET_CONFIG {offset}+{size}");
        }
    }
    for q in 0..2 {
        assert_eq!(d.read(q, 0, 512).status, S_OK, "queues still serve");
    }
}

#[test]
fn config_and_features_describe_the_disk() {
    let size = 96 << 20;
    let b = spawn(BackendOpts {
        size,
        num_queues: 3,
        ..BackendOpts::default()
    });
    let d = b.connect_queues(3);
    let c = &d.config;
    assert_eq!(c.capacity, size / SECTOR_SIZE, "capacity in sectors");
    assert_eq!(c.num_queues, 3);
    assert_eq!(d.max_queues, 3, "GET_QUEUE_NUM");
    assert_eq!(c.blk_size, 512, "default logical block size");
    assert!(c.seg_max >= 1, "seg_max {}", c.seg_max);
    for (name, bit) in [
        ("VERSION_1", feature::VERSION_1),
        ("PROTOCOL_FEATURES", feature::PROTOCOL_FEATURES),
        ("SEG_MAX", feature::SEG_MAX),
        ("BLK_SIZE", feature::BLK_SIZE),
        ("FLUSH", feature::FLUSH),
        ("MQ", feature::MQ),
        ("DISCARD", feature::DISCARD),
        ("WRITE_ZEROES", feature::WRITE_ZEROES),
        ("RING_INDIRECT_DESC", feature::RING_INDIRECT_DESC),
        ("RING_EVENT_IDX", feature::RING_EVENT_IDX),
    ] {
        assert!(d.offered_features & bit != 0, "feature {name} offered");
    }
    assert!(
        d.offered_features & feature::RO == 0,
        "RO not offered on a writable disk"
    );
    assert!(
        c.max_discard_sectors > 0 && c.max_discard_seg > 0,
        "discard limits"
    );
    assert!(
        c.max_write_zeroes_sectors > 0 && c.max_write_zeroes_seg > 0,
        "write-zeroes limits"
    );
    let needed = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(
        d.offered_protocol.contains(needed),
        "protocol features {:?}",
        d.offered_protocol
    );
    assert!(
        !d.offered_protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD is not implemented, so not offered"
    );
    let slots = d.max_mem_slots.expect("GET_MAX_MEM_SLOTS answered");
    assert!(slots > 3, "at least 1 + num_queues memory slots: {slots}");
}

#[test]
fn logical_block_size_4096_is_reported_in_blk_size() {
    let b = spawn(BackendOpts {
        logical_block_size: Some(4096),
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(1);
    assert!(d.has(feature::BLK_SIZE));
    assert_eq!(d.config.blk_size, 4096);
    let data = pattern(16, 8192);
    assert_eq!(d.write(0, 8, &data).status, S_OK, "4 KiB-aligned write");
    let r = d.read(0, 8, 8192);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data);
}

#[test]
fn backend_creates_a_sparse_image_of_the_requested_size() {
    let size = 256 << 20;
    let b = spawn(BackendOpts {
        size,
        backend_creates_image: true,
        ..BackendOpts::default()
    });
    let meta = std::fs::metadata(&b.image).expect("image created");
    assert_eq!(meta.len(), size);
    assert!(
        b.image_blocks() < 2048,
        "created sparse: {} blocks",
        b.image_blocks()
    );
    let mut d = b.connect_queues(1);
    assert_eq!(d.config.capacity, size / SECTOR_SIZE);
    assert_eq!(d.read(0, d.config.capacity - 1, 512).status, S_OK);
}

// ---- lifecycle ----

#[test]
fn second_frontend_attaches_after_the_first_disconnects() {
    let mut b = spawn(BackendOpts {
        num_queues: 2,
        ..BackendOpts::default()
    });
    for generation in 0..3u64 {
        let mut d = b.connect_queues(2);
        if generation > 0 {
            let r = d.read(1, (generation - 1) * 8, 4096);
            assert_eq!(r.status, S_OK, "frontend {generation} reads");
            assert!(
                r.data == pattern(generation - 1, 4096),
                "frontend {generation} sees what frontend {} wrote",
                generation - 1
            );
        }
        let w = d.write(0, generation * 8, &pattern(generation, 4096));
        assert_eq!(w.status, S_OK, "frontend {generation} writes");
        drop(d);
        assert!(
            b.is_running(),
            "backend survives frontend {generation} leaving"
        );
    }
}

#[test]
fn control_socket_counts_requests_per_queue() {
    let b = spawn(BackendOpts {
        num_queues: 2,
        control: true,
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(2);
    for _ in 0..3 {
        assert_eq!(d.read(0, 0, 512).status, S_OK);
    }
    for _ in 0..5 {
        assert_eq!(d.write(1, 8, &pattern(17, 512)).status, S_OK);
    }
    let stats = b.stats();
    let queues = stats["queues"]
        .as_array()
        .expect("stats has a queues array");
    let requests = |i: u64| {
        queues
            .iter()
            .find(|q| q["index"].as_u64() == Some(i))
            .and_then(|q| q["requests"].as_u64())
            .unwrap_or_else(|| panic!("queue {i} missing in {stats}"))
    };
    assert_eq!(requests(0), 3, "queue 0 requests in {stats}");
    assert_eq!(requests(1), 5, "queue 1 requests in {stats}");
}

/// Without EVENT_IDX and with interrupts not suppressed, every completion signals the call
/// eventfd (virtio 1.2 §2.7.7.2); the driver also fails a wait whose used entry shows up
/// without a signal.
#[test]
fn every_completion_is_signalled() {
    let b = spawn(BackendOpts::default());
    let mut d = b.connect_queues(1);
    assert!(!d.has(feature::RING_EVENT_IDX));
    let q = d.queue(0);
    for k in 0..64u64 {
        assert_eq!(q.flush().status, S_OK, "flush {k}");
    }
    // Collects a signal that may land just after its used entry was read.
    q.expect_no_used(Duration::from_millis(50));
    assert!(q.signals() >= 64, "64 completions, {} signals", q.signals());
}

/// A polling thread turns kicks back on before it sleeps: requests spaced wider than the poll
/// window (each arrives after the thread went back to epoll) still complete and are signalled,
/// with and without EVENT_IDX, and the stats count the polls. The window is fixed here, so that
/// the thread polls after every kick however far apart they come.
#[test]
fn requests_after_a_poll_window_ends_are_served() {
    for event_idx in [false, true] {
        let b = spawn(BackendOpts {
            control: true,
            extra_args: vec!["--poll-us".into(), "100".into(), "--poll-fixed".into()],
            ..BackendOpts::default()
        });
        let mut d = b.connect(&Options {
            event_idx,
            ..Options::default()
        });
        let q = d.queue(0);
        for k in 0..20u64 {
            let data = pattern(k, 4096);
            assert_eq!(q.write(k * 8, &data).status, S_OK, "write {k}");
            // Past the window: the thread is asleep again.
            std::thread::sleep(Duration::from_millis(3));
            let c = q.read(k * 8, 4096);
            assert_eq!(c.status, S_OK, "read {k}");
            assert!(c.data == data, "read {k} returns write {k}'s data");
            std::thread::sleep(Duration::from_millis(3));
        }
        let stats = b.stats();
        let queue = &stats["queues"][0];
        assert_eq!(queue["requests"].as_u64(), Some(40), "{stats}");
        let polls = queue["polls"].as_u64().unwrap_or(0);
        let hits = queue["poll_hits"].as_u64().unwrap_or(0);
        assert!(polls >= 40, "a poll after each kick at least: {stats}");
        assert!(hits <= polls, "{stats}");
    }
}

/// Polling is on by default and adapts: under a queue-depth-1 load the queue thread polls (its
/// window grew because each request came soon after the last), and once the queue goes quiet it
/// stops: no poll and (almost) no CPU while idle, and a request after the quiet finds the window
/// collapsed to nothing, so it sleeps at once rather than spinning for a next one.
#[test]
fn default_polling_polls_under_load_and_stops_when_idle() {
    let b = spawn(BackendOpts {
        control: true,
        ..BackendOpts::default()
    });
    let mut d = b.connect(&Options::default());
    let q = d.queue(0);
    let data = pattern(7, 4096);
    assert_eq!(q.write(0, &data).status, S_OK);
    // Back-to-back reads, one at a time, until the thread has polled (on a loaded machine some
    // requests come later than the window; a few hundred always include quick ones).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reads = 0u64;
    let polls_under_load = loop {
        for _ in 0..200 {
            let c = q.read(0, 4096);
            assert_eq!(c.status, S_OK);
            assert!(c.data == data);
            reads += 1;
        }
        let stats = b.stats();
        let polls = stats["queues"][0]["polls"].as_u64().unwrap_or(0);
        if polls > 0 && stats["queues"][0]["poll_hits"].as_u64().unwrap_or(0) > 0 {
            break polls;
        }
        assert!(
            Instant::now() < deadline,
            "no poll that found work after {reads} back-to-back reads: {stats}"
        );
    };

    // Idle: no poll, and the process's CPU stays under half a percent of a core.
    let cpu0 = process_cpu_ticks(b.pid());
    std::thread::sleep(Duration::from_secs(2));
    let cpu1 = process_cpu_ticks(b.pid());
    let stats = b.stats();
    let q0 = &stats["queues"][0];
    assert_eq!(q0["polls"].as_u64(), Some(polls_under_load), "{stats}");
    let ticks_per_s = clock_ticks_per_second();
    let idle_share = (cpu1 - cpu0) as f64 / ticks_per_s / 2.0;
    assert!(
        idle_share <= 0.005,
        "idle backend used {:.2} % of a core",
        idle_share * 100.0
    );

    // A request after the quiet: served, the window collapsed, and no poll for it.
    let c = q.read(0, 4096);
    assert_eq!(c.status, S_OK);
    let stats = b.stats();
    let q0 = &stats["queues"][0];
    assert_eq!(q0["poll_window_ns"].as_u64(), Some(0), "{stats}");
    assert_eq!(q0["polls"].as_u64(), Some(polls_under_load), "{stats}");
}

/// User plus system CPU time of process `pid`, in clock ticks (`/proc/PID/stat` fields 14, 15).
fn process_cpu_ticks(pid: u32) -> u64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat");
    // The command name may hold spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let field = |n: usize| -> u64 { fields[n - 3].parse().expect("a tick count") };
    field(14) + field(15)
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`).
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    hz as f64
}
