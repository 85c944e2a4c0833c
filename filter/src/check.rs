//! Builds the `envoy.service.auth.v3.CheckRequest` the filter sends: the same message
//! Envoy's native ext_authz sends, so any ext_authz server can answer it.

use std::collections::HashMap;
use std::time::SystemTime;

use prost::Message;

use arbiter_proto::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use arbiter_proto::envoy::service::auth::v3::{attribute_context, AttributeContext, CheckRequest};

use crate::route::{DRY_RUN_CONTEXT_KEY, ROUTE_CONTEXT_KEY};

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

/// Encodes the CheckRequest for `info` on a route with `context` (no body, not dry-run,
/// no forwarded metadata).
pub fn encode_check_request(
    info: &RequestInfo,
    context: &[(String, String)],
    now: SystemTime,
) -> Vec<u8> {
    encode_check(info, context, now, &CheckExtras::default())
}

/// What the filter adds to the CheckRequest [`build_check_request`] describes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckExtras<'a> {
    /// The route is `dry_run`: context extension `dry_run: "true"`.
    pub dry_run: bool,
    /// Forwarded dynamic metadata (`metadata_context`), by namespace.
    pub metadata: Option<&'a prost_types::Struct>,
    /// The body bytes sent to policy (`raw_body`), when the route includes the body.
    pub body: Option<&'a [u8]>,
    /// The body was cut: header `x-envoy-auth-partial-body: true` (only with a body).
    pub partial: bool,
}

/// Encodes the same message as [`build_check_request`] plus `extras`, straight from the
/// borrowed request: no intermediate message, no copied strings, no hash maps. Equal, once
/// decoded, to the prost message (the `prop_direct_encoding_matches_prost` test), and of the
/// same length; map entries come in first-appearance order.
pub fn encode_check(
    info: &RequestInfo,
    context: &[(String, String)],
    now: SystemTime,
    extras: &CheckExtras<'_>,
) -> Vec<u8> {
    let headers: usize = info
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 6)
        .sum();
    let mut buf = Vec::with_capacity(
        256 + headers + info.route_name.len() + extras.body.map_or(0, <[u8]>::len),
    );
    pb::message(&mut buf, 1, |buf| {
        attributes(buf, info, context, now, extras)
    });
    buf
}

/// `AttributeContext`.
fn attributes(
    buf: &mut Vec<u8>,
    info: &RequestInfo,
    context: &[(String, String)],
    now: SystemTime,
    extras: &CheckExtras<'_>,
) {
    pb::message(buf, 1, |buf| {
        if let Some(addr) = info.source_address.as_deref() {
            peer_address(buf, addr);
        }
        pb::string(buf, 4, info.peer_principal.as_deref().unwrap_or_default());
    });
    pb::message(buf, 2, |buf| {
        if let Some(addr) = info.destination_address.as_deref() {
            peer_address(buf, addr);
        }
    });
    pb::message(buf, 4, |buf| {
        if let Ok(d) = now.duration_since(SystemTime::UNIX_EPOCH) {
            pb::message(buf, 1, |buf| {
                pb::int64(buf, 1, d.as_secs() as i64);
                pb::int64(buf, 2, i64::from(d.subsec_nanos() as i32));
            });
        }
        pb::message(buf, 2, |buf| http_request(buf, info, extras));
    });
    // `context_extensions`: the route's context (a later duplicate key wins), then the
    // route name and the dry-run mark, which replace a context key of the same name.
    for (i, (k, v)) in context.iter().enumerate() {
        let replaced = k == ROUTE_CONTEXT_KEY
            || (extras.dry_run && k == DRY_RUN_CONTEXT_KEY)
            || context[i + 1..].iter().any(|(later, _)| later == k);
        if !replaced {
            pb::map_entry(buf, 10, k, &[v]);
        }
    }
    pb::map_entry(buf, 10, ROUTE_CONTEXT_KEY, &[&info.route_name]);
    if extras.dry_run {
        pb::map_entry(buf, 10, DRY_RUN_CONTEXT_KEY, &["true"]);
    }
    if let Some(md) = extras.metadata {
        pb::message(buf, 11, |buf| metadata_context(md).encode_raw(buf));
    }
}

/// The CheckRequest's `metadata_context`: the forwarded namespaces that hold a struct.
fn metadata_context(md: &prost_types::Struct) -> arbiter_proto::envoy::config::core::v3::Metadata {
    arbiter_proto::envoy::config::core::v3::Metadata {
        filter_metadata: md
            .fields
            .iter()
            .filter_map(|(ns, v)| match &v.kind {
                Some(prost_types::value::Kind::StructValue(s)) => Some((ns.clone(), s.clone())),
                _ => None,
            })
            .collect(),
        ..Default::default()
    }
}

/// `AttributeContext.HttpRequest`.
fn http_request(buf: &mut Vec<u8>, info: &RequestInfo, extras: &CheckExtras<'_>) {
    let first = |name: &str| info.header(name).unwrap_or_default();
    pb::string(buf, 1, first("x-request-id"));
    pb::string(buf, 2, first(":method"));
    // Repeated headers are joined with a comma, as Envoy's ext_authz does; the filter's
    // partial-body mark replaces a header of that name (clients' copies are removed anyway).
    let partial = extras.body.is_some() && extras.partial;
    let mut values: Vec<&str> = Vec::new();
    for (i, (name, _)) in info.headers.iter().enumerate() {
        if info.headers[..i].iter().any(|(k, _)| k == name)
            || (partial && name == PARTIAL_BODY_HEADER)
        {
            continue;
        }
        values.clear();
        values.extend(
            info.headers[i..]
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
        );
        pb::map_entry(buf, 3, name, &values);
    }
    if partial {
        pb::map_entry(buf, 3, PARTIAL_BODY_HEADER, &["true"]);
    }
    pb::string(buf, 4, first(":path"));
    pb::string(buf, 5, first(":authority"));
    pb::string(buf, 6, first(":scheme"));
    // -1 is ext_authz's "unknown".
    let size = info
        .body_size
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    pb::int64(buf, 9, size);
    pb::string(buf, 10, info.protocol.as_deref().unwrap_or_default());
    if let Some(body) = extras.body {
        pb::bytes(buf, 12, body);
    }
}

/// `Peer.address` for `ip:port` / `[v6]:port`; nothing for anything else.
fn peer_address(buf: &mut Vec<u8>, s: &str) {
    let Ok(addr) = s.parse::<std::net::SocketAddr>() else {
        return;
    };
    let mut ip = pb::StackText::default();
    let _ = std::fmt::Write::write_fmt(&mut ip, format_args!("{}", addr.ip()));
    pb::message(buf, 1, |buf| {
        pb::message(buf, 1, |buf| {
            pb::string(buf, 2, ip.as_str());
            // A oneof member is encoded even when zero.
            prost::encoding::uint32::encode(3, &u32::from(addr.port()), buf);
        });
    });
}

/// Protobuf wire writing for [`encode_check`], with prost's rules: proto3 scalars and
/// strings are left out when empty or zero, map entries leave out an empty key or value.
mod pb {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

    /// A length-delimited field whose content `body` writes; the length is put in front
    /// afterwards (the content is moved by the 1–3 bytes it takes).
    pub(super) fn message(buf: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
        encode_key(tag, WireType::LengthDelimited, buf);
        let start = buf.len();
        body(buf);
        let len = (buf.len() - start) as u64;
        let mut prefix = [0u8; 10];
        let n = encoded_len_varint(len);
        encode_varint(len, &mut &mut prefix[..]);
        buf.splice(start..start, prefix[..n].iter().copied());
    }

    pub(super) fn bytes(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
        if value.is_empty() {
            return;
        }
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.extend_from_slice(value);
    }

    pub(super) fn string(buf: &mut Vec<u8>, tag: u32, value: &str) {
        bytes(buf, tag, value.as_bytes());
    }

    pub(super) fn int64(buf: &mut Vec<u8>, tag: u32, value: i64) {
        if value != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(value as u64, buf);
        }
    }

    /// One `map<string, string>` entry whose value is `parts` joined with commas.
    pub(super) fn map_entry(buf: &mut Vec<u8>, tag: u32, key: &str, parts: &[&str]) {
        let field = |len: usize| {
            if len == 0 {
                0
            } else {
                1 + encoded_len_varint(len as u64) + len
            }
        };
        let value_len =
            parts.iter().map(|p| p.len()).sum::<usize>() + parts.len().saturating_sub(1);
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint((field(key.len()) + field(value_len)) as u64, buf);
        string(buf, 1, key);
        if value_len > 0 {
            encode_key(2, WireType::LengthDelimited, buf);
            encode_varint(value_len as u64, buf);
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(part.as_bytes());
            }
        }
    }

    /// Text of at most 64 bytes (an IP address) formatted without allocating.
    pub(super) struct StackText {
        bytes: [u8; 64],
        len: usize,
    }

    impl Default for StackText {
        fn default() -> Self {
            Self {
                bytes: [0; 64],
                len: 0,
            }
        }
    }

    impl StackText {
        pub(super) fn as_str(&self) -> &str {
            std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
        }
    }

    impl std::fmt::Write for StackText {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let end = self.len + s.len();
            let slot = self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?;
            slot.copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
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

/// (Tests.) The message the filter sent before [`encode_check`]: [`build_check_request`] with
/// the extras applied to the prost message.
#[cfg(test)]
pub(crate) fn reference_check_request(
    info: &RequestInfo,
    context: &[(String, String)],
    now: SystemTime,
    extras: &CheckExtras<'_>,
) -> CheckRequest {
    let mut request = build_check_request(info, context, now);
    let Some(attrs) = request.attributes.as_mut() else {
        return request;
    };
    if extras.dry_run {
        attrs
            .context_extensions
            .insert(DRY_RUN_CONTEXT_KEY.to_owned(), "true".to_owned());
    }
    if let Some(md) = extras.metadata {
        attrs.metadata_context = Some(metadata_context(md));
    }
    if let (Some(body), Some(http)) = (
        extras.body,
        attrs.request.as_mut().and_then(|r| r.http.as_mut()),
    ) {
        http.raw_body = body.to_vec();
        if extras.partial {
            http.headers
                .insert(PARTIAL_BODY_HEADER.to_owned(), "true".to_owned());
        }
    }
    request
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

    fn assert_same(
        info: &RequestInfo,
        context: &[(String, String)],
        now: SystemTime,
        extras: &CheckExtras<'_>,
    ) {
        let want = reference_check_request(info, context, now, extras);
        let got = encode_check(info, context, now, extras);
        assert_eq!(CheckRequest::decode(got.as_slice()).unwrap(), want);
        assert_eq!(got.len(), want.encoded_len());
    }

    #[test]
    fn direct_encoding_matches_prost() {
        let md = prost_types::Struct {
            fields: [(
                "jwt_authn".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                        fields: [(
                            "sub".to_owned(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue("u".into())),
                            },
                        )]
                        .into_iter()
                        .collect(),
                    })),
                },
            )]
            .into_iter()
            .collect(),
        };
        let context = [
            ("classification".to_owned(), "regulated".to_owned()),
            ("route".to_owned(), "forged".to_owned()),
            ("dry_run".to_owned(), "no".to_owned()),
            ("classification".to_owned(), "public".to_owned()),
            (String::new(), String::new()),
        ];
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123);
        assert_same(&info(), &[], now, &CheckExtras::default());
        assert_same(
            &info(),
            &context,
            SystemTime::UNIX_EPOCH,
            &CheckExtras::default(),
        );
        assert_same(
            &info(),
            &context,
            now,
            &CheckExtras {
                dry_run: true,
                metadata: Some(&md),
                body: Some(b"{\"model\":\"m\"}"),
                partial: true,
            },
        );
        let mut bare = RequestInfo::default();
        assert_same(&bare, &[], now, &CheckExtras::default());
        bare.body_size = Some(0);
        bare.source_address = Some("[0:0::1]:0".into());
        bare.headers = vec![
            (String::new(), String::new()),
            ("a".into(), String::new()),
            ("a".into(), String::new()),
            (PARTIAL_BODY_HEADER.into(), "x".into()),
        ];
        for partial in [false, true] {
            for body in [None, Some(&b""[..]), Some(&b"x"[..])] {
                let extras = CheckExtras {
                    body,
                    partial,
                    ..CheckExtras::default()
                };
                assert_same(&bare, &[], now, &extras);
            }
        }
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
