//! The backend outlives its frontends and survives being killed:
//! two VMs booted one after the other on the same backend socket (the
//! second reads what the first wrote), and a backend killed while a guest
//! is idle, restarted on the same socket, then attached by a new VM.

use std::time::Duration;

use vmm_tests::{vm_test, AgentPlan, VhostUserDisk, VmConfig};

#[test]
fn two_vms_one_after_another_on_one_backend() {
    vm_test("two-vms", |h| {
        let image = h.image("disk.img", 256 << 20)?;
        let cfg = h.backend_config(&image).queues(2);
        let mut backend = h.start_backend(&cfg)?;
        let disk = VhostUserDisk::new(&cfg.socket, 2);

        let first = AgentPlan::new(&["verify"])
            .param("verify.seed", 11)
            .param("verify.mib", 8);
        h.run_vm(&VmConfig::new(2, first).disk(disk.clone()))?
            .expect_all_ok()?;
        backend.check_alive()?;

        // The second VM checks the first one's data, then writes its own.
        let second = AgentPlan::new(&["verify", "randio"])
            .param("verify.seed", 11)
            .param("verify.mib", 8)
            .param("verify.write", 0)
            .param("randio.secs", 1);
        let run = h.run_vm(&VmConfig::new(2, second).disk(disk))?;
        run.expect_all_ok()?;
        assert_eq!(run.ok("verify")?["written"], false);
        backend.check_alive()?;
        if h.backend_kind.has_stats() {
            let s = backend.stats()?;
            println!(
                "backend stats after two VMs: {}",
                serde_json::to_string(&s.queues)?
            );
        }
        Ok(())
    });
}

#[test]
fn backend_killed_while_guest_idle_then_restarted() {
    vm_test("backend-restart", |h| {
        let image = h.image("disk.img", 256 << 20)?;
        let cfg = h.backend_config(&image).queues(2);
        let mut backend = h.start_backend(&cfg)?;
        let disk = VhostUserDisk::new(&cfg.socket, 2);

        let idle = AgentPlan::new(&["verify", "idle"])
            .param("verify.seed", 21)
            .param("verify.mib", 8)
            .param("idle.secs", 600);
        let mut vm1 = h.start_vm(&VmConfig::new(2, idle).disk(disk.clone()))?;
        vm1.wait_hello()?;
        vm1.wait_ready("idle")?;
        // QMP works on the idle guest: two vCPUs, each a host thread.
        let cpus = vm1.qmp()?.execute("query-cpus-fast", None)?;
        let threads: Vec<u64> = cpus
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["thread-id"].as_u64())
            .collect();
        println!("QMP query-cpus-fast: vCPU threads {threads:?}");
        assert_eq!(threads.len(), 2, "query-cpus-fast: {cpus}");
        let status = vm1.qmp()?.execute("query-status", None)?;
        assert_eq!(status["status"], "running", "query-status: {status}");

        let status = backend.kill()?;
        println!("backend killed while the guest idles ({status})");
        std::thread::sleep(Duration::from_millis(500));
        println!(
            "first QEMU after the backend died: {}",
            if vm1.running()? {
                "still running"
            } else {
                "exited"
            }
        );
        vm1.kill()?;
        drop(vm1);

        // A new backend on the same socket path (the old socket file is
        // stale) and a new VM that reads the data the first one wrote.
        let _backend = h.start_backend(&cfg)?;
        let check = AgentPlan::new(&["info", "verify"])
            .param("verify.seed", 21)
            .param("verify.mib", 8)
            .param("verify.write", 0);
        let run = h.run_vm(&VmConfig::new(2, check).disk(disk))?;
        run.expect_all_ok()?;
        Ok(())
    });
}
