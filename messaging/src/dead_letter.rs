//! The dead-letter writer: copies a record that can never be applied to `<group>.dlq` with its
//! original key, value and headers, plus headers that say where it came from and why it failed.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::kafka;

/// Why and how often a record failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `permanent` (can never apply) or `retryable` (exhausted its retries).
    pub class: &'static str,
    pub reason: String,
    pub attempts: u32,
    pub first_failure_at: DateTime<Utc>,
}

impl Failure {
    pub fn permanent(reason: String, attempts: u32) -> Failure {
        Failure {
            class: "permanent",
            reason,
            attempts,
            first_failure_at: Utc::now(),
        }
    }
}

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    group: String,
}

impl DeadLetters {
    pub fn new(bootstrap_servers: &str, group: &str) -> anyhow::Result<DeadLetters> {
        let producer = kafka::reliable_producer_config(bootstrap_servers)
            .create()
            .context("creating dead-letter producer")?;
        Ok(DeadLetters {
            producer,
            topic: kafka::dead_letter_topic(group),
            group: group.to_owned(),
        })
    }

    /// Writes the dead letter and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        message: &BorrowedMessage<'_>,
        failure: &Failure,
    ) -> anyhow::Result<()> {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let attempts = failure.attempts.to_string();
        let first = failure.first_failure_at.to_rfc3339();
        let last = Utc::now().to_rfc3339();
        for (key, value) in [
            ("dlq-original-topic", message.topic()),
            ("dlq-original-partition", &partition),
            ("dlq-original-offset", &offset),
            ("dlq-consumer-group", &self.group),
            ("dlq-error-class", failure.class),
            ("dlq-error-message", &failure.reason),
            ("dlq-attempts", &attempts),
            ("dlq-first-failure-at", &first),
            ("dlq-last-failure-at", &last),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to {}: {e}", self.topic))?;
        tracing::warn!(topic = %self.topic, original_topic = message.topic(), partition = message.partition(),
            offset = message.offset(), reason = %failure.reason, "dead-lettered a record");
        Ok(())
    }
}
