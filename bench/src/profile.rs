//! `arbiter-bench profile`: the filter's per-request work, run natively against a counting
//! [`Host`] double, to tell where a request's cost goes without a profiler inside V8.
//!
//! It reports (1) the host calls one allowed request makes and the bytes each copies across
//! the wasm boundary — in Envoy every one is a VM exit, a lookup and a copy — and (2) native
//! nanoseconds for the whole request path, for building + encoding the CheckRequest alone,
//! and for decoding the answer alone. Compiled to wasm and run by V8 the same code is
//! slower by a small factor; the host calls cost what Envoy makes them cost, which only an
//! Envoy-side measurement (the benchmark's CPU seconds per 1,000 requests) shows.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use arbiter_filter::check::encode_check_request;
use arbiter_filter::config::FilterConfig;
use arbiter_filter::filter::{Filter, Flow, Shared};
use arbiter_filter::host::{DispatchError, Host, Level, Metric};
use arbiter_filter::outcome::{decode_response, Verdict};
use arbiter_policy_server::PolicyEngine;
use arbiter_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use arbiter_proto::envoy::service::auth::v3::{
    check_response::HttpResponse, CheckResponse, OkHttpResponse,
};
use arbiter_proto::google::rpc::Status;
use prost::Message;
use serde::Serialize;

use crate::grpc::{chat_check_request, chat_request_info};

/// Host calls, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    RequestHeaders,
    Property,
    SetLogField,
    DispatchCheck,
    GrpcResponseBody,
    SetRequestHeader,
    AddRequestHeader,
    RemoveRequestHeader,
    AddResponseHeader,
    SharedData,
    Metric,
    Time,
    Log,
    Other,
}

const CALLS: [(Call, &str); 14] = [
    (Call::RequestHeaders, "get request headers (whole map)"),
    (Call::Property, "get_property"),
    (Call::SetLogField, "set_property (access-log filter state)"),
    (Call::DispatchCheck, "dispatch_grpc_call"),
    (Call::GrpcResponseBody, "get gRPC response body"),
    (Call::SetRequestHeader, "replace request header"),
    (Call::AddRequestHeader, "add request header"),
    (Call::RemoveRequestHeader, "remove request header"),
    (Call::AddResponseHeader, "add response header"),
    (Call::SharedData, "shared data get/set"),
    (Call::Metric, "metric increment / record"),
    (Call::Time, "get current time"),
    (Call::Log, "log"),
    (Call::Other, "other"),
];

#[derive(Default)]
struct Counts {
    calls: [Cell<u64>; 14],
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
}

/// What Envoy would hand the filter for the benchmark's chat request.
struct World {
    headers: Vec<(String, Vec<u8>)>,
    properties: HashMap<String, Vec<u8>>,
    response: Vec<u8>,
    shared: RefCell<HashMap<String, Vec<u8>>>,
    counts: Counts,
    now: SystemTime,
}

#[derive(Clone)]
struct CountingHost(Rc<World>);

impl CountingHost {
    fn count(&self, call: Call, bytes_in: usize, bytes_out: usize) {
        let c = &self.0.counts;
        let slot = &c.calls[CALLS.iter().position(|(k, _)| *k == call).unwrap_or(13)];
        slot.set(slot.get() + 1);
        c.bytes_in.set(c.bytes_in.get() + bytes_in as u64);
        c.bytes_out.set(c.bytes_out.get() + bytes_out as u64);
    }
}

impl Host for CountingHost {
    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        let headers = self.0.headers.clone();
        let bytes = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.count(Call::RequestHeaders, bytes, 0);
        headers
    }
    fn request_body(&self, _max: usize) -> Option<Vec<u8>> {
        self.count(Call::Other, 0, 0);
        None
    }
    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        let value = self.0.shared.borrow().get(key).cloned();
        self.count(
            Call::SharedData,
            value.as_ref().map_or(0, Vec::len),
            key.len(),
        );
        value
    }
    fn shared_set(&self, key: &str, value: &[u8]) {
        self.count(Call::SharedData, 0, key.len() + value.len());
        self.0
            .shared
            .borrow_mut()
            .insert(key.to_owned(), value.to_vec());
    }
    fn remove_request_header(&self, name: &str) {
        self.count(Call::RemoveRequestHeader, 0, name.len());
    }
    fn set_request_header(&self, name: &str, value: &str) {
        self.count(Call::SetRequestHeader, 0, name.len() + value.len());
    }
    fn add_request_header(&self, name: &str, value: &str) {
        self.count(Call::AddRequestHeader, 0, name.len() + value.len());
    }
    fn add_response_header(&self, name: &str, value: &str) {
        self.count(Call::AddResponseHeader, 0, name.len() + value.len());
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let value = self.0.properties.get(&path.join(".")).cloned();
        self.count(
            Call::Property,
            value.as_ref().map_or(0, Vec::len),
            path.iter().map(|p| p.len()).sum(),
        );
        value
    }
    fn set_log_field(&self, key: &str, value: &str) {
        self.count(Call::SetLogField, 0, key.len() + value.len());
    }
    fn dispatch_check(
        &self,
        cluster: &str,
        metadata: &[(&str, &[u8])],
        message: &[u8],
        _timeout: Duration,
    ) -> Result<u32, DispatchError> {
        let md: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.count(Call::DispatchCheck, 0, cluster.len() + md + message.len());
        Ok(1)
    }
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
        let body = self.0.response[..size.min(self.0.response.len())].to_vec();
        self.count(Call::GrpcResponseBody, body.len(), 0);
        Some(body)
    }
    fn grpc_status_message(&self) -> Option<String> {
        self.count(Call::Other, 0, 0);
        None
    }
    fn send_local_response(&self, _status: u32, _headers: &[(&str, &str)], _body: &[u8]) {
        self.count(Call::Other, 0, 0);
    }
    fn resume_request(&self) {
        self.count(Call::Other, 0, 0);
    }
    fn now(&self) -> SystemTime {
        self.count(Call::Time, 0, 0);
        self.0.now
    }
    fn log(&self, _level: Level, message: &str) {
        self.count(Call::Log, 0, message.len());
    }
    fn increment(&self, _metric: Metric) {
        self.count(Call::Metric, 0, 0);
    }
    fn record_latency(&self, _micros: u64) {
        self.count(Call::Metric, 0, 0);
    }
}

/// One host-call kind's count per request.
#[derive(Debug, Clone, Serialize)]
pub struct CallCount {
    /// What the call does in Envoy.
    pub call: String,
    /// Calls per allowed request.
    pub per_request: u64,
}

/// The profile's results.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Host calls of one allowed request, by kind.
    pub host_calls: Vec<CallCount>,
    /// All host calls of one request.
    pub host_calls_total: u64,
    /// Bytes copied from Envoy into the VM per request.
    pub bytes_into_vm: u64,
    /// Bytes copied from the VM to Envoy per request.
    pub bytes_out_of_vm: u64,
    /// Encoded CheckRequest size.
    pub check_request_bytes: usize,
    /// Encoded CheckResponse (allow) size.
    pub check_response_bytes: usize,
    /// Native ns for headers → dispatch → allow → response headers (host calls are free
    /// here).
    pub request_path_ns: f64,
    /// Native ns for building and encoding the CheckRequest.
    pub build_and_encode_ns: f64,
    /// Native ns for decoding the allow answer.
    pub decode_response_ns: f64,
    /// The policy engine alone (`PolicyEngine::decide`, no gRPC, no logging): µs per
    /// decision of the benchmark request, by bundle size.
    pub engine_decide_us: Vec<(usize, f64)>,
}

/// Runs the profile (about a second).
pub async fn run() -> Result<Profile> {
    let listener = SocketAddr::from(([127, 0, 0, 1], 10000));
    let info = chat_request_info(listener);
    let mut headers: Vec<(String, Vec<u8>)> = info
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    // Envoy's own request headers that the filter sees too.
    headers.push(("user-agent".into(), b"arbiter-bench".to_vec()));

    // The route metadata of the `chat` route, as Envoy hands it over.
    let route_metadata = Metadata {
        filter_metadata: [(
            "arbiter".to_owned(),
            prost_types::Struct {
                fields: [
                    (
                        "fail_mode",
                        prost_types::value::Kind::StringValue("closed".into()),
                    ),
                    ("timeout_ms", prost_types::value::Kind::NumberValue(200.0)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), prost_types::Value { kind: Some(v) }))
                .collect(),
            },
        )]
        .into_iter()
        .collect(),
        ..Metadata::default()
    }
    .encode_to_vec();
    let mut properties = HashMap::new();
    properties.insert("xds.route_name".to_owned(), b"chat".to_vec());
    properties.insert("xds.route_metadata".to_owned(), route_metadata);
    properties.insert("source.address".to_owned(), b"127.0.0.1:40000".to_vec());
    properties.insert(
        "destination.address".to_owned(),
        listener.to_string().into_bytes(),
    );
    properties.insert("request.protocol".to_owned(), b"HTTP/1.1".to_vec());
    // No dynamic metadata on the request: Envoy still answers the read.
    properties.insert("metadata".to_owned(), Vec::new());

    // The server's allow, as `arbiter-policy-server` shapes it (two headers to set, the
    // decision in dynamic metadata).
    let response = allow_response().encode_to_vec();
    if !matches!(decode_response(&response), Verdict::Allow { .. }) {
        anyhow::bail!("the profile's CheckResponse does not decode as an allow");
    }

    let config = FilterConfig::parse(br#"{"policy_cluster":"arbiter_policy","timeout_ms":200}"#)
        .map_err(|e| anyhow::anyhow!("plugin configuration: {e}"))?;
    let shared = Rc::new(Shared::new(config));
    let world = Rc::new(World {
        headers,
        properties,
        response,
        shared: RefCell::new(HashMap::new()),
        counts: Counts::default(),
        now: SystemTime::now(),
    });
    let host = CountingHost(Rc::clone(&world));
    let one = |host: &CountingHost| -> Result<()> {
        let mut filter = Filter::new(host.clone(), Rc::clone(&shared));
        if filter.on_request_headers(false) != Flow::Pause {
            anyhow::bail!("the filter did not call the policy server");
        }
        if filter.on_check_response(1, 0, host.0.response.len()) != Flow::Continue {
            anyhow::bail!("the filter did not allow the request");
        }
        filter.on_response_headers();
        Ok(())
    };
    // Route settings are parsed once per VM: count the steady state, not the first request.
    one(&host)?;
    let before: Vec<u64> = world.counts.calls.iter().map(Cell::get).collect();
    let (in0, out0) = (world.counts.bytes_in.get(), world.counts.bytes_out.get());
    one(&host)?;
    let host_calls: Vec<CallCount> = CALLS
        .iter()
        .enumerate()
        .map(|(i, (_, name))| CallCount {
            call: (*name).to_owned(),
            per_request: world.counts.calls[i].get() - before[i],
        })
        .filter(|c| c.per_request > 0)
        .collect();
    let bytes_into_vm = world.counts.bytes_in.get() - in0;
    let bytes_out_of_vm = world.counts.bytes_out.get() - out0;

    let request_path_ns = time_per_iter(|| one(&host).is_ok());
    let now = SystemTime::now();
    let build_and_encode_ns = time_per_iter(|| !encode_check_request(&info, &[], now).is_empty());
    let check_request_bytes = encode_check_request(&info, &[], now).len();
    let build_and_encode_ns = build_and_encode_ns.max(0.0);
    let decode_response_ns =
        time_per_iter(|| matches!(decode_response(&world.response), Verdict::Allow { .. }));
    let mut engine_decide_us = Vec::new();
    let bundles = tempfile::Builder::new()
        .prefix("arbiter-bench-profile-")
        .tempdir()?;
    let request = arbiter_policy_server::AuthzRequest::try_from(chat_check_request()?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for size in ENGINE_SIZES {
        let dir = bundles.path().join(size.to_string());
        crate::policies::write_bundle(&dir, size)?;
        let engine =
            PolicyEngine::load(&dir).with_context(|| format!("loading {size} policies"))?;
        engine_decide_us.push((
            size,
            time_bounded(|| engine.decide(&request).is_ok()) / 1000.0,
        ));
    }
    Ok(Profile {
        engine_decide_us,
        host_calls_total: host_calls.iter().map(|c| c.per_request).sum(),
        host_calls,
        bytes_into_vm,
        bytes_out_of_vm,
        check_request_bytes,
        check_response_bytes: world.response.len(),
        request_path_ns,
        build_and_encode_ns,
        decode_response_ns,
    })
}

/// An allow like the server's: audit id and policy version headers, decision metadata.
fn allow_response() -> CheckResponse {
    let header = |k: &str, v: &str| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.to_owned(),
            value: v.to_owned(),
            ..HeaderValue::default()
        }),
        // OVERWRITE_IF_EXISTS_OR_ADD, as the server sends.
        append_action: 2,
        ..HeaderValueOption::default()
    };
    let string = |v: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(v.to_owned())),
    };
    let version = "ai-gateway@sha256:0123456789abcdef";
    let audit_id = "019a9b8e-5f0c-7cc1-9a4e-2f7d2b8f6e10";
    CheckResponse {
        status: Some(Status {
            code: 0,
            ..Status::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![
                header("x-arbiter-audit-id", audit_id),
                header("x-arbiter-policy-version", version),
            ],
            ..OkHttpResponse::default()
        })),
        dynamic_metadata: Some(prost_types::Struct {
            fields: [
                ("policy_version", version),
                ("decision", "allow"),
                ("audit_id", audit_id),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), string(v)))
            .collect(),
        }),
    }
}

/// Bundle sizes of the engine timing.
const ENGINE_SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

/// Median of 3 rounds of ns per call, each round ≥ 50 ms or one call (for slow calls).
fn time_bounded(mut f: impl FnMut() -> bool) -> f64 {
    let mut rounds: Vec<f64> = (0..3)
        .map(|_| {
            let start = Instant::now();
            let mut n = 0u64;
            while n == 0 || start.elapsed() < Duration::from_millis(50) {
                black_box(f());
                n += 1;
            }
            start.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[1]
}

/// Median over 5 rounds of the mean ns per call of `f`, each round ~100 ms.
fn time_per_iter(mut f: impl FnMut() -> bool) -> f64 {
    let mut n = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..n {
            black_box(f());
        }
        if start.elapsed() >= Duration::from_millis(20) || n >= 1 << 24 {
            break;
        }
        n *= 2;
    }
    let n = n * 5;
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(f());
            }
            start.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

impl Profile {
    /// Markdown summary.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut md = String::from("## Filter per-request work (native, counting host double)\n\n| host call | per allowed request |\n|---|---:|\n");
        for c in &self.host_calls {
            let _ = writeln!(md, "| {} | {} |", c.call, c.per_request);
        }
        let _ = writeln!(
            md,
            "| **total** | **{}** |\n\nBytes copied into the VM per request: {}; out of the VM: {}. CheckRequest {} bytes, CheckResponse {} bytes.\n\n| native work | ns |\n|---|---:|\n| whole request path (host calls free) | {:.0} |\n| build + encode CheckRequest | {:.0} |\n| decode CheckResponse | {:.0} |\n",
            self.host_calls_total,
            self.bytes_into_vm,
            self.bytes_out_of_vm,
            self.check_request_bytes,
            self.check_response_bytes,
            self.request_path_ns,
            self.build_and_encode_ns,
            self.decode_response_ns
        );
        md.push_str("\n| policies | `PolicyEngine::decide` µs (native, no gRPC) |\n|---:|---:|\n");
        for (size, us) in &self.engine_decide_us {
            let _ = writeln!(md, "| {size} | {us:.1} |");
        }
        md
    }
}
