//! The same guest under cloud-hypervisor, when `CLOUD_HYPERVISOR_BIN`
//! names its binary. cloud-hypervisor needs a KVM that boots guests; the
//! PVM `/dev/kvm` of this project's CI machines does not, so there this
//! test prints why it skipped (the only VM test that may).

use vmm_tests::ch::{ch_bin, CloudHypervisor, SKIP_REASON};
use vmm_tests::{vm_test, AgentPlan, VhostUserDisk, VmConfig};

#[test]
fn cloud_hypervisor_write_verify() {
    let Some(bin) = ch_bin() else {
        println!("{SKIP_REASON}");
        return;
    };
    vm_test("cloud-hypervisor", |h| {
        let image = h.image("disk.img", 512 << 20)?;
        let cfg = h.backend_config(&image).queues(2);
        let _backend = h.start_backend(&cfg)?;
        let plan = AgentPlan::new(&["info", "verify", "interrupts"]);
        let vm = VmConfig::new(2, plan).disk(VhostUserDisk::new(&cfg.socket, 2));
        let mut ch = CloudHypervisor::start(&bin, &vm, &h.assets, &h.dir, "ch1")?;
        let run = ch.wait_done()?;
        run.expect_all_ok()?;
        assert_eq!(run.ok("info")?["num_queues"], 2);
        Ok(())
    });
}
