//! A small synchronous QEMU Machine Protocol client over a unix socket.
//!
//! QMP is line-delimited JSON: QEMU greets with `{"QMP": {...}}`, the client enters command mode
//! with `qmp_capabilities`, then sends `{"execute": ..., "arguments": ..., "id": ...}` and gets
//! `{"return": ..., "id": ...}` or `{"error": {"class": ..., "desc": ...}, "id": ...}`. Events
//! (`{"event": ..., "data": ..., "timestamp": ...}`) arrive at any time, also between a command
//! and its reply; [`QmpClient`] queues those and hands them out by
//! [`next_event`](QmpClient::next_event), so none is lost.
//!
//! A QMP socket serves one client at a time: a second client's connect succeeds but it gets no
//! greeting until the first one leaves. The backend therefore needs a QMP socket of its own
//! (QEMU takes several `-qmp` options).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Longest QMP message accepted (`query-qmp-schema` is a few hundred KiB).
const MAX_MESSAGE: usize = 16 << 20;

/// One vCPU as QEMU's `query-cpus-fast` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    /// The vCPU's index, the guest's CPU number (`cpu-index`), and the `slot` of its hotplug
    /// events.
    #[serde(rename = "cpu-index")]
    pub cpu_index: usize,
    /// The host thread that runs it (`thread-id`); under single-threaded TCG all vCPUs share one.
    #[serde(rename = "thread-id")]
    pub thread_id: i32,
    /// Its QOM path, e.g. `/machine/unattached/device[0]` or `/machine/peripheral/cpu1`.
    #[serde(rename = "qom-path")]
    pub qom_path: String,
    /// Its topology (`socket-id`, `core-id`, `thread-id`, ...), what `device_add` takes back.
    #[serde(default)]
    pub props: Value,
}

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// The event's name, e.g. `ACPI_DEVICE_OST`, `DEVICE_DELETED`.
    pub name: String,
    /// Its `data` member; `Null` when the event has none.
    pub data: Value,
}

impl QmpEvent {
    /// An event named `name` with `data`.
    pub fn new(name: impl Into<String>, data: Value) -> Self {
        Self {
            name: name.into(),
            data,
        }
    }
}

/// A connected QMP client in command mode.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    /// Bytes read but not yet split into messages.
    buf: Vec<u8>,
    /// Events read while waiting for a reply, oldest first.
    events: VecDeque<QmpEvent>,
    /// How long a command waits for its reply.
    timeout: Duration,
    next_id: u64,
    greeting: Value,
}

/// One message off the wire, sorted by kind.
enum Message {
    Event(QmpEvent),
    Reply {
        id: Option<Value>,
        result: std::result::Result<Value, (String, String)>,
    },
    Greeting(Value),
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads QEMU's greeting and enters command mode
    /// (`qmp_capabilities`). `timeout` bounds the greeting and each later command's reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_stream(stream, timeout)
    }

    /// Speaks QMP on an already connected stream: reads the greeting, sends `qmp_capabilities`.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self> {
        let mut client = Self {
            stream,
            buf: Vec::new(),
            events: VecDeque::new(),
            timeout,
            next_id: 1,
            greeting: Value::Null,
        };
        let deadline = Instant::now() + timeout;
        loop {
            match client.read_message(deadline)? {
                Some(Message::Greeting(greeting)) => {
                    client.greeting = greeting;
                    break;
                }
                Some(Message::Event(event)) => client.events.push_back(event),
                Some(Message::Reply { .. }) => {
                    return Err(Error::Protocol("a reply before the greeting".into()))
                }
                None => {
                    return Err(Error::Timeout {
                        what: "the QMP greeting".into(),
                        timeout,
                    })
                }
            }
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// The greeting's `QMP` member: `version` and `capabilities`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with `arguments` and returns its `return` member. Events that arrive
    /// meanwhile are queued for [`next_event`](Self::next_event). An `error` reply is
    /// [`Error::Qmp`]; no reply within the connection's timeout is [`Error::Timeout`] (a late
    /// reply is recognized by its id and dropped).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.stream
            .set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))))
            .and_then(|()| self.stream.write_all(line.as_bytes()))
            .map_err(|source| Error::Io {
                context: format!("sending {command}"),
                source,
            })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_message(deadline)? {
                Some(Message::Event(event)) => self.events.push_back(event),
                // QEMU answers without an id when it could not even parse the command.
                Some(Message::Reply {
                    id: reply_id,
                    result,
                }) if reply_id.is_none() || reply_id == Some(json!(id)) => {
                    return result.map_err(|(class, desc)| Error::Qmp { class, desc });
                }
                Some(Message::Reply { id: reply_id, .. }) => {
                    log::debug!(
                        "QMP: dropping a late reply (id {reply_id:?}) while running {command}"
                    );
                }
                Some(Message::Greeting(_)) => {
                    return Err(Error::Protocol(format!("a greeting in reply to {command}")))
                }
                None => {
                    return Err(Error::Timeout {
                        what: format!("the reply to {command}"),
                        timeout: self.timeout,
                    })
                }
            }
        }
    }

    /// The vCPUs, from `query-cpus-fast` (which does not interrupt them).
    pub fn query_cpus_fast(&mut self) -> Result<Vec<VcpuInfo>> {
        let reply = self.execute("query-cpus-fast", None)?;
        serde_json::from_value(reply).map_err(|source| Error::Reply {
            command: "query-cpus-fast".into(),
            source,
        })
    }

    /// The next event: a queued one at once, else the next to arrive within `timeout`;
    /// `Ok(None)` if none did. A zero timeout still looks at what is on the socket.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<QmpEvent>> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline)? {
                Some(Message::Event(event)) => return Ok(Some(event)),
                Some(Message::Reply { id, .. }) => {
                    log::debug!("QMP: dropping a late reply (id {id:?})");
                }
                Some(Message::Greeting(_)) => {
                    return Err(Error::Protocol("a second greeting".into()))
                }
                None => return Ok(None),
            }
        }
    }

    /// How many events are queued (read, not yet handed out).
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// The stream, e.g. to `try_clone` it and `shutdown` it from another thread, which makes a
    /// blocked [`next_event`](Self::next_event) or [`execute`](Self::execute) return
    /// [`Error::Closed`].
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads the next message, waiting until `deadline` (at least one read is tried, so a
    /// deadline in the past polls). `Ok(None)` on timeout.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Message>> {
        let mut tried = false;
        loop {
            while let Some(newline) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=newline).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return parse_message(line).map(Some);
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(Error::Protocol(format!(
                    "a message longer than {MAX_MESSAGE} bytes"
                )));
            }
            let now = Instant::now();
            if tried && now >= deadline {
                return Ok(None);
            }
            tried = true;
            let wait = deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(|source| Error::Io {
                    context: "setting a read timeout".into(),
                    source,
                })?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(source) => {
                    return Err(Error::Io {
                        context: "reading".into(),
                        source,
                    })
                }
            }
        }
    }
}

fn parse_message(line: &[u8]) -> Result<Message> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        Error::Protocol(format!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ))
    })?;
    let Value::Object(mut object) = value else {
        return Err(Error::Protocol(format!("not a JSON object: {value}")));
    };
    if let Some(name) = object.get("event") {
        let name = name
            .as_str()
            .ok_or_else(|| Error::Protocol(format!("an event name that is not a string: {name}")))?
            .to_string();
        let data = object.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event(QmpEvent { name, data }));
    }
    let id = object.remove("id");
    if let Some(result) = object.remove("return") {
        return Ok(Message::Reply {
            id,
            result: Ok(result),
        });
    }
    if let Some(error) = object.remove("error") {
        let field = |name: &str| {
            error
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return Ok(Message::Reply {
            id,
            result: Err((field("class"), field("desc"))),
        });
    }
    if let Some(greeting) = object.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    Err(Error::Protocol(format!(
        "neither an event, a reply nor a greeting: {}",
        Value::Object(object)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qmp::{vcpu, FakeQmp};

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn connect_negotiates_and_queries_cpus() {
        let fake = FakeQmp::start().unwrap();
        fake.set_vcpus(vec![vcpu(0, 1000), vcpu(1, 1001)]);
        let mut client = QmpClient::connect(fake.path(), TIMEOUT).unwrap();
        assert_eq!(client.greeting()["version"]["qemu"]["major"], 10);
        let cpus = client.query_cpus_fast().unwrap();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[1].cpu_index, 1);
        assert_eq!(cpus[1].thread_id, 1001);
        assert_eq!(cpus[1].qom_path, "/machine/unattached/device[2]");
        assert_eq!(cpus[1].props["core-id"], 1);
        assert_eq!(fake.commands(), vec!["qmp_capabilities", "query-cpus-fast"]);
    }

    #[test]
    fn decodes_real_query_cpus_fast_reply() {
        // QEMU 10.0.2, q35, TCG, -smp 2,maxcpus=4.
        let reply = r#"[{"thread-id": 17831, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"}, {"thread-id": 17832, "props": {"core-id": 1, "thread-id": 0, "socket-id": 0}, "qom-path": "/machine/unattached/device[2]", "cpu-index": 1, "target": "x86_64"}]"#;
        let cpus: Vec<VcpuInfo> = serde_json::from_str(reply).unwrap();
        assert_eq!(
            cpus[1],
            VcpuInfo {
                cpu_index: 1,
                thread_id: 17832,
                qom_path: "/machine/unattached/device[2]".into(),
                props: json!({"core-id": 1, "thread-id": 0, "socket-id": 0}),
            }
        );
    }

    #[test]
    fn error_reply_is_qmp_error_with_class_and_desc() {
        let fake = FakeQmp::start().unwrap();
        let mut client = QmpClient::connect(fake.path(), TIMEOUT).unwrap();
        let err = client.execute("bogus", None).unwrap_err();
        match err {
            Error::Qmp { class, desc } => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command bogus has not been found");
            }
            other => panic!("{other}"),
        }
        // The connection is still usable.
        client.execute("query-cpus-fast", None).unwrap();
    }

    #[test]
    fn arguments_are_sent() {
        let fake = FakeQmp::start().unwrap();
        let mut client = QmpClient::connect(fake.path(), TIMEOUT).unwrap();
        let reply = client
            .execute("echo", Some(json!({"a": [1, 2], "b": "c"})))
            .unwrap();
        assert_eq!(reply, json!({"a": [1, 2], "b": "c"}));
    }

    #[test]
    fn events_during_a_command_are_queued_not_lost() {
        let fake = FakeQmp::start().unwrap();
        let mut client = QmpClient::connect(fake.path(), TIMEOUT).unwrap();
        fake.events_before_next_reply(vec![
            QmpEvent::new("RESUME", Value::Null),
            QmpEvent::new("DEVICE_DELETED", json!({"path": "/x/lapic"})),
        ]);
        client.query_cpus_fast().unwrap();
        assert_eq!(client.queued_events(), 2);
        let first = client.next_event(Duration::ZERO).unwrap().unwrap();
        assert_eq!(first.name, "RESUME");
        assert_eq!(first.data, Value::Null);
        let second = client.next_event(Duration::ZERO).unwrap().unwrap();
        assert_eq!(second.data["path"], "/x/lapic");
        assert_eq!(client.next_event(Duration::ZERO).unwrap(), None);
    }

    #[test]
    fn next_event_times_out_then_sees_a_later_event() {
        let fake = FakeQmp::start().unwrap();
        let mut client = QmpClient::connect(fake.path(), TIMEOUT).unwrap();
        let start = Instant::now();
        assert_eq!(client.next_event(Duration::from_millis(50)).unwrap(), None);
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(fake.send_event("STOP", Value::Null));
        let event = client.next_event(TIMEOUT).unwrap().unwrap();
        assert_eq!(event.name, "STOP");
    }

    #[test]
    fn connect_to_missing_socket_is_connect_error() {
        let err = QmpClient::connect(Path::new("/nonexistent/qmp.sock"), TIMEOUT).unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
    }

    #[test]
    fn peer_going_away_is_closed() {
        let fake = FakeQmp::start().unwrap();
        let mut client = QmpClient::connect(fake.path(), TIMEOUT).unwrap();
        fake.disconnect();
        let err = client.next_event(TIMEOUT).unwrap_err();
        assert!(matches!(err, Error::Closed), "{err}");
    }

    #[test]
    fn silent_peer_times_out_on_greeting() {
        let dir = crate::fake_qmp::temp_dir();
        let path = dir.join("silent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = QmpClient::connect(&path, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn parses_messages_by_kind() {
        assert!(matches!(
            parse_message(br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#),
            Ok(Message::Event(QmpEvent { ref name, data: Value::Null })) if name == "STOP"
        ));
        assert!(matches!(
            parse_message(br#"{"return": {}, "id": 3}"#),
            Ok(Message::Reply {
                id: Some(_),
                result: Ok(_)
            })
        ));
        assert!(matches!(
            parse_message(br#"{"error": {"class": "GenericError", "desc": "no"}}"#),
            Ok(Message::Reply { id: None, result: Err(ref e) }) if e.0 == "GenericError" && e.1 == "no"
        ));
        assert!(matches!(
            parse_message(br#"{"QMP": {"capabilities": []}}"#),
            Ok(Message::Greeting(_))
        ));
        for bad in [&b"nope"[..], b"[1]", br#"{"x": 1}"#, br#"{"event": 3}"#] {
            assert!(matches!(parse_message(bad), Err(Error::Protocol(_))));
        }
    }
}
