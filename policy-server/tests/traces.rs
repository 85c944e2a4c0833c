//! Traces: the built server exports one span per Check to a real OTLP/gRPC traces receiver
//! in this process, continuing the caller's `traceparent`; the audit record names the same
//! trace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{audit_id, audit_lines, check_request, eventually, Server};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// An OTLP/gRPC traces receiver keeping every span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| string(a.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free port of 127.0.0.1 until the test ends.
    async fn start() -> (Collector, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (collector, addr)
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits for the `arbiter.check` span of the decision `audit_id`.
    async fn check_span(&self, audit_id: &str) -> Span {
        eventually(Duration::from_secs(15), "the check span", || async {
            self.spans()
                .into_iter()
                .map(|(_, span)| span)
                .find(|s| s.name == "arbiter.check" && attr(s, "arbiter.audit.id") == audit_id)
        })
        .await
    }
}

fn string(value: &opentelemetry_proto::tonic::common::v1::AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The attribute `key` of `span` as text ("" if absent).
fn attr(span: &Span, key: &str) -> String {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| string(a.value.as_ref()?))
        .unwrap_or_default()
}

fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|a| {
            let value = a.value.as_ref().and_then(string).unwrap_or_default();
            (a.key.clone(), value)
        })
        .collect()
}

fn traced(traceparent: Option<&str>, request_id: &str) -> CheckRequest {
    let mut check = check_request("", "GET", "/v1/models", &[("route", "models")]);
    let http = check
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap();
    http.id = request_id.to_owned();
    http.headers
        .insert("x-api-key".into(), "key-that-must-not-leak".into());
    if let Some(tp) = traceparent {
        http.headers.insert("traceparent".into(), tp.into());
    }
    check
}

async fn start_server(dir: &std::path::Path, endpoint: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--otlp-traces-endpoint",
        endpoint,
        "--audit-sync",
        "write",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Server::start(dir, &args).await
}

fn audit_record(server: &Server, id: &str) -> serde_json::Value {
    audit_lines(&server.audit)
        .into_iter()
        .find(|r| r["id"] == id)
        .unwrap()
}

fn terminate(server: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn client_traceparent_appears_on_the_server_span_and_its_audit_record() {
    let (collector, addr) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &format!("http://{addr}"), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);

    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let response = client
        .check(traced(Some(&traceparent), "req-traced"))
        .await
        .unwrap()
        .into_inner();
    let id = audit_id(&response);

    let span = collector.check_span(&id).await;
    assert_eq!(hex::encode(&span.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&span.parent_span_id), PARENT_ID);
    assert_eq!(span.kind, SpanKind::Server as i32);
    let a = attrs(&span);
    assert_eq!(a["arbiter.route"], "models");
    assert_eq!(a["arbiter.decision"], "allow");
    assert_eq!(a["arbiter.request_id"], "req-traced");
    assert!(a["arbiter.policy_version"].contains("sha256:"), "{a:?}");
    assert_eq!(a["rpc.method"], "Check");

    // The audit record names the same trace.
    assert_eq!(audit_record(&server, &id)["trace_id"], TRACE_ID);

    // Evaluation and the audit write are children of the check span.
    let children = eventually(Duration::from_secs(15), "child spans", || async {
        let children: HashMap<String, Span> = collector
            .spans()
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.parent_span_id == span.span_id)
            .map(|s| (s.name.clone(), s))
            .collect();
        (children.len() >= 2).then_some(children)
    })
    .await;
    for name in ["arbiter.evaluate", "arbiter.audit.write"] {
        assert_eq!(hex::encode(&children[name].trace_id), TRACE_ID, "{name}");
    }

    // Nothing secret on any span, and every span is the server's.
    for (service, span) in collector.spans() {
        assert_eq!(service, "arbiter-policy-server");
        let text = format!("{:?}", span.attributes);
        for secret in ["sk-secret", "key-that-must-not-leak", "Bearer", "x-api-key"] {
            assert!(!text.contains(secret), "{secret} on {}: {text}", span.name);
        }
        assert!(span.events.is_empty(), "{:?}", span.events);
    }
}

#[tokio::test]
async fn invalid_or_unsampled_traceparents_and_call_metadata() {
    let (collector, addr) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &format!("http://{addr}"), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);

    // Unsampled by the caller: decided and recorded, no span exported.
    let unsampled_trace = "11111111111111111111111111111111";
    let unsampled = format!("00-{unsampled_trace}-{PARENT_ID}-00");
    let response = client
        .check(traced(Some(&unsampled), "req-unsampled"))
        .await
        .unwrap()
        .into_inner();
    let unsampled_id = audit_id(&response);
    assert_eq!(
        audit_record(&server, &unsampled_id)["trace_id"],
        unsampled_trace
    );

    // Invalid: a new root trace, no error; the record has no trace id.
    let bad = format!("00-{TRACE_ID}-0000000000000000-01");
    let response = client
        .check(traced(Some(&bad), "req-bad"))
        .await
        .unwrap()
        .into_inner();
    let bad_id = audit_id(&response);

    // The call's own metadata is the parent when the request carries none.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let metadata_parent = format!("00-{other_trace}-b7ad6b7169203331-01");
    let mut request = tonic::Request::new(traced(None, "req-metadata"));
    request
        .metadata_mut()
        .insert("traceparent", metadata_parent.parse().unwrap());
    let metadata_id = audit_id(&client.check(request).await.unwrap().into_inner());

    // Both: the request's header wins.
    let mut request = tonic::Request::new(traced(
        Some(&format!("00-{TRACE_ID}-{PARENT_ID}-01")),
        "req-both",
    ));
    request
        .metadata_mut()
        .insert("traceparent", metadata_parent.parse().unwrap());
    let both_id = audit_id(&client.check(request).await.unwrap().into_inner());

    let root = collector.check_span(&bad_id).await;
    assert!(root.parent_span_id.is_empty(), "{:?}", root.parent_span_id);
    assert_eq!(root.trace_id.len(), 16);
    assert_ne!(hex::encode(&root.trace_id), TRACE_ID);
    assert!(audit_record(&server, &bad_id)["trace_id"].is_null());

    let span = collector.check_span(&metadata_id).await;
    assert_eq!(hex::encode(&span.trace_id), other_trace);
    assert_eq!(hex::encode(&span.parent_span_id), "b7ad6b7169203331");
    assert_eq!(audit_record(&server, &metadata_id)["trace_id"], other_trace);

    let span = collector.check_span(&both_id).await;
    assert_eq!(hex::encode(&span.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&span.parent_span_id), PARENT_ID);
    assert_eq!(audit_record(&server, &both_id)["trace_id"], TRACE_ID);

    // The unsampled check ended before the ones above (same batch or an earlier one): its
    // span would have arrived by now.
    assert!(
        collector
            .spans()
            .iter()
            .all(|(_, s)| hex::encode(&s.trace_id) != unsampled_trace),
        "an unsampled trace was exported"
    );
}

#[tokio::test]
async fn shutdown_sends_the_spans_still_queued() {
    let (collector, addr) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &format!("http://{addr}"), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let response = client
        .check(traced(Some(&traceparent), "req-last"))
        .await
        .unwrap()
        .into_inner();
    let id = audit_id(&response);
    // Well before the batch delay: only the flush on exit can send it.
    terminate(&server);
    let status = tokio::time::timeout(Duration::from_secs(15), server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}\n{}", server.log());
    let span = collector.check_span(&id).await;
    assert_eq!(hex::encode(&span.trace_id), TRACE_ID);
}

#[tokio::test]
async fn a_collector_that_hangs_never_slows_decisions() {
    // Accepts connections (the kernel completes them) but never answers: every export
    // waits for its timeout. The worst kind of outage.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hung.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &format!("http://{addr}"), &[]).await;
    let metrics = server.metrics_addr();
    let mut client = AuthorizationClient::new(server.channel().await);
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let one = Instant::now();
        let response = client
            .check(traced(Some(&traceparent), &format!("req-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status.unwrap().code, 0);
        slowest = slowest.max(one.elapsed());
    }
    // Generous bounds for a loaded 2-core box: an export waits 5 s per batch.
    assert!(
        slowest < Duration::from_secs(1),
        "slowest check {slowest:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(audit_lines(&server.audit).len(), 200);

    // The spans the collector never took are counted once their export times out.
    eventually(Duration::from_secs(20), "dropped spans counted", || async {
        let text = common::http_get(metrics, "/metrics").await;
        let dropped = common::metric(&text, "arbiter_trace_spans_dropped_total");
        (dropped >= 1.0).then_some(())
    })
    .await;

    // The exit waits a bounded time for the last spans, then goes.
    let stopping = Instant::now();
    terminate(&server);
    let status = tokio::time::timeout(Duration::from_secs(15), server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}\n{}", server.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    drop(hung);
}

/// A Check from a JWT caller whose token carries personal data beside what policy uses.
fn jwt_check(request_id: &str) -> CheckRequest {
    let claims = serde_json::json!({
        "iss": "https://idp.arbiter.test",
        "sub": "alice",
        "tenant": "acme",
        "groups": ["regulated-approved"],
        "email": "alice.private@corp.example",
        "name": "Alice Privatename",
        "address": { "street": "1 Hidden Lane" },
    });
    let mut check = arbiter_policy_server::cli::policy::RequestSpec {
        method: Some("GET".into()),
        path: "/v1/models".into(),
        route: Some("models".into()),
        jwt_claims: Some(claims.as_object().unwrap().clone()),
        ..Default::default()
    }
    .to_check_request()
    .unwrap();
    check
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap()
        .id = request_id.to_owned();
    check
}

const PERSONAL: &[&str] = &["alice.private", "Privatename", "Hidden Lane"];

#[tokio::test]
async fn claims_off_the_allow_list_appear_in_no_record_log_line_or_span() {
    let (collector, addr) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Debug logging: not even a debug line may carry a masked claim.
    let server = start_server(dir.path(), &format!("http://{addr}"), &["--log", "debug"]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let mut check = jwt_check("req-masked");
    check
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap()
        .headers
        .insert("traceparent".into(), traceparent);
    let response = client.check(check).await.unwrap().into_inner();
    let id = audit_id(&response);
    collector.check_span(&id).await;

    // The default keeps what policy decides on: iss, sub and the bundle's tenant and groups
    // claims (so the record explains the decision and replays it).
    let record = audit_record(&server, &id);
    assert_eq!(record["principal"], "https://idp.arbiter.test#alice");
    let jwt = record["identity"]["jwt"].as_object().unwrap();
    let kept: BTreeSet<&str> = jwt.keys().map(String::as_str).collect();
    assert_eq!(kept, BTreeSet::from(["groups", "iss", "sub", "tenant"]));
    assert_eq!(record["identity"]["jwt_claims_withheld"], 3);

    let audit = std::fs::read_to_string(&server.audit).unwrap();
    let log = server.decisions_logged().await;
    assert!(
        log.contains("req-masked"),
        "the decision was not logged:\n{log}"
    );
    let spans = format!("{:?}", collector.spans());
    for value in PERSONAL {
        assert!(!audit.contains(value), "{value} in the audit log:\n{audit}");
        assert!(!log.contains(value), "{value} in the server log:\n{log}");
        assert!(!spans.contains(value), "{value} in a span:\n{spans}");
    }
    terminate(&server);

    // An explicit list: exactly those claims, plus iss and sub.
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        dir.path(),
        &format!("http://{addr}"),
        &["--audit-jwt-claims", "email,groups"],
    )
    .await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let id = audit_id(
        &client
            .check(jwt_check("req-listed"))
            .await
            .unwrap()
            .into_inner(),
    );
    let record = audit_record(&server, &id);
    let jwt = record["identity"]["jwt"].as_object().unwrap();
    let kept: BTreeSet<&str> = jwt.keys().map(String::as_str).collect();
    assert_eq!(kept, BTreeSet::from(["email", "groups", "iss", "sub"]));
    assert_eq!(record["identity"]["jwt_claims_withheld"], 3);
    let audit = std::fs::read_to_string(&server.audit).unwrap();
    assert!(!audit.contains("Privatename") && !audit.contains("Hidden Lane"));
    terminate(&server);
}
