//! The dead-letter writer: copies a record that can never be applied to `<group>.dlq` with its
//! original key, value and headers, plus `dlq-*` headers that say where it came from and why it
//! failed. A retry copy is dead-lettered under its original topic, partition and offset. A record
//! too large to copy is dead-lettered as a bounded stub ([`MAX_FULL_COPY_BYTES`]).

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use schemas::headers;
use schemas::limits::truncate_chars;

use crate::decision::Class;
use crate::delivery::{self, Delivery};
use crate::kafka;

/// Why and how often a record failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Permanent (can never apply) or retryable (still "not yet" after its last retry).
    pub class: Class,
    pub reason: String,
    pub attempts: usize,
    pub first_failure_at: DateTime<Utc>,
}

pub const ERROR_CLASS: &str = headers::DLQ_ERROR_CLASS;
pub const ERROR_MESSAGE: &str = headers::DLQ_ERROR_MESSAGE;
/// `true` on a stub: a dead letter without the record's value, for a record too large to copy.
pub const STUB: &str = headers::DLQ_STUB;

/// The largest record the DLQ holds a full copy of (key, value and headers). Kafka's default
/// limits are about 1 MB per record; half of that leaves room for the `dlq-*` headers and for
/// brokers configured tighter. A larger record, or one the client refuses for its size, is
/// dead-lettered as a stub, never retried forever. (A copy the broker refuses for good makes the
/// gapless producer fail fatally instead: the DLQ topics must accept records of this size.)
pub const MAX_FULL_COPY_BYTES: usize = 512 * 1024;

/// The saga headers a stub keeps, when their value is short.
const STUB_KEEPS: [&str; 6] = [
    headers::MESSAGE_ID,
    headers::EVENT_TYPE,
    headers::CONTENT_TYPE,
    headers::CORRELATION_ID,
    headers::CAUSATION_ID,
    headers::TRACEPARENT,
];
const STUB_MAX_HEADER_BYTES: usize = 128;
/// The longest `dlq-error-message`.
const MAX_REASON_CHARS: usize = 2_000;

/// Writes the dead letter of `delivery` for `group` and waits for the broker's acknowledgement:
/// a full copy, or a stub ([`MAX_FULL_COPY_BYTES`]).
pub async fn send(
    producer: &FutureProducer,
    group: &str,
    delivery: &Delivery,
    failure: &Failure,
) -> anyhow::Result<()> {
    let topic = kafka::dead_letter_topic(group);
    let (origin_topic, origin_partition, origin_offset) = delivery.origin();
    let size = delivery.size();
    let copied = if size > MAX_FULL_COPY_BYTES {
        Err(format!(
            "the record has {size} bytes, more than the {MAX_FULL_COPY_BYTES} a dead letter copies"
        ))
    } else {
        let headers = delivery.headers_with(
            &[headers::RETRY_PREFIX, headers::DLQ_PREFIX],
            &dlq_headers(group, delivery, failure, None),
        );
        match delivery.send_copy(producer, &topic, headers).await {
            Ok(()) => Ok(()),
            Err(e) if delivery::is_too_large(&e) => Err(format!(
                "the record has {size} bytes, more than the client or broker accepts ({e})"
            )),
            Err(e) => return Err(e).with_context(|| format!("producing to {topic}")),
        }
    };
    let stub = copied.is_err();
    if let Err(why) = copied {
        send_stub(producer, &topic, group, delivery, failure, &why).await?;
    }
    tracing::warn!(%topic, original_topic = %truncate_chars(&origin_topic, 64), partition = origin_partition,
        offset = origin_offset, class = failure.class.as_str(), reason = %truncate_chars(&failure.reason, 300), stub,
        "dead-lettered a record");
    Ok(())
}

/// A dead letter without the record's value: its key and its short saga headers, the usual
/// `dlq-*` headers naming the original topic, partition and offset (where the record itself can
/// still be read), and why no full copy was made.
async fn send_stub(
    producer: &FutureProducer,
    topic: &str,
    group: &str,
    delivery: &Delivery,
    failure: &Failure,
    why: &str,
) -> anyhow::Result<()> {
    let mut headers = OwnedHeaders::new();
    for name in STUB_KEEPS {
        if let Some(value) = delivery
            .header(name)
            .filter(|v| v.len() <= STUB_MAX_HEADER_BYTES)
        {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
    }
    let stub_note = format!(
        "{why}; this dead letter is a stub without the record's value: read the record at its original topic, partition and offset"
    );
    for (key, value) in dlq_headers(group, delivery, failure, Some(&stub_note)) {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    let key = delivery
        .key
        .as_deref()
        .filter(|k| k.len() <= delivery::MAX_KEY_BYTES);
    delivery::send(producer, topic, key, None, headers)
        .await
        .with_context(|| format!("producing a dead-letter stub to {topic}"))
}

/// The `dlq-*` headers of a dead letter (with [`STUB`] and the stub's note when `stub` is given).
fn dlq_headers(
    group: &str,
    delivery: &Delivery,
    failure: &Failure,
    stub: Option<&str>,
) -> Vec<(&'static str, String)> {
    let (origin_topic, origin_partition, origin_offset) = delivery.origin();
    let reason = match stub {
        Some(note) => format!("{}; {note}", failure.reason),
        None => failure.reason.clone(),
    };
    let mut headers = vec![
        (
            headers::DLQ_ORIGINAL_TOPIC,
            truncate_chars(origin_topic, 256),
        ),
        (
            headers::DLQ_ORIGINAL_PARTITION,
            origin_partition.to_string(),
        ),
        (headers::DLQ_ORIGINAL_OFFSET, origin_offset.to_string()),
        (headers::DLQ_CONSUMER_GROUP, group.to_owned()),
        (headers::DLQ_ERROR_CLASS, failure.class.as_str().to_owned()),
        (
            headers::DLQ_ERROR_MESSAGE,
            truncate_chars(reason, MAX_REASON_CHARS),
        ),
        (headers::DLQ_ATTEMPTS, failure.attempts.to_string()),
        (
            headers::DLQ_FIRST_FAILURE_AT,
            failure.first_failure_at.to_rfc3339(),
        ),
        (headers::DLQ_LAST_FAILURE_AT, Utc::now().to_rfc3339()),
    ];
    if stub.is_some() {
        headers.push((headers::DLQ_STUB, "true".to_owned()));
        headers.push((headers::DLQ_ORIGINAL_BYTES, delivery.size().to_string()));
    }
    headers
}
