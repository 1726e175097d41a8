//! Ceph RBD images: the `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]` image spec (QEMU's
//! syntax), and, with the `rbd` feature, the engine that serves them through librbd's
//! asynchronous API.
//!
//! The spec is parsed whether or not the feature is on, so that a bad spec is refused the same
//! way everywhere and a build without librbd says that it lacks RBD support rather than that
//! the file does not exist.
//!
//! [`RbdEngine`] has the shape of the io_uring engine: [`Engine::submit`] hands the request to
//! librbd with iovecs pointing straight into guest memory, librbd's completion callback (on a
//! librbd thread) only records the result and writes the engine's eventfd, and the queue thread
//! collects results in [`Engine::reap`] from its epoll loop. Every queue thread shares the
//! device's one writable image handle (`Arc<rbd::Image>`): librbd handles are thread-safe, and
//! a single writable handle per process keeps the image's exclusive lock with one owner instead
//! of bouncing it between handles. A thread's reads may go to a read-only handle on a cluster
//! connection of its own instead ([`RbdOptions::connections`]; see `Image::rbd_reader`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;

/// The prefix of an RBD image spec.
pub const RBD_PREFIX: &str = "rbd:";

/// Longest accepted spec, in bytes: pool and image names are short in practice, and a runaway
/// argument is better refused than sent to the cluster.
pub const RBD_SPEC_MAX: usize = 1024;

/// Connection settings of RBD images that the spec does not carry (`--ceph-conf`,
/// `--rbd-timeout`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbdOptions {
    /// The config file when the spec has no `conf=`; `None`: librados's default search.
    pub ceph_conf: Option<PathBuf>,
    /// Bound on reaching the cluster and opening the image; `None`: 10 s.
    pub timeout: Option<Duration>,
    /// Cluster connections to open for the image (`--rbd-connections`; 0 counts as 1): the
    /// first carries every write and holds the exclusive lock, the others are read-only handles
    /// that queue threads read through. Fewer are opened where more would not be safe (librbd's
    /// cache on, or a writable image with journaling).
    pub connections: usize,
}

/// A parsed `rbd:` image spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// `@SNAP`: serve that snapshot, read-only.
    pub snap: Option<String>,
    /// `conf=PATH`: the cluster's config file.
    pub conf: Option<PathBuf>,
    /// `id=USER`: authenticate as `client.USER`.
    pub id: Option<String>,
}

impl RbdSpec {
    /// Whether `s` is meant as an RBD spec (it starts with `rbd:`).
    pub fn is_rbd(s: &str) -> bool {
        s.starts_with(RBD_PREFIX)
    }

    /// Parse `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]`.
    pub fn parse(s: &str) -> Result<RbdSpec, Error> {
        let bad = |reason: String| Error::RbdSpec {
            spec: if s.len() > 64 {
                let head: String = s.chars().take(48).collect();
                format!("{head}... ({} bytes)", s.len())
            } else {
                s.to_owned()
            },
            reason,
        };
        if s.len() > RBD_SPEC_MAX {
            return Err(bad(format!("longer than {RBD_SPEC_MAX} bytes")));
        }
        let rest = s
            .strip_prefix(RBD_PREFIX)
            .ok_or_else(|| bad(format!("does not start with {RBD_PREFIX}")))?;
        if let Some(c) = rest.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad(format!(
                "contains {c:?}; names and paths may not hold spaces or control characters"
            )));
        }
        let mut parts = rest.split(':');
        let name = parts.next().unwrap_or_default();
        if name.is_empty() {
            return Err(bad("no POOL/IMAGE after rbd:".into()));
        }
        let (pool_image, snap) = match name.split_once('@') {
            Some((_, "")) => return Err(bad("empty snapshot name after @".into())),
            Some((pi, snap)) => (pi, Some(snap.to_owned())),
            None => (name, None),
        };
        let Some((pool, image)) = pool_image.split_once('/') else {
            return Err(bad(format!(
                "{pool_image:?} is not POOL/IMAGE (the pool is required)"
            )));
        };
        if pool.is_empty() {
            return Err(bad("empty pool name".into()));
        }
        if image.is_empty() {
            return Err(bad("empty image name".into()));
        }
        if image.contains('/') {
            return Err(bad(format!(
                "{image:?}: image names cannot contain '/' (namespaces are not supported)"
            )));
        }
        if snap.as_deref().is_some_and(|s| s.contains('@')) {
            return Err(bad("more than one @".into()));
        }
        let mut spec = RbdSpec {
            pool: pool.to_owned(),
            image: image.to_owned(),
            snap,
            conf: None,
            id: None,
        };
        for opt in parts {
            let Some((key, value)) = opt.split_once('=') else {
                return Err(bad(format!(
                    "option {opt:?} is not KEY=VALUE (known: conf=PATH, id=USER)"
                )));
            };
            if value.is_empty() {
                return Err(bad(format!("empty value for {key}")));
            }
            match key {
                "conf" if spec.conf.is_none() => spec.conf = Some(PathBuf::from(value)),
                "id" if spec.id.is_none() => spec.id = Some(value.to_owned()),
                "conf" | "id" => return Err(bad(format!("{key} given twice"))),
                _ => {
                    return Err(bad(format!(
                        "unknown option {key:?} (known: conf=PATH, id=USER)"
                    )))
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for RbdSpec {
    /// The canonical spec (`rbd:pool/image@snap:conf=...:id=...`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{RBD_PREFIX}{}/{}", self.pool, self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        if let Some(conf) = &self.conf {
            write!(f, ":conf={}", conf.display())?;
        }
        if let Some(id) = &self.id {
            write!(f, ":id={id}")?;
        }
        Ok(())
    }
}

#[cfg(feature = "rbd")]
pub use engine::RbdEngine;

#[cfg(feature = "rbd")]
mod engine {
    use std::os::unix::io::RawFd;
    use std::sync::Arc;

    use rbd::{AioOp, AioQueue};

    use crate::{Completion, Engine, EngineKind, Error, IoBuffers, Op, Result, SubmitError};

    /// The engine of one queue thread over an RBD image; see the module documentation.
    pub struct RbdEngine {
        // Declared first, so dropped first: its drop waits for every request librbd holds,
        // before the buffers (and the guards keeping guest memory mapped) below go.
        queue: AioQueue,
        /// Per tag: the request's buffers, held until it completes.
        bufs: Vec<Option<IoBuffers>>,
        /// Per tag: bytes a read or write moves (librbd reports bytes for reads only).
        lens: Vec<u32>,
        /// Per tag: the caller's `user_data`.
        user_data: Vec<u64>,
        /// Tags not in use.
        free: Vec<u32>,
    }

    impl RbdEngine {
        /// An engine over `image` with room for `queue_depth` requests without allocating.
        pub fn new(image: Arc<rbd::Image>, queue_depth: u32) -> Result<Self> {
            Self::with_reader(image, None, queue_depth)
        }

        /// As [`RbdEngine::new`], with reads sent to `reader` (a read-only handle on the same
        /// image, on a cluster connection of its own) instead of `image`.
        pub fn with_reader(
            image: Arc<rbd::Image>,
            reader: Option<Arc<rbd::Image>>,
            queue_depth: u32,
        ) -> Result<Self> {
            let depth = queue_depth.max(1);
            let queue =
                AioQueue::with_reader(image, reader, depth).map_err(|source| Error::Rbd {
                    context: "creating an RBD request queue".into(),
                    source: Box::new(source),
                })?;
            let n = depth as usize;
            Ok(RbdEngine {
                queue,
                bufs: (0..n).map(|_| None).collect(),
                lens: vec![0; n],
                user_data: vec![0; n],
                free: (0..depth).rev().collect(),
            })
        }

        fn take_tag(&mut self) -> usize {
            match self.free.pop() {
                Some(t) => t as usize,
                None => {
                    self.bufs.push(None);
                    self.lens.push(0);
                    self.user_data.push(0);
                    self.bufs.len() - 1
                }
            }
        }
    }

    /// How long a dropped engine waits for librbd before leaving requests to it: the backend has
    /// already drained the connection by then, so what is left waits on an unanswering cluster.
    const ABANDON_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

    impl Drop for RbdEngine {
        fn drop(&mut self) {
            if !self.queue.wait_idle_for(ABANDON_AFTER) {
                // librbd may still write into these buffers: keep them, and the guest memory
                // their guards keep mapped, for the life of the process rather than hang here.
                log::error!(
                    "{} RBD request(s) unanswered {ABANDON_AFTER:?} after the engine stopped; \
                     leaving them to librbd",
                    self.queue.in_flight()
                );
                self.queue.abandon();
                std::mem::forget(std::mem::take(&mut self.bufs));
            }
        }
    }

    impl Engine for RbdEngine {
        fn submit(&mut self, op: Op, user_data: u64) -> std::result::Result<(), SubmitError> {
            let tag = self.take_tag();
            self.user_data[tag] = user_data;
            let (offset, bufs, write) = match op {
                Op::Read { offset, bufs } => (offset, bufs, false),
                Op::Write { offset, bufs } => (offset, bufs, true),
                other => {
                    self.lens[tag] = 0;
                    let aio = match other {
                        Op::Flush => AioOp::Flush,
                        Op::Discard { offset, len } => AioOp::Discard { offset, len },
                        // librbd deallocates zeroed ranges of a thin image either way.
                        Op::WriteZeroes { offset, len, .. } => AioOp::WriteZeroes { offset, len },
                        Op::Read { .. } | Op::Write { .. } => unreachable!("matched above"),
                    };
                    // SAFETY: these operations carry no buffers.
                    unsafe { self.queue.submit(aio, tag as u64) };
                    return Ok(());
                }
            };
            let len = crate::iov::total_len(bufs.iovecs());
            let (iovecs, iovcnt) = (bufs.iovecs().as_ptr(), bufs.iovecs().len());
            // Held until the completion: the guard keeps guest memory mapped meanwhile.
            self.bufs[tag] = Some(bufs);
            match len {
                Ok(len) => {
                    self.lens[tag] = len;
                    let aio = if write {
                        AioOp::Writev {
                            offset,
                            iovecs,
                            iovcnt,
                        }
                    } else {
                        AioOp::Readv {
                            offset,
                            iovecs,
                            iovcnt,
                        }
                    };
                    // SAFETY: the iovecs describe memory their guard keeps mapped (the promise
                    // of `IoBuffers::new`), and the engine holds the `IoBuffers` in
                    // `self.bufs[tag]` until librbd has completed this tag; nothing else
                    // touches the memory meanwhile (the owner gave it to the engine).
                    unsafe { self.queue.submit(aio, tag as u64) };
                }
                // More than 4 GiB in all: no virtqueue chain is; this request alone fails.
                Err(e) => self
                    .queue
                    .fail(tag as u64, e.raw_os_error().unwrap_or(libc::EINVAL)),
            }
            Ok(())
        }

        fn commit(&mut self) -> Result<()> {
            // librbd sends each request as it is submitted.
            Ok(())
        }

        fn completion_fd(&self) -> RawFd {
            self.queue.eventfd()
        }

        fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> Result<()> {
            let Self {
                queue,
                bufs,
                lens,
                user_data,
                free,
            } = self;
            queue.reap(|tag, ret| {
                let t = tag as usize;
                free.push(t as u32);
                let result = if ret < 0 {
                    Err(std::io::Error::from_raw_os_error(
                        i32::try_from(-ret).unwrap_or(libc::EIO),
                    ))
                } else {
                    Ok(lens[t])
                };
                f(Completion {
                    user_data: user_data[t],
                    result,
                    bufs: bufs[t].take(),
                    fixed_buffers: false,
                });
            });
            Ok(())
        }

        fn has_completions(&mut self) -> bool {
            self.queue.has_completions()
        }

        fn in_flight(&self) -> usize {
            self.queue.in_flight()
        }

        fn kind(&self) -> EngineKind {
            EngineKind::Rbd
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_spec_parses_and_prints_back() {
        let s = "rbd:vms/disk-1@snap1:conf=/etc/ceph/x.conf:id=cinder";
        let spec = RbdSpec::parse(s).unwrap();
        assert_eq!(
            spec,
            RbdSpec {
                pool: "vms".into(),
                image: "disk-1".into(),
                snap: Some("snap1".into()),
                conf: Some("/etc/ceph/x.conf".into()),
                id: Some("cinder".into()),
            }
        );
        assert_eq!(spec.to_string(), s);
        let plain = RbdSpec::parse("rbd:rbd/img").unwrap();
        assert_eq!((plain.snap, plain.conf, plain.id), (None, None, None));
    }

    fn reason(s: &str) -> String {
        match RbdSpec::parse(s) {
            Err(Error::RbdSpec { reason, .. }) => reason,
            other => panic!("{s:?} parsed: {other:?}"),
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert_eq!(reason("rbd:"), "no POOL/IMAGE after rbd:");
        assert_eq!(reason("rbd:/img"), "empty pool name");
        assert_eq!(reason("rbd:pool/"), "empty image name");
        assert!(reason("rbd:img").contains("the pool is required"));
        assert_eq!(reason("rbd:p/i@"), "empty snapshot name after @");
        assert_eq!(reason("rbd:p/i@a@b"), "more than one @");
        assert!(reason("rbd:p/a/b").contains("namespaces"));
        assert!(reason("rbd:p/i:foo=1").starts_with("unknown option \"foo\""));
        assert!(reason("rbd:p/i:conf").contains("not KEY=VALUE"));
        assert_eq!(reason("rbd:p/i:id="), "empty value for id");
        assert_eq!(reason("rbd:p/i:id=a:id=b"), "id given twice");
        assert!(reason("rbd:p/i x").contains("spaces"));
        let long = format!("rbd:p/{}", "x".repeat(4096));
        assert_eq!(reason(&long), "longer than 1024 bytes");
        // The message quotes a long spec only in part.
        let msg = RbdSpec::parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }
}
