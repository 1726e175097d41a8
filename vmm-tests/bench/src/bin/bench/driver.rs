//! The host-driven driver: libblkio's `virtio-blk-vhost-user` driver (the
//! `blkio` crate, pure Rust) connects straight to a backend's vhost-user
//! socket, as a VMM would, and runs a workload on it with one client thread
//! per queue, without a VM and so without TCG's or KVM's cost.
//!
//! Each thread keeps `iodepth` requests in flight on its queue, waits for
//! completions on the queue's completion eventfd (interrupt mode, no client
//! polling, so the client leaves the CPUs to the backend when it waits) and
//! resubmits at once. Requests completing during the ramp are not counted;
//! latency is submit-to-completion as the client sees it.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use super::error::{bail, Context, Error, Result};
use super::stats::{query_backend, BackendCounters};
use super::workload::{Op, Pattern, Workload};
use vmm_bench::procstat::{self, HostCpu};

/// The libblkio driver name.
pub const DRIVER: &str = "virtio-blk-vhost-user";

/// The vring size the client asks for.
const QUEUE_SIZE: i32 = 256;

/// How long to wait for one completion before calling the backend stalled.
const STALL: Duration = Duration::from_secs(10);

/// What one measured run did, summed over its queues.
#[derive(Debug, Default)]
pub struct RawRun {
    /// Requests completed inside the measured window.
    pub ios: u64,
    /// Bytes those requests moved.
    pub bytes: u64,
    /// Length of the measured window in seconds.
    pub seconds: f64,
    /// Client-side latency of each counted request, in nanoseconds.
    pub lat_ns: Vec<u32>,
    /// CPU seconds the backend process used in the window.
    pub backend_cpu_s: f64,
    /// CPU seconds this client process used in the window.
    pub client_cpu_s: f64,
    /// CPU seconds everything else on the host used in the window (noise).
    pub others_s: f64,
    /// CPU seconds the hypervisor stole from the host in the window.
    pub steal_s: f64,
    /// Our backend's counters just before and just after the window (with
    /// a control socket).
    pub backend: Option<(BackendCounters, BackendCounters)>,
}

/// Backend and host CPU counters at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnap {
    /// The backend process's CPU seconds.
    pub backend: f64,
    /// This client's CPU seconds.
    pub client: f64,
    /// The host's.
    pub host: HostCpu,
}

impl CpuSnap {
    /// Takes a snapshot for backend `pid`.
    pub fn take(pid: u32) -> Result<CpuSnap> {
        Ok(CpuSnap {
            backend: procstat::cpu_seconds(pid)?,
            client: procstat::self_cpu_seconds()?,
            host: procstat::host_cpu()?,
        })
    }
}

/// Runs `w` against the vhost-user socket at `socket`, served by process
/// `pid`, for `ramp` (not counted) then `runtime`, sampling CPU counters at
/// the measured window's edges, and with `control` (our backend's control
/// socket) its `stats` just outside them: before the CPU sample that opens
/// the window and after the one that closes it, so neither the query's CPU
/// nor its time falls inside.
pub fn run(
    socket: &Path,
    pid: u32,
    control: Option<&Path>,
    w: &Workload,
    ramp: Duration,
    runtime: Duration,
) -> Result<RawRun> {
    let mut blkio = connect(socket, w.queues)?;
    let mut out = blkio
        .start()
        .ctx(|| format!("{DRIVER}: start {}", socket.display()))?;
    let capacity = blkio.get_u64("capacity").ctx(|| "blkio: capacity")?;
    if capacity < w.block_size * u64::from(w.queues) * 2 {
        bail!(
            "{}: capacity {capacity} too small for {}",
            socket.display(),
            w.name()
        );
    }
    let align = blkio
        .get_u64("mem-region-alignment")
        .ctx(|| "blkio: mem-region-alignment")?
        .max(4096);
    let per_queue = w.block_size * u64::from(w.iodepth);
    let len = (per_queue * u64::from(w.queues)).div_ceil(align) * align;
    let len = usize::try_from(len).ctx(|| "buffer size")?;
    let region = blkio
        .alloc_mem_region(len)
        .ctx(|| format!("blkio: allocate {len} bytes of shared memory"))?;
    blkio
        .map_mem_region(&region)
        .ctx(|| "blkio: map the buffers into the backend")?;
    // SAFETY: the region is `len` bytes of writable shared memory that
    // libblkio just mapped for us and keeps until `blkio` is dropped, after
    // the scope below has joined every thread that uses it.
    unsafe { fill_pattern(region.addr as *mut u8, len) };

    let queues: Vec<SendQueue> = out.queues.drain(..).map(SendQueue).collect();
    if queues.len() != w.queues as usize {
        bail!("blkio started {} queues, not {}", queues.len(), w.queues);
    }
    let phase = AtomicU8::new(RAMP);
    let barrier = Barrier::new(queues.len() + 1);
    let result = std::thread::scope(|s| -> Result<RawRun> {
        let mut handles = Vec::new();
        for (i, q) in queues.into_iter().enumerate() {
            let job = Job {
                w: w.clone(),
                index: i as u64,
                capacity,
                buf: region.addr + i * per_queue as usize,
                seed: 0x9e37_79b9_7f4a_7c15
                    ^ ((i as u64 + 1) << 32)
                    ^ u64::from(std::process::id()),
            };
            let (phase, barrier) = (&phase, &barrier);
            handles.push(s.spawn(move || queue_thread(q, job, phase, barrier)));
        }
        barrier.wait();
        std::thread::sleep(ramp);
        let counters = |c: &Path| query_backend(c).map(|s| BackendCounters::of(&s));
        let opened = control
            .map(counters)
            .transpose()
            .and_then(|b0| Ok((b0, CpuSnap::take(pid)?)));
        let (b0, s0) = match opened {
            Ok(v) => v,
            Err(e) => {
                // The client threads would run on; the scope joins them.
                phase.store(STOP, Ordering::SeqCst);
                return Err(e);
            }
        };
        let t0 = Instant::now();
        phase.store(MEASURE, Ordering::SeqCst);
        std::thread::sleep(runtime);
        phase.store(STOP, Ordering::SeqCst);
        let seconds = t0.elapsed().as_secs_f64();
        let s1 = CpuSnap::take(pid)?;
        let b1 = control.map(counters).transpose()?;
        let host = s1.host - s0.host;
        let mut run = RawRun {
            seconds,
            backend: b0.zip(b1),
            backend_cpu_s: s1.backend - s0.backend,
            client_cpu_s: s1.client - s0.client,
            others_s: host.busy - (s1.backend - s0.backend) - (s1.client - s0.client),
            steal_s: host.steal,
            ..RawRun::default()
        };
        for h in handles {
            let t = h
                .join()
                .map_err(|_| Error::msg("client thread panicked"))??;
            run.ios += t.ios;
            run.bytes += t.bytes;
            run.lat_ns.extend_from_slice(&t.lat_ns);
        }
        Ok(run)
    });
    blkio.unmap_mem_region(&region);
    result
}

const RAMP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Connects to `socket`, retrying while the backend comes up.
pub fn connect(socket: &Path, queues: u32) -> Result<Blkio> {
    let path = socket.to_str().ctx(|| "socket path is not UTF-8")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut b = Blkio::new(DRIVER).ctx(|| format!("blkio: new {DRIVER}"))?;
        b.set_str("path", path).ctx(|| "blkio: set path")?;
        match b.connect() {
            Ok(()) => {
                b.set_i32("num-queues", queues as i32)
                    .ctx(|| format!("blkio: set num-queues {queues}"))?;
                b.set_i32("queue-size", QUEUE_SIZE)
                    .ctx(|| "blkio: set queue-size")?;
                return Ok(b);
            }
            Err(e) if Instant::now() < deadline => {
                log::debug!("connect {path}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("{DRIVER}: connect {path}: {e}"),
        }
    }
}

/// A libblkio queue handed to the thread that drives it.
struct SendQueue(Blkioq);

// SAFETY: a queue is used by exactly one thread at a time: created here,
// moved into its client thread, dropped there. libblkio's API allows a
// queue to be used from any one thread; what stops the compiler from
// seeing it is the raw buffer pointers held in its request backlog, which
// point into the shared region that outlives every client thread.
unsafe impl Send for SendQueue {}

/// One client thread's share of a run.
struct Job {
    w: Workload,
    index: u64,
    capacity: u64,
    /// Address of this queue's `iodepth * block_size` buffer bytes.
    buf: usize,
    seed: u64,
}

#[derive(Default)]
struct ThreadResult {
    ios: u64,
    bytes: u64,
    lat_ns: Vec<u32>,
}

struct Offsets {
    w: Workload,
    rng: u64,
    blocks: u64,
    seq_base: u64,
    seq_len: u64,
    seq_next: u64,
}

impl Offsets {
    fn new(job: &Job) -> Self {
        let bs = job.w.block_size;
        let slice = (job.capacity / u64::from(job.w.queues)) / bs * bs;
        Offsets {
            w: job.w.clone(),
            rng: job.seed | 1,
            blocks: job.capacity / bs,
            seq_base: slice * job.index,
            seq_len: slice,
            seq_next: 0,
        }
    }

    fn next(&mut self) -> u64 {
        match self.w.pattern {
            Pattern::Random => {
                // xorshift64*
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
                (r % self.blocks) * self.w.block_size
            }
            Pattern::Sequential => {
                let off = self.seq_base + self.seq_next;
                self.seq_next += self.w.block_size;
                if self.seq_next + self.w.block_size > self.seq_len {
                    self.seq_next = 0;
                }
                off
            }
        }
    }
}

fn submit(q: &mut Blkioq, w: &Workload, offset: u64, buf: *mut u8, slot: usize) {
    let len = w.block_size as usize;
    match w.op {
        Op::Read => q.read(offset, buf, len, slot, ReqFlags::empty()),
        Op::Write => q.write(offset, buf, len, slot, ReqFlags::empty()),
    }
}

fn queue_thread(
    q: SendQueue,
    job: Job,
    phase: &AtomicU8,
    barrier: &Barrier,
) -> Result<ThreadResult> {
    let SendQueue(mut q) = q;
    let w = &job.w;
    let depth = w.iodepth as usize;
    let mut offsets = Offsets::new(&job);
    let mut started = vec![Instant::now(); depth];
    let mut res = ThreadResult {
        lat_ns: Vec::with_capacity(1 << 20),
        ..ThreadResult::default()
    };
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let buf = |slot: usize| (job.buf + slot * w.block_size as usize) as *mut u8;

    barrier.wait();
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        submit(&mut q, w, offsets.next(), buf(slot), slot);
    }
    let mut inflight = depth;
    let mut last_progress = Instant::now();
    loop {
        let mut timeout = Duration::from_millis(500);
        let n = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == rustix_time_errno() => 0,
            Err(e) => bail!("queue {}: do_io: {e}", job.index),
        };
        let now = Instant::now();
        let ph = phase.load(Ordering::Relaxed);
        if n == 0 {
            if now.duration_since(last_progress) > STALL {
                bail!(
                    "queue {}: no completion for {STALL:?} ({inflight} in flight)",
                    job.index
                );
            }
            if ph == STOP && inflight == 0 {
                break;
            }
            continue;
        }
        last_progress = now;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if c.ret != 0 {
                bail!(
                    "queue {}: {} failed: {}",
                    job.index,
                    w.name(),
                    std::io::Error::from_raw_os_error(-c.ret)
                );
            }
            if ph == MEASURE {
                let lat = now.duration_since(started[slot]).as_nanos();
                res.lat_ns.push(u32::try_from(lat).unwrap_or(u32::MAX));
                res.ios += 1;
                res.bytes += w.block_size;
            }
            if ph == STOP {
                inflight -= 1;
            } else {
                started[slot] = now;
                submit(&mut q, w, offsets.next(), buf(slot), slot);
            }
        }
        if ph == STOP && inflight == 0 {
            break;
        }
    }
    Ok(res)
}

/// libblkio reports a `do_io` timeout as `ETIME`.
fn rustix_time_errno() -> blkio::Errno {
    blkio::Errno::TIME
}

/// Fills the buffers with a non-zero, non-repeating pattern (so writes
/// carry data a backend cannot shortcut as zeroes).
///
/// # Safety
/// `addr` must point to `len` writable bytes nobody else is using.
unsafe fn fill_pattern(addr: *mut u8, len: usize) {
    // SAFETY: the caller guarantees `len` writable, unaliased bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(addr, len) };
    let mut x: u64 = 0x0123_4567_89ab_cdef;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}
