//! The stress variant of the vCPU unplug drain (`hotplug_drain`): 100 vCPU
//! unplug/plug cycles under write-verify load, in a TCG guest. Ignored by default (about a
//! minute here, longer on a busy host); run it with
//!
//! ```text
//! cargo test --release -p vmm-tests --test hotplug_stress -- --ignored --nocapture
//! HOTPLUG_STRESS_CYCLES=20 cargo test ...   # fewer cycles
//! ```
//!
//! The backend runs `--cache dontcache --defer-delay-us 20000`, so every
//! write waits in a deferred batch for up to 20 ms and an unplug almost
//! always finds completions to drain. The guest (`-smp 2,maxcpus=2+cycles`:
//! under TCG every re-plug uses up one of QEMU's `maxcpus` translation
//! contexts, so `maxcpus=4` allows two re-plugs, then QEMU aborts) runs
//! the agent's `hotplug_stress` workload: sixteen threads, eight homed on
//! each vCPU, write a random 4 KiB block with O_DIRECT and read it back at once.
//! The test is the VMM adapter the backend's QMP client would otherwise be:
//! each cycle it sends `device_del` for vCPU 1, and on QEMU's eject request
//! (`ACPI_DEVICE_OST`, status 132, the vCPU's slot), before the guest takes
//! the CPU offline, `vcpu-unplug 1` on the backend's control socket; then
//! it waits for `DEVICE_DELETED`, plugs the vCPU back (`device_add`), sends
//! `vcpu-plug 1` and waits for the agent to bring the CPU online. The queue
//! map is the guest's, read from sysfs and set with `set-queue-map`.
//!
//! No completion lost or doubled: every write's read-back matched and every
//! block holds its last write at the end (the agent); no hung task, no
//! "not a head" from virtio_ring and no I/O error on the console; the
//! backend completed exactly the writes and flushes the guest's block layer
//! counted (`/sys/block/vda/stat`), nothing is left in flight or pending,
//! and it recorded one drain per cycle.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::agent::{format_queue_map, guest_queue_map};
use vmm_tests::spread::percentile;
use vmm_tests::{vm_test, AgentPlan, Error, VhostUserDisk, VmConfig};

#[test]
#[ignore = "slow (about a minute under TCG): cargo test -p vmm-tests --test hotplug_stress -- --ignored"]
fn hundred_unplug_plug_cycles_under_load() {
    let cycles: u64 = std::env::var("HOTPLUG_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    vm_test("hotplug_stress", |h| {
        let image = h.image("disk.img", 256 << 20)?;
        let mut cfg = h.backend_config(&image).queues(2).cache("dontcache");
        cfg.extra_args = vec!["--defer-delay-us".into(), "20000".into()];
        let backend = h.start_backend(&cfg)?;
        let plan = AgentPlan::new(&["queue_map", "hotplug_stress"])
            .param("hotplug_stress.cycles", cycles)
            .param("hotplug_stress.threads_per_cpu", 8)
            .param("hotplug_stress.mib", 64);
        let mut vm = VmConfig::new(2, plan).disk(VhostUserDisk::new(&cfg.socket, 2));
        // QEMU's TCG registers a translation context for every vCPU thread it
        // ever starts and never frees it (tcg_register_thread asserts
        // n < tcg_max_ctxs, which is maxcpus): each re-plug starts a new
        // thread, so the VM needs room for one per cycle.
        vm.max_cpus = 2 + cycles as u32;
        vm.run_timeout = Duration::from_secs(3600);
        let mut q = h.start_vm(&vm)?;
        q.wait_hello()?;
        q.wait_ready("hotplug_stress")?;

        // The guest's queue map, as blk-mq built it; with many possible CPUs a queue's list
        // holds absent ones too: map each queue to the boot vCPU it serves (vCPU 1 first).
        let map = format_queue_map(&guest_queue_map(&q.console().lines(), &[1, 0])?);
        let set = backend.control(&json!({"cmd": "set-queue-map", "map": map}))?;
        println!("queue map {map}: {set}");

        let mut drains: Vec<u64> = Vec::new();
        let mut drained = 0u64;
        let mut offline_ms: Vec<u64> = Vec::new();
        let started = Instant::now();
        for k in 1..=cycles {
            let cpu = q
                .vcpus()?
                .into_iter()
                .find(|c| c.index == 1)
                .ok_or_else(|| Error::Qmp("no vCPU 1".into()))?;
            let qmp = q.qmp()?;
            qmp.events(Duration::ZERO)?;
            let t0 = Instant::now();
            qmp.execute("device_del", Some(json!({ "id": cpu.qom_path })))?;
            qmp.wait_event(Duration::from_secs(60), |e| {
                let i = &e["data"]["info"];
                e["event"] == "ACPI_DEVICE_OST"
                    && i["slot-type"] == "CPU"
                    && i["status"] == 132
                    && i["slot"] == "1"
            })?;
            let report = backend.control(&json!({"cmd": "vcpu-unplug", "vcpu": 1}))?;
            let path = cpu.qom_path.clone();
            q.qmp()?.wait_event(Duration::from_secs(120), |e: &Value| {
                e["event"] == "DEVICE_DELETED"
                    && e["data"]["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with(&path))
            })?;
            offline_ms.push(t0.elapsed().as_millis() as u64);
            drains.push(
                report["latency_us"].as_u64().ok_or_else(|| {
                    Error::Backend(format!("cycle {k}: bad drain report {report}"))
                })?,
            );
            drained += report["drained"].as_u64().unwrap_or(0);
            q.plug_vcpu(&cpu, &format!("cpu1-r{k}"))?;
            backend.control(&json!({"cmd": "vcpu-plug", "vcpu": 1}))?;
            q.wait_ready(&format!("hotplug_stress/up/{k}"))?;
            if k % 10 == 0 {
                println!(
                    "cycle {k}/{cycles}: {:.0} s, drain p50 {} µs, {} completions drained so far",
                    started.elapsed().as_secs_f64(),
                    percentile(&drains, 0.5),
                    drained
                );
            }
        }
        let run = q.wait_done()?;
        run.expect_all_ok()?;
        let data = run.ok("hotplug_stress")?;
        let stats = backend.stats()?;

        let console = q.console().lines().join("\n");
        for bad in [
            "not a head",
            "blocked for more than",
            "hung_task",
            "I/O error",
            "Buffer I/O",
        ] {
            assert!(!console.contains(bad), "guest console shows {bad:?}");
        }
        assert_eq!(
            data["cycles"],
            json!(cycles),
            "every cycle seen by the guest"
        );
        assert_eq!(data["verified"], json!(true));
        let guest = &data["disk_stat_after"];
        let sum = |k: &str| {
            stats
                .queues
                .iter()
                .map(|q| q.extra[k].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let writes: u64 = stats.queues.iter().map(|q| q.writes).sum();
        let flushes: u64 = stats.queues.iter().map(|q| q.flushes).sum();
        let reads: u64 = stats.queues.iter().map(|q| q.reads).sum();
        println!(
            "guest: {} writes and {} reads by the load, {} blocks verified; block layer: {guest}; \
             backend: {writes} writes, {reads} reads, {flushes} flushes, {} in flight, {} signals",
            data["writes"],
            data["reads"],
            data["blocks_verified"],
            sum("in_flight"),
            sum("signals"),
        );
        assert_eq!(
            guest["writes"].as_u64(),
            Some(writes),
            "writes: guest vs backend"
        );
        assert_eq!(
            guest["flushes"].as_u64(),
            Some(flushes),
            "flushes: guest vs backend"
        );
        assert_eq!(sum("in_flight"), 0, "nothing left in flight");
        for qs in &stats.queues {
            let d = &qs.extra["deferred_worker"];
            assert_eq!(
                d["pending"],
                json!(0),
                "queue {}: nothing pending",
                qs.index
            );
            assert_eq!(
                d["enabled"],
                json!(true),
                "queue {}: worker enabled",
                qs.index
            );
        }
        let v1 = stats.extra["vcpus"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vcpu"] == 1)
            .cloned()
            .unwrap_or_default();
        assert_eq!(v1["drains"], json!(cycles), "one drain per unplug: {v1}");
        assert_eq!(v1["online"], json!(true));
        println!(
            "{cycles} cycles in {:.0} s: device_del → DEVICE_DELETED p50 {} ms, p99 {} ms; \
             drain (event to last signal) p50 {} µs, p99 {} µs, max {} µs; {drained} completions \
             drained; guest cycle median {} ms",
            started.elapsed().as_secs_f64(),
            percentile(&offline_ms, 0.5),
            percentile(&offline_ms, 0.99),
            percentile(&drains, 0.5),
            percentile(&drains, 0.99),
            drains.iter().max().copied().unwrap_or(0),
            data["cycle_ms"]["median"],
        );
        Ok(())
    });
}
