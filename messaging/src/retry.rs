//! Non-blocking retries for messages a handler says are "not yet" applicable: the message is copied
//! to the group's retry topic of its attempt (`<group>.retry.1`, `.retry.2`, ...), each with its
//! configured delay (default 1 s, 10 s, 60 s), and after the last one to the dead-letter topic.
//! A retry copy carries where it came from and when it may run again in `retry-*` headers.

use schemas::headers;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;

use crate::delivery::Delivery;

/// The retry topic of attempt `attempt` (1-based) of consumer group `group`.
pub fn retry_topic(group: &str, attempt: usize) -> String {
    format!("{group}.retry.{attempt}")
}

/// Parses delays such as `1s,10s,60s` (units `ms`, `s`, `m`).
pub fn parse_delays(text: &str) -> Result<Vec<Duration>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(service_kit::duration::parse)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|d| {
            if d.is_empty() {
                Err("at least one retry delay is needed".into())
            } else {
                Ok(d)
            }
        })
}

/// The attempt (1-based) that retry topic `topic` of `group` holds: `orders.retry.2` → 2. A retry
/// copy's attempt is where it is read from, never what its `retry-attempt` header claims (a
/// forged header cannot skip retries or overflow a count).
pub fn attempt_of_topic(group: &str, topic: &str) -> Option<usize> {
    topic
        .strip_prefix(group)?
        .strip_prefix(".retry.")?
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// When a retry copy may run (Unix milliseconds), as its header says; `None` for a first
/// delivery. The consumer never waits longer than the retry topic's delay from now, whatever
/// the header says.
pub fn not_before(delivery: &Delivery) -> Option<DateTime<Utc>> {
    delivery
        .header(headers::RETRY_NOT_BEFORE)
        .and_then(|t| t.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
}

pub fn first_failure_at(delivery: &Delivery) -> Option<DateTime<Utc>> {
    delivery
        .header(headers::RETRY_FIRST_FAILURE_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Copies `delivery` to the retry topic of `attempt`, to run after `delay`; waits for the ack.
/// Only records within [`Delivery::check_bounds`] get here (others are undecodable and go to the
/// DLQ), so a copy weighs at most about 73 KiB and no broker refuses it for its size.
pub async fn send(
    producer: &FutureProducer,
    group: &str,
    delivery: &Delivery,
    attempt: usize,
    delay: Duration,
    reason: &str,
) -> anyhow::Result<()> {
    let topic = retry_topic(group, attempt);
    let (origin_topic, origin_partition, origin_offset) = delivery.origin();
    let first = first_failure_at(delivery).unwrap_or_else(Utc::now);
    let not_before = Utc::now() + delay;
    let headers = delivery.headers_with(
        &[headers::RETRY_PREFIX],
        &[
            (headers::RETRY_ATTEMPT, attempt.to_string()),
            (
                headers::RETRY_NOT_BEFORE,
                not_before.timestamp_millis().to_string(),
            ),
            (headers::RETRY_ORIGINAL_TOPIC, origin_topic),
            (
                headers::RETRY_ORIGINAL_PARTITION,
                origin_partition.to_string(),
            ),
            (headers::RETRY_ORIGINAL_OFFSET, origin_offset.to_string()),
            (headers::RETRY_FIRST_FAILURE_AT, first.to_rfc3339()),
            (headers::RETRY_REASON, reason.to_owned()),
        ],
    );
    delivery
        .send_copy(producer, &topic, headers)
        .await
        .with_context(|| format!("producing to {topic}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_comes_from_the_retry_topic_read() {
        assert_eq!(attempt_of_topic("g", &retry_topic("g", 2)), Some(2));
        assert_eq!(attempt_of_topic("g", "g.retry.0"), None);
        assert_eq!(attempt_of_topic("g", "h.retry.1"), None);
        assert_eq!(attempt_of_topic("g", "orders.v1"), None);
        assert_eq!(attempt_of_topic("g", "g.retry.18446744073709551616"), None);
    }

    #[test]
    fn delays_parse_with_units() {
        assert_eq!(
            parse_delays("1s, 10s,60s").unwrap(),
            [1, 10, 60].map(Duration::from_secs)
        );
        assert_eq!(
            parse_delays("250ms,2m").unwrap(),
            [Duration::from_millis(250), Duration::from_secs(120)]
        );
        assert!(parse_delays("").is_err());
        assert!(parse_delays("10").is_err());
        assert!(parse_delays("1w").is_err());
        assert!(parse_delays("999999999999999999m").is_err());
    }
}
