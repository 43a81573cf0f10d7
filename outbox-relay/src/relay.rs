//! The tailing loop of one source: read the outbox in id order, produce the rows, delete what the
//! broker acknowledged, and read on meanwhile (see [`crate::pipeline`]). See the crate docs for
//! why.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::outbox::OutboxRow;
use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use metrics::{Counter, Histogram, counter, gauge, histogram};
use opentelemetry::KeyValue;
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use service_kit::shutdown::Shutdown;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::Source;
use crate::pipeline::Pipeline;

/// The advisory lock key that makes one relay the publisher of a source (ASCII "outbox").
const LEADER_LOCK: i64 = 0x6f7574626f78;

#[derive(Debug, Clone)]
pub struct Options {
    /// Most rows per read; a read grows to this while there is a backlog and shrinks when there
    /// is none.
    pub max_batch: i64,
    /// Most rows handed to the producer and not yet acknowledged, per source.
    pub max_in_flight: usize,
    /// How often a source is read while rows are flowing.
    pub active_poll: Duration,
    /// How often a source is read after a few seconds without rows anywhere.
    pub idle_poll: Duration,
}

/// When the relay last published a row from any source. Sources are read often while rows
/// flow (a saga bounces between the two outboxes) and rarely when the system is idle: the
/// interval is a twentieth of the time since the last row, between `active_poll` and
/// `idle_poll`. An idle relay so costs almost nothing, and the first row after a pause waits at
/// most `idle_poll` (then the other source is already read every `active_poll`).
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    last_row_ms: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            started: Instant::now(),
            last_row_ms: Default::default(),
        }
    }
}

impl Activity {
    fn mark(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_row_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn poll_interval(&self, options: &Options) -> Duration {
        let last =
            Duration::from_millis(self.last_row_ms.load(std::sync::atomic::Ordering::Relaxed));
        let idle_for = self.started.elapsed().saturating_sub(last);
        (idle_for / 20).clamp(
            options.active_poll,
            options.idle_poll.max(options.active_poll),
        )
    }
}

pub fn producer(kafka: &messaging::kafka::KafkaSettings) -> anyhow::Result<FutureProducer> {
    kafka.producer().create().context("creating Kafka producer")
}

/// Waits until the producer knows the event topics' leaders, so the first rows after start are
/// not held back by connection and metadata set-up (about a second on the local broker).
pub async fn warm_up(producer: &FutureProducer, shutdown: &Shutdown) {
    for topic in schemas::EVENT_TOPICS {
        loop {
            let client = producer.clone();
            let found = tokio::task::spawn_blocking(move || {
                client
                    .client()
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .map(|m| m.topics().iter().any(|t| !t.partitions().is_empty()))
            })
            .await;
            match found {
                Ok(Ok(true)) => break,
                other => {
                    tracing::info!(topic, result = ?other.map(|r| r.map_err(|e| e.to_string())),
                    "waiting for the broker to know the topic")
                }
            }
            if shutdown.sleep(Duration::from_millis(200)).await.is_err() {
                return;
            }
        }
    }
}

/// Tails `source` until shutdown, reconnecting with backoff whenever the database fails. Returns an
/// error only when the Kafka producer failed fatally.
pub async fn tail(
    source: Source,
    producer: FutureProducer,
    options: Options,
    activity: Arc<Activity>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut failures: u32 = 0;
    let meters = Meters::new(&source.name);
    // Send spans only when they are exported: otherwise the record's traceparent is still a
    // child of the row's (a new span id in the same trace), made without a span.
    let tracer =
        service_kit::telemetry::exporting().then(|| opentelemetry::global::tracer("outbox-relay"));
    while !shutdown.is_fired() {
        let publisher = Publisher {
            source: &source,
            producer: &producer,
            options: &options,
            activity: &activity,
            shutdown: &shutdown,
            meters: &meters,
            tracer: tracer.as_ref(),
        };
        match publisher.tail_connected(&mut failures).await {
            Ok(()) => return Ok(()),
            Err(e) if producer.client().fatal_error().is_some() => return Err(e),
            Err(e) => {
                failures += 1;
                let delay = service_kit::backoff::transient(failures);
                tracing::warn!(source = %source.name, error = %format!("{e:#}"), ?delay,
                    "outbox source unavailable; retrying");
                if shutdown.sleep(delay).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// One source's publishing, on one connection.
struct Publisher<'a> {
    source: &'a Source,
    producer: &'a FutureProducer,
    options: &'a Options,
    activity: &'a Activity,
    shutdown: &'a Shutdown,
    meters: &'a Meters,
    /// `None` when spans are not exported.
    tracer: Option<&'a BoxedTracer>,
}

/// The per-row metrics of one source, registered once rather than looked up by name and labels
/// (a string copied and hashed) for every row.
struct Meters {
    batch_size: Histogram,
    send_to_ack: Histogram,
    commit_to_ack: Histogram,
    delivery_errors: Counter,
    /// `relay_rows_published_total` of each event topic.
    published: Vec<(&'static str, Counter)>,
}

impl Meters {
    fn new(source: &str) -> Meters {
        let source = source.to_owned();
        Meters {
            batch_size: histogram!("relay_batch_size", "source" => source.clone()),
            send_to_ack: histogram!("relay_send_to_ack_seconds", "source" => source.clone()),
            commit_to_ack: histogram!("relay_commit_to_ack_seconds", "source" => source.clone()),
            delivery_errors: counter!("relay_publish_errors_total", "source" => source.clone(), "reason" => "delivery"),
            published: schemas::EVENT_TOPICS
                .iter()
                .map(|&topic| {
                    let counter = counter!("relay_rows_published_total", "source" => source.clone(), "topic" => topic);
                    (topic, counter)
                })
                .collect(),
        }
    }

    fn published(&self, topic: &str) -> Option<&Counter> {
        self.published
            .iter()
            .find_map(|(t, counter)| (*t == topic).then_some(counter))
    }
}

/// A row handed to the producer: what is left to do when its delivery report comes.
type Delivery<'a> = futures::future::BoxFuture<'a, Settled>;

/// A row's delivery report, with what the relay needs to finish the row.
struct Settled {
    id: i64,
    message_id: Uuid,
    topic: &'static str,
    created_at: DateTime<Utc>,
    sent_at: Instant,
    span: Option<BoxedSpan>,
    report: DeliveryReport,
}

type DeliveryReport = Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

impl Publisher<'_> {
    /// Connects, becomes the source's leader and publishes until shutdown or an error.
    ///
    /// **Every read and delete runs on the one session that holds the leader lock.** If that
    /// session dies (Postgres restarted, the connection cut, the backend terminated), the lock
    /// is released and a standby may take it; this relay's next query then fails on the same
    /// dead session, so it stops publishing instead of carrying on beside the new leader on
    /// another connection. Rows already being produced at that moment may reach the broker
    /// twice (once from each relay): duplicates, which the consumers' inboxes skip, never a
    /// reordering of an order's first copies.
    ///
    /// **Pipelined.** Reads go on while earlier rows are being acknowledged (up to
    /// `max_in_flight` rows with the producer; see [`crate::pipeline`] for why no row is skipped
    /// or overtaken by a later row of its order), and whatever has been acknowledged is deleted
    /// in one statement before the next read.
    async fn tail_connected(&self, failures: &mut u32) -> anyhow::Result<()> {
        let source = self.source;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            PgConnection::connect(&source.database_url),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out after 5 s"))
        .and_then(|connected| Ok(connected?))
        .with_context(|| format!("connecting to source {}", source.name))?;
        // The backlog count is the relay's one scan of the table: one backend, not a parallel
        // plan's workers started for it every time.
        sqlx::query("SET max_parallel_workers_per_gather = 0")
            .execute(&mut conn)
            .await
            .with_context(|| format!("setting up the session of source {}", source.name))?;
        if !become_leader(&mut conn, source, self.shutdown).await? {
            return Ok(());
        }
        tracing::info!(source = %source.name, "publishing outbox rows");
        let conn = &mut conn;
        let mut pipeline = Pipeline::new(self.options.max_batch, self.options.max_in_flight);
        let mut deliveries: FuturesUnordered<Delivery<'_>> = FuturesUnordered::new();
        let mut backlog = Backlog::default();
        let mut next_read = Instant::now();
        let (mut acked, mut failed) = (Vec::new(), 0usize);
        loop {
            if self.shutdown.is_fired() {
                return Ok(());
            }
            backlog.report(&mut *conn, source).await?;
            if let Some(limit) = pipeline.next_limit()
                && Instant::now() >= next_read
            {
                let rows = crate::outbox::read(
                    &mut *conn,
                    pipeline.cursor(),
                    // Rows of an aggregate type this relay has no topic for (written by a newer
                    // service, say) are left in place and counted, not read: read, they would
                    // fill every batch and stall the source.
                    &schemas::events::AGGREGATES,
                    limit,
                )
                .await
                .with_context(|| format!("reading the outbox of source {}", source.name))?;
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                pipeline.read(&ids, limit);
                next_read = if rows.is_empty() {
                    // Working again: the next failure starts the backoff from the beginning.
                    // (Only now: an error that recurs right after taking the lock must not
                    // reconnect and republish the same rows every 100 ms.)
                    *failures = 0;
                    Instant::now() + self.activity.poll_interval(self.options)
                } else {
                    self.activity.mark();
                    self.meters.batch_size.record(rows.len() as f64);
                    tracing::debug!(source = %source.name, rows = rows.len(), in_flight = pipeline.in_flight(),
                        oldest_waited_ms = (Utc::now() - rows[0].created_at).num_milliseconds(), "rows found");
                    let full = rows.len() as i64 >= limit;
                    let unsent = self.send(rows, &mut deliveries);
                    if unsent > 0 {
                        pipeline.unsent(unsent);
                    }
                    // A backlog is read on at once; otherwise rows are flowing: poll briskly.
                    Instant::now()
                        + if full {
                            Duration::ZERO
                        } else {
                            self.options.active_poll
                        }
                };
            }
            // Wait for a delivery report, the next read, or shutdown; then settle every report
            // that has come.
            let read_at = pipeline
                .next_limit()
                .map(|_| next_read)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                Some(settled) = deliveries.next(), if !deliveries.is_empty() => {
                    self.settle(settled, &mut acked, &mut failed);
                    while let Some(Some(settled)) = deliveries.next().now_or_never() {
                        self.settle(settled, &mut acked, &mut failed);
                    }
                }
                _ = tokio::time::sleep_until(read_at.into()) => {}
                // During a broker outage deliveries wait indefinitely; on shutdown leave the rows
                // in the outbox for the next run (they may then be published twice, never lost).
                _ = self.shutdown.wait() => return Ok(()),
            }
            if !acked.is_empty() {
                crate::outbox::delete(&mut *conn, &acked)
                    .await
                    .with_context(|| {
                        format!("deleting published rows of source {}", source.name)
                    })?;
                tracing::debug!(source = %source.name, rows = acked.len(), "published");
                pipeline.done(acked.len());
                acked.clear();
                *failures = 0;
            }
            if failed > 0 {
                pipeline.done(failed);
                pipeline.stall();
                failed = 0;
                if let Some((code, reason)) = self.producer.client().fatal_error() {
                    // An idempotent producer that hit a fatal error cannot send again; exit so
                    // the supervisor restarts the relay with a fresh producer. The rows are
                    // still there.
                    anyhow::bail!("Kafka producer failed fatally ({code:?}): {reason}");
                }
                next_read = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    /// Hands `rows` to the producer in order, adding each one's delivery to `deliveries`.
    /// Returns how many were not sent: after a row the producer refuses, none of the later rows
    /// is sent (they could overtake it).
    fn send<'b>(
        &self,
        rows: Vec<OutboxRow>,
        deliveries: &mut FuturesUnordered<Delivery<'b>>,
    ) -> usize {
        let source = self.source;
        let total = rows.len();
        for (sent, row) in rows.into_iter().enumerate() {
            let Some(topic) = schemas::topic_for_aggregate(&row.aggregate_type) else {
                tracing::error!(source = %source.name, id = row.id, aggregate_type = %row.aggregate_type,
                    "outbox row has an unknown aggregate type; left in place");
                counter!("relay_publish_errors_total", "source" => source.name.clone(), "reason" => "unknown_aggregate").increment(1);
                return total - sent;
            };
            let parent = row
                .traceparent
                .as_deref()
                .and_then(service_kit::trace_context::parse);
            let span = self
                .tracer
                .map(|tracer| send_span(tracer, source, &row, topic, parent.clone()));
            let traceparent = match &span {
                Some(span) => service_kit::trace_context::format(span.span_context()),
                None => service_kit::trace_context::child_of(parent.as_ref()),
            };
            let record = FutureRecord::to(topic)
                .key(row.aggregate_id.as_str())
                .payload(row.payload.as_slice())
                .headers(row.kafka_headers(&traceparent));
            // Any refusal, a full client queue included (the rows in flight are capped far
            // below the queue's size), stalls the pipeline: the rows are read again once what
            // was sent has been acknowledged.
            let delivery = match self.producer.send_result(record) {
                Ok(delivery) => delivery,
                Err((e, _)) => {
                    tracing::warn!(source = %source.name, id = row.id, error = %e, "could not enqueue; will retry");
                    counter!("relay_publish_errors_total", "source" => source.name.clone(), "reason" => "enqueue").increment(1);
                    return total - sent;
                }
            };
            let sent_at = Instant::now();
            let (id, message_id, created_at) = (row.id, row.message_id, row.created_at);
            deliveries.push(Box::pin(async move {
                Settled {
                    id,
                    message_id,
                    topic,
                    created_at,
                    sent_at,
                    span,
                    report: delivery.await,
                }
            }));
        }
        0
    }

    /// Records a row's delivery report: acknowledged rows go to `acked` (to be deleted), failed
    /// ones are counted in `failed` (they stay in the outbox and are sent again).
    fn settle(&self, settled: Settled, acked: &mut Vec<i64>, failed: &mut usize) {
        let source = &self.source.name;
        let Settled {
            id,
            message_id,
            topic,
            created_at,
            sent_at,
            span,
            report,
        } = settled;
        if let Some(mut span) = span {
            end_send_span(&mut span, &report);
        }
        match report {
            Ok(Ok(_)) => {
                acked.push(id);
                if let Some(published) = self.meters.published(topic) {
                    published.increment(1);
                }
                self.meters
                    .send_to_ack
                    .record(sent_at.elapsed().as_secs_f64());
                let waited = (Utc::now() - created_at).to_std().unwrap_or_default();
                self.meters.commit_to_ack.record(waited.as_secs_f64());
            }
            Ok(Err((e, _))) => {
                tracing::warn!(source = %source, id, %message_id, error = %e,
                    "delivery failed; the row stays in the outbox and will be sent again");
                self.meters.delivery_errors.increment(1);
                *failed += 1;
            }
            Err(_) => {
                *failed += 1;
            }
        }
    }
}

/// Takes the source's leader lock on `conn`'s session, waiting as a standby while another relay
/// holds it; `false` when shutdown came first.
async fn become_leader(
    conn: &mut PgConnection,
    source: &Source,
    shutdown: &Shutdown,
) -> anyhow::Result<bool> {
    let mut announced = false;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut *conn)
            .await
            .with_context(|| format!("taking the leader lock of source {}", source.name))?;
        if got {
            return Ok(true);
        }
        if !announced {
            tracing::info!(source = %source.name, "another relay publishes this source; standing by");
            announced = true;
        }
        if shutdown.sleep(Duration::from_secs(1)).await.is_err() {
            return Ok(false);
        }
    }
}

/// The source's backlog gauges. The age of the oldest row is an index probe, every second; when
/// it finds the table empty, the counts are 0 without more. The counts (pending rows,
/// unpublishable rows) need a scan of the table, so they are taken less often the more rows
/// there are: every second up to 20,000 rows, then every
/// `rows / 20,000` seconds up to 30 s. So a backlog of a million rows costs one scan every 30 s
/// rather than two full scans a second (each, with parallel workers, started two more processes).
#[derive(Debug, Default)]
struct Backlog {
    aged_at: Option<Instant>,
    counted_at: Option<Instant>,
    count_every: Duration,
}

impl Backlog {
    const ROWS_PER_SECOND_OF_INTERVAL: i64 = 20_000;
    const LONGEST_COUNT_INTERVAL: Duration = Duration::from_secs(30);

    async fn report(&mut self, conn: &mut PgConnection, source: &Source) -> anyhow::Result<()> {
        let due = |at: Option<Instant>, every: Duration| at.is_none_or(|at| at.elapsed() >= every);
        if due(self.aged_at, Duration::from_secs(1)) {
            // The lowest id is the oldest row but for a transaction that began before another
            // and inserted after it: close enough for an age measured in seconds.
            let oldest: Option<f64> = sqlx::query_scalar(
                "SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 \
                 FROM outbox ORDER BY id LIMIT 1",
            )
            .fetch_optional(&mut *conn)
            .await
            .with_context(|| format!("measuring the backlog of source {}", source.name))?;
            gauge!("relay_outbox_oldest_pending_age_seconds", "source" => source.name.clone())
                .set(oldest.unwrap_or(0.0));
            self.aged_at = Some(Instant::now());
            if oldest.is_none() {
                // An empty table (an idle relay's usual state): nothing to count.
                gauge!("relay_outbox_pending_rows", "source" => source.name.clone()).set(0.0);
                gauge!("relay_outbox_unpublishable_rows", "source" => source.name.clone()).set(0.0);
                self.counted_at = Some(Instant::now());
                self.count_every = Duration::from_secs(1);
                return Ok(());
            }
        }
        if due(self.counted_at, self.count_every) {
            let (pending, unpublishable): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE aggregate_type <> ALL($1)) FROM outbox",
            )
            .bind(&schemas::events::AGGREGATES[..])
            .fetch_one(&mut *conn)
            .await
            .with_context(|| format!("counting the backlog of source {}", source.name))?;
            gauge!("relay_outbox_pending_rows", "source" => source.name.clone())
                .set(pending as f64);
            if unpublishable > 0 {
                tracing::error!(source = %source.name, rows = unpublishable,
                    "outbox rows of an aggregate type without a topic are left in place (is this relay older than the service that wrote them?)");
            }
            gauge!("relay_outbox_unpublishable_rows", "source" => source.name.clone())
                .set(unpublishable as f64);
            self.counted_at = Some(Instant::now());
            self.count_every =
                Duration::from_secs((pending / Self::ROWS_PER_SECOND_OF_INTERVAL).max(1) as u64)
                    .min(Self::LONGEST_COUNT_INTERVAL);
        }
        Ok(())
    }
}

/// The OpenTelemetry producer span of one row (`send orders.v1`), a child of the span that wrote
/// the row (its stored `traceparent`), from the send to the broker's acknowledgement. It records
/// how long the row waited in the outbox (`messaging.outbox.wait_ms`, commit to send); the record
/// carries this span as its `traceparent`, so the consumer's span is its child.
///
/// Made with OpenTelemetry directly, not as a `tracing` span: the relay never logs inside it, and
/// a `tracing` span per row (its fields formatted for the log layer, then copied into the
/// OpenTelemetry one) was the largest single cost of a relay at full speed. Made only when spans
/// are exported: unexported, a span per row in flight was a tenth of the relay's CPU and most of
/// its memory during a backlog.
fn send_span(
    tracer: &BoxedTracer,
    source: &Source,
    row: &OutboxRow,
    topic: &'static str,
    parent: Option<opentelemetry::trace::SpanContext>,
) -> BoxedSpan {
    let waited = (Utc::now() - row.created_at).num_milliseconds().max(0);
    let parent = match parent {
        Some(parent) => opentelemetry::Context::new().with_remote_span_context(parent),
        None => opentelemetry::Context::new(),
    };
    tracer
        .span_builder(format!("send {topic}"))
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", topic),
            KeyValue::new("messaging.kafka.message.key", row.aggregate_id.clone()),
            KeyValue::new("messaging.message.id", row.message_id.to_string()),
            KeyValue::new("messaging.outbox.wait_ms", waited),
            KeyValue::new("outbox.source", source.name.clone()),
            KeyValue::new("order_id", row.aggregate_id.clone()),
        ])
        .start_with_context(tracer, &parent)
}

/// Ends a send span at the row's delivery report: where the record went, or why it did not.
fn end_send_span(span: &mut BoxedSpan, report: &DeliveryReport) {
    match report {
        Ok(Ok(delivery)) => {
            span.set_attributes([
                KeyValue::new(
                    "messaging.destination.partition.id",
                    i64::from(delivery.partition),
                ),
                KeyValue::new("messaging.kafka.offset", delivery.offset),
            ]);
        }
        Ok(Err((e, _))) => {
            span.set_attribute(KeyValue::new("error.type", e.to_string()));
            span.set_status(Status::error(e.to_string()));
        }
        Err(_) => {
            span.set_attribute(KeyValue::new("error.type", "canceled"));
            span.set_status(Status::error("canceled"));
        }
    }
    span.end();
}

/// The relay's commit→acknowledged delay, finer than the default latency buckets below 1 s: it
/// is the number the benchmark reports as p50/p99 (interpolated within a bucket), and a few
/// milliseconds matter there.
pub const COMMIT_TO_ACK_BUCKETS: [f64; 23] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// Rows per relay batch.
pub const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// Describes the relay's metrics.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "relay_rows_published_total",
        "Outbox rows acknowledged by the broker and deleted, by source and topic"
    );
    describe_counter!(
        "relay_publish_errors_total",
        "Outbox rows the broker did not acknowledge (left in the outbox, retried), by source"
    );
    describe_gauge!(
        "relay_outbox_pending_rows",
        "Rows waiting in the source's outbox table (counted every second, less often above 20,000 rows: up to every 30 s)"
    );
    describe_gauge!(
        "relay_outbox_unpublishable_rows",
        "Outbox rows of an aggregate type the relay has no topic for, left in place and not read (counted with the pending rows)"
    );
    describe_gauge!(
        "relay_outbox_oldest_pending_age_seconds",
        "Age of the oldest row waiting in the source's outbox table (0 when empty)"
    );
    describe_histogram!(
        "relay_commit_to_ack_seconds",
        Unit::Seconds,
        "Time from an outbox row's commit to the broker's acknowledgement, by source"
    );
    describe_histogram!(
        "relay_send_to_ack_seconds",
        Unit::Seconds,
        "Time from sending a batch to the broker's acknowledgement of all of it, by source"
    );
    describe_histogram!("relay_batch_size", "Rows per relay batch, by source");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// Sends `rows` as the relay does and waits for every report: (acknowledged ids, failed).
    async fn publish(
        source: &Source,
        producer: &FutureProducer,
        rows: Vec<OutboxRow>,
    ) -> (Vec<i64>, usize) {
        let options = Options {
            max_batch: 500,
            max_in_flight: 2000,
            active_poll: Duration::from_millis(2),
            idle_poll: Duration::from_millis(100),
        };
        let activity = Activity::default();
        let (_trigger, shutdown) = Shutdown::new();
        let meters = Meters::new(&source.name);
        let tracer = opentelemetry::global::tracer("outbox-relay");
        let publisher = Publisher {
            source,
            producer,
            options: &options,
            activity: &activity,
            shutdown: &shutdown,
            meters: &meters,
            tracer: Some(&tracer),
        };
        let mut deliveries = FuturesUnordered::new();
        let mut failed = publisher.send(rows, &mut deliveries);
        let mut acked = Vec::new();
        while let Some(settled) = deliveries.next().await {
            publisher.settle(settled, &mut acked, &mut failed);
        }
        (acked, failed)
    }

    fn row(id: i64, order: &str, event_type: &str) -> OutboxRow {
        OutboxRow {
            id,
            message_id: Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: order.into(),
            event_type: event_type.into(),
            content_type: "avro/binary".into(),
            payload: vec![1, 2, 3],
            causation_id: None,
            traceparent: None,
            tracestate: None,
            created_at: Utc::now(),
        }
    }

    /// Two rows of one order, each in its own produce request; the broker refuses the first one
    /// for good. With librdkafka's default (`enable.gapless.guarantee=false`) the producer fails
    /// that row, bumps its epoch and goes on with the next ones, so a later row of the order could
    /// be published, deleted and applied before it. The relay's producer sets the guarantee: the
    /// failure is fatal, the relay leaves the failed row in the outbox and exits to be restarted.
    /// (Kafka itself then refuses the second request with OUT_OF_ORDER_SEQUENCE_NUMBER, the
    /// check that keeps it off the log; librdkafka's mock cluster does not make that check, so
    /// here the second row may still be acknowledged, and the test does not look at it.)
    #[tokio::test]
    async fn a_row_refused_for_good_is_fatal_instead_of_skipped_for_the_next_rows() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let topic = schemas::topic_for_aggregate("order").expect("order topic");
        cluster.create_topic(topic, 1, 1).expect("topic");
        let settings = messaging::kafka::KafkaSettings::new(&cluster.bootstrap_servers());
        let mut config = settings.producer();
        config.set("batch.num.messages", "1");
        let producer: FutureProducer = config.create().expect("producer");
        // Connected and idempotent (producer id assigned) before the broker starts refusing.
        let warm = row(0, "warm-up", "OrderPlaced");
        let source = Source {
            name: "orders".into(),
            database_url: String::new(),
        };
        assert_eq!(publish(&source, &producer, vec![warm]).await.0, [0]);

        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let rows = vec![
            row(1, "order-1", "OrderPlaced"),
            row(2, "order-1", "OrderCancelled"),
        ];
        let (acked, failed) =
            tokio::time::timeout(Duration::from_secs(60), publish(&source, &producer, rows))
                .await
                .expect("both delivery reports within 60 s");
        assert!(
            !acked.contains(&1),
            "the refused row is acknowledged: {acked:?}"
        );
        assert!(failed > 0, "the refused row is reported as failed");
        assert!(
            matches!(
                producer.client().fatal_error(),
                Some((rdkafka::types::RDKafkaErrorCode::GaplessGuarantee, _))
            ),
            "the failure is fatal (gap-less guarantee), so the relay exits and leaves the row for the next run: {:?}",
            producer.client().fatal_error()
        );
    }
}
