//! The real server: in-process over a socket, and the built binary.
// Test code: helpers outside `#[test]` functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use arbiter_policy_server::{AuditConfig, AuditLog, AuditMetrics, PolicyEngine, Redactor};
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, CheckRequest,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use common::{check_request, example_bundle};

const BINARY: &str = env!("CARGO_BIN_EXE_arbiter-policy-server");

#[tokio::test]
async fn serves_check_and_health_over_grpc() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let engine = Arc::new(PolicyEngine::load(&example_bundle()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::open(
        &AuditConfig::new(dir.path().join("audit.jsonl")),
        AuditMetrics::default(),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(arbiter_policy_server::serve(
        listener,
        engine,
        audit,
        Redactor::default(),
        async {
            let _ = stopped.await;
        },
    ));

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut authz = AuthorizationClient::new(channel.clone());
    let allow = authz
        .check(check_request(
            "",
            "POST",
            "/v1/chat/completions",
            &[("route", "chat")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allow.status.unwrap().code, 0);
    let deny = authz
        .check(check_request("", "GET", "/admin", &[("route", "chat")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        deny.status.unwrap().code,
        tonic::Code::PermissionDenied as i32
    );
    let invalid = authz.check(CheckRequest::default()).await.unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service `{service}`");
    }

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn binary_refuses_an_invalid_bundle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ok.cedar"),
        "permit(principal, action, resource);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.cedar"),
        "permit(principal,\n  action resource);",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--policies"])
        .arg(dir.path())
        .arg("--audit-log")
        .arg(dir.path().join("audit.jsonl"))
        .env_remove("ARBITER_LISTEN")
        .env_remove("ARBITER_LOG")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("broken.cedar:2:"), "{stderr}");
}

#[tokio::test]
async fn binary_logs_listening_once_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--audit-log")
        .arg(dir.path().join("audit.jsonl"))
        .env("ARBITER_POLICIES", example_bundle())
        .env("ARBITER_LOG_FORMAT", "json")
        .env_remove("ARBITER_LOG")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("server exited before listening");
            if line.contains("listening on") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    let log: serde_json::Value = serde_json::from_str(&line).unwrap();
    let message = log["fields"]["message"].as_str().unwrap();
    let addr: std::net::SocketAddr = message
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(addr.port(), 0);
    assert!(log["fields"]["policy_version"]
        .as_str()
        .unwrap()
        .starts_with("ai-gateway@sha256:"));

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let response = AuthorizationClient::new(channel)
        .check(check_request(
            "",
            "GET",
            "/v1/models",
            &[("route", "models")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.unwrap().code, 0);

    // One decision event, with the decision fields and nothing from headers.
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        !line.contains("sk-secret") && !line.contains("authorization"),
        "{line}"
    );
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["target"], "arbiter::decision");
    let fields = &event["fields"];
    assert_eq!(fields["decision"], "allow");
    assert_eq!(fields["policy_ids"], "routine-models");
    assert_eq!(fields["principal"], "anonymous");
    assert_eq!(fields["route"], "models");
    assert_eq!(fields["method"], "GET");
    assert_eq!(fields["path"], "/v1/models");
    assert_eq!(fields["request_id"], "test-request-1");
    assert_eq!(fields["policy_version"], log["fields"]["policy_version"]);
    assert!(fields["latency_us"].is_u64());
    uuid::Uuid::parse_str(fields["id"].as_str().unwrap()).unwrap();
    child.kill().await.unwrap();
}

#[tokio::test]
async fn binary_runs_a_shadow_bundle_and_serves_metrics() {
    let candidate = tempfile::tempdir().unwrap();
    std::fs::write(
        candidate.path().join("none.cedar"),
        "@id(\"nothing\") forbid(principal, action, resource);",
    )
    .unwrap();
    let metrics = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut child = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--policies")
        .arg(example_bundle())
        .arg("--shadow-policies")
        .arg(candidate.path())
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .arg("--audit-log")
        .arg(candidate.path().join("audit.log"))
        .arg("--audit-sync")
        .arg("write")
        .env_remove("ARBITER_LOG")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("server exited");
            if line.contains("listening on") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    let log: serde_json::Value = serde_json::from_str(&listening).unwrap();
    let addr = log["fields"]["message"]
        .as_str()
        .unwrap()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    assert!(log["fields"]["shadow_version"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let response = AuthorizationClient::new(channel)
        .check(check_request(
            "",
            "GET",
            "/v1/models",
            &[("route", "models")],
        ))
        .await
        .unwrap()
        .into_inner();
    // The candidate denies everything; the answer is the active bundle's.
    assert_eq!(response.status.unwrap().code, 0);
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = lines.next_line().await.unwrap().unwrap();
            if line.contains("arbiter::decision") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    let event: serde_json::Value = serde_json::from_str(&event).unwrap();
    assert_eq!(event["fields"]["decision"], "allow");
    assert_eq!(event["fields"]["shadow_decision"], "deny");
    assert_eq!(event["fields"]["shadow_disagreement"], "would_deny");
    let text = common::http_get(metrics, "/metrics").await;
    assert!(
        text.contains("arbiter_decisions_total{decision=\"allow\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("arbiter_shadow_disagreements_total{direction=\"would_deny\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("arbiter_decision_duration_seconds_count 1"),
        "{text}"
    );
    child.kill().await.unwrap();
}
