//! Small shared helpers: workspace paths, deadlines, poison-tolerant locks.

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The cargo workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo target directory: `CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Polls `check` until it yields `Some`, failing with `what` once `timeout` has passed.
///
/// The poll interval starts at 5 ms and grows to 50 ms, so fast things are seen fast and
/// slow things do not burn the CPU the system under test needs.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A process stopped with SIGSTOP (wedged: it keeps its sockets but answers nothing), sent
/// SIGCONT when dropped, so a failing test never leaves it stopped.
#[derive(Debug)]
pub struct Stopped(u32);

impl Stopped {
    /// Stops process `pid`, and returns once every one of its threads is stopped: the
    /// signal is only queued when `kill` returns, and on a loaded machine a thread can
    /// still answer a request before it acts on it.
    pub fn stop(pid: u32) -> Result<Stopped> {
        signal(pid, "STOP")?;
        let stopped = Stopped(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let states = thread_states(pid)?;
            if states.iter().all(|s| *s == 'T' || *s == 't') {
                return Ok(stopped);
            }
            if Instant::now() >= deadline {
                bail!("process {pid} not stopped 10 s after SIGSTOP: thread states {states:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Resumes it (what dropping does), reporting a failure to signal it.
    pub fn resume(self) -> Result<()> {
        let pid = self.0;
        std::mem::forget(self);
        signal(pid, "CONT")
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Err(e) = signal(self.0, "CONT") {
            eprintln!("cannot resume {}: {e:#}", self.0);
        }
    }
}

/// The scheduler state (`R`, `S`, `T`, ...) of each thread of process `pid`.
fn thread_states(pid: u32) -> Result<Vec<char>> {
    let dir = format!("/proc/{pid}/task");
    let mut states = Vec::new();
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path().join("stat");
        // A thread that ended in between has no state to wait for.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        // `pid (comm) state ...`: the command may hold spaces and parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .with_context(|| format!("unexpected {}: {stat}", path.display()))?;
        states.push(state);
    }
    Ok(states)
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{name} {pid} failed: {status}");
    Ok(())
}

/// Reserves a free loopback port for a process that must be told its port up front.
///
/// The port is free when this returns but nothing holds it; prefer binding `:0` yourself
/// whenever the listener lives in this process.
pub fn free_port() -> Result<u16> {
    let listener = StdTcpListener::bind("127.0.0.1:0").context("reserving a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Locks a mutex, ignoring poisoning: a panicking test must not cascade into every other
/// user of the harness state.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a process keeps its config and logs: a temp dir removed on drop, or a fixed
/// directory that is kept.
pub(crate) enum RunDir {
    /// Removed on drop unless kept.
    Temp(tempfile::TempDir),
    /// Kept.
    Fixed(PathBuf),
}

impl RunDir {
    /// A fresh temp dir named `<prefix>…`, or `fixed` (created if missing).
    pub(crate) fn new(prefix: &str, fixed: Option<&std::path::Path>) -> Result<RunDir> {
        match fixed {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Ok(RunDir::Fixed(dir.to_owned()))
            }
            None => Ok(RunDir::Temp(
                tempfile::Builder::new().prefix(prefix).tempdir()?,
            )),
        }
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        match self {
            RunDir::Temp(dir) => dir.path(),
            RunDir::Fixed(dir) => dir,
        }
    }

    /// Turns a temp dir into a kept one (for post-mortems); returns the path.
    pub(crate) fn keep(&mut self) -> PathBuf {
        if let RunDir::Temp(_) = self {
            let placeholder = RunDir::Fixed(PathBuf::new());
            if let RunDir::Temp(dir) = std::mem::replace(self, placeholder) {
                *self = RunDir::Fixed(dir.keep());
            }
        }
        self.path().to_owned()
    }
}
