//! One complete data path per test: the real policy server behind a [`FaultProxy`], two
//! [`MockLlm`] providers (primary and backup) and Envoy with the wasm filter, every port
//! picked at run time.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::envoy::{template_path, Envoy, EnvoyOptions};
use crate::fault::FaultProxy;
use crate::mock_llm::MockLlm;
use crate::process::{always_print_logs, Proc};
use crate::util::{eventually, free_port, loopback, target_dir, workspace_root, RunDir};

/// The template used when the builder is not given one.
pub const E2E_TEMPLATE: &str = "tests/envoy/e2e.yaml.tmpl";
/// The demo template (`make run`); also usable with [`StackBuilder::template`].
pub const DEMO_TEMPLATE: &str = "envoy/arbiter.yaml.tmpl";
/// The template without the wasm filter.
pub const PASSTHROUGH_TEMPLATE: &str = "tests/envoy/passthrough.yaml.tmpl";
/// The passthrough template plus Envoy's native `envoy.filters.http.ext_authz` (gRPC) calling
/// the policy server at `POLICY_PORT`: the benchmark's peer baseline.
pub const EXT_AUTHZ_TEMPLATE: &str = "tests/envoy/ext_authz.yaml.tmpl";
/// The policy bundle used when the builder is not given one.
pub const DEFAULT_POLICIES: &str = "examples/ai-gateway/policies";
/// The plugin configuration rendered into `PLUGIN_CONFIG_JSON` by default.
pub const DEFAULT_PLUGIN_CONFIG: &str = r#"{"policy_cluster":"arbiter_policy","timeout_ms":200}"#;

/// How long the policy server may take to accept connections.
const POLICY_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The wasm filter artifact (`ARBITER_WASM_PATH`, else
/// `target/wasm32-wasip1/wasm-release/arbiter_filter.wasm`), or an error telling how to
/// build it.
pub fn wasm_path() -> Result<PathBuf> {
    let path = match std::env::var_os("ARBITER_WASM_PATH") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("wasm32-wasip1/wasm-release/arbiter_filter.wasm"),
    };
    if !path.is_file() {
        bail!(
            "wasm filter not found at {}: run `make wasm` first",
            path.display()
        );
    }
    Ok(path)
}

/// The policy server binary (`ARBITER_POLICY_SERVER_BIN` or `target/debug/…`), or an error
/// telling how to build it.
pub fn policy_server_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("ARBITER_POLICY_SERVER_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("debug/arbiter-policy-server"),
    };
    if !path.is_file() {
        bail!(
            "policy server not found at {}: run `cargo build -p arbiter-policy-server` first",
            path.display()
        );
    }
    Ok(path)
}

/// The `arbiter` CLI binary (`ARBITER_CLI_BIN` or `target/debug/arbiter`), or an error
/// telling how to build it.
pub fn arbiter_cli_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("ARBITER_CLI_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("debug/arbiter"),
    };
    if !path.is_file() {
        bail!(
            "arbiter CLI not found at {}: run `cargo build -p arbiter-policy-server` first",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the `arbiter` CLI with `args`; returns its exit code and stdout + stderr.
pub fn arbiter_cli<I, S>(args: I) -> Result<(i32, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = Command::new(arbiter_cli_bin()?)
        .args(args)
        .output()
        .context("running the arbiter CLI")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.code().unwrap_or(-1), text))
}

/// The real `arbiter-policy-server` as a subprocess; killed on drop, log printed if the test
/// is failing.
pub struct PolicyServer {
    proc: Option<Proc>,
    bin: PathBuf,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    audit_log: Option<PathBuf>,
    /// `--policies`; `None`: the bundle comes from the extra arguments (`--bundle-url`).
    policies: Option<PathBuf>,
    extra_args: Vec<String>,
    dir: RunDir,
}

impl PolicyServer {
    /// Starts the server on a free loopback port with `--listen`, `--policies policies`,
    /// `--audit-log <dir>/audit.jsonl` and `--metrics-listen <free port>` (the last two only
    /// if the binary's `--help` lists them) plus `extra_args`; waits until it accepts
    /// connections. `ARBITER_*` variables of the caller's environment are not passed on.
    pub async fn start(policies: impl AsRef<Path>, extra_args: &[String]) -> Result<PolicyServer> {
        // The port is free when picked but nothing holds it until the server binds it: a
        // test running beside this one may take it first. Pick another then.
        let mut attempt = 1;
        loop {
            match Self::start_on(loopback(free_port()?), policies.as_ref(), extra_args).await {
                Err(e) if attempt < 5 && format!("{e:#}").contains("Address already in use") => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Starts the server on a free loopback port like [`PolicyServer::start`] but without
    /// `--policies`: the bundle comes from `extra_args` (`--bundle-url …`, pulled from a
    /// registry or an HTTPS server).
    pub async fn start_remote(extra_args: &[String]) -> Result<PolicyServer> {
        let mut attempt = 1;
        loop {
            let addr = loopback(free_port()?);
            match Self::launch(addr, None, extra_args, None, true).await {
                Err(e) if attempt < 5 && format!("{e:#}").contains("Address already in use") => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Starts the server on `addr`.
    pub async fn start_on(
        addr: SocketAddr,
        policies: impl AsRef<Path>,
        extra_args: &[String],
    ) -> Result<PolicyServer> {
        Self::start_in(addr, policies, extra_args, None).await
    }

    /// Starts the server on `addr`, keeping its log and audit log in `dir` (default: a temp
    /// dir, removed unless the test fails).
    pub async fn start_in(
        addr: SocketAddr,
        policies: impl AsRef<Path>,
        extra_args: &[String],
        dir: Option<&Path>,
    ) -> Result<PolicyServer> {
        Self::start_with_audit(addr, policies, extra_args, dir, true).await
    }

    /// Like [`PolicyServer::start_in`]; with `audit_log` false the harness does not pass
    /// `--audit-log` even when the server has it (benchmarks measure "audit off" this way;
    /// a server that requires the flag then fails to start).
    pub async fn start_with_audit(
        addr: SocketAddr,
        policies: impl AsRef<Path>,
        extra_args: &[String],
        dir: Option<&Path>,
        audit_log: bool,
    ) -> Result<PolicyServer> {
        let policies = template_path(policies);
        if !policies.is_dir() {
            bail!("policy bundle {} does not exist", policies.display());
        }
        Self::launch(addr, Some(policies), extra_args, dir, audit_log).await
    }

    async fn launch(
        addr: SocketAddr,
        policies: Option<PathBuf>,
        extra_args: &[String],
        dir: Option<&Path>,
        audit_log: bool,
    ) -> Result<PolicyServer> {
        let bin = policy_server_bin()?;
        let dir = RunDir::new("arbiter-policy-", dir)?;
        // DESIGN §5 flags the server may not implement yet: pass them only when `--help`
        // lists them, so the harness works at every stage of the server.
        let help = Command::new(&bin)
            .arg("--help")
            .output()
            .context("running policy server --help")?;
        let help = String::from_utf8_lossy(&help.stdout);
        let audit_log =
            (audit_log && help.contains("--audit-log")).then(|| dir.path().join("audit.jsonl"));
        let metrics_addr = if help.contains("--metrics-listen") {
            Some(loopback(free_port()?))
        } else {
            None
        };
        let mut server = PolicyServer {
            proc: None,
            bin,
            addr,
            metrics_addr,
            audit_log,
            policies,
            extra_args: extra_args.to_vec(),
            dir,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut command = Command::new(&self.bin);
        command.arg("--listen").arg(self.addr.to_string());
        if let Some(policies) = &self.policies {
            command.arg("--policies").arg(policies);
        }
        if let Some(audit_log) = &self.audit_log {
            command.arg("--audit-log").arg(audit_log);
        }
        if let Some(metrics) = self.metrics_addr {
            command.arg("--metrics-listen").arg(metrics.to_string());
        }
        command.args(&self.extra_args);
        // Flags come from the test, never from the developer's shell.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ARBITER_") {
                command.env_remove(key);
            }
        }
        let mut proc = Proc::spawn("policy-server", command, self.dir.path())?;
        let addr = self.addr;
        let ready = eventually(
            POLICY_READY_TIMEOUT,
            &format!("policy server to listen on {addr}"),
            || {
                let exited = proc.exited();
                async move {
                    if let Some(status) = exited {
                        return Some(Err(anyhow!(
                            "policy server exited during startup ({status})"
                        )));
                    }
                    StdTcpStream::connect_timeout(&addr, Duration::from_millis(100))
                        .ok()
                        .map(|_| Ok(()))
                }
            },
        )
        .await
        .and_then(|ready| ready);
        if let Err(err) = ready {
            let log = proc.log_tail(60);
            return Err(anyhow!("{err:#}\n{log}"));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address given to `--metrics-listen` (`None` if the server has no such flag).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The OS process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// Kills the server (SIGKILL, like a crash); its port is then closed.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Stops the server if running and starts it again on the same port and bundle.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().await
    }

    /// Path given to `--audit-log` (`None` if the server has no such flag).
    pub fn audit_log_path(&self) -> Option<&Path> {
        self.audit_log.as_deref()
    }

    /// The audit log so far, one JSON value per line (empty before the first event).
    pub fn audit_log(&self) -> Result<Vec<Value>> {
        let path = self
            .audit_log
            .as_deref()
            .context("the policy server has no --audit-log flag")?;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .with_context(|| format!("audit line is not JSON: {line}"))
            })
            .collect()
    }

    /// Every file of the audit log: the active one and those rotated or set aside beside it
    /// (`<audit log>.*`, the OTLP position file excepted), oldest name first.
    pub fn audit_files(&self) -> Result<Vec<PathBuf>> {
        let path = self
            .audit_log
            .as_deref()
            .context("the policy server has no --audit-log flag")?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("audit log path has no file name")?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(self.dir.path())? {
            let entry = entry?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if file == name
                || (file.starts_with(&format!("{name}.")) && !file.contains("otlp-position"))
            {
                files.push(entry.path());
            }
        }
        files.sort();
        Ok(files)
    }

    /// Every record in every audit file, ordered by `seq`.
    pub fn audit_records(&self) -> Result<Vec<Value>> {
        let mut records = Vec::new();
        for file in self.audit_files()? {
            let text = std::fs::read_to_string(&file)?;
            // Only complete lines: a torn last line (crash inside a write) is no record.
            let complete = text.rfind('\n').map_or("", |i| &text[..i]);
            for line in complete.lines().filter(|l| !l.trim().is_empty()) {
                records.push(
                    serde_json::from_str::<Value>(line)
                        .with_context(|| format!("audit line is not JSON: {line}"))?,
                );
            }
        }
        records.sort_by_key(|r| r["seq"].as_u64());
        Ok(records)
    }

    /// `arbiter audit verify` over [`Self::audit_files`]: exit code and output.
    pub fn verify_audit(&self) -> Result<(i32, String)> {
        let files = self.audit_files()?;
        arbiter_cli(
            ["audit", "verify"]
                .iter()
                .map(std::ffi::OsStr::new)
                .chain(files.iter().map(|f| f.as_os_str())),
        )
    }

    /// The server's log once the decision line of every record in the audit log is in it.
    /// The server's log thread writes decision lines shortly after the answer leaves, so a
    /// test that reads them polls (generously: a loaded machine may delay that thread).
    pub async fn decisions_logged(&self) -> Result<String> {
        eventually(
            Duration::from_secs(30),
            "the decision line of every audit record in the policy server log",
            || async {
                let log = self.log();
                let records = self.audit_records().ok()?;
                records
                    .iter()
                    .filter_map(|record| record["id"].as_str())
                    .all(|id| log.contains(id))
                    .then_some(log)
            },
        )
        .await
        .with_context(|| self.log())
    }

    /// The server's log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "{}{}",
            read("policy-server.stdout"),
            read("policy-server.stderr")
        )
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() || always_print_logs() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            let kept = self.dir.keep();
            eprintln!(
                "----- policy server log (files kept in {}) -----\n{}",
                kept.display(),
                tail.join("\n")
            );
        }
    }
}

/// Builder for [`Stack`].
#[derive(Debug, Clone)]
pub struct StackBuilder {
    template: PathBuf,
    policies: PathBuf,
    policy_server: bool,
    policy_args: Vec<String>,
    vars: HashMap<String, String>,
    plugin_config: String,
    policy_target: Option<SocketAddr>,
    second_policy_server: bool,
    envoy: EnvoyOptions,
    edits: Vec<(String, String)>,
}

impl Default for StackBuilder {
    fn default() -> Self {
        Self {
            template: PathBuf::from(E2E_TEMPLATE),
            policies: PathBuf::from(DEFAULT_POLICIES),
            policy_server: true,
            policy_args: Vec::new(),
            vars: HashMap::new(),
            plugin_config: DEFAULT_PLUGIN_CONFIG.to_owned(),
            policy_target: None,
            second_policy_server: false,
            envoy: EnvoyOptions::default(),
            edits: Vec::new(),
        }
    }
}

impl StackBuilder {
    /// Envoy template, absolute or relative to the workspace root (default [`E2E_TEMPLATE`]).
    pub fn template(mut self, path: impl Into<PathBuf>) -> Self {
        self.template = path.into();
        self
    }

    /// Policy bundle directory, absolute or relative to the workspace root.
    pub fn policies(mut self, dir: impl Into<PathBuf>) -> Self {
        self.policies = dir.into();
        self
    }

    /// Whether to start the policy server (default yes). Without it the fault proxy points
    /// at a closed port, so every policy call fails as `unreachable`.
    pub fn policy_server(mut self, start: bool) -> Self {
        self.policy_server = start;
        self
    }

    /// Point the fault proxy at `addr` (e.g. a [`crate::GrpcMisbehaving`]) instead of
    /// starting the policy server.
    pub fn policy_target(mut self, addr: SocketAddr) -> Self {
        self.policy_target = Some(addr);
        self.policy_server = false;
        self
    }

    /// Start a second policy server (same bundle and arguments, its own audit log) as one
    /// more endpoint of the `arbiter_policy` cluster, reached directly rather than through
    /// the fault proxy: two instances behind Envoy's health checks and load balancing. Needs
    /// a template with `POLICY_EXTRA_ENDPOINT` ([`E2E_TEMPLATE`]).
    pub fn second_policy_server(mut self) -> Self {
        self.second_policy_server = true;
        self
    }

    /// Extra policy server arguments (e.g. `--audit-sync write`).
    pub fn policy_arg(mut self, arg: impl Into<String>) -> Self {
        self.policy_args.push(arg.into());
        self
    }

    /// Sets a template variable (overrides the stack's own values and defaults).
    pub fn var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// The plugin configuration JSON (rendered inside a single-quoted YAML string).
    pub fn plugin_config(mut self, json: impl Into<String>) -> Self {
        self.plugin_config = json.into();
        self
    }

    /// Envoy `--concurrency` (default 2).
    pub fn concurrency(mut self, workers: u32) -> Self {
        self.envoy.concurrency = workers;
        self
    }

    /// Envoy `--log-level` (default `info`).
    pub fn envoy_log_level(mut self, level: impl Into<String>) -> Self {
        self.envoy.log_level = level.into();
        self
    }

    /// Replaces `from` (which must occur exactly once) with `to` in the template text before
    /// rendering: a deployment that differs from the shipped config in one setting, without
    /// a copy of the template.
    pub fn edit_template(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.edits.push((from.into(), to.into()));
        self
    }

    /// Starts everything; on error nothing is left running.
    pub async fn start(self) -> Result<Stack> {
        let template = template_path(&self.template);
        let mut text = std::fs::read_to_string(&template)
            .with_context(|| format!("reading {}", template.display()))?;
        for (from, to) in &self.edits {
            let found = text.matches(from.as_str()).count();
            if found != 1 {
                bail!(
                    "template edit: `{from}` occurs {found} times in {}, expected once",
                    template.display()
                );
            }
            text = text.replace(from.as_str(), to);
        }
        // The edited template lives beside the rendered config until Envoy has read it.
        let edited = if self.edits.is_empty() {
            None
        } else {
            let file = tempfile::Builder::new()
                .prefix("arbiter-template-")
                .suffix(".yaml.tmpl")
                .tempfile()?;
            std::fs::write(file.path(), &text)?;
            Some(file)
        };
        let template = edited
            .as_ref()
            .map_or_else(|| template.clone(), |f| f.path().to_owned());

        let policy = if self.policy_server {
            Some(PolicyServer::start(&self.policies, &self.policy_args).await?)
        } else {
            None
        };
        // Without a server, forward to a port nobody listens on.
        let target = match (&policy, self.policy_target) {
            (Some(server), _) => server.addr(),
            (None, Some(target)) => target,
            (None, None) => loopback(free_port()?),
        };
        let second_policy = if self.second_policy_server {
            if !text.contains("{{POLICY_EXTRA_ENDPOINT}}") {
                bail!(
                    "{} has no POLICY_EXTRA_ENDPOINT for a second policy server",
                    template.display()
                );
            }
            Some(PolicyServer::start(&self.policies, &self.policy_args).await?)
        } else {
            None
        };
        let fault = FaultProxy::start(target).await?;
        let primary = MockLlm::start("primary").await?;
        let backup = MockLlm::start("backup").await?;

        let mut vars = default_vars(&text)?;
        vars.insert("POLICY_PORT".into(), fault.port().to_string());
        vars.insert("PRIMARY_PORT".into(), primary.port().to_string());
        vars.insert("BACKUP_PORT".into(), backup.port().to_string());
        if let Some(second) = &second_policy {
            vars.insert(
                "POLICY_EXTRA_ENDPOINT".into(),
                format!(
                    "- endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}",
                    second.addr().ip(),
                    second.addr().port()
                ),
            );
        }
        vars.insert(
            "PLUGIN_CONFIG_JSON".into(),
            yaml_single_quoted(&self.plugin_config),
        );
        vars.extend(self.vars);

        let envoy = Envoy::start_with(&template, &vars, self.envoy).await?;
        let http = client()?;
        Ok(Stack {
            envoy,
            primary,
            backup,
            fault,
            policy,
            second_policy,
            http,
        })
    }
}

/// Defaults for the variables a template uses besides ports and `ACCESS_LOG`: `WASM_PATH`
/// (only if `template` uses it; errors with "run `make wasm` first" when not built),
/// `PLUGIN_CONFIG_JSON`, `TIMEOUT_MS` (200), `POLICY_HC_INTERVAL` (60s),
/// `POLICY_EXTRA_ENDPOINT` (empty: one policy server) and `OVERRIDE_ACTIVE` /
/// `OVERRIDE_EXPIRED` / `OVERRIDE_TOO_FAR` (now+1h, now-1h, now+48h, RFC 3339). `template` is
/// the template text.
pub fn default_vars(template: &str) -> Result<HashMap<String, String>> {
    let mut vars = HashMap::new();
    vars.insert(
        "PLUGIN_CONFIG_JSON".into(),
        yaml_single_quoted(DEFAULT_PLUGIN_CONFIG),
    );
    if template.contains("{{WASM_PATH}}") {
        vars.insert("WASM_PATH".into(), wasm_path()?.display().to_string());
    }
    let now = OffsetDateTime::now_utc();
    let at = |offset: time::Duration| -> Result<String> { Ok((now + offset).format(&Rfc3339)?) };
    vars.insert("TIMEOUT_MS".into(), "200".into());
    // Health checks of the policy cluster go through the fault proxy too; a long interval
    // keeps them out of byte and connection counts (tests that need them set it lower).
    vars.insert("POLICY_HC_INTERVAL".into(), "60s".into());
    vars.insert("POLICY_EXTRA_ENDPOINT".into(), String::new());
    vars.insert("OVERRIDE_ACTIVE".into(), at(time::Duration::hours(1))?);
    vars.insert("OVERRIDE_EXPIRED".into(), at(time::Duration::hours(-1))?);
    vars.insert("OVERRIDE_TOO_FAR".into(), at(time::Duration::hours(48))?);
    Ok(vars)
}

/// Escapes text for use inside a single-quoted YAML scalar.
pub fn yaml_single_quoted(text: &str) -> String {
    text.replace('\'', "''")
}

/// An HTTP client for talking to Envoy (no proxy from the environment, 10 s timeout).
pub fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// A complete response, read to the end.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl Reply {
    /// Reads `response` to the end.
    pub async fn read(response: reqwest::Response) -> Result<Reply> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {}", self.text()))
    }

    /// The `x-mock-provider` header: which mock answered.
    pub fn provider(&self) -> Option<&str> {
        self.header(crate::mock_llm::PROVIDER_HEADER)
    }
}

/// A small OpenAI chat completion request body.
pub fn chat_body() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

/// Everything one end-to-end test needs; all of it stops when dropped.
pub struct Stack {
    /// Envoy (config, admin, stats, access log).
    pub envoy: Envoy,
    /// Provider at priority 0.
    pub primary: MockLlm,
    /// Provider at priority 1.
    pub backup: MockLlm,
    /// Between Envoy and the policy server (`POLICY_PORT` points here).
    pub fault: FaultProxy,
    /// The policy server, unless the builder turned it off.
    pub policy: Option<PolicyServer>,
    /// The second policy server ([`StackBuilder::second_policy_server`]), reached directly.
    pub second_policy: Option<PolicyServer>,
    http: reqwest::Client,
}

impl Stack {
    /// A builder with the defaults: e2e template, example policies, policy server on.
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }

    /// `http://127.0.0.1:<listener port><path>`.
    pub fn url(&self, path: &str) -> String {
        // The listener port is known once `start` returned; fall back to an obviously
        // wrong URL rather than panic.
        self.envoy
            .url(path)
            .unwrap_or_else(|_| format!("http://127.0.0.1:0{path}"))
    }

    /// The client used by the helpers (for requests they do not cover).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request builder for `method` on `path` at Envoy's listener.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Sends `request` and reads the whole response.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Reply> {
        Reply::read(request.send().await?).await
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Reply> {
        self.send(self.request(Method::GET, path)).await
    }

    /// POST `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Reply> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    /// POST `body` as JSON to `path` with extra headers.
    pub async fn post_json_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Result<Reply> {
        let mut request = self.request(Method::POST, path).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request).await
    }

    /// POST the standard [`chat_body`] to `path`.
    pub async fn chat(&self, path: &str) -> Result<Reply> {
        self.post_json(path, &chat_body()).await
    }

    /// The policy server, or an error if the stack was built without one.
    pub fn policy(&mut self) -> Result<&mut PolicyServer> {
        self.policy
            .as_mut()
            .context("this stack was started without a policy server")
    }

    /// Envoy's counters and gauges.
    pub async fn stats(&self) -> Result<HashMap<String, u64>> {
        self.envoy.stats().await
    }

    /// Requests received by both mocks together.
    pub fn upstream_requests(&self) -> usize {
        self.primary.requests().len() + self.backup.requests().len()
    }

    /// The workspace root.
    pub fn workspace(&self) -> PathBuf {
        workspace_root()
    }
}
