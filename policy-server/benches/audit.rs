//! Decision throughput over real gRPC on loopback with the audit log in `write` and `fsync`
//! mode, against the same decision path without the audit append ("off", a bench-only
//! service: the server itself cannot run without its audit log).
//!
//! `cargo bench -p arbiter-policy-server --bench audit` (`ARBITER_BENCH_SECS`, default 3,
//! `ARBITER_BENCH_CONCURRENCY`, default 64). Client and server share the machine's cores,
//! so compare the modes of one run, not numbers across machines.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter_policy_server::audit::{AuditConfig, AuditSync};
use arbiter_policy_server::{AuditLog, AuditMetrics, AuthzRequest, PolicyEngine, Redactor};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    authorization_client::AuthorizationClient,
    authorization_server::Authorization,
    AttributeContext, CheckRequest, CheckResponse,
};
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};

/// The decision path without the audit append.
#[derive(Clone)]
struct NoAudit {
    engine: Arc<PolicyEngine>,
    redactor: Arc<Redactor>,
}

#[tonic::async_trait]
impl Authorization for NoAudit {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let check = request.into_inner();
        let _facts = self.redactor.facts(&check);
        let req = AuthzRequest::try_from(check).unwrap();
        let decision = self.engine.decide(&req).unwrap();
        let _id = uuid::Uuid::now_v7().to_string();
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status {
                code: if decision.allowed { 0 } else { 7 },
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

fn request() -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "127.0.0.1".into(),
                        port_specifier: Some(PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "bench".into(),
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: "gw".into(),
                    scheme: "http".into(),
                    headers: [
                        ("authorization", "Bearer sk-bench"),
                        ("content-type", "application/json"),
                        ("user-agent", "bench/1"),
                        ("x-request-id", "bench"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                    ..Default::default()
                }),
            }),
            context_extensions: [("route".to_owned(), "chat".to_owned())].into(),
            ..Default::default()
        }),
    }
}

async fn measure(mode: &str, dir: &Path, secs: u64, concurrency: usize) -> f64 {
    let engine = Arc::new(
        PolicyEngine::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ai-gateway/policies"),
        )
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let server = match mode {
        "off" => {
            let service = NoAudit {
                engine,
                redactor: Arc::new(Redactor::default()),
            };
            tokio::spawn(async move {
                Server::builder()
                    .add_service(arbiter_policy_server::authorization_server(service))
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        shutdown,
                    )
                    .await
                    .unwrap();
            })
        }
        sync => {
            let config = AuditConfig {
                path: dir.join(format!("{sync}.jsonl")),
                sync: if sync == "fsync" {
                    AuditSync::Fsync
                } else {
                    AuditSync::Write
                },
                max_bytes: 1 << 30,
                checkpoints: None,
            };
            let audit = AuditLog::open(&config, AuditMetrics::default()).unwrap();
            tokio::spawn(async move {
                arbiter_policy_server::serve(
                    listener,
                    engine,
                    audit,
                    Redactor::default(),
                    shutdown,
                )
                .await
                .unwrap();
            })
        }
    };

    let channels: Vec<_> = {
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(
                Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
        }
        channels
    };
    let done = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = AuthorizationClient::new(channels[i % channels.len()].clone());
        let done = Arc::clone(&done);
        let running = Arc::clone(&running);
        tasks.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                client.check(request()).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = server.await;
    rate
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run briefly then.
    let benching = std::env::args().any(|a| a == "--bench");
    let secs = if benching {
        env_or("ARBITER_BENCH_SECS", 3)
    } else {
        1
    };
    let concurrency = env_or("ARBITER_BENCH_CONCURRENCY", 64) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rates = Vec::new();
    for mode in ["off", "write", "fsync"] {
        let rate = runtime.block_on(measure(mode, dir.path(), secs, concurrency));
        println!("audit {mode:>5}: {rate:>9.0} decisions/s ({concurrency} concurrent, {secs} s)");
        rates.push(rate);
    }
    println!(
        "write vs off: {:.1} %   fsync vs write: {:.1} %",
        100.0 * rates[1] / rates[0],
        100.0 * rates[2] / rates[1]
    );
}
