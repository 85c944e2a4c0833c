//! Arbiter policy server: answers Envoy's `envoy.service.auth.v3.Authorization/Check` with a
//! decision from a Cedar policy bundle, and serves `grpc.health.v1.Health`.
//!
//! A `CheckRequest` is mapped once into an [`AuthzRequest`] (caller, action, route, context),
//! the [`PolicyEngine`] decides it with the current [`Bundle`], and the [`AuthorizationService`]
//! turns the decision into an allow (headers naming the audit id and policy version) or a
//! `403` with a JSON body. Every decision is first written to the [`AuditLog`] (see
//! [`audit`]); a decision that cannot be recorded is not given. Bundles are validated against
//! the built-in Arbiter schema ([`schema`]), hot-reloaded with last-known-good ([`reload`]),
//! optionally shadowed by a candidate bundle, and measured ([`metrics`]). Health is
//! `SERVING` only while a synthetic decision succeeds in time and the audit log is writable
//! ([`health`]). See the crate README for the Cedar model and the audit record.

pub mod audit;
pub mod cli;
pub mod config;
pub mod health;
pub mod metrics;
pub mod probe;
pub mod pull;
pub mod reflection;
pub mod reload;
pub mod service;
pub mod trace;

// The policy engine is its own crate; its modules keep their paths here.
pub use arbiter_policy::{ai, bundle, identity, index, request, schema};

/// The policy engine ([`arbiter_policy::engine`]), recording into the server's [`Metrics`].
pub mod engine {
    use std::time::Duration;

    use arbiter_policy::metrics::{BundleRole as Role, EngineMetrics};

    use crate::bundle::Bundle;
    use crate::metrics::{BundleRole, Metrics};

    pub use arbiter_policy::engine::*;

    /// Decides requests with the current bundle (and a shadow bundle, if any); reloads swap
    /// them atomically. Records into the server's Prometheus metrics.
    pub type PolicyEngine = arbiter_policy::engine::PolicyEngine<Metrics>;

    impl EngineMetrics for Metrics {
        fn bundle_loaded(&self, role: Role, bundle: &Bundle) {
            let role = match role {
                Role::Active => BundleRole::Active,
                Role::Shadow => BundleRole::Shadow,
            };
            Metrics::bundle_loaded(self, role, bundle);
        }

        fn decision(&self, allowed: bool, took: Duration) {
            Metrics::decision(self, allowed, took);
        }

        fn decision_error(&self) {
            Metrics::decision_error(self);
        }

        fn shadow(&self, disagreement: Option<Disagreement>) {
            Metrics::shadow(self, disagreement);
        }

        fn shadow_error(&self) {
            Metrics::shadow_error(self);
        }
    }
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

pub use audit::{AuditConfig, AuditError, AuditLog, AuditMetrics, AuditSync, Redactor};
pub use bundle::{Bundle, BundleError};
pub use config::{Config, LogFormat};
pub use engine::{Decision, EngineError, PolicyEngine};
pub use health::{HealthConfig, HealthMetrics, HealthMonitor};
pub use metrics::{BundleRole, Metrics};
pub use reload::{StatusBoard, Watch};
pub use request::{AuthzRequest, RequestError, TimeSource};
pub use service::{authorization_server, AuthorizationService};

/// Why the server cannot start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The policy bundle is invalid.
    #[error("cannot load policy bundle `{dir}`")]
    Bundle {
        /// The bundle directory.
        dir: PathBuf,
        /// What is wrong with it.
        source: BundleError,
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
    /// The audit signing key cannot be loaded.
    #[error(transparent)]
    SigningKey(#[from] audit::checkpoint::CheckpointError),
    /// The remote bundle source is misconfigured, or has no usable bundle at start (nor a
    /// persisted last-known-good).
    #[error("{0}")]
    Remote(String),
    /// The OTLP exporter is misconfigured.
    #[error(transparent)]
    Export(#[from] audit::export::ExportError),
    /// `--audit-jwt-claims` is not valid.
    #[error("invalid `--audit-jwt-claims`: {0}")]
    AuditClaims(String),
    /// The reflection descriptors do not load (a build defect).
    #[error("grpc reflection: {0:?}")]
    Reflection(tonic_reflection::server::Error),
}

/// What runs beside the gRPC services: bundle watchers, the metrics listener and the health
/// monitor's settings.
#[derive(Debug, Default)]
pub struct Extras {
    /// Bundle directories to watch, and how often (`Duration::ZERO`: not at all).
    pub watches: Vec<Watch>,
    /// Poll interval of the watches.
    pub reload_interval: Duration,
    /// Listener for `/metrics` and `/status`.
    pub metrics_listener: Option<TcpListener>,
    /// Reload state, shown by `/status`.
    pub status: Arc<StatusBoard>,
    /// How often and how strictly health decides its synthetic request.
    pub health: HealthConfig,
    /// The remote bundle source's poller, when the active bundle comes from `--bundle-url`.
    pub remote: Option<pull::Puller>,
}

/// Loads the bundles, binds `config.listen` (and `config.metrics_listen`) and serves until
/// `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let status = Arc::new(StatusBoard::default());
    let load = |role: BundleRole, dir: &PathBuf| {
        // Fingerprint first, so a change made during the load is seen as a change.
        let watch = Watch::new(role, dir);
        let bundle = Bundle::load(dir).map_err(|source| ServerError::Bundle {
            dir: dir.clone(),
            source,
        })?;
        status.loaded(role, dir, &bundle);
        Ok::<_, ServerError>((watch, bundle))
    };
    let claims = config.audit_claims().map_err(ServerError::AuditClaims)?;
    let mut watches = Vec::new();
    let mut remote = None;
    let bundle = match (
        config.remote().map_err(ServerError::Remote)?,
        &config.policies,
    ) {
        (Some(remote_config), _) => {
            let (bundle, puller) = pull::Puller::start(remote_config)
                .await
                .map_err(ServerError::Remote)?;
            status.loaded(BundleRole::Active, puller.origin(), &bundle);
            remote = Some(puller);
            bundle
        }
        (None, Some(dir)) => {
            let (watch, bundle) = load(BundleRole::Active, dir)?;
            watches.push(watch);
            bundle
        }
        (None, None) => {
            return Err(ServerError::Remote(
                "neither `--policies` nor `--bundle-url` is set".to_owned(),
            ))
        }
    };
    let audit_metrics = AuditMetrics::default();
    let mut metrics = Metrics::new();
    metrics.set_configured_routes(config.metrics_routes.iter().cloned());
    audit_metrics.register(metrics.registry_mut());
    trace::metrics().register(metrics.registry_mut());
    let engine = Arc::new(PolicyEngine::with_metrics(bundle, Arc::new(metrics)));
    if let Some(dir) = &config.shadow_policies {
        let (watch, bundle) = load(BundleRole::Shadow, dir)?;
        engine.set_shadow(Some(Arc::new(bundle)));
        watches.push(watch);
    }
    let audit = AuditLog::open(&config.audit()?, audit_metrics)?;
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = audit::export::Exporter::new(
            audit::export::ExportConfig::new(endpoint.clone(), &config.audit_log),
            audit.metrics().clone(),
        )?;
        tokio::spawn(exporter.run(audit.written()));
    }
    let redactor = Redactor::new(&config.redact_headers).with_jwt_claims(claims);
    let listener = bind(config.listen).await?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let extras = Extras {
        watches,
        reload_interval: Duration::from_millis(config.reload_interval_ms),
        metrics_listener,
        status,
        health: config.health(),
        remote,
    };
    serve_with(listener, engine, audit, redactor, extras, shutdown).await
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
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
    serve_with(
        listener,
        engine,
        audit,
        redactor,
        Extras::default(),
        shutdown,
    )
    .await
}

/// [`serve`], plus bundle watchers and the metrics listener of `extras`.
pub async fn serve_with(
    listener: TcpListener,
    engine: Arc<PolicyEngine>,
    audit: AuditLog,
    redactor: Redactor,
    extras: Extras,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (reflection_v1, reflection_v1alpha) =
        reflection::services().map_err(ServerError::Reflection)?;
    // The bundle on disk is the one in use: `arbiter.PolicyBundle` starts SERVING.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(
            reload::BUNDLE_HEALTH_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    // "" and the Authorization service: SERVING only while a synthetic decision succeeds in
    // time and the audit log is writable. The first synthetic decision runs before the
    // server takes calls, so the first health answer is already a computed one.
    let health_metrics = HealthMetrics::default();
    health_metrics.register(engine.metrics());
    let mut monitor = HealthMonitor::new(
        Arc::clone(&engine),
        audit.writable(),
        health.clone(),
        extras.health,
        health_metrics,
    );
    monitor.check_now().await;

    // Background tasks end with the server (aborted below), not on their own.
    let mut tasks = vec![tokio::spawn(monitor.run())];
    if !extras.reload_interval.is_zero() {
        for watch in extras.watches {
            tasks.push(tokio::spawn(watch.run(
                extras.reload_interval,
                Arc::clone(&engine),
                Arc::clone(&extras.status),
                Some(health.clone()),
            )));
        }
    }
    if let Some(puller) = extras.remote {
        tasks.push(tokio::spawn(puller.run(
            Arc::clone(&engine),
            Arc::clone(&extras.status),
            Some(health.clone()),
        )));
    }
    if let Some(metrics_listener) = extras.metrics_listener {
        if let Ok(metrics_addr) = metrics_listener.local_addr() {
            tracing::info!("metrics on http://{metrics_addr}/metrics");
        }
        tasks.push(tokio::spawn(metrics::serve(
            metrics_listener,
            Arc::clone(engine.metrics()),
            Arc::clone(&extras.status),
            std::future::pending(),
        )));
    }

    let bundle = engine.bundle();
    tracing::info!(
        policy_version = bundle.version(),
        policies = bundle.policy_count(),
        shadow_version = engine.shadow().map(|s| s.version().to_owned()),
        "listening on {addr}"
    );
    drop(bundle);
    let served = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service::authorization_server(AuthorizationService::new(
            engine, audit, redactor,
        )))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    for task in tasks {
        task.abort();
    }
    served?;
    Ok(())
}
