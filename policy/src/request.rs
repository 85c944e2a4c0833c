//! The boundary: an ext_authz `CheckRequest` becomes an [`AuthzRequest`] once, here.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    AttributeContext, CheckRequest,
};
use envoy_types::pb::google::protobuf::Timestamp;

use crate::ai::{BodyAttributes, PARTIAL_BODY_HEADER};
use crate::identity::{Identity, API_KEY_HEADER};

/// Principal shown when the request carries no identity.
pub const ANONYMOUS: &str = "anonymous";
/// Header naming the tenant a request acts for (`context.requested_tenant`).
pub const TENANT_HEADER: &str = "x-tenant-id";
/// Resource used when the filter did not name the route.
pub const UNKNOWN_ROUTE: &str = "unknown";
/// `context_extensions` key that overrides the derived action.
pub const ACTION_KEY: &str = "action";
/// `context_extensions` key carrying the Envoy route name.
pub const ROUTE_KEY: &str = "route";
/// `context_extensions` key the filter sets to `"true"` on a route in dry-run (its route
/// setting `dry_run`): policy is advisory there and a deny is let through, marked. Audit
/// records of such decisions say so at top level (`"dry_run": true`).
pub const DRY_RUN_KEY: &str = "dry_run";
/// Action for any request that is not a known OpenAI-style call.
pub const DEFAULT_ACTION: &str = "http.request";
/// How far a CheckRequest's `request.time` may be from the server's clock, either way, and
/// still be the time policy sees (see [`request_time`]).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Why a `CheckRequest` cannot be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request has no `attributes`.
    #[error("check request has no `attributes`")]
    MissingAttributes,
    /// The attributes have no `request`.
    #[error("check request has no `attributes.request`")]
    MissingRequest,
    /// The request is not an HTTP request.
    #[error("check request has no `attributes.request.http`")]
    MissingHttp,
}

/// What policy decides on: the caller, the action, the route and the request context.
///
/// Holds no headers and no body (the API key only as its hash, the body only as
/// [`BodyAttributes`]), so nothing secret can leak from here into logs.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthzRequest {
    /// The strongest identity evidence, for logs: SPIFFE ID, `<iss>#<sub>`,
    /// `api_key:<hash prefix>` or [`ANONYMOUS`] (see [`Identity::display`]; the resolved
    /// Cedar principal is on the decision).
    pub principal: String,
    /// Identity evidence: mTLS principal, verified JWT claims, API-key hash.
    pub identity: Identity,
    /// Action name, e.g. `chat.completions`.
    pub action: String,
    /// Route name from `context_extensions["route"]`, or [`UNKNOWN_ROUTE`].
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Request path without the query string.
    pub path: String,
    /// Host (`:authority`).
    pub host: String,
    /// Scheme (`http` / `https`).
    pub scheme: String,
    /// Downstream socket address as `ip:port`, or empty.
    pub source: String,
    /// Envoy's request id (`x-request-id`).
    pub request_id: String,
    /// Every other `context_extensions` entry (route-level context such as `classification`).
    pub route_context: BTreeMap<String, String>,
    /// The `x-tenant-id` header (invalid UTF-8 replaced, so it matches no tenant).
    pub requested_tenant: Option<String>,
    /// What the body says (model, size, ...), when the route sends it.
    pub body: BodyAttributes,
    /// When the request was made (`context.time`): the CheckRequest's `request.time` when it
    /// is valid and within [`MAX_CLOCK_SKEW`] of the server's clock, else the server's
    /// receipt time (see [`request_time`]).
    pub time: SystemTime,
    /// Which clock [`Self::time`] is from.
    pub time_source: TimeSource,
}

/// Where [`AuthzRequest::time`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// The CheckRequest's `request.time` (Envoy's clock).
    Request,
    /// The server's clock on receipt: the CheckRequest stated no time.
    Receipt,
    /// The server's clock on receipt: the stated time was not a valid timestamp or was more
    /// than [`MAX_CLOCK_SKEW`] from the server's clock.
    Untrusted,
}

/// The time policy sees for a CheckRequest stating `stated`, received at `received`.
///
/// The rule: a stated time is used only when it is a valid timestamp (seconds from 1970,
/// nanos below 10^9) within [`MAX_CLOCK_SKEW`] of the server's clock; otherwise, or when
/// none is stated, the server's receipt time is used. Why:
/// - `context.time` decides time-bounded policies (`context.time < datetime("…")`). A time
///   far from the server's clock (a wrong Envoy clock, or a caller that is not Envoy) would
///   move a request into a window it is outside of, e.g. a permit that expired.
/// - A year outside 1970..=9999 cannot be written as a Cedar `datetime` (four-digit years),
///   and formatting one used to panic the handler.
/// - Not INVALID_ARGUMENT: no client of the gateway sets this field (Envoy does), so refusing
///   would turn one skewed Envoy clock into an outage of every route, while the server's own
///   clock answers "when" truthfully. An auditor reads the server's clock in the record's
///   `ts` either way; [`TimeSource::Untrusted`] is counted
///   (`arbiter_request_time_untrusted_total`).
pub fn request_time(stated: Option<&Timestamp>, received: SystemTime) -> (SystemTime, TimeSource) {
    let Some(stated) = stated else {
        return (received, TimeSource::Receipt);
    };
    let seconds = u64::try_from(stated.seconds).ok();
    let nanos = u32::try_from(stated.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000);
    let trusted = seconds
        .zip(nanos)
        .and_then(|(seconds, nanos)| {
            SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
        })
        .filter(|at| {
            let skew = match at.duration_since(received) {
                Ok(ahead) => ahead,
                Err(behind) => behind.duration(),
            };
            skew <= MAX_CLOCK_SKEW
        });
    match trusted {
        Some(at) => (at, TimeSource::Request),
        None => (received, TimeSource::Untrusted),
    }
}

impl TryFrom<CheckRequest> for AuthzRequest {
    type Error = RequestError;

    fn try_from(check: CheckRequest) -> Result<Self, Self::Error> {
        let CheckRequest { attributes } = check;
        // Without attributes or the HTTP request there is nothing to decide on; the service
        // answers INVALID_ARGUMENT rather than guessing a decision from an empty request.
        let AttributeContext {
            source,
            destination: _,
            request,
            mut context_extensions,
            metadata_context,
            route_metadata_context: _,
            tls_session: _,
        } = attributes.ok_or(RequestError::MissingAttributes)?;
        let Request { time, http } = request.ok_or(RequestError::MissingRequest)?;
        let HttpRequest {
            id,
            method,
            // Headers and body may hold API keys, tokens, cookies and prompt text: only the
            // API key (hashed), the tenant header and the body's attributes are kept. The
            // `authorization` header is never identity: JWTs count once jwt_authn verified
            // them (metadata_context).
            headers,
            header_map,
            path,
            host,
            scheme,
            query: _,
            fragment: _,
            size,
            protocol: _,
            body,
            raw_body,
        } = http.ok_or(RequestError::MissingHttp)?;
        let header = |name: &str| -> Option<Vec<u8>> {
            let from_map = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes().to_vec());
            from_map.or_else(|| {
                header_map.as_ref().and_then(|map| {
                    map.headers
                        .iter()
                        .find(|h| h.key.eq_ignore_ascii_case(name))
                        .map(|h| {
                            if h.raw_value.is_empty() {
                                h.value.as_bytes().to_vec()
                            } else {
                                h.raw_value.clone()
                            }
                        })
                })
            })
        };
        let api_key = header(API_KEY_HEADER);
        let requested_tenant =
            header(TENANT_HEADER).map(|t| String::from_utf8_lossy(&t).into_owned());
        let partial = header(PARTIAL_BODY_HEADER).is_some_and(|v| v.eq_ignore_ascii_case(b"true"));
        let body = if raw_body.is_empty() {
            BodyAttributes::from_body(body.as_bytes(), size, partial)
        } else {
            BodyAttributes::from_body(&raw_body, size, partial)
        };
        let (time, time_source) = request_time(time.as_ref(), SystemTime::now());

        let (mtls, source) = match source {
            Some(Peer {
                address,
                service: _,
                labels: _,
                principal,
                certificate: _,
            }) => (
                principal,
                address.as_ref().map(socket_address).unwrap_or_default(),
            ),
            None => (String::new(), String::new()),
        };
        let filter_metadata = metadata_context
            .map(|m| m.filter_metadata)
            .unwrap_or_default();
        let identity = Identity::from_parts(&mtls, &filter_metadata, api_key.as_deref());

        // Envoy's `path` is the request target; the query string may carry secrets.
        let path = match path.split_once('?') {
            Some((path, _query)) => path.to_owned(),
            None => path,
        };
        let action = context_extensions
            .remove(ACTION_KEY)
            .unwrap_or_else(|| action_for(&method, &path).to_owned());
        let route = context_extensions
            .remove(ROUTE_KEY)
            .unwrap_or_else(|| UNKNOWN_ROUTE.to_owned());

        Ok(Self {
            principal: identity.display(),
            identity,
            action,
            route,
            method,
            path,
            host,
            scheme,
            source,
            request_id: id,
            route_context: context_extensions.into_iter().collect(),
            requested_tenant,
            body,
            time,
            time_source,
        })
    }
}

/// The action of an OpenAI-style call, matched on the path suffix so a route prefix
/// (`/regulated/v1/chat/completions`) does not matter.
pub fn action_for(method: &str, path: &str) -> &'static str {
    match method {
        "POST" if path.ends_with("/v1/chat/completions") => "chat.completions",
        "POST" if path.ends_with("/v1/completions") => "completions",
        "POST" if path.ends_with("/v1/embeddings") => "embeddings",
        "GET" if path.ends_with("/v1/models") || path.contains("/v1/models/") => "models.list",
        _ => DEFAULT_ACTION,
    }
}

fn socket_address(address: &Address) -> String {
    match &address.address {
        Some(address::Address::SocketAddress(SocketAddress {
            address,
            port_specifier,
            ..
        })) => {
            let port = match port_specifier {
                Some(PortSpecifier::PortValue(port)) => port.to_string(),
                Some(PortSpecifier::NamedPort(name)) => name.clone(),
                None => String::new(),
            };
            if address.contains(':') {
                format!("[{address}]:{port}")
            } else {
                format!("{address}:{port}")
            }
        }
        // Pipes and internal addresses have no ip:port.
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn check(method: &str, path: &str, extensions: &[(&str, &str)]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.0.0.7".into(),
                            port_specifier: Some(PortSpecifier::PortValue(41000)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        id: "req-1".into(),
                        method: method.into(),
                        path: path.into(),
                        host: "llm.local".into(),
                        scheme: "https".into(),
                        headers: HashMap::from([("authorization".into(), "Bearer sk-1".into())]),
                        ..Default::default()
                    }),
                }),
                context_extensions: extensions
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
        }
    }

    fn action(method: &str, path: &str) -> String {
        AuthzRequest::try_from(check(method, path, &[]))
            .unwrap()
            .action
    }

    #[test]
    fn maps_every_action() {
        assert_eq!(action("POST", "/v1/chat/completions"), "chat.completions");
        assert_eq!(action("POST", "/v1/completions"), "completions");
        assert_eq!(action("POST", "/v1/embeddings"), "embeddings");
        assert_eq!(action("GET", "/v1/models"), "models.list");
        assert_eq!(action("GET", "/v1/models/gpt-4o"), "models.list");
        assert_eq!(action("GET", "/v1/chat/completions"), "http.request");
        assert_eq!(action("POST", "/v1/models"), "http.request");
        assert_eq!(action("DELETE", "/v1/files/1"), "http.request");
        assert_eq!(action("GET", "/"), "http.request");
    }

    #[test]
    fn ignores_query_and_route_prefix() {
        assert_eq!(
            action("POST", "/v1/chat/completions?api-version=1"),
            "chat.completions"
        );
        assert_eq!(
            action("POST", "/regulated/v1/chat/completions"),
            "chat.completions"
        );
        assert_eq!(action("POST", "/a/b/v1/embeddings"), "embeddings");
        assert_eq!(action("GET", "/tenant/v1/models?x=1"), "models.list");
        let req = AuthzRequest::try_from(check("POST", "/v1/embeddings?key=secret", &[])).unwrap();
        assert_eq!(req.path, "/v1/embeddings");
    }

    #[test]
    fn context_extension_action_wins() {
        let req = AuthzRequest::try_from(check(
            "POST",
            "/v1/chat/completions",
            &[("action", "batch.create")],
        ))
        .unwrap();
        assert_eq!(req.action, "batch.create");
        assert!(req.route_context.is_empty());
    }

    #[test]
    fn maps_context() {
        let req = AuthzRequest::try_from(check(
            "POST",
            "/regulated/v1/chat/completions",
            &[("route", "regulated_chat"), ("classification", "regulated")],
        ))
        .unwrap();
        assert!(req.time <= SystemTime::now());
        assert_eq!(
            req,
            AuthzRequest {
                principal: "anonymous".into(),
                identity: Identity::default(),
                action: "chat.completions".into(),
                route: "regulated_chat".into(),
                method: "POST".into(),
                path: "/regulated/v1/chat/completions".into(),
                host: "llm.local".into(),
                scheme: "https".into(),
                source: "10.0.0.7:41000".into(),
                request_id: "req-1".into(),
                route_context: BTreeMap::from([("classification".into(), "regulated".into())]),
                requested_tenant: None,
                // `size` 0: a request without body, and that is known.
                body: BodyAttributes {
                    size_known: true,
                    ..BodyAttributes::default()
                },
                time: req.time,
                time_source: TimeSource::Receipt,
            }
        );
    }

    #[test]
    fn authorization_header_is_not_identity() {
        // `check` sends `authorization: Bearer sk-1`; only verified metadata counts.
        let req = AuthzRequest::try_from(check("GET", "/v1/models", &[])).unwrap();
        assert_eq!(req.identity, Identity::default());
        assert_eq!(req.principal, "anonymous");
    }

    #[test]
    fn reads_api_key_tenant_body_and_time() {
        use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
        let mut check = check("POST", "/v1/chat/completions", &[]);
        let attributes = check.attributes.as_mut().unwrap();
        let request = attributes.request.as_mut().unwrap();
        // A second ago by the server's clock: within the skew, so it is the request's time.
        let sent = SystemTime::now() - Duration::from_secs(1);
        let since_epoch = sent.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        request.time = Some(Timestamp {
            seconds: since_epoch.as_secs() as i64,
            nanos: since_epoch.subsec_nanos() as i32,
        });
        let http = request.http.as_mut().unwrap();
        http.headers.insert("X-Api-Key".into(), "key-1".into());
        http.headers
            .insert("x-envoy-auth-partial-body".into(), "true".into());
        // Raw (non-UTF-8) values arrive in header_map.
        http.header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "x-tenant-id".into(),
                value: String::new(),
                raw_value: b"acme\xff".to_vec(),
            }],
        });
        http.raw_body = br#"{"model":"gpt-4o"#.to_vec();
        http.size = 90_000;
        let req = AuthzRequest::try_from(check).unwrap();
        assert_eq!(
            req.identity.api_key_sha256.as_deref(),
            Some(crate::identity::api_key_sha256(b"key-1").as_str())
        );
        assert_eq!(req.requested_tenant.as_deref(), Some("acme\u{fffd}"));
        assert!(req.body.truncated);
        assert_eq!(req.body.bytes, 90_000);
        assert_eq!(req.body.model, None);
        assert_eq!(req.time, sent);
        assert_eq!(req.time_source, TimeSource::Request);
    }

    fn timestamp(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    #[test]
    fn request_time_is_used_only_near_the_server_clock() {
        let received = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at =
            |seconds: i64, nanos: i32| request_time(Some(&timestamp(seconds, nanos)), received);
        assert_eq!(
            request_time(None, received),
            (received, TimeSource::Receipt)
        );
        // Within the skew, either way, to the nanosecond.
        for (offset, nanos) in [
            (0, 7),
            (-299, 7),
            (299, 7),
            (-1, 7),
            (1, 7),
            (-300, 0),
            (300, 0),
        ] {
            let (time, source) = at(1_800_000_000 + offset, nanos);
            assert_eq!(source, TimeSource::Request, "{offset}");
            let expected = if offset >= 0 {
                received + Duration::new(offset.unsigned_abs(), nanos as u32)
            } else {
                received - Duration::from_secs(offset.unsigned_abs())
                    + Duration::from_nanos(nanos as u64)
            };
            assert_eq!(time, expected);
        }
        // Too far, invalid, pre-1970, year 10000 and beyond: the server's clock.
        for (seconds, nanos) in [
            (1_800_000_000 - 301, 0),
            (1_800_000_000 + 301, 0),
            (1_800_000_000 + 300, 1),
            (1_800_000_000, -1),
            (1_800_000_000, 1_000_000_000),
            (1_800_000_000, i32::MAX),
            (0, 0),
            (-1, 0),
            (-62_135_596_800, 0),
            (i64::MIN, i32::MIN),
            (253_402_300_800, 0),
            (1_000_000_000_000, 0),
            (i64::MAX, 999_999_999),
            (i64::MAX, i32::MAX),
        ] {
            assert_eq!(
                at(seconds, nanos),
                (received, TimeSource::Untrusted),
                "{seconds}.{nanos}"
            );
        }
    }

    #[test]
    fn a_far_future_time_becomes_the_receipt_time() {
        let mut check = check("POST", "/v1/chat/completions", &[]);
        check
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .time = Some(timestamp(253_402_300_800, 0)); // 10000-01-01T00:00:00Z
        let before = SystemTime::now();
        let req = AuthzRequest::try_from(check).unwrap();
        assert!(req.time >= before && req.time <= SystemTime::now());
        assert_eq!(req.time_source, TimeSource::Untrusted);
    }

    #[test]
    fn principal_comes_from_mtls_peer_only() {
        let mut check = check("GET", "/v1/models", &[]);
        let attributes = check.attributes.as_mut().unwrap();
        attributes.source.as_mut().unwrap().principal = "spiffe://corp/ns/app/sa/bot".into();
        let req = AuthzRequest::try_from(check).unwrap();
        assert_eq!(req.principal, "spiffe://corp/ns/app/sa/bot");
        assert_eq!(req.route, "unknown");
    }

    #[test]
    fn ipv6_source() {
        let address = Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "::1".into(),
                port_specifier: Some(PortSpecifier::PortValue(8080)),
                ..Default::default()
            })),
        };
        assert_eq!(socket_address(&address), "[::1]:8080");
    }

    #[test]
    fn rejects_incomplete_requests() {
        assert_eq!(
            AuthzRequest::try_from(CheckRequest::default()),
            Err(RequestError::MissingAttributes)
        );
        let mut no_http = check("GET", "/", &[]);
        no_http
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http = None;
        assert_eq!(
            AuthzRequest::try_from(no_http),
            Err(RequestError::MissingHttp)
        );
        let mut no_request = check("GET", "/", &[]);
        no_request.attributes.as_mut().unwrap().request = None;
        assert_eq!(
            AuthzRequest::try_from(no_request),
            Err(RequestError::MissingRequest)
        );
    }
}
