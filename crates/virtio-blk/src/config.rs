//! The device configuration space, `struct virtio_blk_config` (virtio 1.2 §5.2.4).
//!
//! The backend answers vhost-user GET_CONFIG with [`BlkConfig::read`] and SET_CONFIG with
//! [`BlkConfig::write`]. GET_CONFIG must answer with exactly the bytes asked for, or the
//! frontend drops the connection, so reads never fail: whatever lies outside the 96-byte space
//! reads as zero.

use crate::error::{Error, Result};

/// Size of `struct virtio_blk_config` in virtio 1.2, zoned characteristics included.
pub const CONFIG_SPACE_SIZE: usize = 96;

/// Offset of the `writeback` byte, the only field a driver writes (`VIRTIO_BLK_F_CONFIG_WCE`).
pub const WRITEBACK_OFFSET: u32 = 32;

// Field offsets, little-endian (virtio 1.2 §5.2.4). Geometry (16..20), secure erase (60..72) and
// the zoned characteristics (72..96) stay zero: we offer none of those features.
const CAPACITY: usize = 0;
const SIZE_MAX: usize = 8;
const SEG_MAX: usize = 12;
const BLK_SIZE: usize = 20;
const PHYSICAL_BLOCK_EXP: usize = 24;
const ALIGNMENT_OFFSET: usize = 25;
const MIN_IO_SIZE: usize = 26;
const OPT_IO_SIZE: usize = 28;
const WRITEBACK: usize = WRITEBACK_OFFSET as usize;
const NUM_QUEUES: usize = 34;
const MAX_DISCARD_SECTORS: usize = 36;
const MAX_DISCARD_SEG: usize = 40;
const DISCARD_SECTOR_ALIGNMENT: usize = 44;
const MAX_WRITE_ZEROES_SECTORS: usize = 48;
const MAX_WRITE_ZEROES_SEG: usize = 52;
const WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// Values of `struct virtio_blk_config`; [`BlkConfig::to_bytes`] lays them out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Maximum size of one data segment in bytes (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: u32,
    /// Maximum number of data segments in a request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: u32,
    /// Logical block size in bytes (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: u32,
    /// log2 of logical blocks per physical block (`VIRTIO_BLK_F_TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: u32,
    /// Cache mode: 1 writeback, 0 writethrough (`VIRTIO_BLK_F_CONFIG_WCE`).
    pub writeback: u8,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Maximum sectors in one discard range.
    pub max_discard_sectors: u32,
    /// Maximum ranges in one discard request.
    pub max_discard_seg: u32,
    /// Discard alignment hint for the driver, in sectors.
    pub discard_sector_alignment: u32,
    /// Maximum sectors in one write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Maximum ranges in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// 1 if a write-zeroes request with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
}

fn put<const N: usize>(space: &mut [u8; CONFIG_SPACE_SIZE], offset: usize, bytes: [u8; N]) {
    space[offset..offset + N].copy_from_slice(&bytes);
}

impl BlkConfig {
    /// The config space as the driver reads it: little-endian, padding and the fields of
    /// features we do not offer zeroed.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut s = [0u8; CONFIG_SPACE_SIZE];
        put(&mut s, CAPACITY, self.capacity_sectors.to_le_bytes());
        put(&mut s, SIZE_MAX, self.size_max.to_le_bytes());
        put(&mut s, SEG_MAX, self.seg_max.to_le_bytes());
        put(&mut s, BLK_SIZE, self.blk_size.to_le_bytes());
        put(&mut s, PHYSICAL_BLOCK_EXP, [self.physical_block_exp]);
        put(&mut s, ALIGNMENT_OFFSET, [self.alignment_offset]);
        put(&mut s, MIN_IO_SIZE, self.min_io_size.to_le_bytes());
        put(&mut s, OPT_IO_SIZE, self.opt_io_size.to_le_bytes());
        put(&mut s, WRITEBACK, [self.writeback]);
        put(&mut s, NUM_QUEUES, self.num_queues.to_le_bytes());
        put(
            &mut s,
            MAX_DISCARD_SECTORS,
            self.max_discard_sectors.to_le_bytes(),
        );
        put(&mut s, MAX_DISCARD_SEG, self.max_discard_seg.to_le_bytes());
        put(
            &mut s,
            DISCARD_SECTOR_ALIGNMENT,
            self.discard_sector_alignment.to_le_bytes(),
        );
        put(
            &mut s,
            MAX_WRITE_ZEROES_SECTORS,
            self.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            &mut s,
            MAX_WRITE_ZEROES_SEG,
            self.max_write_zeroes_seg.to_le_bytes(),
        );
        put(
            &mut s,
            WRITE_ZEROES_MAY_UNMAP,
            [self.write_zeroes_may_unmap],
        );
        s
    }

    /// GET_CONFIG: always exactly `size` bytes; bytes past the 96-byte space (an offset beyond
    /// it, or an `offset + size` that overflows) read as zero. Never panics.
    ///
    /// The result is allocated at `size` bytes: callers bound it (the `vhost` crate rejects
    /// GET_CONFIG with `offset + size` above 4096 before we are called). Use
    /// [`BlkConfig::read_into`] to avoid the allocation.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        let mut out = vec![0u8; len];
        self.read_into(offset, &mut out);
        out
    }

    /// Fill `buf` with the config space from `offset` on, zero past its end.
    pub fn read_into(&self, offset: u32, buf: &mut [u8]) {
        buf.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= CONFIG_SPACE_SIZE {
            return;
        }
        let space = self.to_bytes();
        let n = buf.len().min(CONFIG_SPACE_SIZE - start);
        buf[..n].copy_from_slice(&space[start..start + n]);
    }

    /// SET_CONFIG: the driver may write the `writeback` byte (1 byte at [`WRITEBACK_OFFSET`],
    /// value 0 or 1) and nothing else; any other write is refused and changes nothing.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        match data {
            [value @ (0 | 1)] if offset == WRITEBACK_OFFSET => {
                self.writeback = *value;
                Ok(())
            }
            _ => Err(Error::ConfigWriteRejected {
                offset,
                len: data.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use virtio_bindings::virtio_blk::virtio_blk_config;

    fn sample() -> BlkConfig {
        BlkConfig {
            capacity_sectors: 0x0102_0304_0506_0708,
            size_max: 0x1112_1314,
            seg_max: 0x2122_2324,
            blk_size: 4096,
            physical_block_exp: 3,
            alignment_offset: 1,
            min_io_size: 0x3132,
            opt_io_size: 0x4142_4344,
            writeback: 1,
            num_queues: 0x5152,
            max_discard_sectors: 0x6162_6364,
            max_discard_seg: 0x7172_7374,
            discard_sector_alignment: 0x8182_8384,
            max_write_zeroes_sectors: 0x9192_9394,
            max_write_zeroes_seg: 0xa1a2_a3a4,
            write_zeroes_may_unmap: 1,
        }
    }

    #[test]
    fn layout_matches_the_kernel_struct() {
        assert_eq!(size_of::<virtio_blk_config>(), CONFIG_SPACE_SIZE);
        assert_eq!(offset_of!(virtio_blk_config, capacity), CAPACITY);
        assert_eq!(offset_of!(virtio_blk_config, size_max), SIZE_MAX);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), SEG_MAX);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), BLK_SIZE);
        assert_eq!(
            offset_of!(virtio_blk_config, physical_block_exp),
            PHYSICAL_BLOCK_EXP
        );
        assert_eq!(
            offset_of!(virtio_blk_config, alignment_offset),
            ALIGNMENT_OFFSET
        );
        assert_eq!(offset_of!(virtio_blk_config, min_io_size), MIN_IO_SIZE);
        assert_eq!(offset_of!(virtio_blk_config, opt_io_size), OPT_IO_SIZE);
        assert_eq!(offset_of!(virtio_blk_config, wce), WRITEBACK);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), NUM_QUEUES);
        assert_eq!(
            offset_of!(virtio_blk_config, max_discard_sectors),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(
            offset_of!(virtio_blk_config, max_discard_seg),
            MAX_DISCARD_SEG
        );
        assert_eq!(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            DISCARD_SECTOR_ALIGNMENT
        );
        assert_eq!(
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            MAX_WRITE_ZEROES_SEG
        );
        assert_eq!(
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            WRITE_ZEROES_MAY_UNMAP
        );
    }

    #[test]
    fn to_bytes_is_little_endian_with_zeroed_padding() {
        let b = sample().to_bytes();
        assert_eq!(b[0..8], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[8..12], 0x1112_1314u32.to_le_bytes());
        assert_eq!(b[12..16], 0x2122_2324u32.to_le_bytes());
        assert_eq!(b[16..20], [0; 4], "geometry");
        assert_eq!(b[20..24], 4096u32.to_le_bytes());
        assert_eq!(b[24], 3);
        assert_eq!(b[25], 1);
        assert_eq!(b[26..28], 0x3132u16.to_le_bytes());
        assert_eq!(b[28..32], 0x4142_4344u32.to_le_bytes());
        assert_eq!(b[32], 1);
        assert_eq!(b[33], 0, "unused0");
        assert_eq!(b[34..36], 0x5152u16.to_le_bytes());
        assert_eq!(b[36..40], 0x6162_6364u32.to_le_bytes());
        assert_eq!(b[40..44], 0x7172_7374u32.to_le_bytes());
        assert_eq!(b[44..48], 0x8182_8384u32.to_le_bytes());
        assert_eq!(b[48..52], 0x9192_9394u32.to_le_bytes());
        assert_eq!(b[52..56], 0xa1a2_a3a4u32.to_le_bytes());
        assert_eq!(b[56], 1);
        assert!(
            b[57..].iter().all(|&x| x == 0),
            "unused1, secure erase, zoned"
        );
    }

    #[test]
    fn read_returns_exactly_size_bytes_at_every_offset_and_size() {
        let config = sample();
        let space = config.to_bytes();
        for offset in 0..=200u32 {
            for size in 0..=200u32 {
                let got = config.read(offset, size);
                assert_eq!(got.len(), size as usize, "offset {offset} size {size}");
                for (i, byte) in got.iter().enumerate() {
                    let want = space.get(offset as usize + i).copied().unwrap_or(0);
                    assert_eq!(*byte, want, "offset {offset} size {size} byte {i}");
                }
            }
        }
    }

    #[test]
    fn read_far_past_the_space_or_with_overflowing_range_is_zero_filled() {
        let config = sample();
        assert_eq!(config.read(u32::MAX, 16), vec![0; 16]);
        assert_eq!(config.read(u32::MAX - 3, 8), vec![0; 8]);
        assert_eq!(config.read(96, 4), vec![0; 4]);
        let big = config.read(90, 1 << 20);
        assert_eq!(big.len(), 1 << 20);
        assert_eq!(big[..6], config.to_bytes()[90..]);
        assert!(big[6..].iter().all(|&b| b == 0));
        assert!(config.read(0, 0).is_empty());
        assert!(config.read(u32::MAX, 0).is_empty());
    }

    #[test]
    fn read_into_overwrites_the_whole_buffer() {
        let config = sample();
        let mut buf = [0xaa; 8];
        config.read_into(94, &mut buf);
        assert_eq!(buf, [0; 8]);
        config.read_into(0, &mut buf);
        assert_eq!(buf, config.to_bytes()[..8]);
    }

    #[test]
    fn write_changes_only_the_writeback_byte() {
        let mut config = sample();
        config.write(WRITEBACK_OFFSET, &[0]).expect("writeback 0");
        assert_eq!(config.writeback, 0);
        config.write(WRITEBACK_OFFSET, &[1]).expect("writeback 1");
        assert_eq!(config.writeback, 1);

        let before = config.clone();
        for (offset, data) in [
            (WRITEBACK_OFFSET, &[2u8][..]),
            (WRITEBACK_OFFSET, &[0, 0][..]),
            (WRITEBACK_OFFSET, &[][..]),
            (0, &[0u8; 8][..]),
            (33, &[1][..]),
            (u32::MAX, &[1][..]),
        ] {
            assert!(matches!(
                config.write(offset, data),
                Err(Error::ConfigWriteRejected { .. })
            ));
        }
        assert_eq!(config, before);
    }
}
