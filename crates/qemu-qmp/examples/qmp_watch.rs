//! Watches a QEMU's vCPUs over QMP, for trying the adapter against a real VM by hand:
//! `cargo run -p qemu-qmp --example qmp_watch -- /path/to/qmp.sock [SECONDS]`.
//!
//! Prints the greeting and `query-cpus-fast` with each vCPU thread's affinity, then runs a
//! [`QmpAdapter`] for SECONDS (default 10) and prints its events with their time since start.
//! The socket must be free: QMP serves one client at a time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qemu_qmp::{QmpAdapter, QmpClient};
use vcpu::{format_cpu_list, thread_affinity};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or("usage: qmp_watch SOCKET [SECONDS]")?);
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);

    let mut client = QmpClient::connect(&path, Duration::from_secs(5))?;
    println!("greeting: {}", client.greeting());
    for cpu in client.query_cpus_fast()? {
        let cpus = thread_affinity(cpu.thread_id)
            .map(|cpus| format_cpu_list(&cpus))
            .unwrap_or_else(|e| e.to_string());
        println!(
            "vCPU {} thread {} {} props {} host CPUs {cpus}",
            cpu.cpu_index, cpu.thread_id, cpu.qom_path, cpu.props
        );
    }
    drop(client);

    let start = Instant::now();
    let adapter = QmpAdapter::spawn(
        path,
        Duration::from_secs(1),
        Box::new(move |event| {
            println!(
                "{:>10.3} ms  {event:?}",
                start.elapsed().as_secs_f64() * 1e3
            )
        }),
    )?;
    std::thread::sleep(Duration::from_secs(seconds));
    adapter.stop();
    Ok(())
}
