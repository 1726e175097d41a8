//! Finding the status byte of a chain that virtio-queue stops walking because it carries more
//! than 4 GiB (virtio 1.2 §2.7.5.2 forbids such chains): its descriptors may still lead,
//! through valid `next` indices, to a good status byte, and then the guest deserves `IOERR`
//! there rather than a chain returned unanswered.
//!
//! The walk reads the descriptors as the driver wrote them, with the limits virtio-queue
//! applies: at most a table's worth of descriptors per table, `next` indices inside the table,
//! one level of indirection, an indirect table a whole number of descriptors long. A loop or a
//! bad index still means the end cannot be known.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// The status byte (the last byte of the last descriptor that carries bytes, device-writable
/// and in guest memory) of the chain at `head` of the descriptor table at `desc_table`, of
/// `queue_size` entries; `None` when the chain's end cannot be walked to or its last byte is not
/// a usable status byte.
pub fn status_of_long_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Option<GuestAddress> {
    let mut table = desc_table;
    let mut size = queue_size;
    let mut index = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut last: Option<Descriptor> = None;
    loop {
        if index >= size || ttl == 0 {
            return None;
        }
        let at = table.checked_add(u64::from(index) * DESC_SIZE)?;
        let desc: Descriptor = mem.read_obj(at).ok()?;
        if desc.refers_to_indirect_table() {
            let entries = u64::from(desc.len()) / DESC_SIZE;
            if indirect
                || u64::from(desc.len()) % DESC_SIZE != 0
                || entries == 0
                || entries > u64::from(u16::MAX)
            {
                return None;
            }
            table = desc.addr();
            size = u16::try_from(entries).ok()?;
            index = 0;
            ttl = size;
            indirect = true;
            continue;
        }
        if desc.len() > 0 {
            last = Some(desc);
        }
        if !desc.has_next() {
            break;
        }
        index = desc.next();
        ttl -= 1;
    }
    let desc = last?;
    if !desc.is_write_only() {
        return None;
    }
    let addr = desc.addr().checked_add(u64::from(desc.len()) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory")
    }

    fn put(mem: &GuestMemoryMmap, table: u64, descs: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = Descriptor::new(addr, len, flags, next);
            mem.write_obj(d, GuestAddress(table + 16 * i as u64))
                .expect("writing a descriptor");
        }
    }

    #[test]
    fn a_4_gib_chain_with_a_good_status_byte_has_one() {
        let m = mem();
        put(
            &m,
            0,
            &[
                (0x1000, 16, F_NEXT, 1),
                (0x2000, 0xffff_fff0, F_WRITE | F_NEXT, 2),
                (0x3000, 1, F_WRITE, 0),
            ],
        );
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            Some(GuestAddress(0x3000))
        );
    }

    #[test]
    fn behind_an_indirect_table_too() {
        let m = mem();
        put(&m, 0, &[(0x4000, 48, F_INDIRECT, 0)]);
        put(
            &m,
            0x4000,
            &[
                (0x1000, 16, F_NEXT, 1),
                (0x2000, 0xffff_fff0, F_WRITE | F_NEXT, 2),
                (0x3000, 2, F_WRITE, 0),
            ],
        );
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            Some(GuestAddress(0x3001))
        );
    }

    #[test]
    fn loops_bad_indices_and_bad_status_bytes_have_none() {
        let m = mem();
        put(
            &m,
            0,
            &[(0x1000, 16, F_NEXT, 1), (0x2000, 16, F_WRITE | F_NEXT, 0)],
        );
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            None,
            "loop"
        );
        put(&m, 0, &[(0x1000, 16, F_NEXT, 9)]);
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            None,
            "index"
        );
        put(&m, 0, &[(0x1000, 16, F_NEXT, 1), (0x2000, 16, 0, 0)]);
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            None,
            "readable"
        );
        put(&m, 0, &[(0x1000, 16, F_NEXT, 1), (2 << 20, 1, F_WRITE, 0)]);
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            None,
            "outside"
        );
        put(&m, 0, &[(0x4000, 20, F_INDIRECT, 0)]);
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            None,
            "odd table"
        );
        put(&m, 0, &[(0x4000, 16, F_INDIRECT, 0)]);
        put(&m, 0x4000, &[(0x5000, 16, F_INDIRECT, 0)]);
        assert_eq!(
            status_of_long_chain(&m, GuestAddress(0), 8, 0),
            None,
            "nested"
        );
    }
}
