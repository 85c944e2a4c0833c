//! What the audit record takes from a `CheckRequest` beyond the policy request: headers
//! with secrets replaced and the trace id. (The body's size and hash, never its text, come
//! from the policy request's [`crate::ai::BodyAttributes`], so the record shows exactly what
//! policy saw.)

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request},
    AttributeContext, CheckRequest,
};

/// Headers always redacted, whatever the configuration says.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
];
/// A header whose name contains one of these is redacted too: custom credential headers
/// (`x-goog-api-key`, `x-session-token`, …) are too many to list.
pub const REDACTED_NAME_PARTS: &[&str] = &[
    "auth",
    "cookie",
    "token",
    "secret",
    "key",
    "password",
    "session",
    "credential",
    "signature",
];
/// What a redacted header's value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Which headers never reach the audit log in clear.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    extra: BTreeSet<String>,
}

impl Redactor {
    /// The built-in rules plus `extra` header names (case-insensitive).
    pub fn new(extra: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        Self {
            extra: extra
                .into_iter()
                .map(|name| name.as_ref().trim().to_ascii_lowercase())
                .filter(|name| !name.is_empty())
                .collect(),
        }
    }

    /// Whether the value of header `name` (lowercase) must not be recorded.
    pub fn is_secret(&self, name: &str) -> bool {
        ALWAYS_REDACTED.contains(&name)
            || self.extra.contains(name)
            || REDACTED_NAME_PARTS.iter().any(|part| name.contains(part))
    }

    /// The audit facts of `check`.
    pub fn facts(&self, check: &CheckRequest) -> RequestFacts {
        let Some(http) = http(check) else {
            return RequestFacts::default();
        };
        let mut headers = BTreeMap::new();
        let mut trace = None;
        let all = http
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .chain(http.header_map.iter().flat_map(|map| {
                map.headers.iter().map(|h| {
                    let value = if h.raw_value.is_empty() {
                        h.value.clone()
                    } else {
                        String::from_utf8_lossy(&h.raw_value).into_owned()
                    };
                    (h.key.as_str(), value)
                })
            }));
        for (name, value) in all {
            let name = name.to_ascii_lowercase();
            // Pseudo-headers are recorded as method/path/host/scheme; `:path` carries the
            // query string, which may hold secrets.
            if name.starts_with(':') {
                continue;
            }
            if name == "traceparent" {
                trace = TraceParent::parse(&value);
            }
            let value = if self.is_secret(&name) {
                REDACTED.to_owned()
            } else {
                value
            };
            headers.insert(name, value);
        }
        RequestFacts { headers, trace }
    }
}

/// Audit facts of one request; nothing here is secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// Headers without pseudo-headers, secret values replaced by [`REDACTED`].
    pub headers: BTreeMap<String, String>,
    /// The request's valid W3C `traceparent` header: its trace id goes into the record, and
    /// the decision's span continues it.
    pub trace: Option<TraceParent>,
}

fn http(check: &CheckRequest) -> Option<&HttpRequest> {
    match &check.attributes {
        Some(AttributeContext {
            request: Some(Request {
                http: Some(http), ..
            }),
            ..
        }) => Some(http),
        _ => None,
    }
}

/// A valid W3C `traceparent` (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// Trace id, 32 lowercase hex digits, not all zeros.
    pub trace_id: String,
    /// Id of the caller's span, 16 lowercase hex digits, not all zeros.
    pub parent_id: String,
    /// The caller's `sampled` flag.
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when malformed or invalid per the spec (version
    /// `ff`, an all-zero trace or parent id, extra fields after a version-00 value).
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let zeros = |s: &str| s.bytes().all(|b| b == b'0');
        // Version ff is invalid; later versions may append fields.
        if !hex(version, 2)
            || version.eq_ignore_ascii_case("ff")
            || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) || zeros(trace) || zeros(span) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace.to_ascii_lowercase(),
            parent_id: span.to_ascii_lowercase(),
            sampled: flags & 1 == 1,
        })
    }
}

/// The trace id of a W3C `traceparent`, lowercase; `None` when it is not valid (see
/// [`TraceParent::parse`]).
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    TraceParent::parse(traceparent).map(|t| t.trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

    fn check(headers: &[(&str, &str)], body: &[u8], size: i64) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        raw_body: body.to_vec(),
                        size,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn redacts_secret_headers_and_drops_pseudo_headers() {
        let redactor = Redactor::new(["X-Tenant-Pin"]);
        let facts = redactor.facts(&check(
            &[
                (":path", "/v1/chat?key=sk-1"),
                ("authorization", "Bearer sk-live-1"),
                ("cookie", "sid=abc"),
                ("x-api-key", "sk-2"),
                ("x-goog-api-key", "g-3"),
                ("x-tenant-pin", "1234"),
                ("user-agent", "curl/8"),
            ],
            b"",
            0,
        ));
        assert_eq!(
            facts.headers,
            BTreeMap::from([
                ("authorization".into(), REDACTED.into()),
                ("cookie".into(), REDACTED.into()),
                ("user-agent".into(), "curl/8".into()),
                ("x-api-key".into(), REDACTED.into()),
                ("x-goog-api-key".into(), REDACTED.into()),
                ("x-tenant-pin".into(), REDACTED.into()),
            ])
        );
    }

    #[test]
    fn header_map_values_are_redacted_too() {
        let mut check = check(&[], b"", 0);
        let http = check
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap();
        http.header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "Authorization".into(),
                value: String::new(),
                raw_value: b"Bearer sk-raw".to_vec(),
            }],
        });
        let facts = Redactor::default().facts(&check);
        assert_eq!(facts.headers["authorization"], REDACTED);
    }

    #[test]
    fn trace_ids() {
        let tp = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id_of(tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let facts = Redactor::default().facts(&check(&[("traceparent", tp)], b"", 0));
        assert_eq!(
            facts.trace,
            Some(TraceParent {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                parent_id: "00f067aa0ba902b7".into(),
                sampled: true,
            })
        );
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            TraceParent::parse(unsampled).map(|t| t.sampled),
            Some(false)
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(trace_id_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
    }
}
