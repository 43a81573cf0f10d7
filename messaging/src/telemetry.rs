//! Logs and metrics set-up for every binary: human-readable logs by default, JSON lines with
//! `LOG_FORMAT=json`, level from `RUST_LOG` (default `info`); a Prometheus recorder for `metrics`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global log subscriber. Safe to call more than once (later calls do nothing).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
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

/// Installs the global Prometheus recorder: `saga_duration_seconds` gets [`SAGA_BUCKETS`], every
/// other `*_seconds` histogram [`LATENCY_BUCKETS`] (a full-name matcher wins over a suffix).
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("saga_duration_seconds".to_owned()),
            &SAGA_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)?
        .install_recorder()?;
    Ok(handle)
}
