//! The one error type of the crate: every way a guest request, a config access or a guest memory
//! write can fail, with the context the backend's log line needs.
//!
//! [`Error::status`] maps each to the virtio-blk status byte the guest sees (virtio 1.2 §5.2.6).

use crate::protocol::{RequestType, STATUS_IOERR, STATUS_UNSUPP};

/// Errors of the virtio-blk protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chain yields no descriptor carrying any byte.
    #[error("descriptor chain is empty")]
    EmptyChain,
    /// The chain stops at a descriptor whose NEXT flag is set: a `next` index out of range, a
    /// loop longer than the queue, a bad indirect table or more than 4 GiB in total. Where the
    /// status byte is cannot be known.
    #[error("descriptor chain is cut short (bad next index, loop, bad indirect table or > 4 GiB)")]
    ChainTruncated,
    /// A descriptor's `addr + len` wraps the 64-bit guest address space.
    #[error("descriptor {addr:#x}+{len:#x} wraps the guest address space")]
    DescriptorOverflow {
        /// Guest address of the descriptor's buffer.
        addr: u64,
        /// Length of the descriptor's buffer.
        len: u32,
    },
    /// A descriptor's buffer is not entirely inside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is not inside guest memory")]
    DescriptorOutOfMemory {
        /// Guest address of the descriptor's buffer.
        addr: u64,
        /// Length of the descriptor's buffer.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one (virtio 1.2 §2.7.4.2).
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes precede the first device-writable one.
    #[error("request header has {len} device-readable bytes, needs 16")]
    HeaderTooShort {
        /// Device-readable header bytes found.
        len: u32,
    },
    /// The last byte of the chain is in a device-readable buffer: there is no status byte.
    #[error("last byte of the chain is not device-writable: no status byte")]
    StatusNotWritable,
    /// The last byte of the chain is not inside guest memory.
    #[error("status byte at {addr:#x} is not inside guest memory")]
    StatusOutOfMemory {
        /// Guest address of the descriptor holding the status byte.
        addr: u64,
    },
    /// The request type is not one we implement.
    #[error("unsupported request type {0}")]
    UnsupportedRequest(u32),
    /// Data travels in the wrong direction for the request type.
    #[error("{request_type:?} data must be device-{expected}")]
    WrongDataDirection {
        /// The request's type.
        request_type: RequestType,
        /// The direction the data must have: `"readable"` or `"writable"`.
        expected: &'static str,
    },
    /// A FLUSH request carries data.
    #[error("FLUSH request carries data")]
    FlushWithData,
    /// A GET_ID request has no buffer to write the ID into.
    #[error("GET_ID request has no data buffer")]
    GetIdWithoutBuffer,
    /// The data area needs more segments than `seg_max` (or the preallocated buffers hold).
    #[error("request needs more than {max} data segments")]
    TooManySegments {
        /// The limit.
        max: u32,
    },
    /// A data segment is longer than `size_max`.
    #[error("data segment of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge {
        /// The segment's length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The data area is larger than a chain may be.
    #[error("data area larger than 4 GiB")]
    DataTooLong,
    /// An IN/OUT data length is not a multiple of the logical block size.
    #[error("data length {len} is not a multiple of {align} bytes")]
    DataLengthUnaligned {
        /// The data length.
        len: u32,
        /// The required multiple.
        align: u32,
    },
    /// A sector is not aligned to the logical block size.
    #[error("sector {sector} is not aligned to the {align}-byte logical block")]
    SectorUnaligned {
        /// The offending sector.
        sector: u64,
        /// The logical block size in bytes.
        align: u32,
    },
    /// A sector range reaches past the end of the disk (or its byte offset overflows u64).
    #[error(
        "sectors {sector}..{sector}+{num_sectors} are outside the {capacity_sectors}-sector disk"
    )]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        num_sectors: u64,
        /// Disk capacity in sectors.
        capacity_sectors: u64,
    },
    /// A write, discard or write-zeroes request to a read-only device (virtio 1.2 §5.2.6.2).
    #[error("{0:?} request to a read-only device")]
    ReadOnly(RequestType),
    /// A DISCARD/WRITE_ZEROES payload is not a nonzero multiple of 16 bytes.
    #[error("{request_type:?} payload of {len} bytes is not a nonzero multiple of 16")]
    BadRangePayload {
        /// The request's type.
        request_type: RequestType,
        /// The payload length.
        len: u32,
    },
    /// A DISCARD/WRITE_ZEROES request carries more ranges than advertised.
    #[error("{request_type:?} carries {count} ranges, limit {max}")]
    TooManyRanges {
        /// The request's type.
        request_type: RequestType,
        /// Ranges in the request.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// A DISCARD/WRITE_ZEROES range covers no sector.
    #[error("{request_type:?} range at sector {sector} is empty")]
    EmptyRange {
        /// The request's type.
        request_type: RequestType,
        /// First sector of the range.
        sector: u64,
    },
    /// A DISCARD/WRITE_ZEROES range is longer than advertised.
    #[error("{request_type:?} range at sector {sector} has {num_sectors} sectors, limit {max}")]
    RangeTooLarge {
        /// The request's type.
        request_type: RequestType,
        /// First sector of the range.
        sector: u64,
        /// Sectors in the range.
        num_sectors: u32,
        /// The limit.
        max: u32,
    },
    /// A DISCARD/WRITE_ZEROES range is not aligned to the logical block size.
    #[error("{request_type:?} range {sector}+{num_sectors} is not aligned to {align}-byte blocks")]
    RangeUnaligned {
        /// The request's type.
        request_type: RequestType,
        /// First sector of the range.
        sector: u64,
        /// Sectors in the range.
        num_sectors: u32,
        /// The logical block size in bytes.
        align: u32,
    },
    /// A DISCARD range sets any flag, or a WRITE_ZEROES range a reserved one (virtio 1.2
    /// §5.2.6.2 requires UNSUPP).
    #[error("{request_type:?} range sets unsupported flags {flags:#x}")]
    UnsupportedFlags {
        /// The request's type.
        request_type: RequestType,
        /// The range's flags word.
        flags: u32,
    },
    /// SET_CONFIG touched something other than the `writeback` byte, or wrote a value other
    /// than 0 or 1 into it.
    #[error("config write of {len} bytes at offset {offset} is not allowed")]
    ConfigWriteRejected {
        /// Offset of the write in the config space.
        offset: u32,
        /// Length of the write.
        len: usize,
    },
    /// Reading or writing guest memory failed.
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

impl Error {
    /// The status byte for a request that failed with this error: `VIRTIO_BLK_S_UNSUPP` for
    /// unknown request types and unsupported DISCARD/WRITE_ZEROES flags, `VIRTIO_BLK_S_IOERR` for
    /// everything else (malformed chains, bad ranges, read-only violations).
    pub fn status(&self) -> u8 {
        match self {
            Error::UnsupportedRequest(_) | Error::UnsupportedFlags { .. } => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
