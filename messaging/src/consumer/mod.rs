//! The consumer runtime: reads the subscribed topics in a consumer group and, for each record,
//! decodes it, then in ONE database transaction claims its message id in the inbox and applies the
//! handler's effect (which may append outbox rows). Only after that transaction commits is the
//! record's offset stored for the next commit to Kafka, so a crash at any point replays the record
//! and the inbox turns the replay into a counted no-op.
//!
//! # Failures, classified here and nowhere else
//! - **Transient** (database or broker unavailable, lost serialization race): retried in place
//!   with exponential backoff and jitter for as long as it takes. The partition waits; the
//!   message is never dead-lettered or skipped, so an outage only delays work.
//! - **Retryable** (the handler says "not yet", e.g. the order it needs is not there): the message
//!   is copied to the group's retry topic for its attempt (`<group>.retry.N`, delays 1 s, 10 s,
//!   60 s by default) and the partition moves on; after the last attempt it is dead-lettered with
//!   class `retryable`.
//! - **Permanent** (undecodable bytes, missing headers, unknown event type, schema violation, a
//!   domain rule that can never pass): straight to `<group>.dlq` with class `permanent`.
//!
//! # Per-order order during retries
//! Keys are order ids. When a message goes to a retry topic its key is **parked** (see
//! [`crate::parking`]): every later message of that key that the main consumer reads is stored in
//! the parking table instead of being applied, while other keys keep flowing. The retry consumer
//! (one per retry topic, waiting for each copy's `retry-not-before`) re-applies the head; once the
//! head is applied or dead-lettered, the key's parked messages are applied in arrival order, each
//! in one transaction with the removal of its parking row. If one of them says "not yet" in turn,
//! it becomes the new head and the key stays parked. Applying a parked message and checking the
//! parking of a new one lock the same row, so the two never interleave. This keeps a key's events
//! in order through any number of retries, which the usual retry-topic frameworks do not.
//!
//! Every path asks the same two pure functions what to do ([`crate::decision`]): whether a
//! message may apply, wait behind its key, or is a stray copy that must not act; and after the
//! attempt, where it goes next and whether its key's chain has ended. Only the key's current
//! head ends the chain. A head whose retry copy never comes back is given up on after
//! `--parked-key-timeout` ([`Worker::sweep_once`]).
//!
//! # Modules
//! - `handler`: what a service implements ([`Handler`], [`HandlerError`], [`AfterCommit`]).
//! - `client`: the rdkafka consumer, its settings and broker workarounds.
//! - `attempt`: one try at one message (inbox claim and handler in the caller's transaction) and
//!   what follows its commit (actions, counters, handler duration), the same on every path.
//! - `record`: one record on its own, through parking, the inbox, retries and the DLQ.
//! - `batch`: group commit of the records already read from the subscribed topics.
//! - `parked`: applying a released key's parked messages; the sweep of stale heads.
//! - `backoff`: waiting out transient failures: the one retry loop of every path.

mod attempt;
mod backoff;
mod batch;
mod client;
mod handler;
mod parked;
mod record;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics::counter;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, Producer};
use sqlx::PgPool;
use tracing::Instrument as _;

use self::client::{GroupConsumer, close, stream_consumer};
pub use self::handler::{AfterCommit, Handler, HandlerError};
use crate::decision::Stage;
pub use crate::delivery::{Delivery, Envelope};
use crate::{kafka, ownership, retry};
use service_kit::shutdown::{Shutdown, Trigger};

/// Where and how a consumer group runs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub kafka: kafka::KafkaSettings,
    pub group: String,
    pub topics: Vec<String>,
    /// The delay before each retry attempt; its length is the number of retries.
    pub retry_delays: Vec<Duration>,
    /// How long a key may wait behind one head before the head is dead-lettered from its stored
    /// record and the key's parked messages are applied (see [`Worker::sweep_once`]).
    pub parked_key_timeout: Duration,
    /// The most records of the subscribed topics applied in one transaction (group commit); 1
    /// applies each alone.
    pub max_batch: usize,
}

/// Runs the group's main consumer and one consumer per retry topic until `shutdown` fires.
/// Returns an error only when a Kafka client cannot be created or subscribed.
pub async fn run<H: Handler>(
    settings: ConsumerSettings,
    pool: PgPool,
    handler: H,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let producer: FutureProducer = settings
        .kafka
        .producer()
        .create()
        .context("creating the retry and dead-letter producer")?;
    // The consumers stop on the service's shutdown or on a fatal producer error.
    let (fatal, fatal_fired) = Shutdown::new();
    let stopping = Shutdown::new();
    {
        let (external, fatal_fired, trigger) = (shutdown.clone(), fatal_fired.clone(), stopping.0);
        tokio::spawn(async move {
            tokio::select! {
                _ = external.wait() => {}
                _ = fatal_fired.wait() => {}
            }
            trigger.fire();
        });
    }
    let shutdown = stopping.1;
    let worker = Arc::new(Worker {
        group: settings.group.clone(),
        max_batch: settings.max_batch.max(1),
        pool,
        handler,
        producer,
        retry_delays: settings.retry_delays.clone(),
        topics: settings.topics.clone(),
        shutdown: shutdown.clone(),
        fatal,
    });
    // One member id for every consumer of this process in the ownership table.
    let member = uuid::Uuid::new_v4();
    let mut consumers = vec![(settings.group.clone(), settings.topics.clone(), Stage::Main)];
    for attempt in 1..=settings.retry_delays.len() {
        // Each retry topic has its own group id: its records wait a uniform delay, so one
        // consumer per topic reads them in due order without holding up the others.
        let topic = retry::retry_topic(&settings.group, attempt);
        consumers.push((topic.clone(), vec![topic], Stage::Retry));
    }
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for (group, topics, stage) in consumers {
        for topic in &topics {
            // Rare: exported at 0 from the start so that the alert on it has a series to read.
            counter!("consumer_offset_gaps_total", "group" => group.clone(), "topic" => topic.clone())
                .absolute(0);
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let consumer = Arc::new(stream_consumer(&settings.kafka, &group, &names)?);
        clients.push(consumer.clone());
        for topic in &topics {
            tasks.push(tokio::spawn(ownership::watch(
                consumer.clone(),
                worker.pool.clone(),
                group.clone(),
                topic.clone(),
                topics.clone(),
                member,
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(consume(worker.clone(), consumer, stage)));
    }
    counter!("consumer_parked_heads_expired_total", "group" => settings.group.clone()).absolute(0);
    tasks.push(tokio::spawn(
        worker.clone().sweep(settings.parked_key_timeout),
    ));
    tracing::info!(group = %settings.group, topics = ?settings.topics, retry_delays = ?settings.retry_delays,
        kafka_config = ?settings.kafka.describe_user_config(), "consumer started");
    for task in tasks {
        task.await.context("consumer task")?;
    }
    close(clients).await;
    if fatal_fired.is_fired()
        && let Some((code, reason)) = worker.producer.client().fatal_error()
    {
        anyhow::bail!(
            "the retry and dead-letter producer of {} failed fatally ({code:?}): {reason}",
            settings.group
        );
    }
    tracing::info!(group = %settings.group, "consumer stopped");
    Ok(())
}

/// Reads one consumer's records in partition order and takes each to its end. On a retry topic
/// records go one at a time (each waits for its `retry-not-before`); on the subscribed topics,
/// the records that have already arrived (up to `--consumer-max-batch`, never waiting for more)
/// are applied together ([`Worker::apply_all`]). An offset is stored only once its record is
/// done, so a crash replays it and the inbox skips what was already applied.
async fn consume<H: Handler>(worker: Arc<Worker<H>>, consumer: Arc<GroupConsumer>, stage: Stage) {
    use futures::FutureExt as _;
    let limit = match stage {
        Stage::Main => worker.max_batch,
        Stage::Retry | Stage::Parked => 1,
    };
    let mut messages = Vec::with_capacity(limit);
    loop {
        let first = tokio::select! {
            _ = worker.shutdown.wait() => break,
            message = consumer.recv() => message,
        };
        match first {
            Ok(m) => messages.push(m),
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consumer error; continuing");
                if worker
                    .shutdown
                    .sleep(Duration::from_millis(200))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
        }
        // What the client has already fetched, without waiting for more.
        while messages.len() < limit {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => messages.push(m),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consumer error; continuing");
                    break;
                }
                None => break,
            }
        }
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in &messages {
            let delivery = received(&consumer, message, stage).await;
            deliveries.push(delivery);
        }
        let store = |i: usize| {
            if let Err(e) = consumer.store_offset_from_message(&messages[i]) {
                tracing::warn!(error = %e, "could not store offset; the record may be redelivered");
            }
        };
        let done = match stage {
            Stage::Main => worker.apply_all(&deliveries, store).await,
            Stage::Retry | Stage::Parked => {
                let span = record::process_span(&worker.group, &deliveries[0]);
                let done = worker.process(&deliveries[0], stage).instrument(span).await;
                if done.is_ok() {
                    store(0);
                }
                done
            }
        };
        messages.clear();
        if done.is_err() {
            break;
        }
    }
}

/// A record as read: owned, stripped of forged `retry-*` headers when it comes from a subscribed
/// topic, and checked for records the broker skipped before it.
async fn received(
    consumer: &Arc<GroupConsumer>,
    message: &rdkafka::message::BorrowedMessage<'_>,
    stage: Stage,
) -> Delivery {
    let mut delivery = Delivery::from_message(message);
    if stage == Stage::Main {
        let dropped = delivery.drop_retry_headers();
        if dropped > 0 {
            tracing::warn!(topic = %delivery.topic, partition = delivery.partition, offset = delivery.offset,
                dropped, "a record on a subscribed topic carried retry-* headers; ignoring them (only retry copies have them)");
        }
    }
    client::check_for_gap(consumer, &delivery).await;
    delivery
}

struct Worker<H> {
    group: String,
    /// The most records of the subscribed topics applied in one transaction.
    max_batch: usize,
    pool: PgPool,
    handler: H,
    producer: FutureProducer,
    retry_delays: Vec<Duration>,
    /// The subscribed topics (the `topic` label of the metrics is one of these or a retry topic).
    topics: Vec<String>,
    /// The service's shutdown, or this consumer's own when its producer failed fatally.
    shutdown: Shutdown,
    /// Fired when the retry and dead-letter producer failed fatally (idempotence broken, or a
    /// record failed for good under `enable.gapless.guarantee`): it can never send again, so
    /// every consumer stops and [`run`] returns the error, which ends the process for its
    /// supervisor to restart it with a fresh producer. The records being handled are read again.
    fatal: Trigger,
}

impl<H> Worker<H> {
    /// The attempt a record read from a retry topic is on: the number of its topic (its
    /// `retry-attempt` header is not trusted).
    fn attempt_of(&self, delivery: &Delivery) -> usize {
        retry::attempt_of_topic(&self.group, &delivery.topic).unwrap_or(self.retry_delays.len())
    }

    /// The delay of the retry topic `delivery` was read from.
    fn retry_delay_of(&self, delivery: &Delivery) -> Duration {
        let attempt = self.attempt_of(delivery);
        self.retry_delays
            .get(attempt.saturating_sub(1))
            .copied()
            .unwrap_or_default()
    }

    /// The `topic` label of a record's metrics: where it was first consumed from when that is a
    /// subscribed topic, else the topic it was read from; never a value a record's header makes
    /// up (each would be a new series).
    fn topic_label(&self, delivery: &Delivery) -> String {
        let (origin, _, _) = delivery.origin();
        if self.topics.contains(&origin) {
            origin
        } else {
            delivery.topic.clone()
        }
    }

    /// Whether the producer failed fatally; if so, logs it once and stops the consumers.
    fn producer_failed(&self) -> bool {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return false;
        };
        if !self.shutdown.is_fired() {
            tracing::error!(?code, %reason, group = %self.group,
                "the retry and dead-letter producer failed fatally; stopping the consumers (the process exits to be restarted)");
        }
        self.fatal.fire();
        true
    }

    fn count(&self, name: &'static str, delivery: &Delivery, event_type: &'static str) {
        counter!(name, "group" => self.group.clone(), "topic" => self.topic_label(delivery), "event_type" => event_type)
            .increment(1);
    }
}

/// Describes the consumer runtime's metrics.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "consumer_messages_processed_total",
        "Messages applied (inbox claimed, effect committed), by group, topic and event type"
    );
    describe_counter!(
        "consumer_messages_ignored_total",
        "Records of events the group does not act on, read from its topics and passed by without a transaction or an inbox row, by group, topic and event type"
    );
    describe_counter!(
        "consumer_messages_duplicate_total",
        "Messages skipped because the inbox had their message id already, by group, topic and event type"
    );
    describe_counter!(
        "consumer_messages_parked_total",
        "Messages stored behind an earlier message of their key that waits in a retry topic"
    );
    describe_counter!(
        "consumer_messages_retried_total",
        "Messages sent to a retry topic because they were not applicable yet, by attempt"
    );
    describe_counter!(
        "consumer_messages_dead_lettered_total",
        "Messages sent to the group's dead-letter topic, by error class"
    );
    describe_counter!(
        "consumer_transient_retries_total",
        "In-place retries after a transient failure (database or broker unavailable)"
    );
    describe_histogram!(
        "consumer_handler_duration_seconds",
        Unit::Seconds,
        "Time to apply one message: inbox claim, effect and commit"
    );
    describe_gauge!(
        "consumer_lag_messages",
        "Messages between the partition's high watermark and the group's committed offset, per assigned partition (librdkafka statistics, every 5 s)"
    );
    describe_counter!(
        "consumer_offset_gaps_total",
        "Times a consumer received an offset beyond the next one it expected on a partition: records it never received (the log names the range)"
    );
    describe_gauge!(
        "consumer_unowned_partitions",
        "Partitions of the topic that no live instance of the group reads, per the ownership watchdog (every 5 s)"
    );
    describe_counter!(
        "consumer_forced_rebalances_total",
        "Times this consumer left and rejoined its group because partitions had no live reader"
    );
    describe_gauge!(
        "consumer_parked_keys",
        "Keys (orders) whose events wait behind a message in the retry topics"
    );
    describe_gauge!(
        "consumer_parked_key_oldest_age_seconds",
        Unit::Seconds,
        "How long the longest-waiting parked key has waited behind its current head"
    );
    describe_counter!(
        "consumer_parked_heads_expired_total",
        "Heads given up on after --parked-key-timeout (their retry copy never came back): dead-lettered, their keys' parked messages applied"
    );
}
