//! Traces: one OpenTelemetry span per `Check`, continuing the caller's W3C `traceparent`,
//! exported over OTLP/gRPC.
//!
//! The server's spans are ordinary `tracing` spans with target [`TARGET`]; with
//! `--otlp-traces-endpoint` a `tracing-opentelemetry` layer turns them (and nothing else: no
//! events, no spans of other targets) into OpenTelemetry spans, sampled parent-based, and the
//! [`Batcher`] exports them. Without it nothing takes these spans and they cost a disabled
//! callsite check.
//!
//! Export never slows a decision: a finished span is put on a bounded queue without waiting
//! (a full queue drops it), and one task on the runtime sends batches. A span that is dropped
//! or whose batch the collector does not take counts in `arbiter_trace_spans_dropped_total`.

use std::sync::LazyLock;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{filter_fn, Filtered};

use crate::audit::TraceParent;

/// `tracing` target of the spans that are exported (and only of those).
pub const TARGET: &str = "arbiter::trace";
/// Name of the span covering one `Check`.
pub const CHECK_SPAN: &str = "arbiter.check";
/// `service.name` of the exported resource (the same as the audit records').
pub const SERVICE_NAME: &str = crate::audit::export::SERVICE_NAME;
/// Standard variable naming the OTLP traces endpoint, honoured when the flag is not given.
pub const OTEL_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// How spans are sampled and batched.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// OTLP/gRPC receiver, e.g. `http://collector:4317`.
    pub endpoint: String,
    /// Share of new (root) traces that are sampled, 0.0–1.0. Requests carrying a
    /// `traceparent` follow its sampled flag instead.
    pub root_sample_ratio: f64,
    /// How export batches.
    pub batch: BatchSettings,
}

impl TraceConfig {
    /// Exports to `endpoint`, every root sampled, default batching.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            root_sample_ratio: 1.0,
            batch: BatchSettings::default(),
        }
    }
}

/// Queue and batch bounds of the [`Batcher`].
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Finished spans held at most; more are dropped (and counted).
    pub queue: usize,
    /// Spans per export call at most.
    pub batch: usize,
    /// Longest a finished span waits before its batch is sent.
    pub delay: Duration,
    /// Bound on one export call; a batch not taken by then is dropped (and counted).
    pub export_timeout: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            queue: 2048,
            batch: 512,
            delay: Duration::from_secs(1),
            export_timeout: Duration::from_secs(5),
        }
    }
}

/// Why tracing cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The exporter cannot be built (an invalid endpoint).
    #[error("invalid OTLP traces endpoint `{endpoint}`: {reason}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// Span counters, registered as `arbiter_trace_*`.
#[derive(Debug, Clone, Default)]
pub struct TraceMetrics {
    /// Spans handed to the collector.
    pub exported: Counter,
    /// Spans lost: the queue was full, or the collector did not take their batch.
    pub dropped: Counter,
}

impl TraceMetrics {
    /// Registers the counters under `trace_` (the server's registry adds `arbiter_`).
    pub fn register(&self, registry: &mut Registry) {
        let trace = registry.sub_registry_with_prefix("trace");
        trace.register(
            "spans_exported",
            "Spans accepted by the OTLP traces receiver",
            self.exported.clone(),
        );
        trace.register(
            "spans_dropped",
            "Spans lost: export queue full, or the receiver did not take their batch",
            self.dropped.clone(),
        );
    }
}

/// The process's trace counters (tracing is process-wide, like the `tracing` subscriber).
pub fn metrics() -> &'static TraceMetrics {
    static METRICS: LazyLock<TraceMetrics> = LazyLock::new(TraceMetrics::default);
    &METRICS
}

/// Running trace export; [`Tracing::shutdown`] sends what is left.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    control: mpsc::UnboundedSender<Control>,
}

/// The `tracing` layer exporting the server's spans (target [`TARGET`] only).
pub type Layer<S> = Filtered<
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
    tracing_subscriber::filter::FilterFn,
    S,
>;

impl Tracing {
    /// Starts exporting to `config.endpoint` and returns the layer to add to the subscriber.
    /// Must run inside a Tokio runtime (the export task and the gRPC channel live there);
    /// nothing connects until the first batch.
    pub fn start<S>(config: &TraceConfig) -> Result<(Self, Layer<S>), TraceError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.batch.export_timeout)
            .build()
            .map_err(|e| TraceError::Endpoint {
                endpoint: config.endpoint.clone(),
                reason: e.to_string(),
            })?;
        let resource = Resource::builder()
            .with_service_name(SERVICE_NAME)
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        exporter.set_resource(&resource);
        let (batcher, control) = Batcher::start(exporter, config.batch, metrics().clone());
        let ratio = config.root_sample_ratio.clamp(0.0, 1.0);
        let root = if ratio >= 1.0 {
            Sampler::AlwaysOn
        } else {
            Sampler::TraceIdRatioBased(ratio)
        };
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(root)))
            .with_resource(resource)
            .with_span_processor(batcher)
            .build();
        Ok((
            Self {
                provider: provider.clone(),
                control,
            },
            layer(provider.tracer(SERVICE_NAME)),
        ))
    }

    /// Sends the spans still queued, waiting `timeout` at most (a collector that is down
    /// must not hold up the exit).
    pub async fn shutdown(self, timeout: Duration) {
        let (ack, acked) = oneshot::channel();
        let stop = Control {
            ack: Ack::Async(ack),
            stop: true,
        };
        if self.control.send(stop).is_ok() && tokio::time::timeout(timeout, acked).await.is_err() {
            tracing::warn!("trace export: spans still queued after {timeout:?} were not sent");
        }
        drop(self.provider);
    }
}

/// The `tracing-opentelemetry` layer for `tracer`, filtered to the spans of [`TARGET`].
pub fn layer<S, T>(
    tracer: T,
) -> Filtered<
    tracing_opentelemetry::OpenTelemetryLayer<S, T>,
    tracing_subscriber::filter::FilterFn,
    S,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    T: opentelemetry::trace::Tracer + 'static,
    T::Span: Send + Sync,
{
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::OpenTelemetryLayer::new(tracer)
        // Only what the span's fields say: no source locations, threads or busy/idle times.
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_level(false)
        .with_target(false)
        .with_filter(filter_fn(|meta| meta.is_span() && meta.target() == TARGET))
}

/// The span of one `Check`: a child of `parent` when the request carried a valid
/// `traceparent`, else the root of a new trace. Its attributes (route, decision, policy
/// version, audit id, request id) are recorded as they become known; headers, tokens, API
/// keys and prompt text are never put on it.
pub fn check_span(parent: Option<&TraceParent>) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        CHECK_SPAN,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = "envoy.service.auth.v3.Authorization",
        rpc.method = "Check",
        arbiter.route = tracing::field::Empty,
        arbiter.request_id = tracing::field::Empty,
        arbiter.decision = tracing::field::Empty,
        arbiter.policy_version = tracing::field::Empty,
        arbiter.policy_ids = tracing::field::Empty,
        arbiter.audit.id = tracing::field::Empty,
        arbiter.audit.seq = tracing::field::Empty,
    );
    if !span.is_disabled() {
        if let Some(context) = parent.and_then(remote_context) {
            // Fails only when no OpenTelemetry layer takes the span: nothing to continue then.
            let _ = span.set_parent(context);
        }
    }
    span
}

/// Marks `span` as failed with a fixed `description` (never request data).
pub fn fail(span: &tracing::Span, description: &'static str) {
    span.record("otel.status_code", "error");
    span.record("otel.status_description", description);
}

/// The OpenTelemetry context of a remote parent span.
pub fn remote_context(parent: &TraceParent) -> Option<Context> {
    let trace_id = TraceId::from_hex(&parent.trace_id).ok()?;
    let span_id = SpanId::from_hex(&parent.parent_id).ok()?;
    let flags = if parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let context = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    context
        .is_valid()
        .then(|| Context::new().with_remote_span_context(context))
}

/// A request to the export task: send what is queued, then acknowledge (and stop).
#[derive(Debug)]
struct Control {
    ack: Ack,
    stop: bool,
}

#[derive(Debug)]
enum Ack {
    /// From the SDK's synchronous `force_flush` / `shutdown`.
    Blocking(std::sync::mpsc::SyncSender<()>),
    /// From [`Tracing::shutdown`].
    Async(oneshot::Sender<()>),
}

impl Ack {
    fn send(self) {
        match self {
            Ack::Blocking(tx) => {
                let _ = tx.try_send(());
            }
            Ack::Async(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// Span processor: queues finished, sampled spans without blocking and exports them in
/// batches from a task on the Tokio runtime.
#[derive(Debug)]
pub struct Batcher {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    metrics: TraceMetrics,
}

impl Batcher {
    /// Spawns the export task (on the current Tokio runtime) sending to `exporter`; the
    /// returned sender asks it to flush.
    fn start<E>(
        exporter: E,
        settings: BatchSettings,
        metrics: TraceMetrics,
    ) -> (Self, mpsc::UnboundedSender<Control>)
    where
        E: SpanExporter + 'static,
    {
        let (spans, queued) = mpsc::channel(settings.queue.max(1));
        let (control, requests) = mpsc::unbounded_channel();
        tokio::spawn(export_loop(
            exporter,
            settings,
            queued,
            requests,
            metrics.clone(),
        ));
        (
            Self {
                spans,
                control: control.clone(),
                metrics,
            },
            control,
        )
    }

    /// Asks the task to send what is queued and waits `timeout` at most. Blocks the calling
    /// thread: the SDK calls it only on explicit `force_flush`/`shutdown`.
    fn flush(&self, timeout: Duration, stop: bool) -> OTelSdkResult {
        let (ack, acked) = std::sync::mpsc::sync_channel(1);
        let request = Control {
            ack: Ack::Blocking(ack),
            stop,
        };
        self.control
            .send(request)
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        acked
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Never waits: a full queue (collector slow or down) loses the span, counted.
        if self.spans.try_send(span).is_err() {
            self.metrics.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(Duration::from_secs(5), false)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush(timeout, true)
    }
}

async fn export_loop<E: SpanExporter>(
    exporter: E,
    settings: BatchSettings,
    mut queued: mpsc::Receiver<SpanData>,
    mut requests: mpsc::UnboundedReceiver<Control>,
    metrics: TraceMetrics,
) {
    let mut batch = Vec::new();
    let mut due = None;
    let mut sender = Sender {
        exporter,
        settings,
        metrics,
        failing: false,
    };
    loop {
        let timer = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            Some(request) = requests.recv() => {
                while let Ok(span) = queued.try_recv() {
                    batch.push(span);
                    if batch.len() >= settings.batch {
                        sender.send(std::mem::take(&mut batch)).await;
                    }
                }
                sender.send(std::mem::take(&mut batch)).await;
                due = None;
                request.ack.send();
                if request.stop {
                    return;
                }
            }
            span = queued.recv() => {
                let Some(span) = span else {
                    // The processor is gone.
                    sender.send(std::mem::take(&mut batch)).await;
                    return;
                };
                if batch.is_empty() {
                    due = Some(tokio::time::Instant::now() + settings.delay);
                }
                batch.push(span);
                if batch.len() >= settings.batch {
                    sender.send(std::mem::take(&mut batch)).await;
                    due = None;
                }
            }
            () = timer => {
                sender.send(std::mem::take(&mut batch)).await;
                due = None;
            }
        }
    }
}

struct Sender<E> {
    exporter: E,
    settings: BatchSettings,
    metrics: TraceMetrics,
    failing: bool,
}

impl<E: SpanExporter> Sender<E> {
    /// One export call (the OTLP exporter retries an `UNAVAILABLE` a few times inside it);
    /// spans the receiver does not take within the bound are dropped: traces are best
    /// effort, and holding on to them would grow the backlog during an outage.
    async fn send(&mut self, batch: Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        let result =
            tokio::time::timeout(self.settings.export_timeout, self.exporter.export(batch)).await;
        match result {
            Ok(Ok(())) => {
                self.metrics.exported.inc_by(count);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export: the OTLP receiver takes spans again");
                }
            }
            Ok(Err(e)) => self.failed(count, &e.to_string()),
            Err(_) => self.failed(count, "timed out"),
        }
    }

    fn failed(&mut self, count: u64, why: &str) {
        self.metrics.dropped.inc_by(count);
        // One warning per outage, not one per batch.
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(dropped = count, "trace export failed, spans dropped: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer as _};
    use std::sync::{Arc, Mutex};

    /// Keeps what it is sent; `hold` makes every export hang until the test ends.
    #[derive(Debug, Clone, Default)]
    struct Fake {
        spans: Arc<Mutex<Vec<SpanData>>>,
        hold: bool,
    }

    impl SpanExporter for Fake {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.hold {
                std::future::pending::<()>().await;
            }
            self.spans.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn provider(exporter: Fake, settings: BatchSettings) -> (SdkTracerProvider, TraceMetrics) {
        let metrics = TraceMetrics::default();
        let (batcher, _control) = Batcher::start(exporter, settings, metrics.clone());
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_span_processor(batcher)
            .build();
        (provider, metrics)
    }

    #[test]
    fn remote_context_keeps_ids_and_sampled_flag() {
        let parent = TraceParent {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            parent_id: "00f067aa0ba902b7".into(),
            sampled: false,
        };
        let context = remote_context(&parent).unwrap();
        let span = context.span();
        let span_context = span.span_context();
        assert_eq!(
            span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span_context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span_context.is_remote());
        assert!(!span_context.is_sampled());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_are_sent_after_the_delay() {
        let fake = Fake::default();
        let settings = BatchSettings {
            delay: Duration::from_millis(50),
            ..BatchSettings::default()
        };
        let (provider, metrics) = provider(fake.clone(), settings);
        let tracer = provider.tracer("test");
        tracer.start("one").end();
        tracer.start("two").end();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fake.spans.lock().unwrap().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "spans not exported");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.exported.get(), 2);
        assert_eq!(metrics.dropped.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_collector_drops_and_counts_never_blocks() {
        let fake = Fake {
            hold: true,
            ..Fake::default()
        };
        let settings = BatchSettings {
            queue: 4,
            batch: 2,
            delay: Duration::from_millis(1),
            export_timeout: Duration::from_secs(3600),
        };
        let (provider, metrics) = provider(fake, settings);
        let tracer = provider.tracer("test");
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            tracer.start("span").end();
        }
        // Ending spans only ever puts them on the queue.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // At most the queue and one batch in flight are held; the rest is counted.
        assert!(
            metrics.dropped.get() >= 1000 - 4 - 2,
            "{}",
            metrics.dropped.get()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_sends_what_is_queued() {
        let fake = Fake::default();
        let settings = BatchSettings {
            delay: Duration::from_secs(3600),
            ..BatchSettings::default()
        };
        let metrics = TraceMetrics::default();
        let (batcher, control) = Batcher::start(fake.clone(), settings, metrics.clone());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batcher)
            .build();
        let tracing = Tracing { provider, control };
        tracing.provider.tracer("test").start("last").end();
        tracing.shutdown(Duration::from_secs(5)).await;
        assert_eq!(fake.spans.lock().unwrap().len(), 1);
        assert_eq!(metrics.exported.get(), 1);
    }
}
