//! `arbiter`: the operator command line (`validate`, `check`, `test`, `fmt`, `schema`,
//! `audit verify`, `audit replay`, `probe`, `bundle build|sign|verify|push`). Flags are parsed here; the work is in
//! `arbiter_policy_server::cli` and `arbiter_policy_server::probe`.

use std::path::PathBuf;
use std::process::ExitCode;

use arbiter_policy_server::cli::audit::{self, AuditCommand};
use arbiter_policy_server::cli::bundle::{self, BundleCommand};
use arbiter_policy_server::cli::policy::{self, key_value, RequestSpec};
use arbiter_policy_server::cli::{EXIT_ERROR, EXIT_FOUND};
use arbiter_policy_server::probe::{probe, ProbeOptions};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "arbiter",
    version,
    about = "Arbiter policy tools: validate and try policy bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a bundle as the server would load it; exit 1 with `file:line:column: problem`
    /// lines if it is invalid.
    Validate {
        /// Bundle directory.
        dir: PathBuf,
    },
    /// Decide one request with a bundle and print the decision, the determining policies
    /// and why. Exit 0 once decided (1 if `--expect` does not match, 2 on errors).
    Check(Box<CheckArgs>),
    /// Run a directory of policy test cases against a bundle; print each case, a summary and
    /// the policies no case exercised. Exit 0 when every case passed, 1 when one failed (or,
    /// with `--require-coverage`, a policy was not exercised), 2 on unusable input.
    Test(TestArgs),
    /// Format Cedar policy files (a bundle directory or files) with Cedar's formatter. With
    /// `--check`, change nothing: list the files that are not formatted and exit 1. Exit 2
    /// when a file is not valid Cedar (it is never touched).
    Fmt {
        /// Bundle directories or `.cedar` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Only check: exit 1 and name each file that formatting would change.
        #[arg(long)]
        check: bool,
    },
    /// Print the built-in Arbiter Cedar schema that bundles are validated against.
    Schema,
    /// Audit log tools: verify the hash chain, replay records against a bundle.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Incident runbook check: what a route does right now (fail mode, override, breaker)
    /// and what a synthetic request gets, through Envoy and/or straight from the server.
    /// Exit 0 when the probe ran (whatever it found), 2 when it could not.
    Probe(ProbeArgs),
    /// Policy supply chain: build a bundle artifact, sign it, verify it, push it to an OCI
    /// registry. Exit 0 on success, 2 on any error.
    #[command(subcommand)]
    Bundle(BundleCommand),
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Directory of test case files (`*.json`; see the README).
    dir: PathBuf,
    /// Bundle directory the cases run against.
    #[arg(long)]
    policies: PathBuf,
    /// Also write the results as JUnit XML to this file (its directory is created).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Exit 1 when a policy of the bundle is exercised by no case.
    #[arg(long)]
    require_coverage: bool,
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// Envoy route name.
    #[arg(long)]
    route: String,
    /// Envoy admin base URL (reads the route's settings and breaker state).
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    envoy_admin: String,
    /// Envoy listener base URL for a synthetic request (omit to skip).
    #[arg(long)]
    envoy_url: Option<String>,
    /// Policy server gRPC address for a direct Check (omit to skip).
    #[arg(long)]
    server: Option<String>,
    /// HTTP method of the synthetic request.
    #[arg(long, default_value = "POST")]
    method: String,
    /// Path of the synthetic request.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Request header `name=value` (repeatable).
    #[arg(long = "header", value_parser = key_value)]
    headers: Vec<(String, String)>,
    /// Bound on each network call, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Bundle directory.
    dir: PathBuf,
    /// The request as a JSON file (the fields of the flags below; see the README).
    #[arg(long, conflicts_with_all = ["principal", "api_key", "jwt_claims", "path"])]
    request: Option<PathBuf>,
    /// mTLS peer principal (SPIFFE ID).
    #[arg(long)]
    principal: Option<String>,
    /// API key, sent as `x-api-key`.
    #[arg(long)]
    api_key: Option<String>,
    /// Verified JWT claims, as a JSON object.
    #[arg(long)]
    jwt_claims: Option<String>,
    /// HTTP method (default POST with a body, else GET).
    #[arg(long)]
    method: Option<String>,
    /// Request path.
    #[arg(long, required_unless_present = "request")]
    path: Option<String>,
    /// Envoy route name.
    #[arg(long)]
    route: Option<String>,
    /// Route context entry `key=value` (repeatable; `action=...` sets the action).
    #[arg(long = "context", value_parser = key_value)]
    context: Vec<(String, String)>,
    /// Request header `name=value` (repeatable), e.g. `x-tenant-id=acme`.
    #[arg(long = "header", value_parser = key_value)]
    headers: Vec<(String, String)>,
    /// Request body file.
    #[arg(long)]
    body: Option<PathBuf>,
    /// The body was cut at the route's max_body_bytes.
    #[arg(long)]
    body_truncated: bool,
    /// The CheckRequest's `http.size`: the full body length, or -1 when unknown (chunked).
    /// Default: the length of the body sent (0 without one).
    #[arg(long, allow_negative_numbers = true)]
    body_size: Option<i64>,
    /// Request time (RFC 3339), default now.
    #[arg(long)]
    time: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Exit 1 unless the decision is this.
    #[arg(long, value_enum)]
    expect: Option<Expect>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Expect {
    Allow,
    Deny,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Validate { dir } => match policy::validate(&dir) {
            Ok(ok) => {
                println!(
                    "ok: `{}` is valid: {} policies, {} entities, version {}",
                    dir.display(),
                    ok.policies,
                    ok.entities,
                    ok.version
                );
                let (indexed, by_condition) = ok.indexed;
                println!(
                    "index: {indexed} of {} policies indexed ({}%; {by_condition} by condition), the rest are evaluated for every request of their action",
                    ok.policies,
                    (indexed * 100).checked_div(ok.policies).unwrap_or(100)
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                for problem in error.problems() {
                    eprintln!("{problem}");
                }
                eprintln!("error: `{}` is not a valid bundle", dir.display());
                ExitCode::FAILURE
            }
        },
        Command::Check(args) => check(*args),
        Command::Test(args) => run_test(&args),
        Command::Fmt { paths, check } => run_fmt(&paths, check),
        Command::Schema => {
            print!("{}", arbiter_policy_server::schema::BASE_SCHEMA);
            ExitCode::SUCCESS
        }
        Command::Audit(command) => {
            ExitCode::from(audit::run(command, &mut std::io::stdout().lock()))
        }
        Command::Probe(args) => run_probe(&args),
        Command::Bundle(command) => match bundle::run(command) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn run_test(args: &TestArgs) -> ExitCode {
    use arbiter_policy_server::cli::test::{self, TestError};
    let report = match test::run(&args.dir, &args.policies) {
        Ok(report) => report,
        Err(TestError::Cli(policy::CliError::Bundle(error))) => {
            for problem in error.problems() {
                eprintln!("{problem}");
            }
            eprintln!("error: `{}` is not a valid bundle", args.policies.display());
            return ExitCode::from(EXIT_ERROR);
        }
        Err(e) => {
            eprintln!("error: {}", arbiter_policy_server::schema::error_chain(&e));
            return ExitCode::from(EXIT_ERROR);
        }
    };
    print!("{}", report.to_text());
    if let Some(path) = &args.junit {
        // CI steps name a report directory that does not exist yet (`reports/…`).
        let written = report.to_junit().and_then(|xml| {
            if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, xml)
        });
        if let Err(e) = written {
            eprintln!("error: cannot write `{}`: {e}", path.display());
            return ExitCode::from(EXIT_ERROR);
        }
    }
    if report.failed() > 0 || (args.require_coverage && !report.unexercised.is_empty()) {
        ExitCode::from(EXIT_FOUND)
    } else {
        ExitCode::SUCCESS
    }
}

fn run_fmt(paths: &[PathBuf], check: bool) -> ExitCode {
    use arbiter_policy_server::cli::fmt::{self, Outcome};
    let files = match fmt::cedar_files(paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let (mut changed, mut errors) = (0, 0);
    for file in &files {
        match fmt::format_file(file, check) {
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Reformatted) => {
                changed += 1;
                if check {
                    println!("{}", file.display());
                } else {
                    eprintln!("formatted {}", file.display());
                }
            }
            Err(e) => {
                errors += 1;
                eprintln!("error: {}", arbiter_policy_server::schema::error_chain(&e));
            }
        }
    }
    if errors > 0 {
        ExitCode::from(EXIT_ERROR)
    } else if check && changed > 0 {
        eprintln!(
            "{changed} of {} files are not formatted (run `arbiter fmt` on them)",
            files.len()
        );
        ExitCode::from(EXIT_FOUND)
    } else {
        ExitCode::SUCCESS
    }
}

fn run_probe(args: &ProbeArgs) -> ExitCode {
    let options = ProbeOptions {
        envoy_admin: Some(args.envoy_admin.clone()),
        envoy_url: args.envoy_url.clone(),
        server: args.server.clone(),
        route: args.route.clone(),
        method: args.method.clone(),
        path: args.path.clone(),
        headers: args.headers.clone(),
        timeout: std::time::Duration::from_millis(args.timeout_ms),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(probe(&options)) {
        Ok(report) if args.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let spec = match spec(&args) {
        Ok(spec) => spec,
        Err(e) => return fail(&e),
    };
    let report = match policy::check(&args.dir, &spec) {
        Ok(report) => report,
        Err(policy::CliError::Bundle(error)) => {
            for problem in error.problems() {
                eprintln!("{problem}");
            }
            return ExitCode::from(2);
        }
        Err(e) => return fail(&e),
    };
    if args.json {
        println!("{:#}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    match args.expect {
        Some(Expect::Allow) if !report.decision.allowed => ExitCode::FAILURE,
        Some(Expect::Deny) if report.decision.allowed => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

fn spec(args: &CheckArgs) -> Result<RequestSpec, policy::CliError> {
    if let Some(path) = &args.request {
        return policy::read_spec(path);
    }
    let jwt_claims = match &args.jwt_claims {
        Some(text) => match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(claims)) => Some(claims),
            _ => {
                return Err(policy::CliError::Request(
                    "`--jwt-claims` must be a JSON object".to_owned(),
                ))
            }
        },
        None => None,
    };
    Ok(RequestSpec {
        principal: args.principal.clone(),
        jwt_claims,
        api_key: args.api_key.clone(),
        method: args.method.clone(),
        path: args.path.clone().unwrap_or_default(),
        route: args.route.clone(),
        context: args.context.iter().cloned().collect(),
        headers: args.headers.iter().cloned().collect(),
        body_truncated: args.body_truncated,
        body_size: args.body_size,
        time: args.time.clone(),
        raw_body: match &args.body {
            Some(path) => Some(policy::read_body(path)?),
            None => None,
        },
        ..RequestSpec::default()
    })
}

fn fail(error: &policy::CliError) -> ExitCode {
    eprintln!(
        "error: {}",
        arbiter_policy_server::schema::error_chain(error)
    );
    ExitCode::from(2)
}
