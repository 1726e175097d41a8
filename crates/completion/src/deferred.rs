//! The deferred path, top to bottom: a queue thread pushes a finished request
//! ([`DeferredCompletions::push`], or [`DeferredCompletions::complete_in_task`] when the
//! completion decides late); the first push of a batch arms the worker's timer, so that what
//! finishes meanwhile shares the pass; the worker thread wakes, takes the whole batch and hands
//! it to the [`BatchHandler`] (coalesce, evict, write statuses, add used entries, signal once),
//! looping while more arrive within its time budget and re-arming at once past it.
//!
//! The unplug path: [`DeferredCompletions::disable`] (waits for a running pass, keeps the worker
//! from starting another), then [`DeferredCompletions::drain`] (completes what is left on the
//! caller's thread); in that order, the drain is the only one completing what it takes, so nothing
//! is completed twice or waits out a delay on a CPU going away. Plug is
//! [`DeferredCompletions::enable`].
//!
//! The worker thread sleeps in `epoll` on a timerfd (the delay) and an eventfd (run now, re-pin,
//! stop). The batch state itself lives in [`crate::batch`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::batch::{Batch, Pass, Take, Wake};
use crate::stats::{Recorder, Stats};
use crate::sys::{self, Timer};
use crate::{Error, Result};

/// What the deferred worker does with a taken batch. Implemented by the backend.
///
/// Any `Fn(&mut Vec<T>) + Send + Sync + 'static` closure is a handler too.
pub trait BatchHandler<T>: Send + Sync + 'static {
    /// Completes every item of the batch: does the slow, sleeping work for the batch at once
    /// (e.g. coalesce ranges and evict), writes statuses, adds used entries, and signals the guest
    /// once. Called on the worker thread, or on the caller's thread from
    /// [`DeferredCompletions::drain`]; never twice at once for one [`DeferredCompletions`].
    ///
    /// The handler drains `batch` (`batch.drain(..)`): the `Vec` is reused across calls, so there
    /// is no allocation per batch in steady state. Items it leaves are dropped uncompleted, with a
    /// warning. It must not call [`DeferredCompletions::disable`] or `drain` of its own
    /// [`DeferredCompletions`] expecting them to wait for it: from inside a pass they return at
    /// once (`drain` returning 0), as waiting for itself would deadlock.
    fn complete_batch(&self, batch: &mut Vec<T>);
}

impl<T, F> BatchHandler<T> for F
where
    F: Fn(&mut Vec<T>) + Send + Sync + 'static,
{
    fn complete_batch(&self, batch: &mut Vec<T>) {
        self(batch)
    }
}

/// How a [`DeferredCompletions`] batches and where its worker runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// How long the first push of a batch waits for more before the worker takes the batch.
    /// Default 1 ms: long enough for a burst of completions to share a pass, short next to the
    /// writeback a pass waits for. Zero runs the worker at once. Clamped to one hour.
    pub delay: Duration,
    /// Time budget of one worker wake-up: while within it, the worker takes what arrived during
    /// its last pass at once; past it, with more waiting, it re-arms at once and goes back to
    /// sleep first, so that a re-pin or a stop gets in.
    /// Default 2 ms.
    pub budget: Duration,
    /// Weight at which the batch is taken at once instead of after `delay`: items pushed with
    /// [`DeferredCompletions::push_weighted`] add their weight (the work they stand for, in the
    /// owner's unit: the backend uses bytes to write back), and a batch that weighs this much
    /// already amortises a pass, so waiting for more would only add latency. 0 (default): weight
    /// never hurries a batch.
    pub max_weight: u64,
    /// Host CPUs to pin the worker thread to (those of its queue thread's vCPU); `None` leaves it
    /// with the affinity it inherits from the thread that creates it. A pinning failure is
    /// logged, not fatal.
    pub cpus: Option<Vec<usize>>,
    /// Name of the worker thread (Linux shows its first 15 bytes).
    pub name: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(1),
            budget: Duration::from_millis(2),
            max_weight: 0,
            cpus: None,
            name: String::from("deferred-compl"),
        }
    }
}

/// epoll token of the timerfd.
const TIMER: u64 = 0;
/// epoll token of the kick eventfd.
const KICK: u64 = 1;

/// A re-pin request for the worker, applied at its next wake-up.
struct CpuRequest {
    cpus: Option<Vec<usize>>,
    changed: bool,
}

/// Who ran a pass, for the stats.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runner {
    Worker,
    Drain,
}

/// What the handle and the worker thread share.
struct Shared<T> {
    batch: Batch<T>,
    handler: Arc<dyn BatchHandler<T>>,
    timer: Timer,
    kick: EventFd,
    budget: Duration,
    name: String,
    cpus: Mutex<CpuRequest>,
    deferred_in_task: AtomicU64,
    stats: Mutex<Recorder>,
}

fn lock<U>(m: &Mutex<U>) -> MutexGuard<'_, U> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Send + 'static> Shared<T> {
    /// Turns a batch transition's [`Wake`] into a timer arm or a kick.
    fn wake(&self, wake: Wake) {
        match wake {
            Wake::None => {}
            Wake::Now => self.kick(),
            Wake::After(delay) => {
                if let Err(e) = self.timer.arm(delay) {
                    log::error!("{}: arming the deferred timer: {e}; running now", self.name);
                    self.kick();
                }
            }
        }
    }

    fn kick(&self) {
        if let Err(e) = self.kick.write(1) {
            log::error!("{}: kicking the deferred worker: {e}", self.name);
        }
    }

    /// Runs the handler over a pass and records it; returns how many items it held.
    fn complete(&self, mut pass: Pass<'_, T>, runner: Runner) -> usize {
        let n = pass.items().len();
        self.handler.complete_batch(pass.items());
        let left = pass.items().len();
        if left != 0 {
            log::warn!(
                "{}: batch handler left {left} of {n} items; dropped",
                self.name
            );
        }
        let end = Instant::now();
        let mut stats = lock(&self.stats);
        for &pushed in pass.stamps() {
            stats.latency.record(end.saturating_duration_since(pushed));
        }
        let n64 = n as u64;
        match runner {
            Runner::Worker => {
                stats.batches += 1;
                stats.completed += n64;
                stats.max_batch = stats.max_batch.max(n64);
            }
            Runner::Drain => stats.drained += n64,
        }
        drop(stats);
        drop(pass);
        n
    }

    /// One wake-up of the worker: passes while items are due and within the budget. Returns
    /// false when the worker is to exit.
    fn run_passes(&self) -> bool {
        let start = Instant::now();
        let mut force = false;
        loop {
            match self.batch.take_for_worker(force) {
                Take::Stop => return false,
                Take::Idle => return true,
                Take::NotYet(rest) => {
                    self.wake(Wake::After(rest));
                    return true;
                }
                Take::Run(pass) => {
                    self.complete(pass, Runner::Worker);
                }
            }
            if start.elapsed() >= self.budget {
                let wake = self.batch.rearm_now(Instant::now());
                if wake != Wake::None {
                    lock(&self.stats).rearms += 1;
                    self.wake(wake);
                }
                return true;
            }
            force = true;
        }
    }

    /// Applies a pending re-pin on the worker thread.
    fn apply_cpus(&self) {
        let cpus = {
            let mut req = lock(&self.cpus);
            if !req.changed {
                return;
            }
            req.changed = false;
            req.cpus.clone()
        };
        match cpus {
            Some(cpus) => match sys::pin_current_thread(&cpus) {
                Ok(()) => log::debug!("{}: pinned to CPUs {cpus:?}", self.name),
                Err(e) => log::warn!("{}: {e}", self.name),
            },
            None => match sys::unpin_current_thread() {
                Ok(()) => log::debug!("{}: unpinned", self.name),
                Err(e) => log::warn!("{}: unpinning: {e}", self.name),
            },
        }
    }
}

/// The worker thread: sleep in epoll, apply a re-pin, run the passes that are due.
fn worker_main<T: Send + 'static>(shared: Arc<Shared<T>>, epoll: Epoll) {
    let mut events = [EpollEvent::default(); 2];
    shared.apply_cpus();
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Should not happen; fall back to polling the batch every millisecond.
                log::error!("{}: epoll_wait: {e}", shared.name);
                thread::sleep(Duration::from_millis(1));
                0
            }
        };
        for event in &events[..ready] {
            match event.data() {
                TIMER => shared.timer.clear(),
                _ => {
                    // EAGAIN (already consumed) is fine: the batch state says what to do.
                    let _ = shared.kick.read();
                }
            }
        }
        shared.apply_cpus();
        if !shared.run_passes() {
            break;
        }
    }
    log::debug!("{}: deferred worker exits", shared.name);
}

/// A per-queue-thread batch of finished requests and the deferred worker thread that completes
/// them, a batch at a time. `Send + Sync`; the queue thread holds it in an `Arc`.
///
/// Every item pushed is completed exactly once: by the worker, by [`drain`](Self::drain), or,
/// for what is left at the end, by [`shutdown`](Self::shutdown) or drop.
pub struct DeferredCompletions<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> DeferredCompletions<T> {
    /// Creates the batch and spawns its worker thread (pinned to `config.cpus` if given),
    /// enabled.
    pub fn new(config: Config, handler: Arc<dyn BatchHandler<T>>) -> Result<Self> {
        if let Some(cpus) = &config.cpus {
            sys::validate_cpus(cpus)?;
        }
        if config.name.contains('\0') {
            return Err(Error::ThreadName(config.name));
        }
        let timer = Timer::new().map_err(Error::TimerFd)?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        for (fd, token) in [(timer.as_raw_fd(), TIMER), (kick.as_raw_fd(), KICK)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::Epoll)?;
        }
        let shared = Arc::new(Shared {
            batch: Batch::new(config.delay, config.max_weight),
            handler,
            timer,
            kick,
            budget: config.budget,
            name: config.name.clone(),
            cpus: Mutex::new(CpuRequest {
                changed: config.cpus.is_some(),
                cpus: config.cpus,
            }),
            deferred_in_task: AtomicU64::new(0),
            stats: Mutex::new(Recorder::default()),
        });
        let worker = thread::Builder::new()
            .name(config.name.clone())
            .spawn({
                let shared = shared.clone();
                move || worker_main(shared, epoll)
            })
            .map_err(|source| Error::Spawn {
                name: config.name,
                source,
            })?;
        Ok(Self {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// The static form (the request was marked at submission): adds a finished request to the
    /// batch and, when no wake-up is pending, arms the worker's delay. Never waits on the
    /// worker's I/O: one short critical section, plus one `timerfd_settime` for the first item of
    /// a batch. While disabled, the item waits for [`drain`](Self::drain) or
    /// [`enable`](Self::enable).
    pub fn push(&self, item: T) {
        let wake = self.shared.batch.push(item, Instant::now());
        self.shared.wake(wake);
    }

    /// [`push`](Self::push) for an item that stands for `weight` of the handler's work: when the
    /// batch's weight reaches [`Config::max_weight`], the worker takes it at once.
    pub fn push_weighted(&self, item: T, weight: u64) {
        let wake = self
            .shared
            .batch
            .push_weighted(item, weight, Instant::now());
        self.shared.wake(wake);
    }

    /// The static form for a completion that nothing is likely to join soon (its queue has no
    /// other request in flight): push it and have the worker take the batch at once rather than
    /// after the delay, which would add latency and save nothing.
    pub fn push_now(&self, item: T) {
        let wake = self.shared.batch.push_urgent(item, Instant::now());
        self.shared.wake(wake);
    }

    /// The dynamic form: for a completion handler that decides late whether it must sleep. `needs_task` is its decision (an I/O error to report, a page-cache budget
    /// exceeded). When it says yes, the item is pushed and `None` returned: the worker completes
    /// it. Otherwise the item comes back as `Some(item)` for the caller to complete on its fast
    /// path.
    pub fn complete_in_task(&self, item: T, needs_task: impl FnOnce(&T) -> bool) -> Option<T> {
        if !needs_task(&item) {
            return Some(item);
        }
        self.shared.deferred_in_task.fetch_add(1, Ordering::Relaxed);
        self.push(item);
        None
    }

    /// Keeps the worker from running the handler until [`enable`](Self::enable), after waiting
    /// for a pass in progress (the worker's or a `drain()` on another thread) to finish: once it
    /// returns, no worker pass is running or will start. Pushes after it still land in the batch,
    /// for [`drain`](Self::drain). The first step of an unplug.
    pub fn disable(&self) {
        self.shared.batch.disable();
    }

    /// Completes everything in the batch now, on the caller's thread, by calling the handler
    /// (after any pass in progress has finished), whether or not the worker is enabled; takes
    /// again until it finds the batch empty. Returns how many items it completed. The second step
    /// of an unplug: what the departing worker held completes now, not after its delay.
    pub fn drain(&self) -> usize {
        let mut total = 0;
        while let Some(pass) = self.shared.batch.take_for_drain() {
            total += self.shared.complete(pass, Runner::Drain);
        }
        if total > 0 {
            lock(&self.shared.stats).drains += 1;
        }
        total
    }

    /// Lets the worker run again; when items are waiting, wakes it at once.
    pub fn enable(&self) {
        let wake = self.shared.batch.enable(Instant::now());
        self.shared.wake(wake);
    }

    /// Whether the worker may run (not between [`disable`](Self::disable) and
    /// [`enable`](Self::enable)).
    pub fn is_enabled(&self) -> bool {
        self.shared.batch.is_enabled()
    }

    /// Sets the delay that the next batch's first push arms (a batch already armed keeps its
    /// deadline). Zero runs the worker at once; clamped to one hour.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.batch.set_delay(delay);
    }

    /// Re-pins the worker thread to `cpus` (`None`: unpinned, every CPU the cpuset allows). The
    /// worker applies it at its next wake-up, which this causes. An invalid list (empty, or a CPU
    /// beyond `cpu_set_t`) is logged and ignored.
    pub fn set_cpus(&self, cpus: Option<Vec<usize>>) {
        if let Some(list) = &cpus {
            if let Err(e) = sys::validate_cpus(list) {
                log::warn!("{}: set_cpus({list:?}) ignored: {e}", self.shared.name);
                return;
            }
        }
        {
            let mut req = lock(&self.shared.cpus);
            req.cpus = cpus;
            req.changed = true;
        }
        self.shared.kick();
    }

    /// Items waiting in the batch now.
    pub fn pending(&self) -> usize {
        self.shared.batch.counts().1
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let (pushed, pending) = self.shared.batch.counts();
        let enabled = self.shared.batch.is_enabled();
        let mut stats = lock(&self.shared.stats).snapshot(pushed, pending as u64, enabled);
        stats.deferred_in_task = self.shared.deferred_in_task.load(Ordering::Relaxed);
        stats
    }

    /// Stops the worker thread (letting a pass in progress finish) and drains what is left on
    /// the caller's thread. Idempotent; also run on drop. Items pushed afterwards are completed
    /// only by an explicit [`drain`](Self::drain) or by drop.
    pub fn shutdown(&self) {
        let worker = lock(&self.worker).take();
        if let Some(worker) = worker {
            self.shared.batch.stop();
            self.shared.kick();
            if worker.thread().id() == thread::current().id() {
                log::warn!(
                    "{}: shutdown from its own handler: not joined",
                    self.shared.name
                );
            } else if worker.join().is_err() {
                log::error!("{}: the deferred worker panicked", self.shared.name);
            }
        }
        self.drain();
    }
}

impl<T: Send + 'static> Drop for DeferredCompletions<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl<T: Send + 'static> std::fmt::Debug for DeferredCompletions<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredCompletions")
            .field("name", &self.shared.name)
            .field("enabled", &self.is_enabled())
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::thread::ThreadId;

    /// Records what it completed, in which batch, on which thread; optionally sleeps per batch.
    #[derive(Default)]
    struct Recording {
        ids: Mutex<Vec<u64>>,
        batch_sizes: Mutex<Vec<usize>>,
        threads: Mutex<Vec<ThreadId>>,
        affinity: Mutex<Vec<Vec<usize>>>,
        sleep: Mutex<Duration>,
        entered: AtomicBool,
        finished: AtomicBool,
    }

    impl BatchHandler<u64> for Recording {
        fn complete_batch(&self, batch: &mut Vec<u64>) {
            self.entered.store(true, Ordering::SeqCst);
            lock(&self.batch_sizes).push(batch.len());
            lock(&self.threads).push(thread::current().id());
            if let Ok(set) = sys::current_affinity() {
                lock(&self.affinity).push(sys::cpus_of(&set));
            }
            let sleep = *lock(&self.sleep);
            if !sleep.is_zero() {
                thread::sleep(sleep);
            }
            lock(&self.ids).extend(batch.drain(..));
            self.finished.store(true, Ordering::SeqCst);
        }
    }

    impl Recording {
        fn count(&self) -> usize {
            lock(&self.ids).len()
        }
    }

    fn config(delay: Duration) -> Config {
        Config {
            delay,
            name: "test-compl".into(),
            ..Config::default()
        }
    }

    fn setup(delay: Duration) -> (Arc<Recording>, DeferredCompletions<u64>) {
        let rec = Arc::new(Recording::default());
        let dc = DeferredCompletions::new(config(delay), rec.clone()).expect("new");
        (rec, dc)
    }

    fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            thread::sleep(Duration::from_micros(200));
        }
        cond()
    }

    #[test]
    fn items_from_many_producers_complete_exactly_once() {
        const PRODUCERS: u64 = 4;
        const EACH: u64 = 5_000;
        let rec = Arc::new(Recording::default());
        let dc = Arc::new(
            DeferredCompletions::new(
                Config {
                    delay: Duration::from_micros(50),
                    budget: Duration::from_micros(200),
                    ..config(Duration::ZERO)
                },
                rec.clone(),
            )
            .expect("new"),
        );
        let producing = Arc::new(AtomicBool::new(true));
        // Unplug/plug churn while the producers push and the worker drains.
        let churn = {
            let (dc, producing) = (dc.clone(), producing.clone());
            thread::spawn(move || {
                let mut drained = 0;
                while producing.load(Ordering::SeqCst) {
                    dc.disable();
                    drained += dc.drain();
                    dc.enable();
                    thread::sleep(Duration::from_micros(300));
                }
                drained
            })
        };
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let dc = dc.clone();
                thread::spawn(move || {
                    for i in 0..EACH {
                        dc.push(p * EACH + i);
                        if i % 64 == 0 {
                            thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().expect("producer");
        }
        producing.store(false, Ordering::SeqCst);
        let churn_drained = churn.join().expect("churn");

        assert!(wait_until(Duration::from_secs(10), || rec.count()
            == (PRODUCERS * EACH) as usize));
        dc.shutdown();
        let mut seen: HashMap<u64, u32> = HashMap::new();
        for id in lock(&rec.ids).iter() {
            *seen.entry(*id).or_default() += 1;
        }
        assert_eq!(seen.len() as u64, PRODUCERS * EACH, "items lost");
        assert!(seen.values().all(|&n| n == 1), "an item completed twice");
        let stats = dc.stats();
        assert_eq!(stats.pushed, PRODUCERS * EACH);
        assert_eq!(stats.completed + stats.drained, PRODUCERS * EACH);
        assert_eq!(stats.drained, churn_drained as u64);
        assert!(stats.batches > 0);
    }

    #[test]
    fn quick_pushes_under_a_delay_complete_in_few_batches() {
        let (rec, dc) = setup(Duration::from_millis(20));
        for id in 0..100 {
            dc.push(id);
        }
        assert!(wait_until(Duration::from_secs(2), || rec.count() == 100));
        let sizes = lock(&rec.batch_sizes).clone();
        assert!(sizes.len() <= 3, "batches: {sizes:?}");
        assert!(sizes[0] >= 34, "the first batch holds most: {sizes:?}");
        let stats = dc.stats();
        assert_eq!(stats.batches, sizes.len() as u64);
        assert_eq!(
            stats.max_batch,
            *sizes.iter().max().expect("a batch") as u64
        );
        assert!(stats.mean_batch >= 33.0);
        assert!(stats.latency_p50 >= Duration::from_millis(15), "{stats:?}");
        assert!(stats.latency_p99 >= stats.latency_p50);
    }

    #[test]
    fn a_heavy_batch_is_taken_before_its_delay() {
        let rec = Arc::new(Recording::default());
        let dc = DeferredCompletions::new(
            Config {
                max_weight: 1 << 20,
                ..config(Duration::from_secs(30))
            },
            rec.clone(),
        )
        .expect("new");
        // Light items wait for the 30 s delay ...
        dc.push_weighted(1, 4096);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(rec.count(), 0);
        // ... until the batch weighs 1 MiB: then it goes at once, as one batch.
        dc.push_weighted(2, 1 << 20);
        assert!(wait_until(Duration::from_secs(2), || rec.count() == 2));
        assert_eq!(lock(&rec.batch_sizes).clone(), vec![2]);
    }

    #[test]
    fn zero_delay_completes_promptly() {
        let (rec, dc) = setup(Duration::ZERO);
        let start = Instant::now();
        dc.push(1);
        assert!(wait_until(Duration::from_secs(1), || rec.count() == 1));
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "{:?}",
            start.elapsed()
        );
        assert_ne!(lock(&rec.threads)[0], thread::current().id());
    }

    #[test]
    fn disable_waits_for_a_running_handler() {
        let (rec, dc) = setup(Duration::ZERO);
        *lock(&rec.sleep) = Duration::from_millis(200);
        dc.push(1);
        assert!(wait_until(Duration::from_secs(1), || rec
            .entered
            .load(Ordering::SeqCst)));
        let start = Instant::now();
        dc.disable();
        assert!(
            rec.finished.load(Ordering::SeqCst),
            "disable returned mid-pass"
        );
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(!dc.is_enabled());
        assert_eq!(rec.count(), 1);
    }

    #[test]
    fn pushes_after_disable_wait_for_drain_on_the_callers_thread() {
        let (rec, dc) = setup(Duration::from_millis(1));
        dc.disable();
        for id in 0..10 {
            dc.push(id);
        }
        thread::sleep(Duration::from_millis(30));
        assert_eq!(rec.count(), 0, "the disabled worker completed items");
        assert_eq!(dc.pending(), 10);
        assert_eq!(dc.drain(), 10);
        assert_eq!(rec.count(), 10);
        assert_eq!(*lock(&rec.threads), vec![thread::current().id()]);
        assert_eq!(dc.drain(), 0);
        let stats = dc.stats();
        assert_eq!((stats.drains, stats.drained, stats.batches), (1, 10, 0));
        assert!(!stats.enabled);
    }

    #[test]
    fn enable_rearms_and_completes_pending_items() {
        let (rec, dc) = setup(Duration::from_secs(60));
        dc.disable();
        for id in 0..5 {
            dc.push(id);
        }
        thread::sleep(Duration::from_millis(10));
        assert_eq!(rec.count(), 0);
        dc.enable();
        // At once, not after the 60 s delay.
        assert!(wait_until(Duration::from_secs(1), || rec.count() == 5));
        assert_ne!(lock(&rec.threads)[0], thread::current().id());
        assert!(dc.is_enabled());
    }

    #[test]
    fn shutdown_drains_and_drop_completes_later_pushes() {
        let rec = Arc::new(Recording::default());
        let dc =
            DeferredCompletions::new(config(Duration::from_secs(60)), rec.clone()).expect("new");
        for id in 0..5 {
            dc.push(id);
        }
        dc.shutdown();
        assert_eq!(rec.count(), 5);
        assert_eq!(dc.stats().drained, 5);
        dc.shutdown();
        dc.push(5);
        drop(dc);
        assert_eq!(rec.count(), 6);
    }

    #[test]
    fn complete_in_task_defers_only_when_asked() {
        let (rec, dc) = setup(Duration::ZERO);
        assert_eq!(dc.complete_in_task(1, |_| false), Some(1));
        assert_eq!(dc.complete_in_task(2, |&id| id == 2), None);
        assert!(wait_until(Duration::from_secs(1), || rec.count() == 1));
        assert_eq!(*lock(&rec.ids), vec![2]);
        let stats = dc.stats();
        assert_eq!((stats.pushed, stats.deferred_in_task), (1, 1));
    }

    #[test]
    fn a_pass_past_its_budget_rearms_instead_of_looping() {
        let rec = Arc::new(Recording::default());
        *lock(&rec.sleep) = Duration::from_millis(2);
        let dc = DeferredCompletions::new(
            Config {
                budget: Duration::ZERO,
                ..config(Duration::ZERO)
            },
            rec.clone(),
        )
        .expect("new");
        for id in 0..40 {
            dc.push(id);
            thread::sleep(Duration::from_micros(500));
        }
        assert!(wait_until(Duration::from_secs(2), || rec.count() == 40));
        let stats = dc.stats();
        assert!(stats.rearms > 0, "{stats:?}");
        assert_eq!(stats.completed, 40);
    }

    #[test]
    fn the_worker_is_pinned_and_repinned_live() {
        let allowed = sys::cpus_of(&sys::current_affinity().expect("affinity"));
        let rec = Arc::new(Recording::default());
        let dc = DeferredCompletions::new(
            Config {
                cpus: Some(vec![allowed[0]]),
                ..config(Duration::ZERO)
            },
            rec.clone(),
        )
        .expect("new");
        dc.push(0);
        assert!(wait_until(Duration::from_secs(1), || rec.count() == 1));
        assert_eq!(lock(&rec.affinity)[0], vec![allowed[0]]);

        let mut expected = 1;
        if let Some(&other) = allowed.get(1) {
            dc.set_cpus(Some(vec![other]));
            dc.push(1);
            expected += 1;
            assert!(wait_until(Duration::from_secs(1), || rec.count() == expected));
            assert_eq!(lock(&rec.affinity)[1], vec![other]);
        }
        dc.set_cpus(None);
        dc.push(2);
        expected += 1;
        assert!(wait_until(Duration::from_secs(1), || rec.count() == expected));
        assert_eq!(*lock(&rec.affinity).last().expect("a batch"), allowed);
        // Invalid lists are refused, the pinning kept.
        dc.set_cpus(Some(vec![]));
    }

    #[test]
    fn invalid_config_is_an_error() {
        let rec: Arc<dyn BatchHandler<u64>> = Arc::new(Recording::default());
        let no_cpus = Config {
            cpus: Some(vec![]),
            ..Config::default()
        };
        assert!(matches!(
            DeferredCompletions::new(no_cpus, rec.clone()),
            Err(Error::NoCpus)
        ));
        let bad_name = Config {
            name: "a\0b".into(),
            ..Config::default()
        };
        assert!(matches!(
            DeferredCompletions::new(bad_name, rec),
            Err(Error::ThreadName(_))
        ));
    }

    #[test]
    fn a_closure_is_a_handler() {
        let count = Arc::new(AtomicU64::new(0));
        let handler = {
            let count = count.clone();
            move |batch: &mut Vec<u64>| {
                count.fetch_add(batch.drain(..).count() as u64, Ordering::SeqCst);
            }
        };
        let dc = DeferredCompletions::new(config(Duration::ZERO), Arc::new(handler)).expect("new");
        dc.push(1);
        dc.push(2);
        drop(dc);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_handler_that_leaves_items_does_not_stall_the_worker() {
        let calls = Arc::new(AtomicU64::new(0));
        let handler = {
            let calls = calls.clone();
            move |_: &mut Vec<u64>| {
                calls.fetch_add(1, Ordering::SeqCst);
            }
        };
        let dc = DeferredCompletions::new(config(Duration::ZERO), Arc::new(handler)).expect("new");
        dc.push(1);
        assert!(wait_until(Duration::from_secs(1), || calls
            .load(Ordering::SeqCst)
            == 1));
        dc.push(2);
        assert!(wait_until(Duration::from_secs(1), || calls
            .load(Ordering::SeqCst)
            == 2));
        assert_eq!(dc.pending(), 0);
    }

    #[test]
    fn handler_calling_drain_and_disable_does_not_deadlock() {
        let slot: Arc<Mutex<Option<Arc<DeferredCompletions<u64>>>>> = Arc::default();
        let done = Arc::new(AtomicU64::new(0));
        let handler = {
            let (slot, done) = (slot.clone(), done.clone());
            move |batch: &mut Vec<u64>| {
                let dc = lock(&slot).clone();
                if let Some(dc) = dc {
                    assert_eq!(dc.drain(), 0);
                    dc.disable();
                }
                done.fetch_add(batch.drain(..).count() as u64, Ordering::SeqCst);
            }
        };
        let dc = Arc::new(
            DeferredCompletions::new(config(Duration::ZERO), Arc::new(handler)).expect("new"),
        );
        *lock(&slot) = Some(dc.clone());
        dc.push(1);
        assert!(wait_until(Duration::from_secs(1), || done
            .load(Ordering::SeqCst)
            == 1));
        assert!(!dc.is_enabled());
        lock(&slot).take();
    }
}
