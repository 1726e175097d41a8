//! The QEMU adapter: a thread that follows a VM's vCPUs over QMP and tells the backend where
//! each one runs and when it goes away or comes back, as [`AdapterEvent`]s.
//!
//! It connects (retrying every 100 ms: QEMU may not be up yet, and a new QEMU may appear on the
//! same path after the old one went away), asks `query-cpus-fast` for the vCPUs' host threads,
//! reads those threads' affinity, and reports it ([`AdapterEvent::Affinity`]). Then it reads
//! events. The guest's eject request for a CPU ([`HotplugEvent::UnplugRequested`]) becomes
//! [`AdapterEvent::Unplug`] at once, before anything else is done, for the backend's drain must
//! start before the guest offlines the CPU. `DEVICE_DELETED` of a CPU, other CPU `_OST`s, and a
//! periodic rescan re-query the vCPUs: a vCPU that vanished is [`AdapterEvent::Gone`], one that
//! reappeared is [`AdapterEvent::Plug`] then [`AdapterEvent::Affinity`], and a changed thread
//! affinity (the management layer re-pinned the vCPU) is [`AdapterEvent::Affinity`].
//!
//! The backend's callback runs on the adapter thread, in order; it should be quick (hand the
//! event to the thread that acts on it, or do the unplug's disable → drain → signal, which is
//! what the guest waits for anyway).

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vcpu::{format_cpu_list, thread_affinity, CpuList};

use crate::error::{Error, Result};
use crate::hotplug::{classify, is_cpu_ost, HotplugEvent};
use crate::qmp::{QmpClient, VcpuInfo};

/// How long to wait between connection attempts.
const RETRY: Duration = Duration::from_millis(100);
/// How long to wait for the greeting and for each reply before giving up on a connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What the adapter tells the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterEvent {
    /// vCPU `vcpu` runs on host CPUs `cpus` (its thread's affinity): pin its queue threads there.
    /// Emitted for every vCPU on (each) connection, when it changes, for new vCPUs, and after
    /// [`Plug`](Self::Plug).
    Affinity {
        /// The vCPU index.
        vcpu: usize,
        /// Its host CPUs.
        cpus: CpuList,
    },
    /// vCPU `vcpu` is going away: disable its deferred worker, drain, signal, re-home its queues.
    /// Emitted on the guest's eject request, before the guest offlines the CPU; also right before
    /// a [`Gone`](Self::Gone) whose eject request was missed (say, while reconnecting).
    Unplug {
        /// The vCPU index.
        vcpu: usize,
    },
    /// vCPU `vcpu` is present again after an [`Unplug`](Self::Unplug) (seen by re-query, or the
    /// guest refused the eject): re-home, re-pin, re-enable. An
    /// [`Affinity`](Self::Affinity) follows.
    Plug {
        /// The vCPU index.
        vcpu: usize,
    },
    /// vCPU `vcpu` is no longer in `query-cpus-fast`: the unplug is complete. Always after an
    /// [`Unplug`](Self::Unplug) of the same vCPU.
    Gone {
        /// The vCPU index.
        vcpu: usize,
    },
}

/// Where a vCPU is, as far as the adapter has told the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Present and in service.
    Online,
    /// [`AdapterEvent::Unplug`] told; maybe still in `query-cpus-fast` until the guest ejects it.
    Unplugging,
    /// [`AdapterEvent::Gone`] told.
    Gone,
}

#[derive(Debug)]
struct VcpuState {
    status: Status,
    thread_id: Option<i32>,
    /// The affinity last told, if any.
    cpus: Option<CpuList>,
}

/// The vCPUs' states and the events their changes make; no I/O but reading thread affinity.
#[derive(Debug, Default)]
struct Tracker {
    vcpus: BTreeMap<usize, VcpuState>,
}

impl Tracker {
    /// A new connection: tell every present vCPU's affinity again on the next query.
    fn reconnected(&mut self) {
        for state in self.vcpus.values_mut() {
            state.cpus = None;
        }
    }

    /// The guest asked to eject `vcpu`.
    fn unplug_requested(&mut self, vcpu: usize, out: &mut Vec<AdapterEvent>) {
        let state = self.vcpus.entry(vcpu).or_insert(VcpuState {
            status: Status::Online,
            thread_id: None,
            cpus: None,
        });
        if state.status == Status::Online {
            state.status = Status::Unplugging;
            out.push(AdapterEvent::Unplug { vcpu });
        }
    }

    /// The guest refused to eject `vcpu`: it stays in service.
    fn unplug_refused(&mut self, vcpu: usize, out: &mut Vec<AdapterEvent>) {
        if let Some(state) = self.vcpus.get_mut(&vcpu) {
            if state.status == Status::Unplugging {
                state.status = Status::Online;
                out.push(AdapterEvent::Plug { vcpu });
                if let Some(cpus) = &state.cpus {
                    out.push(AdapterEvent::Affinity {
                        vcpu,
                        cpus: cpus.clone(),
                    });
                }
            }
        }
    }

    /// Compares `query-cpus-fast`'s answer with what was told.
    fn queried(
        &mut self,
        present: &[VcpuInfo],
        affinity: impl Fn(i32) -> Option<CpuList>,
        out: &mut Vec<AdapterEvent>,
    ) {
        for info in present {
            let vcpu = info.cpu_index;
            let cpus = affinity(info.thread_id);
            let state = self.vcpus.entry(vcpu).or_insert(VcpuState {
                status: Status::Online,
                thread_id: Some(info.thread_id),
                cpus: None,
            });
            let new_thread = state.thread_id.is_some_and(|tid| tid != info.thread_id);
            state.thread_id = Some(info.thread_id);
            match state.status {
                Status::Gone => {
                    state.status = Status::Online;
                    state.cpus = None;
                    out.push(AdapterEvent::Plug { vcpu });
                }
                // Its thread changed while it was being ejected: it was ejected and re-added
                // between two queries.
                Status::Unplugging if new_thread => {
                    state.status = Status::Online;
                    state.cpus = None;
                    out.push(AdapterEvent::Gone { vcpu });
                    out.push(AdapterEvent::Plug { vcpu });
                }
                Status::Unplugging | Status::Online => {}
            }
            if let Some(cpus) = cpus {
                if state.cpus.as_ref() != Some(&cpus) {
                    state.cpus = Some(cpus.clone());
                    out.push(AdapterEvent::Affinity { vcpu, cpus });
                }
            }
        }
        for (&vcpu, state) in &mut self.vcpus {
            if state.status == Status::Gone || present.iter().any(|i| i.cpu_index == vcpu) {
                continue;
            }
            if state.status == Status::Online {
                out.push(AdapterEvent::Unplug { vcpu });
            }
            state.status = Status::Gone;
            state.thread_id = None;
            out.push(AdapterEvent::Gone { vcpu });
        }
    }
}

struct Shared {
    stop: AtomicBool,
    connected: AtomicBool,
    /// The current connection's stream, for [`QmpAdapter::stop`] to shut down.
    stream: Mutex<Option<UnixStream>>,
    /// Wakes the retry sleep on stop.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Option<UnixStream>> {
        self.stream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration` or until stopped.
    fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut guard = self.lock();
        while !self.stopped() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            guard = self
                .wake
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// Follows a QEMU's vCPUs over QMP on a thread of its own; see the [module](self) documentation.
/// Stops on [`stop`](Self::stop) or drop.
pub struct QmpAdapter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpAdapter")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl QmpAdapter {
    /// Starts following the QEMU whose QMP socket is at `path`, re-querying its vCPUs every
    /// `rescan` (e.g. 1 s) and on CPU events; `on_event` gets every [`AdapterEvent`], on the
    /// adapter's thread. Returns at once: the thread connects when QEMU is there, and again when
    /// a new QEMU appears on the same path.
    ///
    /// The socket must be one no other client uses: QMP serves one client at a time.
    pub fn spawn(
        path: PathBuf,
        rescan: Duration,
        on_event: Box<dyn Fn(AdapterEvent) + Send>,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            stream: Mutex::new(None),
            wake: Condvar::new(),
        });
        let name = "vcpu-qmp".to_string();
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || run(&path, rescan, on_event.as_ref(), &shared))
                .map_err(|source| Error::Spawn { name, source })?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Whether the adapter is connected to QEMU (and past the greeting) right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Stops the thread and waits for it; no event is delivered after this returns.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let stream = self.shared.lock();
            self.shared.stop.store(true, Ordering::SeqCst);
            if let Some(stream) = stream.as_ref() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            self.shared.wake.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("vCPU QMP adapter thread panicked");
            }
        }
    }
}

impl Drop for QmpAdapter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The adapter thread: connect, follow, reconnect, until stopped.
fn run(path: &std::path::Path, rescan: Duration, on_event: &dyn Fn(AdapterEvent), shared: &Shared) {
    let mut tracker = Tracker::default();
    let mut waiting_logged = false;
    while !shared.stopped() {
        match connect(path, shared) {
            Ok(client) => {
                waiting_logged = false;
                log::info!("QMP: connected to {}", path.display());
                shared.connected.store(true, Ordering::SeqCst);
                let result = follow(client, rescan, &mut tracker, on_event, shared);
                shared.connected.store(false, Ordering::SeqCst);
                match result {
                    Ok(()) => {}
                    Err(Error::Closed) => {
                        log::info!("QMP: {} closed; waiting for QEMU", path.display())
                    }
                    Err(e) if shared.stopped() => log::debug!("QMP: stopped: {e}"),
                    Err(e) => log::warn!("QMP: {}: {e}; reconnecting", path.display()),
                }
            }
            Err(e) if shared.stopped() => log::debug!("QMP: stopped: {e}"),
            Err(e) => {
                if !waiting_logged {
                    log::info!("QMP: waiting for QEMU at {}: {e}", path.display());
                    waiting_logged = true;
                } else {
                    log::debug!("QMP: {e}");
                }
            }
        }
        *shared.lock() = None;
        shared.sleep(RETRY);
    }
}

/// Connects and negotiates, leaving the stream where `stop` can shut it down.
fn connect(path: &std::path::Path, shared: &Shared) -> Result<QmpClient> {
    let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    {
        let mut slot = shared.lock();
        if shared.stopped() {
            return Err(Error::Closed);
        }
        *slot = Some(stream.try_clone().map_err(|source| Error::Io {
            context: "cloning the stream".into(),
            source,
        })?);
    }
    QmpClient::from_stream(stream, COMMAND_TIMEOUT)
}

/// Follows one connection until it fails or the adapter stops.
fn follow(
    mut client: QmpClient,
    rescan: Duration,
    tracker: &mut Tracker,
    on_event: &dyn Fn(AdapterEvent),
    shared: &Shared,
) -> Result<()> {
    let mut out = Vec::new();
    tracker.reconnected();
    query(&mut client, tracker, &mut out)?;
    deliver(&mut out, on_event, shared);
    let mut next_rescan = Instant::now() + rescan;
    while !shared.stopped() {
        let wait = next_rescan.saturating_duration_since(Instant::now());
        let Some(event) = client.next_event(wait)? else {
            query(&mut client, tracker, &mut out)?;
            deliver(&mut out, on_event, shared);
            next_rescan = Instant::now() + rescan;
            continue;
        };
        log::debug!("QMP event {}: {}", event.name, event.data);
        let requery = match classify(&event) {
            Some(HotplugEvent::UnplugRequested { vcpu }) => {
                // At once: the guest's CPU offline waits for what this vCPU's queues hold.
                tracker.unplug_requested(vcpu, &mut out);
                false
            }
            Some(HotplugEvent::UnplugRefused { vcpu, status }) => {
                log::info!("QMP: the guest refused to eject vCPU {vcpu} (_OST status {status:#x})");
                tracker.unplug_refused(vcpu, &mut out);
                true
            }
            Some(HotplugEvent::Removed { .. }) => true,
            None => is_cpu_ost(&event),
        };
        deliver(&mut out, on_event, shared);
        if requery {
            query(&mut client, tracker, &mut out)?;
            deliver(&mut out, on_event, shared);
        }
    }
    Ok(())
}

fn query(client: &mut QmpClient, tracker: &mut Tracker, out: &mut Vec<AdapterEvent>) -> Result<()> {
    let vcpus = client.query_cpus_fast()?;
    tracker.queried(
        &vcpus,
        |tid| match thread_affinity(tid) {
            Ok(cpus) => Some(cpus),
            Err(e) => {
                // The thread may have just exited, or QEMU runs in another pid namespace.
                log::debug!("QMP: vCPU thread {tid}: {e}");
                None
            }
        },
        out,
    );
    Ok(())
}

fn deliver(out: &mut Vec<AdapterEvent>, on_event: &dyn Fn(AdapterEvent), shared: &Shared) {
    for event in out.drain(..) {
        if shared.stopped() {
            return;
        }
        match &event {
            AdapterEvent::Affinity { vcpu, cpus } => {
                log::info!("vCPU {vcpu} runs on host CPUs {}", format_cpu_list(cpus))
            }
            other => log::info!("QMP: {other:?}"),
        }
        on_event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qmp::{vcpu, FakeQmp};
    use ::vcpu::{current_thread_affinity, set_current_thread_affinity};
    use serde_json::json;
    use std::sync::mpsc::{self, Receiver, Sender};

    const WAIT: Duration = Duration::from_secs(5);

    /// A real thread of the test process, pinned as told, standing in for a vCPU thread.
    struct VcpuThread {
        tid: i32,
        pin: Sender<Vec<usize>>,
        pinned: Receiver<()>,
        handle: Option<JoinHandle<()>>,
    }

    impl VcpuThread {
        fn start(cpus: Vec<usize>) -> Self {
            let (pin, pin_rx) = mpsc::channel::<Vec<usize>>();
            let (tid_tx, tid_rx) = mpsc::channel();
            let (pinned_tx, pinned) = mpsc::channel();
            let handle = std::thread::spawn(move || {
                set_current_thread_affinity(&cpus).unwrap();
                // SAFETY: gettid takes no arguments and cannot fail.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                for cpus in pin_rx {
                    set_current_thread_affinity(&cpus).unwrap();
                    pinned_tx.send(()).unwrap();
                }
            });
            let tid = tid_rx.recv().unwrap();
            Self {
                tid,
                pin,
                pinned,
                handle: Some(handle),
            }
        }

        fn repin(&self, cpus: Vec<usize>) {
            self.pin.send(cpus).unwrap();
            self.pinned.recv().unwrap();
        }
    }

    impl Drop for VcpuThread {
        fn drop(&mut self) {
            let (dead, _) = mpsc::channel();
            self.pin = dead;
            if let Some(handle) = self.handle.take() {
                handle.join().unwrap();
            }
        }
    }

    fn collector() -> (Box<dyn Fn(AdapterEvent) + Send>, Receiver<AdapterEvent>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move |event| {
                let _ = tx.send(event);
            }),
            rx,
        )
    }

    fn next(rx: &Receiver<AdapterEvent>) -> AdapterEvent {
        rx.recv_timeout(WAIT).expect("an adapter event")
    }

    fn nothing_more(rx: &Receiver<AdapterEvent>, within: Duration) {
        if let Ok(event) = rx.recv_timeout(within) {
            panic!("unexpected {event:?}");
        }
    }

    /// Two host CPU sets that differ if the host has two CPUs.
    fn two_cpu_sets() -> (Vec<usize>, Vec<usize>) {
        let all = current_thread_affinity().unwrap();
        (vec![all[0]], vec![all[all.len() - 1]])
    }

    fn ost(status: u64, slot: &str) -> serde_json::Value {
        json!({"info": {"device": "", "source": 3, "status": status, "slot": slot, "slot-type": "CPU"}})
    }

    #[test]
    fn waits_for_qemu_then_reports_each_vcpu_affinity() {
        let (a, b) = two_cpu_sets();
        let (t0, t1) = (VcpuThread::start(a.clone()), VcpuThread::start(b.clone()));
        let dir = crate::fake_qmp::temp_dir();
        let path = dir.join("qmp.sock");
        let (on_event, rx) = collector();
        let adapter = QmpAdapter::spawn(path.clone(), Duration::from_secs(60), on_event).unwrap();
        std::thread::sleep(Duration::from_millis(250)); // a few failed attempts
        assert!(!adapter.is_connected());
        let fake = FakeQmp::start_at(&path).unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid), vcpu(1, t1.tid)]);
        assert_eq!(next(&rx), AdapterEvent::Affinity { vcpu: 0, cpus: a });
        assert_eq!(next(&rx), AdapterEvent::Affinity { vcpu: 1, cpus: b });
        assert!(adapter.is_connected());
        assert_eq!(fake.commands(), vec!["qmp_capabilities", "query-cpus-fast"]);
        nothing_more(&rx, Duration::from_millis(100));
        adapter.stop();
        drop(fake);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unplug_on_eject_request_at_once_then_gone_and_plug_on_rescan() {
        let (a, b) = two_cpu_sets();
        let (t0, t1) = (VcpuThread::start(a.clone()), VcpuThread::start(b.clone()));
        let fake = FakeQmp::start().unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid), vcpu(1, t1.tid)]);
        let (on_event, rx) = collector();
        let rescan = Duration::from_millis(200);
        let adapter = QmpAdapter::spawn(fake.path().into(), rescan, on_event).unwrap();
        assert!(matches!(next(&rx), AdapterEvent::Affinity { vcpu: 0, .. }));
        assert!(matches!(next(&rx), AdapterEvent::Affinity { vcpu: 1, .. }));

        // The eject request: Unplug at once, while vCPU 1 is still in query-cpus-fast.
        let sent = Instant::now();
        assert!(fake.send_event("ACPI_DEVICE_OST", ost(132, "1")));
        assert_eq!(next(&rx), AdapterEvent::Unplug { vcpu: 1 });
        let latency = sent.elapsed();
        assert!(
            latency < Duration::from_millis(100),
            "Unplug after {latency:?}"
        );
        // Still listed (the guest is offlining it): rescans say nothing.
        nothing_more(&rx, 2 * rescan);

        // The guest ejected it: DEVICE_DELETED makes the adapter re-query at once.
        fake.remove_vcpu(1);
        let sent = Instant::now();
        assert!(fake.send_event(
            "DEVICE_DELETED",
            json!({"path": "/machine/unattached/device[2]/lapic"})
        ));
        assert_eq!(next(&rx), AdapterEvent::Gone { vcpu: 1 });
        assert!(sent.elapsed() < rescan, "Gone after {:?}", sent.elapsed());
        nothing_more(&rx, 2 * rescan);

        // Re-added (device_add + online in the guest): seen by the periodic rescan.
        fake.add_vcpu(vcpu(1, t1.tid));
        assert_eq!(next(&rx), AdapterEvent::Plug { vcpu: 1 });
        assert_eq!(next(&rx), AdapterEvent::Affinity { vcpu: 1, cpus: b });
        nothing_more(&rx, 2 * rescan);
        adapter.stop();
    }

    #[test]
    fn unplug_is_not_lost_when_the_eject_request_comes_during_a_query() {
        let (a, _) = two_cpu_sets();
        let t0 = VcpuThread::start(a);
        let fake = FakeQmp::start().unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid), vcpu(1, t0.tid)]);
        fake.events_before_next_reply(vec![crate::qmp::QmpEvent::new(
            "ACPI_DEVICE_OST",
            ost(132, "1"),
        )]);
        let (on_event, rx) = collector();
        let adapter = QmpAdapter::spawn(fake.path().into(), WAIT, on_event).unwrap();
        // The event came before the reply to query-cpus-fast; it is handled right after.
        assert!(matches!(next(&rx), AdapterEvent::Affinity { vcpu: 0, .. }));
        assert!(matches!(next(&rx), AdapterEvent::Affinity { vcpu: 1, .. }));
        assert_eq!(next(&rx), AdapterEvent::Unplug { vcpu: 1 });
        adapter.stop();
    }

    #[test]
    fn affinity_change_is_reported_on_rescan() {
        let (a, b) = two_cpu_sets();
        let t0 = VcpuThread::start(a.clone());
        let fake = FakeQmp::start().unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid)]);
        let (on_event, rx) = collector();
        let adapter =
            QmpAdapter::spawn(fake.path().into(), Duration::from_millis(50), on_event).unwrap();
        assert_eq!(
            next(&rx),
            AdapterEvent::Affinity {
                vcpu: 0,
                cpus: a.clone()
            }
        );
        // Re-pinned by the management layer (on a one-CPU host, to the same CPU: no change).
        t0.repin(b.clone());
        if b != a {
            assert_eq!(
                next(&rx),
                AdapterEvent::Affinity {
                    vcpu: 0,
                    cpus: b.clone()
                }
            );
        }
        let all = current_thread_affinity().unwrap();
        t0.repin(all.clone());
        if all != b {
            assert_eq!(next(&rx), AdapterEvent::Affinity { vcpu: 0, cpus: all });
        }
        nothing_more(&rx, Duration::from_millis(200));
        adapter.stop();
    }

    #[test]
    fn refused_eject_brings_the_vcpu_back() {
        let (a, _) = two_cpu_sets();
        let t0 = VcpuThread::start(a.clone());
        let fake = FakeQmp::start().unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid), vcpu(1, t0.tid)]);
        let (on_event, rx) = collector();
        let adapter = QmpAdapter::spawn(fake.path().into(), WAIT, on_event).unwrap();
        next(&rx);
        next(&rx);
        fake.send_event("ACPI_DEVICE_OST", ost(132, "1"));
        assert_eq!(next(&rx), AdapterEvent::Unplug { vcpu: 1 });
        // A repeated eject request is not a second unplug.
        fake.send_event("ACPI_DEVICE_OST", ost(132, "1"));
        fake.send_event("ACPI_DEVICE_OST", ost(0x82, "1")); // busy
        assert_eq!(next(&rx), AdapterEvent::Plug { vcpu: 1 });
        assert_eq!(next(&rx), AdapterEvent::Affinity { vcpu: 1, cpus: a });
        nothing_more(&rx, Duration::from_millis(100));
        adapter.stop();
    }

    #[test]
    fn missed_eject_request_still_gives_unplug_before_gone() {
        let (a, _) = two_cpu_sets();
        let t0 = VcpuThread::start(a);
        let fake = FakeQmp::start().unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid), vcpu(1, t0.tid)]);
        let (on_event, rx) = collector();
        let adapter =
            QmpAdapter::spawn(fake.path().into(), Duration::from_millis(50), on_event).unwrap();
        next(&rx);
        next(&rx);
        fake.remove_vcpu(1);
        assert_eq!(next(&rx), AdapterEvent::Unplug { vcpu: 1 });
        assert_eq!(next(&rx), AdapterEvent::Gone { vcpu: 1 });
        nothing_more(&rx, Duration::from_millis(200));
        adapter.stop();
    }

    #[test]
    fn reconnects_to_a_new_qemu_on_the_same_path() {
        let (a, b) = two_cpu_sets();
        let (t0, t1) = (VcpuThread::start(a.clone()), VcpuThread::start(b.clone()));
        let dir = crate::fake_qmp::temp_dir();
        let path = dir.join("qmp.sock");
        let fake = FakeQmp::start_at(&path).unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid), vcpu(1, t1.tid)]);
        let (on_event, rx) = collector();
        let adapter = QmpAdapter::spawn(path.clone(), WAIT, on_event).unwrap();
        next(&rx);
        next(&rx);
        drop(fake); // QEMU exits
        std::thread::sleep(Duration::from_millis(300));
        assert!(!adapter.is_connected());
        // A new QEMU, with vCPU 1 not (yet) there.
        let fake = FakeQmp::start_at(&path).unwrap();
        fake.set_vcpus(vec![vcpu(0, t0.tid)]);
        assert_eq!(next(&rx), AdapterEvent::Affinity { vcpu: 0, cpus: a });
        assert_eq!(next(&rx), AdapterEvent::Unplug { vcpu: 1 });
        assert_eq!(next(&rx), AdapterEvent::Gone { vcpu: 1 });
        assert!(adapter.is_connected());
        adapter.stop();
        drop(fake);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn stop_is_prompt_connected_or_not() {
        let fake = FakeQmp::start().unwrap();
        let (on_event, rx) = collector();
        let adapter = QmpAdapter::spawn(fake.path().into(), WAIT, on_event).unwrap();
        assert!(fake.wait_until(WAIT, |commands, _| commands.len() >= 2));
        let start = Instant::now();
        adapter.stop();
        assert!(start.elapsed() < Duration::from_millis(500));
        nothing_more(&rx, Duration::from_millis(10));

        let (on_event, _rx) = collector();
        let adapter = QmpAdapter::spawn("/nonexistent/qmp.sock".into(), WAIT, on_event).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let start = Instant::now();
        drop(adapter);
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn tracker_reports_a_fast_eject_and_re_add_between_queries() {
        let mut tracker = Tracker::default();
        let mut out = Vec::new();
        let affinity = |_tid: i32| Some(vec![0]);
        tracker.queried(&[vcpu(0, 10), vcpu(1, 11)], affinity, &mut out);
        out.clear();
        tracker.unplug_requested(1, &mut out);
        assert_eq!(out, vec![AdapterEvent::Unplug { vcpu: 1 }]);
        out.clear();
        // Back already, on a new thread.
        tracker.queried(&[vcpu(0, 10), vcpu(1, 12)], affinity, &mut out);
        assert_eq!(
            out,
            vec![
                AdapterEvent::Gone { vcpu: 1 },
                AdapterEvent::Plug { vcpu: 1 },
                AdapterEvent::Affinity {
                    vcpu: 1,
                    cpus: vec![0]
                },
            ]
        );
    }
}
