//! The split virtqueue (virtio 1.2 §2.7) written from the driver's side, the way a guest kernel
//! would: a descriptor table, an available ring and a used ring at fixed guest addresses, a kick
//! eventfd to notify the backend and a call eventfd it signals back.
//!
//! Two levels of use:
//! - [`Queue::submit`] / [`Queue::complete`] (and [`Queue::execute`], both at once) take a
//!   [`Transfer`]: device-readable bytes and device-writable lengths, cut into descriptors by a
//!   [`Layout`], optionally behind an indirect table. Every buffer sits between guard bytes in a
//!   per-queue arena; completing a transfer checks that the backend wrote nothing outside the
//!   chain's device-writable buffers, nothing into its readable ones, and nothing into the
//!   descriptor table, the available ring or the padding around the rings.
//! - The raw level for hostile chains: [`Queue::alloc`], [`Queue::alloc_bytes`],
//!   [`Queue::write_descs`], [`Queue::submit_chain`], [`Queue::publish`], [`Queue::set_avail_idx`],
//!   [`Queue::kick`], [`Queue::wait_used`], [`Queue::expect_no_used`], [`Queue::check_guards`].
//!   Raw descriptors carry absolute `next` indices and land exactly where the caller says.
//!
//! The arena is reset whenever a transfer is submitted to an idle queue: check raw buffers with
//! [`Queue::check_guards`] before the next well-formed request.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::GuestMemory;

/// Bytes of guard pattern on each side of every arena buffer.
pub const GUARD: u64 = 64;
/// The guard pattern.
pub const GUARD_BYTE: u8 = 0xa5;
/// What a device-writable buffer holds before the device writes it.
pub const UNWRITTEN_BYTE: u8 = 0xee;
/// Guest memory reserved for one queue's rings.
pub const RING_BLOCK: u64 = 0x1_0000;
/// Largest queue the fixed ring layout holds.
pub const MAX_QUEUE_SIZE: u16 = 1024;

const AVAIL_OFFSET: u64 = 0x4000;
const USED_OFFSET: u64 = 0x5000;

/// One split-ring descriptor, exactly as it is written to guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `F_NEXT`, `F_WRITE`, `F_INDIRECT`.
    pub flags: u16,
    /// Index of the next descriptor when `F_NEXT` is set.
    pub next: u16,
}

impl Desc {
    /// The chain continues at `next`.
    pub const F_NEXT: u16 = 1;
    /// The buffer is device-writable.
    pub const F_WRITE: u16 = 2;
    /// The buffer is a table of descriptors.
    pub const F_INDIRECT: u16 = 4;

    /// A descriptor with every field given.
    pub const fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr,
            len,
            flags,
            next,
        }
    }

    /// A device-readable buffer, end of chain.
    pub const fn readable(addr: u64, len: u32) -> Self {
        Self::new(addr, len, 0, 0)
    }

    /// A device-writable buffer, end of chain.
    pub const fn writable(addr: u64, len: u32) -> Self {
        Self::new(addr, len, Self::F_WRITE, 0)
    }

    /// A descriptor pointing at an indirect table of `count` descriptors.
    pub const fn indirect(table: u64, count: u32) -> Self {
        Self::new(table, count * 16, Self::F_INDIRECT, 0)
    }

    /// The same descriptor continuing at `next`.
    pub const fn then(self, next: u16) -> Self {
        Self::new(self.addr, self.len, self.flags | Self::F_NEXT, next)
    }

    /// The 16-byte little-endian wire form.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// Chains `descs` through the given slot indices: every descriptor but the last gets `F_NEXT`
/// and `next = slots[i + 1]`; the last loses `F_NEXT`.
pub fn link(descs: &[Desc], slots: &[u16]) -> Vec<Desc> {
    assert_eq!(descs.len(), slots.len(), "one slot per descriptor");
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| match slots.get(i + 1) {
            Some(&next) => d.then(next),
            None => Desc::new(d.addr, d.len, d.flags & !Desc::F_NEXT, 0),
        })
        .collect()
}

/// One used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head index of the chain the device returned.
    pub id: u32,
    /// Bytes the device says it wrote into the chain's device-writable buffers.
    pub len: u32,
}

/// Why [`Queue::wait_used`] returned without an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// No used entry within the timeout.
    Timeout,
    /// A used entry appeared but the call eventfd was never signalled for it.
    UsedWithoutSignal,
}

/// How a transfer's byte streams are cut into descriptors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// One descriptor per part (header, data, status), as Linux does.
    #[default]
    Separate,
    /// All device-readable bytes in one descriptor, all device-writable bytes in another.
    Merged,
    /// The concatenated streams cut at these descriptor lengths (each list sums to its stream).
    Cuts {
        /// Lengths of the device-readable descriptors.
        readable: Vec<u32>,
        /// Lengths of the device-writable descriptors.
        writable: Vec<u32>,
    },
}

/// A well-formed request in the abstract: what the device reads, how much it may write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Device-readable parts, in order (for virtio-blk: header, then data).
    pub readable: Vec<Vec<u8>>,
    /// Lengths of the device-writable parts, in order (for virtio-blk: data, then status).
    pub writable: Vec<u32>,
    /// How the parts are cut into descriptors.
    pub layout: Layout,
    /// Put the chain in an indirect table (one ring descriptor).
    pub indirect: bool,
}

/// What the device returned for a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Last byte of the device-writable stream (`UNWRITTEN_BYTE` if never written).
    pub status: u8,
    /// The device-writable stream without its last byte.
    pub data: Vec<u8>,
    /// The used element's `len`.
    pub used_len: u32,
}

/// A submitted transfer, to be completed with [`Queue::complete`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a submitted transfer must be completed"]
pub struct Ticket {
    head: u16,
}

impl Ticket {
    /// Head descriptor index of the chain.
    pub fn head(&self) -> u16 {
        self.head
    }
}

#[derive(Clone, Debug)]
struct Allocation {
    guard_start: u64,
    addr: u64,
    len: u64,
    guard_end: u64,
    /// Device-readable: what must still be there. Device-writable: `None`.
    expected: Option<Vec<u8>>,
}

struct InFlight {
    slots: Vec<u16>,
    allocations: Vec<Allocation>,
    writable: Vec<(u64, u32)>,
}

/// Bump allocator over a list of guest ranges, with guards.
struct Arena {
    ranges: Vec<(u64, u64)>,
    range: usize,
    cursor: u64,
    allocations: Vec<Allocation>,
}

impl Arena {
    fn new(ranges: Vec<(u64, u64)>) -> Self {
        let cursor = ranges.first().map(|r| r.0).unwrap_or(0);
        Self {
            ranges,
            range: 0,
            cursor,
            allocations: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.range = 0;
        self.cursor = self.ranges.first().map(|r| r.0).unwrap_or(0);
        self.allocations.clear();
    }

    fn alloc(&mut self, len: u64, align: u64, expected: Option<Vec<u8>>) -> Allocation {
        let align = align.max(1);
        loop {
            let (_, end) = *self
                .ranges
                .get(self.range)
                .unwrap_or_else(|| panic!("queue arena exhausted allocating {len} bytes"));
            let guard_start = self.cursor;
            let addr = (guard_start + GUARD).div_ceil(align) * align;
            let guard_end = addr + len + GUARD;
            if guard_end <= end {
                self.cursor = guard_end;
                let a = Allocation {
                    guard_start,
                    addr,
                    len,
                    guard_end,
                    expected,
                };
                self.allocations.push(a.clone());
                return a;
            }
            self.range += 1;
            if let Some(r) = self.ranges.get(self.range) {
                self.cursor = r.0;
            }
        }
    }
}

/// One virtqueue as the driver owns it.
pub struct Queue {
    index: usize,
    size: u16,
    mem: Arc<GuestMemory>,
    desc_table: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    free: Vec<u16>,
    in_flight: HashMap<u16, InFlight>,
    completed: HashMap<u16, u32>,
    arena: Arena,
    shadow: Vec<u8>,
    signals: u64,
    /// How long [`Queue::complete`] waits for the backend.
    pub timeout: Duration,
}

impl Queue {
    /// Lays out queue `index` of `size` entries with its rings at `ring_base` (a
    /// [`RING_BLOCK`]-sized block) and data buffers in `arena` ranges; fills the ring block with
    /// the guard pattern and zeroes the rings.
    pub fn new(
        mem: Arc<GuestMemory>,
        index: usize,
        size: u16,
        ring_base: u64,
        arena: Vec<(u64, u64)>,
        event_idx: bool,
        timeout: Duration,
    ) -> Self {
        assert!(
            size.is_power_of_two() && size <= MAX_QUEUE_SIZE,
            "queue size {size} must be a power of two up to {MAX_QUEUE_SIZE}"
        );
        let mut q = Self {
            index,
            size,
            desc_table: ring_base,
            avail: ring_base + AVAIL_OFFSET,
            used: ring_base + USED_OFFSET,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
            event_idx,
            next_avail: 0,
            next_used: 0,
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            completed: HashMap::new(),
            arena: Arena::new(arena),
            shadow: Vec::new(),
            signals: 0,
            timeout,
            mem,
        };
        q.mem.fill(ring_base, RING_BLOCK as usize, GUARD_BYTE);
        q.mem.fill(q.desc_table, q.desc_table_len() as usize, 0);
        q.mem.fill(q.avail, q.avail_len() as usize, 0);
        q.mem.fill(q.used, q.used_len() as usize, 0);
        q.shadow = q.mem.read(ring_base, RING_BLOCK as usize);
        q
    }

    /// Queue index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Queue size (entries).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_table_addr(&self) -> u64 {
        self.desc_table
    }

    /// Guest address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// Guest address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// The kick eventfd (driver -> device).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (device -> driver).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The guest memory the queue lives in.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Used-buffer signals seen on the call eventfd so far.
    pub fn signals(&self) -> u64 {
        self.signals
    }

    /// Transfers submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The available ring's free-running index: the next entry the driver will fill.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// The used ring's free-running index as the driver has consumed it.
    pub fn used_idx(&self) -> u16 {
        self.next_used
    }

    fn desc_table_len(&self) -> u64 {
        16 * u64::from(self.size)
    }

    fn avail_len(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    fn used_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    // ---- guest memory the driver writes, mirrored in the shadow copy ----

    fn write_ring_bytes(&mut self, gpa: u64, bytes: &[u8]) {
        self.mem.write(gpa, bytes);
        let off = (gpa - self.desc_table) as usize;
        self.shadow[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn write_avail_u16(&mut self, gpa: u64, val: u16, order: Ordering) {
        self.mem.store_u16(gpa, val, order);
        let off = (gpa - self.desc_table) as usize;
        self.shadow[off..off + 2].copy_from_slice(&val.to_le_bytes());
    }

    /// Writes `descs` at consecutive descriptor slots from `first_slot`, as given (no linking).
    pub fn write_descs(&mut self, first_slot: u16, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let slot = usize::from(first_slot) + i;
            assert!(
                slot < usize::from(self.size),
                "descriptor slot {slot} out of the table"
            );
            self.write_ring_bytes(self.desc_table + 16 * slot as u64, &d.to_bytes());
        }
    }

    /// Puts `head` in the next available-ring entry and publishes it (index store with release
    /// ordering), sets `used_event` under EVENT_IDX, and kicks.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        self.write_ring_bytes(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
        self.kick();
    }

    /// Stores the available index as is (for hostile jumps); the next [`Queue::publish`] continues
    /// from it. Does not kick.
    pub fn set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        self.next_avail = idx;
        self.write_avail_u16(self.avail + 2, idx, Ordering::Release);
        self.arm_used_event();
    }

    /// Writes `head` into available-ring entry `slot` without publishing it.
    pub fn write_avail_entry(&mut self, slot: u16, head: u16) {
        let slot = u64::from(slot % self.size);
        self.write_ring_bytes(self.avail + 4 + 2 * slot, &head.to_le_bytes());
    }

    /// Notifies the backend.
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        self.kick.write(1).expect("writing the kick eventfd");
    }

    fn arm_used_event(&mut self) {
        if self.event_idx {
            let at = self.avail + 4 + 2 * u64::from(self.size);
            self.write_avail_u16(at, self.next_used, Ordering::Release);
            fence(Ordering::SeqCst);
        }
    }

    /// Writes `descs` as given at slots `0..descs.len()`, publishes head 0 and kicks. For hostile
    /// chains: `next` fields are absolute. No transfer may be in flight.
    pub fn submit_chain(&mut self, descs: &[Desc]) -> u16 {
        self.submit_chain_at(0, descs)
    }

    /// [`Queue::submit_chain`] with the chain at slots `first_slot..`.
    pub fn submit_chain_at(&mut self, first_slot: u16, descs: &[Desc]) -> u16 {
        assert!(
            self.in_flight.is_empty(),
            "raw chains overwrite descriptor slots; complete transfers first"
        );
        self.write_descs(first_slot, descs);
        self.publish(first_slot);
        first_slot
    }

    // ---- the arena ----

    /// Forgets every arena buffer (no transfer may be in flight).
    pub fn reset_arena(&mut self) {
        assert!(
            self.in_flight.is_empty(),
            "resetting the arena under in-flight transfers"
        );
        self.arena.reset();
    }

    fn place(&mut self, len: u64, align: u64, contents: Option<&[u8]>) -> Allocation {
        let a = self.arena.alloc(len, align, contents.map(<[u8]>::to_vec));
        self.mem
            .fill(a.guard_start, (a.addr - a.guard_start) as usize, GUARD_BYTE);
        self.mem.fill(a.addr + a.len, GUARD as usize, GUARD_BYTE);
        match contents {
            Some(bytes) => self.mem.write(a.addr, bytes),
            None => self.mem.fill(a.addr, len as usize, UNWRITTEN_BYTE),
        }
        a
    }

    /// A guarded buffer of `len` bytes filled with [`UNWRITTEN_BYTE`], for the device to write.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        self.place(len, align, None).addr
    }

    /// A guarded buffer holding `bytes`, which the device must not change.
    pub fn alloc_bytes(&mut self, bytes: &[u8], align: u64) -> u64 {
        self.place(bytes.len() as u64, align, Some(bytes)).addr
    }

    /// Writes an indirect table of `descs` (as given) into a guarded buffer; returns its address.
    pub fn alloc_indirect_table(&mut self, descs: &[Desc]) -> u64 {
        let bytes: Vec<u8> = descs.iter().flat_map(|d| d.to_bytes()).collect();
        self.alloc_bytes(&bytes, 16)
    }

    /// Checks every arena buffer since the last reset: guards intact, device-readable buffers
    /// unchanged; and the descriptor table, available ring and ring padding as the driver wrote
    /// them.
    pub fn check_guards(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for a in &self.arena.allocations {
            check_allocation(&self.mem, a, &mut problems);
        }
        self.check_rings(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    fn check_rings(&self, problems: &mut Vec<String>) {
        let now = self.mem.read(self.desc_table, RING_BLOCK as usize);
        let used_start = (self.used - self.desc_table) as usize;
        let used_end = used_start + self.used_len() as usize + 2; // + avail_event
        for range in [0..used_start, used_end..now.len()] {
            if now[range.clone()] == self.shadow[range.clone()] {
                continue;
            }
            let start = range.start;
            let off = start
                + now[range.clone()]
                    .iter()
                    .zip(&self.shadow[range])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
            problems.push(format!(
                "queue {}: device wrote ring memory at {:#x} (offset {off:#x} of the ring block): \
                 {:#04x} -> {:#04x}",
                self.index,
                self.desc_table + off as u64,
                self.shadow[off],
                now[off]
            ));
        }
    }

    // ---- transfers ----

    fn cut(parts: Vec<Vec<u8>>, layout_cuts: Option<&[u32]>, merged: bool) -> Vec<Vec<u8>> {
        let stream: Vec<u8> = parts.concat();
        match (layout_cuts, merged) {
            (Some(cuts), _) => {
                let total: u64 = cuts.iter().map(|&c| u64::from(c)).sum();
                assert_eq!(total, stream.len() as u64, "cuts must cover the stream");
                let mut out = Vec::with_capacity(cuts.len());
                let mut at = 0usize;
                for &c in cuts {
                    out.push(stream[at..at + c as usize].to_vec());
                    at += c as usize;
                }
                out
            }
            (None, true) if stream.is_empty() => Vec::new(),
            (None, true) => vec![stream],
            (None, false) => parts.into_iter().filter(|p| !p.is_empty()).collect(),
        }
    }

    /// Places a transfer's buffers, writes its chain and publishes it.
    pub fn submit(&mut self, t: &Transfer) -> Ticket {
        if self.in_flight.is_empty() {
            self.arena.reset();
        }
        let (rcuts, wcuts, merged) = match &t.layout {
            Layout::Separate => (None, None, false),
            Layout::Merged => (None, None, true),
            Layout::Cuts { readable, writable } => {
                (Some(readable.as_slice()), Some(writable.as_slice()), false)
            }
        };
        let readable = Self::cut(t.readable.clone(), rcuts, merged);
        let writable_total: u32 = t.writable.iter().sum();
        let writable_lens: Vec<u32> = match (wcuts, merged) {
            (Some(c), _) => {
                assert_eq!(
                    c.iter().sum::<u32>(),
                    writable_total,
                    "cuts cover the stream"
                );
                c.to_vec()
            }
            (None, true) if writable_total == 0 => Vec::new(),
            (None, true) => vec![writable_total],
            (None, false) => t.writable.iter().copied().filter(|&l| l > 0).collect(),
        };

        let mut allocations = Vec::new();
        let mut descs = Vec::new();
        for bytes in &readable {
            let align = if bytes.len() >= 512 { 4096 } else { 16 };
            let a = self.place(bytes.len() as u64, align, Some(bytes));
            descs.push(Desc::readable(a.addr, bytes.len() as u32));
            allocations.push(a);
        }
        let mut writable = Vec::new();
        for &len in &writable_lens {
            let align = if len >= 512 { 4096 } else { 16 };
            let a = self.place(u64::from(len), align, None);
            descs.push(Desc::writable(a.addr, len));
            writable.push((a.addr, len));
            allocations.push(a);
        }
        assert!(
            !descs.is_empty(),
            "a transfer needs at least one descriptor"
        );

        let ring_descs = if t.indirect {
            let table_slots: Vec<u16> = (0..descs.len() as u16).collect();
            let table = link(&descs, &table_slots);
            let bytes: Vec<u8> = table.iter().flat_map(|d| d.to_bytes()).collect();
            let a = self.place(bytes.len() as u64, 16, Some(&bytes));
            allocations.push(a.clone());
            vec![Desc::indirect(a.addr, descs.len() as u32)]
        } else {
            descs
        };

        assert!(
            self.free.len() >= ring_descs.len(),
            "queue {} full: {} descriptors free, {} needed",
            self.index,
            self.free.len(),
            ring_descs.len()
        );
        let slots: Vec<u16> = (0..ring_descs.len())
            .map(|_| self.free.pop().expect("checked above"))
            .collect();
        for (d, &slot) in link(&ring_descs, &slots).iter().zip(&slots) {
            self.write_descs(slot, &[*d]);
        }
        let head = slots[0];
        self.in_flight.insert(
            head,
            InFlight {
                slots,
                allocations,
                writable,
            },
        );
        self.publish(head);
        Ticket { head }
    }

    /// Waits (up to [`Queue::timeout`]) for the transfer's used entry, reads what the device
    /// wrote, and checks guards and rings. Panics with the details if the backend misbehaved.
    pub fn complete(&mut self, ticket: Ticket) -> Completion {
        let head = ticket.head;
        let deadline = Instant::now() + self.timeout;
        let used_len = loop {
            if let Some(len) = self.completed.remove(&head) {
                break len;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_used(left) {
                Ok(u) => {
                    let known = u16::try_from(u.id)
                        .ok()
                        .is_some_and(|id| self.in_flight.contains_key(&id));
                    assert!(
                        known,
                        "queue {}: backend returned used id {} (len {}) that is not in flight",
                        self.index, u.id, u.len
                    );
                }
                Err(e) => panic!(
                    "queue {}: no completion for head {head} within {:?}: {e:?}",
                    self.index, self.timeout
                ),
            }
        };
        let f = self
            .in_flight
            .remove(&head)
            .expect("a completed head was in flight");
        let mut stream = Vec::new();
        for &(addr, len) in &f.writable {
            stream.extend(self.mem.read(addr, len as usize));
        }
        let mut problems = Vec::new();
        for a in &f.allocations {
            check_allocation(&self.mem, a, &mut problems);
        }
        self.check_rings(&mut problems);
        assert!(
            problems.is_empty(),
            "queue {}: backend wrote outside the chain's writable buffers:\n{}",
            self.index,
            problems.join("\n")
        );
        self.free.extend(f.slots);
        let status = stream.pop().unwrap_or(UNWRITTEN_BYTE);
        Completion {
            status,
            data: stream,
            used_len,
        }
    }

    /// Whether the transfer's used entry has been seen (by [`Queue::wait_used`] while waiting
    /// for others), so that [`Queue::complete`] will not wait for it.
    pub fn is_complete(&mut self, ticket: &Ticket) -> bool {
        while self.wait_used(Duration::ZERO).is_ok() {}
        self.completed.contains_key(&ticket.head)
    }

    /// Submits and completes.
    pub fn execute(&mut self, t: &Transfer) -> Completion {
        let ticket = self.submit(t);
        self.complete(ticket)
    }

    // ---- the used ring ----

    /// The used index the device has published in guest memory (which the driver may not have
    /// consumed yet): where a VMM restarts the ring when its backend is lost.
    pub fn used_idx_in_memory(&self) -> u16 {
        self.used_idx_now()
    }

    fn used_idx_now(&self) -> u16 {
        self.mem.load_u16(self.used + 2, Ordering::Acquire)
    }

    fn take_signal(&mut self) -> bool {
        match self.call.read() {
            Ok(n) => {
                self.signals += n;
                true
            }
            Err(_) => false,
        }
    }

    /// The next used element, in ring order, waiting up to `timeout` for the call eventfd. An
    /// element that belongs to an in-flight transfer is also kept for [`Queue::complete`].
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Used, WaitError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.arm_used_event();
            if self.used_idx_now() != self.next_used {
                let slot = u64::from(self.next_used % self.size);
                let at = self.used + 4 + 8 * slot;
                let used = Used {
                    id: self.mem.read_u32(at),
                    len: self.mem.read_u32(at + 4),
                };
                self.next_used = self.next_used.wrapping_add(1);
                self.take_signal();
                if let Ok(id) = u16::try_from(used.id) {
                    if self.in_flight.contains_key(&id) {
                        self.completed.insert(id, used.len);
                    }
                }
                return Ok(used);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if self.used_idx_now() != self.next_used {
                    WaitError::UsedWithoutSignal
                } else {
                    WaitError::Timeout
                });
            }
            if poll_readable(self.call.as_raw_fd(), left) {
                self.take_signal();
            }
        }
    }

    /// Asserts that no used element arrives within `wait`.
    pub fn expect_no_used(&mut self, wait: Duration) {
        match self.wait_used(wait) {
            Err(WaitError::Timeout) => {}
            other => panic!(
                "queue {}: expected no used element, got {other:?}",
                self.index
            ),
        }
    }
}

fn check_allocation(mem: &GuestMemory, a: &Allocation, problems: &mut Vec<String>) {
    let guards = [
        ("before", a.guard_start, a.addr - a.guard_start),
        ("after", a.addr + a.len, a.guard_end - a.addr - a.len),
    ];
    for (side, start, len) in guards {
        let now = mem.read(start, len as usize);
        if now != vec![GUARD_BYTE; now.len()] {
            let i = now.iter().position(|&b| b != GUARD_BYTE).unwrap_or(0);
            problems.push(format!(
                "guard {side} buffer {:#x}+{} changed at {:#x} ({:#04x})",
                a.addr,
                a.len,
                start + i as u64,
                now[i]
            ));
        }
    }
    if let Some(expected) = &a.expected {
        let now = mem.read(a.addr, a.len as usize);
        if &now != expected {
            let i = now
                .iter()
                .zip(expected)
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            problems.push(format!(
                "device-readable buffer {:#x}+{} changed at {:#x} ({:#04x} -> {:#04x})",
                a.addr,
                a.len,
                a.addr + i as u64,
                expected[i],
                now[i]
            ));
        }
    }
}

/// Waits up to `timeout` for `fd` to become readable.
fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count of 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}
