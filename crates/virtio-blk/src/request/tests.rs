//! Tests of [`Request::parse`] over hand-built descriptor chains in mock guest memory: every
//! request type, every way a hostile chain can be malformed, and where the status byte goes.

use super::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

type Mem = GuestMemoryMmap<()>;
type Parsed = std::result::Result<Request, ParseError>;

const MEM_SIZE: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 16;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x9000;
const TABLE: u64 = 0xa000;
const OUTSIDE: u64 = 0x1000_0000;
const CAPACITY: u64 = 2048;

const T_IN: u32 = VIRTIO_BLK_T_IN;
const T_OUT: u32 = VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = VIRTIO_BLK_T_WRITE_ZEROES;
const UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// One descriptor of a test chain; `next` links are filled in by the mock.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

fn limits() -> Limits {
    Limits {
        capacity_sectors: CAPACITY,
        seg_max: 4,
        size_max: 0x1_0000,
        max_discard_sectors: 1024,
        max_discard_seg: 2,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 2,
        discard_sector_alignment: 8,
        write_zeroes_may_unmap: true,
        read_only: false,
        logical_block_size: 512,
    }
}

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn header_bytes(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // reserved: ignored
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

fn write_header(mem: &Mem, addr: u64, request_type: u32, sector: u64) {
    mem.write_slice(&header_bytes(request_type, sector), GuestAddress(addr))
        .expect("header");
}

fn range_bytes(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    b[12..].copy_from_slice(&flags.to_le_bytes());
    b
}

fn write_ranges(mem: &Mem, addr: u64, ranges: &[(u64, u32, u32)]) -> u32 {
    for (i, &(sector, num, flags)) in ranges.iter().enumerate() {
        mem.write_slice(
            &range_bytes(sector, num, flags),
            GuestAddress(addr + 16 * i as u64),
        )
        .expect("range");
    }
    16 * ranges.len() as u32
}

fn parse_raw(mem: &Mem, descs: &[RawDescriptor], limits: &Limits) -> (Parsed, RequestBuffers) {
    let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
    let chain = vq.build_multiple_desc_chains(descs).expect("chain");
    let mut bufs = RequestBuffers::new(limits);
    let parsed = Request::parse(chain, limits, &mut bufs);
    (parsed, bufs)
}

fn parse_with(mem: &Mem, descs: &[D], limits: &Limits) -> (Parsed, RequestBuffers) {
    let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
    let raws: Vec<RawDescriptor> = descs
        .iter()
        .map(|d| {
            raw(
                d.addr,
                d.len,
                if d.write { VRING_DESC_F_WRITE } else { 0 },
                0,
            )
        })
        .collect();
    let chain = vq.build_desc_chain(&raws).expect("chain");
    let mut bufs = RequestBuffers::new(limits);
    let parsed = Request::parse(chain, limits, &mut bufs);
    (parsed, bufs)
}

fn parse(mem: &Mem, descs: &[D]) -> (Parsed, RequestBuffers) {
    parse_with(mem, descs, &limits())
}

fn seg(addr: u64, len: u32) -> DataSegment {
    DataSegment {
        addr: GuestAddress(addr),
        len,
    }
}

/// The chain failed with a status byte at `status_at`; returns the error.
fn failed_with(parsed: Parsed, bufs: &RequestBuffers, status: u8, status_at: u64) -> Error {
    let err = parsed.expect_err("chain must be rejected");
    assert_eq!(err.status_addr, Some(GuestAddress(status_at)), "{err}");
    assert_eq!(err.error.status(), status, "{err}");
    assert!(bufs.data.is_empty() && bufs.ranges.is_empty());
    err.error
}

fn ioerr(parsed: Parsed, bufs: &RequestBuffers, status_at: u64) -> Error {
    failed_with(parsed, bufs, STATUS_IOERR, status_at)
}

fn unsupp(parsed: Parsed, bufs: &RequestBuffers, status_at: u64) -> Error {
    failed_with(parsed, bufs, STATUS_UNSUPP, status_at)
}

/// The chain has no usable status byte; returns the error.
fn dropped(parsed: Parsed, bufs: &RequestBuffers) -> Error {
    let err = parsed.expect_err("chain must be rejected");
    assert_eq!(err.status_addr, None, "{err}");
    assert!(bufs.data.is_empty() && bufs.ranges.is_empty());
    err.error
}

// ---- well-formed requests ----

#[test]
fn in_request_parses_into_writable_segments() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 8);
    let (parsed, bufs) = parse(
        &mem,
        &[
            r(HDR, 16),
            w(DATA, 512),
            w(DATA + 0x1000, 1024),
            w(STATUS, 1),
        ],
    );
    let req = parsed.expect("valid IN");
    assert_eq!(
        req,
        Request {
            request_type: RequestType::In,
            sector: 8,
            data_len: 1536,
            status_addr: GuestAddress(STATUS),
            writable_len: 1536,
        }
    );
    assert_eq!(bufs.data, [seg(DATA, 512), seg(DATA + 0x1000, 1024)]);
    assert!(bufs.ranges.is_empty());
    assert_eq!(req.used_len(1536), 1537);
}

#[test]
fn out_request_parses_into_readable_segments() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 2040);
    let (parsed, bufs) = parse(
        &mem,
        &[
            r(HDR, 16),
            r(DATA, 2048),
            r(DATA + 0x1000, 2048),
            w(STATUS, 1),
        ],
    );
    let req = parsed.expect("valid OUT");
    assert_eq!(req.request_type, RequestType::Out);
    assert_eq!(req.sector, 2040);
    assert_eq!(req.data_len, 4096);
    assert_eq!(req.writable_len, 0);
    assert_eq!(req.status_addr, GuestAddress(STATUS));
    assert_eq!(bufs.data, [seg(DATA, 2048), seg(DATA + 0x1000, 2048)]);
    assert_eq!(req.used_len(0), 1);
}

#[test]
fn flush_request_parses_without_data() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(STATUS, 1)]);
    let req = parsed.expect("valid FLUSH");
    assert_eq!(req.request_type, RequestType::Flush);
    assert_eq!(req.data_len, 0);
    assert!(bufs.data.is_empty());
}

#[test]
fn get_id_request_receives_the_nul_padded_id() {
    let mem = memory();
    write_header(&mem, HDR, T_GET_ID, 0);
    mem.write_slice(&[0xaa; 20], GuestAddress(DATA))
        .expect("fill");
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
    let req = parsed.expect("valid GET_ID");
    assert_eq!(req.request_type, RequestType::GetId);
    assert_eq!(req.writable_len, 20);
    let written = write_device_id(&mem, &bufs.data, &device_id(b"serial-1")).expect("write id");
    assert_eq!(written, 20);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).expect("read");
    assert_eq!(&id[..8], b"serial-1");
    assert_eq!(id[8..], [0; 12]);
    assert_eq!(req.used_len(written), 21);
}

#[test]
fn get_id_with_four_byte_buffer_writes_only_four_bytes() {
    let mem = memory();
    write_header(&mem, HDR, T_GET_ID, 0);
    mem.write_slice(&[0xaa; 64], GuestAddress(DATA - 16))
        .expect("guard");
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 4), w(STATUS, 1)]);
    let req = parsed.expect("valid GET_ID");
    assert_eq!(req.data_len, 4);
    let written = write_device_id(&mem, &bufs.data, &device_id(b"0123456789abcdefghijKLMN"))
        .expect("write id");
    assert_eq!(written, 4);
    let mut around = [0u8; 64];
    mem.read_slice(&mut around, GuestAddress(DATA - 16))
        .expect("read");
    assert_eq!(around[..16], [0xaa; 16], "guard before");
    assert_eq!(&around[16..20], b"0123");
    assert_eq!(around[20..], [0xaa; 44], "guard after");
    assert_eq!(req.used_len(written), 5);
}

#[test]
fn get_id_spread_over_segments_is_written_as_a_stream() {
    let mem = memory();
    write_header(&mem, HDR, T_GET_ID, 0);
    let (parsed, bufs) = parse(
        &mem,
        &[r(HDR, 16), w(DATA, 3), w(DATA + 0x100, 30), w(STATUS, 1)],
    );
    parsed.expect("valid GET_ID");
    let id = device_id(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    assert_eq!(write_device_id(&mem, &bufs.data, &id).expect("id"), 20);
    let mut a = [0u8; 3];
    let mut b = [0u8; 17];
    mem.read_slice(&mut a, GuestAddress(DATA)).expect("read");
    mem.read_slice(&mut b, GuestAddress(DATA + 0x100))
        .expect("read");
    assert_eq!(&a, b"ABC");
    assert_eq!(&b, b"DEFGHIJKLMNOPQRST");
}

#[test]
fn discard_request_copies_its_ranges() {
    let mem = memory();
    write_header(&mem, HDR, T_DISCARD, 0);
    let len = write_ranges(&mem, DATA, &[(0, 8, 0), (1000, 1024, 0)]);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)]);
    let req = parsed.expect("valid DISCARD");
    assert_eq!(req.request_type, RequestType::Discard);
    assert_eq!(req.data_len, 32);
    assert_eq!(
        bufs.ranges,
        [
            DiscardRange {
                sector: 0,
                num_sectors: 8,
                unmap: false
            },
            DiscardRange {
                sector: 1000,
                num_sectors: 1024,
                unmap: false
            }
        ]
    );
}

#[test]
fn discard_not_on_discard_sector_alignment_is_accepted() {
    let mem = memory();
    write_header(&mem, HDR, T_DISCARD, 0);
    let len = write_ranges(&mem, DATA, &[(3, 5, 0)]);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)]);
    parsed.expect("alignment is a hint");
    assert_eq!(bufs.ranges.len(), 1);
}

#[test]
fn write_zeroes_keeps_unmap_when_the_device_may_unmap() {
    let mem = memory();
    write_header(&mem, HDR, T_WRITE_ZEROES, 0);
    let len = write_ranges(&mem, DATA, &[(16, 16, UNMAP), (64, 8, 0)]);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)]);
    let req = parsed.expect("valid WRITE_ZEROES");
    assert_eq!(req.request_type, RequestType::WriteZeroes);
    assert!(bufs.ranges[0].unmap);
    assert!(!bufs.ranges[1].unmap);
}

#[test]
fn write_zeroes_drops_unmap_when_the_device_may_not_unmap() {
    let mem = memory();
    write_header(&mem, HDR, T_WRITE_ZEROES, 0);
    let len = write_ranges(&mem, DATA, &[(16, 16, UNMAP)]);
    let limits = Limits {
        write_zeroes_may_unmap: false,
        ..limits()
    };
    let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)], &limits);
    parsed.expect("valid WRITE_ZEROES");
    assert!(!bufs.ranges[0].unmap);
}

#[test]
fn header_split_across_two_descriptors_is_accepted() {
    let mem = memory();
    let h = header_bytes(T_IN, 24);
    mem.write_slice(&h[..8], GuestAddress(HDR)).expect("h0");
    mem.write_slice(&h[8..], GuestAddress(HDR + 0x100))
        .expect("h1");
    let (parsed, bufs) = parse(
        &mem,
        &[r(HDR, 8), r(HDR + 0x100, 8), w(DATA, 512), w(STATUS, 1)],
    );
    let req = parsed.expect("split header");
    assert_eq!(req.request_type, RequestType::In);
    assert_eq!(req.sector, 24);
    assert_eq!(bufs.data, [seg(DATA, 512)]);
}

#[test]
fn header_split_in_odd_pieces_with_data_in_the_last_one_is_accepted() {
    let mem = memory();
    let h = header_bytes(T_OUT, 2);
    mem.write_slice(&h[..3], GuestAddress(HDR)).expect("h0");
    mem.write_slice(&h[3..10], GuestAddress(HDR + 0x100))
        .expect("h1");
    mem.write_slice(&h[10..], GuestAddress(DATA)).expect("h2");
    let (parsed, bufs) = parse(
        &mem,
        &[r(HDR, 3), r(HDR + 0x100, 7), r(DATA, 6 + 512), w(STATUS, 1)],
    );
    let req = parsed.expect("split header");
    assert_eq!(req.request_type, RequestType::Out);
    assert_eq!(req.sector, 2);
    assert_eq!(bufs.data, [seg(DATA + 6, 512)]);
}

#[test]
fn data_and_status_in_one_descriptor_are_accepted() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 513)]);
    let req = parsed.expect("data+status");
    assert_eq!(req.status_addr, GuestAddress(DATA + 512));
    assert_eq!(req.data_len, 512);
    assert_eq!(req.writable_len, 512);
    assert_eq!(bufs.data, [seg(DATA, 512)]);
}

#[test]
fn header_and_data_in_one_descriptor_are_accepted() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16 + 1024), w(STATUS, 1)]);
    let req = parsed.expect("header+data");
    assert_eq!(req.data_len, 1024);
    assert_eq!(bufs.data, [seg(HDR + 16, 1024)]);
}

#[test]
fn indirect_descriptors_are_followed() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 4);
    let table = [
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(DATA, 1024, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        raw(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .expect("table");
    }
    let (parsed, bufs) = parse_raw(
        &mem,
        &[raw(
            TABLE,
            16 * table.len() as u32,
            VRING_DESC_F_INDIRECT,
            0,
        )],
        &limits(),
    );
    let req = parsed.expect("indirect");
    assert_eq!(req.request_type, RequestType::In);
    assert_eq!(req.sector, 4);
    assert_eq!(req.status_addr, GuestAddress(STATUS));
    assert_eq!(bufs.data, [seg(DATA, 1024)]);
}

#[test]
fn zero_length_descriptors_are_skipped_and_not_counted() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let limits = Limits {
        seg_max: 1,
        ..limits()
    };
    let (parsed, bufs) = parse_with(
        &mem,
        &[
            r(OUTSIDE, 0),
            r(HDR, 16),
            w(DATA, 0),
            r(OUTSIDE, 0),
            w(DATA, 512),
            w(OUTSIDE, 0),
            w(STATUS, 1),
            r(0, 0),
        ],
        &limits,
    );
    parsed.expect("zero-length descriptors are harmless");
    assert_eq!(bufs.data, [seg(DATA, 512)]);
}

#[test]
fn descriptor_spanning_two_memory_regions_is_accepted() {
    let mem = Mem::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(MEM_SIZE), MEM_SIZE as usize),
    ])
    .expect("two regions");
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(MEM_SIZE - 256, 512), w(STATUS, 1)]);
    parsed.expect("contiguous regions");
    assert_eq!(bufs.data, [seg(MEM_SIZE - 256, 512)]);
}

#[test]
fn parse_reuses_the_buffers_without_growing_them() {
    let mem = memory();
    let limits = limits();
    let mut bufs = RequestBuffers::new(&limits);
    let (data_cap, ranges_cap) = (bufs.data.capacity(), bufs.ranges.capacity());
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);

    write_header(&mem, HDR, T_IN, 0);
    let descs = [
        raw(HDR, 16, 0, 0),
        raw(DATA, 512, VRING_DESC_F_WRITE, 0),
        raw(DATA + 512, 512, VRING_DESC_F_WRITE, 0),
        raw(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let chain = vq.build_desc_chain(&descs).expect("chain");
    Request::parse(chain, &limits, &mut bufs).expect("first");
    assert_eq!(bufs.data.len(), 2);

    write_header(&mem, HDR + 0x100, T_FLUSH, 0);
    let descs = [
        raw(HDR + 0x100, 16, 0, 0),
        raw(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let chain = vq.build_desc_chain(&descs).expect("chain");
    Request::parse(chain, &limits, &mut bufs).expect("second");
    assert!(bufs.data.is_empty(), "cleared for the next request");
    assert_eq!(
        (bufs.data.capacity(), bufs.ranges.capacity()),
        (data_cap, ranges_cap)
    );
}

// ---- header and status ----

#[test]
fn header_shorter_than_16_bytes_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 8), w(DATA, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::HeaderTooShort { len: 8 }), "{e}");
}

#[test]
fn header_in_a_writable_descriptor_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[w(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::HeaderTooShort { len: 0 }), "{e}");
}

#[test]
fn header_outside_memory_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = parse(&mem, &[r(OUTSIDE, 16), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::DescriptorOutOfMemory { .. }), "{e}");
}

#[test]
fn chain_of_only_a_header_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16)]);
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::StatusNotWritable), "{e}");
}

#[test]
fn missing_status_after_readable_data_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 512)]);
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::StatusNotWritable), "{e}");
}

#[test]
fn read_only_status_descriptor_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 512), r(STATUS, 1)]);
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::StatusNotWritable), "{e}");
}

#[test]
fn zero_length_status_after_readable_data_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 0)]);
    dropped(parsed, &bufs);
}

#[test]
fn zero_length_status_after_writable_data_takes_the_data_last_byte() {
    // The chain is a byte stream: its last byte is the status, wherever it lies.
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 0)]);
    let e = ioerr(parsed, &bufs, DATA + 511);
    assert!(
        matches!(e, Error::DataLengthUnaligned { len: 511, .. }),
        "{e}"
    );
}

#[test]
fn status_outside_memory_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(OUTSIDE, 1)]);
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::StatusOutOfMemory { .. }), "{e}");
}

#[test]
fn status_descriptor_wrapping_u64_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(u64::MAX, 2)]);
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::StatusOutOfMemory { .. }), "{e}");
}

#[test]
fn empty_chain_is_dropped() {
    let mem = memory();
    let (parsed, bufs) = parse(&mem, &[w(STATUS, 0)]);
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::EmptyChain), "{e}");
}

#[test]
fn status_is_usable_even_when_everything_else_is_broken() {
    let mem = memory();
    let (parsed, bufs) = parse(&mem, &[w(OUTSIDE, 4), r(u64::MAX - 8, 512), w(STATUS, 1)]);
    ioerr(parsed, &bufs, STATUS);
}

// ---- directions ----

#[test]
fn readable_after_writable_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(
        &mem,
        &[r(HDR, 16), w(DATA, 512), r(DATA + 512, 512), w(STATUS, 1)],
    );
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::ReadableAfterWritable), "{e}");
}

#[test]
fn in_with_readable_data_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::WrongDataDirection { .. }), "{e}");
}

#[test]
fn out_with_writable_data_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::WrongDataDirection { .. }), "{e}");
}

#[test]
fn out_with_a_two_byte_status_descriptor_is_ioerr() {
    // The byte before the status is device-writable data, which OUT must not have.
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 2)]);
    let e = ioerr(parsed, &bufs, STATUS + 1);
    assert!(matches!(e, Error::WrongDataDirection { .. }), "{e}");
}

#[test]
fn get_id_with_readable_data_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_GET_ID, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 20), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::WrongDataDirection { .. }), "{e}");
}

#[test]
fn discard_with_writable_data_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_DISCARD, 0);
    let len = write_ranges(&mem, DATA, &[(0, 8, 0)]);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, len), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::WrongDataDirection { .. }), "{e}");
}

#[test]
fn flush_with_writable_data_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::FlushWithData), "{e}");
}

#[test]
fn flush_with_readable_data_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16 + 8), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::FlushWithData), "{e}");
}

// ---- addresses and lengths ----

#[test]
fn data_outside_memory_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(OUTSIDE, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::DescriptorOutOfMemory { .. }), "{e}");
}

#[test]
fn data_straddling_the_end_of_memory_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(MEM_SIZE - 256, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::DescriptorOutOfMemory { .. }), "{e}");
}

#[test]
fn data_across_a_hole_in_memory_is_ioerr() {
    let mem = Mem::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(2 * MEM_SIZE), MEM_SIZE as usize),
    ])
    .expect("two regions with a hole");
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(MEM_SIZE - 512, 1024), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::DescriptorOutOfMemory { .. }), "{e}");
}

#[test]
fn descriptor_wrapping_u64_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(u64::MAX - 100, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::DescriptorOverflow { .. }), "{e}");
}

#[test]
fn huge_descriptor_length_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 0xffff_0000), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::DescriptorOutOfMemory { .. }), "{e}");
}

#[test]
fn descriptor_length_0xffff_fff0_makes_a_chain_over_4gib_which_is_dropped() {
    // 16 + 0xffff_fff0 bytes is more than a chain may hold (§2.7.5.2): the iterator stops
    // there, so the real end of the chain, and its status byte, are unknown.
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 0xffff_fff0), w(STATUS, 1)]);
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::ChainTruncated), "{e}");
}

#[test]
fn in_length_not_a_multiple_of_512_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 500), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(
        matches!(
            e,
            Error::DataLengthUnaligned {
                len: 500,
                align: 512
            }
        ),
        "{e}"
    );
}

#[test]
fn out_length_not_a_multiple_of_512_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let (parsed, bufs) = parse(
        &mem,
        &[
            r(HDR, 16),
            r(DATA, 512),
            r(DATA + 0x1000, 100),
            w(STATUS, 1),
        ],
    );
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::DataLengthUnaligned { .. }), "{e}");
}

#[test]
fn zero_length_in_is_a_valid_no_op() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, CAPACITY);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(STATUS, 1)]);
    let req = parsed.expect("empty read");
    assert_eq!(req.data_len, 0);
    assert!(bufs.data.is_empty());
}

#[test]
fn zero_length_in_past_capacity_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, CAPACITY + 1);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}

#[test]
fn in_of_the_last_sector_is_accepted() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, CAPACITY - 1);
    let (parsed, _) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    parsed.expect("last sector");
}

#[test]
fn in_at_capacity_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, CAPACITY);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}

#[test]
fn out_crossing_the_end_of_the_disk_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, CAPACITY - 1);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}

#[test]
fn sector_times_512_overflowing_u64_is_ioerr() {
    let mem = memory();
    let limits = Limits {
        capacity_sectors: u64::MAX,
        ..limits()
    };
    for sector in [u64::MAX >> SECTOR_SHIFT, u64::MAX / 2, u64::MAX] {
        write_header(&mem, HDR, T_IN, sector);
        let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &limits);
        let e = ioerr(parsed, &bufs, STATUS);
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    }
}

#[test]
fn seg_max_segments_are_accepted() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(
        &mem,
        &[
            r(HDR, 16),
            w(DATA, 512),
            w(DATA + 0x1000, 512),
            w(DATA + 0x2000, 512),
            w(DATA + 0x3000, 512),
            w(STATUS, 1),
        ],
    );
    parsed.expect("4 segments");
    assert_eq!(bufs.data.len(), 4);
}

#[test]
fn more_than_seg_max_segments_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse(
        &mem,
        &[
            r(HDR, 16),
            w(DATA, 512),
            w(DATA + 0x1000, 512),
            w(DATA + 0x2000, 512),
            w(DATA + 0x3000, 512),
            w(DATA + 0x4000, 512),
            w(STATUS, 1),
        ],
    );
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::TooManySegments { max: 4 }), "{e}");
}

#[test]
fn buffers_smaller_than_seg_max_are_never_grown() {
    let mem = memory();
    write_header(&mem, HDR, T_OUT, 0);
    let small = Limits {
        seg_max: 2,
        ..limits()
    };
    let mut bufs = RequestBuffers::new(&small);
    let capacity = bufs.data.capacity();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let mut descs = vec![raw(HDR, 16, 0, 0)];
    for i in 0..(capacity as u64 + 1) {
        descs.push(raw(DATA + 0x1000 * i, 512, 0, 0));
    }
    descs.push(raw(STATUS, 1, VRING_DESC_F_WRITE, 0));
    let chain = vq.build_desc_chain(&descs).expect("chain");
    let err = Request::parse(chain, &limits(), &mut bufs).expect_err("too many");
    assert!(matches!(err.error, Error::TooManySegments { .. }));
    assert_eq!(bufs.data.capacity(), capacity);
}

#[test]
fn segment_larger_than_size_max_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_IN, 0);
    let limits = Limits {
        size_max: 4096,
        ..limits()
    };
    let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), w(DATA, 8192), w(STATUS, 1)], &limits);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(
        matches!(
            e,
            Error::SegmentTooLarge {
                len: 8192,
                max: 4096
            }
        ),
        "{e}"
    );
}

#[test]
fn io_not_aligned_to_the_logical_block_is_ioerr() {
    let mem = memory();
    let limits = Limits {
        logical_block_size: 4096,
        ..limits()
    };
    write_header(&mem, HDR, T_IN, 0);
    let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &limits);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(
        matches!(e, Error::DataLengthUnaligned { align: 4096, .. }),
        "{e}"
    );

    write_header(&mem, HDR, T_IN, 1);
    let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &limits);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::SectorUnaligned { sector: 1, .. }), "{e}");

    write_header(&mem, HDR, T_IN, 8);
    let (parsed, _) = parse_with(&mem, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &limits);
    parsed.expect("aligned 4K read");
}

// ---- read-only ----

#[test]
fn writes_to_a_read_only_device_are_ioerr() {
    let mem = memory();
    let limits = Limits {
        read_only: true,
        ..limits()
    };
    let len = write_ranges(&mem, DATA, &[(0, 8, 0)]);
    for t in [T_OUT, T_DISCARD, T_WRITE_ZEROES] {
        write_header(&mem, HDR, t, 0);
        let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)], &limits);
        let e = ioerr(parsed, &bufs, STATUS);
        assert!(matches!(e, Error::ReadOnly(_)), "{e}");
    }
}

#[test]
fn reads_flushes_and_get_id_on_a_read_only_device_are_accepted() {
    let mem = memory();
    let limits = Limits {
        read_only: true,
        ..limits()
    };
    for (t, data) in [(T_IN, 512), (T_GET_ID, 20), (T_FLUSH, 0)] {
        write_header(&mem, HDR, t, 0);
        let descs: Vec<D> = if data == 0 {
            vec![r(HDR, 16), w(STATUS, 1)]
        } else {
            vec![r(HDR, 16), w(DATA, data), w(STATUS, 1)]
        };
        let (parsed, _) = parse_with(&mem, &descs, &limits);
        parsed.expect("allowed on read-only");
    }
}

// ---- discard and write zeroes ----

fn discard_chain(
    mem: &Mem,
    request_type: u32,
    ranges: &[(u64, u32, u32)],
) -> (Parsed, RequestBuffers) {
    write_header(mem, HDR, request_type, 0);
    let len = write_ranges(mem, DATA, ranges);
    parse(mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)])
}

#[test]
fn discard_beyond_capacity_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_DISCARD, &[(CAPACITY - 4, 8, 0)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}

#[test]
fn discard_at_a_sector_overflowing_u64_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_DISCARD, &[(u64::MAX - 2, 8, 0)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}

#[test]
fn write_zeroes_beyond_capacity_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_WRITE_ZEROES, &[(0, 8, 0), (CAPACITY, 1, 0)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}

#[test]
fn discard_with_too_many_ranges_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_DISCARD, &[(0, 8, 0), (8, 8, 0), (16, 8, 0)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(
        matches!(
            e,
            Error::TooManyRanges {
                count: 3,
                max: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn write_zeroes_with_too_many_ranges_is_ioerr() {
    let mem = memory();
    let limits = Limits {
        max_write_zeroes_seg: 1,
        ..limits()
    };
    write_header(&mem, HDR, T_WRITE_ZEROES, 0);
    let len = write_ranges(&mem, DATA, &[(0, 8, 0), (8, 8, 0)]);
    let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)], &limits);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(
        matches!(
            e,
            Error::TooManyRanges {
                count: 2,
                max: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn discard_payload_not_a_multiple_of_16_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_DISCARD, 0);
    write_ranges(&mem, DATA, &[(0, 8, 0), (8, 8, 0)]);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 24), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::BadRangePayload { len: 24, .. }), "{e}");
}

#[test]
fn discard_without_ranges_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, T_DISCARD, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(STATUS, 1)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::BadRangePayload { len: 0, .. }), "{e}");
}

#[test]
fn discard_range_longer_than_max_discard_sectors_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_DISCARD, &[(0, 1025, 0)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(
        matches!(
            e,
            Error::RangeTooLarge {
                num_sectors: 1025,
                max: 1024,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn write_zeroes_range_longer_than_max_write_zeroes_sectors_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_WRITE_ZEROES, &[(0, u32::MAX, 0)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::RangeTooLarge { .. }), "{e}");
}

#[test]
fn discard_range_of_zero_sectors_is_ioerr() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_DISCARD, &[(8, 0, 0)]);
    let e = ioerr(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::EmptyRange { sector: 8, .. }), "{e}");
}

#[test]
fn discard_range_not_aligned_to_the_logical_block_is_ioerr() {
    let mem = memory();
    let limits = Limits {
        logical_block_size: 4096,
        ..limits()
    };
    for (sector, num) in [(4, 8), (8, 4)] {
        write_header(&mem, HDR, T_DISCARD, 0);
        let len = write_ranges(&mem, DATA, &[(sector, num, 0)]);
        let (parsed, bufs) = parse_with(&mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)], &limits);
        let e = ioerr(parsed, &bufs, STATUS);
        assert!(matches!(e, Error::RangeUnaligned { .. }), "{e}");
    }
}

#[test]
fn discard_with_unmap_flag_is_unsupp() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_DISCARD, &[(0, 8, UNMAP)]);
    let e = unsupp(parsed, &bufs, STATUS);
    assert!(matches!(e, Error::UnsupportedFlags { flags: 1, .. }), "{e}");
}

#[test]
fn discard_with_reserved_flags_is_unsupp() {
    let mem = memory();
    let (parsed, bufs) = discard_chain(&mem, T_DISCARD, &[(0, 8, 0), (8, 8, 0x8000_0000)]);
    unsupp(parsed, &bufs, STATUS);
}

#[test]
fn write_zeroes_with_reserved_flags_is_unsupp() {
    let mem = memory();
    for flags in [2, UNMAP | 4, 0x8000_0000] {
        let (parsed, bufs) = discard_chain(&mem, T_WRITE_ZEROES, &[(0, 8, flags)]);
        let e = unsupp(parsed, &bufs, STATUS);
        assert!(matches!(e, Error::UnsupportedFlags { .. }), "{e}");
    }
}

#[test]
fn discard_ranges_straddling_descriptors_are_read_as_a_stream() {
    let mem = memory();
    write_header(&mem, HDR, T_DISCARD, 0);
    let mut payload = [0u8; 32];
    payload[..16].copy_from_slice(&range_bytes(8, 16, 0));
    payload[16..].copy_from_slice(&range_bytes(512, 1024, 0));
    // Pieces of 10, 1 and 21 bytes: both ranges cross descriptor boundaries.
    mem.write_slice(&payload[..10], GuestAddress(DATA))
        .expect("p0");
    mem.write_slice(&payload[10..11], GuestAddress(DATA + 0x100))
        .expect("p1");
    mem.write_slice(&payload[11..], GuestAddress(DATA + 0x200))
        .expect("p2");
    let (parsed, bufs) = parse(
        &mem,
        &[
            r(HDR, 16),
            r(DATA, 10),
            r(DATA + 0x100, 1),
            r(DATA + 0x200, 21),
            w(STATUS, 1),
        ],
    );
    parsed.expect("straddling ranges");
    assert_eq!(
        bufs.ranges,
        [
            DiscardRange {
                sector: 8,
                num_sectors: 16,
                unmap: false
            },
            DiscardRange {
                sector: 512,
                num_sectors: 1024,
                unmap: false
            }
        ]
    );
}

// ---- request types ----

#[test]
fn unknown_type_is_unsupp() {
    let mem = memory();
    for t in [2, 3, 5, 10, 14, 16, 0x8000_0000, u32::MAX] {
        write_header(&mem, HDR, t, 0);
        let (parsed, bufs) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
        let e = unsupp(parsed, &bufs, STATUS);
        assert!(matches!(e, Error::UnsupportedRequest(x) if x == t), "{e}");
    }
}

#[test]
fn unknown_type_without_status_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, 99, 0);
    let (parsed, bufs) = parse(&mem, &[r(HDR, 16), r(DATA, 512)]);
    dropped(parsed, &bufs);
}

// ---- broken chains ----

#[test]
fn looping_chain_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse_raw(
        &mem,
        &[
            raw(HDR, 16, VRING_DESC_F_NEXT, 1),
            raw(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
        ],
        &limits(),
    );
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::ChainTruncated), "{e}");
}

#[test]
fn next_index_out_of_range_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse_raw(
        &mem,
        &[
            raw(HDR, 16, VRING_DESC_F_NEXT, 1),
            raw(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 200),
        ],
        &limits(),
    );
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::ChainTruncated), "{e}");
}

#[test]
fn nested_indirect_table_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let table = [
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(TABLE + 0x100, 32, VRING_DESC_F_INDIRECT, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .expect("table");
    }
    let (parsed, bufs) = parse_raw(&mem, &[raw(TABLE, 32, VRING_DESC_F_INDIRECT, 0)], &limits());
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::ChainTruncated), "{e}");
}

#[test]
fn indirect_table_length_not_a_multiple_of_16_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, T_FLUSH, 0);
    let (parsed, bufs) = parse_raw(&mem, &[raw(TABLE, 40, VRING_DESC_F_INDIRECT, 0)], &limits());
    let e = dropped(parsed, &bufs);
    assert!(matches!(e, Error::EmptyChain), "{e}");
}

// ---- status, used length, device ID ----

#[test]
fn write_status_writes_exactly_one_byte() {
    let mem = memory();
    mem.write_slice(&[0xaa; 3], GuestAddress(STATUS - 1))
        .expect("guard");
    write_status(&mem, GuestAddress(STATUS), STATUS_UNSUPP).expect("status");
    let mut around = [0u8; 3];
    mem.read_slice(&mut around, GuestAddress(STATUS - 1))
        .expect("read");
    assert_eq!(around, [0xaa, STATUS_UNSUPP, 0xaa]);
}

#[test]
fn write_status_outside_memory_fails() {
    let mem = memory();
    let e = write_status(&mem, GuestAddress(OUTSIDE), STATUS_OK).expect_err("outside");
    assert!(matches!(e, Error::GuestMemory(_)), "{e}");
}

#[test]
fn used_len_counts_the_data_written_and_the_status_byte() {
    let req = Request {
        request_type: RequestType::In,
        sector: 0,
        data_len: 1024,
        status_addr: GuestAddress(STATUS),
        writable_len: 1024,
    };
    assert_eq!(req.used_len(1024), 1025);
    assert_eq!(req.used_len(512), 513);
    assert_eq!(req.used_len(0), 1);
    assert_eq!(req.used_len(u32::MAX), 1025);
}

#[test]
fn device_id_pads_short_serials_and_truncates_long_ones() {
    assert_eq!(&device_id(b"abc")[..4], b"abc\0");
    assert_eq!(device_id(b"abc")[3..], [0; 17]);
    assert_eq!(
        &device_id(b"0123456789012345678901234"),
        b"01234567890123456789"
    );
    assert_eq!(device_id(b""), [0; DEVICE_ID_LEN]);
}

#[test]
fn error_status_is_unsupp_only_for_unsupported_types_and_flags() {
    assert_eq!(Error::UnsupportedRequest(2).status(), STATUS_UNSUPP);
    assert_eq!(
        Error::UnsupportedFlags {
            request_type: RequestType::Discard,
            flags: 1
        }
        .status(),
        STATUS_UNSUPP
    );
    assert_eq!(Error::FlushWithData.status(), STATUS_IOERR);
    assert_eq!(Error::ReadOnly(RequestType::Out).status(), STATUS_IOERR);
    assert_eq!(Error::ChainTruncated.status(), STATUS_IOERR);
}

#[test]
fn limits_follow_the_config_space() {
    let config = BlkConfig {
        capacity_sectors: 100,
        seg_max: 126,
        size_max: 1 << 20,
        blk_size: 4096,
        max_discard_sectors: 7,
        max_discard_seg: 3,
        discard_sector_alignment: 8,
        max_write_zeroes_sectors: 9,
        max_write_zeroes_seg: 5,
        write_zeroes_may_unmap: 1,
        ..BlkConfig::default()
    };
    let limits = Limits::from_config(&config, true);
    assert_eq!(limits.capacity_sectors, 100);
    assert_eq!(limits.seg_max, 126);
    assert_eq!(limits.block_size(), 4096);
    assert!(limits.write_zeroes_may_unmap && limits.read_only);
    let bufs = RequestBuffers::new(&limits);
    assert!(bufs.data.capacity() >= 126);
    assert!(bufs.ranges.capacity() >= 5);
    for odd in [0, 100, 513, 3000] {
        let l = Limits {
            logical_block_size: odd,
            ..limits
        };
        assert_eq!(l.block_size(), 512);
    }
}
