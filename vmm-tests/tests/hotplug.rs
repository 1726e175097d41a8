//! vCPU hotplug through the harness: with `-smp 2,maxcpus=4` the harness
//! unplugs vCPU 1 over QMP while the guest waits (the guest takes the CPU
//! offline, QEMU reports the eject request and `DEVICE_DELETED`), plugs it
//! back, the guest agent brings it online, and I/O then runs from both
//! vCPUs again. The harness side of the vCPU-unplug work: the backend's
//! drain on unplug is tested on top of this.

use std::time::Duration;

use vmm_tests::{vm_test, AgentPlan, VhostUserDisk, VmConfig};

#[test]
fn unplug_and_replug_a_vcpu() {
    vm_test("hotplug", |h| {
        let image = h.image("disk.img", 256 << 20)?;
        let cfg = h.backend_config(&image).queues(2);
        let _backend = h.start_backend(&cfg)?;
        let plan = AgentPlan::new(&["wait_cpus#down", "wait_cpus#up", "verify", "queue_map"])
            .param("wait_cpus#down.n", 1)
            .param("wait_cpus#up.n", 2)
            .param("verify.mib", 8);
        let mut vm = VmConfig::new(2, plan).disk(VhostUserDisk::new(&cfg.socket, 2));
        vm.max_cpus = 4;
        let mut q = h.start_vm(&vm)?;
        q.wait_hello()?;

        q.wait_ready("wait_cpus#down")?;
        let (cpu, unplug) = q.unplug_vcpu(1, Duration::from_secs(60))?;
        println!(
            "unplugged vCPU 1 ({}): eject request after {:?}, DEVICE_DELETED after {:?}, \
             guest offline took {:?} by QMP timestamps",
            cpu.qom_path, unplug.eject_request, unplug.deleted, unplug.offline_by_timestamps
        );
        assert!(
            unplug.eject_request.is_some(),
            "no ACPI_DEVICE_OST eject request for slot 1"
        );
        assert_eq!(q.vcpus()?.len(), 1, "one vCPU left");

        q.wait_ready("wait_cpus#up")?;
        q.plug_vcpu(&cpu, "cpu1-replugged")?;
        let run = q.wait_done()?;
        run.expect_all_ok()?;
        let down = run.ok("wait_cpus#down")?;
        let up = run.ok("wait_cpus#up")?;
        println!(
            "guest: offline after {} ms, back online after {} ms",
            down["waited_ms"], up["waited_ms"]
        );
        assert_eq!(up["online"], serde_json::json!([0, 1]));
        let verify = run.ok("verify")?;
        let cpus: Vec<u64> = verify["writers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["cpu"].as_u64())
            .collect();
        assert_eq!(cpus, vec![0, 1], "I/O from both vCPUs after the re-plug");
        Ok(())
    });
}
