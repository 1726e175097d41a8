//! A fake QEMU QMP server, for tests of this crate and of its users (feature `test-utils`).
//!
//! It listens on a unix socket, serves one client at a time as QEMU does, greets it like QEMU 10,
//! and answers `qmp_capabilities`, `query-cpus-fast` (from vCPUs the test sets, typically with the
//! thread ids of real threads of the test process, so that their affinity can be read), and
//! `echo` (returns its arguments); any other command is `CommandNotFound`. The test injects
//! events with [`send_event`](FakeQmp::send_event), or ahead of the next reply with
//! [`events_before_next_reply`](FakeQmp::events_before_next_reply), and makes "QEMU" go away
//! with [`disconnect`](FakeQmp::disconnect) or by dropping the server.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::qmp::{QmpEvent, VcpuInfo};

/// vCPU `cpu_index` run by host thread `thread_id`, with a QOM path and topology shaped like
/// QEMU's for a q35 machine's boot CPUs (`/machine/unattached/device[2 * index]`, one socket, one
/// core per vCPU).
pub fn vcpu(cpu_index: usize, thread_id: i32) -> VcpuInfo {
    VcpuInfo {
        cpu_index,
        thread_id,
        qom_path: format!("/machine/unattached/device[{}]", 2 * cpu_index),
        props: json!({"core-id": cpu_index, "thread-id": 0, "socket-id": 0}),
    }
}

/// A fresh, empty directory under the system's temporary directory.
pub fn temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vcpu-fake-qmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("creating {}: {e}", dir.display());
    }
    dir
}

#[derive(Default)]
struct State {
    vcpus: Vec<VcpuInfo>,
    /// The connected client, for writing.
    client: Option<UnixStream>,
    commands: Vec<String>,
    before_reply: Vec<QmpEvent>,
    connections: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The fake QMP server; stops and removes its socket on drop.
pub struct FakeQmp {
    shared: Arc<Shared>,
    path: PathBuf,
    /// The directory [`start`](Self::start) made, removed on drop.
    dir: Option<PathBuf>,
    thread: Option<JoinHandle<()>>,
}

impl FakeQmp {
    /// Starts a server on a socket in a new temporary directory.
    pub fn start() -> io::Result<Self> {
        let dir = temp_dir();
        let mut fake = Self::start_at(&dir.join("qmp.sock"))?;
        fake.dir = Some(dir);
        Ok(fake)
    }

    /// Starts a server on a socket at `path` (e.g. a "new QEMU" where an old one was).
    pub fn start_at(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("fake-qmp".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(Self {
            shared,
            path: path.to_path_buf(),
            dir: None,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the vCPUs `query-cpus-fast` reports.
    pub fn set_vcpus(&self, vcpus: Vec<VcpuInfo>) {
        self.shared.lock().vcpus = vcpus;
    }

    /// Drops vCPU `cpu_index` from `query-cpus-fast` (the guest ejected it).
    pub fn remove_vcpu(&self, cpu_index: usize) {
        self.shared
            .lock()
            .vcpus
            .retain(|vcpu| vcpu.cpu_index != cpu_index);
    }

    /// Adds a vCPU to `query-cpus-fast`, keeping them in index order.
    pub fn add_vcpu(&self, vcpu: VcpuInfo) {
        let mut state = self.shared.lock();
        state.vcpus.retain(|v| v.cpu_index != vcpu.cpu_index);
        state.vcpus.push(vcpu);
        state.vcpus.sort_by_key(|v| v.cpu_index);
    }

    /// Sends event `name` with `data` (a `Null` data is left out) to the connected client;
    /// false if there is none.
    pub fn send_event(&self, name: &str, data: Value) -> bool {
        let mut state = self.shared.lock();
        write_event(&mut state, &QmpEvent::new(name, data))
    }

    /// Sends `events` right before the reply to the next command.
    pub fn events_before_next_reply(&self, events: Vec<QmpEvent>) {
        self.shared.lock().before_reply.extend(events);
    }

    /// The commands received so far, in order, over all connections.
    pub fn commands(&self) -> Vec<String> {
        self.shared.lock().commands.clone()
    }

    /// How many times `command` was received.
    pub fn count(&self, command: &str) -> usize {
        self.shared
            .lock()
            .commands
            .iter()
            .filter(|c| *c == command)
            .count()
    }

    /// How many clients have connected so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Waits until `cond` holds of the commands received and the number of connections, or
    /// `timeout` passes; returns whether it held.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&[String], usize) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if cond(&state.commands, state.connections) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Closes the connection to the current client, as QEMU's exit would.
    pub fn disconnect(&self) {
        if let Some(client) = self.shared.lock().client.take() {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.disconnect();
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn accept_loop(listener: &UnixListener, shared: &Shared) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        serve(stream, shared);
        shared.lock().client = None;
        shared.changed.notify_all();
    }
}

fn serve(stream: UnixStream, shared: &Shared) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    {
        let mut state = shared.lock();
        state.client = Some(writer);
        state.connections += 1;
        let greeting = json!({"QMP": {
            "version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"},
            "capabilities": ["oob"],
        }});
        if !write_line(&mut state, &greeting) {
            return;
        }
    }
    shared.changed.notify_all();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            let mut state = shared.lock();
            write_line(
                &mut state,
                &json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}),
            );
            continue;
        };
        let command = message["execute"].as_str().unwrap_or_default().to_string();
        let mut state = shared.lock();
        state.commands.push(command.clone());
        let result = match command.as_str() {
            "qmp_capabilities" => Ok(json!({})),
            "query-cpus-fast" => Ok(serde_json::to_value(&state.vcpus).unwrap_or(Value::Null)),
            "echo" => Ok(message.get("arguments").cloned().unwrap_or(json!({}))),
            other => Err(format!("The command {other} has not been found")),
        };
        let mut reply = match result {
            Ok(value) => json!({"return": value}),
            Err(desc) => json!({"error": {"class": "CommandNotFound", "desc": desc}}),
        };
        if let Some(id) = message.get("id") {
            reply["id"] = id.clone();
        }
        for event in std::mem::take(&mut state.before_reply) {
            write_event(&mut state, &event);
        }
        write_line(&mut state, &reply);
        drop(state);
        shared.changed.notify_all();
    }
}

fn write_event(state: &mut State, event: &QmpEvent) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut message = json!({
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        "event": event.name,
    });
    if !event.data.is_null() {
        message["data"] = event.data.clone();
    }
    write_line(state, &message)
}

fn write_line(state: &mut State, message: &Value) -> bool {
    let Some(client) = state.client.as_mut() else {
        return false;
    };
    let line = format!("{message}\r\n");
    client.write_all(line.as_bytes()).is_ok()
}
