//! Every queue carries I/O: the guest writes and verifies from one thread
//! pinned to each vCPU, and the backend's per-queue counters (its control
//! socket's `stats`) show reads and writes on every queue. The same boot
//! runs random I/O (synchronous, and io_uring at queue depth 32),
//! `RWF_DONTCACHE` and plain buffered writes on `/dev/vda` (a 7.3 guest
//! kernel accepts the flag on block devices), flushes, a discard, and
//! reads the per-queue interrupt counts.

use vmm_tests::agent::queue_interrupts;
use vmm_tests::{vm_test, AgentPlan, VhostUserDisk, VmConfig};

const QUEUES: u16 = 2;

#[test]
fn write_verify_on_every_queue() {
    vm_test("multiqueue", |h| {
        let image = h.image("disk.img", 1 << 30)?;
        let cfg = h.backend_config(&image).queues(QUEUES).cache("dontcache");
        let backend = h.start_backend(&cfg)?;
        let plan = AgentPlan::new(&[
            "info",
            "verify",
            "randio",
            "uring",
            "dontcache",
            "buffered",
            "flush",
            "discard",
            "interrupts",
        ])
        .param("verify.mib", 32)
        .param("randio.secs", 2)
        .param("uring.secs", 2)
        .param("uring.iodepth", 32)
        .param("dontcache.mib", 16)
        .param("buffered.mib", 16)
        .param("buffered.offset_mib", 160);
        let vm =
            VmConfig::new(u32::from(QUEUES), plan).disk(VhostUserDisk::new(&cfg.socket, QUEUES));
        let run = h.run_vm(&vm)?;
        run.expect_all_ok()?;

        assert_eq!(run.ok("info")?["num_queues"], u64::from(QUEUES));
        let verify = run.ok("verify")?;
        assert_eq!(verify["verified"], true);
        for t in verify["writers"].as_array().into_iter().flatten() {
            assert!(
                t["chunks"].as_u64().unwrap_or(0) > 0,
                "every vCPU wrote: {t}"
            );
        }
        assert_eq!(
            run.ok("dontcache")?["supported"],
            true,
            "RWF_DONTCACHE on /dev/vda"
        );
        let uring = run.ok("uring")?;
        println!(
            "io_uring 4 KiB randwrite at iodepth 32: {} IOPS, p99 {} us",
            uring["iops"], uring["lat_us"]["p99"]
        );
        assert!(uring["ops"].as_u64().unwrap_or(0) > 0, "uring did I/O");

        let irqs = queue_interrupts(run.ok("interrupts")?);
        println!("guest interrupts per queue: {irqs:?}");
        assert_eq!(
            irqs.len(),
            usize::from(QUEUES),
            "one MSI-X vector per queue"
        );
        for (name, n) in &irqs {
            assert!(*n > 0, "no interrupts on {name}");
        }

        if !h.backend_kind.has_stats() {
            println!("backend has no stats (qemu-storage-daemon); per-queue counts not checked");
            return Ok(());
        }
        let stats = backend.stats()?;
        assert_eq!(stats.queues.len(), usize::from(QUEUES));
        for q in &stats.queues {
            println!(
                "backend queue {}: {} requests ({} reads, {} writes, {} flushes), {} MiB read, {} MiB written",
                q.index,
                q.requests,
                q.reads,
                q.writes,
                q.flushes,
                q.bytes_read >> 20,
                q.bytes_written >> 20
            );
            // verify alone puts 256 writes and 256 reads of 64 KiB on each queue.
            assert!(
                q.writes >= 200,
                "queue {} carried too few writes: {}",
                q.index,
                q.writes
            );
            assert!(
                q.reads >= 200,
                "queue {} carried too few reads: {}",
                q.index,
                q.reads
            );
            assert!(
                q.bytes_written >= 16 << 20,
                "queue {} bytes written",
                q.index
            );
        }
        Ok(())
    });
}
