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

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use metrics::{counter, histogram};
use rand::Rng;
use rdkafka::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::producer::FutureProducer;
use sqlx::{PgConnection, PgPool};
use tracing::Instrument as _;

use crate::dead_letter::{self, Failure};
pub use crate::delivery::{Delivery, Envelope};
use crate::offset_gaps::GapTracker;
use crate::shutdown::Shutdown;
use crate::{inbox, kafka, ownership, parking, retry};

/// Why a handler could not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying as it is, in place: the infrastructure is unavailable for now.
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    /// Not applicable yet: retry later through the retry topics.
    #[error("not yet: {0}")]
    Retryable(String),
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
/// transaction that also holds the inbox claim; it must do all its writes through `conn`. What it
/// returns runs only once that transaction has committed.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<AfterCommit, HandlerError>> + Send;
}

/// What a handler leaves to do once its transaction has committed, such as counting what it
/// changed: an attempt that rolls back (and is retried) must count nothing.
#[derive(Default)]
#[must_use = "run it after the transaction commits"]
pub struct AfterCommit(Vec<Box<dyn FnOnce() + Send>>);

impl AfterCommit {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds `action` to what runs after the commit.
    pub fn then(mut self, action: impl FnOnce() + Send + 'static) -> Self {
        self.0.push(Box::new(action));
        self
    }

    /// Runs every action, in the order added. Call it after the commit succeeded.
    pub fn run(self) {
        for action in self.0 {
            action();
        }
    }
}

/// Where and how a consumer group runs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub kafka: kafka::KafkaSettings,
    pub group: String,
    pub topics: Vec<String>,
    /// The delay before each retry attempt; its length is the number of retries.
    pub retry_delays: Vec<Duration>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);

type GroupConsumer = StreamConsumer<GroupContext>;

/// Logs what the group coordinator gives and takes, so an idle consumer says why, and tracks the
/// offsets received to notice records skipped.
struct GroupContext {
    group: String,
    gaps: std::sync::Mutex<GapTracker>,
}

impl ClientContext for GroupContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): the lag of each assigned
    /// partition, in messages between the high watermark and the committed offset, as
    /// `consumer_lag_messages{group, topic, partition}`. Unknown lags (-1) are not exported.
    /// On Tansu 0.6 the high watermark can trail (see the README), so lag can read low there.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("consumer_lag_messages", "group" => self.group.clone(),
                    "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Where each partition continues is learnt again from the committed offsets.
        self.gaps.lock().expect("gap tracker").forget_all();
        let describe = |list: &rdkafka::TopicPartitionList| {
            list.elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect::<Vec<_>>()
        };
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(group = %self.group, partitions = ?describe(list), "partitions assigned")
            }
            Rebalance::Revoke(list) => {
                tracing::info!(group = %self.group, partitions = ?describe(list), "partitions revoked")
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "group rebalance failed")
            }
        }
    }
}

fn stream_consumer(
    kafka: &kafka::KafkaSettings,
    group_id: &str,
    topics: &[&str],
) -> anyhow::Result<GroupConsumer> {
    let consumer: GroupConsumer = kafka
        .consumer(&[
            ("group.id", group_id),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "500"),
            // Offsets are stored by hand, after the inbox transaction commits.
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "1000"),
            // The broker answers a fetch when data arrives or this wait ends: bounds delivery
            // latency.
            ("fetch.wait.max.ms", "50"),
            // A transient outage or a retry delay is waited out inside one record; stay in the
            // group.
            ("max.poll.interval.ms", "86400000"),
            // Per-partition lag for the `consumer_lag_messages` gauge.
            ("statistics.interval.ms", "5000"),
        ])
        .create_with_context(GroupContext {
            group: group_id.to_owned(),
            gaps: Default::default(),
        })
        .context("creating Kafka consumer")?;
    consumer
        .subscribe(topics)
        .with_context(|| format!("subscribing to {topics:?}"))?;
    Ok(consumer)
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
    let worker = Arc::new(Worker {
        group: settings.group.clone(),
        pool,
        handler,
        producer,
        retry_delays: settings.retry_delays.clone(),
        shutdown: shutdown.clone(),
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
    for (group, topics, stage) in consumers {
        for topic in &topics {
            // Rare: exported at 0 from the start so that the alert on it has a series to read.
            counter!("consumer_offset_gaps_total", "group" => group.clone(), "topic" => topic.clone())
                .absolute(0);
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let consumer = Arc::new(stream_consumer(&settings.kafka, &group, &names)?);
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
    tracing::info!(group = %settings.group, topics = ?settings.topics, retry_delays = ?settings.retry_delays,
        kafka_config = ?settings.kafka.describe_user_config(), "consumer started");
    for task in tasks {
        task.await.context("consumer task")?;
    }
    tracing::info!(group = %settings.group, "consumer stopped");
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The subscribed topics: a parked key's messages are parked.
    Main,
    /// A retry topic: the message is its key's parking head.
    Retry,
}

async fn consume<H: Handler>(worker: Arc<Worker<H>>, consumer: Arc<GroupConsumer>, stage: Stage) {
    loop {
        let message = tokio::select! {
            _ = worker.shutdown.wait() => break,
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
        let delivery = Delivery::from_message(&message);
        check_for_gap(&consumer, &delivery).await;
        let span = process_span(&worker.group, &delivery);
        match worker.process(&delivery, stage).instrument(span).await {
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
}

/// Counts and logs records the broker skipped before `delivery` (see [`crate::offset_gaps`]).
/// The first record of a partition after an assignment is compared with the group's committed
/// offset, read from the broker.
async fn check_for_gap(consumer: &Arc<GroupConsumer>, delivery: &Delivery) {
    let (topic, partition) = (delivery.topic.as_str(), delivery.partition);
    let known = consumer
        .context()
        .gaps
        .lock()
        .expect("gap tracker")
        .knows(topic, partition);
    if !known && let Some(committed) = committed_offset(consumer, topic, partition).await {
        consumer
            .context()
            .gaps
            .lock()
            .expect("gap tracker")
            .expect(topic, partition, committed);
    }
    let gap = consumer
        .context()
        .gaps
        .lock()
        .expect("gap tracker")
        .observe(topic, partition, delivery.offset);
    if let Some(missing) = gap {
        let group = &consumer.context().group;
        tracing::error!(%group, %topic, partition, first_missing = *missing.start(), last_missing = *missing.end(),
            received = delivery.offset, "records skipped: the broker delivered this offset after an earlier \
            one with records missing in between; `saga audit` lists any that were never applied");
        counter!("consumer_offset_gaps_total", "group" => group.clone(), "topic" => topic.to_owned())
            .increment(1);
    }
}

/// The group's committed offset of one partition, when there is one.
async fn committed_offset(
    consumer: &Arc<GroupConsumer>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    let consumer = consumer.clone();
    let committed = tokio::task::spawn_blocking(move || {
        consumer.committed_offsets(list, Duration::from_secs(5))
    })
    .await
    .ok()?
    .map_err(|e| tracing::debug!(error = %e, "could not read the committed offset"))
    .ok()?;
    let element = committed.elements().into_iter().next()?;
    element.offset().to_raw().filter(|o| *o >= 0)
}

/// The OpenTelemetry consumer span of one record (`process orders.v1`), a child of the span
/// that sent it (the record's `traceparent`); what the handler writes continues this trace. Its
/// fields follow the OpenTelemetry messaging conventions; `order_id` (the key) and `trace_id`
/// go on every log line written while the record is handled.
fn process_span(group: &str, delivery: &Delivery) -> tracing::Span {
    let (original_topic, _, _) = delivery.origin();
    let key = String::from_utf8_lossy(delivery.key.as_deref().unwrap_or_default());
    let span = tracing::info_span!("process",
        otel.name = %format!("process {}", delivery.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %delivery.topic,
        messaging.destination.partition.id = delivery.partition,
        messaging.kafka.offset = delivery.offset,
        messaging.kafka.message.key = %key,
        messaging.consumer.group.name = %group,
        messaging.message.id = delivery.header("message-id").unwrap_or(""),
        messaging.kafka.original_topic = %original_topic,
        order_id = %key,
        trace_id = tracing::field::Empty,
    );
    crate::trace_context::continue_from(&span, delivery.header("traceparent"));
    span
}

enum Processed {
    /// Applied, skipped, parked, sent to a retry topic or dead-lettered: the offset may be stored.
    Done,
    /// Shutdown arrived before the record was done: its offset must not be stored.
    Interrupted,
}

/// What one attempt at a message came to.
enum Outcome {
    Applied,
    Duplicate,
    /// Stored behind its parked key.
    Parked,
    /// It is its parked key's head, redelivered from the main topic after a crash: send it on.
    ResumeRetry,
}

/// What one step of draining a released key came to.
enum Drain {
    Continue,
    /// The key is no longer parked.
    Released,
    /// A parked message said "not yet" and is now the key's head in the retry chain.
    Reparked,
}

struct Interrupted;

struct Worker<H> {
    group: String,
    pool: PgPool,
    handler: H,
    producer: FutureProducer,
    retry_delays: Vec<Duration>,
    shutdown: Shutdown,
}

impl<H: Handler> Worker<H> {
    async fn process(&self, delivery: &Delivery, stage: Stage) -> Processed {
        match self.process_inner(delivery, stage).await {
            Ok(()) => Processed::Done,
            Err(Interrupted) => Processed::Interrupted,
        }
    }

    async fn process_inner(&self, delivery: &Delivery, stage: Stage) -> Result<(), Interrupted> {
        let key = delivery.key_text();
        let attempts = retry::attempts_so_far(delivery);
        let envelope = match Envelope::decode(delivery) {
            Ok(envelope) => envelope,
            Err(reason) => {
                tracing::warn!(topic = %delivery.topic, partition = delivery.partition, offset = delivery.offset,
                    %reason, "undecodable record; dead-lettering it");
                self.dead_letter(delivery, "unknown", "permanent", reason, attempts + 1)
                    .await?;
                if stage == Stage::Retry {
                    self.resolve(&key).await?;
                }
                return Ok(());
            }
        };
        let event_type = envelope.event.event_type();
        if stage == Stage::Retry
            && let Some(due) = retry::not_before(delivery)
        {
            let wait = (due - Utc::now()).to_std().unwrap_or_default();
            if self.shutdown.sleep(wait).await.is_err() {
                return Err(Interrupted);
            }
        }
        let started = Instant::now();
        let mut transient_attempt = 0;
        loop {
            match self.apply_once(&envelope, delivery, &key, stage).await {
                Ok(Outcome::Applied) => {
                    self.count("consumer_messages_processed_total", delivery, event_type);
                    histogram!("consumer_handler_duration_seconds", "group" => self.group.clone(),
                        "topic" => envelope.topic.clone(), "event_type" => event_type)
                    .record(started.elapsed().as_secs_f64());
                    tracing::debug!(message_id = %envelope.message_id, event_type, %key, "applied");
                    if stage == Stage::Retry {
                        tracing::info!(message_id = %envelope.message_id, event_type, %key, attempt = attempts,
                            "retried message applied; releasing its key");
                        self.resolve(&key).await?;
                    }
                    return Ok(());
                }
                Ok(Outcome::Duplicate) => {
                    self.count("consumer_messages_duplicate_total", delivery, event_type);
                    tracing::info!(message_id = %envelope.message_id, event_type, "duplicate message skipped: already applied");
                    if stage == Stage::Retry {
                        self.resolve(&key).await?;
                    }
                    return Ok(());
                }
                Ok(Outcome::Parked) => {
                    self.count("consumer_messages_parked_total", delivery, event_type);
                    tracing::info!(message_id = %envelope.message_id, event_type, %key,
                        "key is waiting for a retry; message parked behind it");
                    return Ok(());
                }
                Ok(Outcome::ResumeRetry) => {
                    let reason = "resumed after a restart".to_owned();
                    return self
                        .retry_or_dead_letter(delivery, &envelope, &key, stage, reason)
                        .await;
                }
                Err(HandlerError::Retryable(reason)) => {
                    return self
                        .retry_or_dead_letter(delivery, &envelope, &key, stage, reason)
                        .await;
                }
                Err(HandlerError::Permanent(reason)) => {
                    tracing::warn!(message_id = %envelope.message_id, event_type, %reason,
                        "message can never apply; dead-lettering it");
                    self.dead_letter(delivery, event_type, "permanent", reason, attempts + 1)
                        .await?;
                    if stage == Stage::Retry {
                        self.resolve(&key).await?;
                    }
                    return Ok(());
                }
                Err(HandlerError::Transient(e)) => {
                    transient_attempt += 1;
                    self.transient_pause(delivery, event_type, transient_attempt, &e)
                        .await?;
                }
            }
        }
    }

    async fn apply_once(
        &self,
        envelope: &Envelope,
        delivery: &Delivery,
        key: &str,
        stage: Stage,
    ) -> Result<Outcome, HandlerError> {
        let mut tx = self.pool.begin().await?;
        if stage == Stage::Main
            && let Some(head) = parking::lock(&mut tx, &self.group, key).await?
        {
            if head == envelope.message_id {
                tx.rollback().await?;
                return Ok(Outcome::ResumeRetry);
            }
            parking::park_message(&mut tx, &self.group, key, delivery).await?;
            tx.commit().await?;
            return Ok(Outcome::Parked);
        }
        if !inbox::claim(&mut tx, &self.group, envelope).await? {
            tx.rollback().await?;
            return Ok(Outcome::Duplicate);
        }
        let after_commit = self.handler.handle(&mut tx, envelope).await?;
        tx.commit().await?;
        after_commit.run();
        Ok(Outcome::Applied)
    }

    /// Sends a "not yet" message to its next retry topic (parking its key), or dead-letters it
    /// when its retries are used up.
    async fn retry_or_dead_letter(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        key: &str,
        stage: Stage,
        reason: String,
    ) -> Result<(), Interrupted> {
        let event_type = envelope.event.event_type();
        let next = retry::attempts_so_far(delivery) + 1;
        let Some(delay) = self.retry_delays.get(next - 1).copied() else {
            tracing::warn!(message_id = %envelope.message_id, event_type, %reason, attempts = next,
                "still not applicable after its last retry; dead-lettering it");
            self.dead_letter(delivery, event_type, "retryable", reason, next)
                .await?;
            return self.resolve(key).await;
        };
        if stage == Stage::Main {
            self.until_done(|| async {
                let mut conn = self.pool.acquire().await?;
                parking::park_key(&mut conn, &self.group, key, envelope.message_id, &reason)
                    .await?;
                Ok(())
            })
            .await?;
        }
        self.until_done(|| async {
            retry::send(&self.producer, &self.group, delivery, next, delay, &reason)
                .await
                .map_err(HandlerError::Transient)
        })
        .await?;
        counter!("consumer_messages_retried_total", "group" => self.group.clone(),
            "topic" => envelope.topic.clone(), "event_type" => event_type, "attempt" => next.to_string())
        .increment(1);
        tracing::info!(message_id = %envelope.message_id, event_type, %key, attempt = next, ?delay, %reason,
            "not applicable yet; sent to a retry topic, its key waits");
        Ok(())
    }

    /// Applies the parked messages of `key`, oldest first, and releases the key.
    async fn resolve(&self, key: &str) -> Result<(), Interrupted> {
        let mut transient_attempt = 0;
        loop {
            match self.drain_one(key).await {
                Ok(Drain::Continue) => transient_attempt = 0,
                Ok(Drain::Released | Drain::Reparked) => return Ok(()),
                Err(e) => {
                    transient_attempt += 1;
                    let delay = backoff(transient_attempt);
                    tracing::warn!(%key, error = %e, ?delay, "could not apply parked messages yet; retrying");
                    if self.shutdown.sleep(delay).await.is_err() {
                        return Err(Interrupted);
                    }
                }
            }
        }
    }

    async fn drain_one(&self, key: &str) -> Result<Drain, HandlerError> {
        let mut tx = self.pool.begin().await?;
        if parking::lock(&mut tx, &self.group, key).await?.is_none() {
            tx.rollback().await?;
            return Ok(Drain::Released);
        }
        let Some((id, delivery)) = parking::first(&mut tx, &self.group, key).await? else {
            parking::release_key(&mut tx, &self.group, key).await?;
            tx.commit().await?;
            tracing::info!(%key, "key released");
            return Ok(Drain::Released);
        };
        let envelope = match Envelope::decode(&delivery) {
            Ok(e) => e,
            Err(reason) => {
                self.dead_letter_now(&delivery, "unknown", "permanent", reason, 1)
                    .await?;
                parking::remove_message(&mut tx, id).await?;
                tx.commit().await?;
                return Ok(Drain::Continue);
            }
        };
        let event_type = envelope.event.event_type();
        if !inbox::claim(&mut tx, &self.group, &envelope).await? {
            parking::remove_message(&mut tx, id).await?;
            tx.commit().await?;
            self.count("consumer_messages_duplicate_total", &delivery, event_type);
            return Ok(Drain::Continue);
        }
        match self.handler.handle(&mut tx, &envelope).await {
            Ok(after_commit) => {
                parking::remove_message(&mut tx, id).await?;
                tx.commit().await?;
                after_commit.run();
                self.count("consumer_messages_processed_total", &delivery, event_type);
                tracing::info!(message_id = %envelope.message_id, event_type, %key, "parked message applied");
                Ok(Drain::Continue)
            }
            Err(HandlerError::Retryable(reason)) => {
                tx.rollback().await?;
                let mut tx = self.pool.begin().await?;
                parking::lock(&mut tx, &self.group, key).await?;
                parking::park_key(&mut tx, &self.group, key, envelope.message_id, &reason).await?;
                parking::remove_message(&mut tx, id).await?;
                let delay = self.retry_delays[0];
                retry::send(&self.producer, &self.group, &delivery, 1, delay, &reason)
                    .await
                    .map_err(HandlerError::Transient)?;
                tx.commit().await?;
                tracing::info!(message_id = %envelope.message_id, event_type, %key, %reason,
                    "parked message not applicable yet; it now heads the key in the retry chain");
                Ok(Drain::Reparked)
            }
            Err(HandlerError::Permanent(reason)) => {
                tx.rollback().await?;
                self.dead_letter_now(&delivery, event_type, "permanent", reason, 1)
                    .await?;
                let mut conn = self.pool.acquire().await?;
                parking::remove_message(&mut conn, id).await?;
                Ok(Drain::Continue)
            }
            Err(e @ HandlerError::Transient(_)) => Err(e),
        }
    }

    /// Runs `step` until it succeeds, pausing with backoff on transient failures.
    async fn until_done<F, Fut>(&self, mut step: F) -> Result<(), Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        let mut attempt = 0;
        loop {
            match step().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    let delay = backoff(attempt);
                    tracing::warn!(error = %e, ?delay, "retrying");
                    if self.shutdown.sleep(delay).await.is_err() {
                        return Err(Interrupted);
                    }
                }
            }
        }
    }

    async fn transient_pause(
        &self,
        delivery: &Delivery,
        event_type: &'static str,
        attempt: u32,
        error: &anyhow::Error,
    ) -> Result<(), Interrupted> {
        self.count("consumer_transient_retries_total", delivery, event_type);
        let delay = backoff(attempt);
        tracing::warn!(message_id = delivery.header("message-id").unwrap_or(""), event_type, attempt, ?delay,
            error = %format!("{error:#}"), "transient failure; retrying the same message");
        self.shutdown.sleep(delay).await.map_err(|_| Interrupted)
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        event_type: &str,
        class: &'static str,
        reason: String,
        attempts: usize,
    ) -> Result<(), Interrupted> {
        let failure = Failure {
            class,
            reason,
            attempts,
            first_failure_at: retry::first_failure_at(delivery).unwrap_or_else(Utc::now),
        };
        self.until_done(|| async {
            dead_letter::send(&self.producer, &self.group, delivery, &failure)
                .await
                .map_err(HandlerError::Transient)
        })
        .await?;
        counter!("consumer_messages_dead_lettered_total", "group" => self.group.clone(),
            "topic" => delivery.origin().0, "event_type" => event_type.to_owned(), "error_class" => class)
        .increment(1);
        Ok(())
    }

    /// [`Self::dead_letter`] for use inside a drain step: a failure to write is transient.
    async fn dead_letter_now(
        &self,
        delivery: &Delivery,
        event_type: &str,
        class: &'static str,
        reason: String,
        attempts: usize,
    ) -> Result<(), HandlerError> {
        self.dead_letter(delivery, event_type, class, reason, attempts)
            .await
            .map_err(|Interrupted| HandlerError::Transient(anyhow::anyhow!("shutting down")))
    }

    fn count(&self, name: &'static str, delivery: &Delivery, event_type: &'static str) {
        counter!(name, "group" => self.group.clone(), "topic" => delivery.origin().0, "event_type" => event_type)
            .increment(1);
    }
}

/// Exponential backoff from 100 ms, capped at [`MAX_BACKOFF`], with full jitter on the upper half.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let half = base / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
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
