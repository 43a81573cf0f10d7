//! The consumer runtime: reads the subscribed topics in a consumer group and, for each record,
//! decodes it, then in ONE database transaction claims its message id in the inbox and applies the
//! handler's effect (which may append outbox rows). Only after that transaction commits is the
//! record's offset stored for the next commit to Kafka, so a crash at any point replays the record
//! and the inbox turns the replay into a counted no-op.
//!
//! Failures are classified once, here: a transient one (database or broker unavailable, lost
//! serialization race) is retried in place with exponential backoff and jitter for as long as it
//! takes, so an outage delays the partition and never dead-letters; a permanent one (undecodable
//! record, missing header, a handler that says the message can never apply) goes to the group's
//! dead-letter topic with its reason, and the partition moves on. Records are applied one at a time
//! in partition order, which keeps each order's events in order (key = order id).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics::{counter, histogram};
use rand::Rng;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use schemas::Event;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::dead_letter::{DeadLetters, Failure};
use crate::shutdown::Shutdown;
use crate::{inbox, kafka};

/// A decoded record with the headers the saga relies on.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub message_id: Uuid,
    pub event: Event,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Envelope {
    /// The cause to record on events emitted while handling this message.
    pub fn cause(&self) -> crate::outbox::Cause {
        crate::outbox::Cause {
            causation_id: Some(self.message_id),
            traceparent: Some(crate::trace_context::child_of(self.traceparent.as_deref())),
            tracestate: self.tracestate.clone(),
        }
    }
}

/// Why a handler could not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying as it is: the infrastructure is unavailable for now.
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    /// Will never succeed: the message goes to the dead-letter topic with this reason.
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(err: sqlx::Error) -> Self {
        if crate::db::is_transient(&err) {
            HandlerError::Transient(err.into())
        } else {
            HandlerError::Permanent(format!("database error: {err}"))
        }
    }
}

/// A service's reaction to the messages of its subscribed topics. `handle` runs inside the
/// transaction that also holds the inbox claim; it must do all its writes through `conn`.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Where and how a consumer group runs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub bootstrap_servers: String,
    pub group: String,
    pub topics: Vec<String>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs the consumer until `shutdown` fires. Returns an error only when the Kafka client itself
/// cannot be created or subscribed.
pub async fn run<H: Handler>(
    settings: ConsumerSettings,
    pool: PgPool,
    handler: H,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = kafka::client_config(&settings.bootstrap_servers)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        // Offsets are stored by hand, after the inbox transaction commits.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // The broker answers a fetch when data arrives or this wait ends: bounds delivery latency.
        .set("fetch.wait.max.ms", "50")
        // A transient outage is waited out inside one record; do not leave the group meanwhile.
        .set("max.poll.interval.ms", "86400000")
        .create()
        .context("creating Kafka consumer")?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .context("subscribing to topics")?;
    let dead_letters = DeadLetters::new(&settings.bootstrap_servers, &settings.group)?;
    tracing::info!(group = %settings.group, topics = ?settings.topics, "consumer started");
    let worker = Worker {
        group: settings.group.clone(),
        pool,
        handler,
        dead_letters,
        shutdown: shutdown.clone(),
    };
    loop {
        let message = tokio::select! {
            _ = shutdown.wait() => break,
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match worker.process(&message).await {
            Processed::Done => {
                if let Err(e) = consumer.store_offset_from_message(&message) {
                    tracing::warn!(error = %e, "could not store offset; the record may be redelivered");
                }
            }
            Processed::Interrupted => break,
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final offset commit");
    }
    tracing::info!(group = %settings.group, "consumer stopped");
    Ok(())
}

enum Processed {
    /// Applied, skipped as a duplicate, or dead-lettered: the offset may be stored.
    Done,
    /// Shutdown arrived before the record was done: its offset must not be stored.
    Interrupted,
}

struct Worker<H> {
    group: String,
    pool: PgPool,
    handler: H,
    dead_letters: DeadLetters,
    shutdown: Shutdown,
}

impl<H: Handler> Worker<H> {
    async fn process(&self, message: &BorrowedMessage<'_>) -> Processed {
        let topic = message.topic().to_owned();
        let envelope = match envelope_of(message) {
            Ok(envelope) => envelope,
            Err(reason) => {
                tracing::warn!(%topic, partition = message.partition(), offset = message.offset(), %reason,
                    "undecodable record; dead-lettering it");
                return self
                    .dead_letter(message, "unknown", Failure::permanent(reason, 1))
                    .await;
            }
        };
        let event_type = envelope.event.event_type();
        let started = Instant::now();
        let mut attempt: u32 = 0;
        let first_failure = chrono::Utc::now();
        loop {
            attempt += 1;
            match self.apply_once(&envelope).await {
                Ok(Applied::Applied) => {
                    counter!("consumer_messages_processed_total", "group" => self.group.clone(),
                        "topic" => topic.clone(), "event_type" => event_type)
                    .increment(1);
                    histogram!("consumer_handler_duration_seconds", "group" => self.group.clone(),
                        "topic" => topic.clone(), "event_type" => event_type)
                    .record(started.elapsed().as_secs_f64());
                    tracing::debug!(message_id = %envelope.message_id, event_type, order_id = %envelope.event.order_id(), "applied");
                    return Processed::Done;
                }
                Ok(Applied::Duplicate) => {
                    counter!("consumer_messages_duplicate_total", "group" => self.group.clone(),
                        "topic" => topic.clone(), "event_type" => event_type)
                    .increment(1);
                    tracing::info!(message_id = %envelope.message_id, event_type, "duplicate message skipped: already applied");
                    return Processed::Done;
                }
                Err(HandlerError::Permanent(reason)) => {
                    tracing::warn!(message_id = %envelope.message_id, event_type, %reason,
                        "message can never apply; dead-lettering it");
                    let failure = Failure {
                        class: "permanent",
                        reason,
                        attempts: attempt,
                        first_failure_at: first_failure,
                    };
                    return self.dead_letter(message, event_type, failure).await;
                }
                Err(HandlerError::Transient(e)) => {
                    counter!("consumer_transient_retries_total", "group" => self.group.clone(),
                        "topic" => topic.clone(), "event_type" => event_type)
                    .increment(1);
                    let delay = backoff(attempt);
                    tracing::warn!(message_id = %envelope.message_id, event_type, attempt, ?delay,
                        error = %format!("{e:#}"), "transient failure; retrying the same message");
                    if self.shutdown.sleep(delay).await.is_err() {
                        return Processed::Interrupted;
                    }
                }
            }
        }
    }

    async fn apply_once(&self, envelope: &Envelope) -> Result<Applied, HandlerError> {
        let mut tx = self.pool.begin().await?;
        if !inbox::claim(&mut tx, &self.group, envelope).await? {
            tx.rollback().await?;
            return Ok(Applied::Duplicate);
        }
        self.handler.handle(&mut tx, envelope).await?;
        tx.commit().await?;
        Ok(Applied::Applied)
    }

    async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        event_type: &str,
        failure: Failure,
    ) -> Processed {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.dead_letters.send(message, &failure).await {
                Ok(()) => {
                    counter!("consumer_messages_dead_lettered_total", "group" => self.group.clone(),
                        "topic" => message.topic().to_owned(), "event_type" => event_type.to_owned(),
                        "error_class" => failure.class)
                    .increment(1);
                    return Processed::Done;
                }
                Err(e) => {
                    let delay = backoff(attempt);
                    tracing::warn!(error = %format!("{e:#}"), ?delay, "could not write dead letter; retrying");
                    if self.shutdown.sleep(delay).await.is_err() {
                        return Processed::Interrupted;
                    }
                }
            }
        }
    }
}

enum Applied {
    Applied,
    Duplicate,
}

/// Exponential backoff from 100 ms, capped at [`MAX_BACKOFF`], with full jitter on the upper half.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let half = base / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// The value of header `name`, when present and UTF-8.
pub fn header<'a>(message: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn envelope_of(message: &BorrowedMessage<'_>) -> Result<Envelope, String> {
    let message_id = header(message, "message-id")
        .ok_or_else(|| "the record has no message-id header".to_owned())?;
    let message_id = Uuid::parse_str(message_id)
        .map_err(|e| format!("the message-id header {message_id:?} is not a UUID: {e}"))?;
    let payload = message.payload().unwrap_or_default();
    let event = schemas::decode_with_content_type(
        header(message, "content-type"),
        header(message, "event-type"),
        payload,
    )
    .map_err(|e| e.to_string())?;
    Ok(Envelope {
        message_id,
        event,
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        correlation_id: header(message, "correlation-id").map(str::to_owned),
        traceparent: header(message, "traceparent").map(str::to_owned),
        tracestate: header(message, "tracestate").map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(4) >= Duration::from_millis(400));
        assert!(backoff(40) <= MAX_BACKOFF);
    }
}
