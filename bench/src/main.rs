//! `arbiter-bench`: `run` (`make bench`, `make bench-quick`), `soak` (`make soak`) and
//! `profile` (the filter's per-request work, natively).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use arbiter_bench::filter_cpu::{self, FilterCpuPlan, RouteKind};
use arbiter_bench::runner::{self, Kind, Plan, Section};
use arbiter_bench::soak::{self, SoakPlan, SoakStack};
use arbiter_bench::{h2load, procfs, profile, readme, svg};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "arbiter-bench",
    about = "Arbiter benchmarks (see bench/README.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPUs for this process (load generator and mock upstream); default `0` on a machine
    /// with 2 or more CPUs.
    #[arg(long, global = true)]
    client_cpus: Option<String>,
    /// CPUs for Envoy and the policy server; default `1` on a machine with 2 or more CPUs.
    #[arg(long, global = true)]
    server_cpus: Option<String>,
    /// Do not pin processes to CPUs.
    #[arg(long, global = true)]
    no_pin: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every scenario, interleaved; writes `<out>/<date>.json`, `.md` and `.svg`.
    Run {
        /// `full` (minutes) or `quick` (under a minute, a smoke test).
        #[arg(long, value_enum, default_value_t = Kind::Full)]
        kind: Kind,
        /// Output directory.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Override the number of repeats.
        #[arg(long)]
        repeats: Option<usize>,
        /// Override the seconds per open-loop run.
        #[arg(long)]
        duration_s: Option<f64>,
        /// Run only these parts (comma-separated; default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<Section>,
    },
    /// The arbiter scenario at a steady rate; writes `<out>/soak-<date>.json` and `.md`.
    Soak {
        /// Measured minutes.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Requests per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Output directory.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// The Envoy under load: `arbiter` (judged), or `no-auth` / `ext-authz` baselines
        /// for telling Envoy's own memory behaviour from the filter's.
        #[arg(long, value_enum, default_value_t = SoakStack::Arbiter)]
        stack: SoakStack,
    },
    /// The filter's per-request host calls and native cost.
    Profile,
    /// Envoy CPU µs per request through one or more builds of the wasm module, by route
    /// (fixed request count, closed loop, interleaved repeats; see `src/filter_cpu.rs`).
    FilterCpu {
        /// `label=path` of a module (repeat to compare builds).
        #[arg(long = "wasm", required = true, value_parser = parse_module)]
        modules: Vec<(String, PathBuf)>,
        /// Routes to measure (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [RouteKind::Checked, RouteKind::Cached, RouteKind::Disabled])]
        routes: Vec<RouteKind>,
        /// Requests per measured run.
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        /// Connections (closed-loop workers).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Repeats of every module and route.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Record the first repeat with `perf record -e cpu-clock` into this directory.
        #[arg(long)]
        perf: Option<PathBuf>,
    },
    /// Writes the gRPC-framed CheckRequest the `h2load` cross-check sends, to drive the
    /// server by hand (`h2load --data`, profiling; see README "Where the time goes").
    CheckFrame {
        /// The file to write.
        out: PathBuf,
    },
    /// Regenerates the results section of the README from the newest results files.
    Readme {
        /// Directory holding `<date>.json` (and `soak-<date>.json`).
        #[arg(long, default_value = "bench/results")]
        results: PathBuf,
        /// The README whose generated section is rewritten.
        #[arg(long, default_value = "bench/README.md")]
        readme: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("arbiter-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    if let Command::Readme { results, readme } = &cli.command {
        readme::regenerate(readme, results)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (client_cpus, server_cpus, pin_note) = pinning(&cli);
    if let Some(cpus) = &client_cpus {
        // Before the runtime exists, so every thread of this process inherits it.
        procfs::pin(std::process::id(), cpus)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_cpus.as_deref().map_or(2, cpu_list_len))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Ending the run (and so dropping every Envoy and policy server, which kills them)
        // on Ctrl-C or SIGTERM: otherwise the children would outlive the benchmark.
        tokio::select! {
            result = command(cli.command, client_cpus, server_cpus, pin_note) => result,
            () = interrupted() => anyhow::bail!("interrupted; every process it started was stopped"),
        }
    })
}

async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn command(
    command: Command,
    client_cpus: Option<String>,
    server_cpus: Option<String>,
    pin_note: Option<String>,
) -> Result<ExitCode> {
    match command {
        Command::Run {
            kind,
            out,
            repeats,
            duration_s,
            only,
        } => {
            let mut plan = match kind {
                Kind::Full => Plan::full(),
                Kind::Quick => Plan::quick(),
            };
            if let Some(r) = repeats {
                plan.repeats = r.max(1);
            }
            if let Some(d) = duration_s {
                plan.duration = Duration::from_secs_f64(d.max(0.1));
            }
            if !only.is_empty() {
                plan.sections = only;
            }
            plan.client_cpus = client_cpus;
            plan.server_cpus = server_cpus;
            let mut report = runner::run(&plan).await?;
            if let Some(note) = pin_note {
                report.notes.push(note);
            }
            let md = report.markdown();
            println!("\n{md}");
            let stem = report.date.clone();
            write(
                &out,
                &format!("{stem}.json"),
                &serde_json::to_string_pretty(&report)?,
            )?;
            write(&out, &format!("{stem}.md"), &md)?;
            write(&out, &format!("{stem}.svg"), &svg::render(&report))?;
            let problems = runner::problems(&report, &plan.sections);
            if problems.is_empty() {
                println!(
                    "bench: every scenario ran and produced numbers ({:.0} s)",
                    report.total_s
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    eprintln!("bench: {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Soak {
            minutes,
            rate,
            out,
            stack,
        } => {
            let mut plan = Plan::full();
            plan.client_cpus = client_cpus;
            plan.server_cpus = server_cpus;
            let soak_plan = SoakPlan {
                stack,
                duration: Duration::from_secs_f64(minutes.max(0.05) * 60.0),
                rate,
                warmup: Duration::from_secs(20).min(Duration::from_secs_f64(minutes * 60.0)),
                chunk: Duration::from_secs(10),
            };
            let report = soak::soak(&plan, &soak_plan).await?;
            let md = report.markdown();
            println!("\n{md}");
            let stem = format!("soak-{}", report.date);
            write(
                &out,
                &format!("{stem}.json"),
                &serde_json::to_string_pretty(&report)?,
            )?;
            write(&out, &format!("{stem}.md"), &md)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Profile => {
            let profile = profile::run().await?;
            println!("{}", profile.markdown());
            Ok(ExitCode::SUCCESS)
        }
        Command::FilterCpu {
            modules,
            routes,
            requests,
            connections,
            repeats,
            perf,
        } => {
            let mut plan = Plan::full();
            plan.client_cpus = client_cpus;
            plan.server_cpus = server_cpus;
            let cpu_plan = FilterCpuPlan {
                modules,
                routes,
                requests: requests.max(1),
                connections,
                repeats: repeats.max(1),
                perf,
            };
            let md = filter_cpu::run(&cpu_plan, &plan).await?;
            if let Some(note) = pin_note {
                println!("{note}");
            }
            println!("\n{md}");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckFrame { out } => {
            std::fs::write(&out, h2load::grpc_frame()?)
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Readme { results, readme } => {
            readme::regenerate(&readme, &results)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Client and server CPU lists, and a note when the run is not pinned.
fn pinning(cli: &Cli) -> (Option<String>, Option<String>, Option<String>) {
    if cli.no_pin {
        return (
            None,
            None,
            Some("processes not pinned (--no-pin)".to_owned()),
        );
    }
    let has_taskset = std::process::Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_taskset {
        return (
            None,
            None,
            Some("processes not pinned: `taskset` (util-linux) not found".to_owned()),
        );
    }
    match (&cli.client_cpus, &cli.server_cpus, procfs::cpu_count()) {
        (Some(c), Some(s), _) => (Some(c.clone()), Some(s.clone()), None),
        (c, s, n) if n >= 2 => (
            Some(c.clone().unwrap_or_else(|| "0".to_owned())),
            Some(s.clone().unwrap_or_else(|| "1".to_owned())),
            None,
        ),
        _ => (
            None,
            None,
            Some("processes not pinned: only one CPU".to_owned()),
        ),
    }
}

/// `label=path` of `--wasm`.
fn parse_module(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((label, path)) if !label.is_empty() && !path.is_empty() => {
            Ok((label.to_owned(), PathBuf::from(path)))
        }
        _ => Err(format!("expected label=path, got `{s}`")),
    }
}

/// Number of CPUs in a list like `0`, `0-1` or `0,2-3`.
fn cpu_list_len(list: &str) -> usize {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("bench: wrote {}", path.display());
    Ok(())
}
