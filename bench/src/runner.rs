//! The benchmark run: start every stack once, warm each up, then measure the scenarios
//! interleaved (A B C …, B C … A, …) so a noisy neighbour hits them all alike, and keep the
//! median of the repeats.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter_e2e::envoy::envoy_bin;
use arbiter_e2e::stack::{
    default_vars, policy_server_bin, DEFAULT_POLICIES, DEMO_TEMPLATE, E2E_TEMPLATE,
    EXT_AUTHZ_TEMPLATE, PASSTHROUGH_TEMPLATE,
};
use arbiter_e2e::util::{free_port, workspace_root};
use arbiter_e2e::{Envoy, EnvoyOptions, MockLlm, PolicyServer};
use bytes::Bytes;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::grpc::GrpcTarget;
use crate::http::HttpTarget;
use crate::load::{closed_loop, open_loop, OpenLoop, RunResult, Target};
use crate::policies::write_bundle;
use crate::procfs;
use crate::report::{
    ids, AuditSupport, EngineTiming, Machine, Measured, Method, RateResult, Report, ScalingResult,
    ScenarioResult, ServerResult, Skipped,
};
use crate::CHAT_BODY;

/// `full` (`make bench`) or `quick` (`make bench-quick`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Minutes; the numbers the README quotes.
    Full,
    /// Under a minute, one repeat, low rates: proves the harness works (CI).
    Quick,
}

/// What to run and for how long.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Full or quick.
    pub kind: Kind,
    /// Open-loop loads through Envoy, as shares of native ext_authz's maximum rate measured
    /// in the same run (every scenario gets the same absolute rate at each share).
    pub load_shares: Vec<f64>,
    /// Measured time per open-loop run.
    pub duration: Duration,
    /// Warm-up before each run.
    pub warmup: Duration,
    /// Warm-up of each stack right after it started (V8 compiles the filter, pools fill).
    pub initial_warmup: Duration,
    /// Runs per scenario and rate.
    pub repeats: usize,
    /// Concurrency of the closed-loop runs.
    pub closed_concurrency: usize,
    /// Measured time per closed-loop run.
    pub closed_duration: Duration,
    /// Open-loop rates of the server-alone scenario.
    pub server_rates: Vec<f64>,
    /// Cross-check each server-alone closed loop with `h2load` (when installed).
    pub h2load: bool,
    /// Engine decisions timed one by one per bundle size (in-process, no gRPC).
    pub engine_decisions: usize,
    /// Bundle sizes of the scaling scenario.
    pub scaling_sizes: Vec<usize>,
    /// Open-loop rate of the scaling scenario.
    pub scaling_rate: f64,
    /// Concurrency of the scaling scenario's closed loop.
    pub scaling_concurrency: usize,
    /// A request not answered within this is an error.
    pub timeout: Duration,
    /// Open-loop in-flight bound.
    pub max_in_flight: usize,
    /// Which parts of the benchmark run (all by default).
    pub sections: Vec<Section>,
    /// CPUs of this process (load generator, mock upstream), if pinned.
    pub client_cpus: Option<String>,
    /// CPUs of Envoy and the policy server, if pinned.
    pub server_cpus: Option<String>,
}

impl Plan {
    /// `make bench`: about ten minutes.
    pub fn full() -> Plan {
        Plan {
            kind: Kind::Full,
            load_shares: vec![0.25, 0.5],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            initial_warmup: Duration::from_secs(3),
            repeats: 3,
            closed_concurrency: 16,
            closed_duration: Duration::from_secs(5),
            server_rates: vec![1000.0, 5000.0],
            h2load: true,
            engine_decisions: 20_000,
            scaling_sizes: vec![10, 1_000, 10_000],
            scaling_rate: 500.0,
            // The server has one worker thread: two in flight keep it busy without a queue.
            scaling_concurrency: 2,
            timeout: Duration::from_secs(2),
            max_in_flight: 2000,
            sections: Section::ALL.to_vec(),
            client_cpus: None,
            server_cpus: None,
        }
    }

    /// `make bench-quick`: every scenario once, briefly.
    pub fn quick() -> Plan {
        Plan {
            kind: Kind::Quick,
            load_shares: vec![0.25, 0.5],
            duration: Duration::from_millis(1000),
            warmup: Duration::from_millis(200),
            initial_warmup: Duration::from_millis(300),
            repeats: 1,
            closed_concurrency: 8,
            closed_duration: Duration::from_millis(700),
            server_rates: vec![200.0],
            h2load: true,
            engine_decisions: 200,
            // CI builds the server in debug, where loading and deciding are far slower (a
            // 10,000-policy bundle does not load within the harness's 20 s start-up bound):
            // smaller bundles and a trickle prove the scenario works, which is all a smoke
            // run is for.
            scaling_sizes: vec![10, 100, 1_000],
            scaling_rate: 5.0,
            scaling_concurrency: 1,
            timeout: Duration::from_secs(5),
            max_in_flight: 2000,
            sections: Section::ALL.to_vec(),
            client_cpus: None,
            server_cpus: None,
        }
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Full => "full",
            Kind::Quick => "quick",
        }
    }
}

/// A part of the benchmark (`run --only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// The scenarios through Envoy.
    Envoy,
    /// The policy server alone (with the `h2load` cross-check).
    Server,
    /// Policy size scaling and the engine alone.
    Scaling,
}

impl Section {
    /// Every part, in run order.
    pub const ALL: [Section; 3] = [Section::Envoy, Section::Server, Section::Scaling];
}

/// How the policy server writes its audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditMode {
    /// No `--audit-log`.
    None,
    /// `--audit-log` with the server's default sync mode (the server has no `--audit-sync`).
    Default,
    /// `--audit-sync write`.
    Write,
    /// `--audit-sync fsync`.
    Fsync,
}

impl AuditMode {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            AuditMode::None => "none",
            AuditMode::Default => "default",
            AuditMode::Write => "write",
            AuditMode::Fsync => "fsync",
        }
    }

    /// The mode closest to "write" this server offers.
    pub fn best_write(support: AuditSupport) -> AuditMode {
        match (support.audit_sync, support.audit_log) {
            (true, _) => AuditMode::Write,
            (false, true) => AuditMode::Default,
            (false, false) => AuditMode::None,
        }
    }

    fn args(self) -> Vec<String> {
        match self {
            AuditMode::Write => vec!["--audit-sync".into(), "write".into()],
            AuditMode::Fsync => vec!["--audit-sync".into(), "fsync".into()],
            AuditMode::None | AuditMode::Default => Vec::new(),
        }
    }

    /// Suffix for scenario labels.
    pub fn label(self) -> &'static str {
        match self {
            AuditMode::None => "no audit log",
            AuditMode::Default => "audit, server default sync",
            AuditMode::Write => "audit write",
            AuditMode::Fsync => "audit fsync",
        }
    }
}

/// Which audit flags `arbiter-policy-server --help` lists.
pub fn detect_audit_support() -> Result<AuditSupport> {
    let output = Command::new(policy_server_bin()?)
        .arg("--help")
        .output()
        .context("running arbiter-policy-server --help")?;
    let help = String::from_utf8_lossy(&output.stdout);
    Ok(AuditSupport {
        audit_log: help.contains("--audit-log"),
        audit_sync: help.contains("--audit-sync"),
    })
}

/// Starts a policy server with `mode`, pinned to the server CPUs.
pub async fn start_server(policies: &Path, mode: AuditMode, plan: &Plan) -> Result<PolicyServer> {
    let addr = arbiter_e2e::util::loopback(free_port()?);
    let server =
        PolicyServer::start_with_audit(addr, policies, &mode.args(), None, mode != AuditMode::None)
            .await?;
    if let (Some(cpus), Some(pid)) = (&plan.server_cpus, server.pid()) {
        procfs::pin(pid, cpus)?;
    }
    Ok(server)
}

/// Starts Envoy (`--concurrency 1`) from `template`, pinned to the server CPUs.
pub async fn start_envoy(
    template: &str,
    policy_port: Option<u16>,
    primary: &MockLlm,
    backup: &MockLlm,
    plan: &Plan,
) -> Result<Envoy> {
    let text = std::fs::read_to_string(workspace_root().join(template))
        .with_context(|| format!("reading {template}"))?;
    let mut vars = default_vars(&text)?;
    vars.insert("PRIMARY_PORT".into(), primary.port().to_string());
    vars.insert("BACKUP_PORT".into(), backup.port().to_string());
    if let Some(port) = policy_port {
        vars.insert("POLICY_PORT".into(), port.to_string());
    }
    let options = EnvoyOptions {
        concurrency: 1,
        log_level: "warn".into(),
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start_with(template, &vars, options).await?;
    if let (Some(cpus), Some(pid)) = (&plan.server_cpus, envoy.pid()) {
        procfs::pin(pid, cpus)?;
    }
    Ok(envoy)
}

/// One Envoy scenario's definition.
struct Def {
    id: &'static str,
    label: String,
    template: &'static str,
    path: &'static str,
    server: Option<usize>,
    audit: Option<AuditMode>,
}

const ARBITER_COUNTERS: &[&str] = &[
    "wasmcustom.arbiter.checks.allow",
    "wasmcustom.arbiter.checks.cached",
];
const EXTRA_ARBITER_COUNTERS: &[&str] = &[
    "wasmcustom.arbiter.checks.deny",
    "wasmcustom.arbiter.checks.fail_closed",
    "wasmcustom.arbiter.checks.fail_open",
    "wasmcustom.arbiter.cache.misses",
];
const DISABLED_COUNTERS: &[&str] = &["wasmcustom.arbiter.checks.disabled"];
const EXT_AUTHZ_COUNTERS: &[&str] = &["http.ingress.ext_authz.ok"];
const EXTRA_EXT_AUTHZ_COUNTERS: &[&str] = &[
    "http.ingress.ext_authz.denied",
    "http.ingress.ext_authz.error",
    "http.ingress.ext_authz.failure_mode_allowed",
];
const NO_AUTH_COUNTERS: &[&str] = &["http.ingress.downstream_rq_2xx"];

/// The Envoy counters that together must count every answered request of scenario `id`.
fn checked_by(id: &str) -> &'static [&'static str] {
    match id {
        ids::NO_AUTH => NO_AUTH_COUNTERS,
        ids::EXT_AUTHZ => EXT_AUTHZ_COUNTERS,
        ids::ARBITER_DISABLED => DISABLED_COUNTERS,
        _ => ARBITER_COUNTERS,
    }
}

/// What a measurement looks at besides the load generator.
struct Probe<'a> {
    envoy: Option<&'a Envoy>,
    server_pid: Option<u32>,
    checked_by: &'a [&'a str],
}

/// The load of one measurement.
#[derive(Debug, Clone, Copy)]
enum Load {
    Open(f64),
    /// With this many workers.
    Closed(usize),
}

/// What the reader should know about the machine, from its load when the run started: a
/// busy machine inflates absolute numbers, while ratios from the same run stay comparable.
fn caveat(cpus: usize, load: Option<[f64; 3]>) -> String {
    let busy = match load {
        // The 1-minute load average above a quarter of the CPUs means something else ran.
        Some([one, ..]) => one > cpus as f64 / 4.0,
        None => true,
    };
    if busy {
        "The machine was busy when the run started (see the load average): absolute numbers are \
         indicative only; compare the ratios, which come from the same run."
            .to_owned()
    } else {
        "The machine was otherwise idle when the run started; absolute numbers depend on the \
         machine, the ratios come from the same run."
            .to_owned()
    }
}

/// Runs the plan and returns the report (ratios and targets evaluated).
pub async fn run(plan: &Plan) -> Result<Report> {
    let started = Instant::now();
    let now = OffsetDateTime::now_utc();
    let support = detect_audit_support()?;
    let mut report = Report {
        schema: crate::report::SCHEMA,
        kind: plan.kind_name().to_owned(),
        date: now.date().to_string(),
        started_at: now.format(&Rfc3339)?,
        machine: Machine {
            cpus: procfs::cpu_count(),
            cpu_model: procfs::cpu_model(),
            load_before: procfs::load_average(),
            load_after: None,
            caveat: caveat(procfs::cpu_count(), procfs::load_average()),
        },
        method: method(plan)?,
        audit: support,
        ..Report::default()
    };

    let policies = workspace_root().join(DEFAULT_POLICIES);
    if plan.sections.contains(&Section::Envoy) {
        through_envoy(plan, support, &policies, &mut report).await?;
    }
    if plan.sections.contains(&Section::Server) {
        server_alone(plan, support, &policies, &mut report).await?;
    }
    if plan.sections.contains(&Section::Scaling) {
        policy_scaling(plan, support, &mut report).await?;
    }

    report.machine.load_after = procfs::load_average();
    report.total_s = started.elapsed().as_secs_f64();
    report.notes.extend(sanity_notes(&report));
    report.evaluate();
    Ok(report)
}

/// The Envoy scenarios: capacity, then latency at shares of native ext_authz's capacity.
async fn through_envoy(
    plan: &Plan,
    support: AuditSupport,
    policies: &Path,
    report: &mut Report,
) -> Result<()> {
    let started = Instant::now();
    let primary = MockLlm::start("primary").await?;
    let backup = MockLlm::start("backup").await?;
    let main_mode = AuditMode::best_write(support);
    let mut servers = vec![start_server(policies, main_mode, plan).await?];
    let fsync_index = if support.audit_sync {
        servers.push(start_server(policies, AuditMode::Fsync, plan).await?);
        Some(1)
    } else {
        report.skipped.push(Skipped {
            id: ids::ARBITER_FSYNC.to_owned(),
            reason: "arbiter-policy-server has no `--audit-sync` flag yet (the audit log is not merged): nothing to compare the write mode with".to_owned(),
        });
        None
    };
    if main_mode != AuditMode::Write {
        report.notes.push(format!(
            "`arbiter` runs with {}: the server's --help lists no `--audit-sync`, so write-mode audit could not be selected",
            main_mode.label()
        ));
    }

    let mut defs = vec![
        Def {
            id: ids::NO_AUTH,
            label: "no-auth (floor)".to_owned(),
            template: PASSTHROUGH_TEMPLATE,
            path: "/v1/chat/completions",
            server: None,
            audit: None,
        },
        Def {
            id: ids::EXT_AUTHZ,
            label: "native ext_authz".to_owned(),
            template: EXT_AUTHZ_TEMPLATE,
            path: "/v1/chat/completions",
            server: Some(0),
            audit: Some(main_mode),
        },
        Def {
            id: ids::ARBITER,
            label: format!("arbiter ({})", main_mode.label()),
            template: DEMO_TEMPLATE,
            path: "/v1/chat/completions",
            server: Some(0),
            audit: Some(main_mode),
        },
    ];
    if let Some(index) = fsync_index {
        defs.push(Def {
            id: ids::ARBITER_FSYNC,
            label: "arbiter (audit fsync)".to_owned(),
            template: DEMO_TEMPLATE,
            path: "/v1/chat/completions",
            server: Some(index),
            audit: Some(AuditMode::Fsync),
        });
    }
    // The demo routes have no cache; the e2e template's `t_cached` route (cache_ttl_ms
    // 60000) does. The path ends in /v1/chat/completions so the policy decides it like the
    // other scenarios' requests (action chat.completions, allowed by `routine-chat`).
    defs.push(Def {
        id: ids::ARBITER_CACHE,
        label: format!("arbiter, allow-cache ({})", main_mode.label()),
        template: E2E_TEMPLATE,
        path: "/t/cached/v1/chat/completions",
        server: Some(0),
        audit: Some(main_mode),
    });

    // The filter's fixed cost: same module and plugin config, on the e2e template's
    // `t_disabled` route (`disabled: true`), so it returns at once without a policy call.
    // Its distance to no-auth is what V8 and the proxy-wasm ABI cost per request; the
    // distance from it to `arbiter` is the filter's own work plus the gRPC call.
    defs.push(Def {
        id: ids::ARBITER_DISABLED,
        label: "arbiter loaded, route disabled".to_owned(),
        template: E2E_TEMPLATE,
        path: "/t/disabled/v1/chat/completions",
        server: Some(0),
        audit: None,
    });

    let mut envoys = Vec::with_capacity(defs.len());
    for def in &defs {
        let port = def.server.map(|i| servers[i].addr().port());
        let envoy = start_envoy(def.template, port, &primary, &backup, plan)
            .await
            .with_context(|| format!("starting Envoy for `{}`", def.id))?;
        let url = envoy.url(def.path)?;
        let target: Arc<dyn Target> = HttpTarget::new(&url, Bytes::from_static(CHAT_BODY))?;
        envoys.push((envoy, target));
    }
    println!(
        "bench: {} scenarios through Envoy, started in {:.1} s",
        defs.len(),
        started.elapsed().as_secs_f64()
    );

    for (def, (_, target)) in defs.iter().zip(&envoys) {
        let result = closed_loop(Arc::clone(target), 4, plan.initial_warmup, plan.timeout).await;
        if result.summary.ok == 0 {
            bail!(
                "scenario `{}` answered no warm-up request: {}",
                def.id,
                result.first_error.unwrap_or_default()
            );
        }
    }

    let n = defs.len();
    let mut open: Vec<BTreeMap<u64, Vec<Measured>>> = vec![BTreeMap::new(); n];
    let mut closed: Vec<Vec<Measured>> = vec![Vec::new(); n];
    // Capacity first: the open-loop rates are shares of native ext_authz's maximum, so the
    // latency comparison is at an equal offered load that leaves the shared core headroom
    // (a fixed rate near capacity measures queueing, not the filter).
    for repeat in 0..plan.repeats {
        for k in 0..n {
            let i = (k + repeat) % n;
            let (envoy, target) = &envoys[i];
            let probe = Probe {
                envoy: Some(envoy),
                server_pid: defs[i].server.and_then(|s| servers[s].pid()),
                checked_by: checked_by(defs[i].id),
            };
            let load = Load::Closed(plan.closed_concurrency);
            let m = measure(plan, target, &probe, load).await?;
            progress(&defs[i].label, load, &m);
            closed[i].push(m);
            primary.clear();
        }
    }
    let native_max = defs
        .iter()
        .position(|d| d.id == ids::EXT_AUTHZ)
        .map(|i| Measured::median_of(&closed[i]).summary.rps)
        .unwrap_or(0.0);
    let rates = shared_rates(&plan.load_shares, native_max);
    report.method.rates = rates.iter().map(|(_, rate)| *rate).collect();
    report.method.load_shares = plan.load_shares.clone();
    report.method.ext_authz_max_rps = Some(native_max);
    for repeat in 0..plan.repeats {
        for &(_, rate) in &rates {
            for k in 0..n {
                let i = (k + repeat) % n;
                let (envoy, target) = &envoys[i];
                let probe = Probe {
                    envoy: Some(envoy),
                    server_pid: defs[i].server.and_then(|s| servers[s].pid()),
                    checked_by: checked_by(defs[i].id),
                };
                let m = measure(plan, target, &probe, Load::Open(rate)).await?;
                progress(&defs[i].label, Load::Open(rate), &m);
                open[i].entry(rate as u64).or_default().push(m);
                primary.clear();
            }
        }
    }

    for (i, def) in defs.iter().enumerate() {
        let (envoy, _) = &envoys[i];
        let server_memory = def
            .server
            .and_then(|s| servers[s].pid())
            .and_then(|pid| procfs::memory(pid).ok());
        report.scenarios.push(ScenarioResult {
            id: def.id.to_owned(),
            label: def.label.clone(),
            template: def.template.to_owned(),
            path: def.path.to_owned(),
            audit: def.audit.map(|a| a.name().to_owned()),
            open_loop: std::mem::take(&mut open[i])
                .into_iter()
                .map(|(rate, repeats)| {
                    let mut result = rate_result(rate as f64, repeats);
                    result.share_of_ext_authz = rates
                        .iter()
                        .find(|(_, r)| *r as u64 == rate)
                        .map(|(share, _)| *share);
                    result
                })
                .collect(),
            closed_loop: Some(rate_result(0.0, std::mem::take(&mut closed[i]))),
            envoy_memory: envoy.pid().and_then(|pid| procfs::memory(pid).ok()),
            server_memory,
        });
    }
    // Idle Envoys cost little, but the server-alone runs should have the core to themselves.
    drop(envoys);
    drop(servers);
    Ok(())
}

/// The open-loop rate of each load share of `native_max` (rounded to 10 rps, at least
/// 10 rps; distinct rates only).
fn shared_rates(shares: &[f64], native_max: f64) -> Vec<(f64, f64)> {
    let mut rates: Vec<(f64, f64)> = Vec::new();
    for &share in shares {
        let rate = ((share * native_max / 10.0).round() * 10.0).max(10.0);
        if !rates.iter().any(|(_, r)| *r == rate) {
            rates.push((share, rate));
        }
    }
    rates
}

async fn server_alone(
    plan: &Plan,
    support: AuditSupport,
    policies: &Path,
    report: &mut Report,
) -> Result<()> {
    let mut variants: Vec<(&str, String, AuditMode)> = Vec::new();
    variants.push((
        "server_no_audit",
        "no audit log".to_owned(),
        AuditMode::None,
    ));
    if support.audit_sync {
        variants.push((
            "server_audit_write",
            "audit write".to_owned(),
            AuditMode::Write,
        ));
        variants.push((
            "server_audit_fsync",
            "audit fsync".to_owned(),
            AuditMode::Fsync,
        ));
    } else if support.audit_log {
        variants.push((
            "server_default_audit",
            "audit, server default sync".to_owned(),
            AuditMode::Default,
        ));
        report.skipped.push(Skipped {
            id: "server_audit_write, server_audit_fsync".to_owned(),
            reason: "arbiter-policy-server has no `--audit-sync` flag: only its default audit mode was measured".to_owned(),
        });
    } else {
        report.skipped.push(Skipped {
            id: "server_audit_write, server_audit_fsync".to_owned(),
            reason: "arbiter-policy-server has no `--audit-log` flag yet (the audit log is not merged): only \"audit off\" was measured".to_owned(),
        });
    }

    let mut live = Vec::new();
    for (id, label, mode) in variants {
        match start_server(policies, mode, plan).await {
            Ok(server) => {
                let target: Arc<dyn Target> = GrpcTarget::connect(server.addr()).await?;
                live.push((id, label, server, target));
            }
            // A server whose audit log is mandatory refuses to start without one: that is
            // "audit off is not an option", not a benchmark failure.
            Err(e) if mode == AuditMode::None && support.audit_log => {
                report.skipped.push(Skipped {
                    id: id.to_owned(),
                    reason: format!(
                        "the server does not start without --audit-log ({})",
                        format!("{e:#}").lines().next().unwrap_or_default()
                    ),
                });
            }
            Err(e) => return Err(e.context(format!("starting the server for `{id}`"))),
        }
    }
    for (id, _, _, target) in &live {
        let warm = closed_loop(Arc::clone(target), 4, plan.initial_warmup, plan.timeout).await;
        if warm.summary.ok == 0 {
            bail!(
                "`{id}` answered no warm-up Check: {}",
                warm.first_error.unwrap_or_default()
            );
        }
    }
    let n = live.len();
    let mut open: Vec<BTreeMap<u64, Vec<Measured>>> = vec![BTreeMap::new(); n];
    let mut closed: Vec<Vec<Measured>> = vec![Vec::new(); n];
    let mut h2load: Vec<Vec<crate::h2load::H2loadResult>> = vec![Vec::new(); n];
    let h2load_dir = match (plan.h2load, crate::h2load::version()) {
        (true, Some(_)) => Some(
            tempfile::Builder::new()
                .prefix("arbiter-bench-h2load-")
                .tempdir()?,
        ),
        (true, None) => {
            report.skipped.push(Skipped {
                id: "server-alone h2load cross-check".to_owned(),
                reason:
                    "h2load is not installed (`make bench-tools` installs Debian's nghttp2-client)"
                        .to_owned(),
            });
            None
        }
        (false, _) => None,
    };
    for repeat in 0..plan.repeats {
        for &rate in &plan.server_rates {
            for k in 0..n {
                let i = (k + repeat) % n;
                let (_, label, server, target) = &live[i];
                let probe = Probe {
                    envoy: None,
                    server_pid: server.pid(),
                    checked_by: &[],
                };
                let m = measure(plan, target, &probe, Load::Open(rate)).await?;
                progress(&format!("server alone, {label}"), Load::Open(rate), &m);
                open[i].entry(rate as u64).or_default().push(m);
            }
        }
        for k in 0..n {
            let i = (k + repeat) % n;
            let (_, label, server, target) = &live[i];
            let probe = Probe {
                envoy: None,
                server_pid: server.pid(),
                checked_by: &[],
            };
            let load = Load::Closed(plan.closed_concurrency);
            let m = measure(plan, target, &probe, load).await?;
            progress(&format!("server alone, {label}"), load, &m);
            let own_rps = m.summary.rps;
            closed[i].push(m);
            if let Some(dir) = &h2load_dir {
                // As many requests as the own client answered in its run, so both take
                // about as long; same one connection and stream count.
                let requests = ((own_rps * plan.closed_duration.as_secs_f64()) as u64).max(200);
                let result = crate::h2load::run(
                    server.addr(),
                    server.metrics_addr(),
                    server.pid(),
                    plan.closed_concurrency,
                    requests,
                    dir.path(),
                )
                .await
                .with_context(|| format!("h2load against `{label}`"))?;
                println!(
                    "  {:<44} {:>12}: {:>8.0} rps  mean {:.3} ms  failed {}  server allows {}/{}",
                    format!("server alone, {label}"),
                    "h2load",
                    result.rps,
                    result.mean_ms.unwrap_or(f64::NAN),
                    result.failed,
                    result
                        .server_allows
                        .map_or("?".to_owned(), |a| a.to_string()),
                    result.succeeded,
                );
                h2load[i].push(result);
            }
        }
    }
    for (i, (id, label, server, _)) in live.iter().enumerate() {
        report.server_alone.push(ServerResult {
            id: (*id).to_owned(),
            label: label.clone(),
            open_loop: std::mem::take(&mut open[i])
                .into_iter()
                .map(|(rate, repeats)| rate_result(rate as f64, repeats))
                .collect(),
            closed_loop: Some(rate_result(0.0, std::mem::take(&mut closed[i]))),
            h2load: std::mem::take(&mut h2load[i]),
            memory: server.pid().and_then(|pid| procfs::memory(pid).ok()),
        });
    }
    Ok(())
}

async fn policy_scaling(plan: &Plan, support: AuditSupport, report: &mut Report) -> Result<()> {
    // Large bundles decide slowly: a short timeout would turn slow answers into errors.
    let plan = &Plan {
        timeout: plan.timeout.max(Duration::from_secs(30)),
        ..plan.clone()
    };
    let dir = tempfile::Builder::new()
        .prefix("arbiter-bench-bundles-")
        .tempdir()?;
    let mode = AuditMode::best_write(support);
    let mut live = Vec::new();
    for &size in &plan.scaling_sizes {
        let bundle: PathBuf = dir.path().join(format!("policies-{size}"));
        write_bundle(&bundle, size)?;
        let start = Instant::now();
        let server = start_server(&bundle, mode, plan)
            .await
            .with_context(|| format!("starting the server with {size} policies"))?;
        let startup_ms = start.elapsed().as_secs_f64() * 1000.0;
        let target: Arc<dyn Target> = GrpcTarget::connect(server.addr()).await?;
        let warm = closed_loop(
            Arc::clone(&target),
            plan.scaling_concurrency.min(4),
            plan.initial_warmup,
            plan.timeout,
        )
        .await;
        if warm.summary.ok == 0 {
            bail!(
                "the server with {size} policies answered no warm-up Check: {}",
                warm.first_error.unwrap_or_default()
            );
        }
        live.push((size, startup_ms, server, target));
    }
    // The engine alone, in this process: the decision latency without gRPC or audit.
    let mut engine = Vec::new();
    for &size in &plan.scaling_sizes {
        let bundle: PathBuf = dir.path().join(format!("policies-{size}"));
        let decisions = plan.engine_decisions;
        let timing = tokio::task::spawn_blocking(move || engine_timing(&bundle, decisions))
            .await
            .context("engine timing")??;
        println!(
            "  {:<44} {:>12}: {:>8} decisions  p50 {:.1}  p99 {:.1}  max {:.1} µs",
            format!("{size} policies, engine alone"),
            "in-process",
            timing.decisions,
            timing.p50_us,
            timing.p99_us,
            timing.max_us
        );
        engine.push(timing);
    }
    let n = live.len();
    let mut open: Vec<Vec<(f64, Measured)>> = vec![Vec::new(); n];
    let mut closed: Vec<Vec<Measured>> = vec![Vec::new(); n];
    for repeat in 0..plan.repeats {
        for k in 0..n {
            let i = (k + repeat) % n;
            let (size, _, server, target) = &live[i];
            let probe = Probe {
                envoy: None,
                server_pid: server.pid(),
                checked_by: &[],
            };
            let label = format!("{size} policies");
            // Capacity first: an open loop above it only measures a growing queue, and the
            // backlog it leaves would spoil the next run. Latency is then taken at the plan's
            // rate or half the capacity, whichever is lower (the rate used is recorded).
            let load = Load::Closed(plan.scaling_concurrency);
            let m = measure(plan, target, &probe, load).await?;
            progress(&label, load, &m);
            let rate = plan.scaling_rate.min(m.summary.rps / 2.0).max(1.0);
            closed[i].push(m);
            let m = measure(plan, target, &probe, Load::Open(rate)).await?;
            progress(&label, Load::Open(rate), &m);
            open[i].push((rate, m));
        }
    }
    for (i, (size, startup_ms, server, _)) in live.iter().enumerate() {
        report.policy_scaling.push(ScalingResult {
            policies: *size,
            startup_ms: *startup_ms,
            open_loop: {
                let runs = std::mem::take(&mut open[i]);
                let rate = crate::latency::median(runs.iter().map(|(r, _)| *r).collect());
                rate_result(rate, runs.into_iter().map(|(_, m)| m).collect())
            },
            closed_loop: Some(rate_result(0.0, std::mem::take(&mut closed[i]))),
            engine: engine.get(i).cloned(),
            memory: server.pid().and_then(|pid| procfs::memory(pid).ok()),
        });
    }
    Ok(())
}

/// Times `PolicyEngine::decide` on the chat request one call at a time: up to `decisions`
/// calls, at most about 3 s (large bundles may decide slowly), after a short warm-up.
fn engine_timing(bundle: &Path, decisions: usize) -> Result<EngineTiming> {
    let engine = arbiter_policy_server::PolicyEngine::load(bundle)
        .with_context(|| format!("loading {}", bundle.display()))?;
    let request = arbiter_policy_server::AuthzRequest::try_from(crate::grpc::chat_check_request()?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let budget = Duration::from_secs(3);
    let warm = Instant::now();
    for _ in 0..(decisions / 10).max(1) {
        engine
            .decide(&request)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if warm.elapsed() > budget / 10 {
            break;
        }
    }
    let start = Instant::now();
    let mut micros = Vec::with_capacity(decisions);
    while micros.len() < decisions.max(1) && (micros.is_empty() || start.elapsed() < budget) {
        let t = Instant::now();
        let decision = engine
            .decide(&request)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        micros.push(t.elapsed().as_nanos() as f64 / 1000.0);
        std::hint::black_box(decision);
    }
    micros.sort_by(f64::total_cmp);
    let at =
        |p: f64| micros[((p * micros.len() as f64).ceil() as usize).clamp(1, micros.len()) - 1];
    Ok(EngineTiming {
        decisions: micros.len(),
        p50_us: at(0.50),
        p99_us: at(0.99),
        max_us: micros.last().copied().unwrap_or(0.0),
    })
}

fn rate_result(rate: f64, repeats: Vec<Measured>) -> RateResult {
    RateResult {
        rate,
        share_of_ext_authz: None,
        median: Measured::median_of(&repeats),
        repeats,
    }
}

/// Warms up at the same load, then measures with CPU and counter deltas around the run.
async fn measure(
    plan: &Plan,
    target: &Arc<dyn Target>,
    probe: &Probe<'_>,
    load: Load,
) -> Result<Measured> {
    let run = |duration: Duration| {
        let target = Arc::clone(target);
        async move {
            match load {
                Load::Open(rate) => {
                    let config = OpenLoop {
                        rate,
                        duration,
                        timeout: plan.timeout,
                        max_in_flight: plan.max_in_flight,
                    };
                    open_loop(target, &config).await
                }
                Load::Closed(concurrency) => {
                    closed_loop(target, concurrency, duration, plan.timeout).await
                }
            }
        }
    };
    let _ = run(plan.warmup).await;
    let counters_before = counters(probe).await?;
    let envoy_pid = probe.envoy.and_then(Envoy::pid);
    let cpu = |pid: Option<u32>| pid.and_then(|p| procfs::cpu_seconds(p).ok());
    let me = std::process::id();
    let (envoy_before, server_before, me_before) =
        (cpu(envoy_pid), cpu(probe.server_pid), cpu(Some(me)));
    let measured_for = match load {
        Load::Open(_) => plan.duration,
        Load::Closed(_) => plan.closed_duration,
    };
    let started = Instant::now();
    let result: RunResult = run(measured_for).await;
    let wall = started.elapsed().as_secs_f64();
    let (envoy_after, server_after, me_after) =
        (cpu(envoy_pid), cpu(probe.server_pid), cpu(Some(me)));
    let counters_after = counters(probe).await?;

    let ok = result.summary.ok;
    let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a).max(0.0));
    let envoy_cpu = delta(envoy_before, envoy_after);
    let server_cpu = delta(server_before, server_after);
    let per_1k = |cpu: Option<f64>| cpu.filter(|_| ok > 0).map(|c| c / ok as f64 * 1000.0);
    let counters = counters_after
        .iter()
        .map(|(k, after)| {
            let before = counters_before.get(k).copied().unwrap_or(0);
            (k.clone(), after.saturating_sub(before))
        })
        .collect();
    Ok(Measured {
        summary: result.summary,
        send_lag: result.send_lag,
        first_error: result.first_error,
        envoy_cpu_s_per_1k: per_1k(envoy_cpu),
        server_cpu_s_per_1k: per_1k(server_cpu),
        sut_cpu_busy: (envoy_cpu.unwrap_or(0.0) + server_cpu.unwrap_or(0.0)) / wall,
        client_cpu_busy: delta(me_before, me_after).unwrap_or(0.0) / wall,
        counters,
    })
}

/// The probe's Envoy counters that say who handled the requests.
async fn counters(probe: &Probe<'_>) -> Result<BTreeMap<String, u64>> {
    let Some(envoy) = probe.envoy else {
        return Ok(BTreeMap::new());
    };
    let stats = envoy.stats().await?;
    let extra: &[&str] = if probe.checked_by == ARBITER_COUNTERS {
        EXTRA_ARBITER_COUNTERS
    } else if probe.checked_by == EXT_AUTHZ_COUNTERS {
        EXTRA_EXT_AUTHZ_COUNTERS
    } else {
        &[]
    };
    Ok(probe
        .checked_by
        .iter()
        .chain(extra)
        .map(|name| ((*name).to_owned(), stats.get(*name).copied().unwrap_or(0)))
        .collect())
}

/// Problems that make a result untrustworthy, as notes.
fn sanity_notes(report: &Report) -> Vec<String> {
    let mut notes = Vec::new();
    for s in &report.scenarios {
        let checked_by = checked_by(&s.id);
        for (what, run) in s
            .open_loop
            .iter()
            .map(|r| (format!("{} rps", r.rate), r))
            .chain(s.closed_loop.iter().map(|r| ("closed loop".to_owned(), r)))
        {
            let answered: u64 = run.repeats.iter().map(|m| m.summary.ok).sum();
            let errors: u64 = run.repeats.iter().map(|m| m.summary.errors).sum();
            let checked: u64 = checked_by
                .iter()
                .map(|c| run.median.counters.get(*c).copied().unwrap_or(0))
                .sum();
            if checked < answered {
                notes.push(format!(
                    "PROBLEM: `{}` {what}: {answered} requests answered 200 but Envoy counted only {checked} as checked ({})",
                    s.id,
                    checked_by.join(" + ")
                ));
            }
            if errors > 0 {
                notes.push(format!(
                    "`{}` {what}: {errors} errors over the repeats (first: {})",
                    s.id,
                    run.repeats
                        .iter()
                        .find_map(|m| m.first_error.clone())
                        .unwrap_or_default()
                ));
            }
        }
        if s.id == ids::ARBITER_CACHE {
            let cached: u64 = s
                .open_loop
                .iter()
                .map(|r| {
                    r.median
                        .counters
                        .get("wasmcustom.arbiter.checks.cached")
                        .copied()
                        .unwrap_or(0)
                })
                .sum();
            if cached == 0 {
                notes.push("PROBLEM: `arbiter_cache` never answered from the cache".to_owned());
            }
        }
    }
    notes
}

/// Problems that mean a scenario of `sections` did not run or produced no numbers, or the
/// `h2load` cross-check saw answers that were not decisions (the quick run fails on them;
/// speed is never one).
pub fn problems(report: &Report, sections: &[Section]) -> Vec<String> {
    let mut problems: Vec<String> = report
        .notes
        .iter()
        .filter(|n| n.starts_with("PROBLEM"))
        .cloned()
        .collect();
    fn check(problems: &mut Vec<String>, what: String, runs: &[Measured]) {
        if runs.is_empty() {
            problems.push(format!("{what}: no runs"));
        }
        for m in runs {
            if m.summary.ok == 0 {
                problems.push(format!(
                    "{what}: no request answered ({})",
                    m.first_error.clone().unwrap_or_default()
                ));
            }
        }
    }
    for s in &report.scenarios {
        for r in &s.open_loop {
            check(
                &mut problems,
                format!("{} at {} rps", s.id, r.rate),
                &r.repeats,
            );
        }
        match &s.closed_loop {
            Some(r) => check(&mut problems, format!("{} closed loop", s.id), &r.repeats),
            None => problems.push(format!("{}: no closed-loop run", s.id)),
        }
    }
    for s in &report.server_alone {
        for r in &s.open_loop {
            check(
                &mut problems,
                format!("{} at {} rps", s.id, r.rate),
                &r.repeats,
            );
        }
        if let Some(r) = &s.closed_loop {
            check(&mut problems, format!("{} closed loop", s.id), &r.repeats);
        }
    }
    for s in &report.policy_scaling {
        check(
            &mut problems,
            format!("{} policies", s.policies),
            &s.open_loop.repeats,
        );
    }
    let expected = [
        ids::NO_AUTH,
        ids::EXT_AUTHZ,
        ids::ARBITER,
        ids::ARBITER_CACHE,
        ids::ARBITER_DISABLED,
    ];
    for id in expected {
        if sections.contains(&Section::Envoy) && report.scenario(id).is_none() {
            problems.push(format!("scenario `{id}` did not run"));
        }
    }
    if sections.contains(&Section::Server) && report.server_alone.is_empty() {
        problems.push("the server-alone scenario did not run".to_owned());
    }
    for s in &report.server_alone {
        for h in &s.h2load {
            if !h.agrees() {
                problems.push(format!(
                    "{} h2load: {} of {} requests succeeded, {} failed, the server counted {} allows: not every request was a decision",
                    s.id,
                    h.succeeded,
                    h.requests,
                    h.failed,
                    h.server_allows.map_or("?".to_owned(), |a| a.to_string())
                ));
            }
        }
    }
    if sections.contains(&Section::Scaling) && report.policy_scaling.is_empty() {
        problems.push("the policy scaling scenario did not run".to_owned());
    }
    problems
}

fn progress(label: &str, load: Load, m: &Measured) {
    let what = match load {
        Load::Open(rate) => format!("{} rps", crate::report::fmt_rate(rate)),
        Load::Closed(_) => "closed loop".to_owned(),
    };
    let s = &m.summary;
    println!(
        "  {label:<44} {what:>12}: {:>8.0} rps  p50 {:.3}  p99 {:.3}  p99.9 {:.3} ms  errors {}",
        s.rps, s.p50_ms, s.p99_ms, s.p999_ms, s.errors
    );
}

fn method(plan: &Plan) -> Result<Method> {
    let envoy_version = Command::new(envoy_bin()?)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let server = policy_server_bin()?;
    Ok(Method {
        client_cpus: plan.client_cpus.clone(),
        server_cpus: plan.server_cpus.clone(),
        envoy_concurrency: 1,
        // Filled in once native ext_authz's maximum is measured.
        rates: Vec::new(),
        load_shares: plan.load_shares.clone(),
        ext_authz_max_rps: None,
        duration_s: plan.duration.as_secs_f64(),
        warmup_s: plan.warmup.as_secs_f64(),
        repeats: plan.repeats,
        closed_loop_concurrency: plan.closed_concurrency,
        closed_loop_s: plan.closed_duration.as_secs_f64(),
        server_rates: plan.server_rates.clone(),
        scaling_sizes: plan.scaling_sizes.clone(),
        scaling_rate: plan.scaling_rate,
        request: format!(
            "POST /v1/chat/completions, {}-byte JSON body, HTTP/1.1 keep-alive, anonymous caller",
            CHAT_BODY.len()
        ),
        generator: "arbiter-bench: open loop paced by a dedicated thread, latency from the intended send time (no coordinated omission); closed loop with fixed concurrency for max rps".to_owned(),
        server_binary: server
            .strip_prefix(workspace_root())
            .unwrap_or(&server)
            .display()
            .to_string(),
        envoy_version,
    })
}
