//! A record as the consumer runtime handles it: owned (so it can wait in the parking table or be
//! copied to a retry or dead-letter topic), with its headers, and its decoding into an
//! [`Envelope`].

use std::time::Duration;

use anyhow::Context;
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::Event;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A record read from Kafka (or from the parking table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
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

    /// The last value of header `name`, when present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The key as text (our keys are order ids), or the message id when there is no key.
    pub fn key_text(&self) -> String {
        match &self.key {
            Some(k) => String::from_utf8_lossy(k).into_owned(),
            None => self.header("message-id").unwrap_or("").to_owned(),
        }
    }

    /// Where the record was first consumed from: its own place, unless it is a retry copy.
    pub fn origin(&self) -> (String, i32, i64) {
        let topic = self.header(crate::retry::ORIGINAL_TOPIC);
        let partition = self
            .header(crate::retry::ORIGINAL_PARTITION)
            .and_then(|p| p.parse().ok());
        let offset = self
            .header(crate::retry::ORIGINAL_OFFSET)
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
    ) -> anyhow::Result<()> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = &self.key {
            record = record.key(key);
        }
        if let Some(payload) = &self.payload {
            record = record.payload(payload);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))
            .with_context(|| format!("producing to {topic}"))?;
        Ok(())
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

/// A decoded record with the headers the saga relies on.
#[derive(Debug, Clone)]
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
    /// Decodes a delivery; the error says why it can never be applied.
    pub fn decode(delivery: &Delivery) -> Result<Envelope, String> {
        let message_id = delivery
            .header("message-id")
            .ok_or_else(|| "the record has no message-id header".to_owned())?;
        let message_id = Uuid::parse_str(message_id)
            .map_err(|e| format!("the message-id header {message_id:?} is not a UUID: {e}"))?;
        let event = schemas::decode_with_content_type(
            delivery.header("content-type"),
            delivery.header("event-type"),
            delivery.payload.as_deref().unwrap_or_default(),
        )
        .map_err(|e| e.to_string())?;
        let (topic, partition, offset) = delivery.origin();
        Ok(Envelope {
            message_id,
            event,
            topic,
            partition,
            offset,
            correlation_id: delivery.header("correlation-id").map(str::to_owned),
            traceparent: delivery.header("traceparent").map(str::to_owned),
            tracestate: delivery.header("tracestate").map(str::to_owned),
        })
    }

    /// The cause to record on events emitted while handling this message.
    pub fn cause(&self) -> crate::outbox::Cause {
        crate::outbox::Cause {
            causation_id: Some(self.message_id),
            // The consumer's `process` span, a child of the record's traceparent.
            traceparent: Some(crate::trace_context::current()),
            tracestate: self.tracestate.clone(),
        }
    }
}
