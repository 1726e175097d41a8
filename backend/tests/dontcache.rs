//! `--cache dontcache` end to end: once the guest sees a write complete, its range has left the
//! host page cache — on both eviction paths (RWF_DONTCACHE, and the sync_file_range +
//! POSIX_FADV_DONTNEED fallback) — while under `writeback` the same writes stay resident. The
//! scratch images live under the target directory, on the host's own file system (ext4 here).

mod common;

use common::blk::T_OUT;
use common::{Backend, BackendOpts, Transfer, S_OK};

const WRITE_LEN: usize = 1 << 20;
const WRITES: u64 = 8;

/// Writes `WRITES` MiB through queue 0 and returns (bytes of the image resident in the host page
/// cache once every write completed, the eviction path the backend reports).
fn write_and_measure(cache: &'static str, extra: &[&str]) -> (u64, String) {
    let b = Backend::spawn(&BackendOpts {
        size: 64 << 20,
        cache,
        control: true,
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..BackendOpts::default()
    });
    let mut d = b.connect_queues(1);
    let data: Vec<u8> = (0..WRITE_LEN).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..WRITES {
        let c = d.queue(0).execute(&Transfer::blk(
            T_OUT,
            i * (WRITE_LEN as u64 / 512),
            &data,
            0,
        ));
        assert_eq!(c.status, S_OK, "write {i}");
    }
    let resident = disk::resident_bytes_of(&b.image).expect("mincore over the image");
    let stats = b.stats();
    // The data really is in the image.
    assert_eq!(b.image_bytes(3 * WRITE_LEN as u64, 4096), data[..4096]);
    (
        resident,
        stats["device"]["eviction_path"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[test]
fn dontcache_writes_leave_nothing_resident_with_rwf_dontcache() {
    let (resident, path) = write_and_measure("dontcache", &[]);
    assert_eq!(
        path, "rwf-dontcache",
        "this host's ext4 takes RWF_DONTCACHE"
    );
    assert!(
        resident <= 64 << 10,
        "{resident} bytes of the image still resident after dontcache writes"
    );
}

#[test]
fn dontcache_writes_leave_nothing_resident_with_the_fallback_path() {
    let (resident, path) = write_and_measure("dontcache", &["--dontcache-eviction", "fallback"]);
    assert_eq!(path, "sync-file-range+fadvise");
    assert!(
        resident <= 64 << 10,
        "{resident} bytes of the image still resident after dontcache writes"
    );
}

#[test]
fn writeback_writes_stay_resident() {
    let (resident, path) = write_and_measure("writeback", &[]);
    assert_eq!(path, "page-cache");
    assert!(
        resident >= WRITES * WRITE_LEN as u64,
        "only {resident} bytes resident after {WRITES} MiB of buffered writes"
    );
}

/// A slow completion whose queue has nothing else in flight is taken at once: waiting out the
/// batching delay would add latency with nothing to batch it with. `--strict-batching` waits.
#[test]
fn a_lone_dontcache_write_does_not_wait_out_the_batch_delay() {
    let elapsed = |strict: bool| {
        let mut extra_args = vec!["--defer-delay-us".to_string(), "1000000".to_string()];
        if strict {
            extra_args.push("--strict-batching".to_string());
        }
        let b = Backend::spawn(&BackendOpts {
            cache: "dontcache",
            extra_args,
            ..BackendOpts::default()
        });
        let mut d = b.connect_queues(1);
        let start = std::time::Instant::now();
        let c = d
            .queue(0)
            .execute(&Transfer::blk(T_OUT, 0, &[7u8; 4096], 0));
        assert_eq!(c.status, S_OK);
        start.elapsed()
    };
    let lone = elapsed(false);
    assert!(
        lone < std::time::Duration::from_millis(300),
        "a lone write took {lone:?} under a 1 s batch delay"
    );
    let strict = elapsed(true);
    assert!(
        strict >= std::time::Duration::from_millis(900),
        "with --strict-batching a lone write waits out the delay, took {strict:?}"
    );
}
