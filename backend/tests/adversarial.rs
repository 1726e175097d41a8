//! The guest as an adversary: hostile descriptor chains written straight into the rings of a
//! real vhost-user connection (memfd guest memory, our own split-ring writer), as a malicious
//! driver would write them.
//!
//! For every chain the answer is the one of virtio 1.2 §5.2.6: `IOERR` or `UNSUPP` in the status
//! byte with a used length of 1 where the chain has a usable status byte (its last byte,
//! device-writable, in guest memory), otherwise the chain comes back with a used length of 0 and
//! nothing written. And always:
//! - nothing outside the chain's own device-writable buffers is written: every buffer sits
//!   between guard bytes, device-readable buffers, the descriptor table, the available ring and
//!   the ring padding must be as the driver left them, and the device-writable buffers of a
//!   rejected chain keep their contents except for the status byte;
//! - the image is untouched by a rejected request;
//! - the backend is still up, and a well-formed request is served on the same queue and on
//!   another one.
//!
//! The table of cases and answers is in `docs/security.md`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::blk::{
    self, header, segments_bytes, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
    WRITE_ZEROES_FLAG_UNMAP,
};
use common::ring::{link, Desc, Queue, WaitError};
use common::{
    pattern, Backend, BackendOpts, Device, Options, RegionSpec, Segment, Transfer, SECTOR_SIZE,
    S_IOERR, S_OK, S_UNSUPP,
};

/// How long a hostile chain may take to come back.
const WAIT: Duration = Duration::from_secs(5);
/// Guest memory of the default frontend: one region `[0, 64 MiB)`.
const MEM_END: u64 = 64 << 20;
/// A guest address that no region covers.
const OUTSIDE: u64 = 1 << 32;
/// The length the issue asks about: in range for a u32, far beyond any guest memory here.
const HUGE: u32 = 0xffff_fff0;
/// What the backend logs for a chain it returns unanswered.
const DROP_LOG: &str = "it has no usable status byte";
/// Bytes at each end of the image filled with a known pattern before each test.
const WATCHED_IMAGE: usize = 1 << 20;

/// What the backend must answer a hostile chain with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// `status` in the byte at guest address `at`, used length 1.
    Status { at: u64, status: u8 },
    /// Returned with used length 0 and nothing written: the chain has no usable status byte.
    Dropped,
    /// A well-formed request after all: `S_OK` at `at`, this used length.
    Ok { at: u64, used_len: u32 },
}

fn ioerr(at: u64) -> Answer {
    Answer::Status {
        at,
        status: S_IOERR,
    }
}

fn unsupp(at: u64) -> Answer {
    Answer::Status {
        at,
        status: S_UNSUPP,
    }
}

/// Links `descs` through slots `0..n` (the slots [`Queue::submit_chain`] writes).
fn chain(descs: &[Desc]) -> Vec<Desc> {
    let slots: Vec<u16> = (0..descs.len() as u16).collect();
    link(descs, &slots)
}

/// A hostile chain being built on one queue: its buffers, and the device-writable ones whose
/// contents must survive (all but the status byte).
struct Builder<'q> {
    q: &'q mut Queue,
    watch: Vec<(u64, usize)>,
}

impl Builder<'_> {
    /// A device-readable 16-byte request header.
    fn hdr(&mut self, kind: u32, sector: u64) -> u64 {
        self.q.alloc_bytes(&header(kind, sector), 16)
    }

    /// A device-readable buffer holding `bytes`.
    fn rd(&mut self, bytes: &[u8]) -> u64 {
        let align = if bytes.len() >= 512 { 4096 } else { 16 };
        self.q.alloc_bytes(bytes, align)
    }

    /// A device-writable buffer of `len` bytes, watched.
    fn wr(&mut self, len: u32) -> u64 {
        let align = if len >= 512 { 4096 } else { 16 };
        let addr = self.q.alloc(u64::from(len), align);
        self.watch.push((addr, len as usize));
        addr
    }

    /// A device-writable buffer that starts out holding `bytes`, watched.
    fn wr_with(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.wr(bytes.len() as u32);
        self.q.memory().write(addr, bytes);
        addr
    }

    /// An indirect table holding `descs` exactly as given.
    fn table(&mut self, descs: &[Desc]) -> u64 {
        self.q.alloc_indirect_table(descs)
    }
}

/// Chains of queue `q` that `b` returned unanswered so far, from its control socket (0 for a
/// backend without one).
fn dropped(b: &Backend, q: usize) -> u64 {
    if b.control.is_none() {
        return 0;
    }
    let stats = b.stats();
    stats["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|s| s["index"].as_u64() == Some(q as u64)))
        .and_then(|s| s["dropped"].as_u64())
        .unwrap_or_else(|| panic!("no dropped count for queue {q} in {stats}"))
}

/// A backend with two queues, its image's ends filled with a known pattern.
struct Rig {
    b: Backend,
    d: Device,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Rig {
    fn new() -> Self {
        Self::with(BackendOpts {
            num_queues: 2,
            serial: Some("adversarial-0001".to_owned()),
            control: true,
            ..BackendOpts::default()
        })
    }

    fn with(opts: BackendOpts) -> Self {
        let size = opts.size;
        let b = Backend::spawn(&opts);
        let head = pattern(0xa11ce, WATCHED_IMAGE);
        let tail = pattern(0xb0b, WATCHED_IMAGE);
        b.write_image(0, &head);
        b.write_image(size - WATCHED_IMAGE as u64, &tail);
        let d = b.connect_queues(opts.num_queues);
        Self { b, d, head, tail }
    }

    fn capacity(&self) -> u64 {
        self.d.config.capacity
    }

    /// Submits the chain `build` writes at slots `0..` of queue `q`, waits for it to come back,
    /// and checks the answer, the guards, the image, and that both queues still serve.
    fn case(
        &mut self,
        what: &str,
        q: usize,
        build: impl FnOnce(&mut Builder<'_>) -> (Vec<Desc>, Answer),
    ) {
        let queue = self.d.queue(q);
        let mut builder = Builder {
            q: queue,
            watch: Vec::new(),
        };
        let (descs, answer) = build(&mut builder);
        let watch = std::mem::take(&mut builder.watch);
        let before: Vec<Vec<u8>> = watch
            .iter()
            .map(|&(addr, len)| queue.memory().read(addr, len))
            .collect();
        let dropped_lines = self.b.log().matches(DROP_LOG).count();
        let dropped_before = dropped(&self.b, q);
        let head = queue.submit_chain(&descs);
        let used = queue.wait_used(WAIT).unwrap_or_else(|e| {
            panic!(
                "{what}: the chain never came back ({e:?}); backend log:\n{}",
                self.b.log()
            )
        });
        assert_eq!(
            used.id,
            u32::from(head),
            "{what}: used entry for another head"
        );
        let status_at = match answer {
            Answer::Status { at, status } => {
                assert_eq!(used.len, 1, "{what}: used length");
                let got = queue.memory().read(at, 1)[0];
                assert_eq!(got, status, "{what}: status byte at {at:#x}");
                Some(at)
            }
            Answer::Ok { at, used_len } => {
                assert_eq!(used.len, used_len, "{what}: used length");
                assert_eq!(queue.memory().read(at, 1)[0], S_OK, "{what}: status");
                None
            }
            Answer::Dropped => {
                assert_eq!(used.len, 0, "{what}: a chain without a status byte");
                assert_eq!(
                    dropped(&self.b, q),
                    dropped_before + 1,
                    "{what}: counted as dropped"
                );
                // One line, unless the guest's warning budget is spent (then it is counted).
                assert!(
                    self.b.log().matches(DROP_LOG).count() <= dropped_lines + 1,
                    "{what}: at most one log line for the dropped chain"
                );
                None
            }
        };
        if !matches!(answer, Answer::Ok { .. }) {
            for (&(addr, len), old) in watch.iter().zip(&before) {
                let now = queue.memory().read(addr, len);
                for (i, (a, b)) in old.iter().zip(&now).enumerate() {
                    let at = addr + i as u64;
                    assert!(
                        a == b || Some(at) == status_at,
                        "{what}: device wrote {b:#04x} at {at:#x} in a writable buffer of a \
                         rejected chain (was {a:#04x})"
                    );
                }
            }
        }
        if let Err(problems) = queue.check_guards() {
            panic!("{what}: backend wrote outside the chain's buffers:\n{problems}");
        }
        self.still_serves(what, q);
    }

    /// A well-formed-at-the-ring-level transfer whose request is wrong: executes it (the driver
    /// checks guards and rings), checks status and used length, and that nothing but the status
    /// byte was written for a failed request.
    fn transfer(&mut self, what: &str, t: &Transfer, status: u8, used_len: u32) {
        let c = self.d.queue(0).execute(t);
        assert_eq!((c.status, c.used_len), (status, used_len), "{what}");
        if status != S_OK {
            assert!(
                c.data.iter().all(|&x| x == common::ring::UNWRITTEN_BYTE),
                "{what}: data written for a failed request"
            );
        }
        self.still_serves(what, 0);
    }

    /// The backend is up, the image's watched ends are intact, and a read is served on `q` and
    /// on the other queue.
    fn still_serves(&mut self, what: &str, q: usize) {
        assert!(self.b.is_running(), "{what}: the backend died");
        let size = self.capacity() * SECTOR_SIZE;
        assert!(
            self.b.image_bytes(0, WATCHED_IMAGE) == self.head,
            "{what}: the start of the image changed"
        );
        assert!(
            self.b
                .image_bytes(size - WATCHED_IMAGE as u64, WATCHED_IMAGE)
                == self.tail,
            "{what}: the end of the image changed"
        );
        let other = (q + 1) % self.d.num_queues();
        for queue in [q, other] {
            let r = self.d.read(queue, 8, 4096);
            assert_eq!(
                (r.status, r.used_len),
                (S_OK, 4097),
                "{what}: a read on queue {queue} afterwards"
            );
            assert!(
                r.data == self.head[4096..8192],
                "{what}: the read on queue {queue} afterwards returned the wrong data"
            );
        }
    }
}

// ---- the header ----

#[test]
fn header_too_short_or_device_writable_is_ioerr() {
    let mut rig = Rig::new();
    rig.case("8-byte header", 0, |c| {
        let h = c.rd(&header(T_IN, 0)[..8]);
        let d = c.wr(512);
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 8),
            Desc::writable(d, 512),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case("12-byte header over two descriptors", 0, |c| {
        let bytes = header(T_IN, 0);
        let h1 = c.rd(&bytes[..8]);
        let h2 = c.rd(&bytes[8..12]);
        let s = c.wr(1);
        let descs = [
            Desc::readable(h1, 8),
            Desc::readable(h2, 4),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case("header in a device-writable descriptor", 0, |c| {
        let h = c.wr_with(&header(T_IN, 0));
        let d = c.wr(512);
        let s = c.wr(1);
        let descs = [
            Desc::writable(h, 16),
            Desc::writable(d, 512),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case("header split: 8 readable bytes, 8 writable", 0, |c| {
        let bytes = header(T_OUT, 0);
        let h1 = c.rd(&bytes[..8]);
        let h2 = c.wr_with(&bytes[8..]);
        let s = c.wr(1);
        let descs = [
            Desc::readable(h1, 8),
            Desc::writable(h2, 8),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case("one writable descriptor: header and status", 0, |c| {
        let h = c.wr_with(&header(T_FLUSH, 0));
        (chain(&[Desc::writable(h, 16)]), ioerr(h + 15))
    });
    rig.case("a lone status byte", 0, |c| {
        let s = c.wr(1);
        (chain(&[Desc::writable(s, 1)]), ioerr(s))
    });
    rig.case("header only, no status", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        (chain(&[Desc::readable(h, 16)]), Answer::Dropped)
    });
}

// ---- the status byte ----

#[test]
fn status_missing_zero_length_or_read_only_is_dropped() {
    let mut rig = Rig::new();
    rig.case("OUT without a status descriptor", 0, |c| {
        let h = c.hdr(T_OUT, 0);
        let d = c.rd(&pattern(1, 512));
        let descs = [Desc::readable(h, 16), Desc::readable(d, 512)];
        (chain(&descs), Answer::Dropped)
    });
    rig.case("FLUSH with a zero-length status", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.wr(1);
        let descs = [Desc::readable(h, 16), Desc::writable(s, 0)];
        (chain(&descs), Answer::Dropped)
    });
    rig.case("IN with a zero-length status", 0, |c| {
        // The stream is 16 + 512 bytes: the status is the data's last byte, leaving 511 bytes
        // of data, which is not a whole sector.
        let h = c.hdr(T_IN, 0);
        let d = c.wr(512);
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 16),
            Desc::writable(d, 512),
            Desc::writable(s, 0),
        ];
        (chain(&descs), ioerr(d + 511))
    });
    rig.case("status in a device-readable descriptor", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.rd(&[0x5a]);
        let descs = [Desc::readable(h, 16), Desc::readable(s, 1)];
        (chain(&descs), Answer::Dropped)
    });
    rig.case("IN whose status is device-readable", 0, |c| {
        let h = c.hdr(T_IN, 0);
        let d = c.wr(512);
        let s = c.rd(&[0x5a]);
        let descs = [
            Desc::readable(h, 16),
            Desc::writable(d, 512),
            Desc::readable(s, 1),
        ];
        (chain(&descs), Answer::Dropped)
    });
    rig.case("one zero-length descriptor", 0, |c| {
        let s = c.wr(1);
        (chain(&[Desc::writable(s, 0)]), Answer::Dropped)
    });
}

// ---- directions ----

#[test]
fn data_in_the_wrong_direction_is_ioerr() {
    let mut rig = Rig::new();
    rig.case("IN with device-readable data", 0, |c| {
        let h = c.hdr(T_IN, 0);
        let d = c.rd(&pattern(2, 512));
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 16),
            Desc::readable(d, 512),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case("OUT with device-writable data", 0, |c| {
        let h = c.hdr(T_OUT, 0);
        let d = c.wr_with(&pattern(3, 4096));
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 16),
            Desc::writable(d, 4096),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case("GET_ID with a device-readable buffer", 0, |c| {
        let h = c.hdr(T_GET_ID, 0);
        let d = c.rd(&[0u8; 20]);
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 16),
            Desc::readable(d, 20),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    for (kind, name) in [(T_DISCARD, "DISCARD"), (T_WRITE_ZEROES, "WRITE_ZEROES")] {
        rig.case(&format!("{name} with device-writable ranges"), 0, |c| {
            let h = c.hdr(kind, 0);
            let d = c.wr_with(&segments_bytes(&[Segment::new(0, 8)]));
            let s = c.wr(1);
            let descs = [
                Desc::readable(h, 16),
                Desc::writable(d, 16),
                Desc::writable(s, 1),
            ];
            (chain(&descs), ioerr(s))
        });
    }
    rig.case("device-readable data after device-writable data", 0, |c| {
        let h = c.hdr(T_IN, 0);
        let d1 = c.wr(512);
        let d2 = c.rd(&pattern(4, 512));
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 16),
            Desc::writable(d1, 512),
            Desc::readable(d2, 512),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
}

// ---- guest memory bounds ----

#[test]
fn buffers_outside_guest_memory_or_wrapping_u64_are_rejected() {
    let mut rig = Rig::new();
    for (what, addr) in [
        ("IN data outside guest memory", OUTSIDE),
        ("IN data across the end of guest memory", MEM_END - 256),
        ("IN data whose addr + len wraps u64", u64::MAX - 255),
    ] {
        rig.case(what, 0, |c| {
            let h = c.hdr(T_IN, 0);
            let s = c.wr(1);
            let descs = [
                Desc::readable(h, 16),
                Desc::writable(addr, 512),
                Desc::writable(s, 1),
            ];
            (chain(&descs), ioerr(s))
        });
    }
    for (what, addr) in [
        ("OUT data outside guest memory", OUTSIDE),
        ("OUT data whose addr + len wraps u64", u64::MAX - 255),
    ] {
        rig.case(what, 0, |c| {
            let h = c.hdr(T_OUT, 0);
            let s = c.wr(1);
            let descs = [
                Desc::readable(h, 16),
                Desc::readable(addr, 512),
                Desc::writable(s, 1),
            ];
            (chain(&descs), ioerr(s))
        });
    }
    for (what, addr) in [
        ("header outside guest memory", OUTSIDE),
        ("header whose addr + len wraps u64", u64::MAX - 7),
    ] {
        rig.case(what, 0, |c| {
            let s = c.wr(1);
            let descs = [Desc::readable(addr, 16), Desc::writable(s, 1)];
            (chain(&descs), ioerr(s))
        });
    }
    for (what, addr, len) in [
        ("status outside guest memory", OUTSIDE, 1),
        ("status at the last byte of the address space", u64::MAX, 1),
        ("status whose addr + len wraps u64", u64::MAX, 2),
        ("status just past guest memory", MEM_END, 1),
    ] {
        rig.case(what, 0, |c| {
            let h = c.hdr(T_FLUSH, 0);
            let descs = [Desc::readable(h, 16), Desc::writable(addr, len)];
            (chain(&descs), Answer::Dropped)
        });
    }
    rig.case("status at the last byte of guest memory", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        // Outside the arena: only the status byte may change, and it must be OK.
        let at = MEM_END - 1;
        c.q.memory().write(at, &[0xee]);
        let descs = [Desc::readable(h, 16), Desc::writable(at, 1)];
        (chain(&descs), Answer::Ok { at, used_len: 1 })
    });
}

#[test]
fn buffers_in_a_hole_between_regions_are_ioerr() {
    let mut b = Backend::spawn(&BackendOpts::default());
    let mut d = b.connect(&Options {
        num_queues: Some(1),
        memory: vec![
            RegionSpec::new(0, 16 << 20),
            RegionSpec::new(1 << 30, 16 << 20),
        ],
        ..Options::default()
    });
    let q = d.queue(0);
    let h = q.alloc_bytes(&header(T_IN, 0), 16);
    let s = q.alloc(1, 16);
    for (what, addr, len) in [
        ("in the hole", 512 << 20, 512),
        ("from region 0 into the hole", (16 << 20) - 512, 1024),
        ("from the hole into region 1", (1 << 30) - 512, 1024),
    ] {
        q.submit_chain(&chain(&[
            Desc::readable(h, 16),
            Desc::writable(addr, len),
            Desc::writable(s, 1),
        ]));
        let u = q.wait_used(WAIT).expect("the chain comes back");
        assert_eq!(u.len, 1, "{what}: used length");
        assert_eq!(q.memory().read(s, 1)[0], S_IOERR, "{what}: status");
        q.check_guards().unwrap_or_else(|p| panic!("{what}: {p}"));
    }
    assert!(b.is_running());
    assert_eq!(d.read(0, 0, 4096).status, S_OK, "the queue still serves");
}

#[test]
fn huge_lengths_are_rejected() {
    let mut rig = Rig::new();
    // With the 16-byte header, 0xffff_fff0 data bytes make the chain 4 GiB, which virtio-queue
    // stops walking (virtio 1.2 §2.7.5.2); but its end can still be walked, to a good status
    // byte, which gets IOERR.
    rig.case("IN data of 0xffff_fff0 bytes: a 4 GiB chain", 0, |c| {
        let h = c.hdr(T_IN, 0);
        let d = c.wr(4096);
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 16),
            Desc::writable(d, HUGE),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case("OUT data of 0xffff_fff0 bytes: a 4 GiB chain", 0, |c| {
        let h = c.hdr(T_OUT, 0);
        let d = c.rd(&pattern(5, 4096));
        let s = c.wr(1);
        let descs = [
            Desc::readable(h, 16),
            Desc::readable(d, HUGE),
            Desc::writable(s, 1),
        ];
        (chain(&descs), ioerr(s))
    });
    rig.case(
        "IN data of 0xffff_fff0 bytes behind an indirect table: a 4 GiB chain",
        0,
        |c| {
            let h = c.hdr(T_IN, 0);
            let d = c.wr(4096);
            let s = c.wr(1);
            let t = c.table(&chain(&[
                Desc::readable(h, 16),
                Desc::writable(d, HUGE),
                Desc::writable(s, 1),
            ]));
            (vec![Desc::indirect(t, 3)], ioerr(s))
        },
    );
    for (kind, flags) in [(T_IN, Desc::F_WRITE), (T_OUT, 0)] {
        rig.case(
            &format!("type {kind} data of 0xffff_ffe0 bytes: under 4 GiB, outside memory"),
            0,
            |c| {
                let h = c.hdr(kind, 0);
                let d = c.wr(4096);
                let s = c.wr(1);
                let descs = [
                    Desc::readable(h, 16),
                    Desc::new(d, 0xffff_ffe0, flags, 0),
                    Desc::writable(s, 1),
                ];
                (chain(&descs), ioerr(s))
            },
        );
    }
    rig.case("status of 0xffff_ffe0 bytes", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.wr(1);
        let descs = [Desc::readable(h, 16), Desc::writable(s, 0xffff_ffe0)];
        (chain(&descs), Answer::Dropped)
    });
    rig.case("header of 0xffff_fff0 bytes", 0, |c| {
        let h = c.hdr(T_IN, 0);
        let s = c.wr(1);
        let descs = [Desc::readable(h, HUGE), Desc::writable(s, 1)];
        (chain(&descs), ioerr(s))
    });
    rig.case("status of 0xffff_fff0 bytes", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.wr(1);
        let descs = [Desc::readable(h, 16), Desc::writable(s, HUGE)];
        (chain(&descs), Answer::Dropped)
    });
    rig.case(
        "two 2 GiB data descriptors: more than 4 GiB in one chain",
        0,
        |c| {
            let h = c.hdr(T_IN, 0);
            let d = c.wr(4096);
            let s = c.wr(1);
            let descs = [
                Desc::readable(h, 16),
                Desc::writable(d, 0x8000_0000),
                Desc::writable(d, 0x8000_0000),
                Desc::writable(s, 1),
            ];
            (chain(&descs), ioerr(s))
        },
    );
    rig.case(
        "IN data segment over size_max, inside guest memory",
        0,
        |c| {
            let h = c.hdr(T_IN, 0);
            let d = c.wr(2 << 20);
            let s = c.wr(1);
            let descs = [
                Desc::readable(h, 16),
                Desc::writable(d, 2 << 20),
                Desc::writable(s, 1),
            ];
            (chain(&descs), ioerr(s))
        },
    );
}

// ---- lengths and sectors ----

#[test]
fn io_lengths_not_a_multiple_of_512_are_ioerr() {
    let mut rig = Rig::new();
    for len in [1u32, 511, 513, 4095, 4097] {
        rig.transfer(
            &format!("IN of {len} bytes"),
            &Transfer::blk(T_IN, 0, &[], len),
            S_IOERR,
            1,
        );
        rig.transfer(
            &format!("OUT of {len} bytes"),
            &Transfer::blk(T_OUT, 0, &pattern(6, len as usize), 0),
            S_IOERR,
            1,
        );
    }
    // 512 bytes cut 100 + 412: the total is what counts.
    let c = rig
        .d
        .queue(0)
        .execute(
            &Transfer::blk(T_IN, 8, &[], 512).with_layout(common::Layout::Cuts {
                readable: vec![16],
                writable: vec![100, 412, 1],
            }),
        );
    assert_eq!((c.status, c.used_len), (S_OK, 513), "512 bytes in two cuts");
    rig.transfer(
        "IN of 0 bytes: no I/O, OK",
        &Transfer::blk(T_IN, 0, &[], 0),
        S_OK,
        1,
    );
}

#[test]
fn sectors_not_aligned_to_a_4096_byte_logical_block_are_ioerr() {
    let mut rig = Rig::with(BackendOpts {
        num_queues: 2,
        logical_block_size: Some(4096),
        ..BackendOpts::default()
    });
    for sector in [1u64, 4, 7, 9] {
        rig.transfer(
            &format!("OUT at sector {sector}"),
            &Transfer::blk(T_OUT, sector, &pattern(7, 4096), 0),
            S_IOERR,
            1,
        );
    }
    rig.transfer(
        "IN of 512 bytes",
        &Transfer::blk(T_IN, 0, &[], 512),
        S_IOERR,
        1,
    );
    rig.transfer(
        "DISCARD of one 512-byte sector",
        &Transfer::blk(T_DISCARD, 0, &segments_bytes(&[Segment::new(0, 1)]), 0),
        S_IOERR,
        1,
    );
}

#[test]
fn sectors_at_or_past_the_capacity_or_overflowing_are_ioerr() {
    let mut rig = Rig::new();
    let cap = rig.capacity();
    let size = std::fs::metadata(&rig.b.image).expect("image").len();
    for (what, sector, len) in [
        ("at the capacity", cap, 512u32),
        ("crossing the end", cap - 1, 1024),
        ("crossing the end by a lot", cap - 8, 1 << 20),
        ("far past the end", cap + (1 << 30), 512),
        ("sector * 512 overflows u64", u64::MAX / 512 + 1, 512),
        ("sector u64::MAX", u64::MAX, 512),
        ("offset + length overflows u64", u64::MAX / 512, 1024),
        ("offset + length wraps to 0", (u64::MAX - 4095) / 512, 4096),
    ] {
        rig.transfer(
            &format!("IN {what}"),
            &Transfer::blk(T_IN, sector, &[], len),
            S_IOERR,
            1,
        );
        rig.transfer(
            &format!("OUT {what}"),
            &Transfer::blk(T_OUT, sector, &pattern(8, len as usize), 0),
            S_IOERR,
            1,
        );
    }
    let len = std::fs::metadata(&rig.b.image).expect("image").len();
    assert_eq!(len, size, "rejected writes did not grow the image");
    let r = rig.d.read(0, cap - 1, 512);
    assert_eq!(r.status, S_OK, "the last sector is still readable");
    assert!(r.data == rig.tail[WATCHED_IMAGE - 512..]);
}

// ---- the shape of the chain ----

#[test]
fn descriptor_loops_and_bad_next_indices_are_dropped() {
    let mut rig = Rig::new();
    rig.case("header linked to itself", 0, |c| {
        let h = c.hdr(T_IN, 0);
        (vec![Desc::readable(h, 16).then(0)], Answer::Dropped)
    });
    rig.case("header and status linked in a cycle", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.wr(1);
        (
            vec![Desc::readable(h, 16).then(1), Desc::writable(s, 1).then(0)],
            Answer::Dropped,
        )
    });
    rig.case("status linked back to the data", 0, |c| {
        let h = c.hdr(T_IN, 0);
        let d = c.wr(512);
        let s = c.wr(1);
        (
            vec![
                Desc::readable(h, 16).then(1),
                Desc::writable(d, 512).then(2),
                Desc::writable(s, 1).then(1),
            ],
            Answer::Dropped,
        )
    });
    for next in [256u16, 257, 1024, u16::MAX] {
        rig.case(&format!("next = {next}, past the table"), 0, |c| {
            let h = c.hdr(T_FLUSH, 0);
            let s = c.wr(1);
            (
                vec![Desc::readable(h, 16).then(next), Desc::writable(s, 1)],
                Answer::Dropped,
            )
        });
    }
    rig.case("every slot of the table in one cycle", 0, |c| {
        let h = c.hdr(T_OUT, 0);
        let d = c.rd(&pattern(9, 512));
        let size = c.q.size();
        let mut descs = vec![Desc::readable(h, 16).then(1)];
        for i in 1..size {
            descs.push(Desc::readable(d, 512).then((i + 1) % size));
        }
        (descs, Answer::Dropped)
    });
}

#[test]
fn avail_entry_with_a_head_past_the_table_is_skipped() {
    let mut rig = Rig::new();
    for head in [256u16, 4096, u16::MAX] {
        let q = rig.d.queue(0);
        let slot = q.avail_idx();
        q.write_avail_entry(slot, head);
        q.set_avail_idx(slot.wrapping_add(1));
        q.kick();
        // There is no descriptor to return: the entry is consumed and no used entry written.
        q.expect_no_used(Duration::from_millis(200));
        q.check_guards()
            .unwrap_or_else(|p| panic!("head {head}: {p}"));
        rig.still_serves(&format!("head {head}"), 0);
    }
}

#[test]
fn chains_longer_than_the_queue_are_ioerr_or_dropped() {
    let mut rig = Rig::new();
    let seg_max = rig.d.config.seg_max;
    assert_eq!(seg_max, 254, "seg_max is the queue size minus 2");
    rig.case(
        "indirect table of 300 descriptors: more data segments than seg_max",
        0,
        |c| {
            let h = c.hdr(T_OUT, 0);
            let d = c.rd(&pattern(10, 512));
            let s = c.wr(1);
            let mut inner = vec![Desc::readable(h, 16)];
            inner.extend(std::iter::repeat_n(Desc::readable(d, 512), 298));
            inner.push(Desc::writable(s, 1));
            let table = c.table(&chain(&inner));
            (vec![Desc::indirect(table, 300)], ioerr(s))
        },
    );
    rig.case(
        "direct chain of 256 descriptors: seg_max data segments",
        0,
        |c| {
            // The longest chain the table holds is well-formed: header, 254 x 512 bytes, status.
            let h = c.hdr(T_IN, 0);
            let d = c.wr(254 * 512);
            let s = c.wr(1);
            let mut descs = vec![Desc::readable(h, 16)];
            descs.extend((0..254).map(|i| Desc::writable(d + 512 * i, 512)));
            descs.push(Desc::writable(s, 1));
            (
                chain(&descs),
                Answer::Ok {
                    at: s,
                    used_len: 254 * 512 + 1,
                },
            )
        },
    );
    rig.case("indirect table of 4096 descriptors, cycling", 0, |c| {
        let h = c.hdr(T_IN, 0);
        let d = c.wr(512);
        let mut inner = vec![Desc::readable(h, 16).then(1)];
        inner.extend((1..4096u16).map(|i| Desc::writable(d, 512).then(1 + i % 4095)));
        let table = c.table(&inner);
        (vec![Desc::indirect(table, 4096)], Answer::Dropped)
    });
}

#[test]
fn bad_indirect_tables_are_dropped() {
    let mut rig = Rig::new();
    rig.case("indirect table inside an indirect table", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.wr(1);
        let inner = c.table(&[Desc::writable(s, 1)]);
        let outer = c.table(&chain(&[Desc::readable(h, 16), Desc::indirect(inner, 1)]));
        (vec![Desc::indirect(outer, 2)], Answer::Dropped)
    });
    rig.case(
        "indirect table whose first entry is an indirect table",
        0,
        |c| {
            let h = c.hdr(T_FLUSH, 0);
            let s = c.wr(1);
            let inner = c.table(&chain(&[Desc::readable(h, 16), Desc::writable(s, 1)]));
            let outer = c.table(&[Desc::indirect(inner, 2)]);
            (vec![Desc::indirect(outer, 1)], Answer::Dropped)
        },
    );
    for len in [8u32, 40, 47, 1] {
        rig.case(
            &format!("indirect table of {len} bytes, not a multiple of 16"),
            0,
            |c| {
                let h = c.hdr(T_FLUSH, 0);
                let s = c.wr(1);
                let table = c.table(&chain(&[
                    Desc::readable(h, 16),
                    Desc::writable(s, 1),
                    Desc::writable(s, 0),
                ]));
                (
                    vec![Desc::new(table, len, Desc::F_INDIRECT, 0)],
                    Answer::Dropped,
                )
            },
        );
    }
    rig.case("indirect table of 0 bytes", 0, |c| {
        let table = c.table(&[Desc::default()]);
        (
            vec![Desc::new(table, 0, Desc::F_INDIRECT, 0)],
            Answer::Dropped,
        )
    });
    rig.case("indirect table outside guest memory", 0, |_| {
        (vec![Desc::indirect(OUTSIDE, 2)], Answer::Dropped)
    });
    rig.case("indirect table whose entry links past the table", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.wr(1);
        let table = c.table(&[Desc::readable(h, 16).then(2), Desc::writable(s, 1)]);
        (vec![Desc::indirect(table, 2)], Answer::Dropped)
    });
    rig.case("indirect table with a cycle", 0, |c| {
        let h = c.hdr(T_FLUSH, 0);
        let s = c.wr(1);
        let table = c.table(&[Desc::readable(h, 16).then(1), Desc::writable(s, 1).then(0)]);
        (vec![Desc::indirect(table, 2)], Answer::Dropped)
    });
    rig.case(
        "ring descriptor with INDIRECT and NEXT: the table is the chain",
        0,
        |c| {
            // virtio 1.2 §2.7.5.3.1 forbids the driver both flags; the device follows the table
            // and ignores the ring descriptor's next, as virtio-queue does.
            let h = c.hdr(T_FLUSH, 0);
            let s = c.wr(1);
            let stray = c.wr(1);
            let table = c.table(&chain(&[Desc::readable(h, 16), Desc::writable(s, 1)]));
            (
                vec![Desc::indirect(table, 2).then(1), Desc::writable(stray, 1)],
                Answer::Ok { at: s, used_len: 1 },
            )
        },
    );
}

// ---- request types ----

#[test]
fn unknown_request_types_are_unsupp() {
    let mut rig = Rig::new();
    let secure_erase = rig.d.offered_features & (1 << 16) != 0;
    for kind in [2u32, 3, 5, 6, 10, 12, 14, 16, 0xff, 0x8000_0000, u32::MAX] {
        if kind == blk::T_SECURE_ERASE && secure_erase {
            continue;
        }
        rig.transfer(
            &format!("type {kind:#x}"),
            &Transfer::blk(kind, 0, &[], 0),
            S_UNSUPP,
            1,
        );
        rig.transfer(
            &format!("type {kind:#x} with device-writable data"),
            &Transfer::blk(kind, 0, &[], 512),
            S_UNSUPP,
            1,
        );
        rig.transfer(
            &format!("type {kind:#x} with device-readable data"),
            &Transfer::blk(kind, 0, &pattern(11, 512), 0),
            S_UNSUPP,
            1,
        );
    }
    rig.case("type 0xff, data and status in one descriptor", 0, |c| {
        let h = c.hdr(0xff, 0);
        let d = c.wr(513);
        let descs = [Desc::readable(h, 16), Desc::writable(d, 513)];
        (chain(&descs), unsupp(d + 512))
    });
}

#[test]
fn get_id_into_short_long_or_missing_buffers() {
    let mut rig = Rig::new();
    let c = rig.d.get_id(0, 4);
    assert_eq!((c.status, c.used_len), (S_OK, 5), "GET_ID into 4 bytes");
    assert_eq!(c.data, b"adve");
    rig.case(
        "GET_ID: 4 ID bytes and the status in one descriptor",
        0,
        |c| {
            let h = c.hdr(T_GET_ID, 0);
            let d = c.wr(5);
            let descs = [Desc::readable(h, 16), Desc::writable(d, 5)];
            (
                chain(&descs),
                Answer::Ok {
                    at: d + 4,
                    used_len: 5,
                },
            )
        },
    );
    let c = rig.d.get_id(0, 100);
    assert_eq!(
        (c.status, c.used_len),
        (S_OK, 21),
        "GET_ID into 100 bytes: 20 written"
    );
    assert_eq!(&c.data[..16], b"adversarial-0001");
    assert!(c.data[16..20].iter().all(|&x| x == 0), "NUL padding");
    assert!(
        c.data[20..]
            .iter()
            .all(|&x| x == common::ring::UNWRITTEN_BYTE),
        "nothing past the 20 ID bytes"
    );
    let c = rig
        .d
        .queue(0)
        .execute(
            &Transfer::blk(T_GET_ID, 0, &[], 20).with_layout(common::Layout::Cuts {
                readable: vec![16],
                writable: vec![3, 2, 15, 1],
            }),
        );
    assert_eq!((c.status, c.used_len), (S_OK, 21), "GET_ID in three cuts");
    rig.transfer(
        "GET_ID without a buffer",
        &Transfer::blk(T_GET_ID, 0, &[], 0),
        S_IOERR,
        1,
    );
}

#[test]
fn discard_and_write_zeroes_with_bad_ranges_or_flags_are_rejected() {
    let mut rig = Rig::new();
    let cap = rig.capacity();
    let max_sectors = rig.d.config.max_discard_sectors;
    let max_seg = rig.d.config.max_discard_seg;
    assert_eq!(max_sectors, rig.d.config.max_write_zeroes_sectors);
    assert_eq!(max_seg, rig.d.config.max_write_zeroes_seg);
    let ok = Segment::new(0, 8);
    for (kind, name) in [(T_DISCARD, "DISCARD"), (T_WRITE_ZEROES, "WRITE_ZEROES")] {
        let mut cases: Vec<(String, Vec<u8>, u8)> = vec![
            ("no payload".into(), vec![], S_IOERR),
            ("payload of 8 bytes".into(), vec![0; 8], S_IOERR),
            (
                "payload of 24 bytes".into(),
                segments_bytes(&[ok])
                    .into_iter()
                    .chain([0; 8])
                    .collect::<Vec<u8>>(),
                S_IOERR,
            ),
        ];
        for (what, seg) in [
            ("a range of 0 sectors", Segment::new(0, 0)),
            ("a range at the capacity", Segment::new(cap, 8)),
            ("a range crossing the end", Segment::new(cap - 4, 8)),
            (
                "a range whose byte offset overflows",
                Segment::new(u64::MAX / 512 + 1, 8),
            ),
            ("a range whose end wraps u64", Segment::new(u64::MAX - 3, 8)),
            ("a range over the limit", Segment::new(0, max_sectors + 8)),
            ("a range of u32::MAX sectors", Segment::new(0, u32::MAX)),
        ] {
            cases.push((what.into(), segments_bytes(&[seg]), S_IOERR));
            // A good range first: nothing is applied unless every range is good.
            cases.push((
                format!("a good range, then {what}"),
                segments_bytes(&[ok, seg]),
                S_IOERR,
            ));
        }
        cases.push((
            format!("{} ranges, one over the limit", max_seg + 1),
            segments_bytes(&vec![ok; max_seg as usize + 1]),
            S_IOERR,
        ));
        let reserved: &[u32] = if kind == T_DISCARD {
            &[WRITE_ZEROES_FLAG_UNMAP, 2, 0x8000_0000]
        } else {
            &[2, 4, 0x8000_0000, WRITE_ZEROES_FLAG_UNMAP | 2]
        };
        for &flags in reserved {
            let seg = Segment { flags, ..ok };
            cases.push((
                format!("flags {flags:#x}"),
                segments_bytes(&[seg]),
                S_UNSUPP,
            ));
            cases.push((
                format!("a good range, then flags {flags:#x}"),
                segments_bytes(&[ok, seg]),
                S_UNSUPP,
            ));
        }
        for (what, payload, status) in cases {
            rig.transfer(
                &format!("{name} with {what}"),
                &Transfer::blk(kind, 0, &payload, 0),
                status,
                1,
            );
        }
    }
}

#[test]
fn flush_with_a_data_buffer_is_ioerr() {
    let mut rig = Rig::new();
    rig.transfer(
        "FLUSH with device-readable data",
        &Transfer::blk(T_FLUSH, 0, &pattern(12, 512), 0),
        S_IOERR,
        1,
    );
    rig.transfer(
        "FLUSH with device-writable data",
        &Transfer::blk(T_FLUSH, 0, &[], 512),
        S_IOERR,
        1,
    );
    rig.transfer(
        "FLUSH with one device-writable data byte",
        &Transfer::blk(T_FLUSH, 0, &[], 1),
        S_IOERR,
        1,
    );
    rig.transfer(
        "FLUSH with a sector: ignored",
        &Transfer::blk(T_FLUSH, u64::MAX, &[], 0),
        S_OK,
        1,
    );
}

// ---- the rings ----

/// A guest that moves its available index more than a queue size ahead broke its own ring:
/// that queue may stay stuck, but the backend stays up, the other queues keep serving, and the
/// next frontend gets a working device.
#[test]
fn avail_index_jumping_past_the_queue_size_breaks_only_that_queue() {
    let mut rig = Rig::new();
    let q = rig.d.queue(0);
    let size = q.size();
    let jumped = q.avail_idx().wrapping_add(size + 45);
    q.set_avail_idx(jumped);
    q.kick();
    match q.wait_used(Duration::from_millis(300)) {
        Err(WaitError::Timeout) => {}
        other => panic!("a ring the guest broke returned {other:?}"),
    }
    q.check_guards()
        .unwrap_or_else(|p| panic!("avail index jump: {p}"));
    q.kick();
    for k in 0..32u64 {
        assert!(rig.b.is_running(), "the backend died");
        let r = rig.d.read(1, 8, 4096);
        assert_eq!(r.status, S_OK, "queue 1, read {k} after queue 0 broke");
        assert!(r.data == rig.head[4096..8192]);
        let w = rig.d.write(1, 4096, &pattern(k, 4096));
        assert_eq!(w.status, S_OK, "queue 1, write {k} after queue 0 broke");
    }
    assert!(rig.b.is_running(), "the backend died");
    assert!(
        rig.b.log().contains("InvalidAvailRingIndex")
            || rig.b.log().to_lowercase().contains("avail"),
        "the broken ring is logged"
    );
    // The VM reboots: a new frontend gets every queue back.
    let Rig { b, d, .. } = rig;
    drop(d);
    let mut d = b.connect_queues(2);
    for q in 0..2 {
        assert_eq!(d.read(q, 0, 4096).status, S_OK, "queue {q} after reconnect");
    }
}

/// A guest keeping queue 0 full from one thread does not starve queue 1: every queue-1 request
/// completes within a generous bound, and queue 1 makes progress all through the flood.
#[test]
fn a_flooded_queue_does_not_starve_another() {
    const FLOOD_FOR: Duration = Duration::from_secs(3);
    const BOUND: Duration = Duration::from_secs(2);
    let b = Backend::spawn(&BackendOpts {
        num_queues: 2,
        ..BackendOpts::default()
    });
    let mut d = b.connect(&Options {
        num_queues: Some(2),
        memory: vec![RegionSpec::new(0, 256 << 20)],
        ..Options::default()
    });
    let stop = AtomicBool::new(false);
    let flooded = AtomicU64::new(0);
    let (q0, q1) = d.queues_mut().split_at_mut(1);
    let (q0, q1) = (&mut q0[0], &mut q1[0]);
    let size = usize::from(q0.size());
    std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let data = pattern(13, 32 << 10);
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // One wave: fill the ring (one descriptor per request, behind indirect tables),
                // then keep it full, replacing each completion, for 1024 requests; then let it
                // drain so the driver can reuse its buffer arena.
                let mut window = std::collections::VecDeque::new();
                for _ in 0..1024 {
                    if window.len() == size {
                        let t = window.pop_front().expect("a full window");
                        assert_eq!(q0.complete(t).status, S_OK, "flood request");
                        flooded.fetch_add(1, Ordering::Relaxed);
                    }
                    let sector = (k % 1024) * 64;
                    let t = if k % 2 == 0 {
                        Transfer::blk(T_OUT, sector, &data, 0)
                    } else {
                        Transfer::blk(T_IN, sector, &[], data.len() as u32)
                    };
                    window.push_back(q0.submit(&t.indirect()));
                    k += 1;
                }
                for t in window {
                    assert_eq!(q0.complete(t).status, S_OK, "flood request");
                    flooded.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // Stops the flood however this thread leaves the scope, a failed assertion included.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let started = Instant::now();
        while flooded.load(Ordering::Relaxed) == 0 {
            assert!(started.elapsed() < BOUND, "the flood never got going");
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = flooded.load(Ordering::Relaxed);
        let start = Instant::now();
        let (mut served, mut worst) = (0u64, Duration::ZERO);
        while start.elapsed() < FLOOD_FOR {
            let t0 = Instant::now();
            let r = q1.read(100_000, 4096);
            let took = t0.elapsed();
            assert_eq!(r.status, S_OK, "queue 1 during the flood");
            assert!(
                took < BOUND,
                "queue 1 request {served} took {took:?} during the flood"
            );
            served += 1;
            worst = worst.max(took);
        }
        let during = flooded.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        flood.join().expect("the flood thread");
        eprintln!(
            "flood: {during} queue-0 requests and {served} queue-1 requests in {FLOOD_FOR:?}; \
             worst queue-1 latency {worst:?}"
        );
        assert!(
            during >= 2 * size as u64,
            "queue 0 was really flooded: {during}"
        );
        assert!(served >= 20, "queue 1 made progress: {served} requests");
    });
}

/// A guest sending bad chains in a loop gets IOERR for every one of them, but does not flood
/// the log: the warnings it triggers are rate-limited per queue, and a later line says how
/// many were left out, so that the two add up to what the guest sent.
#[test]
fn bad_chains_in_a_loop_do_not_flood_the_log() {
    const BAD: usize = 400;
    let mut rig = Rig::new();
    let q = rig.d.queue(0);
    // A header of 8 bytes: IOERR in the status byte.
    let h = q.alloc_bytes(&header(T_IN, 0)[..8], 16);
    let s = q.alloc(1, 16);
    let bad = chain(&[Desc::readable(h, 8), Desc::writable(s, 1)]);
    let send = |q: &mut Queue| {
        q.memory().write(s, &[0xee]);
        q.submit_chain(&bad);
        let u = q.wait_used(WAIT).expect("the bad chain comes back");
        assert_eq!(u.len, 1, "used length of a bad chain");
        assert_eq!(q.memory().read(s, 1)[0], S_IOERR, "status of a bad chain");
    };
    for _ in 0..BAD {
        send(q);
    }
    // Long enough for the limit to let a warning through again: it reports what it left out.
    std::thread::sleep(Duration::from_secs(2));
    send(q);
    let log = rig.b.log();
    let logged = log.matches("rejecting head").count();
    let suppressed: usize = log
        .lines()
        .filter_map(|l| l.split("left out ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    assert!(
        logged < BAD / 4,
        "{logged} warnings logged for {} bad chains",
        BAD + 1
    );
    assert_eq!(
        logged + suppressed,
        BAD + 1,
        "logged + left out = sent ({logged} + {suppressed}); log:\n{log}"
    );
    rig.still_serves("after the loop of bad chains", 0);
}
