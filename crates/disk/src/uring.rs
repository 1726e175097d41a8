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
//! `ZERO_RANGE`. What is quick runs at submission on the queue thread and waits in a ready list:
//! requests with more iovecs than one call takes, null-image requests, injected faults, and
//! buffered writes (`writeback`, `dontcache`). A buffered write is a copy into the page cache,
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
    iov, Completion, Engine, EngineKind, Error, Image, IoBuffers, Op, Result, SubmitError,
    RWF_DONTCACHE,
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
}

impl Slot {
    const EMPTY: Slot = Slot {
        user_data: 0,
        op: Op::Flush,
        len: 0,
        flags: 0,
    };

    /// The slot of an operation without data.
    fn new(user_data: u64, op: Op) -> Slot {
        Slot {
            user_data,
            op,
            len: 0,
            flags: 0,
        }
    }
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
}

impl UringEngine {
    /// A ring of at least `queue_depth` entries over `image`.
    pub fn new(image: Arc<Image>, queue_depth: u32) -> Result<Self> {
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
        if disabled {
            restrict(&ring, fixed)?;
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
        })
    }

    /// Complete a request now, handing its buffers back; [`Engine::reap`] reports it.
    fn complete_now(&mut self, user_data: u64, result: io::Result<u32>, bufs: Option<IoBuffers>) {
        if self.ready.is_empty() {
            // Make the completion fd readable for this completion; a failing write only delays
            // the report until the next reap.
            let _ = self.eventfd.write(1);
        }
        self.ready.push_back(Completion {
            user_data,
            result,
            bufs,
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
                let bufs = self.release_slot(idx).op.into_buffers();
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
        } = self.release_slot(idx as u32);
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

/// Seccomp cannot see the operations an io_uring runs, so the ring itself is told what it may
/// run (`IORING_REGISTER_RESTRICTIONS`): the engine's opcodes, only on the image's fixed file
/// when it is registered, with no SQE flag but `IOSQE_ASYNC`, and no registration once enabled.
/// Code that got hold of the ring could not open, read or send anything else through it.
fn restrict(ring: &IoUring, fixed: bool) -> Result<()> {
    let mut allowed = squeue::Flags::ASYNC;
    if fixed {
        allowed |= squeue::Flags::FIXED_FILE;
    }
    let mut rules: Vec<Restriction> = OPCODES.iter().map(|&op| Restriction::sqe_op(op)).collect();
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
                let entry = if buffered_write {
                    on_image!(self, |fd| opcode::Writev::new(fd, iovecs, iovcnt)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                        .flags(squeue::Flags::ASYNC))
                } else if write {
                    on_image!(self, |fd| opcode::Writev::new(fd, iovecs, iovcnt)
                        .offset(offset)
                        .rw_flags(flags)
                        .build())
                } else {
                    let entry = on_image!(self, |fd| opcode::Readv::new(fd, iovecs, iovcnt)
                        .offset(offset)
                        .rw_flags(flags)
                        .build());
                    if !self.image.is_direct() && len >= ASYNC_READ_MIN {
                        entry.flags(squeue::Flags::ASYNC)
                    } else {
                        entry
                    }
                };
                let slot = Slot {
                    user_data,
                    op,
                    len,
                    flags,
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
        // Clear first: the kernel signals the eventfd after posting each CQE, and we push to
        // `ready` only while holding `&mut self`, so nothing posted after this read is missed.
        let _ = self.eventfd.read();
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

    /// Wait for the completion fd, then reap until `n` completions arrived.
    fn reap_n(engine: &mut dyn Engine, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        while out.len() < n {
            let mut pfd = libc::pollfd {
                fd: engine.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd that lives across the call.
            let ret = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert!(ret > 0, "no completion within 5 s");
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
    fn sync_engine_signals_its_eventfd() {
        let img = Arc::new(Image::open(&ImageOptions::new("null:1M")).unwrap());
        let mut engine = SyncEngine::new(img, 4).unwrap();
        engine.submit(Op::Flush, 7).unwrap();
        assert_eq!(engine.in_flight(), 1);
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
}
