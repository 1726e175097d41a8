//! A queue thread's view of guest memory for one pass: every access the fast path makes (the
//! available ring, the descriptors, the request header, the data segments, the status byte, the
//! used ring) resolved against the memory map with one region lookup, remembering the region it
//! found for the next access.
//!
//! vm-memory's generic accessors walk any range as an iterator over the regions it may span
//! (`get_slices`, `Peekable`, `stop_on_error`, a `try_fold` over the pieces), for every access,
//! even a two-byte load of the available index: on the null image that machinery was half the
//! instructions of a request. [`MemView`] implements the same [`GuestMemory`] trait, so
//! virtio-queue, the request parser and the status write all go through it unchanged, but answers
//! a range that lies inside one region (every access in practice: a region is a whole RAM block of
//! the guest) with that one slice, straight from the region, and hands anything else (a range
//! across regions, or outside memory) to the map's own iterator, which checks and reports it as
//! before. The result of every access is the same; only the path to it is shorter.

use std::cell::Cell;
use std::mem::size_of;
use std::sync::atomic::Ordering;

use virtio_blk::Chain;
use virtio_queue::desc::split::Descriptor;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, Permissions, VolatileSlice,
};

use crate::dirty_log::DirtyBitmap;
use crate::shared::GuestMem;

/// Guest memory as one pass of a queue thread sees it: the map, and the region the last access
/// fell in. Not `Sync` (the remembered region is a `Cell`): each thread makes its own, per pass.
pub struct MemView<'a> {
    mem: &'a GuestMem,
    last: Cell<Option<&'a GuestRegionMmap<DirtyBitmap>>>,
}

impl<'a> MemView<'a> {
    /// A view of `mem`.
    pub fn new(mem: &'a GuestMem) -> Self {
        MemView {
            mem,
            last: Cell::new(None),
        }
    }

    /// Write one byte (a request's status) at `addr`: a plain store into the region's mapping
    /// when the byte is in one (the used ring's later release store publishes it), the map's
    /// checked path otherwise.
    pub fn write_u8(&self, addr: GuestAddress, value: u8) -> vm_memory::guest_memory::Result<()> {
        if let Some((region, offset)) = self.region_of(addr, 1) {
            if let Ok(slice) = region.get_slice(offset, 1) {
                return slice
                    .store(value, 0, Ordering::Relaxed)
                    .map_err(vm_memory::guest_memory::Error::from);
            }
        }
        Bytes::write_slice(self, &[value], addr)
    }

    /// The split-ring descriptor at `addr`, if all its 16 bytes are in guest memory.
    #[inline]
    fn read_descriptor(&self, addr: GuestAddress) -> Option<Descriptor> {
        const LEN: usize = size_of::<Descriptor>();
        if let Some((region, offset)) = self.region_of(addr, LEN) {
            if let Ok(slice) = region.get_slice(offset, LEN) {
                return slice.read_obj::<Descriptor>(0).ok();
            }
        }
        Bytes::read_obj(self, addr).ok()
    }

    /// The region holding all of `addr..addr + count` (`count > 0`), and `addr`'s offset in it;
    /// `None` if the range is not inside one region.
    #[inline]
    fn region_of(
        &self,
        addr: GuestAddress,
        count: usize,
    ) -> Option<(&'a GuestRegionMmap<DirtyBitmap>, MemoryRegionAddress)> {
        let inside = |r: &'a GuestRegionMmap<DirtyBitmap>| {
            let offset = addr.0.checked_sub(r.start_addr().0)?;
            // `count - 1` cannot underflow: callers pass `count > 0`.
            let end = offset.checked_add(count as u64 - 1)?;
            (end < r.len()).then_some((r, MemoryRegionAddress(offset)))
        };
        if let Some(hit) = self.last.get().and_then(inside) {
            return Some(hit);
        }
        let found = inside(self.mem.find_region(addr)?)?;
        self.last.set(Some(found.0));
        Some(found)
    }
}

/// The slices of one access: the one slice of a range inside one region, or the map's own
/// iterator for anything else.
pub enum Slices<'a> {
    /// The whole range, from one region (taken by the first `next`).
    One(Option<VolatileSlice<'a, BS<'a, DirtyBitmap>>>),
    /// A range across regions or outside memory: vm-memory's iterator, pieces and errors alike.
    Map(GuestMemoryBackendSliceIterator<'a, GuestMem>),
}

impl<'a> Iterator for Slices<'a> {
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, BS<'a, DirtyBitmap>>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Slices::One(slice) => slice.take().map(Ok),
            Slices::Map(it) => it.next(),
        }
    }
}

// Both arms stay exhausted once they return `None`: `One` holds `None` from then on, and
// vm-memory's iterator is fused.
impl std::iter::FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, DirtyBitmap>> for Slices<'a> {}

impl GuestMemory for MemView<'_> {
    type PhysicalMemory = GuestMem;
    type Bitmap = DirtyBitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if count > 0 && self.region_of(addr, count).is_some() {
            return true;
        }
        GuestMemory::check_range(self.mem, addr, count, access)
    }

    fn get_slices<'b>(
        &'b self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'b, BS<'b, DirtyBitmap>>>
    {
        if count > 0 {
            if let Some((region, offset)) = self.region_of(addr, count) {
                // The range was checked to lie inside the region, so this only fails if the
                // region is not host-mapped, which the map's iterator reports just the same.
                if let Ok(slice) = region.get_slice(offset, count) {
                    return Ok(Slices::One(Some(slice)));
                }
            }
        }
        Ok(Slices::Map(GuestMemoryBackend::get_slices(
            self.mem, addr, count,
        )))
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        Some(self.mem)
    }
}

/// A descriptor chain of a split virtqueue, walked through a [`MemView`]: the same walk as
/// virtio-queue's `DescriptorChain` (indirect tables followed, one level only, their length a
/// multiple of 16; at most a table's size of descriptors per table; a `next` index past the
/// table ends the chain; so does a chain longer than 4 GiB in all), with each descriptor read
/// from its region instead of through vm-memory's generic range walk.
pub struct ViewChain<'v, 'm> {
    mem: &'v MemView<'m>,
    desc_table: GuestAddress,
    table_size: u16,
    next_index: u16,
    ttl: u16,
    yielded_bytes: u32,
    is_indirect: bool,
}

impl<'v, 'm> ViewChain<'v, 'm> {
    /// The chain starting at descriptor `head` of the table at `desc_table` of a queue of
    /// `queue_size` entries.
    pub fn new(mem: &'v MemView<'m>, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        ViewChain {
            mem,
            desc_table,
            table_size: queue_size,
            next_index: head,
            ttl: queue_size,
            yielded_bytes: 0,
            is_indirect: false,
        }
    }
}

impl Iterator for ViewChain<'_, '_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        // At most two rounds: the second after switching to an indirect table, which cannot
        // switch again.
        loop {
            if self.ttl == 0 || self.next_index >= self.table_size {
                return None;
            }
            let addr = self
                .desc_table
                .checked_add(u64::from(self.next_index) * size_of::<Descriptor>() as u64)?;
            let desc = self.mem.read_descriptor(addr)?;
            if desc.refers_to_indirect_table() {
                // One level of indirection, a whole number of descriptors, at most 2^16 of them.
                let len = desc.len();
                if self.is_indirect || len % size_of::<Descriptor>() as u32 != 0 {
                    return None;
                }
                let table_size = u16::try_from(len / size_of::<Descriptor>() as u32).ok()?;
                self.desc_table = desc.addr();
                self.table_size = table_size;
                self.next_index = 0;
                self.ttl = table_size;
                self.is_indirect = true;
                continue;
            }
            // A chain longer than 2^32 bytes is the driver's error: stop there.
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next_index = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

impl<'m> Chain for ViewChain<'_, 'm> {
    type Memory = MemView<'m>;

    fn memory(&self) -> &MemView<'m> {
        self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two regions with a hole between them: [0x1000, 0x3000) and [0x3000, 0x4000) adjacent,
    /// then [0x8000, 0x9000).
    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[
            (GuestAddress(0x1000), 0x2000),
            (GuestAddress(0x3000), 0x1000),
            (GuestAddress(0x8000), 0x1000),
        ])
        .expect("test memory")
    }

    #[test]
    fn answers_as_the_map_does() {
        let mem = memory();
        let view = MemView::new(&mem);
        let cases: &[(u64, usize)] = &[
            (0x1000, 16),
            (0x2ff8, 8),
            (0x2ff8, 16), // across two adjacent regions
            (0x3ff8, 16), // runs into the hole
            (0x4000, 1),  // in the hole
            (0x8ff0, 16),
            (0x8ff0, 17), // past the end
            (0x1000, 0),
            (u64::MAX - 3, 8), // wraps
        ];
        for &(addr, count) in cases {
            let a = GuestAddress(addr);
            assert_eq!(
                GuestMemory::check_range(&view, a, count, Permissions::Read),
                GuestMemory::check_range(&mem, a, count, Permissions::Read),
                "check_range({addr:#x}, {count})"
            );
            let mut ours = vec![0u8; count];
            let mut theirs = vec![0u8; count];
            let r1 = view.read_slice(&mut ours, a).is_ok();
            let r2 = mem.read_slice(&mut theirs, a).is_ok();
            assert_eq!(r1, r2, "read_slice({addr:#x}, {count})");
        }
    }

    #[test]
    fn reads_and_writes_land_where_the_map_puts_them() {
        let mem = memory();
        let view = MemView::new(&mem);
        // Inside one region, then across two (the map's path), then in the third region (a
        // different remembered region).
        view.write_slice(&[1, 2, 3, 4], GuestAddress(0x1100))
            .expect("write");
        view.write_slice(&[5, 6, 7, 8], GuestAddress(0x2ffe))
            .expect("write across");
        view.write_obj(0xabcd_u16, GuestAddress(0x8002))
            .expect("write_obj");
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x1100))
            .expect("read");
        assert_eq!(buf, [1, 2, 3, 4]);
        mem.read_slice(&mut buf, GuestAddress(0x2ffe))
            .expect("read");
        assert_eq!(buf, [5, 6, 7, 8]);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x8002)).expect("read"),
            0xabcd
        );
        assert_eq!(
            view.read_obj::<u16>(GuestAddress(0x1102)).expect("read"),
            u16::from_ne_bytes([3, 4])
        );
        assert!(view.write_slice(&[0; 2], GuestAddress(0x4fff)).is_err());
        // Status bytes: in a region, at a region's last byte, and in the hole.
        view.write_u8(GuestAddress(0x1200), 7).expect("write_u8");
        view.write_u8(GuestAddress(0x3fff), 9)
            .expect("write_u8 at the end");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1200)).expect("read"), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3fff)).expect("read"), 9);
        assert!(view.write_u8(GuestAddress(0x4000), 1).is_err());
    }

    /// The walk agrees with virtio-queue's `DescriptorChain` on every chain of thousands of
    /// random descriptor tables: loops, `next` past the table, indirect tables (nested, of odd
    /// lengths, in a second region, across the hole, outside memory), zero lengths and lengths
    /// that overflow a chain.
    #[test]
    fn walks_every_chain_as_virtio_queue_does() {
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::{Queue, QueueOwnedT, QueueT};

        const SIZE: u16 = 16;
        let mem = GuestMem::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1000),
        ])
        .expect("test memory");
        let mock = MockSplitQueue::new(&mem, SIZE);
        let table = mock.desc_table_addr();
        // Every head on the available ring once.
        for i in 0..SIZE {
            mock.avail()
                .ring()
                .ref_at(usize::from(i))
                .expect("avail slot")
                .store(i.to_le());
        }
        mock.avail().idx().store(SIZE.to_le());
        let indirect = GuestAddress(0x2_0000);
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let random_desc = |next: &mut dyn FnMut() -> u64| {
            let r = next();
            let addr = match r % 6 {
                0 => 0x8000 + (r >> 8) % 0x1000,
                1 => indirect.0,
                2 => indirect.0 + 16 * ((r >> 8) % 4),
                3 => 0x1_8000,     // the hole
                4 => 0x2_0ff8,     // runs past the second region
                _ => u64::MAX - 8, // wraps
            };
            let len = [0, 1, 16, 32, 48, 7, 4096, 0x8000_0000, u32::MAX][(r >> 16) as usize % 9];
            let flags = ((r >> 24) % 8) as u16; // NEXT, WRITE, INDIRECT in any mix
            let next_index = ((r >> 32) % 20) as u16; // sometimes past the table
            virtio_queue::desc::split::Descriptor::new(addr, len, flags, next_index)
        };
        let mut compared = 0;
        for _ in 0..3000 {
            for i in 0..SIZE {
                let d = random_desc(&mut next);
                mem.write_obj(d, table.unchecked_add(16 * u64::from(i)))
                    .expect("descriptor");
            }
            for i in 0..8u64 {
                let d = random_desc(&mut next);
                mem.write_obj(d, indirect.unchecked_add(16 * i))
                    .expect("indirect descriptor");
            }
            let mut queue: Queue = mock.create_queue().expect("queue");
            let view = MemView::new(&mem);
            let heads: Vec<_> = queue.iter(&mem).expect("avail").collect();
            assert_eq!(heads.len(), usize::from(SIZE));
            for chain in heads {
                let head = chain.head_index();
                let theirs: Vec<_> = chain
                    .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
                    .collect();
                let ours: Vec<_> =
                    ViewChain::new(&view, GuestAddress(queue.desc_table()), queue.size(), head)
                        .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
                        .collect();
                assert_eq!(ours, theirs, "head {head}");
                compared += theirs.len();
            }
        }
        assert!(compared > 10_000, "the tables produced real chains");
    }
}
