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
use rdkafka::producer::{FutureProducer, Producer};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument as _;

use crate::dead_letter::{self, Failure};
use crate::decision::{self, Attempt, Gate, Route, Stage};
pub use crate::delivery::{Delivery, Envelope};
use crate::offset_gaps::GapTracker;
use crate::shutdown::{Shutdown, Trigger};
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
    /// How long a key may wait behind one head before the head is dead-lettered from its stored
    /// record and the key's parked messages are applied (see [`Worker::sweep_once`]).
    pub parked_key_timeout: Duration,
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
            // The broker answers a fetch as soon as records arrive, or when this wait ends with
            // none: it bounds how often an idle consumer asks, not how late a record comes.
            // (Kafka's default. The local Tansu broker does the same with the project's patch;
            // unpatched, it held every fetch for this whole wait.)
            ("fetch.wait.max.ms", "500"),
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
        let mut delivery = Delivery::from_message(&message);
        if stage == Stage::Main {
            let dropped = delivery.drop_retry_headers();
            if dropped > 0 {
                tracing::warn!(topic = %delivery.topic, partition = delivery.partition, offset = delivery.offset,
                    dropped, "a record on a subscribed topic carried retry-* headers; ignoring them (only retry copies have them)");
            }
        }
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
}

/// How long closing the consumers (their final offset commit and leaving the group) may take at
/// shutdown before the process goes on without it.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Commits each consumer's stored offsets and closes it (leaving its group), off the async
/// runtime and for at most [`CLOSE_WITHIN`]: during a broker outage both would wait for the
/// broker. Offsets not committed are read again after the restart, and the inbox skips them.
async fn close(consumers: Vec<Arc<GroupConsumer>>) {
    let closing = tokio::task::spawn_blocking(move || {
        for consumer in consumers {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "final offset commit");
            }
            drop(consumer);
        }
    });
    if tokio::time::timeout(CLOSE_WITHIN, closing).await.is_err() {
        tracing::warn!(within = ?CLOSE_WITHIN,
            "the Kafka consumers did not close in time (is the broker reachable?); stopping without their final offset commit");
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
    // Every field echoes the record: bounded, so a hostile key or header cannot bloat each log
    // line and span written while the record is handled.
    let short = |text: &str| schemas::limits::truncate_chars(text, 64);
    let original_topic = short(&delivery.origin().0);
    let key = short(&String::from_utf8_lossy(
        delivery.key.as_deref().unwrap_or_default(),
    ));
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
        messaging.message.id = %short(delivery.header("message-id").unwrap_or("")),
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
        let envelope = match Envelope::decode(delivery) {
            Ok(envelope) => envelope,
            Err(reason) => {
                tracing::warn!(topic = %delivery.topic, partition = delivery.partition, offset = delivery.offset,
                    %reason, "undecodable record; dead-lettering it");
                // In a retry topic it ends its key's chain only if it heads the key.
                let id = delivery
                    .header("message-id")
                    .and_then(|id| uuid::Uuid::parse_str(id).ok());
                let gate = match stage {
                    Stage::Retry => {
                        let head = self
                            .until_done_with(|| async {
                                let mut conn = self.pool.acquire().await?;
                                Ok(parking::head(&mut conn, &self.group, &key).await?)
                            })
                            .await?;
                        decision::gate(stage, head, id)
                    }
                    _ => Gate::Apply,
                };
                return self
                    .carry_out(
                        delivery,
                        "unknown",
                        &key,
                        stage,
                        gate,
                        Attempt::Undecodable,
                        reason,
                    )
                    .await;
            }
        };
        let event_type = envelope.event.event_type();
        if stage == Stage::Retry
            && let Some(due) = retry::not_before(delivery)
        {
            // Never longer than this retry topic's delay: a forged far-future time cannot hold
            // the retry consumer.
            let wait = (due - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(self.retry_delay_of(delivery));
            if self.shutdown.sleep(wait).await.is_err() {
                return Err(Interrupted);
            }
        }
        let started = Instant::now();
        let mut transient_attempt = 0;
        loop {
            let (gate, attempt, reason) = match self
                .apply_once(&envelope, delivery, &key, stage)
                .await
            {
                Ok((gate, attempt)) => (gate, attempt, String::new()),
                Err(HandlerError::Retryable(reason)) => (Gate::Apply, Attempt::NotYet, reason),
                Err(HandlerError::Permanent(reason)) => (Gate::Apply, Attempt::Permanent, reason),
                Err(HandlerError::Transient(e)) => {
                    transient_attempt += 1;
                    self.transient_pause(delivery, event_type, transient_attempt, &e)
                        .await?;
                    continue;
                }
            };
            match attempt {
                Attempt::Applied => {
                    self.count("consumer_messages_processed_total", delivery, event_type);
                    histogram!("consumer_handler_duration_seconds", "group" => self.group.clone(),
                        "topic" => envelope.topic.clone(), "event_type" => event_type)
                    .record(started.elapsed().as_secs_f64());
                    tracing::debug!(message_id = %envelope.message_id, event_type, %key, "applied");
                }
                Attempt::Duplicate => {
                    self.count("consumer_messages_duplicate_total", delivery, event_type);
                    tracing::info!(message_id = %envelope.message_id, event_type, "duplicate message skipped: already applied");
                }
                Attempt::Parked if gate == Gate::Stray => {
                    tracing::info!(message_id = %envelope.message_id, event_type, %key,
                        "a retry copy of a message still waiting behind its key's head; it will be applied from the parking table");
                }
                Attempt::Parked => {
                    self.count("consumer_messages_parked_total", delivery, event_type);
                    tracing::info!(message_id = %envelope.message_id, event_type, %key,
                        "key is waiting for a retry; message parked behind it");
                }
                Attempt::Withheld => {
                    tracing::warn!(message_id = %envelope.message_id, event_type, %key,
                        "a retry copy of a message that no longer heads its key, never applied: its chain ended through another copy; dead-lettering this one");
                }
                Attempt::Permanent => {
                    tracing::warn!(message_id = %envelope.message_id, event_type, %reason,
                        "message can never apply; dead-lettering it");
                }
                Attempt::NotYet | Attempt::Undecodable => {}
            }
            let reason = match (gate, attempt) {
                (Gate::ResumeRetry, _) => "resumed after a restart".to_owned(),
                (_, Attempt::Withheld) => {
                    "a retry copy whose chain already ended through another copy".to_owned()
                }
                _ => reason,
            };
            return self
                .carry_out(delivery, event_type, &key, stage, gate, attempt, reason)
                .await;
        }
    }

    /// One try at `envelope` in one transaction: what its key's parking says ([`decision::gate`])
    /// and what came of it. The key's parking row stays locked until the transaction ends, so the
    /// main consumer, the retry consumers and a drain never interleave on one key.
    async fn apply_once(
        &self,
        envelope: &Envelope,
        delivery: &Delivery,
        key: &str,
        stage: Stage,
    ) -> Result<(Gate, Attempt), HandlerError> {
        // Database errors outside the handler are never the message's fault: they are retried
        // in place (transient), so they cannot dead-letter a message or release its key.
        let infra = |e: sqlx::Error| HandlerError::Transient(e.into());
        let mut tx = self.pool.begin().await.map_err(infra)?;
        let head = parking::lock(&mut tx, &self.group, key)
            .await
            .map_err(infra)?;
        let gate = decision::gate(stage, head, Some(envelope.message_id));
        match gate {
            Gate::Park => {
                parking::park_message(&mut tx, &self.group, key, delivery)
                    .await
                    .map_err(infra)?;
                tx.commit().await.map_err(infra)?;
                return Ok((gate, Attempt::Parked));
            }
            Gate::ResumeRetry => {
                tx.rollback().await.map_err(infra)?;
                return Ok((gate, Attempt::NotYet));
            }
            Gate::Stray => {
                // Never apply a stray; only find out whether it was applied.
                let never_applied = inbox::claim(&mut tx, &self.group, envelope)
                    .await
                    .map_err(infra)?;
                // A copy of a message still waiting in the parking table (a drain sent it to a
                // retry topic and then failed to commit) will be applied from there.
                let still_parked = never_applied
                    && parking::is_parked(&mut tx, &self.group, key, envelope.message_id)
                        .await
                        .map_err(infra)?;
                tx.rollback().await.map_err(infra)?;
                let attempt = if still_parked {
                    Attempt::Parked
                } else if never_applied {
                    Attempt::Withheld
                } else {
                    Attempt::Duplicate
                };
                return Ok((gate, attempt));
            }
            Gate::Apply => {}
        }
        if !inbox::claim(&mut tx, &self.group, envelope)
            .await
            .map_err(infra)?
        {
            tx.rollback().await.map_err(infra)?;
            return Ok((gate, Attempt::Duplicate));
        }
        let after_commit = self.handler.handle(&mut tx, envelope).await?;
        tx.commit().await?;
        after_commit.run();
        Ok((gate, Attempt::Applied))
    }

    /// Does what [`decision::after`] says: nothing, a retry topic (parking the key when the
    /// message comes from a subscribed topic), or the DLQ; then, when the message headed its key
    /// and its chain ended, applies the key's parked messages and releases it.
    #[allow(clippy::too_many_arguments)]
    async fn carry_out(
        &self,
        delivery: &Delivery,
        event_type: &'static str,
        key: &str,
        stage: Stage,
        gate: Gate,
        attempt: Attempt,
        reason: String,
    ) -> Result<(), Interrupted> {
        let so_far = match stage {
            Stage::Retry => self.attempt_of(delivery),
            Stage::Main | Stage::Parked => 0,
        };
        let action = decision::after(stage, gate, attempt, so_far, self.retry_delays.len());
        match action.route {
            Route::Done => {}
            Route::Retry { attempt: next } => {
                let delay = self.retry_delays[next - 1];
                let message_id = delivery
                    .header("message-id")
                    .and_then(|id| uuid::Uuid::parse_str(id).ok());
                // A fresh "not yet" parks its key. A head read again from its topic
                // (ResumeRetry) already heads it: re-parking could put it back over a newer head
                // a concurrent drain just set. A head moving on to its next retry topic restarts
                // its --parked-key-timeout clock.
                if let Some(message_id) = message_id {
                    match (stage, gate) {
                        (Stage::Main, Gate::Apply) => {
                            self.until_done(|| async {
                                let mut conn = self.pool.acquire().await?;
                                parking::park_key(
                                    &mut conn,
                                    &self.group,
                                    key,
                                    message_id,
                                    &reason,
                                    delivery,
                                )
                                .await?;
                                Ok(())
                            })
                            .await?;
                        }
                        (Stage::Retry, _) => {
                            self.until_done(|| async {
                                let mut conn = self.pool.acquire().await?;
                                parking::touch_head(&mut conn, &self.group, key, message_id)
                                    .await?;
                                Ok(())
                            })
                            .await?;
                        }
                        _ => {}
                    }
                }
                self.until_done(|| async {
                    retry::send(&self.producer, &self.group, delivery, next, delay, &reason)
                        .await
                        .map_err(HandlerError::Transient)
                })
                .await?;
                counter!("consumer_messages_retried_total", "group" => self.group.clone(),
                    "topic" => self.topic_label(delivery), "event_type" => event_type, "attempt" => next.to_string())
                .increment(1);
                tracing::info!(message_id = ?message_id, event_type, %key, attempt = next, ?delay, %reason,
                    "not applicable yet; sent to a retry topic, its key waits");
            }
            Route::DeadLetter { class, attempts } => {
                if attempt == Attempt::NotYet {
                    tracing::warn!(event_type, %key, %reason, attempts,
                        "still not applicable after its last retry; dead-lettering it");
                }
                self.dead_letter(delivery, event_type, class.as_str(), reason, attempts)
                    .await?;
            }
        }
        if action.release_key {
            if attempt == Attempt::Applied {
                tracing::info!(event_type, %key, attempt = so_far, "retried message applied; releasing its key");
            }
            self.resolve(key).await?;
        }
        Ok(())
    }

    /// Applies the parked messages of `key`, oldest first, and releases the key.
    async fn resolve(&self, key: &str) -> Result<(), Interrupted> {
        let mut transient_attempt = 0;
        loop {
            let step = tokio::select! {
                step = self.drain_one(key) => step,
                _ = self.shutdown.wait() => return Err(Interrupted),
            };
            match step {
                Ok(Drain::Continue) => transient_attempt = 0,
                Ok(Drain::Released | Drain::Reparked) => return Ok(()),
                Err(_) if self.producer_failed() => return Err(Interrupted),
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

    /// Applies (or retries, or dead-letters) the oldest parked message of `key`, in one
    /// transaction with the removal of its parking row; releases the key when none is left.
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
        // The key's lock is held to the end; the attempt runs in a savepoint, so that a "not yet"
        // or a failure undoes its effects without letting another path in on this key.
        let (envelope, attempt, reason) = match Envelope::decode(&delivery) {
            Err(reason) => (None, Attempt::Undecodable, reason),
            Ok(envelope) => {
                let mut attempt_tx = sqlx::Connection::begin(&mut *tx).await?;
                if !inbox::claim(&mut attempt_tx, &self.group, &envelope).await? {
                    attempt_tx.rollback().await?;
                    (Some(envelope), Attempt::Duplicate, String::new())
                } else {
                    match self.handler.handle(&mut attempt_tx, &envelope).await {
                        Ok(after_commit) => {
                            attempt_tx.commit().await?;
                            parking::remove_message(&mut tx, id).await?;
                            tx.commit().await?;
                            after_commit.run();
                            let event_type = envelope.event.event_type();
                            self.count("consumer_messages_processed_total", &delivery, event_type);
                            tracing::info!(message_id = %envelope.message_id, event_type, %key, "parked message applied");
                            return Ok(Drain::Continue);
                        }
                        Err(HandlerError::Retryable(reason)) => {
                            attempt_tx.rollback().await?;
                            (Some(envelope), Attempt::NotYet, reason)
                        }
                        Err(HandlerError::Permanent(reason)) => {
                            attempt_tx.rollback().await?;
                            (Some(envelope), Attempt::Permanent, reason)
                        }
                        Err(e @ HandlerError::Transient(_)) => return Err(e),
                    }
                }
            }
        };
        let event_type = envelope
            .as_ref()
            .map_or("unknown", |e| e.event.event_type());
        let action = decision::after(
            Stage::Parked,
            Gate::Apply,
            attempt,
            0,
            self.retry_delays.len(),
        );
        match action.route {
            Route::Done => {
                parking::remove_message(&mut tx, id).await?;
                tx.commit().await?;
                self.count("consumer_messages_duplicate_total", &delivery, event_type);
                Ok(Drain::Continue)
            }
            Route::Retry { attempt: next } => {
                // It becomes the key's head: re-park and send in the same transaction as its
                // removal from the parking table, the key's lock held throughout.
                let message_id = envelope.as_ref().map(|e| e.message_id).unwrap_or_default();
                parking::park_key(&mut tx, &self.group, key, message_id, &reason, &delivery)
                    .await?;
                parking::remove_message(&mut tx, id).await?;
                let delay = self.retry_delays[next - 1];
                retry::send(&self.producer, &self.group, &delivery, next, delay, &reason)
                    .await
                    .map_err(HandlerError::Transient)?;
                tx.commit().await?;
                tracing::info!(%message_id, event_type, %key, %reason,
                    "parked message not applicable yet; it now heads the key in the retry chain");
                Ok(Drain::Reparked)
            }
            Route::DeadLetter { class, attempts } => {
                self.dead_letter_now(&delivery, event_type, class.as_str(), reason, attempts)
                    .await?;
                parking::remove_message(&mut tx, id).await?;
                tx.commit().await?;
                Ok(Drain::Continue)
            }
        }
    }

    /// At start and then every `timeout / 10` (1 s to 1 min): measures the parked keys and gives up on heads that
    /// have headed their key for longer than `timeout` (see [`Worker::sweep_once`]).
    async fn sweep(self: Arc<Self>, timeout: Duration) {
        let every = (timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            if let Err(e) = self.sweep_once(timeout).await {
                tracing::warn!(group = %self.group, error = %format!("{e:#}"),
                    "could not check the parked keys; trying again later");
            }
            if self.shutdown.sleep(every).await.is_err() {
                return;
            }
        }
    }

    /// A head whose retry copy never came back (its retry topic is no longer read after
    /// `--retry-delays` was shortened, or the copy expired with the topic's retention) would hold
    /// its key, and every later event of that order, forever. After `timeout` the head is
    /// dead-lettered from its stored record (class `retryable`, so `saga dlq redrive` can bring
    /// it back) and the key's parked messages are applied. A copy that arrives after all is a
    /// stray ([`decision::Gate::Stray`]): never applied out of order.
    async fn sweep_once(&self, timeout: Duration) -> Result<(), HandlerError> {
        let mut conn = self.pool.acquire().await?;
        let (parked, oldest) = parking::stats(&mut conn, &self.group).await?;
        metrics::gauge!("consumer_parked_keys", "group" => self.group.clone()).set(parked as f64);
        metrics::gauge!("consumer_parked_key_oldest_age_seconds", "group" => self.group.clone())
            .set(oldest);
        let secs = timeout.as_secs_f64();
        let keys = parking::expired(&mut conn, &self.group, secs, 100).await?;
        drop(conn);
        for key in keys {
            let mut tx = self.pool.begin().await?;
            let Some((head, record)) =
                parking::lock_expired(&mut tx, &self.group, &key, secs).await?
            else {
                continue;
            };
            // A head applied just now, whose drain has not run yet, is not given up on: its key
            // is only drained.
            let applied =
                head != parking::NO_HEAD && inbox::applied(&mut tx, &self.group, head).await?;
            if head != parking::NO_HEAD && !applied {
                let reason = format!(
                    "its retry copy did not come back within {timeout:?} (--parked-key-timeout): \
                     its retry topic is no longer read, or the copy expired"
                );
                match &record {
                    Some(delivery) => {
                        let event_type = delivery
                            .header("event-type")
                            .unwrap_or("unknown")
                            .to_owned();
                        self.dead_letter_now(delivery, &event_type, "retryable", reason, 1)
                            .await?;
                    }
                    None => tracing::error!(group = %self.group, %key, message_id = %head,
                        "a parked key's head was given up on, but its record was not stored (parked by an older version): it is not dead-lettered; find it in the retry topics"),
                }
                parking::drop_head(&mut tx, &self.group, &key).await?;
                counter!("consumer_parked_heads_expired_total", "group" => self.group.clone())
                    .increment(1);
                tracing::error!(group = %self.group, %key, message_id = %head, ?timeout,
                    "a parked key's head never came back from its retry topic; dead-lettered it, applying the key's parked messages");
            }
            tx.commit().await?;
            if self.resolve(&key).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Runs `step` until it succeeds, pausing with backoff on transient failures.
    async fn until_done<F, Fut>(&self, step: F) -> Result<(), Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        self.until_done_with(step).await
    }

    /// [`Self::until_done`] for a step that returns a value. A step still running when shutdown
    /// comes is abandoned (a send waiting for a broker that is down would otherwise hold up the
    /// shutdown for as long as the outage lasts); the record's offset is then not stored, so it
    /// is read again after the restart. A Kafka producer that failed fatally ends the consumer
    /// (see [`Worker::fatal`]) instead of being retried forever.
    async fn until_done_with<T, F, Fut>(&self, mut step: F) -> Result<T, Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
    {
        let mut attempt = 0;
        loop {
            let result = tokio::select! {
                result = step() => result,
                _ = self.shutdown.wait() => return Err(Interrupted),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(_) if self.producer_failed() => return Err(Interrupted),
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
        let message_id =
            schemas::limits::truncate_chars(delivery.header("message-id").unwrap_or(""), 64);
        tracing::warn!(%message_id, event_type, attempt, ?delay,
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
            "topic" => self.topic_label(delivery), "event_type" => event_type.to_owned(), "error_class" => class)
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
        counter!(name, "group" => self.group.clone(), "topic" => self.topic_label(delivery), "event_type" => event_type)
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

    struct NoHandler;

    impl Handler for NoHandler {
        async fn handle(
            &self,
            _: &mut PgConnection,
            _: &Envelope,
        ) -> Result<AfterCommit, HandlerError> {
            Ok(AfterCommit::none())
        }
    }

    /// A retry copy the broker refuses for good (here: not authorized for the topic) makes the
    /// gapless idempotent producer fatal. Before the fix the worker retried the send forever
    /// with `/readyz` green; now it stops and fires the consumers' fatal trigger, so the process
    /// exits to be restarted. librdkafka's mock cluster stands in for the broker (a real broker
    /// cannot be made to refuse on cue).
    #[tokio::test]
    async fn a_fatally_failed_producer_stops_the_consumers_instead_of_retrying_forever() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic("g.retry.1", 1, 1)
            .expect("retry topic");
        let kafka = kafka::KafkaSettings::new(&cluster.bootstrap_servers());
        let producer: FutureProducer = kafka.producer().create().expect("producer");
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
        );
        let (fatal, fatal_fired) = Shutdown::new();
        let (_keep, shutdown) = Shutdown::new();
        let worker = Worker {
            group: "g".into(),
            pool: sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://nobody@127.0.0.1:1/none")
                .expect("lazy pool"),
            handler: NoHandler,
            producer,
            retry_delays: vec![Duration::from_secs(1)],
            topics: vec!["orders.v1".into()],
            shutdown,
            fatal,
        };
        let delivery = Delivery {
            topic: "orders.v1".into(),
            partition: 0,
            offset: 7,
            key: Some(b"order-1".to_vec()),
            payload: Some(b"payload".to_vec()),
            headers: vec![(
                "message-id".into(),
                Some(uuid::Uuid::new_v4().to_string().into_bytes()),
            )],
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(60),
            worker.until_done(|| async {
                retry::send(
                    &worker.producer,
                    "g",
                    &delivery,
                    1,
                    Duration::from_secs(1),
                    "not yet",
                )
                .await
                .map_err(HandlerError::Transient)
            }),
        )
        .await
        .expect("the worker gave up on the fatally failed producer within 60 s");
        assert!(sent.is_err(), "the send cannot have succeeded");
        assert!(
            worker.producer.client().fatal_error().is_some(),
            "the producer is fatal"
        );
        assert!(fatal_fired.is_fired(), "the consumers were told to stop");
    }
}
