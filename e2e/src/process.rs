//! Child processes that are always cleaned up: each runs in its own process group, its output
//! goes to a log file, and dropping the handle kills the whole group (SIGKILL) and reaps it.
//! Because tests own their `Cluster` (which owns these handles) as a local value, the processes
//! are stopped also when a test panics.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running child process, killed with its whole process group on drop.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ManagedProcess {
    /// Spawns `cmd` in a new process group with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started process");
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails with the tail of the log if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.exited() {
            anyhow::bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// Sends SIGTERM to the process group, waits up to `grace`, then SIGKILLs it.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_none() {
            // Not reaped yet (try_wait just said so), so the pid is still ours.
            kill_group(self.child.id(), libc::SIGTERM);
            let deadline = std::time::Instant::now() + grace;
            while std::time::Instant::now() < deadline && self.exited().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }

    /// SIGKILLs the process group and reaps the process.
    pub fn kill(&mut self) {
        // Once reaped, the pid may belong to someone else: signal the group only before.
        if self.child.try_wait().ok().flatten().is_none() {
            kill_group(self.child.id(), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes the child get SIGKILL when the thread that spawned it exits (Linux
/// `PR_SET_PDEATHSIG`): a backstop for when the test process itself is killed (CI timeout,
/// SIGKILL) and `Drop` never runs. Tokio worker threads and the test thread live as long as
/// the cluster, so this does not fire early in the ways the harness spawns processes.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // prctl(2)/getppid(2).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may already have died between fork and prctl.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Sends `sig` to the process group led by `pid` (processes spawned with `process_group(0)`).
pub fn kill_group(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Sends `sig` to one process.
pub fn kill_pid(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) on one pid; no memory is touched.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The last `n` lines of a log file (best effort).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A free TCP port on 127.0.0.1, chosen by the kernel. (The port is released before it is
/// returned, so a concurrent process could take it; callers retry start-up on failure.)
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `ok` every 200 ms until it returns true, failing early with the log tail if one of
/// `procs` exits, or after `timeout`.
pub(crate) async fn wait_until<F, Fut>(
    procs: &mut [ManagedProcess],
    timeout: Duration,
    what: &str,
    mut ok: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        for p in procs.iter_mut() {
            p.ensure_running()
                .with_context(|| format!("while waiting for {what}"))?;
        }
        if ok().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tails: Vec<String> = procs
                .iter()
                .map(|p| format!("---- {} ----\n{}", p.name(), log_tail(p.log_path(), 20)))
                .collect();
            bail!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                tails.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
