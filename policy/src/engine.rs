//! The engine that decides requests with the current bundle, and beside it, in shadow, with a
//! candidate bundle.
//!
//! Bundles are swapped atomically ([`arc_swap`]): a decision reads the current bundle with
//! one atomic load and keeps it to the end, so a reload never pauses or splits a decision.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
#[cfg(test)]
use cedar_policy::RestrictedExpression;
use cedar_policy::{Authorizer, Context, Entities, EntityUid, Request};

use crate::bundle::Bundle;
pub use crate::bundle::BundleError;
use crate::identity::{Directory, EntityTypes, IdentityError, IdentitySource};
use crate::metrics::{EngineMetrics, Metrics};
use crate::request::AuthzRequest;

/// Why a request cannot be decided.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request holds a value Cedar cannot express (its context cannot be built). Caused
    /// by the request: asking again gives the same answer.
    #[error("cannot build cedar request: {0}")]
    Request(String),
    /// The principal could not be built from the request's identity evidence (JWT claims).
    /// Caused by the request.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The bundle's entities could not be put together with the request's principal: a
    /// fault of the bundle or the server, not of the request.
    #[error("cannot build the entities of a request: {0}")]
    Entities(String),
}

impl EngineError {
    /// Whether the request itself is the cause (another request may well be decided).
    pub fn is_request_caused(&self) -> bool {
        match self {
            Self::Request(_) | Self::Identity(_) => true,
            Self::Entities(_) => false,
        }
    }
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
    pub fn decide(
        &self,
        authorizer: &Authorizer,
        req: &AuthzRequest,
    ) -> Result<Decision, EngineError> {
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
        let entities = self.request_entities(&principal.entity, &action)?;
        #[cfg(test)]
        if UNINDEXED.with(std::cell::Cell::get) {
            let response = authorizer.is_authorized(&request, &self.policies, &entities);
            let mut policy_ids: Vec<String> = response
                .diagnostics()
                .reason()
                .map(ToString::to_string)
                .collect();
            policy_ids.sort();
            let mut errors: Vec<String> = response
                .diagnostics()
                .errors()
                .map(ToString::to_string)
                .collect();
            errors.sort();
            return Ok(Decision {
                allowed: response.decision() == cedar_policy::Decision::Allow,
                policy_ids,
                errors,
                policy_version: self.version().to_owned(),
                principal: principal.uid.id().unescaped().to_owned(),
                identity_source: principal.source,
                shadow: None,
            });
        }
        let scope = crate::index::Scope {
            action: &action,
            route: &route,
            principal: &principal.uid,
            ancestors: &principal.ancestors,
        };
        let evaluation = self.index.evaluate(authorizer, &request, &entities, &scope);
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
    ///
    /// Every entity here is already transitively closed (the bundle's entities and the
    /// schema's actions are closed when the bundle loads; a JWT principal's groups come with
    /// their ancestors, see [`crate::identity`]), so the store is not closed again per
    /// request, and the bundle's entities are shared with it, not copied.
    pub(crate) fn request_entities(
        &self,
        principal: &Arc<cedar_policy_core::ast::Entity>,
        action: &EntityUid,
    ) -> Result<Entities, EngineError> {
        let principal_uid = principal.uid();
        let action_entity = self.actions.get(action);
        let literals = self.literal_entities.iter().filter(|e| {
            let uid = e.uid();
            uid != principal_uid && uid != action.as_ref()
        });
        let store = cedar_policy_core::entities::Entities::new()
            .add_entities(
                std::iter::once(principal)
                    .chain(action_entity)
                    .chain(literals)
                    .cloned(),
                None::<&cedar_policy_core::entities::NoEntitiesSchema>,
                cedar_policy_core::entities::TCComputation::AssumeAlreadyComputed,
                cedar_policy_core::extensions::Extensions::all_available(),
            )
            .map_err(|e| EngineError::Entities(e.to_string()))?;
        Ok(Entities::from(store))
    }
}

#[cfg(test)]
thread_local! {
    /// Tests compare the index against Cedar evaluating the whole policy set.
    pub(crate) static UNINDEXED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The Cedar context record (`Arbiter::RequestContext`), built from values.
///
/// `Context::from_pairs` takes expressions and evaluates them (a record of literals, and the
/// `datetime` / `ip` extension calls, whose strings Cedar parses again each time): a fifth of
/// a decision in the profile (bench/README.md). The values are built here directly instead,
/// the extension values remembered per thread ([`memo`]); `prop_context_equals_cedars` checks
/// the result equals `Context::from_pairs` of the same expressions.
fn context(req: &AuthzRequest, source: IdentitySource) -> Result<Context, EngineError> {
    use cedar_policy_core::ast::Value;
    let string = |s: &str| Value::from(s);
    let body = &req.body;
    let route_context = Value::record(
        req.route_context
            .iter()
            .map(|(k, v)| (k.as_str(), string(v))),
        None,
    );
    // In key order (the optional keys at their places), so the record is built without
    // sorting.
    let mut pairs: Vec<(&str, Value)> = Vec::with_capacity(20);
    pairs.extend([
        (
            "body_bytes",
            Value::from(i64::try_from(body.bytes).unwrap_or(i64::MAX)),
        ),
        ("body_parse_error", Value::from(body.parse_error)),
        ("body_size_known", Value::from(body.size_known)),
        ("body_truncated", Value::from(body.truncated)),
        ("host", string(&req.host)),
        ("identity_source", string(source.as_str())),
    ]);
    if let Some(max_tokens) = body.max_tokens {
        pairs.push(("max_tokens", Value::from(max_tokens)));
    }
    if let Some(count) = body.message_count {
        pairs.push(("message_count", Value::from(count)));
    }
    pairs.push(("method", string(&req.method)));
    if let Some(model) = &body.model {
        pairs.push(("model", string(model)));
    }
    pairs.push(("path", string(&req.path)));
    pairs.push(("request_id", string(&req.request_id)));
    if let Some(tenant) = &req.requested_tenant {
        pairs.push(("requested_tenant", string(tenant)));
    }
    pairs.extend([
        ("route", string(&req.route)),
        ("route_context", route_context),
        ("scheme", string(&req.scheme)),
        ("source", string(&req.source)),
    ]);
    if let Some(ip) = source_addr(&req.source) {
        pairs.push(("source_ip", memo::ip(ip)?));
    }
    if let Some(stream) = body.stream {
        pairs.push(("stream", Value::from(stream)));
    }
    pairs.push(("time", memo::datetime(cedar_datetime_nanos(req.time))?));
    debug_assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
    let attrs = pairs.into_iter().map(|(k, v)| (k.into(), v)).collect();
    Ok(Context::from(cedar_policy_core::ast::Context::Value(
        Arc::new(attrs),
    )))
}

/// The context as `Context::from_pairs` builds it from expressions: what [`context`] must
/// equal.
#[cfg(test)]
fn context_from_expressions(
    req: &AuthzRequest,
    source: IdentitySource,
) -> Result<Context, EngineError> {
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
        (
            "time",
            RestrictedExpression::new_datetime(cedar_datetime(req.time)),
        ),
        ("identity_source", string(source.as_str())),
        (
            "body_bytes",
            long(i64::try_from(body.bytes).unwrap_or(i64::MAX)),
        ),
        (
            "body_size_known",
            RestrictedExpression::new_bool(body.size_known),
        ),
        (
            "body_truncated",
            RestrictedExpression::new_bool(body.truncated),
        ),
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

/// Extension values of the context, remembered per thread.
///
/// A `datetime` / `ip` value is made by Cedar's extension function from its string (found by
/// name, the string parsed). The same value is needed constantly under load (the time has
/// millisecond precision; callers' IPs repeat), so each thread keeps the last time and a
/// bounded set of IPs, evaluated once by Cedar itself ([`evaluate`]), and clones them
/// (a reference count) instead.
mod memo {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::net::IpAddr;

    use cedar_policy::{Context, RestrictedExpression};
    use cedar_policy_core::ast::{self, Value};

    use super::EngineError;

    /// IPs remembered per thread; the set starts over when full.
    const MAX_IPS: usize = 1024;

    #[derive(Default)]
    struct Memo {
        /// The last time, by its millisecond (what `datetime` keeps of it).
        time: Option<(i128, Value)>,
        ips: HashMap<IpAddr, Value>,
    }

    thread_local! {
        static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
    }

    /// The value of `expr`, as Cedar evaluates it in a context.
    pub fn evaluate(expr: RestrictedExpression) -> Result<Value, EngineError> {
        let context = Context::from_pairs([("value".to_owned(), expr)])
            .map_err(|e| EngineError::Request(e.to_string()))?;
        match context.as_ref() {
            ast::Context::Value(attrs) => attrs.get("value").cloned(),
            ast::Context::RestrictedResidual(_) => None,
        }
        .ok_or_else(|| EngineError::Request("context value not evaluated".to_owned()))
    }

    /// `datetime(…)` of the time `nanos` from 1970 (within `CEDAR_DATETIME_NANOS`).
    pub fn datetime(nanos: i128) -> Result<Value, EngineError> {
        let millis = nanos.div_euclid(1_000_000);
        MEMO.with_borrow_mut(|memo| match &memo.time {
            Some((last, value)) if *last == millis => Ok(value.clone()),
            _ => {
                let text = super::format_cedar_datetime(nanos);
                let value = evaluate(RestrictedExpression::new_datetime(&text))?;
                memo.time = Some((millis, value.clone()));
                Ok(value)
            }
        })
    }

    /// `ip(addr)`.
    pub fn ip(addr: IpAddr) -> Result<Value, EngineError> {
        MEMO.with_borrow_mut(|memo| {
            if let Some(value) = memo.ips.get(&addr) {
                return Ok(value.clone());
            }
            if memo.ips.len() >= MAX_IPS {
                memo.ips.clear();
            }
            let value = evaluate(RestrictedExpression::new_ip(addr.to_string()))?;
            memo.ips.insert(addr, value.clone());
            Ok(value)
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn remembered_values_equal_fresh_ones() {
            let fresh_time = |at: &str| evaluate(RestrictedExpression::new_datetime(at)).unwrap();
            let fresh_ip = |addr: &str| evaluate(RestrictedExpression::new_ip(addr)).unwrap();
            // 2026-11-22T07:00:00.123Z, then 0.4 ms later (same millisecond), then 1 ms later.
            let at = 1_795_330_800_123_000_000i128;
            assert_eq!(
                datetime(at).unwrap(),
                fresh_time("2026-11-22T07:00:00.123Z")
            );
            assert_eq!(
                datetime(at + 400_000).unwrap(),
                fresh_time("2026-11-22T07:00:00.123Z")
            );
            assert_eq!(
                datetime(at + 1_000_000).unwrap(),
                fresh_time("2026-11-22T07:00:00.124Z")
            );
            assert_eq!(
                datetime(-1).unwrap(),
                fresh_time("1969-12-31T23:59:59.999Z")
            );
            assert_ne!(
                fresh_time("2026-11-22T07:00:00.123Z"),
                fresh_time("2026-11-22T07:00:00.124Z")
            );
            for n in 0..(MAX_IPS + 10) {
                let addr = format!("10.0.{}.{}", n / 256, n % 256);
                assert_eq!(ip(addr.parse().unwrap()).unwrap(), fresh_ip(&addr));
            }
            assert_eq!(
                ip("10.0.0.1".parse().unwrap()).unwrap(),
                fresh_ip("10.0.0.1")
            );
            assert_ne!(fresh_ip("10.0.0.1"), fresh_ip("10.0.0.2"));
            MEMO.with_borrow(|memo| assert!(memo.ips.len() <= MAX_IPS));
        }
    }
}

/// The IP of an `ip:port` / `[ip]:port` source, as Cedar's `ip()` reads it.
///
/// An IPv4 client of a dual-stack listener arrives as `[::ffff:a.b.c.d]:port`; Cedar refuses
/// IPv4 embedded in IPv6 (`::ffff:a.b.c.d`), which made every such request undecidable. It
/// is the IPv4 address it maps, and `source_ip.isInRange(ip("10.0.0.0/8"))` must match it.
/// (Rust writes no other IPv6 address with dots.)
#[cfg(test)]
fn source_ip(source: &str) -> Option<String> {
    source_addr(source).map(|ip| ip.to_string())
}

/// The address `source_ip` writes: the source's IP, IPv4 when it maps one.
fn source_addr(source: &str) -> Option<std::net::IpAddr> {
    source
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.ip().to_canonical())
}

/// The first and last instants a Cedar `datetime` can name (four-digit years), in
/// nanoseconds from 1970: 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
const CEDAR_DATETIME_NANOS: std::ops::RangeInclusive<i128> =
    -62_167_219_200_000_000_000..=253_402_300_799_999_999_999;

/// `YYYY-MM-DDThh:mm:ss.SSSZ`, the format Cedar's `datetime` takes (millisecond precision).
///
/// Total: a time outside years 0000..=9999 is written as the nearest one inside (Cedar has
/// four-digit years, and converting such a time with `time` panics). Requests never get
/// there ([`crate::request::request_time`] keeps `context.time` near the server's clock);
/// this only guarantees that no time can panic the handler.
pub fn cedar_datetime(at: SystemTime) -> String {
    format_cedar_datetime(cedar_datetime_nanos(at))
}

/// `at` in nanoseconds from 1970, within [`CEDAR_DATETIME_NANOS`].
fn cedar_datetime_nanos(at: SystemTime) -> i128 {
    let nanos = match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => i128::try_from(before.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    };
    nanos.clamp(*CEDAR_DATETIME_NANOS.start(), *CEDAR_DATETIME_NANOS.end())
}

/// [`cedar_datetime`] of a time in [`CEDAR_DATETIME_NANOS`].
fn format_cedar_datetime(nanos: i128) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
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
pub struct PolicyEngine<M = Metrics> {
    bundle: ArcSwap<Bundle>,
    shadow: ArcSwapOption<Bundle>,
    authorizer: Authorizer,
    metrics: Arc<M>,
}

impl<M: EngineMetrics + Default> PolicyEngine<M> {
    /// An engine deciding with `bundle`, with its own metrics.
    pub fn new(bundle: Bundle) -> Self {
        Self::with_metrics(bundle, Arc::new(M::default()))
    }

    /// An engine deciding with `bundle`, recording into `metrics`.
    pub fn with_metrics(bundle: Bundle, metrics: Arc<M>) -> Self {
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
    pub fn metrics(&self) -> &Arc<M> {
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

    /// Decides `req` with the current bundle alone, recording nothing: no decision metrics,
    /// no shadow evaluation. The health monitor's synthetic decision (see
    /// the server's `health`): the same evaluation as [`Self::decide`], without counting a
    /// request nobody made.
    pub fn decide_synthetic(&self, req: &AuthzRequest) -> Result<Decision, EngineError> {
        self.bundle.load().decide(&self.authorizer, req)
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

#[cfg(test)]
mod tests {
    use super::*;
    type PolicyEngine = super::PolicyEngine<Metrics>;
    use crate::ai::BodyAttributes;
    use crate::identity::{api_key_sha256, Identity};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn bundle(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn request(action: &str, route: &str) -> AuthzRequest {
        AuthzRequest {
            principal: "anonymous".into(),
            identity: Identity::default(),
            action: action.into(),
            route: route.into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            host: "llm.local".into(),
            scheme: "http".into(),
            source: "10.1.2.3:5000".into(),
            request_id: "r1".into(),
            route_context: BTreeMap::new(),
            requested_tenant: None,
            body: BodyAttributes::default(),
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            time_source: crate::request::TimeSource::Request,
        }
    }

    const ENTITIES: &str = r#"[
      {"uid":{"type":"Arbiter::Group","id":"staff"},"attrs":{},"parents":[]},
      {"uid":{"type":"Arbiter::Group","id":"eng"},"attrs":{},"parents":[{"type":"Arbiter::Group","id":"staff"}]},
      {"uid":{"type":"Arbiter::Caller","id":"spiffe://t/a"},"attrs":{"tenant":"acme"},"parents":[{"type":"Arbiter::Group","id":"eng"}]},
      {"uid":{"type":"Arbiter::Caller","id":"keyed"},"attrs":{"tenant":"globex","api_key_sha256":["a8a1f5e4bf6b4ec96d4e3bb0ac22a4ee69e7bd15f1a1bcb0ac1bd1b1c4bd7d1a"]},"parents":[]}
    ]"#;

    fn keyed_entities() -> String {
        ENTITIES.replace(
            "a8a1f5e4bf6b4ec96d4e3bb0ac22a4ee69e7bd15f1a1bcb0ac1bd1b1c4bd7d1a",
            &api_key_sha256(b"k-1"),
        )
    }

    #[test]
    fn identities_resolve_strongest_first() {
        let dir = bundle(&[
            (
                "p.cedar",
                r#"
                @id("staff") permit(principal in Arbiter::Group::"staff", action, resource);
                @id("acme") permit(principal is Arbiter::Caller, action, resource) when { principal has tenant && principal.tenant == "acme" };
                @id("anon") forbid(principal is Arbiter::Anonymous, action, resource) when { context.identity_source == "none" };
                @id("keyed") permit(principal == Arbiter::Caller::"keyed", action, resource) when { context.identity_source == "api_key" };
            "#,
            ),
            ("entities.json", &keyed_entities()),
        ]);
        let engine = PolicyEngine::load(dir.path()).unwrap();
        let decide = |identity: Identity| {
            let mut req = request("http.request", "r");
            req.identity = identity;
            engine.decide(&req).unwrap()
        };
        let jwt = json!({"iss": "https://idp", "sub": "bob", "tenant": "acme", "groups": ["eng"]})
            .as_object()
            .unwrap()
            .clone();

        // mTLS beats JWT and API key.
        let d = decide(Identity {
            mtls: Some("spiffe://t/a".into()),
            jwt: Some(jwt.clone()),
            api_key_sha256: Some(api_key_sha256(b"k-1")),
        });
        assert_eq!(
            (d.principal.as_str(), d.identity_source),
            ("spiffe://t/a", IdentitySource::Mtls)
        );
        assert_eq!(d.policy_ids, ["acme", "staff"]);

        // JWT: groups from claims, with their parents from the bundle.
        let d = decide(Identity {
            jwt: Some(jwt),
            api_key_sha256: Some(api_key_sha256(b"k-1")),
            ..Identity::default()
        });
        assert_eq!(
            (d.principal.as_str(), d.identity_source),
            ("https://idp#bob", IdentitySource::Jwt)
        );
        assert_eq!(d.policy_ids, ["acme", "staff"]);

        let d = decide(Identity {
            api_key_sha256: Some(api_key_sha256(b"k-1")),
            ..Identity::default()
        });
        assert_eq!(
            (d.principal.as_str(), d.identity_source),
            ("keyed", IdentitySource::ApiKey)
        );
        assert_eq!(d.policy_ids, ["keyed"]);

        // An unknown key identifies nobody.
        let d = decide(Identity {
            api_key_sha256: Some(api_key_sha256(b"wrong")),
            ..Identity::default()
        });
        assert_eq!(
            (d.principal.as_str(), d.identity_source),
            ("anonymous", IdentitySource::None)
        );
        assert_eq!(d.policy_ids, ["anon"]);
        assert!(!d.allowed);

        // An unknown mTLS caller is a caller without tenant or groups.
        let d = decide(Identity {
            mtls: Some("spiffe://t/stranger".into()),
            ..Identity::default()
        });
        assert!(!d.allowed);
        assert!(d.policy_ids.is_empty());
    }

    #[test]
    fn context_attributes_reach_policies() {
        let dir = bundle(&[
            (
                "s.cedarschema",
                "namespace Arbiter { type RouteContext = { tier?: String }; }",
            ),
            (
                "p.cedar",
                r#"
                @id("all") permit(principal, action, resource) when {
                  context.route == "chat" && context.route_context has tier && context.route_context.tier == "gold" &&
                  context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8")) &&
                  context.time > datetime("2023-01-01") && context.time < datetime("2024-01-01") &&
                  context has model && context.model == "m" && context has stream && context.stream &&
                  context has max_tokens && context.max_tokens == 5 && context has message_count && context.message_count == 1 &&
                  context.body_bytes > 10 && !context.body_truncated && !context.body_parse_error &&
                  context has requested_tenant && context.requested_tenant == "acme"
                };
            "#,
            ),
        ]);
        let engine = PolicyEngine::load(dir.path()).unwrap();
        let mut req = request("chat.completions", "chat");
        req.route_context.insert("tier".into(), "gold".into());
        req.requested_tenant = Some("acme".into());
        let body = br#"{"model":"m","stream":true,"max_tokens":5,"messages":[{}]}"#;
        req.body = BodyAttributes::from_body(body, 0, false);
        let d = engine.decide(&req).unwrap();
        assert!(d.allowed, "{d:?}");
        req.source = "[::1]:80".into();
        assert!(!engine.decide(&req).unwrap().allowed);
    }

    #[test]
    fn index_decides_like_the_whole_policy_set() {
        // Every kind of scope, overlapping permits and forbids, conditions that error.
        let mut text = String::new();
        let actions = [
            "chat.completions",
            "embeddings",
            "models.list",
            "http.request",
        ];
        for i in 0..60 {
            let effect = if i % 4 == 0 { "forbid" } else { "permit" };
            let principal = match i % 5 {
                0 => "principal".to_owned(),
                1 => "principal == Arbiter::Caller::\"spiffe://t/a\"".to_owned(),
                2 => "principal in Arbiter::Group::\"staff\"".to_owned(),
                3 => "principal is Arbiter::Caller in Arbiter::Group::\"eng\"".to_owned(),
                _ => "principal is Arbiter::Anonymous".to_owned(),
            };
            let action = match i % 3 {
                0 => "action".to_owned(),
                1 => format!("action == Arbiter::Action::\"{}\"", actions[i % 4]),
                _ => format!(
                    "action in [Arbiter::Action::\"{}\", Arbiter::Action::\"{}\"]",
                    actions[i % 4],
                    actions[(i + 1) % 4]
                ),
            };
            let resource = match i % 4 {
                0 => "resource".to_owned(),
                1 => format!("resource == Arbiter::Route::\"r{}\"", i % 3),
                2 => "resource is Arbiter::Route".to_owned(),
                _ => format!("resource in Arbiter::Route::\"r{}\"", i % 2),
            };
            let condition = match i % 6 {
                0 => "true".to_owned(),
                1 => format!("context.path == \"/p{}\"", i % 2),
                2 => "context has model && context.model == \"m\"".to_owned(),
                // Errors at run time when the caller has no tenant: skipped, not fatal.
                3 => "principal is Arbiter::Caller && principal.tenant == \"acme\"".to_owned(),
                _ => "context.body_bytes >= 0".to_owned(),
            };
            text.push_str(&format!(
                "@id(\"p{i}\") {effect}({principal}, {action}, {resource}) when {{ {condition} }};\n"
            ));
        }
        // `principal.tenant` without `has` does not validate strictly; such policies are
        // legal Cedar but refused by the bundle, so keep only the validating ones.
        let text: String = text
            .lines()
            .filter(|l| !l.contains("principal.tenant"))
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = bundle(&[("p.cedar", &text), ("entities.json", &keyed_entities())]);
        let engine = PolicyEngine::load(dir.path()).unwrap();
        assert!(engine.bundle().index_buckets() > 10);
        let mut compared = 0;
        for action in actions {
            for route in ["r0", "r1", "r2", "other"] {
                for identity in [
                    Identity::default(),
                    Identity {
                        mtls: Some("spiffe://t/a".into()),
                        ..Identity::default()
                    },
                    Identity {
                        mtls: Some("spiffe://t/b".into()),
                        ..Identity::default()
                    },
                    Identity {
                        api_key_sha256: Some(api_key_sha256(b"k-1")),
                        ..Identity::default()
                    },
                ] {
                    for path in ["/p0", "/p1"] {
                        let mut req = request(action, route);
                        req.identity = identity.clone();
                        req.path = path.into();
                        let indexed = engine.decide(&req).unwrap();
                        UNINDEXED.with(|u| u.set(true));
                        let whole = engine.decide(&req).unwrap();
                        UNINDEXED.with(|u| u.set(false));
                        assert_eq!(indexed, whole, "{action} {route} {identity:?} {path}");
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 128);
    }

    #[test]
    fn shadow_never_changes_the_answer() {
        let active = bundle(&[(
            "a.cedar",
            "@id(\"all\") permit(principal, action, resource);",
        )]);
        let candidate = bundle(&[(
            "a.cedar",
            "@id(\"chat\") permit(principal, action == Arbiter::Action::\"chat.completions\", resource);",
        )]);
        let engine = PolicyEngine::load(active.path()).unwrap();
        engine.set_shadow(Some(Arc::new(Bundle::load(candidate.path()).unwrap())));
        let chat = engine.decide(&request("chat.completions", "r")).unwrap();
        assert!(chat.allowed);
        assert_eq!(chat.shadow.as_ref().unwrap().outcome(), "allow");
        assert_eq!(chat.shadow_disagreement(), None);
        let other = engine.decide(&request("embeddings", "r")).unwrap();
        assert!(other.allowed);
        assert_eq!(other.policy_ids, ["all"]);
        let shadow = other.shadow.as_ref().unwrap();
        assert_eq!(shadow.outcome(), "deny");
        assert_ne!(shadow.policy_version, other.policy_version);
        assert_eq!(other.shadow_disagreement(), Some(Disagreement::WouldDeny));
        let metrics = engine.metrics();
        assert_eq!(metrics.disagreements(Disagreement::WouldDeny), 1);
        assert_eq!(metrics.shadow_decisions(), 2);
        engine.set_shadow(None);
        assert_eq!(
            engine.decide(&request("embeddings", "r")).unwrap().shadow,
            None
        );
    }

    #[test]
    fn entities_named_in_policies_are_readable() {
        let dir = bundle(&[
            (
                "p.cedar",
                r#"
                @id("nested") permit(principal, action == Arbiter::Action::"models.list", resource)
                  when { Arbiter::Group::"eng" in Arbiter::Group::"staff" };
                @id("attr") permit(principal, action == Arbiter::Action::"embeddings", resource)
                  when { Arbiter::Caller::"spiffe://t/a" has tenant && Arbiter::Caller::"spiffe://t/a".tenant == "acme" };
            "#,
            ),
            ("entities.json", &keyed_entities()),
        ]);
        let engine = PolicyEngine::load(dir.path()).unwrap();
        assert!(engine.decide(&request("models.list", "r")).unwrap().allowed);
        assert!(engine.decide(&request("embeddings", "r")).unwrap().allowed);
    }

    #[test]
    fn replace_swaps_the_bundle() {
        let first = bundle(&[("a.cedar", "permit(principal, action, resource);")]);
        let second = bundle(&[("a.cedar", "forbid(principal, action, resource);")]);
        let engine = PolicyEngine::load(first.path()).unwrap();
        let old = engine.replace(Arc::new(Bundle::load(second.path()).unwrap()));
        assert_ne!(old.version(), engine.bundle().version());
        assert!(
            !engine
                .decide(&request("chat.completions", "r"))
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn datetime_format() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(cedar_datetime(at), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn datetime_is_total_and_always_a_cedar_datetime() {
        use std::time::Duration;
        let epoch = SystemTime::UNIX_EPOCH;
        let last = epoch + Duration::new(253_402_300_799, 999_999_999);
        let first = epoch - Duration::from_secs(62_167_219_200);
        let cases = [
            (epoch, "1970-01-01T00:00:00.000Z"),
            (epoch - Duration::from_millis(1), "1969-12-31T23:59:59.999Z"),
            (
                epoch - Duration::from_secs(315_619_200),
                "1960-01-01T00:00:00.000Z",
            ),
            (first, "0000-01-01T00:00:00.000Z"),
            (first - Duration::from_secs(1), "0000-01-01T00:00:00.000Z"),
            (last, "9999-12-31T23:59:59.999Z"),
            // Year 10000 and far beyond: the last representable millisecond.
            (last + Duration::from_nanos(1), "9999-12-31T23:59:59.999Z"),
            (
                epoch + Duration::from_secs(i64::MAX as u64 / 2),
                "9999-12-31T23:59:59.999Z",
            ),
        ];
        for (at, expected) in cases {
            let text = cedar_datetime(at);
            assert_eq!(text, expected);
            Context::from_pairs([("t".to_owned(), RestrictedExpression::new_datetime(&text))])
                .unwrap();
        }
        // Cedar does check: a five-digit year is refused.
        assert!(Context::from_pairs([(
            "t".to_owned(),
            RestrictedExpression::new_datetime("10000-01-01T00:00:00.000Z")
        )])
        .is_err());
    }

    #[test]
    fn source_ips_are_ones_cedar_reads() {
        for (source, ip) in [
            ("10.1.2.3:5000", Some("10.1.2.3")),
            ("[::1]:5000", Some("::1")),
            // An IPv4 client of a dual-stack listener is that IPv4 address.
            ("[::ffff:10.1.2.3]:5000", Some("10.1.2.3")),
            ("[::1.2.3.4]:5000", Some("::102:304")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("", None),
            ("pipe:/tmp/x", None),
        ] {
            let got = source_ip(source);
            assert_eq!(got.as_deref(), ip, "{source}");
            if let Some(ip) = got {
                Context::from_pairs([("ip".to_owned(), RestrictedExpression::new_ip(&ip))])
                    .unwrap();
            }
        }
        // And a request from such an address is decided, and matches an IPv4 range.
        let dir = bundle(&[(
            "p.cedar",
            r#"@id("lan") permit(principal, action, resource)
               when { context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8")) };"#,
        )]);
        let engine = PolicyEngine::load(dir.path()).unwrap();
        let mut req = request("chat.completions", "r");
        req.source = "[::ffff:10.1.2.3]:5000".into();
        assert!(engine.decide(&req).unwrap().allowed);
    }
    /// The context built from values equals Cedar's own, from expressions; the entity store
    /// shared from the bundle, unclosed, equals the one Cedar builds and closes itself; so
    /// both decide the same. For every identity source and every optional context field,
    /// with arbitrary strings.
    #[test]
    fn prop_context_and_entities_equal_cedars() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/ai-gateway/policies"
        );
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(example).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        // Literal entities with parents and attributes, one of them a possible principal.
        std::fs::write(
            dir.path().join("literals.cedar"),
            r#"@id("billing") permit (principal == Arbiter::Caller::"spiffe://arbiter.test/ns/apps/sa/billing", action, resource == Arbiter::Route::"r1");
               @id("acme") forbid (principal, action, resource) when { Arbiter::Caller::"acme-batch" has tenant && Arbiter::Caller::"acme-batch".tenant == "x" };"#,
        )
        .unwrap();
        let bundle = Bundle::load(dir.path()).unwrap();
        assert!(!bundle.literal_entities.is_empty());
        let acme_key = "1ea061b796f9ec572eae9377644c9bdcdc7eb2ad5cc712228fe068240ec38934";

        let text = || ".{0,12}";
        let strategy = (
            (
                0..6usize,
                0..4usize,
                text(),
                prop::collection::btree_map(text(), text(), 0..3),
                (text(), text(), text(), text()),
                0..6usize,
            ),
            (
                -62_167_219_200_000i64..=253_402_300_799_999,
                any::<u64>(),
                any::<(bool, bool, bool)>(),
                prop::option::of(text()),
                prop::option::of(any::<bool>()),
                prop::option::of(any::<i64>()),
                prop::option::of(any::<i64>()),
                prop::option::of(text()),
            ),
        );
        let mut runner = TestRunner::new(Config {
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(256),
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |(first, second)| {
            let (who, action, route, route_context, (method, path, host, id), source) = first;
            let (millis, bytes, flags, model, stream, max_tokens, count, tenant) = second;
            let mut identity = Identity::default();
            match who {
                0 => {}
                1 => identity.mtls = Some("spiffe://arbiter.test/ns/apps/sa/billing".into()),
                2 => identity.mtls = Some(route.clone()),
                3 => {
                    identity.jwt = Some(
                        json!({"iss": "i", "sub": route, "tenant": "acme",
                               "groups": ["premium-models", "nope", "regulated-approved"]})
                        .as_object()
                        .unwrap()
                        .clone(),
                    )
                }
                4 => identity.api_key_sha256 = Some(acme_key.into()),
                _ => identity.api_key_sha256 = Some(api_key_sha256(route.as_bytes())),
            }
            let at = if millis >= 0 {
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(millis.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH - std::time::Duration::from_millis(millis.unsigned_abs())
            };
            let req = AuthzRequest {
                principal: String::new(),
                identity,
                action: [
                    "chat.completions",
                    "embeddings",
                    "models.list",
                    "http.request",
                ][action]
                    .into(),
                route,
                method,
                path,
                host,
                scheme: "https".into(),
                source: [
                    "",
                    "10.1.2.3:5000",
                    "[::ffff:10.0.0.1]:80",
                    "[2001:db8::1]:443",
                    "pipe:/x",
                    "10.1.2.3:5000",
                ][source]
                    .into(),
                request_id: id,
                route_context,
                requested_tenant: tenant,
                body: BodyAttributes {
                    bytes,
                    size_known: flags.0,
                    truncated: flags.1,
                    parse_error: flags.2,
                    model,
                    stream,
                    max_tokens,
                    message_count: count,
                    sha256: None,
                },
                time: at,
                time_source: crate::request::TimeSource::Request,
            };
            let directory = Directory {
                entities: &bundle.entities,
                api_keys: &bundle.api_keys,
                jwt: &bundle.config.jwt,
                types: &bundle.types,
            };
            let principal = directory.resolve(&req.identity).unwrap();
            let ours = context(&req, principal.source).unwrap();
            let cedars = context_from_expressions(&req, principal.source).unwrap();
            prop_assert_eq!(&ours, &cedars);

            let action = EntityTypes::uid(&bundle.types.action, &req.action);
            let shared = bundle.request_entities(&principal.entity, &action).unwrap();
            let principal_uid = principal.entity.uid();
            let mut owned = vec![cedar_policy::Entity::from((*principal.entity).clone())];
            owned.extend(
                bundle
                    .actions
                    .get(&action)
                    .map(|e| cedar_policy::Entity::from((**e).clone())),
            );
            owned.extend(
                bundle
                    .literal_entities
                    .iter()
                    .filter(|e| e.uid() != principal_uid && e.uid() != action.as_ref())
                    .map(|e| cedar_policy::Entity::from((**e).clone())),
            );
            let closed = Entities::from_entities(owned, None).unwrap();
            prop_assert!(
                closed.as_ref().deep_eq(shared.as_ref()),
                "{:?}\n{:?}",
                closed,
                shared
            );
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
