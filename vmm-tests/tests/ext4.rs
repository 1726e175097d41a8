//! A file system made and written in the guest is sound and readable on
//! the host: `mkfs.ext4`, mount, write, sync, unmount in the guest; then
//! `e2fsck -fn` on the image and `debugfs -R 'cat ...'` to read the files
//! back and compare them with what the guest wrote.

use std::time::Duration;

use vmm_tests::agent::pattern;
use vmm_tests::{debugfs_cat, e2fsck, vm_test, AgentPlan, VhostUserDisk, VmConfig};

const MIB: u64 = 1 << 20;

#[test]
fn ext4_written_in_guest_checks_clean_on_host() {
    vm_test("ext4", |h| {
        let image = h.image("disk.img", 512 * MIB)?;
        let cfg = h.backend_config(&image).queues(2).cache("writeback");
        let mut backend = h.start_backend(&cfg)?;
        let plan = AgentPlan::new(&["ext4"])
            .param("ext4.mib", 16)
            .param("ext4.dontcache_mib", 4)
            .param("ext4.seed", 40);
        let vm = VmConfig::new(2, plan).disk(VhostUserDisk::new(&cfg.socket, 2));
        let run = h.run_vm(&vm)?;
        run.expect_all_ok()?;
        let ext4 = run.ok("ext4")?;
        assert_eq!(
            ext4["dontcache"]["supported"], true,
            "RWF_DONTCACHE on ext4 in the guest"
        );

        // Stop the backend (SIGTERM) so that everything is on disk.
        let status = backend.terminate(Duration::from_secs(10))?;

        let fsck = e2fsck(&image)?;
        println!("{}", fsck.trim());

        let hello = debugfs_cat(&image, "/hello.txt")?;
        assert_eq!(
            String::from_utf8_lossy(&hello),
            vmm_tests::agent::EXT4_HELLO,
            "/hello.txt"
        );
        for (path, seed, len) in [("/data.bin", 40, 16 * MIB), ("/dontcache.bin", 41, 4 * MIB)] {
            let data = debugfs_cat(&image, path)?;
            assert_eq!(data.len() as u64, len, "{path} size");
            assert_eq!(pattern::check(seed, 0, &data), None, "{path} content");
            println!(
                "host read back {path}: {} bytes, pattern seed {seed} ok",
                data.len()
            );
        }
        assert!(status.success(), "backend exit on SIGTERM: {status}");
        Ok(())
    });
}
