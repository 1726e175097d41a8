//! Live migration on shared storage in Ceph: two backend processes on one RBD image (the
//! throw-away single-node cluster of `rbd::testing`), a QEMU on each, the guest migrated
//! A → B → A over unix sockets while it keeps reading through its page cache and with O_DIRECT
//! and writing tagged blocks (the agent's `migrate` workload); at the end it checks every byte
//! it read and wrote.
//!
//! Both backends open the image from the start; the destination's opens it while the source
//! still writes, and librbd moves the exclusive lock to it at its first write. The backends run
//! with `--cache writeback` (librbd's cache on), so the source must write that cache back when
//! QEMU stops its rings, before the destination reads. After the last hop the host exports the
//! image from the cluster and checks the region the guest read and the stop block.
//!
//! The hand-over must not stall the guest: each hop's downtime (`query-migrate`) and the
//! guest's longest write round (its own clock, which stands still while the VM is stopped, so
//! this is the wait after it resumes: the lock moving) stay under a few seconds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use guest_agent::protocol::MIGRATE_STOP;
use rbd::testing::{TestCluster, POOL};
use vmm_tests::agent::pattern;
use vmm_tests::migration::{self, PingPong, READ_MIB, READ_SEED, STOP_MIB};
use vmm_tests::{vm_test, Error, Result};

const MIB: u64 = 1 << 20;
/// Guest RAM: small enough to migrate in seconds under TCG.
const GUEST_MIB: u64 = 256;
/// The image's name in the test cluster's pool.
const IMAGE: &str = "vm-migrate";
/// Longest acceptable downtime of one hop. QEMU aims at 300 ms; under TCG on a loaded machine
/// a hop that stops the guest for seconds means the hand-over stalled (a lock wait, a flush
/// that hangs).
const MAX_DOWNTIME: Duration = Duration::from_secs(3);
/// Longest acceptable write round in the guest (a write and its read-back), across the hops.
const MAX_WRITE_MS: f64 = 5000.0;

/// Writes `block` over the stop block of the RBD image as one more librbd client: it takes the image's
/// exclusive lock from the backend serving the guest, writes, and closes the image (releasing
/// the lock, which the backend takes back at its next write).
fn write_rbd_control(conf: &std::path::Path, block: &[u8]) -> Result<()> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::Backend(format!("{what}: {e}"));
    let opts = rbd::ClusterOptions {
        conf: Some(conf.to_path_buf()),
        ..Default::default()
    };
    let spec = rbd::ImageSpec {
        pool: POOL.into(),
        image: IMAGE.into(),
        snap: None,
    };
    let image =
        Arc::new(rbd::Image::open(&opts, &spec, false).map_err(|e| fail("open the image", &e))?);
    let mut block = block.to_vec();
    let iov = libc::iovec {
        iov_base: block.as_mut_ptr().cast(),
        iov_len: block.len(),
    };
    let mut queue = rbd::AioQueue::new(image.clone(), 1).map_err(|e| fail("an AIO queue", &e))?;
    // SAFETY: `iov` and `block` live until the request is reaped below (or, if it never ends,
    // until the queue abandons it and the buffers are leaked), and nothing else touches them.
    unsafe {
        queue.submit(
            rbd::AioOp::Writev {
                offset: STOP_MIB * MIB,
                iovecs: &iov,
                iovcnt: 1,
            },
            0,
        )
    };
    let mut ret = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ret.is_none() {
        if std::time::Instant::now() > deadline {
            queue.abandon();
            std::mem::forget(block);
            return Err(Error::Backend(
                "writing the stop block: no answer in 60 s".into(),
            ));
        }
        queue.reap(|_, r| ret = Some(r));
        std::thread::sleep(Duration::from_millis(5));
    }
    match ret {
        Some(r) if r >= 0 => {}
        r => return Err(Error::Backend(format!("writing the stop block: {r:?}"))),
    }
    drop(queue);
    image
        .flush()
        .map_err(|e| fail("flush the stop block", &e))?;
    image.close().map_err(|e| fail("close the image", &e))
}

#[test]
fn live_migration_ping_pong_on_an_rbd_image_with_io_running() {
    vm_test("rbd-migration", |h| {
        let c = TestCluster::shared();
        // The read region's pattern, imported into the cluster.
        let file = migration::prepare_image(h)?;
        c.rbd(&[
            "import",
            "--no-progress",
            &file.display().to_string(),
            &format!("{POOL}/{IMAGE}"),
        ]);
        let spec = PathBuf::from(format!("rbd:{POOL}/{IMAGE}:conf={}", c.conf().display()));
        let kind = h.backend_kind.clone();
        // `VMM_TESTS_MIGRATION_UNLOGGED=1`: the backends leave reads out of the dirty log, and
        // the sentinel check fails on the first hop.
        let extra = migration::test_args_from_env();
        let mut a = migration::start_backend(h, &kind, &spec, "a", Some("writeback"), &extra)?;
        let mut b = migration::start_backend(h, &kind, &spec, "b", Some("writeback"), &extra)?;
        let scenario = PingPong {
            backends: [&a, &b],
            memory_mib: GUEST_MIB,
            hops: 2,
            settle: Duration::from_secs(2),
            finish_timeout: None,
            sentinel: true,
        };
        let result =
            scenario.run_with_control(h, |b| write_rbd_control(c.conf(), b), |_, _| Ok(()))?;
        let data = migration::expect_guest_checks(&result.verdict?, result.hops.len())?;
        let longest = data["max_write_ms"].as_f64().unwrap_or(f64::INFINITY);
        if longest > MAX_WRITE_MS {
            return Err(Error::Agent(format!(
                "the guest waited {longest:.0} ms for one write and its read-back"
            )));
        }
        for hop in &result.hops {
            let downtime = hop.migration.downtime.ok_or_else(|| {
                Error::Qmp(format!("{}: query-migrate gave no downtime", hop.name))
            })?;
            if downtime > MAX_DOWNTIME {
                return Err(Error::Qmp(format!(
                    "{}: downtime {} ms, more than {} ms",
                    hop.name,
                    downtime.as_millis(),
                    MAX_DOWNTIME.as_millis()
                )));
            }
        }
        a.check_alive()?;
        b.check_alive()?;
        for (name, backend) in [("A", &mut a), ("B", &mut b)] {
            // SIGTERM: the backend drains, writes its cache back and closes the image.
            let status = backend.terminate(Duration::from_secs(20))?;
            if !status.success() {
                return Err(Error::Backend(format!(
                    "backend {name} on SIGTERM: {status}"
                )));
            }
        }

        // What the cluster holds, read by another client.
        let exported = c.export(IMAGE);
        let read_len = (READ_MIB * MIB) as usize;
        if pattern::check(READ_SEED, 0, &exported[..read_len]).is_some() {
            return Err(Error::Agent(
                "the region the guest only read changed in the image".into(),
            ));
        }
        let stop_at = (STOP_MIB * MIB) as usize;
        if !exported[stop_at..].starts_with(MIGRATE_STOP) {
            return Err(Error::Agent("the stop block is not in the image".into()));
        }
        Ok(())
    });
}
