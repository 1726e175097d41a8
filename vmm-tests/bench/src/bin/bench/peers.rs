//! The peers a run compares: this backend in each cache mode and I/O
//! engine and on a null image, qemu-storage-daemon's vhost-user-blk export,
//! cloud-hypervisor's `vhost_user_block` (when a binary is given), and fio
//! straight on the image as the no-virtualization ceiling; and the same
//! three on a Ceph RBD image (`*-rbd`, see [`super::rbd`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::error::{bail, Context, Result};
use super::rbd::RbdImage;

/// The page-cache mode a peer runs the image in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// O_DIRECT: the host page cache is bypassed.
    Direct,
    /// Buffered I/O through the host page cache.
    Buffered,
    /// Buffered with drop-behind (our `--cache dontcache`).
    Dontcache,
    /// No image at all (our `null:SIZE`): the virtqueue cost alone.
    Null,
    /// A Ceph RBD image (librbd's cache off unless the peer says so); no
    /// local file, no page cache.
    Rbd,
}

/// Which program serves the requests, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "program", rename_all = "kebab-case")]
pub enum Kind {
    /// This backend (`vhost-user-blk`).
    Ours {
        /// `--cache` value (`none`, `writeback`, `dontcache`), or `null`.
        cache: String,
        /// `--io-engine` value (`io-uring`, `sync`).
        engine: String,
        /// More backend arguments, passed as they are (`--defer-delay-us 0`,
        /// `--poll-us 50`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        extra: Vec<String>,
    },
    /// `qemu-storage-daemon --export type=vhost-user-blk`.
    Qsd {
        /// `cache.direct=on`.
        direct: bool,
        /// The file driver's `aio=` (`io_uring`, `threads`).
        aio: String,
        /// Serve QEMU's `null-co` driver instead of the image (requests complete without I/O).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        null: bool,
        /// Behind a throttle group with this `x-iops-total`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iops_total: Option<u64>,
    },
    /// cloud-hypervisor's `vhost_user_block`.
    Ch {
        /// `direct=true`.
        direct: bool,
    },
    /// fio on the host, straight on the image (no vhost-user at all).
    Fio {
        /// `--direct=1`.
        direct: bool,
    },
    /// This backend on the RBD image (`--blk-file rbd:POOL/IMAGE`).
    OursRbd {
        /// `--cache` value (`none`: librbd's cache off; `writeback`: on).
        cache: String,
        /// More backend arguments, passed as they are.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        extra: Vec<String>,
    },
    /// `qemu-storage-daemon --blockdev driver=rbd` exported as
    /// vhost-user-blk, `cache.direct=on` (QEMU then turns librbd's cache off).
    QsdRbd,
    /// fio's `rbd` engine on the host, straight on the image through
    /// librbd (no vhost-user at all).
    FioRbd,
}

/// One peer: a name and how to run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// Short name used in tables, plots and `--peers`.
    pub name: String,
    /// The program and its configuration.
    pub kind: Kind,
    /// The page-cache mode.
    pub mode: Mode,
}

/// Programs the peers run.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The `vhost-user-blk` binary.
    pub backend: PathBuf,
    /// `qemu-storage-daemon`.
    pub qsd: PathBuf,
    /// `fio`.
    pub fio: PathBuf,
    /// cloud-hypervisor's `vhost_user_block`, if given.
    pub ch: Option<PathBuf>,
}

impl Peer {
    fn ours(cache: &str, engine: &str) -> Peer {
        Peer::ours_with(cache, engine, "", &[])
    }

    /// Our backend with `extra` arguments; `variant` goes into the name:
    /// after the cache mode with a trailing `-` (`d0-`:
    /// `ours-dontcache-d0-uring`), after the engine otherwise (`poll`:
    /// `ours-none-uring-poll`).
    fn ours_with(cache: &str, engine: &str, variant: &str, extra: &[&str]) -> Peer {
        let mode = match cache {
            "none" => Mode::Direct,
            "writeback" => Mode::Buffered,
            "dontcache" => Mode::Dontcache,
            _ => Mode::Null,
        };
        let short = if engine == "io-uring" {
            "uring"
        } else {
            engine
        };
        let name = match variant {
            "" => format!("ours-{cache}-{short}"),
            v if v.ends_with('-') => format!("ours-{cache}-{v}{short}"),
            v => format!("ours-{cache}-{short}-{v}"),
        };
        Peer {
            name,
            kind: Kind::Ours {
                cache: cache.into(),
                engine: engine.into(),
                extra: extra.iter().map(|a| a.to_string()).collect(),
            },
            mode,
        }
    }

    fn qsd(direct: bool, aio: &str) -> Peer {
        let short = if aio == "io_uring" { "uring" } else { aio };
        Peer {
            name: format!("qsd-{}-{short}", if direct { "direct" } else { "buffered" }),
            kind: Kind::Qsd {
                direct,
                aio: aio.into(),
                null: false,
                iops_total: None,
            },
            mode: if direct { Mode::Direct } else { Mode::Buffered },
        }
    }

    fn ch(direct: bool) -> Peer {
        Peer {
            name: format!("ch-{}", if direct { "direct" } else { "buffered" }),
            kind: Kind::Ch { direct },
            mode: if direct { Mode::Direct } else { Mode::Buffered },
        }
    }

    fn fio(direct: bool) -> Peer {
        Peer {
            name: format!("fio-{}", if direct { "direct" } else { "buffered" }),
            kind: Kind::Fio { direct },
            mode: if direct { Mode::Direct } else { Mode::Buffered },
        }
    }

    /// Every known peer; cloud-hypervisor's only with `with_ch`.
    ///
    /// `ours-{none,writeback,dontcache}-{uring,sync}` run our backend at its
    /// defaults but for the cache mode and engine, so `ours-none-uring` and
    /// `ours-writeback-uring` are what a user gets without tuning (adaptive
    /// queue polling included). Beside them: `ours-dontcache-d0-uring`
    /// (`--defer-delay-us 0`: the deferred worker fires at once, the
    /// no-batching baseline the batching targets compare with), `ours-{none,writeback}-uring-nopoll`
    /// (`--poll-us 0`: no polling), `ours-{none,writeback}-uring-pollfixed`
    /// (`--poll-us 50 --poll-fixed`: a fixed 50 µs window after every event,
    /// cloud-hypervisor's scheme), `ours-none-uring-polldev` (`--poll-us
    /// 1000 --poll-device`: polling through device latencies too; not a
    /// default), and `ours-none-uring-fixedbuf` (`--fixed-buffers`: guest
    /// memory registered as io_uring fixed buffers; not a default).
    pub fn all(with_ch: bool) -> Vec<Peer> {
        let mut v = Vec::new();
        for cache in ["none", "writeback", "dontcache"] {
            for engine in ["io-uring", "sync"] {
                v.push(Peer::ours(cache, engine));
            }
            if cache == "dontcache" {
                v.push(Peer::ours_with(
                    cache,
                    "io-uring",
                    "d0-",
                    &["--defer-delay-us", "0"],
                ));
            } else {
                v.push(Peer::ours_with(
                    cache,
                    "io-uring",
                    "nopoll",
                    &["--poll-us", "0"],
                ));
                v.push(Peer::ours_with(
                    cache,
                    "io-uring",
                    "pollfixed",
                    &["--poll-us", "50", "--poll-fixed"],
                ));
            }
            if cache == "none" {
                v.push(Peer::ours_with(
                    cache,
                    "io-uring",
                    "polldev",
                    &["--poll-us", "1000", "--poll-device"],
                ));
                // Guest memory registered as io_uring fixed buffers: what skipping the per-request
                // page pinning of O_DIRECT buys.
                v.push(Peer::ours_with(
                    cache,
                    "io-uring",
                    "fixedbuf",
                    &["--fixed-buffers"],
                ));
                // A limit far above the load (the largest accepted): what limits cost when they
                // never bite, on a real disk.
                v.push(Peer::ours_with(
                    cache,
                    "io-uring",
                    "nobite",
                    &["--limit", "iops-total=100000000"],
                ));
            }
        }
        v.push(Peer {
            name: "ours-null".into(),
            kind: Kind::Ours {
                cache: "null".into(),
                engine: "io-uring".into(),
                extra: Vec::new(),
            },
            mode: Mode::Null,
        });
        // The I/O limits on the null image, so that only the limiter sets the pace: how close
        // the achieved rate comes to the configured one, and what a limit far above the load
        // (the largest accepted, 10^8 IOPS, which never bites) costs against none.
        for (variant, spec) in [
            ("limit1k", "iops-total=1000"),
            ("limit10k", "iops-total=10000"),
            ("limit100k", "iops-total=100000"),
            ("bps100m", "bps-total=104857600"),
            ("nobite", "iops-total=100000000"),
        ] {
            v.push(Peer {
                name: format!("ours-null-{variant}"),
                kind: Kind::Ours {
                    cache: "null".into(),
                    engine: "io-uring".into(),
                    extra: vec!["--limit".into(), spec.into()],
                },
                mode: Mode::Null,
            });
        }
        for direct in [true, false] {
            for aio in ["io_uring", "threads"] {
                v.push(Peer::qsd(direct, aio));
            }
        }
        // qemu-storage-daemon's null-co driver, bare and behind a throttle group: the peer of
        // the ours-null-limit* runs.
        for iops_total in [None, Some(1000), Some(10_000), Some(100_000)] {
            v.push(Peer {
                name: match iops_total {
                    None => "qsd-null".into(),
                    Some(n) => format!("qsd-null-limit{}k", n / 1000),
                },
                kind: Kind::Qsd {
                    direct: true,
                    aio: "threads".into(),
                    null: true,
                    iops_total,
                },
                mode: Mode::Null,
            });
        }
        if with_ch {
            v.push(Peer::ch(true));
            v.push(Peer::ch(false));
        }
        v.push(Peer::fio(true));
        v.push(Peer::fio(false));
        v.extend(Peer::rbd());
        v
    }

    /// The RBD peers, which run on their own (`--peers rbd`): our backend
    /// with librbd's cache off (`ours-rbd`), the same on one cluster
    /// connection (`ours-rbd-1conn`, where the default opens one per queue
    /// thread) and with librbd's cache on (`ours-rbd-writeback`, one
    /// connection), qemu-storage-daemon's rbd driver and fio's rbd engine.
    pub fn rbd() -> Vec<Peer> {
        let ours = |name: &str, cache: &str, extra: &[&str]| Peer {
            name: name.into(),
            kind: Kind::OursRbd {
                cache: cache.into(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            },
            mode: Mode::Rbd,
        };
        vec![
            ours("ours-rbd", "none", &[]),
            ours("ours-rbd-1conn", "none", &["--rbd-connections", "1"]),
            ours("ours-rbd-writeback", "writeback", &[]),
            Peer {
                name: "qsd-rbd".into(),
                kind: Kind::QsdRbd,
                mode: Mode::Rbd,
            },
            Peer {
                name: "fio-rbd".into(),
                kind: Kind::FioRbd,
                mode: Mode::Rbd,
            },
        ]
    }

    /// The default set: each of our cache modes on io_uring at our defaults
    /// plus the synchronous engine where it matters (buffered), dontcache
    /// without batching (`--defer-delay-us 0`), O_DIRECT and buffered without
    /// polling and with cloud-hypervisor's fixed window, our null ceiling,
    /// qemu-storage-daemon direct and buffered on io_uring and buffered on
    /// its default thread pool, cloud-hypervisor when given, and fio.
    pub fn defaults(with_ch: bool) -> Vec<Peer> {
        let names = [
            "ours-none-uring",
            "ours-none-uring-nopoll",
            "ours-none-uring-pollfixed",
            "ours-writeback-uring",
            "ours-writeback-sync",
            "ours-writeback-uring-nopoll",
            "ours-writeback-uring-pollfixed",
            "ours-dontcache-uring",
            "ours-dontcache-d0-uring",
            "ours-null",
            "qsd-direct-uring",
            "qsd-buffered-uring",
            "qsd-buffered-threads",
            "ch-direct",
            "ch-buffered",
            "fio-direct",
            "fio-buffered",
        ];
        Peer::all(with_ch)
            .into_iter()
            .filter(|p| names.contains(&p.name.as_str()))
            .collect()
    }

    /// Whether this peer is our backend.
    pub fn is_ours(&self) -> bool {
        matches!(self.kind, Kind::Ours { .. } | Kind::OursRbd { .. })
    }

    /// Whether this peer is our backend at its defaults but for the cache
    /// mode (`--cache none|writeback`, the io_uring engine, nothing else):
    /// what a user gets without tuning, the row the targets are computed
    /// from.
    pub fn is_our_default(&self) -> bool {
        match &self.kind {
            Kind::Ours {
                cache,
                engine,
                extra,
            } => {
                (cache == "none" || cache == "writeback")
                    && engine == "io-uring"
                    && extra.is_empty()
            }
            _ => false,
        }
    }

    /// Whether the peer touches the local image file (all but the null
    /// image and the RBD peers).
    pub fn uses_image(&self) -> bool {
        !matches!(self.mode, Mode::Null | Mode::Rbd)
    }

    /// Whether the peer serves the RBD image.
    pub fn is_rbd(&self) -> bool {
        self.mode == Mode::Rbd
    }

    /// Whether the run starts with the image hot in the page cache.
    pub fn wants_warm_cache(&self) -> bool {
        self.mode == Mode::Buffered
    }
}

/// What a peer serves.
#[derive(Clone, Copy, Debug)]
pub enum Store<'a> {
    /// A local image file.
    File(&'a Path),
    /// The Ceph RBD image.
    Rbd(&'a RbdImage),
}

impl<'a> Store<'a> {
    fn file(self, peer: &Peer) -> Result<&'a Path> {
        match self {
            Store::File(p) => Ok(p),
            Store::Rbd(_) => bail!("{}: serves a local image, not an RBD one", peer.name),
        }
    }

    fn rbd(self, peer: &Peer) -> Result<&'a RbdImage> {
        match self {
            Store::Rbd(r) => Ok(r),
            Store::File(_) => bail!("{}: no RBD image given", peer.name),
        }
    }
}

/// A vhost-user server process for one run, killed when dropped.
pub struct Server {
    child: Child,
    /// The vhost-user socket it listens on.
    pub socket: PathBuf,
    /// Our backend's control socket (`--control`), for its `stats`.
    pub control: Option<PathBuf>,
    log: PathBuf,
}

/// The command that serves `image` as `peer` on `socket`, with `queues`
/// queues; our backend also gets `--control <control>`.
fn command(
    peer: &Peer,
    progs: &Programs,
    store: Store<'_>,
    image_size: u64,
    queues: u32,
    socket: &Path,
    control: Option<&Path>,
) -> Result<Command> {
    let img = || -> Result<String> { Ok(store.file(peer)?.display().to_string()) };
    let sock = socket.display().to_string();
    Ok(match &peer.kind {
        Kind::Ours {
            cache,
            engine,
            extra,
        } => {
            let mut c = Command::new(&progs.backend);
            c.arg("--socket-path").arg(socket);
            c.arg("--num-queues").arg(queues.to_string());
            c.arg("--queue-size").arg("256");
            if cache == "null" {
                c.arg("--blk-file").arg(format!("null:{image_size}"));
            } else {
                c.arg("--blk-file").arg(store.file(peer)?);
                c.arg("--cache").arg(cache);
                c.arg("--io-engine").arg(engine);
            }
            if let Some(ctl) = control {
                c.arg("--control").arg(ctl);
            }
            c.args(extra);
            c
        }
        Kind::Qsd {
            direct,
            aio,
            null,
            iops_total,
        } => {
            let mut c = Command::new(&progs.qsd);
            if *null {
                c.arg("--blockdev").arg(format!(
                    "driver=null-co,node-name=f,size={image_size},read-zeroes=off"
                ));
            } else {
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f,filename={},cache.direct={},aio={aio}",
                    img()?,
                    if *direct { "on" } else { "off" }
                ));
            }
            let mut node = "f";
            if let Some(iops) = iops_total {
                c.arg("--object")
                    .arg(format!("throttle-group,id=tg,x-iops-total={iops}"));
                c.arg("--blockdev")
                    .arg("driver=throttle,node-name=t,throttle-group=tg,file=f");
                node = "t";
            }
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={sock},writable=on,num-queues={queues}"
            ));
            c
        }
        Kind::Ch { direct } => {
            let Some(ch) = &progs.ch else {
                bail!("{}: no vhost_user_block binary given (--ch)", peer.name);
            };
            let mut c = Command::new(ch);
            c.arg("--block-backend").arg(format!(
                "path={},socket={sock},num_queues={queues},queue_size=256,direct={direct}",
                img()?
            ));
            c
        }
        Kind::OursRbd { cache, extra } => {
            let mut c = Command::new(&progs.backend);
            c.arg("--socket-path").arg(socket);
            c.arg("--num-queues").arg(queues.to_string());
            c.arg("--queue-size").arg("256");
            c.arg("--blk-file").arg(store.rbd(peer)?.spec());
            c.arg("--cache").arg(cache);
            if let Some(ctl) = control {
                c.arg("--control").arg(ctl);
            }
            c.args(extra);
            c
        }
        Kind::QsdRbd => {
            let r = store.rbd(peer)?;
            let mut c = Command::new(&progs.qsd);
            c.arg("--blockdev").arg(format!(
                "driver=rbd,node-name=f,pool={},image={},conf={},cache.direct=on",
                r.pool,
                r.image,
                r.conf.display()
            ));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on,num-queues={queues}"
            ));
            c
        }
        Kind::Fio { .. } | Kind::FioRbd => bail!("{}: fio runs without a server", peer.name),
    })
}

impl Server {
    /// Starts `peer` serving `image` with `queues` queues on a socket in
    /// `dir` (ours with its control socket there too). fio peers have no
    /// server: see [`super::fio`].
    pub fn start(
        peer: &Peer,
        progs: &Programs,
        store: Store<'_>,
        image_size: u64,
        queues: u32,
        dir: &Path,
    ) -> Result<Server> {
        let socket = dir.join(format!("{}.sock", peer.name));
        let log = dir.join(format!("{}.log", peer.name));
        let control = peer
            .is_ours()
            .then(|| dir.join(format!("{}.ctl", peer.name)));
        for p in std::iter::once(&socket).chain(control.iter()) {
            let _ = std::fs::remove_file(p);
        }
        let mut cmd = command(
            peer,
            progs,
            store,
            image_size,
            queues,
            &socket,
            control.as_deref(),
        )?;
        let log_file = File::create(&log).ctx(|| format!("create {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .ctx(|| format!("dup {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err));
        let child = cmd
            .spawn()
            .ctx(|| format!("{}: spawn {:?}", peer.name, cmd.get_program()))?;
        let mut server = Server {
            child,
            socket,
            control,
            log,
        };
        server.wait_listening(Duration::from_secs(10))?;
        Ok(server)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        // Our backend binds its control socket before the vhost-user one;
        // wait for both all the same.
        while !self.socket.exists() || self.control.as_ref().is_some_and(|c| !c.exists()) {
            if let Some(status) = self.child.try_wait().ctx(|| "wait for the server")? {
                bail!(
                    "server exited ({status}) before listening; its log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} (or its control socket) did not appear within {limit:?}; server log:\n{}",
                    self.socket.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Whether the server is still running; its log tail when it is not.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait().ctx(|| "wait for the server")? {
            None => Ok(()),
            Some(status) => bail!("server exited ({status}); its log:\n{}", self.log_tail()),
        }
    }

    /// The last lines of the server's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the server: SIGTERM, then SIGKILL after two seconds.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill() takes no pointers; `pid` is our own child, not yet
        // reaped, so the id cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.remove_sockets();
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.remove_sockets();
    }

    fn remove_sockets(&self) {
        let _ = std::fs::remove_file(&self.socket);
        if let Some(c) = &self.control {
            let _ = std::fs::remove_file(c);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> Peer {
        Peer::all(true)
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no peer {name}"))
    }

    fn args(p: &Peer, control: Option<&Path>) -> Vec<String> {
        let rbd = RbdImage {
            conf: "/c/ceph.conf".into(),
            pool: "rbd".into(),
            image: "bench".into(),
            osd_pid_file: None,
            fio_conf: "/w/fio.conf".into(),
            features: "layering".into(),
        };
        let progs = Programs {
            backend: "vhost-user-blk".into(),
            qsd: "qemu-storage-daemon".into(),
            fio: "fio".into(),
            ch: None,
        };
        let cmd = command(
            p,
            &progs,
            if p.is_rbd() {
                Store::Rbd(&rbd)
            } else {
                Store::File(Path::new("/img"))
            },
            1 << 30,
            2,
            Path::new("/w/p.sock"),
            control,
        )
        .expect("command");
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn variants_and_their_modes() {
        let extra = |p: &Peer| match &p.kind {
            Kind::Ours { extra, .. } => extra.clone(),
            _ => panic!("{} is not ours", p.name),
        };
        let d0 = peer("ours-dontcache-d0-uring");
        assert_eq!(d0.mode, Mode::Dontcache);
        assert_eq!(extra(&d0), ["--defer-delay-us", "0"]);
        let none = peer("ours-none-uring-pollfixed");
        assert_eq!(none.mode, Mode::Direct);
        assert_eq!(extra(&none), ["--poll-us", "50", "--poll-fixed"]);
        assert_eq!(extra(&peer("ours-none-uring-nopoll")), ["--poll-us", "0"]);
        assert!(peer("ours-none-uring").is_our_default());
        assert!(peer("ours-writeback-uring").is_our_default());
        assert!(!none.is_our_default() && !peer("ours-writeback-sync").is_our_default());
        assert!(!peer("ours-null").is_our_default() && !peer("ch-direct").is_our_default());
        let dev = peer("ours-none-uring-polldev");
        assert_eq!(dev.mode, Mode::Direct);
        assert_eq!(extra(&dev), ["--poll-us", "1000", "--poll-device"]);
        let fixedbuf = peer("ours-none-uring-fixedbuf");
        assert_eq!(fixedbuf.mode, Mode::Direct);
        assert_eq!(extra(&fixedbuf), ["--fixed-buffers"]);
        assert!(!fixedbuf.is_our_default());
        let wb = peer("ours-writeback-uring-pollfixed");
        assert_eq!(wb.mode, Mode::Buffered);
        assert!(wb.wants_warm_cache() && !none.wants_warm_cache());
        assert!(extra(&peer("ours-dontcache-uring")).is_empty());
        // Names are unique.
        let all = Peer::all(true);
        for p in &all {
            assert_eq!(all.iter().filter(|q| q.name == p.name).count(), 1);
        }
        let defaults: Vec<String> = Peer::defaults(true).into_iter().map(|p| p.name).collect();
        for n in [
            "ours-dontcache-d0-uring",
            "ours-none-uring-pollfixed",
            "ours-writeback-uring-nopoll",
            "ours-dontcache-uring",
        ] {
            assert!(defaults.iter().any(|d| d == n), "{n} not a default");
        }
        assert!(!defaults.iter().any(|d| d == "ours-dontcache-sync"));
        assert!(!defaults.iter().any(|d| d == "ours-none-uring-polldev"));
        assert!(!defaults.iter().any(|d| d == "ours-none-uring-fixedbuf"));
    }

    #[test]
    fn our_command_line() {
        let a = args(
            &peer("ours-dontcache-d0-uring"),
            Some(Path::new("/w/p.ctl")),
        );
        let joined = a.join(" ");
        assert!(
            joined.contains("--cache dontcache --io-engine io-uring"),
            "{joined}"
        );
        assert!(joined.contains("--control /w/p.ctl"), "{joined}");
        assert!(joined.ends_with("--defer-delay-us 0"), "{joined}");
        let poll = args(&peer("ours-writeback-uring-pollfixed"), None).join(" ");
        assert!(
            poll.contains("--cache writeback --io-engine io-uring"),
            "{poll}"
        );
        assert!(
            poll.ends_with("--poll-us 50 --poll-fixed") && !poll.contains("--control"),
            "{poll}"
        );
        let null = args(&peer("ours-null"), None).join(" ");
        assert!(null.contains("--blk-file null:1073741824") && !null.contains("--cache"));
        // Other peers get no control socket even if one is passed.
        let qsd = args(&peer("qsd-direct-uring"), Some(Path::new("/w/p.ctl"))).join(" ");
        assert!(!qsd.contains("--control"), "{qsd}");
    }

    #[test]
    fn rbd_peers_share_one_image() {
        let ours = args(&peer("ours-rbd"), Some(Path::new("/w/p.ctl"))).join(" ");
        assert!(
            ours.contains("--blk-file rbd:rbd/bench:conf=/c/ceph.conf --cache none"),
            "{ours}"
        );
        assert!(ours.contains("--control /w/p.ctl") && !ours.contains("--io-engine"));
        let wb = args(&peer("ours-rbd-writeback"), None).join(" ");
        assert!(wb.contains("--cache writeback"), "{wb}");
        let qsd = args(&peer("qsd-rbd"), None).join(" ");
        assert!(
            qsd.contains(
                "driver=rbd,node-name=f,pool=rbd,image=bench,conf=/c/ceph.conf,cache.direct=on"
            ),
            "{qsd}"
        );
        assert!(qsd.contains("num-queues=2"), "{qsd}");
        for p in Peer::rbd() {
            assert!(p.is_rbd() && !p.uses_image(), "{}", p.name);
        }
        assert!(peer("ours-rbd").is_ours() && !peer("qsd-rbd").is_ours());
        // Not in the default (file) set: they need a cluster.
        assert!(!Peer::defaults(true).iter().any(Peer::is_rbd));
    }
}
