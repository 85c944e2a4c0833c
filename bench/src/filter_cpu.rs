//! `arbiter-bench filter-cpu`: Envoy CPU time per request through the wasm filter, for one
//! or more builds of the module side by side, by route kind.
//!
//! Throughput on a shared machine says more about the neighbours than about the filter;
//! CPU time per request barely moves with load. So each module gets its own Envoy (the e2e
//! template, one worker, pinned like `make bench`) behind one policy server, and every run
//! sends a fixed number of requests (closed loop, a few connections) to one route and reads
//! Envoy's `utime + stime` (`/proc/<pid>/stat`) before and after. The routes: `checked` (a
//! policy call on every request), `cached` (answered from the allow-cache after the first)
//! and `disabled` (the module loaded, nothing to do). Repeats rotate the order of modules so
//! a noisy neighbour hits them alike; the table gives the median and the spread.
//!
//! With `--perf <dir>` the first repeat of each run is recorded with `perf record -e
//! cpu-clock` on the Envoy process (`perf report --sort dso,sym` splits V8's JIT code from
//! Envoy's side of the host calls).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter_e2e::stack::{default_vars, DEFAULT_POLICIES, E2E_TEMPLATE};
use arbiter_e2e::util::workspace_root;
use arbiter_e2e::{Envoy, EnvoyOptions, MockLlm};
use bytes::Bytes;

use crate::http::HttpTarget;
use crate::load::Target;
use crate::procfs;
use crate::runner::{start_server, AuditMode, Plan};
use crate::CHAT_BODY;

/// A route of the e2e template and the counter that proves the filter handled it as meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RouteKind {
    /// `t_closed`: a policy call per request.
    Checked,
    /// `t_cached`: allow-cache hits (no policy call).
    Cached,
    /// `t_disabled`: the module runs, the route disables the check.
    Disabled,
}

impl RouteKind {
    fn path(self) -> &'static str {
        match self {
            RouteKind::Checked => "/t/closed/v1/chat/completions",
            RouteKind::Cached => "/t/cached/v1/chat/completions",
            RouteKind::Disabled => "/t/disabled/v1/chat/completions",
        }
    }

    fn counter(self) -> &'static str {
        match self {
            RouteKind::Checked => "wasmcustom.arbiter.checks.allow",
            RouteKind::Cached => "wasmcustom.arbiter.checks.cached",
            RouteKind::Disabled => "wasmcustom.arbiter.checks.disabled",
        }
    }

    fn name(self) -> &'static str {
        match self {
            RouteKind::Checked => "checked",
            RouteKind::Cached => "cached",
            RouteKind::Disabled => "disabled",
        }
    }
}

/// What `filter-cpu` runs.
#[derive(Debug, Clone)]
pub struct FilterCpuPlan {
    /// `label=path` of each module.
    pub modules: Vec<(String, PathBuf)>,
    /// Routes to measure.
    pub routes: Vec<RouteKind>,
    /// Requests per measured run.
    pub requests: u64,
    /// Connections (closed-loop workers).
    pub connections: usize,
    /// Repeats of every (module, route).
    pub repeats: usize,
    /// Where `perf record` writes, when profiling.
    pub perf: Option<PathBuf>,
}

/// Runs the plan and returns the table as markdown.
pub async fn run(plan: &FilterCpuPlan, pinning: &Plan) -> Result<String> {
    let policies = workspace_root().join(DEFAULT_POLICIES);
    let primary = MockLlm::start("primary").await?;
    let backup = MockLlm::start("backup").await?;
    let server = start_server(&policies, AuditMode::Write, pinning).await?;
    let mut envoys = Vec::new();
    for (label, wasm) in &plan.modules {
        let size = std::fs::metadata(wasm)
            .with_context(|| format!("module `{label}`: {}", wasm.display()))?
            .len();
        let envoy = start_envoy(wasm, server.addr().port(), &primary, &backup, pinning).await?;
        println!(
            "filter-cpu: `{label}` ({size} bytes) in Envoy pid {}",
            envoy.pid().unwrap_or(0)
        );
        envoys.push(envoy);
    }
    // Warm-up: V8 compiles the module, connections and the allow-cache fill.
    for envoy in &envoys {
        for route in &plan.routes {
            let target: Arc<dyn Target> =
                HttpTarget::new(&envoy.url(route.path())?, Bytes::from_static(CHAT_BODY))?;
            fixed(target, plan.connections, 500).await?;
        }
    }
    let mut results: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let n = envoys.len();
    for repeat in 0..plan.repeats {
        for (r, route) in plan.routes.iter().enumerate() {
            for k in 0..n {
                let m = (k + repeat) % n;
                let envoy = &envoys[m];
                let pid = envoy.pid().context("Envoy has no pid")?;
                let target: Arc<dyn Target> =
                    HttpTarget::new(&envoy.url(route.path())?, Bytes::from_static(CHAT_BODY))?;
                let counter_before = envoy.stat(route.counter()).await.unwrap_or(0);
                let perf = match &plan.perf {
                    Some(dir) if repeat == 0 => Some(perf_record(
                        pid,
                        &dir.join(format!("{}-{}.data", plan.modules[m].0, route.name())),
                    )?),
                    _ => None,
                };
                let cpu_before = procfs::cpu_seconds(pid)?;
                let started = Instant::now();
                fixed(target, plan.connections, plan.requests).await?;
                let wall = started.elapsed().as_secs_f64();
                let cpu = procfs::cpu_seconds(pid)? - cpu_before;
                if let Some(child) = perf {
                    perf_stop(child)?;
                }
                let handled = envoy
                    .stat(route.counter())
                    .await
                    .unwrap_or(0)
                    .saturating_sub(counter_before);
                if handled < plan.requests {
                    bail!(
                        "`{}` on {}: {handled} of {} requests counted as {}",
                        plan.modules[m].0,
                        route.name(),
                        plan.requests,
                        route.counter()
                    );
                }
                let us = cpu / plan.requests as f64 * 1e6;
                println!(
                    "filter-cpu: repeat {} {:>8} {:<24} {us:7.1} µs/req ({:.0} rps, load {:?})",
                    repeat + 1,
                    route.name(),
                    plan.modules[m].0,
                    plan.requests as f64 / wall,
                    procfs::load_average().map(|l| l[0]).unwrap_or(0.0)
                );
                results.entry((r, m)).or_default().push(us);
            }
        }
    }
    drop(envoys);
    drop(server);
    Ok(markdown(plan, &results))
}

fn markdown(plan: &FilterCpuPlan, results: &BTreeMap<(usize, usize), Vec<f64>>) -> String {
    use std::fmt::Write as _;
    let mut md = format!(
        "Envoy CPU µs per request ({} requests per run, {} connections, {} repeats; median [min–max])\n\n| route |",
        plan.requests, plan.connections, plan.repeats
    );
    for (label, _) in &plan.modules {
        let _ = write!(md, " {label} |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(plan.modules.len()));
    md.push('\n');
    for (r, route) in plan.routes.iter().enumerate() {
        let _ = write!(md, "| {} |", route.name());
        for m in 0..plan.modules.len() {
            let mut v = results.get(&(r, m)).cloned().unwrap_or_default();
            v.sort_by(f64::total_cmp);
            match (v.first(), v.get(v.len() / 2), v.last()) {
                (Some(lo), Some(mid), Some(hi)) => {
                    let _ = write!(md, " {mid:.1} [{lo:.1}–{hi:.1}] |");
                }
                _ => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md
}

/// Sends exactly `requests` requests over `connections` back-to-back workers; any failure
/// ends the run with an error (a CPU figure over failed requests would mislead).
async fn fixed(target: Arc<dyn Target>, connections: usize, requests: u64) -> Result<()> {
    let left = Arc::new(AtomicU64::new(requests));
    let mut workers = Vec::new();
    for _ in 0..connections.max(1) {
        let target = Arc::clone(&target);
        let left = Arc::clone(&left);
        workers.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                match tokio::time::timeout(Duration::from_secs(5), target.call()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err("no answer within 5 s".to_owned()),
                }
            }
            Ok(())
        }));
    }
    for worker in workers {
        worker
            .await
            .context("load worker")?
            .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    }
    Ok(())
}

async fn start_envoy(
    wasm: &Path,
    policy_port: u16,
    primary: &MockLlm,
    backup: &MockLlm,
    plan: &Plan,
) -> Result<Envoy> {
    let text = std::fs::read_to_string(workspace_root().join(E2E_TEMPLATE))
        .with_context(|| format!("reading {E2E_TEMPLATE}"))?;
    let mut vars = default_vars(&text)?;
    vars.insert("WASM_PATH".into(), wasm.display().to_string());
    vars.insert("PRIMARY_PORT".into(), primary.port().to_string());
    vars.insert("BACKUP_PORT".into(), backup.port().to_string());
    vars.insert("POLICY_PORT".into(), policy_port.to_string());
    let options = EnvoyOptions {
        concurrency: 1,
        log_level: "warn".into(),
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start_with(E2E_TEMPLATE, &vars, options).await?;
    if let (Some(cpus), Some(pid)) = (&plan.server_cpus, envoy.pid()) {
        procfs::pin(pid, cpus)?;
    }
    Ok(envoy)
}

fn perf_record(pid: u32, out: &Path) -> Result<Child> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let child = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "2000", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(out)
        .stdout(Stdio::null())
        .spawn()
        .context("starting `perf record`")?;
    // perf attaches asynchronously; give it a moment so the run is covered.
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

fn perf_stop(mut child: Child) -> Result<()> {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .context("stopping `perf record`")?;
    if !status.success() {
        bail!("could not signal `perf record`");
    }
    child.wait().context("waiting for `perf record`")?;
    Ok(())
}
