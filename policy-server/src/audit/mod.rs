//! The server's side of the audit trail: the [`arbiter_audit`] crate (record, writer,
//! redaction, verification, export), plus what needs the server's own types: building an
//! [`AuditEvent`] from a request and its decision ([`event`]), and [`replay`].

pub mod replay;

use std::time::Duration;

use time::OffsetDateTime;

pub use arbiter_audit::*;

use crate::engine::Decision;
use crate::request::AuthzRequest;

/// The audit event of `decision` on `req`.
pub fn event(
    id: String,
    req: &AuthzRequest,
    decision: &Decision,
    facts: RequestFacts,
    latency: Duration,
) -> AuditEvent {
    let RequestFacts { headers, trace } = facts;
    let (verdict, reason) = match (decision.allowed, decision.policy_ids.is_empty()) {
        (true, _) => (Verdict::Allow, Reason::Permit),
        (false, false) => (Verdict::Deny, Reason::Forbid),
        (false, true) => (Verdict::Deny, Reason::DefaultDeny),
    };
    AuditEvent {
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
        // `:authority` may carry `user:pass@`.
        host: redact::redact_authority(&req.host),
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
