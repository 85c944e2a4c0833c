//! State-machine tests against a recording [`Host`] double.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use prost::Message;
use prost_types::value::Kind;
use time::OffsetDateTime;

use arbiter_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use arbiter_proto::envoy::service::auth::v3::{
    check_response::HttpResponse, CheckRequest, CheckResponse, OkHttpResponse,
};
use arbiter_proto::google::rpc::Status;

use crate::config::FilterConfig;
use crate::filter::{Filter, Flow, Shared, FAIL_OPEN_HEADER, PARTIAL_BODY_HEADER};
use crate::host::{DispatchError, Host, Level, Metric, Outcome};
use crate::outcome::Reason;

pub(crate) type LocalReply = (u32, Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
struct Recorded {
    headers: Vec<(String, Vec<u8>)>,
    properties: HashMap<String, Vec<u8>>,
    log_fields: HashMap<String, String>,
    dispatched: Vec<(String, Vec<u8>, Duration)>,
    dispatch_fails: bool,
    response_body: Option<Vec<u8>>,
    status_message: Option<String>,
    local: Option<LocalReply>,
    resumed: u32,
    now: Option<SystemTime>,
    clock_reads: u32,
    logs: Vec<(Level, String)>,
    metrics: HashMap<Metric, u64>,
    latencies: Vec<u64>,
    response_headers: Vec<(String, String)>,
    body: Vec<u8>,
    shared: Rc<RefCell<HashMap<String, Vec<u8>>>>,
}

/// A recording [`Host`] double.
#[derive(Clone, Default)]
pub(crate) struct MockHost(Rc<RefCell<Recorded>>);

impl MockHost {
    /// The token every dispatched call gets.
    pub(crate) const TOKEN: u32 = 7;

    /// Sets the request as the client sent it, the route's metadata and the body.
    pub(crate) fn set_request(
        &self,
        headers: &[(String, Vec<u8>)],
        metadata: Vec<u8>,
        body: Vec<u8>,
    ) {
        let mut r = self.0.borrow_mut();
        for (k, v) in [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "gw"),
        ] {
            r.headers.push((k.into(), v.as_bytes().to_vec()));
        }
        r.headers.extend(headers.iter().cloned());
        r.properties.insert("xds.route_name".into(), b"r".to_vec());
        r.properties.insert("xds.route_metadata".into(), metadata);
        r.body = body;
    }

    /// The body of the next answer.
    pub(crate) fn set_answer(&self, body: Option<Vec<u8>>) {
        self.0.borrow_mut().response_body = body;
    }

    /// A counter's value.
    pub(crate) fn metric(&self, m: Metric) -> u64 {
        self.0.borrow().metrics.get(&m).copied().unwrap_or(0)
    }

    /// The request headers as they are now (what would go upstream).
    pub(crate) fn request_headers_now(&self) -> Vec<(String, Vec<u8>)> {
        self.0.borrow().headers.clone()
    }

    /// A request header's current value.
    pub(crate) fn header_now(&self, name: &str) -> Option<String> {
        header(self, name)
    }

    /// The local reply, if one was sent.
    pub(crate) fn local_reply(&self) -> Option<LocalReply> {
        self.0.borrow().local.clone()
    }

    /// Replaces a request header as the client sent it (before the filter runs).
    pub(crate) fn set_header(&self, name: &str, value: &str) {
        let mut r = self.0.borrow_mut();
        r.headers.retain(|(k, _)| k != name);
        r.headers.push((name.into(), value.as_bytes().to_vec()));
    }

    /// How often the request was resumed.
    pub(crate) fn resumed(&self) -> u32 {
        self.0.borrow().resumed
    }
}

impl Host for MockHost {
    fn request_body(&self, max: usize) -> Option<Vec<u8>> {
        let b = &self.0.borrow().body;
        Some(b[..b.len().min(max)].to_vec())
    }
    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.borrow().shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8]) {
        self.0
            .borrow()
            .shared
            .borrow_mut()
            .insert(key.into(), value.to_vec());
    }
    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.0.borrow().headers.clone()
    }
    fn remove_request_header(&self, name: &str) {
        self.0.borrow_mut().headers.retain(|(k, _)| k != name);
    }
    fn set_request_header(&self, name: &str, value: &str) {
        self.remove_request_header(name);
        self.add_request_header(name, value);
    }
    fn add_request_header(&self, name: &str, value: &str) {
        self.0
            .borrow_mut()
            .headers
            .push((name.into(), value.as_bytes().to_vec()));
    }
    fn add_response_header(&self, name: &str, value: &str) {
        self.0
            .borrow_mut()
            .response_headers
            .push((name.into(), value.into()));
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.0.borrow().properties.get(&path.join(".")).cloned()
    }
    fn set_log_field(&self, key: &str, value: &str) {
        self.0
            .borrow_mut()
            .log_fields
            .insert(key.into(), value.into());
    }
    fn dispatch_check(
        &self,
        cluster: &str,
        _metadata: &[(&str, &[u8])],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, DispatchError> {
        let mut r = self.0.borrow_mut();
        if r.dispatch_fails {
            return Err(DispatchError("ParseFailure".into()));
        }
        r.dispatched
            .push((cluster.into(), message.to_vec(), timeout));
        Ok(Self::TOKEN)
    }
    fn grpc_response_body(&self, _size: usize) -> Option<Vec<u8>> {
        self.0.borrow().response_body.clone()
    }
    fn grpc_status_message(&self) -> Option<String> {
        self.0.borrow().status_message.clone()
    }
    fn send_local_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.0.borrow_mut().local = Some((
            status,
            headers
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            body.to_vec(),
        ));
    }
    fn resume_request(&self) {
        self.0.borrow_mut().resumed += 1;
    }
    fn now(&self) -> SystemTime {
        let mut r = self.0.borrow_mut();
        r.clock_reads += 1;
        r.now
            .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000))
    }
    fn log(&self, level: Level, message: &str) {
        self.0.borrow_mut().logs.push((level, message.into()));
    }
    fn increment(&self, metric: Metric) {
        *self.0.borrow_mut().metrics.entry(metric).or_default() += 1;
    }
    fn record_latency(&self, micros: u64) {
        self.0.borrow_mut().latencies.push(micros);
    }
}

fn metadata(fields: &[(&str, Kind)]) -> Vec<u8> {
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        "arbiter".into(),
        prost_types::Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        prost_types::Value {
                            kind: Some(v.clone()),
                        },
                    )
                })
                .collect(),
        },
    );
    md.encode_to_vec()
}

fn request(
    route: &str,
    md: Option<Vec<u8>>,
    extra_headers: &[(&str, &str)],
) -> (Filter<MockHost>, MockHost) {
    let shared = Rc::new(Shared::new(
        FilterConfig::parse(br#"{"policy_cluster":"arbiter_policy","timeout_ms":100}"#).unwrap(),
    ));
    request_with(shared, route, md, extra_headers)
}

fn request_with(
    shared: Rc<Shared>,
    route: &str,
    md: Option<Vec<u8>>,
    extra_headers: &[(&str, &str)],
) -> (Filter<MockHost>, MockHost) {
    let host = MockHost::default();
    {
        let mut r = host.0.borrow_mut();
        for (k, v) in [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "gw"),
            (":scheme", "http"),
            ("x-request-id", "rid-1"),
        ]
        .iter()
        .chain(extra_headers)
        {
            r.headers.push(((*k).into(), v.as_bytes().to_vec()));
        }
        r.properties
            .insert("xds.route_name".into(), route.as_bytes().to_vec());
        if let Some(md) = md {
            r.properties.insert("xds.route_metadata".into(), md);
        }
        r.properties
            .insert("source.address".into(), b"127.0.0.1:5555".to_vec());
    }
    (Filter::new(host.clone(), shared), host)
}

fn ok_response() -> Vec<u8> {
    CheckResponse {
        status: Some(Status::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "x-arbiter-audit-id".into(),
                    value: "a-1".into(),
                    raw_value: vec![],
                }),
                ..Default::default()
            }],
            ..Default::default()
        })),
        dynamic_metadata: Some(prost_types::Struct {
            fields: [(
                "policy_version".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StringValue("v1".into())),
                },
            )]
            .into_iter()
            .collect(),
        }),
    }
    .encode_to_vec()
}

fn header(host: &MockHost, name: &str) -> Option<String> {
    host.0
        .borrow()
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

fn metric(host: &MockHost, m: Metric) -> u64 {
    host.0.borrow().metrics.get(&m).copied().unwrap_or(0)
}

#[test]
fn allow_applies_server_headers_and_strips_forged_markers() {
    let (mut f, host) = request(
        "chat",
        None,
        &[("x-arbiter-fail-open", "yes"), ("X-Arbiter-Other", "1")],
    );
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert_eq!(header(&host, "x-arbiter-fail-open"), None);
    assert_eq!(header(&host, "X-Arbiter-Other"), None);
    let (cluster, msg, timeout) = host.0.borrow().dispatched[0].clone();
    assert_eq!(cluster, "arbiter_policy");
    assert_eq!(timeout, Duration::from_millis(100));
    let req = CheckRequest::decode(msg.as_slice()).unwrap();
    let attrs = req.attributes.unwrap();
    assert_eq!(attrs.context_extensions["route"], "chat");
    assert!(!attrs
        .request
        .unwrap()
        .http
        .unwrap()
        .headers
        .contains_key("x-arbiter-fail-open"));

    host.0.borrow_mut().response_body = Some(ok_response());
    assert_eq!(f.on_check_response(7, 0, 10), Flow::Continue);
    assert_eq!(host.0.borrow().resumed, 1);
    assert_eq!(header(&host, "x-arbiter-audit-id").as_deref(), Some("a-1"));
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Allow)), 1);
    assert_eq!(host.0.borrow().latencies.len(), 1);
    assert_eq!(host.0.borrow().log_fields["arbiter_outcome"], "allow");
}

#[test]
fn an_allowed_request_reads_the_clock_once_per_step() {
    // Each clock read is a host call (a crossing of the VM boundary in Envoy): the route,
    // the breaker and the CheckRequest's time share one read, the latency takes another.
    let (mut f, host) = request("chat", None, &[]);
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert_eq!(host.0.borrow().clock_reads, 1);
    host.0.borrow_mut().response_body = Some(ok_response());
    assert_eq!(f.on_check_response(MockHost::TOKEN, 0, 10), Flow::Continue);
    assert_eq!(host.0.borrow().clock_reads, 2);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Allow)), 1);
}

#[test]
fn route_settings_are_parsed_once_and_their_cache_stays_bounded() {
    let shared = Rc::new(Shared::new(
        FilterConfig::parse(br#"{"policy_cluster":"arbiter_policy","timeout_ms":100}"#).unwrap(),
    ));
    // The same metadata twice: one entry.
    for _ in 0..2 {
        let md = metadata(&[("fail_mode", Kind::StringValue("open".into()))]);
        let (mut f, _host) = request_with(Rc::clone(&shared), "chat", Some(md), &[]);
        assert_eq!(f.on_request_headers(true), Flow::Pause);
    }
    assert_eq!(shared.cached_routes(), 1);
    // Metadata that differs on every request (a generated config) never grows it past its
    // bound, and every request still gets its own settings.
    for i in 0..(crate::filter::ROUTE_CACHE_LIMIT * 2 + 3) {
        let md = metadata(&[("timeout_ms", Kind::NumberValue(100.0 + i as f64))]);
        let (mut f, host) = request_with(Rc::clone(&shared), "chat", Some(md), &[]);
        assert_eq!(f.on_request_headers(true), Flow::Pause);
        assert_eq!(
            host.0.borrow().dispatched[0].2,
            Duration::from_millis(100 + i as u64)
        );
        assert!(shared.cached_routes() <= crate::filter::ROUTE_CACHE_LIMIT);
    }
}

#[test]
fn unknown_token_is_ignored() {
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(true);
    assert_eq!(f.on_check_response(99, 0, 0), Flow::Continue);
    assert_eq!(host.0.borrow().resumed, 0);
}

#[test]
fn no_metadata_fails_closed_with_retry_after() {
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(true);
    host.0.borrow_mut().status_message = Some("upstream connect error or disconnect/reset before headers. reset reason: connection failure".into());
    assert_eq!(f.on_check_response(7, 14, 0), Flow::Pause);
    let (status, headers, body) = host.0.borrow().local.clone().unwrap();
    assert_eq!(status, 503);
    assert!(headers.contains(&("retry-after".into(), "1".into())));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["reason"], "unreachable");
    assert_eq!(host.0.borrow().resumed, 0);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::FailClosed)), 1);
    assert_eq!(metric(&host, Metric::NoDecision(Reason::Unreachable)), 1);
    assert_eq!(host.0.borrow().log_fields["arbiter_reason"], "unreachable");
}

#[test]
fn open_route_marks_upstream_request() {
    let md = metadata(&[
        ("fail_mode", Kind::StringValue("open".into())),
        ("timeout_ms", Kind::NumberValue(50.0)),
    ]);
    let (mut f, host) = request("embeddings", Some(md), &[]);
    f.on_request_headers(true);
    assert_eq!(host.0.borrow().dispatched[0].2, Duration::from_millis(50));
    host.0.borrow_mut().now = Some(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000) + Duration::from_millis(50),
    );
    assert_eq!(f.on_check_response(7, 14, 0), Flow::Continue);
    assert_eq!(
        header(&host, "x-arbiter-fail-open").as_deref(),
        Some("timeout")
    );
    assert_eq!(host.0.borrow().resumed, 1);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::FailOpen)), 1);
    assert_eq!(metric(&host, Metric::Override), 0);
}

#[test]
fn invalid_metadata_is_counted_logged_once_and_closed() {
    let shared = Rc::new(Shared::new(
        FilterConfig::parse(br#"{"policy_cluster":"p","fail_mode":"open"}"#).unwrap(),
    ));
    let md = metadata(&[("fail_mode", Kind::StringValue("sometimes".into()))]);
    for i in 0..2 {
        let (mut f, host) = request_with(Rc::clone(&shared), "bad", Some(md.clone()), &[]);
        f.on_request_headers(true);
        assert_eq!(metric(&host, Metric::InvalidRouteConfig), 1);
        assert_eq!(
            host.0.borrow().logs.len(),
            if i == 0 { 1 } else { 0 },
            "logged once per VM"
        );
        f.on_check_response(7, 14, 0);
        assert_eq!(host.0.borrow().local.as_ref().unwrap().0, 503);
    }
}

#[test]
fn invalid_context_refuses_without_calling() {
    let md = metadata(&[("context", Kind::StringValue("regulated".into()))]);
    let (mut f, host) = request("ctx", Some(md), &[]);
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert!(host.0.borrow().dispatched.is_empty());
    let body = host.0.borrow().local.clone().unwrap().2;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["reason"], "invalid_route_config");
}

#[test]
fn disabled_route_makes_no_call() {
    let md = metadata(&[("disabled", Kind::BoolValue(true))]);
    let (mut f, host) = request("health", Some(md), &[("x-arbiter-fail-open", "yes")]);
    assert_eq!(f.on_request_headers(true), Flow::Continue);
    assert!(host.0.borrow().dispatched.is_empty());
    assert_eq!(
        header(&host, "x-arbiter-fail-open"),
        None,
        "markers are stripped even when disabled"
    );
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Disabled)), 1);
}

#[test]
fn dispatch_failure_applies_fail_mode_synchronously() {
    let md = metadata(&[("fail_mode", Kind::StringValue("open".into()))]);
    let (mut f, host) = request("r", Some(md), &[]);
    host.0.borrow_mut().dispatch_fails = true;
    assert_eq!(f.on_request_headers(true), Flow::Continue);
    assert_eq!(
        header(&host, "x-arbiter-fail-open").as_deref(),
        Some("unreachable")
    );
    assert_eq!(
        host.0.borrow().resumed,
        0,
        "continue is returned, not resumed"
    );
    assert!(host
        .0
        .borrow()
        .logs
        .iter()
        .any(|(l, m)| *l == Level::Error && m.contains("cannot call policy cluster")));
}

#[test]
fn override_is_marked_and_counted() {
    let md = metadata(&[
        ("fail_mode", Kind::StringValue("closed".into())),
        (
            "fail_open_until",
            Kind::StringValue("2026-11-18T13:00:00Z".into()),
        ),
    ]);
    let (mut f, host) = request("o", Some(md), &[]);
    // 1_795_000_000 is 2026-11-18T11:06:40Z: the override is ~2 h ahead.
    f.on_request_headers(true);
    f.on_check_response(7, 14, 0);
    assert_eq!(
        header(&host, "x-arbiter-fail-open").as_deref(),
        Some("unreachable")
    );
    assert_eq!(metric(&host, Metric::Override), 1);
    assert_eq!(metric(&host, Metric::OverrideActive), 1);
    assert_eq!(host.0.borrow().log_fields["arbiter_override"], "true");
}

#[test]
fn bad_response_and_error() {
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(true);
    host.0.borrow_mut().response_body = Some(vec![0xff, 0xff, 0xff, 0xff]);
    f.on_check_response(7, 0, 4);
    assert_eq!(metric(&host, Metric::NoDecision(Reason::BadResponse)), 1);

    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(true);
    host.0.borrow_mut().status_message = Some("audit log unavailable".into());
    f.on_check_response(7, 14, 0);
    assert_eq!(metric(&host, Metric::NoDecision(Reason::Error)), 1);
}

#[test]
fn non_utf8_header_values_do_not_break_the_request() {
    let (mut f, host) = request("chat", None, &[]);
    host.0
        .borrow_mut()
        .headers
        .push(("x-bin".into(), vec![0xff, 0xfe]));
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert_eq!(host.0.borrow().dispatched.len(), 1);
}

fn shared_with(config: &str) -> Rc<Shared> {
    Rc::new(Shared::new(FilterConfig::parse(config.as_bytes()).unwrap()))
}

fn sent(host: &MockHost) -> CheckRequest {
    CheckRequest::decode(host.0.borrow().dispatched.last().unwrap().1.as_slice()).unwrap()
}

#[test]
fn body_is_buffered_up_to_the_limit_and_marked_partial() {
    let md = metadata(&[
        ("include_body", Kind::BoolValue(true)),
        ("max_body_bytes", Kind::NumberValue(8.0)),
    ]);
    let (mut f, host) = request("chat", Some(md.clone()), &[]);
    host.0.borrow_mut().body = br#"{"model":"m","messages":[]}"#.to_vec();
    assert_eq!(f.on_request_headers(false), Flow::Pause);
    assert!(host.0.borrow().dispatched.is_empty(), "waits for the body");
    assert_eq!(
        f.on_request_body(4, false),
        Flow::Pause,
        "below the limit: keep buffering"
    );
    assert!(host.0.borrow().dispatched.is_empty());
    assert_eq!(
        f.on_request_body(27, false),
        Flow::Pause,
        "limit reached: ask now"
    );
    let http = sent(&host)
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
    assert_eq!(http.raw_body, br#"{"model""#.to_vec());
    assert_eq!(
        http.headers
            .get("x-envoy-auth-partial-body")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        f.on_request_body(27, true),
        Flow::Pause,
        "rest of the body waits for the answer"
    );

    // A small complete body is sent whole and unmarked.
    let (mut f, host) = request("chat", Some(md), &[]);
    host.0.borrow_mut().body = b"{}".to_vec();
    assert_eq!(f.on_request_headers(false), Flow::Pause);
    assert_eq!(f.on_request_body(2, true), Flow::Pause);
    let http = sent(&host)
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
    assert_eq!(http.raw_body, b"{}".to_vec());
    assert_eq!(http.size, 2);
    assert!(!http.headers.contains_key("x-envoy-auth-partial-body"));
    host.0.borrow_mut().response_body = Some(ok_response());
    assert_eq!(f.on_check_response(7, 0, 1), Flow::Continue);
    assert_eq!(host.0.borrow().resumed, 1);
}

#[test]
fn jwt_metadata_is_forwarded_as_metadata_context() {
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        "envoy.filters.http.jwt_authn".into(),
        prost_types::Struct {
            fields: [(
                "jwt_payload".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StructValue(prost_types::Struct {
                        fields: [(
                            "sub".to_owned(),
                            prost_types::Value {
                                kind: Some(Kind::StringValue("alice".into())),
                            },
                        )]
                        .into_iter()
                        .collect(),
                    })),
                },
            )]
            .into_iter()
            .collect(),
        },
    );
    md.filter_metadata
        .insert("other.filter".into(), prost_types::Struct::default());
    let (mut f, host) = request("chat", None, &[]);
    host.0
        .borrow_mut()
        .properties
        .insert("metadata".into(), md.encode_to_vec());
    f.on_request_headers(true);
    let ctx = sent(&host).attributes.unwrap().metadata_context.unwrap();
    assert_eq!(ctx.filter_metadata.len(), 1, "only configured namespaces");
    let jwt = &ctx.filter_metadata["envoy.filters.http.jwt_authn"];
    assert!(jwt.fields.contains_key("jwt_payload"));
}

#[test]
fn breaker_opens_after_threshold_and_probes_after_cooldown() {
    let shared =
        shared_with(r#"{"policy_cluster":"p","breaker_threshold":2,"breaker_cooldown_ms":1000}"#);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut hosts = Vec::new();
    for _ in 0..2 {
        let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
        host.0.borrow_mut().now = Some(at(0));
        f.on_request_headers(true);
        f.on_check_response(7, 14, 0);
        hosts.push(host);
    }
    assert_eq!(metric(&hosts[1], Metric::BreakerOpened), 1);

    let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(500));
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert!(
        host.0.borrow().dispatched.is_empty(),
        "open breaker: no call"
    );
    let body = host.0.borrow().local.clone().unwrap().2;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"]["reason"],
        "breaker_open"
    );
    assert_eq!(metric(&host, Metric::NoDecision(Reason::BreakerOpen)), 1);

    // After the cool-down one probe goes out; its success closes the breaker.
    let (mut probe, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(1000));
    assert_eq!(probe.on_request_headers(true), Flow::Pause);
    assert_eq!(host.0.borrow().dispatched.len(), 1);
    let (mut other, other_host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    other_host.0.borrow_mut().now = Some(at(1001));
    other.on_request_headers(true);
    assert!(
        other_host.0.borrow().dispatched.is_empty(),
        "one probe at a time"
    );
    host.0.borrow_mut().response_body = Some(ok_response());
    probe.on_check_response(7, 0, 1);
    assert_eq!(metric(&host, Metric::BreakerClosed), 1);
    let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(1002));
    f.on_request_headers(true);
    assert_eq!(host.0.borrow().dispatched.len(), 1, "closed again");
}

#[test]
fn a_failed_probe_reopens_for_twice_as_long_and_counts_as_a_reopening() {
    let shared = shared_with(
        r#"{"policy_cluster":"p","breaker_threshold":1,"breaker_cooldown_ms":250,"breaker_cooldown_max_ms":2000}"#,
    );
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let warned = |host: &MockHost| {
        host.0
            .borrow()
            .logs
            .iter()
            .map(|(_, m)| m.clone())
            .collect::<Vec<_>>()
    };
    // Calls at `ms`: whether it went out, and its host.
    let call = |ms: u64| {
        let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
        host.0.borrow_mut().now = Some(at(ms));
        f.on_request_headers(true);
        let called = !host.0.borrow().dispatched.is_empty();
        (f, host, called)
    };
    let (mut f, host, _) = call(0);
    f.on_check_response(7, 14, 0);
    assert_eq!(metric(&host, Metric::BreakerOpened), 1);
    assert!(
        warned(&host)
            .iter()
            .any(|m| m.starts_with("policy server failing: breaker open for 250 ms")),
        "{:?}",
        warned(&host)
    );

    assert!(!call(249).2, "open for the first, short cool-down");
    let (mut probe, host, called) = call(250);
    assert!(called, "the probe");
    probe.on_check_response(7, 14, 0);
    assert_eq!(metric(&host, Metric::BreakerReopened), 1);
    assert_eq!(
        metric(&host, Metric::BreakerOpened),
        0,
        "a re-opening, not an opening"
    );
    assert!(
        warned(&host).iter().any(|m| m.starts_with(
            "policy server still failing (a probe got no decision): breaker open for 500 ms"
        )),
        "{:?}",
        warned(&host)
    );

    assert!(!call(749).2, "open for twice as long");
    let (mut probe, host, called) = call(750);
    assert!(called, "the next probe");
    host.0.borrow_mut().response_body = Some(ok_response());
    probe.on_check_response(7, 0, 1);
    assert_eq!(metric(&host, Metric::BreakerClosed), 1);
    assert!(call(751).2, "closed");
}

#[test]
fn cache_serves_allows_only_and_follows_the_policy_version() {
    let shared = shared_with(r#"{"policy_cluster":"p"}"#);
    let store: Rc<RefCell<HashMap<String, Vec<u8>>>> = Rc::default();
    let md = metadata(&[("cache_ttl_ms", Kind::NumberValue(1000.0))]);
    let run = |extra: &[(&str, &str)], answer: Option<Vec<u8>>, ms: u64| {
        let (mut f, host) = request_with(Rc::clone(&shared), "chat", Some(md.clone()), extra);
        host.0.borrow_mut().shared = Rc::clone(&store);
        host.0.borrow_mut().now = Some(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000) + Duration::from_millis(ms),
        );
        let flow = f.on_request_headers(true);
        if let Some(answer) = answer {
            if !host.0.borrow().dispatched.is_empty() {
                host.0.borrow_mut().response_body = Some(answer);
                f.on_check_response(7, 0, 1);
            }
        }
        (flow, host)
    };
    let (_, h) = run(&[], Some(ok_response()), 0);
    assert_eq!(metric(&h, Metric::CacheStore), 1);
    let (flow, h) = run(&[("x-request-id", "another")], None, 10);
    assert_eq!(
        flow,
        Flow::Continue,
        "second identical request is served from the cache"
    );
    assert!(h.0.borrow().dispatched.is_empty());
    assert_eq!(metric(&h, Metric::Outcome(Outcome::Cached)), 1);
    assert_eq!(header(&h, "x-arbiter-audit-id").as_deref(), Some("a-1"));
    assert_eq!(h.0.borrow().log_fields["arbiter_outcome"], "cached");

    let (_, h) = run(&[("x-tenant-id", "t2")], None, 20);
    assert_eq!(
        h.0.borrow().dispatched.len(),
        1,
        "a different request misses"
    );
    assert_eq!(metric(&h, Metric::CacheMiss), 1);

    let (_, h) = run(&[], None, 1000);
    assert_eq!(h.0.borrow().dispatched.len(), 1, "expired after the TTL");

    // A deny is never stored.
    let deny = CheckResponse {
        status: Some(Status {
            code: 7,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let (_, h) = run(&[("x-deny", "1")], Some(deny), 1100);
    assert_eq!(metric(&h, Metric::CacheStore), 0);
    let (_, h) = run(&[("x-deny", "1")], None, 1110);
    assert_eq!(h.0.borrow().dispatched.len(), 1);

    // A new policy version seen by any worker empties the cache.
    let (_, h) = run(&[("x-v", "1")], Some(ok_response()), 1200);
    assert_eq!(metric(&h, Metric::CacheStore), 1);
    store
        .borrow_mut()
        .insert(crate::cache::VERSION_KEY.into(), b"v2".to_vec());
    let (_, h) = run(&[("x-v", "1")], None, 1210);
    assert_eq!(
        h.0.borrow().dispatched.len(),
        1,
        "entries of another version miss"
    );
}

#[test]
fn cached_allows_leave_a_record_naming_the_decision_that_allowed_them() {
    let shared = shared_with(r#"{"policy_cluster":"p"}"#);
    let store: Rc<RefCell<HashMap<String, Vec<u8>>>> = Rc::default();
    let md = metadata(&[
        ("cache_ttl_ms", Kind::NumberValue(1000.0)),
        ("include_body", Kind::BoolValue(true)),
    ]);
    let body = br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"my secret prompt"}]}"#;
    let run = |request_id: &str| {
        let (mut f, host) = request_with(
            Rc::clone(&shared),
            "chat",
            Some(md.clone()),
            &[
                ("x-request-id", request_id),
                ("x-api-key", "sk-secret"),
                ("x-tenant-id", "t1"),
            ],
        );
        {
            let mut r = host.0.borrow_mut();
            r.shared = Rc::clone(&store);
            r.body = body.to_vec();
            // `request_with` puts its own `x-request-id` first: this request's is the one.
            r.headers
                .retain(|(k, v)| k != "x-request-id" || v != b"rid-1");
        }
        f.on_request_headers(false);
        f.on_request_body(body.len(), true);
        (f, host)
    };
    let (mut first, host) = run("rid-1");
    host.0.borrow_mut().response_body = Some(ok_response());
    first.on_check_response(7, 0, 1);
    assert_eq!(metric(&host, Metric::CacheStore), 1);
    assert!(
        !host.0.borrow().log_fields.contains_key("arbiter_record"),
        "a decided request's record is the server's"
    );

    let (_, host) = run("rid-2");
    assert!(
        host.0.borrow().dispatched.is_empty(),
        "served from the cache"
    );
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Cached)), 1);
    let record = host.0.borrow().log_fields["arbiter_record"].clone();
    for secret in ["sk-secret", "my secret prompt"] {
        assert!(!record.contains(secret), "{secret} leaked into {record}");
    }
    let v: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(v["outcome"], "cached");
    assert_eq!(v["audit_id"], "a-1", "the decision that allowed it");
    assert_eq!(v["reason"], serde_json::Value::Null);
    assert_eq!(v["request_id"], "rid-2");
    assert_eq!(v["route"], "chat");
    assert_eq!(v["source"], "127.0.0.1:5555");
    assert_eq!(v["tenant"], "t1");
    assert_eq!(v["api_key_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(v["policy_version"], "v1");
    assert!(v["ts"].as_str().unwrap().starts_with("2026-11-18T"));
    // The body facts the server read when it allowed the first one.
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["stream"], true);
    assert_eq!(v["max_tokens"], 64);
    assert_eq!(v["message_count"], 1);
    assert_eq!(v["body_parse_error"], false);
    assert_eq!(v["body_bytes"], body.len());
    assert_eq!(v["body_size_known"], true);
    assert_eq!(v["body_truncated"], false);
}

#[test]
fn undecided_requests_leave_a_replayable_record_without_secrets() {
    let md = metadata(&[
        ("fail_mode", Kind::StringValue("open".into())),
        ("include_body", Kind::BoolValue(true)),
        (
            "context",
            Kind::StructValue(prost_types::Struct {
                fields: [(
                    "classification".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue("regulated".into())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
        ),
    ]);
    let (mut f, host) = request(
        "embeddings",
        Some(md),
        &[
            ("x-api-key", "sk-secret"),
            ("authorization", "Bearer tok"),
            ("x-tenant-id", "t1"),
        ],
    );
    {
        let mut r = host.0.borrow_mut();
        r.body = br#"{"model":"gpt-4o","input":"my secret prompt"}"#.to_vec();
        r.headers.iter_mut().for_each(|(k, v)| {
            if k == ":path" {
                *v = b"/v1/embeddings?key=sk-in-query".to_vec()
            }
        });
    }
    f.on_request_headers(false);
    let len = host.0.borrow().body.len();
    f.on_request_body(len, true);
    f.on_check_response(7, 14, 0);
    let record = host.0.borrow().log_fields["arbiter_record"].clone();
    for secret in ["sk-secret", "Bearer tok", "my secret prompt", "sk-in-query"] {
        assert!(!record.contains(secret), "{secret} leaked into {record}");
    }
    let v: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(v["outcome"], "fail_open");
    assert_eq!(v["reason"], "unreachable");
    assert_eq!(v["route"], "embeddings");
    assert_eq!(v["request_id"], "rid-1");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/v1/embeddings");
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(v["tenant"], "t1");
    assert_eq!(v["context"]["classification"], "regulated");
    assert_eq!(v["source"], "127.0.0.1:5555");
    assert_eq!(v["api_key_sha256"].as_str().unwrap().len(), 64);
    assert!(v["ts"].as_str().unwrap().starts_with("2026-11-18T"));
    assert_eq!(v["audit_id"], serde_json::Value::Null);
    // What the server would have read from the body.
    assert_eq!(v["body_parse_error"], false);
    assert_eq!(v["stream"], false);
    assert_eq!(v["max_tokens"], serde_json::Value::Null);
    assert_eq!(v["message_count"], serde_json::Value::Null);
    assert_eq!(v["body_size_known"], true);
    assert_eq!(v["body_truncated"], false);
}

fn http_sent(
    host: &MockHost,
) -> arbiter_proto::envoy::service::auth::v3::attribute_context::HttpRequest {
    sent(host)
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap()
}

fn body_route(max: f64) -> Vec<u8> {
    metadata(&[
        ("include_body", Kind::BoolValue(true)),
        ("max_body_bytes", Kind::NumberValue(max)),
    ])
}

#[test]
fn trailers_are_held_until_the_decision() {
    // Non-body route: the check is in flight when the trailers arrive.
    let (mut f, host) = request("chat", None, &[]);
    assert_eq!(f.on_request_headers(false), Flow::Pause);
    assert_eq!(f.on_request_body(5, false), Flow::Pause);
    assert_eq!(
        f.on_request_trailers(),
        Flow::Pause,
        "held with the request"
    );
    host.0.borrow_mut().response_body = Some(ok_response());
    assert_eq!(f.on_check_response(7, 0, 1), Flow::Continue);
    assert_eq!(host.0.borrow().resumed, 1);
    // After the decision nothing is held.
    assert_eq!(f.on_request_trailers(), Flow::Continue);

    // A denied request's trailers never release it.
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(false);
    assert_eq!(f.on_request_trailers(), Flow::Pause);
    host.0.borrow_mut().response_body = Some(
        CheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    assert_eq!(f.on_check_response(7, 0, 1), Flow::Pause);
    assert_eq!(host.0.borrow().local.as_ref().unwrap().0, 403);
    assert_eq!(host.0.borrow().resumed, 0);
}

#[test]
fn trailers_complete_the_body_on_body_routes() {
    let (mut f, host) = request("chat", Some(body_route(1000.0)), &[]);
    host.0.borrow_mut().body = br#"{"model":"m"}"#.to_vec();
    assert_eq!(f.on_request_headers(false), Flow::Pause);
    assert_eq!(f.on_request_body(13, false), Flow::Pause);
    assert!(host.0.borrow().dispatched.is_empty());
    assert_eq!(
        f.on_request_trailers(),
        Flow::Pause,
        "asks now, holds the trailers"
    );
    let http = http_sent(&host);
    assert_eq!(http.raw_body, br#"{"model":"m"}"#.to_vec());
    assert_eq!(http.size, 13, "the size received, without content-length");
    assert!(!http.headers.contains_key(PARTIAL_BODY_HEADER));

    // Trailers straight after the headers: an empty, complete body.
    let (mut f, host) = request("chat", Some(body_route(1000.0)), &[]);
    assert_eq!(f.on_request_headers(false), Flow::Pause);
    assert_eq!(f.on_request_trailers(), Flow::Pause);
    let http = http_sent(&host);
    assert_eq!((http.size, http.raw_body.len()), (0, 0));
}

#[test]
fn body_size_is_what_was_received_or_unknown() {
    let size_of =
        |md: Option<Vec<u8>>, headers: &[(&str, &str)], steps: &[(usize, bool)], eos: bool| {
            let (mut f, host) = request("chat", md, headers);
            host.0.borrow_mut().body = vec![b'x'; 100];
            f.on_request_headers(eos);
            for (buffered, end) in steps {
                f.on_request_body(*buffered, *end);
            }
            let http = http_sent(&host);
            (http.size, http.headers.contains_key(PARTIAL_BODY_HEADER))
        };
    // No body at all.
    assert_eq!(size_of(None, &[], &[], true), (0, false));
    assert_eq!(size_of(Some(body_route(10.0)), &[], &[], true), (0, false));
    // Non-body route: content-length, else unknown.
    assert_eq!(
        size_of(None, &[("content-length", "42")], &[], false),
        (42, false)
    );
    assert_eq!(size_of(None, &[], &[], false), (-1, false));
    // Body route, complete body: what arrived, even when content-length is absent.
    assert_eq!(
        size_of(Some(body_route(10.0)), &[], &[(3, false), (7, true)], false),
        (7, false)
    );
    assert_eq!(
        size_of(Some(body_route(10.0)), &[], &[(10, true)], false),
        (10, false)
    );
    // Over the limit in the last chunk: the whole size is known, the body cut.
    assert_eq!(
        size_of(Some(body_route(10.0)), &[], &[(11, true)], false),
        (11, true)
    );
    // Exactly the limit, then the end: whole, not cut.
    assert_eq!(
        size_of(
            Some(body_route(10.0)),
            &[],
            &[(10, false), (10, true)],
            false
        ),
        (10, false)
    );
    // Past the limit before the end: content-length if announced, else unknown.
    assert_eq!(
        size_of(
            Some(body_route(10.0)),
            &[],
            &[(10, false), (11, false)],
            false
        ),
        (-1, true)
    );
    assert_eq!(
        size_of(
            Some(body_route(10.0)),
            &[("content-length", "100")],
            &[(50, false)],
            false
        ),
        (100, true)
    );
}

#[test]
fn a_client_cannot_claim_a_partial_body() {
    let (mut f, host) = request(
        "chat",
        Some(body_route(1000.0)),
        &[
            ("x-envoy-auth-partial-body", "true"),
            ("X-Envoy-Auth-Partial-Body", "true"),
        ],
    );
    host.0.borrow_mut().body = br#"{"model":"forbidden"}"#.to_vec();
    f.on_request_headers(false);
    assert_eq!(
        header(&host, "x-envoy-auth-partial-body"),
        None,
        "removed upstream"
    );
    assert_eq!(header(&host, "X-Envoy-Auth-Partial-Body"), None);
    f.on_request_body(21, true);
    let http = http_sent(&host);
    assert!(
        !http.headers.contains_key(PARTIAL_BODY_HEADER),
        "policy reads the body"
    );
    assert_eq!(http.raw_body.len(), 21);
}

#[test]
fn gateway_credentials_reach_policy_but_never_the_upstream() {
    let (mut f, host) = request(
        "chat",
        None,
        &[("x-api-key", "sk-secret"), ("x-api-key", "two")],
    );
    f.on_request_headers(true);
    assert_eq!(header(&host, "x-api-key"), None);
    assert_eq!(http_sent(&host).headers["x-api-key"], "sk-secret,two");

    // Also on routes that skip the check, and for extra configured names.
    let shared =
        shared_with(r#"{"policy_cluster":"p","credential_headers":["x-api-key","x-gw-token"]}"#);
    let md = metadata(&[("disabled", Kind::BoolValue(true))]);
    let (mut f, host) = request_with(
        shared,
        "health",
        Some(md),
        &[("x-api-key", "k"), ("x-gw-token", "t")],
    );
    assert_eq!(f.on_request_headers(true), Flow::Continue);
    assert_eq!(header(&host, "x-api-key"), None);
    assert_eq!(header(&host, "x-gw-token"), None);

    // An empty list keeps them (an operator's explicit choice).
    let shared = shared_with(r#"{"policy_cluster":"p","credential_headers":[]}"#);
    let (mut f, host) = request_with(shared, "chat", None, &[("x-api-key", "k")]);
    f.on_request_headers(true);
    assert_eq!(header(&host, "x-api-key").as_deref(), Some("k"));
}

#[test]
fn a_cancelled_request_has_its_own_outcome() {
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(true);
    assert_eq!(host.0.borrow().log_fields["arbiter_outcome"], "cancelled");
    f.on_stream_end();
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Cancelled)), 1);
    // The late answer (if the host delivered one) changes nothing.
    host.0.borrow_mut().response_body = Some(ok_response());
    assert_eq!(f.on_check_response(7, 0, 1), Flow::Continue);
    assert_eq!(host.0.borrow().resumed, 0);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Allow)), 0);

    // Waiting for the body.
    let (mut f, host) = request("chat", Some(body_route(10.0)), &[]);
    f.on_request_headers(false);
    f.on_stream_end();
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Cancelled)), 1);

    // A decided request ends without a second outcome.
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(true);
    host.0.borrow_mut().response_body = Some(ok_response());
    f.on_check_response(7, 0, 1);
    assert_eq!(host.0.borrow().log_fields["arbiter_outcome"], "allow");
    f.on_stream_end();
    let total: u64 = Outcome::ALL
        .iter()
        .map(|o| metric(&host, Metric::Outcome(*o)))
        .sum();
    assert_eq!(total, 1);
}

#[test]
fn calls_envoy_cannot_start_leave_the_breaker_alone() {
    // Envoy sheds a call at once when the policy cluster's circuit breaker is full (and
    // when the cluster is not defined): no request waited, so the breaker must not count
    // it, or a burst that fills Envoy's breaker would hold this one open for its cool-down.
    let shared =
        shared_with(r#"{"policy_cluster":"p","breaker_threshold":2,"breaker_cooldown_ms":1000}"#);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut hosts = Vec::new();
    for i in 0..10 {
        let md = metadata(&[("fail_mode", Kind::StringValue("open".into()))]);
        let (mut f, host) = request_with(Rc::clone(&shared), "chat", Some(md), &[]);
        host.0.borrow_mut().now = Some(at(i));
        host.0.borrow_mut().dispatch_fails = true;
        assert_eq!(f.on_request_headers(true), Flow::Continue);
        assert_eq!(
            header(&host, "x-arbiter-fail-open").as_deref(),
            Some("unreachable")
        );
        hosts.push(host);
    }
    assert!(hosts.iter().all(|h| metric(h, Metric::BreakerOpened) == 0));
    // The next request is checked as usual.
    let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(20));
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert_eq!(
        host.0.borrow().dispatched.len(),
        1,
        "called, not breaker_open"
    );

    // A probe that cannot start hands its slot back: the next request probes.
    for _ in 0..2 {
        let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
        host.0.borrow_mut().now = Some(at(30));
        f.on_request_headers(true);
        f.on_check_response(7, 14, 0);
    }
    let (mut probe, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(1030));
    host.0.borrow_mut().dispatch_fails = true;
    probe.on_request_headers(true);
    let (mut next, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(1031));
    assert_eq!(next.on_request_headers(true), Flow::Pause);
    assert_eq!(host.0.borrow().dispatched.len(), 1, "the slot came back");
}

#[test]
fn a_cancelled_probe_does_not_wedge_the_breaker() {
    let shared =
        shared_with(r#"{"policy_cluster":"p","breaker_threshold":1,"breaker_cooldown_ms":1000}"#);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(0));
    f.on_request_headers(true);
    f.on_check_response(7, 4, 0);
    assert_eq!(metric(&host, Metric::BreakerOpened), 1);

    // The probe's client goes away before the answer.
    let (mut probe, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(1000));
    probe.on_request_headers(true);
    assert_eq!(host.0.borrow().dispatched.len(), 1, "the probe calls");
    probe.on_stream_end();

    // The server is back: the next request probes and closes the breaker.
    let (mut f, host) = request_with(Rc::clone(&shared), "chat", None, &[]);
    host.0.borrow_mut().now = Some(at(1001));
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert_eq!(
        host.0.borrow().dispatched.len(),
        1,
        "a new probe, not breaker_open"
    );
    host.0.borrow_mut().response_body = Some(ok_response());
    assert_eq!(f.on_check_response(7, 0, 1), Flow::Continue);
    assert_eq!(metric(&host, Metric::BreakerClosed), 1);
}

#[test]
fn a_request_the_server_refuses_is_closed_everywhere_and_spares_the_breaker() {
    let shared = shared_with(r#"{"policy_cluster":"p","breaker_threshold":2}"#);
    let open = metadata(&[("fail_mode", Kind::StringValue("open".into()))]);
    for status in [3, 11, 3, 11, 3] {
        let (mut f, host) = request_with(Rc::clone(&shared), "embeddings", Some(open.clone()), &[]);
        f.on_request_headers(true);
        host.0.borrow_mut().status_message = Some("bad request".into());
        assert_eq!(
            f.on_check_response(7, status, 0),
            Flow::Pause,
            "status {status}"
        );
        let (code, _, body) = host.0.borrow().local.clone().unwrap();
        assert_eq!(code, 503);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["reason"], "error");
        assert_eq!(header(&host, FAIL_OPEN_HEADER), None, "never let through");
        assert_eq!(metric(&host, Metric::BreakerOpened), 0);
        assert_eq!(metric(&host, Metric::Outcome(Outcome::FailClosed)), 1);
    }
    // The breaker is still closed: the next request calls.
    let (mut f, host) = request_with(shared, "chat", None, &[]);
    f.on_request_headers(true);
    assert_eq!(host.0.borrow().dispatched.len(), 1);
}

#[test]
fn the_check_request_never_exceeds_the_agreed_size() {
    let limit = arbiter_proto::MAX_CHECK_REQUEST_BYTES;
    let big = "h".repeat(10 * 1024 * 1024);
    let (mut f, host) = request(
        "chat",
        Some(body_route(8.0 * 1024.0 * 1024.0)),
        &[("x-big", big.as_str())],
    );
    host.0.borrow_mut().body = vec![b'b'; 8 * 1024 * 1024];
    f.on_request_headers(false);
    f.on_request_body(8 * 1024 * 1024, true);
    let msg_len = host.0.borrow().dispatched[0].1.len();
    assert!(msg_len <= limit, "{msg_len} > {limit}");
    let http = http_sent(&host);
    assert!(http.raw_body.len() < 8 * 1024 * 1024);
    assert_eq!(http.headers[PARTIAL_BODY_HEADER], "true");
    assert_eq!(http.size, 8 * 1024 * 1024, "the full size is still known");

    // Headers alone over the limit: refused without a call, whatever the route's mode.
    let huge = "h".repeat(limit + 1);
    let open = metadata(&[("fail_mode", Kind::StringValue("open".into()))]);
    let (mut f, host) = request("embeddings", Some(open), &[("x-huge", huge.as_str())]);
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert!(host.0.borrow().dispatched.is_empty());
    assert_eq!(host.0.borrow().local.as_ref().unwrap().0, 503);
}

#[test]
fn an_override_too_far_ahead_when_loaded_stays_refused() {
    let shared = shared_with(r#"{"policy_cluster":"p"}"#);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let until = OffsetDateTime::from(t0 + Duration::from_secs(36 * 3600))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let md = metadata(&[("fail_open_until", Kind::StringValue(until))]);
    for hours in [0, 13, 30] {
        let (mut f, host) = request_with(Rc::clone(&shared), "chat", Some(md.clone()), &[]);
        host.0.borrow_mut().now = Some(t0 + Duration::from_secs(hours * 3600));
        f.on_request_headers(true);
        assert_eq!(
            metric(&host, Metric::InvalidRouteConfig),
            1,
            "{hours} h later"
        );
        assert_eq!(metric(&host, Metric::OverrideActive), 0, "{hours} h later");
    }
}

#[test]
fn pre_1970_override_does_not_abort() {
    let md = metadata(&[(
        "fail_open_until",
        Kind::StringValue("1969-12-31T23:59:59Z".into()),
    )]);
    let (mut f, host) = request("chat", Some(md), &[]);
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert_eq!(metric(&host, Metric::InvalidRouteConfig), 0);
    assert_eq!(host.0.borrow().dispatched.len(), 1);
}

#[test]
fn a_body_still_streaming_is_released_by_its_next_chunk_not_by_a_resume() {
    for open in [false, true] {
        let md = open.then(|| metadata(&[("fail_mode", Kind::StringValue("open".into()))]));
        let (mut f, host) = request("chat", md, &[]);
        assert_eq!(f.on_request_headers(false), Flow::Pause);
        assert_eq!(
            f.on_request_body(100, false),
            Flow::Pause,
            "held while deciding"
        );
        if open {
            assert_eq!(f.on_check_response(7, 14, 0), Flow::Continue);
        } else {
            host.0.borrow_mut().response_body = Some(ok_response());
            assert_eq!(f.on_check_response(7, 0, 1), Flow::Continue);
        }
        assert_eq!(
            host.0.borrow().resumed,
            0,
            "no resume while Envoy holds paused bytes"
        );
        assert_eq!(
            f.on_request_body(50, false),
            Flow::Continue,
            "the next chunk releases"
        );
        assert_eq!(f.on_request_body(50, true), Flow::Continue);
        assert_eq!(host.0.borrow().resumed, 0);
    }

    // Trailers release it too.
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers(false);
    f.on_request_body(100, false);
    host.0.borrow_mut().response_body = Some(ok_response());
    f.on_check_response(7, 0, 1);
    assert_eq!(f.on_request_trailers(), Flow::Continue);
    assert_eq!(host.0.borrow().resumed, 0);

    // Nothing held, or the body already complete: resumed at once.
    for chunks in [vec![], vec![(100, true)]] {
        let (mut f, host) = request("chat", None, &[]);
        f.on_request_headers(false);
        for (n, end) in &chunks {
            f.on_request_body(*n, *end);
        }
        host.0.borrow_mut().response_body = Some(ok_response());
        f.on_check_response(7, 0, 1);
        assert_eq!(host.0.borrow().resumed, 1, "{chunks:?}");
    }
}

/// Route metadata holding only another filter's namespace (what Istio and Envoy Gateway
/// put on every route they generate).
fn foreign_metadata() -> Vec<u8> {
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        "istio".into(),
        prost_types::Struct {
            fields: [(
                "config".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StringValue("/apis/networking.istio.io/v1/x".into())),
                },
            )]
            .into_iter()
            .collect(),
        },
    );
    md.encode_to_vec()
}

const TABLE: &str = r#"{"policy_cluster":"p","timeout_ms":100,"routes":[
    {"name":"chat","match":{"authority":"gw","path_prefix":"/v1/chat/","method":"POST"},
     "settings":{"fail_mode":"open","timeout_ms":40,"context":{"classification":"regulated"}}},
    {"name":"health","match":{"path_prefix":"/healthz"},"settings":{"disabled":true}},
    {"name":"everything-else","settings":{"fail_mode":"closed","status_on_error":500}}]}"#;

#[test]
fn the_route_table_applies_to_routes_without_settings_metadata_and_names_the_route() {
    let shared = shared_with(TABLE);
    for md in [None, Some(foreign_metadata())] {
        let (mut f, host) = request_with(
            Rc::clone(&shared),
            "httproute/default/llm/rule/0/match/0/gw",
            md,
            &[],
        );
        assert_eq!(f.on_request_headers(true), Flow::Pause);
        let check = sent(&host);
        let ctx = &check.attributes.as_ref().unwrap().context_extensions;
        assert_eq!(ctx["route"], "chat", "policy sees the entry's name");
        assert_eq!(ctx["classification"], "regulated");
        assert_eq!(host.0.borrow().dispatched[0].2, Duration::from_millis(40));
        assert_eq!(host.0.borrow().log_fields["arbiter_route"], "chat");
        assert_eq!(f.on_check_response(7, 14, 0), Flow::Continue);
        assert!(
            header(&host, FAIL_OPEN_HEADER).is_some(),
            "the entry is open"
        );
    }
}

#[test]
fn route_metadata_wins_over_the_table_as_a_whole() {
    let shared = shared_with(TABLE);
    // The request matches `chat` (open, 40 ms), but the route's own settings say only
    // `timeout_ms`: nothing is taken from the entry, so the route is closed (the default).
    let md = metadata(&[("timeout_ms", Kind::NumberValue(70.0))]);
    let (mut f, host) = request_with(Rc::clone(&shared), "chat-route", Some(md), &[]);
    f.on_request_headers(true);
    let check = sent(&host);
    assert_eq!(
        check.attributes.as_ref().unwrap().context_extensions["route"],
        "chat-route"
    );
    assert_eq!(host.0.borrow().dispatched[0].2, Duration::from_millis(70));
    assert_eq!(f.on_check_response(7, 14, 0), Flow::Pause);
    assert_eq!(host.0.borrow().local.as_ref().unwrap().0, 503);

    // Invalid metadata is not replaced by the (open) entry: closed, counted.
    let md = metadata(&[("fail_mode", Kind::StringValue("sometimes".into()))]);
    let (mut f, host) = request_with(Rc::clone(&shared), "chat-route", Some(md), &[]);
    f.on_request_headers(true);
    assert_eq!(metric(&host, Metric::InvalidRouteConfig), 1);
    assert_eq!(f.on_check_response(7, 14, 0), Flow::Pause);
    assert_eq!(host.0.borrow().local.as_ref().unwrap().0, 503);
}

#[test]
fn table_entries_in_order_disabled_and_catch_all() {
    let shared = shared_with(TABLE);
    let (mut f, host) = request_with(Rc::clone(&shared), "", None, &[]);
    host.set_header(":path", "/healthz/ready");
    assert_eq!(f.on_request_headers(true), Flow::Continue);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Disabled)), 1);
    assert!(host.0.borrow().dispatched.is_empty());

    // GET on the chat path misses `chat` (method) and lands on the catch-all.
    let (mut f, host) = request_with(Rc::clone(&shared), "", None, &[]);
    host.set_header(":method", "GET");
    f.on_request_headers(true);
    assert_eq!(
        sent(&host).attributes.as_ref().unwrap().context_extensions["route"],
        "everything-else"
    );
    assert_eq!(f.on_check_response(7, 14, 0), Flow::Pause);
    assert_eq!(host.0.borrow().local.as_ref().unwrap().0, 500);
}

#[test]
fn without_a_matching_entry_the_plugin_defaults_apply_under_the_envoy_route_name() {
    let shared = shared_with(
        r#"{"policy_cluster":"p","routes":[{"name":"chat","match":{"path_prefix":"/v2/"},"settings":{"fail_mode":"open"}}]}"#,
    );
    let (mut f, host) = request_with(shared, "envoy-name", None, &[]);
    f.on_request_headers(true);
    assert_eq!(
        sent(&host).attributes.as_ref().unwrap().context_extensions["route"],
        "envoy-name"
    );
    assert_eq!(f.on_check_response(7, 14, 0), Flow::Pause, "closed default");
}

fn deny_response(audit_id: &str) -> Vec<u8> {
    use arbiter_proto::envoy::service::auth::v3::DeniedHttpResponse;
    CheckResponse {
        status: Some(Status {
            code: 7,
            message: "refused".into(),
            details: vec![],
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: None,
            headers: vec![],
            body: serde_json::json!({"error": {"type": "policy_denied", "audit_id": audit_id}})
                .to_string(),
        })),
        dynamic_metadata: None,
    }
    .encode_to_vec()
}

#[test]
fn a_dry_run_deny_goes_upstream_marked_and_nothing_of_the_deny_reaches_the_client() {
    let md = metadata(&[("dry_run", Kind::BoolValue(true))]);
    let (mut f, host) = request("rollout", Some(md), &[("x-arbiter-dry-run", "allow")]);
    assert_eq!(f.on_request_headers(true), Flow::Pause);
    assert_eq!(
        header(&host, "x-arbiter-dry-run"),
        None,
        "client copy stripped"
    );
    let ctx = sent(&host).attributes.unwrap().context_extensions;
    assert_eq!(ctx["dry_run"], "true", "the server is told, and records it");
    host.set_answer(Some(deny_response("a-9")));
    assert_eq!(f.on_check_response(7, 0, 0), Flow::Continue);
    assert!(host.local_reply().is_none());
    assert_eq!(host.resumed(), 1);
    assert_eq!(header(&host, "x-arbiter-dry-run").as_deref(), Some("deny"));
    assert_eq!(header(&host, "x-arbiter-audit-id").as_deref(), Some("a-9"));
    assert_eq!(metric(&host, Metric::Outcome(Outcome::DryRunDeny)), 1);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Deny)), 0);
    assert_eq!(
        host.0.borrow().log_fields["arbiter_outcome"],
        "dry_run_deny"
    );

    // An allow on a dry-run route is an ordinary allow, unmarked.
    let md = metadata(&[("dry_run", Kind::BoolValue(true))]);
    let (mut f, host) = request("rollout", Some(md), &[]);
    f.on_request_headers(true);
    host.set_answer(Some(ok_response()));
    assert_eq!(f.on_check_response(7, 0, 0), Flow::Continue);
    assert_eq!(header(&host, "x-arbiter-dry-run"), None);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Allow)), 1);
}

#[test]
fn dry_run_changes_nothing_else_and_an_invalid_dry_run_route_enforces() {
    // No decision on a closed dry-run route: still refused.
    let md = metadata(&[("dry_run", Kind::BoolValue(true))]);
    let (mut f, host) = request("rollout", Some(md), &[]);
    f.on_request_headers(true);
    assert_eq!(f.on_check_response(7, 14, 0), Flow::Pause);
    assert_eq!(host.local_reply().unwrap().0, 503);
    assert_eq!(header(&host, "x-arbiter-dry-run"), None);

    // Invalid settings: the route enforces (no dry run), and the server is not told.
    let md = metadata(&[
        ("dry_run", Kind::BoolValue(true)),
        ("fail_mode", Kind::StringValue("sometimes".into())),
    ]);
    let (mut f, host) = request("rollout", Some(md), &[]);
    f.on_request_headers(true);
    assert!(!sent(&host)
        .attributes
        .unwrap()
        .context_extensions
        .contains_key("dry_run"));
    host.set_answer(Some(deny_response("a-9")));
    assert_eq!(f.on_check_response(7, 0, 0), Flow::Pause);
    assert_eq!(host.local_reply().unwrap().0, 403);
    assert_eq!(metric(&host, Metric::Outcome(Outcome::Deny)), 1);

    // `dry_run` must be the setting, never a context entry, and must be a boolean.
    for md in [
        metadata(&[(
            "context",
            Kind::StructValue(prost_types::Struct {
                fields: [(
                    "dry_run".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue("true".into())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
        )]),
        metadata(&[("dry_run", Kind::StringValue("yes".into()))]),
    ] {
        let (mut f, host) = request("rollout", Some(md), &[]);
        f.on_request_headers(true);
        assert_eq!(metric(&host, Metric::InvalidRouteConfig), 1);
    }
}

#[test]
fn table_entries_can_be_dry_run() {
    let shared = shared_with(
        r#"{"policy_cluster":"p","routes":[{"name":"rollout","settings":{"dry_run":true}}]}"#,
    );
    let (mut f, host) = request_with(shared, "", None, &[]);
    f.on_request_headers(true);
    assert_eq!(
        sent(&host).attributes.unwrap().context_extensions["dry_run"],
        "true"
    );
    host.set_answer(Some(deny_response("a-1")));
    assert_eq!(f.on_check_response(7, 0, 0), Flow::Continue);
    assert_eq!(header(&host, "x-arbiter-dry-run").as_deref(), Some("deny"));
}

/// `jwt_authn` metadata whose `jwt_payload` holds `claims` (string values).
fn jwt_metadata(claims: &[(&str, &str)]) -> Metadata {
    let payload = prost_types::Struct {
        fields: claims
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue((*v).to_owned())),
                    },
                )
            })
            .collect(),
    };
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        "envoy.filters.http.jwt_authn".into(),
        prost_types::Struct {
            fields: [(
                "jwt_payload".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StructValue(payload)),
                },
            )]
            .into_iter()
            .collect(),
        },
    );
    md
}

/// The Envoy-side record of an undecided request for a JWT caller: its `metadata` is the
/// `jwt_authn` namespace as `audit replay` puts it back, with only the allowed claims.
fn undecided_record(config: &str) -> serde_json::Value {
    let shared = Rc::new(Shared::new(FilterConfig::parse(config.as_bytes()).unwrap()));
    let (mut f, host) = request_with(shared, "chat", None, &[]);
    let md = jwt_metadata(&[
        ("iss", "https://idp"),
        ("sub", "alice"),
        ("tenant", "acme"),
        ("groups", "eng"),
        ("email", "alice@example.com"),
        ("name", "Alice Example"),
    ]);
    host.0
        .borrow_mut()
        .properties
        .insert("metadata".into(), md.encode_to_vec());
    host.0.borrow_mut().dispatch_fails = true;
    f.on_request_headers(true);
    let record = host.0.borrow().log_fields["arbiter_record"].clone();
    serde_json::from_str(&record).unwrap()
}

#[test]
fn envoy_side_records_keep_only_allowed_jwt_claims_where_replay_reads_them() {
    let v = undecided_record(r#"{"policy_cluster":"p"}"#);
    assert_eq!(v["outcome"], "fail_closed");
    assert_eq!(
        v["metadata"],
        serde_json::json!({"jwt_payload": {"iss": "https://idp", "sub": "alice", "tenant": "acme", "groups": "eng"}}),
        "the default keeps iss, sub, tenant and groups, under the namespace's own keys"
    );
    assert_eq!(v["jwt_claims_withheld"], 2);
    let text = v.to_string();
    assert!(!text.contains("alice@example.com") && !text.contains("Alice Example"));

    let v = undecided_record(r#"{"policy_cluster":"p","record_jwt_claims":["email"]}"#);
    assert_eq!(
        v["metadata"]["jwt_payload"],
        serde_json::json!({"iss": "https://idp", "sub": "alice", "email": "alice@example.com"})
    );
    assert_eq!(v["jwt_claims_withheld"], 3);

    let v = undecided_record(r#"{"policy_cluster":"p","record_jwt_claims":["*"]}"#);
    assert_eq!(v["metadata"]["jwt_payload"].as_object().unwrap().len(), 6);
    assert_eq!(v["jwt_claims_withheld"], serde_json::Value::Null);
}

#[test]
fn record_jwt_claims_is_validated() {
    for bad in [
        r#"{"policy_cluster":"p","record_jwt_claims":"email"}"#,
        r#"{"policy_cluster":"p","record_jwt_claims":["*","email"]}"#,
        r#"{"policy_cluster":"p","record_jwt_claims":[""]}"#,
        r#"{"policy_cluster":"p","record_jwt_claims":["a b"]}"#,
        r#"{"policy_cluster":"p","record_jwt_claims":[5]}"#,
    ] {
        let e = FilterConfig::parse(bad.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("record_jwt_claims"), "{bad}: {e}");
    }
}
