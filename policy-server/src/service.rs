//! The `envoy.service.auth.v3.Authorization` gRPC service.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode as HttpStatusCode};
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use tonic::{Code, Request, Response, Status};
use tracing::{Instrument as _, Span};
use uuid::Uuid;

use crate::audit::{self, bound, AuditLog, Redactor, RequestFacts, TraceParent};
use crate::engine::{Decision, EngineError, PolicyEngine};
use crate::request::{AuthzRequest, TimeSource};
use crate::trace;

/// Header naming the decision's audit record, on allowed requests.
pub const AUDIT_ID_HEADER: &str = "x-arbiter-audit-id";
/// Header naming the bundle version that decided.
pub const POLICY_VERSION_HEADER: &str = "x-arbiter-policy-version";
/// `tracing` target of the one event per decision.
pub const DECISION_TARGET: &str = "arbiter::decision";

/// Answers ext_authz `Check` calls with the engine's decision, each recorded in the audit
/// log before it is answered.
#[derive(Debug, Clone)]
pub struct AuthorizationService {
    engine: Arc<PolicyEngine>,
    audit: AuditLog,
    redactor: Arc<Redactor>,
}

impl AuthorizationService {
    /// A service deciding with `engine`, recording to `audit` with `redactor`'s rules.
    pub fn new(engine: Arc<PolicyEngine>, audit: AuditLog, redactor: Redactor) -> Self {
        Self {
            engine,
            audit,
            redactor: Arc::new(redactor),
        }
    }
}

/// The gRPC service serving `service`: how every server (and test and benchmark) builds it.
///
/// It accepts CheckRequests up to [`arbiter_proto::MAX_CHECK_REQUEST_BYTES`], the limit the
/// filter never exceeds (8 MiB of body plus Envoy's largest header block). tonic's default of
/// 4 MiB refused bodies the filter may send: a size the request chose, answered as a server
/// failure. A larger message is still refused (`OUT_OF_RANGE`, "decoded message length too
/// large"), which the filter counts as caused by the request.
pub fn authorization_server<T: Authorization>(service: T) -> AuthorizationServer<T> {
    AuthorizationServer::new(service)
        .max_decoding_message_size(arbiter_proto::MAX_CHECK_REQUEST_BYTES)
}

#[tonic::async_trait]
impl Authorization for AuthorizationService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        // Envoy's native ext_authz (with tracing on) names its own span in the call's
        // metadata; the request's own `traceparent` header, when valid, takes precedence.
        let call_parent = request
            .metadata()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .and_then(TraceParent::parse);
        let check = request.into_inner();
        // Headers and body are read for the record here, redacted, before the request is
        // reduced to what policy sees.
        let mut facts = self.redactor.facts(&check);
        if facts.trace.is_none() {
            facts.trace = call_parent;
        }
        let span = trace::check_span(facts.trace.as_ref());
        self.decide(check, facts, started, &span)
            .instrument(span.clone())
            .await
    }
}

impl AuthorizationService {
    async fn decide(
        &self,
        check: CheckRequest,
        facts: RequestFacts,
        started: Instant,
        span: &Span,
    ) -> Result<Response<CheckResponse>, Status> {
        // A request without attributes or an HTTP request is not a policy question, and
        // asking again gives the same answer. INVALID_ARGUMENT says "caused by this request":
        // the filter refuses it on every route, fail-open ones included (a malformed request
        // must not open the door), and does not count it toward its breaker (one bad request
        // must not make the gateway refuse or wave through everyone else's).
        let req = AuthzRequest::try_from(check).map_err(|e| {
            trace::fail(span, "invalid request");
            Status::invalid_argument(e.to_string())
        })?;
        if req.time_source == TimeSource::Untrusted {
            self.engine.metrics().request_time_untrusted();
        }
        span.record("arbiter.route", req.route.as_str());
        span.record(
            "arbiter.request_id",
            bound::prefix(&req.request_id, bound::MAX_RECORDED_REQUEST_ID),
        );
        let decision = tracing::info_span!(target: trace::TARGET, "arbiter.evaluate")
            .in_scope(|| self.engine.decide(&req))
            .map_err(|e| {
                trace::fail(span, "evaluation failed");
                engine_status(&e)
            })?;
        let audit_id = Uuid::now_v7().to_string();
        span.record("arbiter.decision", outcome(&decision));
        span.record("arbiter.policy_version", decision.policy_version.as_str());
        if !span.is_disabled() {
            span.record("arbiter.policy_ids", decision.policy_ids.join(","));
        }
        span.record("arbiter.audit.id", audit_id.as_str());
        let latency = started.elapsed();
        let mut event = audit::event(audit_id.clone(), &req, &decision, facts, latency);
        if req.identity.jwt.is_some() {
            // Claims not on the allow-list never reach the record. The bundle that decided may
            // have been swapped since; its tenant and groups claim names rarely change.
            let bundle = self.engine.bundle();
            let jwt = bundle.jwt_config();
            self.redactor.mask_identity(
                &mut event.identity,
                &[jwt.tenant_claim.as_str(), jwt.groups_claim.as_str()],
            );
        }
        // The record's fields a client chose that were cut (the log line names them too).
        let cut = (!event.cut.is_empty()).then(|| {
            event
                .cut
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",")
        });
        // No decision without a record: if the record cannot be written (disk full, I/O
        // error), answer UNAVAILABLE, which is "no decision" to the filter, so the route's
        // fail mode applies (closed: 503; open: let through and recorded on the Envoy side).
        // Answering anyway would leave an enforced decision nobody can account for.
        let written = self
            .audit
            .append(event)
            .instrument(tracing::info_span!(target: trace::TARGET, "arbiter.audit.write"))
            .await
            .map_err(|e| {
                trace::fail(span, "audit write failed");
                Status::unavailable(format!("no decision: {e}"))
            })?;
        span.record("arbiter.audit.seq", written.seq);
        self.engine
            .metrics()
            .route_decision(&req.route, decision.allowed);

        for error in &decision.errors {
            tracing::debug!(target: DECISION_TARGET, id = %audit_id, %error, "policy skipped");
        }
        // Values a client (or a token's issuer) chooses are recorded as strings, not
        // `%` (Display): the plain format then quotes and escapes them, so an
        // `x-request-id` of `r1 decision=allow` cannot read as a second `decision` field of
        // this line; the JSON format writes them as JSON strings either way. They are
        // bounded as in the record (`cut` names those cut; the record has their evidence).
        tracing::info!(
            target: DECISION_TARGET,
            id = %audit_id,
            request_id = bound::prefix(&req.request_id, bound::MAX_RECORDED_REQUEST_ID),
            decision = outcome(&decision),
            policy_ids = %decision.policy_ids.join(","),
            principal = bound::prefix(&decision.principal, bound::MAX_RECORDED_PRINCIPAL),
            identity_source = decision.identity_source.as_str(),
            route = %req.route,
            method = %bound::prefix(&req.method, bound::MAX_RECORDED_METHOD),
            path = bound::prefix(&req.path, bound::MAX_RECORDED_PATH),
            policy_version = %decision.policy_version,
            model = req
                .body
                .model
                .as_deref()
                .map(|model| bound::prefix(model, bound::MAX_RECORDED_MODEL)),
            cut = cut.as_deref(),
            shadow_decision = decision.shadow.as_ref().map(|s| s.outcome()),
            shadow_disagreement = decision.shadow_disagreement().map(|d| d.as_str()),
            seq = written.seq,
            latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            "decision"
        );
        Ok(Response::new(check_response(&req, &decision, &audit_id)))
    }
}

/// The answer to a request the engine could not decide: never a guessed allow or deny.
pub fn engine_status(error: &EngineError) -> Status {
    if error.is_request_caused() {
        // A value Cedar cannot express, or identity claims no principal can be built from:
        // this request's fault, the same however often it is asked. INVALID_ARGUMENT, so the
        // filter refuses it on every route (even fail-open ones) and keeps it out of the
        // breaker, as for a malformed CheckRequest above.
        Status::invalid_argument(error.to_string())
    } else {
        // The bundle's own data cannot be assembled: a fault of this server, which other
        // requests share. INTERNAL is "no decision" from the server: the route's fail mode
        // applies and the breaker counts it.
        Status::internal(error.to_string())
    }
}

fn outcome(decision: &Decision) -> &'static str {
    if decision.allowed {
        "allow"
    } else {
        "deny"
    }
}

/// The answer Envoy (or the Arbiter filter) acts on.
fn check_response(req: &AuthzRequest, decision: &Decision, audit_id: &str) -> CheckResponse {
    let version = decision.policy_version.as_str();
    let (code, message, http_response) = if decision.allowed {
        let ok = OkHttpResponse {
            headers: vec![
                header(AUDIT_ID_HEADER, audit_id),
                header(POLICY_VERSION_HEADER, version),
            ],
            ..Default::default()
        };
        (Code::Ok, String::new(), HttpResponse::OkResponse(ok))
    } else {
        let message = deny_message(req, decision);
        let body = serde_json::json!({
            "error": {
                "type": "policy_denied",
                "message": message,
                "audit_id": audit_id,
                "policy_ids": decision.policy_ids,
            }
        });
        let denied = DeniedHttpResponse {
            status: Some(HttpStatus {
                code: HttpStatusCode::Forbidden.into(),
            }),
            headers: vec![
                header("content-type", "application/json"),
                header(POLICY_VERSION_HEADER, version),
            ],
            body: body.to_string(),
        };
        (
            Code::PermissionDenied,
            message,
            HttpResponse::DeniedResponse(denied),
        )
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: code.into(),
            message,
            details: Vec::new(),
        }),
        http_response: Some(http_response),
        dynamic_metadata: Some(Struct {
            fields: [
                ("policy_version", version),
                ("decision", outcome(decision)),
                ("audit_id", audit_id),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), string_value(v)))
            .collect(),
        }),
    }
}

/// The deny message: the determining policies, or that none permits the request.
pub fn deny_message(req: &AuthzRequest, decision: &Decision) -> String {
    let quoted = |ids: &[String]| {
        ids.iter()
            .map(|id| format!("`{id}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match decision.policy_ids.as_slice() {
        [] => format!(
            "no policy permits `{}` on route `{}`",
            req.action, req.route
        ),
        [_] => format!("denied by policy {}", quoted(&decision.policy_ids)),
        ids => format!("denied by policies {}", quoted(ids)),
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        // Our headers replace whatever came before them; they are never lists.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        ..Default::default()
    }
}

fn string_value(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityError;

    #[test]
    fn request_caused_engine_errors_are_invalid_argument_server_faults_internal() {
        let request = EngineError::Request("`ip(\"::ffff:1.2.3.4\")`".into());
        assert_eq!(engine_status(&request).code(), Code::InvalidArgument);
        let identity = EngineError::Identity(IdentityError::Build("bad claims".into()));
        assert_eq!(engine_status(&identity).code(), Code::InvalidArgument);
        let entities = EngineError::Entities("duplicate entity".into());
        assert_eq!(engine_status(&entities).code(), Code::Internal);
        assert!(engine_status(&entities)
            .message()
            .contains("duplicate entity"));
    }
}
