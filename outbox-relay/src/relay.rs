//! The tailing loop of one source: read the outbox in id order, produce the rows, delete what the
//! broker acknowledged, and read on meanwhile (see [`crate::pipeline`]). See the crate docs for
//! why.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use messaging::outbox::OutboxRow;
use messaging::shutdown::Shutdown;
use metrics::{counter, gauge, histogram};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
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
    for topic in messaging::kafka::EVENT_TOPICS {
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
    while !shutdown.is_fired() {
        let publisher = Publisher {
            source: &source,
            producer: &producer,
            options: &options,
            activity: &activity,
            shutdown: &shutdown,
        };
        match publisher.tail_connected(&mut failures).await {
            Ok(()) => return Ok(()),
            Err(e) if producer.client().fatal_error().is_some() => return Err(e),
            Err(e) => {
                failures += 1;
                let delay = messaging::consumer::backoff(failures);
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
    span: tracing::Span,
    report: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
}

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
        if !become_leader(&mut conn, source, self.shutdown).await? {
            return Ok(());
        }
        tracing::info!(source = %source.name, "publishing outbox rows");
        let conn = &mut conn;
        let mut pipeline = Pipeline::new(self.options.max_batch, self.options.max_in_flight);
        let mut deliveries: FuturesUnordered<Delivery<'_>> = FuturesUnordered::new();
        let mut last_backlog_report = Instant::now() - Duration::from_secs(10);
        let mut next_read = Instant::now();
        let (mut acked, mut failed) = (Vec::new(), 0usize);
        loop {
            if self.shutdown.is_fired() {
                return Ok(());
            }
            if last_backlog_report.elapsed() >= Duration::from_secs(1) {
                report_backlog(&mut *conn, source).await?;
                last_backlog_report = Instant::now();
            }
            if let Some(limit) = pipeline.next_limit()
                && Instant::now() >= next_read
            {
                let rows = messaging::outbox::read(
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
                    histogram!("relay_batch_size", "source" => source.name.clone())
                        .record(rows.len() as f64);
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
                messaging::outbox::delete(&mut *conn, &acked)
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
            let span = send_span(source, &row, topic);
            let record = FutureRecord::to(topic)
                .key(row.aggregate_id.as_str())
                .payload(row.payload.as_slice())
                .headers(row.kafka_headers(&messaging::trace_context::of(&span)));
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
        match &report {
            Ok(Ok(delivery)) => {
                span.record("messaging.destination.partition.id", delivery.partition);
                span.record("messaging.kafka.offset", delivery.offset);
            }
            Ok(Err((e, _))) => {
                span.record("error.type", e.to_string());
            }
            Err(_) => {
                span.record("error.type", "canceled");
            }
        }
        // The send span ends here, at the acknowledgement.
        drop(span);
        match report {
            Ok(Ok(_)) => {
                acked.push(id);
                counter!("relay_rows_published_total", "source" => source.clone(), "topic" => topic).increment(1);
                histogram!("relay_send_to_ack_seconds", "source" => source.clone())
                    .record(sent_at.elapsed().as_secs_f64());
                let waited = (Utc::now() - created_at).to_std().unwrap_or_default();
                histogram!("relay_commit_to_ack_seconds", "source" => source.clone())
                    .record(waited.as_secs_f64());
            }
            Ok(Err((e, _))) => {
                tracing::warn!(source = %source, id, %message_id, error = %e,
                    "delivery failed; the row stays in the outbox and will be sent again");
                counter!("relay_publish_errors_total", "source" => source.clone(), "reason" => "delivery").increment(1);
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

async fn report_backlog(conn: &mut PgConnection, source: &Source) -> anyhow::Result<()> {
    let (pending, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8 FROM outbox",
    )
    .fetch_one(&mut *conn)
    .await
    .with_context(|| format!("measuring the backlog of source {}", source.name))?;
    gauge!("relay_outbox_pending_rows", "source" => source.name.clone()).set(pending as f64);
    gauge!("relay_outbox_oldest_pending_age_seconds", "source" => source.name.clone())
        .set(oldest.unwrap_or(0.0));
    let unpublishable: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregate_type <> ALL($1)")
            .bind(&schemas::events::AGGREGATES[..])
            .fetch_one(&mut *conn)
            .await
            .with_context(|| format!("counting unpublishable rows of source {}", source.name))?;
    if unpublishable > 0 {
        tracing::error!(source = %source.name, rows = unpublishable,
            "outbox rows of an aggregate type without a topic are left in place (is this relay older than the service that wrote them?)");
    }
    gauge!("relay_outbox_unpublishable_rows", "source" => source.name.clone())
        .set(unpublishable as f64);
    Ok(())
}

/// The OpenTelemetry producer span of one row (`send orders.v1`), a child of the span that wrote
/// the row (its stored `traceparent`), from the send to the broker's acknowledgement. It records
/// how long the row waited in the outbox (`messaging.outbox.wait_ms`, commit to send); the record
/// carries this span as its `traceparent`, so the consumer's span is its child.
fn send_span(source: &Source, row: &OutboxRow, topic: &str) -> tracing::Span {
    let waited = (Utc::now() - row.created_at).num_milliseconds().max(0);
    let span = tracing::info_span!("send",
        otel.name = %format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %topic,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        messaging.kafka.message.key = %row.aggregate_id,
        messaging.message.id = %row.message_id,
        messaging.outbox.wait_ms = waited,
        outbox.source = %source.name,
        order_id = %row.aggregate_id,
        trace_id = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    messaging::trace_context::continue_from(&span, row.traceparent.as_deref());
    span
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
        let publisher = Publisher {
            source,
            producer,
            options: &options,
            activity: &activity,
            shutdown: &shutdown,
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
