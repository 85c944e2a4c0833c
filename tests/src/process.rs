//! Child processes with their output in files, killed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{Context, Result};

/// A child process whose stdout/stderr go to `<dir>/<name>.stdout|.stderr`.
pub(crate) struct Proc {
    name: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// Spawns `command` with output redirected into `dir` (files are appended to, so a
    /// restarted process keeps the earlier log).
    pub(crate) fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Proc> {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let open = |path: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))
        };
        command
            .stdin(Stdio::null())
            .stdout(open(&stdout)?)
            .stderr(open(&stderr)?);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            stderr,
        })
    }

    /// The OS process id, while running.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten(),
            None => None,
        }
    }

    /// Kills (SIGKILL) and reaps the process; idempotent.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stdout followed by stderr, at most the last `max_lines` lines of each.
    pub(crate) fn log_tail(&self, max_lines: usize) -> String {
        let mut out = String::new();
        for (label, path) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.trim().is_empty() {
                continue;
            }
            let lines: Vec<&str> = text.lines().filter(|line| !is_noise(line)).collect();
            let skip = lines.len().saturating_sub(max_lines);
            out.push_str(&format!(
                "----- {} {label} ({}) -----\n",
                self.name,
                path.display()
            ));
            if skip > 0 {
                out.push_str(&format!("[... {skip} earlier lines ...]\n"));
            }
            for line in &lines[skip..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Path of the stderr log.
    pub(crate) fn stderr_path(&self) -> &Path {
        &self.stderr
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Envoy's start-up listing of compiled-in extensions (indented lines of the `main`
/// logger): a hundred lines that never explain a failure.
fn is_noise(line: &str) -> bool {
    line.contains("][info][main] [source/server/server.cc:")
        && line
            .rsplit("] ")
            .next()
            .is_some_and(|m| m.starts_with("  "))
}

/// Whether logs should be printed even though no test failed (`ARBITER_E2E_LOGS=1`).
pub(crate) fn always_print_logs() -> bool {
    std::env::var_os("ARBITER_E2E_LOGS").is_some_and(|v| !v.is_empty() && v != "0")
}
