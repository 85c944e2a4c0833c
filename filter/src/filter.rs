//! The per-request state machine, written against [`Host`] so it runs natively in tests.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::SystemTime;

use crate::check::{encode_check_request, is_reserved_header, RequestInfo};
use crate::config::FilterConfig;
use crate::host::{Host, Level, Metric, Outcome};
use crate::outcome::{self, FailAction, HeaderOp, Reason, Verdict};
use crate::route::{Resolved, RouteSettings};

/// Header that tells the upstream a request passed without a decision.
pub const FAIL_OPEN_HEADER: &str = "x-arbiter-fail-open";

/// Distinct route metadata values remembered per VM (routes are few; this bounds memory
/// if something generates metadata per request).
const ROUTE_CACHE_LIMIT: usize = 512;

/// A route's parsed settings and whether its problems were already logged.
#[derive(Debug)]
struct CachedRoute {
    settings: RouteSettings,
    time_problem_logged: Cell<bool>,
}

/// State shared by every request of one VM (one per Envoy worker).
#[derive(Debug)]
pub struct Shared {
    /// Plugin configuration.
    pub config: FilterConfig,
    routes: RefCell<HashMap<Vec<u8>, Rc<CachedRoute>>>,
    policy_version: RefCell<Option<String>>,
}

impl Shared {
    /// Wraps a validated configuration.
    pub fn new(config: FilterConfig) -> Self {
        Self {
            config,
            routes: RefCell::new(HashMap::new()),
            policy_version: RefCell::new(None),
        }
    }

    /// Last policy version the server reported to this VM.
    pub fn policy_version(&self) -> Option<String> {
        self.policy_version.borrow().clone()
    }

    /// Parses (or recalls) the settings for `metadata`, logging problems once.
    fn route(
        &self,
        host: &dyn Host,
        route_name: &str,
        metadata: Option<Vec<u8>>,
    ) -> Rc<CachedRoute> {
        let key = metadata.unwrap_or_default();
        if let Some(hit) = self.routes.borrow().get(&key) {
            return Rc::clone(hit);
        }
        let settings = RouteSettings::from_metadata_bytes(
            (!key.is_empty()).then_some(key.as_slice()),
            &self.config.metadata_namespace,
        );
        if !settings.problems.is_empty() {
            host.log(
                Level::Warn,
                &format!(
                    "route `{route_name}`: invalid {} settings, handling the route as `closed` with the default timeout: {}",
                    self.config.metadata_namespace,
                    settings.problems.join("; ")
                ),
            );
        }
        let cached = Rc::new(CachedRoute {
            settings,
            time_problem_logged: Cell::new(false),
        });
        let mut routes = self.routes.borrow_mut();
        if routes.len() >= ROUTE_CACHE_LIMIT {
            routes.clear();
        }
        routes.insert(key, Rc::clone(&cached));
        cached
    }
}

/// What the host glue should do after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Let the request continue now.
    Continue,
    /// Hold it (waiting for the policy server, or answered locally).
    Pause,
}

#[derive(Debug)]
enum State {
    Idle,
    Waiting {
        token: u32,
        started: SystemTime,
        route: Resolved,
        route_name: String,
        request_id: String,
    },
    Done,
}

/// One request's filter.
#[derive(Debug)]
pub struct Filter<H: Host> {
    host: H,
    shared: Rc<Shared>,
    state: State,
    response_headers: Vec<HeaderOp>,
}

impl<H: Host> Filter<H> {
    /// A filter for one request.
    pub fn new(host: H, shared: Rc<Shared>) -> Self {
        Self {
            host,
            shared,
            state: State::Idle,
            response_headers: Vec::new(),
        }
    }

    /// The host, for tests.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// Request headers arrived: strip forged markers, resolve the route, ask for a decision.
    pub fn on_request_headers(&mut self) -> Flow {
        if !matches!(self.state, State::Idle) {
            return Flow::Continue;
        }
        // Remove forged markers before anything else reads the headers.
        let mut headers = Vec::new();
        for (name, value) in self.host.request_headers() {
            if is_reserved_header(&name) {
                self.host.remove_request_header(&name);
            } else {
                headers.push((name, String::from_utf8_lossy(&value).into_owned()));
            }
        }

        let route_name = self
            .string_property(&["xds", "route_name"])
            .unwrap_or_default();
        let metadata = self.host.property(&["xds", "route_metadata"]);
        let cached = self.shared.route(&self.host, &route_name, metadata);
        let now = self.host.now();
        let route = cached.settings.resolve(&self.shared.config, now);
        if let Some(problem) = cached.settings.time_problem(now) {
            if !cached.time_problem_logged.replace(true) {
                self.host.log(
                    Level::Warn,
                    &format!("route `{route_name}`: {problem}; handling the route as `closed`"),
                );
            }
        }
        if route.invalid {
            self.host.increment(Metric::InvalidRouteConfig);
        }

        let info = RequestInfo {
            headers,
            route_name,
            source_address: self.string_property(&["source", "address"]),
            destination_address: self.string_property(&["destination", "address"]),
            peer_principal: self
                .string_property(&["connection", "uri_san_peer_certificate"])
                .filter(|p| !p.is_empty()),
            protocol: self.string_property(&["request", "protocol"]),
        };
        let request_id = info.header("x-request-id").unwrap_or_default().to_owned();

        if route.disabled {
            self.finish(Outcome::Disabled, None);
            return Flow::Continue;
        }
        if route.refuse_without_check {
            return self.no_decision(
                Reason::InvalidRouteConfig,
                &route,
                &info.route_name,
                &request_id,
            );
        }

        let message = encode_check_request(&info, &cached.settings.context, now);
        let metadata: [(&str, &[u8]); 1] = [("x-request-id", request_id.as_bytes())];
        match self.host.dispatch_check(
            &self.shared.config.policy_cluster,
            if request_id.is_empty() {
                &[]
            } else {
                &metadata
            },
            &message,
            route.timeout,
        ) {
            Ok(token) => {
                self.state = State::Waiting {
                    token,
                    started: now,
                    route,
                    route_name: info.route_name,
                    request_id,
                };
                Flow::Pause
            }
            Err(e) => {
                // The call could not even start (e.g. the cluster is not defined): nobody
                // can answer, which is what `unreachable` means to the route's fail mode.
                self.host.log(
                    Level::Error,
                    &format!(
                        "route `{}`: cannot call policy cluster `{}`: {}",
                        info.route_name, self.shared.config.policy_cluster, e.0
                    ),
                );
                self.no_decision(Reason::Unreachable, &route, &info.route_name, &request_id)
            }
        }
    }

    /// The policy call finished. `status_code` is the gRPC status Envoy passed to the
    /// callback (trusted over `get_grpc_status`, which can be stale).
    pub fn on_check_response(&mut self, token_id: u32, status_code: u32, size: usize) -> Flow {
        let State::Waiting { token, started, .. } = &self.state else {
            return Flow::Continue;
        };
        if *token != token_id {
            return Flow::Continue;
        }
        let started = *started;
        let State::Waiting {
            route,
            route_name,
            request_id,
            ..
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Flow::Continue;
        };
        let elapsed = self.host.now().duration_since(started).unwrap_or_default();
        self.host
            .record_latency(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));

        let verdict = if status_code != 0 {
            let message = self.host.grpc_status_message();
            let reason =
                outcome::classify_failure(status_code, message.as_deref(), elapsed, route.timeout);
            self.host.log(
                Level::Debug,
                &format!(
                    "route `{route_name}`: policy call failed with gRPC status {status_code} ({}) after {} ms: {}",
                    message.as_deref().unwrap_or(""),
                    elapsed.as_millis(),
                    reason.as_str()
                ),
            );
            Verdict::NoDecision(reason)
        } else {
            match self.host.grpc_response_body(size) {
                Some(body) => outcome::decode_response(&body),
                None => Verdict::NoDecision(Reason::BadResponse),
            }
        };

        let flow = match verdict {
            Verdict::Allow {
                headers,
                remove,
                response_headers,
                policy_version,
            } => {
                for name in &remove {
                    self.host.remove_request_header(name);
                }
                for op in &headers {
                    if op.append {
                        self.host.add_request_header(&op.name, &op.value);
                    } else {
                        self.host.set_request_header(&op.name, &op.value);
                    }
                }
                self.response_headers = response_headers;
                self.remember_version(policy_version);
                self.finish(Outcome::Allow, None);
                Flow::Continue
            }
            Verdict::Deny {
                status,
                headers,
                body,
                policy_version,
            } => {
                self.remember_version(policy_version);
                self.finish(Outcome::Deny, None);
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.host.send_local_response(status, &headers, &body);
                Flow::Pause
            }
            Verdict::NoDecision(reason) => {
                self.no_decision(reason, &route, &route_name, &request_id)
            }
        };
        if flow == Flow::Continue {
            self.host.resume_request();
        }
        flow
    }

    /// Response headers: add what the policy server asked for.
    pub fn on_response_headers(&mut self) {
        for op in std::mem::take(&mut self.response_headers) {
            self.host.add_response_header(&op.name, &op.value);
        }
    }

    fn no_decision(
        &mut self,
        reason: Reason,
        route: &Resolved,
        route_name: &str,
        request_id: &str,
    ) -> Flow {
        self.state = State::Done;
        self.host.increment(Metric::NoDecision(reason));
        match outcome::fail_action(reason, route, route_name, request_id) {
            FailAction::Open {
                marker,
                override_active,
            } => {
                if override_active {
                    self.host.increment(Metric::Override);
                }
                self.host.set_request_header(FAIL_OPEN_HEADER, marker);
                self.finish(Outcome::FailOpen, Some((reason, override_active)));
                Flow::Continue
            }
            FailAction::Closed {
                status,
                headers,
                body,
            } => {
                self.finish(Outcome::FailClosed, Some((reason, false)));
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                self.host.send_local_response(status, &headers, &body);
                Flow::Pause
            }
        }
    }

    /// Counts the outcome and exposes it to the access log.
    fn finish(&mut self, outcome: Outcome, reason: Option<(Reason, bool)>) {
        self.state = State::Done;
        self.host.increment(Metric::Outcome(outcome));
        self.host.set_log_field("arbiter_outcome", outcome.as_str());
        if let Some((reason, override_active)) = reason {
            self.host.set_log_field("arbiter_reason", reason.as_str());
            if override_active {
                self.host.set_log_field("arbiter_override", "true");
            }
            if let Some(v) = self.shared.policy_version() {
                self.host.set_log_field("arbiter_policy_version", &v);
            }
        }
    }

    fn remember_version(&self, version: Option<String>) {
        if let Some(v) = version {
            let mut current = self.shared.policy_version.borrow_mut();
            if current.as_deref() != Some(v.as_str()) {
                *current = Some(v);
            }
        }
    }

    fn string_property(&self, path: &[&str]) -> Option<String> {
        self.host
            .property(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}
