//! `arbiter audit verify` and `arbiter audit replay`.

use std::io::Write;
use std::path::PathBuf;

use crate::audit::checkpoint;
use crate::audit::replay::{self, Recorded, ReplayReport};
use crate::audit::verify::{self, VerifyReport};
use crate::audit::Verdict;
use crate::engine::PolicyEngine;

use super::{EXIT_ERROR, EXIT_FOUND, EXIT_OK};

/// `arbiter audit …`
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and gapless seq of audit files (rotated files in any order);
    /// with `--key`, also that every checkpoint is signed by that key and the chain is
    /// complete from seq 1 to the newest checkpoint (records after it: reported unsigned).
    ///
    /// Exit code 0: intact (and complete); 1: broken, missing records or a bad checkpoint
    /// (named as FILE:LINE); 2: a file or the key cannot be read.
    Verify(VerifyArgs),
    /// Re-decide recorded requests with a policy bundle: server-side audit records and
    /// Envoy access-log lines with an `arbiter_record` (requests the server did not decide:
    /// fail open, fail closed, allowed from the cache), each at its recorded time with the
    /// body facts it recorded.
    ///
    /// Prints a summary, every request decided differently now (a fail-open request
    /// policy denies: "would have been denied") and every record lacking facts the decision
    /// had (older records: "missing time, stream, …"). A record whose client-chosen values
    /// were recorded cut (its `cut` member: a path, model, … over the record's bound) is not
    /// replayed, since policy decided on the whole value: it is listed as not replayable,
    /// never counted as a difference or a match. Exit code 0: no difference; 1: some;
    /// 2: cannot run (unreadable file, invalid bundle).
    Replay(ReplayArgs),
}

/// Flags of `arbiter audit verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// PEM public key of `--audit-signing-key`: check every checkpoint's signature and
    /// prove the chain complete from seq 1 up to the newest checkpoint (exit 1 otherwise).
    #[arg(long, value_name = "PUB")]
    pub key: Option<PathBuf>,
    /// A checkpoints file kept elsewhere (a copy off the host, an OTLP copy); repeatable. A
    /// newer checkpoint here makes an older or truncated log fail.
    #[arg(long = "checkpoint", value_name = "FILE", requires = "key")]
    pub checkpoints: Vec<PathBuf>,
    /// Audit files (the active file and its rotated files) and `<log>.checkpoints`.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Flags of `arbiter audit replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Policy bundle directory to decide with.
    #[arg(long, value_name = "DIR")]
    pub policies: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replay only decisions made on routes in dry-run (records with `"dry_run": true`):
    /// before enforcing a route, which of its dry-run denies does this bundle still deny?
    #[arg(long)]
    pub dry_run: bool,
    /// Audit files and/or Envoy JSON access logs.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Runs `command`, printing to `out` (errors to stderr); returns the exit code.
pub fn run(command: AuditCommand, out: &mut impl Write) -> u8 {
    let result = match command {
        AuditCommand::Verify(args) => run_verify(&args, out),
        AuditCommand::Replay(args) => run_replay(&args, out),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            EXIT_ERROR
        }
    }
}

fn run_verify(args: &VerifyArgs, out: &mut impl Write) -> Result<u8, String> {
    let key = match &args.key {
        Some(path) => Some(checkpoint::load_verifying_key(path).map_err(|e| error_chain(&e))?),
        None => None,
    };
    let report = verify::verify_complete(&args.files, key.as_ref(), &args.checkpoints)
        .map_err(|e| error_chain(&e))?;
    let printed = if args.json {
        serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|json| writeln!(out, "{json}").map_err(|e| e.to_string()))
    } else {
        print_verify(&report, out).map_err(|e| e.to_string())
    };
    printed?;
    Ok(if report.ok() { EXIT_OK } else { EXIT_FOUND })
}

fn print_verify(report: &VerifyReport, out: &mut impl Write) -> std::io::Result<()> {
    for warning in &report.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    let range = match (report.first_seq, report.last_seq) {
        (Some(first), Some(last)) => format!(", seq {first}..={last}"),
        _ => String::new(),
    };
    match &report.broken {
        None => {
            writeln!(
                out,
                "ok: {} records in {} file(s){range}",
                report.records,
                report.files.len()
            )?;
            if let Some(hash) = &report.last_hash {
                writeln!(out, "last hash: {hash}")?;
            }
            if let Some(cp) = &report.checkpoint {
                writeln!(
                    out,
                    "complete: seq 1..={} proven by {} signed checkpoint(s), newest signed at {} (key {})",
                    cp.seq, report.checkpoints, cp.ts, cp.key_id
                )?;
                match report.unsigned {
                    Some((first, last)) => writeln!(out, "unsigned: seq {first}..={last}")?,
                    None => writeln!(out, "unsigned: none")?,
                }
            }
        }
        Some(broken) => {
            writeln!(out, "broken: {broken}")?;
            writeln!(out, "{} records verified before it{range}", report.records)?;
        }
    }
    Ok(())
}

fn run_replay(args: &ReplayArgs, out: &mut impl Write) -> Result<u8, String> {
    let engine = PolicyEngine::load(&args.policies).map_err(|e| {
        format!(
            "cannot load policy bundle `{}`: {}",
            args.policies.display(),
            error_chain(&e)
        )
    })?;
    let only = if args.dry_run {
        replay::Only::DryRun
    } else {
        replay::Only::All
    };
    let report = replay::replay(&engine, &args.files, only).map_err(|e| error_chain(&e))?;
    let printed = if args.json {
        serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|json| writeln!(out, "{json}").map_err(|e| e.to_string()))
    } else {
        print_replay(&report, args, out).map_err(|e| e.to_string())
    };
    printed?;
    Ok(if report.differences.is_empty() {
        EXIT_OK
    } else {
        EXIT_FOUND
    })
}

fn print_replay(
    report: &ReplayReport,
    args: &ReplayArgs,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let total = report.server.replayed
        + report.fail_open.replayed
        + report.fail_closed.replayed
        + report.cached.replayed;
    writeln!(
        out,
        "replayed {total} records against {} ({})",
        report.policy_version,
        args.policies.display()
    )?;
    writeln!(
        out,
        "  server decisions: {:>6} replayed, {} decided differently now",
        report.server.replayed, report.server.differ
    )?;
    if report.dry_run.replayed > 0 || args.dry_run {
        writeln!(
            out,
            "    of which on dry-run routes: {} ({} denies, not enforced: let through marked), {} decided differently now",
            report.dry_run.replayed, report.dry_run_denies, report.dry_run.differ
        )?;
    }
    writeln!(
        out,
        "  fail-open:        {:>6} replayed, {} would have been denied",
        report.fail_open.replayed, report.fail_open.differ
    )?;
    writeln!(
        out,
        "  fail-closed:      {:>6} replayed, {} would have been allowed",
        report.fail_closed.replayed, report.fail_closed.differ
    )?;
    writeln!(
        out,
        "  cached:           {:>6} replayed, {} would have been denied",
        report.cached.replayed, report.cached.differ
    )?;
    if !report.incomplete.is_empty() {
        let facts: Vec<String> = report
            .missing
            .iter()
            .map(|(fact, n)| format!("{fact} ({n})"))
            .collect();
        writeln!(
            out,
            "  incomplete:       {:>6} records lack facts the decision had, replayed without them: {}",
            report.incomplete.len(),
            facts.join(", ")
        )?;
    }
    if !report.cut.is_empty() {
        writeln!(
            out,
            "  not replayable:   {:>6} records whose values policy decided on were recorded cut (see below)",
            report.cut.len()
        )?;
    }
    if report.filtered > 0 {
        writeln!(
            out,
            "  left out:         {:>6} records not made on a dry-run route (--dry-run)",
            report.filtered
        )?;
    }
    if report.skipped > 0 {
        writeln!(
            out,
            "  skipped:          {:>6} lines without a record to replay (access-log lines of decided requests)",
            report.skipped
        )?;
    }
    if !report.differences.is_empty() {
        writeln!(out, "differences:")?;
    }
    for d in &report.differences {
        let recorded = match &d.recorded {
            Recorded::Server {
                decision: Verdict::Deny,
                dry_run: true,
                audit_id,
                ..
            } => format!("deny on a dry-run route, not enforced (audit id {audit_id})"),
            Recorded::Server {
                decision, audit_id, ..
            } => format!("{} (audit id {audit_id})", decision.as_str()),
            Recorded::FailOpen {
                reason,
                r#override: true,
            } => format!("fail_open ({reason}, override)"),
            Recorded::FailOpen { reason, .. } => format!("fail_open ({reason})"),
            Recorded::FailClosed { reason } => format!("fail_closed ({reason})"),
            Recorded::Cached { audit_id } => format!("cached (allowed by decision {audit_id})"),
        };
        let policies = if d.policy_ids.is_empty() {
            "no permit applies".to_owned()
        } else {
            format!("policies {}", d.policy_ids.join(", "))
        };
        let missing = if d.missing.is_empty() {
            String::new()
        } else {
            format!("; missing {}", d.missing.join(", "))
        };
        writeln!(
            out,
            "  {}:{}: {}: request {} on route {} by {}: {} {} ({}): recorded {recorded}; {policies}{missing}",
            d.file.display(),
            d.line,
            d.verdict,
            d.request_id,
            d.route,
            d.principal,
            d.method,
            d.path,
            d.action,
        )?;
    }
    if !report.incomplete.is_empty() {
        writeln!(out, "incomplete records:")?;
    }
    for i in &report.incomplete {
        writeln!(
            out,
            "  {}:{}: request {}: missing {}",
            i.file.display(),
            i.line,
            i.request_id,
            i.missing.join(", ")
        )?;
    }
    if !report.cut.is_empty() {
        writeln!(
            out,
            "not replayable (the record keeps only the first bytes of a value policy decided on; its `cut` member has the whole value's length and SHA-256):"
        )?;
    }
    for c in &report.cut {
        writeln!(
            out,
            "  {}:{}: request {}: recorded {}; cut {}",
            c.file.display(),
            c.line,
            c.request_id,
            c.recorded.label(),
            c.fields.join(", ")
        )?;
    }
    if !report.unreadable.is_empty() {
        writeln!(out, "unreadable lines ({}):", report.unreadable.len())?;
        for line in &report.unreadable {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}

/// `error: cause: cause` in one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
