//! The host page cache a guest can hold: under `--cache dontcache` the
//! guest writes 1 GiB with `RWF_DONTCACHE` and 1 GiB with plain buffered
//! writes to `/dev/vda` and the image's residency in the host page cache
//! (`mincore`, sampled every 100 ms) stays at or under 64 MiB throughout;
//! under `--cache writeback` the same buffered gigabyte leaves more than
//! 512 MiB of the image cached. The data verifies in both.

use std::time::Duration;

use vmm_tests::pagecache::Sampler;
use vmm_tests::{vm_test, AgentPlan, VhostUserDisk, VmConfig};

const MIB: u64 = 1 << 20;
const GIB_MIB: u64 = 1024;

fn plan(workloads: &[&str]) -> AgentPlan {
    AgentPlan::new(workloads)
        .param("dontcache.offset_mib", 0)
        .param("dontcache.mib", GIB_MIB)
        .param("buffered.offset_mib", GIB_MIB + 64)
        .param("buffered.mib", GIB_MIB)
}

#[test]
fn dontcache_bounds_the_host_page_cache_writeback_does_not() {
    vm_test("pagecache", |h| {
        let image = h.image("disk.img", 3 << 30)?;

        // dontcache: both kinds of guest writes stay out of the host cache.
        let cfg = h.backend_config(&image).queues(2).cache("dontcache");
        let mut backend = h.start_backend(&cfg)?;
        let sampler = Sampler::start(&image, Duration::from_millis(100));
        let vm = VmConfig::new(2, plan(&["dontcache", "buffered"]))
            .disk(VhostUserDisk::new(&cfg.socket, 2));
        let run = h.run_vm(&vm);
        let dc = sampler.stop();
        let run = run?;
        run.expect_all_ok()?;
        println!(
            "dontcache: host page cache peak {} MiB over {} samples ({} MB/s with RWF_DONTCACHE, {} MB/s buffered)",
            dc.peak / MIB,
            dc.count,
            run.ok("dontcache")?["mb_s"],
            run.ok("buffered")?["mb_s"]
        );
        backend.terminate(Duration::from_secs(10))?;

        // writeback: the buffered gigabyte stays in the host cache.
        let cfg = h.backend_config(&image).queues(2).cache("writeback");
        let _backend = h.start_backend(&cfg)?;
        let sampler = Sampler::start(&image, Duration::from_millis(100));
        let vm = VmConfig::new(2, plan(&["buffered"])).disk(VhostUserDisk::new(&cfg.socket, 2));
        let run = h.run_vm(&vm);
        let wb = sampler.stop();
        run?.expect_all_ok()?;
        println!(
            "writeback: host page cache peak {} MiB over {} samples",
            wb.peak / MIB,
            wb.count
        );

        assert!(dc.count > 10, "too few samples: {}", dc.count);
        assert!(
            dc.peak <= 64 * MIB,
            "dontcache let the image hold {} MiB of host page cache",
            dc.peak / MIB
        );
        assert!(
            wb.peak > 512 * MIB,
            "writeback held only {} MiB: is the sampler blind?",
            wb.peak / MIB
        );
        Ok(())
    });
}
