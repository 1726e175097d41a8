//! The batch: the one piece of state that the producers (the queue thread's fast path), the
//! deferred worker and [`drain`](crate::DeferredCompletions::drain) share: the pending items
//! together with the worker's enable/disable state, so that one lock orders every transition
//! between them.
//!
//! Every transition is one short critical section on one mutex, and the handler never runs under
//! it: a pass moves the whole list out (swapping it with a spare `Vec`, so no allocation in steady
//! state), runs without the lock, and hands the emptied `Vec` back when it ends. At most one pass
//! runs at a time (`runner`), whichever thread runs it, so an item is completed exactly once and
//! the completions of two passes never interleave.
//!
//! This module knows nothing of timers or threads: a push or an enable returns a [`Wake`] that the
//! caller turns into a timerfd arm or an eventfd kick; a worker pass starts with
//! [`Batch::take_for_worker`]. That keeps the hand-off small enough to model-check with `loom`
//! (the tests at the end of this file, under `--cfg loom`).
//!
//! The wake-up invariant: while the batch is enabled and not empty, `due` is set and a wake-up at
//! or after `due` is pending (a timer, a kick, or a worker already in its take loop). Only a push
//! that sets `due`, an enable, or a worker cut short by its budget issue a wake-up; a worker woken
//! before `due` re-arms its timer for the rest, so a stale timer arm can cost latency, never an
//! item.

use std::mem;
use std::time::{Duration, Instant};

use crate::sync::{self, Condvar, Mutex, MutexGuard, ThreadId};

/// Longest delay honoured; longer ones are clamped to it (keeps `Instant + delay` in range).
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(3600);

/// What the caller must do, after a transition, so that the worker wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Nothing: a wake-up is already pending, or the worker is disabled or stopped.
    None,
    /// Arm the worker's timer to fire after this delay.
    After(Duration),
    /// Wake the worker at once.
    Now,
}

/// What [`Batch::take_for_worker`] found.
pub(crate) enum Take<'a, T> {
    /// A pass: run the handler on its items, then drop it.
    Run(Pass<'a, T>),
    /// The batch is armed but not due for this long: re-arm the timer for it.
    NotYet(Duration),
    /// Nothing to do: empty, not armed, or disabled.
    Idle,
    /// The worker was asked to exit.
    Stop,
}

/// The state under the batch's mutex.
struct State<T> {
    /// Items pushed and not yet taken by a pass.
    items: Vec<T>,
    /// Push time of each of `items`, same order (for the latency histogram).
    stamps: Vec<Instant>,
    /// The emptied lists of the last pass, swapped in at the next take.
    spare_items: Vec<T>,
    /// The spare of `stamps`.
    spare_stamps: Vec<Instant>,
    /// The worker may run passes.
    enabled: bool,
    /// The worker has been asked to exit.
    stopped: bool,
    /// When the armed worker is due to take the batch; `None` when not armed.
    due: Option<Instant>,
    /// The delay a push arms.
    delay: Duration,
    /// The thread running a pass, if any.
    runner: Option<ThreadId>,
    /// Items pushed since creation.
    pushed: u64,
    /// Summed weight of `items` (the work they stand for, in the owner's unit).
    weight: u64,
    /// Weight at which a push makes the batch due at once; 0: never.
    max_weight: u64,
}

/// A batch of finished requests waiting for their deferred completion.
pub(crate) struct Batch<T> {
    state: Mutex<State<T>>,
    /// Notified when a pass ends or the worker is stopped.
    pass_done: Condvar,
}

impl<T> Batch<T> {
    /// An empty, enabled batch whose pushes arm `delay`, taken at once when its items weigh
    /// `max_weight` (0: weight never hurries it).
    pub(crate) fn new(delay: Duration, max_weight: u64) -> Self {
        Self {
            state: Mutex::new(State {
                items: Vec::with_capacity(64),
                stamps: Vec::with_capacity(64),
                spare_items: Vec::with_capacity(64),
                spare_stamps: Vec::with_capacity(64),
                enabled: true,
                stopped: false,
                due: None,
                delay: delay.min(MAX_DELAY),
                runner: None,
                pushed: 0,
                weight: 0,
                max_weight,
            }),
            pass_done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State<T>>) -> MutexGuard<'a, State<T>> {
        self.pass_done
            .wait(guard)
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a finished item; arms the worker when it was not armed.
    pub(crate) fn push(&self, item: T, now: Instant) -> Wake {
        self.push_weighted(item, 0, now)
    }

    /// [`push`](Self::push) for an item that stands for `weight` of the handler's work: once the
    /// batch weighs `max_weight`, it is due at once, as with [`push_urgent`](Self::push_urgent).
    pub(crate) fn push_weighted(&self, item: T, weight: u64, now: Instant) -> Wake {
        let mut st = self.lock();
        st.weight = st.weight.saturating_add(weight);
        if st.max_weight != 0 && st.weight >= st.max_weight {
            return Self::push_urgent_locked(st, item, now);
        }
        st.items.push(item);
        st.stamps.push(now);
        st.pushed += 1;
        if !st.enabled || st.stopped || st.due.is_some() {
            return Wake::None;
        }
        st.due = Some(now + st.delay);
        if st.delay.is_zero() {
            Wake::Now
        } else {
            Wake::After(st.delay)
        }
    }

    /// Adds a finished item that should not wait for company: makes the batch due now (an
    /// earlier arm's later deadline included) and asks for an immediate wake-up.
    pub(crate) fn push_urgent(&self, item: T, now: Instant) -> Wake {
        Self::push_urgent_locked(self.lock(), item, now)
    }

    fn push_urgent_locked(mut st: MutexGuard<'_, State<T>>, item: T, now: Instant) -> Wake {
        st.items.push(item);
        st.stamps.push(now);
        st.pushed += 1;
        if !st.enabled || st.stopped || st.due.is_some_and(|due| due <= now) {
            return Wake::None;
        }
        st.due = Some(now);
        Wake::Now
    }

    /// Starts a worker pass if the worker may run one. Waits for a pass running on another thread
    /// (a `drain()`) to end first. Without `force`, takes the batch only once it is due; with it
    /// (the worker looping within its budget), whenever it is not empty.
    pub(crate) fn take_for_worker(&self, force: bool) -> Take<'_, T> {
        let mut st = self.lock();
        loop {
            if st.stopped {
                return Take::Stop;
            }
            if !st.enabled {
                return Take::Idle;
            }
            if st.runner.is_none() {
                break;
            }
            st = self.wait(st);
        }
        if st.items.is_empty() {
            st.due = None;
            return Take::Idle;
        }
        if !force {
            let Some(due) = st.due else {
                return Take::Idle;
            };
            let now = Instant::now();
            if due > now {
                return Take::NotYet(due - now);
            }
        }
        st.due = None;
        Take::Run(self.begin(st))
    }

    /// Starts a pass on the caller's thread, whether or not the worker is enabled, after any
    /// running pass has ended. `None` when the batch is empty, or when called from inside a pass
    /// (a handler draining its own batch would deadlock; its caller completes that batch anyway).
    pub(crate) fn take_for_drain(&self) -> Option<Pass<'_, T>> {
        let me = sync::current_thread_id();
        let mut st = self.lock();
        while let Some(runner) = st.runner {
            if runner == me {
                log::warn!("drain() called from inside a batch handler: ignored");
                return None;
            }
            st = self.wait(st);
        }
        if st.items.is_empty() {
            return None;
        }
        Some(self.begin(st))
    }

    fn begin<'a>(&'a self, mut st: MutexGuard<'_, State<T>>) -> Pass<'a, T> {
        let spare_items = mem::take(&mut st.spare_items);
        let spare_stamps = mem::take(&mut st.spare_stamps);
        let items = mem::replace(&mut st.items, spare_items);
        let stamps = mem::replace(&mut st.stamps, spare_stamps);
        st.weight = 0;
        st.runner = Some(sync::current_thread_id());
        Pass {
            batch: self,
            items,
            stamps,
        }
    }

    /// Keeps the worker from starting passes and waits for a running pass to end (unless the
    /// caller is running it). Pushes still land in the batch.
    pub(crate) fn disable(&self) {
        let me = sync::current_thread_id();
        let mut st = self.lock();
        st.enabled = false;
        st.due = None;
        while let Some(runner) = st.runner {
            if runner == me {
                break;
            }
            st = self.wait(st);
        }
    }

    /// Lets the worker run again; arms it at once when items are waiting.
    pub(crate) fn enable(&self, now: Instant) -> Wake {
        let mut st = self.lock();
        st.enabled = true;
        if st.stopped || st.items.is_empty() || st.due.is_some() {
            return Wake::None;
        }
        st.due = Some(now);
        Wake::Now
    }

    /// Arms the worker at once if items are waiting (a pass cut short by its budget).
    pub(crate) fn rearm_now(&self, now: Instant) -> Wake {
        let mut st = self.lock();
        if !st.enabled || st.stopped || st.items.is_empty() {
            return Wake::None;
        }
        st.due = Some(now);
        Wake::Now
    }

    /// Asks the worker to exit; it sees [`Take::Stop`] at its next take.
    pub(crate) fn stop(&self) {
        self.lock().stopped = true;
        self.pass_done.notify_all();
    }

    /// Sets the delay later pushes arm (clamped to [`MAX_DELAY`]).
    pub(crate) fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay.min(MAX_DELAY);
    }

    /// Whether the worker may run passes.
    pub(crate) fn is_enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Items pushed since creation, and items waiting now.
    pub(crate) fn counts(&self) -> (u64, usize) {
        let st = self.lock();
        (st.pushed, st.items.len())
    }
}

/// One pass over a taken batch: the items are the caller's until it is dropped, which hands the
/// emptied lists back as the spare and lets the next pass (or a waiting `disable()`) go on.
pub(crate) struct Pass<'a, T> {
    batch: &'a Batch<T>,
    items: Vec<T>,
    stamps: Vec<Instant>,
}

impl<T> Pass<'_, T> {
    /// The taken items, for the handler to drain.
    pub(crate) fn items(&mut self) -> &mut Vec<T> {
        &mut self.items
    }

    /// Push time of each item taken, in push order.
    pub(crate) fn stamps(&self) -> &[Instant] {
        &self.stamps
    }
}

impl<T> Drop for Pass<'_, T> {
    fn drop(&mut self) {
        // Whatever a handler left is dropped here, outside the lock.
        self.items.clear();
        self.stamps.clear();
        let mut st = self.batch.lock();
        st.spare_items = mem::take(&mut self.items);
        st.spare_stamps = mem::take(&mut self.stamps);
        st.runner = None;
        drop(st);
        self.batch.pass_done.notify_all();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ids(pass: &mut Pass<'_, u32>) -> Vec<u32> {
        pass.items().drain(..).collect()
    }

    #[test]
    fn first_push_arms_the_delay_later_ones_do_not() {
        let batch = Batch::new(Duration::from_millis(5), 0);
        let now = Instant::now();
        assert_eq!(batch.push(1u32, now), Wake::After(Duration::from_millis(5)));
        assert_eq!(batch.push(2, now), Wake::None);
        assert!(matches!(batch.take_for_worker(false), Take::NotYet(_)));
    }

    #[test]
    fn zero_delay_push_wakes_now_and_is_due_at_once() {
        let batch = Batch::new(Duration::ZERO, 0);
        assert_eq!(batch.push(7u32, Instant::now()), Wake::Now);
        let Take::Run(mut pass) = batch.take_for_worker(false) else {
            panic!("expected a pass");
        };
        assert_eq!(ids(&mut pass), vec![7]);
    }

    #[test]
    fn urgent_push_makes_an_armed_batch_due_now() {
        let batch = Batch::new(Duration::from_millis(50), 0);
        let now = Instant::now();
        assert_eq!(
            batch.push(1u32, now),
            Wake::After(Duration::from_millis(50))
        );
        assert_eq!(batch.push_urgent(2, now), Wake::Now);
        // Due now: a second urgent push needs no second kick.
        assert_eq!(batch.push_urgent(3, now), Wake::None);
        let Take::Run(mut pass) = batch.take_for_worker(false) else {
            panic!("an urgent push makes the batch due at once");
        };
        assert_eq!(ids(&mut pass), vec![1, 2, 3]);
    }

    #[test]
    fn a_batch_that_reaches_its_weight_is_due_at_once() {
        let batch = Batch::new(Duration::from_millis(50), 100);
        let now = Instant::now();
        assert_eq!(
            batch.push_weighted(1u32, 40, now),
            Wake::After(Duration::from_millis(50))
        );
        assert_eq!(batch.push_weighted(2, 40, now), Wake::None);
        assert!(matches!(batch.take_for_worker(false), Take::NotYet(_)));
        // 120 >= 100: due now, one kick.
        assert_eq!(batch.push_weighted(3, 40, now), Wake::Now);
        let Take::Run(mut pass) = batch.take_for_worker(false) else {
            panic!("a batch at its weight is due at once");
        };
        assert_eq!(ids(&mut pass), vec![1, 2, 3]);
        drop(pass);
        // The taken items' weight left with them: the next batch starts light.
        assert_eq!(
            batch.push_weighted(4, 40, now),
            Wake::After(Duration::from_millis(50))
        );
    }

    #[test]
    fn weight_never_hurries_a_batch_without_a_max_weight() {
        let batch = Batch::new(Duration::from_millis(50), 0);
        let now = Instant::now();
        assert_eq!(
            batch.push_weighted(1u32, u64::MAX, now),
            Wake::After(Duration::from_millis(50))
        );
        assert_eq!(batch.push_weighted(2, u64::MAX, now), Wake::None);
        assert!(matches!(batch.take_for_worker(false), Take::NotYet(_)));
    }

    #[test]
    fn urgent_push_while_disabled_waits_for_enable() {
        let batch = Batch::new(Duration::from_millis(50), 0);
        batch.disable();
        assert_eq!(batch.push_urgent(1u32, Instant::now()), Wake::None);
    }

    #[test]
    fn push_after_take_arms_again() {
        let batch = Batch::new(Duration::ZERO, 0);
        batch.push(1u32, Instant::now());
        let Take::Run(pass) = batch.take_for_worker(false) else {
            panic!("expected a pass");
        };
        assert_eq!(batch.push(2, Instant::now()), Wake::Now);
        drop(pass);
        assert!(matches!(batch.take_for_worker(false), Take::Run(_)));
    }

    #[test]
    fn disabled_batch_takes_nothing_and_enable_wakes_now() {
        let batch = Batch::new(Duration::ZERO, 0);
        batch.disable();
        assert_eq!(batch.push(1u32, Instant::now()), Wake::None);
        assert!(matches!(batch.take_for_worker(true), Take::Idle));
        assert_eq!(batch.enable(Instant::now()), Wake::Now);
        assert!(matches!(batch.take_for_worker(false), Take::Run(_)));
    }

    #[test]
    fn drain_ignores_disable_and_empty_batch_gives_no_pass() {
        let batch = Batch::new(Duration::ZERO, 0);
        batch.disable();
        batch.push(1u32, Instant::now());
        let mut pass = batch.take_for_drain().expect("a pass");
        assert_eq!(ids(&mut pass), vec![1]);
        drop(pass);
        assert!(batch.take_for_drain().is_none());
    }

    #[test]
    fn drain_inside_a_pass_is_refused() {
        let batch = Batch::new(Duration::ZERO, 0);
        batch.push(1u32, Instant::now());
        let Take::Run(_pass) = batch.take_for_worker(false) else {
            panic!("expected a pass");
        };
        batch.push(2, Instant::now());
        assert!(batch.take_for_drain().is_none());
        // disable() from inside the pass does not wait for itself.
        batch.disable();
    }

    #[test]
    fn rearm_now_only_when_items_wait() {
        let batch = Batch::new(Duration::from_millis(50), 0);
        assert_eq!(batch.rearm_now(Instant::now()), Wake::None);
        batch.push(1u32, Instant::now());
        assert_eq!(batch.rearm_now(Instant::now()), Wake::Now);
        assert!(matches!(batch.take_for_worker(false), Take::Run(_)));
    }

    #[test]
    fn stopped_worker_takes_stop() {
        let batch = Batch::<u32>::new(Duration::ZERO, 0);
        batch.stop();
        assert!(matches!(batch.take_for_worker(false), Take::Stop));
        assert_eq!(batch.push(1, Instant::now()), Wake::None);
        assert_eq!(batch.counts(), (1, 1));
    }

    #[test]
    fn buffers_are_reused_across_passes() {
        let batch = Batch::new(Duration::ZERO, 0);
        for round in 0..4u32 {
            batch.push(round, Instant::now());
            let Take::Run(mut pass) = batch.take_for_worker(false) else {
                panic!("expected a pass");
            };
            assert!(pass.items().capacity() >= 64);
            pass.items().clear();
        }
    }
}

/// Model checks of the hand-off: `RUSTFLAGS="--cfg loom" cargo test -p completion --release loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
    use loom::sync::{Arc, Condvar, Mutex};
    use loom::thread;

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(4);
        }
        builder.check(f);
    }

    /// Marks each id's bit; a bit already set is a double completion. Bit 31 marks a pass in
    /// progress: finding it set means two passes overlap.
    fn complete(done: &AtomicU32, pass: &mut Pass<'_, u32>) {
        const IN_PASS: u32 = 1 << 31;
        assert_eq!(
            done.fetch_or(IN_PASS, SeqCst) & IN_PASS,
            0,
            "passes overlap"
        );
        for id in pass.items().drain(..) {
            let old = done.fetch_or(1 << id, SeqCst);
            assert_eq!(old & (1 << id), 0, "item {id} completed twice");
        }
        done.fetch_and(!IN_PASS, SeqCst);
    }

    /// A `drain()` racing an enabled worker: each item once, the two passes never overlap.
    #[test]
    fn loom_drain_racing_the_worker_never_overlaps_or_doubles() {
        model(|| {
            let batch = Arc::new(Batch::<u32>::new(Duration::ZERO, 0));
            let done = Arc::new(AtomicU32::new(0));
            let producer = {
                let batch = batch.clone();
                thread::spawn(move || {
                    batch.push(0, Instant::now());
                    batch.push(1, Instant::now());
                })
            };
            let worker = {
                let (batch, done) = (batch.clone(), done.clone());
                thread::spawn(move || {
                    for force in [false, true] {
                        if let Take::Run(mut pass) = batch.take_for_worker(force) {
                            complete(&done, &mut pass);
                        }
                    }
                })
            };
            while let Some(mut pass) = batch.take_for_drain() {
                complete(&done, &mut pass);
            }
            producer.join().expect("producer");
            worker.join().expect("worker");
            while let Some(mut pass) = batch.take_for_drain() {
                complete(&done, &mut pass);
            }
            assert_eq!(done.load(SeqCst), 0b11);
        });
    }

    /// Producer pushes, the worker takes, the "unplug" disables then drains: every item completed
    /// exactly once, and no worker pass is still running, or starts, once `disable()` returned.
    #[test]
    fn loom_push_take_disable_drain_completes_each_item_once() {
        model(|| {
            let batch = Arc::new(Batch::<u32>::new(Duration::ZERO, 0));
            let done = Arc::new(AtomicU32::new(0));
            let disabled = Arc::new(AtomicBool::new(false));

            let producer = {
                let batch = batch.clone();
                thread::spawn(move || {
                    batch.push(0, Instant::now());
                    batch.push(1, Instant::now());
                })
            };
            let worker = {
                let (batch, done, disabled) = (batch.clone(), done.clone(), disabled.clone());
                thread::spawn(move || {
                    for force in [false, true] {
                        if let Take::Run(mut pass) = batch.take_for_worker(force) {
                            complete(&done, &mut pass);
                            assert!(!disabled.load(SeqCst), "worker ran past disable()");
                        }
                    }
                })
            };

            batch.disable();
            disabled.store(true, SeqCst);
            while let Some(mut pass) = batch.take_for_drain() {
                complete(&done, &mut pass);
            }
            producer.join().expect("producer");
            worker.join().expect("worker");
            // What the producer pushed after our drain is left for the next one.
            while let Some(mut pass) = batch.take_for_drain() {
                complete(&done, &mut pass);
            }
            assert_eq!(done.load(SeqCst), 0b11);
        });
    }

    /// The wake-up protocol: with the worker sleeping on a doorbell (the eventfd), every item
    /// pushed is completed by the worker, across a disable/enable in between, without a drain.
    /// A lost wake-up shows as a deadlock.
    #[test]
    fn loom_push_and_enable_never_lose_a_wakeup() {
        model(|| {
            let batch = Arc::new(Batch::<u32>::new(Duration::ZERO, 0));
            let bell = Arc::new((Mutex::new(false), Condvar::new()));
            let ring = |bell: &(Mutex<bool>, Condvar), wake: Wake| {
                if wake != Wake::None {
                    *bell.0.lock().expect("bell") = true;
                    bell.1.notify_one();
                }
            };

            let producer = {
                let (batch, bell) = (batch.clone(), bell.clone());
                thread::spawn(move || {
                    ring(&bell, batch.push(0, Instant::now()));
                    ring(&bell, batch.push(1, Instant::now()));
                })
            };
            let worker = {
                let (batch, bell) = (batch.clone(), bell.clone());
                thread::spawn(move || {
                    let done = AtomicU32::new(0);
                    while done.load(SeqCst) != 0b11 {
                        let mut rung = bell.0.lock().expect("bell");
                        while !*rung {
                            rung = bell.1.wait(rung).expect("bell");
                        }
                        *rung = false;
                        drop(rung);
                        let mut force = false;
                        while let Take::Run(mut pass) = batch.take_for_worker(force) {
                            complete(&done, &mut pass);
                            force = true;
                        }
                    }
                })
            };

            batch.disable();
            ring(&bell, batch.enable(Instant::now()));
            producer.join().expect("producer");
            worker.join().expect("worker");
        });
    }
}
