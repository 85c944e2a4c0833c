//! Traces end to end: a client's W3C `traceparent` goes through real Envoy and the real
//! wasm filter to the real policy server, whose decision span (exported over OTLP/gRPC to
//! a receiver in this test) continues that trace, and whose audit record names it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use arbiter_e2e::envoy;
use arbiter_e2e::eventually;
use arbiter_e2e::stack::{chat_body, default_vars, Stack, E2E_TEMPLATE};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use reqwest::Method;
use serde_json::Value;

/// An OTLP/gRPC traces receiver keeping every span.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> Result<(Collector, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Ok((collector, addr))
    }

    /// The `arbiter.check` span of trace `trace_id`.
    async fn check_span(&self, trace_id: &str) -> Result<Span> {
        eventually(Duration::from_secs(20), "the decision span", || async {
            self.spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.name == "arbiter.check" && hex(&s.trace_id) == trace_id)
                .cloned()
        })
        .await
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> String {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_traceparent_reaches_the_decision_span_and_the_audit_record() -> Result<()> {
    let (collector, addr) = Collector::start().await?;
    let stack = Stack::builder()
        .var("TIMEOUT_MS", "2000")
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":2000}"#)
        .policy_arg("--otlp-traces-endpoint")
        .policy_arg(format!("http://{addr}"))
        .policy_arg("--audit-sync")
        .policy_arg("write")
        .start()
        .await?;

    // Allowed: the upstream gets the audit id.
    let allowed_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let allowed_parent = "00f067aa0ba902b7";
    let reply = stack
        .send(stack.request(Method::GET, "/t/closed/v1/models").header(
            "traceparent",
            format!("00-{allowed_trace}-{allowed_parent}-01"),
        ))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let allowed_id = stack
        .primary
        .requests()
        .iter()
        .chain(stack.backup.requests().iter())
        .find_map(|r| r.header("x-arbiter-audit-id").map(str::to_owned))
        .context("no audit id upstream")?;

    // Denied: the 403 names the audit id.
    let denied_trace = "0af7651916cd43dd8448eb211c80319c";
    let denied_parent = "b7ad6b7169203331";
    let reply = stack
        .send(
            stack
                .request(Method::POST, "/t/regulated/v1/chat/completions")
                .header(
                    "traceparent",
                    format!("00-{denied_trace}-{denied_parent}-01"),
                )
                .json(&chat_body()),
        )
        .await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    let denied_id = reply.json()?["error"]["audit_id"]
        .as_str()
        .context("no audit id in the 403")?
        .to_owned();

    let policy = stack.policy.as_ref().context("no policy server")?;
    for (trace, parent, id, decision, route) in [
        (
            allowed_trace,
            allowed_parent,
            &allowed_id,
            "allow",
            "t_closed",
        ),
        (
            denied_trace,
            denied_parent,
            &denied_id,
            "deny",
            "t_regulated",
        ),
    ] {
        // The audit record names the client's trace...
        let records = policy.audit_records()?;
        let record: &Value = records
            .iter()
            .find(|r| r["id"] == id.as_str())
            .with_context(|| format!("no audit record {id}"))?;
        assert_eq!(record["trace_id"], trace, "{record}");

        // ...and so does the decision span, a child of the client's span.
        let span = collector.check_span(trace).await?;
        assert_eq!(hex(&span.parent_span_id), parent);
        assert_eq!(attr(&span, "arbiter.audit.id"), *id);
        assert_eq!(attr(&span, "arbiter.decision"), decision);
        assert_eq!(attr(&span, "arbiter.route"), route);
        assert_eq!(
            attr(&span, "arbiter.request_id"),
            record["request_id"].as_str().unwrap_or_default()
        );
        assert!(!attr(&span, "arbiter.policy_version").is_empty());
    }
    Ok(())
}

/// The Envoy tracing example is valid Envoy config: put into the shipped e2e config, it
/// passes `envoy --mode validate`.
#[tokio::test(flavor = "multi_thread")]
async fn envoy_tracing_example_validates() -> Result<()> {
    let example: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        envoy::template_path("examples/observability/envoy-tracing.yaml"),
    )?)?;
    // JSON is YAML in flow style; spaced so that no `}}` reads as a placeholder's end.
    let flow = |key: &str| -> Result<String> {
        let value = example.get(key).with_context(|| format!("no `{key}`"))?;
        Ok(serde_json::to_string(value)?
            .replace('{', "{ ")
            .replace('}', " }"))
    };
    let text = std::fs::read_to_string(envoy::template_path(E2E_TEMPLATE))?;
    let mut vars = default_vars(&text)?;
    let text = text
        .replacen(
            "stat_prefix: ingress",
            "stat_prefix: ingress\n          tracing: {{TRACING}}",
            1,
        )
        .replacen("  clusters:\n", "  clusters:\n  - {{COLLECTOR}}\n", 1);
    assert!(text.contains("{{TRACING}}") && text.contains("{{COLLECTOR}}"));
    vars.insert("TRACING".into(), flow("tracing")?);
    vars.insert("COLLECTOR".into(), flow("cluster")?);
    for port in ["POLICY_PORT", "PRIMARY_PORT", "BACKUP_PORT"] {
        vars.insert(port.into(), "1".into());
    }
    let dir = tempfile::tempdir()?;
    let template = dir.path().join("traced.yaml.tmpl");
    std::fs::write(&template, text)?;
    let out = envoy::validate(&template, &vars)?;
    assert!(
        out.status.success(),
        "the tracing example must validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
