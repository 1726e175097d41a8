//! `migrate-bench`: how long a live migration of a guest with I/O running takes, and how long the
//! guest is stopped, with our backend and with qemu-storage-daemon's vhost-user-blk export.
//!
//! ```text
//! cargo run --release -p vmm-bench --bin migrate-bench -- [--rounds 3] [--hops 2] [--mib 512]
//!     [--peers ours,qsd] [--cache writeback|none]
//! ```
//!
//! For each round and each peer: two backend processes of that peer on one image, a guest of
//! `--mib` MiB booted on the first running the agent's `migrate` workload (page-cache and O_DIRECT
//! reads of a region of known content, tagged writes), then `--hops` migrations A → B → A … over
//! unix sockets, 2 s of load between hops, and at the end the guest's check of every byte it read
//! and wrote (given 120 s to finish). It prints each hop's total time and downtime (the source's
//! `query-migrate`), the medians per peer and hop as markdown, and each round's verdict: a guest
//! that did not verify is reported, not hidden, and the run goes on. Peers alternate within a round, so that the machine's
//! noise falls on both.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vmm_tests::backend::{backend_bin, BackendKind};
use vmm_tests::migration::{self, PingPong};
use vmm_tests::spread::percentile;
use vmm_tests::{Error, Harness, Result};

/// Live migration of a guest with I/O running: ours against qemu-storage-daemon.
#[derive(Parser, Debug)]
#[command(name = "migrate-bench")]
struct Args {
    /// Rounds (each peer once per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Migrations per round (A → B → A ...).
    #[arg(long, default_value_t = 2)]
    hops: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// Which backends: `ours`, `qsd`.
    #[arg(long, value_delimiter = ',', default_value = "ours,qsd")]
    peers: Vec<String>,
    /// Cache mode of both: `writeback` (qemu-storage-daemon `cache.direct=off`) or `none`
    /// (`cache.direct=on`).
    #[arg(long, default_value = "writeback")]
    cache: String,
}

/// One hop of one round.
struct Sample {
    peer: String,
    hop: String,
    total_ms: u64,
    downtime_ms: u64,
}

/// How one round's guest ended: its checks passed, or why not.
struct Verdict {
    peer: String,
    round: usize,
    outcome: std::result::Result<String, String>,
}

fn kind(peer: &str) -> Result<BackendKind> {
    match peer {
        "ours" => Ok(BackendKind::VhostUserBlk(backend_bin()?)),
        "qsd" => Ok(BackendKind::Qsd(
            std::env::var_os("QSD_BIN")
                .unwrap_or_else(|| "qemu-storage-daemon".into())
                .into(),
        )),
        other => Err(Error::Backend(format!("unknown peer {other}: ours or qsd"))),
    }
}

/// One round of `peer`: its hops, and whether the guest then verified everything.
fn round(args: &Args, peer: &str, kind: &BackendKind) -> Result<(Vec<Sample>, Result<String>)> {
    let mut h = Harness::new(&format!("migrate-bench-{peer}"))?;
    let image = migration::prepare_image(&h)?;
    let a = migration::start_backend(&h, kind, &image, "a", Some(&args.cache), &[])?;
    let b = migration::start_backend(&h, kind, &image, "b", Some(&args.cache), &[])?;
    let scenario = PingPong {
        backends: [&a, &b],
        memory_mib: args.mib,
        hops: args.hops,
        settle: Duration::from_secs(2),
        finish_timeout: Some(Duration::from_secs(120)),
        // Holding each hop open for the sentinel check would add to the total time measured.
        sentinel: false,
    };
    let result = match scenario.run(&mut h, &image, |_, _| Ok(())) {
        Ok(r) => r,
        Err(e) => {
            h.keep();
            h.dump_logs();
            return Err(e);
        }
    };
    let verdict = result.verdict.and_then(|run| {
        run.expect_all_ok()?;
        Ok(run.ok("migrate")?.to_string())
    });
    match &verdict {
        Ok(data) => println!("{peer}: guest verified: {data}"),
        Err(e) => {
            println!("{peer}: the guest did not verify after the last hop: {e}");
            h.keep();
            h.dump_logs();
        }
    }
    let samples = result
        .hops
        .into_iter()
        .map(|hop| Sample {
            peer: peer.to_string(),
            hop: hop.name,
            total_ms: hop.migration.total.as_millis() as u64,
            downtime_ms: hop
                .migration
                .downtime
                .map_or(u64::MAX, |d| d.as_millis() as u64),
        })
        .collect();
    Ok((samples, verdict))
}

fn run(args: &Args) -> Result<()> {
    let kinds: Vec<(String, BackendKind)> = args
        .peers
        .iter()
        .map(|p| kind(p).map(|k| (p.clone(), k)))
        .collect::<Result<_>>()?;
    let mut samples = Vec::new();
    let mut verdicts = Vec::new();
    for r in 0..args.rounds {
        for (peer, kind) in &kinds {
            println!("round {}/{}: {peer}", r + 1, args.rounds);
            let (s, verdict) = round(args, peer, kind)?;
            samples.extend(s);
            verdicts.push(Verdict {
                peer: peer.clone(),
                round: r + 1,
                outcome: verdict.map_err(|e| e.to_string()),
            });
        }
    }
    println!();
    println!(
        "{} MiB guest under {}, cache {}, {} round(s), medians (min-max):",
        args.mib,
        vmm_tests::qemu::accel(&vmm_tests::setup::guest_assets()?)?.name(),
        args.cache,
        args.rounds
    );
    println!();
    println!("| backend | hop | total (ms) | downtime (ms) |");
    println!("|---|---|---|---|");
    for (peer, _) in &kinds {
        let mut hops: Vec<&str> = Vec::new();
        for s in samples.iter().filter(|s| &s.peer == peer) {
            if !hops.contains(&s.hop.as_str()) {
                hops.push(&s.hop);
            }
        }
        // Each hop on its own, then every hop together.
        let rows = hops.iter().map(|h| Some(*h)).chain([None]);
        for hop in rows {
            let of = |f: fn(&Sample) -> u64| -> Vec<u64> {
                let mut v: Vec<u64> = samples
                    .iter()
                    .filter(|s| &s.peer == peer && hop.is_none_or(|h| s.hop == h))
                    .map(f)
                    .collect();
                v.sort_unstable();
                v
            };
            let (total, down) = (of(|s| s.total_ms), of(|s| s.downtime_ms));
            let cell = |v: &[u64]| {
                format!(
                    "{} ({}-{})",
                    percentile(v, 0.5),
                    v.first().copied().unwrap_or(0),
                    v.last().copied().unwrap_or(0)
                )
            };
            println!(
                "| {peer} | {} | {} | {} |",
                hop.unwrap_or("all hops"),
                cell(&total),
                cell(&down)
            );
        }
    }
    println!();
    for v in &verdicts {
        match &v.outcome {
            Ok(data) => println!(
                "{} round {}: guest verified every byte: {data}",
                v.peer, v.round
            ),
            Err(e) => println!("{} round {}: NOT VERIFIED: {e}", v.peer, v.round),
        }
    }
    // The machine's load over the run, for the noise next to the figures.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average (1, 5, 15 min): {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
