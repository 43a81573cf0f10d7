//! W3C trace context (`traceparent`) values carried from the HTTP request through the outbox row to
//! the Kafka record and on to the events a consumer emits, so one order is one trace.
//!
//! The values come from the OpenTelemetry span in which the outbox row is written (the HTTP
//! request's, a consumer's `process` span, the relay's `send` span), so each hop's span is the
//! parent of the next; see [`crate::telemetry`].

use std::collections::HashMap;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

/// The `traceparent` of `span`: its trace id and span id. A new root when the span has no
/// OpenTelemetry context (tracing not installed, as in unit tests).
pub fn of(span: &tracing::Span) -> String {
    let context = span.context();
    let otel = context.span();
    format(otel.span_context())
}

/// The `traceparent` of an OpenTelemetry span context; a new root when it is not valid.
pub fn format(sc: &SpanContext) -> String {
    if sc.is_valid() {
        traceparent(sc.trace_id(), sc.span_id(), sc.trace_flags())
    } else {
        new_root()
    }
}

/// A `traceparent` for a new span that is a child of `parent` (same trace, same sampling
/// decision, a new span id), or a new root without one: for a hop whose span is not exported.
pub fn child_of(parent: Option<&SpanContext>) -> String {
    match parent.filter(|p| p.is_valid()) {
        Some(parent) => traceparent(
            parent.trace_id(),
            SpanId::from_bytes(rand_span_id()),
            parent.trace_flags(),
        ),
        None => new_root(),
    }
}

fn traceparent(trace: TraceId, span: SpanId, flags: TraceFlags) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(55);
    let _ = write!(out, "00-{trace}-{span}-{:02x}", flags.to_u8());
    out
}

/// Eight random bytes, never all zero (an invalid span id).
fn rand_span_id() -> [u8; 8] {
    let bytes = Uuid::new_v4().into_bytes();
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// The remote span a well-formed `traceparent` names (`None` for anything else), to be the parent
/// of a span made with OpenTelemetry directly.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    trace_id(traceparent)?;
    let mut parts = traceparent.split('-').skip(1);
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
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
    (hex(version, 2)
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0'))
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
    fn a_parsed_traceparent_formats_back_to_itself() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sc = parse(good).expect("well formed");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format(&sc), good);
        let child = child_of(Some(&sc));
        assert_eq!(trace_id(&child), trace_id(good));
        assert_ne!(child, good, "a child has a span id of its own");
        assert!(
            child.ends_with("-01"),
            "the parent's sampling decision: {child}"
        );
        assert!(trace_id(&child_of(None)).is_some());
        for bad in [
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
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
