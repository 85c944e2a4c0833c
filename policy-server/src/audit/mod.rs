//! The server's side of the audit trail: the [`arbiter_audit`] crate (record, writer,
//! redaction, verification, export), plus what needs the server's own types: building an
//! [`AuditEvent`] from a request and its decision ([`event`]), and [`replay`].

pub mod replay;

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

pub use arbiter_audit::*;

use crate::engine::Decision;
use crate::request::{AuthzRequest, DRY_RUN_KEY};

/// The audit event of `decision` on `req`.
pub fn event(
    id: String,
    req: &AuthzRequest,
    decision: &Decision,
    facts: RequestFacts,
    latency: Duration,
) -> AuditEvent {
    let RequestFacts {
        headers,
        trace,
        headers_omitted,
    } = facts;
    // Values a client chooses are recorded bounded, with evidence of what was cut; policy
    // decided on the whole values (`req`), which stay untouched.
    let mut bounder = bound::Bounder::default();
    // Replay takes the tenant from the recorded `x-tenant-id` header, which the header cap
    // cuts past `MAX_RECORDED_HEADER_VALUE`: such a record names the whole tenant's length
    // and hash under `cut`, so replay lists it as not replayable instead of deciding it for
    // a different (cut) tenant.
    if let Some(tenant) = req
        .requested_tenant
        .as_deref()
        .filter(|tenant| tenant.len() > redact::MAX_RECORDED_HEADER_VALUE)
    {
        bounder.keep("tenant", tenant, redact::MAX_RECORDED_HEADER_VALUE);
    }
    let (verdict, reason) = match (decision.allowed, decision.policy_ids.is_empty()) {
        (true, _) => (Verdict::Allow, Reason::Permit),
        (false, false) => (Verdict::Deny, Reason::Forbid),
        (false, true) => (Verdict::Deny, Reason::DefaultDeny),
    };
    AuditEvent {
        ts: timestamp(OffsetDateTime::now_utc()),
        // `context.time`, so a replay decides at the time the decision was made.
        request_time: Some(system_timestamp(req.time)),
        id,
        request_id: bounder.keep(
            "request_id",
            &req.request_id,
            bound::MAX_RECORDED_REQUEST_ID,
        ),
        decision: verdict,
        // The filter tells the server the route is in dry-run (a context extension only route
        // settings can set), so the record says plainly that a deny was not enforced.
        dry_run: req
            .route_context
            .get(DRY_RUN_KEY)
            .is_some_and(|value| value == "true"),
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
        principal: bounder.keep(
            "principal",
            &decision.principal,
            bound::MAX_RECORDED_PRINCIPAL,
        ),
        action: req.action.clone(),
        route: req.route.clone(),
        route_context: req.route_context.clone(),
        method: bounder.keep("method", &req.method, bound::MAX_RECORDED_METHOD),
        scheme: bounder.keep("scheme", &req.scheme, bound::MAX_RECORDED_SCHEME),
        // `:authority` may carry `user:pass@`: replaced before it is bounded (and hashed).
        host: bounder.keep(
            "host",
            &redact::redact_authority(&req.host),
            bound::MAX_RECORDED_HOST,
        ),
        path: bounder.keep("path", &req.path, bound::MAX_RECORDED_PATH),
        source: Some(req.source.clone()).filter(|s| !s.is_empty()),
        identity: Some(serde_json::json!({
            "source": decision.identity_source.as_str(),
            "jwt": req.identity.jwt,
            "api_key_sha256": req.identity.api_key_sha256,
        })),
        headers,
        headers_omitted: (headers_omitted > 0).then_some(headers_omitted),
        model: req
            .body
            .model
            .as_deref()
            .map(|model| bounder.keep("model", model, bound::MAX_RECORDED_MODEL)),
        // The body as policy saw it (`context.body_bytes`, `body_size_known`,
        // `body_truncated`, `body_parse_error`, `stream`, `max_tokens`, `message_count`), so
        // a replay decides on the same facts.
        body_bytes: Some(req.body.bytes),
        body_size_known: Some(req.body.size_known),
        body_truncated: Some(req.body.truncated),
        body_parse_error: Some(req.body.parse_error),
        stream: req.body.stream,
        max_tokens: req.body.max_tokens,
        message_count: req.body.message_count,
        prompt_sha256: req.body.sha256.clone(),
        trace_id: trace.map(|t| t.trace_id),
        latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        cut: bounder.into_cut(),
    }
}

/// [`timestamp`] of a `SystemTime`, without the panic of `OffsetDateTime::from` on times
/// it cannot represent (a request's time is near the server's clock; this only keeps it so).
fn system_timestamp(at: SystemTime) -> String {
    let nanos = match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => i128::try_from(before.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    };
    timestamp(
        OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH),
    )
}
