//! The one seam between the filter's logic and Envoy: every host call the request path
//! makes goes through [`Host`]. `wasm.rs` implements it with proxy-wasm; tests use a
//! recording double.

use std::time::{Duration, SystemTime};

use crate::outcome::Reason;

/// Log levels the filter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something an operator must fix (bad config).
    Warn,
    /// A failure of the policy path.
    Error,
    /// Per-request detail, off by default.
    Debug,
}

/// Final outcome of one request, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The policy server allowed it.
    Allow,
    /// The policy server denied it.
    Deny,
    /// The policy server denied it on a `dry_run` route: let through upstream, marked
    /// `x-arbiter-dry-run: deny`.
    DryRunDeny,
    /// No decision; passed upstream marked `x-arbiter-fail-open`.
    FailOpen,
    /// No decision; refused with `status_on_error`.
    FailClosed,
    /// The route disables the check.
    Disabled,
    /// Allowed from the allow-cache, without a policy call.
    Cached,
    /// The request ended before a decision or fail mode was applied (the client reset or
    /// disconnected, or Envoy ended the stream): nothing went upstream.
    Cancelled,
}

impl Outcome {
    /// Every outcome, for metric definition.
    pub const ALL: [Outcome; 8] = [
        Outcome::Allow,
        Outcome::Deny,
        Outcome::DryRunDeny,
        Outcome::FailOpen,
        Outcome::FailClosed,
        Outcome::Disabled,
        Outcome::Cached,
        Outcome::Cancelled,
    ];

    /// Spelling in metrics and the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::DryRunDeny => "dry_run_deny",
            Outcome::FailOpen => "fail_open",
            Outcome::FailClosed => "fail_closed",
            Outcome::Disabled => "disabled",
            Outcome::Cached => "cached",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A filter metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `arbiter.checks.<outcome>`: one per request.
    Outcome(Outcome),
    /// `arbiter.checks.override`: fail-open only because of `fail_open_until`.
    Override,
    /// `arbiter.checks.invalid_route_config`: requests on a route with invalid settings.
    InvalidRouteConfig,
    /// `arbiter.no_decision.<reason>`: why no decision arrived.
    NoDecision(Reason),
    /// `arbiter.override_active_requests`: requests on a route whose `fail_open_until`
    /// override is in force (whether or not the server answers), for "override on" alerts.
    OverrideActive,
    /// `arbiter.breaker.opened`: a worker's closed breaker opened.
    BreakerOpened,
    /// `arbiter.breaker.reopened`: a probe got no decision and the breaker opened again (not
    /// counted in `opened`, so opened − closed is the number of open workers).
    BreakerReopened,
    /// `arbiter.breaker.closed`: a worker's breaker closed after a good probe.
    BreakerClosed,
    /// `arbiter.cache.misses`: cacheable requests that had to ask the server.
    CacheMiss,
    /// `arbiter.cache.stores`: allow decisions stored.
    CacheStore,
}

impl Metric {
    /// Envoy stat name (Envoy shows wasm metrics under `wasmcustom.`).
    pub fn name(self) -> String {
        match self {
            Metric::Outcome(o) => format!("arbiter.checks.{}", o.as_str()),
            Metric::Override => "arbiter.checks.override".to_owned(),
            Metric::InvalidRouteConfig => "arbiter.checks.invalid_route_config".to_owned(),
            Metric::NoDecision(r) => format!("arbiter.no_decision.{}", r.as_str()),
            Metric::OverrideActive => "arbiter.override_active_requests".to_owned(),
            Metric::BreakerOpened => "arbiter.breaker.opened".to_owned(),
            Metric::BreakerReopened => "arbiter.breaker.reopened".to_owned(),
            Metric::BreakerClosed => "arbiter.breaker.closed".to_owned(),
            Metric::CacheMiss => "arbiter.cache.misses".to_owned(),
            Metric::CacheStore => "arbiter.cache.stores".to_owned(),
        }
    }

    /// Every counter, for definition at VM start.
    pub fn all() -> Vec<Metric> {
        let mut v: Vec<Metric> = Outcome::ALL.iter().map(|o| Metric::Outcome(*o)).collect();
        v.push(Metric::Override);
        v.push(Metric::InvalidRouteConfig);
        v.extend(Reason::ALL.iter().map(|r| Metric::NoDecision(*r)));
        v.extend([
            Metric::OverrideActive,
            Metric::BreakerOpened,
            Metric::BreakerReopened,
            Metric::BreakerClosed,
            Metric::CacheMiss,
            Metric::CacheStore,
        ]);
        v
    }
}

/// Name of the policy-call latency histogram (microseconds).
pub const LATENCY_HISTOGRAM: &str = "arbiter.policy_call_latency_us";

/// Why a policy call could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchError(pub String);

/// Host calls of the request path.
pub trait Host {
    /// Request headers as sent (names lowercase; values may be any bytes).
    fn request_headers(&self) -> Vec<(String, Vec<u8>)>;
    /// Up to `max` bytes of the buffered request body.
    fn request_body(&self, max: usize) -> Option<Vec<u8>>;
    /// Reads a value shared by every worker VM.
    fn shared_get(&self, key: &str) -> Option<Vec<u8>>;
    /// Writes a value shared by every worker VM.
    fn shared_set(&self, key: &str, value: &[u8]);
    /// Removes a request header (all values).
    fn remove_request_header(&self, name: &str);
    /// Replaces a request header.
    fn set_request_header(&self, name: &str, value: &str);
    /// Appends a request header value.
    fn add_request_header(&self, name: &str, value: &str);
    /// Adds a response header.
    fn add_response_header(&self, name: &str, value: &str);
    /// Reads an Envoy attribute (`["xds","route_name"]`, ...).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Exposes a value to the access log as filter state `wasm.<key>`.
    fn set_log_field(&self, key: &str, value: &str);
    /// Starts the `Authorization/Check` call; the answer arrives via the filter's callback.
    fn dispatch_check(
        &self,
        cluster: &str,
        metadata: &[(&str, &[u8])],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, DispatchError>;
    /// Body of the answered call.
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Status message of the failed call.
    fn grpc_status_message(&self) -> Option<String>;
    /// Answers the client directly.
    fn send_local_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// Lets the paused request continue.
    fn resume_request(&self);
    /// Wall-clock time.
    fn now(&self) -> SystemTime;
    /// Writes to Envoy's log.
    fn log(&self, level: Level, message: &str);
    /// Increments a counter.
    fn increment(&self, metric: Metric);
    /// Records the policy-call latency.
    fn record_latency(&self, micros: u64);
}
