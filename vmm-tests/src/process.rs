//! Child processes that die with their handle.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// A child process killed (`SIGKILL`) and reaped when dropped, so that a
/// failing test leaves no QEMU or backend behind.
///
/// The child leads its own process group and every signal goes to the
/// group, so a wrapper script (`VHOST_USER_BLK_BIN=/path/to/wrapper`) and
/// whatever it started die together. The child also gets `SIGKILL` if the
/// thread that spawned it dies (`PR_SET_PDEATHSIG`): a test binary killed
/// by a timeout does not leave a backend or a QEMU running.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    /// Set once the child is reaped: from then on its pid (and group id)
    /// may belong to someone else, so nothing is signalled any more.
    status: Option<ExitStatus>,
    name: String,
}

/// Whether `pid`, our child, has exited, without reaping it (a zombie
/// keeps its pid, and so its process group id, from being reused).
fn exited_unreaped(pid: u32) -> bool {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with WNOWAIT only fills `info`.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is valid to read for the SIGCHLD-style info waitid fills.
    rc == 0 && unsafe { info.si_pid() } != 0
}

/// `SIGKILL` to the process group led by `pid`. The caller guarantees that
/// `pid` is an unreaped child of ours, so the group id cannot have been
/// reused. A group with no members left makes kill fail, which is fine.
fn kill_group(pid: u32) {
    if pid > 0 {
        // SAFETY: see above.
        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
    }
}

impl ChildGuard {
    /// Spawns `cmd`; `name` is used in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().ctx(|| format!("spawn {name} ({cmd:?})"))?;
        Ok(ChildGuard {
            child: Some(child),
            status: None,
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The underlying child (for its pipes).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Reaps the child, after killing what is left of its group.
    fn reap(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let c = self
            .child
            .as_mut()
            .ok_or_else(|| Error::Backend(format!("{} has no process", self.name)))?;
        kill_group(c.id());
        let s = c.wait().ctx(|| format!("wait for {}", self.name))?;
        self.status = Some(s);
        Ok(s)
    }

    /// The exit status if it has exited, without waiting. Whatever the
    /// child left in its process group is killed then.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        match self.child.as_ref() {
            Some(c) if exited_unreaped(c.id()) => self.reap().map(Some),
            _ => Ok(None),
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the process's group.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let pid = self.id() as libc::pid_t;
        if pid <= 0 {
            return Ok(());
        }
        // SAFETY: kill(2) of our child's process group; the child is not
        // reaped (`status` is None), so its pid, the group's id, cannot
        // have been reused.
        if unsafe { libc::kill(-pid, sig) } != 0 {
            return Err(Error::io(
                format!("kill -{sig} {} ({pid})", self.name),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// `SIGTERM`, then `SIGKILL` if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        self.kill()
    }

    /// `SIGKILL` to the group, and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.reap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.reap();
    }
}

/// Runs `cmd` to completion with its output captured; fails on a non-zero
/// exit with the tail of the output in the error.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().ctx(|| format!("run {desc}"))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let tail: String = {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        return Err(Error::Command {
            cmd: desc,
            status: out.status.to_string(),
            output: tail,
        });
    }
    Ok(out)
}

/// Waits until `path` exists and is a unix socket, while `alive()` holds.
pub fn wait_for_socket(
    path: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let start = Instant::now();
    loop {
        if let Ok(m) = std::fs::metadata(path) {
            if m.file_type().is_socket() {
                return Ok(());
            }
        }
        alive()?;
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: format!("socket {}", path.display()),
                timeout,
                log: None,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
