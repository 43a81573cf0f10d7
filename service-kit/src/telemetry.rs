//! Logs, traces and metrics set-up for every binary.
//!
//! - Logs: human-readable by default, JSON lines with `LOG_FORMAT=json`, level from `RUST_LOG`
//!   (default `info`). A line written inside a span carries the span's fields, among them
//!   `trace_id` and, for message handling, `order_id`.
//! - Traces: every span is an OpenTelemetry span (W3C trace context). They are exported with
//!   OTLP over HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//!   is set, as `OTEL_SERVICE_NAME` (default: the binary's name); `OTEL_EXPORTER_OTLP_PROTOCOL`
//!   picks `http/protobuf` (default) or `http/json`. Unset, nothing is exported, but trace ids
//!   are still real and still travel with the events. When an export fails (no collector there,
//!   not up yet, or refusing) the log says so once, and once more when spans are exported again
//!   with how many were dropped meanwhile: spans are never lost without a word.
//! - Metrics: a Prometheus recorder.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variables [`init`] (and the OpenTelemetry SDK under it) reads, besides each
/// binary's own settings.
pub const ENV_VARS: &[&str] = &[
    "RUST_LOG",
    "LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_BSP_SCHEDULE_DELAY",
];

/// The tracing set-up; [`Telemetry::shutdown`] flushes the spans not exported yet.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Exports what is left (when exporting) and stops the exporter.
    pub fn shutdown(self) {
        if self.exporting
            && let Err(e) = self.provider.shutdown()
        {
            eprintln!("flushing traces at shutdown: {e}");
        }
    }
}

/// A span exporter that says in the log when its exports start failing and when they succeed
/// again (the SDK drops a failed batch without a word).
#[derive(Debug)]
struct Reporting<E> {
    inner: E,
    failing: AtomicBool,
    /// Spans dropped since the exports started failing.
    dropped: AtomicU64,
}

impl<E> Reporting<E> {
    fn new(inner: E) -> Reporting<E> {
        Reporting {
            inner,
            failing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) => {
                self.dropped.fetch_add(spans, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, spans,
                        "spans could not be exported ({e}); they are dropped until the OTLP endpoint takes them again");
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    let dropped = self.dropped.swap(0, Ordering::Relaxed);
                    tracing::info!(
                        dropped,
                        "spans are exported again; {dropped} were dropped meanwhile"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Whether logs are JSON lines (`LOG_FORMAT=json`).
pub fn logs_json() -> bool {
    std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
}

/// Whether [`init`] set up an exporter: spans leave the process. Code that makes spans only
/// for the trace (the relay's per-row send spans) skips them when nothing would receive them.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Installs logging and tracing for the process `service`. Call once, first thing in `main`.
pub fn init(service: &'static str) -> Telemetry {
    let exporting = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()));
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty()) {
        opentelemetry_sdk::Resource::builder().build()
    } else {
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build()
    };
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut export_error = None;
    if exporting {
        // The HTTP client the exporter uses is a blocking one, which must not be built on an
        // async runtime's thread.
        let exporter = std::thread::spawn(|| {
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
        })
        .join()
        .expect("building the OTLP exporter");
        match exporter {
            Ok(exporter) => builder = builder.with_batch_exporter(Reporting::new(exporter)),
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let provider = builder.build();
    // Also the global provider, for the spans made with OpenTelemetry directly rather than
    // through `tracing` (the relay's per-row send spans: see outbox-relay's `relay::send_span`).
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(service);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = logs_json();
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_target(false),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .try_init()
    };
    match (&export_error, exporting) {
        (Some(e), _) => {
            tracing::warn!(error = %e, "could not set up the OTLP trace exporter; traces are not exported")
        }
        (None, true) => tracing::info!("exporting traces with OTLP"),
        (None, false) => {
            tracing::debug!("OTEL_EXPORTER_OTLP_ENDPOINT is not set; traces are not exported")
        }
    }
    let exporting = exporting && export_error.is_none();
    EXPORTING.store(exporting, Ordering::Relaxed);
    Telemetry {
        provider,
        exporting,
    }
}

/// Latency buckets in seconds, from 1 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
];

/// Histogram buckets for the metric of this full name (the default for `*_seconds` is
/// [`LATENCY_BUCKETS`]).
pub type Buckets = (&'static str, &'static [f64]);

/// Installs the global Prometheus recorder: the metrics named in `buckets` get theirs, every
/// other `*_seconds` histogram [`LATENCY_BUCKETS`] (a full-name matcher wins over a suffix).
/// Describes the kit's metrics; `describe` describes the caller's own.
pub fn init_metrics(
    buckets: &[Buckets],
    describe: impl FnOnce(),
) -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in buckets {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)?;
    }
    let handle = builder
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)?
        .install_recorder()?;
    describe_metrics();
    describe();
    // Prometheus's standard process metric: a restart shows as a new value (a crash that a
    // restart policy covered up is still seen: `changes(process_start_time_seconds[1h])`).
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!("process_start_time_seconds").set(started.as_secs_f64());
    Ok(handle)
}

/// The help text of the metrics this crate's kit owns (each layer above describes its own:
/// the consumer runtime, the relay, each service). The README's tables and the dashboards use
/// these names.
fn describe_metrics() {
    use metrics::{Unit, describe_gauge};
    describe_gauge!(
        "process_start_time_seconds",
        Unit::Seconds,
        "When the process started, in seconds since the Unix epoch"
    );
    crate::http::describe_metrics();
    crate::pruning::describe_metrics();
    crate::jobs::describe_metrics();
    crate::outbound::describe_metrics();
    crate::breaker::describe_metrics();
}
