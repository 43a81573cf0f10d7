//! A record as the consumer runtime handles it: owned (so it can wait in the parking table or be
//! copied to a retry or dead-letter topic), with its headers, and its decoding into an
//! [`Envelope`].

use schemas::headers;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::Event;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The largest payload a saga event can have: the biggest valid event (100 lines of 64-character
/// skus, a reason of 1,000 characters) is about 12 KiB as JSON. Bigger records are dead-lettered
/// as undecodable before anything else reads them.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// The most headers a record may carry: ours carry at most 14 (7 saga headers, 7 `retry-*`).
pub const MAX_HEADERS: usize = 32;
/// The most bytes of header names and values together a record may carry (ours: under 2 KiB).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// The longest key: keys are order ids (36 characters).
pub const MAX_KEY_BYTES: usize = 64;
/// The longest `tracestate` carried on (W3C Trace Context asks for at least 512 characters to be
/// propagated); a longer one is dropped, not copied into the events this record causes.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Why a record can never be applied as it is: it breaks the bounds every record must keep, its
/// headers are missing or malformed, or its payload is not a valid event. Such a record is
/// dead-lettered as permanent with this as its reason. Anything it echoes is bounded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Undecodable {
    #[error("the payload has {bytes} bytes; a saga event has at most {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge { bytes: usize },
    #[error("the key has {bytes} bytes; keys are order ids of at most {MAX_KEY_BYTES}")]
    KeyTooLong { bytes: usize },
    #[error("the record has {count} headers; at most {MAX_HEADERS} are accepted")]
    TooManyHeaders { count: usize },
    #[error("the headers have {bytes} bytes; at most {MAX_HEADER_BYTES} are accepted")]
    HeadersTooLarge { bytes: usize },
    #[error("the record has no message-id header")]
    NoMessageId,
    #[error("the message-id header {value:?} is not a UUID: {error}")]
    MessageIdNotUuid { value: String, error: uuid::Error },
    /// The payload is not a valid event, or breaks the contract's bounds.
    #[error(transparent)]
    Event(#[from] schemas::DecodeError),
    /// The key orders the order's events: an event keyed by another order could overtake or
    /// trail that order's own events.
    #[error("the record key {key:?} is not the event's order id {order_id}")]
    KeyIsNotTheOrder { key: String, order_id: Uuid },
}

/// A record read from Kafka (or from the parking table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp in Unix milliseconds (CreateTime: when its producer sent it);
    /// none for a record taken from the parking table.
    #[serde(default)]
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// In record order; a header may repeat.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Delivery {
    pub fn from_message(message: &BorrowedMessage<'_>) -> Delivery {
        Delivery {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Drops the `retry-*` headers of a record read from a subscribed topic: only the consumer's
    /// own retry copies carry them, in the retry topics, so on a subscribed topic they are forged
    /// (a claim to be on the last attempt, a far-future `retry-not-before`, another origin) and
    /// are never read. Returns how many were dropped.
    pub fn drop_retry_headers(&mut self) -> usize {
        let before = self.headers.len();
        self.headers
            .retain(|(k, _)| !k.starts_with(headers::RETRY_PREFIX));
        before - self.headers.len()
    }

    /// Whether the record is within the bounds every consumed record must keep (payload, key
    /// and header sizes); the error says which it breaks. What is out of bounds is dead-lettered
    /// (as a stub if even that copy would be too large), so no field of it is ever copied into an
    /// event, a log line or a retry copy at full size.
    pub fn check_bounds(&self) -> Result<(), Undecodable> {
        let payload = self.payload.as_ref().map_or(0, Vec::len);
        if payload > MAX_PAYLOAD_BYTES {
            return Err(Undecodable::PayloadTooLarge { bytes: payload });
        }
        let key = self.key.as_ref().map_or(0, Vec::len);
        if key > MAX_KEY_BYTES {
            return Err(Undecodable::KeyTooLong { bytes: key });
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(Undecodable::TooManyHeaders {
                count: self.headers.len(),
            });
        }
        let bytes = self.header_bytes();
        if bytes > MAX_HEADER_BYTES {
            return Err(Undecodable::HeadersTooLarge { bytes });
        }
        Ok(())
    }

    /// Bytes of header names and values.
    pub fn header_bytes(&self) -> usize {
        self.headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// The last value of header `name`, when present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The key, when present and UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The payload decoded as the event its headers name, without the checks [`Envelope::decode`]
    /// makes: what an operator's tool or a test reads off a topic.
    pub fn event(&self) -> Result<Event, schemas::DecodeError> {
        schemas::decode_with_content_type(
            self.header(headers::CONTENT_TYPE),
            self.header(headers::EVENT_TYPE),
            self.payload.as_deref().unwrap_or_default(),
        )
    }

    /// The key as text (our keys are order ids), or the message id when there is no key.
    pub fn key_text(&self) -> String {
        match &self.key {
            Some(k) => String::from_utf8_lossy(k).into_owned(),
            None => self.header(headers::MESSAGE_ID).unwrap_or("").to_owned(),
        }
    }

    /// Where the record was first consumed from: its own place, unless it is a retry copy.
    pub fn origin(&self) -> (String, i32, i64) {
        let topic = self.header(headers::RETRY_ORIGINAL_TOPIC);
        let partition = self
            .header(headers::RETRY_ORIGINAL_PARTITION)
            .and_then(|p| p.parse().ok());
        let offset = self
            .header(headers::RETRY_ORIGINAL_OFFSET)
            .and_then(|o| o.parse().ok());
        match (topic, partition, offset) {
            (Some(t), Some(p), Some(o)) => (t.to_owned(), p, o),
            _ => (self.topic.clone(), self.partition, self.offset),
        }
    }

    /// Produces a copy of this record (same key and value) with `headers` to `topic`, and waits
    /// for the broker's acknowledgement.
    pub async fn send_copy(
        &self,
        producer: &FutureProducer,
        topic: &str,
        headers: OwnedHeaders,
    ) -> Result<(), KafkaError> {
        send(
            producer,
            topic,
            self.key.as_deref(),
            self.payload.as_deref(),
            headers,
        )
        .await
    }

    /// Bytes of key, payload and headers: about what a copy of the record weighs.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self.header_bytes()
    }

    /// The headers for a copy of this record, without the headers named in `drop` (by prefix),
    /// followed by `extra`.
    pub fn headers_with(&self, drop: &[&str], extra: &[(&str, String)]) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new();
        for (key, value) in &self.headers {
            if drop.iter().any(|prefix| key.starts_with(prefix)) {
                continue;
            }
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        for (key, value) in extra {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        headers
    }
}

/// Produces one record to `topic` and waits for the broker's acknowledgement.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: OwnedHeaders,
) -> Result<(), KafkaError> {
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

/// Whether a produce failed because the record is larger than the client or the broker accepts.
pub fn is_too_large(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// A decoded record with the headers the saga relies on.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub message_id: Uuid,
    pub event: Event,
    /// Where the record was first consumed from (retry copies keep their origin).
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Envelope {
    /// Decodes a delivery and checks it against the contract ([`Delivery::check_bounds`],
    /// [`schemas::limits`], the key is the event's order id); the error says why it can never be
    /// applied.
    pub fn decode(delivery: &Delivery) -> Result<Envelope, Undecodable> {
        delivery.check_bounds()?;
        let message_id = delivery
            .header(headers::MESSAGE_ID)
            .ok_or(Undecodable::NoMessageId)?;
        let message_id =
            Uuid::parse_str(message_id).map_err(|error| Undecodable::MessageIdNotUuid {
                value: schemas::limits::truncate_chars(message_id, 64),
                error,
            })?;
        let event = delivery.event()?;
        // The key orders the order's events: an event keyed by another order could overtake or
        // trail that order's own events.
        if let Some(key) = &delivery.key
            && Uuid::try_parse_ascii(key).ok() != Some(event.order_id())
        {
            return Err(Undecodable::KeyIsNotTheOrder {
                key: schemas::limits::truncate_chars(String::from_utf8_lossy(key), 64),
                order_id: event.order_id(),
            });
        }
        let (topic, partition, offset) = delivery.origin();
        Ok(Envelope {
            message_id,
            event,
            topic,
            partition,
            offset,
            correlation_id: delivery.header(headers::CORRELATION_ID).map(str::to_owned),
            traceparent: delivery.header(headers::TRACEPARENT).map(str::to_owned),
            tracestate: delivery
                .header(headers::TRACESTATE)
                .filter(|t| t.len() <= MAX_TRACESTATE_BYTES)
                .map(str::to_owned),
        })
    }

    /// The cause to record on events emitted while handling this message.
    pub fn cause(&self) -> crate::outbox::Cause {
        crate::outbox::Cause {
            causation_id: Some(self.message_id),
            // The consumer's `process` span, a child of the record's traceparent.
            traceparent: Some(service_kit::trace_context::current()),
            tracestate: self.tracestate.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(headers: &[(&str, &[u8])], payload: Vec<u8>) -> Delivery {
        Delivery {
            topic: "orders.v1".into(),
            partition: 0,
            offset: 1,
            timestamp: None,
            key: None,
            payload: Some(payload),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Some(v.to_vec())))
                .collect(),
        }
    }

    fn cancelled() -> (Uuid, Vec<u8>) {
        let order_id = Uuid::new_v4();
        let event = schemas::OrderCancelled {
            order_id,
            reason: schemas::CancelReason::CustomerRequest,
            cancelled_at: 0,
        };
        (order_id, schemas::encode(&event.into()))
    }

    #[test]
    fn a_tracestate_longer_than_the_w3c_minimum_is_not_carried_on() {
        let (_, payload) = cancelled();
        let id = Uuid::new_v4().to_string();
        let short = "a".repeat(MAX_TRACESTATE_BYTES);
        let long = "a".repeat(MAX_TRACESTATE_BYTES + 1);
        for (tracestate, carried) in [(&short, true), (&long, false)] {
            let d = delivery(
                &[
                    ("message-id", id.as_bytes()),
                    ("tracestate", tracestate.as_bytes()),
                ],
                payload.clone(),
            );
            let envelope = Envelope::decode(&d).unwrap();
            assert_eq!(envelope.tracestate.is_some(), carried);
            assert_eq!(envelope.cause().tracestate.is_some(), carried);
        }
    }

    #[test]
    fn records_beyond_the_bounds_are_refused_before_decoding() {
        let (order_id, payload) = cancelled();
        let id = Uuid::new_v4().to_string();
        let ok = delivery(&[("message-id", id.as_bytes())], payload.clone());
        assert!(Envelope::decode(&ok).is_ok());

        let mut keyed = ok.clone();
        keyed.key = Some(order_id.to_string().into_bytes());
        assert!(Envelope::decode(&keyed).is_ok());
        keyed.key = Some(Uuid::new_v4().to_string().into_bytes());
        assert!(matches!(
            Envelope::decode(&keyed),
            Err(Undecodable::KeyIsNotTheOrder { order_id: id, .. }) if id == order_id
        ));
        keyed.key = Some(vec![b'k'; MAX_KEY_BYTES + 1]);
        assert_eq!(
            Envelope::decode(&keyed),
            Err(Undecodable::KeyTooLong {
                bytes: MAX_KEY_BYTES + 1
            })
        );

        let big = delivery(
            &[("message-id", id.as_bytes())],
            vec![0; MAX_PAYLOAD_BYTES + 1],
        );
        assert_eq!(
            Envelope::decode(&big),
            Err(Undecodable::PayloadTooLarge {
                bytes: MAX_PAYLOAD_BYTES + 1
            })
        );

        let many: Vec<(String, Vec<u8>)> = (0..=MAX_HEADERS)
            .map(|n| (format!("h{n}"), vec![]))
            .collect();
        let many: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        assert_eq!(
            Envelope::decode(&delivery(&many, payload.clone())),
            Err(Undecodable::TooManyHeaders {
                count: MAX_HEADERS + 1
            })
        );

        let fat = vec![b'x'; MAX_HEADER_BYTES];
        assert!(matches!(
            Envelope::decode(&delivery(&[("message-id", &fat)], payload)),
            Err(Undecodable::HeadersTooLarge { bytes }) if bytes > MAX_HEADER_BYTES
        ));
    }

    #[test]
    fn a_long_message_id_is_echoed_bounded() {
        let (_, payload) = cancelled();
        let long = "x".repeat(4_000);
        let err =
            Envelope::decode(&delivery(&[("message-id", long.as_bytes())], payload)).unwrap_err();
        assert!(
            matches!(&err, Undecodable::MessageIdNotUuid { value, .. } if value.chars().count() == 64),
            "{err:?}"
        );
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn retry_headers_are_dropped_from_records_of_subscribed_topics() {
        let mut d = delivery(
            &[
                ("message-id", b"m"),
                ("retry-attempt", b"9"),
                ("retry-original-topic", b"x"),
            ],
            vec![],
        );
        assert_eq!(d.drop_retry_headers(), 2);
        assert_eq!(d.origin(), ("orders.v1".to_owned(), 0, 1));
        assert_eq!(d.header("message-id"), Some("m"));
    }
}
