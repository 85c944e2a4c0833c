//! The audit trail: one hash-chained record per decision, written before the answer.
//!
//! - [`record`]: the line format and its hash.
//! - [`writer`]: [`AuditLog`], the single writer with group commit, rotation and recovery.
//! - [`redact`]: what a record may take from a `CheckRequest` (secrets never in clear).
//! - [`verify`] and [`replay`]: the `arbiter audit` subcommands' logic.
//! - [`export`]: the OTLP outbox.
//! - [`metrics`]: the audit metrics ([`AuditMetrics`]).

pub mod export;
pub mod metrics;
pub mod record;
pub mod redact;
pub mod replay;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

use time::OffsetDateTime;

use crate::engine::Decision;
use crate::request::AuthzRequest;

pub use metrics::AuditMetrics;
pub use record::{AuditEvent, AuditRecord, Reason, Verdict};
pub use redact::{Redactor, RequestFacts, TraceParent};
pub use writer::{AuditError, AuditLog, Written};

/// Default `--audit-max-bytes`: 128 MiB per file.
pub const DEFAULT_MAX_BYTES: u64 = 128 * 1024 * 1024;

/// When a record counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditSync {
    /// After `fdatasync`: survives power loss (group commit shares one sync per batch).
    Fsync,
    /// After `write`: survives a crash of the server, not of the machine.
    Write,
}

/// Where and how the audit log is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The active file; rotated files sit beside it.
    pub path: PathBuf,
    /// When a record counts as written.
    pub sync: AuditSync,
    /// Size at which the active file is rotated.
    pub max_bytes: u64,
}

impl AuditConfig {
    /// `fsync` mode, default rotation size.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sync: AuditSync::Fsync,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl AuditEvent {
    /// The record of `decision` on `req`.
    pub fn new(
        id: String,
        req: &AuthzRequest,
        decision: &Decision,
        facts: RequestFacts,
        latency: Duration,
    ) -> Self {
        let RequestFacts { headers, trace } = facts;
        let (verdict, reason) = match (decision.allowed, decision.policy_ids.is_empty()) {
            (true, _) => (Verdict::Allow, Reason::Permit),
            (false, false) => (Verdict::Deny, Reason::Forbid),
            (false, true) => (Verdict::Deny, Reason::DefaultDeny),
        };
        Self {
            ts: timestamp(OffsetDateTime::now_utc()),
            id,
            request_id: req.request_id.clone(),
            decision: verdict,
            reason,
            policy_version: decision.policy_version.clone(),
            policy_ids: decision.policy_ids.clone(),
            shadow_decision: decision.shadow.as_ref().map(|shadow| {
                serde_json::json!({
                    "decision": shadow.outcome(),
                    "policy_ids": shadow.policy_ids,
                    "policy_version": shadow.policy_version,
                    "disagreement": decision.shadow_disagreement().map(|d| d.as_str()),
                })
            }),
            // The identity the engine resolved (mTLS, JWT, API key or anonymous).
            principal: decision.principal.clone(),
            action: req.action.clone(),
            route: req.route.clone(),
            route_context: req.route_context.clone(),
            method: req.method.clone(),
            scheme: req.scheme.clone(),
            host: req.host.clone(),
            path: req.path.clone(),
            source: Some(req.source.clone()).filter(|s| !s.is_empty()),
            identity: Some(serde_json::json!({
                "source": decision.identity_source.as_str(),
                "jwt": req.identity.jwt,
                "api_key_sha256": req.identity.api_key_sha256,
            })),
            headers,
            model: req.body.model.clone(),
            // The body as policy saw it (`context.body_bytes`, `body_size_known`,
            // `body_truncated`), so a replay decides on the same facts.
            body_bytes: Some(req.body.bytes),
            body_size_known: Some(req.body.size_known),
            body_truncated: Some(req.body.truncated),
            prompt_sha256: req.body.sha256.clone(),
            trace_id: trace.map(|t| t.trace_id),
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

/// RFC 3339 UTC with exactly six fractional digits (fixed width, sorts as text).
pub fn timestamp(at: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_fixed_width_utc() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_795_000_000_000_000_123).unwrap();
        let ts = timestamp(at);
        assert_eq!(ts.len(), "2026-11-18T08:26:40.000000Z".len());
        assert!(ts.ends_with(".000000Z"), "{ts}");
    }
}
