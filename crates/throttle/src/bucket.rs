//! The token buckets: one lock-free bucket per limit, shared by a device's queue threads, and a
//! fair share of them per queue.
//!
//! # One atomic per bucket
//!
//! Each bucket is a virtual-scheduling leaky bucket (the "generic cell rate algorithm"): its
//! whole state is one `AtomicU64`, the *theoretical arrival time* (TAT) on the `CLOCK_MONOTONIC`
//! time line, in nanoseconds. A request that costs `c` units of a bucket of rate `r` per second
//! advances the TAT by `c / r` seconds, starting from now if the TAT lies in the past (an idle
//! bucket is a full one, never fuller). The request may go while the TAT is less than `τ` ahead
//! of now, where `τ` is the bucket's size in time: `bucket units / r`. That is exactly QEMU's
//! leaky bucket (a level that leaks at `r` and may not exceed the bucket), with the level stored
//! as the time at which it will have leaked away, so refilling costs nothing: it is the clock.
//!
//! Taking tokens is two wait-free atomic operations per bucket (`fetch_max(now)` then
//! `fetch_add(cost)`), so that queue threads never wait for each other, not even for a short
//! lock. A request checks every bucket it is subject to first, then takes from all of them; two
//! threads racing between check and take both go, and the bucket runs that much into debt,
//! which the requests after them pay: nothing is ever lost, so the long-run rate is exact. For
//! the same reason a request larger than the bucket goes as soon as the bucket is full (it
//! would never fit otherwise): it is accounted, and the requests after it wait for it.
//!
//! A limit with a burst has two buckets, as in QEMU: one at the sustained rate holding
//! `max × max-length` units, and (for a `max-length` above 1) one at the burst rate holding a
//! tenth of a second of it, so that a burst lasts about `max-length` seconds at about `max`.
//!
//! # Fair share across queues
//!
//! A shared bucket alone serves whoever asks first: a queue thread that is busy all the time
//! would take every token the moment it is due, and a queue whose thread wakes a little later
//! would find none, for ever. So while any queue waits for tokens, every queue is also held to
//! an equal share: with `k` queues waiting (itself included), a queue's requests also pass a
//! bucket of its own at `1/k` of the device's rate. Each request's cost there is its *dominant*
//! cost — the largest share of one second it takes of any device bucket it passes — so that a
//! queue of large requests and one of small requests each get half of the bucket that binds
//! them (dominant resource fairness). The share buckets are plain fields of each queue's own
//! handle; the only shared word is the count of waiting queues. With no queue waiting, nobody
//! pays for fairness: the share is checked only under contention.
//!
//! # Allowances
//!
//! Two atomic operations on a word every queue thread writes are cheap on one thread but not on
//! two: the word's cache line moves between the cores on every request. So a queue does not go
//! to the shared bucket for every request while the bucket is far from empty: a request that
//! goes there takes, in the same atomic operation, an *allowance* for the requests after it (a
//! sixteenth of the bucket, of at most a tenth of a second: 6.25 ms of the rate), and those
//! spend it from the queue's own handle without touching a shared word. The tokens are taken
//! from the bucket when the allowance is, so nothing goes beyond the limit; what a queue holds
//! counts as its own when it checks the bucket, so nothing is lost to it either. Three rules keep
//! the limit exactly where it was:
//!
//! - an allowance is taken only while no queue waits and the bucket stays at least half full
//!   after it: near the limit, or when a queue waits, every request goes to the shared bucket
//!   as before, with the fair share and the reserve;
//! - a queue gives back what it holds (one `fetch_update`) as soon as it sees a queue waiting,
//!   when its allowance is a millisecond old ([`ALLOWANCE_AGE_NS`]: tokens are never spent long
//!   after they were taken, so a queue that was idle cannot add its allowance to a bucket that
//!   refilled meanwhile), when its thread goes to sleep while a queue waits, and when it is
//!   dropped;
//! - a change of limits drops the allowances of the buckets it changes: their debt, the
//!   allowances included, is forgiven.
//!
//! At most the queues' allowances (a sixteenth of the bucket each) go ahead of the bucket's
//! level, each for at most a millisecond, and only while the bucket is more than half full.
//!
//! # Groups
//!
//! Every word the buckets share — the TATs, the count of waiting queues, the spec (under a
//! sequence counter) and its generation — lives in one [`SharedState`] of plain atomics in a
//! fixed layout, and the clock is `CLOCK_MONOTONIC`, the same in every process of the host. So
//! the backends of several disks share one limit by mapping one file holding a
//! [`SharedState`] ([`Buckets::join`]): no process is in another's request path, none leads,
//! and any member's `limits set` changes the group's limits.
//!
//! # Changes
//!
//! [`Buckets::set`] swaps in a new configuration (a short lock taken only by the control path)
//! and bumps a generation counter that each queue reads, relaxed, on every request; a bucket
//! whose rate changed forgives its debt, so a raised limit takes effect at once rather than
//! after the old limit's debt is paid.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::spec::{Limit, Scope, Spec, Unit};

/// Nanoseconds per second.
const NS: u128 = 1_000_000_000;
/// Size in time of a limit's bucket without a burst, and of a burst-rate bucket: a tenth of a
/// second, QEMU's choice.
const TENTH_NS: u64 = 100_000_000;
/// The last tokens of a bucket, in time, that queues share while any waits: the tokens a
/// waiting queue finds on its next wake (five of the shortest sleeps).
const RESERVE_NS: u64 = 5 * MIN_SLEEP_NS;
/// Size in time of a queue's fair-share bucket: five times the shortest sleep, so that a queue
/// waking every [`MIN_SLEEP_NS`] never loses its share to rounding.
const SHARE_TAU_NS: u64 = 5 * MIN_SLEEP_NS;
/// The shortest a queue thread waiting for tokens sleeps: tokens due sooner are taken together
/// on the next wake (the buckets hold far more than this much), so that a limit of 100k IOPS
/// costs 1000 wake-ups a second, not 100k.
pub const MIN_SLEEP_NS: u64 = 1_000_000;
/// The longest a queue thread waiting for tokens sleeps before looking again: the refill period
/// within which a change of limits, or a drain, reaches requests already waiting.
pub const MAX_SLEEP_NS: u64 = 10_000_000;
/// A queue's allowance from a bucket (tokens taken ahead, see "Allowances" above) is this
/// fraction of the bucket's size in time, of at most a tenth of a second: 1/16.
const ALLOWANCE_SHARE: u64 = 16;
/// How long a queue may keep an allowance before it gives back what is left: the tokens it
/// spends were taken from the bucket at most this long before.
const ALLOWANCE_AGE_NS: u64 = MIN_SLEEP_NS;

/// The current time on the `CLOCK_MONOTONIC` time line, in nanoseconds: the clock of every
/// bucket (the same in every process of the host).
pub fn now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec owned by this frame; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// When a queue thread waiting for tokens due at `due` should wake: no sooner than
/// [`MIN_SLEEP_NS`] and no later than [`MAX_SLEEP_NS`] from `now`.
pub fn next_wake(due: u64, now: u64) -> u64 {
    due.clamp(
        now.saturating_add(MIN_SLEEP_NS),
        now.saturating_add(MAX_SLEEP_NS),
    )
}

/// A request's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Counted against the read and total limits.
    Read,
    /// Counted against the write and total limits.
    Write,
}

/// What a request asks of the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    /// Its direction.
    pub dir: Dir,
    /// The bytes it moves (0 for a request that moves none, which costs one operation).
    pub bytes: u64,
}

/// Buckets per configuration: a sustained one and a burst-rate one per unit and scope.
const SLOTS: usize = 12;

/// One bucket as a configuration sets it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rate {
    /// Index of its TAT in [`SharedState::tats`].
    slot: usize,
    unit: Unit,
    /// Units per second.
    rate: u64,
    /// Size in time: the TAT may run this far ahead of now.
    tau: u64,
    /// Nanoseconds per unit (an operation, or a byte).
    per_unit: PerUnit,
    /// For an operation limit with `iops-size`: nanoseconds per byte of a larger request.
    per_sized_byte: PerUnit,
    /// The allowance a queue takes ahead from this bucket at once, in nanoseconds of its time.
    allowance: u64,
    /// For an operation limit: the cost of one operation (`per_unit.times(1)`).
    per_op: u64,
}

/// A cost per unit in nanoseconds as a 64.64 fixed-point number, computed once per change, so
/// that a request's cost is two multiplications rather than a 128-bit division.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct PerUnit {
    whole: u64,
    frac: u64,
}

impl PerUnit {
    /// `NS / den` nanoseconds per unit.
    fn new(den: u128) -> Self {
        let den = den.max(1);
        let rem = NS % den;
        Self {
            whole: saturate(NS / den),
            // `rem < den`, and every `den` here is below 2^64 (rates are bounded), so the
            // shift cannot overflow; were it ever larger, the fraction is dropped.
            frac: rem
                .checked_shl(64)
                .and_then(|r| u64::try_from(r / den).ok())
                .unwrap_or(0),
        }
    }

    /// The cost of `n` units, rounded up.
    #[inline]
    fn times(self, n: u64) -> u64 {
        let whole = n.saturating_mul(self.whole);
        let frac = (u128::from(n) * u128::from(self.frac)) >> 64;
        let round = u64::from(self.frac != 0);
        whole
            .saturating_add(frac as u64)
            .saturating_add(round)
            .min(u64::MAX / 4)
    }
}

/// An immutable configuration: the spec and, per direction, the buckets a request passes.
#[derive(Debug)]
struct Config {
    spec: Spec,
    /// Indexed by [`Dir`].
    rates: [Vec<Rate>; 2],
}

impl Config {
    fn new(spec: Spec) -> Self {
        let mut all = Vec::new();
        for (u, unit) in [Unit::Iops, Unit::Bps].into_iter().enumerate() {
            for (s, scope) in [Scope::Total, Scope::Read, Scope::Write]
                .into_iter()
                .enumerate()
            {
                let Some(limit) = spec.get(unit, scope) else {
                    continue;
                };
                let slot = u * 3 + s;
                let iops_size = spec.iops_size();
                all.push((
                    scope,
                    rate(slot, unit, limit.avg, main_tau(&limit), iops_size),
                ));
                if let (Some(max), true) = (limit.max, limit.max_length > 1) {
                    all.push((scope, rate(slot + 6, unit, max, TENTH_NS, iops_size)));
                }
            }
        }
        let of = |dir: Scope| -> Vec<Rate> {
            all.iter()
                .filter(|(scope, _)| *scope == Scope::Total || *scope == dir)
                .map(|(_, r)| *r)
                .collect()
        };
        Self {
            spec,
            rates: [of(Scope::Read), of(Scope::Write)],
        }
    }

    fn rate_of_slot(&self, slot: usize) -> Option<Rate> {
        self.rates
            .iter()
            .flatten()
            .find(|r| r.slot == slot)
            .copied()
    }
}

/// The size in time of a limit's sustained-rate bucket.
fn main_tau(limit: &Limit) -> u64 {
    match limit.max {
        None => TENTH_NS,
        Some(_) => saturate(limit.bucket_units() * NS / u128::from(limit.avg)),
    }
}

fn rate(slot: usize, unit: Unit, rate: u64, tau: u64, iops_size: Option<u64>) -> Rate {
    let per_unit = PerUnit::new(u128::from(rate));
    Rate {
        slot,
        unit,
        rate,
        tau,
        allowance: tau.min(TENTH_NS) / ALLOWANCE_SHARE,
        per_unit,
        per_op: per_unit.times(1),
        per_sized_byte: PerUnit::new(u128::from(iops_size.unwrap_or(1)) * u128::from(rate)),
    }
}

fn saturate(v: u128) -> u64 {
    // Leave headroom so that TAT + tau never wraps.
    u64::try_from(v).unwrap_or(u64::MAX / 4).min(u64::MAX / 4)
}

/// What `io` costs in a bucket, in nanoseconds of that bucket's time.
#[inline]
fn cost(rate: &Rate, io: Io, iops_size: Option<u64>) -> u64 {
    match rate.unit {
        Unit::Bps => rate.per_unit.times(io.bytes),
        Unit::Iops => match iops_size {
            // A large request counts as bytes / iops-size operations.
            Some(size) if io.bytes > size => rate.per_sized_byte.times(io.bytes),
            _ => rate.per_op,
        },
    }
}

/// A TAT on a cache line of its own: the queue threads of a device all write them.
#[derive(Debug, Default)]
#[repr(C, align(64))]
struct Tat(AtomicU64);

/// Words of an encoded [`Spec`] in [`SharedState`].
const SPEC_WORDS: usize = 19;
/// [`SharedState::header`]: nobody has set the state up yet (a new, zeroed file).
const HEADER_NEW: u64 = 0;
/// [`SharedState::header`]: a process is setting the state up.
const HEADER_BUSY: u64 = 1;
/// [`SharedState::header`]: set up, layout version 1.
const HEADER_READY: u64 = 0x7468_726f_0001;
/// How many times a reader or writer of the shared spec looks before it gives up waiting for a
/// writer that may have died half-way (each look yields the CPU).
const SPEC_PATIENCE: u32 = 10_000;

/// Everything the buckets of a device share, as plain atomics in a fixed layout: in this
/// process's memory, or in a file that every process of a group maps (all-zero is a valid,
/// not yet set up state, which is what a new file holds).
#[derive(Debug, Default)]
#[repr(C)]
pub struct SharedState {
    /// [`HEADER_NEW`], [`HEADER_BUSY`] or [`HEADER_READY`].
    header: AtomicU64,
    /// Whether any limit is set: the one load a request pays without limits.
    limited: AtomicU64,
    /// Bumped on every change; queues reload the configuration when it moves.
    generation: AtomicU64,
    /// Queues with requests waiting for tokens (of every process of the group).
    waiting: AtomicU64,
    /// Sequence counter of `spec`: odd while a writer changes it.
    seq: AtomicU64,
    /// The spec, encoded by `encode`.
    spec: [AtomicU64; SPEC_WORDS],
    tats: [Tat; SLOTS],
}

impl SharedState {
    /// Bytes a mapping must hold.
    pub const SIZE: usize = std::mem::size_of::<SharedState>();

    fn write_spec(&self, spec: &Spec) {
        let words = encode(spec);
        let mut seq = self.seq.load(Ordering::Relaxed);
        for _ in 0..SPEC_PATIENCE {
            if seq % 2 == 0 {
                match self.seq.compare_exchange_weak(
                    seq,
                    seq + 1,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => seq = now,
                }
            } else {
                std::thread::yield_now();
                seq = self.seq.load(Ordering::Relaxed);
            }
        }
        // Held (or taken over from a writer that died half-way): odd while the words change.
        let seq = seq | 1;
        self.seq.store(seq, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        for (word, value) in self.spec.iter().zip(words) {
            word.store(value, Ordering::Relaxed);
        }
        self.seq.store(seq + 1, Ordering::Release);
        self.limited
            .store(u64::from(!spec.is_none()), Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn read_spec(&self) -> Option<Spec> {
        let mut words = [0u64; SPEC_WORDS];
        for _ in 0..SPEC_PATIENCE {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            for (value, word) in words.iter_mut().zip(&self.spec) {
                *value = word.load(Ordering::Relaxed);
            }
            std::sync::atomic::fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return decode(&words);
            }
        }
        None
    }
}

/// The spec as words: per unit and scope, the rate, the burst rate (0: none) and its length;
/// then `iops-size` (0: none).
fn encode(spec: &Spec) -> [u64; SPEC_WORDS] {
    let mut words = [0u64; SPEC_WORDS];
    for (u, unit) in [Unit::Iops, Unit::Bps].into_iter().enumerate() {
        for (s, scope) in [Scope::Total, Scope::Read, Scope::Write]
            .into_iter()
            .enumerate()
        {
            if let Some(l) = spec.get(unit, scope) {
                let i = (u * 3 + s) * 3;
                words[i] = l.avg;
                words[i + 1] = l.max.unwrap_or(0);
                words[i + 2] = l.max_length;
            }
        }
    }
    words[SPEC_WORDS - 1] = spec.iops_size().unwrap_or(0);
    words
}

/// The spec `encode` wrote, checked by the parser like any other (`None` if it does not pass,
/// which only a foreign or damaged file can cause).
fn decode(words: &[u64; SPEC_WORDS]) -> Option<Spec> {
    let mut text = String::new();
    for (u, unit) in ["iops", "bps"].into_iter().enumerate() {
        for (s, scope) in ["total", "read", "write"].into_iter().enumerate() {
            let i = (u * 3 + s) * 3;
            if words[i] == 0 {
                continue;
            }
            text.push_str(&format!("{unit}-{scope}={},", words[i]));
            if words[i + 1] != 0 {
                text.push_str(&format!(
                    "{unit}-{scope}-max={},{unit}-{scope}-max-length={},",
                    words[i + 1],
                    words[i + 2]
                ));
            }
        }
    }
    if words[SPEC_WORDS - 1] != 0 {
        text.push_str(&format!("iops-size={},", words[SPEC_WORDS - 1]));
    }
    let text = text.trim_end_matches(',');
    Spec::parse(if text.is_empty() { "none" } else { text }).ok()
}

/// Why a group's shared state could not be joined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The group runs with other limits than this process was given.
    #[error("the group's limits are '{group}', not '{ours}': leave --limit out to join it, or change the group's with 'limits set'")]
    Mismatch {
        /// The group's.
        group: String,
        /// This process's.
        ours: String,
    },
    /// The state is not (or not yet) a group's.
    #[error("not a limit group's state (header {0:#x}); another program's file, or a member that died while setting it up")]
    BadHeader(u64),
}

/// Where a [`Buckets`]' shared words live.
#[derive(Debug)]
enum Storage {
    Own(Box<SharedState>),
    Group(&'static SharedState),
}

/// A device's buckets, shared by its queue threads (and by every connection of the process, and
/// with [`Buckets::join`] by every process of a group).
#[derive(Debug)]
pub struct Buckets {
    storage: Storage,
    /// The configuration decoded from the shared spec, and the generation it was decoded at.
    config: Mutex<(u64, Arc<Config>)>,
}

impl Buckets {
    /// Buckets enforcing `spec`, full, private to this process.
    pub fn new(spec: Spec) -> Self {
        let state = Box::<SharedState>::default();
        state.write_spec(&spec);
        state.header.store(HEADER_READY, Ordering::Release);
        let generation = state.generation.load(Ordering::Acquire);
        Self {
            storage: Storage::Own(state),
            config: Mutex::new((generation, Arc::new(Config::new(spec)))),
        }
    }

    /// Join the group whose state is `state` (a file every member maps). A new, zeroed state
    /// is set up with `spec` (none if not given); an existing group keeps its limits, and a
    /// `spec` that differs from them is refused, so that members cannot silently disagree.
    pub fn join(state: &'static SharedState, spec: Option<Spec>) -> Result<Self, GroupError> {
        match state.header.compare_exchange(
            HEADER_NEW,
            HEADER_BUSY,
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                state.write_spec(&spec.unwrap_or_default());
                state.header.store(HEADER_READY, Ordering::Release);
            }
            Err(_) => {
                // Another member is setting it up: a few stores, give it a moment.
                for _ in 0..SPEC_PATIENCE {
                    if state.header.load(Ordering::Acquire) != HEADER_BUSY {
                        break;
                    }
                    std::thread::yield_now();
                }
                let header = state.header.load(Ordering::Acquire);
                if header != HEADER_READY {
                    return Err(GroupError::BadHeader(header));
                }
            }
        }
        let generation = state.generation.load(Ordering::Acquire);
        let group = state
            .read_spec()
            .ok_or(GroupError::BadHeader(HEADER_READY))?;
        if let Some(ours) = spec {
            if ours != group {
                return Err(GroupError::Mismatch {
                    group: group.to_string(),
                    ours: ours.to_string(),
                });
            }
        }
        Ok(Self {
            storage: Storage::Group(state),
            config: Mutex::new((generation, Arc::new(Config::new(group)))),
        })
    }

    #[inline]
    fn state(&self) -> &SharedState {
        match &self.storage {
            Storage::Own(state) => state,
            Storage::Group(state) => state,
        }
    }

    /// Whether any limit is set (a relaxed load: a change reaches a queue within its next
    /// request or wake-up).
    #[inline]
    pub fn is_limited(&self) -> bool {
        self.state().limited.load(Ordering::Relaxed) != 0
    }

    /// The limits in force.
    pub fn spec(&self) -> Spec {
        self.config().spec
    }

    /// Queues with requests waiting for tokens now (in every process of a group).
    pub fn waiting_queues(&self) -> u32 {
        u32::try_from(self.state().waiting.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
    }

    /// Enforce `spec` from now on.
    pub fn set(&self, spec: Spec) {
        self.set_at(spec, now());
    }

    /// Enforce `spec` from `now` on (nanoseconds, `CLOCK_MONOTONIC`): a bucket whose rate or
    /// size changed forgives the debt run up under the old one, a bucket that appears starts
    /// full, and requests already waiting see the change on their next look (in every process
    /// of a group).
    pub fn set_at(&self, spec: Spec, now: u64) {
        let old = self.config();
        let new = Config::new(spec);
        let state = self.state();
        for (slot, tat) in state.tats.iter().enumerate() {
            if old.rate_of_slot(slot) != new.rate_of_slot(slot) {
                tat.0.fetch_min(now, Ordering::Relaxed);
            }
        }
        state.write_spec(&spec);
    }

    /// The configuration of the shared spec's current generation.
    fn config(&self) -> Arc<Config> {
        let state = self.state();
        let generation = state.generation.load(Ordering::Acquire);
        let mut cached = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != generation {
            // A spec that does not decode (a damaged group file) leaves the last good one.
            if let Some(spec) = state.read_spec() {
                *cached = (generation, Arc::new(Config::new(spec)));
            }
        }
        cached.1.clone()
    }
}

/// One queue thread's handle on its device's buckets, with its fair share and its allowances.
#[derive(Debug)]
pub struct Queue {
    buckets: Arc<Buckets>,
    config: Arc<Config>,
    generation: u64,
    /// The TAT of this queue's fair-share bucket, in device-bucket nanoseconds.
    share_tat: u64,
    /// Counted in [`Buckets::waiting`].
    waiting: bool,
    /// Per bucket (indexed like [`SharedState::tats`]): tokens taken ahead and not spent yet,
    /// in nanoseconds of the bucket's time.
    allowance: [u64; SLOTS],
    /// Until when the allowances held may be spent: [`ALLOWANCE_AGE_NS`] after the first was
    /// taken (0: none held).
    held_until: u64,
}

impl Queue {
    /// A handle for one queue thread.
    pub fn new(buckets: Arc<Buckets>) -> Self {
        let generation = buckets.state().generation.load(Ordering::Acquire);
        let config = buckets.config();
        Self {
            buckets,
            config,
            generation,
            share_tat: 0,
            waiting: false,
            allowance: [0; SLOTS],
            held_until: 0,
        }
    }

    /// The shared buckets.
    pub fn buckets(&self) -> &Arc<Buckets> {
        &self.buckets
    }

    /// Whether this queue is counted as waiting for tokens (from a refused [`take`](Self::take)
    /// to [`caught_up`](Self::caught_up)).
    pub fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// Tokens this queue holds ahead in the bucket of `slot`, in nanoseconds of its time.
    #[cfg(test)]
    fn held(&self, slot: usize) -> u64 {
        self.allowance[slot]
    }

    fn refresh(&mut self) {
        let generation = self.buckets.state().generation.load(Ordering::Acquire);
        if generation != self.generation {
            let config = self.buckets.config();
            // A change forgives the debt of every bucket whose rate or size it changes, the
            // allowances taken from it included: those are dropped, not spent nor given back.
            // Across more than one change a bucket may have changed and changed back, so then
            // every allowance goes (a few milliseconds of tokens, once per change).
            let one_change = generation == self.generation.wrapping_add(1);
            for (slot, held) in self.allowance.iter_mut().enumerate() {
                if *held > 0
                    && (!one_change || self.config.rate_of_slot(slot) != config.rate_of_slot(slot))
                {
                    *held = 0;
                }
            }
            self.config = config;
            self.generation = generation;
        }
    }

    /// Take the tokens `io` needs at `now` (nanoseconds, `CLOCK_MONOTONIC`), or say when to ask
    /// again: `Err(due)`. A refusal counts this queue as waiting, which holds every queue to an
    /// equal share until it has [`caught_up`](Self::caught_up). Ask for the oldest waiting
    /// request first: the buckets do not know about order.
    ///
    /// While no queue waits and a bucket is more than half full, a request that must go to the
    /// shared bucket takes an allowance for the next ones with it, in the same atomic operation:
    /// they are then served from this handle alone, with two loads of shared words nobody
    /// writes meanwhile (the generation and the count of waiting queues).
    #[inline]
    pub fn take(&mut self, io: Io, now: u64) -> Result<(), u64> {
        if self.may_spend(now) && self.spend(io) {
            return Ok(());
        }
        self.take_shared(io, now)
    }

    /// Whether this queue may spend its allowances at `now`: it holds some, they are younger
    /// than [`ALLOWANCE_AGE_NS`], the limits have not changed since it looked, and no queue
    /// waits for tokens.
    #[inline(always)]
    fn may_spend(&self, now: u64) -> bool {
        let state = self.buckets.state();
        now < self.held_until
            && state.generation.load(Ordering::Acquire) == self.generation
            && state.waiting.load(Ordering::Relaxed) <= u64::from(self.waiting)
    }

    /// Pay for `io` from the allowances alone, if they cover it in every bucket it passes.
    #[inline(always)]
    fn spend(&mut self, io: Io) -> bool {
        let config = &*self.config;
        let rates = config.rates[io.dir as usize].as_slice();
        let iops_size = config.spec.iops_size();
        for (k, rate) in rates.iter().enumerate() {
            let c = cost(rate, io, iops_size);
            let held = &mut self.allowance[rate.slot];
            if *held < c {
                // Short in this bucket: undo what the buckets before it paid.
                for rate in &rates[..k] {
                    self.allowance[rate.slot] += cost(rate, io, iops_size);
                }
                return false;
            }
            *held -= c;
        }
        true
    }

    /// [`take`](Self::take) when the allowances do not cover `io`: from the shared buckets.
    fn take_shared(&mut self, io: Io, now: u64) -> Result<(), u64> {
        self.refresh();
        let others = self
            .buckets
            .state()
            .waiting
            .load(Ordering::Relaxed)
            .saturating_sub(u64::from(self.waiting));
        // Allowances are for buckets nobody waits for, and for a moment only: tokens are never
        // spent long after they were taken.
        if self.held_until != 0 && (others > 0 || now >= self.held_until) {
            self.settle();
        }
        let config = &*self.config;
        let rates = &config.rates[io.dir as usize];
        let iops_size = config.spec.iops_size();
        // What the request costs in each bucket: at most the sustained and burst buckets of two
        // units and two scopes.
        let mut costs = [0u64; 8];
        let mut covered = true;
        for (rate, c) in rates.iter().zip(&mut costs) {
            *c = cost(rate, io, iops_size);
            covered &= self.allowance[rate.slot] >= *c;
        }
        if covered {
            for (rate, &c) in rates.iter().zip(&costs) {
                self.allowance[rate.slot] -= c;
            }
            return Ok(());
        }
        let tats = &self.buckets.state().tats;
        let mut due = 0u64;
        let mut dominant = 0u64;
        let mut low = false;
        // Per bucket, what it held when checked and what the request takes from it beyond this
        // queue's allowance (0: the allowance covers it).
        let mut seen = [(0u64, 0u64); 8];
        for ((rate, &c), seen) in rates.iter().zip(&costs).zip(&mut seen) {
            dominant = dominant.max(c);
            let held = self.allowance[rate.slot];
            if held >= c {
                continue;
            }
            let tat = tats[rate.slot].0.load(Ordering::Relaxed);
            // This queue's allowance is in the TAT already, and it is this queue's to spend:
            // the level the request sees leaves it out.
            let level = tat.saturating_sub(held);
            *seen = (tat, c - held);
            due = due.max((level + 1).saturating_sub(rate.tau));
            low |= level.saturating_add(RESERVE_NS) >= now.saturating_add(rate.tau);
        }
        // Shares apply to the last tokens of a bucket only: above the reserve there is enough
        // for everyone waiting, and a queue whose thread is late (preempted, say) must not make
        // the others leave tokens to spill over a full bucket.
        let shared = others > 0 && low;
        if shared {
            due = due.max((self.share_tat + 1).saturating_sub(SHARE_TAU_NS));
        }
        if due > now {
            if !self.waiting {
                self.waiting = true;
                self.buckets.state().waiting.fetch_add(1, Ordering::Relaxed);
            }
            return Err(due);
        }
        for ((rate, &c), &(tat, need)) in rates.iter().zip(&costs).zip(&seen) {
            let held = &mut self.allowance[rate.slot];
            if need == 0 {
                *held -= c;
                continue;
            }
            let ahead = allowance_to_take(rate, tat, need, c, now, others);
            charge(&tats[rate.slot].0, tat, need.saturating_add(ahead), now);
            *held = ahead;
            if ahead > 0 && self.held_until == 0 {
                self.held_until = now.saturating_add(ALLOWANCE_AGE_NS);
            }
        }
        if shared {
            let share = others.saturating_add(1);
            self.share_tat = self.share_tat.max(now) + dominant.saturating_mul(share);
        }
        Ok(())
    }

    /// Account `io` at `now` without waiting for tokens: for a request that must go at once
    /// (a drain). Later requests pay for it.
    pub fn force(&mut self, io: Io, now: u64) {
        self.refresh();
        let config = &*self.config;
        let tats = &self.buckets.state().tats;
        for rate in &config.rates[io.dir as usize] {
            let tat = &tats[rate.slot].0;
            let seen = tat.load(Ordering::Relaxed);
            charge(tat, seen, cost(rate, io, config.spec.iops_size()), now);
        }
    }

    /// Give back the allowances this queue holds (tokens taken ahead and not spent), so that
    /// they are neither lost nor spent late. [`take`](Self::take) does so on its own once they
    /// are [`ALLOWANCE_AGE_NS`] old or another queue waits, and dropping the handle does.
    pub fn settle(&mut self) {
        self.refresh();
        if std::mem::take(&mut self.held_until) == 0 {
            return;
        }
        let tats = &self.buckets.state().tats;
        for (tat, held) in tats.iter().zip(&mut self.allowance) {
            let held = std::mem::take(held);
            if held > 0 {
                // Never below zero, whatever a change did to the TAT meanwhile: a TAT in the
                // past is a full bucket, however far in the past.
                let _ = tat
                    .0
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                        Some(t.saturating_sub(held))
                    });
            }
        }
    }

    /// The queue thread goes to sleep: if it holds allowances and another queue waits for
    /// tokens, give them back now rather than at this queue's next request. A test of a field
    /// when it holds none.
    #[inline]
    pub fn idle(&mut self) {
        if self.held_until != 0
            && self.buckets.state().waiting.load(Ordering::Relaxed) > u64::from(self.waiting)
        {
            self.settle();
        }
    }

    /// This queue has no request waiting for tokens any more.
    pub fn caught_up(&mut self) {
        if std::mem::take(&mut self.waiting) {
            // Never below zero, even if a member of the group that died left it counted.
            let _ = self.buckets.state().waiting.fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |n| Some(n.saturating_sub(1)),
            );
        }
    }
}

/// The allowance a request that goes to the shared bucket of `rate` takes with it, in
/// nanoseconds of the bucket's time: the bucket's share ([`Rate::allowance`]) when no queue
/// waits, the share holds at least this request's cost `c`, and the bucket (at `tat` when
/// checked, `need` taken by the request itself) stays at least half full after it; else none.
/// Keeping half the bucket out of reach of allowances leaves the queues that take one request at
/// a time near the limit, the fair share and the reserve exactly as without them.
#[inline]
fn allowance_to_take(rate: &Rate, tat: u64, need: u64, c: u64, now: u64, others: u64) -> u64 {
    let after = tat
        .max(now)
        .saturating_add(need)
        .saturating_add(rate.allowance);
    if others == 0 && rate.allowance >= c && after <= now.saturating_add(rate.tau / 2) {
        rate.allowance
    } else {
        0
    }
}

/// Advance a bucket's TAT by `cost` from `now` if it lies in the past: one compare-and-swap
/// from the value `seen` at the check when no other thread took meanwhile, else the two
/// wait-free steps (`fetch_max(now)`, `fetch_add(cost)`), which add up right whatever the
/// interleaving.
#[inline]
fn charge(tat: &AtomicU64, seen: u64, cost: u64, now: u64) {
    let next = seen.max(now).saturating_add(cost);
    if tat
        .compare_exchange(seen, next, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        tat.fetch_max(now, Ordering::Relaxed);
        tat.fetch_add(cost, Ordering::Relaxed);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.settle();
        self.caught_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;
    /// A start far from zero, as the monotonic clock is.
    const T0: u64 = 1_000 * SEC;

    fn buckets(spec: &str) -> Arc<Buckets> {
        Arc::new(Buckets::new(Spec::parse(spec).expect("valid spec")))
    }

    fn read(bytes: u64) -> Io {
        Io {
            dir: Dir::Read,
            bytes,
        }
    }

    fn write(bytes: u64) -> Io {
        Io {
            dir: Dir::Write,
            bytes,
        }
    }

    /// Take as many `io` as the queue allows at `now`.
    /// Two threads take from `b` at once, as two queue threads do: each calls `take` (the
    /// requests it took at the given time) until `run` ns have passed, then gives back what it
    /// holds. Returns the requests both took, and the time from the first start to the last end.
    fn take_from_two_threads(
        b: Arc<Buckets>,
        run: u64,
        take: fn(&mut Queue, u64) -> u64,
    ) -> (u64, u64) {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (b, barrier) = (b.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut q = Queue::new(b);
                    barrier.wait();
                    let start = now();
                    let (mut n, mut last) = (0u64, start);
                    while last < start + run {
                        n += take(&mut q, last);
                        last = now();
                    }
                    q.settle();
                    (n, start, last)
                })
            })
            .collect();
        let (mut total, mut start, mut end) = (0, u64::MAX, 0);
        for thread in threads {
            let (n, s, e) = thread.join().expect("thread");
            total += n;
            start = start.min(s);
            end = end.max(e);
        }
        (total, end - start)
    }

    fn take_all(q: &mut Queue, io: Io, now: u64) -> u64 {
        let mut n = 0;
        while q.take(io, now).is_ok() {
            n += 1;
            assert!(n < 10_000_000, "no limit reached");
        }
        n
    }

    #[test]
    fn a_full_bucket_then_the_refill() {
        let b = buckets("iops-total=1000");
        let mut q = Queue::new(b);
        // A tenth of a second's worth at once, then exactly the rate.
        assert_eq!(take_all(&mut q, read(4096), T0), 100);
        let due = q.take(read(4096), T0).expect_err("the bucket is empty");
        // The next goes as soon as the level dips below the bucket, and the rate is the rate.
        assert_eq!(due, T0 + 1);
        assert_eq!(take_all(&mut q, read(4096), T0 + 10 * MS), 10);
        assert_eq!(take_all(&mut q, write(512), T0 + 20 * MS), 10);
        // Idle for a minute: full again, never fuller.
        assert_eq!(take_all(&mut q, read(4096), T0 + 60 * SEC), 100);
    }

    #[test]
    fn bytes_per_second_and_directions() {
        let b = buckets("bps-read=1048576,iops-write=10");
        let mut q = Queue::new(b);
        // 100 ms of 1 MiB/s is 104857.6 bytes: reads of 4 KiB go while less than that is taken.
        assert_eq!(take_all(&mut q, read(4096), T0), 26);
        // Writes are limited by their own bucket only.
        assert_eq!(take_all(&mut q, write(1 << 20), T0), 1);
        // Over a simulated second of 1 ms steps, reads run at the byte rate.
        let mut bytes = 0;
        for ms in 1..=1000 {
            bytes += take_all(&mut q, read(4096), T0 + ms * MS) * 4096;
        }
        let rate = bytes as f64 / 1_048_576.0;
        assert!((0.99..=1.01).contains(&rate), "{rate}");
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_and_is_paid_for() {
        let b = buckets("bps-total=10000");
        let mut q = Queue::new(b);
        // The bucket holds 1000 bytes; a 1 MiB request goes at once...
        assert!(q.take(write(1 << 20), T0).is_ok());
        // ...and the next waits until it has leaked through, about 104.8 s later.
        let due = q.take(read(512), T0).expect_err("the bucket is empty");
        let expected = T0 + (1u64 << 20) * SEC / 10_000 - TENTH_NS;
        assert!(due.abs_diff(expected) <= 2, "{due} vs {expected}");
        assert!(q.take(read(512), due).is_ok());
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let b = buckets("iops-total=100,iops-size=4096");
        let mut q = Queue::new(b);
        // The bucket holds 10 operations: 5 requests of 8 KiB, or 10 of 4 KiB or less.
        assert_eq!(take_all(&mut q, read(8192), T0), 5);
        assert_eq!(take_all(&mut q, read(1024), T0 + 10 * SEC), 10);
    }

    #[test]
    fn a_burst_then_the_rate() {
        // 100/s sustained, bursts of 1000/s for 2 s: the bucket holds 2000 operations and fills
        // (empties, in the leak picture) at 900/s while bursting.
        let b = buckets("iops-total=100,iops-total-max=1000,iops-total-max-length=2");
        let mut q = Queue::new(b);
        let mut per_second = [0u64; 6];
        for ms in 0..6000 {
            per_second[(ms / 1000) as usize] += take_all(&mut q, read(4096), T0 + ms * MS);
        }
        // The burst bucket lets a tenth of a second through at once, then 1000/s.
        assert!((1090..=1110).contains(&per_second[0]), "{per_second:?}");
        assert!((990..=1010).contains(&per_second[1]), "{per_second:?}");
        // 2000 + 100 t = 1000 t + 100 at t ≈ 2.1 s: from the fourth second on, the rate.
        for &n in &per_second[3..] {
            assert!((99..=101).contains(&n), "{per_second:?}");
        }
    }

    #[test]
    fn a_queue_that_asks_often_cannot_starve_one_that_asks_late() {
        let b = buckets("iops-total=10000");
        let mut eager = Queue::new(b.clone());
        let mut late = Queue::new(b.clone());
        let (mut eager_n, mut late_n) = (0u64, 0u64);
        // Both queues always have requests waiting. The eager one looks every 100 us; the late
        // one every millisecond, a little after the eager one has looked. Without the share,
        // the eager one would take every token the moment it is due.
        let mut t = T0;
        for step in 0..20_000u64 {
            t += 100_000;
            eager_n += take_all(&mut eager, read(4096), t);
            if step % 10 == 9 {
                late_n += take_all(&mut late, read(4096), t + 1000);
            }
        }
        // The full bucket (1000) and two seconds at the rate.
        let total = eager_n + late_n;
        assert!((20_800..=21_100).contains(&total), "total {total}");
        let late_share = late_n as f64 / total as f64;
        assert!(
            (0.45..=0.55).contains(&late_share),
            "eager {eager_n}, late {late_n}"
        );
        assert_eq!(b.waiting_queues(), 2);
        eager.caught_up();
        late.caught_up();
        assert_eq!(b.waiting_queues(), 0);
    }

    #[test]
    fn a_light_queue_is_served_in_full_beside_a_busy_one() {
        let b = buckets("iops-total=10000");
        let mut busy = Queue::new(b.clone());
        let mut light = Queue::new(b.clone());
        let (mut busy_n, mut light_n, mut light_waits) = (0u64, 0u64, 0u64);
        let mut light_backlog = 0u64;
        let mut t = T0;
        for step in 0..20_000u64 {
            t += 100_000;
            busy_n += take_all(&mut busy, read(4096), t);
            // The light queue wants 1000/s: one request every millisecond.
            if step % 10 == 0 {
                light_backlog += 1;
            }
            while light_backlog > 0 {
                match light.take(read(4096), t + 1000) {
                    Ok(()) => {
                        light_n += 1;
                        light_backlog -= 1;
                    }
                    Err(_) => {
                        light_waits += 1;
                        break;
                    }
                }
            }
            if light_backlog == 0 {
                light.caught_up();
            }
        }
        // Everything the light queue asked for, and the busy one has the rest.
        assert!(
            light_n >= 1999,
            "light {light_n}, waited {light_waits} times"
        );
        let total = busy_n + light_n;
        assert!((20_800..=21_100).contains(&total), "total {total}");
    }

    #[test]
    fn threads_share_the_rate_exactly() {
        let (total, span) =
            take_from_two_threads(buckets("iops-total=100000"), 200 * MS, |q, now| {
                take_all(q, read(4096), now)
            });
        // At most the full bucket (10k) and the rate over the run: racing threads may overrun
        // by a request each now and then, which the next requests pay for. (Fewer when both
        // threads were preempted for long on this shared machine: a full bucket spills.)
        let allowed = 10_000 + span / 10_000;
        assert!(total <= allowed + 4, "{total} taken, {allowed} allowed");
        assert!(total * 2 >= allowed, "{total} taken, {allowed} allowed");
    }

    #[test]
    fn a_change_reaches_requests_already_waiting() {
        let b = buckets("iops-total=1");
        let mut q = Queue::new(b.clone());
        assert!(q.take(read(4096), T0).is_ok());
        let due = q.take(read(4096), T0).expect_err("the bucket is empty");
        assert!(due > T0 + 800 * MS, "{due}");
        // Raised: the old debt is forgiven, the waiting request goes at once.
        b.set_at(Spec::parse("iops-total=1000").expect("valid"), T0 + MS);
        assert!(q.take(read(4096), T0 + MS).is_ok());
        assert_eq!(take_all(&mut q, read(4096), T0 + MS), 99);
        // Lowered: the debt is forgiven too, and the new bucket holds one request.
        b.set_at(Spec::parse("iops-total=10").expect("valid"), T0 + 2 * MS);
        assert!(q.take(read(4096), T0 + 2 * MS).is_ok());
        assert!(q.take(read(4096), T0 + 2 * MS).is_err());
        // Removed: everything goes.
        b.set_at(Spec::none(), T0 + 3 * MS);
        assert!(!b.is_limited());
        assert_eq!(q.take(read(4096), T0 + 3 * MS), Ok(()));
        assert_eq!(b.spec(), Spec::none());
    }

    #[test]
    fn a_forced_request_is_paid_for_by_the_next() {
        let b = buckets("iops-write=100");
        let mut q = Queue::new(b);
        for _ in 0..50 {
            q.force(write(4096), T0);
        }
        // 50 operations at 100/s: half a second of debt beyond the tenth the bucket holds.
        let due = q.take(write(4096), T0).expect_err("the bucket is empty");
        assert_eq!(due, T0 + 400 * MS + 1);
        assert!(q.take(read(4096), T0).is_ok(), "reads are not limited");
    }

    fn tat(b: &Buckets, slot: usize) -> u64 {
        b.state().tats[slot].0.load(Ordering::Relaxed)
    }

    #[test]
    fn a_request_to_a_full_bucket_takes_an_allowance_for_the_next() {
        // 10k/s: 100 us a request; the bucket holds 100 ms, an allowance 6.25 ms (62 requests).
        let b = buckets("iops-total=10000");
        let mut q = Queue::new(b.clone());
        assert!(q.take(read(4096), T0).is_ok());
        assert_eq!(tat(&b, 0), T0 + 100_000 + 6_250_000);
        assert_eq!(q.held(0), 6_250_000);
        // The next 62 are served from it: the shared word does not move.
        for _ in 0..62 {
            assert!(q.take(read(4096), T0 + 10).is_ok());
        }
        assert_eq!(tat(&b, 0), T0 + 6_350_000);
        assert_eq!(q.held(0), 50_000);
        // The 64th spends the last half request of it and takes a new one.
        assert!(q.take(read(4096), T0 + 20).is_ok());
        assert_eq!(q.held(0), 6_250_000);
        assert_eq!(tat(&b, 0), T0 + 64 * 100_000 + 6_250_000);
        // Given back, the bucket holds exactly what 64 requests took.
        q.settle();
        assert_eq!(q.held(0), 0);
        assert_eq!(tat(&b, 0), T0 + 64 * 100_000);
        q.settle();
        assert_eq!(
            tat(&b, 0),
            T0 + 64 * 100_000,
            "settling twice gives back once"
        );
    }

    #[test]
    fn allowances_stop_at_half_the_bucket() {
        // 10k/s: the bucket holds 1000 requests, an allowance 62.5.
        let b = buckets("iops-total=10000");
        let mut q = Queue::new(b.clone());
        // The full bucket is exactly the 1000 it is without allowances, and what the queue holds
        // at the end (the half request left of its last allowance) is in the TAT beside them.
        assert_eq!(take_all(&mut q, read(4096), T0), 1000);
        assert_eq!(q.take(read(4096), T0), Err(T0 + 1));
        assert_eq!(tat(&b, 0) - q.held(0), T0 + 100 * MS);
        // 40 ms later the bucket is 40 % full: requests take one at a time, no allowance.
        let later = T0 + 40 * MS;
        let before = tat(&b, 0) - q.held(0);
        assert!(q.take(read(4096), later).is_ok());
        assert_eq!(q.held(0), 0);
        assert_eq!(tat(&b, 0), before + 100_000);
        // Once it is more than half full again, one comes with the next request.
        let refilled = T0 + 160 * MS;
        assert!(q.take(read(4096), refilled).is_ok());
        assert_eq!(q.held(0), 6_250_000);
    }

    #[test]
    fn what_a_queue_holds_counts_as_its_own_at_the_bucket() {
        // 1k/s: 1 ms a request; an allowance is 6.25 ms, so a quarter request is left over
        // each time. Those quarters are spent, not lost: the full bucket is still 100.
        let b = buckets("iops-total=1000");
        let mut q = Queue::new(b);
        assert_eq!(take_all(&mut q, read(4096), T0), 100);
        // And the rate over a second of 1 ms steps is still the rate.
        let mut n = 0;
        for ms in 1..=1000 {
            n += take_all(&mut q, read(4096), T0 + ms * MS);
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn an_old_allowance_is_given_back_not_spent() {
        let b = buckets("iops-total=10000");
        let mut q = Queue::new(b.clone());
        assert!(q.take(read(4096), T0).is_ok());
        assert_eq!(q.held(0), 6_250_000);
        // A millisecond later the bucket has refilled past what the allowance took: spending it
        // now would add it to a full bucket. It goes back, and the request takes a new one.
        let later = T0 + ALLOWANCE_AGE_NS;
        assert!(q.take(read(4096), later).is_ok());
        assert_eq!(tat(&b, 0), later + 100_000 + 6_250_000);
        // A full bucket after an idle minute: 1000 and not one more, whatever was held.
        let idle = T0 + 60 * SEC;
        assert_eq!(take_all(&mut q, read(4096), idle), 1000);
    }

    #[test]
    fn a_waiting_queue_gets_the_allowances_of_the_others() {
        let b = buckets("iops-total=10000");
        let mut holder = Queue::new(b.clone());
        let mut other = Queue::new(b.clone());
        assert!(holder.take(read(4096), T0).is_ok());
        assert_eq!(holder.held(0), 6_250_000);
        // The other empties the bucket (the 1000 requests it holds, less the holder's one and
        // its allowance of 62.5), and waits.
        let n = take_all(&mut other, read(4096), T0);
        assert_eq!(n, 1000 - 1 - 62);
        assert_eq!(b.waiting_queues(), 1);
        // The holder's thread goes to sleep: with a queue waiting, it gives its allowance back,
        // and the waiting queue finds it.
        holder.idle();
        assert_eq!(holder.held(0), 0);
        assert_eq!(take_all(&mut other, read(4096), T0), 62);
        // Without a queue waiting, going to sleep keeps the allowance (no shared write).
        let b = buckets("iops-total=10000");
        let mut q = Queue::new(b.clone());
        assert!(q.take(read(4096), T0).is_ok());
        q.idle();
        assert_eq!(q.held(0), 6_250_000);
        // With a queue waiting, a take gives it back too, and takes no new one.
        let mut waiter = Queue::new(b.clone());
        take_all(&mut waiter, read(4096), T0);
        assert!(waiter.is_waiting());
        assert!(q.take(read(4096), T0).is_ok());
        assert_eq!(q.held(0), 0);
    }

    #[test]
    fn a_dropped_queue_gives_its_allowance_back() {
        let b = buckets("bps-total=1048576000");
        let mut q = Queue::new(b.clone());
        assert!(q.take(read(4096), T0).is_ok());
        assert!(q.held(3) > 0);
        drop(q);
        // 4096 bytes at 1000 MiB/s: 3906.25 ns, rounded up.
        assert_eq!(tat(&b, 3), T0 + 3907);
    }

    #[test]
    fn a_change_drops_the_allowances_of_the_buckets_it_changes() {
        let b = buckets("iops-total=10000,bps-read=1048576000");
        let mut q = Queue::new(b.clone());
        assert!(q.take(read(4096), T0).is_ok());
        assert!(q.held(0) > 0 && q.held(4) > 0);
        // The bps limit changes, the iops one does not: only the first allowance goes.
        b.set_at(
            Spec::parse("iops-total=10000,bps-read=2097152000").expect("valid"),
            T0 + 10,
        );
        assert!(q.take(read(4096), T0 + 20).is_ok());
        assert_eq!(q.held(0), 6_250_000 - 100_000);
        // A fresh one from the changed bucket, which forgave the old one.
        assert_eq!(q.held(4), 6_250_000);
        assert_eq!(tat(&b, 4), T0 + 20 + 1954 + 6_250_000);
        // Lowered to a limit the old allowance would overrun: nothing of it is spent.
        b.set_at(Spec::parse("iops-total=10").expect("valid"), T0 + 30);
        assert!(q.take(read(4096), T0 + 40).is_ok());
        assert!(
            q.take(read(4096), T0 + 40).is_err(),
            "the new bucket holds one"
        );
        q.caught_up();
        // Two changes seen at once (a bucket may have changed and changed back): all go.
        let mut q = Queue::new(b.clone());
        b.set_at(Spec::parse("iops-total=10000").expect("valid"), T0 + SEC);
        assert!(q.take(read(4096), T0 + SEC).is_ok());
        assert!(q.held(0) > 0);
        b.set_at(Spec::none(), T0 + SEC + 1);
        b.set_at(
            Spec::parse("iops-total=10000").expect("valid"),
            T0 + SEC + 2,
        );
        assert!(q.take(read(4096), T0 + SEC + 3).is_ok());
        assert_eq!(tat(&b, 0), T0 + SEC + 3 + 100_000 + 6_250_000);
    }

    #[test]
    fn threads_with_allowances_share_the_rate_exactly() {
        // Far from the limit, two threads take allowances; near it, one request at a time. Over
        // the run, what they took is the full bucket and the rate, no more.
        let (total, span) = take_from_two_threads(
            buckets("iops-total=1000000"),
            100 * MS,
            // A request at a time, as a queue thread asks.
            |q, now| u64::from(q.take(read(4096), now).is_ok()),
        );
        let allowed = 100_000 + span / 1000;
        assert!(total <= allowed + 4, "{total} taken, {allowed} allowed");
        assert!(total * 2 >= allowed, "{total} taken, {allowed} allowed");
    }

    #[test]
    fn wakes_are_coalesced_and_bounded() {
        assert_eq!(next_wake(T0 + 10, T0), T0 + MIN_SLEEP_NS);
        assert_eq!(next_wake(T0 + 3 * MS, T0), T0 + 3 * MS);
        assert_eq!(next_wake(T0 + 60 * SEC, T0), T0 + MAX_SLEEP_NS);
    }

    #[test]
    fn dropping_a_waiting_queue_stops_counting_it() {
        let b = buckets("iops-total=1");
        let mut q = Queue::new(b.clone());
        assert!(q.take(read(1), T0).is_ok());
        assert!(q.take(read(1), T0).is_err());
        assert!(q.is_waiting());
        assert_eq!(b.waiting_queues(), 1);
        drop(q);
        assert_eq!(b.waiting_queues(), 0);
    }

    /// A group's state as a file mapping would give it: zeroed, shared, never freed.
    fn group_state() -> &'static SharedState {
        Box::leak(Box::default())
    }

    #[test]
    fn group_members_share_tokens_and_changes() {
        let state = group_state();
        let spec = Spec::parse("iops-total=1000").expect("valid");
        let first = Arc::new(Buckets::join(state, Some(spec)).expect("a new group"));
        let second = Arc::new(Buckets::join(state, None).expect("an existing group"));
        assert_eq!(second.spec(), spec);
        let mut a = Queue::new(first.clone());
        let mut b = Queue::new(second.clone());
        // One bucket for both: what one member takes, the other does not find.
        assert_eq!(take_all(&mut a, read(4096), T0), 100);
        assert_eq!(take_all(&mut b, read(4096), T0), 0);
        assert_eq!(
            first.waiting_queues(),
            2,
            "waiting queues are counted group-wide"
        );
        // A change by one member reaches the other's waiting requests.
        second.set_at(Spec::parse("iops-total=2000").expect("valid"), T0 + MS);
        assert_eq!(first.spec().to_string(), "iops-total=2000");
        b.caught_up();
        assert_eq!(take_all(&mut a, read(4096), T0 + MS), 200);
        second.set_at(Spec::none(), T0 + 2 * MS);
        assert!(!first.is_limited());
        assert_eq!(a.take(read(4096), T0 + 2 * MS), Ok(()));
    }

    #[test]
    fn a_member_with_other_limits_is_refused() {
        let state = group_state();
        let spec = |s: &str| Some(Spec::parse(s).expect("valid"));
        Buckets::join(
            state,
            spec("iops-total=1000,bps-write-max=5000,bps-write=100"),
        )
        .expect("a new group");
        assert!(Buckets::join(
            state,
            spec("iops-total=1000,bps-write=100,bps-write-max=5000")
        )
        .is_ok());
        let e = Buckets::join(state, spec("iops-total=999")).expect_err("other limits");
        assert!(matches!(e, GroupError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("iops-total=999"), "{e}");
    }

    #[test]
    fn the_shared_layout_is_stable() {
        // A group's file is read by every member: its layout must not move between builds.
        assert_eq!(SharedState::SIZE, 960);
        assert_eq!(std::mem::align_of::<SharedState>(), 64);
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let state = group_state();
        state.header.store(0xdead_beef, Ordering::Relaxed);
        assert_eq!(
            Buckets::join(state, None).expect_err("foreign").to_string(),
            GroupError::BadHeader(0xdead_beef).to_string()
        );
    }

    #[test]
    fn specs_survive_the_shared_words() {
        for text in [
            "none",
            "iops-total=5",
            "iops-read=100,iops-read-max=400,iops-read-max-length=3,iops-write=50,bps-total=1048576,bps-total-max=2097152,iops-size=8192",
        ] {
            let spec = Spec::parse(text).expect("valid");
            assert_eq!(decode(&encode(&spec)), Some(spec), "{text}");
        }
        // Words no spec encodes to are not taken for one.
        let mut words = [0u64; SPEC_WORDS];
        words[0] = 5;
        words[1] = 1;
        assert_eq!(decode(&words), None, "a burst below the rate");
    }
}
