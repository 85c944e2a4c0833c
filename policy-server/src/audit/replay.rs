//! `arbiter audit replay`: re-decides recorded requests with a bundle.
//!
//! Reads server-side audit records and Envoy access-log lines carrying an `arbiter_record`
//! (the filter's record of a request the server did not decide: fail open, fail closed, or
//! allowed from the allow-cache), rebuilds the `CheckRequest` each one stands for and
//! decides it with the same mapping and engine as the server, at the record's own time and
//! with the body facts it kept. A fact an older record lacks is decided without and named
//! ([`Incomplete`]), never silently defaulted. A record whose client-chosen value was
//! recorded cut (its `cut` member, see [`crate::audit::bound`]) is not decided at all: every
//! such value (path, host, model, …) is an input policy may read, and the record holds only
//! its first bytes, so no replay of it is exact. It is reported as such ([`CutRecord`]),
//! neither as a difference nor as a match.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    AttributeContext, CheckRequest,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value as ProtoValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::{AuditRecord, Verdict};
use crate::ai::BodyAttributes;
use crate::engine::PolicyEngine;
use crate::identity::JWT_PAYLOAD_KEY;
use crate::request::{AuthzRequest, TimeSource, ACTION_KEY, DRY_RUN_KEY, ROUTE_KEY, TENANT_HEADER};

/// Key of the filter's record in an Envoy JSON access-log line.
pub const ENVOY_RECORD_KEY: &str = "arbiter_record";

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No file was given.
    #[error("no record file given")]
    NoFiles,
    /// A file cannot be read.
    #[error("cannot read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What happened to the request when it was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Recorded {
    /// The policy server decided it.
    Server {
        /// Its decision.
        decision: Verdict,
        /// Made on a route in dry-run: a deny was not enforced (the request went upstream
        /// marked `x-arbiter-dry-run: deny`).
        dry_run: bool,
        /// Its audit id.
        audit_id: String,
        /// The bundle that decided.
        policy_version: String,
    },
    /// Nobody decided; the route's fail mode let it through.
    FailOpen {
        /// Why there was no decision.
        reason: String,
        /// Whether a `fail_open_until` override applied.
        r#override: bool,
    },
    /// Nobody decided; the route's fail mode refused it.
    FailClosed {
        /// Why there was no decision.
        reason: String,
    },
    /// Allowed from the filter's allow-cache by an earlier decision of the server.
    Cached {
        /// The audit id of the decision that allowed it (empty if the record has none).
        audit_id: String,
    },
}

impl Recorded {
    /// What a replayed decision is compared with: for a server record, the decision policy
    /// made — a dry-run deny is a deny, though it went upstream, because replay asks what
    /// policy decides; for the filter's records, whether the request went upstream.
    fn allowed(&self) -> bool {
        match self {
            Self::Server { decision, .. } => *decision == Verdict::Allow,
            Self::FailOpen { .. } | Self::Cached { .. } => true,
            Self::FailClosed { .. } => false,
        }
    }

    /// What happened, in a few words (`allow`, `fail_open (timeout)`, …).
    pub fn label(&self) -> String {
        match self {
            Self::Server {
                decision: Verdict::Deny,
                dry_run: true,
                ..
            } => "deny (dry-run: not enforced, let through marked)".to_owned(),
            Self::Server { decision, .. } => decision.as_str().to_owned(),
            Self::FailOpen {
                reason,
                r#override: true,
            } => format!("fail_open ({reason}, override)"),
            Self::FailOpen { reason, .. } => format!("fail_open ({reason})"),
            Self::FailClosed { reason } => format!("fail_closed ({reason})"),
            Self::Cached { audit_id } => format!("cached (allowed by decision {audit_id})"),
        }
    }
}

/// One request whose replayed decision differs from what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// Where the record is.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// Envoy's request id.
    pub request_id: String,
    /// Route name.
    pub route: String,
    /// Caller id.
    pub principal: String,
    /// Cedar action.
    pub action: String,
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// What happened then.
    pub recorded: Recorded,
    /// What the bundle decides now.
    pub replayed: Verdict,
    /// The determining policies now.
    pub policy_ids: Vec<String>,
    /// One line for humans: "would have been denied", …
    pub verdict: String,
    /// Facts the original decision had that the record does not hold (replayed with the
    /// defaults documented for each, see [`Incomplete`]).
    pub missing: Vec<&'static str>,
}

/// A record that lacks facts the original decision had (written by an older version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incomplete {
    /// Where the record is.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// Envoy's request id.
    pub request_id: String,
    /// The facts it lacks, by their `context` name (`time`, `stream`, …, and `identity`).
    pub missing: Vec<&'static str>,
}

/// A record that cannot be replayed exactly: values policy decided on were recorded cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CutRecord {
    /// Where the record is.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// Envoy's request id (as recorded: itself cut when `request_id` is among `fields`).
    pub request_id: String,
    /// What happened then.
    pub recorded: Recorded,
    /// The fields recorded cut, by their record name (`path`, `model`, …).
    pub fields: Vec<String>,
}

/// Counts per kind of record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Records replayed.
    pub replayed: u64,
    /// Of those, decided differently now.
    pub differ: u64,
    /// Of those, records lacking facts the original decision had.
    pub incomplete: u64,
    /// Records not replayed because values policy decided on were recorded cut (not among
    /// `replayed`).
    pub cut: u64,
}

/// The outcome of a replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Version of the bundle replayed against.
    pub policy_version: String,
    /// Server-side decisions.
    pub server: Tally,
    /// Of those, decisions made on routes in dry-run.
    pub dry_run: Tally,
    /// Of those, denies (not enforced: let through marked).
    pub dry_run_denies: u64,
    /// Envoy-side fail-open records.
    pub fail_open: Tally,
    /// Envoy-side fail-closed records.
    pub fail_closed: Tally,
    /// Envoy-side records of requests allowed from the allow-cache.
    pub cached: Tally,
    /// Lines that are neither (e.g. access-log lines of decided requests).
    pub skipped: u64,
    /// Records left out because only dry-run decisions were asked for.
    pub filtered: u64,
    /// Lines that could not be read as a record, with why.
    pub unreadable: Vec<String>,
    /// Every request decided differently now, in input order.
    pub differences: Vec<Difference>,
    /// How many replayed records lack each fact, by fact.
    pub missing: BTreeMap<&'static str, u64>,
    /// Every replayed record that lacks facts, in input order.
    pub incomplete: Vec<Incomplete>,
    /// Every record not replayed because values policy decided on were recorded cut, in
    /// input order: neither a difference nor a match.
    pub cut: Vec<CutRecord>,
}

/// Which records to replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Only {
    /// Every record.
    #[default]
    All,
    /// Server decisions made on routes in dry-run (`"dry_run": true`).
    DryRun,
}

/// Replays every record in `files` (in the order given) chosen by `only` against `engine`.
pub fn replay(
    engine: &PolicyEngine,
    files: &[PathBuf],
    only: Only,
) -> Result<ReplayReport, ReplayError> {
    if files.is_empty() {
        return Err(ReplayError::NoFiles);
    }
    let mut report = ReplayReport {
        policy_version: engine.bundle().version().to_owned(),
        ..ReplayReport::default()
    };
    for path in files {
        let text = std::fs::read(path).map_err(|source| ReplayError::Read {
            path: path.clone(),
            source,
        })?;
        for (index, line) in text.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            replay_line(engine, path, index + 1, line, only, &mut report);
        }
    }
    Ok(report)
}

fn replay_line(
    engine: &PolicyEngine,
    path: &Path,
    line: usize,
    bytes: &[u8],
    only: Only,
    report: &mut ReplayReport,
) {
    let at = format!("{}:{line}", path.display());
    let case = match parse(bytes) {
        Ok(Some(case)) => case,
        Ok(None) => {
            report.skipped += 1;
            return;
        }
        Err(why) => {
            report.unreadable.push(format!("{at}: {why}"));
            return;
        }
    };
    let dry_run = matches!(case.recorded, Recorded::Server { dry_run: true, .. });
    if only == Only::DryRun && !dry_run {
        report.filtered += 1;
        return;
    }
    if !case.cut.is_empty() {
        let tally = match case.recorded {
            Recorded::Server { .. } => &mut report.server,
            Recorded::FailOpen { .. } => &mut report.fail_open,
            Recorded::FailClosed { .. } => &mut report.fail_closed,
            Recorded::Cached { .. } => &mut report.cached,
        };
        tally.cut += 1;
        if dry_run {
            report.dry_run.cut += 1;
        }
        let request_id = case
            .check
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .map(|http| http.id)
            .unwrap_or_default();
        report.cut.push(CutRecord {
            file: path.to_owned(),
            line,
            request_id,
            recorded: case.recorded,
            fields: case.cut,
        });
        return;
    }
    let mut req = match AuthzRequest::try_from(case.check) {
        Ok(req) => req,
        Err(e) => {
            report.unreadable.push(format!("{at}: {e}"));
            return;
        }
    };
    let missing = case.facts.missing();
    case.facts.apply(&mut req);
    let decision = match engine.decide(&req) {
        Ok(decision) => decision,
        Err(e) => {
            report.unreadable.push(format!("{at}: {e}"));
            return;
        }
    };
    let tally = match case.recorded {
        Recorded::Server { .. } => &mut report.server,
        Recorded::FailOpen { .. } => &mut report.fail_open,
        Recorded::FailClosed { .. } => &mut report.fail_closed,
        Recorded::Cached { .. } => &mut report.cached,
    };
    tally.replayed += 1;
    if dry_run {
        report.dry_run.replayed += 1;
        if !case.recorded.allowed() {
            report.dry_run_denies += 1;
        }
    }
    let incomplete = !missing.is_empty();
    if incomplete {
        tally.incomplete += 1;
        for fact in &missing {
            *report.missing.entry(fact).or_default() += 1;
        }
        report.incomplete.push(Incomplete {
            file: path.to_owned(),
            line,
            request_id: req.request_id.clone(),
            missing: missing.clone(),
        });
    }
    if dry_run && incomplete {
        report.dry_run.incomplete += 1;
    }
    if case.recorded.allowed() == decision.allowed {
        return;
    }
    tally.differ += 1;
    if dry_run {
        report.dry_run.differ += 1;
    }
    let replayed = if decision.allowed {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    let verdict = match (&case.recorded, replayed) {
        (Recorded::Server { .. }, _) => format!(
            "recorded {}, now {}",
            case.recorded.label(),
            replayed.as_str()
        ),
        (_, Verdict::Deny) => "would have been denied".to_owned(),
        (_, Verdict::Allow) => "would have been allowed".to_owned(),
    };
    report.differences.push(Difference {
        file: path.to_owned(),
        line,
        request_id: req.request_id,
        route: req.route,
        principal: req.principal,
        action: req.action,
        method: req.method,
        path: req.path,
        recorded: case.recorded,
        replayed,
        policy_ids: decision.policy_ids,
        verdict,
        missing,
    });
}

struct Case {
    recorded: Recorded,
    check: CheckRequest,
    facts: Facts,
    /// The record's fields recorded cut: when any, the case is not decided.
    cut: Vec<String>,
}

/// What the record says about evidence the rebuilt `CheckRequest` cannot carry (the API key
/// exists only as its hash, the body only as its attributes, the time is the record's).
#[derive(Debug, Default)]
struct Facts {
    api_key_sha256: Option<String>,
    tenant: Option<String>,
    /// When the decision was (or would have been) made; `None`: the record does not say.
    time: Option<SystemTime>,
    /// What to decide at when `time` is missing: an older server record's `ts`, written
    /// just after the decision (else the time of the replay).
    fallback_time: Option<SystemTime>,
    model: Option<String>,
    body_bytes: Option<u64>,
    body_size_known: Option<bool>,
    body_truncated: Option<bool>,
    body_sha256: Option<String>,
    body_parse_error: Option<bool>,
    stream: Option<bool>,
    max_tokens: Option<i64>,
    message_count: Option<i64>,
    /// Whether a body was sent to policy, when the record shows it either way.
    body_sent: Option<bool>,
    /// The record holds what the body told policy (`body_parse_error`, `stream`,
    /// `max_tokens`, `message_count`): a `None` among them is "the body did not say".
    body_parsed_recorded: bool,
    /// Whether an API-key hash and JWT claims were recorded (older server records kept only
    /// the principal).
    identity_recorded: bool,
}

impl Facts {
    /// Facts the original decision had that this record does not hold, by their `context`
    /// name. Replay decides without them (the defaults in [`Facts::apply`]), and says so.
    fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.time.is_none() {
            missing.push("time");
        }
        if !self.identity_recorded {
            missing.push("identity");
        }
        if self.body_bytes.is_none() && self.body_size_known != Some(false) {
            missing.push("body_bytes");
        }
        if self.body_size_known.is_none() && !self.complete_body() {
            missing.push("body_size_known");
        }
        if !self.body_parsed_recorded {
            match (self.body_truncated, self.body_sent) {
                // Nothing was parsed: a body cut at the limit, or none.
                (Some(true), _) | (_, Some(false)) => {}
                (truncated, _) => {
                    if truncated.is_none() {
                        missing.push("body_truncated");
                    }
                    // A model was read, so the body parsed.
                    if self.model.is_none() {
                        missing.push("body_parse_error");
                    }
                    missing.extend(["stream", "max_tokens", "message_count"]);
                }
            }
        }
        missing
    }

    /// An older record shows a complete body (hash present, not cut): its size was exact.
    fn complete_body(&self) -> bool {
        self.body_sha256.is_some() && self.body_truncated == Some(false)
    }

    fn apply(self, req: &mut AuthzRequest) {
        let complete_body = self.complete_body();
        if self.api_key_sha256.is_some() {
            req.identity.api_key_sha256 = self.api_key_sha256;
            req.principal = req.identity.display();
        }
        if self.tenant.is_some() {
            req.requested_tenant = self.tenant;
        }
        // The record's time, not the replay's: time-bounded policies decide as they did.
        // Without one (reported missing) the rebuilt request keeps the time of the replay.
        if let Some(time) = self.time.or(self.fallback_time) {
            req.time = time;
            req.time_source = TimeSource::Request;
        }
        // Records without `body_size_known`: exact only if they show the complete body was
        // sent (the server's own rule); replay assumes nothing a record does not say.
        let size_known = match (self.body_bytes, self.body_size_known) {
            (_, Some(known)) => known,
            (Some(_), None) => complete_body,
            (None, None) => false,
        };
        req.body = BodyAttributes {
            bytes: self.body_bytes.unwrap_or_default(),
            size_known,
            truncated: self.body_truncated.unwrap_or_default(),
            parse_error: self.body_parse_error.unwrap_or_default(),
            model: self.model,
            stream: self.stream,
            max_tokens: self.max_tokens,
            message_count: self.message_count,
            sha256: self.body_sha256,
        };
    }
}

/// An RFC 3339 time from a record.
fn parse_time(text: Option<&str>) -> Option<SystemTime> {
    OffsetDateTime::parse(text?, &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// The Envoy-side record of a request the server did not decide (`arbiter_record`, format
/// v1): fail open, fail closed, or allowed from the cache.
#[derive(Debug, Deserialize)]
struct EnvoyRecord {
    v: u32,
    #[serde(default)]
    ts: Option<String>,
    outcome: String,
    /// Of a `cached` record: the decision that allowed it.
    #[serde(default)]
    audit_id: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, rename = "override")]
    override_: bool,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    method: String,
    path: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    context: BTreeMap<String, Value>,
    /// Envoy's `jwt_authn` metadata (verified claims), as the filter forwarded it.
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    api_key_sha256: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    model: Option<String>,
    /// Values the filter recorded cut (its bounds are the server's), by field.
    #[serde(default)]
    cut: BTreeMap<String, Value>,
    #[serde(default)]
    body_bytes: Option<u64>,
    #[serde(default)]
    body_size_known: Option<bool>,
    #[serde(default)]
    body_truncated: Option<bool>,
    /// Present in records that carry what the body told policy (the three below).
    #[serde(default)]
    body_parse_error: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    message_count: Option<i64>,
}

/// `Ok(None)`: a line that is no record to replay (an access-log line of a decided request).
fn parse(bytes: &[u8]) -> Result<Option<Case>, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(object) = &value else {
        return Err("not a JSON object".into());
    };
    if let Some(inner) = object.get(ENVOY_RECORD_KEY) {
        let inner = match inner {
            Value::String(s) if s.is_empty() || s == "-" => return Ok(None),
            Value::Null => return Ok(None),
            Value::String(s) => serde_json::from_str(s)
                .map_err(|e| format!("`{ENVOY_RECORD_KEY}` is not JSON: {e}"))?,
            other => other.clone(),
        };
        return envoy_case(inner).map(Some);
    }
    if object.contains_key("outcome") {
        return envoy_case(value).map(Some);
    }
    if object.contains_key("seq") && object.contains_key("decision") {
        let record: AuditRecord =
            serde_json::from_value(value).map_err(|e| format!("not an audit record: {e}"))?;
        return Ok(Some(server_case(record)));
    }
    Err(format!(
        "neither an audit record nor an access-log line with `{ENVOY_RECORD_KEY}`"
    ))
}

fn server_case(record: AuditRecord) -> Case {
    let event = record.event;
    let cut = event.cut.keys().cloned().collect();
    // Records written before the top-level field kept the marker only in the route context.
    let dry_run = event.dry_run
        || event
            .route_context
            .get(DRY_RUN_KEY)
            .is_some_and(|value| value == "true");
    let mut extensions: HashMap<String, String> = event.route_context.into_iter().collect();
    extensions.insert(ROUTE_KEY.into(), event.route);
    // The recorded action is what policy saw, whether derived or set by the route.
    extensions.insert(ACTION_KEY.into(), event.action);
    let identity_recorded = event.identity.is_some();
    let identity = event.identity.unwrap_or_default();
    let source = identity["source"].as_str().unwrap_or("mtls");
    // Only an mTLS identity is a peer principal; the others come back as the evidence the
    // record kept (JWT claims, API-key hash).
    let mtls = if source == "mtls" {
        event.principal.as_str()
    } else {
        ""
    };
    let jwt = identity
        .get("jwt")
        .filter(|claims| claims.is_object())
        .map(|claims| serde_json::json!({ JWT_PAYLOAD_KEY: claims }));
    let facts = Facts {
        api_key_sha256: identity["api_key_sha256"].as_str().map(str::to_owned),
        tenant: event.headers.get(TENANT_HEADER).cloned(),
        // Older records: `time` is reported missing, and the record's `ts` (written just
        // after the decision) stands in rather than the time of the replay.
        time: parse_time(event.request_time.as_deref()),
        fallback_time: parse_time(Some(&event.ts)),
        body_sent: Some(event.prompt_sha256.is_some()),
        model: event.model,
        body_bytes: event.body_bytes,
        body_size_known: event.body_size_known,
        body_truncated: event.body_truncated,
        body_sha256: event.prompt_sha256,
        body_parsed_recorded: event.body_parse_error.is_some(),
        body_parse_error: event.body_parse_error,
        stream: event.stream,
        max_tokens: event.max_tokens,
        message_count: event.message_count,
        identity_recorded,
    };
    Case {
        recorded: Recorded::Server {
            decision: event.decision,
            dry_run,
            audit_id: event.id,
            policy_version: event.policy_version,
        },
        check: check_request(CheckParts {
            principal: mtls,
            source: event.source.as_deref(),
            request_id: event.request_id,
            method: event.method,
            path: event.path,
            host: event.host,
            scheme: event.scheme,
            extensions,
        })
        .with_jwt_metadata(jwt),
        facts,
        cut,
    }
}

fn envoy_case(value: Value) -> Result<Case, String> {
    let record: EnvoyRecord =
        serde_json::from_value(value).map_err(|e| format!("not an `{ENVOY_RECORD_KEY}`: {e}"))?;
    if record.v != 1 {
        return Err(format!(
            "unknown `{ENVOY_RECORD_KEY}` version `{}`",
            record.v
        ));
    }
    let reason = record.reason.unwrap_or_default();
    let recorded = match record.outcome.as_str() {
        "fail_open" => Recorded::FailOpen {
            reason,
            r#override: record.override_,
        },
        "fail_closed" => Recorded::FailClosed { reason },
        "cached" => Recorded::Cached {
            audit_id: record.audit_id.unwrap_or_default(),
        },
        other => return Err(format!("unknown outcome `{other}`")),
    };
    let mut extensions: HashMap<String, String> = record
        .context
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect();
    if let Some(route) = record.route {
        extensions.insert(ROUTE_KEY.into(), route);
    }
    let cut = record.cut.into_keys().collect();
    Ok(Case {
        recorded,
        check: check_request(CheckParts {
            principal: record.principal.as_deref().unwrap_or_default(),
            source: record.source.as_deref(),
            request_id: record.request_id.unwrap_or_default(),
            method: record.method,
            path: record.path,
            host: record.host.unwrap_or_default(),
            scheme: record.scheme.unwrap_or_default(),
            extensions,
        })
        .with_jwt_metadata(record.metadata),
        facts: Facts {
            api_key_sha256: record.api_key_sha256,
            tenant: record.tenant,
            // The filter's record is written when its outcome is applied: its `ts` is the
            // decision time.
            time: parse_time(record.ts.as_deref()),
            fallback_time: None,
            // Older records do not say whether the route sent the body, unless a model
            // was read from it.
            body_sent: record.model.is_some().then_some(true),
            model: record.model,
            // `null`: no body and no announced length, i.e. 0 bytes of unknown size.
            body_bytes: record.body_bytes.or(Some(0)),
            body_size_known: record.body_size_known,
            body_truncated: record.body_truncated,
            body_sha256: None,
            body_parsed_recorded: record.body_parse_error.is_some(),
            body_parse_error: record.body_parse_error,
            stream: record.stream,
            max_tokens: record.max_tokens,
            message_count: record.message_count,
            identity_recorded: true,
        },
        // Cut values: the case is listed as not replayable, as a server record would be.
        cut,
    })
}

pub use crate::identity::JWT_AUTHN_NAMESPACE;

trait WithJwtMetadata {
    fn with_jwt_metadata(self, metadata: Option<Value>) -> Self;
}

impl WithJwtMetadata for CheckRequest {
    /// Puts the recorded `jwt_authn` metadata back where the filter sent it, so identity
    /// from verified claims is derived on replay as it was live.
    fn with_jwt_metadata(mut self, metadata: Option<Value>) -> Self {
        let Some(Kind::StructValue(fields)) = metadata.and_then(|m| to_proto(&m).kind) else {
            return self;
        };
        if let Some(attributes) = self.attributes.as_mut() {
            attributes
                .metadata_context
                .get_or_insert_with(Default::default)
                .filter_metadata
                .insert(JWT_AUTHN_NAMESPACE.to_owned(), fields);
        }
        self
    }
}

fn to_proto(value: &Value) -> ProtoValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_proto).collect(),
        }),
        Value::Object(fields) => Kind::StructValue(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.clone(), to_proto(v)))
                .collect(),
        }),
    };
    ProtoValue { kind: Some(kind) }
}

struct CheckParts<'a> {
    principal: &'a str,
    source: Option<&'a str>,
    request_id: String,
    method: String,
    path: String,
    host: String,
    scheme: String,
    extensions: HashMap<String, String>,
}

/// The `CheckRequest` the filter sent (minus headers and body, which are not recorded), so
/// replay goes through the server's own boundary mapping.
fn check_request(parts: CheckParts<'_>) -> CheckRequest {
    let address = parts
        .source
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .map(|addr| Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
                ..Default::default()
            })),
        });
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address,
                principal: parts.principal.to_owned(),
                ..Default::default()
            }),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: parts.request_id,
                    method: parts.method,
                    path: parts.path,
                    host: parts.host,
                    scheme: parts.scheme,
                    // Unknown unless the record says (`Facts::apply`).
                    size: -1,
                    ..Default::default()
                }),
            }),
            context_extensions: parts.extensions,
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_access_log_lines_and_bare_envoy_records() {
        let inner = r#"{"v":1,"ts":"2026-11-22T02:00:00Z","outcome":"fail_open","reason":"timeout","override":false,"route":"embeddings","request_id":"r1","method":"POST","path":"/v1/embeddings?x=1","host":"gw","scheme":"http","source":"127.0.0.1:4000","principal":null,"context":{"classification":"regulated"},"policy_version":null,"api_key_sha256":null}"#;
        let line = serde_json::json!({"route_name": "embeddings", ENVOY_RECORD_KEY: inner});
        let case = parse(line.to_string().as_bytes()).unwrap().unwrap();
        assert_eq!(
            case.recorded,
            Recorded::FailOpen {
                reason: "timeout".into(),
                r#override: false
            }
        );
        let req = AuthzRequest::try_from(case.check).unwrap();
        assert_eq!(req.route, "embeddings");
        assert_eq!(req.action, "embeddings");
        assert_eq!(req.principal, "anonymous");
        assert_eq!(req.path, "/v1/embeddings");
        assert_eq!(req.source, "127.0.0.1:4000");
        assert_eq!(req.route_context["classification"], "regulated");

        assert!(parse(inner.as_bytes()).unwrap().is_some());
        let decided = serde_json::json!({"route_name": "chat", ENVOY_RECORD_KEY: "-"});
        assert!(parse(decided.to_string().as_bytes()).unwrap().is_none());
        assert!(parse(b"{\"hello\":1}").is_err());
        assert!(parse(b"nope").is_err());
        let bad_outcome = inner.replace("fail_open", "allow");
        assert!(parse(bad_outcome.as_bytes()).is_err());
    }

    #[test]
    fn jwt_metadata_goes_back_where_the_filter_sent_it() {
        let inner = r#"{"v":1,"outcome":"fail_closed","reason":"timeout","route":"chat","method":"POST","path":"/v1/chat/completions","context":{"tier":2},"metadata":{"jwt_payload":{"sub":"alice","groups":["a"]}}}"#;
        let case = parse(inner.as_bytes()).unwrap().unwrap();
        let attributes = case.check.attributes.as_ref().unwrap();
        let jwt = &attributes
            .metadata_context
            .as_ref()
            .unwrap()
            .filter_metadata[JWT_AUTHN_NAMESPACE];
        let Some(Kind::StructValue(payload)) = &jwt.fields["jwt_payload"].kind else {
            panic!("{jwt:?}");
        };
        assert_eq!(
            payload.fields["sub"].kind,
            Some(Kind::StringValue("alice".into()))
        );
        assert_eq!(attributes.context_extensions["tier"], "2");
    }

    #[test]
    fn server_records_replay_with_the_identity_evidence_they_kept() {
        let mut event: crate::audit::AuditEvent = serde_json::from_value(serde_json::json!({
            "ts": "2026-11-22T02:00:00.000001Z", "id": "0193a1b2-0000-7000-8000-000000000001",
            "request_id": "r-1", "decision": "allow", "reason": "permit",
            "policy_version": "sha256:0123456789abcdef", "policy_ids": ["routine-chat"],
            "principal": "anonymous", "action": "chat.completions", "route": "chat",
            "route_context": {"classification": "public"}, "method": "POST", "scheme": "http",
            "host": "gw", "path": "/v1/chat/completions", "source": "127.0.0.1:5000",
            "identity": null, "headers": {}, "model": null, "body_bytes": 12, "body_size_known": true,
            "body_truncated": false, "prompt_sha256": null, "trace_id": null, "latency_us": 42
        }))
        .unwrap();
        event.principal = "https://idp#alice".into();
        event.identity = Some(serde_json::json!({
            "source": "jwt", "jwt": {"iss": "https://idp", "sub": "alice"}, "api_key_sha256": "ab12"
        }));
        event.headers.insert(TENANT_HEADER.into(), "acme".into());
        let mut line = Vec::new();
        crate::audit::record::encode(&event, 1, crate::audit::record::GENESIS_HASH, &mut line)
            .unwrap();
        let case = parse(&line).unwrap().unwrap();
        let mut req = AuthzRequest::try_from(case.check).unwrap();
        case.facts.apply(&mut req);
        assert_eq!(req.identity.mtls, None);
        assert_eq!(req.identity.jwt.as_ref().unwrap()["sub"], "alice");
        assert_eq!(req.identity.api_key_sha256.as_deref(), Some("ab12"));
        assert_eq!(req.requested_tenant.as_deref(), Some("acme"));
        assert_eq!(req.body.bytes, 12);
        assert!(req.body.size_known);
    }

    #[test]
    fn body_size_is_replayed_as_recorded_and_unknown_otherwise() {
        let replayed = |event: crate::audit::AuditEvent| {
            let mut line = Vec::new();
            crate::audit::record::encode(&event, 1, crate::audit::record::GENESIS_HASH, &mut line)
                .unwrap();
            let case = parse(&line).unwrap().unwrap();
            let mut req = AuthzRequest::try_from(case.check).unwrap();
            case.facts.apply(&mut req);
            (req.body.bytes, req.body.size_known)
        };
        let mut event = crate::audit::AuditEvent {
            ts: "2026-11-22T02:00:00.000001Z".into(),
            request_time: None,
            id: "0193a1b2-0000-7000-8000-000000000001".into(),
            request_id: "r-1".into(),
            decision: crate::audit::Verdict::Allow,
            dry_run: false,
            reason: crate::audit::Reason::Permit,
            policy_version: "sha256:0123456789abcdef".into(),
            policy_ids: vec!["routine-chat".into()],
            shadow_decision: None,
            principal: "anonymous".into(),
            action: "chat.completions".into(),
            route: "chat".into(),
            route_context: Default::default(),
            method: "POST".into(),
            scheme: "http".into(),
            host: "gw".into(),
            path: "/v1/chat/completions".into(),
            source: Some("127.0.0.1:5000".into()),
            identity: None,
            headers: Default::default(),
            headers_omitted: None,
            model: None,
            body_bytes: Some(12),
            body_size_known: Some(true),
            body_truncated: Some(false),
            body_parse_error: Some(false),
            stream: None,
            max_tokens: None,
            message_count: None,
            prompt_sha256: None,
            trace_id: None,
            latency_us: 42,
            cut: Default::default(),
        };
        event.body_bytes = Some(9_000_000);
        event.body_size_known = Some(false);
        event.body_truncated = Some(true);
        assert_eq!(replayed(event.clone()), (9_000_000, false));
        // Older records: exact only when they show a complete body.
        event.body_size_known = None;
        assert_eq!(replayed(event.clone()), (9_000_000, false));
        event.body_truncated = Some(false);
        event.prompt_sha256 = Some("ab".into());
        assert_eq!(replayed(event.clone()), (9_000_000, true));
        // Nothing recorded: nothing assumed.
        event.body_bytes = None;
        assert_eq!(replayed(event), (0, false));
    }

    /// A record holding only the first bytes of a value policy read cannot be re-decided
    /// exactly: it is listed with its cut fields, counted apart from the replayed records
    /// (of its kind and of dry-run), and is neither a difference nor a match.
    #[test]
    fn records_with_cut_values_are_listed_not_replayed() {
        let engine = PolicyEngine::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ai-gateway/policies"),
        )
        .unwrap();
        let event: crate::audit::AuditEvent = serde_json::from_value(serde_json::json!({
            "ts": "2026-11-22T02:00:00.000001Z", "request_time": "2026-11-22T02:00:00.000000Z",
            "id": "0193a1b2-0000-7000-8000-000000000001",
            "request_id": "r-1", "decision": "allow", "reason": "permit",
            "policy_version": "sha256:0123456789abcdef", "policy_ids": ["routine-chat"],
            "principal": "anonymous", "action": "chat.completions", "route": "chat",
            "route_context": {}, "method": "POST", "scheme": "http",
            "host": "gw", "path": "/v1/chat/completions", "source": "127.0.0.1:5000",
            "identity": {"source": "none", "jwt": null, "api_key_sha256": null},
            "headers": {}, "model": null, "body_bytes": 0, "body_size_known": true,
            "body_truncated": false, "body_parse_error": false, "stream": null,
            "max_tokens": null, "message_count": null, "prompt_sha256": null,
            "trace_id": null, "latency_us": 42
        }))
        .unwrap();
        let whole = format!("/{}/v1/chat/completions", "p".repeat(3000));
        let mut bounder = crate::audit::bound::Bounder::default();
        let cut = crate::audit::AuditEvent {
            request_id: "r-2".into(),
            dry_run: true,
            decision: Verdict::Deny,
            path: bounder.keep("path", &whole, crate::audit::bound::MAX_RECORDED_PATH),
            ..event.clone()
        };
        let cut = crate::audit::AuditEvent {
            cut: bounder.into_cut(),
            ..cut
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let mut lines = Vec::new();
        let prev =
            crate::audit::record::encode(&event, 1, crate::audit::record::GENESIS_HASH, &mut lines)
                .unwrap();
        crate::audit::record::encode(&cut, 2, &prev, &mut lines).unwrap();
        std::fs::write(&file, &lines).unwrap();

        for only in [Only::All, Only::DryRun] {
            let report = replay(&engine, std::slice::from_ref(&file), only).unwrap();
            let replayed = u64::from(only == Only::All);
            assert_eq!(report.server.replayed, replayed, "{report:?}");
            assert_eq!(report.server.cut, 1);
            assert_eq!(report.server.differ, 0);
            assert_eq!(report.dry_run.replayed, 0);
            assert_eq!(report.dry_run.cut, 1);
            assert!(report.differences.is_empty(), "{report:?}");
            assert_eq!(
                report.cut,
                [CutRecord {
                    file: file.clone(),
                    line: 2,
                    request_id: "r-2".into(),
                    recorded: Recorded::Server {
                        decision: Verdict::Deny,
                        dry_run: true,
                        audit_id: event.id.clone(),
                        policy_version: event.policy_version.clone(),
                    },
                    fields: vec!["path".into()],
                }]
            );
        }
    }

    #[test]
    fn older_records_name_only_the_body_facts_a_parse_could_have_given() {
        let facts = |sent: Option<bool>, truncated: Option<bool>, model: Option<&str>| {
            Facts {
                time: Some(SystemTime::UNIX_EPOCH),
                identity_recorded: true,
                body_bytes: Some(10),
                body_size_known: Some(true),
                body_sent: sent,
                body_truncated: truncated,
                model: model.map(str::to_owned),
                ..Facts::default()
            }
            .missing()
        };
        let parsed = ["stream", "max_tokens", "message_count"];
        // No body, or a cut one: nothing was parsed, nothing is missing.
        assert!(facts(Some(false), Some(false), None).is_empty());
        assert!(facts(Some(true), Some(true), None).is_empty());
        assert!(facts(None, Some(true), None).is_empty());
        // A parsed body: a model shows it parsed.
        assert_eq!(facts(Some(true), Some(false), Some("m")), parsed);
        let mut all = vec!["body_parse_error"];
        all.extend(parsed);
        assert_eq!(facts(Some(true), Some(false), None), all);
        assert_eq!(facts(None, Some(false), None), all);
        all.insert(0, "body_truncated");
        assert_eq!(facts(None, None, None), all);
        // Recorded: `null` is "the body did not say".
        let recorded = Facts {
            body_parsed_recorded: true,
            ..Facts::default()
        };
        assert_eq!(
            recorded.missing(),
            ["time", "identity", "body_bytes", "body_size_known"]
        );
    }
}
