//! Arbiter policy server: answers Envoy's `envoy.service.auth.v3.Authorization/Check` with a
//! decision from a Cedar policy bundle, and serves `grpc.health.v1.Health`.
//!
//! A `CheckRequest` is mapped once into an [`AuthzRequest`] (caller, action, route, context),
//! the [`PolicyEngine`] decides it with the current [`Bundle`], and the [`AuthorizationService`]
//! turns the decision into an allow (headers naming the audit id and policy version) or a
//! `403` with a JSON body. Every decision is first written to the [`AuditLog`] (see
//! [`audit`]); a decision that cannot be recorded is not given. See the crate README for the
//! Cedar model and the audit record.

pub mod audit;
pub mod cli;
pub mod config;
pub mod engine;
pub mod probe;
pub mod request;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

pub use audit::{AuditConfig, AuditError, AuditLog, AuditMetrics, AuditSync, Redactor};
pub use config::{Config, LogFormat};
pub use engine::{Bundle, Decision, EngineError, PolicyEngine};
pub use request::{AuthzRequest, RequestError};
pub use service::AuthorizationService;

/// Why the server cannot start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The policy bundle is invalid.
    #[error("cannot load policy bundle `{dir}`")]
    Bundle {
        /// The bundle directory.
        dir: PathBuf,
        /// What is wrong with it.
        source: EngineError,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on `{addr}`")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server failed")]
    Serve(#[from] tonic::transport::Error),
    /// The audit log cannot be opened or continued.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The OTLP exporter is misconfigured.
    #[error(transparent)]
    Export(#[from] audit::export::ExportError),
}

/// Loads the bundle, binds `config.listen` and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let engine = PolicyEngine::load(&config.policies).map_err(|source| ServerError::Bundle {
        dir: config.policies.clone(),
        source,
    })?;
    let audit = AuditLog::open(&config.audit(), AuditMetrics::default())?;
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = audit::export::Exporter::new(
            audit::export::ExportConfig::new(endpoint.clone(), &config.audit_log),
            audit.metrics().clone(),
        )?;
        tokio::spawn(exporter.run(audit.written()));
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let redactor = Redactor::new(&config.redact_headers);
    serve(listener, Arc::new(engine), audit, redactor, shutdown).await
}

/// Serves ext_authz and health on `listener` with `engine`, recording every decision to
/// `audit`, until `shutdown` completes.
///
/// Logs `listening on <addr>` once the server is ready to take calls.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<PolicyEngine>,
    audit: AuditLog,
    redactor: Redactor,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    // Overall health ("") starts SERVING; the engine holds a loaded bundle, so the
    // authorization service is SERVING too.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AuthorizationServer<AuthorizationService>>()
        .await;
    // NOT_SERVING while the audit log cannot be written (no decision can be given then).
    let mirror = tokio::spawn(audit::mirror_health(audit.writable(), health));

    let bundle = engine.bundle();
    tracing::info!(
        policy_version = bundle.version(),
        policies = bundle.policy_count(),
        "listening on {addr}"
    );
    drop(bundle);
    Server::builder()
        .add_service(health_service)
        .add_service(AuthorizationServer::new(AuthorizationService::new(
            engine, audit, redactor,
        )))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    mirror.abort();
    Ok(())
}
