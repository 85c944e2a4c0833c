//! proxy-wasm glue: registers the root context, and implements [`Host`] with host calls.
//!
//! Only `proxy_wasm::hostcalls` functions that return errors are used (the SDK's trait
//! helpers unwrap), and header values are read as bytes: a non-UTF-8 header must not
//! abort the VM, because a panic takes down every request on this worker.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use arbiter_proto::{CHECK_METHOD, CHECK_SERVICE};

use crate::config::FilterConfig;
use crate::filter::{Filter, Flow, Shared};
use crate::host::{DispatchError, Host, Level, Metric, LATENCY_HISTOGRAM};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Metric ids, defined once per VM.
#[derive(Debug, Default)]
struct Metrics {
    counters: HashMap<Metric, u32>,
    latency: Option<u32>,
}

impl Metrics {
    fn define() -> Self {
        let counters = Metric::all()
            .into_iter()
            .filter_map(|m| {
                hostcalls::define_metric(MetricType::Counter, &m.name())
                    .ok()
                    .map(|id| (m, id))
            })
            .collect();
        let latency = hostcalls::define_metric(MetricType::Histogram, LATENCY_HISTOGRAM).ok();
        Self { counters, latency }
    }
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
    metrics: Rc<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        // Judged at Envoy's clock: a route table override more than 24 h ahead is refused.
        let now = hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH);
        match FilterConfig::parse_at(&bytes, now) {
            Ok(config) => {
                self.metrics = Rc::new(Metrics::define());
                self.shared = Some(Rc::new(Shared::new(config)));
                true
            }
            Err(e) => {
                // One clear line; returning false makes Envoy reject the configuration.
                let _ = hostcalls::log(LogLevel::Critical, &format!("arbiter: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.as_ref()?;
        Some(Box::new(Http {
            filter: Filter::new(
                WasmHost {
                    metrics: Rc::clone(&self.metrics),
                },
                Rc::clone(shared),
            ),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    filter: Filter<WasmHost>,
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.filter
            .on_check_response(token_id, status_code, response_size);
    }
}

// The request's end: the SDK drops the context on `proxy_on_delete`, which Envoy calls when
// it destroys the stream's filter (after the access log was written, right after
// `proxy_on_done`). The module does not export `proxy_on_done` (`make wasm` removes it, with
// the other callbacks the filter does not use: wasm-exports/), which saves a VM entry per
// request.
impl Drop for Http {
    fn drop(&mut self) {
        self.filter.on_stream_end();
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.filter.on_request_headers(end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.filter.on_request_body(body_size, end_of_stream))
    }

    // Without this the SDK answers `Continue`, which releases a request paused for its
    // decision to the upstream.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.filter.on_request_trailers())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.filter.on_response_headers();
        Action::Continue
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        // In a body callback this means "stop and buffer"; in the trailers callback "stop".
        Flow::Pause => Action::Pause,
    }
}

struct WasmHost {
    metrics: Rc<Metrics>,
}

impl Host for WasmHost {
    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
    }

    fn request_body(&self, max: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, max)
            .ok()
            .flatten()
    }

    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(key).ok().and_then(|(v, _)| v)
    }

    fn shared_set(&self, key: &str, value: &[u8]) {
        // No CAS: the last writer of a slot wins, which is what a direct-mapped cache wants.
        let _ = hostcalls::set_shared_data(key, Some(value), None);
    }

    fn remove_request_header(&self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
    }

    fn set_request_header(&self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }

    fn add_request_header(&self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn add_response_header(&self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn set_log_field(&self, key: &str, value: &str) {
        let _ = hostcalls::set_property(vec![key], Some(value.as_bytes()));
    }

    fn dispatch_check(
        &self,
        cluster: &str,
        metadata: &[(&str, &[u8])],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, DispatchError> {
        hostcalls::dispatch_grpc_call(
            cluster,
            CHECK_SERVICE,
            CHECK_METHOD,
            metadata.to_vec(),
            Some(message),
            timeout,
        )
        .map_err(|status| DispatchError(format!("{status:?}")))
    }

    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .ok()
            .flatten()
    }

    fn grpc_status_message(&self) -> Option<String> {
        status::message()
    }

    fn send_local_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let _ = hostcalls::send_http_response(status, headers.to_vec(), Some(body));
    }

    fn resume_request(&self) {
        let _ = hostcalls::resume_http_request();
    }

    fn now(&self) -> SystemTime {
        hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
            Level::Debug => LogLevel::Debug,
        };
        let _ = hostcalls::log(level, message);
    }

    fn increment(&self, metric: Metric) {
        if let Some(id) = self.metrics.counters.get(&metric) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    fn record_latency(&self, micros: u64) {
        if let Some(id) = self.metrics.latency {
            let _ = hostcalls::record_metric(id, micros);
        }
    }
}

/// `proxy_get_status` without the SDK's `String::from_utf8(..).unwrap()`: the gRPC status
/// message comes from the peer and may be any bytes.
#[allow(unsafe_code)]
mod status {
    use std::ptr::null_mut;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_status(
            return_code: *mut u32,
            return_message_data: *mut *mut u8,
            return_message_size: *mut usize,
        ) -> u32;
    }

    pub(super) fn message() -> Option<String> {
        let mut code: u32 = 0;
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a buffer it allocated through this module's
        // `proxy_on_memory_allocate` (the SDK's allocator), which we take ownership of.
        let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
        if status != 0 || data.is_null() {
            return None;
        }
        // SAFETY: `data`/`size` describe the host-allocated buffer above.
        let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}
