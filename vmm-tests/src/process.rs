//! Child processes that die with their handle.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// A child process killed (`SIGKILL`) and reaped when dropped, so that a
/// failing test leaves no QEMU or backend behind.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd`; `name` is used in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd.spawn().ctx(|| format!("spawn {name} ({cmd:?})"))?;
        Ok(ChildGuard {
            child: Some(child),
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

    /// The exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ctx(|| format!("wait for {}", self.name)),
            None => Ok(None),
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

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self.id() as libc::pid_t;
        if pid <= 0 {
            return Ok(());
        }
        // SAFETY: kill(2) on our own child's pid; it is not reaped yet (we
        // hold the Child), so the pid cannot have been reused.
        if unsafe { libc::kill(pid, sig) } != 0 {
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

    /// `SIGKILL` and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => {
                // An already exited child makes kill fail; wait tells.
                let _ = c.kill();
                c.wait().ctx(|| format!("wait for {}", self.name))
            }
            None => Err(Error::Backend(format!("{} already reaped", self.name))),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
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
