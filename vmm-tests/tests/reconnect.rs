//! The backend outlives its frontends and survives being killed:
//! two VMs booted one after the other on the same backend socket (the
//! second reads what the first wrote), a backend killed while a guest
//! is idle, restarted on the same socket, then attached by a new VM, and a
//! backend stopped and killed again and again under a running guest that
//! QEMU reconnects (`reconnect-ms`), with completions out of order.

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

/// QEMU reconnects (`reconnect-ms`) to the backend, which is stopped with
/// SIGTERM twice and killed with SIGKILL twice while the guest does
/// verified random I/O on both queues, from four vCPUs (two threads, so two
/// requests in flight, per queue). Writes are held on the deferred path
/// (`dontcache`, 20 ms batches) while reads complete at once, so
/// completions are out of order at every restart; used entries go out in
/// available-ring order (`--used-order avail`), so that each next backend
/// starts exactly at the requests the guest has not seen complete. The
/// guest must see no I/O error, every block it wrote must read back, and
/// its kernel must log no hung task and no "not a head" (a used entry for a
/// request it was not waiting for).
#[test]
fn backend_restarted_under_io_while_qemu_reconnects() {
    vm_test("restart-under-io", |h| {
        let image = h.image("disk.img", 256 << 20)?;
        let mut cfg = h.backend_config(&image).queues(2);
        cfg.extra_args.extend(
            [
                "--cache",
                "dontcache",
                "--defer-delay-us",
                "20000",
                "--strict-batching",
                "--used-order",
                "avail",
            ]
            .map(String::from),
        );
        let mut backend = h.start_backend(&cfg)?;
        let disk = VhostUserDisk::new(&cfg.socket, 2).reconnect_ms(100);
        let plan = AgentPlan::new(&["randio"])
            .param("randio.secs", 30)
            .param("randio.mib", 32)
            .param("randio.seed", 31);
        let mut vm = h.start_vm(&VmConfig::new(4, plan).disk(disk))?;
        vm.wait_hello()?;
        for (i, kill) in [false, true, false, true].into_iter().enumerate() {
            std::thread::sleep(Duration::from_secs(4));
            let status = if kill {
                backend.kill()?
            } else {
                backend.terminate(Duration::from_secs(30))?
            };
            println!(
                "restart {}: backend {} ({status})",
                i + 1,
                if kill { "killed" } else { "stopped" }
            );
            if !kill {
                assert!(status.success(), "SIGTERM: the backend exits 0 ({status})");
            }
            backend = h.start_backend(&cfg)?;
        }
        let run = vm.wait_done()?;
        run.print();
        run.expect_all_ok()?;
        let verified = run.ok("randio")?;
        assert_eq!(verified["verified"], true, "randio: {verified}");
        let console = vm.console().lines().join("\n");
        for bad in ["not a head", "blocked for more than", "I/O error"] {
            assert!(
                !console.contains(bad),
                "the guest logged {bad:?}:\n{console}"
            );
        }
        backend.check_alive()?;
        Ok(())
    });
}
