//! Prometheus metrics of the policy server, and the HTTP listener serving them
//! (`--metrics-listen`): `GET /metrics` (OpenMetrics text) and `GET /status` (JSON: the
//! bundles in use and the last reload outcome of each).
//!
//! Other modules register their own metrics with [`Metrics::register`] (or
//! [`Metrics::registry_mut`] before the metrics are shared).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;

use crate::bundle::Bundle;
use crate::engine::Disagreement;
use crate::reload::StatusBoard;

/// Which bundle a metric is about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum BundleRole {
    /// The bundle that decides (`--policies`).
    Active,
    /// The candidate evaluated beside it (`--shadow-policies`).
    Shadow,
}

impl BundleRole {
    /// `active` or `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Shadow => "shadow",
        }
    }
}

impl EncodeLabelValue for BundleRole {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

/// A route label value: a route name the bundle or configuration knows, or [`OTHER_ROUTE`].
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct RouteLabel(Arc<str>);

impl EncodeLabelValue for RouteLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteDecisionLabels {
    route: RouteLabel,
    decision: &'static str,
}

/// The `route` label value of every route the bundle and `--metrics-route` do not name
/// (and of requests without a route name): one series however many names clients reach.
/// A leading `_` keeps it apart from Envoy route names people write.
pub const OTHER_ROUTE: &str = "_other";

/// At most this many routes get their own label value (the first, in name order); the rest
/// are counted as [`OTHER_ROUTE`], so a bundle with thousands of routes cannot blow up the
/// metrics.
pub const MAX_ROUTE_LABELS: usize = 500;

/// Which routes get their own label value.
#[derive(Debug, Default)]
struct KnownRoutes {
    /// Named in the configuration (`--metrics-route`).
    configured: BTreeSet<String>,
    /// Configured plus named by the active bundle, as label values.
    labels: HashMap<Arc<str>, RouteLabel>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleLabels {
    bundle: BundleRole,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    bundle: BundleRole,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    bundle: BundleRole,
    version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// The server's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    decisions: Family<DecisionLabels, Counter>,
    decision_errors: Counter,
    request_time_untrusted: Counter,
    latency: Histogram,
    reloads: Family<ReloadLabels, Counter>,
    rejected: Family<BundleLabels, Gauge>,
    info: Family<VersionLabels, Gauge>,
    policies: Family<BundleLabels, Gauge>,
    indexed: Family<BundleLabels, Gauge>,
    loaded_at: Family<BundleLabels, Gauge>,
    shadow_decisions: Counter,
    shadow_errors: Counter,
    disagreements: Family<DirectionLabels, Counter>,
    versions: Mutex<HashMap<BundleRole, String>>,
    route_decisions: Family<RouteDecisionLabels, Counter>,
    routes: std::sync::RwLock<KnownRoutes>,
    other_route: RouteLabel,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("arbiter");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by outcome (allow, deny)",
            decisions.clone(),
        );
        let decision_errors = Counter::default();
        registry.register(
            "decision_errors",
            "Requests the engine could not decide (answered without a decision)",
            decision_errors.clone(),
        );
        let request_time_untrusted = Counter::default();
        registry.register(
            "request_time_untrusted",
            "Checks whose request.time was invalid or more than 5 minutes from the server's clock (policy saw the server's receipt time)",
            request_time_untrusted.clone(),
        );
        // 5 µs to ~20 ms: policy evaluation is microseconds; the top buckets catch stalls.
        let latency = Histogram::new(exponential_buckets(0.000_005, 2.0, 13));
        registry.register(
            "decision_duration_seconds",
            "Time to decide one request with the active bundle (identity, context, policies)",
            latency.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "bundle_reloads",
            "Bundle reload attempts by bundle (active, shadow) and result (success, rejected)",
            reloads.clone(),
        );
        let rejected = Family::<BundleLabels, Gauge>::default();
        registry.register(
            "bundle_rejected",
            "1 while the bundle on disk is rejected and the last-known-good one is in use",
            rejected.clone(),
        );
        let info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "bundle_info",
            "The bundle version in use (value 1)",
            info.clone(),
        );
        let policies = Family::<BundleLabels, Gauge>::default();
        registry.register(
            "bundle_policies",
            "Number of policies in the bundle in use",
            policies.clone(),
        );
        let indexed = Family::<BundleLabels, Gauge>::default();
        registry.register(
            "bundle_policies_indexed",
            "Policies of the bundle in use that a request can leave out unevaluated (indexed by route, principal or condition); the rest are evaluated for every request of their action",
            indexed.clone(),
        );
        let loaded_at = Family::<BundleLabels, Gauge>::default();
        registry.register(
            "bundle_loaded_timestamp_seconds",
            "When the bundle in use was loaded (Unix time)",
            loaded_at.clone(),
        );
        let shadow_decisions = Counter::default();
        registry.register(
            "shadow_decisions",
            "Requests the shadow bundle also decided",
            shadow_decisions.clone(),
        );
        let shadow_errors = Counter::default();
        registry.register(
            "shadow_errors",
            "Requests the shadow bundle could not decide (the answer is unaffected)",
            shadow_errors.clone(),
        );
        let disagreements = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "shadow_disagreements",
            "Shadow decisions differing from the answer, by direction (would_allow, would_deny)",
            disagreements.clone(),
        );
        for direction in [Disagreement::WouldAllow, Disagreement::WouldDeny] {
            let _ = disagreements.get_or_create(&DirectionLabels {
                direction: direction.as_str(),
            });
        }
        for decision in ["allow", "deny"] {
            let _ = decisions.get_or_create(&DecisionLabels { decision });
        }
        let route_decisions = Family::<RouteDecisionLabels, Counter>::default();
        registry.register(
            "route_decisions",
            "Decisions by route and outcome (allow, deny); routes the bundle and --metrics-route do not name are counted as route=\"_other\"",
            route_decisions.clone(),
        );
        // Export the active bundle's reload series from the start, so alerts on them see a
        // 0 rather than no series at all.
        let _ = rejected.get_or_create(&BundleLabels {
            bundle: BundleRole::Active,
        });
        for result in ["success", "rejected"] {
            let _ = reloads.get_or_create(&ReloadLabels {
                bundle: BundleRole::Active,
                result,
            });
        }
        Self {
            registry: Mutex::new(registry),
            decisions,
            decision_errors,
            request_time_untrusted,
            latency,
            reloads,
            rejected,
            info,
            policies,
            indexed,
            loaded_at,
            shadow_decisions,
            shadow_errors,
            disagreements,
            versions: Mutex::new(HashMap::new()),
            route_decisions,
            routes: std::sync::RwLock::new(KnownRoutes::default()),
            other_route: RouteLabel(Arc::from(OTHER_ROUTE)),
        }
    }

    /// Routes named in the configuration (`--metrics-route`) get their own label value
    /// whatever the bundle says. Call before the first bundle is loaded.
    pub fn set_configured_routes(&self, routes: impl IntoIterator<Item = String>) {
        let mut known = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        known.configured = routes.into_iter().collect();
        let configured = known.configured.clone();
        known.labels = labels(configured);
    }

    /// One decision on `route` (an answered Check: counted once the audit record is written).
    pub fn route_decision(&self, route: &str, allowed: bool) {
        let route = {
            let known = self.routes.read().unwrap_or_else(PoisonError::into_inner);
            known
                .labels
                .get(route)
                .cloned()
                .unwrap_or_else(|| self.other_route.clone())
        };
        let decision = if allowed { "allow" } else { "deny" };
        self.route_decisions
            .get_or_create(&RouteDecisionLabels { route, decision })
            .inc();
    }

    /// The routes that get their own label value, sorted.
    pub fn route_labels(&self) -> Vec<String> {
        let known = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = known.labels.keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    /// The registry, to register more metrics before the metrics are shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        self.registry
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `metric` as `arbiter_<name>` (usable after the metrics are shared).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(name, help, metric);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    /// One decision and how long it took.
    pub fn decision(&self, allowed: bool, took: Duration) {
        let decision = if allowed { "allow" } else { "deny" };
        self.decisions
            .get_or_create(&DecisionLabels { decision })
            .inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// A request the engine could not decide.
    pub fn decision_error(&self) {
        self.decision_errors.inc();
    }

    /// A Check whose stated time was not used (see [`crate::request::request_time`]).
    pub fn request_time_untrusted(&self) {
        self.request_time_untrusted.inc();
    }

    /// A shadow decision, and whether it disagreed.
    pub fn shadow(&self, disagreement: Option<Disagreement>) {
        self.shadow_decisions.inc();
        if let Some(direction) = disagreement {
            self.disagreements
                .get_or_create(&DirectionLabels {
                    direction: direction.as_str(),
                })
                .inc();
        }
    }

    /// A shadow evaluation that failed.
    pub fn shadow_error(&self) {
        self.shadow_errors.inc();
    }

    /// `bundle` is now in use as `role`.
    pub fn bundle_loaded(&self, role: BundleRole, bundle: &Bundle) {
        // One `bundle_info` series per role: drop the previous version's.
        let mut versions = self.versions.lock().unwrap_or_else(PoisonError::into_inner);
        versions.insert(role, bundle.version().to_owned());
        self.info.clear();
        for (role, version) in versions.iter() {
            self.info
                .get_or_create(&VersionLabels {
                    bundle: *role,
                    version: version.clone(),
                })
                .set(1);
        }
        drop(versions);
        if role == BundleRole::Active {
            let mut known = self.routes.write().unwrap_or_else(PoisonError::into_inner);
            let names = known.configured.iter().cloned().chain(bundle.route_names());
            known.labels = labels(names);
            // Every known route's series from the start, so a first deny is an increase.
            for route in known.labels.values() {
                for decision in ["allow", "deny"] {
                    let _ = self.route_decisions.get_or_create(&RouteDecisionLabels {
                        route: route.clone(),
                        decision,
                    });
                }
            }
        }
        let labels = BundleLabels { bundle: role };
        self.policies
            .get_or_create(&labels)
            .set(i64::try_from(bundle.policy_count()).unwrap_or(i64::MAX));
        self.indexed
            .get_or_create(&labels)
            .set(i64::try_from(bundle.policy_index().indexed().0).unwrap_or(i64::MAX));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.loaded_at
            .get_or_create(&labels)
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// A reload of `role`: `Ok` when a new bundle went into use, `Err` when it was rejected.
    pub fn reload(&self, role: BundleRole, accepted: bool) {
        let result = if accepted { "success" } else { "rejected" };
        self.reloads
            .get_or_create(&ReloadLabels {
                bundle: role,
                result,
            })
            .inc();
        self.rejected
            .get_or_create(&BundleLabels { bundle: role })
            .set(i64::from(!accepted));
    }
}

/// The label values of `names`: the first [`MAX_ROUTE_LABELS`] distinct non-empty names in
/// name order (the empty name is a request without a route name: [`OTHER_ROUTE`]).
fn labels(names: impl IntoIterator<Item = String>) -> HashMap<Arc<str>, RouteLabel> {
    let names: BTreeSet<String> = names
        .into_iter()
        .filter(|n| !n.is_empty() && n != OTHER_ROUTE)
        .collect();
    if names.len() > MAX_ROUTE_LABELS {
        tracing::warn!(
            routes = names.len(),
            "more than {MAX_ROUTE_LABELS} route names: the rest are counted as route=\"{OTHER_ROUTE}\""
        );
    }
    names
        .into_iter()
        .take(MAX_ROUTE_LABELS)
        .map(|name| {
            let name: Arc<str> = Arc::from(name);
            (Arc::clone(&name), RouteLabel(name))
        })
        .collect()
}

/// Serves `GET /metrics` and `GET /status` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving once it passes.
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request, &metrics, &status);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    metrics: &Metrics,
    status: &StatusBoard,
) -> Response<Full<Bytes>> {
    let (code, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&Method::GET, "/status") => (
            StatusCode::OK,
            "application/json",
            status.to_json().to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /status\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_bounded_and_unknown_routes_fold_into_other() {
        let metrics = Metrics::new();
        metrics.set_configured_routes((0..MAX_ROUTE_LABELS + 10).map(|i| format!("r{i:04}")));
        assert_eq!(metrics.route_labels().len(), MAX_ROUTE_LABELS);
        metrics.route_decision("r0000", true);
        metrics.route_decision(&format!("r{:04}", MAX_ROUTE_LABELS + 5), false);
        metrics.route_decision("", false);
        metrics.route_decision(OTHER_ROUTE, false);
        let text = metrics.encode();
        assert!(
            text.contains("arbiter_route_decisions_total{route=\"r0000\",decision=\"allow\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("arbiter_route_decisions_total{route=\"_other\",decision=\"deny\"} 3"),
            "{text}"
        );
        assert!(!text.contains(&format!("r{:04}", MAX_ROUTE_LABELS + 5)));
    }
}
