//! The dead-letter writer: copies a record that can never be applied to `<group>.dlq` with its
//! original key, value and headers, plus `dlq-*` headers that say where it came from and why it
//! failed. A retry copy is dead-lettered under its original topic, partition and offset.

use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;

use crate::delivery::Delivery;
use crate::kafka;

/// Why and how often a record failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `permanent` (can never apply) or `retryable` (still "not yet" after its last retry).
    pub class: &'static str,
    pub reason: String,
    pub attempts: usize,
    pub first_failure_at: DateTime<Utc>,
}

pub const ERROR_CLASS: &str = "dlq-error-class";
pub const ERROR_MESSAGE: &str = "dlq-error-message";

/// Writes the dead letter of `delivery` for `group` and waits for the broker's acknowledgement.
pub async fn send(
    producer: &FutureProducer,
    group: &str,
    delivery: &Delivery,
    failure: &Failure,
) -> anyhow::Result<()> {
    let topic = kafka::dead_letter_topic(group);
    let (origin_topic, origin_partition, origin_offset) = delivery.origin();
    let headers = delivery.headers_with(
        &["retry-", "dlq-"],
        &[
            ("dlq-original-topic", origin_topic.clone()),
            ("dlq-original-partition", origin_partition.to_string()),
            ("dlq-original-offset", origin_offset.to_string()),
            ("dlq-consumer-group", group.to_owned()),
            (ERROR_CLASS, failure.class.to_owned()),
            (ERROR_MESSAGE, failure.reason.clone()),
            ("dlq-attempts", failure.attempts.to_string()),
            (
                "dlq-first-failure-at",
                failure.first_failure_at.to_rfc3339(),
            ),
            ("dlq-last-failure-at", Utc::now().to_rfc3339()),
        ],
    );
    delivery.send_copy(producer, &topic, headers).await?;
    tracing::warn!(%topic, original_topic = %origin_topic, partition = origin_partition,
        offset = origin_offset, class = failure.class, reason = %failure.reason, "dead-lettered a record");
    Ok(())
}
