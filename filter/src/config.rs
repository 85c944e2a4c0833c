//! Plugin configuration: the JSON string in the Envoy wasm filter's `configuration`.
//!
//! Every field is checked and every problem is reported at once, so an operator fixes a
//! config in one round trip. An invalid configuration is never replaced by defaults: the
//! caller makes `on_configure` return false and Envoy refuses the listener.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::table::RouteTable;

/// What a route does when the policy server gives no decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse the request with a retryable error (the secure default).
    Closed,
    /// Let the request through, marked with `x-arbiter-fail-open`.
    Open,
}

impl FailMode {
    /// Parses `closed` / `open`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "closed" => Some(Self::Closed),
            "open" => Some(Self::Open),
            _ => None,
        }
    }

    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// Default policy-call timeout when neither the plugin nor the route sets one.
pub const DEFAULT_TIMEOUT_MS: u64 = 100;
/// Longest policy-call timeout accepted anywhere; a longer wait is a misconfiguration.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// Default status of a fail-closed answer.
pub const DEFAULT_STATUS_ON_ERROR: u32 = 503;
/// Default route metadata namespace.
pub const DEFAULT_METADATA_NAMESPACE: &str = "arbiter";
/// Dynamic metadata namespace of Envoy's `jwt_authn` filter.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";
/// Default consecutive failures that open the breaker.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
/// Default first breaker cool-down: a blip (a pause, a reconnect) is over by then, and an
/// open breaker costs a route its decisions only this long after the server is back.
pub const DEFAULT_BREAKER_COOLDOWN_MS: u64 = 250;
/// Default longest breaker cool-down (each failed probe doubles it up to this): the cool-down
/// every opening had before backoff, so a long outage is probed no more often than before
/// and a route waits at most this long for its decisions after the server recovers.
pub const DEFAULT_BREAKER_COOLDOWN_MAX_MS: u64 = 2_000;
/// Longest breaker cool-down accepted (either field).
pub const MAX_BREAKER_COOLDOWN_MS: u64 = 600_000;
/// Default probe calls after the cool-down.
pub const DEFAULT_BREAKER_PROBES: u32 = 1;
/// Default allow-cache slots.
pub const DEFAULT_CACHE_MAX_ENTRIES: u32 = 10_000;
/// JWT claims an Envoy-side record keeps by default besides `iss` and `sub`: the claims the
/// policy server's default bundle configuration decides on (tenant and groups), so `audit
/// replay` re-decides the record as live. Every other claim is left out.
pub const DEFAULT_RECORD_JWT_CLAIMS: &[&str] = &["tenant", "groups"];
/// Claims every record keeps: who issued the token and whom it names.
pub const ALWAYS_RECORDED_JWT_CLAIMS: &[&str] = &["iss", "sub"];

/// Default gateway credential headers: read by policy, never sent upstream.
pub const DEFAULT_CREDENTIAL_HEADERS: &[&str] = &["x-api-key"];

/// VM-wide defaults, compiled from the plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    /// Envoy cluster (HTTP/2) that serves `envoy.service.auth.v3.Authorization`.
    pub policy_cluster: String,
    /// What the filter passes to Envoy's gRPC client for that cluster: the name itself, or
    /// an encoded `GrpcService` carrying a valid `:authority` ([`crate::upstream`]).
    pub policy_upstream: String,
    /// Default bound on the policy call.
    pub timeout: Duration,
    /// Default fail mode for routes that do not set one.
    pub fail_mode: FailMode,
    /// Default status of a fail-closed answer.
    pub status_on_error: u32,
    /// Route metadata namespace holding the per-route settings.
    pub metadata_namespace: String,
    /// Dynamic metadata namespaces forwarded as the CheckRequest's `metadata_context`
    /// (verified JWT claims from `jwt_authn` by default).
    pub metadata_namespaces: Vec<String>,
    /// Breaker toward the policy server.
    pub breaker: BreakerConfig,
    /// Slots of the shared allow-cache (used only by routes with `cache_ttl_ms`).
    pub cache_max_entries: u32,
    /// Headers carrying the caller's gateway credential (lowercase): sent to policy, removed
    /// from the request before anything goes upstream, on every route.
    pub credential_headers: Vec<String>,
    /// Per-route settings for routes without route metadata (first match wins).
    pub routes: RouteTable,
    /// Which verified JWT claims an Envoy-side record keeps.
    pub record_jwt_claims: ClaimFilter,
}

/// Which JWT claims an Envoy-side record (`arbiter_record`) keeps: the same rule as the
/// policy server's `--audit-jwt-claims` for its own records, since claims can carry personal
/// data. `iss` and `sub` are always kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimFilter {
    /// Every claim (`["*"]`).
    All,
    /// These top-level claims (a dotted name such as `realm_access.roles` keeps its first
    /// part, `realm_access`), plus `iss` and `sub`.
    Only(Vec<String>),
}

impl ClaimFilter {
    /// Whether the top-level claim `name` is kept.
    pub fn keeps(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => {
                ALWAYS_RECORDED_JWT_CLAIMS.contains(&name)
                    || names
                        .iter()
                        .any(|n| n == name || n.split('.').next() == Some(name))
            }
        }
    }
}

/// When the filter stops calling a failing policy server, and how it tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed calls that open the breaker; 0 disables it.
    pub threshold: u32,
    /// How long an open breaker answers every request with the route's fail mode, the first
    /// time it opens; each failed probe doubles it.
    pub cooldown: Duration,
    /// The longest cool-down the doubling reaches.
    pub cooldown_max: Duration,
    /// Calls let through at once after the cool-down to test the server.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_BREAKER_THRESHOLD,
            cooldown: Duration::from_millis(DEFAULT_BREAKER_COOLDOWN_MS),
            cooldown_max: Duration::from_millis(DEFAULT_BREAKER_COOLDOWN_MAX_MS),
            probes: DEFAULT_BREAKER_PROBES,
        }
    }
}

/// Why a plugin configuration was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The configuration is not a JSON object.
    #[error("plugin configuration is not a JSON object: {0}")]
    NotAnObject(String),
    /// One or more fields are wrong; every problem is listed.
    #[error("invalid plugin configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

const KNOWN_FIELDS: &[&str] = &[
    "policy_cluster",
    "policy_authority",
    "timeout_ms",
    "fail_mode",
    "status_on_error",
    "metadata_namespace",
    "metadata_namespaces",
    "breaker_threshold",
    "breaker_cooldown_ms",
    "breaker_cooldown_max_ms",
    "breaker_probes",
    "cache_max_entries",
    "credential_headers",
    "routes",
    "record_jwt_claims",
];

impl FilterConfig {
    /// Parses and validates the plugin configuration bytes, judged at the system clock's
    /// now (native callers; the wasm glue passes Envoy's clock to [`FilterConfig::parse_at`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::parse_at(bytes, SystemTime::now())
    }

    /// Parses and validates the plugin configuration bytes loaded at `now` (a route table
    /// override more than 24 h ahead of `now` is refused).
    pub fn parse_at(bytes: &[u8], now: SystemTime) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::NotAnObject(format!("{e}")))?;
        let Value::Object(map) = value else {
            return Err(ConfigError::NotAnObject(format!(
                "expected an object like {{\"policy_cluster\": \"arbiter_policy\"}}, got `{value}`"
            )));
        };
        Self::from_map(&map, now)
    }

    fn from_map(map: &Map<String, Value>, now: SystemTime) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        for key in map.keys() {
            if !KNOWN_FIELDS.contains(&key.as_str()) {
                problems.push(format!(
                    "unknown field `{key}` (expected one of {})",
                    KNOWN_FIELDS.join(", ")
                ));
            }
        }

        let policy_cluster = match map.get("policy_cluster") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => {
                problems.push("`policy_cluster` must not be empty".to_owned());
                String::new()
            }
            Some(other) => {
                problems.push(format!("`policy_cluster` must be a string, got `{other}`"));
                String::new()
            }
            None => {
                problems.push("missing required field `policy_cluster`".to_owned());
                String::new()
            }
        };

        let policy_authority = match map.get("policy_authority") {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => {
                problems.push(format!(
                    "`policy_authority` must be a string, got `{other}`"
                ));
                None
            }
        };
        let policy_upstream = if policy_cluster.is_empty() {
            String::new()
        } else {
            crate::upstream::policy_upstream(&policy_cluster, policy_authority).unwrap_or_else(
                |e| {
                    problems.push(e);
                    String::new()
                },
            )
        };

        let timeout_ms = match map.get("timeout_ms") {
            None => DEFAULT_TIMEOUT_MS,
            Some(v) => match timeout_ms(v) {
                Ok(ms) => ms,
                Err(e) => {
                    problems.push(e);
                    DEFAULT_TIMEOUT_MS
                }
            },
        };

        let fail_mode = match map.get("fail_mode") {
            None => FailMode::Closed,
            Some(Value::String(s)) => FailMode::parse(s).unwrap_or_else(|| {
                problems.push(format!("`fail_mode` must be `closed` or `open`, got `{s}`"));
                FailMode::Closed
            }),
            Some(other) => {
                problems.push(format!("`fail_mode` must be a string, got `{other}`"));
                FailMode::Closed
            }
        };

        let status_on_error = match map.get("status_on_error") {
            None => DEFAULT_STATUS_ON_ERROR,
            Some(v) => status_on_error(v).unwrap_or_else(|e| {
                problems.push(e);
                DEFAULT_STATUS_ON_ERROR
            }),
        };

        let metadata_namespace = match map.get("metadata_namespace") {
            None => DEFAULT_METADATA_NAMESPACE.to_owned(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => {
                problems.push(format!(
                    "`metadata_namespace` must be a non-empty string, got `{other}`"
                ));
                String::new()
            }
        };

        let metadata_namespaces = match map.get("metadata_namespaces") {
            None => vec![JWT_AUTHN_NAMESPACE.to_owned()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) if !s.is_empty() => Some(s.clone()),
                    other => {
                        problems.push(format!(
                            "`metadata_namespaces` entries must be non-empty strings, got `{other}`"
                        ));
                        None
                    }
                })
                .collect(),
            Some(other) => {
                problems.push(format!(
                    "`metadata_namespaces` must be a list of strings, got `{other}`"
                ));
                Vec::new()
            }
        };

        let mut bounded = |field: &str, default: u64, range: std::ops::RangeInclusive<i64>| {
            match map.get(field) {
                None => default,
                Some(v) => match whole_number(v) {
                    Some(n) if range.contains(&n) => n as u64,
                    _ => {
                        problems.push(format!(
                            "`{field}` must be a whole number between {} and {}, got `{v}`",
                            range.start(),
                            range.end()
                        ));
                        default
                    }
                },
            }
        };
        let cooldown_ms = bounded(
            "breaker_cooldown_ms",
            DEFAULT_BREAKER_COOLDOWN_MS,
            1..=MAX_BREAKER_COOLDOWN_MS as i64,
        );
        // Unset, the maximum is the default one, or the first cool-down when that is longer:
        // a configuration written before backoff existed (`breaker_cooldown_ms` alone, say
        // 60000) keeps a breaker that is never open for less than it says.
        let cooldown_max_ms = bounded(
            "breaker_cooldown_max_ms",
            DEFAULT_BREAKER_COOLDOWN_MAX_MS.max(cooldown_ms),
            1..=MAX_BREAKER_COOLDOWN_MS as i64,
        );
        let breaker = BreakerConfig {
            threshold: bounded(
                "breaker_threshold",
                u64::from(DEFAULT_BREAKER_THRESHOLD),
                0..=10_000,
            ) as u32,
            cooldown: Duration::from_millis(cooldown_ms),
            cooldown_max: Duration::from_millis(cooldown_max_ms),
            probes: bounded(
                "breaker_probes",
                u64::from(DEFAULT_BREAKER_PROBES),
                1..=1_000,
            ) as u32,
        };

        let cache_max_entries = bounded(
            "cache_max_entries",
            u64::from(DEFAULT_CACHE_MAX_ENTRIES),
            1..=1_000_000,
        ) as u32;
        // Compared only when both are valid numbers (a bad one is reported on its own).
        if breaker.cooldown_max < breaker.cooldown
            && !problems.iter().any(|p| p.starts_with("`breaker_cooldown"))
        {
            problems.push(format!(
                "`breaker_cooldown_max_ms` ({cooldown_max_ms}) must be at least `breaker_cooldown_ms` ({cooldown_ms}): failed probes double the cool-down from the first up to the maximum"
            ));
        }

        let credential_headers = match map.get("credential_headers") {
            None => DEFAULT_CREDENTIAL_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v.as_str().map(header_name) {
                    Some(Ok(name)) => Some(name),
                    Some(Err(e)) => {
                        problems.push(format!("`credential_headers`: {e}"));
                        None
                    }
                    None => {
                        problems.push(format!(
                            "`credential_headers` entries must be header names, got `{v}`"
                        ));
                        None
                    }
                })
                .collect(),
            Some(other) => {
                problems.push(format!(
                    "`credential_headers` must be a list of header names, got `{other}`"
                ));
                Vec::new()
            }
        };

        // One bad entry refuses the whole configuration: a table with a dropped or defaulted
        // entry could leave that route weaker than the operator wrote it.
        let routes = match map.get("routes") {
            None => RouteTable::default(),
            Some(v) => RouteTable::parse(v, now).unwrap_or_else(|e| {
                problems.extend(e);
                RouteTable::default()
            }),
        };

        let record_jwt_claims = match map.get("record_jwt_claims") {
            None => ClaimFilter::Only(
                DEFAULT_RECORD_JWT_CLAIMS
                    .iter()
                    .map(|c| (*c).to_owned())
                    .collect(),
            ),
            Some(Value::Array(items)) => {
                let names: Vec<String> = items
                    .iter()
                    .filter_map(|v| match v.as_str() {
                        Some(n)
                            if !n.is_empty()
                                && n.len() <= 256
                                && !n.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                        {
                            Some(n.to_owned())
                        }
                        _ => {
                            problems.push(format!(
                                "`record_jwt_claims` entries must be claim names (1-256 characters, no whitespace), got `{v}`"
                            ));
                            None
                        }
                    })
                    .collect();
                if names.iter().any(|n| n == "*") {
                    if names.len() > 1 {
                        problems.push(
                            "`record_jwt_claims`: `*` (every claim) cannot be combined with claim names"
                                .to_owned(),
                        );
                    }
                    ClaimFilter::All
                } else {
                    ClaimFilter::Only(names)
                }
            }
            Some(other) => {
                problems.push(format!(
                    "`record_jwt_claims` must be a list of claim names, got `{other}`"
                ));
                ClaimFilter::Only(Vec::new())
            }
        };

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Self {
            policy_cluster,
            policy_upstream,
            timeout: Duration::from_millis(timeout_ms),
            fail_mode,
            status_on_error,
            metadata_namespace,
            metadata_namespaces,
            breaker,
            cache_max_entries,
            credential_headers,
            routes,
            record_jwt_claims,
        })
    }
}

/// A request header name an operator may list, lowercased: an HTTP token, not a
/// pseudo-header, not one of Arbiter's own `x-arbiter-*` markers.
fn header_name(s: &str) -> Result<String, String> {
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if s.is_empty() || !s.bytes().all(is_token) {
        return Err(format!("`{s}` is not a header name"));
    }
    let name = s.to_ascii_lowercase();
    if name.starts_with(crate::check::RESERVED_HEADER_PREFIX) {
        return Err(format!(
            "`{s}` is an Arbiter marker, removed from every request anyway"
        ));
    }
    Ok(name)
}

/// Accepts a whole number of milliseconds in `1..=MAX_TIMEOUT_MS`.
pub(crate) fn timeout_ms(v: &Value) -> Result<u64, String> {
    let n = whole_number(v)
        .ok_or_else(|| format!("`timeout_ms` must be a whole number of milliseconds, got `{v}`"))?;
    if !(1..=MAX_TIMEOUT_MS as i64).contains(&n) {
        return Err(format!(
            "`timeout_ms` must be between 1 and {MAX_TIMEOUT_MS}, got `{n}`"
        ));
    }
    Ok(n as u64)
}

/// Accepts an HTTP error status (`400..=599`).
pub(crate) fn status_on_error(v: &Value) -> Result<u32, String> {
    match whole_number(v) {
        Some(n) if (400..=599).contains(&n) => Ok(n as u32),
        _ => Err(format!(
            "`status_on_error` must be an HTTP error status between 400 and 599, got `{v}`"
        )),
    }
}

/// JSON numbers and protobuf `Struct` numbers (always f64) that are whole.
pub(crate) fn whole_number(v: &Value) -> Option<i64> {
    if let Some(n) = v.as_i64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_takes_closed_defaults() {
        let c = FilterConfig::parse(br#"{"policy_cluster":"arbiter_policy"}"#).unwrap();
        assert_eq!(c.policy_cluster, "arbiter_policy");
        assert_eq!(c.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!(c.fail_mode, FailMode::Closed);
        assert_eq!(c.status_on_error, 503);
        assert_eq!(c.metadata_namespace, "arbiter");
        assert_eq!(c.metadata_namespaces, vec![JWT_AUTHN_NAMESPACE.to_owned()]);
        assert_eq!(c.breaker, BreakerConfig::default());
        assert_eq!(c.cache_max_entries, DEFAULT_CACHE_MAX_ENTRIES);
        assert_eq!(c.credential_headers, vec!["x-api-key".to_owned()]);
    }

    #[test]
    fn credential_headers_are_lowercased_header_names() {
        let c = FilterConfig::parse(
            br#"{"policy_cluster":"p","credential_headers":["X-Api-Key","x-gateway-token"]}"#,
        )
        .unwrap();
        assert_eq!(c.credential_headers, vec!["x-api-key", "x-gateway-token"]);
        let c = FilterConfig::parse(br#"{"policy_cluster":"p","credential_headers":[]}"#).unwrap();
        assert!(c.credential_headers.is_empty());
        let msg = FilterConfig::parse(
            br#"{"policy_cluster":"p","credential_headers":["",":path","a b",5,"x-arbiter-x"]}"#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "`` is not a header name",
            "`:path` is not a header name",
            "`a b` is not a header name",
            "entries must be header names, got `5`",
            "`x-arbiter-x` is an Arbiter marker",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
        assert!(
            FilterConfig::parse(br#"{"policy_cluster":"p","credential_headers":"x-api-key"}"#)
                .is_err()
        );
    }

    #[test]
    fn breaker_cache_and_namespaces() {
        let c = FilterConfig::parse(
            br#"{"policy_cluster":"p","breaker_threshold":0,"breaker_cooldown_ms":500,"breaker_probes":2,"cache_max_entries":16,"metadata_namespaces":[]}"#,
        )
        .unwrap();
        assert_eq!(c.breaker.threshold, 0);
        assert_eq!(c.breaker.cooldown, Duration::from_millis(500));
        assert_eq!(
            c.breaker.cooldown_max,
            Duration::from_millis(DEFAULT_BREAKER_COOLDOWN_MAX_MS)
        );
        assert_eq!(c.breaker.probes, 2);
        assert_eq!(c.cache_max_entries, 16);
        assert!(c.metadata_namespaces.is_empty());
        let msg = FilterConfig::parse(
            br#"{"policy_cluster":"p","breaker_cooldown_ms":0,"breaker_probes":-1,"cache_max_entries":0,"metadata_namespaces":"x"}"#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "`breaker_cooldown_ms`",
            "`breaker_probes`",
            "`cache_max_entries`",
            "`metadata_namespaces` must be a list",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn breaker_cooldowns_back_off_from_the_first_to_the_maximum() {
        let breaker = |json: &str| {
            FilterConfig::parse(format!(r#"{{"policy_cluster":"p"{json}}}"#).as_bytes())
                .map(|c| c.breaker)
        };
        let ms = Duration::from_millis;
        let b = breaker("").unwrap();
        assert_eq!((b.cooldown, b.cooldown_max), (ms(250), ms(2000)));
        let b = breaker(r#","breaker_cooldown_ms":100,"breaker_cooldown_max_ms":8000"#).unwrap();
        assert_eq!((b.cooldown, b.cooldown_max), (ms(100), ms(8000)));
        // Equal: no backoff, every opening lasts the same.
        let b = breaker(r#","breaker_cooldown_ms":700,"breaker_cooldown_max_ms":700"#).unwrap();
        assert_eq!((b.cooldown, b.cooldown_max), (ms(700), ms(700)));
        // A first cool-down longer than the default maximum, written before backoff
        // existed: the breaker is never open for less than it says.
        let b = breaker(r#","breaker_cooldown_ms":60000"#).unwrap();
        assert_eq!((b.cooldown, b.cooldown_max), (ms(60000), ms(60000)));
        let b = breaker(r#","breaker_cooldown_max_ms":600000"#).unwrap();
        assert_eq!((b.cooldown, b.cooldown_max), (ms(250), ms(600_000)));

        // A maximum below the first is refused, with both values named.
        let msg = breaker(r#","breaker_cooldown_ms":1000,"breaker_cooldown_max_ms":999"#)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(
                "`breaker_cooldown_max_ms` (999) must be at least `breaker_cooldown_ms` (1000)"
            ),
            "{msg}"
        );
        let msg = breaker(r#","breaker_cooldown_max_ms":100"#)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("(100) must be at least `breaker_cooldown_ms` (250)"),
            "{msg}"
        );
        // Out of bounds or not a whole number: each reported once, on its own.
        for (json, needle) in [
            (
                r#","breaker_cooldown_max_ms":0"#,
                "`breaker_cooldown_max_ms` must be a whole number between 1 and 600000, got `0`",
            ),
            (
                r#","breaker_cooldown_max_ms":600001"#,
                "`breaker_cooldown_max_ms` must be a whole number between 1 and 600000",
            ),
            (
                r#","breaker_cooldown_max_ms":"2s""#,
                "`breaker_cooldown_max_ms` must be a whole number",
            ),
            (
                r#","breaker_cooldown_max_ms":1.5"#,
                "`breaker_cooldown_max_ms` must be a whole number",
            ),
            (
                r#","breaker_cooldown_ms":0,"breaker_cooldown_max_ms":10"#,
                "`breaker_cooldown_ms` must be a whole number between 1 and 600000, got `0`",
            ),
        ] {
            let msg = breaker(json).unwrap_err().to_string();
            assert!(msg.contains(needle), "{json}: {msg} lacks {needle}");
            assert_eq!(msg.matches("breaker_cooldown").count(), 1, "{json}: {msg}");
        }
    }

    #[test]
    fn full_config() {
        let c = FilterConfig::parse(
            br#"{"policy_cluster":"p","timeout_ms":50,"fail_mode":"open","status_on_error":500,"metadata_namespace":"x"}"#,
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(50));
        assert_eq!(c.fail_mode, FailMode::Open);
        assert_eq!(c.status_on_error, 500);
        assert_eq!(c.metadata_namespace, "x");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = FilterConfig::parse(
            br#"{"timeout_ms":-5,"fail_mode":"sometimes","status_on_error":200,"extra":1}"#,
        )
        .unwrap_err();
        let msg = err.to_string();
        for needle in [
            "unknown field `extra`",
            "missing required field `policy_cluster`",
            "`timeout_ms` must be between 1 and 60000, got `-5`",
            "`fail_mode` must be `closed` or `open`, got `sometimes`",
            "`status_on_error` must be an HTTP error status",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn wrong_types_and_non_objects_are_refused() {
        assert!(FilterConfig::parse(b"").is_err());
        assert!(FilterConfig::parse(b"[]").is_err());
        assert!(FilterConfig::parse(b"not json").is_err());
        let msg = FilterConfig::parse(br#"{"policy_cluster":5,"timeout_ms":"fast"}"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`policy_cluster` must be a string"), "{msg}");
        assert!(msg.contains("`timeout_ms` must be a whole number"), "{msg}");
        assert!(FilterConfig::parse(br#"{"policy_cluster":""}"#).is_err());
        assert!(FilterConfig::parse(br#"{"policy_cluster":"p","timeout_ms":1.5}"#).is_err());
    }
}
