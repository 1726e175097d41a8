//! A read-only disk rejects guest writes: the guest sees `ro`, cannot
//! write a block, can still read, and the image is unchanged.

use vmm_tests::agent::pattern;
use vmm_tests::{vm_test, AgentPlan, VhostUserDisk, VmConfig};

#[test]
fn read_only_disk_rejects_guest_writes() {
    vm_test("readonly", |h| {
        let image = h.image("disk.img", 256 << 20)?;
        // Known content in the first MiB, to compare after the guest ran.
        let mut head = vec![0u8; 1 << 20];
        pattern::fill(99, 0, &mut head);
        std::fs::write(&image, &head).map_err(|e| vmm_tests::Error::io("write image", e))?;
        std::fs::File::options()
            .write(true)
            .open(&image)
            .and_then(|f| f.set_len(256 << 20))
            .map_err(|e| vmm_tests::Error::io("size image", e))?;

        let cfg = h.backend_config(&image).read_only();
        let _backend = h.start_backend(&cfg)?;
        let plan = AgentPlan::new(&["info", "readonly"]);
        let vm = VmConfig::new(1, plan).disk(VhostUserDisk::new(&cfg.socket, 1));
        let run = h.run_vm(&vm)?;
        run.expect_all_ok()?;
        assert_eq!(run.ok("info")?["ro"], true, "guest sees a read-only disk");
        let ro = run.ok("readonly")?;
        assert_eq!(ro["rejected"], true);
        println!(
            "guest write rejected: open {}, write {}",
            ro["open_rw_error"], ro["write_error"]
        );

        let after = std::fs::read(&image).map_err(|e| vmm_tests::Error::io("read image", e))?;
        assert_eq!(
            pattern::check(99, 0, &after[..1 << 20]),
            None,
            "image changed"
        );
        Ok(())
    });
}
