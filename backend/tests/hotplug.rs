//! vCPU unplug through the control socket, end to end: completions held in a deferred batch
//! under a long `--defer-delay-us` are completed and signalled within milliseconds of
//! `vcpu-unplug`, not after the delay; with a queue map only the departing vCPU's queues are
//! drained, without one every queue is.

mod common;

use std::time::{Duration, Instant};

use common::blk::{T_FLUSH, T_OUT};
use common::{Backend, BackendOpts, Transfer, S_OK};
use serde_json::json;

/// Long enough that a completion arriving before it means the unplug drained it.
const DEFER_DELAY_US: u64 = 2_000_000;

fn spawn(num_queues: usize, extra: &[&str]) -> Backend {
    // Strict batching: hold even a lone completion for the whole delay, so that the unplug
    // finds it in the batch.
    let mut extra_args = vec![
        "--defer-delay-us".to_string(),
        DEFER_DELAY_US.to_string(),
        "--strict-batching".to_string(),
    ];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    Backend::spawn(&BackendOpts {
        num_queues,
        cache: "dontcache",
        control: true,
        extra_args,
        ..BackendOpts::default()
    })
}

/// Submits a dontcache write on each queue (deferred at submission under `dontcache`), waits
/// until every one sits in its queue's batch, then unplugs `vcpu` and returns how long each
/// queue's completion took from the unplug command, or `None` if it did not come within 500 ms.
fn unplug_with_pending_writes(
    b: &Backend,
    num_queues: usize,
    vcpu: usize,
) -> Vec<Option<Duration>> {
    let mut d = b.connect_queues(num_queues);
    let data = vec![0x5au8; 4096];
    let tickets: Vec<_> = (0..num_queues)
        .map(|q| {
            d.queue(q)
                .submit(&Transfer::blk(T_OUT, 8 * q as u64, &data, 0))
        })
        .collect();
    // Every write is in a batch once the deferred workers report them pending.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = b.stats();
        let pending: u64 = (0..num_queues)
            .map(|q| {
                stats["queues"][q]["deferred_worker"]["pending"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        if pending == num_queues as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes never reached the batches: {stats}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let start = Instant::now();
    let report = b.control(&json!({ "cmd": "vcpu-unplug", "vcpu": vcpu }));
    assert!(report["error"].is_null(), "unplug failed: {report}");

    let mut took = Vec::new();
    for (q, ticket) in tickets.into_iter().enumerate() {
        let queue = d.queue(q);
        match queue.wait_used(Duration::from_millis(500).saturating_sub(start.elapsed())) {
            Ok(used) => {
                assert_eq!(u32::from(ticket.head()), used.id, "queue {q}: used id");
                took.push(Some(start.elapsed()));
            }
            Err(_) => took.push(None),
        }
    }
    took
}

#[test]
fn unplug_without_a_queue_map_drains_every_queue_at_once() {
    let b = spawn(2, &[]);
    let took = unplug_with_pending_writes(&b, 2, 1);
    for (q, t) in took.iter().enumerate() {
        let t = t.unwrap_or_else(|| panic!("queue {q} not completed within 500 ms of the unplug"));
        assert!(t < Duration::from_millis(200), "queue {q} took {t:?}");
    }
    let stats = b.stats();
    let vcpu = &stats["vcpus"][0];
    assert_eq!(vcpu["vcpu"], 1, "{stats}");
    assert_eq!(vcpu["online"], false, "{stats}");
    assert_eq!(vcpu["drained"], 2, "{stats}");
    for q in 0..2 {
        assert_eq!(
            stats["queues"][q]["deferred_worker"]["drained"], 1,
            "{stats}"
        );
        assert_eq!(
            stats["queues"][q]["deferred_worker"]["enabled"], true,
            "{stats}"
        );
    }
}

#[test]
fn unplug_with_a_queue_map_drains_only_that_vcpus_queues() {
    // As Linux 7.3 maps 2 queues on 2 vCPUs: q0 -> cpu1, q1 -> cpu0.
    let b = spawn(2, &["--queue-map", "0=1,1=0"]);
    let took = unplug_with_pending_writes(&b, 2, 1);
    let q0 = took[0].expect("queue 0 (vCPU 1's) completed by the unplug");
    assert!(q0 < Duration::from_millis(200), "queue 0 took {q0:?}");
    assert!(
        took[1].is_none(),
        "queue 1 belongs to vCPU 0 and must wait for its batch delay"
    );
    let stats = b.stats();
    assert_eq!(
        stats["queues"][0]["deferred_worker"]["drained"], 1,
        "{stats}"
    );
    assert_eq!(
        stats["queues"][1]["deferred_worker"]["drained"], 0,
        "{stats}"
    );
}

#[test]
fn after_replug_deferred_completions_flow_again() {
    let b = spawn(1, &["--queue-map", "0=0"]);
    let mut d = b.connect_queues(1);
    let r = b.control(&json!({ "cmd": "vcpu-unplug", "vcpu": 0 }));
    assert_eq!(r["drained"], 0, "{r}");
    let r = b.control(&json!({ "cmd": "vcpu-plug", "vcpu": 0 }));
    assert_eq!(r["ok"], true, "{r}");
    // A flush is deferred at submission; it completes after the batch delay, OK.
    let c = d.queue(0).execute(&Transfer::blk(T_FLUSH, 0, &[], 0));
    assert_eq!(c.status, S_OK);
    let stats = b.stats();
    assert_eq!(stats["vcpus"][0]["online"], true, "{stats}");
    assert_eq!(stats["vcpus"][0]["drains"], 1, "{stats}");
}
