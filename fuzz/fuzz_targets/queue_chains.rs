//! A queue of structured, random descriptor chains — direct and behind indirect tables, with
//! well-formed requests among the broken ones — then corrupted in random places, popped and
//! parsed until the queue is empty, each result checked against the invariants in `common`.

#![no_main]

mod common;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Arbitrary, Debug)]
struct Input {
    limits: [u8; 8],
    size_log2: u8,
    /// Added to the available index: a jump past the queue size breaks the ring.
    jump: u8,
    chains: Vec<Chain>,
    corruptions: Vec<Corruption>,
    /// Written over the buffer areas after the chains, at this offset.
    scribble_at: u16,
    scribble: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Chain {
    indirect: bool,
    kind: u8,
    sector: u64,
    parts: Vec<Part>,
}

#[derive(Arbitrary, Debug)]
struct Part {
    writable: bool,
    len_kind: u8,
    len: u32,
    addr_kind: u8,
    off: u32,
    /// Contents of the buffer, when it lies in the buffer area (ranges, ID bytes, ...).
    fill: u8,
}

#[derive(Arbitrary, Debug)]
enum Corruption {
    Flags { slot: u16, flags: u16 },
    Next { slot: u16, next: u16 },
    Len { slot: u16, len: u32 },
    Addr { slot: u16, addr: u64 },
    Head { entry: u16, head: u16 },
}

/// Hands out buffer space in the data area (region 0), wrapping around when full.
struct Heap {
    next: u64,
}

impl Heap {
    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.min(common::DATA_LEN / 4);
        if self.next + len > common::DATA + common::DATA_LEN {
            self.next = common::DATA;
        }
        let at = self.next;
        self.next += len.next_multiple_of(16);
        at
    }
}

fn request_type(kind: u8) -> u32 {
    [0, 1, 4, 8, 11, 13, 14, 10, 3, kind as u32 * 0x0101_0101][usize::from(kind) % 10]
}

fuzz_target!(|input: Input| common::with_memory(|mem| run(&input, mem)));

fn run(input: &Input, mem: &common::Mem) {
    let limits = common::limits(input.limits);
    let size = 1u16 << (input.size_log2 % 9); // 1 ..= 256
    let mock = MockSplitQueue::new(mem, size);
    let mut heap = Heap { next: common::DATA };
    let mut slot = 0u16;
    let mut heads = Vec::new();

    for chain in input.chains.iter().take(usize::from(size)) {
        let mut descs = Vec::new();
        // The header, then the parts.
        let header = heap.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type(chain.kind).to_le_bytes());
        h[8..].copy_from_slice(&chain.sector.to_le_bytes());
        let _ = mem.write_slice(&h, GuestAddress(header));
        descs.push((header, 16u32, 0u16));
        for p in chain.parts.iter().take(300) {
            let len = common::steer_len(p.len_kind, p.len);
            let addr = if p.addr_kind % 4 != 0 {
                let at = heap.alloc(u64::from(len.min(4096)));
                let n = len.min(4096) as usize;
                let _ = mem.write_slice(&vec![p.fill; n], GuestAddress(at));
                at
            } else {
                common::steer(p.addr_kind / 4, p.off, u64::from(p.off) << 20)
            };
            descs.push((addr, len, if p.writable { F_WRITE } else { 0 }));
        }
        let head = slot;
        if chain.indirect {
            let n = descs.len();
            let table = heap.alloc(16 * n as u64);
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let (flags, next) = if i + 1 < n {
                    (flags | F_NEXT, i as u16 + 1)
                } else {
                    (flags, 0)
                };
                let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                let _ = mem.write_obj(raw, GuestAddress(table + 16 * i as u64));
            }
            if slot >= size {
                break;
            }
            let raw = Descriptor::new(table, 16 * n as u32, F_INDIRECT, 0);
            let _ = mock.desc_table().store(slot, RawDescriptor::from(raw));
            slot += 1;
        } else {
            if usize::from(size - slot) < descs.len() {
                break;
            }
            let n = descs.len();
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let (flags, next) = if i + 1 < n {
                    (flags | F_NEXT, slot + 1)
                } else {
                    (flags, 0)
                };
                let raw = Descriptor::new(addr, len, flags, next);
                let _ = mock.desc_table().store(slot, RawDescriptor::from(raw));
                slot += 1;
            }
        }
        heads.push(head);
    }

    for c in input.corruptions.iter().take(16) {
        let load = |s: u16| mock.desc_table().load(s % size).ok().map(Descriptor::from);
        let store = |s: u16, d: Descriptor| {
            let _ = mock.desc_table().store(s % size, RawDescriptor::from(d));
        };
        match *c {
            Corruption::Flags { slot, flags } => {
                if let Some(mut d) = load(slot) {
                    d.set_flags(flags & 7);
                    store(slot, d);
                }
            }
            Corruption::Next { slot, next } => {
                if let Some(mut d) = load(slot) {
                    d.set_next(next);
                    store(slot, d);
                }
            }
            Corruption::Len { slot, len } => {
                if let Some(mut d) = load(slot) {
                    d.set_len(len);
                    store(slot, d);
                }
            }
            Corruption::Addr { slot, addr } => {
                if let Some(mut d) = load(slot) {
                    d.set_addr(addr);
                    store(slot, d);
                }
            }
            Corruption::Head { entry, head } => {
                let n = heads.len().max(1);
                if let Some(h) = heads.get_mut(usize::from(entry) % n) {
                    *h = head;
                }
            }
        }
    }
    if !input.scribble.is_empty() {
        let at = common::DATA + u64::from(input.scribble_at) % common::DATA_LEN;
        let n = input
            .scribble
            .len()
            .min((common::DATA + common::DATA_LEN - at) as usize);
        let _ = mem.write_slice(&input.scribble[..n], GuestAddress(at));
    }

    let jump = if input.jump >= 0xf0 {
        size + u16::from(input.jump - 0xef)
    } else {
        0
    };
    common::publish(&mock, &heads, jump);
    let Some(mut queue) = common::queue(&mock) else {
        return;
    };
    let popped = common::drain(&mut queue, mem, &limits);
    if jump == 0 {
        assert_eq!(popped, heads.len(), "every published chain is popped");
    }
}
