//! The guest sees the disk as the backend describes it: `vda` with the
//! queues we asked for, the image's size and the write-cache mode the
//! backend advertises (our backend always offers FLUSH: "write back").

use vmm_tests::{vm_test, AgentPlan, BackendKind, VhostUserDisk, VmConfig};

const SIZE: u64 = 1 << 30;

#[test]
fn guest_sees_disk_with_queues_size_and_cache_mode() {
    vm_test("boot", |h| {
        let image = h.image("disk.img", SIZE)?;
        let cfg = h.backend_config(&image).queues(2);
        let _backend = h.start_backend(&cfg)?;
        let vm = VmConfig::new(2, AgentPlan::new(&["info", "interrupts"]))
            .disk(VhostUserDisk::new(&cfg.socket, 2));
        let run = h.run_vm(&vm)?;
        run.expect_all_ok()?;

        assert!(
            run.hello.kernel.starts_with("7."),
            "guest kernel {} is not the 7.x cloud kernel",
            run.hello.kernel
        );
        let info = run.ok("info")?;
        assert_eq!(info["size_bytes"], SIZE, "disk size");
        assert_eq!(info["size_sectors"], SIZE / 512, "disk size in sectors");
        assert_eq!(
            info["num_queues"], 2,
            "hardware queues in /sys/block/vda/mq"
        );
        assert_eq!(info["ro"], false);
        let wc = info["write_cache"].as_str().unwrap_or("");
        println!("write cache: {wc}; queue map: {}", info["queues"]);
        if matches!(h.backend_kind, BackendKind::VhostUserBlk(_)) {
            assert_eq!(
                wc, "write back",
                "our backend advertises FLUSH in every mode"
            );
        }
        // Each queue maps to a CPU and every CPU has a queue.
        let mut cpus: Vec<u64> = info["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|q| q["cpus"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c.as_u64())
            .collect();
        cpus.sort();
        assert_eq!(cpus, vec![0, 1], "queue -> cpu map covers both vCPUs");
        Ok(())
    });
}
