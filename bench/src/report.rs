//! The results file (`bench/results/<date>.json`), its Markdown tables, the ratios against
//! the same run's baselines, and the PASS/MISS lines of the performance targets.
//!
//! Targets are verdicts printed in the output, never assertions: a slow shared machine must
//! not fail a build, and a miss must be visible rather than retried until it passes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub use crate::h2load::H2loadResult;
use crate::latency::Summary;
use crate::load::SendLag;
use crate::procfs::Memory;

/// Version of the JSON layout.
pub const SCHEMA: u32 = 1;

/// Scenario ids, shared by the runner, the ratios and the plot.
pub mod ids {
    /// Envoy routing straight to the upstream.
    pub const NO_AUTH: &str = "no_auth";
    /// Envoy's native ext_authz (gRPC) calling the policy server.
    pub const EXT_AUTHZ: &str = "ext_authz";
    /// The Arbiter wasm filter (write-mode audit when the server has it).
    pub const ARBITER: &str = "arbiter";
    /// The Arbiter wasm filter, fsync audit.
    pub const ARBITER_FSYNC: &str = "arbiter_fsync";
    /// The Arbiter wasm filter on a route with the allow-cache on.
    pub const ARBITER_CACHE: &str = "arbiter_cache";
    /// The Arbiter wasm filter loaded, on a route that disables it: what running any wasm
    /// filter costs Envoy, before the filter does any work of its own.
    pub const ARBITER_DISABLED: &str = "arbiter_disabled";
}

/// One benchmark run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// `full` (`make bench`) or `quick` (`make bench-quick`, a smoke test).
    pub kind: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    /// UTC start time, RFC 3339.
    pub started_at: String,
    /// Wall time of the whole run, s.
    pub total_s: f64,
    /// Where it ran.
    pub machine: Machine,
    /// How it was measured.
    pub method: Method,
    /// Which audit modes the policy server offers (from its `--help`).
    pub audit: AuditSupport,
    /// Requests through Envoy.
    pub scenarios: Vec<ScenarioResult>,
    /// The policy server alone, Check over gRPC.
    pub server_alone: Vec<ServerResult>,
    /// Decision latency by bundle size, server alone.
    pub policy_scaling: Vec<ScalingResult>,
    /// Ratios against the same run's baselines.
    pub ratios: Ratios,
    /// PASS/MISS per performance target.
    pub targets: Vec<TargetLine>,
    /// Scenarios not run, and why.
    pub skipped: Vec<Skipped>,
    /// Anything a reader must know to trust the numbers (errors, unsaturated runs, ...).
    pub notes: Vec<String>,
}

/// The machine, as far as the run can tell.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs online.
    pub cpus: usize,
    /// `/proc/cpuinfo` model name.
    pub cpu_model: Option<String>,
    /// 1/5/15-minute load average before the run.
    pub load_before: Option<[f64; 3]>,
    /// 1/5/15-minute load average after the run.
    pub load_after: Option<[f64; 3]>,
    /// How to read the absolute numbers.
    pub caveat: String,
}

/// How the run was measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Method {
    /// CPUs of the load generator and the mock upstream (this process).
    pub client_cpus: Option<String>,
    /// CPUs of Envoy and the policy server.
    pub server_cpus: Option<String>,
    /// Envoy `--concurrency` in every scenario.
    pub envoy_concurrency: u32,
    /// Open-loop rates through Envoy, requests/s (the shares below of native ext_authz's
    /// measured maximum; older runs used fixed rates).
    pub rates: Vec<f64>,
    /// Open-loop loads as shares of native ext_authz's maximum rate.
    #[serde(default)]
    pub load_shares: Vec<f64>,
    /// Native ext_authz's maximum rate in this run (median closed loop), requests/s.
    #[serde(default)]
    pub ext_authz_max_rps: Option<f64>,
    /// Measured seconds per open-loop run.
    pub duration_s: f64,
    /// Warm-up seconds before each run (same rate), not measured.
    pub warmup_s: f64,
    /// Runs per scenario and rate; the tables show the median.
    pub repeats: usize,
    /// Connections (HTTP) or streams (gRPC) of the closed-loop runs.
    pub closed_loop_concurrency: usize,
    /// Measured seconds per closed-loop run.
    pub closed_loop_s: f64,
    /// Open-loop rates of the server-alone scenario.
    pub server_rates: Vec<f64>,
    /// Bundle sizes of the scaling scenario.
    pub scaling_sizes: Vec<usize>,
    /// Open-loop rate of the scaling scenario.
    pub scaling_rate: f64,
    /// The request sent through Envoy.
    pub request: String,
    /// The load generator and its accounting.
    pub generator: String,
    /// Policy server binary used.
    pub server_binary: String,
    /// `envoy --version`.
    pub envoy_version: String,
}

/// What `arbiter-policy-server --help` lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSupport {
    /// `--audit-log PATH`.
    pub audit_log: bool,
    /// `--audit-sync fsync|write`.
    pub audit_sync: bool,
}

/// One measured run (or the median of several).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Latency and counts.
    pub summary: Summary,
    /// Generator lateness (open loop).
    pub send_lag: Option<SendLag>,
    /// First error, if any.
    pub first_error: Option<String>,
    /// Envoy CPU seconds per 1,000 answered requests.
    pub envoy_cpu_s_per_1k: Option<f64>,
    /// Policy server CPU seconds per 1,000 answered requests.
    pub server_cpu_s_per_1k: Option<f64>,
    /// Envoy + policy server CPU seconds per wall second (1.0 = one core busy).
    pub sut_cpu_busy: f64,
    /// This process (load generator + mock upstream) CPU seconds per wall second.
    pub client_cpu_busy: f64,
    /// Envoy counter deltas over the run (`checks.allow`, `ext_authz.ok`, ...).
    pub counters: BTreeMap<String, u64>,
}

impl Measured {
    /// Per field, the median of `runs`.
    pub fn median_of(runs: &[Measured]) -> Measured {
        let summaries: Vec<Summary> = runs.iter().map(|r| r.summary.clone()).collect();
        let opt = |f: fn(&Measured) -> Option<f64>| {
            let values: Vec<f64> = runs.iter().filter_map(f).collect();
            (!values.is_empty()).then(|| crate::latency::median(values))
        };
        let lags: Vec<&SendLag> = runs.iter().filter_map(|r| r.send_lag.as_ref()).collect();
        let send_lag = (!lags.is_empty()).then(|| SendLag {
            p50_us: crate::latency::median(lags.iter().map(|l| l.p50_us).collect()),
            p99_us: crate::latency::median(lags.iter().map(|l| l.p99_us).collect()),
            max_us: lags.iter().map(|l| l.max_us).fold(0.0, f64::max),
        });
        let mut counters = BTreeMap::new();
        for run in runs {
            for (k, v) in &run.counters {
                *counters.entry(k.clone()).or_insert(0) += v;
            }
        }
        Measured {
            summary: Summary::median_of(&summaries),
            send_lag,
            first_error: runs.iter().find_map(|r| r.first_error.clone()),
            envoy_cpu_s_per_1k: opt(|r| r.envoy_cpu_s_per_1k),
            server_cpu_s_per_1k: opt(|r| r.server_cpu_s_per_1k),
            sut_cpu_busy: crate::latency::median(runs.iter().map(|r| r.sut_cpu_busy).collect()),
            client_cpu_busy: crate::latency::median(
                runs.iter().map(|r| r.client_cpu_busy).collect(),
            ),
            // Summed over the repeats: a sanity check that every request was checked.
            counters,
        }
    }
}

/// The runs of one scenario at one open-loop rate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RateResult {
    /// Requests/s offered.
    pub rate: f64,
    /// The offered rate as a share of native ext_authz's maximum (Envoy scenarios).
    #[serde(default)]
    pub share_of_ext_authz: Option<f64>,
    /// Median of the repeats (per field).
    pub median: Measured,
    /// Every repeat, in run order.
    pub repeats: Vec<Measured>,
}

/// One scenario through Envoy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// Stable id (see [`ids`]).
    pub id: String,
    /// Human label.
    pub label: String,
    /// Envoy template used.
    pub template: String,
    /// Request path.
    pub path: String,
    /// Audit mode of the policy server behind it (`none`, `write`, `fsync`, `default`).
    pub audit: Option<String>,
    /// Open-loop results per rate.
    pub open_loop: Vec<RateResult>,
    /// Closed-loop (maximum rate) result: median and repeats.
    pub closed_loop: Option<RateResult>,
    /// Envoy memory at the end.
    pub envoy_memory: Option<Memory>,
    /// Policy server memory at the end (shared servers show the same numbers).
    pub server_memory: Option<Memory>,
}

/// The policy server alone.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerResult {
    /// `server_no_audit`, `server_audit_write`, `server_audit_fsync`.
    pub id: String,
    /// Human label.
    pub label: String,
    /// Open-loop results per rate.
    pub open_loop: Vec<RateResult>,
    /// Closed-loop: decisions/s = `summary.rps`.
    pub closed_loop: Option<RateResult>,
    /// The same closed loop measured by `h2load`, one per repeat (empty: not run).
    #[serde(default)]
    pub h2load: Vec<H2loadResult>,
    /// Memory at the end.
    pub memory: Option<Memory>,
}

impl ServerResult {
    /// The median `h2load` rate over the repeats, and whether every repeat agreed with the
    /// server's own allow count.
    pub fn h2load_rps(&self) -> Option<(f64, bool)> {
        (!self.h2load.is_empty()).then(|| {
            (
                crate::latency::median(self.h2load.iter().map(|h| h.rps).collect()),
                self.h2load.iter().all(H2loadResult::agrees),
            )
        })
    }
}

/// `PolicyEngine::decide` timed call by call, in the benchmark's process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineTiming {
    /// Calls timed.
    pub decisions: usize,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Slowest, µs.
    pub max_us: f64,
}

/// One bundle size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScalingResult {
    /// Policies in the bundle.
    pub policies: usize,
    /// From spawning the server to its port accepting (process start + bundle load), ms.
    pub startup_ms: f64,
    /// Open-loop decision latency.
    pub open_loop: RateResult,
    /// Closed-loop decisions/s.
    pub closed_loop: Option<RateResult>,
    /// The engine alone (no gRPC, no audit), in the benchmark's process.
    #[serde(default)]
    pub engine: Option<EngineTiming>,
    /// Memory at the end.
    pub memory: Option<Memory>,
}

/// A scenario that did not run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Skipped {
    /// Scenario id.
    pub id: String,
    /// Why.
    pub reason: String,
}

/// Latency added over no-auth, per percentile, ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Added {
    /// Scenario id.
    pub scenario: String,
    /// Open-loop rate.
    pub rate: f64,
    /// Added p50, ms.
    pub p50_ms: f64,
    /// Added p90, ms.
    pub p90_ms: f64,
    /// Added p99, ms.
    pub p99_ms: f64,
    /// Added p99.9, ms.
    pub p999_ms: f64,
}

/// Arbiter divided by native ext_authz.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VersusExtAuthz {
    /// Open-loop rate (latency ratios), or `None` for the max-rps ratio.
    pub rate: Option<f64>,
    /// p50 ratio.
    pub p50: Option<f64>,
    /// p99 ratio.
    pub p99: Option<f64>,
    /// Max rps ratio (closed loop).
    pub max_rps: Option<f64>,
}

/// Ratios against the same run's baselines.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ratios {
    /// Added latency over no-auth, per scenario and rate.
    pub added_over_no_auth: Vec<Added>,
    /// Arbiter / native ext_authz.
    pub arbiter_vs_ext_authz: Vec<VersusExtAuthz>,
}

/// One performance target's verdict.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetLine {
    /// The target, as the issue states it.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// `PASS`, `MISS`, or `N/A` (not measured in this run).
    pub verdict: String,
    /// Caveats (e.g. no write-mode audit available yet).
    pub note: Option<String>,
}

impl Report {
    /// The scenario with `id`.
    pub fn scenario(&self, id: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.id == id)
    }

    /// Computes [`Report::ratios`] and [`Report::targets`] from the measurements.
    pub fn evaluate(&mut self) {
        self.ratios = self.compute_ratios();
        self.targets = self.compute_targets();
    }

    fn compute_ratios(&self) -> Ratios {
        let mut ratios = Ratios::default();
        let Some(base) = self.scenario(ids::NO_AUTH) else {
            return ratios;
        };
        for scenario in &self.scenarios {
            if scenario.id == ids::NO_AUTH {
                continue;
            }
            for run in &scenario.open_loop {
                let Some(floor) = base.open_loop.iter().find(|b| b.rate == run.rate) else {
                    continue;
                };
                let (s, f) = (&run.median.summary, &floor.median.summary);
                ratios.added_over_no_auth.push(Added {
                    scenario: scenario.id.clone(),
                    rate: run.rate,
                    p50_ms: s.p50_ms - f.p50_ms,
                    p90_ms: s.p90_ms - f.p90_ms,
                    p99_ms: s.p99_ms - f.p99_ms,
                    p999_ms: s.p999_ms - f.p999_ms,
                });
            }
        }
        if let (Some(arbiter), Some(native)) =
            (self.scenario(ids::ARBITER), self.scenario(ids::EXT_AUTHZ))
        {
            let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
            for run in &arbiter.open_loop {
                if let Some(peer) = native.open_loop.iter().find(|n| n.rate == run.rate) {
                    let (a, n) = (&run.median.summary, &peer.median.summary);
                    ratios.arbiter_vs_ext_authz.push(VersusExtAuthz {
                        rate: Some(run.rate),
                        p50: ratio(a.p50_ms, n.p50_ms),
                        p99: ratio(a.p99_ms, n.p99_ms),
                        max_rps: None,
                    });
                }
            }
            if let (Some(a), Some(n)) = (&arbiter.closed_loop, &native.closed_loop) {
                ratios.arbiter_vs_ext_authz.push(VersusExtAuthz {
                    rate: None,
                    p50: None,
                    p99: None,
                    max_rps: ratio(a.median.summary.rps, n.median.summary.rps),
                });
            }
        }
        ratios
    }

    fn compute_targets(&self) -> Vec<TargetLine> {
        let mut lines = Vec::new();
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" }.to_owned();
        let quick_note = |note: Option<String>| {
            if self.kind == "quick" {
                Some(match note {
                    Some(n) => format!("smoke run, not a measurement; {n}"),
                    None => "smoke run, not a measurement".to_owned(),
                })
            } else {
                note
            }
        };
        for (id, mode, limit) in [
            ("server_audit_write", "write-mode", 20_000.0),
            ("server_audit_fsync", "fsync", 15_000.0),
        ] {
            let target = format!(
                "policy server alone, one core, {mode} audit ≥ {} decisions/s",
                fmt_rate(limit)
            );
            let server = self.server_alone.iter().find(|s| s.id == id);
            lines.push(
                match server.and_then(|s| s.closed_loop.as_ref().map(|c| (s, c))) {
                    Some((s, c)) => {
                        let mut notes = Vec::new();
                        if let Some((rps, agrees)) = s.h2load_rps() {
                            notes.push(format!(
                                "h2load: {} decisions/s{}",
                                fmt_rate(rps),
                                if agrees {
                                    ""
                                } else {
                                    " (NOT every h2load success was an allow the server counted)"
                                }
                            ));
                        }
                        if c.median.client_cpu_busy > 0.9 && c.median.sut_cpu_busy < 0.9 {
                            notes.push(format!(
                                "load generator CPU {:.0} % busy, server {:.0} %: the client, not the server, was the limit",
                                c.median.client_cpu_busy * 100.0,
                                c.median.sut_cpu_busy * 100.0
                            ));
                        }
                        TargetLine {
                            target,
                            measured: format!(
                                "{} decisions/s (own client)",
                                fmt_rate(c.median.summary.rps)
                            ),
                            verdict: verdict(c.median.summary.rps >= limit),
                            note: quick_note((!notes.is_empty()).then(|| notes.join("; "))),
                        }
                    }
                    None => na(target, &format!("`{id}` did not run")),
                },
            );
        }
        let max_rps = |s: &ScalingResult| s.closed_loop.as_ref().map(|c| c.median.summary.rps);
        let target =
            "decisions/s at 1,000 and 10,000 policies ≥ 50 % of the 10-policy figure".to_owned();
        let mut sizes: Vec<&ScalingResult> = self.policy_scaling.iter().collect();
        sizes.sort_by_key(|s| s.policies);
        lines.push(match sizes.split_first() {
            Some((base, rest)) if !rest.is_empty() => match max_rps(base) {
                Some(b) if b > 0.0 => {
                    let shares: Vec<(usize, f64)> = rest
                        .iter()
                        .filter_map(|s| max_rps(s).map(|r| (s.policies, r / b)))
                        .collect();
                    TargetLine {
                        target,
                        measured: shares
                            .iter()
                            .map(|(n, share)| {
                                format!("{} policies {:.0} %", fmt_rate(*n as f64), share * 100.0)
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                        verdict: verdict(
                            !shares.is_empty() && shares.iter().all(|(_, share)| *share >= 0.5),
                        ),
                        note: quick_note(Some(format!(
                            "{} policies: {} decisions/s",
                            fmt_rate(base.policies as f64),
                            fmt_rate(b)
                        ))),
                    }
                }
                _ => na(target, "the smallest bundle answered nothing"),
            },
            _ => na(target, "policy scaling did not run"),
        });
        let target = "engine decision p99 at 10,000 policies ≤ 50 µs".to_owned();
        lines.push(
            match sizes
                .iter()
                .rev()
                .find_map(|s| s.engine.as_ref().map(|e| (s.policies, e)))
            {
                Some((n, e)) => TargetLine {
                    target,
                    measured: format!(
                        "{:.1} µs at {} policies ({} decisions timed)",
                        e.p99_us,
                        fmt_rate(n as f64),
                        e.decisions
                    ),
                    verdict: if n >= 10_000 {
                        verdict(e.p99_us <= 50.0)
                    } else {
                        "N/A".to_owned()
                    },
                    note: quick_note(
                        (n < 10_000).then(|| "no 10,000-policy bundle in this run".to_owned()),
                    ),
                },
                None => na(target, "the engine timing did not run"),
            },
        );
        let rps_ratio = self
            .ratios
            .arbiter_vs_ext_authz
            .iter()
            .find_map(|r| r.max_rps);
        let target = "arbiter / native ext_authz max rps ≥ 0.95 (same server)".to_owned();
        lines.push(match rps_ratio {
            Some(v) => TargetLine {
                target,
                measured: format!("{v:.2}"),
                verdict: verdict(v >= 0.95),
                note: quick_note(None),
            },
            None => na(target, "arbiter or ext_authz closed loop did not run"),
        });
        let target = "arbiter / native ext_authz p99 ≤ 1.10 at the same offered load (same server)"
            .to_owned();
        let at_rates: Vec<(f64, f64)> = self
            .ratios
            .arbiter_vs_ext_authz
            .iter()
            .filter_map(|r| Some((r.rate?, r.p99?)))
            .collect();
        lines.push(if at_rates.is_empty() {
            na(target, "arbiter or ext_authz open loop did not run")
        } else {
            let share = |rate: f64| {
                self.scenario(ids::EXT_AUTHZ)
                    .and_then(|s| s.open_loop.iter().find(|r| r.rate == rate))
                    .and_then(|r| r.share_of_ext_authz)
                    .map_or_else(String::new, |s| {
                        format!(" ({:.0} % of ext_authz max)", s * 100.0)
                    })
            };
            TargetLine {
                target,
                measured: at_rates
                    .iter()
                    .map(|(rate, v)| format!("{v:.2} at {} rps{}", fmt_rate(*rate), share(*rate)))
                    .collect::<Vec<_>>()
                    .join("; "),
                verdict: verdict(at_rates.iter().all(|(_, v)| *v <= 1.10)),
                note: quick_note(None),
            }
        });
        lines.push(na(
            "soak: Envoy RSS growth over 10 minutes ≤ 5 %, zero unexpected errors".to_owned(),
            "measured by `make soak` (bench/results/soak-<date>.json)",
        ));
        lines
    }

    /// The Markdown tables (printed and written next to the JSON).
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Arbiter benchmark, {} ({} run)\n",
            self.date, self.kind
        );
        if self.kind == "quick" {
            md.push_str("> **Smoke run** (`make bench-quick`): short runs, one repeat, possibly a debug build. It proves the harness works; its numbers are not measurements.\n\n");
        }
        let _ = writeln!(md, "> {}\n", self.machine.caveat);
        let _ = writeln!(
            md,
            "Machine: {} CPUs ({}), load average before {} / after {}. Client (load generator + mock upstream) on CPU {}, Envoy (`--concurrency {}`) + policy server on CPU {}. {} s per run after {} s warm-up, {} repeat(s) interleaved, medians shown. Total {:.0} s.\n",
            self.machine.cpus,
            self.machine.cpu_model.as_deref().unwrap_or("unknown"),
            fmt_load(self.machine.load_before),
            fmt_load(self.machine.load_after),
            self.method.client_cpus.as_deref().unwrap_or("any"),
            self.method.envoy_concurrency,
            self.method.server_cpus.as_deref().unwrap_or("any"),
            self.method.duration_s,
            self.method.warmup_s,
            self.method.repeats,
            self.total_s,
        );

        md.push_str("## Latency through Envoy (open loop, ms from the intended send time)\n\n");
        if let Some(max) = self.method.ext_authz_max_rps {
            let _ = writeln!(
                md,
                "Every scenario gets the same offered load: shares of native ext_authz's maximum rate in this run ({} rps, closed loop below). \"own max\" is that rate as a share of the scenario's own maximum.\n",
                fmt_rate(max)
            );
        }
        md.push_str("| scenario | rps | share of ext_authz max | own max | p50 | p90 | p99 | p99.9 | errors | Envoy CPU s/1k | server CPU s/1k |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in &self.scenarios {
            let own_max = s.closed_loop.as_ref().map(|c| c.median.summary.rps);
            for r in &s.open_loop {
                let m = &r.median;
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
                    s.label,
                    fmt_rate(r.rate),
                    fmt_share(r.share_of_ext_authz),
                    fmt_share(own_max.filter(|m| *m > 0.0).map(|m| r.rate / m)),
                    m.summary.p50_ms,
                    m.summary.p90_ms,
                    m.summary.p99_ms,
                    m.summary.p999_ms,
                    m.summary.errors,
                    fmt_opt(m.envoy_cpu_s_per_1k, 3),
                    fmt_opt(m.server_cpu_s_per_1k, 3),
                );
            }
        }
        md.push('\n');

        if !self.ratios.added_over_no_auth.is_empty() {
            md.push_str("## Added latency over no-auth (ms, same run)\n\n| scenario | rps | p50 | p90 | p99 | p99.9 |\n|---|---:|---:|---:|---:|---:|\n");
            for a in &self.ratios.added_over_no_auth {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:+.3} | {:+.3} | {:+.3} | {:+.3} |",
                    self.label_of(&a.scenario),
                    fmt_rate(a.rate),
                    a.p50_ms,
                    a.p90_ms,
                    a.p99_ms,
                    a.p999_ms
                );
            }
            md.push('\n');
        }

        md.push_str("## Maximum rate through Envoy (closed loop)\n\n");
        let _ = writeln!(
            md,
            "| scenario | max rps | p50 | p99 | errors | Envoy CPU s/1k | server CPU s/1k | Envoy+server CPU busy | client CPU busy | Envoy peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for s in &self.scenarios {
            if let Some(c) = &s.closed_loop {
                let m = &c.median;
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {:.0} % | {:.0} % | {} |",
                    s.label,
                    m.summary.rps,
                    m.summary.p50_ms,
                    m.summary.p99_ms,
                    m.summary.errors,
                    fmt_opt(m.envoy_cpu_s_per_1k, 3),
                    fmt_opt(m.server_cpu_s_per_1k, 3),
                    m.sut_cpu_busy * 100.0,
                    m.client_cpu_busy * 100.0,
                    fmt_opt(s.envoy_memory.map(|m| m.peak_rss_mib), 1),
                );
            }
        }
        md.push('\n');

        if !self.ratios.arbiter_vs_ext_authz.is_empty() {
            md.push_str("## Arbiter / native ext_authz (same server, same run)\n\n| measure | ratio |\n|---|---:|\n");
            for r in &self.ratios.arbiter_vs_ext_authz {
                match r.rate {
                    Some(rate) => {
                        let _ = writeln!(
                            md,
                            "| p50 at {} rps | {} |",
                            fmt_rate(rate),
                            fmt_opt(r.p50, 2)
                        );
                        let _ = writeln!(
                            md,
                            "| p99 at {} rps | {} |",
                            fmt_rate(rate),
                            fmt_opt(r.p99, 2)
                        );
                    }
                    None => {
                        let _ = writeln!(md, "| max rps | {} |", fmt_opt(r.max_rps, 2));
                    }
                }
            }
            md.push('\n');
        }

        if !self.server_alone.is_empty() {
            md.push_str("## Policy server alone (gRPC Check, one core)\n\n| variant | rps | p50 | p90 | p99 | p99.9 | errors | server CPU s/1k |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
            for s in &self.server_alone {
                for r in &s.open_loop {
                    let m = &r.median;
                    let _ = writeln!(
                        md,
                        "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |",
                        s.label,
                        fmt_rate(r.rate),
                        m.summary.p50_ms,
                        m.summary.p90_ms,
                        m.summary.p99_ms,
                        m.summary.p999_ms,
                        m.summary.errors,
                        fmt_opt(m.server_cpu_s_per_1k, 3)
                    );
                }
                if let Some(c) = &s.closed_loop {
                    let m = &c.median;
                    let _ = writeln!(
                        md,
                        "| {} | **max {:.0}** | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |",
                        s.label,
                        m.summary.rps,
                        m.summary.p50_ms,
                        m.summary.p90_ms,
                        m.summary.p99_ms,
                        m.summary.p999_ms,
                        m.summary.errors,
                        fmt_opt(m.server_cpu_s_per_1k, 3)
                    );
                }
            }
            md.push('\n');
            if self.server_alone.iter().any(|s| !s.h2load.is_empty()) {
                md.push_str("Cross-check with `h2load` (one connection, same streams, the same CheckRequest bytes; it reports no percentiles). \"server allows\" is the server's own allow counter over the run: equal to the successes means every request was a decision.\n\n| variant | h2load max rps (median) | own client max rps | mean ms | failed | server allows = successes | server CPU s/1k |\n|---|---:|---:|---:|---:|---|---:|\n");
                for s in &self.server_alone {
                    let Some((rps, agrees)) = s.h2load_rps() else {
                        continue;
                    };
                    let mean =
                        crate::latency::median(s.h2load.iter().filter_map(|h| h.mean_ms).collect());
                    let cpu: Vec<f64> = s
                        .h2load
                        .iter()
                        .filter_map(|h| h.server_cpu_s_per_1k)
                        .collect();
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {:.3} | {} | {} | {} |",
                        s.label,
                        fmt_rate(rps),
                        fmt_opt(s.closed_loop.as_ref().map(|c| c.median.summary.rps), 0),
                        mean,
                        s.h2load.iter().map(|h| h.failed).sum::<u64>(),
                        if agrees { "yes" } else { "**no**" },
                        fmt_opt((!cpu.is_empty()).then(|| crate::latency::median(cpu)), 3),
                    );
                }
                md.push('\n');
            }
        }

        if !self.policy_scaling.is_empty() {
            let _ = writeln!(
                md,
                "## Policy size scaling (server alone)\n\nLatency in an open loop at {} rps, or half the measured maximum when that is lower.; the engine columns time `PolicyEngine::decide` alone, call by call, in the benchmark's process (no gRPC, no audit).\n\n| policies | startup ms | max decisions/s | latency at rps | p50 | p90 | p99 | p99.9 | engine p50 µs | engine p99 µs | peak RSS MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                fmt_rate(self.method.scaling_rate)
            );
            for s in &self.policy_scaling {
                let m = &s.open_loop.median.summary;
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
                    fmt_rate(s.policies as f64),
                    s.startup_ms,
                    fmt_opt(s.closed_loop.as_ref().map(|c| c.median.summary.rps), 1),
                    fmt_rate(s.open_loop.rate),
                    m.p50_ms,
                    m.p90_ms,
                    m.p99_ms,
                    m.p999_ms,
                    fmt_opt(s.engine.as_ref().map(|e| e.p50_us), 1),
                    fmt_opt(s.engine.as_ref().map(|e| e.p99_us), 1),
                    fmt_opt(s.memory.map(|m| m.peak_rss_mib), 1),
                );
            }
            md.push('\n');
        }

        md.push_str("## Targets\n\n| target | measured | verdict | note |\n|---|---|---|---|\n");
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
        md.push('\n');

        if !self.skipped.is_empty() {
            md.push_str("## Skipped\n\n");
            for s in &self.skipped {
                let _ = writeln!(md, "- `{}`: {}", s.id, s.reason);
            }
            md.push('\n');
        }
        if !self.notes.is_empty() {
            md.push_str("## Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
            md.push('\n');
        }
        md
    }

    fn label_of(&self, id: &str) -> String {
        self.scenario(id)
            .map_or_else(|| id.to_owned(), |s| s.label.clone())
    }
}

fn na(target: String, why: &str) -> TargetLine {
    TargetLine {
        target,
        measured: "not measured".to_owned(),
        verdict: "N/A".to_owned(),
        note: Some(why.to_owned()),
    }
}

/// `1000` → `1,000`.
pub fn fmt_rate(rate: f64) -> String {
    let n = rate.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn fmt_share(share: Option<f64>) -> String {
    share.map_or_else(|| "–".to_owned(), |s| format!("{:.0} %", s * 100.0))
}

fn fmt_load(load: Option<[f64; 3]>) -> String {
    load.map_or_else(
        || "unknown".to_owned(),
        |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rate: f64, p50: f64, p99: f64, rps: f64) -> RateResult {
        let m = Measured {
            summary: Summary {
                ok: 100,
                p50_ms: p50,
                p90_ms: p50,
                p99_ms: p99,
                p999_ms: p99,
                rps,
                ..Summary::default()
            },
            ..Measured::default()
        };
        RateResult {
            rate,
            share_of_ext_authz: None,
            median: m.clone(),
            repeats: vec![m],
        }
    }

    fn scenario(id: &str, p50: f64, p99: f64, max: f64) -> ScenarioResult {
        ScenarioResult {
            id: id.to_owned(),
            label: id.to_owned(),
            open_loop: vec![run(1000.0, p50, p99, 1000.0)],
            closed_loop: Some(run(0.0, p50, p99, max)),
            ..ScenarioResult::default()
        }
    }

    #[test]
    fn ratios_and_verdicts_come_from_the_same_run() {
        let mut report = Report {
            kind: "full".into(),
            method: Method {
                rates: vec![500.0, 1000.0],
                ..Method::default()
            },
            audit: AuditSupport {
                audit_log: true,
                audit_sync: true,
            },
            scenarios: vec![
                scenario(ids::NO_AUTH, 0.30, 0.60, 10_000.0),
                scenario(ids::EXT_AUTHZ, 0.50, 1.00, 5_000.0),
                scenario(ids::ARBITER, 0.60, 1.20, 4_400.0),
            ],
            ..Report::default()
        };
        report.evaluate();
        let added = &report.ratios.added_over_no_auth;
        let arbiter = added.iter().find(|a| a.scenario == ids::ARBITER).unwrap();
        assert!((arbiter.p50_ms - 0.30).abs() < 1e-9);
        assert!((arbiter.p99_ms - 0.60).abs() < 1e-9);
        let vs = &report.ratios.arbiter_vs_ext_authz;
        assert!((vs[0].p99.unwrap() - 1.2).abs() < 1e-9);
        assert!((vs[1].max_rps.unwrap() - 0.88).abs() < 1e-9);
        let verdicts: Vec<&str> = report.targets.iter().map(|t| t.verdict.as_str()).collect();
        // Server alone (write, fsync), scaling and engine not in this report; rps 0.88 <
        // 0.95: MISS; p99 ratio 1.2 > 1.10: MISS; soak is `make soak`'s.
        assert_eq!(
            verdicts,
            ["N/A", "N/A", "N/A", "N/A", "MISS", "MISS", "N/A"]
        );
        let md = report.markdown();
        assert!(md.contains("| p99 at 1,000 rps | 1.20 |"));
        assert!(md.contains("**MISS**"));
    }

    #[test]
    fn the_targets_are_the_issues_and_judge_server_scaling_and_engine() {
        let server = |id: &str, rps: f64, h2load_rps: f64| ServerResult {
            id: id.to_owned(),
            label: id.to_owned(),
            closed_loop: Some(run(0.0, 1.0, 2.0, rps)),
            h2load: vec![H2loadResult {
                rps: h2load_rps,
                succeeded: 10,
                server_allows: Some(10),
                ..H2loadResult::default()
            }],
            ..ServerResult::default()
        };
        let scaling = |policies: usize, rps: f64, p99_us: f64| ScalingResult {
            policies,
            closed_loop: Some(run(0.0, 1.0, 2.0, rps)),
            engine: Some(EngineTiming {
                decisions: 100,
                p50_us: p99_us / 2.0,
                p99_us,
                max_us: p99_us,
            }),
            ..ScalingResult::default()
        };
        let mut report = Report {
            kind: "full".into(),
            server_alone: vec![
                server("server_audit_write", 21_000.0, 22_000.0),
                server("server_audit_fsync", 14_000.0, 15_500.0),
            ],
            policy_scaling: vec![
                scaling(10_000, 6_000.0, 40.0),
                scaling(10, 10_000.0, 10.0),
                scaling(1_000, 4_000.0, 20.0),
            ],
            ..Report::default()
        };
        report.evaluate();
        let line = |prefix: &str| {
            report
                .targets
                .iter()
                .find(|t| t.target.starts_with(prefix))
                .unwrap_or_else(|| panic!("no target `{prefix}`"))
                .clone()
        };
        let write = line("policy server alone, one core, write-mode audit ≥ 20,000");
        assert_eq!(write.verdict, "PASS");
        assert!(write.note.unwrap().contains("h2load: 22,000 decisions/s"));
        // The own client's figure decides, not h2load's.
        assert_eq!(
            line("policy server alone, one core, fsync audit ≥ 15,000").verdict,
            "MISS"
        );
        // 1,000 policies at 40 % of the 10-policy figure: MISS even though 10,000 is at 60 %.
        let scaling = line("decisions/s at 1,000 and 10,000 policies");
        assert_eq!(scaling.verdict, "MISS");
        assert_eq!(
            scaling.measured,
            "1,000 policies 40 %, 10,000 policies 60 %"
        );
        let engine = line("engine decision p99 at 10,000 policies ≤ 50 µs");
        assert_eq!(engine.verdict, "PASS");
        assert!(engine.measured.starts_with("40.0 µs at 10,000 policies"));
        assert_eq!(report.targets.len(), 7);
    }

    #[test]
    fn formats_rates_with_thousands_separators() {
        assert_eq!(fmt_rate(500.0), "500");
        assert_eq!(fmt_rate(1000.0), "1,000");
        assert_eq!(fmt_rate(20_000.0), "20,000");
        assert_eq!(fmt_rate(1_234_567.0), "1,234,567");
    }
}
