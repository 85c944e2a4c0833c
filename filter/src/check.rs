//! Builds the `envoy.service.auth.v3.CheckRequest` the filter sends: the same message
//! Envoy's native ext_authz sends, so any ext_authz server can answer it.

use std::collections::HashMap;
use std::time::SystemTime;

use prost::Message;

use arbiter_proto::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use arbiter_proto::envoy::service::auth::v3::{attribute_context, AttributeContext, CheckRequest};

use crate::route::ROUTE_CONTEXT_KEY;

/// Prefix of the headers only Arbiter may set; client-sent ones are removed first.
pub const RESERVED_HEADER_PREFIX: &str = "x-arbiter-";
/// Header ext_authz servers read as "the body was cut at the limit": only the filter may
/// set it (a client's copy would make policy skip the body's attributes).
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";
/// Envoy headers the filter sets or the policy server reads, so a client's copies are
/// removed before anything reads the request.
pub const FILTER_OWNED_ENVOY_HEADERS: &[&str] = &[PARTIAL_BODY_HEADER];

/// What the filter knows about one request, read from the host once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    /// Request headers after the reserved ones were stripped (names lowercase,
    /// pseudo-headers included as Envoy's ext_authz does).
    pub headers: Vec<(String, String)>,
    /// Envoy route name (empty when unnamed).
    pub route_name: String,
    /// Downstream peer `ip:port`.
    pub source_address: Option<String>,
    /// Local `ip:port` the request arrived on.
    pub destination_address: Option<String>,
    /// mTLS peer principal (URI SAN, e.g. a SPIFFE ID).
    pub peer_principal: Option<String>,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: Option<String>,
    /// The request body's full length, when known: 0 for a request without a body,
    /// `content-length` (Envoy's codecs hold the body to it), or the length of a complete
    /// body the filter buffered. `None` is "unknown" (`size: -1` in the CheckRequest).
    pub body_size: Option<u64>,
}

impl RequestInfo {
    /// First value of a header (names are lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// True for header names a client may not send (`x-arbiter-*` and the Envoy headers the
/// filter owns, any case).
pub fn is_reserved_header(name: &str) -> bool {
    let prefix = RESERVED_HEADER_PREFIX.as_bytes();
    name.as_bytes()
        .get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        || FILTER_OWNED_ENVOY_HEADERS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
}

/// The body length `content-length` announces, if it is a plain decimal number (Envoy
/// rejects requests with invalid or conflicting values before the filter runs).
pub fn content_length(info: &RequestInfo) -> Option<u64> {
    let v = info.header("content-length")?.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Longest request id the filter passes to the policy server as gRPC metadata.
pub const MAX_METADATA_REQUEST_ID: usize = 256;

/// Whether `id` (the client's `x-request-id`) may travel as the policy call's gRPC
/// metadata. The id always reaches policy whole, in the CheckRequest; the metadata copy only
/// names the call in logs. The server's HTTP/2 stack refuses a header block over 16 KiB and
/// a value with control bytes: a call refused for an id the client chose would be a
/// failure the client caused, letting an `open` route through and tripping the breaker.
/// Only a short id of visible ASCII (and spaces) is sent.
pub fn metadata_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_METADATA_REQUEST_ID
        && id.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

/// Encodes the CheckRequest for `info` on a route with `context`.
pub fn encode_check_request(
    info: &RequestInfo,
    context: &[(String, String)],
    now: SystemTime,
) -> Vec<u8> {
    build_check_request(info, context, now).encode_to_vec()
}

/// Builds the CheckRequest for `info` on a route with `context`.
pub fn build_check_request(
    info: &RequestInfo,
    context: &[(String, String)],
    now: SystemTime,
) -> CheckRequest {
    let mut headers: HashMap<String, String> = HashMap::with_capacity(info.headers.len());
    for (k, v) in &info.headers {
        // Repeated headers are joined with a comma, as Envoy's ext_authz does.
        headers
            .entry(k.clone())
            .and_modify(|existing| {
                existing.push(',');
                existing.push_str(v);
            })
            .or_insert_with(|| v.clone());
    }
    let get = |name: &str| info.header(name).unwrap_or_default().to_owned();

    let mut context_extensions: HashMap<String, String> = context.iter().cloned().collect();
    context_extensions.insert(ROUTE_CONTEXT_KEY.to_owned(), info.route_name.clone());

    let http = attribute_context::HttpRequest {
        id: get("x-request-id"),
        method: get(":method"),
        path: get(":path"),
        host: get(":authority"),
        scheme: get(":scheme"),
        protocol: info.protocol.clone().unwrap_or_default(),
        // -1 is ext_authz's "unknown".
        size: info
            .body_size
            .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        headers,
        ..Default::default()
    };

    let time = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| prost_types::Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        });

    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: info.source_address.as_deref().and_then(socket_address),
                principal: info.peer_principal.clone().unwrap_or_default(),
                ..Default::default()
            }),
            destination: Some(attribute_context::Peer {
                address: info.destination_address.as_deref().and_then(socket_address),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                time,
                http: Some(http),
            }),
            context_extensions,
            ..Default::default()
        }),
    }
}

/// `ip:port` / `[v6]:port` → `Address`; anything else (a pipe, nonsense) → none.
fn socket_address(s: &str) -> Option<Address> {
    let addr: std::net::SocketAddr = s.parse().ok()?;
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RequestInfo {
        RequestInfo {
            headers: vec![
                (":method".into(), "POST".into()),
                (":path".into(), "/v1/chat/completions?x=1".into()),
                (":authority".into(), "llm.local".into()),
                (":scheme".into(), "http".into()),
                ("x-request-id".into(), "rid-1".into()),
                ("accept".into(), "a".into()),
                ("accept".into(), "b".into()),
            ],
            route_name: "chat".into(),
            source_address: Some("127.0.0.1:4567".into()),
            destination_address: Some("[::1]:10000".into()),
            peer_principal: Some("spiffe://mesh/ns/a/sa/b".into()),
            protocol: Some("HTTP/1.1".into()),
            body_size: None,
        }
    }

    #[test]
    fn only_short_visible_request_ids_travel_as_metadata() {
        assert!(metadata_request_id("0b8e1c6a-5c1f-4f4e-9a57-2a4f0c1d7e55"));
        assert!(metadata_request_id("trace 42"));
        assert!(metadata_request_id(&"r".repeat(MAX_METADATA_REQUEST_ID)));
        assert!(!metadata_request_id(""));
        assert!(!metadata_request_id(
            &"r".repeat(MAX_METADATA_REQUEST_ID + 1)
        ));
        assert!(!metadata_request_id("rid\u{1}ctl"));
        assert!(!metadata_request_id("rid\u{7f}del"));
        assert!(!metadata_request_id("rid\ttab"));
        assert!(!metadata_request_id("rid\u{fffd}"));
    }

    #[test]
    fn maps_request_like_native_ext_authz() {
        let req = build_check_request(
            &info(),
            &[("classification".into(), "regulated".into())],
            SystemTime::UNIX_EPOCH,
        );
        let a = req.attributes.unwrap();
        let http = a.request.unwrap().http.unwrap();
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/v1/chat/completions?x=1");
        assert_eq!(http.host, "llm.local");
        assert_eq!(http.scheme, "http");
        assert_eq!(http.id, "rid-1");
        assert_eq!(http.protocol, "HTTP/1.1");
        assert_eq!(http.size, -1);
        assert_eq!(http.headers["accept"], "a,b");
        assert_eq!(a.context_extensions["route"], "chat");
        assert_eq!(a.context_extensions["classification"], "regulated");
        let src = a.source.unwrap();
        assert_eq!(src.principal, "spiffe://mesh/ns/a/sa/b");
        let Some(address::Address::SocketAddress(sa)) = src.address.unwrap().address else {
            panic!("no socket address")
        };
        assert_eq!(sa.address, "127.0.0.1");
        assert_eq!(
            sa.port_specifier,
            Some(socket_address::PortSpecifier::PortValue(4567))
        );
        let Some(address::Address::SocketAddress(dst)) =
            a.destination.unwrap().address.unwrap().address
        else {
            panic!("no destination")
        };
        assert_eq!(dst.address, "::1");
    }

    #[test]
    fn missing_optional_parts_stay_empty() {
        let info = RequestInfo {
            source_address: Some("not an address".into()),
            ..RequestInfo::default()
        };
        let a = build_check_request(&info, &[], SystemTime::UNIX_EPOCH)
            .attributes
            .unwrap();
        assert!(a.source.unwrap().address.is_none());
        assert_eq!(a.context_extensions["route"], "");
    }

    #[test]
    fn reserved_headers() {
        assert!(is_reserved_header("x-arbiter-fail-open"));
        assert!(is_reserved_header("X-Arbiter-Anything"));
        assert!(!is_reserved_header("x-arbite"));
        assert!(!is_reserved_header("x-request-id"));
        assert!(is_reserved_header("x-envoy-auth-partial-body"));
        assert!(is_reserved_header("X-Envoy-Auth-Partial-Body"));
        assert!(!is_reserved_header("x-envoy-auth-partial-bod"));
        assert!(!is_reserved_header(""));
    }

    #[test]
    fn size_is_unknown_unless_known() {
        let mut i = info();
        assert_eq!(
            build_check_request(&i, &[], SystemTime::UNIX_EPOCH)
                .attributes
                .unwrap()
                .request
                .unwrap()
                .http
                .unwrap()
                .size,
            -1
        );
        i.body_size = Some(0);
        let size = |i: &RequestInfo| {
            build_check_request(i, &[], SystemTime::UNIX_EPOCH)
                .attributes
                .unwrap()
                .request
                .unwrap()
                .http
                .unwrap()
                .size
        };
        assert_eq!(size(&i), 0);
        i.body_size = Some(u64::MAX);
        assert_eq!(size(&i), i64::MAX);
        for (v, want) in [
            ("12", Some(12)),
            (" 7 ", Some(7)),
            ("-1", None),
            ("1e3", None),
            ("", None),
            ("99999999999999999999999", None),
        ] {
            let i = RequestInfo {
                headers: vec![("content-length".into(), v.into())],
                ..RequestInfo::default()
            };
            assert_eq!(content_length(&i), want, "{v:?}");
        }
    }
}
