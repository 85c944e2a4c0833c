//! gRPC health of the built server over real gRPC on loopback: SERVING only while a
//! synthetic decision succeeds within its deadline and the audit log is writable.
// Test code: helpers outside `#[test]` functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use common::{audit_lines, check_request, eventually, http_get, metric, Server};

const AUTHORIZATION: &str = "envoy.service.auth.v3.Authorization";
const BUNDLE: &str = "arbiter.PolicyBundle";
const WAIT: Duration = Duration::from_secs(20);

/// The status of `service` (`""`: the server as a whole).
async fn health(server: &Server, service: &str) -> ServingStatus {
    let status = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

/// Both services health decides (`""` and the Authorization service) have `status`.
async fn both(server: &Server, status: ServingStatus) -> bool {
    health(server, "").await == status && health(server, AUTHORIZATION).await == status
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Starts the server with `--metrics-listen` on a free port and `args`.
async fn start(dir: &std::path::Path, args: &[&str]) -> (Server, SocketAddr) {
    let metrics = free_addr();
    let metrics_flag = metrics.to_string();
    let mut all = vec!["--metrics-listen", metrics_flag.as_str()];
    all.extend_from_slice(args);
    (Server::start(dir, &all).await, metrics)
}

async fn metric_value(metrics: SocketAddr, series: &str) -> f64 {
    metric(&http_get(metrics, "/metrics").await, series)
}

fn chat() -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    check_request("", "POST", "/v1/chat/completions", &[("route", "chat")])
}

/// A file-size limit on the running server makes every write fail like a full disk.
fn set_file_size_limit(pid: u32, soft: Option<u64>) {
    let soft = soft.map_or("unlimited".to_owned(), |n| n.to_string());
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// SERVING as soon as the server listens (the first synthetic decision ran before), and the
/// synthetic decisions leave no trace: no audit record, no decision counted.
#[tokio::test]
async fn serving_from_the_start_and_synthetic_decisions_leave_no_record() {
    let dir = tempfile::tempdir().unwrap();
    // A deadline no loaded machine misses: this test is about function, not speed.
    let (server, metrics) = start(
        dir.path(),
        &[
            "--health-interval",
            "50ms",
            "--health-decision-timeout",
            "10s",
        ],
    )
    .await;
    assert_eq!(health(&server, "").await, ServingStatus::Serving);
    assert_eq!(health(&server, AUTHORIZATION).await, ServingStatus::Serving);
    assert_eq!(health(&server, BUNDLE).await, ServingStatus::Serving);

    eventually(WAIT, "five synthetic decisions", || async {
        (metric_value(metrics, "arbiter_health_synthetic_decisions_total").await >= 5.0)
            .then_some(())
    })
    .await;
    let text = http_get(metrics, "/metrics").await;
    assert_eq!(metric(&text, "arbiter_health_serving"), 1.0, "{text}");
    for reason in ["timeout", "error"] {
        let series = format!("arbiter_health_synthetic_failures_total{{reason=\"{reason}\"}}");
        assert!(text.contains(&series), "{text}");
        assert_eq!(metric(&text, &series), 0.0, "{text}");
    }
    assert!(
        metric(&text, "arbiter_health_synthetic_duration_seconds_count") >= 5.0,
        "{text}"
    );
    for decision in ["allow", "deny"] {
        let series = format!("arbiter_decisions_total{{decision=\"{decision}\"}}");
        assert_eq!(metric(&text, &series), 0.0, "{series}: {text}");
    }
    assert!(audit_lines(&server.audit).is_empty());
    assert!(both(&server, ServingStatus::Serving).await);
    let log = server.log();
    assert!(!log.contains("NOT_SERVING"), "{log}");
}

/// A decision that takes longer than `--health-decision-timeout` turns health NOT_SERVING.
/// 1 µs is a deadline no decision meets: handing the work to the blocking pool alone takes
/// longer, so every synthetic decision genuinely finishes past it. The server still answers
/// Checks (health tells Envoy to prefer other instances; it refuses nothing).
#[tokio::test]
async fn a_synthetic_decision_past_its_deadline_means_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (server, metrics) = start(
        dir.path(),
        &[
            "--health-interval",
            "50ms",
            "--health-decision-timeout",
            "1us",
        ],
    )
    .await;
    assert!(both(&server, ServingStatus::NotServing).await);
    // A rejected push is not the problem here, and would not be one either.
    assert_eq!(health(&server, BUNDLE).await, ServingStatus::Serving);
    eventually(WAIT, "timeouts counted", || async {
        let series = "arbiter_health_synthetic_failures_total{reason=\"timeout\"}";
        (metric_value(metrics, series).await >= 3.0).then_some(())
    })
    .await;
    assert_eq!(metric_value(metrics, "arbiter_health_serving").await, 0.0);
    assert!(both(&server, ServingStatus::NotServing).await);

    let mut client = AuthorizationClient::new(server.channel().await);
    client.check(chat()).await.unwrap();
    assert_eq!(audit_lines(&server.audit).len(), 1);

    let log = server.log();
    assert!(log.contains("health NOT_SERVING"), "{log}");
    // "no synthetic decision within 1µs", or "synthetic decision took …, more than 1µs".
    let line = log
        .lines()
        .find(|l| l.contains("health NOT_SERVING"))
        .unwrap();
    assert!(
        line.contains("synthetic decision") && line.contains("1µs"),
        "{line}"
    );
    // Logged once, not once per synthetic decision.
    assert_eq!(log.matches("health NOT_SERVING").count(), 1, "{log}");
}

/// NOT_SERVING while the audit log cannot be written, SERVING again once it can; each
/// change logged once with its reason.
#[tokio::test]
async fn an_unwritable_audit_log_means_not_serving_until_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Decision events off, so the server's own log stays smaller than the limit below.
    let (server, metrics) = start(
        dir.path(),
        &[
            "--log",
            "info,arbiter::decision=warn",
            "--health-interval",
            "100ms",
            // The audit log must be the only reason, however loaded the machine is.
            "--health-decision-timeout",
            "10s",
        ],
    )
    .await;
    let mut client = AuthorizationClient::new(server.channel().await);
    for _ in 0..3 {
        client.check(chat()).await.unwrap();
    }
    assert!(both(&server, ServingStatus::Serving).await);
    let size = std::fs::metadata(&server.audit).unwrap().len();
    assert!(size > std::fs::metadata(&server.log).unwrap().len());

    set_file_size_limit(server.pid(), Some(size));
    let status = client.check(chat()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    eventually(WAIT, "health NOT_SERVING", || async {
        both(&server, ServingStatus::NotServing).await.then_some(())
    })
    .await;
    assert_eq!(metric_value(metrics, "arbiter_health_serving").await, 0.0);
    // The synthetic decisions go on and succeed: the audit log is the only reason.
    let decided = metric_value(metrics, "arbiter_health_synthetic_decisions_total").await;
    eventually(WAIT, "more synthetic decisions", || async {
        (metric_value(metrics, "arbiter_health_synthetic_decisions_total").await > decided)
            .then_some(())
    })
    .await;
    assert_eq!(
        metric_value(
            metrics,
            "arbiter_health_synthetic_failures_total{reason=\"timeout\"}"
        )
        .await,
        0.0
    );
    assert!(both(&server, ServingStatus::NotServing).await);

    set_file_size_limit(server.pid(), None);
    eventually(WAIT, "health SERVING", || async {
        both(&server, ServingStatus::Serving).await.then_some(())
    })
    .await;
    assert_eq!(metric_value(metrics, "arbiter_health_serving").await, 1.0);
    client.check(chat()).await.unwrap();
    assert_eq!(audit_lines(&server.audit).len(), 4);
    let log = server.log();
    assert!(
        log.contains("health NOT_SERVING: audit log not writable"),
        "{log}"
    );
    assert!(log.contains("health SERVING again"), "{log}");
    assert_eq!(log.matches("health NOT_SERVING").count(), 1, "{log}");
}

/// Invalid flag values are refused at start with the flag named.
#[tokio::test]
async fn invalid_health_flags_are_refused() {
    for (flag, value) in [
        ("--health-interval", "0s"),
        ("--health-decision-timeout", "250"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter-policy-server"))
            .args(["--policies"])
            .arg(common::example_bundle())
            .args(["--audit-log", "/nonexistent/audit.jsonl", flag, value])
            .env_remove("ARBITER_HEALTH_INTERVAL")
            .env_remove("ARBITER_HEALTH_DECISION_TIMEOUT")
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{stderr}");
    }
}
