//! Logs, traces and metrics set-up for every binary.
//!
//! - Logs: human-readable by default, JSON lines with `LOG_FORMAT=json`, level from `RUST_LOG`
//!   (default `info`). A line written inside a span carries the span's fields, among them
//!   `trace_id` and, for message handling, `order_id`.
//! - Traces: every span is an OpenTelemetry span (W3C trace context). They are exported with
//!   OTLP over HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//!   is set, as `OTEL_SERVICE_NAME` (default: the binary's name); `OTEL_EXPORTER_OTLP_PROTOCOL`
//!   picks `http/protobuf` (default) or `http/json`. Unset, nothing is exported, but trace ids
//!   are still real and still travel with the events.
//! - Metrics: a Prometheus recorder.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
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

/// Whether [`init`] set up an exporter: spans leave the process. Code that makes spans only
/// for the trace (the relay's per-row send spans) skips them when nothing would receive them.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let provider = builder.build();
    // Also the global provider, for the spans made with OpenTelemetry directly rather than
    // through `tracing` (the relay's per-row send spans: see outbox-relay's `relay::send_span`).
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(service);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
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
    EXPORTING.store(exporting, std::sync::atomic::Ordering::Relaxed);
    Telemetry {
        provider,
        exporting,
    }
}

/// Latency buckets in seconds, from 1 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
];

/// Saga duration buckets in seconds, from 50 ms to 5 minutes: a saga takes a few hundred
/// milliseconds when all is well, and up to the saga deadline (30 s by default) plus the
/// cancellation when it is not.
pub const SAGA_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
];

/// The relay's commit→acknowledged delay, finer than [`LATENCY_BUCKETS`] below 1 s: it is the
/// number the benchmark reports as p50/p99 (interpolated within a bucket), and a few
/// milliseconds matter there.
pub const COMMIT_TO_ACK_BUCKETS: [f64; 23] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// Rows per relay batch.
pub const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// Installs the global Prometheus recorder: `relay_batch_size` gets [`BATCH_SIZE_BUCKETS`],
/// `relay_commit_to_ack_seconds` [`COMMIT_TO_ACK_BUCKETS`],
/// `saga_duration_seconds` gets [`SAGA_BUCKETS`], every
/// other `*_seconds` histogram [`LATENCY_BUCKETS`] (a full-name matcher wins over a suffix).
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("saga_duration_seconds".to_owned()),
            &SAGA_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("relay_commit_to_ack_seconds".to_owned()),
            &COMMIT_TO_ACK_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("relay_batch_size".to_owned()),
            &BATCH_SIZE_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)?
        .install_recorder()?;
    describe_metrics();
    // Prometheus's standard process metric: a restart shows as a new value (a crash that a
    // restart policy covered up is still seen: `changes(process_start_time_seconds[1h])`).
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!("process_start_time_seconds").set(started.as_secs_f64());
    Ok(handle)
}

/// The help text of every metric any process here exports (a process shows only those it has
/// recorded). The README's tables and the dashboards use these names.
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    crate::jobs::describe_metrics();
    crate::outbound::describe_metrics();
    describe_gauge!(
        "process_start_time_seconds",
        Unit::Seconds,
        "When the process started, in seconds since the Unix epoch"
    );
    // HTTP
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, route pattern and status code"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method and route pattern"
    );
    describe_gauge!(
        "db_table_rows",
        "Rows of each table of the service's database (the statistics' live-row estimate)"
    );
    describe_gauge!(
        "db_table_oldest_row_age_seconds",
        Unit::Seconds,
        "Age of the oldest row of each pruned table"
    );
    describe_gauge!(
        "db_table_retention_seconds",
        Unit::Seconds,
        "How long each pruned table keeps its rows; -1 when it is not pruned (the retention of the topics its messages come from is not known)"
    );
    describe_counter!(
        "db_rows_pruned_total",
        "Rows deleted by the retention job, by table"
    );
    describe_counter!(
        "http_requests_shed_total",
        "HTTP requests answered 503 at once because --http-max-in-flight requests were in progress"
    );
    describe_counter!(
        "http_requests_timed_out_total",
        "HTTP requests answered 503 because they took longer than --http-request-timeout"
    );
    // Consumers
    describe_counter!(
        "consumer_messages_processed_total",
        "Messages applied (inbox claimed, effect committed), by group, topic and event type"
    );
    describe_counter!(
        "consumer_messages_duplicate_total",
        "Messages skipped because the inbox had their message id already, by group, topic and event type"
    );
    describe_counter!(
        "consumer_messages_parked_total",
        "Messages stored behind an earlier message of their key that waits in a retry topic"
    );
    describe_counter!(
        "consumer_messages_retried_total",
        "Messages sent to a retry topic because they were not applicable yet, by attempt"
    );
    describe_counter!(
        "consumer_messages_dead_lettered_total",
        "Messages sent to the group's dead-letter topic, by error class"
    );
    describe_counter!(
        "consumer_transient_retries_total",
        "In-place retries after a transient failure (database or broker unavailable)"
    );
    describe_histogram!(
        "consumer_handler_duration_seconds",
        Unit::Seconds,
        "Time to apply one message: inbox claim, effect and commit"
    );
    describe_gauge!(
        "consumer_lag_messages",
        "Messages between the partition's high watermark and the group's committed offset, per assigned partition (librdkafka statistics, every 5 s)"
    );
    describe_counter!(
        "consumer_offset_gaps_total",
        "Times a consumer received an offset beyond the next one it expected on a partition: records it never received (the log names the range)"
    );
    describe_gauge!(
        "consumer_unowned_partitions",
        "Partitions of the topic that no live instance of the group reads, per the ownership watchdog (every 5 s)"
    );
    describe_counter!(
        "consumer_forced_rebalances_total",
        "Times this consumer left and rejoined its group because partitions had no live reader"
    );
    describe_gauge!(
        "consumer_parked_keys",
        "Keys (orders) whose events wait behind a message in the retry topics"
    );
    describe_gauge!(
        "consumer_parked_key_oldest_age_seconds",
        Unit::Seconds,
        "How long the longest-waiting parked key has waited behind its current head"
    );
    describe_counter!(
        "consumer_parked_heads_expired_total",
        "Heads given up on after --parked-key-timeout (their retry copy never came back): dead-lettered, their keys' parked messages applied"
    );
    // Relay
    describe_counter!(
        "relay_rows_published_total",
        "Outbox rows acknowledged by the broker and deleted, by source and topic"
    );
    describe_counter!(
        "relay_publish_errors_total",
        "Outbox rows the broker did not acknowledge (left in the outbox, retried), by source"
    );
    describe_gauge!(
        "relay_outbox_pending_rows",
        "Rows waiting in the source's outbox table (counted every second, less often above 20,000 rows: up to every 30 s)"
    );
    describe_gauge!(
        "relay_outbox_unpublishable_rows",
        "Outbox rows of an aggregate type the relay has no topic for, left in place and not read (counted with the pending rows)"
    );
    describe_gauge!(
        "relay_outbox_oldest_pending_age_seconds",
        "Age of the oldest row waiting in the source's outbox table (0 when empty)"
    );
    describe_histogram!(
        "relay_commit_to_ack_seconds",
        Unit::Seconds,
        "Time from an outbox row's commit to the broker's acknowledgement, by source"
    );
    describe_histogram!(
        "relay_send_to_ack_seconds",
        Unit::Seconds,
        "Time from sending a batch to the broker's acknowledgement of all of it, by source"
    );
    describe_histogram!("relay_batch_size", "Rows per relay batch, by source");
    // Saga (order-service)
    describe_counter!(
        "saga_started_total",
        "Sagas started: orders accepted by POST /orders"
    );
    describe_counter!(
        "saga_completed_total",
        "Orders reaching a terminal status, by outcome (confirmed, rejected, cancelled)"
    );
    describe_counter!(
        "saga_failed_total",
        "Sagas that failed, by reason (stock_unavailable, deadline_exceeded)"
    );
    describe_counter!(
        "saga_compensations_total",
        "Cancellations that gave back reserved or sold stock"
    );
    describe_histogram!(
        "saga_duration_seconds",
        Unit::Seconds,
        "Time from an order being placed to a terminal status, by outcome"
    );
    describe_counter!(
        "orders_status_changes_total",
        "Order status changes, by new status"
    );
    describe_gauge!(
        "orders_in_flight",
        "Orders whose saga is not over, by status (PENDING, CANCELLING); counted every 5 s"
    );
    describe_gauge!(
        "orders_in_flight_oldest_age_seconds",
        Unit::Seconds,
        "Time since the last change of the oldest order in each in-flight status"
    );
    // Inventory
    describe_counter!(
        "inventory_reservations_total",
        "OrderPlaced answers, by outcome (reserved, rejected)"
    );
    describe_counter!(
        "inventory_releases_total",
        "Reservations released by a cancellation, by the status they were in (RESERVED, COMMITTED)"
    );
}
