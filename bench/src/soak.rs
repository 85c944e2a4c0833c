//! `make soak`: the arbiter scenario at a steady open-loop rate for minutes, watching Envoy's
//! memory (wasm memory growth is a known failure in the field), errors, and — once the
//! server has an audit log — that every decided request left exactly one audit record.
//!
//! The policy server's log of the run (timestamped) is kept under
//! `target/soak/policy-server-<start>.log`; its lines other than the per-request decision
//! lines (rotations, warnings, …) are in the report with their time on the soak's clock, next
//! to the worst chunk.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arbiter_e2e::stack::{
    DEFAULT_POLICIES, DEMO_TEMPLATE, EXT_AUTHZ_TEMPLATE, PASSTHROUGH_TEMPLATE,
};
use arbiter_e2e::util::{target_dir, workspace_root};
use arbiter_e2e::MockLlm;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::http::HttpTarget;
use crate::latency::{median, Summary};
use crate::load::{open_loop, OpenLoop, Target};
use crate::procfs::{self, Memory};
use crate::report::{fmt_rate, TargetLine};
use crate::runner::{detect_audit_support, start_envoy, start_server, AuditMode, Plan};
use crate::CHAT_BODY;

/// Which Envoy the soak runs: the arbiter scenario (`make soak`, judged), or a baseline to
/// tell Envoy's own memory behaviour under the same load from the filter's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SoakStack {
    /// The arbiter filter (`envoy/arbiter.yaml.tmpl`).
    #[default]
    Arbiter,
    /// Envoy routing straight to the upstream (`tests/envoy/passthrough.yaml.tmpl`).
    NoAuth,
    /// Envoy's native ext_authz calling the same server (`tests/envoy/ext_authz.yaml.tmpl`).
    ExtAuthz,
}

impl SoakStack {
    fn template(self) -> &'static str {
        match self {
            SoakStack::Arbiter => DEMO_TEMPLATE,
            SoakStack::NoAuth => PASSTHROUGH_TEMPLATE,
            SoakStack::ExtAuthz => EXT_AUTHZ_TEMPLATE,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SoakStack::Arbiter => "arbiter",
            SoakStack::NoAuth => "no-auth",
            SoakStack::ExtAuthz => "native ext_authz",
        }
    }
}

/// Soak settings.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// The Envoy under load.
    pub stack: SoakStack,
    /// Measured time.
    pub duration: Duration,
    /// Requests per second.
    pub rate: f64,
    /// Unmeasured time at the same rate before the start RSS is taken (V8 compiles, pools
    /// and buffers fill).
    pub warmup: Duration,
    /// Memory is sampled between chunks of this length.
    pub chunk: Duration,
}

/// One chunk of the soak.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SoakSample {
    /// Seconds since the measured start, at the end of the chunk.
    pub t_s: f64,
    /// Envoy memory.
    pub envoy: Memory,
    /// Policy server memory.
    pub server: Memory,
    /// Downstream connections Envoy accepted since it started (`downstream_cx_total`): the
    /// open loop opens a connection whenever every open one is busy, so a stall shows here.
    #[serde(default)]
    pub envoy_connections: u64,
    /// Envoy's own view of its memory and connections at the end of the chunk.
    #[serde(default)]
    pub envoy_gauges: EnvoyGauges,
    /// Latency and counts of the chunk.
    pub summary: Summary,
}

/// Envoy's gauges that tell a leak from a high-water mark: RSS also holds memory the
/// allocator keeps after a peak (of connections, of requests in flight) and never returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EnvoyGauges {
    /// Bytes of heap in use by Envoy's objects (`server.memory_allocated`), MiB.
    pub heap_allocated_mib: f64,
    /// Heap the allocator holds from the OS, in use or kept for reuse
    /// (`server.memory_heap_size`), MiB.
    pub heap_size_mib: f64,
    /// Downstream connections open now (`http.ingress.downstream_cx_active`).
    pub connections_active: u64,
}

/// The soak's results file (`bench/results/soak-<date>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SoakReport {
    /// Layout version.
    pub schema: u32,
    /// Always `soak`.
    pub kind: String,
    /// UTC date.
    pub date: String,
    /// UTC start, RFC 3339.
    pub started_at: String,
    /// CPUs online.
    pub cpus: usize,
    /// Load average before and after.
    pub load: [Option<[f64; 3]>; 2],
    /// Requests/s offered.
    pub rate: f64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Audit mode of the server.
    pub audit: String,
    /// Envoy RSS after warm-up, MiB.
    pub envoy_rss_start_mib: f64,
    /// Envoy RSS at the end, MiB.
    pub envoy_rss_end_mib: f64,
    /// Growth from start to end, %.
    pub envoy_rss_growth_pct: f64,
    /// Policy server RSS after warm-up and at the end, MiB.
    pub server_rss_mib: [f64; 2],
    /// Envoy's gauges before the warm-up, after it and at the end.
    #[serde(default)]
    pub envoy_gauges: [EnvoyGauges; 3],
    /// Requests answered 200.
    pub ok: u64,
    /// Requests not answered 200 (any reason).
    pub errors: u64,
    /// First error seen.
    pub first_error: Option<String>,
    /// Median of the chunks' p50 and p99, worst chunk p99.9, ms.
    pub latency_ms: BTreeMap<String, f64>,
    /// Envoy's filter counters at the end (whole Envoy lifetime, warm-up included).
    pub counters: BTreeMap<String, u64>,
    /// Audit records in the server's audit log (when it has one).
    pub audit_records: Option<u64>,
    /// Requests the server decided (filter `allow` + `deny`), warm-up included.
    pub decided: u64,
    /// Requests the filter gave up on after the route's timeout (`no_decision.timeout`),
    /// warm-up included: the server may still have decided (and recorded) them.
    #[serde(default)]
    pub timeouts: u64,
    /// The chunk with the most errors (the highest p99 among equals), if any chunk ran.
    #[serde(default)]
    pub worst_chunk: Option<WorstChunk>,
    /// Where the policy server's log of the run was saved.
    #[serde(default)]
    pub server_log: Option<String>,
    /// The server's log lines other than decisions, on the soak's clock.
    #[serde(default)]
    pub server_events: Vec<ServerEvent>,
    /// Memory and latency per chunk.
    pub samples: Vec<SoakSample>,
    /// PASS/MISS per soak target.
    pub targets: Vec<TargetLine>,
}

/// The soak's worst chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorstChunk {
    /// End of the chunk, seconds since the measured start.
    pub t_s: f64,
    /// Requests not answered 200 in it.
    pub errors: u64,
    /// Its p99, ms.
    pub p99_ms: f64,
}

/// A line of the policy server's log that is not a decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerEvent {
    /// Seconds since the measured start (negative: before it, e.g. warm-up); `None` when
    /// the line has no readable timestamp.
    pub t_s: Option<f64>,
    /// The line.
    pub line: String,
}

/// Server events kept in the report at most (the whole log is in the saved file).
const MAX_SERVER_EVENTS: usize = 200;

/// Runs the soak.
pub async fn soak(plan: &Plan, soak: &SoakPlan) -> Result<SoakReport> {
    let now = OffsetDateTime::now_utc();
    let load_before = procfs::load_average();
    let support = detect_audit_support()?;
    let mode = AuditMode::best_write(support);
    let primary = MockLlm::start("primary").await?;
    let backup = MockLlm::start("backup").await?;
    let server = start_server(&workspace_root().join(DEFAULT_POLICIES), mode, plan).await?;
    let envoy = start_envoy(
        soak.stack.template(),
        Some(server.addr().port()),
        &primary,
        &backup,
        plan,
    )
    .await?;
    let target: Arc<dyn Target> = HttpTarget::new(
        &envoy.url("/v1/chat/completions")?,
        Bytes::from_static(CHAT_BODY),
    )?;
    let envoy_pid = envoy.pid().context("Envoy is not running")?;
    let server_pid = server.pid().context("the policy server is not running")?;
    let config = |duration| OpenLoop {
        rate: soak.rate,
        duration,
        timeout: plan.timeout,
        max_in_flight: plan.max_in_flight,
    };

    println!(
        "soak: {} rps for {:.0} s after {:.0} s warm-up ({}, {})",
        fmt_rate(soak.rate),
        soak.duration.as_secs_f64(),
        soak.warmup.as_secs_f64(),
        soak.stack.label(),
        mode.label()
    );
    let envoy_cold = procfs::memory(envoy_pid)?;
    let gauges_cold = envoy_gauges(&envoy).await;
    let warm = open_loop(Arc::clone(&target), &config(soak.warmup)).await;
    primary.clear();
    let envoy_start = procfs::memory(envoy_pid)?;
    let gauges_start = envoy_gauges(&envoy).await;
    let server_start = procfs::memory(server_pid)?;
    let mut samples = Vec::new();
    let mut errors = warm.summary.errors;
    let mut first_error = warm.first_error;
    let mut ok = 0;
    let started = Instant::now();
    let started_wall = OffsetDateTime::now_utc();
    while started.elapsed() < soak.duration {
        let left = soak.duration.saturating_sub(started.elapsed());
        let result = open_loop(Arc::clone(&target), &config(soak.chunk.min(left))).await;
        primary.clear();
        ok += result.summary.ok;
        errors += result.summary.errors;
        if first_error.is_none() {
            first_error = result.first_error;
        }
        let sample = SoakSample {
            t_s: started.elapsed().as_secs_f64(),
            envoy: procfs::memory(envoy_pid)?,
            server: procfs::memory(server_pid)?,
            envoy_connections: envoy_connections(&envoy).await,
            envoy_gauges: envoy_gauges(&envoy).await,
            summary: result.summary,
        };
        println!(
            "  t={:>5.0} s  Envoy RSS {:>7.1} MiB  heap in use {:>6.1} MiB  connections {:>5} ({} open)  server RSS {:>6.1} MiB  p99 {:.3} ms  errors {}",
            sample.t_s,
            sample.envoy.rss_mib,
            sample.envoy_gauges.heap_allocated_mib,
            sample.envoy_connections,
            sample.envoy_gauges.connections_active,
            sample.server.rss_mib,
            sample.summary.p99_ms,
            sample.summary.errors
        );
        samples.push(sample);
    }
    let envoy_end = procfs::memory(envoy_pid)?;
    let server_end = procfs::memory(server_pid)?;
    let gauges_end = envoy_gauges(&envoy).await;
    println!(
        "  Envoy RSS before the warm-up {:.1} MiB, heap in use {:.1} MiB",
        envoy_cold.rss_mib, gauges_cold.heap_allocated_mib
    );
    let stats = envoy.stats().await?;
    let counters: BTreeMap<String, u64> = stats
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("wasmcustom.arbiter.checks.")
                || k.starts_with("wasmcustom.arbiter.no_decision.")
        })
        .collect();
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    let decided =
        count("wasmcustom.arbiter.checks.allow") + count("wasmcustom.arbiter.checks.deny");
    let timeouts = count("wasmcustom.arbiter.no_decision.timeout");
    let audit_records = match server.audit_log_path() {
        Some(path) => Some(count_audit_records(path)?),
        None => None,
    };
    let log = server.log();
    let server_log = save_server_log(&log, now);
    let server_events = server_events(&log, started_wall);
    drop(log);
    let worst_chunk = worst_chunk(&samples);

    let growth = if envoy_start.rss_mib > 0.0 {
        (envoy_end.rss_mib - envoy_start.rss_mib) / envoy_start.rss_mib * 100.0
    } else {
        0.0
    };
    let mut latency_ms = BTreeMap::new();
    latency_ms.insert(
        "p50_median_of_chunks".to_owned(),
        median(samples.iter().map(|s| s.summary.p50_ms).collect()),
    );
    latency_ms.insert(
        "p99_median_of_chunks".to_owned(),
        median(samples.iter().map(|s| s.summary.p99_ms).collect()),
    );
    latency_ms.insert(
        "p999_worst_chunk".to_owned(),
        samples
            .iter()
            .map(|s| s.summary.p999_ms)
            .fold(0.0, f64::max),
    );
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" }.to_owned();
    let mut targets = vec![
        TargetLine {
            target: "Envoy RSS growth ≤ 5 % (after warm-up → end)".to_owned(),
            measured: format!(
                "{:+.2} % ({:.1} → {:.1} MiB)",
                growth, envoy_start.rss_mib, envoy_end.rss_mib
            ),
            verdict: verdict(growth <= 5.0),
            note: None,
        },
        TargetLine {
            target: "zero unexpected errors".to_owned(),
            measured: format!("{errors} errors in {} requests", ok + errors),
            verdict: verdict(errors == 0),
            note: first_error.clone(),
        },
    ];
    targets.push(match audit_records {
        _ if soak.stack != SoakStack::Arbiter => TargetLine {
            target: AUDIT_TARGET.to_owned(),
            measured: "not measured".to_owned(),
            verdict: "N/A".to_owned(),
            note: Some(format!("a {} baseline soak", soak.stack.label())),
        },
        Some(records) => TargetLine {
            target: AUDIT_TARGET.to_owned(),
            measured: format!("{records} records, {decided} decided, {timeouts} timed out"),
            verdict: verdict(audit_count_ok(records, decided, timeouts)),
            note: (records > decided).then(|| {
                format!(
                    "{} decided after the filter's timeout (answered too late, recorded)",
                    records - decided
                )
            }),
        },
        None => TargetLine {
            target: AUDIT_TARGET.to_owned(),
            measured: "not measured".to_owned(),
            verdict: "N/A".to_owned(),
            note: Some("the policy server has no --audit-log yet".to_owned()),
        },
    });
    Ok(SoakReport {
        schema: 1,
        kind: "soak".to_owned(),
        date: now.date().to_string(),
        started_at: now.format(&Rfc3339)?,
        cpus: procfs::cpu_count(),
        load: [load_before, procfs::load_average()],
        rate: soak.rate,
        duration_s: started.elapsed().as_secs_f64(),
        audit: mode.label().to_owned(),
        envoy_rss_start_mib: envoy_start.rss_mib,
        envoy_rss_end_mib: envoy_end.rss_mib,
        envoy_rss_growth_pct: growth,
        server_rss_mib: [server_start.rss_mib, server_end.rss_mib],
        envoy_gauges: [gauges_cold, gauges_start, gauges_end],
        ok,
        errors,
        first_error,
        latency_ms,
        counters,
        audit_records,
        decided,
        timeouts,
        worst_chunk,
        server_log,
        server_events,
        samples,
        targets,
    })
}

/// The audit count's target line.
const AUDIT_TARGET: &str = "decided ≤ audit records ≤ decided + timed out";

/// Every decided request has its record; a record more is allowed only for a request the
/// filter gave up on (`timeout`), which the server may still have decided and recorded
/// after the filter applied the route's fail mode. Anything else is a miss: a decision
/// without a record, or records nobody asked for.
fn audit_count_ok(records: u64, decided: u64, timeouts: u64) -> bool {
    records >= decided && records - decided <= timeouts
}

/// The chunk with the most errors, the highest p99 among equals.
fn worst_chunk(samples: &[SoakSample]) -> Option<WorstChunk> {
    samples
        .iter()
        .max_by(|a, b| {
            a.summary
                .errors
                .cmp(&b.summary.errors)
                .then(a.summary.p99_ms.total_cmp(&b.summary.p99_ms))
        })
        .map(|s| WorstChunk {
            t_s: s.t_s,
            errors: s.summary.errors,
            p99_ms: s.summary.p99_ms,
        })
}

/// Saves the server's log as `target/soak/policy-server-<start>.log`; its path, or `None`
/// (with a warning) if it cannot be written: a soak is not lost over its log.
fn save_server_log(log: &str, started: OffsetDateTime) -> Option<String> {
    let dir = target_dir().join("soak");
    let stamp = started
        .format(&Rfc3339)
        .unwrap_or_default()
        .replace(':', "-");
    let path = dir.join(format!("policy-server-{stamp}.log"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, log)) {
        Ok(()) => Some(path.display().to_string()),
        Err(e) => {
            eprintln!(
                "soak: cannot save the policy server's log to {}: {e}",
                path.display()
            );
            None
        }
    }
}

/// The log lines that are not per-request decisions (target `arbiter::decision`), with the
/// time of their RFC 3339 timestamp (the first word of the line) relative to `started`.
fn server_events(log: &str, started: OffsetDateTime) -> Vec<ServerEvent> {
    log.lines()
        .filter(|line| !line.trim().is_empty() && !line.contains(" arbiter::decision"))
        .take(MAX_SERVER_EVENTS)
        .map(|line| ServerEvent {
            t_s: line
                .split_whitespace()
                .next()
                .and_then(|ts| OffsetDateTime::parse(ts, &Rfc3339).ok())
                .map(|at| (at - started).as_seconds_f64()),
            line: line.to_owned(),
        })
        .collect()
}

/// `http.ingress.downstream_cx_total`, 0 when the admin interface does not answer.
async fn envoy_connections(envoy: &arbiter_e2e::Envoy) -> u64 {
    envoy
        .stats()
        .await
        .ok()
        .and_then(|stats| stats.get("http.ingress.downstream_cx_total").copied())
        .unwrap_or(0)
}

/// Envoy's memory and connection gauges; zeros for any Envoy does not report (a build
/// without tcmalloc has no `server.memory_*`).
async fn envoy_gauges(envoy: &arbiter_e2e::Envoy) -> EnvoyGauges {
    let Ok(stats) = envoy.stats().await else {
        return EnvoyGauges::default();
    };
    let get = |name: &str| stats.get(name).copied().unwrap_or(0);
    let mib = |name: &str| get(name) as f64 / (1024.0 * 1024.0);
    EnvoyGauges {
        heap_allocated_mib: mib("server.memory_allocated"),
        heap_size_mib: mib("server.memory_heap_size"),
        connections_active: get("http.ingress.downstream_cx_active"),
    }
}

/// `0.25 1.14 1.40`, or `unknown`.
fn load_text(load: Option<[f64; 3]>) -> String {
    load.map_or("unknown".to_owned(), |[a, b, c]| {
        format!("{a:.2} {b:.2} {c:.2}")
    })
}

/// Records in the audit log at `path` and in the files rotated out of it
/// (`<path>.<20-digit seq>`, see policy-server/README.md): every decision of the soak, not
/// only those still in the active file.
fn count_audit_records(path: &std::path::Path) -> Result<u64> {
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("audit log path has no file name")?;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let rotated = file
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|seq| seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit()));
        if file == name || rotated {
            let text = std::fs::read_to_string(entry.path())
                .with_context(|| format!("reading the audit log {}", entry.path().display()))?;
            total += text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        }
    }
    Ok(total)
}

impl SoakReport {
    /// Markdown summary.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Arbiter soak, {}\n\narbiter ({}) at {} rps for {:.0} s, Envoy `--concurrency 1`; {} CPUs, load average before {} after {}.\n",
            self.date,
            self.audit,
            fmt_rate(self.rate),
            self.duration_s,
            self.cpus,
            load_text(self.load[0]),
            load_text(self.load[1])
        );
        md.push_str("| target | measured | verdict | note |\n|---|---|---|---|\n");
        for t in &self.targets {
            let _ = writeln!(
                md,
                "| {} | {} | **{}** | {} |",
                t.target,
                t.measured,
                t.verdict,
                t.note.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(
            md,
            "\nRequests answered: {}, errors: {}. Latency: median chunk p50 {:.3} ms, median chunk p99 {:.3} ms, worst chunk p99.9 {:.3} ms. Policy server RSS {:.1} → {:.1} MiB.\n",
            self.ok,
            self.errors,
            self.latency_ms.get("p50_median_of_chunks").copied().unwrap_or(0.0),
            self.latency_ms.get("p99_median_of_chunks").copied().unwrap_or(0.0),
            self.latency_ms.get("p999_worst_chunk").copied().unwrap_or(0.0),
            self.server_rss_mib[0],
            self.server_rss_mib[1]
        );
        let no_decision: Vec<String> = self
            .counters
            .iter()
            .filter_map(|(name, n)| {
                let reason = name.strip_prefix("wasmcustom.arbiter.no_decision.")?;
                (*n > 0).then(|| format!("{n} {reason}"))
            })
            .collect();
        if let Some(w) = self.worst_chunk.as_ref().filter(|w| w.errors > 0) {
            let _ = writeln!(
                md,
                "Worst chunk: the one ending at t = {:.0} s, {} errors, p99 {:.3} ms. Requests without a decision over the run (filter counters, warm-up included): {}.\n",
                w.t_s,
                w.errors,
                w.p99_ms,
                if no_decision.is_empty() { "none".to_owned() } else { no_decision.join(", ") }
            );
        } else if let Some(w) = &self.worst_chunk {
            let _ = writeln!(
                md,
                "Worst chunk: the one ending at t = {:.0} s, no errors, p99 {:.3} ms.\n",
                w.t_s, w.p99_ms
            );
        }
        if let Some(log) = &self.server_log {
            let _ = writeln!(
                md,
                "Policy server log of the run: `{log}` (not committed).\n"
            );
        }
        let [cold, start, end] = self.envoy_gauges;
        if end.heap_size_mib > 0.0 {
            let _ = writeln!(
                md,
                "Envoy's heap in use (`server.memory_allocated`): {:.1} MiB before the warm-up, {:.1} after it, {:.1} at the end; heap its allocator holds (`server.memory_heap_size`, in use or kept for reuse): {:.1} → {:.1} → {:.1} MiB. RSS also counts the wasm VM's linear memory and V8's code, which are not in Envoy's heap. A leak grows the heap in use; a high-water mark (a peak of connections or requests in flight) grows only what is held.\n",
                cold.heap_allocated_mib,
                start.heap_allocated_mib,
                end.heap_allocated_mib,
                cold.heap_size_mib,
                start.heap_size_mib,
                end.heap_size_mib
            );
        }
        md.push_str("| t (s) | Envoy RSS MiB | Envoy heap in use MiB | Envoy heap held MiB | Envoy connections accepted | open | server RSS MiB | p50 ms | p99 ms | errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in &self.samples {
            let _ = writeln!(
                md,
                "| {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} | {:.3} | {:.3} | {} |",
                s.t_s,
                s.envoy.rss_mib,
                s.envoy_gauges.heap_allocated_mib,
                s.envoy_gauges.heap_size_mib,
                s.envoy_connections,
                s.envoy_gauges.connections_active,
                s.server.rss_mib,
                s.summary.p50_ms,
                s.summary.p99_ms,
                s.summary.errors
            );
        }
        if !self.server_events.is_empty() {
            md.push_str("\nPolicy server log lines other than decisions (t on the soak's clock; negative: before the measured start):\n\n```\n");
            for e in &self.server_events {
                let t = e.t_s.map_or("?".to_owned(), |t| format!("{t:.1}"));
                let _ = writeln!(md, "t={t:>7} s  {}", e.line);
            }
            md.push_str("```\n\n");
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_records_may_exceed_decisions_only_by_timed_out_requests() {
        // The 2026-11-30 soak: 15 requests timed out and were decided and recorded late.
        assert!(audit_count_ok(308_423, 308_408, 15));
        assert!(audit_count_ok(100, 100, 0));
        assert!(audit_count_ok(100, 100, 7));
        // A decision without its record.
        assert!(!audit_count_ok(99, 100, 15));
        // More records than even the timed-out requests explain.
        assert!(!audit_count_ok(116, 100, 15));
        assert!(!audit_count_ok(101, 100, 0));
    }

    #[test]
    fn the_worst_chunk_has_the_most_errors_then_the_highest_p99() {
        let chunk = |t_s: f64, errors: u64, p99_ms: f64| SoakSample {
            t_s,
            summary: Summary {
                errors,
                p99_ms,
                ..Summary::default()
            },
            ..SoakSample::default()
        };
        assert_eq!(worst_chunk(&[]), None);
        let samples = [
            chunk(10.0, 0, 108.0),
            chunk(20.0, 3, 20.0),
            chunk(30.0, 3, 59.0),
            chunk(40.0, 0, 4.0),
        ];
        assert_eq!(
            worst_chunk(&samples),
            Some(WorstChunk {
                t_s: 30.0,
                errors: 3,
                p99_ms: 59.0
            })
        );
        assert_eq!(worst_chunk(&samples[..1]).unwrap().t_s, 10.0);
    }

    #[test]
    fn server_events_skip_decisions_and_are_put_on_the_soaks_clock() {
        let started = OffsetDateTime::parse("2026-11-30T10:00:00Z", &Rfc3339).unwrap();
        let log = "\
2026-11-30T09:59:50.000000Z  INFO arbiter_policy_server: listening addr=127.0.0.1:1
2026-11-30T10:06:31.250000Z  INFO arbiter::decision: decision id=1 decision=allow
2026-11-30T10:06:31.500000Z  INFO arbiter_audit::writer: audit log rotated next_seq=206001

not a timestamp: a panic message
";
        let events = server_events(log, started);
        let times: Vec<Option<f64>> = events.iter().map(|e| e.t_s).collect();
        assert_eq!(times, [Some(-10.0), Some(391.5), None]);
        assert!(events[0].line.ends_with("listening addr=127.0.0.1:1"));
        assert!(events[1]
            .line
            .ends_with("audit log rotated next_seq=206001"));
        assert_eq!(events[2].line, "not a timestamp: a panic message");
    }

    #[test]
    fn audit_records_of_rotated_files_count_and_other_files_do_not() {
        let dir = std::env::temp_dir().join(format!("arbiter-soak-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let active = dir.join("audit.jsonl");
        std::fs::write(&active, "{}\n{}\n").unwrap();
        std::fs::write(dir.join("audit.jsonl.00000000000000000001"), "{}\n{}\n{}\n").unwrap();
        std::fs::write(dir.join("audit.jsonl.00000000000000000004"), "{}\n\n").unwrap();
        // Not rotated files of this log: another log, an outbox position, a short suffix.
        std::fs::write(dir.join("other.jsonl"), "{}\n").unwrap();
        std::fs::write(dir.join("audit.jsonl.otlp-position"), "12\n").unwrap();
        std::fs::write(dir.join("audit.jsonl.0001"), "{}\n").unwrap();
        assert_eq!(count_audit_records(&active).unwrap(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
