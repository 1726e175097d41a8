//! Request parsing and validation: a descriptor chain in, a typed [`Request`] out (virtio 1.2
//! §2.7.4, §5.2.6).
//!
//! This is the first step of the fast path after the pop: `kick → pop → parse → submit →
//! complete → signal`. The chain is read as a byte stream, never by assuming one descriptor per
//! part (the specification forbids that, §2.7.4.1): the first 16 bytes are the header and must be
//! device-readable, the last byte is the status and must be device-writable, everything in
//! between is data. Data stays in guest memory: [`Request::parse`] fills the caller's
//! preallocated [`RequestBuffers`] with zero-copy [`DataSegment`]s, and copies out only what the
//! device must act on (the header, and the DISCARD/WRITE_ZEROES ranges), so a guest changing
//! those bytes afterwards changes nothing.
//!
//! Decisions the specification leaves open:
//! - Zero-length descriptors carry no bytes and are skipped: they are not checked against guest
//!   memory, their direction does not matter, and they do not count toward `seg_max`.
//! - A chain that ends on a descriptor with NEXT set (bad `next`, a loop, a bad indirect table,
//!   more than 4 GiB) has no knowable status byte: it is rejected without one.
//! - A zero-length IN/OUT is valid (its range must still lie within the disk) and completes
//!   without I/O.
//! - IN/OUT lengths and sectors, and DISCARD/WRITE_ZEROES ranges, must be multiples of the
//!   logical block size (`blk_size`, which Linux uses as its logical block size); the
//!   `discard_sector_alignment` is a hint for the driver's splitting (§5.2.5) and is not
//!   enforced, since Linux sends discards that start off it.
//! - A DISCARD/WRITE_ZEROES range of zero sectors is IOERR.
//! - When several things are wrong, the first one met in chain order is reported.

use std::ops::Deref;

use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::config::BlkConfig;
use crate::error::{Error, Result};
// The wire constants and request types live in the leaf module `protocol`, which `error` can
// use without depending on the parser; they stay reachable under `request::` as before.
pub use crate::protocol::{
    RequestType, DEVICE_ID_LEN, SECTOR_SHIFT, SECTOR_SIZE, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};

/// Length of the request header: `le32 type, le32 reserved, le64 sector`.
const HEADER_LEN: u32 = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes`.
const RANGE_LEN: u32 = 16;
/// Largest sector whose byte offset fits in u64.
const MAX_SECTORS: u64 = u64::MAX >> SECTOR_SHIFT;

/// What the device advertised, and so what a request may ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Maximum number of data segments in a request.
    pub seg_max: u32,
    /// Maximum length of one data segment in bytes; 0 means no limit.
    pub size_max: u32,
    /// Maximum sectors in one discard range.
    pub max_discard_sectors: u32,
    /// Maximum ranges in one discard request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Maximum ranges in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Discard alignment advertised to the driver, in sectors. A hint only: not enforced.
    pub discard_sector_alignment: u32,
    /// Whether write-zeroes may deallocate when the driver sets the unmap flag.
    pub write_zeroes_may_unmap: bool,
    /// The device is read-only: OUT, DISCARD and WRITE_ZEROES fail with IOERR.
    pub read_only: bool,
    /// Logical block size in bytes (`blk_size`): a power of two from 512 up; anything else
    /// counts as 512.
    pub logical_block_size: u32,
}

impl Limits {
    /// The limits that a device with this config space advertises.
    pub fn from_config(config: &BlkConfig, read_only: bool) -> Self {
        Limits {
            capacity_sectors: config.capacity_sectors,
            seg_max: config.seg_max,
            size_max: config.size_max,
            max_discard_sectors: config.max_discard_sectors,
            max_discard_seg: config.max_discard_seg,
            max_write_zeroes_sectors: config.max_write_zeroes_sectors,
            max_write_zeroes_seg: config.max_write_zeroes_seg,
            discard_sector_alignment: config.discard_sector_alignment,
            write_zeroes_may_unmap: config.write_zeroes_may_unmap != 0,
            read_only,
            logical_block_size: config.blk_size,
        }
    }

    /// The logical block size actually enforced, in bytes.
    pub fn block_size(&self) -> u32 {
        let lbs = self.logical_block_size;
        if lbs >= SECTOR_SIZE as u32 && lbs.is_power_of_two() {
            lbs
        } else {
            SECTOR_SIZE as u32
        }
    }

    fn block_sectors(&self) -> u64 {
        u64::from(self.block_size() >> SECTOR_SHIFT)
    }

    /// Whether `num_sectors` sectors from `sector` on lie within the disk, byte offsets included.
    fn check_capacity(&self, sector: u64, num_sectors: u64) -> Result<()> {
        match sector.checked_add(num_sectors) {
            Some(end) if end <= self.capacity_sectors && end <= MAX_SECTORS => Ok(()),
            _ => Err(Error::OutOfRange {
                sector,
                num_sectors,
                capacity_sectors: self.capacity_sectors,
            }),
        }
    }
}

/// One piece of a request's data area in guest memory: a whole descriptor, or the part of one
/// that is neither header nor status. Validated to lie in guest memory with the right access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataSegment {
    /// Guest address of the piece.
    pub addr: GuestAddress,
    /// Length in bytes; never 0.
    pub len: u32,
}

/// One DISCARD or WRITE_ZEROES range, copied out of guest memory and validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors; never 0.
    pub num_sectors: u32,
    /// WRITE_ZEROES only: the driver set the unmap flag and the device allows it
    /// (`write_zeroes_may_unmap`), so the range may be deallocated rather than written.
    pub unmap: bool,
}

/// Caller-owned scratch for [`Request::parse`], preallocated once per queue.
///
/// Parsing clears and refills both vectors and never grows them: a chain that would need more
/// room than was reserved is rejected, so the parse path does not allocate.
#[derive(Clone, Debug, Default)]
pub struct RequestBuffers {
    /// The data area, in chain order.
    pub data: Vec<DataSegment>,
    /// DISCARD/WRITE_ZEROES ranges, in request order; empty for other types.
    pub ranges: Vec<DiscardRange>,
}

impl RequestBuffers {
    /// Reserve room for `seg_max` data segments and the larger of `max_discard_seg` and
    /// `max_write_zeroes_seg` ranges. These come from the operator's configuration, not from
    /// the guest.
    pub fn new(limits: &Limits) -> Self {
        let ranges = limits.max_discard_seg.max(limits.max_write_zeroes_seg);
        RequestBuffers {
            data: Vec::with_capacity(limits.seg_max as usize),
            ranges: Vec::with_capacity(ranges as usize),
        }
    }

    /// Empty both vectors, keeping their capacity.
    pub fn clear(&mut self) {
        self.data.clear();
        self.ranges.clear();
    }
}

/// A validated request. Its data segments and ranges are in the [`RequestBuffers`] it was
/// parsed into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request's type; never [`RequestType::Unsupported`].
    pub request_type: RequestType,
    /// The header's sector: for IN/OUT validated with `data_len` against the capacity; as the
    /// driver sent it for the other types, which do not use it.
    pub sector: u64,
    /// Total bytes in the data segments.
    pub data_len: u32,
    /// Where to write the status byte.
    pub status_addr: GuestAddress,
    /// Bytes of device-writable buffer before the status byte (the IN or GET_ID data area;
    /// 0 for the other types), for used-length accounting.
    pub writable_len: u32,
}

/// A descriptor chain as [`Request::parse`] reads it: its descriptors in order, indirect tables
/// followed and bounded as the virtio specification says, and the guest memory they point into.
/// virtio-queue's [`DescriptorChain`] is one; a backend may walk the same table its own way.
pub trait Chain: Iterator<Item = Descriptor> {
    /// The guest memory the descriptors point into.
    type Memory: GuestMemory + ?Sized;

    /// The guest memory the descriptors point into.
    fn memory(&self) -> &Self::Memory;
}

impl<M> Chain for DescriptorChain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    type Memory = M::Target;

    fn memory(&self) -> &M::Target {
        DescriptorChain::memory(self)
    }
}

impl Request {
    /// Parse and validate a descriptor chain, filling `bufs` (cleared first) with its data
    /// segments and, for DISCARD/WRITE_ZEROES, its ranges.
    ///
    /// On failure the [`ParseError`] says where the failure status goes, if the chain has a
    /// usable status byte; `bufs` is then left empty.
    pub fn parse<C: Chain>(
        mut chain: C,
        limits: &Limits,
        bufs: &mut RequestBuffers,
    ) -> std::result::Result<Request, ParseError> {
        bufs.clear();
        let mut walk = Walk::new(limits, bufs);
        let mut first_error = None;
        // The last descriptor that carries bytes: its last byte is the status.
        let mut last: Option<Descriptor> = None;
        let mut ends_with_next = false;

        // The iterator follows indirect tables and stops after queue-size descriptors per
        // table, so this loop is bounded whatever the guest wrote. After the first error it
        // keeps going only to find the status byte.
        while let Some(desc) = chain.next() {
            ends_with_next = desc.has_next();
            if desc.len() == 0 {
                continue;
            }
            last = Some(desc);
            if first_error.is_none() {
                if let Err(e) = walk.feed(chain.memory(), &desc) {
                    first_error = Some(e);
                }
            }
        }

        let mem = chain.memory();
        let result = match locate_status(mem, last, ends_with_next) {
            Err(error) => Err(ParseError {
                error,
                status_addr: None,
            }),
            Ok(status_addr) => match first_error {
                Some(error) => Err(error),
                None => walk.finish(mem, status_addr),
            }
            .map_err(|error| ParseError {
                error,
                status_addr: Some(status_addr),
            }),
        };
        if result.is_err() {
            bufs.clear();
        }
        result
    }

    /// The used length (§2.7.8.2): the bytes actually written into device-writable buffers,
    /// status byte included, once `data_written` bytes of the data area were filled (the read
    /// length for IN, the [`write_device_id`] result for GET_ID, 0 for the other types or a
    /// failed request). A chain rejected by [`Request::parse`] with a status byte has a used
    /// length of 1.
    pub fn used_len(&self, data_written: u32) -> u32 {
        data_written.min(self.writable_len).saturating_add(1)
    }
}

/// A chain that did not parse.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ParseError {
    /// What is wrong; [`Error::status`] gives the status byte for it.
    pub error: Error,
    /// Where to write the failure status (`error.status()`, used length 1), if the chain's
    /// last byte is device-writable and in guest memory. `None`: the chain has no usable status
    /// byte and can only be dropped.
    pub status_addr: Option<GuestAddress>,
}

/// Find the status byte: the last byte of the last descriptor that carries bytes, which must be
/// device-writable and in guest memory, in a chain that ended where the driver said it does.
fn locate_status<T: GuestMemory + ?Sized>(
    mem: &T,
    last: Option<Descriptor>,
    ends_with_next: bool,
) -> Result<GuestAddress> {
    if ends_with_next {
        return Err(Error::ChainTruncated);
    }
    let desc = last.ok_or(Error::EmptyChain)?;
    if !desc.is_write_only() {
        return Err(Error::StatusNotWritable);
    }
    let out_of_memory = Error::StatusOutOfMemory {
        addr: desc.addr().0,
    };
    // `last` only holds descriptors with len > 0.
    let Some(addr) = desc.addr().checked_add(u64::from(desc.len()) - 1) else {
        return Err(out_of_memory);
    };
    if mem.check_range(addr, 1, Permissions::Write) {
        Ok(addr)
    } else {
        Err(out_of_memory)
    }
}

/// The state of one pass over a chain.
struct Walk<'a> {
    limits: &'a Limits,
    bufs: &'a mut RequestBuffers,
    header: [u8; HEADER_LEN as usize],
    header_len: u32,
    request_type: Option<RequestType>,
    sector: u64,
    seen_writable: bool,
    /// The latest device-writable descriptor, held back because its last byte may be the
    /// status.
    pending: Option<DataSegment>,
    data_len: u32,
    writable_len: u32,
}

impl<'a> Walk<'a> {
    fn new(limits: &'a Limits, bufs: &'a mut RequestBuffers) -> Self {
        Walk {
            limits,
            bufs,
            header: [0; HEADER_LEN as usize],
            header_len: 0,
            request_type: None,
            sector: 0,
            seen_writable: false,
            pending: None,
            data_len: 0,
            writable_len: 0,
        }
    }

    /// Take in one descriptor with `len > 0`.
    fn feed<T: GuestMemory + ?Sized>(&mut self, mem: &T, desc: &Descriptor) -> Result<()> {
        let addr = desc.addr();
        let len = desc.len();
        if addr.0.checked_add(u64::from(len)).is_none() {
            return Err(Error::DescriptorOverflow { addr: addr.0, len });
        }
        let writable = desc.is_write_only();
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(addr, len as usize, access) {
            return Err(Error::DescriptorOutOfMemory { addr: addr.0, len });
        }

        if writable {
            if self.header_len < HEADER_LEN {
                return Err(Error::HeaderTooShort {
                    len: self.header_len,
                });
            }
            self.seen_writable = true;
            if let Some(previous) = self.pending.replace(DataSegment { addr, len }) {
                self.push_data(previous, true)?;
            }
            return Ok(());
        }

        if self.seen_writable {
            return Err(Error::ReadableAfterWritable);
        }
        let mut used = 0;
        if self.header_len < HEADER_LEN {
            used = len.min(HEADER_LEN - self.header_len);
            let start = self.header_len as usize;
            mem.read_slice(&mut self.header[start..start + used as usize], addr)?;
            self.header_len += used;
            if self.header_len == HEADER_LEN {
                self.decode_header()?;
            }
        }
        if used < len {
            // No overflow: addr + len was checked above.
            let piece = DataSegment {
                addr: GuestAddress(addr.0 + u64::from(used)),
                len: len - used,
            };
            self.push_data(piece, false)?;
        }
        Ok(())
    }

    fn decode_header(&mut self) -> Result<()> {
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = self.header;
        let request_type = RequestType::from(u32::from_le_bytes([t0, t1, t2, t3]));
        self.sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        self.request_type = Some(request_type);
        match request_type {
            RequestType::Unsupported(t) => Err(Error::UnsupportedRequest(t)),
            t if t.is_write() && self.limits.read_only => Err(Error::ReadOnly(t)),
            _ => Ok(()),
        }
    }

    /// Add one piece of the data area, checking its direction, size and the segment count.
    fn push_data(&mut self, piece: DataSegment, writable: bool) -> Result<()> {
        let request_type = self.request_type.ok_or(Error::HeaderTooShort {
            len: self.header_len,
        })?;
        match request_type {
            RequestType::Flush => return Err(Error::FlushWithData),
            RequestType::Unsupported(t) => return Err(Error::UnsupportedRequest(t)),
            RequestType::In | RequestType::GetId if !writable => {
                return Err(Error::WrongDataDirection {
                    request_type,
                    expected: "writable",
                })
            }
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes if writable => {
                return Err(Error::WrongDataDirection {
                    request_type,
                    expected: "readable",
                })
            }
            _ => {}
        }
        let size_max = self.limits.size_max;
        if size_max != 0 && piece.len > size_max {
            return Err(Error::SegmentTooLarge {
                len: piece.len,
                max: size_max,
            });
        }
        let room = (self.limits.seg_max as usize).min(self.bufs.data.capacity());
        if self.bufs.data.len() >= room {
            return Err(Error::TooManySegments {
                max: self.limits.seg_max,
            });
        }
        self.data_len = self
            .data_len
            .checked_add(piece.len)
            .ok_or(Error::DataTooLong)?;
        if writable {
            self.writable_len += piece.len; // <= data_len, which did not overflow
        }
        self.bufs.data.push(piece);
        Ok(())
    }

    /// The chain is done and its status byte found: flush the held-back descriptor and check
    /// the request as a whole.
    fn finish<T: GuestMemory + ?Sized>(
        mut self,
        mem: &T,
        status_addr: GuestAddress,
    ) -> Result<Request> {
        if let Some(last) = self.pending.take() {
            if last.len > 1 {
                let data = DataSegment {
                    addr: last.addr,
                    len: last.len - 1,
                };
                self.push_data(data, true)?;
            }
        }
        let request_type = match self.request_type {
            Some(t) if self.header_len == HEADER_LEN => t,
            _ => {
                return Err(Error::HeaderTooShort {
                    len: self.header_len,
                })
            }
        };
        match request_type {
            RequestType::In | RequestType::Out => self.check_io()?,
            RequestType::Flush => {}
            RequestType::GetId => {
                if self.data_len == 0 {
                    return Err(Error::GetIdWithoutBuffer);
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                self.read_ranges(mem, request_type)?
            }
            RequestType::Unsupported(t) => return Err(Error::UnsupportedRequest(t)),
        }
        Ok(Request {
            request_type,
            sector: self.sector,
            data_len: self.data_len,
            status_addr,
            writable_len: self.writable_len,
        })
    }

    /// IN/OUT: whole logical blocks, aligned, within the disk.
    fn check_io(&self) -> Result<()> {
        let align = self.limits.block_size();
        if self.data_len % align != 0 {
            return Err(Error::DataLengthUnaligned {
                len: self.data_len,
                align,
            });
        }
        if self.sector % self.limits.block_sectors() != 0 {
            return Err(Error::SectorUnaligned {
                sector: self.sector,
                align,
            });
        }
        let num_sectors = u64::from(self.data_len >> SECTOR_SHIFT);
        self.limits.check_capacity(self.sector, num_sectors)
    }

    /// DISCARD/WRITE_ZEROES: copy the ranges out of the data area and check each.
    fn read_ranges<T: GuestMemory + ?Sized>(
        &mut self,
        mem: &T,
        request_type: RequestType,
    ) -> Result<()> {
        let limits = self.limits;
        let (max_seg, max_sectors, allowed_flags) = if request_type == RequestType::Discard {
            (limits.max_discard_seg, limits.max_discard_sectors, 0)
        } else {
            (
                limits.max_write_zeroes_seg,
                limits.max_write_zeroes_sectors,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            )
        };
        let len = self.data_len;
        if len == 0 || len % RANGE_LEN != 0 {
            return Err(Error::BadRangePayload { request_type, len });
        }
        let count = len / RANGE_LEN;
        let bufs = &mut *self.bufs;
        if count > max_seg || count as usize > bufs.ranges.capacity() {
            return Err(Error::TooManyRanges {
                request_type,
                count,
                max: max_seg,
            });
        }
        let block_sectors = limits.block_sectors();
        let mut reader = SegmentReader::new(&bufs.data);
        for _ in 0..count {
            let mut raw = [0u8; RANGE_LEN as usize];
            reader.read(mem, &mut raw)?;
            let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
            let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);

            if flags & !allowed_flags != 0 {
                return Err(Error::UnsupportedFlags {
                    request_type,
                    flags,
                });
            }
            if num_sectors == 0 {
                return Err(Error::EmptyRange {
                    request_type,
                    sector,
                });
            }
            if num_sectors > max_sectors {
                return Err(Error::RangeTooLarge {
                    request_type,
                    sector,
                    num_sectors,
                    max: max_sectors,
                });
            }
            if sector % block_sectors != 0 || u64::from(num_sectors) % block_sectors != 0 {
                return Err(Error::RangeUnaligned {
                    request_type,
                    sector,
                    num_sectors,
                    align: limits.block_size(),
                });
            }
            limits.check_capacity(sector, u64::from(num_sectors))?;
            bufs.ranges.push(DiscardRange {
                sector,
                num_sectors,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                    && limits.write_zeroes_may_unmap,
            });
        }
        Ok(())
    }
}

/// Reads the data area front to back as one byte stream, across segment boundaries.
struct SegmentReader<'a> {
    segments: &'a [DataSegment],
    index: usize,
    offset: u32,
}

impl<'a> SegmentReader<'a> {
    fn new(segments: &'a [DataSegment]) -> Self {
        SegmentReader {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Fill `buf` with the next `buf.len()` bytes of the stream.
    fn read<T: GuestMemory + ?Sized>(&mut self, mem: &T, buf: &mut [u8]) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let segment = self.segments.get(self.index).ok_or(Error::DataTooLong)?;
            let available = (segment.len - self.offset) as usize;
            let take = available.min(buf.len() - filled);
            let addr = GuestAddress(segment.addr.0 + u64::from(self.offset));
            mem.read_slice(&mut buf[filled..filled + take], addr)?;
            filled += take;
            if take == available {
                self.index += 1;
                self.offset = 0;
            } else {
                // take < available <= u32::MAX
                self.offset += take as u32;
            }
        }
        Ok(())
    }
}

/// Write the status byte (`STATUS_OK`, `STATUS_IOERR`, `STATUS_UNSUPP`) at `addr`.
pub fn write_status<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    status: u8,
) -> Result<()> {
    mem.write_slice(&[status], addr)?;
    Ok(())
}

/// GET_ID: copy the device ID into the data segments, as much of it as fits (the driver's
/// buffer may be shorter than 20 bytes); returns the number of bytes written. `serial` is
/// already NUL-padded: see [`device_id`].
pub fn write_device_id<M: GuestMemory + ?Sized>(
    mem: &M,
    data: &[DataSegment],
    serial: &[u8; DEVICE_ID_LEN],
) -> Result<u32> {
    let mut written = 0usize;
    for segment in data {
        let rest = &serial[written..];
        if rest.is_empty() {
            break;
        }
        let take = rest.len().min(segment.len as usize);
        mem.write_slice(&rest[..take], segment.addr)?;
        written += take;
    }
    // written <= DEVICE_ID_LEN
    Ok(written as u32)
}

/// The device ID string for `serial`: its first 20 bytes, NUL-padded when shorter (and then
/// NUL-terminated, as the specification wants; a 20-byte ID has no terminator).
pub fn device_id(serial: &[u8]) -> [u8; DEVICE_ID_LEN] {
    let mut id = [0u8; DEVICE_ID_LEN];
    let n = serial.len().min(DEVICE_ID_LEN);
    id[..n].copy_from_slice(&serial[..n]);
    id
}

#[cfg(test)]
mod tests;
