//! The per-request state machine, written against [`Host`] so it runs natively in tests.
//!
//! headers ─▶ (body, when the route sends it) ─▶ cache? ─▶ breaker? ─▶ Check ─▶ outcome

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use prost::Message;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::breaker::{Admit, Breaker, Transition};
use crate::cache::{self, CacheKey, Entry};
use crate::check::{
    content_length, encode_check, is_reserved_header, metadata_request_id, CheckExtras, RequestInfo,
};
use crate::config::FilterConfig;
use crate::host::{Host, Level, Metric, Outcome};
use crate::outcome::{self, FailAction, HeaderOp, Reason, Verdict};
use crate::route::{Resolved, RouteSettings};
use crate::table::RequestKey;

pub use crate::check::PARTIAL_BODY_HEADER;

/// Header that tells the upstream a request passed without a decision.
pub const FAIL_OPEN_HEADER: &str = "x-arbiter-fail-open";

/// Header that tells the upstream policy denied this request on a dry-run route.
pub const DRY_RUN_HEADER: &str = "x-arbiter-dry-run";

/// Header the policy server sets on an allowed request: the audit id of its decision (the
/// filter sets it from the deny body on a dry-run deny).
const AUDIT_ID_HEADER: &str = "x-arbiter-audit-id";

/// How much longer than its route's timeout a breaker probe may hold its slot: the call's
/// own timeout answers it, this only covers an answer that never arrives.
const PROBE_GRACE: Duration = Duration::from_secs(1);

/// Distinct route metadata values remembered per VM (routes are few; this bounds memory
/// if something generates metadata per request).
pub(crate) const ROUTE_CACHE_LIMIT: usize = 512;

/// A route's settings, parsed and judged when this VM first saw them (route metadata) or
/// when the plugin configuration was loaded (route table, plugin defaults).
#[derive(Debug)]
struct CachedRoute {
    settings: RouteSettings,
}

/// State shared by every request of one VM (one per Envoy worker).
#[derive(Debug)]
pub struct Shared {
    /// Plugin configuration.
    pub config: FilterConfig,
    /// Parsed route metadata by its bytes; `None` when it holds no settings namespace.
    routes: RefCell<HashMap<Vec<u8>, Option<Rc<CachedRoute>>>>,
    /// The route table's settings, by entry index.
    table: Vec<Rc<CachedRoute>>,
    /// The plugin defaults, for routes neither metadata nor the table configure.
    defaults: Rc<CachedRoute>,
    policy_version: RefCell<Option<String>>,
    breaker: RefCell<Breaker>,
}

impl Shared {
    /// Wraps a validated configuration.
    pub fn new(config: FilterConfig) -> Self {
        let breaker = RefCell::new(Breaker::new(config.breaker));
        let table = config
            .routes
            .entries
            .iter()
            .map(|e| {
                Rc::new(CachedRoute {
                    settings: e.settings.clone(),
                })
            })
            .collect();
        Self {
            config,
            routes: RefCell::new(HashMap::new()),
            table,
            defaults: Rc::new(CachedRoute {
                settings: RouteSettings::default(),
            }),
            policy_version: RefCell::new(None),
            breaker,
        }
    }

    /// Distinct route metadata values this VM holds parsed (bounded by
    /// `ROUTE_CACHE_LIMIT`).
    #[cfg(test)]
    pub(crate) fn cached_routes(&self) -> usize {
        self.routes.borrow().len()
    }

    /// Last policy version the server reported to this VM.
    pub fn policy_version(&self) -> Option<String> {
        self.policy_version.borrow().clone()
    }

    /// The settings for this request and the route name policy sees. Route metadata, where
    /// it holds the settings namespace, wins as a whole (even when invalid: it is then
    /// handled as `closed`, never replaced by a table entry that might be weaker); then the
    /// first matching table entry, whose name is the route policy sees; then the plugin
    /// defaults.
    fn route(
        &self,
        host: &dyn Host,
        request: &RequestKey<'_>,
        metadata: Option<Vec<u8>>,
        now: SystemTime,
    ) -> (Rc<CachedRoute>, String) {
        if let Some(cached) = self.metadata_route(host, request.route_name, metadata, now) {
            return (cached, request.route_name.to_owned());
        }
        if let Some((i, entry)) = self.config.routes.find(request) {
            if let Some(cached) = self.table.get(i) {
                return (Rc::clone(cached), entry.name.clone());
            }
        }
        (Rc::clone(&self.defaults), request.route_name.to_owned())
    }

    /// Parses (or recalls) the settings in `metadata`, logging problems once. Settings are
    /// judged at `now` the first time (an override too far ahead stays refused).
    fn metadata_route(
        &self,
        host: &dyn Host,
        route_name: &str,
        metadata: Option<Vec<u8>>,
        now: SystemTime,
    ) -> Option<Rc<CachedRoute>> {
        let key = metadata.unwrap_or_default();
        if let Some(hit) = self.routes.borrow().get(&key) {
            return hit.clone();
        }
        let cached = RouteSettings::from_route_metadata(
            (!key.is_empty()).then_some(key.as_slice()),
            &self.config.metadata_namespace,
        )
        .map(|settings| {
            let settings = settings.judge_at_load(now);
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
            Rc::new(CachedRoute { settings })
        });
        let mut routes = self.routes.borrow_mut();
        if routes.len() >= ROUTE_CACHE_LIMIT {
            routes.clear();
        }
        routes.insert(key, cached.clone());
        cached
    }
}

/// What the host glue should do after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Let the request continue now.
    Continue,
    /// Hold it (waiting for the body or the policy server, or answered locally).
    Pause,
}

/// Everything known about a request between its headers and its outcome.
#[derive(Debug)]
struct Pending {
    info: RequestInfo,
    route: Resolved,
    settings: Rc<CachedRoute>,
    request_id: String,
    /// Forwarded dynamic metadata (`metadata_context`), encoded.
    metadata: Option<prost_types::Struct>,
    /// Body bytes sent to policy, when the route includes the body.
    body: Option<Vec<u8>>,
    /// The body was cut (at `max_body_bytes`, or to fit the CheckRequest size limit).
    body_partial: bool,
    /// Body bytes Envoy has buffered for this request so far (body routes).
    received: usize,
}

#[derive(Debug)]
enum State {
    Idle,
    AwaitingBody(Box<Pending>),
    Waiting {
        token: u32,
        started: SystemTime,
        cache_key: Option<CacheKey>,
        /// This call is a breaker probe: its slot is released if the request ends first.
        probe: bool,
        pending: Box<Pending>,
    },
    /// Decided to let it through while Envoy still holds body bytes this filter paused and
    /// more body is on its way: released by the next body or trailers callback, not by
    /// `resume_request` (see [`Filter::on_check_response`]).
    Release,
    Done,
}

/// One request's filter.
#[derive(Debug)]
pub struct Filter<H: Host> {
    host: H,
    shared: Rc<Shared>,
    state: State,
    response_headers: Vec<HeaderOp>,
    /// A body callback paused (Envoy buffered body bytes for this filter).
    body_held: bool,
    /// The request ended (end of stream or trailers): no more body callbacks come.
    ended: bool,
}

impl<H: Host> Filter<H> {
    /// A filter for one request.
    pub fn new(host: H, shared: Rc<Shared>) -> Self {
        Self {
            host,
            shared,
            state: State::Idle,
            response_headers: Vec::new(),
            body_held: false,
            ended: false,
        }
    }

    /// The host, for tests.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// Request headers arrived: strip forged markers, resolve the route, then ask for a
    /// decision (or wait for the body first when the route sends it).
    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Flow {
        if !matches!(self.state, State::Idle) {
            return Flow::Continue;
        }
        self.ended = end_of_stream;
        // Remove forged markers before anything else reads the headers, and the caller's
        // gateway credential before anything can go upstream (policy still sees it).
        let sent = self.host.request_headers();
        let mut headers = Vec::with_capacity(sent.len());
        let mut removed: Vec<String> = Vec::new();
        for (name, value) in sent {
            let reserved = is_reserved_header(&name);
            if (reserved || self.shared.config.credential_headers.contains(&name))
                && !removed.contains(&name)
            {
                self.host.remove_request_header(&name);
                removed.push(name.clone());
            }
            if !reserved {
                headers.push((name, lossy_string(value)));
            }
        }

        let envoy_route = self
            .string_property(&["xds", "route_name"])
            .unwrap_or_default();
        let metadata = self.host.property(&["xds", "route_metadata"]);
        let now = self.host.now();
        let first = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let request = RequestKey {
            route_name: &envoy_route,
            authority: first(":authority"),
            path: first(":path"),
            method: first(":method"),
        };
        let (settings, route_name) = self.shared.route(&self.host, &request, metadata, now);
        self.host.set_log_field("arbiter_route", &route_name);
        let route = settings.settings.resolve(&self.shared.config, now);
        if route.invalid {
            self.host.increment(Metric::InvalidRouteConfig);
        }
        if route.override_active {
            self.host.increment(Metric::OverrideActive);
        }
        if route.disabled {
            self.finish(Outcome::Disabled, None);
            return Flow::Continue;
        }

        let mut info = RequestInfo {
            headers,
            route_name,
            source_address: self.string_property(&["source", "address"]),
            destination_address: self.string_property(&["destination", "address"]),
            peer_principal: self
                .string_property(&["connection", "uri_san_peer_certificate"])
                .filter(|p| !p.is_empty()),
            protocol: self.string_property(&["request", "protocol"]),
            body_size: None,
        };
        // Headers that end the stream: no body at all. Otherwise the announced length (the
        // codecs hold the body to it) until a body route has the whole body.
        info.body_size = if end_of_stream {
            Some(0)
        } else {
            content_length(&info)
        };
        let pending = Box::new(Pending {
            request_id: info.header("x-request-id").unwrap_or_default().to_owned(),
            metadata: self.forwarded_metadata(),
            info,
            route,
            settings,
            body: None,
            body_partial: false,
            received: 0,
        });
        if pending.route.refuse_without_check {
            return self.no_decision(Reason::InvalidRouteConfig, &pending);
        }
        if pending.route.body_limit.is_some() && !end_of_stream {
            self.state = State::AwaitingBody(pending);
            self.mark_undecided();
            return Flow::Pause;
        }
        // The clock read for the route is this request's time: no second read.
        self.decide(pending, now)
    }

    /// A chunk of request body arrived (Envoy keeps buffering while this pauses).
    pub fn on_request_body(&mut self, buffered: usize, end_of_stream: bool) -> Flow {
        self.ended |= end_of_stream;
        let flow = self.request_body(buffered, end_of_stream);
        if flow == Flow::Pause {
            self.body_held = true;
        }
        flow
    }

    fn request_body(&mut self, buffered: usize, end_of_stream: bool) -> Flow {
        let State::AwaitingBody(pending) = &mut self.state else {
            return match self.state {
                // The check is in flight: hold the rest of the body until it answers.
                State::Waiting { .. } => Flow::Pause,
                State::Release => {
                    self.state = State::Done;
                    Flow::Continue
                }
                State::Idle | State::AwaitingBody(_) | State::Done => Flow::Continue,
            };
        };
        pending.received = buffered;
        let limit = usize::try_from(pending.route.body_limit.unwrap_or(0)).unwrap_or(usize::MAX);
        // At exactly the limit the body may be complete: wait for its end or one more byte,
        // so a whole body of `max_body_bytes` is not mistaken for a cut one.
        if !end_of_stream && buffered <= limit {
            return Flow::Pause;
        }
        self.body_ready(end_of_stream)
    }

    /// Request trailers arrived. They end the request: on a body route the body is
    /// complete, and while the check is in flight they are held with everything else (the
    /// SDK's default would release the paused request to the upstream undecided).
    pub fn on_request_trailers(&mut self) -> Flow {
        self.ended = true;
        match self.state {
            State::AwaitingBody(_) => self.body_ready(true),
            State::Waiting { .. } => Flow::Pause,
            State::Release => {
                self.state = State::Done;
                Flow::Continue
            }
            State::Idle | State::Done => Flow::Continue,
        }
    }

    /// The body route has what policy gets: all of the body (`complete`), or its first
    /// `max_body_bytes`.
    fn body_ready(&mut self, complete: bool) -> Flow {
        let State::AwaitingBody(mut pending) = std::mem::replace(&mut self.state, State::Done)
        else {
            return Flow::Continue;
        };
        let buffered = pending.received;
        let limit = usize::try_from(pending.route.body_limit.unwrap_or(0)).unwrap_or(usize::MAX);
        let body = self
            .host
            .request_body(buffered.min(limit))
            .unwrap_or_default();
        if complete {
            // Exactly what was received, whatever `content-length` said or did not say.
            pending.info.body_size = Some(buffered as u64);
        }
        // Like native ext_authz: policy sees the first `max_body_bytes` and is told so.
        pending.body_partial = buffered > limit;
        pending.body = Some(body);
        // Returning Continue from a body or trailers callback releases what was paused.
        // The body may have taken a while: the breaker and the cache judge at this moment.
        let now = self.host.now();
        self.decide(pending, now)
    }

    /// Cache, breaker, then the policy call, judged at `now`.
    fn decide(&mut self, pending: Box<Pending>, now: SystemTime) -> Flow {
        let metadata_bytes = pending.metadata.as_ref().map(|m| m.encode_to_vec());
        let cache_key = pending.route.cache_ttl.map(|_| {
            cache::key(
                &pending.info,
                &pending.settings.settings.context,
                metadata_bytes.as_deref(),
                pending.body.as_deref(),
                pending.body_partial,
                self.shared.config.cache_max_entries,
            )
        });
        if let Some(key) = &cache_key {
            if let Some(entry) = self.cache_lookup(key, now) {
                // Its own Envoy-side record, naming the decision that allowed it (the entry
                // holds the headers that decision set, its audit id among them).
                let audit_id = entry
                    .headers
                    .iter()
                    .find(|(name, _, _)| name.eq_ignore_ascii_case(AUDIT_ID_HEADER))
                    .map(|(_, value, _)| value.as_str());
                self.host.set_log_field(
                    "arbiter_record",
                    &self.record(Outcome::Cached, None, false, &pending, audit_id),
                );
                self.apply_allow(&Entry::header_ops(&entry.headers), &entry.remove);
                self.response_headers = Entry::header_ops(&entry.response_headers);
                self.finish(Outcome::Cached, None);
                return Flow::Continue;
            }
            self.host.increment(Metric::CacheMiss);
        }

        let admit = self
            .shared
            .breaker
            .borrow_mut()
            .admit(now, pending.route.timeout.saturating_add(PROBE_GRACE));
        if admit == Admit::Reject {
            return self.no_decision(Reason::BreakerOpen, &pending);
        }

        let Some(message) = self.check_message(&pending, now) else {
            // Larger than the server accepts even without a body: caused by the request, so
            // refused on every route and never a mark against the policy server.
            self.host.log(
                Level::Warn,
                &format!(
                    "route `{}`: request too large to describe to policy (over {} bytes)",
                    pending.info.route_name,
                    arbiter_proto::MAX_CHECK_REQUEST_BYTES
                ),
            );
            if admit == Admit::Probe {
                self.shared.breaker.borrow_mut().release_probe();
            }
            return self.refuse(Reason::Error, &pending);
        };
        let grpc_metadata: [(&str, &[u8]); 1] = [("x-request-id", pending.request_id.as_bytes())];
        match self.host.dispatch_check(
            &self.shared.config.policy_upstream,
            if metadata_request_id(&pending.request_id) {
                &grpc_metadata
            } else {
                &[]
            },
            &message,
            pending.route.timeout,
        ) {
            Ok(token) => {
                self.state = State::Waiting {
                    token,
                    started: now,
                    cache_key,
                    probe: admit == Admit::Probe,
                    pending,
                };
                self.mark_undecided();
                Flow::Pause
            }
            Err(e) => {
                // The call could not even start (the cluster is not defined, or Envoy shed it
                // because the policy cluster's own circuit breaker is full): nobody can
                // answer, which is what `unreachable` means to the route's fail mode.
                self.host.log(
                    Level::Error,
                    &format!(
                        "route `{}`: cannot call policy cluster `{}`: {}",
                        pending.info.route_name, self.shared.config.policy_cluster, e.0
                    ),
                );
                // Not a mark against the server: such a call made no request wait, which is
                // all the breaker saves, and counting it would let a burst that fills
                // Envoy's circuit breaker hold this one open for its whole cool-down (every
                // `open` route unchecked even after the burst). A probe slot is handed back.
                if admit == Admit::Probe {
                    self.shared.breaker.borrow_mut().release_probe();
                }
                self.no_decision(Reason::Unreachable, &pending)
            }
        }
    }

    /// The encoded CheckRequest, within [`arbiter_proto::MAX_CHECK_REQUEST_BYTES`]: a body
    /// that would push it over is cut further and marked partial. `None` if even no body
    /// would fit.
    fn check_message(&self, pending: &Pending, now: SystemTime) -> Option<Vec<u8>> {
        let limit = arbiter_proto::MAX_CHECK_REQUEST_BYTES;
        let mut body_len = pending.body.as_ref().map_or(0, Vec::len);
        let mut partial = pending.body_partial;
        loop {
            let message = self.encode_check(pending, now, body_len, partial);
            if message.len() <= limit {
                return Some(message);
            }
            if body_len == 0 {
                return None;
            }
            body_len = body_len.saturating_sub(message.len() - limit);
            partial = true;
        }
    }

    /// Encodes the CheckRequest with the first `body_len` body bytes.
    fn encode_check(
        &self,
        pending: &Pending,
        now: SystemTime,
        body_len: usize,
        partial: bool,
    ) -> Vec<u8> {
        let extras = CheckExtras {
            dry_run: pending.route.dry_run,
            metadata: pending.metadata.as_ref(),
            body: pending
                .body
                .as_deref()
                .map(|body| body.get(..body_len).unwrap_or(body)),
            partial,
        };
        encode_check(
            &pending.info,
            &pending.settings.settings.context,
            now,
            &extras,
        )
    }

    /// The policy call finished. `status_code` is the gRPC status Envoy passed to the
    /// callback (trusted over `get_grpc_status`, which can be stale).
    pub fn on_check_response(&mut self, token_id: u32, status_code: u32, size: usize) -> Flow {
        match &self.state {
            State::Waiting { token, .. } if *token == token_id => {}
            _ => return Flow::Continue,
        }
        let State::Waiting {
            started,
            cache_key,
            probe,
            pending,
            ..
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Flow::Continue;
        };
        let now = self.host.now();
        let elapsed = now.duration_since(started).unwrap_or_default();
        self.host
            .record_latency(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));

        if outcome::caused_by_request(status_code) {
            // The server refused to decide because of what this request is (malformed, or
            // something policy cannot express): it says nothing about the server's health,
            // and an open route's fail mode is for an unavailable server, not a door a
            // crafted request can open. Refused on every route, not a breaker failure.
            self.host.log(
                Level::Debug,
                &format!(
                    "route `{}`: policy server refused the request (gRPC status {status_code}): {}",
                    pending.info.route_name,
                    self.host.grpc_status_message().unwrap_or_default()
                ),
            );
            if probe {
                // Neither a success nor a failure of the server: the next request probes.
                self.shared.breaker.borrow_mut().release_probe();
            }
            return self.refuse(Reason::Error, &pending);
        }
        let verdict = if status_code != 0 {
            let message = self.host.grpc_status_message();
            let reason = outcome::classify_failure(
                status_code,
                message.as_deref(),
                elapsed,
                pending.route.timeout,
            );
            self.host.log(
                Level::Debug,
                &format!(
                    "route `{}`: policy call failed with gRPC status {status_code} ({}) after {} ms: {}",
                    pending.info.route_name,
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
                self.breaker_success();
                self.remember_version(policy_version.as_deref());
                if let (Some(key), Some(ttl), Some(version)) =
                    (cache_key, pending.route.cache_ttl, policy_version)
                {
                    let entry = Entry::new(
                        key.digest,
                        now,
                        ttl,
                        version,
                        &headers,
                        &remove,
                        &response_headers,
                    );
                    self.host.shared_set(&key.slot, &entry.encode());
                    self.host.increment(Metric::CacheStore);
                }
                self.apply_allow(&headers, &remove);
                self.response_headers = response_headers;
                self.finish(Outcome::Allow, None);
                Flow::Continue
            }
            Verdict::Deny {
                body,
                policy_version,
                ..
            } if pending.route.dry_run => {
                // Advisory policy: the decision is made and in the audit log (the server
                // saw `dry_run` in the context), the request goes on marked, and nothing of
                // the deny (status, headers, body) reaches the client.
                self.breaker_success();
                self.remember_version(policy_version.as_deref());
                self.host.set_request_header(DRY_RUN_HEADER, "deny");
                if let Some(id) = deny_audit_id(&body) {
                    self.host.set_request_header(AUDIT_ID_HEADER, &id);
                }
                self.finish(Outcome::DryRunDeny, None);
                Flow::Continue
            }
            Verdict::Deny {
                status,
                headers,
                body,
                policy_version,
            } => {
                self.breaker_success();
                self.remember_version(policy_version.as_deref());
                self.finish(Outcome::Deny, None);
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.host.send_local_response(status, &headers, &body);
                Flow::Pause
            }
            Verdict::NoDecision(reason) => {
                self.breaker_failure(now);
                self.no_decision(reason, &pending)
            }
        };
        if flow == Flow::Continue {
            if self.body_held && !self.ended {
                // Envoy's wasm host keeps a stale "buffering" flag after a body callback
                // paused; if the request is resumed from here and more body arrives, the
                // bytes it held are sent upstream twice (a content-length request then
                // carries extra bytes: a second, undecided request to the provider). The
                // next body or trailers callback lets it go instead, which resets the flag.
                self.state = State::Release;
            } else {
                self.host.resume_request();
            }
        }
        flow
    }

    /// The request's stream ended (Envoy destroys the filter). A request still waiting for
    /// its body or its decision was cancelled: nothing went upstream; it gets its own
    /// outcome, and a breaker probe slot it held is released.
    pub fn on_stream_end(&mut self) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Waiting { probe, .. } => {
                if probe {
                    self.shared.breaker.borrow_mut().release_probe();
                }
                self.host.increment(Metric::Outcome(Outcome::Cancelled));
            }
            State::AwaitingBody(_) => {
                self.host.increment(Metric::Outcome(Outcome::Cancelled));
            }
            State::Idle | State::Release | State::Done => {}
        }
    }

    /// The request is paused without a decision. Envoy writes the access log before it
    /// destroys the filter, so an outcome for a request that ends here has to be in place
    /// already: `cancelled`, replaced when the decision (or fail mode) is applied.
    fn mark_undecided(&self) {
        self.host
            .set_log_field("arbiter_outcome", Outcome::Cancelled.as_str());
    }

    /// Response headers: add what the policy server asked for.
    pub fn on_response_headers(&mut self) {
        for op in std::mem::take(&mut self.response_headers) {
            self.host.add_response_header(&op.name, &op.value);
        }
    }

    fn apply_allow(&self, headers: &[HeaderOp], remove: &[String]) {
        for name in remove {
            self.host.remove_request_header(name);
        }
        for op in headers {
            if op.append {
                self.host.add_request_header(&op.name, &op.value);
            } else {
                self.host.set_request_header(&op.name, &op.value);
            }
        }
    }

    fn cache_lookup(&self, key: &CacheKey, now: SystemTime) -> Option<Entry> {
        let slot = self.host.shared_get(&key.slot)?;
        let version = self.host.shared_get(cache::VERSION_KEY);
        let version = version.as_deref().and_then(|v| std::str::from_utf8(v).ok());
        Entry::lookup(&slot, &key.digest, version, now)
    }

    fn breaker_success(&self) {
        if self.shared.breaker.borrow_mut().on_success() == Some(Transition::Closed) {
            self.host.increment(Metric::BreakerClosed);
            self.host.log(
                Level::Warn,
                "policy server answered a probe: breaker closed",
            );
        }
    }

    fn breaker_failure(&self, now: SystemTime) {
        let (transition, open_for) = {
            let mut breaker = self.shared.breaker.borrow_mut();
            let transition = breaker.on_failure(now);
            (transition, breaker.open_for(now).unwrap_or_default())
        };
        let (metric, what) = match transition {
            Some(Transition::Opened) => (Metric::BreakerOpened, "policy server failing"),
            Some(Transition::Reopened) => (
                Metric::BreakerReopened,
                "policy server still failing (a probe got no decision)",
            ),
            Some(Transition::Closed) | None => return,
        };
        self.host.increment(metric);
        self.host.log(
            Level::Warn,
            &format!(
                "{what}: breaker open for {} ms, routes apply their fail mode with reason `breaker_open`",
                open_for.as_millis()
            ),
        );
    }

    /// No decision, because of the request itself: fail closed whatever the route's mode.
    fn refuse(&mut self, reason: Reason, pending: &Pending) -> Flow {
        let mut route = pending.route.clone();
        route.fail_mode = crate::config::FailMode::Closed;
        route.override_active = false;
        self.apply_fail_mode(reason, &route, pending)
    }

    fn no_decision(&mut self, reason: Reason, pending: &Pending) -> Flow {
        self.apply_fail_mode(reason, &pending.route, pending)
    }

    fn apply_fail_mode(&mut self, reason: Reason, route: &Resolved, pending: &Pending) -> Flow {
        self.state = State::Done;
        self.host.increment(Metric::NoDecision(reason));
        let action =
            outcome::fail_action(reason, route, &pending.info.route_name, &pending.request_id);
        let (outcome, override_active) = match &action {
            FailAction::Open {
                override_active, ..
            } => (Outcome::FailOpen, *override_active),
            FailAction::Closed { .. } => (Outcome::FailClosed, false),
        };
        // The Envoy-side record of an undecided request (the server never saw it).
        self.host.set_log_field(
            "arbiter_record",
            &self.record(outcome, Some(reason), override_active, pending, None),
        );
        self.finish(outcome, Some((reason, override_active)));
        match action {
            FailAction::Open {
                marker,
                override_active,
            } => {
                if override_active {
                    self.host.increment(Metric::Override);
                }
                self.host.set_request_header(FAIL_OPEN_HEADER, marker);
                Flow::Continue
            }
            FailAction::Closed {
                status,
                headers,
                body,
            } => {
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                self.host.send_local_response(status, &headers, &body);
                Flow::Pause
            }
        }
    }

    /// One JSON line an auditor can replay: the request's shape and caller, never secrets
    /// or prompt text (an API key only as its SHA-256, the path without its query), and
    /// what the server would have read from the body. Serialised straight from the
    /// request ([`Record`]), without building a JSON tree first.
    fn record(
        &self,
        outcome: Outcome,
        reason: Option<Reason>,
        override_active: bool,
        p: &Pending,
        audit_id: Option<&str>,
    ) -> String {
        let header = |name: &str| p.info.header(name);
        let ts = OffsetDateTime::from(self.host.now()).format(&Rfc3339).ok();
        let api_key_sha256 = header("x-api-key").map(|k| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(k.as_bytes()))
        });
        let body = crate::body::body_facts(p.body.as_deref(), p.info.body_size, p.body_partial);
        // Later duplicates win, as in a JSON object.
        let context: std::collections::BTreeMap<&str, &str> = p
            .settings
            .settings
            .context
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (metadata, withheld) = self.recorded_claims(p);
        // Values the client chooses are recorded bounded, as in the server's records: the
        // access log is the evidence of a request the server never saw, and a 60 KiB path
        // or a 256 KiB model per request must not let a client flood it.
        let mut cut = std::collections::BTreeMap::new();
        let host = header(":authority").map(redact_authority);
        let record = Record {
            api_key_sha256,
            audit_id,
            body_bytes: body.bytes,
            body_parse_error: body.parse_error,
            body_size_known: body.size_known,
            body_truncated: body.truncated,
            context,
            host: host
                .as_deref()
                .map(|h| bound(&mut cut, "host", h, MAX_RECORDED_HOST).to_owned()),
            jwt_claims_withheld: (withheld > 0).then_some(withheld),
            max_tokens: body.max_tokens,
            message_count: body.message_count,
            metadata,
            method: header(":method").map(|m| bound(&mut cut, "method", m, MAX_RECORDED_METHOD)),
            model: body
                .model
                .as_deref()
                .map(|m| bound(&mut cut, "model", m, MAX_RECORDED_MODEL).to_owned()),
            outcome: outcome.as_str(),
            override_active,
            path: header(":path").map(|path| {
                let path = path.split('?').next().unwrap_or_default();
                bound(&mut cut, "path", path, MAX_RECORDED_PATH)
            }),
            policy_version: self.shared.policy_version(),
            principal: p
                .info
                .peer_principal
                .as_deref()
                .map(|v| bound(&mut cut, "principal", v, MAX_RECORDED_PRINCIPAL)),
            reason: reason.map(Reason::as_str),
            request_id: bound(
                &mut cut,
                "request_id",
                &p.request_id,
                MAX_RECORDED_REQUEST_ID,
            ),
            route: &p.info.route_name,
            scheme: header(":scheme").map(|v| bound(&mut cut, "scheme", v, MAX_RECORDED_SCHEME)),
            source: p.info.source_address.as_deref(),
            stream: body.stream,
            tenant: header("x-tenant-id")
                .map(|v| bound(&mut cut, "tenant", v, MAX_RECORDED_TENANT)),
            ts,
            v: 1,
            cut,
        };
        serde_json::to_string(&record).unwrap_or_default()
    }

    /// The `jwt_authn` namespace as `audit replay` puts it back, with only the claims
    /// `record_jwt_claims` keeps (claims can carry personal data), and how many were left
    /// out (their names are not recorded).
    fn recorded_claims(&self, p: &Pending) -> (Option<serde_json::Value>, usize) {
        let mut withheld = 0usize;
        let claims = p
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(crate::config::JWT_AUTHN_NAMESPACE))
            .and_then(|ns| match &ns.kind {
                Some(prost_types::value::Kind::StructValue(s)) => {
                    Some(crate::route::struct_to_json(s))
                }
                _ => None,
            })
            .map(|mut ns| {
                if let serde_json::Value::Object(payloads) = &mut ns {
                    for payload in payloads.values_mut() {
                        if let serde_json::Value::Object(claims) = payload {
                            let before = claims.len();
                            claims
                                .retain(|name, _| self.shared.config.record_jwt_claims.keeps(name));
                            withheld += before - claims.len();
                        }
                    }
                }
                ns
            });
        (claims, withheld)
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

    fn remember_version(&self, version: Option<&str>) {
        let Some(v) = version else { return };
        let mut current = self.shared.policy_version.borrow_mut();
        if current.as_deref() != Some(v) {
            *current = Some(v.to_owned());
            // Publish it so every worker's cache stops answering for the old version.
            self.host.shared_set(cache::VERSION_KEY, v.as_bytes());
        }
    }

    /// The configured dynamic metadata namespaces present on this request.
    fn forwarded_metadata(&self) -> Option<prost_types::Struct> {
        let namespaces = &self.shared.config.metadata_namespaces;
        if namespaces.is_empty() {
            return None;
        }
        let bytes = self.host.property(&["metadata"])?;
        let md = arbiter_proto::envoy::config::core::v3::Metadata::decode(bytes.as_slice()).ok()?;
        let fields: std::collections::BTreeMap<String, prost_types::Value> = md
            .filter_metadata
            .into_iter()
            .filter(|(ns, _)| namespaces.contains(ns))
            .map(|(ns, s)| {
                (
                    ns,
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StructValue(s)),
                    },
                )
            })
            .collect();
        (!fields.is_empty()).then_some(prost_types::Struct { fields })
    }

    fn string_property(&self, path: &[&str]) -> Option<String> {
        self.host.property(path).map(lossy_string)
    }
}

/// The Envoy-side record of a request (`arbiter_record`). Fields in alphabetical order:
/// the order a JSON object built with `serde_json::json!` prints them in.
#[derive(Serialize)]
struct Record<'a> {
    api_key_sha256: Option<String>,
    audit_id: Option<&'a str>,
    body_bytes: u64,
    body_parse_error: bool,
    body_size_known: bool,
    body_truncated: bool,
    context: std::collections::BTreeMap<&'a str, &'a str>,
    /// Values recorded cut, by field: the whole value's length and SHA-256 (absent when
    /// nothing was cut, so such a record is the same line as before the bounds).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    cut: std::collections::BTreeMap<&'static str, Cut>,
    host: Option<String>,
    jwt_claims_withheld: Option<usize>,
    max_tokens: Option<i64>,
    message_count: Option<i64>,
    metadata: Option<serde_json::Value>,
    method: Option<&'a str>,
    model: Option<String>,
    outcome: &'a str,
    #[serde(rename = "override")]
    override_active: bool,
    path: Option<&'a str>,
    policy_version: Option<String>,
    principal: Option<&'a str>,
    reason: Option<&'a str>,
    request_id: &'a str,
    route: &'a str,
    scheme: Option<&'a str>,
    source: Option<&'a str>,
    stream: Option<bool>,
    tenant: Option<&'a str>,
    ts: Option<String>,
    v: u32,
}

/// Bounds of the client-chosen values in the Envoy-side record: the server's for its own
/// records (`arbiter_audit::bound`; the contract test `record_bounds_match_the_servers`
/// keeps them equal), and for `tenant` its bound on a recorded header value.
pub const MAX_RECORDED_PATH: usize = 2048;
/// See [`MAX_RECORDED_PATH`].
pub const MAX_RECORDED_HOST: usize = 512;
/// See [`MAX_RECORDED_PATH`].
pub const MAX_RECORDED_REQUEST_ID: usize = 256;
/// See [`MAX_RECORDED_PATH`].
pub const MAX_RECORDED_MODEL: usize = 256;
/// See [`MAX_RECORDED_PATH`].
pub const MAX_RECORDED_METHOD: usize = 64;
/// See [`MAX_RECORDED_PATH`].
pub const MAX_RECORDED_SCHEME: usize = 64;
/// See [`MAX_RECORDED_PATH`].
pub const MAX_RECORDED_PRINCIPAL: usize = 2048;
/// See [`MAX_RECORDED_PATH`].
pub const MAX_RECORDED_TENANT: usize = 1024;

/// Evidence of a value recorded cut: the whole value's length in bytes and lowercase hex
/// SHA-256, as in the server's records.
#[derive(Debug, Serialize)]
struct Cut {
    bytes: usize,
    sha256: String,
}

/// `value`'s longest prefix of at most `max` bytes ending on a character boundary; when
/// that is not all of it, notes the whole value's evidence under `field` in `cut`.
fn bound<'v>(
    cut: &mut std::collections::BTreeMap<&'static str, Cut>,
    field: &'static str,
    value: &'v str,
    max: usize,
) -> &'v str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    use sha2::Digest;
    cut.insert(
        field,
        Cut {
            bytes: value.len(),
            sha256: hex::encode(sha2::Sha256::digest(value.as_bytes())),
        },
    );
    &value[..end]
}

/// `:authority` without its userinfo (`user:pass@host` → `[redacted]@host`): a client may
/// put credentials there, and they must not reach Envoy's access log (the server's records
/// replace it the same way).
fn redact_authority(host: &str) -> String {
    match host.rfind('@') {
        Some(at) => format!("[redacted]{}", &host[at..]),
        None => host.to_owned(),
    }
}

/// The bytes as text, invalid UTF-8 replaced; valid text (nearly always) keeps its buffer
/// instead of being copied.
fn lossy_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The audit id in a deny body (`{"error":{"audit_id":…}}`), when it is a plain token
/// that can travel in a header.
fn deny_audit_id(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = v.get("error")?.get("audit_id")?.as_str()?;
    (!id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| id.to_owned())
}

#[cfg(test)]
mod record_tests {
    use serde_json::json;

    use super::*;
    use crate::tests::MockHost;

    /// The record as it was built before [`Record`]: a `json!` tree.
    fn reference(
        this: &Filter<MockHost>,
        outcome: Outcome,
        reason: Option<Reason>,
        override_active: bool,
        p: &Pending,
        audit_id: Option<&str>,
    ) -> serde_json::Value {
        let header = |name: &str| p.info.header(name);
        let ts = OffsetDateTime::from(this.host.now()).format(&Rfc3339).ok();
        let path = header(":path").map(|path| path.split('?').next().unwrap_or_default());
        let api_key_sha256 = header("x-api-key").map(|k| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(k.as_bytes()))
        });
        let body = crate::body::body_facts(p.body.as_deref(), p.info.body_size, p.body_partial);
        let context: serde_json::Map<String, serde_json::Value> = p
            .settings
            .settings
            .context
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let (claims, withheld) = this.recorded_claims(p);
        json!({
            "v": 1,
            "ts": ts,
            "outcome": outcome.as_str(),
            "reason": reason.map(Reason::as_str),
            "override": override_active,
            "audit_id": audit_id,
            "route": p.info.route_name,
            "request_id": p.request_id,
            "method": header(":method"),
            "path": path,
            "host": header(":authority"),
            "scheme": header(":scheme"),
            "source": p.info.source_address,
            "principal": p.info.peer_principal,
            "metadata": claims,
            "jwt_claims_withheld": (withheld > 0).then_some(withheld),
            "api_key_sha256": api_key_sha256,
            "tenant": header("x-tenant-id"),
            "context": context,
            "model": body.model,
            "body_bytes": body.bytes,
            "body_size_known": body.size_known,
            "body_truncated": body.truncated,
            "body_parse_error": body.parse_error,
            "stream": body.stream,
            "max_tokens": body.max_tokens,
            "message_count": body.message_count,
            "policy_version": this.shared.policy_version(),
        })
    }

    fn pending(config: &FilterConfig, variant: usize) -> Pending {
        let mut settings = RouteSettings::default();
        if variant.is_multiple_of(2) {
            settings.context = vec![
                ("tier".into(), "gold".into()),
                ("classification".into(), "regulated".into()),
                ("tier".into(), "silver".into()),
            ];
        }
        let mut headers: Vec<(String, String)> = vec![
            (":method".into(), "POST".into()),
            (":path".into(), "/v1/chat/completions?key=secret".into()),
            (":authority".into(), "llm.local".into()),
            (":scheme".into(), "https".into()),
            ("x-tenant-id".into(), "t1".into()),
        ];
        if variant.is_multiple_of(3) {
            headers.push(("x-api-key".into(), "sk-123".into()));
        }
        let claims = prost_types::Struct {
            fields: [("sub", "u1"), ("email", "a@b.c")]
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_owned(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(v.into())),
                        },
                    )
                })
                .collect(),
        };
        let nest = |s: prost_types::Struct| prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(s)),
        };
        let metadata = (variant % 4 != 1).then(|| prost_types::Struct {
            fields: [(
                crate::config::JWT_AUTHN_NAMESPACE.to_owned(),
                nest(prost_types::Struct {
                    fields: [("issuer".to_owned(), nest(claims))].into_iter().collect(),
                }),
            )]
            .into_iter()
            .collect(),
        });
        let body: Option<Vec<u8>> = match variant % 3 {
            0 => None,
            1 => Some(br#"{"model":"m","messages":[1,2],"max_tokens":5,"stream":true}"#.to_vec()),
            _ => Some(b"not json".to_vec()),
        };
        Pending {
            info: RequestInfo {
                headers,
                route_name: "chat".into(),
                source_address: Some("10.0.0.1:1234".into()),
                destination_address: None,
                peer_principal: (variant % 2 == 1).then(|| "spiffe://a".to_owned()),
                protocol: Some("HTTP/1.1".into()),
                body_size: (!variant.is_multiple_of(5)).then_some(67),
            },
            route: settings.resolve(config, SystemTime::UNIX_EPOCH),
            settings: Rc::new(CachedRoute { settings }),
            request_id: format!("rid-{variant}"),
            metadata,
            body,
            body_partial: variant % 7 == 3,
            received: 0,
        }
    }

    #[test]
    fn client_chosen_values_are_recorded_bounded_with_evidence_and_userinfo_replaced() {
        use sha2::Digest;
        let config = FilterConfig::parse(br#"{"policy_cluster":"p"}"#).unwrap_or_else(|e| {
            panic!("{e}");
        });
        let shared = Rc::new(Shared::new(config.clone()));
        let filter = Filter::new(MockHost::default(), Rc::clone(&shared));
        let mut p = pending(&config, 1);
        let path = format!("/{}", "p\u{e9}".repeat(3_000));
        let host = format!("user:s3cret@{}", "h".repeat(1_000));
        let tenant = "t".repeat(5_000);
        let model = "m".repeat(100_000);
        p.info
            .headers
            .retain(|(n, _)| n != ":path" && n != ":authority" && n != "x-tenant-id");
        p.info
            .headers
            .push((":path".into(), format!("{path}?key=1")));
        p.info.headers.push((":authority".into(), host.clone()));
        p.info.headers.push(("x-tenant-id".into(), tenant.clone()));
        p.request_id = "r".repeat(300);
        p.body = Some(format!(r#"{{"model":"{model}","messages":[]}}"#).into_bytes());
        p.info.body_size = p.body.as_ref().map(|b| b.len() as u64);
        let line = filter.record(Outcome::FailOpen, Some(Reason::Timeout), false, &p, None);
        assert!(line.len() < 8 * 1024, "{} bytes", line.len());
        assert!(!line.contains("s3cret"), "{line}");
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        let redacted_host = format!("[redacted]@{}", "h".repeat(1_000));
        for (field, whole, max) in [
            ("path", path.as_str(), MAX_RECORDED_PATH),
            ("host", redacted_host.as_str(), MAX_RECORDED_HOST),
            ("tenant", tenant.as_str(), MAX_RECORDED_TENANT),
            ("model", model.as_str(), MAX_RECORDED_MODEL),
            ("request_id", p.request_id.as_str(), MAX_RECORDED_REQUEST_ID),
        ] {
            let kept = record[field].as_str().unwrap();
            assert!(whole.starts_with(kept), "{field}");
            assert!(
                kept.len() <= max && kept.len() + 4 > max,
                "{field}: {}",
                kept.len()
            );
            assert_eq!(
                record["cut"][field],
                json!({
                    "bytes": whole.len(),
                    "sha256": hex::encode(sha2::Sha256::digest(whole.as_bytes())),
                }),
                "{field}"
            );
        }
        // Short values: no `cut` member, the line as before.
        let short = filter.record(
            Outcome::FailOpen,
            Some(Reason::Timeout),
            false,
            &pending(&config, 1),
            None,
        );
        assert!(!short.contains("\"cut\""), "{short}");
    }

    #[test]
    fn the_record_is_the_json_the_tree_gave() {
        for claims in [r#""record_jwt_claims":["sub"],"#, ""] {
            let config =
                FilterConfig::parse(format!(r#"{{{claims}"policy_cluster":"p"}}"#).as_bytes())
                    .map_err(|e| e.to_string());
            let Ok(config) = config else {
                panic!("config: {config:?}")
            };
            let shared = Rc::new(Shared::new(config.clone()));
            let filter = Filter::new(MockHost::default(), Rc::clone(&shared));
            for variant in 0..24 {
                let p = pending(&config, variant);
                if variant == 5 {
                    *shared.policy_version.borrow_mut() = Some("v9".into());
                }
                for (outcome, reason, override_active, audit_id) in [
                    (Outcome::Cached, None, false, Some("audit-1")),
                    (Outcome::FailOpen, Some(Reason::Timeout), true, None),
                    (Outcome::FailClosed, Some(Reason::BreakerOpen), false, None),
                ] {
                    let got = filter.record(outcome, reason, override_active, &p, audit_id);
                    let want = reference(&filter, outcome, reason, override_active, &p, audit_id);
                    let parsed: serde_json::Value = serde_json::from_str(&got).unwrap();
                    assert_eq!(parsed, want, "variant {variant}");
                }
            }
        }
    }
}
