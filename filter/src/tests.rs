//! State-machine tests against a recording [`Host`] double.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use prost::Message;
use prost_types::value::Kind;

use arbiter_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use arbiter_proto::envoy::service::auth::v3::{
    check_response::HttpResponse, CheckRequest, CheckResponse, OkHttpResponse,
};
use arbiter_proto::google::rpc::Status;

use crate::config::FilterConfig;
use crate::filter::{Filter, Flow, Shared};
use crate::host::{DispatchError, Host, Level, Metric, Outcome};
use crate::outcome::Reason;

type LocalReply = (u32, Vec<(String, String)>, Vec<u8>);

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
    logs: Vec<(Level, String)>,
    metrics: HashMap<Metric, u64>,
    latencies: Vec<u64>,
    response_headers: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct MockHost(Rc<RefCell<Recorded>>);

impl Host for MockHost {
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
        Ok(7)
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
        self.0
            .borrow()
            .now
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
    assert_eq!(f.on_request_headers(), Flow::Pause);
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
fn unknown_token_is_ignored() {
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers();
    assert_eq!(f.on_check_response(99, 0, 0), Flow::Continue);
    assert_eq!(host.0.borrow().resumed, 0);
}

#[test]
fn no_metadata_fails_closed_with_retry_after() {
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers();
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
    f.on_request_headers();
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
        f.on_request_headers();
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
    assert_eq!(f.on_request_headers(), Flow::Pause);
    assert!(host.0.borrow().dispatched.is_empty());
    let body = host.0.borrow().local.clone().unwrap().2;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["reason"], "invalid_route_config");
}

#[test]
fn disabled_route_makes_no_call() {
    let md = metadata(&[("disabled", Kind::BoolValue(true))]);
    let (mut f, host) = request("health", Some(md), &[("x-arbiter-fail-open", "yes")]);
    assert_eq!(f.on_request_headers(), Flow::Continue);
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
    assert_eq!(f.on_request_headers(), Flow::Continue);
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
    f.on_request_headers();
    f.on_check_response(7, 14, 0);
    assert_eq!(
        header(&host, "x-arbiter-fail-open").as_deref(),
        Some("unreachable")
    );
    assert_eq!(metric(&host, Metric::Override), 1);
    assert_eq!(host.0.borrow().log_fields["arbiter_override"], "true");
}

#[test]
fn bad_response_and_error() {
    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers();
    host.0.borrow_mut().response_body = Some(vec![0xff, 0xff, 0xff, 0xff]);
    f.on_check_response(7, 0, 4);
    assert_eq!(metric(&host, Metric::NoDecision(Reason::BadResponse)), 1);

    let (mut f, host) = request("chat", None, &[]);
    f.on_request_headers();
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
    assert_eq!(f.on_request_headers(), Flow::Pause);
    assert_eq!(host.0.borrow().dispatched.len(), 1);
}
