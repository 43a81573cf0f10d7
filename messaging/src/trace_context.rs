//! W3C trace context (`traceparent`) values carried from the HTTP request through the outbox row to
//! the Kafka record and on to the events a consumer emits, so one order keeps one trace id.

use uuid::Uuid;

/// A `traceparent` that starts a new trace (version 00, sampled).
pub fn new_root() -> String {
    format!("00-{}-{}-01", Uuid::new_v4().simple(), span_id())
}

/// A `traceparent` in the same trace as `parent` with a new span id; a new root when `parent` is
/// absent or malformed.
pub fn child_of(parent: Option<&str>) -> String {
    match parent.and_then(trace_id) {
        Some(trace) => format!("00-{trace}-{}-01", span_id()),
        None => new_root(),
    }
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
    fn a_child_keeps_the_trace_id_and_gets_a_new_span() {
        let root = new_root();
        let child = child_of(Some(&root));
        assert_eq!(trace_id(&root), trace_id(&child));
        assert_ne!(root, child);
    }

    #[test]
    fn a_malformed_parent_starts_a_new_trace() {
        let child = child_of(Some("garbage"));
        assert!(trace_id(&child).is_some());
    }
}
