//! The command line, following the vhost-user specification's "Backend program conventions"
//! for block devices (`--socket-path`, `--fd`, `--print-capabilities`, `--blk-file`,
//! `--read-only`), plus this backend's own options.
//!
//! Parsing only: turning the options into a running device is `server.rs`'s job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use disk::{CacheMode, EngineKind};
use throttle::Spec;
use vcpu::{QueueMap, VcpuAffinity};

use crate::sandbox::{LandlockMode, SeccompMode};
use crate::used_order::UsedOrderMode;

/// The capabilities JSON that `--print-capabilities` prints, per the vhost-user specification.
pub const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;

/// vhost-user-blk: a virtio-blk device backend that a VMM attaches over a vhost-user socket.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-blk",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A subcommand (`ctl`); without one, run the backend.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of the backend.
    #[command(flatten)]
    pub backend: BackendArgs,
}

impl Cli {
    /// Checks between options that clap's attributes cannot express; an error exits with
    /// status 2, as clap's own.
    pub fn check(&self) -> Result<(), clap::Error> {
        let b = &self.backend;
        let rbd = b
            .blk_file
            .as_deref()
            .and_then(|p| p.to_str())
            .is_some_and(disk::RbdSpec::is_rbd);
        let conflict = |msg: &str| {
            Err(clap::Error::raw(
                clap::error::ErrorKind::ArgumentConflict,
                format!("{msg}\n"),
            ))
        };
        if rbd {
            if let Some(engine) = b.io_engine {
                return conflict(&format!(
                    "--io-engine {engine}: rbd: images are served through librbd, not a file \
                     engine; leave --io-engine out"
                ));
            }
        } else if b.rbd_connections.is_some() {
            return conflict("--rbd-connections applies to rbd: images only");
        }
        Ok(())
    }
}

/// The default number of cluster connections for an `rbd:` image served by `num_queues`
/// queue threads: one per thread, so that each reads over a connection of its own, up to 2.
/// Each connection is a librados client of its own (about 16 threads, a monitor session, its
/// own sessions with the OSDs), and a second one is what was measured to pay: a host with
/// many disks should not pay that many times per disk by default.
pub fn default_rbd_connections(num_queues: u16) -> u16 {
    num_queues.clamp(1, 2)
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to a running backend's control socket.
    Ctl(CtlArgs),
}

/// Options of `vhost-user-blk ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket the backend was started with (`--control`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// The command: `stats`, `limits show`, `limits set SPEC`, ..., or a raw JSON request
    /// line (its words are joined by spaces).
    #[arg(default_value = "stats", num_args = 1.., trailing_var_arg = true)]
    pub request: Vec<String>,
}

/// Options of the backend itself.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Listen on this unix socket for the VMM (the socket file is created; a stale one replaced).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["fd", "print_capabilities"], conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Use this already-listening unix socket file descriptor, inherited from the manager.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,

    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// The disk image: a regular file, a block device, `null:SIZE` (no I/O, for benchmarks), or
    /// a Ceph RBD image `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]` (a snapshot is served
    /// read-only).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "print_capabilities",
        value_parser = BlkFileParser
    )]
    pub blk_file: Option<PathBuf>,

    /// The Ceph config file for `rbd:` images whose spec has no `conf=` (default: librados's
    /// search, /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,

    /// How long reaching the Ceph cluster and opening an `rbd:` image may take before the
    /// backend gives up, in seconds (librados's client_mount_timeout and rados_mon_op_timeout).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub rbd_timeout: u64,

    /// Cluster connections for an `rbd:` image (default: one per queue thread, at most 2).
    /// The first carries every write, flush and discard and holds the image's exclusive lock;
    /// the others are read-only, and queue thread i reads through connection i mod N. One
    /// connection is used whatever is asked with --cache writeback (librbd's cache is per
    /// connection) or on a writable image with journaling.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub rbd_connections: Option<u16>,

    /// Expose the disk read-only to the guest (and open the image read-only).
    #[arg(long)]
    pub read_only: bool,

    /// Create the image as a sparse file of this size if it does not exist (bytes, or K/M/G/T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Number of virtqueues; one fast-path thread serves each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Maximum size of each virtqueue (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Host cache mode: none (O_DIRECT), writeback (buffered) or dontcache (buffered, dropped behind).
    /// For `rbd:` images: none (librbd's cache off) or writeback (rbd_cache=true, flushes honoured).
    #[arg(long, default_value = "none")]
    pub cache: CacheMode,

    /// With --cache dontcache: how pages leave the host page cache. `auto` uses RWF_DONTCACHE
    /// where the image's file system accepts it; `fallback` always uses plain buffered writes
    /// followed by sync_file_range + POSIX_FADV_DONTNEED.
    #[arg(long, default_value = "auto", value_parser = ["auto", "fallback"])]
    pub dontcache_eviction: String,

    /// I/O engine of files and block devices: io-uring (one ring per queue thread, the default)
    /// or sync (for hosts without io_uring). `rbd:` images always go through librbd, so giving
    /// it with one is an error.
    #[arg(long)]
    pub io_engine: Option<EngineKind>,

    /// Serial number that GET_ID reports (at most 20 bytes).
    #[arg(long, value_parser = parse_serial)]
    pub serial: Option<String>,

    /// Logical block size the guest sees.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// How long the deferred worker lets slow completions (dontcache writes, flushes, errors)
    /// accumulate before completing them as one batch, in microseconds; 0 completes at once.
    #[arg(long, default_value_t = 1000, value_name = "US")]
    pub defer_delay_us: u64,

    /// A deferred batch holding this many bytes to write back is taken at once instead of
    /// after --defer-delay-us: it already amortises its pass, and waiting for more would only
    /// add latency (bytes, or K/M/G/T; 0: the delay always runs out).
    #[arg(long, default_value = "1M", value_name = "BYTES", value_parser = parse_size)]
    pub defer_max_bytes: u64,

    /// Always wait out --defer-delay-us, as the kernel's batching does. By default a slow
    /// completion whose queue thread has nothing else in flight is taken at once, since nothing
    /// is coming to share its batch and waiting would only add latency. Implies
    /// --defer-max-bytes 0.
    #[arg(long)]
    pub strict_batching: bool,

    /// Longest window, in microseconds, for which a queue thread busy-polls its ring after work
    /// before sleeping (kicks stay off meanwhile): lower latency at low queue depth for a CPU
    /// spent spinning. Adaptive by default: the window starts at nothing, grows (4 us, then
    /// four times longer up to this value) while requests keep coming within 1 ms of the last
    /// work, collapses to nothing when the queue goes quiet for longer, and also when a whole
    /// window passes with no request (it then waits a few requests, more each time, before
    /// growing again), so a queue that goes quiet costs no CPU. 0 turns polling off.
    #[arg(long, default_value_t = 50, value_name = "US")]
    pub poll_us: u64,

    /// Poll the whole --poll-us window after every event, as cloud-hypervisor does, instead of
    /// adapting it to how soon requests arrive: each request costs up to a window of CPU even
    /// when the next one is far away.
    #[arg(long)]
    pub poll_fixed: bool,

    /// Register guest memory with each queue thread's io_uring as fixed buffers (again after
    /// every memory-table change), so that a read or write whose data is one segment inside it
    /// skips the kernel's per-request pinning of its pages (`READ_FIXED`/`WRITE_FIXED`). The
    /// price: every page of guest memory is allocated and pinned for the connection's life,
    /// counted against RLIMIT_MEMLOCK (per queue) unless the process has CAP_IPC_LOCK, and
    /// memory the guest gives back (balloon, free page reporting) must not be discarded by the
    /// VMM meanwhile. A registration the kernel refuses leaves requests unregistered.
    /// io-uring engine only.
    #[arg(long)]
    pub fixed_buffers: bool,

    /// Keep polling while requests are at the device as well, instead of sleeping until their
    /// completion wakes the thread. Saves the completion's wake-up at the price of a CPU
    /// spinning through device latencies: for hosts with a core to spare per queue thread. No
    /// effect with --poll-us 0.
    #[arg(long)]
    pub poll_device: bool,

    /// Test only: during a migration, leave the data of reads out of the dirty log, so that
    /// a test can show it notices the destination resuming with stale guest memory.
    #[arg(long, hide = true)]
    pub test_unlogged_reads: bool,

    /// The order in which used entries are published: `completion` (each as it completes) or
    /// `avail` (available-ring order: a request that completes early waits for the older ones,
    /// so that a crash loses and repeats nothing when the VMM restarts the next backend at the
    /// used index, at the price of waiting behind a slow FLUSH or discard).
    #[arg(long, value_enum, default_value_t = UsedOrderMode::Completion, value_name = "ORDER")]
    pub used_order: UsedOrderMode,

    /// With --cache writeback: once this many bytes were written since the last eviction, a
    /// completion writes them back and drops them from the host page cache (bytes, or K/M/G/T).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub page_cache_budget: Option<u64>,

    /// Which vCPU submits to each queue, as the guest maps them (QUEUE=VCPU,...; from the
    /// guest's /sys/block/vda/mq/*/cpu_list). Without it, no pinning, and an unplug drains
    /// every queue.
    #[arg(long, value_name = "MAP", value_parser = parse_queue_map)]
    pub queue_map: Option<QueueMap>,

    /// Host CPUs each vCPU runs on (VCPU=CPUS;..., e.g. "0=2-3;1=4"), when QMP cannot tell us.
    #[arg(long, value_name = "AFFINITY", value_parser = parse_affinity)]
    pub cpu_affinity: Option<VcpuAffinity>,

    /// QEMU's QMP socket (one of its own: QMP serves one client at a time). vCPU thread
    /// affinities pin the queue threads; a vCPU eject request drains that vCPU's queues.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,

    /// Serve line-delimited JSON commands (`stats`) on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// I/O limits, in QEMU's throttling vocabulary: `iops-total=N,bps-write=N,...` with
    /// `iops`/`bps` × `total`/`read`/`write`, each also with `-max` (burst rate) and
    /// `-max-length` (seconds a burst may last), and `iops-size=BYTES`. Changed live with
    /// `ctl limits set SPEC`.
    #[arg(long, value_name = "SPEC", value_parser = parse_limit)]
    pub limit: Option<Spec>,

    /// Share the I/O limits with every backend started with the same group file (created if
    /// missing; e.g. under /dev/shm): their disks together get one limit. A new group takes
    /// --limit; an existing one keeps its limits (a --limit that differs is refused), and
    /// `ctl limits set` on any member changes the group's.
    #[arg(long, value_name = "PATH")]
    pub limit_group: Option<PathBuf>,

    /// System call filter, put on every thread once set up: `on` kills the process with SIGSYS
    /// on a call outside the allowlist (the kernel logs it: audit log or dmesg, type=1326);
    /// `log` allows and logs such calls, to find what the allowlist misses; `off`.
    #[arg(long, value_name = "MODE", default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,

    /// Confine file access with Landlock, where the kernel has it, to the image and the
    /// sockets' directories: `on` or `off`.
    #[arg(long, value_name = "MODE", default_value_t = LandlockMode::On)]
    pub landlock: LandlockMode,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (bytes, or a number with K/M/G/T)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// `--blk-file`: any path, with `rbd:` specs checked here so that a bad one is a usage error
/// (exit status 2). The error quotes the spec shortened, not clap's verbatim echo of it, which
/// could be kilobytes long.
#[derive(Clone, Copy, Debug)]
struct BlkFileParser;

impl clap::builder::TypedValueParser for BlkFileParser {
    type Value = PathBuf;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<PathBuf, clap::Error> {
        let usage = |msg: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("--blk-file: {msg}\n"),
            )
        };
        if let Some(s) = value.to_str().filter(|s| disk::RbdSpec::is_rbd(s)) {
            disk::RbdSpec::parse(s).map_err(|e| usage(e.to_string()))?;
            if !cfg!(feature = "rbd") {
                return Err(usage(format!(
                    "{s}: this build has no RBD support (built without the rbd feature)"
                )));
            }
        }
        Ok(PathBuf::from(value))
    }
}

fn parse_limit(s: &str) -> Result<Spec, String> {
    Spec::parse(s).map_err(|e| e.to_string())
}

fn parse_queue_map(s: &str) -> Result<QueueMap, String> {
    // The queue count is checked against --num-queues at start; 64 is the most we serve.
    QueueMap::parse(s, 64).map_err(|e| e.to_string())
}

fn parse_affinity(s: &str) -> Result<VcpuAffinity, String> {
    VcpuAffinity::parse(s).map_err(|e| e.to_string())
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a queue size"))?;
    if n.is_power_of_two() && (2..=32768).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "queue size {n} must be a power of two from 2 to 32768"
        ))
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("logical block size must be 512 or 4096, not '{s}'")),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > virtio_blk::DEVICE_ID_LEN {
        Err(format!(
            "serial is {} bytes; at most {} fit",
            s.len(),
            virtio_blk::DEVICE_ID_LEN
        ))
    } else {
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn queue_size_must_be_power_of_two() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("0").is_err());
    }

    #[test]
    fn conventions_options_parse() {
        let cli = Cli::try_parse_from([
            "vhost-user-blk",
            "--socket-path",
            "/tmp/s",
            "--blk-file",
            "/tmp/i",
            "--read-only",
            "--num-queues",
            "4",
            "--cache",
            "writeback",
        ])
        .expect("valid command line");
        assert!(cli.backend.read_only);
        assert_eq!(cli.backend.num_queues, 4);
        assert_eq!(cli.backend.cache, CacheMode::Writeback);
        assert_eq!(cli.backend.seccomp, SeccompMode::On);
        assert_eq!(cli.backend.landlock, LandlockMode::On);
    }

    #[test]
    fn sandbox_modes_parse() {
        let cli = Cli::try_parse_from([
            "vhost-user-blk",
            "--socket-path",
            "/tmp/s",
            "--blk-file",
            "/tmp/i",
            "--seccomp",
            "log",
            "--landlock",
            "off",
        ])
        .expect("valid command line");
        assert_eq!(cli.backend.seccomp, SeccompMode::Log);
        assert_eq!(cli.backend.landlock, LandlockMode::Off);
        let bad = [
            "vhost-user-blk",
            "--socket-path",
            "/tmp/s",
            "--blk-file",
            "/tmp/i",
        ];
        assert!(Cli::try_parse_from(bad.iter().chain(&["--seccomp", "trap"])).is_err());
    }

    #[test]
    fn rbd_specs_are_checked_at_parse_time() {
        let parse = |spec: &str| {
            Cli::try_parse_from([
                "vhost-user-blk",
                "--socket-path",
                "/tmp/s",
                "--blk-file",
                spec,
            ])
        };
        let cli = parse("rbd:pool/img@snap:conf=/c:id=u").expect("a valid spec");
        assert_eq!(
            cli.backend.blk_file.as_deref(),
            Some(std::path::Path::new("rbd:pool/img@snap:conf=/c:id=u"))
        );
        assert_eq!(cli.backend.rbd_timeout, 10);
        for bad in ["rbd:", "rbd:/img", "rbd:pool/img:bogus=1"] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("invalid RBD image spec"), "{e}");
        }
        let long = format!("rbd:p/{}", "i".repeat(4096));
        assert_eq!(parse(&long).expect_err("4 KiB spec").exit_code(), 2);
        // A file name merely containing "rbd" is a file.
        assert!(parse("/var/lib/rbd:x").is_ok());
    }

    #[test]
    fn io_engine_and_rbd_connections_go_with_their_kind_of_image() {
        let parse = |file: &str, extra: &[&str]| {
            let base = [
                "vhost-user-blk",
                "--socket-path",
                "/tmp/s",
                "--blk-file",
                file,
            ];
            Cli::try_parse_from(base.iter().chain(extra)).and_then(|cli| cli.check().map(|()| cli))
        };
        // An rbd: image is served through librbd: a file engine asked for is refused, with
        // clap's exit status for a bad command line.
        let e = parse("rbd:p/i", &["--io-engine", "sync"]).expect_err("engine with rbd:");
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("rbd: images are served through librbd"),
            "{e}"
        );
        assert!(parse("rbd:p/i", &["--io-engine", "io-uring"]).is_err());
        let cli = parse("rbd:p/i", &["--rbd-connections", "3"]).expect("rbd: with connections");
        assert_eq!(cli.backend.rbd_connections, Some(3));
        assert!(parse("rbd:p/i", &["--rbd-connections", "0"]).is_err());
        // Files take an engine, and no connections.
        let cli = parse("/tmp/i", &["--io-engine", "sync"]).expect("a file engine");
        assert_eq!(cli.backend.io_engine, Some(EngineKind::Sync));
        let e = parse("/tmp/i", &["--rbd-connections", "2"]).expect_err("connections, file");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            parse("/tmp/i", &[]).expect("a file").backend.io_engine,
            None
        );
        // One connection per queue thread by default, at most 2.
        assert_eq!(
            [1, 2, 4, 8].map(default_rbd_connections),
            [1, 2, 2, 2],
            "default connections for 1, 2, 4 and 8 queues"
        );
    }

    #[test]
    fn limits_parse_or_name_the_bad_key() {
        let base = [
            "vhost-user-blk",
            "--socket-path",
            "/tmp/s",
            "--blk-file",
            "/tmp/i",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(&["--limit", "iops-total=2000"]))
            .expect("valid command line");
        assert_eq!(
            cli.backend.limit.map(|l| l.to_string()).as_deref(),
            Some("iops-total=2000")
        );
        for (bad, names) in [
            ("iops-total=0", "iops-total=0"),
            ("iops-total=-1", "negative"),
            ("iops-totl=5", "iops-totl"),
            ("iops-total=5,iops-read=5", "iops-read"),
        ] {
            let e =
                Cli::try_parse_from(base.iter().chain(&["--limit", bad])).expect_err("a bad limit");
            assert!(e.to_string().contains(names), "{bad}: {e}");
        }
    }

    #[test]
    fn ctl_takes_several_words() {
        let cli = Cli::try_parse_from([
            "vhost-user-blk",
            "ctl",
            "--control",
            "/tmp/c",
            "limits",
            "set",
            "iops-total=5",
        ])
        .expect("valid command line");
        let Some(Command::Ctl(ctl)) = cli.command else {
            panic!("not ctl");
        };
        assert_eq!(ctl.request.join(" "), "limits set iops-total=5");
    }

    #[test]
    fn socket_or_fd_is_required() {
        assert!(Cli::try_parse_from(["vhost-user-blk", "--blk-file", "/tmp/i"]).is_err());
        assert!(Cli::try_parse_from(["vhost-user-blk", "--print-capabilities"]).is_ok());
    }
}
