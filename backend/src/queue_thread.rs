//! The fast path of one queue thread, top to bottom: kick → pop → parse → submit → complete →
//! signal.
//!
//! `vhost-user-backend` runs one epoll worker thread per entry of `queues_per_thread()`; each
//! worker owns one [`QueueThread`]: the I/O engine (one io_uring per thread), and for each of its
//! virtqueues a table of request slots indexed by descriptor head, preallocated at connection time
//! so that no request allocates. A kick pops every available chain, parses it into a validated
//! [`Request`], and submits its data as iovecs that point straight into guest memory; the engine
//! owns them, with a guard that keeps that memory mapped, until it hands them back at completion
//! (the slot's iovec storage moves into the engine and back, never copied). The engine's
//! completion eventfd is registered in the same epoll loop; a plain completion writes the status
//! byte and adds the used entry (the completion step, `complete.rs`), and the guest is signalled
//! once per pass (EVENT_IDX honoured). A completion that must sleep — a `dontcache` write waiting
//! for eviction, a flush, a writethrough write, an I/O error to report, the page-cache budget
//! exceeded — leaves for the deferred path (`deferred_path.rs`) instead, so that the queue thread
//! never sleeps and one pass of the deferred worker serves a whole batch.
//!
//! With I/O limits set (`limits.rs`), a parsed read, write, discard or write-zeroes takes its
//! tokens before it is submitted; one that finds none waits, with its slot ready to submit, in
//! its queue's FIFO, and the thread's timerfd wakes it when tokens are due. Without limits that
//! is one relaxed load and a branch per request.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use completion::DeferredCompletions;
use disk::{CacheMode, Completion, Engine, IoBuffers, MemoryGuard, Op};
use log::{debug, error, warn};
use throttle::{Dir, Io};
use vhost_user_backend::VringT;
use virtio_blk::{
    status_of_long_chain, write_device_id, write_status, DiscardRange, Request, RequestBuffers,
    RequestType, SECTOR_SHIFT, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    Permissions,
};

use crate::complete::{complete, count_done, signal_if_needed, Done};
use crate::deferred_path::{defer_at_submission, needs_deferred_path, needs_sync, DeferredPath};
use crate::dirty_log::mark_host_range;
use crate::guest_warnings::GuestWarnings;
use crate::limits::WakeTimer;
use crate::mem_view::{MemView, ViewChain};
use crate::shared::{DeviceShared, GuestMem, Vring};
use crate::stats::QueueStats;
use crate::used_order::{self, UsedOrder};

/// State of one request from submission to completion, indexed by its descriptor head.
struct Slot {
    /// Engine operations still outstanding; 0 means the slot is free.
    pending: u32,
    /// Status so far (`OK` until an operation fails).
    status: u8,
    request_type: RequestType,
    status_addr: GuestAddress,
    data_len: u32,
    /// Byte offset of the request on the image.
    offset: u64,
    /// Completes on the deferred path whatever its outcome (the static form).
    defer: bool,
    /// The guest's write cache was on (CONFIG_WCE) when the request was submitted.
    writeback_at_submission: bool,
    /// The iovec storage, preallocated to the most iovecs a request may need and never grown:
    /// empty while the slot is idle, lent to the engine (with a guard on the guest memory the
    /// iovecs point into) from submission until the engine hands it back at completion.
    bufs: IoBuffers,
    /// A discard's or write-zeroes' ranges, kept until it is submitted (it may wait for
    /// tokens); grows once, to the most ranges a request carries, on the slot's first one.
    ranges: Vec<DiscardRange>,
    /// Waiting for tokens since this instant (`CLOCK_MONOTONIC` ns): in the queue's FIFO, its
    /// iovecs ready in `bufs`.
    waiting_since: Option<u64>,
    /// Keeps the guest memory of the status byte mapped until completion.
    mem: Option<Arc<GuestMem>>,
}

/// Per-virtqueue state owned by its queue thread.
struct QueueContext {
    /// The queue's global index.
    index: usize,
    slots: Vec<Slot>,
    bufs: RequestBuffers,
    needs_signal: bool,
    /// The driver published an impossible available index; logged once.
    ring_broken: bool,
    /// Notifications (kicks) are off and must be turned back on before the thread sleeps.
    notify_off: bool,
    /// The order its used entries are published in, shared with the deferred worker.
    order: Arc<Mutex<UsedOrder>>,
    /// The budget of warnings the guest can trigger on this queue.
    warnings: GuestWarnings,
    /// This queue's handle on the device's I/O limits.
    throttle: throttle::Queue,
    /// Heads waiting for tokens, oldest first; preallocated to the queue size.
    waiting: VecDeque<u16>,
}

/// What became of a popped chain.
enum Started {
    /// Submitted to the engine; completes later.
    InFlight,
    /// Completed at once; add a used entry of this length.
    Done(u32),
    /// Not ours to complete (a head index already in flight): leave it alone.
    Ignored,
}

/// The longest a queue thread polls in one go, however busy its rings, before it goes back to
/// epoll for its other events.
const MAX_POLL: Duration = Duration::from_millis(1);

/// The first adaptive poll window, after a request that came soon after the last work found
/// the window at nothing; each such request multiplies it by [`POLL_GROWTH`], up to `--poll-us`.
const POLL_START: Duration = Duration::from_micros(4);

/// How much the adaptive window grows after each request it missed by a little.
const POLL_GROWTH: u32 = 4;

/// A wait for the driver longer than this (or than `--poll-us`, if longer) means the queue went
/// quiet: the window collapses to nothing. It is far longer than the window itself because the
/// wait is measured when the thread wakes, so it includes the thread's own wake-up, which on a
/// virtual CPU that halted while the thread slept takes tens of microseconds: a request that
/// came 15 µs after the last work often looks 60–120 µs late from the thread's side.
const QUIET: Duration = Duration::from_millis(1);

/// The longest hold (in kicks) on growing the window again after whole windows were polled
/// for nothing; it starts at one kick and doubles each time it happens again.
const MAX_HOLD: u32 = 256;

/// Requests handed to the engine between two submissions to the kernel within one pass over a
/// ring.
///
/// A driver that keeps many requests in flight hands them over in bursts (a whole batch of
/// completions answered at once), and submitted at the end of the pass they would reach the
/// host's disk as one burst too, after the thread has spent a few microseconds on each: the
/// disk idles meanwhile, and a queue's requests move through it in convoys. Submitting every
/// few requests lets the disk start on the first ones while the thread reads the next. Measured
/// with 4 KiB O_DIRECT random reads at iodepth 32 on 2 queues (docs/benchmarks.md, "Submitting
/// in pieces").
const COMMIT_EVERY: usize = 8;

/// Counts the requests handed to the engine since its last submission to the kernel.
#[derive(Debug, Default)]
struct Pending(usize);

impl Pending {
    /// A request went to the engine; returns whether to submit what it holds now.
    fn started(&mut self) -> bool {
        self.0 += 1;
        if self.0 < COMMIT_EVERY {
            return false;
        }
        self.0 = 0;
        true
    }
}

/// The adaptive poll window of one queue thread.
///
/// The thread measures how long it waited for the driver: from the last work it did with
/// nothing left at the engine to the next kick. A wait within the window needs no change; one
/// longer than the window but short of [`QUIET`] says polling longer may have caught it, so the
/// window grows (from [`POLL_START`], times [`POLL_GROWTH`], up to `max`); one longer than that
/// says the queue went quiet, and the window collapses to nothing, so an idle queue, or one
/// whose requests come far apart, spins for nothing at all.
///
/// Since the measured wait includes the thread's wake-up, it cannot tell a driver that takes
/// 60 µs from one that takes 15 µs and a wake-up of 45. The poll itself can: a session that
/// polled the whole `max` window and found nothing says the driver took longer than `max`. The
/// window then collapses and may not grow again for a number of kicks that doubles with every
/// such session in a row (up to [`MAX_HOLD`]), and falls back to one when a session serves
/// something: a driver that comes back after 100–900 µs costs a few wasted windows per hold,
/// not a window per request.
#[derive(Debug, Default)]
struct PollWindow {
    /// The current window (zero: sleep at once).
    window: Duration,
    /// When the thread last went to sleep waiting for the driver, nothing being at the engine.
    idle_since: Option<Instant>,
    /// Kicks left before the window may grow again.
    hold: u32,
    /// The hold the next whole window polled for nothing sets (zero: one kick).
    backoff: u32,
    /// When the thread last went to sleep with requests at the device.
    device_since: Option<Instant>,
}

impl PollWindow {
    /// The thread goes back to epoll after work last done at `last_work`, with `in_engine`
    /// requests at the engine. With none, it now waits for the driver, since `last_work` or
    /// since it already did if no work came in between (an event that found nothing to do, such
    /// as the engine's eventfd left readable by a completion already reaped, does not restart
    /// the wait). With some, it waits for the device, which is not measured.
    fn went_idle(&mut self, in_engine: usize, last_work: Instant) {
        if in_engine == 0 {
            self.idle_since = Some(self.idle_since.unwrap_or(last_work));
            self.device_since = None;
        } else {
            self.idle_since = None;
            self.device_since = Some(last_work);
        }
    }

    /// Whether the engine just emptied after the thread slept on the device for longer than
    /// `max`, as a single slow request at iodepth 1 does: the driver waited as long, its CPU
    /// has likely gone idle, and its next request comes only after it wakes. Polling for it
    /// then spins through that wake-up and, on the development machine, lost to sleeping at
    /// once in every run (O_DIRECT random reads at iodepth 1: 10.2–13.4k IOPS against
    /// 12.8–15.4k without polling, at 40–60 against 32–38 µs of CPU per request).
    fn slept_on_device(&mut self, now: Instant, max: Duration) -> bool {
        self.device_since
            .take()
            .is_some_and(|since| now.saturating_duration_since(since) > max)
    }

    /// A kick woke the thread: adapt the window to how long it waited for the driver. Returns
    /// whether the window changed.
    fn on_kick(&mut self, now: Instant, max: Duration) -> bool {
        let Some(since) = self.idle_since.take() else {
            return false;
        };
        let waited = now.saturating_duration_since(since);
        let old = self.window;
        if waited <= self.window {
            // Arrived within the window after all (a kick that raced the end of the poll).
        } else if waited > max.max(QUIET) {
            self.window = Duration::ZERO;
        } else if self.hold > 0 {
            self.hold -= 1;
        } else if self.window < max {
            self.window = if self.window.is_zero() {
                POLL_START
            } else {
                self.window * POLL_GROWTH
            }
            .min(max);
        }
        self.window != old
    }

    /// A poll session of `window` ended: `found` whether it served anything, `expired` whether
    /// it ended because the window passed with nothing to do (not on the time limit, nor to
    /// sleep through requests at the device). Returns whether the window changed.
    fn session_ended(
        &mut self,
        window: Duration,
        max: Duration,
        found: bool,
        expired: bool,
    ) -> bool {
        if found {
            self.backoff = 0;
        }
        if found || !expired || window < max || self.window.is_zero() {
            return false;
        }
        // A whole window polled for nothing: the driver takes longer than `max`.
        self.window = Duration::ZERO;
        self.hold = self.backoff.max(1);
        self.backoff = (self.hold * 2).min(MAX_HOLD);
        true
    }
}

/// Bytes written under `writeback` since the last eviction, for `--page-cache-budget`.
#[derive(Default)]
struct Budget {
    written: u64,
    start: u64,
    end: u64,
}

/// The state of one fast-path worker thread: its engine, its queues and its deferred worker.
pub struct QueueThread {
    engine: Box<dyn Engine>,
    queues: Vec<QueueContext>,
    shared: Arc<DeviceShared>,
    deferred: Arc<DeferredCompletions<Done>>,
    deferred_path: Arc<DeferredPath>,
    budget: Budget,
    /// Requests of this thread's queues that the engine holds.
    in_engine: usize,
    /// Inside [`QueueThread::poll`]: leave kicks off.
    polling: bool,
    /// The adaptive poll window (unused with `--poll-fixed`).
    poll_window: PollWindow,
    /// Wakes the thread when requests waiting for tokens may go.
    timer: WakeTimer,
    /// The clock as the I/O limits read it, once per pass over a ring (`None`: not read yet).
    pass_now: Option<u64>,
    /// With `--fixed-buffers`: the memory map last handed to the engine (a `Weak`, so that its
    /// address is not reused by another map while compared with).
    registered: Weak<GuestMem>,
}

impl Drop for QueueThread {
    fn drop(&mut self) {
        // Complete whatever is still batched, then stop the worker thread.
        self.deferred.shutdown();
    }
}

impl QueueThread {
    /// A thread serving `queue_indices` (global indices, in the order `vhost-user-backend` hands
    /// this thread its vrings), with slots for `queue_size` heads per queue.
    pub fn new(
        engine: Box<dyn Engine>,
        queue_indices: &[usize],
        queue_size: usize,
        shared: Arc<DeviceShared>,
        deferred: Arc<DeferredCompletions<Done>>,
        deferred_path: Arc<DeferredPath>,
        timer: WakeTimer,
    ) -> Self {
        // A data segment crosses at most one guest memory region boundary in practice; allow
        // twice the segment limit and reject a request that would need more.
        let iovec_capacity = shared.limits.seg_max as usize * 2;
        let queues = queue_indices
            .iter()
            .enumerate()
            .map(|(local, &index)| QueueContext {
                index,
                slots: (0..queue_size)
                    .map(|_| Slot {
                        pending: 0,
                        status: STATUS_OK,
                        request_type: RequestType::Flush,
                        status_addr: GuestAddress(0),
                        data_len: 0,
                        offset: 0,
                        defer: false,
                        writeback_at_submission: true,
                        bufs: IoBuffers::with_capacity(iovec_capacity),
                        ranges: Vec::new(),
                        waiting_since: None,
                        mem: None,
                    })
                    .collect(),
                bufs: RequestBuffers::new(&shared.limits),
                needs_signal: false,
                ring_broken: false,
                notify_off: false,
                warnings: GuestWarnings::default(),
                order: deferred_path.used_order(local).cloned().unwrap_or_else(|| {
                    Arc::new(Mutex::new(UsedOrder::new(
                        queue_size,
                        crate::used_order::UsedOrderMode::Completion,
                    )))
                }),
                throttle: throttle::Queue::new(shared.io_limits.buckets().clone()),
                waiting: VecDeque::with_capacity(queue_size),
            })
            .collect();
        Self {
            engine,
            queues,
            shared,
            deferred,
            deferred_path,
            budget: Budget::default(),
            in_engine: 0,
            polling: false,
            poll_window: PollWindow::default(),
            timer,
            pass_now: None,
            registered: Weak::new(),
        }
    }

    /// The thread's deferred completions, for stats and for the unplug path.
    pub fn deferred(&self) -> &Arc<DeferredCompletions<Done>> {
        &self.deferred
    }

    /// Forget the requests of queue `index` still waiting to be published: the frontend took
    /// the ring back while they were in flight.
    pub fn forget_unpublished(&self, index: usize) {
        for queue in self.queues.iter().filter(|q| q.index == index) {
            used_order::lock(&queue.order).reset();
        }
    }

    /// The thread's vrings, once its first event has handed them over.
    pub fn vrings(&self) -> Vec<Vring> {
        self.deferred_path.vrings()
    }

    /// The engine's completion eventfd, to register in this thread's epoll loop.
    pub fn completion_fd(&self) -> std::os::unix::io::RawFd {
        self.engine.completion_fd()
    }

    /// The timerfd that wakes requests waiting for tokens, to register in the same loop.
    pub fn timer_fd(&self) -> std::os::unix::io::RawFd {
        self.timer.fd()
    }

    /// The wake-up timer fired: submit, oldest first, the waiting requests whose tokens are
    /// due, and sleep again until the next are. Requests go without tokens (still accounted)
    /// when their ring was stopped (GET_VRING_BASE), the connection is ending, or their vCPU is
    /// unplugged: a drain must not wait for a limit.
    pub fn serve_waiting(&mut self, vrings: &[Vring]) {
        self.timer.fired();
        let now = throttle::now();
        let draining = self.shared.draining.load(Ordering::Relaxed);
        let mut next_due: Option<u64> = None;
        let mut submitted = false;
        for local in 0..self.queues.len() {
            if self.queues[local].waiting.is_empty() {
                continue;
            }
            let index = self.queues[local].index;
            let release = draining
                || self.shared.io_limits.is_released(index)
                || !vrings
                    .get(local)
                    .is_some_and(|v| v.get_ref().get_queue().ready());
            loop {
                let queue = &mut self.queues[local];
                let Some(&head) = queue.waiting.front() else {
                    queue.throttle.caught_up();
                    break;
                };
                let Some(slot) = queue.slots.get_mut(usize::from(head)) else {
                    queue.waiting.pop_front();
                    continue;
                };
                let io = limited_io(slot.request_type, slot.data_len, &slot.ranges);
                if release {
                    queue.throttle.force(io, now);
                } else if let Err(due) = queue.throttle.take(io, now) {
                    next_due = Some(next_due.map_or(due, |n| n.min(due)));
                    break;
                }
                queue.waiting.pop_front();
                let waited = now.saturating_sub(slot.waiting_since.take().unwrap_or(now));
                let stats = self.shared.stats.queue(index);
                QueueStats::sub(&stats.throttle_waiting, 1);
                QueueStats::add(&stats.throttle_wait_us, waited / 1000);
                if let Started::Done(used_len) = self.submit_slot(local, head, true) {
                    // Published as the pop path publishes: in its place in the used order, and
                    // never to the rings of a frontend that has gone.
                    if let Some(vring) = vrings.get(local) {
                        let mut state = vring.get_mut();
                        if !self.shared.frontend_gone() {
                            let order = Arc::clone(&self.queues[local].order);
                            if used_order::lock(&order).complete(&mut state, index, head, used_len)
                            {
                                self.queues[local].needs_signal = true;
                            }
                        }
                    }
                }
                submitted = true;
            }
        }
        if let Some(due) = next_due {
            if let Err(e) = self.timer.arm(throttle::next_wake(due, now)) {
                error!("arming the I/O limits timer: {e}");
            }
        }
        if submitted {
            if let Err(e) = self.engine.commit() {
                error!("submitting to the engine: {e}");
            }
        }
        self.reap_polled(vrings);
    }

    /// A kick on the thread's `local`-th vring: serve every available chain.
    pub fn process_queue(&mut self, local: usize, vrings: &[Vring]) {
        let Some(vring) = vrings.get(local) else {
            error!(
                "kick for vring {local} of a thread that has {}",
                vrings.len()
            );
            return;
        };
        self.deferred_path.set_vrings(vrings);
        let event_idx = self.shared.event_idx.load(Ordering::Relaxed);
        // The chains of one pass share one reading of the clock (microseconds apart at most).
        self.pass_now = None;
        let mut pending = Pending::default();
        loop {
            let mut state = vring.get_mut();
            // Stopped by GET_VRING_BASE: the frontend owns the ring again. Stopping (SIGTERM) or
            // the frontend gone: what is on the ring is for the next backend.
            if !state.get_queue().ready() || !self.shared.taking_chains() {
                break;
            }
            // An available index more than a queue's worth ahead of us is the driver breaking its
            // own ring: nothing on it can be trusted, so this queue stops (the others go on).
            if let Err(e) = state.get_queue_mut().iter(&*self.shared.mem.memory()) {
                let queue = &mut self.queues[local];
                if !std::mem::replace(&mut queue.ring_broken, true) {
                    error!(
                        "queue {}: driver broke the ring, not serving it: {e:?}",
                        queue.index
                    );
                }
                break;
            }
            // While polling, kicks are not wanted whatever the ring's notification scheme: the
            // thread will look at the ring again on its own.
            if event_idx || self.polling {
                match state.disable_notification() {
                    Ok(()) => self.queues[local].notify_off = true,
                    Err(e) => warn!(
                        "queue {}: disabling notifications: {e:?}",
                        self.queues[local].index
                    ),
                }
            }
            // The memory map the chains are read with is loaded after the available index (read
            // just above): a region the frontend added, and saw acknowledged, before it published a
            // chain that points into it is then in the map. One loaded before, when the thread
            // was woken, would reject such a chain as outside guest memory.
            let mem = self.shared.mem.memory().into_inner();
            let view = MemView::new(&mem);
            // Taken under the vring's lock, as the deferred worker does: never contended.
            let order = Arc::clone(&self.queues[local].order);
            let mut order = used_order::lock(&order);
            loop {
                // Pop in its own statement so the borrow of the queue ends before add_used. The
                // popped chain gives the head; its descriptors are read through the view.
                let chain = state.get_queue_mut().pop_descriptor_chain(&view);
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                if !order.popped(head) {
                    let queue = &mut self.queues[local];
                    queue.warnings.warn(
                        queue.index,
                        format_args!(
                            "guest reused head {head} before it was given back; ignoring the duplicate"
                        ),
                    );
                    QueueStats::add(&self.shared.stats.queue(queue.index).dropped, 1);
                    continue;
                }
                let table = (
                    GuestAddress(state.get_queue().desc_table()),
                    state.get_queue().size(),
                );
                let chain = ViewChain::new(&view, table.0, table.1, head);
                match self.start_request(local, head, chain, table, &mem, &view) {
                    Started::InFlight => {
                        if pending.started() {
                            if let Err(e) = self.engine.commit() {
                                error!(
                                    "queue {}: submitting to the engine: {e}",
                                    self.queues[local].index
                                );
                            }
                        }
                    }
                    Started::Done(used_len) => {
                        let index = self.queues[local].index;
                        if order.complete(&mut state, index, head, used_len) {
                            self.queues[local].needs_signal = true;
                        }
                    }
                    Started::Ignored => order.unpop(head),
                }
            }
            drop(order);
            // A polling thread leaves notifications off until it stops polling.
            if self.polling || !std::mem::take(&mut self.queues[local].notify_off) {
                break;
            }
            match state.enable_notification() {
                // More chains arrived while notifications were off: go round again.
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(
                        "queue {}: enabling notifications: {e:?}",
                        self.queues[local].index
                    );
                    break;
                }
            }
        }
        if let Err(e) = self.engine.commit() {
            error!(
                "queue {}: submitting to the engine: {e}",
                self.queues[local].index
            );
        }
        // A synchronous engine has finished already, and io_uring may have too: complete what is
        // done without another trip through epoll (the engine does not signal its eventfd for
        // what it finished within the submission: this reap is what reports it).
        self.reap_polled(vrings);
    }

    /// The thread goes back to epoll: a queue that holds tokens taken ahead from the I/O limits'
    /// buckets gives them back if another queue waits for tokens (a test of a field per queue
    /// otherwise), so that they do not sit unused while this thread sleeps.
    pub fn going_to_sleep(&mut self) {
        for queue in &mut self.queues {
            queue.throttle.idle();
        }
    }

    /// A kick woke the thread (before it serves the ring): adapt the poll window to how long the
    /// thread waited for the driver.
    pub fn on_kick(&mut self) {
        let max = self.shared.poll;
        if max.is_zero() || self.shared.poll_fixed {
            return;
        }
        if self.poll_window.on_kick(Instant::now(), max) {
            self.publish_window();
        }
    }

    /// Show the adaptive window in the thread's first queue's stats.
    fn publish_window(&self) {
        if let Some(first) = self.queues.first() {
            let ns = u64::try_from(self.poll_window.window.as_nanos()).unwrap_or(u64::MAX);
            self.shared
                .stats
                .queue(first.index)
                .poll_window_ns
                .store(ns, Ordering::Relaxed);
        }
    }

    /// Busy-poll this thread's rings after an event (`--poll-us`): serve new chains and finished
    /// requests as they appear, without waiting for a kick or the engine's eventfd, until the
    /// poll window passes with nothing to do, or `MAX_POLL` in all so that the thread's other
    /// events (exit, re-pin) are not starved. Kicks stay off while polling; notifications are
    /// re-enabled, and whatever slipped in meanwhile served, before returning to epoll.
    ///
    /// It polls for the driver, not for the disk: once nothing is left to serve and requests
    /// are at the device, it sleeps, since their completions are device latencies away and
    /// their eventfd wakes the thread anyway; spinning through them would only take the CPU
    /// from the vCPU (or client) whose next request it waits for. `--poll-device` spins through
    /// them anyway, for hosts with a core to spare per queue thread.
    ///
    /// The window is [`PollWindow`]'s adaptive one, or the whole `--poll-us` with
    /// `--poll-fixed`. A window of nothing sleeps at once and counts no poll.
    pub fn poll(&mut self, vrings: &[Vring]) {
        let full = self.shared.poll;
        if full.is_zero() {
            return;
        }

        let window = if self.shared.poll_fixed {
            full
        } else if self.in_engine == 0 && self.poll_window.slept_on_device(Instant::now(), full) {
            // The driver is asleep too: leave the CPU to its wake-up.
            Duration::ZERO
        } else {
            self.poll_window.window
        };
        if window.is_zero() || (self.in_engine > 0 && !self.shared.poll_device) {
            // Sleep now. With nothing at the engine, the wait for the driver starts here.
            self.poll_window.went_idle(self.in_engine, Instant::now());
            return;
        }
        let mem = self.shared.mem.memory().into_inner();
        let view = MemView::new(&mem);
        let start = Instant::now();
        let mut last_work = start;
        let mut found = false;
        let mut expired = false;
        self.polling = true;
        loop {
            let mut worked = false;
            for (local, vring) in vrings.iter().enumerate().take(self.queues.len()) {
                if !self.queues[local].ring_broken
                    && self.shared.taking_chains()
                    && has_new_chains(vring, &view)
                {
                    self.process_queue(local, vrings);
                    worked = true;
                }
            }
            if self.engine.has_completions() {
                self.reap_polled(vrings);
                worked = true;
            }
            let now = Instant::now();
            if worked {
                found = true;
                last_work = now;
            }
            // However busy the rings, back to epoll after MAX_POLL: its exit and re-pin events
            // must get in (the rings' own events are re-armed below, so nothing is lost).
            if now - start >= MAX_POLL {
                break;
            }
            if !worked {
                if self.in_engine > 0 && !self.shared.poll_device {
                    // With requests at the device, the next event is most likely their
                    // completion, tens of microseconds away and announced by the engine's
                    // eventfd: sleep, unless told to spin through device latencies
                    // (`--poll-device`).
                    break;
                }
                if now - last_work >= window {
                    expired = true;
                    break;
                }
            }
            std::hint::spin_loop();
        }
        self.polling = false;
        if !self.shared.poll_fixed && self.poll_window.session_ended(window, full, found, expired) {
            self.publish_window();
        }
        // The wait for the driver started with the last work, if nothing is left at the engine.
        if found {
            // Chains or completions served while polling: the wait restarts at the last of them.
            self.poll_window.idle_since = None;
        }
        self.poll_window.went_idle(self.in_engine, last_work);
        // Counted on the thread's first queue (each thread serves one queue here).
        if let Some(first) = self.queues.first() {
            let stats = self.shared.stats.queue(first.index);
            QueueStats::add(&stats.polls, 1);
            if found {
                QueueStats::add(&stats.poll_hits, 1);
            }
        }
        // Kicks back on; serve what arrived between the last look and now.
        for local in 0..self.queues.len().min(vrings.len()) {
            if self.queues[local].notify_off {
                self.process_queue(local, vrings);
            }
        }
    }

    /// The engine's completion eventfd fired: clear it, complete what finished and signal the
    /// guest.
    pub fn reap(&mut self, vrings: &[Vring]) {
        self.reap_with(vrings, true);
    }

    /// Complete what finished and signal the guest, without reading the engine's eventfd: after
    /// a pass of submissions (the engine does not signal what it finished within them) or when
    /// polling saw completions. A signal this leaves on the eventfd brings the thread back
    /// through [`QueueThread::reap`] once.
    fn reap_polled(&mut self, vrings: &[Vring]) {
        self.reap_with(vrings, false);
    }

    /// [`QueueThread::reap`] (`woken`: the eventfd is cleared) or
    /// [`QueueThread::reap_polled`].
    fn reap_with(&mut self, vrings: &[Vring], woken: bool) {
        self.deferred_path.set_vrings(vrings);
        let Self {
            engine,
            queues,
            shared,
            deferred,
            budget,
            in_engine,
            ..
        } = self;
        let budget_limit = match shared.image.cache_mode() {
            CacheMode::Writeback => shared.page_cache_budget,
            _ => None,
        };
        let mut reaped = false;
        let mut on_completion = |c: Completion| {
            reaped = true;
            let local = (c.user_data >> 16) as usize;
            let head = (c.user_data & 0xffff) as u16;
            let Some(queue) = queues.get_mut(local) else {
                error!("completion for unknown queue slot {local}");
                return;
            };
            let Some(slot) = queue.slots.get_mut(usize::from(head)) else {
                error!("queue {}: completion for unknown head {head}", queue.index);
                return;
            };
            if c.fixed_buffers {
                QueueStats::add(&shared.stats.queue(queue.index).fixed_buffer_ios, 1);
            }
            if let Some(mut bufs) = c.bufs {
                // While migrating, the data a read put in guest memory goes to the dirty log
                // before the used entry that shows it to the guest: the kernel wrote it through
                // these raw iovecs, which vm-memory's tracking never sees. Whatever the outcome:
                // a failed or short read may have written part of it.
                if slot.request_type == RequestType::In
                    && shared.logging.load(Ordering::Relaxed)
                    && shared.log_reads
                {
                    if let Some(mem) = &slot.mem {
                        for iov in bufs.iovecs() {
                            mark_host_range(mem, iov.iov_base.cast_const().cast(), iov.iov_len);
                        }
                    }
                }
                // The iovec storage comes home for the next request on this head; the guard on
                // guest memory goes.
                bufs.clear();
                slot.bufs = bufs;
            }
            if slot.pending == 0 {
                error!("queue {}: completion for idle head {head}", queue.index);
                return;
            }
            match c.result {
                Ok(n) if is_complete_transfer(slot, n) => {}
                Ok(n) => {
                    debug!(
                        "queue {}: short transfer on head {head}: {n} of {} bytes",
                        queue.index, slot.data_len
                    );
                    slot.status = STATUS_IOERR;
                }
                Err(e) => {
                    debug!("queue {}: head {head}: {e}", queue.index);
                    slot.status = STATUS_IOERR;
                }
            }
            slot.pending -= 1;
            if slot.pending > 0 {
                return;
            }
            *in_engine = in_engine.saturating_sub(1);
            let Some(mem) = slot.mem.take() else {
                error!(
                    "queue {}: head {head} completed without its memory",
                    queue.index
                );
                return;
            };
            let is_write = slot.request_type == RequestType::Out;
            let end = slot.offset + u64::from(slot.data_len);
            let dontcache = shared.image.cache_mode() == CacheMode::DontCache;
            let mut done = Done {
                local,
                head,
                request_type: slot.request_type,
                status: slot.status,
                status_addr: slot.status_addr,
                data_len: slot.data_len,
                offset: slot.offset,
                evict: (is_write && dontcache).then_some((slot.offset, end)),
                sync: needs_sync(
                    slot.request_type,
                    slot.writeback_at_submission,
                    shared.writeback.load(Ordering::Relaxed),
                ),
                mem,
            };
            let stats = shared.stats.queue(queue.index);
            if slot.defer {
                // The static form: marked at submission.
                defer_at_once_if_alone(deferred, done, *in_engine, shared);
                QueueStats::add(&stats.deferred, 1);
                return;
            }
            // The dynamic form: this completion decides late whether it needs the worker.
            if let (Some(limit), true) = (budget_limit, is_write && done.status == STATUS_OK) {
                budget.written += u64::from(done.data_len);
                budget.start = if budget.end == 0 {
                    done.offset
                } else {
                    budget.start.min(done.offset)
                };
                budget.end = budget.end.max(end);
                if budget.written > limit {
                    done.evict = Some((budget.start, budget.end));
                    *budget = Budget::default();
                }
            }
            match deferred.complete_in_task(done, needs_deferred_path) {
                None => QueueStats::add(&stats.deferred, 1),
                Some(done) => {
                    if let Some(vring) = vrings.get(local) {
                        if complete(shared, queue.index, &done, vring, &queue.order) {
                            queue.needs_signal = true;
                        }
                    }
                }
            }
        };
        let result = if woken {
            engine.reap(&mut on_completion)
        } else {
            engine.reap_polled(&mut on_completion)
        };
        if let Err(e) = result {
            error!("reaping completions: {e}");
        }
        if reaped {
            // Work done: the wait for the driver starts again from here.
            self.poll_window.idle_since = None;
        }
        self.signal(vrings);
    }

    /// Signal each queue that has new used entries, once, if the guest wants it.
    fn signal(&mut self, vrings: &[Vring]) {
        if self.shared.frontend_gone() {
            return;
        }
        for (local, queue) in self.queues.iter_mut().enumerate() {
            if !std::mem::take(&mut queue.needs_signal) {
                continue;
            }
            let Some(vring) = vrings.get(local) else {
                continue;
            };
            let mut state = vring.get_mut();
            if signal_if_needed(&mut state, queue.index) {
                QueueStats::add(&self.shared.stats.queue(queue.index).signals, 1);
            }
        }
    }

    /// Hand the engine `mem`, a memory map it has not seen, to register as its fixed buffers:
    /// done before the first request read with the new map is submitted, so that its buffers
    /// can use them. A request of an older map still finds its own: the engine keeps the
    /// buffers a request in flight uses, and its old map mapped, until the request is reaped.
    /// Registering pins the map's pages, which takes time in proportion to guest memory.
    #[cold]
    fn register_memory(&mut self, mem: &Arc<GuestMem>) {
        let regions: Vec<libc::iovec> = mem
            .iter()
            .map(|r| libc::iovec {
                iov_base: r.as_ptr().cast(),
                iov_len: r.len() as usize,
            })
            .collect();
        let guard: MemoryGuard = Arc::<GuestMem>::clone(mem);
        self.engine.set_memory(&regions, &guard);
        self.registered = Arc::downgrade(mem);
    }

    /// Parse one chain and either submit it or complete it at once.
    /// `table` is the queue's descriptor table and size, to walk a chain that virtio-queue
    /// stops walking at 4 GiB.
    fn start_request(
        &mut self,
        local: usize,
        head: u16,
        chain: ViewChain,
        table: (GuestAddress, u16),
        mem: &Arc<GuestMem>,
        view: &MemView,
    ) -> Started {
        if self.shared.fixed_buffers && !std::ptr::eq(self.registered.as_ptr(), Arc::as_ptr(mem)) {
            self.register_memory(mem);
        }
        let shared = &*self.shared;
        let queue = &mut self.queues[local];
        let stats = shared.stats.queue(queue.index);
        let Some(slot) = queue.slots.get_mut(usize::from(head)) else {
            // virtio-queue checks heads against the queue size, which never exceeds ours.
            error!("queue {}: head {head} beyond the slot table", queue.index);
            return Started::Ignored;
        };
        if slot.pending > 0 || slot.waiting_since.is_some() {
            queue.warnings.warn(
                queue.index,
                format_args!(
                    "guest reused head {head} while it is in flight; ignoring the duplicate"
                ),
            );
            QueueStats::add(&stats.dropped, 1);
            return Started::Ignored;
        }

        let request = match Request::parse(chain, &shared.limits, &mut queue.bufs) {
            Ok(request) => request,
            Err(mut e) => {
                QueueStats::add(&stats.requests, 1);
                if matches!(e.error, virtio_blk::Error::ChainTruncated) {
                    // Cut short by virtio-queue's 4 GiB limit, its end may still be walked to a
                    // good status byte (a loop or a bad index still has none).
                    e.status_addr = status_of_long_chain(&**mem, table.0, table.1, head);
                    if e.status_addr.is_some() {
                        e.error = virtio_blk::Error::DataTooLong;
                    }
                }
                return match e.status_addr {
                    Some(addr) => {
                        let status = e.error.status();
                        queue.warnings.warn(
                            queue.index,
                            format_args!("rejecting head {head} with status {status}: {}", e.error),
                        );
                        QueueStats::add(&stats.errors, 1);
                        if let Err(err) = write_status(view, addr, status) {
                            error!(
                                "queue {}: writing status of head {head}: {err}",
                                queue.index
                            );
                        }
                        Started::Done(1)
                    }
                    None => {
                        queue.warnings.warn(
                            queue.index,
                            format_args!(
                                "dropping head {head}, it has no usable status byte: {}",
                                e.error
                            ),
                        );
                        QueueStats::add(&stats.dropped, 1);
                        // Return the descriptors unused so the ring does not leak them.
                        Started::Done(0)
                    }
                };
            }
        };

        slot.status = STATUS_OK;
        slot.request_type = request.request_type;
        slot.status_addr = request.status_addr;
        slot.data_len = request.data_len;
        let offset = request.sector << SECTOR_SHIFT;
        slot.offset = offset;
        slot.writeback_at_submission = shared.writeback.load(Ordering::Relaxed);
        slot.defer = defer_at_submission(
            request.request_type,
            shared.image.cache_mode() == CacheMode::DontCache,
            slot.writeback_at_submission,
        );
        match request.request_type {
            RequestType::In | RequestType::Out => {
                let (mut iovecs, _) = std::mem::take(&mut slot.bufs).into_parts();
                iovecs.clear();
                let filled = fill_iovecs(view, &queue.bufs, &mut iovecs);
                let guard: MemoryGuard = Arc::<GuestMem>::clone(mem);
                // SAFETY: every iovec `fill_iovecs` makes is a slice that `get_slices` returned
                // from a region of `mem`, and the guard is `mem`, which keeps its regions mapped.
                slot.bufs = unsafe { IoBuffers::new(iovecs, Some(guard)) };
                if let Err(reason) = filled {
                    slot.bufs.clear();
                    queue
                        .warnings
                        .warn(queue.index, format_args!("head {head}: {reason}"));
                    return complete_now(view, slot, stats, STATUS_IOERR, 1);
                }
            }
            RequestType::Flush => {
                // fdatasync sleeps: straight to the deferred worker, which syncs once per batch.
                // Never limited, as in QEMU: it covers only writes that have completed.
                let done = Done {
                    local,
                    head,
                    request_type: RequestType::Flush,
                    status: STATUS_OK,
                    status_addr: request.status_addr,
                    data_len: 0,
                    offset: 0,
                    evict: None,
                    sync: true,
                    mem: Arc::clone(mem),
                };
                // Counted before the push: the worker may complete it at once.
                shared.request_started(queue.index);
                QueueStats::add(&stats.in_flight, 1);
                defer_at_once_if_alone(&self.deferred, done, self.in_engine, shared);
                QueueStats::add(&stats.deferred, 1);
                return Started::InFlight;
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                slot.ranges.clear();
                slot.ranges.extend_from_slice(&queue.bufs.ranges);
            }
            RequestType::GetId => {
                return match write_device_id(view, &queue.bufs.data, &shared.serial) {
                    Ok(n) => complete_now(view, slot, stats, STATUS_OK, n + 1),
                    Err(e) => {
                        queue
                            .warnings
                            .warn(queue.index, format_args!("GET_ID head {head}: {e}"));
                        complete_now(view, slot, stats, STATUS_IOERR, 1)
                    }
                };
            }
            RequestType::Unsupported(t) => {
                debug!("queue {}: unsupported request type {t}", queue.index);
                return complete_now(view, slot, stats, STATUS_UNSUPP, 1);
            }
        }
        slot.mem = Some(Arc::clone(mem));

        // The I/O limits: one relaxed load without them. With requests already waiting, a new
        // one queues behind them whatever the buckets hold, so that the queue keeps its order.
        if shared.io_limits.buckets().is_limited() || !queue.waiting.is_empty() {
            let now = *self.pass_now.get_or_insert_with(throttle::now);
            let wait = if queue.waiting.is_empty() {
                let io = limited_io(slot.request_type, slot.data_len, &slot.ranges);
                queue.throttle.take(io, now).err().map(Some)
            } else {
                // The timer is armed already: it is whenever the FIFO is not empty.
                Some(None)
            };
            if let Some(due) = wait {
                slot.waiting_since = Some(now);
                queue.waiting.push_back(head);
                shared.request_started(queue.index);
                QueueStats::add(&stats.in_flight, 1);
                QueueStats::add(&stats.throttled, 1);
                QueueStats::add(&stats.throttle_waiting, 1);
                if let Some(due) = due {
                    if let Err(e) = self.timer.arm(throttle::next_wake(due, now)) {
                        error!("queue {}: arming the I/O limits timer: {e}", queue.index);
                    }
                }
                return Started::InFlight;
            }
        }
        self.submit_slot(local, head, false)
    }

    /// Submit the prepared slot of `head` to the engine: its iovecs (a read or write) or its
    /// ranges (a discard or write-zeroes). `counted`: it is in `in_flight` already (it waited
    /// for tokens).
    fn submit_slot(&mut self, local: usize, head: u16, counted: bool) -> Started {
        let shared = &*self.shared;
        let queue = &mut self.queues[local];
        let stats = shared.stats.queue(queue.index);
        let Some(slot) = queue.slots.get_mut(usize::from(head)) else {
            return Started::Ignored;
        };
        let Some(mem) = slot.mem.clone() else {
            error!(
                "queue {}: head {head} submitted without its memory",
                queue.index
            );
            return Started::Ignored;
        };
        let user_data = ((local as u64) << 16) | u64::from(head);
        let mut submitted = 0u32;
        let mut failed = false;
        let request_type = slot.request_type;
        let offset = slot.offset;
        // A read's or write's iovecs move into the engine; the slot gets them back at completion.
        let mut data = matches!(request_type, RequestType::In | RequestType::Out)
            .then(|| std::mem::take(&mut slot.bufs));
        let slot_bufs = &mut slot.bufs;
        let mut submit = |engine: &mut Box<dyn Engine>, op: Op| match engine.submit(op, user_data) {
            Ok(()) => submitted += 1,
            Err(e) => {
                warn!("head {head}: submitting to the engine: {e}");
                failed = true;
                if let Some(mut bufs) = e.bufs {
                    bufs.clear();
                    *slot_bufs = bufs;
                }
            }
        };
        match request_type {
            RequestType::In | RequestType::Out => {
                let bufs = data.take().unwrap_or_default();
                let op = if request_type == RequestType::In {
                    Op::Read { offset, bufs }
                } else {
                    Op::Write { offset, bufs }
                };
                submit(&mut self.engine, op);
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                for range in &slot.ranges {
                    let offset = range.sector << SECTOR_SHIFT;
                    let len = u64::from(range.num_sectors) << SECTOR_SHIFT;
                    let op = if request_type == RequestType::Discard {
                        Op::Discard { offset, len }
                    } else {
                        Op::WriteZeroes {
                            offset,
                            len,
                            unmap: range.unmap,
                        }
                    };
                    submit(&mut self.engine, op);
                }
            }
            RequestType::Flush | RequestType::GetId | RequestType::Unsupported(_) => {}
        }
        if failed {
            slot.status = STATUS_IOERR;
        }
        if submitted == 0 {
            let status = if failed { STATUS_IOERR } else { STATUS_OK };
            slot.mem = None;
            if counted {
                QueueStats::sub(&stats.in_flight, 1);
                shared.request_finished(queue.index);
            }
            return complete_now(&MemView::new(&mem), slot, stats, status, 1);
        }
        slot.pending = submitted;
        self.in_engine += 1;
        if !counted {
            shared.request_started(queue.index);
            QueueStats::add(&stats.in_flight, 1);
        }
        Started::InFlight
    }
}

/// What a request asks of the I/O limits. Discards count as one write operation and no bytes:
/// they move no data (QEMU counts their length, which makes a guest's trim of a large disk wait
/// for minutes). Write-zeroes count their length, which the disk may have to write.
fn limited_io(request_type: RequestType, data_len: u32, ranges: &[DiscardRange]) -> Io {
    match request_type {
        RequestType::In => Io {
            dir: Dir::Read,
            bytes: u64::from(data_len),
        },
        RequestType::WriteZeroes => Io {
            dir: Dir::Write,
            bytes: ranges
                .iter()
                .map(|r| u64::from(r.num_sectors) << SECTOR_SHIFT)
                .sum(),
        },
        RequestType::Discard => Io {
            dir: Dir::Write,
            bytes: 0,
        },
        _ => Io {
            dir: Dir::Write,
            bytes: u64::from(data_len),
        },
    }
}

/// Push a completion marked at submission onto the deferred batch. With nothing else in the
/// engine (`in_engine == 0`) no completion is coming to share the batch, so it is taken at once:
/// waiting out the delay would only add latency; `--strict-batching` waits anyway. Otherwise it
/// weighs the bytes it has to write back, so that a batch already heavy enough to amortise its
/// pass (`--defer-max-bytes`) does not wait for more.
fn defer_at_once_if_alone(
    deferred: &DeferredCompletions<Done>,
    done: Done,
    in_engine: usize,
    shared: &DeviceShared,
) {
    if in_engine == 0 && !shared.strict_batching {
        deferred.push_now(done);
    } else {
        let weight = done
            .evict
            .map_or(0, |(start, end)| end.saturating_sub(start));
        deferred.push_weighted(done, weight);
    }
}

/// Whether an engine result of `n` bytes finished the slot's operation.
fn is_complete_transfer(slot: &Slot, n: u32) -> bool {
    match slot.request_type {
        RequestType::In | RequestType::Out => n == slot.data_len,
        _ => true,
    }
}

/// Translate the request's data segments into host iovecs over guest memory.
fn fill_iovecs(
    mem: &MemView,
    bufs: &RequestBuffers,
    iovecs: &mut Vec<libc::iovec>,
) -> Result<(), String> {
    for seg in &bufs.data {
        let slices = GuestMemory::get_slices(mem, seg.addr, seg.len as usize, Permissions::Read)
            .map_err(|e| format!("mapping {:#x}+{}: {e}", seg.addr.0, seg.len))?;
        for slice in slices {
            let slice = slice.map_err(|e| format!("mapping {:#x}+{}: {e}", seg.addr.0, seg.len))?;
            if iovecs.len() == iovecs.capacity() {
                return Err(format!("more than {} host segments", iovecs.capacity()));
            }
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Complete a request that needs no engine work: write its status, count it.
fn complete_now(
    mem: &MemView,
    slot: &mut Slot,
    stats: &QueueStats,
    status: u8,
    used_len: u32,
) -> Started {
    if let Err(e) = mem.write_u8(slot.status_addr, status) {
        error!("writing status at {:#x}: {e}", slot.status_addr.0);
    }
    count(stats, slot, status);
    Started::Done(used_len)
}

fn count(stats: &QueueStats, slot: &Slot, status: u8) {
    count_done(stats, slot.request_type, slot.data_len, status);
}

/// Whether the driver has published chains the queue has not popped yet: two loads from the
/// available ring, what a polling thread checks between passes.
fn has_new_chains(vring: &Vring, mem: &MemView) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue.ready()
        && queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    /// A pass over a burst of requests submits every `COMMIT_EVERY` of them (the rest at the
    /// end of the pass); a pass of fewer submits only at its end.
    #[test]
    fn a_burst_of_requests_is_submitted_in_pieces() {
        let mut pending = Pending::default();
        let at: Vec<usize> = (1..=20).filter(|_| pending.started()).collect();
        assert_eq!(at, [8, 16], "20 requests: submitted after the 8th and 16th");
        let mut pending = Pending::default();
        let at: Vec<usize> = (1..COMMIT_EVERY).filter(|_| pending.started()).collect();
        assert!(
            at.is_empty(),
            "fewer than a piece: submitted at the end of the pass only"
        );
    }

    /// The wait for the driver was `us` microseconds.
    fn kick_after(w: &mut PollWindow, us: u64) -> Duration {
        let since = Instant::now();
        w.idle_since = Some(since);
        w.on_kick(since + Duration::from_micros(us), MAX);
        w.window
    }

    #[test]
    fn the_window_grows_while_requests_come_soon_and_collapses_when_they_stop() {
        let mut w = PollWindow::default();
        assert!(w.window.is_zero(), "starts at nothing");
        // A client round trip of 20 µs each time: 4, 16, then the maximum catches it and stays.
        let grown: Vec<u64> = (0..5)
            .map(|_| kick_after(&mut w, 20).as_micros() as u64)
            .collect();
        assert_eq!(grown, [4, 16, 50, 50, 50]);
        // One request after the queue went quiet: nothing again.
        assert_eq!(kick_after(&mut w, 1_001), Duration::ZERO);
        assert_eq!(kick_after(&mut w, 10_000), Duration::ZERO);
    }

    #[test]
    fn a_wait_lengthened_by_the_threads_own_wake_up_still_grows_the_window() {
        // A driver that answers in 15 µs, seen by a thread that slept and took 45–105 µs to
        // wake: every measured wait is longer than the maximum window, none is a quiet queue.
        let mut w = PollWindow::default();
        let grown: Vec<u64> = [60, 120, 80]
            .into_iter()
            .map(|us| kick_after(&mut w, us).as_micros() as u64)
            .collect();
        assert_eq!(grown, [4, 16, 50]);
        // A late request now and then (the client preempted) leaves the window where it is.
        assert_eq!(kick_after(&mut w, 400), MAX);
    }

    #[test]
    fn whole_windows_polled_for_nothing_collapse_it_and_hold_it_off_longer_each_time() {
        let mut w = PollWindow::default();
        let grow = |w: &mut PollWindow| {
            for _ in 0..3 {
                kick_after(w, 100);
            }
            assert_eq!(w.window, MAX);
        };
        grow(&mut w);
        // The driver comes back only after 100–900 µs, each time: a whole window for nothing.
        assert!(w.session_ended(MAX, MAX, false, true));
        assert!(w.window.is_zero());
        let mut holds = Vec::new();
        for _ in 0..10 {
            // Kicks that would grow the window leave it at nothing while the hold lasts.
            let mut held = 0;
            while kick_after(&mut w, 100).is_zero() {
                held += 1;
            }
            holds.push(held);
            grow(&mut w);
            assert!(w.session_ended(MAX, MAX, false, true));
        }
        assert_eq!(holds, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]);
        // A session that serves a request ends the backoff: the next hold is one kick again.
        assert!(!w.session_ended(Duration::ZERO, MAX, true, false));
        assert_eq!(
            kick_after(&mut w, 100),
            Duration::ZERO,
            "the hold already set"
        );
        for _ in 0..255 {
            kick_after(&mut w, 100);
        }
        grow(&mut w);
        assert!(w.session_ended(MAX, MAX, false, true));
        assert_eq!(kick_after(&mut w, 100), Duration::ZERO);
        assert_eq!(kick_after(&mut w, 100), POLL_START);
    }

    #[test]
    fn only_a_whole_window_polled_for_nothing_collapses_it() {
        let mut w = PollWindow::default();
        kick_after(&mut w, 20);
        kick_after(&mut w, 20);
        let w16 = w.window;
        // A shorter window that ran out grows at the next kick instead.
        assert!(!w.session_ended(w16, MAX, false, true));
        kick_after(&mut w, 20);
        assert_eq!(w.window, MAX);
        // Sessions that served requests, or ended on the time limit or to sleep on the
        // device, say nothing against polling.
        assert!(!w.session_ended(MAX, MAX, true, true));
        assert!(!w.session_ended(MAX, MAX, false, false));
        assert_eq!(w.window, MAX);
    }

    #[test]
    fn an_event_that_finds_nothing_does_not_restart_the_wait() {
        let mut w = PollWindow::default();
        let t0 = Instant::now();
        w.went_idle(0, t0);
        // The engine's eventfd, left readable, wakes the thread 990 µs later for nothing.
        w.went_idle(0, t0 + Duration::from_micros(990));
        // The kick 1010 µs after the real last work: the queue went quiet, so nothing again, as
        // measured from t0 (from the empty wake-up it would look like 20 µs, and grow).
        w.window = POLL_START;
        w.on_kick(t0 + Duration::from_micros(1010), MAX);
        assert_eq!(w.window, Duration::ZERO);
        // Requests at the device: not a wait for the driver.
        w.went_idle(2, t0);
        assert!(w.idle_since.is_none());
    }

    #[test]
    fn a_long_sleep_on_the_device_skips_the_next_poll() {
        let mut w = PollWindow::default();
        let t0 = Instant::now();
        let at = |us| t0 + Duration::from_micros(us);
        // A 60 µs read at iodepth 1: the driver slept through it as well.
        w.went_idle(1, t0);
        assert!(w.slept_on_device(at(60), MAX));
        // Asked once per sleep.
        assert!(!w.slept_on_device(at(61), MAX));
        // A device that answers within the window: the driver is likely still awake.
        w.went_idle(1, t0);
        assert!(!w.slept_on_device(at(20), MAX));
        // Every event while requests are at the device restarts the measure: at iodepth 32,
        // completions come close together however long each request takes.
        w.went_idle(1, t0);
        w.went_idle(1, at(50));
        assert!(!w.slept_on_device(at(70), MAX));
        // A wait for the driver is not one for the device.
        w.went_idle(1, t0);
        w.went_idle(0, at(1));
        assert!(!w.slept_on_device(at(500), MAX));
    }

    #[test]
    fn a_kick_without_an_idle_wait_leaves_the_window_alone() {
        let mut w = PollWindow::default();
        kick_after(&mut w, 20);
        assert_eq!(w.window, POLL_START);
        // The thread slept on the device, not on the driver: no measurement.
        assert!(w.idle_since.is_none());
        assert!(!w.on_kick(Instant::now(), MAX));
        assert_eq!(w.window, POLL_START);
    }
}
