//! The io_uring engine: one ring per queue thread.
//!
//! Reads and writes become `READV`/`WRITEV` straight over the guest's iovecs (with
//! `RWF_DONTCACHE` in `rw_flags` under `dontcache`), FLUSH becomes `FSYNC(DATASYNC)`, DISCARD and
//! WRITE_ZEROES on files become `FALLOCATE`. The image's descriptor is registered with the ring
//! (fixed file 0), to spare the kernel a descriptor lookup per request.
//! The completion eventfd is registered with `IORING_REGISTER_EVENTFD`. The ring is created
//! disabled and enabled only once `IORING_REGISTER_RESTRICTIONS` limits it to those opcodes on
//! that fixed file, since seccomp cannot see what a ring runs.
//!
//! What the ring cannot run asynchronously and may take seconds goes to the engine's offload
//! worker (`offload.rs`), which hands the completion back at [`Engine::reap`]: block-device
//! `BLKDISCARD`/`BLKZEROOUT`, `O_DIRECT` requests whose buffers are not aligned (bounced through
//! the buffered descriptor), and WRITE_ZEROES written out where the file system has no
//! `ZERO_RANGE`. What is quick runs at submission on the queue thread and waits in a ready list,
//! reported by the reap that follows the submission without a signal on the completion eventfd
//! (which would be a write and a read of it per request): requests with more iovecs than one
//! call takes, null-image requests, injected faults, and buffered writes (`writeback`,
//! `dontcache`). A buffered write is a copy into the page cache,
//! but ext4 cannot take it without blocking (no `FMODE_BUF_WASYNC`), so io_uring hands every one
//! to a kernel worker thread: measured with 4 KiB random writes at queue depth 32, that costs
//! 3.4 µs of CPU per request against 2.2 µs for the same `pwritev2` done here, and half the
//! IOPS. But a buffered write can also be held for up to a fifth of a second at a time by the
//! host's dirty throttling (when the page cache holds more dirty data than the device can write
//! back), and done here it would hold every other request of the queue meanwhile. So the engine
//! times each buffered write it runs here: one that took `SLOW_WRITE` (2 ms) or more turns the
//! queue's buffered writes over to io_uring's worker threads (`IOSQE_ASYNC`, over the same
//! buffers) for `ASYNC_WRITES_HOLD` (1 s); then they come back here, and the first one tells
//! whether the throttling goes on. Asking first with `RWF_NOWAIT` is no help: ext4 and tmpfs
//! refuse it for buffered writes, btrfs answers `EAGAIN` to every write that needs copy-on-write,
//! and on XFS a throttled writer holds the inode lock that reads of the image wait for anyway.
//!
//! With [`EngineOptions::fixed_buffers`], guest memory is registered with the ring as fixed
//! buffers (pieces of at most 1 GiB, the kernel's limit), and a read or write whose data is one
//! segment inside one of them becomes `READ_FIXED`/`WRITE_FIXED`: the kernel then takes the
//! pages it pinned at registration instead of pinning and releasing the request's own, which is
//! most of what an `O_DIRECT` request costs it beside the device. The table has two halves: a new
//! memory map is registered in the half no request in flight uses (waiting, with the requests
//! going unregistered, if both are), since a request whose buffer the kernel looks up only when
//! it issues it (in an io_uring worker, say) must find what it was built against. The engine
//! holds the guard of each registered map, so no other mapping can take its addresses meanwhile
//! and a request's address found inside a registered piece is inside that very mapping. A half
//! that no longer serves is cleared as soon as its last request is reaped, releasing its pins.
//!
//! At reap, a short transfer is finished synchronously, and errors that have a fallback
//! (`RWF_DONTCACHE` refused, `O_DIRECT` refused) get it.
//!
//! Each request occupies a slot, preallocated for the queue depth, whose index is the SQE's
//! `user_data`; nothing is allocated per request while the depth is respected. The slot owns the
//! request's [`IoBuffers`] (and so the guard that keeps their memory mapped) from submission
//! until the CQE is reaped, when they go back to the submitter in the [`Completion`]; dropping
//! the engine waits for the kernel before the slots, guards included, are dropped.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, register::Restriction, squeue, types, IoUring};
use log::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::image::zeroes_mode;
use crate::offload::{self, Job, Offload};
use crate::{
    iov, Completion, Engine, EngineKind, EngineOptions, Error, Image, IoBuffers, MemoryGuard, Op,
    Result, SubmitError, RWF_DONTCACHE,
};

/// Most iovecs one `READV`/`WRITEV` takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Largest ring we ask for; the kernel's limit is 32768.
const MAX_ENTRIES: u32 = 32768;

/// Buffered reads this large go straight to io_uring's worker threads (`IOSQE_ASYNC`) rather
/// than being tried inline: a hot 1 MiB read is ~170 us of page-cache copying, which inline
/// would serialise on the queue thread, while io-wq spreads a queue's large reads over the
/// host's CPUs. Small reads stay inline, where a cache hit costs no thread hand-off.
const ASYNC_READ_MIN: u32 = 256 << 10;

/// A buffered write that takes this long on the queue thread was held by the kernel (dirty
/// throttling pauses a writer for milliseconds, up to 200 ms, at a time); a page-cache copy
/// takes microseconds. A busy host's scheduler taking the CPU from the queue thread that long
/// passes for throttling too, and costs a second of writes through io_uring's workers.
const SLOW_WRITE: Duration = Duration::from_millis(2);

/// How long a queue's buffered writes go to io_uring's worker threads after one was slow. Their
/// time there tells nothing (at queue depth 32 it is mostly waiting behind each other, as
/// io_uring runs the buffered writes of one file one at a time), so the next one run here says
/// whether the throttling goes on.
const ASYNC_WRITES_HOLD: Duration = Duration::from_secs(1);

/// Entries in each half of the fixed-buffer table: guest memory of up to this many 1 GiB pieces
/// (regions cut at [`MAX_FIXED_LEN`]) can be registered.
const FIXED_HALF: u32 = 1024;

/// The largest buffer the kernel registers.
const MAX_FIXED_LEN: usize = 1 << 30;

/// `IORING_REGISTER_BUFFERS_UPDATE`, the one registration the ring still takes once enabled
/// when it has fixed buffers.
const REGISTER_BUFFERS_UPDATE: u8 = 16;

/// A request between submission and reap; it owns the request's buffers meanwhile.
#[derive(Debug)]
struct Slot {
    user_data: u64,
    /// The request, with its buffers: the iovec array and the memory an SQE points to.
    op: Op,
    /// Bytes a read or write must move.
    len: u32,
    /// The `rw_flags` it was submitted with.
    flags: i32,
    /// The half of the fixed-buffer table its `READ_FIXED`/`WRITE_FIXED` uses.
    fixed: Option<usize>,
}

impl Slot {
    const EMPTY: Slot = Slot {
        user_data: 0,
        op: Op::Flush,
        len: 0,
        flags: 0,
        fixed: None,
    };

    /// The slot of an operation without data.
    fn new(user_data: u64, op: Op) -> Slot {
        Slot {
            user_data,
            op,
            len: 0,
            flags: 0,
            fixed: None,
        }
    }
}

/// One registered buffer: the host addresses `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// One half of the fixed-buffer table.
#[derive(Default)]
struct FixedHalf {
    /// The buffers registered here, by address; the `i`-th is the half's `i`-th table entry.
    spans: Vec<Span>,
    /// Reads and writes in flight over this half's buffers.
    in_flight: usize,
    /// Keeps the memory of `spans` mapped while it is registered.
    guard: Option<MemoryGuard>,
    /// Leading entries of the half that may hold a buffer in the kernel's table.
    set: u32,
}

/// The fixed buffers of a ring; see the module documentation.
#[derive(Default)]
struct FixedBuffers {
    halves: [FixedHalf; 2],
    /// The half new requests use.
    cur: usize,
    /// A memory map to register once the other half has no request in flight.
    pending: Option<(Vec<Span>, MemoryGuard)>,
    /// Whether a failed registration was logged already.
    warned: bool,
}

impl FixedBuffers {
    /// The table index and half of a buffer holding all of `addr..addr + len`, if one does.
    #[inline]
    fn lookup(&self, addr: usize, len: usize) -> Option<(u16, usize)> {
        let half = &self.halves[self.cur];
        let end = addr.checked_add(len)?;
        let i = half
            .spans
            .partition_point(|s| s.start <= addr)
            .checked_sub(1)?;
        let span = half.spans.get(i)?;
        if len == 0 || end > span.end {
            return None;
        }
        // Both below FIXED_HALF: the index fits the table's 2 * FIXED_HALF entries.
        let index = self.cur as u32 * FIXED_HALF + i as u32;
        Some((u16::try_from(index).ok()?, self.cur))
    }
}

/// `regions` cut into pieces the kernel registers, by address; `None` when there are more than a
/// half of the table holds.
fn spans_of(regions: &[libc::iovec]) -> Option<Vec<Span>> {
    let mut spans = Vec::new();
    for r in regions {
        let mut start = r.iov_base as usize;
        let end = start.checked_add(r.iov_len)?;
        while start < end {
            let piece_end = end.min(start.saturating_add(MAX_FIXED_LEN));
            spans.push(Span {
                start,
                end: piece_end,
            });
            start = piece_end;
        }
    }
    spans.sort_unstable_by_key(|s| s.start);
    (spans.len() <= FIXED_HALF as usize).then_some(spans)
}

/// Set entry `index` of the ring's buffer table to `span` (`None`: empty).
fn register_one(ring: &IoUring, index: u32, span: Option<Span>) -> io::Result<()> {
    let iov = match span {
        Some(s) => libc::iovec {
            iov_base: s.start as *mut libc::c_void,
            iov_len: s.end - s.start,
        },
        None => libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
    };
    // SAFETY: the kernel pins the pages of the span (mapped memory: the engine holds the guard
    // that keeps it mapped while registered) or drops the entry; it touches them only for the
    // `READ_FIXED`/`WRITE_FIXED` requests the engine builds over a request's own buffers, which
    // lie inside the span and which that request's guard keeps mapped. An entry a request in
    // flight may use is never updated (see `maintain`).
    unsafe {
        ring.submitter()
            .register_buffers_update(index, &[iov], None)
    }
}

/// Register `spans` in half `h` (clearing the rest of what it held); on failure the half is left
/// empty, or holding what could not be cleared.
fn register_half(ring: &IoUring, half: &mut FixedHalf, h: usize, spans: &[Span]) -> io::Result<()> {
    let base = h as u32 * FIXED_HALF;
    let mut result = Ok(());
    let mut done = 0;
    for (i, span) in spans.iter().enumerate() {
        if let Err(e) = register_one(ring, base + i as u32, Some(*span)) {
            result = Err(e);
            break;
        }
        done = i + 1;
    }
    let keep = if result.is_ok() { done as u32 } else { 0 };
    let mut set = keep;
    let was = half.set.max(done as u32);
    for i in keep..was {
        if register_one(ring, base + i, None).is_err() {
            set = was;
        }
    }
    half.set = set;
    half.spans.clear();
    if result.is_ok() {
        half.spans.extend_from_slice(spans);
    }
    result
}

/// The io_uring engine; see the module documentation.
pub struct UringEngine {
    image: Arc<Image>,
    ring: IoUring,
    eventfd: EventFd,
    /// Whether the image is fixed file 0 of the ring.
    fixed: bool,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Completions decided at submission.
    ready: VecDeque<Completion>,
    /// CQEs (slot, result) taken early to make room in the completion queue.
    stash: VecDeque<(u64, i32)>,
    /// Submitted and not yet reaped, all paths.
    in_flight: usize,
    /// SQEs pushed whose CQE has not been taken from the ring.
    in_ring: usize,
    /// Completion queue size: `in_ring` never exceeds it, so the CQ never overflows.
    cq_entries: usize,
    /// The worker for what may take seconds and the ring cannot run asynchronously.
    offload: Offload,
    /// Until when buffered writes go to io_uring's workers rather than run here, since one
    /// was held by the kernel.
    async_writes_until: Option<Instant>,
    /// The registered guest memory, with [`EngineOptions::fixed_buffers`].
    fixed_bufs: Option<Box<FixedBuffers>>,
}

impl UringEngine {
    /// A ring of at least `queue_depth` entries over `image`.
    pub fn new(image: Arc<Image>, queue_depth: u32) -> Result<Self> {
        Self::with_options(image, queue_depth, EngineOptions::default())
    }

    /// [`UringEngine::new`] with `options`.
    pub fn with_options(
        image: Arc<Image>,
        queue_depth: u32,
        options: EngineOptions,
    ) -> Result<Self> {
        let depth = queue_depth.clamp(1, MAX_ENTRIES);
        let entries = depth.next_power_of_two();
        // Created disabled, so that the restrictions are in place before the first SQE.
        let (ring, disabled) = match IoUring::builder().setup_r_disabled().build(entries) {
            Ok(ring) => (ring, true),
            // Before Linux 5.10: no restrictions to register.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                IoUring::builder()
                    .build(entries)
                    .map_err(|source| Error::RingSetup { entries, source })?,
                false,
            ),
            Err(source) => return Err(Error::RingSetup { entries, source }),
        };
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd { source })?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|source| Error::EventFd { source })?;
        let fixed = !image.is_null()
            && ring
                .submitter()
                .register_files(&[image.as_raw_fd()])
                .map_err(|e| debug!("io_uring: registering the image fd failed: {e}"))
                .is_ok();
        // Registered before the restrictions, which then allow updating the table only.
        let fixed_bufs = (options.fixed_buffers && !image.is_null())
            .then(|| ring.submitter().register_buffers_sparse(2 * FIXED_HALF))
            .and_then(|r| {
                r.map_err(|e| {
                    warn!(
                        "{}: io_uring: no fixed buffers ({e}); reads and writes go unregistered",
                        image.path().display()
                    )
                })
                .ok()
            })
            .map(|()| Box::<FixedBuffers>::default());
        if disabled {
            restrict(&ring, fixed, fixed_bufs.is_some())?;
        } else {
            warn!("io_uring: this kernel cannot restrict a ring (Linux 5.10); the ring takes any operation");
        }
        let cq_entries = ring.params().cq_entries() as usize;
        Ok(UringEngine {
            image,
            ring,
            eventfd,
            fixed,
            slots: (0..depth).map(|_| Slot::EMPTY).collect(),
            free: (0..depth).rev().collect(),
            ready: VecDeque::with_capacity(depth as usize),
            stash: VecDeque::with_capacity(cq_entries),
            in_flight: 0,
            in_ring: 0,
            cq_entries,
            offload: Offload::new(),
            async_writes_until: None,
            fixed_bufs,
        })
    }

    /// Reads and writes in flight over the fixed buffers, per half of the table: what a test
    /// checks to know the fixed path was taken, or that a half was released.
    #[cfg(test)]
    fn fixed_in_flight(&self) -> Option<[usize; 2]> {
        let f = self.fixed_bufs.as_ref()?;
        Some([f.halves[0].in_flight, f.halves[1].in_flight])
    }

    /// Register what waits to be registered, in the half no request uses, and clear a half that
    /// no longer serves once its last request is reaped.
    fn maintain(&mut self) {
        let Some(fixed) = self.fixed_bufs.as_deref_mut() else {
            return;
        };
        loop {
            let other = 1 - fixed.cur;
            if fixed.halves[other].in_flight > 0 {
                return;
            }
            if let Some((spans, guard)) = fixed.pending.take() {
                let half = &mut fixed.halves[other];
                match register_half(&self.ring, half, other, &spans) {
                    Ok(()) => half.guard = Some(guard),
                    Err(e) => {
                        half.guard = None;
                        if !std::mem::replace(&mut fixed.warned, true) {
                            warn!(
                                "{}: registering guest memory as io_uring fixed buffers failed \
                                 ({e}; RLIMIT_MEMLOCK?); its reads and writes go unregistered",
                                self.image.path().display()
                            );
                        } else {
                            debug!("io_uring: registering fixed buffers failed again: {e}");
                        }
                    }
                }
                fixed.cur = other;
                continue;
            }
            let half = &mut fixed.halves[other];
            if half.set > 0 || half.guard.is_some() {
                // Only the empty spans are left to register: this cannot fail but for a kernel
                // that refuses to clear, which leaves the half's pins until the ring goes.
                let _ = register_half(&self.ring, half, other, &[]);
                half.guard = None;
            }
            return;
        }
    }

    /// A fixed read or write of half `h` left the engine.
    fn fixed_done(&mut self, h: Option<usize>) {
        let (Some(h), Some(fixed)) = (h, self.fixed_bufs.as_deref_mut()) else {
            return;
        };
        let half = &mut fixed.halves[h];
        half.in_flight = half.in_flight.saturating_sub(1);
        if half.in_flight == 0 && h != fixed.cur {
            self.maintain();
        }
    }

    /// Complete a request now, handing its buffers back; [`Engine::reap`] reports it. Called
    /// only within `submit` (whose caller reaps after its pass) and within a reap (which drains
    /// the ready list last), so the completion fd is left alone.
    fn complete_now(&mut self, user_data: u64, result: io::Result<u32>, bufs: Option<IoBuffers>) {
        self.ready.push_back(Completion {
            user_data,
            result,
            bufs,
            fixed_buffers: false,
        });
    }

    /// Whether a buffered write goes to io_uring's workers now rather than run here.
    fn async_writes(&mut self) -> bool {
        match self.async_writes_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                self.async_writes_until = None;
                debug!(
                    "{}: buffered writes run on the queue thread again",
                    self.image.path().display()
                );
                false
            }
            None => false,
        }
    }

    /// A buffered write run here took `took`: when that is slow, hand the next ones to
    /// io_uring's workers for a while.
    fn buffered_write_took(&mut self, took: Duration) {
        if took < SLOW_WRITE {
            return;
        }
        if self.async_writes_until.is_none() {
            debug!(
                "{}: a buffered write was held {took:?}; buffered writes go to io_uring workers",
                self.image.path().display()
            );
        }
        self.async_writes_until = Some(Instant::now() + ASYNC_WRITES_HOLD);
    }

    /// Run `op` on this thread and complete it now.
    fn run_now(&mut self, op: Op, user_data: u64) {
        let result = self.image.execute(&op);
        self.complete_now(user_data, result, op.into_buffers());
    }

    /// Hand `job` to the offload worker, so that the queue thread goes on serving; run it here
    /// if no worker can.
    fn offload(&mut self, job: Job) {
        if let Err(job) = self.offload.send(&self.image, &self.eventfd, job) {
            let c = offload::run(&self.image, job);
            self.complete_now(c.user_data, c.result, c.bufs);
        }
    }

    fn alloc_slot(&mut self, slot: Slot) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                // More in flight than the queue depth: grow, once per new high-water mark.
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Free slot `idx` and take its request out.
    fn release_slot(&mut self, idx: u32) -> Slot {
        self.free.push(idx);
        std::mem::replace(&mut self.slots[idx as usize], Slot::EMPTY)
    }

    /// Queue `entry` for `slot`, submitting what is queued when the ring is full. On failure the
    /// request's buffers come back in the error; the kernel never saw them.
    fn push(&mut self, entry: squeue::Entry, slot: Slot) -> std::result::Result<(), SubmitError> {
        while self.in_ring >= self.cq_entries {
            if let Err(error) = self.make_room() {
                self.fixed_done(slot.fixed);
                let bufs = slot.op.into_buffers();
                return Err(SubmitError { error, bufs });
            }
        }
        let idx = self.alloc_slot(slot);
        let entry = entry.user_data(idx.into());
        loop {
            // SAFETY: a read or write entry points at the iovec array of the `IoBuffers` now in
            // slot `idx` (moving the `Vec` into the slot did not move the array) and at the
            // buffers it describes, which its guard keeps mapped. The slot keeps both until the
            // CQE is reaped, and dropping the engine waits for the kernel first. Fallocate and
            // fsync entries point at nothing.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_ring += 1;
                return Ok(());
            }
            if let Err(error) = self.submit_queued() {
                let slot = self.release_slot(idx);
                self.fixed_done(slot.fixed);
                let bufs = slot.op.into_buffers();
                return Err(SubmitError { error, bufs });
            }
        }
    }

    /// Enter the ring until the submission queue is empty.
    fn submit_queued(&mut self) -> Result<()> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(n) if n > 0 => {}
                Ok(_) => self.make_room()?,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EBUSY | libc::EAGAIN) => self.make_room()?,
                    _ => {
                        return Err(Error::Submit {
                            path: self.image.path().to_owned(),
                            source: e,
                        })
                    }
                },
            }
        }
        Ok(())
    }

    /// Move finished CQEs aside (to `stash`, reported at the next reap) so that the kernel has
    /// room to post more; when none has finished, submit what is queued and wait for one.
    fn make_room(&mut self) -> Result<()> {
        if self.stash_cqes() > 0 {
            return Ok(());
        }
        if self.in_ring == 0 {
            return Err(Error::Submit {
                path: self.image.path().to_owned(),
                source: io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(source) => {
                return Err(Error::Submit {
                    path: self.image.path().to_owned(),
                    source,
                })
            }
        }
        self.stash_cqes();
        Ok(())
    }

    /// Take every posted CQE into `stash`; returns how many.
    fn stash_cqes(&mut self) -> usize {
        let before = self.stash.len();
        for cqe in self.ring.completion() {
            self.stash.push_back((cqe.user_data(), cqe.result()));
        }
        let taken = self.stash.len() - before;
        self.in_ring -= taken;
        taken
    }

    /// Turn the CQE of slot `idx` into a completion, finishing short transfers and applying
    /// fallbacks; `None` when the fallback went to the offload worker, whose completion comes
    /// later.
    fn finish(&mut self, idx: u64, res: i32) -> Option<Completion> {
        let Slot {
            user_data,
            op,
            len,
            flags,
            fixed,
        } = self.release_slot(idx as u32);
        self.fixed_done(fixed);
        let result = match &op {
            Op::Read { offset, bufs } => self.finish_rw(false, bufs, *offset, len, flags, res),
            Op::Write { offset, bufs } => self.finish_rw(true, bufs, *offset, len, flags, res),
            Op::Flush => errno_result(res),
            Op::Discard { .. } if res == -libc::EOPNOTSUPP => Ok(0),
            Op::Discard { .. } => errno_result(res),
            &Op::WriteZeroes { offset, len, .. } if res == -libc::EOPNOTSUPP => {
                // No ZERO_RANGE here: up to a GiB to write out, off the queue thread.
                self.offload(Job::ZeroesByWriting {
                    user_data,
                    offset,
                    len,
                });
                return None;
            }
            Op::WriteZeroes { .. } => errno_result(res),
        };
        Some(Completion {
            user_data,
            result,
            bufs: op.into_buffers(),
            fixed_buffers: fixed.is_some(),
        })
    }

    /// The result of a read or write whose CQE said `res`, finishing a short transfer or
    /// retrying with a fallback here.
    fn finish_rw(
        &self,
        write: bool,
        bufs: &IoBuffers,
        offset: u64,
        len: u32,
        flags: i32,
        res: i32,
    ) -> io::Result<u32> {
        let iov = bufs.iovecs();
        if res >= 0 {
            let done = res.unsigned_abs();
            if done >= len {
                return Ok(len);
            }
            // Short: finish the rest here (zero-filling past the end of the file).
            // SAFETY: the kernel is done with the buffers (their CQE is in), and `bufs`, still
            // the engine's, holds the guard that keeps them mapped.
            return unsafe { self.image.rw_sync(write, iov, offset, done as usize, flags) };
        }
        let errno = -res;
        let flags = match errno {
            libc::EOPNOTSUPP if flags & RWF_DONTCACHE != 0 => {
                self.image.dontcache_refused();
                flags & !RWF_DONTCACHE
            }
            // O_DIRECT refused the buffers: `rw_sync` retries through the buffered descriptor.
            libc::EINVAL if self.image.is_direct() => flags,
            libc::EAGAIN | libc::EINTR => flags,
            _ => return Err(io::Error::from_raw_os_error(errno)),
        };
        // SAFETY: as above.
        unsafe { self.image.rw_sync(write, iov, offset, 0, flags) }
    }
}

/// The opcodes the engine submits; the ring refuses every other one.
const OPCODES: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// The opcodes the engine submits over fixed buffers, when it has them.
const FIXED_OPCODES: [u8; 2] = [opcode::ReadFixed::CODE, opcode::WriteFixed::CODE];

/// Seccomp cannot see the operations an io_uring runs, so the ring itself is told what it may
/// run (`IORING_REGISTER_RESTRICTIONS`): the engine's opcodes, only on the image's fixed file
/// when it is registered, with no SQE flag but `IOSQE_ASYNC`, and no registration once enabled
/// but, with fixed buffers, updates of the buffer table (which can register only memory of this
/// process, already its own to read and write). Code that got hold of the ring could not open,
/// read or send anything else through it.
fn restrict(ring: &IoUring, fixed: bool, fixed_buffers: bool) -> Result<()> {
    let mut allowed = squeue::Flags::ASYNC;
    if fixed {
        allowed |= squeue::Flags::FIXED_FILE;
    }
    let opcodes = if fixed_buffers {
        &FIXED_OPCODES[..]
    } else {
        &[]
    };
    let mut rules: Vec<Restriction> = OPCODES
        .iter()
        .chain(opcodes)
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    if fixed_buffers {
        rules.push(Restriction::register_op(REGISTER_BUFFERS_UPDATE));
    }
    rules.push(Restriction::sqe_flags_allowed(allowed.bits()));
    if fixed {
        rules.push(Restriction::sqe_flags_required(
            squeue::Flags::FIXED_FILE.bits(),
        ));
    }
    let submitter = ring.submitter();
    submitter
        .register_restrictions(&mut rules)
        .and_then(|()| submitter.register_enable_rings())
        .map_err(|source| Error::RingRestrict { source })
}

/// Build an SQE over the image's descriptor, fixed or plain.
macro_rules! on_image {
    ($engine:expr, |$fd:ident| $build:expr) => {
        if $engine.fixed {
            let $fd = types::Fixed(0);
            $build
        } else {
            let $fd = types::Fd($engine.image.as_raw_fd());
            $build
        }
    };
}

fn errno_result(res: i32) -> io::Result<u32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(0)
    }
}

impl Engine for UringEngine {
    fn submit(&mut self, op: Op, user_data: u64) -> std::result::Result<(), SubmitError> {
        self.in_flight += 1;
        if self.image.is_null() {
            self.run_now(op, user_data);
            return Ok(());
        }
        let pushed = match &op {
            Op::Read { offset, bufs } | Op::Write { offset, bufs } => {
                let offset = *offset;
                let write = matches!(op, Op::Write { .. });
                let iov = bufs.iovecs();
                let len = match iov::total_len(iov) {
                    Ok(len) => len,
                    Err(e) => {
                        self.complete_now(user_data, Err(e), op.into_buffers());
                        return Ok(());
                    }
                };
                if !self.image.dio_aligned(iov, offset) {
                    // Through the buffered descriptor: a copy of up to a segment's worth, or a
                    // write held by the host's dirty throttling; off the queue thread.
                    self.offload(Job::Execute { user_data, op });
                    return Ok(());
                }
                if iov.len() > IOV_MAX || self.image.check_fault(offset, len.into()).is_err() {
                    self.run_now(op, user_data);
                    return Ok(());
                }
                let buffered_write = write && !self.image.is_direct();
                if buffered_write && !self.async_writes() {
                    let started = Instant::now();
                    self.run_now(op, user_data);
                    self.buffered_write_took(started.elapsed());
                    return Ok(());
                }
                let (iovecs, iovcnt) = (iov.as_ptr(), iov.len() as u32);
                let flags = self.image.rw_flags();
                // One segment inside a registered buffer: over the fixed buffers.
                let fixed = match (&self.fixed_bufs, iov) {
                    (Some(f), [one]) => f.lookup(one.iov_base as usize, one.iov_len),
                    _ => None,
                };
                let entry = match (fixed, write) {
                    (Some((index, _)), true) => {
                        let buf = iov[0].iov_base.cast::<u8>().cast_const();
                        on_image!(self, |fd| opcode::WriteFixed::new(fd, buf, len, index)
                            .offset(offset)
                            .rw_flags(flags)
                            .build())
                    }
                    (Some((index, _)), false) => {
                        let buf = iov[0].iov_base.cast::<u8>();
                        on_image!(self, |fd| opcode::ReadFixed::new(fd, buf, len, index)
                            .offset(offset)
                            .rw_flags(flags)
                            .build())
                    }
                    (None, true) => on_image!(self, |fd| opcode::Writev::new(fd, iovecs, iovcnt)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()),
                    (None, false) => on_image!(self, |fd| opcode::Readv::new(fd, iovecs, iovcnt)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()),
                };
                let entry = if buffered_write
                    || (!write && !self.image.is_direct() && len >= ASYNC_READ_MIN)
                {
                    entry.flags(squeue::Flags::ASYNC)
                } else {
                    entry
                };
                let fixed = fixed.map(|(_, half)| half);
                if let (Some(h), Some(f)) = (fixed, self.fixed_bufs.as_deref_mut()) {
                    f.halves[h].in_flight += 1;
                }
                let slot = Slot {
                    user_data,
                    op,
                    len,
                    flags,
                    fixed,
                };
                self.push(entry, slot)
            }
            Op::Flush => {
                let entry = on_image!(self, |fd| opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build());
                self.push(entry, Slot::new(user_data, op))
            }
            &Op::Discard { offset, len } | &Op::WriteZeroes { offset, len, .. } => {
                if len == 0 || self.image.check_fault(offset, len).is_err() {
                    self.run_now(op, user_data);
                    return Ok(());
                }
                if self.image.is_block_device() {
                    // BLKDISCARD / BLKZEROOUT: up to 16 GiB a request, seconds on a slow device.
                    self.offload(Job::Execute { user_data, op });
                    return Ok(());
                }
                let mode = match op {
                    Op::WriteZeroes { unmap, .. } => zeroes_mode(unmap),
                    _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                };
                let entry = on_image!(self, |fd| opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build());
                self.push(entry, Slot::new(user_data, op))
            }
        };
        if pushed.is_err() {
            self.in_flight -= 1;
        }
        pushed
    }

    fn commit(&mut self) -> Result<()> {
        self.submit_queued()
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> Result<()> {
        // Clear first: the kernel signals the eventfd after posting each CQE, the offload worker
        // after queueing each completion, and we push to `ready` only while holding `&mut self`,
        // so nothing posted after this read is missed.
        let _ = self.eventfd.read();
        self.reap_polled(f)
    }

    fn reap_polled(&mut self, f: &mut dyn FnMut(Completion)) -> Result<()> {
        while let Some(c) = self.ready.pop_front() {
            self.in_flight -= 1;
            f(c);
        }
        while let Some((idx, res)) = self.stash.pop_front() {
            if let Some(c) = self.finish(idx, res) {
                self.in_flight -= 1;
                f(c);
            }
        }
        loop {
            let next: Option<cqueue::Entry> = self.ring.completion().next();
            let Some(cqe) = next else { break };
            self.in_ring -= 1;
            if let Some(c) = self.finish(cqe.user_data(), cqe.result()) {
                self.in_flight -= 1;
                f(c);
            }
        }
        // After the CQEs: a fallback handed over just now may already be done.
        while let Some(c) = self.offload.next_finished() {
            self.in_flight -= 1;
            f(c);
        }
        // Completions queued by the fallbacks run here when no worker could.
        while let Some(c) = self.ready.pop_front() {
            self.in_flight -= 1;
            f(c);
        }
        Ok(())
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty()
            || !self.stash.is_empty()
            || !self.ring.completion().is_empty()
            || self.offload.has_finished()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn set_memory(&mut self, regions: &[libc::iovec], guard: &MemoryGuard) {
        let Some(fixed) = self.fixed_bufs.as_deref_mut() else {
            return;
        };
        let spans = spans_of(regions).unwrap_or_else(|| {
            if !std::mem::replace(&mut fixed.warned, true) {
                warn!(
                    "{}: guest memory in more than {FIXED_HALF} pieces of 1 GiB; its reads and \
                     writes go unregistered",
                    self.image.path().display()
                );
            }
            Vec::new()
        });
        let cur = &mut fixed.halves[fixed.cur];
        if cur.guard.is_some() && cur.spans == spans {
            // The same mappings (a map rebuilt around the same regions): keep them registered,
            // held by the new map now.
            cur.guard = Some(Arc::clone(guard));
            fixed.pending = None;
            return;
        }
        fixed.pending = Some((spans, Arc::clone(guard)));
        self.maintain();
    }
}

impl Drop for UringEngine {
    /// Wait for the kernel to finish with every buffer it was given before the slots, and the
    /// guards that keep those buffers mapped, are dropped (after this function returns).
    fn drop(&mut self) {
        if self.in_ring == 0 {
            return;
        }
        warn!(
            "{}: io_uring engine dropped with {} requests in the kernel; waiting for them",
            self.image.path().display(),
            self.in_ring
        );
        while self.in_ring > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    warn!(
                        "io_uring: waiting for in-flight requests failed: {e}; leaking their \
                         buffers, which the kernel may still use"
                    );
                    // Their guards must not go: the memory they keep mapped stays mapped.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            let taken = self.ring.completion().count();
            self.in_ring -= taken;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::any::Any;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use super::*;
    use crate::testutil::{fill_pattern, AlignedBuf, TempDir};
    use crate::{new_engine, CacheMode, ImageOptions, SyncEngine};

    const KINDS: [EngineKind; 2] = [EngineKind::IoUring, EngineKind::Sync];

    fn image(path: &Path, cache: CacheMode, size: u64) -> Arc<Image> {
        Arc::new(
            Image::open(&ImageOptions {
                path: path.to_owned(),
                read_only: false,
                cache,
                size: Some(size),
            })
            .unwrap(),
        )
    }

    /// Reap until `n` completions arrived, waiting for the completion fd while none is ready.
    fn reap_n(engine: &mut dyn Engine, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        while out.len() < n {
            if engine.has_completions() {
                engine.reap_polled(&mut |c| out.push(c)).unwrap();
                continue;
            }
            assert!(
                readable(engine.completion_fd(), 5000),
                "no completion within 5 s"
            );
            engine.reap(&mut |c| out.push(c)).unwrap();
        }
        assert_eq!(out.len(), n);
        out
    }

    /// Pushes `entry` on the engine's ring outside the engine's own paths (as code that got
    /// hold of the ring could), submits it and returns its result.
    fn raw(engine: &mut UringEngine, entry: squeue::Entry) -> i32 {
        let entry = entry.user_data(u64::MAX);
        // SAFETY: the entry's buffers (if any) live in the caller's frame until this returns,
        // and the completion is waited for below.
        unsafe { engine.ring.submission().push(&entry) }.expect("room in the ring");
        engine.ring.submit_and_wait(1).expect("io_uring_enter");
        let cqe = engine.ring.completion().next().expect("a completion");
        assert_eq!(cqe.user_data(), u64::MAX);
        cqe.result()
    }

    /// The ring takes only the opcodes the engine uses, on the image's fixed file: an opcode
    /// outside the list is refused by the kernel (EACCES), as is a listed one on a descriptor
    /// that is not the fixed image, while the listed ones work.
    #[test]
    fn the_ring_refuses_opcodes_and_files_outside_its_restrictions() {
        let dir = TempDir::new();
        let img = image(&dir.join("r.img"), CacheMode::Writeback, 1 << 20);
        let mut engine = UringEngine::new(Arc::clone(&img), 8).unwrap();
        assert!(engine.fixed, "the image is the ring's fixed file");
        let mut buf = vec![0u8; 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let readv = opcode::Readv::new(types::Fixed(0), iov.as_ptr(), 1).build();
        assert_eq!(raw(&mut engine, readv), 4096, "READV of the fixed image");
        let read = opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 4096).build();
        assert_eq!(
            raw(&mut engine, read),
            -libc::EACCES,
            "READ (not an opcode the engine uses) is refused"
        );
        let nop = opcode::Nop::new().build().flags(squeue::Flags::FIXED_FILE);
        assert_eq!(raw(&mut engine, nop), -libc::EACCES, "NOP is refused");
        let other = std::fs::File::open(dir.join("r.img")).unwrap();
        let by_fd = opcode::Readv::new(types::Fd(other.as_raw_fd()), iov.as_ptr(), 1).build();
        assert_eq!(
            raw(&mut engine, by_fd),
            -libc::EACCES,
            "READV of a descriptor that is not the fixed image is refused"
        );
        assert!(
            engine
                .ring
                .submitter()
                .register_files_update(0, &[other.as_raw_fd()])
                .is_err(),
            "no registration after set-up"
        );
        let read_fixed = opcode::ReadFixed::new(types::Fixed(0), buf.as_mut_ptr(), 4096, 0).build();
        assert_eq!(
            raw(&mut engine, read_fixed),
            -libc::EACCES,
            "READ_FIXED is refused without fixed buffers"
        );
        // SAFETY: refused before the kernel looks at the buffer.
        let update = unsafe {
            engine
                .ring
                .submitter()
                .register_buffers_update(0, &iov, None)
        };
        assert!(
            update.is_err(),
            "no buffer registration without fixed buffers"
        );
    }

    /// Submit `op` and wait for it: its result and the buffers handed back.
    fn run_back(engine: &mut dyn Engine, op: Op) -> (io::Result<u32>, Option<IoBuffers>) {
        engine.submit(op, 42).unwrap();
        engine.commit().unwrap();
        let c = reap_n(engine, 1).remove(0);
        assert_eq!(c.user_data, 42);
        (c.result, c.bufs)
    }

    fn run(engine: &mut dyn Engine, op: Op) -> io::Result<u32> {
        run_back(engine, op).0
    }

    /// Test buffers as a request's: one iovec per buffer, the buffers owned by the guard.
    fn owned<T: AsMut<[u8]> + Any + Send + Sync>(mut bufs: Vec<T>) -> IoBuffers {
        let iov = bufs
            .iter_mut()
            .map(|b| {
                let b = b.as_mut();
                libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                }
            })
            .collect();
        // SAFETY: each iovec covers the heap bytes of one buffer the guard owns; moving the
        // buffers into the guard moves none of those bytes.
        unsafe { IoBuffers::new(iov, Some(Arc::new(bufs))) }
    }

    /// The buffers given to [`owned`], back from a completion. Fails unless the engine handed
    /// them back and kept no reference to them.
    fn back<T: Any + Send + Sync>(bufs: Option<IoBuffers>) -> Vec<T> {
        let guard = bufs.expect("buffers handed back").into_parts().1;
        let bufs = guard.expect("guard handed back").downcast::<Vec<T>>();
        let bufs = bufs.unwrap_or_else(|_| panic!("not the test's own buffers"));
        Arc::try_unwrap(bufs).unwrap_or_else(|_| panic!("the engine kept a reference"))
    }

    fn write_op<T: AsMut<[u8]> + Any + Send + Sync>(offset: u64, bufs: Vec<T>) -> Op {
        Op::Write {
            offset,
            bufs: owned(bufs),
        }
    }

    fn read_op<T: AsMut<[u8]> + Any + Send + Sync>(offset: u64, bufs: Vec<T>) -> Op {
        Op::Read {
            offset,
            bufs: owned(bufs),
        }
    }

    /// Read into `bufs` at `offset`: the result and the buffers back, filled.
    fn read<T: AsMut<[u8]> + Any + Send + Sync>(
        engine: &mut dyn Engine,
        offset: u64,
        bufs: Vec<T>,
    ) -> (io::Result<u32>, Vec<T>) {
        let (result, bufs) = run_back(engine, read_op(offset, bufs));
        (result, back(bufs))
    }

    #[test]
    fn both_engines_round_trip_multiple_iovecs() {
        for cache in [CacheMode::Writeback, CacheMode::DontCache] {
            for kind in KINDS {
                let dir = TempDir::new();
                let img = image(&dir.join("rt.img"), cache, 1 << 20);
                let mut engine = new_engine(kind, img, 16).unwrap();
                assert_eq!(engine.kind(), kind);
                let mut src = vec![vec![0u8; 512], vec![0u8; 4096], vec![0u8; 1536]];
                for (i, b) in src.iter_mut().enumerate() {
                    fill_pattern(b, i as u8 + 1);
                }
                let (n, wbufs) = run_back(&mut *engine, write_op(8192, src.clone()));
                assert_eq!(n.unwrap(), 6144);
                assert!(back::<Vec<u8>>(wbufs) == src, "a write leaves its buffers");
                assert_eq!(run(&mut *engine, Op::Flush).unwrap(), 0);
                // Read back with a different split.
                let dst = vec![vec![0u8; 1000], vec![0u8; 5144]];
                let (n, dst) = read(&mut *engine, 8192, dst);
                assert_eq!(n.unwrap(), 6144);
                assert!(src.concat() == dst.concat(), "{kind} {cache}");
                assert_eq!(engine.in_flight(), 0);
            }
        }
    }

    #[test]
    fn both_engines_hand_the_same_iovec_storage_back() {
        for kind in KINDS {
            let dir = TempDir::new();
            let img = image(&dir.join("own.img"), CacheMode::Writeback, 1 << 20);
            let mut engine = new_engine(kind, img, 4).unwrap();
            let bufs = owned(vec![vec![0u8; 4096]]);
            let storage = bufs.iovecs().as_ptr();
            let guard = Arc::clone(bufs.guard().unwrap());
            engine.submit(Op::Read { offset: 0, bufs }, 3).unwrap();
            engine.commit().unwrap();
            assert!(
                Arc::strong_count(&guard) >= 2,
                "{kind}: the engine holds the guard"
            );
            let c = reap_n(&mut *engine, 1).remove(0);
            assert_eq!(c.result.unwrap(), 4096);
            let (iovecs, g) = c.bufs.unwrap().into_parts();
            assert_eq!(iovecs.as_ptr(), storage, "{kind}: moved, not copied");
            assert!(Arc::ptr_eq(&g.unwrap(), &guard));
            assert_eq!(
                Arc::strong_count(&guard),
                1,
                "{kind}: the engine keeps no copy"
            );
            let c = {
                engine.submit(Op::Flush, 4).unwrap();
                engine.commit().unwrap();
                reap_n(&mut *engine, 1).remove(0)
            };
            assert!(c.bufs.is_none(), "{kind}: a flush has no buffers");
        }
    }

    #[test]
    fn large_buffered_reads_sent_to_workers_return_the_data() {
        // 1 MiB: past ASYNC_READ_MIN, so io_uring hands it to io-wq instead of trying inline.
        let dir = TempDir::new();
        let img = image(&dir.join("big.img"), CacheMode::Writeback, 4 << 20);
        let mut engine = new_engine(EngineKind::IoUring, img, 4).unwrap();
        let mut src = vec![0u8; 1 << 20];
        fill_pattern(&mut src, 9);
        assert_eq!(
            run(&mut *engine, write_op(1 << 20, vec![src.clone()])).unwrap(),
            1 << 20
        );
        let (n, dst) = read(
            &mut *engine,
            1 << 20,
            vec![vec![0u8; 512 << 10], vec![0u8; 512 << 10]],
        );
        assert_eq!(n.unwrap(), 1 << 20);
        assert!(
            dst.concat() == src,
            "the worker's read returns what was written"
        );
    }

    #[test]
    fn both_engines_report_finished_requests_without_a_wakeup() {
        for kind in KINDS {
            let dir = TempDir::new();
            let img = image(&dir.join("poll.img"), CacheMode::Writeback, 1 << 20);
            let mut engine = new_engine(kind, img, 4).unwrap();
            assert!(!engine.has_completions(), "{kind:?}: nothing submitted yet");
            engine.submit(read_op(0, vec![vec![0u8; 4096]]), 7).unwrap();
            engine.commit().unwrap();
            // What a polling queue thread does: spin on the rings, never on the eventfd.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !engine.has_completions() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{kind:?}: never finished"
                );
                std::hint::spin_loop();
            }
            let mut seen = Vec::new();
            engine.reap(&mut |c| seen.push(c.user_data)).unwrap();
            assert_eq!(seen, [7], "{kind:?}");
            assert!(!engine.has_completions(), "{kind:?}: reaped, nothing left");
        }
    }

    /// Whether `fd` is readable within `timeout_ms` (0: now, without waiting).
    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives across the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        assert!(ret >= 0, "poll: {}", io::Error::last_os_error());
        ret > 0
    }

    #[test]
    fn requests_finished_at_submission_leave_the_completion_fd_alone() {
        // A buffered write (both engines run it on the submitting thread) and a write to a null
        // image are finished before `commit` returns: the submitter reaps them at once, and an
        // eventfd write and read for each would be two system calls per request for nothing.
        let dir = TempDir::new();
        let file = image(&dir.join("inline.img"), CacheMode::Writeback, 1 << 20);
        let null = Arc::new(Image::open(&ImageOptions::new("null:1M")).unwrap());
        for kind in KINDS {
            for img in [&file, &null] {
                let mut engine = new_engine(kind, Arc::clone(img), 4).unwrap();
                engine
                    .submit(write_op(4096, vec![vec![0x5au8; 4096]]), 3)
                    .unwrap();
                engine.commit().unwrap();
                assert!(engine.has_completions(), "{kind:?}: finished at submission");
                assert!(
                    !readable(engine.completion_fd(), 0),
                    "{kind:?} on {}: completion fd signalled for a request reaped at once",
                    img.path().display()
                );
                let mut seen = Vec::new();
                engine
                    .reap(&mut |c| seen.push((c.user_data, c.result.unwrap())))
                    .unwrap();
                assert_eq!(seen, [(3, 4096)], "{kind:?}");
                assert_eq!(engine.in_flight(), 0);
            }
        }
        // The data is there.
        let mut engine = new_engine(EngineKind::IoUring, file, 4).unwrap();
        let (result, got) = read(&mut *engine, 4096, vec![vec![0u8; 4096]]);
        assert_eq!(result.unwrap(), 4096);
        assert!(got[0].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn both_engines_do_direct_io_with_aligned_buffers() {
        for kind in KINDS {
            let dir = TempDir::new();
            let img = image(&dir.join("direct.img"), CacheMode::None, 1 << 20);
            let mut engine = new_engine(kind, Arc::clone(&img), 16).unwrap();
            let mut a = AlignedBuf::new(4096);
            let mut b = AlignedBuf::new(8192);
            fill_pattern(a.as_mut(), 1);
            fill_pattern(b.as_mut(), 2);
            let (n, wbufs) = run_back(&mut *engine, write_op(65536, vec![a, b]));
            assert_eq!(n.unwrap(), 12288);
            let src: Vec<AlignedBuf> = back(wbufs);
            let (n, c) = read(&mut *engine, 65536, vec![AlignedBuf::new(12288)]);
            assert_eq!(n.unwrap(), 12288);
            assert!(c[0].as_ref()[..4096] == *src[0].as_ref());
            assert!(c[0].as_ref()[4096..] == *src[1].as_ref());
            // O_DIRECT kept it out of the page cache.
            assert_eq!(img.resident_bytes_in(65536, 12288).unwrap(), 0, "{kind}");
            // Unaligned buffers still work, through the buffered descriptor.
            let mut odd = vec![0u8; 4097];
            let iov = vec![libc::iovec {
                iov_base: odd[1..].as_mut_ptr().cast(),
                iov_len: 4096,
            }];
            // SAFETY: the iovec lies inside `odd`'s heap bytes, which the guard owns.
            let bufs = unsafe { IoBuffers::new(iov, Some(Arc::new(vec![odd]))) };
            let (n, odd) = run_back(
                &mut *engine,
                Op::Read {
                    offset: 65536,
                    bufs,
                },
            );
            assert_eq!(n.unwrap(), 4096);
            let odd: Vec<Vec<u8>> = back(odd);
            assert!(odd[0][1..] == *src[0].as_ref());
        }
    }

    #[test]
    fn reads_past_end_of_file_complete_with_zeroes() {
        for kind in KINDS {
            let dir = TempDir::new();
            let path = dir.join("short.img");
            std::fs::write(&path, [5u8; 3000]).unwrap();
            let img = image(&path, CacheMode::Writeback, 3000);
            let mut engine = new_engine(kind, img, 4).unwrap();
            let (n, bufs) = read(&mut *engine, 0, vec![vec![1u8; 2048], vec![1u8; 2048]]);
            assert_eq!(n.unwrap(), 4096);
            let all = bufs.concat();
            assert!(all[..3000].iter().all(|&b| b == 5), "{kind}");
            assert!(all[3000..].iter().all(|&b| b == 0), "{kind}");
        }
    }

    #[test]
    fn discard_and_write_zeroes_through_the_engines() {
        for kind in KINDS {
            let dir = TempDir::new();
            let path = dir.join("dz.img");
            let img = image(&path, CacheMode::Writeback, 4 << 20);
            let mut engine = new_engine(kind, img, 8).unwrap();
            let mut data = vec![0u8; 2 << 20];
            fill_pattern(&mut data, 4);
            run(&mut *engine, write_op(0, vec![data.clone()])).unwrap();
            run(&mut *engine, Op::Flush).unwrap();
            let before = std::fs::metadata(&path).unwrap().blocks();
            let discard = Op::Discard {
                offset: 0,
                len: 1 << 20,
            };
            assert_eq!(run(&mut *engine, discard).unwrap(), 0);
            let after = std::fs::metadata(&path).unwrap().blocks();
            assert!(after <= before - 2048 + 64, "{kind}: {before} -> {after}");
            for unmap in [false, true] {
                let wz = Op::WriteZeroes {
                    offset: (1 << 20) + 512,
                    len: 4096,
                    unmap,
                };
                assert_eq!(run(&mut *engine, wz).unwrap(), 0);
            }
            let (n, back) = read(&mut *engine, 0, vec![vec![9u8; 2 << 20]]);
            n.unwrap();
            let back = &back[0];
            let z = (1 << 20) + 512;
            assert!(back[..1 << 20].iter().all(|&b| b == 0), "{kind}");
            assert!(back[1 << 20..z] == data[1 << 20..z], "{kind}");
            assert!(back[z..z + 4096].iter().all(|&b| b == 0), "{kind}");
            assert!(back[z + 4096..] == data[z + 4096..], "{kind}");
        }
    }

    #[test]
    fn read_only_image_fails_writes_per_request_and_keeps_serving() {
        for kind in KINDS {
            let dir = TempDir::new();
            let path = dir.join("ro.img");
            std::fs::write(&path, [6u8; 8192]).unwrap();
            let img = Arc::new(
                Image::open(&ImageOptions {
                    read_only: true,
                    ..ImageOptions::new(&path)
                })
                .unwrap(),
            );
            let mut engine = new_engine(kind, img, 8).unwrap();
            engine.submit(write_op(0, vec![vec![1u8; 512]]), 1).unwrap();
            engine
                .submit(read_op(512, vec![vec![0u8; 512]]), 2)
                .unwrap();
            let discard = Op::Discard {
                offset: 0,
                len: 512,
            };
            engine.submit(discard, 3).unwrap();
            engine.commit().unwrap();
            let mut done = reap_n(&mut *engine, 3);
            done.sort_by_key(|c| c.user_data);
            let errno = |c: &Completion| c.result.as_ref().unwrap_err().raw_os_error();
            assert_eq!(errno(&done[0]), Some(libc::EBADF), "{kind}");
            assert_eq!(done[1].result.as_ref().unwrap(), &512, "{kind}");
            assert_eq!(errno(&done[2]), Some(libc::EBADF), "{kind}");
            let failed: Vec<Vec<u8>> = back(done[0].bufs.take());
            assert!(
                failed[0].iter().all(|&b| b == 1),
                "a failed write's buffers"
            );
            let r: Vec<Vec<u8>> = back(done[1].bufs.take());
            assert!(r[0].iter().all(|&b| b == 6));
            // And the next request is served as usual.
            let (n, _) = read(&mut *engine, 0, r);
            assert_eq!(n.unwrap(), 512);
            assert_eq!(engine.in_flight(), 0);
        }
    }

    #[test]
    fn null_image_completes_everything_at_once() {
        for kind in KINDS {
            let img = Arc::new(Image::open(&ImageOptions::new("null:1G")).unwrap());
            let mut engine = new_engine(kind, img, 4).unwrap();
            let (n, bufs) = read(&mut *engine, 0, vec![vec![7u8; 4096], vec![7u8; 512]]);
            assert_eq!(n.unwrap(), 4608);
            assert!(bufs.concat().iter().all(|&b| b == 7), "reads leave buffers");
            assert_eq!(run(&mut *engine, write_op(1 << 29, bufs)).unwrap(), 4608);
            assert_eq!(run(&mut *engine, Op::Flush).unwrap(), 0);
            let discard = Op::Discard {
                offset: 0,
                len: 1 << 20,
            };
            assert_eq!(run(&mut *engine, discard).unwrap(), 0);
        }
    }

    #[test]
    fn more_requests_than_the_ring_holds_are_all_completed() {
        let dir = TempDir::new();
        let img = image(&dir.join("deep.img"), CacheMode::Writeback, 1 << 20);
        let mut engine = UringEngine::new(img, 4).unwrap();
        let n = 100;
        for i in 0..n {
            let op = write_op(i as u64 * 512, vec![vec![i as u8; 512]]);
            engine.submit(op, i as u64).unwrap();
        }
        engine.commit().unwrap();
        assert_eq!(engine.in_flight(), n);
        let mut done = reap_n(&mut engine, n);
        done.sort_by_key(|c| c.user_data);
        for (i, c) in done.into_iter().enumerate() {
            assert_eq!(c.user_data, i as u64);
            assert_eq!(c.result.as_ref().unwrap(), &512);
            let data: Vec<Vec<u8>> = back(c.bufs);
            assert!(
                data[0].iter().all(|&b| b == i as u8),
                "each gets its own back"
            );
        }
        let (len, back) = read(&mut engine, 0, vec![vec![0u8; n * 512]]);
        assert_eq!(len.unwrap(), (n * 512) as u32);
        for (i, chunk) in back[0].chunks(512).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn dropping_the_ring_waits_for_in_flight_requests_before_their_guards() {
        let dir = TempDir::new();
        let img = image(&dir.join("drop.img"), CacheMode::Writeback, 1 << 20);
        let mut engine = UringEngine::new(img, 8).unwrap();
        let bufs = owned(vec![vec![0u8; 65536]]);
        let guard = Arc::downgrade(bufs.guard().unwrap());
        engine
            .submit(read_op(0, vec![vec![0u8; 65536]]), 2)
            .unwrap();
        engine.submit(Op::Read { offset: 0, bufs }, 1).unwrap();
        engine.commit().unwrap();
        assert!(guard.upgrade().is_some(), "the engine keeps the buffers");
        drop(engine);
        assert!(
            guard.upgrade().is_none(),
            "released once the kernel is done"
        );
    }

    #[test]
    fn sync_engine_counts_a_request_in_flight_until_reaped() {
        let img = Arc::new(Image::open(&ImageOptions::new("null:1M")).unwrap());
        let mut engine = SyncEngine::new(img, 4).unwrap();
        engine.submit(Op::Flush, 7).unwrap();
        assert_eq!(engine.in_flight(), 1);
        assert!(engine.has_completions());
        let done = reap_n(&mut engine, 1);
        assert_eq!(done[0].user_data, 7);
        assert_eq!(engine.in_flight(), 0);
    }

    #[test]
    fn dontcache_writes_through_io_uring_leave_little_cached() {
        let dir = TempDir::new();
        let img = image(&dir.join("dc.img"), CacheMode::DontCache, 8 << 20);
        if !img.dontcache_active() {
            eprintln!("skipped: no RWF_DONTCACHE here");
            return;
        }
        let mut engine = UringEngine::new(Arc::clone(&img), 8).unwrap();
        let mut data = vec![0u8; 4 << 20];
        fill_pattern(&mut data, 12);
        run(&mut engine, write_op(0, vec![data])).unwrap();
        img.writeback_and_evict(0, 0).unwrap();
        assert!(img.resident_bytes().unwrap() <= 64 << 10);
    }

    /// Shared memory as a VMM gives its guest's: a memfd mapped shared, unmapped on drop.
    struct GuestRam {
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is plain memory, owned by the value and unmapped only on drop.
    unsafe impl Send for GuestRam {}
    // SAFETY: as above; `&GuestRam` hands out only the address.
    unsafe impl Sync for GuestRam {}

    impl GuestRam {
        fn new(len: usize) -> Arc<GuestRam> {
            Self::with_prot(len, libc::PROT_READ | libc::PROT_WRITE)
        }

        fn with_prot(len: usize, prot: i32) -> Arc<GuestRam> {
            // SAFETY: a name and flags; the descriptor is checked.
            let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create");
            // SAFETY: our own descriptor.
            assert_eq!(unsafe { libc::ftruncate(fd, len as i64) }, 0);
            // SAFETY: a new shared mapping of the memfd, checked below.
            let ptr =
                unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap");
            // SAFETY: the mapping keeps the memfd alive; the descriptor is ours to close.
            unsafe { libc::close(fd) };
            Arc::new(GuestRam {
                ptr: ptr.cast(),
                len,
            })
        }

        /// The whole mapping as one region.
        fn region(&self) -> libc::iovec {
            self.range(0, self.len)
        }

        fn range(&self, at: usize, len: usize) -> libc::iovec {
            assert!(at + len <= self.len);
            libc::iovec {
                // SAFETY: inside the mapping, as just checked.
                iov_base: unsafe { self.ptr.add(at) }.cast(),
                iov_len: len,
            }
        }

        /// Buffers at `at` (one iovec per length, back to back), kept mapped by this memory.
        fn bufs(self: &Arc<Self>, at: usize, lens: &[usize]) -> IoBuffers {
            let mut next = at;
            let iov = lens
                .iter()
                .map(|&len| {
                    let v = self.range(next, len);
                    next += len;
                    v
                })
                .collect();
            let guard: MemoryGuard = Arc::clone(self) as MemoryGuard;
            // SAFETY: each iovec lies in the mapping, which the guard keeps until dropped.
            unsafe { IoBuffers::new(iov, Some(guard)) }
        }

        fn bytes(&self, at: usize, len: usize) -> Vec<u8> {
            let v = self.range(at, len);
            // SAFETY: inside the mapping; no request is in flight over it when tests look.
            unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), len) }.to_vec()
        }

        fn fill(&self, at: usize, data: &[u8]) {
            let v = self.range(at, data.len());
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), v.iov_base.cast(), data.len()) };
        }
    }

    impl Drop for GuestRam {
        fn drop(&mut self) {
            // SAFETY: our mapping, which nothing uses any more (the last guard is going).
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn guard_of(ram: &Arc<GuestRam>) -> MemoryGuard {
        Arc::clone(ram) as MemoryGuard
    }

    fn fixed_engine(img: Arc<Image>) -> UringEngine {
        let options = EngineOptions {
            fixed_buffers: true,
            ..EngineOptions::default()
        };
        UringEngine::with_options(img, 16, options).unwrap()
    }

    /// Submit `op` as `user_data` and hand it to the kernel, without waiting for it.
    fn submit_now(engine: &mut UringEngine, op: Op, user_data: u64) {
        engine.submit(op, user_data).unwrap();
        engine.commit().unwrap();
    }

    /// Submit `op` and wait for its completion.
    fn complete(engine: &mut UringEngine, op: Op) -> Completion {
        submit_now(engine, op, 9);
        reap_n(engine, 1).remove(0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        let mut v = vec![0u8; len];
        fill_pattern(&mut v, seed);
        v
    }

    #[test]
    fn guest_memory_is_cut_into_pieces_the_kernel_registers() {
        let gib = 1usize << 30;
        let at = |base: usize, len: usize| libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        };
        let spans = spans_of(&[at(16 * gib, 4096), at(gib, 2 * gib + 8192)]).unwrap();
        let expect = |start: usize, end: usize| Span { start, end };
        assert_eq!(
            spans,
            [
                expect(gib, 2 * gib),
                expect(2 * gib, 3 * gib),
                expect(3 * gib, 3 * gib + 8192),
                expect(16 * gib, 16 * gib + 4096),
            ],
            "sorted by address, at most 1 GiB each"
        );
        let fixed = FixedBuffers {
            halves: [
                FixedHalf::default(),
                FixedHalf {
                    spans,
                    ..FixedHalf::default()
                },
            ],
            cur: 1,
            ..FixedBuffers::default()
        };
        let base = FIXED_HALF as u16;
        assert_eq!(fixed.lookup(gib, 4096), Some((base, 1)));
        assert_eq!(fixed.lookup(3 * gib - 4096, 4096), Some((base + 1, 1)));
        assert_eq!(
            fixed.lookup(16 * gib + 4096 - 512, 512),
            Some((base + 3, 1))
        );
        assert_eq!(fixed.lookup(2 * gib - 512, 1024), None, "across two pieces");
        assert_eq!(
            fixed.lookup(16 * gib + 4096 - 512, 1024),
            None,
            "past the end"
        );
        assert_eq!(fixed.lookup(gib - 512, 512), None, "below memory");
        assert_eq!(fixed.lookup(4 * gib, 512), None, "in a hole");
        assert_eq!(fixed.lookup(usize::MAX - 10, 512), None, "wrapping");
        assert_eq!(fixed.lookup(gib, 0), None, "nothing to move");
        let many: Vec<libc::iovec> = (0..=FIXED_HALF as usize)
            .map(|i| at(i * gib, 4096))
            .collect();
        assert!(
            spans_of(&many).is_none(),
            "more than a half of the table holds"
        );
    }

    /// With fixed buffers, one-segment reads and writes inside registered memory go through
    /// `READ_FIXED`/`WRITE_FIXED` and move the right data; what is not one segment inside it
    /// goes as before, and gets its data right too.
    #[test]
    fn fixed_buffers_carry_direct_reads_and_writes_inside_guest_memory() {
        let dir = TempDir::new();
        let img = image(&dir.join("fixed.img"), CacheMode::None, 4 << 20);
        let mut engine = fixed_engine(Arc::clone(&img));
        let ram = GuestRam::new(1 << 20);
        // Two regions, back to back in one mapping: a buffer across them is in no one buffer.
        let regions = [ram.range(0, 512 << 10), ram.range(512 << 10, 512 << 10)];
        engine.set_memory(&regions, &guard_of(&ram));
        let data = pattern(64 << 10, 3);
        ram.fill(0, &data);
        let w = complete(
            &mut engine,
            Op::Write {
                offset: 1 << 20,
                bufs: ram.bufs(0, &[64 << 10]),
            },
        );
        assert_eq!(w.result.unwrap(), 64 << 10);
        assert!(
            w.fixed_buffers,
            "a one-segment write in guest memory is WRITE_FIXED"
        );
        let r = complete(
            &mut engine,
            Op::Read {
                offset: 1 << 20,
                bufs: ram.bufs(128 << 10, &[64 << 10]),
            },
        );
        assert_eq!(r.result.unwrap(), 64 << 10);
        assert!(
            r.fixed_buffers,
            "a one-segment read in guest memory is READ_FIXED"
        );
        assert!(
            ram.bytes(128 << 10, 64 << 10) == data,
            "READ_FIXED read what was written"
        );
        assert_eq!(
            img.resident_bytes_in(1 << 20, 64 << 10).unwrap(),
            0,
            "still O_DIRECT"
        );

        // Two segments: READV.
        let r = complete(
            &mut engine,
            Op::Read {
                offset: 1 << 20,
                bufs: ram.bufs(256 << 10, &[4096, 60 << 10]),
            },
        );
        assert_eq!(r.result.unwrap(), 64 << 10);
        assert!(!r.fixed_buffers, "two segments go as READV");
        assert!(ram.bytes(256 << 10, 64 << 10) == data);
        // Across the two regions: READV.
        let r = complete(
            &mut engine,
            Op::Read {
                offset: 1 << 20,
                bufs: ram.bufs((512 << 10) - 4096, &[8192]),
            },
        );
        assert_eq!(r.result.unwrap(), 8192);
        assert!(
            !r.fixed_buffers,
            "a buffer across two registered buffers goes as READV"
        );
        assert!(ram.bytes((512 << 10) - 4096, 8192) == data[..8192]);
        // Outside guest memory: READV.
        let (n, bufs) = read(&mut engine, 1 << 20, vec![AlignedBuf::new(4096)]);
        assert_eq!(n.unwrap(), 4096);
        assert!(bufs[0].as_ref() == &data[..4096]);
        assert_eq!(engine.fixed_in_flight(), Some([0, 0]));
    }

    /// A memory-table change while a fixed read is in flight: the new memory is registered in
    /// the other half of the table at once, the read in flight completes with its data, the
    /// next requests use the new memory's buffers, and the old half is released (its guard
    /// dropped) once its read is reaped. With both halves busy, the next change waits.
    #[test]
    fn fixed_buffers_follow_memory_changes_with_requests_in_flight() {
        let dir = TempDir::new();
        let img = image(&dir.join("change.img"), CacheMode::None, 4 << 20);
        let mut engine = fixed_engine(Arc::clone(&img));
        let data = pattern(1 << 20, 5);
        let src = GuestRam::new(1 << 20);
        src.fill(0, &data);
        engine.set_memory(&[src.region()], &guard_of(&src));
        assert!(
            complete(
                &mut engine,
                Op::Write {
                    offset: 0,
                    bufs: src.bufs(0, &[1 << 20])
                }
            )
            .fixed_buffers
        );

        let old = GuestRam::new(1 << 20);
        engine.set_memory(&[old.region()], &guard_of(&old));
        drop(src);
        let old_weak = Arc::downgrade(&old);
        submit_now(
            &mut engine,
            Op::Read {
                offset: 0,
                bufs: old.bufs(0, &[1 << 20]),
            },
            1,
        );
        assert_eq!(
            engine.fixed_in_flight(),
            Some([1, 0]),
            "over the old memory's half"
        );

        let new = GuestRam::new(1 << 20);
        engine.set_memory(&[new.region()], &guard_of(&new));
        drop(old);
        assert!(
            old_weak.upgrade().is_some(),
            "the old memory stays while its read is in flight"
        );
        submit_now(
            &mut engine,
            Op::Read {
                offset: 0,
                bufs: new.bufs(4096, &[8192]),
            },
            2,
        );
        assert_eq!(
            engine.fixed_in_flight(),
            Some([1, 1]),
            "the new memory's half"
        );

        // Both halves busy: a third map waits, and its requests go unregistered meanwhile.
        let third = GuestRam::new(64 << 10);
        engine.set_memory(&[third.region()], &guard_of(&third));
        submit_now(
            &mut engine,
            Op::Read {
                offset: 0,
                bufs: third.bufs(0, &[4096]),
            },
            3,
        );
        assert_eq!(
            engine.fixed_in_flight(),
            Some([1, 1]),
            "third goes unregistered"
        );

        let mut done = reap_n(&mut engine, 3);
        done.sort_by_key(|c| c.user_data);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        assert_eq!(
            done.iter().map(|c| c.fixed_buffers).collect::<Vec<_>>(),
            [true, true, false]
        );
        drop(done);
        assert!(
            old_weak.upgrade().is_none(),
            "the old memory's half let its guard go"
        );
        assert!(
            new.bytes(4096, 8192) == data[..8192],
            "the new memory's read"
        );
        assert!(
            third.bytes(0, 4096) == data[..4096],
            "the unregistered read"
        );
        // The third map is registered now that a half was free.
        let c = complete(
            &mut engine,
            Op::Read {
                offset: 8192,
                bufs: third.bufs(8192, &[4096]),
            },
        );
        assert!(
            c.fixed_buffers,
            "the third map registered once a half was free"
        );
        assert!(third.bytes(8192, 4096) == data[8192..12288]);
        let c = complete(
            &mut engine,
            Op::Read {
                offset: 0,
                bufs: new.bufs(0, &[4096]),
            },
        );
        assert!(!c.fixed_buffers, "the replaced map's buffers are gone");
        assert!(new.bytes(0, 4096) == data[..4096]);
    }

    /// Memory the kernel will not pin (here, mapped without access) makes the registration
    /// fail: reads and writes go unregistered, and keep working.
    #[test]
    fn a_refused_registration_leaves_requests_unregistered() {
        let dir = TempDir::new();
        let img = image(&dir.join("refused.img"), CacheMode::None, 1 << 20);
        let mut engine = fixed_engine(Arc::clone(&img));
        let ram = GuestRam::new(1 << 20);
        let locked = GuestRam::with_prot(1 << 20, libc::PROT_NONE);
        let guard: MemoryGuard = Arc::new((Arc::clone(&ram), Arc::clone(&locked)));
        engine.set_memory(&[ram.region(), locked.region()], &guard);
        let data = pattern(8192, 7);
        ram.fill(0, &data);
        let w = complete(
            &mut engine,
            Op::Write {
                offset: 0,
                bufs: ram.bufs(0, &[8192]),
            },
        );
        assert_eq!(w.result.unwrap(), 8192);
        assert!(!w.fixed_buffers, "nothing registered");
        let r = complete(
            &mut engine,
            Op::Read {
                offset: 0,
                bufs: ram.bufs(65536, &[8192]),
            },
        );
        assert_eq!(r.result.unwrap(), 8192);
        assert!(ram.bytes(65536, 8192) == data);
        // A map the kernel takes registers.
        engine.set_memory(&[ram.region()], &guard_of(&ram));
        let r = complete(
            &mut engine,
            Op::Read {
                offset: 0,
                bufs: ram.bufs(131072, &[8192]),
            },
        );
        assert!(r.fixed_buffers, "registered once the memory can be pinned");
        assert!(ram.bytes(131072, 8192) == data);
    }

    /// With fixed buffers the ring takes `READ_FIXED` and buffer-table updates, and still
    /// refuses every other registration; the kernel itself refuses a fixed read outside the
    /// buffer it names.
    #[test]
    fn fixed_buffers_widen_the_restrictions_by_their_opcodes_only() {
        let dir = TempDir::new();
        let img = image(&dir.join("rf.img"), CacheMode::Writeback, 1 << 20);
        let mut engine = fixed_engine(Arc::clone(&img));
        let ram = GuestRam::new(64 << 10);
        engine.set_memory(&[ram.range(0, 32 << 10)], &guard_of(&ram));
        let at = |off: usize| ram.range(off, 0).iov_base.cast::<u8>();
        let inside =
            opcode::ReadFixed::new(types::Fixed(0), at(0), 4096, FIXED_HALF as u16).build();
        assert_eq!(
            raw(&mut engine, inside),
            4096,
            "READ_FIXED inside the buffer"
        );
        let outside =
            opcode::ReadFixed::new(types::Fixed(0), at(32 << 10), 4096, FIXED_HALF as u16).build();
        assert_eq!(
            raw(&mut engine, outside),
            -libc::EFAULT,
            "past the buffer's end"
        );
        let other = std::fs::File::open(dir.join("rf.img")).unwrap();
        assert!(
            engine
                .ring
                .submitter()
                .register_files_update(0, &[other.as_raw_fd()])
                .is_err(),
            "no other registration after set-up"
        );
    }
}
