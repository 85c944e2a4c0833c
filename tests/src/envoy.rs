//! Real Envoy for tests, after envoyproxy/ai-gateway's `dataplaneenv`: a config template
//! rendered into a temp dir, ports picked at run time, readiness polled on the admin
//! `/ready` with a deadline, logs kept in files and printed only when the test fails, the
//! process killed on drop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::process::{always_print_logs, Proc};
use crate::util::{eventually, workspace_root, RunDir};

/// How long Envoy may take from spawn to `/ready` answering `LIVE`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The Envoy binary: `ENVOY_BIN`, else `<workspace>/.venv/bin/envoy`.
pub fn envoy_bin() -> Result<PathBuf> {
    let bin = match std::env::var_os("ENVOY_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => workspace_root().join(".venv/bin/envoy"),
    };
    if !bin.is_file() {
        bail!(
            "Envoy binary not found at {} (set ENVOY_BIN, or run `make setup` first)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Replaces every `{{NAME}}` in `template` with `vars[NAME]`.
///
/// A placeholder without a value is an error (listing all of them), so a typo cannot reach
/// Envoy as a literal `{{...}}`. Unused variables are fine.
pub fn render(template: &str, vars: &HashMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut missing: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            bail!("unterminated `{{{{` in template");
        };
        let name = after[..end].trim();
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => {
                if !missing.iter().any(|m| m == name) {
                    missing.push(name.to_owned());
                }
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if !missing.is_empty() {
        bail!(
            "template placeholders without a value: {}",
            missing.join(", ")
        );
    }
    Ok(out)
}

/// Reads and renders a template file.
pub fn render_file(template: &Path, vars: &HashMap<String, String>) -> Result<String> {
    let text = std::fs::read_to_string(template)
        .with_context(|| format!("reading {}", template.display()))?;
    render(&text, vars).with_context(|| format!("rendering {}", template.display()))
}

/// Resolves a template path: absolute, or relative to the workspace root.
pub fn template_path(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    if path.is_absolute() {
        path.to_owned()
    } else {
        workspace_root().join(path)
    }
}

/// Renders `template` and runs `envoy --mode validate` on it. Unset `ADMIN_PORT`,
/// `LISTEN_PORT` and `ACCESS_LOG` get harmless defaults. The wasm module (if any) is loaded
/// and its `on_configure` runs, so a bad plugin configuration fails validation.
pub fn validate(template: impl AsRef<Path>, vars: &HashMap<String, String>) -> Result<Output> {
    let dir = tempfile::Builder::new()
        .prefix("arbiter-validate-")
        .tempdir()?;
    let mut vars = vars.clone();
    vars.entry("ADMIN_PORT".into())
        .or_insert_with(|| "0".into());
    vars.entry("LISTEN_PORT".into())
        .or_insert_with(|| "0".into());
    vars.entry("ACCESS_LOG".into())
        .or_insert_with(|| dir.path().join("access.log").display().to_string());
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, render_file(&template_path(template), &vars)?)?;
    let output = Command::new(envoy_bin()?)
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&config)
        .arg("--log-level")
        .arg("warn")
        .output()
        .context("running envoy --mode validate")?;
    Ok(output)
}

/// Knobs for [`Envoy::start_with`].
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Worker threads (`--concurrency`).
    pub concurrency: u32,
    /// `--log-level`.
    pub log_level: String,
    /// Extra command-line arguments.
    pub extra_args: Vec<String>,
    /// Directory for the rendered config and logs, kept afterwards (default: a temp dir,
    /// removed unless the test fails).
    pub dir: Option<PathBuf>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            log_level: "info".into(),
            extra_args: Vec::new(),
            dir: None,
        }
    }
}

/// A running Envoy; killed on drop, its log printed if the test is failing.
pub struct Envoy {
    proc: Proc,
    dir: RunDir,
    config: PathBuf,
    admin: String,
    listeners: HashMap<String, u16>,
    access_log: PathBuf,
    http: reqwest::Client,
}

impl Envoy {
    /// Renders `template` with `vars` and starts Envoy with default options.
    ///
    /// `ADMIN_PORT` and `LISTEN_PORT` default to `0` (Envoy binds, the harness reads the
    /// ports back from the admin API, so parallel tests never race for a port) and
    /// `ACCESS_LOG` to `<tempdir>/access.log`.
    pub async fn start(
        template: impl AsRef<Path>,
        vars: &HashMap<String, String>,
    ) -> Result<Envoy> {
        Self::start_with(template, vars, EnvoyOptions::default()).await
    }

    /// Like [`Envoy::start`] with explicit options.
    pub async fn start_with(
        template: impl AsRef<Path>,
        vars: &HashMap<String, String>,
        options: EnvoyOptions,
    ) -> Result<Envoy> {
        let bin = envoy_bin()?;
        let dir = RunDir::new("arbiter-envoy-", options.dir.as_deref())?;
        let dir_path = dir.path().to_owned();
        let mut vars = vars.clone();
        let access_log = PathBuf::from(
            vars.entry("ACCESS_LOG".into())
                .or_insert_with(|| dir_path.join("access.log").display().to_string())
                .clone(),
        );
        vars.entry("ADMIN_PORT".into())
            .or_insert_with(|| "0".into());
        vars.entry("LISTEN_PORT".into())
            .or_insert_with(|| "0".into());
        let config = dir_path.join("envoy.yaml");
        std::fs::write(&config, render_file(&template_path(template), &vars)?)?;
        let admin_path = dir_path.join("admin-address.txt");
        // A kept run dir may hold the address of an earlier Envoy.
        let _ = std::fs::remove_file(&admin_path);

        let mut command = Command::new(bin);
        command
            .arg("-c")
            .arg(&config)
            .arg("--base-id")
            .arg(unique_base_id().to_string())
            .arg("--concurrency")
            .arg(options.concurrency.to_string())
            .arg("--log-level")
            .arg(&options.log_level)
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_path)
            // The file access log is flushed every 10 s by default; tests read it right away.
            .arg("--file-flush-interval-msec")
            .arg("20")
            .args(&options.extra_args);
        let proc = Proc::spawn("envoy", command, &dir_path)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut envoy = Envoy {
            proc,
            dir,
            config,
            admin: String::new(),
            listeners: HashMap::new(),
            access_log,
            http,
        };
        envoy
            .wait_ready(&admin_path)
            .await
            .map_err(|e| anyhow!("{e:#}\n{}", envoy.proc.log_tail(60)))?;
        Ok(envoy)
    }

    async fn wait_ready(&mut self, admin_path: &Path) -> Result<()> {
        let proc = &mut self.proc;
        let http = &self.http;
        let admin = eventually(READY_TIMEOUT, "Envoy to write its admin address", || {
            let exited = proc.exited();
            async move {
                if let Some(status) = exited {
                    return Some(Err(anyhow!("Envoy exited during startup ({status})")));
                }
                let text = std::fs::read_to_string(admin_path).ok()?;
                let text = text.trim();
                (!text.is_empty()).then(|| Ok(text.to_owned()))
            }
        })
        .await??;
        self.admin = format!("http://{admin}");
        let ready_url = format!("{}/ready", self.admin);
        eventually(READY_TIMEOUT, "Envoy admin /ready to answer LIVE", || {
            let exited = proc.exited();
            let request = http.get(&ready_url).send();
            async move {
                if let Some(status) = exited {
                    return Some(Err(anyhow!("Envoy exited during startup ({status})")));
                }
                let response = request.await.ok()?;
                let live =
                    response.status().is_success() && response.text().await.ok()?.trim() == "LIVE";
                live.then_some(Ok(()))
            }
        })
        .await??;
        let listeners: Value = self.admin_get_json("/listeners?format=json").await?;
        for status in listeners["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = status["name"].as_str().unwrap_or_default().to_owned();
            if let Some(port) = status["local_address"]["socket_address"]["port_value"].as_u64() {
                self.listeners.insert(name, u16::try_from(port)?);
            }
        }
        Ok(())
    }

    /// Base URL of the admin interface, e.g. `http://127.0.0.1:40123`.
    pub fn admin_url(&self) -> &str {
        &self.admin
    }

    /// The bound port of listener `name`.
    pub fn listener_port(&self, name: &str) -> Result<u16> {
        self.listeners
            .get(name)
            .copied()
            .with_context(|| format!("Envoy has no listener named `{name}`"))
    }

    /// The bound port of the only (or first, by name) listener.
    pub fn port(&self) -> Result<u16> {
        let mut names: Vec<&String> = self.listeners.keys().collect();
        names.sort();
        let name = names.first().context("Envoy has no listeners")?;
        self.listener_port(name)
    }

    /// `http://127.0.0.1:<port><path>` on the first listener.
    pub fn url(&self, path: &str) -> Result<String> {
        Ok(format!("http://127.0.0.1:{}{path}", self.port()?))
    }

    /// The rendered config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The temp dir holding config, logs and access log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// GET an admin path, returning the body as text.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        let response = self
            .http
            .get(format!("{}{path}", self.admin))
            .send()
            .await?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            bail!("admin {path} answered {status}: {body}");
        }
        Ok(body)
    }

    /// POST an admin path (e.g. `/reset_counters`, `/logging?wasm=debug`).
    pub async fn admin_post(&self, path: &str) -> Result<String> {
        let response = self
            .http
            .post(format!("{}{path}", self.admin))
            .send()
            .await?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            bail!("admin {path} answered {status}: {body}");
        }
        Ok(body)
    }

    async fn admin_get_json(&self, path: &str) -> Result<Value> {
        Ok(serde_json::from_str(&self.admin_get(path).await?)?)
    }

    /// Every counter and gauge, by full name (histograms and text readouts left out).
    pub async fn stats(&self) -> Result<HashMap<String, u64>> {
        let stats = self.admin_get_json("/stats?format=json").await?;
        let mut out = HashMap::new();
        for stat in stats["stats"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (stat["name"].as_str(), stat["value"].as_u64()) {
                out.insert(name.to_owned(), value);
            }
        }
        Ok(out)
    }

    /// One counter or gauge; `0` when Envoy has not created it (yet).
    pub async fn stat(&self, name: &str) -> Result<u64> {
        Ok(self.stats().await?.get(name).copied().unwrap_or(0))
    }

    /// Counters and gauges whose name contains `needle`, sorted, for assertions and
    /// debugging (`stats_matching("arbiter")`).
    pub async fn stats_matching(&self, needle: &str) -> Result<Vec<(String, u64)>> {
        let mut matching: Vec<(String, u64)> = self
            .stats()
            .await?
            .into_iter()
            .filter(|(name, _)| name.contains(needle))
            .collect();
        matching.sort();
        Ok(matching)
    }

    /// The health flags of each host of `cluster`, by `ip:port`, from the admin `/clusters`
    /// (`healthy`, or flags such as `/failed_active_hc`, `/failed_outlier_check`).
    pub async fn host_health_flags(&self, cluster: &str) -> Result<HashMap<String, String>> {
        let text = self.admin_get("/clusters").await?;
        let prefix = format!("{cluster}::");
        let mut flags = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            if let Some((host, value)) = rest.split_once("::health_flags::") {
                flags.insert(host.to_owned(), value.trim().to_owned());
            }
        }
        Ok(flags)
    }

    /// Path of the JSON-lines access log.
    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    /// The access log so far, one JSON value per line (flushed every 20 ms).
    pub fn access_log(&self) -> Result<Vec<Value>> {
        let text = match std::fs::read_to_string(&self.access_log) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .with_context(|| format!("access log line is not JSON: {line}"))
            })
            .collect()
    }

    /// Waits until the access log has at least `n` lines and returns them all.
    pub async fn wait_access_log(&self, n: usize) -> Result<Vec<Value>> {
        eventually(
            Duration::from_secs(5),
            &format!("{n} access log lines"),
            || async { self.access_log().ok().filter(|lines| lines.len() >= n) },
        )
        .await
    }

    /// Envoy's own log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.proc.stderr_path()).unwrap_or_default()
    }

    /// The OS process id while running (benchmarks read its CPU time and memory).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.exited().is_none()
    }

    /// Prints the tail of Envoy's log to stderr (the test harness captures it).
    pub fn print_log(&self) {
        eprintln!("{}", self.proc.log_tail(400));
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() || always_print_logs() {
            self.print_log();
            // Keep config, logs and access log for the post-mortem.
            let kept = self.dir.keep();
            eprintln!("----- Envoy files kept in {} -----", kept.display());
        }
    }
}

/// A `--base-id` no other Envoy of this or a concurrent test process uses (the shared memory
/// and domain sockets of hot restart are keyed by it).
fn unique_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 1000;
    (std::process::id() % 4_000_000) * 1000 + n
}
