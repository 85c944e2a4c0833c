//! Wire contract between the filter (its own prost messages, built for wasm32) and the
//! policy server (envoy-types): encode on one side, decode on the other.

use std::time::SystemTime;

use arbiter_filter::check::{build_check_request, RequestInfo};
use arbiter_filter::outcome::{decode_response, Verdict};
use envoy_types::pb::envoy::config::core::v3::{address, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::{
    check_response::HttpResponse, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status;
use prost::Message;

#[test]
fn filter_check_request_decodes_as_envoy_types() {
    let info = RequestInfo {
        headers: vec![
            (":method".into(), "POST".into()),
            (":path".into(), "/v1/chat/completions".into()),
            (":authority".into(), "gw".into()),
            (":scheme".into(), "https".into()),
            ("x-request-id".into(), "rid".into()),
        ],
        route_name: "chat".into(),
        source_address: Some("10.0.0.1:1234".into()),
        destination_address: None,
        peer_principal: Some("spiffe://cluster.local/ns/a/sa/b".into()),
        protocol: Some("HTTP/2".into()),
        body_size: Some(27),
    };
    let bytes = build_check_request(
        &info,
        &[("classification".into(), "regulated".into())],
        SystemTime::now(),
    )
    .encode_to_vec();
    let req = CheckRequest::decode(bytes.as_slice())
        .expect("envoy-types decodes the filter's CheckRequest");
    let attrs = req.attributes.expect("attributes");
    let http = attrs.request.expect("request").http.expect("http");
    assert_eq!(
        (http.method.as_str(), http.path.as_str(), http.host.as_str()),
        ("POST", "/v1/chat/completions", "gw")
    );
    assert_eq!(
        (
            http.scheme.as_str(),
            http.id.as_str(),
            http.protocol.as_str()
        ),
        ("https", "rid", "HTTP/2")
    );
    assert_eq!(http.size, 27, "the body size the filter knows");
    assert_eq!(attrs.context_extensions["route"], "chat");
    assert_eq!(attrs.context_extensions["classification"], "regulated");
    let source = attrs.source.expect("source");
    assert_eq!(source.principal, "spiffe://cluster.local/ns/a/sa/b");
    match source.address.and_then(|a| a.address) {
        Some(address::Address::SocketAddress(sa)) => assert_eq!(sa.address, "10.0.0.1"),
        other => panic!("unexpected source address {other:?}"),
    }
}

fn header(k: &str, v: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: k.into(),
            value: v.into(),
            raw_value: vec![],
        }),
        ..Default::default()
    }
}

#[test]
fn envoy_types_check_response_decodes_in_the_filter() {
    let allow = CheckResponse {
        status: Some(Status {
            code: 0,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![header("x-arbiter-audit-id", "a1")],
            ..Default::default()
        })),
        dynamic_metadata: None,
    };
    match decode_response(&allow.encode_to_vec()) {
        Verdict::Allow { headers, .. } => assert_eq!(headers[0].value, "a1"),
        other => panic!("expected allow, got {other:?}"),
    }

    let deny = CheckResponse {
        status: Some(Status {
            code: 7,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: 403 }),
            headers: vec![header("content-type", "application/json")],
            body: r#"{"error":{"type":"policy_denied"}}"#.into(),
        })),
        dynamic_metadata: None,
    };
    match decode_response(&deny.encode_to_vec()) {
        Verdict::Deny { status, body, .. } => {
            assert_eq!(status, 403);
            assert_eq!(body, br#"{"error":{"type":"policy_denied"}}"#);
        }
        other => panic!("expected deny, got {other:?}"),
    }
}

/// The Envoy-side record bounds the client's values as the server's records do, so an
/// auditor reads one rule for both (and the tenant as the server records a header value).
#[test]
fn record_bounds_match_the_servers() {
    use arbiter_filter::filter as envoy_side;
    use arbiter_policy_server::audit::{bound, redact};
    assert_eq!(envoy_side::MAX_RECORDED_PATH, bound::MAX_RECORDED_PATH);
    assert_eq!(envoy_side::MAX_RECORDED_HOST, bound::MAX_RECORDED_HOST);
    assert_eq!(
        envoy_side::MAX_RECORDED_REQUEST_ID,
        bound::MAX_RECORDED_REQUEST_ID
    );
    assert_eq!(envoy_side::MAX_RECORDED_MODEL, bound::MAX_RECORDED_MODEL);
    assert_eq!(envoy_side::MAX_RECORDED_METHOD, bound::MAX_RECORDED_METHOD);
    assert_eq!(envoy_side::MAX_RECORDED_SCHEME, bound::MAX_RECORDED_SCHEME);
    assert_eq!(
        envoy_side::MAX_RECORDED_PRINCIPAL,
        bound::MAX_RECORDED_PRINCIPAL
    );
    assert_eq!(
        envoy_side::MAX_RECORDED_TENANT,
        redact::MAX_RECORDED_HEADER_VALUE
    );
}
