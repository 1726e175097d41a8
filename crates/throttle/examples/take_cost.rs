//! What the limiter costs a request when its limits never bite: nanoseconds per
//! `Queue::take` under a limit far above the load (the largest accepted, 10^8 IOPS, and a
//! byte limit as large), on 1 and 2 threads taking from the same buckets (2: the shared words
//! bounce between the cores, as between two queue threads), against the one load a request pays
//! without limits.
//!
//! ```text
//! cargo run --release -p throttle --example take_cost [-- SECONDS]
//! ```

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use throttle::{Buckets, Dir, Io, Queue, Spec};

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
                let mut calls = 0u64;
                let mut refused = 0u64;
                while start.elapsed().as_secs_f64() < seconds {
                    // The clock read is part of what a request pays (one per request here; the
                    // fast path reads it once per request too).
                    for _ in 0..1000 {
                        if !buckets.is_limited() {
                            continue;
                        }
                        if queue.take(black_box(io), throttle::now()).is_err() {
                            refused += 1;
                        }
                    }
                    calls += 1000;
                }
                // A thread preempted between reading the clock and taking sees a stale `now`
                // and may be told to wait; the fast path would wake at once. Count them.
                (start.elapsed().as_nanos() as f64 / calls as f64, refused)
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

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    println!("ns per request (mean over the threads), {seconds} s per cell; the machine is shared and noisy:");
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
