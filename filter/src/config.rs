//! Plugin configuration: the JSON string in the Envoy wasm filter's `configuration`.
//!
//! Every field is checked and every problem is reported at once, so an operator fixes a
//! config in one round trip. An invalid configuration is never replaced by defaults: the
//! caller makes `on_configure` return false and Envoy refuses the listener.

use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;

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

/// VM-wide defaults, compiled from the plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    /// Envoy cluster (HTTP/2) that serves `envoy.service.auth.v3.Authorization`.
    pub policy_cluster: String,
    /// Default bound on the policy call.
    pub timeout: Duration,
    /// Default fail mode for routes that do not set one.
    pub fail_mode: FailMode,
    /// Default status of a fail-closed answer.
    pub status_on_error: u32,
    /// Route metadata namespace holding the per-route settings.
    pub metadata_namespace: String,
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
    "timeout_ms",
    "fail_mode",
    "status_on_error",
    "metadata_namespace",
];

impl FilterConfig {
    /// Parses and validates the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::NotAnObject(format!("{e}")))?;
        let Value::Object(map) = value else {
            return Err(ConfigError::NotAnObject(format!(
                "expected an object like {{\"policy_cluster\": \"arbiter_policy\"}}, got `{value}`"
            )));
        };
        Self::from_map(&map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self, ConfigError> {
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

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Self {
            policy_cluster,
            timeout: Duration::from_millis(timeout_ms),
            fail_mode,
            status_on_error,
            metadata_namespace,
        })
    }
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
