//! Per-route settings read from Envoy route metadata, and the fail-mode resolution that
//! turns them into what this request does when the policy server gives no decision.
//!
//! Invalid values never weaken enforcement: a route with any invalid field is handled as
//! `closed` with the plugin's default timeout and no override (see [`Resolved::invalid`]),
//! and the problems are reported so the filter can count and log them.

use std::time::{Duration, SystemTime};

use prost::Message;
use prost_types::value::Kind;
use serde_json::Value as Json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use arbiter_proto::envoy::config::core::v3::Metadata;

use crate::config::{self, FailMode, FilterConfig};

/// Longest time ahead a `fail_open_until` override may reach.
pub const MAX_OVERRIDE_AHEAD: Duration = Duration::from_secs(24 * 60 * 60);

/// Body bytes sent to policy when a route sets `include_body` without `max_body_bytes`.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024;
/// Largest `max_body_bytes` accepted (Envoy buffers the body in memory meanwhile).
pub const MAX_BODY_BYTES_LIMIT: u64 = 8 * 1024 * 1024;
/// Longest allow-cache lifetime accepted.
pub const MAX_CACHE_TTL_MS: u64 = 3_600_000;

/// Context key the filter fills with the route name; routes may not set it.
pub const ROUTE_CONTEXT_KEY: &str = "route";
/// Context key the filter sets to `"true"` on dry-run routes (the server records it in the
/// audit record's `route_context`); routes may not set it.
pub const DRY_RUN_CONTEXT_KEY: &str = "dry_run";

const KNOWN_FIELDS: &[&str] = &[
    "fail_mode",
    "timeout_ms",
    "fail_open_until",
    "status_on_error",
    "include_body",
    "max_body_bytes",
    "cache_ttl_ms",
    "disabled",
    "context",
    "dry_run",
];

/// The `arbiter` metadata of one route, parsed once per distinct metadata value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    /// `fail_mode`, when set and valid.
    pub fail_mode: Option<FailMode>,
    /// `timeout_ms`, when set and valid.
    pub timeout: Option<Duration>,
    /// `fail_open_until`, when set and a valid RFC 3339 timestamp.
    pub fail_open_until: Option<SystemTime>,
    /// `status_on_error`, when set and valid.
    pub status_on_error: Option<u32>,
    /// `disabled: true` skips the check (only honoured when the route is valid).
    pub disabled: bool,
    /// `include_body` (the body path is built in a later issue; parsed and validated now).
    pub include_body: bool,
    /// `max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// `cache_ttl_ms` (0 = off).
    pub cache_ttl_ms: u64,
    /// `context`, sent as `context_extensions`.
    pub context: Vec<(String, String)>,
    /// `dry_run: true`: policy is advisory, a deny is let through marked.
    pub dry_run: bool,
    /// Every problem found; non-empty means the route is invalid.
    pub problems: Vec<String>,
    /// Whether the `context` itself was invalid (the request cannot be described to policy).
    pub context_invalid: bool,
}

/// What the filter does with one request on this route, at a given time.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Skip the check entirely.
    pub disabled: bool,
    /// Fail mode to apply if no decision arrives.
    pub fail_mode: FailMode,
    /// `fail_mode` is `open` only because an override is active.
    pub override_active: bool,
    /// Bound on the policy call.
    pub timeout: Duration,
    /// Status of a fail-closed answer.
    pub status_on_error: u32,
    /// The route config is invalid: count it and answer with the secure defaults.
    pub invalid: bool,
    /// The route cannot be described to the policy server: refuse without calling it.
    pub refuse_without_check: bool,
    /// Send up to this many body bytes to policy (`include_body`).
    pub body_limit: Option<u64>,
    /// Cache allow decisions this long (never on invalid routes).
    pub cache_ttl: Option<Duration>,
    /// A policy deny is let through marked `x-arbiter-dry-run: deny` (never on invalid
    /// routes: an invalid route enforces).
    pub dry_run: bool,
}

impl RouteSettings {
    /// Parses the protobuf bytes of `envoy.config.core.v3.Metadata` (what
    /// `get_property(["xds","route_metadata"])` returns) and picks `namespace`.
    /// `None` (no metadata) yields the defaults.
    pub fn from_metadata_bytes(bytes: Option<&[u8]>, namespace: &str) -> Self {
        Self::from_route_metadata(bytes, namespace).unwrap_or_default()
    }

    /// Like [`RouteSettings::from_metadata_bytes`], but `None` when the route carries no
    /// `namespace` entry (no metadata, or only other filters' namespaces such as Istio's),
    /// so the route table can apply. Metadata that cannot be decoded counts as present
    /// and invalid: it is never mistaken for "not set".
    pub fn from_route_metadata(bytes: Option<&[u8]>, namespace: &str) -> Option<Self> {
        match Metadata::decode(bytes?) {
            Ok(md) => md.filter_metadata.get(namespace).map(Self::from_struct),
            Err(e) => Some(Self {
                problems: vec![format!("route metadata is not decodable: {e}")],
                ..Self::default()
            }),
        }
    }

    /// Parses the namespace's `Struct`.
    pub fn from_struct(s: &prost_types::Struct) -> Self {
        let map: serde_json::Map<String, Json> = s
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect();
        Self::from_json(&map)
    }

    /// Parses the settings from a JSON object (the `Struct` converted).
    pub fn from_json(map: &serde_json::Map<String, Json>) -> Self {
        let mut out = Self::default();
        let p = &mut out.problems;
        for key in map.keys() {
            if !KNOWN_FIELDS.contains(&key.as_str()) {
                p.push(format!("unknown field `{key}`"));
            }
        }
        if let Some(v) = map.get("fail_mode") {
            match v.as_str().and_then(FailMode::parse) {
                Some(m) => out.fail_mode = Some(m),
                None => p.push(format!("`fail_mode` must be `closed` or `open`, got `{v}`")),
            }
        }
        if let Some(v) = map.get("timeout_ms") {
            match config::timeout_ms(v) {
                Ok(ms) => out.timeout = Some(Duration::from_millis(ms)),
                Err(e) => p.push(e),
            }
        }
        if let Some(v) = map.get("status_on_error") {
            match config::status_on_error(v) {
                Ok(s) => out.status_on_error = Some(s),
                Err(e) => p.push(e),
            }
        }
        if let Some(v) = map.get("fail_open_until") {
            match v.as_str().map(|s| OffsetDateTime::parse(s, &Rfc3339)) {
                Some(Ok(t)) => match system_time(t) {
                    Some(t) => out.fail_open_until = Some(t),
                    None => p.push(format!("`fail_open_until` is out of range, got `{v}`")),
                },
                _ => p.push(format!(
                    "`fail_open_until` must be an RFC 3339 timestamp like `2026-11-22T06:00:00Z`, got `{v}`"
                )),
            }
        }
        for (field, slot) in [
            ("disabled", &mut out.disabled),
            ("include_body", &mut out.include_body),
            ("dry_run", &mut out.dry_run),
        ] {
            if let Some(v) = map.get(field) {
                match v.as_bool() {
                    Some(b) => *slot = b,
                    None => p.push(format!("`{field}` must be true or false, got `{v}`")),
                }
            }
        }
        if let Some(v) = map.get("max_body_bytes") {
            match config::whole_number(v) {
                Some(n) if n > 0 && n as u64 <= MAX_BODY_BYTES_LIMIT => {
                    out.max_body_bytes = Some(n as u64)
                }
                _ => p.push(format!(
                    "`max_body_bytes` must be a whole number between 1 and {MAX_BODY_BYTES_LIMIT}, got `{v}`"
                )),
            }
        }
        if let Some(v) = map.get("cache_ttl_ms") {
            match config::whole_number(v) {
                Some(n) if n >= 0 && n as u64 <= MAX_CACHE_TTL_MS => out.cache_ttl_ms = n as u64,
                _ => p.push(format!(
                    "`cache_ttl_ms` must be a whole number between 0 and {MAX_CACHE_TTL_MS}, got `{v}`"
                )),
            }
        }
        if let Some(v) = map.get("context") {
            match context_entries(v) {
                Ok(entries) => out.context = entries,
                Err(e) => {
                    p.push(e);
                    out.context_invalid = true;
                }
            }
        }
        out
    }

    /// Resolves the effective behaviour at `now` against the plugin defaults.
    pub fn resolve(&self, defaults: &FilterConfig, now: SystemTime) -> Resolved {
        let secure = Resolved {
            disabled: false,
            fail_mode: FailMode::Closed,
            override_active: false,
            timeout: defaults.timeout,
            status_on_error: defaults.status_on_error,
            invalid: true,
            refuse_without_check: self.context_invalid,
            // The body is sent even on an invalid route: policy may depend on it, and leaving
            // it out could turn a deny into an allow. Caching is an optimisation: off.
            body_limit: self
                .include_body
                .then(|| self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES)),
            cache_ttl: None,
            dry_run: false,
        };
        if !self.problems.is_empty() {
            return secure;
        }
        let mut fail_mode = self.fail_mode.unwrap_or(defaults.fail_mode);
        let mut override_active = false;
        if let Some(until) = self.fail_open_until {
            match until.duration_since(now) {
                // An override reaching more than a day ahead is a mistake left behind, not an
                // incident measure: treat the whole route as invalid (closed).
                Ok(ahead) if ahead > MAX_OVERRIDE_AHEAD => return secure,
                Ok(ahead) if !ahead.is_zero() => {
                    override_active = fail_mode == FailMode::Closed;
                    fail_mode = FailMode::Open;
                }
                // Expired: the route is back to its configured mode with no config change.
                _ => {}
            }
        }
        Resolved {
            disabled: self.disabled,
            fail_mode,
            override_active,
            timeout: self.timeout.unwrap_or(defaults.timeout),
            status_on_error: self.status_on_error.unwrap_or(defaults.status_on_error),
            invalid: false,
            refuse_without_check: false,
            body_limit: self
                .include_body
                .then(|| self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES)),
            cache_ttl: (self.cache_ttl_ms > 0).then(|| Duration::from_millis(self.cache_ttl_ms)),
            dry_run: self.dry_run,
        }
    }

    /// Judges the override against the time the settings are loaded (`now`, when the filter
    /// first sees them): a `fail_open_until` more than 24 h ahead makes the route invalid
    /// for as long as these settings stay loaded. It never turns into a live override by
    /// the passage of time; only a config change (or Envoy re-loading it) judges it again.
    pub fn judge_at_load(mut self, now: SystemTime) -> Self {
        if let Some(until) = self.fail_open_until {
            if let Ok(ahead) = until.duration_since(now) {
                if ahead > MAX_OVERRIDE_AHEAD {
                    self.problems.push(format!(
                        "`fail_open_until` is {} h ahead when loaded; an override may reach at most 24 h ahead of the moment it is loaded, so this one is refused until the setting changes",
                        ahead.as_secs() / 3600
                    ));
                }
            }
        }
        self
    }
}

/// An RFC 3339 instant as `SystemTime`, without the panics of `SystemTime::from` (which
/// aborts the VM on wasm32-wasip1 for instants before 1970, where `SystemTime` cannot go
/// below the epoch). Every such instant is long past: the epoch stands for all of them.
/// `None` when the instant is beyond what this platform's clock can hold (wasm32-wasip1
/// ends in 2554).
fn system_time(t: OffsetDateTime) -> Option<SystemTime> {
    let Ok(seconds) = u64::try_from(t.unix_timestamp()) else {
        return Some(SystemTime::UNIX_EPOCH);
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, t.nanosecond()))
}

/// `context` must be a flat map of scalars; values become strings.
fn context_entries(v: &Json) -> Result<Vec<(String, String)>, String> {
    let Json::Object(map) = v else {
        return Err(format!("`context` must be a map of strings, got `{v}`"));
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        if k == ROUTE_CONTEXT_KEY {
            return Err(format!(
                "`context.{ROUTE_CONTEXT_KEY}` is reserved: the filter sets it to the route name"
            ));
        }
        if k == DRY_RUN_CONTEXT_KEY {
            return Err(format!(
                "`context.{DRY_RUN_CONTEXT_KEY}` is reserved: set the route setting `dry_run` instead"
            ));
        }
        let s = match v {
            Json::String(s) => s.clone(),
            Json::Bool(b) => b.to_string(),
            Json::Number(_) => match config::whole_number(v) {
                Some(n) => n.to_string(),
                None => v.to_string(),
            },
            _ => return Err(format!("`context.{k}` must be a string, got `{v}`")),
        };
        out.push((k.clone(), s));
    }
    Ok(out)
}

/// A protobuf `Struct` as JSON (numbers stay JSON numbers).
pub fn struct_to_json(s: &prost_types::Struct) -> Json {
    Json::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect(),
    )
}

fn to_json(v: &prost_types::Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number)
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StructValue(s)) => Json::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(to_json).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> FilterConfig {
        FilterConfig::parse(br#"{"policy_cluster":"p","timeout_ms":100}"#).unwrap()
    }

    fn settings(v: Json) -> RouteSettings {
        RouteSettings::from_json(v.as_object().unwrap())
    }

    fn at(s: &str) -> SystemTime {
        OffsetDateTime::parse(s, &Rfc3339).unwrap().into()
    }

    const NOW: &str = "2026-11-22T02:00:00Z";

    #[test]
    fn no_metadata_means_plugin_defaults_and_closed() {
        let r = RouteSettings::from_metadata_bytes(None, "arbiter").resolve(&defaults(), at(NOW));
        assert_eq!(r.fail_mode, FailMode::Closed);
        assert_eq!(r.timeout, Duration::from_millis(100));
        assert!(!r.invalid && !r.disabled && !r.override_active);
    }

    #[test]
    fn metadata_bytes_round_trip() {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "fail_mode".to_owned(),
            prost_types::Value {
                kind: Some(Kind::StringValue("open".into())),
            },
        );
        fields.insert(
            "timeout_ms".to_owned(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(50.0)),
            },
        );
        let mut md = Metadata::default();
        md.filter_metadata
            .insert("arbiter".into(), prost_types::Struct { fields });
        let bytes = md.encode_to_vec();
        let s = RouteSettings::from_metadata_bytes(Some(&bytes), "arbiter");
        assert_eq!(s.fail_mode, Some(FailMode::Open));
        assert_eq!(s.timeout, Some(Duration::from_millis(50)));
        assert!(s.problems.is_empty());
        // Another namespace is ignored.
        assert_eq!(
            RouteSettings::from_metadata_bytes(Some(&bytes), "other"),
            RouteSettings::default()
        );
        // Garbage is a problem, not a panic.
        let bad = RouteSettings::from_metadata_bytes(Some(&[0xff, 0xff, 0xff]), "arbiter");
        assert!(!bad.problems.is_empty());
        assert_eq!(
            bad.resolve(&defaults(), at(NOW)).fail_mode,
            FailMode::Closed
        );
    }

    #[test]
    fn open_route() {
        let r = settings(json!({"fail_mode":"open","timeout_ms":50,"status_on_error":500}))
            .resolve(&defaults(), at(NOW));
        assert_eq!(r.fail_mode, FailMode::Open);
        assert_eq!(r.timeout, Duration::from_millis(50));
        assert_eq!(r.status_on_error, 500);
        assert!(!r.override_active && !r.invalid);
    }

    #[test]
    fn invalid_values_fall_back_to_closed_and_default_timeout() {
        for v in [
            json!({"fail_mode":"sometimes"}),
            json!({"fail_mode":"open","timeout_ms":-5}),
            json!({"fail_mode":1,"timeout_ms":"fast","disabled":"no"}),
            json!({"fail_mode":"open","timeout_ms":0}),
            json!({"fail_mode":"open","timeout_ms":50.5}),
            json!({"fail_mode":"open","fail_mdoe":"open"}),
            json!({"fail_mode":"open","status_on_error":200}),
            json!({"fail_mode":"open","fail_open_until":"tomorrow"}),
            json!({"fail_mode":"open","max_body_bytes":-1}),
            json!({"fail_mode":"open","cache_ttl_ms":"1s"}),
            json!({"disabled":true,"include_body":"yes"}),
        ] {
            let s = settings(v.clone());
            assert!(!s.problems.is_empty(), "{v}");
            let r = s.resolve(&defaults(), at(NOW));
            assert_eq!(r.fail_mode, FailMode::Closed, "{v}");
            assert_eq!(r.timeout, Duration::from_millis(100), "{v}");
            assert!(r.invalid && !r.disabled && !r.refuse_without_check, "{v}");
        }
    }

    #[test]
    fn open_plugin_default_does_not_leak_into_invalid_routes() {
        let d = FilterConfig::parse(br#"{"policy_cluster":"p","fail_mode":"open"}"#).unwrap();
        let r = settings(json!({"timeout_ms":-5})).resolve(&d, at(NOW));
        assert_eq!(r.fail_mode, FailMode::Closed);
        let r = settings(json!({})).resolve(&d, at(NOW));
        assert_eq!(r.fail_mode, FailMode::Open);
    }

    #[test]
    fn context_becomes_strings_and_invalid_context_refuses() {
        let s = settings(json!({"context":{"classification":"regulated","tier":2,"pii":true}}));
        assert!(s.problems.is_empty());
        let mut ctx = s.context.clone();
        ctx.sort();
        assert_eq!(
            ctx,
            vec![
                ("classification".to_owned(), "regulated".to_owned()),
                ("pii".to_owned(), "true".to_owned()),
                ("tier".to_owned(), "2".to_owned()),
            ]
        );
        for v in [
            json!({"context":"regulated"}),
            json!({"context":{"a":{"b":"c"}}}),
            json!({"context":{"route":"x"}}),
        ] {
            let r = settings(v.clone()).resolve(&defaults(), at(NOW));
            assert!(r.invalid && r.refuse_without_check, "{v}");
        }
    }

    #[test]
    fn override_active_expired_and_too_far() {
        let d = defaults();
        let active =
            settings(json!({"fail_mode":"closed","fail_open_until":"2026-11-22T06:00:00Z"}));
        let r = active.resolve(&d, at(NOW));
        assert_eq!(r.fail_mode, FailMode::Open);
        assert!(r.override_active && !r.invalid);

        let r = active.resolve(&d, at("2026-11-22T06:00:00Z"));
        assert_eq!(
            r.fail_mode,
            FailMode::Closed,
            "expires exactly at the instant"
        );
        assert!(!r.override_active);

        let offset = settings(json!({"fail_open_until":"2026-11-22T07:00:00+02:00"}));
        assert!(
            offset.resolve(&d, at(NOW)).override_active,
            "05:00Z is ahead of 02:00Z"
        );

        let far =
            settings(json!({"fail_open_until":"2026-11-23T02:00:01Z"})).judge_at_load(at(NOW));
        assert!(far.problems[0].contains("24 h"), "{:?}", far.problems);
        let r = far.resolve(&d, at(NOW));
        assert!(r.invalid);
        assert_eq!(r.fail_mode, FailMode::Closed);

        let edge =
            settings(json!({"fail_open_until":"2026-11-23T02:00:00Z"})).judge_at_load(at(NOW));
        assert!(edge.problems.is_empty());
        assert!(
            edge.resolve(&d, at(NOW)).override_active,
            "exactly 24 h is allowed"
        );
    }

    #[test]
    fn an_override_too_far_ahead_when_loaded_never_becomes_live() {
        let d = defaults();
        let loaded =
            settings(json!({"fail_open_until":"2026-11-24T02:00:00Z"})).judge_at_load(at(NOW));
        // A day later the date is within 24 h, but these settings were refused when loaded.
        for later in ["2026-11-23T02:00:00Z", "2026-11-24T01:59:59Z"] {
            let r = loaded.resolve(&d, at(later));
            assert!(r.invalid && !r.override_active, "{later}");
            assert_eq!(r.fail_mode, FailMode::Closed, "{later}");
        }
    }

    #[test]
    fn ancient_pre_1970_far_future_and_unparseable_overrides() {
        let d = defaults();
        for past in [
            "1900-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
        ] {
            let s = settings(json!({"fail_open_until": past})).judge_at_load(at(NOW));
            assert!(s.problems.is_empty(), "{past}: {:?}", s.problems);
            let r = s.resolve(&d, at(NOW));
            assert!(!r.invalid && !r.override_active, "{past}: expired");
            assert_eq!(r.fail_mode, FailMode::Closed, "{past}");
        }
        for far in ["9999-12-31T23:59:59Z", "2100-01-01T00:00:00Z"] {
            let s = settings(json!({"fail_open_until": far})).judge_at_load(at(NOW));
            let r = s.resolve(&d, at(NOW));
            assert!(r.invalid && !r.override_active, "{far}");
            assert_eq!(r.fail_mode, FailMode::Closed, "{far}");
        }
        for bad in [
            "10000-01-01T00:00:00Z",
            "+10000-01-01T00:00:00Z",
            "-0001-01-01T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-22T06:00:00",
            "2026-11-22T24:00:00Z",
        ] {
            let s = settings(json!({"fail_open_until": bad}));
            assert!(!s.problems.is_empty(), "{bad} must be refused");
            assert!(s.resolve(&d, at(NOW)).invalid, "{bad}");
        }
    }

    #[test]
    fn override_on_open_route_is_not_counted_as_override() {
        let s = settings(json!({"fail_mode":"open","fail_open_until":"2026-11-22T06:00:00Z"}));
        let r = s.resolve(&defaults(), at(NOW));
        assert_eq!(r.fail_mode, FailMode::Open);
        assert!(!r.override_active);
    }

    #[test]
    fn body_and_cache_settings() {
        let r =
            settings(json!({"include_body":true,"cache_ttl_ms":500})).resolve(&defaults(), at(NOW));
        assert_eq!(r.body_limit, Some(DEFAULT_MAX_BODY_BYTES));
        assert_eq!(r.cache_ttl, Some(Duration::from_millis(500)));
        let r = settings(json!({"include_body":true,"max_body_bytes":10}))
            .resolve(&defaults(), at(NOW));
        assert_eq!(r.body_limit, Some(10));
        assert_eq!(r.cache_ttl, None);
        let r = settings(json!({"include_body":true,"cache_ttl_ms":500,"fail_mode":"x"}))
            .resolve(&defaults(), at(NOW));
        assert_eq!(
            r.body_limit,
            Some(DEFAULT_MAX_BODY_BYTES),
            "invalid routes still send the body"
        );
        assert_eq!(r.cache_ttl, None, "invalid routes never cache");
        assert!(!settings(json!({"max_body_bytes":9_000_000}))
            .problems
            .is_empty());
        assert!(!settings(json!({"cache_ttl_ms":3_600_001}))
            .problems
            .is_empty());
    }

    #[test]
    fn disabled_route() {
        let r = settings(json!({"disabled":true})).resolve(&defaults(), at(NOW));
        assert!(r.disabled);
    }
}
