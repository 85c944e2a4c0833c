//! Bad input gets a defined answer, never a crash: bodies over the limit, bodies that are
//! not JSON, header values that are not UTF-8, messages that are not valid protobuf,
//! messages at and over the size limit the filter and server agree on, request times in
//! any year, IPv4-mapped source addresses, and bodies of unknown size. After each, the
//! server still answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response::HttpResponse, CheckRequest,
    CheckResponse,
};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use common::{check_request, example_bundle, Running};

fn with_body(mut request: CheckRequest, body: &[u8], size: i64, partial: bool) -> CheckRequest {
    let http = common::http_mut(&mut request);
    http.raw_body = body.to_vec();
    http.size = size;
    if partial {
        http.headers
            .insert("x-envoy-auth-partial-body".into(), "true".into());
    }
    request
}

fn denied_by(response: &CheckResponse) -> Vec<String> {
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
            serde_json::from_value(body["error"]["policy_ids"].clone()).unwrap()
        }
        other => panic!("not denied: {other:?}"),
    }
}

fn chat() -> CheckRequest {
    check_request("", "POST", "/v1/chat/completions", &[("route", "chat")])
}

/// Sends raw bytes as the Check request message.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

async fn send_raw(server: &Running, bytes: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check");
    grpc.unary(tonic::Request::new(bytes), path, Raw)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_headers_are_decided() {
    let server = Running::start(&example_bundle(), None, Duration::ZERO).await;
    let client = AuthorizationClient::new(server.channel().await);
    let check = |request: CheckRequest| {
        let mut client = client.clone();
        async move { client.check(request).await.unwrap().into_inner() }
    };

    // Over the limit: the filter cut it and said so.
    let prefix = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"aaaaaaaa"#;
    let strict = check_request(
        "",
        "POST",
        "/v1/chat/completions",
        &[("route", "chat"), ("body_policy", "strict")],
    );
    let response = check(with_body(strict, prefix, 1_000_000, true)).await;
    assert_eq!(denied_by(&response), ["body-must-be-readable"]);
    // Routes that do not ask for it let a cut body through (with the other rules).
    let response = check(with_body(chat(), prefix, 1_000_000, true)).await;
    assert_eq!(response.status.unwrap().code, 0);

    // Not JSON, not UTF-8, JSON of the wrong shape.
    for body in [
        &b"{\"model\": gpt-4o}"[..],
        b"\xff\xfe\x00\x01",
        b"[]",
        b"{\"model\":{}}",
    ] {
        let response = check(with_body(chat(), body, body.len() as i64, false)).await;
        assert_eq!(denied_by(&response), ["body-must-be-readable"], "{body:?}");
    }

    // A valid body still goes through.
    let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
    let response = check(with_body(chat(), body, body.len() as i64, false)).await;
    assert_eq!(response.status.unwrap().code, 0);

    // Header values that are not UTF-8 arrive as raw bytes in `header_map`: the tenant
    // (lossily decoded) matches no tenant, the API key (hashed as bytes) no caller.
    let mut request = chat();
    let http = common::http_mut(&mut request);
    http.header_map = Some(HeaderMap {
        headers: vec![
            HeaderValue {
                key: "x-tenant-id".into(),
                value: String::new(),
                raw_value: b"acme\xc0".to_vec(),
            },
            HeaderValue {
                key: "x-api-key".into(),
                value: String::new(),
                raw_value: b"demo-key-acme-batch\xff".to_vec(),
            },
        ],
    });
    let response = check(request).await;
    assert_eq!(denied_by(&response), ["tenant-isolation"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_are_refused_and_the_server_keeps_serving() {
    let server = Running::start(&example_bundle(), None, Duration::ZERO).await;

    // A header value with invalid UTF-8 in a protobuf `string` field.
    let mut request = chat();
    let http = common::http_mut(&mut request);
    http.headers.insert("x-tenant-id".into(), "MARKER".into());
    let mut bytes = request.encode_to_vec();
    let at = bytes.windows(6).position(|w| w == b"MARKER").unwrap();
    bytes[at..at + 6].copy_from_slice(b"\xff\xfe\xfd\xfc\xfb\xfa");
    let status = send_raw(&server, bytes).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);

    // Not protobuf at all.
    let status = send_raw(&server, vec![0xff; 64]).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);

    // Still serving, and a well-formed request sent raw decodes as usual.
    let response = send_raw(&server, chat().encode_to_vec()).await.unwrap();
    let response = CheckResponse::decode(response.as_slice()).unwrap();
    assert_eq!(response.status.unwrap().code, 0);
    server.stop().await;
}

/// `request` with its body grown or shrunk so that it encodes to exactly `len` bytes.
fn sized(request: &CheckRequest, len: usize) -> CheckRequest {
    let mut request = request.clone();
    for _ in 0..8 {
        let encoded = request.encoded_len();
        if encoded == len {
            return request;
        }
        let http = common::http_mut(&mut request);
        let body = (http.raw_body.len() + len).saturating_sub(encoded);
        http.raw_body.resize(body, b'a');
    }
    panic!("cannot size the request to {len} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_up_to_the_agreed_limit_are_decided_and_larger_ones_refused() {
    let server = Running::start(&example_bundle(), None, Duration::ZERO).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let limit = arbiter_proto::MAX_CHECK_REQUEST_BYTES;

    // The largest body a route may send (8 MiB, cut, so not parsed) with a header block of
    // almost 8 MiB: decided and recorded.
    let mut request = with_body(chat(), &vec![b'a'; 8 * 1024 * 1024], 20_000_000, true);
    let http = common::http_mut(&mut request);
    http.id = "big".into();
    for i in 0..63 {
        http.headers
            .insert(format!("x-big-{i}"), "b".repeat(128 * 1024));
    }
    assert!(request.encoded_len() > 15 * 1024 * 1024 && request.encoded_len() < limit);
    let response = client.check(request.clone()).await.unwrap().into_inner();
    assert_eq!(response.status.unwrap().code, 0);
    let records = common::audit_lines(&server.audit_dir.path().join("audit.log"));
    let record = records.iter().find(|r| r["request_id"] == "big").unwrap();
    assert_eq!(record["decision"], "allow");
    assert_eq!(record["body_bytes"], 20_000_000);
    assert_eq!(record["body_truncated"], true);

    // Exactly the limit: decided. One byte more: refused before any decision, OUT_OF_RANGE
    // ("caused by the request" to the filter), naming the limit.
    let at_limit = sized(&request, limit);
    assert_eq!(at_limit.encoded_len(), limit);
    let response = client.check(at_limit).await.unwrap().into_inner();
    assert_eq!(response.status.unwrap().code, 0);
    let over = sized(&request, limit + 1);
    assert_eq!(over.encoded_len(), limit + 1);
    let status = client.check(over).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains(&limit.to_string()),
        "{}",
        status.message()
    );

    // Still serving.
    let response = client.check(chat()).await.unwrap().into_inner();
    assert_eq!(response.status.unwrap().code, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_request_time_gets_a_decision() {
    use envoy_types::pb::google::protobuf::Timestamp;
    let server = Running::start(&example_bundle(), None, Duration::ZERO).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let times = [
        (253_402_300_800, 0), // 10000-01-01T00:00:00Z: used to panic the handler
        (253_402_300_799, 999_999_999), // 9999-12-31T23:59:59.999999999Z
        (1_000_000_000_000, 0),
        (i64::MAX, 999_999_999),
        (i64::MAX, i32::MAX),
        (-1, 0),
        (-62_135_596_800, 0), // 0001-01-01
        (i64::MIN, i32::MIN),
        (0, 0),
        (now.as_secs() as i64, -1),
        (now.as_secs() as i64, 1_000_000_000),
    ];
    for (seconds, nanos) in times {
        let mut request = chat();
        request
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .time = Some(Timestamp { seconds, nanos });
        let response = client
            .check(request)
            .await
            .unwrap_or_else(|e| panic!("{seconds}.{nanos}: {e:?}"))
            .into_inner();
        assert_eq!(response.status.unwrap().code, 0, "{seconds}.{nanos}");
    }
    // None of them was within five minutes of the server's clock: each decided at receipt.
    let untrusted = server.metric("arbiter_request_time_untrusted_total").await;
    assert_eq!(untrusted, times.len() as f64);
    // A time a second ago is the request's own and not counted.
    let mut request = chat();
    request
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .time = Some(Timestamp {
        seconds: now.as_secs() as i64 - 1,
        nanos: 0,
    });
    client.check(request).await.unwrap();
    assert_eq!(
        server.metric("arbiter_request_time_untrusted_total").await,
        untrusted
    );
    let records = common::audit_lines(&server.audit_dir.path().join("audit.log"));
    assert_eq!(records.len(), times.len() + 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_client_of_a_dual_stack_listener_is_decided() {
    use envoy_types::pb::envoy::config::core::v3::{
        address, socket_address::PortSpecifier, Address, SocketAddress,
    };
    let server = Running::start(&example_bundle(), None, Duration::ZERO).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let mut request = chat();
    request
        .attributes
        .as_mut()
        .unwrap()
        .source
        .as_mut()
        .unwrap()
        .address = Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "::ffff:10.1.2.3".into(),
            port_specifier: Some(PortSpecifier::PortValue(40000)),
            ..Default::default()
        })),
    });
    // Cedar refuses `ip("::ffff:10.1.2.3")`: this used to be an INTERNAL error.
    let response = client.check(request).await.unwrap().into_inner();
    assert_eq!(response.status.unwrap().code, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_limit_cannot_be_bypassed_by_leaving_out_the_length() {
    let server = Running::start(&example_bundle(), None, Duration::ZERO).await;
    let client = AuthorizationClient::new(server.channel().await);
    let check = |request: CheckRequest| {
        let mut client = client.clone();
        async move { client.check(request).await.unwrap().into_inner() }
    };
    let bounded = || {
        check_request(
            "",
            "POST",
            "/v1/chat/completions",
            &[("route", "chat"), ("size_policy", "bounded")],
        )
    };
    let prefix = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"aaaaaaaa"#;
    // Chunked and cut at the route's limit: size unknown, refused.
    let response = check(with_body(bounded(), prefix, -1, true)).await;
    assert_eq!(denied_by(&response), ["body-size-limit"]);
    // Chunked on a route that sends no body: refused too.
    let response = check(with_body(bounded(), b"", -1, false)).await;
    assert_eq!(denied_by(&response), ["body-size-limit"]);
    // Chunked but sent whole: measured, allowed.
    let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
    let response = check(with_body(bounded(), body, -1, false)).await;
    assert_eq!(response.status.unwrap().code, 0);
    // Known and over the limit.
    let response = check(with_body(bounded(), prefix, 1_048_577, true)).await;
    assert_eq!(denied_by(&response), ["body-size-limit"]);
    // A route that does not opt in does not limit size.
    let response = check(with_body(chat(), prefix, -1, true)).await;
    assert_eq!(response.status.unwrap().code, 0);

    // The record says what policy saw.
    let records = common::audit_lines(&server.audit_dir.path().join("audit.log"));
    let seen: Vec<(u64, bool)> = records
        .iter()
        .map(|r| {
            (
                r["body_bytes"].as_u64().unwrap(),
                r["body_size_known"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (prefix.len() as u64, false),
            (0, false),
            (body.len() as u64, true),
            (1_048_577, true),
            (prefix.len() as u64, false),
        ]
    );
    server.stop().await;
}
