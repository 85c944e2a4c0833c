//! Container images without a container engine: a local OCI registry (Debian's
//! `docker-registry`, started on a free loopback port with its storage in a temp dir) and
//! processes run from an unpacked image rootfs the way a runtime would (chroot, as the
//! image's user, with only the image's environment).

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::process::{always_print_logs, Proc};
use crate::util::{eventually, free_port, loopback, RunDir};

/// How long the registry may take to answer `GET /v2/`.
const REGISTRY_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A Docker distribution registry on `127.0.0.1` (plain HTTP, no auth), killed on drop.
pub struct Registry {
    proc: Proc,
    addr: SocketAddr,
    dir: RunDir,
}

impl Registry {
    /// Starts `docker-registry serve` with a generated config on a free port and waits until
    /// `GET /v2/` answers 200.
    pub async fn start() -> Result<Registry> {
        let mut attempt = 1;
        loop {
            match Self::start_on(loopback(free_port()?)).await {
                // A test running beside this one may take the port between pick and bind.
                Err(e) if attempt < 5 && format!("{e:#}").contains("address already in use") => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_on(addr: SocketAddr) -> Result<Registry> {
        let dir = RunDir::new("arbiter-registry-", None)?;
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n",
                storage.display()
            ),
        )?;
        let mut command = Command::new("docker-registry");
        command.arg("serve").arg(&config);
        let mut proc = Proc::spawn("registry", command, dir.path())
            .context("starting docker-registry (make image-tools installs it)")?;
        let url = format!("http://{addr}/v2/");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let ready = eventually(
            REGISTRY_READY_TIMEOUT,
            &format!("registry at {url}"),
            || {
                let exited = proc.exited();
                let request = http.get(&url).send();
                async move {
                    if let Some(status) = exited {
                        return Some(Err(anyhow!("registry exited during startup ({status})")));
                    }
                    match request.await {
                        Ok(response) if response.status() == 200 => Some(Ok(())),
                        _ => None,
                    }
                }
            },
        )
        .await
        .and_then(|ready| ready);
        if let Err(err) = ready {
            return Err(anyhow!("{err:#}\n{}", proc.log_tail(40)));
        }
        Ok(Registry { proc, addr, dir })
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() || always_print_logs() {
            let log = self.proc.log_tail(100);
            let kept = self.dir.keep();
            eprintln!(
                "----- registry (files kept in {}) -----\n{log}",
                kept.display()
            );
        }
    }
}

/// What an image's config says about running it (the `config` object of an OCI image
/// config).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// `User`, as `uid:gid` (numeric, or the runtime could not check "non-root").
    pub user: String,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Env`, `NAME=value` each.
    pub env: Vec<String>,
}

impl RunConfig {
    /// Reads the `config` object of an OCI image config.
    pub fn from_image_config(config: &serde_json::Value) -> Result<RunConfig> {
        let run = &config["config"];
        let strings = |key: &str| -> Result<Vec<String>> {
            run[key]
                .as_array()
                .with_context(|| format!("image config has no {key} list"))?
                .iter()
                .map(|v| v.as_str().map(str::to_owned).context("not a string"))
                .collect()
        };
        Ok(RunConfig {
            user: run["User"]
                .as_str()
                .context("image config has no User")?
                .to_owned(),
            entrypoint: strings("Entrypoint")?,
            env: strings("Env")?,
        })
    }

    /// A command running the entrypoint with `args` inside `rootfs` as a runtime would:
    /// chrooted, as `User`, with the image's `Env` and nothing else. Needs root
    /// (CAP_SYS_CHROOT), as `make test` has. The working directory is the rootfs' `/`
    /// (chroot(8) changes to it), so paths given to the program must be absolute.
    pub fn command<I, S>(&self, rootfs: &Path, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (program, entry_args) = self
            .entrypoint
            .split_first()
            .context("image has an empty Entrypoint")?;
        let mut all: Vec<OsString> = entry_args.iter().map(OsString::from).collect();
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.command_for(rootfs, program, all)
    }

    /// Like [`RunConfig::command`] with another program of the image (an absolute path
    /// inside `rootfs`).
    pub fn command_for<I, S>(&self, rootfs: &Path, program: &str, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if !program.starts_with('/') {
            bail!("{program} is not an absolute path in the image");
        }
        // Found on this process' PATH: the child's PATH is the image's.
        let mut command = Command::new(on_path("chroot")?);
        command
            .arg(format!("--userspec={}", self.user))
            .arg(rootfs)
            .arg(program)
            .args(args)
            .env_clear();
        for entry in &self.env {
            let (key, value) = entry
                .split_once('=')
                .with_context(|| format!("image Env entry `{entry}` has no `=`"))?;
            command.env(key, value);
        }
        Ok(command)
    }
}

/// Creates the character devices every OCI runtime puts in a container's `/dev`
/// (runtime-spec "Default Devices": null, zero, full, random, urandom) in `rootfs`, as a
/// runtime would before starting the image. The static server needs `/dev/urandom`: its
/// random numbers come from there, because `getrandom` finds glibc's getrandom(2) wrapper
/// through dlsym, which a static binary does not have. Needs root (mknod).
pub fn add_default_devices(rootfs: &Path) -> Result<()> {
    let dev = rootfs.join("dev");
    std::fs::create_dir_all(&dev)?;
    for (name, minor) in [
        ("null", 3),
        ("zero", 5),
        ("full", 7),
        ("random", 8),
        ("urandom", 9),
    ] {
        let status = Command::new("mknod")
            .args(["-m", "0666"])
            .arg(dev.join(name))
            .args(["c", "1", &minor.to_string()])
            .status()
            .context("running mknod")?;
        if !status.success() {
            bail!("mknod {name} failed ({status})");
        }
    }
    Ok(())
}

/// The full path of `program` on this process' PATH.
fn on_path(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .with_context(|| format!("{program} not found on PATH"))
}

/// A long-running process started from an image rootfs; killed on drop, its output kept
/// in a temp dir and printed if the test fails.
pub struct Contained {
    proc: Proc,
    dir: RunDir,
}

impl Contained {
    /// Spawns `command` (from [`RunConfig::command`]) with its output in files.
    pub fn spawn(name: &str, command: Command) -> Result<Contained> {
        let dir = RunDir::new("arbiter-contained-", None)?;
        let proc = Proc::spawn(name, command, dir.path())?;
        Ok(Contained { proc, dir })
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let what = "the contained process to exit";
        eventually(timeout, what, || {
            let exited = self.proc.exited();
            async move { exited }
        })
        .await
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// The last `max_lines` lines of its stdout and stderr.
    pub fn log_tail(&self, max_lines: usize) -> String {
        self.proc.log_tail(max_lines)
    }

    /// Where its output files are.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() || always_print_logs() {
            let log = self.proc.log_tail(100);
            let kept = self.dir.keep();
            eprintln!(
                "----- contained process (files kept in {}) -----\n{log}",
                kept.display()
            );
        }
    }
}
