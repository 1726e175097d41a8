//! The virtio-blk request parser over a descriptor table the fuzzer writes byte by byte.
//!
//! Input: 8 bytes of limits, a queue size, up to 4 avail-ring heads (any value, in or out of the
//! table) and an index jump, then one 16-byte record per descriptor slot (a steering byte picks
//! where the address and length point: the buffer areas, region edges, the hole between the
//! regions, the top of the address space or raw values; flags and `next` are raw), and the rest
//! is the contents of the buffer areas (headers, ranges, indirect tables). Every chain the queue
//! offers is popped and parsed as the backend does, and the result checked against the
//! invariants in `common`.

#![no_main]

mod common;

use common::Bytes8;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

fuzz_target!(|data: &[u8]| common::with_memory(|mem| run(data, mem)));

fn run(data: &[u8], mem: &common::Mem) {
    let mut input = Bytes8(data);
    let limits = common::limits(input.take());
    let shape = input.u8();
    let size = 1u16 << (shape % 6); // 1 ..= 32
    let heads = usize::from(shape >> 6) + 1;
    let jump = if input.u8() == 0xff { size + 1 } else { 0 };
    let heads: Vec<u16> = (0..heads).map(|_| input.u16() % (2 * size)).collect();

    let mock = MockSplitQueue::new(mem, size);
    for slot in 0..size {
        let steer = input.u8();
        let off = input.u32();
        let len = input.u32();
        let flags = input.u16();
        let next = input.u8();
        let raw_addr = u64::from(off) << 32 | u64::from(len);
        let addr = common::steer(steer, off, raw_addr);
        let len = common::steer_len(steer >> 3, len);
        // Mostly within the table, sometimes past it.
        let next = if next & 0x80 != 0 {
            u16::from(next)
        } else {
            u16::from(next) % size
        };
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags & 0x7, next));
        let _ = mock.desc_table().store(slot, desc);
        // Pad the record to 16 bytes, so that slots line up in the input.
        let _ = input.take::<4>();
    }
    common::fill(mem, input.rest());
    common::publish(&mock, &heads, jump);
    let Some(mut queue) = common::queue(&mock) else {
        return;
    };
    common::drain(&mut queue, mem, &limits);
}
