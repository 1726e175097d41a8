//! virtio-blk as a driver sees it (virtio 1.2 §5.2): request types, status values, feature bits,
//! the 16-byte request header, discard/write-zeroes segments and the 96-byte config space. The
//! test frontend builds requests from these; nothing here knows about rings or sockets.

use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config as vc;
use virtio_bindings::virtio_ring as vr;

/// Bytes in a virtio-blk sector, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID that GET_ID returns.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// Size of `struct virtio_blk_config`.
pub const CONFIG_SIZE: usize = 96;
/// Offset of the `writeback` byte in the config space (CONFIG_WCE).
pub const WRITEBACK_OFFSET: u32 = 32;

/// Request types.
pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
/// Write.
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
/// Flush the device's write cache.
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
/// Device ID string.
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
/// Discard ranges.
pub const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
/// Write zeroes to ranges.
pub const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
/// Secure erase (never advertised by our backend).
pub const T_SECURE_ERASE: u32 = vb::VIRTIO_BLK_T_SECURE_ERASE;

/// Status: success.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// Status: I/O error or invalid request.
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// Status: request type not supported.
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Flag of a write-zeroes segment: the device may deallocate.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Feature bit masks (`1 << bit`).
pub mod feature {
    use super::{vb, vc, vr};

    /// Maximum size of any single segment is in `size_max`.
    pub const SIZE_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SIZE_MAX;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
    /// Device is read-only.
    pub const RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
    /// Block size of the disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
    /// Topology information is available.
    pub const TOPOLOGY: u64 = 1 << vb::VIRTIO_BLK_F_TOPOLOGY;
    /// Writeback mode is in the config space.
    pub const CONFIG_WCE: u64 = 1 << vb::VIRTIO_BLK_F_CONFIG_WCE;
    /// More than one virtqueue.
    pub const MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;
    /// DISCARD is supported.
    pub const DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
    /// WRITE_ZEROES is supported.
    pub const WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << vr::VIRTIO_RING_F_INDIRECT_DESC;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << vr::VIRTIO_RING_F_EVENT_IDX;
    /// vhost-user: protocol features are negotiated.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// VHOST_F_LOG_ALL: the backend logs the guest pages it writes (live migration).
    pub const LOG_ALL: u64 = 1 << 26;
    /// Virtio 1.x.
    pub const VERSION_1: u64 = 1 << vc::VIRTIO_F_VERSION_1;

    /// Every device feature the test driver understands and acks when offered (not EVENT_IDX,
    /// which the frontend options switch).
    pub const DRIVER_KNOWN: u64 = SIZE_MAX
        | SEG_MAX
        | RO
        | BLK_SIZE
        | FLUSH
        | TOPOLOGY
        | CONFIG_WCE
        | MQ
        | DISCARD
        | WRITE_ZEROES
        | RING_INDIRECT_DESC
        | PROTOCOL_FEATURES
        | VERSION_1;
}

/// The 16-byte request header: `type`, `reserved` (ioprio), `sector`, little-endian.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One discard / write-zeroes / secure-erase range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`WRITE_ZEROES_FLAG_UNMAP`, reserved bits).
    pub flags: u32,
}

impl Segment {
    /// A range with no flags.
    pub const fn new(sector: u64, num_sectors: u32) -> Self {
        Self {
            sector,
            num_sectors,
            flags: 0,
        }
    }

    /// The 16-byte wire form.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// Encodes a list of segments as a request's data.
pub fn segments_bytes(segments: &[Segment]) -> Vec<u8> {
    segments.iter().flat_map(|s| s.to_bytes()).collect()
}

/// `struct virtio_blk_config`, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment, bytes.
    pub size_max: u32,
    /// Most data segments in one request.
    pub seg_max: u32,
    /// Logical block size, bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size, in logical blocks.
    pub opt_io_size: u32,
    /// Writeback cache enabled (CONFIG_WCE).
    pub writeback: u8,
    /// Number of request queues (MQ).
    pub num_queues: u16,
    /// Largest discard, sectors.
    pub max_discard_sectors: u32,
    /// Most segments in a discard.
    pub max_discard_seg: u32,
    /// Discard alignment, sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes, sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in a write-zeroes.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// The raw bytes.
    pub raw: Vec<u8>,
}

impl BlkConfig {
    /// Decodes the first 96 bytes (a shorter buffer reads as zeroes past its end).
    pub fn parse(raw: &[u8]) -> Self {
        let mut b = [0u8; CONFIG_SIZE];
        let n = raw.len().min(CONFIG_SIZE);
        b[..n].copy_from_slice(&raw[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Self {
            capacity: u64_at(0),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
            raw: raw.to_vec(),
        }
    }
}
