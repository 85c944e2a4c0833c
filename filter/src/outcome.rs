//! From the policy call's result to what the client and the upstream see: the contract's
//! outcome table (allow / deny / no decision → fail mode).

use std::time::Duration;

use prost::Message;
use prost_types::value::Kind;
use serde_json::json;

use arbiter_proto::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValueOption,
};
use arbiter_proto::envoy::service::auth::v3::{check_response::HttpResponse, CheckResponse};

use crate::config::FailMode;
use crate::route::Resolved;

/// Why no decision arrived: a closed list, part of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The policy call did not finish within the route's timeout.
    Timeout,
    /// No connection to the policy server (refused, reset, no healthy host, unknown cluster).
    Unreachable,
    /// The policy server answered a gRPC error.
    Error,
    /// The policy server's answer could not be understood.
    BadResponse,
    /// The filter's breaker toward the policy server is open (reserved for the breaker).
    BreakerOpen,
    /// The route's settings are invalid and the request cannot be described to policy.
    InvalidRouteConfig,
}

impl Reason {
    /// Every reason, for metric definition.
    pub const ALL: [Reason; 6] = [
        Reason::Timeout,
        Reason::Unreachable,
        Reason::Error,
        Reason::BadResponse,
        Reason::BreakerOpen,
        Reason::InvalidRouteConfig,
    ];

    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::Unreachable => "unreachable",
            Reason::Error => "error",
            Reason::BadResponse => "bad_response",
            Reason::BreakerOpen => "breaker_open",
            Reason::InvalidRouteConfig => "invalid_route_config",
        }
    }
}

/// A header mutation the policy server asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderOp {
    /// Header name (lowercase).
    pub name: String,
    /// Value.
    pub value: String,
    /// Append to existing values instead of replacing them.
    pub append: bool,
}

/// What the policy server decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Continue upstream with these changes.
    Allow {
        /// Request headers to set or append.
        headers: Vec<HeaderOp>,
        /// Request headers to remove.
        remove: Vec<String>,
        /// Response headers to add on the way back.
        response_headers: Vec<HeaderOp>,
        /// Policy version, when the server reported one.
        policy_version: Option<String>,
    },
    /// Answer the client directly.
    Deny {
        /// HTTP status (default 403).
        status: u32,
        /// Headers from the server, plus `content-type` when the filter wrote the body.
        headers: Vec<(String, String)>,
        /// JSON body.
        body: Vec<u8>,
        /// Policy version, when the server reported one.
        policy_version: Option<String>,
    },
    /// No decision: the route's fail mode applies.
    NoDecision(Reason),
}

/// gRPC status codes the classification cares about.
const GRPC_OK: u32 = 0;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_UNAVAILABLE: u32 = 14;

const GRPC_INVALID_ARGUMENT: u32 = 3;
const GRPC_OUT_OF_RANGE: u32 = 11;

/// Whether a failed call's status says the server refused *this request* (malformed, too
/// large, or something policy cannot express) rather than being unable to decide. Such a
/// request is refused on every route and never counts against the server's health.
pub fn caused_by_request(status_code: u32) -> bool {
    matches!(status_code, GRPC_INVALID_ARGUMENT | GRPC_OUT_OF_RANGE)
}

/// Classifies a failed policy call (non-zero gRPC status from Envoy's async client).
///
/// Envoy reports a call timeout and a refused connection both as `UNAVAILABLE`; only the
/// status message (and the elapsed time) tell them apart. An `UNAVAILABLE` the server
/// itself sends (e.g. it cannot write its audit log) carries its own message and is an
/// `error`: the server is reachable but chose not to decide.
pub fn classify_failure(
    status_code: u32,
    message: Option<&str>,
    elapsed: Duration,
    timeout: Duration,
) -> Reason {
    let msg = message.unwrap_or_default().to_ascii_lowercase();
    if status_code == GRPC_DEADLINE_EXCEEDED || msg.contains("timeout") {
        return Reason::Timeout;
    }
    if status_code == GRPC_UNAVAILABLE {
        if msg.contains("protocol error") {
            return Reason::BadResponse;
        }
        if msg.is_empty()
            || msg.contains("upstream connect error")
            || msg.contains("connection failure")
            || msg.contains("connection termination")
            || msg.contains("no healthy upstream")
            || msg.contains("reset")
        {
            // A silent stream that hit the deadline is a timeout even if the message is terse.
            if elapsed >= timeout {
                return Reason::Timeout;
            }
            return Reason::Unreachable;
        }
    }
    Reason::Error
}

/// Decodes a successful call's `CheckResponse` into a verdict.
pub fn decode_response(body: &[u8]) -> Verdict {
    let Ok(resp) = CheckResponse::decode(body) else {
        return Verdict::NoDecision(Reason::BadResponse);
    };
    let CheckResponse {
        status,
        dynamic_metadata,
        http_response,
    } = resp;
    // A response without a status is not an answer: an empty or truncated message would
    // otherwise decode as "OK" and let everything through.
    let Some(status) = status else {
        return Verdict::NoDecision(Reason::BadResponse);
    };
    let policy_version =
        dynamic_metadata
            .as_ref()
            .and_then(|s| match s.fields.get("policy_version") {
                Some(prost_types::Value {
                    kind: Some(Kind::StringValue(v)),
                }) => Some(v.clone()),
                _ => None,
            });
    if status.code as u32 == GRPC_OK {
        let mut verdict = Verdict::Allow {
            headers: Vec::new(),
            remove: Vec::new(),
            response_headers: Vec::new(),
            policy_version,
        };
        match http_response {
            Some(HttpResponse::OkResponse(ok)) => {
                if let Verdict::Allow {
                    headers,
                    remove,
                    response_headers,
                    ..
                } = &mut verdict
                {
                    *headers = header_ops(&ok.headers);
                    *remove = ok
                        .headers_to_remove
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect();
                    *response_headers = header_ops(&ok.response_headers_to_add);
                }
                verdict
            }
            None => verdict,
            // OK status with a denied body (or an error body) is contradictory.
            Some(_) => Verdict::NoDecision(Reason::BadResponse),
        }
    } else {
        let (status_code, mut headers, mut body) = match http_response {
            Some(HttpResponse::DeniedResponse(d)) => (
                d.status
                    .map(|s| s.code as u32)
                    .filter(|c| (200..=599).contains(c))
                    .unwrap_or(403),
                d.headers
                    .iter()
                    .filter_map(|h| h.header.as_ref())
                    .map(|h| (h.key.to_ascii_lowercase(), header_value(h)))
                    .collect::<Vec<_>>(),
                d.body.into_bytes(),
            ),
            _ => (403, Vec::new(), Vec::new()),
        };
        if body.is_empty() {
            body = deny_body(&status.message);
            headers.retain(|(k, _)| k != "content-type");
            headers.push(("content-type".to_owned(), "application/json".to_owned()));
        }
        Verdict::Deny {
            status: status_code,
            headers,
            body,
            policy_version,
        }
    }
}

/// The body the filter writes when a deny carries none.
fn deny_body(message: &str) -> Vec<u8> {
    let message = if message.is_empty() {
        "denied by policy"
    } else {
        message
    };
    json!({"error": {"type": "policy_denied", "message": message}})
        .to_string()
        .into_bytes()
}

fn header_value(h: &arbiter_proto::envoy::config::core::v3::HeaderValue) -> String {
    if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    }
}

fn header_ops(options: &[HeaderValueOption]) -> Vec<HeaderOp> {
    options
        .iter()
        .filter_map(|o| {
            let h = o.header.as_ref()?;
            #[allow(deprecated)]
            let legacy_append = o.append;
            let append = match legacy_append {
                Some(a) => a,
                None => o.append_action == HeaderAppendAction::AppendIfExistsOrAdd as i32,
            };
            Some(HeaderOp {
                name: h.key.to_ascii_lowercase(),
                value: header_value(h),
                append,
            })
        })
        .collect()
}

/// What the filter does when no decision arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum FailAction {
    /// Refuse: status, headers, JSON body.
    Closed {
        /// HTTP status (`status_on_error`).
        status: u32,
        /// `retry-after` and `content-type`.
        headers: Vec<(&'static str, String)>,
        /// JSON body naming the reason.
        body: Vec<u8>,
    },
    /// Let the request through, marked.
    Open {
        /// Value of `x-arbiter-fail-open` (the reason).
        marker: &'static str,
        /// Open only because an override is active.
        override_active: bool,
    },
}

/// Seconds a client should wait before retrying a fail-closed answer.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// Applies the route's fail mode to a missing decision.
pub fn fail_action(
    reason: Reason,
    route: &Resolved,
    route_name: &str,
    request_id: &str,
) -> FailAction {
    // A request that cannot be described to policy is never let through, whatever the mode.
    let mode = if reason == Reason::InvalidRouteConfig {
        FailMode::Closed
    } else {
        route.fail_mode
    };
    match mode {
        FailMode::Open => FailAction::Open {
            marker: reason.as_str(),
            override_active: route.override_active,
        },
        FailMode::Closed => {
            let message = match reason {
                Reason::Timeout => format!(
                    "the policy server did not answer within {} ms",
                    route.timeout.as_millis()
                ),
                Reason::Unreachable => "the policy server could not be reached".to_owned(),
                Reason::Error => "the policy server answered with an error".to_owned(),
                Reason::BadResponse => {
                    "the policy server's answer could not be understood".to_owned()
                }
                Reason::BreakerOpen => {
                    "calls to the policy server are paused after repeated failures".to_owned()
                }
                Reason::InvalidRouteConfig => {
                    "this route's arbiter settings are invalid".to_owned()
                }
            };
            let body = json!({"error": {
                "type": "policy_unavailable",
                "reason": reason.as_str(),
                "message": format!("{message}; route `{route_name}` fails closed, retry later"),
                "route": route_name,
                "request_id": request_id,
            }});
            FailAction::Closed {
                status: route.status_on_error,
                headers: vec![
                    ("retry-after", RETRY_AFTER_SECONDS.to_string()),
                    ("content-type", "application/json".to_owned()),
                ],
                body: body.to_string().into_bytes(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter_proto::envoy::config::core::v3::HeaderValue;
    use arbiter_proto::envoy::r#type::v3::HttpStatus;
    use arbiter_proto::envoy::service::auth::v3::{DeniedHttpResponse, OkHttpResponse};
    use arbiter_proto::google::rpc::Status;

    const T: Duration = Duration::from_millis(100);

    fn hvo(k: &str, v: &str, action: HeaderAppendAction) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: vec![],
            }),
            append_action: action as i32,
            ..Default::default()
        }
    }

    #[test]
    fn failure_classification() {
        let ms = Duration::from_millis;
        assert_eq!(
            classify_failure(14, Some("upstream request timeout"), ms(100), T),
            Reason::Timeout
        );
        assert_eq!(classify_failure(4, None, ms(100), T), Reason::Timeout);
        assert_eq!(
            classify_failure(14, Some("upstream connect error or disconnect/reset before headers. reset reason: connection failure"), ms(1), T),
            Reason::Unreachable
        );
        assert_eq!(
            classify_failure(14, Some("no healthy upstream"), ms(1), T),
            Reason::Unreachable
        );
        assert_eq!(classify_failure(14, None, ms(1), T), Reason::Unreachable);
        assert_eq!(classify_failure(14, None, ms(100), T), Reason::Timeout);
        assert_eq!(
            classify_failure(14, Some("upstream connect error or disconnect/reset before headers. reset reason: protocol error"), ms(1), T),
            Reason::BadResponse
        );
        assert_eq!(
            classify_failure(14, Some("audit log unavailable"), ms(1), T),
            Reason::Error
        );
        assert_eq!(
            classify_failure(13, Some("internal"), ms(1), T),
            Reason::Error
        );
        assert_eq!(classify_failure(7, None, ms(1), T), Reason::Error);
    }

    #[test]
    fn allow_with_header_mutations() {
        let resp = CheckResponse {
            status: Some(Status {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![
                    hvo(
                        "X-Arbiter-Audit-Id",
                        "a1",
                        HeaderAppendAction::OverwriteIfExistsOrAdd,
                    ),
                    hvo("x-tag", "t", HeaderAppendAction::AppendIfExistsOrAdd),
                ],
                headers_to_remove: vec!["Authorization".into()],
                response_headers_to_add: vec![hvo(
                    "x-r",
                    "1",
                    HeaderAppendAction::OverwriteIfExistsOrAdd,
                )],
                ..Default::default()
            })),
            dynamic_metadata: Some(prost_types::Struct {
                fields: [(
                    "policy_version".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue("sha256:ab".into())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
        };
        let Verdict::Allow {
            headers,
            remove,
            response_headers,
            policy_version,
        } = decode_response(&resp.encode_to_vec())
        else {
            panic!("not allowed")
        };
        assert_eq!(
            headers[0],
            HeaderOp {
                name: "x-arbiter-audit-id".into(),
                value: "a1".into(),
                append: false
            }
        );
        assert!(headers[1].append);
        assert_eq!(remove, vec!["authorization".to_owned()]);
        assert_eq!(response_headers.len(), 1);
        assert_eq!(policy_version.as_deref(), Some("sha256:ab"));
    }

    #[test]
    fn deny_keeps_server_status_and_body() {
        let resp = CheckResponse {
            status: Some(Status {
                code: 7,
                message: "nope".into(),
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 451 }),
                headers: vec![hvo(
                    "content-type",
                    "application/json",
                    HeaderAppendAction::OverwriteIfExistsOrAdd,
                )],
                body: r#"{"error":{"type":"policy_denied"}}"#.into(),
            })),
            dynamic_metadata: None,
        };
        let Verdict::Deny {
            status,
            headers,
            body,
            ..
        } = decode_response(&resp.encode_to_vec())
        else {
            panic!("not denied")
        };
        assert_eq!(status, 451);
        assert_eq!(
            headers,
            vec![("content-type".into(), "application/json".into())]
        );
        assert_eq!(body, br#"{"error":{"type":"policy_denied"}}"#);
    }

    #[test]
    fn deny_without_body_gets_a_json_body_and_403() {
        let resp = CheckResponse {
            status: Some(Status {
                code: 7,
                message: "forbidden by `p1`".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let Verdict::Deny {
            status,
            headers,
            body,
            ..
        } = decode_response(&resp.encode_to_vec())
        else {
            panic!("not denied")
        };
        assert_eq!(status, 403);
        assert!(headers.contains(&("content-type".into(), "application/json".into())));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "policy_denied");
        assert_eq!(v["error"]["message"], "forbidden by `p1`");
    }

    #[test]
    fn undecodable_or_statusless_answers_are_bad_responses() {
        assert_eq!(
            decode_response(&[0xff, 0xff, 0xff, 0xff]),
            Verdict::NoDecision(Reason::BadResponse)
        );
        assert_eq!(
            decode_response(&[]),
            Verdict::NoDecision(Reason::BadResponse)
        );
        let contradictory = CheckResponse {
            status: Some(Status::default()),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse::default())),
            ..Default::default()
        };
        assert_eq!(
            decode_response(&contradictory.encode_to_vec()),
            Verdict::NoDecision(Reason::BadResponse)
        );
    }

    fn resolved(mode: FailMode, override_active: bool) -> Resolved {
        Resolved {
            disabled: false,
            fail_mode: mode,
            override_active,
            timeout: T,
            status_on_error: 503,
            invalid: false,
            refuse_without_check: false,
            body_limit: None,
            cache_ttl: None,
            dry_run: false,
        }
    }

    #[test]
    fn closed_answers_503_retry_after_and_reason() {
        let FailAction::Closed {
            status,
            headers,
            body,
        } = fail_action(
            Reason::Timeout,
            &resolved(FailMode::Closed, false),
            "chat",
            "rid",
        )
        else {
            panic!("not closed")
        };
        assert_eq!(status, 503);
        assert!(headers.contains(&("retry-after", "1".to_owned())));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "policy_unavailable");
        assert_eq!(v["error"]["reason"], "timeout");
        assert_eq!(v["error"]["route"], "chat");
        assert_eq!(v["error"]["request_id"], "rid");
    }

    #[test]
    fn open_marks_reason_and_override() {
        assert_eq!(
            fail_action(
                Reason::Unreachable,
                &resolved(FailMode::Open, true),
                "r",
                ""
            ),
            FailAction::Open {
                marker: "unreachable",
                override_active: true
            }
        );
        assert!(matches!(
            fail_action(
                Reason::InvalidRouteConfig,
                &resolved(FailMode::Open, false),
                "r",
                ""
            ),
            FailAction::Closed { .. }
        ));
    }
}
