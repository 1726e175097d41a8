//! A guest whose disk is a Ceph RBD image served by our backend: `mkfs.ext4`, mount, write,
//! sync, unmount in the guest; a second boot mounts the same file system and writes again; then
//! the host exports the image from the cluster (`rbd export`, another librbd client) and checks
//! it with `e2fsck -fn` and `debugfs -R 'cat ...'`. The cluster is the throw-away single-node
//! one of `rbd::testing`.

use std::path::PathBuf;
use std::time::Duration;

use rbd::testing::{TestCluster, POOL};
use vmm_tests::agent::pattern;
use vmm_tests::{debugfs_cat, e2fsck, vm_test, AgentPlan, VhostUserDisk, VmConfig};

const MIB: u64 = 1 << 20;

#[test]
fn ext4_on_an_rbd_image_checks_clean_from_the_cluster() {
    vm_test("rbd-ext4", |h| {
        let c = TestCluster::shared();
        c.create_image("vm-ext4", 256 * MIB);
        let spec = format!("rbd:{POOL}/vm-ext4:conf={}", c.conf().display());
        let cfg = h
            .backend_config(&PathBuf::from(&spec))
            .queues(2)
            .cache("writeback");

        for (boot, mkfs, seed) in [(1, true, 50u64), (2, false, 60)] {
            let mut backend = h.start_backend(&cfg)?;
            let plan = AgentPlan::new(&["ext4"])
                .param("ext4.mkfs", mkfs)
                .param("ext4.mib", 8)
                .param("ext4.dontcache_mib", 0)
                .param("ext4.seed", seed);
            let vm = VmConfig::new(2, plan).disk(VhostUserDisk::new(&cfg.socket, 2));
            let run = h.run_vm(&vm)?;
            run.expect_all_ok()?;
            // SIGTERM: the backend drains, flushes and closes the image (releasing its lock).
            let status = backend.terminate(Duration::from_secs(20))?;
            assert!(
                status.success(),
                "boot {boot}: backend exit on SIGTERM: {status}"
            );
            let log = backend.log_text();
            assert!(
                log.contains("engine rbd"),
                "boot {boot}: served by the RBD engine"
            );
            for line in log
                .lines()
                .filter(|l| l.contains("rbd") || l.contains("stopping"))
            {
                println!("boot {boot} backend: {line}");
            }
        }

        // What the cluster holds, read by another client.
        let exported = h.path("exported.img");
        c.rbd(&[
            "export",
            "--no-progress",
            &format!("{POOL}/vm-ext4"),
            &exported.display().to_string(),
        ]);
        let fsck = e2fsck(&exported)?;
        println!("{}", fsck.trim());
        let hello = debugfs_cat(&exported, "/hello.txt")?;
        assert_eq!(
            String::from_utf8_lossy(&hello),
            vmm_tests::agent::EXT4_HELLO,
            "/hello.txt"
        );
        let data = debugfs_cat(&exported, "/data.bin")?;
        assert_eq!(data.len() as u64, 8 * MIB, "/data.bin size");
        assert_eq!(
            pattern::check(60, 0, &data),
            None,
            "/data.bin holds the second boot's pattern, on the file system the first made"
        );
        Ok(())
    });
}
