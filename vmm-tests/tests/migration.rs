//! Live migration of a guest whose disk the backend serves: two backend processes on one image
//! (shared storage), a QEMU on each, migrating over unix sockets while the guest keeps reading
//! through its page cache and with O_DIRECT and writing tagged blocks (the agent's `migrate`
//! workload). A migration cancelled half-way leaves the source running with logging off; then
//! the guest goes A → B → A; at the end it checks every byte it read and wrote.
//!
//! The reads are what the dirty log is for: the backend writes those guest pages by DMA, which
//! QEMU sees only through the log. Each hop is held open after QEMU's first pass over RAM while
//! the guest reads into buffers that pass sent poisoned (the agent's sentinel); nothing but the
//! log makes QEMU send them again, so without it the guest finds the poison after every hop.
//! `VMM_TESTS_MIGRATION_UNLOGGED=1` starts the backends with `--test-unlogged-reads` (the data
//! of reads left out of the log), and the test then fails on the first hop.

use std::time::{Duration, Instant};

use vmm_tests::migration::{self, PingPong, MIGRATION_TIMEOUT};
use vmm_tests::{vm_test, Error};

/// Guest RAM: small enough to migrate in seconds under TCG.
const GUEST_MIB: u64 = 512;

/// Whether `log` says logging went on and, after that, off again.
fn logging_went_on_then_off(log: &str) -> bool {
    let on = log.find("dirty-page logging on");
    on.is_some_and(|at| log[at..].contains("dirty-page logging off"))
}

#[test]
fn live_migration_cancel_then_ping_pong_with_io_running() {
    vm_test("migration", |h| {
        let image = migration::prepare_image(h)?;
        let extra = migration::test_args_from_env();
        let kind = h.backend_kind.clone();
        let mut a = migration::start_backend(h, &kind, &image, "a", None, &extra)?;
        let mut b = migration::start_backend(h, &kind, &image, "b", None, &extra)?;
        let scenario = PingPong {
            backends: [&a, &b],
            memory_mib: GUEST_MIB,
            hops: 2,
            settle: Duration::from_secs(2),
            finish_timeout: None,
            sentinel: true,
        };
        let result = scenario.run(h, &image, |h, source| {
            // A migration cancelled half-way: throttled so that it still runs when cancelled.
            let plan = migration::plan();
            let (mut target, uri) =
                migration::start_target(h, &plan, scenario.backends[1], GUEST_MIB, "cancel")?;
            source.set_migration_parameters(serde_json::json!({ "max-bandwidth": 8 << 20 }))?;
            source.start_migration(&uri)?;
            let started = Instant::now();
            loop {
                let m = source.query_migration()?;
                match m.status.as_str() {
                    "active" => break,
                    "failed" | "cancelled" | "completed" => {
                        return Err(Error::Qmp(format!("the migration ended early: {m:?}")))
                    }
                    _ if started.elapsed() > MIGRATION_TIMEOUT => {
                        return Err(Error::Qmp("the migration never became active".into()))
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            std::thread::sleep(Duration::from_secs(1));
            source.cancel_migration(MIGRATION_TIMEOUT)?;
            println!(
                "migration A -> B cancelled after {} ms",
                started.elapsed().as_millis()
            );
            let _ = target.kill();
            migration::run_for(source, Duration::from_secs(2))?;
            if scenario.backends[0].kind().has_stats()
                && !logging_went_on_then_off(&scenario.backends[0].log_text())
            {
                return Err(Error::Backend(
                    "backend A did not turn logging on, then off again, for the cancelled \
                     migration"
                        .into(),
                ));
            }
            Ok(())
        })?;
        migration::expect_guest_checks(&result.verdict?, result.hops.len())?;
        a.check_alive()?;
        b.check_alive()?;
        Ok(())
    });
}
