//! W3C trace context (`traceparent`) values carried from the HTTP request through the outbox row to
//! the Kafka record and on to the events a consumer emits, so one order is one trace.
//!
//! The values come from the OpenTelemetry span in which the outbox row is written (the HTTP
//! request's, a consumer's `process` span, the relay's `send` span), so each hop's span is the
//! parent of the next; see [`crate::telemetry`].

use std::collections::HashMap;

use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

/// The `traceparent` of `span`: its trace id and span id. A new root when the span has no
/// OpenTelemetry context (tracing not installed, as in unit tests).
pub fn of(span: &tracing::Span) -> String {
    let context = span.context();
    let otel = context.span();
    let sc = otel.span_context();
    if sc.is_valid() {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    } else {
        new_root()
    }
}

/// The `traceparent` of the current span (see [`of`]).
pub fn current() -> String {
    of(&tracing::Span::current())
}

/// Makes `span` a child of the remote span `traceparent` (when present and well formed) and
/// records its trace id in the span's `trace_id` field (so that log lines carry it).
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent.filter(|t| trace_id(t).is_some()) {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        let _ = span.set_parent(parent);
    }
    let own = of(span);
    if let Some(trace) = trace_id(&own) {
        span.record("trace_id", trace);
    }
}

/// A `traceparent` that starts a new trace (version 00, sampled).
pub fn new_root() -> String {
    format!("00-{}-{}-01", Uuid::new_v4().simple(), span_id())
}

/// The 32-hex-digit trace id of a well-formed `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2) && trace != "0".repeat(32))
        .then_some(trace)
}

fn span_id() -> String {
    let id = Uuid::new_v4().simple().to_string();
    id[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_without_opentelemetry_gets_a_new_well_formed_root() {
        let a = of(&tracing::Span::none());
        let b = of(&tracing::Span::none());
        assert!(trace_id(&a).is_some(), "{a}");
        assert_ne!(trace_id(&a), trace_id(&b));
    }

    #[test]
    fn only_well_formed_traceparents_have_a_trace_id() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(trace_id(good), Some("0af7651916cd43dd8448eb211c80319c"));
        for bad in [
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319x-b7ad6b7169203331-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }
}
