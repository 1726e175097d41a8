//! vCPU unplug with completions held in deferred batches, driven the way a user runs it: QEMU's
//! QMP tells the backend (its own `--qmp` socket, its own adapter), the harness only does what an
//! operator does (`device_del`, `device_add`).
//!
//! The backend runs `--cache dontcache --defer-delay-us 5000000 --strict-batching`: every write
//! waits five seconds in its queue thread's batch unless something drains it. The guest agent's
//! `hotplug_stress` load writes and reads back from threads homed on each vCPU. The harness
//! unplugs vCPU 1; the guest's CPU offline waits for every request in flight on the hardware queue
//! that vCPU alone served, so `device_del` → `DEVICE_DELETED` takes at least the batch delay —
//! unless the backend drains at QEMU's eject request, before the guest offlines the CPU. The test
//! asserts the offline takes far less than the delay, that the backend recorded the drain for
//! vCPU 1 (from its QMP adapter: nobody calls `vcpu-unplug` here), that the data verifies with no
//! hung task or I/O error, and that after the re-plug the queue of vCPU 1 carries I/O again.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::agent::{format_queue_map, guest_queue_map};
use vmm_tests::{vm_test, AgentPlan, Error, VhostUserDisk, VmConfig};

/// How long a deferred write waits in its batch when nothing drains it.
const DEFER_DELAY: Duration = Duration::from_secs(5);
/// Unplug/plug cycles (each re-plug uses up one of TCG's `maxcpus` contexts).
const CYCLES: u64 = 2;

#[test]
fn unplug_drains_held_completions_before_the_guest_offlines_the_cpu() {
    vm_test("hotplug_drain", |h| {
        let image = h.image("disk.img", 256 << 20)?;
        let backend_qmp = h.path("backend.qmp");
        let mut cfg = h.backend_config(&image).queues(2).cache("dontcache");
        cfg.extra_args = vec![
            "--defer-delay-us".into(),
            DEFER_DELAY.as_micros().to_string(),
            "--strict-batching".into(),
            "--qmp".into(),
            backend_qmp.display().to_string(),
        ];
        let backend = h.start_backend(&cfg)?;
        let plan = AgentPlan::new(&["queue_map", "hotplug_stress"])
            .param("hotplug_stress.cycles", CYCLES)
            .param("hotplug_stress.threads_per_cpu", 4)
            .param("hotplug_stress.mib", 16);
        let mut vm = VmConfig::new(2, plan).disk(VhostUserDisk::new(&cfg.socket, 2));
        vm.max_cpus = 2 + CYCLES as u32;
        vm.extra_qmp = vec![backend_qmp];
        let mut q = h.start_vm(&vm)?;
        q.wait_hello()?;
        q.wait_ready("hotplug_stress")?;

        // The guest's queue map: the queue whose CPU list holds vCPU 1 is the one to drain.
        let pairs = guest_queue_map(&q.console().lines(), &[1, 0])?;
        let vcpu1_queue = pairs
            .iter()
            .find(|(_, v)| *v == 1)
            .map(|(q, _)| *q)
            .ok_or_else(|| Error::Agent(format!("no queue on vCPU 1: {pairs:?}")))?;
        let map = format_queue_map(&pairs);
        let set = backend.control(&json!({"cmd": "set-queue-map", "map": map}))?;
        println!("queue map {map}: {set}");

        let writes_on = |queue: u64| -> vmm_tests::Result<u64> {
            Ok(backend
                .stats()?
                .queues
                .iter()
                .find(|s| s.index == queue)
                .map(|s| s.writes)
                .unwrap_or(0))
        };
        let mut replugged_at = None;
        for k in 1..=CYCLES {
            let cpu = q
                .vcpus()?
                .into_iter()
                .find(|c| c.index == 1)
                .ok_or_else(|| Error::Qmp("no vCPU 1".into()))?;
            if let Some(before) = replugged_at {
                // The threads homed on vCPU 1 move back once their last write (held a batch
                // delay on the other queue) returns; their next writes wait a delay here too.
                let deadline = Instant::now() + 4 * DEFER_DELAY;
                let mut now = writes_on(vcpu1_queue)?;
                while now <= before && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(200));
                    now = writes_on(vcpu1_queue)?;
                }
                println!(
                    "cycle {k}: queue {vcpu1_queue} writes since the re-plug: {before} → {now}"
                );
                assert!(
                    now > before,
                    "cycle {k}: no write on queue {vcpu1_queue} since vCPU 1 came back ({before} → {now})"
                );
            }
            let qmp = q.qmp()?;
            qmp.events(Duration::ZERO)?;
            let t0 = Instant::now();
            qmp.execute("device_del", Some(json!({ "id": cpu.qom_path })))?;
            let path = cpu.qom_path.clone();
            qmp.wait_event(Duration::from_secs(120), |e: &Value| {
                e["event"] == "DEVICE_DELETED"
                    && e["data"]["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with(&path))
            })?;
            let offline = t0.elapsed();
            println!("cycle {k}: device_del → DEVICE_DELETED in {offline:?} (batch delay {DEFER_DELAY:?})");
            assert!(
                offline < DEFER_DELAY / 2,
                "cycle {k}: the guest's CPU offline took {offline:?}: it waited for held completions"
            );
            q.plug_vcpu(&cpu, &format!("cpu1-r{k}"))?;
            q.wait_ready(&format!("hotplug_stress/up/{k}"))?;
            replugged_at = Some(writes_on(vcpu1_queue)?);
        }

        let run = q.wait_done()?;
        run.expect_all_ok()?;
        let data = run.ok("hotplug_stress")?;
        assert_eq!(data["verified"], json!(true), "{data}");
        let console = q.console().lines().join("\n");
        for bad in [
            "blocked for more than",
            "hung_task",
            "I/O error",
            "not a head",
        ] {
            assert!(!console.contains(bad), "guest console shows {bad:?}");
        }
        let stats = backend.stats()?;
        let v1 = stats.extra["vcpus"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vcpu"] == 1)
            .cloned()
            .unwrap_or_default();
        println!("backend, vCPU 1: {v1}");
        assert_eq!(
            v1["drains"],
            json!(CYCLES),
            "the backend's QMP adapter drained once per eject request: {v1}"
        );
        assert!(
            v1["drained"].as_u64().unwrap_or(0) > 0,
            "the drains completed held writes: {v1}"
        );
        assert_eq!(v1["online"], json!(true), "vCPU 1 back online: {v1}");
        Ok(())
    });
}
