//! What the limiter costs a request when its limits never bite: nanoseconds per
//! `Queue::take` under a limit far above the load (the largest accepted, 10^8 IOPS, and a
//! byte limit as large), on 1 and 2 threads taking from the same buckets (2: the shared words
//! bounce between the cores, as between two queue threads), against the one load a request pays
//! without limits. Each thread's own CPU time is what is counted (`CLOCK_THREAD_CPUTIME_ID`), so
//! that other work on a shared machine, which delays the threads, does not count as theirs;
//! cache lines moving between the cores do.
//!
//! ```text
//! cargo run --release -p throttle --example take_cost [-- SECONDS]
//! ```

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use throttle::{Buckets, Dir, Io, Queue, Spec};

/// Requests per clock read.
const PASS: u64 = 32;

fn per_call(threads: usize, seconds: f64, spec: &str) -> f64 {
    let spec = Spec::parse(spec).expect("a valid spec");
    let buckets = Arc::new(Buckets::new(spec));
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (buckets, barrier) = (buckets.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut queue = Queue::new(buckets.clone());
                let io = Io {
                    dir: Dir::Read,
                    bytes: 4096,
                };
                barrier.wait();
                let start = Instant::now();
                let cpu0 = thread_cpu_ns();
                let mut calls = 0u64;
                let mut refused = 0u64;
                while start.elapsed().as_secs_f64() < seconds {
                    // The clock read is part of what a request pays: one per pass over a ring,
                    // as the fast path reads it, a pass being taken here as 32 requests.
                    for _ in 0..1000 / PASS {
                        let now = throttle::now();
                        for _ in 0..PASS {
                            if !buckets.is_limited() {
                                continue;
                            }
                            if queue.take(black_box(io), now).is_err() {
                                refused += 1;
                            }
                        }
                    }
                    calls += 1000 / PASS * PASS;
                }
                // A thread preempted between reading the clock and taking sees a stale `now`
                // and may be told to wait; the fast path would wake at once. Count them.
                ((thread_cpu_ns() - cpu0) as f64 / calls as f64, refused)
            })
        })
        .collect();
    let per: Vec<(f64, u64)> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let refused: u64 = per.iter().map(|p| p.1).sum();
    if refused > 0 {
        println!("  ({refused} requests told to wait with a stale clock reading, {spec})");
    }
    per.iter().map(|p| p.0).sum::<f64>() / per.len() as f64
}

/// This thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec owned by this frame; the clock exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    println!("CPU ns per request (mean over the threads), {seconds} s per cell:");
    for (name, spec) in [
        ("no limit (one load)", "none"),
        ("iops-total=10^8", "iops-total=100000000"),
        (
            "iops-total=10^8,bps-total=10^15",
            "iops-total=100000000,bps-total=1000000000000000",
        ),
    ] {
        let one = per_call(1, seconds, spec);
        let two = per_call(2, seconds, spec);
        println!("{name:<34} 1 thread {one:>7.1}   2 threads {two:>7.1}");
    }
}
