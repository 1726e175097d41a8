//! What dirty-page logging costs on the fast path: 4 KiB random reads at iodepth 32 on 2 queues,
//! driven from the host through the test frontend (a real vhost-user socket, memfd guest memory),
//! with logging off and with it on (a memfd log handed over with SET_LOG_BASE, `LOG_ALL` acked,
//! as during a migration). The libblkio client of `vmm-tests`' `bench` cannot hand the backend a
//! log, hence this driver.
//!
//! `cargo bench -p vhost-user-blk --bench dirty_log [-- SECS ROUNDS]` (default 5 s, 3 rounds per
//! mode, interleaved off/on). It prints IOPS per round and the median per mode. The driver is one
//! thread per queue that keeps 32 chains in flight at fixed guest addresses and republishes each
//! as its used entry arrives; each published chain is kicked.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::blk::{self, T_IN};
use common::frontend::DirtyLog;
use common::ring::link;
use common::{Backend, BackendOpts, Desc, Options, Queue};

const IMAGE: u64 = 256 << 20;
const MEM: u64 = 64 << 20;
const DEPTH: u16 = 32;
const BS: u32 = 4096;

/// One queue's driver: `DEPTH` chains (header, 4 KiB buffer, status) at fixed slots and guest
/// addresses in the queue's part of memory; returns the reads completed in `secs`.
fn drive(q: &mut Queue, base: u64, secs: Duration, seed: u64) -> u64 {
    let mut rng = seed | 1;
    let mut next_sector = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % (IMAGE / u64::from(BS))) * u64::from(BS) / 512
    };
    let header = |i: u16| base + u64::from(i) * 0x2000;
    let data = |i: u16| header(i) + 0x1000;
    let status = |i: u16| header(i) + 0x100;
    for i in 0..DEPTH {
        let descs = [
            Desc::readable(header(i), 16),
            Desc::writable(data(i), BS),
            Desc::writable(status(i), 1),
        ];
        let slots = [3 * i, 3 * i + 1, 3 * i + 2];
        q.write_descs(3 * i, &link(&descs, &slots));
    }
    let mem = q.memory();
    let headers: Vec<u64> = (0..DEPTH).map(header).collect();
    for &h in &headers {
        mem.write(h, &blk::header(T_IN, next_sector()));
    }
    for i in 0..DEPTH {
        q.publish(3 * i);
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < secs {
        let used = q
            .wait_used(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no completion: {e:?}"));
        done += 1;
        let head = used.id as u16;
        let st = q.memory().read(status(head / 3), 1)[0];
        assert!(
            st == common::S_OK && used.len == BS + 1,
            "read failed: status {st}, used length {}",
            used.len
        );
        q.memory().write(
            headers[usize::from(head / 3)],
            &blk::header(T_IN, next_sector()),
        );
        q.publish(head);
    }
    for _ in 0..DEPTH {
        q.wait_used(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("draining: {e:?}"));
    }
    done
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let secs = Duration::from_secs(args.first().and_then(|a| a.parse().ok()).unwrap_or(5));
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);

    let backend = Backend::spawn(&BackendOpts {
        size: IMAGE,
        num_queues: 2,
        cache: "writeback",
        ..BackendOpts::default()
    });
    // The image in the host page cache, so that the figures are the backend's, not the disk's.
    backend.write_image(0, &vec![0x5a; IMAGE as usize]);
    let mut dev = backend.connect(&Options {
        num_queues: Some(2),
        ..Options::default()
    });
    let log = DirtyLog::new(DirtyLog::bytes_for(MEM));
    dev.set_log_base(&log, DirtyLog::bytes_for(MEM))
        .expect("SET_LOG_BASE");

    println!(
        "randread 4 KiB, iodepth {DEPTH} x 2 queues, {} s per round, cache writeback, io_uring",
        secs.as_secs()
    );
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for logging in [false, true] {
            dev.set_log_all(logging).expect("SET_FEATURES");
            log.clear();
            let queues = dev.queues_mut();
            let total: u64 = std::thread::scope(|s| {
                let handles: Vec<_> = queues
                    .iter_mut()
                    .enumerate()
                    .map(|(i, q)| {
                        let base = (8 << 20) + i as u64 * (16 << 20);
                        s.spawn(move || drive(q, base, secs, 0x9e37 + round as u64 * 2 + i as u64))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("driver")).sum()
            });
            let iops = total as f64 / secs.as_secs_f64();
            let pages = log.pages().len();
            println!(
                "round {round}: logging {:3}: {iops:9.0} IOPS ({pages} pages logged)",
                if logging { "on" } else { "off" }
            );
            if logging {
                on.push(iops);
            } else {
                off.push(iops);
            }
        }
    }
    let (off, on) = (median(&mut off), median(&mut on));
    println!(
        "median: off {off:.0} IOPS, on {on:.0} IOPS, on/off {:.3}",
        on / off
    );
    // The machine's load over the run, for the noise next to the figures.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average (1, 5, 15 min): {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
