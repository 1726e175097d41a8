//! What both fuzz targets share: guest memory with a hole, limits decoded from fuzz bytes, a
//! drain loop that pops every available chain and parses it the way the backend does, and the
//! invariants every parse result must satisfy (beyond not crashing).

#![allow(dead_code)]

use virtio_blk::{
    write_device_id, write_status, Limits, ParseError, Request, RequestBuffers, RequestType,
    DEVICE_ID_LEN, SECTOR_SIZE, STATUS_IOERR, STATUS_UNSUPP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// The guest memory of one run.
pub type Mem = GuestMemoryMmap<()>;

/// Region 0: the rings from 0, then buffers from [`DATA`]. A hole, then region 1.
pub const REGION0: (u64, usize) = (0, 0x1_0000);
/// The second region, after a hole.
pub const REGION1: (u64, usize) = (0x2_0000, 0x8000);
/// Start of the buffer area in region 0 (the rings of a 256-entry queue end before it).
pub const DATA: u64 = 0x4000;
/// Bytes of buffer area in region 0.
pub const DATA_LEN: u64 = REGION0.1 as u64 - DATA;

thread_local! {
    /// Mapped once per fuzzing thread: mapping and unmapping for every input costs more than
    /// the parse.
    static MEMORY: Mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
    ])
    .expect("guest memory");
}

/// Runs `f` over the guest memory, zeroed first.
pub fn with_memory<T>(f: impl FnOnce(&Mem) -> T) -> T {
    static ZEROES: [u8; REGION0.1] = [0; REGION0.1];
    MEMORY.with(|mem| {
        mem.write_slice(&ZEROES, GuestAddress(REGION0.0))
            .expect("region 0");
        mem.write_slice(&ZEROES[..REGION1.1], GuestAddress(REGION1.0))
            .expect("region 1");
        f(mem)
    })
}

/// Copies `bytes` into the buffer areas: region 0's first, then region 1.
pub fn fill(mem: &Mem, bytes: &[u8]) {
    let n0 = bytes.len().min(DATA_LEN as usize);
    mem.write_slice(&bytes[..n0], GuestAddress(DATA))
        .expect("data area");
    let rest = &bytes[n0..];
    let n1 = rest.len().min(REGION1.1);
    mem.write_slice(&rest[..n1], GuestAddress(REGION1.0))
        .expect("region 1");
}

/// An address a fuzzer can steer to the interesting places: inside the buffer areas, at the
/// edges of the regions and of the address space, or anywhere.
pub fn steer(kind: u8, off: u32, raw: u64) -> u64 {
    let off = u64::from(off);
    match kind % 8 {
        0 | 1 => DATA + off % DATA_LEN,
        2 => REGION1.0 + off % REGION1.1 as u64,
        3 => (REGION0.1 as u64).wrapping_sub(off % 64),
        4 => (REGION1.0 + REGION1.1 as u64).wrapping_sub(off % 64),
        5 => u64::MAX - off % 4096,
        6 => REGION0.1 as u64 + off % 0x1_0000, // the hole
        _ => raw,
    }
}

/// A descriptor length a fuzzer can steer: small, whole sectors, a header, or anything.
pub fn steer_len(kind: u8, raw: u32) -> u32 {
    match kind % 8 {
        0 => raw % 32,
        1 => 512 * (raw % 9),
        2 => 16,
        3 => 1,
        4 => 16 * (raw % 20),
        5 => u32::MAX - raw % 32,
        6 => 0,
        _ => raw,
    }
}

/// Limits decoded from 8 bytes, covering the corners the backend can be configured into.
pub fn limits(b: [u8; 8]) -> Limits {
    let pick = |i: usize, choices: &[u64]| choices[usize::from(b[i]) % choices.len()];
    Limits {
        capacity_sectors: pick(0, &[2048, 0, 1, 8, 131_072, u64::MAX >> 9, u64::MAX]),
        seg_max: u32::from(b[1] % 8) + if b[1] & 0x80 != 0 { 250 } else { 1 },
        size_max: pick(2, &[0, 4096, 512, 1 << 20, 1]) as u32,
        max_discard_sectors: pick(3, &[1 << 21, 8, 1, 0, u32::MAX as u64]) as u32,
        max_discard_seg: u32::from(b[4] % 17),
        max_write_zeroes_sectors: pick(5, &[1 << 21, 8, 1, 0, u32::MAX as u64]) as u32,
        max_write_zeroes_seg: u32::from(b[4] / 17 % 17),
        discard_sector_alignment: 8,
        write_zeroes_may_unmap: b[6] & 1 != 0,
        read_only: b[6] & 2 != 0,
        logical_block_size: pick(7, &[512, 4096, 0, 1000, 1024, 1 << 16]) as u32,
    }
}

/// Pops every chain the queue offers and parses each as the backend does; checks the results.
/// Returns the number of chains parsed.
pub fn drain(queue: &mut Queue, mem: &Mem, limits: &Limits) -> usize {
    let mut bufs = RequestBuffers::new(limits);
    let mut n = 0;
    // Bounded by the queue: the available index may not run more than a queue size ahead.
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let parsed = Request::parse(chain, limits, &mut bufs);
        check(mem, limits, &parsed, &bufs);
        // Complete it as the backend would, so the used ring is exercised too.
        let used_len = match &parsed {
            Ok(r) => {
                let written = match r.request_type {
                    RequestType::GetId => {
                        write_device_id(mem, &bufs.data, &[0x41; DEVICE_ID_LEN]).unwrap_or(0)
                    }
                    _ => 0,
                };
                let _ = write_status(mem, r.status_addr, 0);
                r.used_len(written)
            }
            Err(ParseError {
                status_addr: Some(at),
                error,
            }) => {
                let _ = write_status(mem, *at, error.status());
                1
            }
            Err(_) => 0,
        };
        let _ = queue.add_used(mem, head, used_len);
        n += 1;
    }
    n
}

fn in_memory(mem: &Mem, addr: GuestAddress, len: u64) -> bool {
    mem.iter().any(|r| {
        let start = r.start_addr().0;
        let end = start + r.len();
        addr.0 >= start && addr.0.checked_add(len).is_some_and(|e| e <= end)
    })
}

/// What must hold of every parse, valid or not.
pub fn check(
    mem: &Mem,
    limits: &Limits,
    parsed: &Result<Request, ParseError>,
    bufs: &RequestBuffers,
) {
    let request = match parsed {
        Err(e) => {
            assert!(bufs.data.is_empty() && bufs.ranges.is_empty(), "{e}");
            let status = e.error.status();
            assert!(status == STATUS_IOERR || status == STATUS_UNSUPP, "{e}");
            if let Some(at) = e.status_addr {
                assert!(
                    GuestMemory::check_range(mem, at, 1, vm_memory::Permissions::Write),
                    "status {at:?} outside memory: {e}"
                );
            }
            return;
        }
        Ok(r) => r,
    };
    let t = request.request_type;
    assert!(!matches!(t, RequestType::Unsupported(_)), "{request:?}");
    assert!(in_memory(mem, request.status_addr, 1), "{request:?}");
    assert!(!(limits.read_only && t.is_write()), "{request:?}");
    let block = u64::from(limits.block_size());
    let mut total = 0u64;
    assert!(bufs.data.len() <= limits.seg_max as usize, "{request:?}");
    for s in &bufs.data {
        assert!(s.len > 0, "empty segment: {request:?}");
        assert!(
            limits.size_max == 0 || s.len <= limits.size_max,
            "{request:?}"
        );
        assert!(
            in_memory(mem, s.addr, u64::from(s.len)),
            "segment {s:?} outside memory: {request:?}"
        );
        total += u64::from(s.len);
    }
    assert_eq!(total, u64::from(request.data_len), "{request:?}");
    assert!(request.writable_len <= request.data_len, "{request:?}");
    match t {
        RequestType::In | RequestType::Out => {
            let len = u64::from(request.data_len);
            assert_eq!(len % block, 0, "{request:?}");
            assert_eq!((request.sector * SECTOR_SIZE) % block, 0, "{request:?}");
            let end = request
                .sector
                .checked_add(len / SECTOR_SIZE)
                .expect("end sector overflows");
            assert!(end <= limits.capacity_sectors, "{request:?}");
            assert!(end.checked_mul(SECTOR_SIZE).is_some(), "{request:?}");
            let writable = if t == RequestType::In { len } else { 0 };
            assert_eq!(u64::from(request.writable_len), writable, "{request:?}");
        }
        RequestType::Flush => assert_eq!(request.data_len, 0, "{request:?}"),
        RequestType::GetId => {
            assert!(request.data_len > 0, "{request:?}");
            assert_eq!(request.writable_len, request.data_len, "{request:?}");
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let (max_seg, max_sectors) = if t == RequestType::Discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            assert_eq!(request.writable_len, 0, "{request:?}");
            assert_eq!(
                bufs.ranges.len() as u64 * 16,
                u64::from(request.data_len),
                "{request:?}"
            );
            assert!(bufs.ranges.len() <= max_seg as usize, "{request:?}");
            for r in &bufs.ranges {
                assert!(r.num_sectors > 0 && r.num_sectors <= max_sectors, "{r:?}");
                let end = r.sector.checked_add(u64::from(r.num_sectors));
                assert!(
                    end.is_some_and(
                        |e| e <= limits.capacity_sectors && e.checked_mul(SECTOR_SIZE).is_some()
                    ),
                    "{r:?}"
                );
                assert!(!r.unmap || limits.write_zeroes_may_unmap, "{r:?}");
                assert!(!(r.unmap && t == RequestType::Discard), "{r:?}");
            }
        }
        RequestType::Unsupported(_) => unreachable!(),
    }
}

/// A ready queue of `size` entries over the mock rings at 0.
pub fn queue(mock: &virtio_queue::mock::MockSplitQueue<'_, Mem>) -> Option<Queue> {
    mock.create_queue::<Queue>().ok()
}

/// Publishes `heads` in the available ring and sets its index to `heads.len() + jump`.
pub fn publish(mock: &virtio_queue::mock::MockSplitQueue<'_, Mem>, heads: &[u16], jump: u16) {
    for (i, &h) in heads.iter().enumerate() {
        if let Ok(r) = mock.avail().ring().ref_at(i) {
            r.store(u16::to_le(h));
        }
    }
    mock.avail()
        .idx()
        .store(u16::to_le((heads.len() as u16).wrapping_add(jump)));
}

/// Little-endian field readers over the fuzz input.
pub struct Bytes8<'a>(pub &'a [u8]);

impl Bytes8<'_> {
    /// The next `N` bytes, zero-padded at the end of the input.
    pub fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    pub fn rest(&self) -> &[u8] {
        self.0
    }
}
