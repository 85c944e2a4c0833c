//! gRPC health that exercises the decision path.
//!
//! The overall service (`""`) and `envoy.service.auth.v3.Authorization` are `SERVING` only
//! while all of this holds:
//!
//! - a valid bundle is in use: true by construction (the server does not start without
//!   one, and reloads only ever swap in validated bundles; a rejected push keeps the
//!   last-known-good bundle, which is reported on [`crate::reload::BUNDLE_HEALTH_SERVICE`]
//!   and in metrics, and does not take the instance out of rotation);
//! - the last **synthetic decision** completed within `--health-decision-timeout`: every
//!   `--health-interval` the monitor decides a fixed request ([`synthetic_check_request`])
//!   through the same `CheckRequest` mapping and engine as a real Check, on the blocking
//!   pool. Allow or deny does not matter; that evaluation works in time does. Nothing is
//!   written to the audit log for it and it is not counted in the decision metrics;
//! - the audit log is writable (no decision can be given otherwise).
//!
//! Each change of the status is logged once, with the reasons (`warn` when the instance
//! turns `NOT_SERVING`, `info` when it is `SERVING` again), and exported as
//! `arbiter_health_serving`; failed synthetic decisions are counted by reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request},
    authorization_server::AuthorizationServer,
    AttributeContext, CheckRequest,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::engine::{Decision, EngineError, PolicyEngine};
use crate::metrics::Metrics;
use crate::request::{AuthzRequest, ROUTE_KEY};
use crate::service::AuthorizationService;

/// Default `--health-interval`: how often the synthetic decision runs.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default `--health-decision-timeout`: the bound on one synthetic decision.
pub const DEFAULT_DECISION_TIMEOUT: Duration = Duration::from_millis(250);
/// Route name of the synthetic request (`context.route`, resource `Arbiter::Route`).
pub const SYNTHETIC_ROUTE: &str = "arbiter.health";
/// Path of the synthetic request.
pub const SYNTHETIC_PATH: &str = "/arbiter/health";
/// Request id of the synthetic request.
pub const SYNTHETIC_REQUEST_ID: &str = "arbiter-health-synthetic";

/// How often, and how strictly, the monitor decides its synthetic request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between two synthetic decisions.
    pub interval: Duration,
    /// A synthetic decision that takes longer (from the hand-off to the blocking pool to
    /// its result) counts as failed, reason `timeout`.
    pub decision_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            decision_timeout: DEFAULT_DECISION_TIMEOUT,
        }
    }
}

/// The fixed request the monitor decides: an anonymous `GET /arbiter/health` on route
/// [`SYNTHETIC_ROUTE`] (action `http.request`), with no headers and no body. Policies need
/// not mention it: a default deny is as good a proof of evaluation as an allow.
pub fn synthetic_check_request() -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: SYNTHETIC_REQUEST_ID.to_owned(),
                    method: "GET".to_owned(),
                    path: SYNTHETIC_PATH.to_owned(),
                    host: SYNTHETIC_ROUTE.to_owned(),
                    scheme: "http".to_owned(),
                    ..Default::default()
                }),
            }),
            context_extensions: [(ROUTE_KEY.to_owned(), SYNTHETIC_ROUTE.to_owned())]
                .into_iter()
                .collect(),
            ..Default::default()
        }),
    }
}

/// Why a synthetic decision failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    /// No result within the deadline (`took` is known when it finished late).
    Timeout {
        /// How long it took, if it finished.
        took: Option<Duration>,
    },
    /// The request could not be mapped or decided, or the evaluation panicked.
    Error(String),
}

impl ProbeFailure {
    /// `timeout` or `error`: the `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Error(_) => "error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The monitor's metrics (`arbiter_health_*`).
#[derive(Debug, Clone)]
pub struct HealthMetrics {
    serving: Gauge,
    synthetic: Counter,
    failures: Family<ReasonLabels, Counter>,
    duration: Histogram,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        let failures = Family::<ReasonLabels, Counter>::default();
        // Both series from the start, so alerts on them see a 0 rather than nothing.
        for reason in ["timeout", "error"] {
            let _ = failures.get_or_create(&ReasonLabels { reason });
        }
        Self {
            serving: Gauge::default(),
            synthetic: Counter::default(),
            failures,
            // 10 µs to ~2.6 s: a healthy decision is microseconds; the top catches stalls.
            duration: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
        }
    }
}

impl HealthMetrics {
    /// Registers the metrics in `metrics`' registry.
    pub fn register(&self, metrics: &Metrics) {
        metrics.register(
            "health_serving",
            "1 while gRPC health is SERVING (bundle in use, synthetic decision in time, audit log writable)",
            self.serving.clone(),
        );
        metrics.register(
            "health_synthetic_decisions",
            "Synthetic decisions the health monitor ran",
            self.synthetic.clone(),
        );
        metrics.register(
            "health_synthetic_failures",
            "Synthetic decisions that failed, by reason (timeout, error)",
            self.failures.clone(),
        );
        metrics.register(
            "health_synthetic_duration_seconds",
            "Time of the synthetic decisions that completed, blocking-pool hand-off included",
            self.duration.clone(),
        );
    }

    /// 1 while `SERVING`.
    pub fn serving(&self) -> i64 {
        self.serving.get()
    }
}

/// Decides `request` with `engine` on the blocking pool, bounded by `deadline`.
///
/// `in_flight` holds a decision still running from an earlier probe: while it runs no new
/// one is started (a wedged evaluation must not pile up blocking threads), and once it
/// finished late it is reported as a timeout.
async fn probe(
    engine: &Arc<PolicyEngine>,
    request: &AuthzRequest,
    deadline: Duration,
    in_flight: &mut Option<InFlight>,
) -> Result<Duration, ProbeFailure> {
    let engine = Arc::clone(engine);
    let request = request.clone();
    probe_with(deadline, in_flight, move || {
        engine.decide_synthetic(&request)
    })
    .await
}

type InFlight = (Instant, JoinHandle<Result<Decision, EngineError>>);

async fn probe_with(
    deadline: Duration,
    in_flight: &mut Option<InFlight>,
    decide: impl FnOnce() -> Result<Decision, EngineError> + Send + 'static,
) -> Result<Duration, ProbeFailure> {
    let (started, mut handle) = match in_flight.take() {
        Some(running) => running,
        None => (Instant::now(), tokio::task::spawn_blocking(decide)),
    };
    let remaining = deadline.saturating_sub(started.elapsed());
    // `timeout` polls the decision before looking at the clock, so a finished one is seen
    // even with nothing remaining.
    match tokio::time::timeout(remaining, &mut handle).await {
        Ok(done) => {
            let took = started.elapsed();
            match done {
                Ok(Ok(_decision)) if took <= deadline => Ok(took),
                Ok(Ok(_decision)) => Err(ProbeFailure::Timeout { took: Some(took) }),
                Ok(Err(e)) => Err(ProbeFailure::Error(e.to_string())),
                Err(join) => Err(ProbeFailure::Error(format!("evaluation failed: {join}"))),
            }
        }
        Err(_elapsed) => {
            *in_flight = Some((started, handle));
            Err(ProbeFailure::Timeout { took: None })
        }
    }
}

/// What health is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inputs {
    audit_writable: bool,
    synthetic: Result<(), ProbeFailure>,
}

impl Inputs {
    /// Why the instance cannot serve; empty when it can.
    fn problems(&self, deadline: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.audit_writable {
            problems.push("audit log not writable".to_owned());
        }
        match &self.synthetic {
            Ok(()) => {}
            Err(ProbeFailure::Timeout { took: Some(took) }) => problems.push(format!(
                "synthetic decision took {took:?}, more than {deadline:?}"
            )),
            Err(ProbeFailure::Timeout { took: None }) => {
                problems.push(format!("no synthetic decision within {deadline:?}"));
            }
            Err(ProbeFailure::Error(e)) => problems.push(format!("synthetic decision failed: {e}")),
        }
        problems
    }

    /// The kinds of problem, for "did anything change" (durations left out).
    fn kinds(&self) -> (bool, Option<&'static str>) {
        (
            self.audit_writable,
            self.synthetic.as_ref().err().map(ProbeFailure::reason),
        )
    }
}

/// Keeps gRPC health (`""` and the Authorization service) equal to "this instance can
/// decide": see the module documentation.
pub struct HealthMonitor {
    engine: Arc<PolicyEngine>,
    writable: watch::Receiver<bool>,
    reporter: HealthReporter,
    config: HealthConfig,
    metrics: HealthMetrics,
    request: Result<AuthzRequest, String>,
    in_flight: Option<InFlight>,
    inputs: Inputs,
    published: Option<(bool, Option<&'static str>)>,
}

impl std::fmt::Debug for HealthMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthMonitor")
            .field("config", &self.config)
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

impl HealthMonitor {
    /// A monitor of `engine` and the audit log's `writable` watch, reporting to `reporter`.
    pub fn new(
        engine: Arc<PolicyEngine>,
        writable: watch::Receiver<bool>,
        reporter: HealthReporter,
        config: HealthConfig,
        metrics: HealthMetrics,
    ) -> Self {
        let request = AuthzRequest::try_from(synthetic_check_request()).map_err(|e| e.to_string());
        let audit_writable = *writable.borrow();
        Self {
            engine,
            writable,
            reporter,
            config,
            metrics,
            request,
            in_flight: None,
            inputs: Inputs {
                audit_writable,
                synthetic: Ok(()),
            },
            published: None,
        }
    }

    /// Runs one synthetic decision and publishes the status: call before serving, so the
    /// first health answer is already computed.
    pub async fn check_now(&mut self) {
        self.probe().await;
        self.inputs.audit_writable = *self.writable.borrow_and_update();
        self.publish().await;
    }

    /// Decides the synthetic request every interval and follows the audit log's
    /// writability, until the task is dropped.
    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; `check_now` covered it.
        ticker.tick().await;
        let mut audit_watch = true;
        loop {
            tokio::select! {
                _ = ticker.tick() => self.probe().await,
                changed = self.writable.changed(), if audit_watch => {
                    // The writer is gone only when the server is shutting down.
                    if changed.is_err() {
                        audit_watch = false;
                    }
                }
            }
            self.inputs.audit_writable = *self.writable.borrow_and_update();
            self.publish().await;
        }
    }

    async fn probe(&mut self) {
        let result = match &self.request {
            Ok(request) => {
                probe(
                    &self.engine,
                    request,
                    self.config.decision_timeout,
                    &mut self.in_flight,
                )
                .await
            }
            Err(e) => Err(ProbeFailure::Error(e.clone())),
        };
        self.metrics.synthetic.inc();
        match &result {
            Ok(took) => self.metrics.duration.observe(took.as_secs_f64()),
            Err(failure) => {
                if let ProbeFailure::Timeout { took: Some(took) } = failure {
                    self.metrics.duration.observe(took.as_secs_f64());
                }
                self.metrics
                    .failures
                    .get_or_create(&ReasonLabels {
                        reason: failure.reason(),
                    })
                    .inc();
            }
        }
        self.inputs.synthetic = result.map(|_| ());
    }

    async fn publish(&mut self) {
        let kinds = self.inputs.kinds();
        if self.published == Some(kinds) {
            return;
        }
        let problems = self.inputs.problems(self.config.decision_timeout);
        let serving = problems.is_empty();
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        type Service = AuthorizationServer<AuthorizationService>;
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(<Service as tonic::server::NamedService>::NAME, status)
            .await;
        self.metrics.serving.set(i64::from(serving));
        let version = self.engine.bundle().version().to_owned();
        if !serving {
            tracing::warn!(
                policy_version = %version,
                "health NOT_SERVING: {}",
                problems.join("; ")
            );
        } else if self.published.is_some() {
            tracing::info!(policy_version = %version, "health SERVING again");
        }
        self.published = Some(kinds);
    }
}

/// Parses a duration flag: a whole number and a unit, `us` (or `µs`), `ms` or `s`
/// (`250ms`, `1s`); zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: expected e.g. `250ms`, `1s`"))?;
    let duration = match unit.trim() {
        "us" | "µs" => Duration::from_micros(number),
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        _ => {
            return Err(format!(
                "`{text}` has no valid unit: expected `us`, `ms` or `s` (e.g. `250ms`)"
            ))
        }
    };
    if duration.is_zero() {
        return Err("the duration must be more than zero".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_a_unit() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1us"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_duration("5µs"), Ok(Duration::from_micros(5)));
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("250").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("1h").is_err());
    }

    #[test]
    fn the_synthetic_request_maps() {
        let request = AuthzRequest::try_from(synthetic_check_request()).unwrap();
        assert_eq!(request.route, SYNTHETIC_ROUTE);
        assert_eq!(request.action, "http.request");
        assert_eq!(request.principal, "anonymous");
    }

    fn decided() -> Result<Decision, EngineError> {
        Ok(Decision {
            allowed: false,
            policy_ids: Vec::new(),
            errors: Vec::new(),
            policy_version: "sha256:0".into(),
            principal: "anonymous".into(),
            identity_source: crate::identity::IdentitySource::None,
            shadow: None,
        })
    }

    fn failed() -> Result<Decision, EngineError> {
        Err(EngineError::Request("cannot decide".into()))
    }

    /// A decision still running at the deadline is a timeout; no second one starts while
    /// it runs; once it finishes (late) it is reported as a timeout with its duration, and
    /// the next probe starts afresh.
    #[tokio::test]
    async fn a_wedged_decision_times_out_and_is_not_started_twice() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let deadline = Duration::from_millis(20);
        let mut in_flight = None;
        let counter = Arc::clone(&started);
        let first = probe_with(deadline, &mut in_flight, move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = wait.recv();
            decided()
        })
        .await;
        assert_eq!(first, Err(ProbeFailure::Timeout { took: None }));
        assert!(in_flight.is_some());

        let counter = Arc::clone(&started);
        let second = probe_with(deadline, &mut in_flight, move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            decided()
        })
        .await;
        assert_eq!(second, Err(ProbeFailure::Timeout { took: None }));
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1);

        release.send(()).unwrap();
        let third = loop {
            let result = probe_with(deadline, &mut in_flight, decided).await;
            if result != Err(ProbeFailure::Timeout { took: None }) {
                break result;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(
            matches!(third, Err(ProbeFailure::Timeout { took: Some(took) }) if took > deadline),
            "{third:?}"
        );
        assert!(in_flight.is_none());
        // Only the wedged decision is meant to time out: on a loaded box a blocking-pool
        // task can take longer than 20 ms just to start.
        let fourth = probe_with(Duration::from_secs(10), &mut in_flight, failed).await;
        assert!(matches!(fourth, Err(ProbeFailure::Error(_))), "{fourth:?}");
        let fifth = probe_with(Duration::from_secs(10), &mut in_flight, decided).await;
        assert!(fifth.is_ok(), "{fifth:?}");
    }
}
