//! A record read from any topic, as one step of its saga: which saga (the order id), which
//! service, what happened, when, and what caused it. Pure: the same record always makes the same
//! step, which is what lets a rebuild equal the live projection.

use messaging::delivery::{Delivery, Envelope};
use schemas::headers;
use schemas::limits::truncate_chars;
use serde::Serialize;
use uuid::Uuid;

/// What a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An event on an event topic (`orders.v1`, ...).
    Event,
    /// A consumer group's retry copy of an event it could not apply yet (`<group>.retry.N`).
    Retry,
    /// A consumer group's dead letter (`<group>.dlq`).
    DeadLetter,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Retry => "retry",
            Kind::DeadLetter => "dead_letter",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        [Kind::Event, Kind::Retry, Kind::DeadLetter]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    #[serde(skip)]
    pub order_id: Uuid,
    /// Milliseconds since the Unix epoch: the event's own time; for a retry copy or a dead letter,
    /// when the copy was made (the record's timestamp).
    pub at_ms: i64,
    /// The service that emitted the event, or the consumer group that retried or dead-lettered it.
    pub service: String,
    pub event_type: Option<String>,
    pub kind: Kind,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub message_id: Option<Uuid>,
    /// The message that caused it: an event's `causation-id`; for a retry copy or a dead letter,
    /// the event it copies.
    pub causation_id: Option<Uuid>,
    pub trace_id: Option<String>,
    /// Why it was retried or dead-lettered, or why it could not be decoded.
    pub note: Option<String>,
    /// Whether the payload decoded as the event its headers name, within the contract.
    pub decoded: bool,
}

/// The longest text of a record copied into a step (an event type, a reason).
const MAX_TEXT_CHARS: usize = 300;

/// The services that publish each event topic.
const PUBLISHERS: [(&str, &str); 3] = [
    (schemas::ORDERS_TOPIC, "order-service"),
    (schemas::INVENTORY_TOPIC, "inventory-service"),
    (schemas::PAYMENTS_TOPIC, "payment-service"),
];

/// What records of `topic` are, and whose: `None` for a topic the monitor does not project.
pub fn classify(topic: &str) -> Option<(Kind, String)> {
    if let Some((_, service)) = PUBLISHERS.iter().find(|(t, _)| *t == topic) {
        return Some((Kind::Event, (*service).to_owned()));
    }
    if let Some(group) = topic.strip_suffix(".dlq") {
        return valid_group(group).then(|| (Kind::DeadLetter, group.to_owned()));
    }
    if let Some((group, attempt)) = topic.rsplit_once(".retry.")
        && !attempt.is_empty()
        && attempt.bytes().all(|b| b.is_ascii_digit())
    {
        return valid_group(group).then(|| (Kind::Retry, group.to_owned()));
    }
    // Another aggregate's events (a future `shipments.v1`): its own lane.
    if let Some(name) = topic.strip_suffix(".v1") {
        return valid_group(name).then(|| (Kind::Event, topic.to_owned()));
    }
    None
}

fn valid_group(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with("__")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Why a record is no step of any saga.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unattributed {
    #[error("topic {0} is not projected")]
    Topic(String),
    #[error(
        "it names no order: it does not decode, and neither its key nor its correlation-id is a UUID"
    )]
    NoOrder,
}

/// The step `delivery` is. A record that does not decode is still a step of its saga (by key,
/// else by correlation id), marked undecodable with the reason.
pub fn of(delivery: &Delivery) -> Result<Step, Unattributed> {
    let (kind, service) =
        classify(&delivery.topic).ok_or_else(|| Unattributed::Topic(delivery.topic.clone()))?;
    let message_id = delivery
        .header(headers::MESSAGE_ID)
        .and_then(|id| Uuid::try_parse(id).ok());
    let decoded = Envelope::decode(delivery);
    let order_id = match &decoded {
        Ok(envelope) => envelope.event.order_id(),
        Err(_) => delivery
            .key_str()
            .and_then(|k| Uuid::try_parse(k).ok())
            .or_else(|| {
                delivery
                    .header(headers::CORRELATION_ID)
                    .and_then(|c| Uuid::try_parse(c).ok())
            })
            .ok_or(Unattributed::NoOrder)?,
    };
    let event_type = match &decoded {
        Ok(envelope) => Some(envelope.event.event_type().to_owned()),
        Err(_) => delivery
            .header(headers::EVENT_TYPE)
            .map(|t| truncate_chars(t, 64)),
    };
    // A record's timestamp is its producer's to set: kept within the times an event may carry.
    let record_time = delivery
        .timestamp
        .map(|t| t.clamp(0, schemas::limits::MAX_TIME_MILLIS));
    let at_ms = match (&decoded, kind) {
        (Ok(envelope), Kind::Event) => event_time(&envelope.event),
        (Ok(envelope), _) => record_time.unwrap_or_else(|| event_time(&envelope.event)),
        // No time a clock of ours wrote: the broker's, else the start of the epoch.
        (Err(_), _) => record_time.unwrap_or(0),
    };
    let causation_id = match kind {
        Kind::Event => delivery
            .header(headers::CAUSATION_ID)
            .and_then(|id| Uuid::try_parse(id).ok()),
        Kind::Retry | Kind::DeadLetter => message_id,
    };
    let reason = match kind {
        Kind::Event => None,
        Kind::Retry => delivery.header(headers::RETRY_REASON),
        Kind::DeadLetter => delivery.header(headers::DLQ_ERROR_MESSAGE),
    };
    let note = match (&decoded, reason) {
        (Ok(_), reason) => reason.map(str::to_owned),
        (Err(why), None) => Some(format!("cannot be decoded: {why}")),
        (Err(why), Some(reason)) => Some(format!("{reason} (cannot be decoded: {why})")),
    }
    .map(|n| truncate_chars(&n, MAX_TEXT_CHARS));
    Ok(Step {
        order_id,
        at_ms,
        service,
        event_type,
        kind,
        topic: delivery.topic.clone(),
        partition: delivery.partition,
        offset: delivery.offset,
        message_id,
        causation_id,
        trace_id: delivery
            .header(headers::TRACEPARENT)
            .and_then(service_kit::trace_context::trace_id)
            .map(str::to_owned),
        note,
        decoded: decoded.is_ok(),
    })
}

/// The time an event says it happened.
pub fn event_time(event: &schemas::Event) -> i64 {
    use schemas::Event as E;
    match event {
        E::OrderPlaced(e) => e.placed_at,
        E::OrderAwaitingPayment(e) => e.at,
        E::OrderConfirmed(e) => e.confirmed_at,
        E::OrderRejected(e) => e.rejected_at,
        E::OrderRefundRequested(e) => e.requested_at,
        E::OrderCancelled(e) => e.cancelled_at,
        E::StockReserved(e) => e.reserved_at,
        E::StockReservationRejected(e) => e.rejected_at,
        E::StockReleased(e) => e.released_at,
        E::PaymentConfirmed(e) => e.confirmed_at,
        E::PaymentDeclined(e) => e.declined_at,
        E::PaymentRefunded(e) => e.refunded_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str, key: Option<&str>, payload: &[u8], hs: &[(&str, &str)]) -> Delivery {
        Delivery {
            topic: topic.to_owned(),
            partition: 1,
            offset: 7,
            timestamp: Some(5_000),
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: Some(payload.to_vec()),
            headers: hs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    const ORDER: &str = "0190f3a0-0000-7000-8000-000000000001";
    const MESSAGE: &str = "0190f3a0-0000-7000-8000-0000000000aa";
    const CAUSE: &str = "0190f3a0-0000-7000-8000-0000000000bb";
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn confirmed_json() -> Vec<u8> {
        format!(r#"{{"order_id":"{ORDER}","total_cents":500,"confirmed_at":1234}}"#).into_bytes()
    }

    fn saga_headers(event_type: &str) -> Vec<(&str, &str)> {
        vec![
            ("message-id", MESSAGE),
            ("event-type", event_type),
            ("content-type", "application/json"),
            ("correlation-id", ORDER),
            ("causation-id", CAUSE),
            ("traceparent", TRACEPARENT),
        ]
    }

    #[test]
    fn an_event_is_a_step_of_its_order_at_its_own_time_caused_by_its_causation_id() {
        let d = delivery(
            "orders.v1",
            Some(ORDER),
            &confirmed_json(),
            &saga_headers("OrderConfirmed"),
        );
        let step = of(&d).unwrap();
        assert_eq!(step.order_id.to_string(), ORDER);
        assert_eq!(step.at_ms, 1234);
        assert_eq!(step.service, "order-service");
        assert_eq!(step.kind, Kind::Event);
        assert_eq!(step.event_type.as_deref(), Some("OrderConfirmed"));
        assert_eq!(step.message_id.unwrap().to_string(), MESSAGE);
        assert_eq!(step.causation_id.unwrap().to_string(), CAUSE);
        assert_eq!(
            step.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(step.decoded && step.note.is_none());
    }

    #[test]
    fn a_retry_copy_and_a_dead_letter_are_caused_by_the_event_they_copy_and_say_why() {
        let mut hs = saga_headers("OrderConfirmed");
        hs.push(("retry-reason", "the reservation is not there yet"));
        let retry = of(&delivery(
            "inventory-service.retry.2",
            Some(ORDER),
            &confirmed_json(),
            &hs,
        ))
        .unwrap();
        assert_eq!(retry.kind, Kind::Retry);
        assert_eq!(retry.service, "inventory-service");
        assert_eq!(retry.causation_id.unwrap().to_string(), MESSAGE);
        assert_eq!(retry.at_ms, 5_000, "when the copy was made");
        assert_eq!(
            retry.note.as_deref(),
            Some("the reservation is not there yet")
        );

        let mut hs = saga_headers("OrderConfirmed");
        hs.push(("dlq-error-message", "no such order"));
        let dead = of(&delivery(
            "order-service.dlq",
            Some(ORDER),
            &confirmed_json(),
            &hs,
        ))
        .unwrap();
        assert_eq!(
            (dead.kind, dead.service.as_str()),
            (Kind::DeadLetter, "order-service")
        );
        assert_eq!(dead.note.as_deref(), Some("no such order"));
    }

    #[test]
    fn an_undecodable_record_is_a_step_of_the_order_its_key_or_correlation_id_names() {
        let by_key = of(&delivery(
            "orders.v1",
            Some(ORDER),
            b"not json",
            &saga_headers("OrderConfirmed"),
        ))
        .unwrap();
        assert_eq!(by_key.order_id.to_string(), ORDER);
        assert!(!by_key.decoded);
        assert!(
            by_key
                .note
                .as_deref()
                .unwrap()
                .starts_with("cannot be decoded: "),
            "{:?}",
            by_key.note
        );
        assert_eq!(by_key.at_ms, 5_000, "the broker's time");
        assert_eq!(by_key.event_type.as_deref(), Some("OrderConfirmed"));

        let by_correlation = of(&delivery(
            "orders.v1",
            Some("not-a-uuid"),
            b"{}",
            &[("correlation-id", ORDER), ("event-type", &"X".repeat(500))],
        ))
        .unwrap();
        assert_eq!(by_correlation.order_id.to_string(), ORDER);
        assert_eq!(
            by_correlation.event_type.unwrap().chars().count(),
            64,
            "echoes are bounded"
        );

        assert_eq!(
            of(&delivery("orders.v1", Some("x"), b"{}", &[])),
            Err(Unattributed::NoOrder)
        );
        assert_eq!(
            of(&delivery("__consumer_offsets", Some(ORDER), b"{}", &[])),
            Err(Unattributed::Topic("__consumer_offsets".into()))
        );
    }

    #[test]
    fn topics_are_classified_by_their_names() {
        assert_eq!(
            classify("payments.v1"),
            Some((Kind::Event, "payment-service".into()))
        );
        assert_eq!(
            classify("order-service.retry.10"),
            Some((Kind::Retry, "order-service".into()))
        );
        assert_eq!(
            classify("payment-service.dlq"),
            Some((Kind::DeadLetter, "payment-service".into()))
        );
        assert_eq!(
            classify("shipments.v1"),
            Some((Kind::Event, "shipments.v1".into()))
        );
        for other in [
            "order-service.retry.",
            "order-service.retry.x",
            ".dlq",
            "__x.v1",
            "a b.dlq",
            "orders.v2",
        ] {
            assert_eq!(classify(other), None, "{other}");
        }
    }
}
