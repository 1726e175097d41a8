//! I/O limits as a guest sees them: fio in the guest (the fio initramfs,
//! `build-initramfs.sh -F`) on a disk served with `--limit`, an IOPS-bound and a
//! bandwidth-bound workload each getting its limit within 5 %, on both queues.
//!
//! Under TCG this guest reaches about ten times these limits unthrottled (see
//! docs/guest-fio.md), so the limits, not the emulation, set the pace.

use vmm_tests::{setup, vm_test, AgentPlan, VhostUserDisk, VmConfig};

const QUEUES: u16 = 2;
const IOPS: f64 = 2000.0;
const BPS: f64 = 100.0 * 1024.0 * 1024.0;

#[test]
fn fio_in_the_guest_gets_the_limits() {
    vm_test("limits", |h| {
        if !h.backend_kind.has_stats() {
            println!("the backend under test has no --limit (qemu-storage-daemon); skipped");
            return Ok(());
        }
        h.assets = setup::fio_guest_assets()?;
        let image = h.image("disk.img", 1 << 30)?;
        let mut cfg = h.backend_config(&image).queues(QUEUES).cache("none");
        cfg.extra_args = vec![
            "--limit".into(),
            format!("iops-total={IOPS},bps-total={BPS}"),
        ];
        let backend = h.start_backend(&cfg)?;
        // 4 KiB at QD32 on two jobs is bound by the IOPS limit (2000 x 4 KiB is 8 MiB/s);
        // 1 MiB reads by the bandwidth limit (100 reads a second).
        let plan = AgentPlan::new(&["fio#randread-4k-qd32-q2", "fio#read-1m-qd8-q1"])
            .param("fio.runtime", 5)
            .param("fio.ramp", 1);
        let vm =
            VmConfig::new(u32::from(QUEUES), plan).disk(VhostUserDisk::new(&cfg.socket, QUEUES));
        let run = h.run_vm(&vm)?;
        run.expect_all_ok()?;

        let summary =
            |w: &str| -> vmm_tests::Result<serde_json::Value> { Ok(run.ok(w)?["summary"].clone()) };
        let small = summary("fio#randread-4k-qd32-q2")?;
        let large = summary("fio#read-1m-qd8-q1")?;
        let iops = small["iops"].as_f64().unwrap_or(0.0);
        let bps = large["bw_bytes"].as_f64().unwrap_or(0.0);
        println!(
            "fio in the guest: {iops:.0} IOPS under iops-total={IOPS}, {:.1} MiB/s under bps-total={BPS}",
            bps / 1048576.0
        );
        assert!(
            (iops - IOPS).abs() <= IOPS * 0.05,
            "{iops:.0} IOPS under iops-total={IOPS}: {small}"
        );
        assert!(
            (bps - BPS).abs() <= BPS * 0.05,
            "{bps:.0} B/s under bps-total={BPS}: {large}"
        );
        // Both queues carried requests, and both waited for tokens.
        let stats = backend.control(&serde_json::json!({"cmd": "stats"}))?;
        for q in stats["queues"].as_array().into_iter().flatten() {
            println!(
                "queue {}: {} requests, {} waited for tokens, {} us waiting",
                q["index"], q["requests"], q["throttled"], q["throttle_wait_us"]
            );
            assert!(q["throttled"].as_u64().unwrap_or(0) > 0, "{q}");
        }
        Ok(())
    });
}
