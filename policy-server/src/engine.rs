//! The engine that decides requests with the current bundle, and beside it, in shadow, with a
//! candidate bundle.
//!
//! Bundles are swapped atomically ([`arc_swap`]): a decision reads the current bundle with
//! one atomic load and keeps it to the end, so a reload never pauses or splits a decision.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use cedar_policy::{Authorizer, Context, Entities, Entity, EntityUid, Request, RestrictedExpression};

use crate::bundle::Bundle;
pub use crate::bundle::BundleError;
use crate::identity::{Directory, EntityTypes, IdentityError, IdentitySource};
use crate::metrics::Metrics;
use crate::request::AuthzRequest;

/// Why a request cannot be decided.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request could not be turned into a Cedar request.
    #[error("cannot build cedar request: {0}")]
    Request(String),
    /// The principal could not be built.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// Determining policies, sorted: the permits that allowed, or the forbids that denied.
    /// Empty on a default deny (no policy permits the request).
    pub policy_ids: Vec<String>,
    /// Policies skipped because evaluating them failed (Cedar ignores erroring policies).
    pub errors: Vec<String>,
    /// Version of the bundle that decided.
    pub policy_version: String,
    /// The principal's id: the SPIFFE ID, `<iss>#<sub>`, the API key's caller, or
    /// `anonymous` (an `Arbiter::Caller`, or `Arbiter::Anonymous` when `identity_source` is
    /// `none`).
    pub principal: String,
    /// How the principal was identified.
    pub identity_source: IdentitySource,
    /// The candidate bundle's decision, when one runs in shadow (it never changes `allowed`).
    pub shadow: Option<ShadowDecision>,
}

impl Decision {
    /// `allow` or `deny`.
    pub fn outcome(&self) -> &'static str {
        outcome(self.allowed)
    }

    /// How the shadow bundle disagrees, if it does.
    pub fn shadow_disagreement(&self) -> Option<Disagreement> {
        match &self.shadow {
            Some(shadow) if shadow.allowed && !self.allowed => Some(Disagreement::WouldAllow),
            Some(shadow) if !shadow.allowed && self.allowed => Some(Disagreement::WouldDeny),
            _ => None,
        }
    }
}

/// What the shadow (candidate) bundle would have decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowDecision {
    /// Whether it would allow.
    pub allowed: bool,
    /// Its determining policies.
    pub policy_ids: Vec<String>,
    /// Its version.
    pub policy_version: String,
}

impl ShadowDecision {
    /// `allow` or `deny`: the `shadow_decision` field of the decision event.
    pub fn outcome(&self) -> &'static str {
        outcome(self.allowed)
    }
}

/// Direction of a shadow disagreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disagreement {
    /// The candidate would allow what the active bundle denies.
    WouldAllow,
    /// The candidate would deny what the active bundle allows.
    WouldDeny,
}

impl Disagreement {
    /// `would_allow` or `would_deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WouldAllow => "would_allow",
            Self::WouldDeny => "would_deny",
        }
    }
}

fn outcome(allowed: bool) -> &'static str {
    if allowed {
        "allow"
    } else {
        "deny"
    }
}

impl Bundle {
    /// Decides `req` with this bundle alone.
    pub fn decide(&self, authorizer: &Authorizer, req: &AuthzRequest) -> Result<Decision, EngineError> {
        let directory = Directory {
            entities: &self.entities,
            api_keys: &self.api_keys,
            jwt: &self.config.jwt,
            types: &self.types,
        };
        let principal = directory.resolve(&req.identity)?;
        let action = EntityTypes::uid(&self.types.action, &req.action);
        let route = EntityTypes::uid(&self.types.route, &req.route);
        let context = context(req, principal.source)?;
        // No schema check of the request: callers, routes and actions unknown to the bundle
        // must still be decided (by policy, which was validated at load), not rejected.
        let request = Request::new(
            principal.uid.clone(),
            action.clone(),
            route.clone(),
            context,
            None,
        )
        .map_err(|e| EngineError::Request(e.to_string()))?;
        let entities = self.request_entities(principal.entity.clone(), &action)?;
        let evaluation = self.index.evaluate(
            authorizer,
            &request,
            &entities,
            &action,
            &route,
            &principal.uid,
            &principal.ancestors,
        );
        Ok(Decision {
            allowed: evaluation.allowed,
            policy_ids: evaluation.reasons.iter().map(ToString::to_string).collect(),
            errors: evaluation.errors,
            policy_version: self.version().to_owned(),
            principal: principal.uid.id().unescaped().to_owned(),
            identity_source: principal.source,
            shadow: None,
        })
    }

    /// The entity store of one request: its principal (with its groups), its action (with
    /// its action groups) and the entities policies name literally. Only these can be read
    /// by a policy: the schema gives groups and routes no attributes, and bundles cannot
    /// add entity types.
    fn request_entities(
        &self,
        principal: Entity,
        action: &EntityUid,
    ) -> Result<Entities, EngineError> {
        let principal_uid = principal.uid();
        let mut entities = Vec::with_capacity(self.literal_entities.len() + 2);
        entities.push(principal);
        if let Some(action) = self.actions.get(action) {
            entities.push(action.clone());
        }
        entities.extend(
            self.literal_entities
                .iter()
                .filter(|e| {
                    let uid = e.uid();
                    uid != principal_uid && &uid != action
                })
                .cloned(),
        );
        Entities::from_entities(entities, None).map_err(|e| EngineError::Request(e.to_string()))
    }
}

/// The Cedar context record (`Arbiter::RequestContext`).
fn context(req: &AuthzRequest, source: IdentitySource) -> Result<Context, EngineError> {
    let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
    let long = |n: i64| RestrictedExpression::new_long(n);
    let route_context = RestrictedExpression::new_record(
        req.route_context
            .iter()
            .map(|(k, v)| (k.clone(), string(v))),
    )
    .map_err(|e| EngineError::Request(e.to_string()))?;
    let body = &req.body;
    let mut pairs = vec![
        ("route", string(&req.route)),
        ("route_context", route_context),
        ("method", string(&req.method)),
        ("path", string(&req.path)),
        ("host", string(&req.host)),
        ("scheme", string(&req.scheme)),
        ("source", string(&req.source)),
        ("request_id", string(&req.request_id)),
        ("time", RestrictedExpression::new_datetime(cedar_datetime(req.time))),
        ("identity_source", string(source.as_str())),
        (
            "body_bytes",
            long(i64::try_from(body.bytes).unwrap_or(i64::MAX)),
        ),
        ("body_truncated", RestrictedExpression::new_bool(body.truncated)),
        (
            "body_parse_error",
            RestrictedExpression::new_bool(body.parse_error),
        ),
    ];
    if let Some(ip) = source_ip(&req.source) {
        pairs.push(("source_ip", RestrictedExpression::new_ip(ip)));
    }
    if let Some(tenant) = &req.requested_tenant {
        pairs.push(("requested_tenant", string(tenant)));
    }
    if let Some(model) = &body.model {
        pairs.push(("model", string(model)));
    }
    if let Some(stream) = body.stream {
        pairs.push(("stream", RestrictedExpression::new_bool(stream)));
    }
    if let Some(max_tokens) = body.max_tokens {
        pairs.push(("max_tokens", long(max_tokens)));
    }
    if let Some(count) = body.message_count {
        pairs.push(("message_count", long(count)));
    }
    Context::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)))
        .map_err(|e| EngineError::Request(e.to_string()))
}

/// The IP of an `ip:port` / `[ip]:port` source.
fn source_ip(source: &str) -> Option<String> {
    source
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.ip().to_string())
}

/// `YYYY-MM-DDThh:mm:ss.SSSZ`, the format Cedar's `datetime` takes (millisecond precision).
pub fn cedar_datetime(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// Decides requests with the current bundle (and a shadow bundle, if any); reloads swap them
/// atomically.
#[derive(Debug)]
pub struct PolicyEngine {
    bundle: ArcSwap<Bundle>,
    shadow: ArcSwapOption<Bundle>,
    authorizer: Authorizer,
    metrics: Arc<Metrics>,
}

impl PolicyEngine {
    /// An engine deciding with `bundle`, with its own metrics.
    pub fn new(bundle: Bundle) -> Self {
        Self::with_metrics(bundle, Arc::new(Metrics::new()))
    }

    /// An engine deciding with `bundle`, recording into `metrics`.
    pub fn with_metrics(bundle: Bundle, metrics: Arc<Metrics>) -> Self {
        metrics.bundle_loaded(crate::metrics::BundleRole::Active, &bundle);
        Self {
            bundle: ArcSwap::from_pointee(bundle),
            shadow: ArcSwapOption::empty(),
            authorizer: Authorizer::new(),
            metrics,
        }
    }

    /// Loads the bundle in `dir`.
    pub fn load(dir: &std::path::Path) -> Result<Self, BundleError> {
        Bundle::load(dir).map(Self::new)
    }

    /// The metrics this engine records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The bundle in use. Requests in flight keep the one they started with.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.load_full()
    }

    /// Puts `bundle` in use for every later decision and returns the previous one.
    pub fn replace(&self, bundle: Arc<Bundle>) -> Arc<Bundle> {
        self.metrics
            .bundle_loaded(crate::metrics::BundleRole::Active, &bundle);
        self.bundle.swap(bundle)
    }

    /// The shadow bundle, if one is set.
    pub fn shadow(&self) -> Option<Arc<Bundle>> {
        self.shadow.load_full()
    }

    /// Sets (or, with `None`, removes) the bundle evaluated in shadow.
    pub fn set_shadow(&self, bundle: Option<Arc<Bundle>>) {
        if let Some(bundle) = &bundle {
            self.metrics
                .bundle_loaded(crate::metrics::BundleRole::Shadow, bundle);
        }
        self.shadow.store(bundle);
    }

    /// Decides `req` with the current bundle; with a shadow bundle set, also with it (its
    /// answer is recorded on the decision and in metrics, and never changes the decision).
    pub fn decide(&self, req: &AuthzRequest) -> Result<Decision, EngineError> {
        let started = Instant::now();
        let bundle = self.bundle.load();
        let result = bundle.decide(&self.authorizer, req);
        let mut decision = match result {
            Ok(decision) => decision,
            Err(e) => {
                self.metrics.decision_error();
                return Err(e);
            }
        };
        self.metrics.decision(decision.allowed, started.elapsed());
        if let Some(shadow) = self.shadow.load().as_ref() {
            match shadow.decide(&self.authorizer, req) {
                Ok(candidate) => {
                    decision.shadow = Some(ShadowDecision {
                        allowed: candidate.allowed,
                        policy_ids: candidate.policy_ids,
                        policy_version: candidate.policy_version,
                    });
                    self.metrics.shadow(decision.shadow_disagreement());
                }
                // The shadow must never affect the answer: its failure is only counted.
                Err(e) => {
                    tracing::debug!("shadow bundle could not decide: {e}");
                    self.metrics.shadow_error();
                }
            }
        }
        Ok(decision)
    }
}
