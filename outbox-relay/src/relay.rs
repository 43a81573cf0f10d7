//! The tailing loop of one source: poll the oldest outbox rows, produce them in id order, wait for
//! the broker's acknowledgements, delete what was acknowledged. See the crate docs for why.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::future::join_all;
use messaging::shutdown::Shutdown;
use metrics::{counter, gauge, histogram};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::{Connection, FromRow, PgConnection};
use uuid::Uuid;

use crate::Source;

/// The advisory lock key that makes one relay the publisher of a source (ASCII "outbox").
const LEADER_LOCK: i64 = 0x6f7574626f78;

#[derive(Debug, Clone)]
pub struct Options {
    pub batch_size: i64,
    pub idle_poll: Duration,
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

#[derive(Debug, FromRow)]
struct Row {
    id: i64,
    message_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    content_type: String,
    payload: Vec<u8>,
    causation_id: Option<Uuid>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    created_at: DateTime<Utc>,
}

/// Tails `source` until shutdown, reconnecting with backoff whenever the database fails. Returns an
/// error only when the Kafka producer failed fatally.
pub async fn tail(
    source: Source,
    producer: FutureProducer,
    options: Options,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut failures: u32 = 0;
    while !shutdown.is_fired() {
        match tail_connected(&source, &producer, &options, &shutdown, &mut failures).await {
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

/// Connects, becomes the source's leader and publishes until shutdown or an error.
///
/// **Every read and delete runs on the one session that holds the leader lock.** If that session
/// dies (Postgres restarted, the connection cut, the backend terminated), the lock is released
/// and a standby may take it; this relay's next query then fails on the same dead session, so it
/// stops publishing instead of carrying on beside the new leader on another connection. A batch
/// already being produced at that moment may reach the broker twice (once from each relay):
/// duplicates, which the consumers' inboxes skip, never a reordering of an order's first copies.
async fn tail_connected(
    source: &Source,
    producer: &FutureProducer,
    options: &Options,
    shutdown: &Shutdown,
    failures: &mut u32,
) -> anyhow::Result<()> {
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        PgConnection::connect(&source.database_url),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out after 5 s"))
    .and_then(|connected| Ok(connected?))
    .with_context(|| format!("connecting to source {}", source.name))?;
    if !become_leader(&mut conn, source, shutdown).await? {
        return Ok(());
    }
    tracing::info!(source = %source.name, "publishing outbox rows");
    let conn = &mut conn;
    let mut last_backlog_report = Instant::now() - Duration::from_secs(10);
    loop {
        if shutdown.is_fired() {
            return Ok(());
        }
        if last_backlog_report.elapsed() >= Duration::from_secs(1) {
            report_backlog(&mut *conn, source).await?;
            last_backlog_report = Instant::now();
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, message_id, aggregate_type, aggregate_id, event_type, content_type, payload, \
             causation_id, traceparent, tracestate, created_at FROM outbox \
             WHERE aggregate_type = ANY($2) ORDER BY id LIMIT $1",
        )
        .bind(options.batch_size)
        // Rows of an aggregate type this relay has no topic for (written by a newer service, say)
        // are left in place and counted, not read: read, they would fill every batch and stall
        // the source.
        .bind(&schemas::events::AGGREGATES[..])
        .fetch_all(&mut *conn)
        .await
        .with_context(|| format!("reading the outbox of source {}", source.name))?;
        if rows.is_empty() {
            // Working again: the next failure starts the backoff from the beginning. (Only
            // now: an error that recurs right after taking the lock must not reconnect and
            // republish the same batch every 100 ms.)
            *failures = 0;
            if shutdown.sleep(options.idle_poll).await.is_err() {
                return Ok(());
            }
            continue;
        }
        histogram!("relay_batch_size", "source" => source.name.clone()).record(rows.len() as f64);
        tracing::debug!(source = %source.name, rows = rows.len(),
            oldest_waited_ms = (Utc::now() - rows[0].created_at).num_milliseconds(), "rows found");
        let published = tokio::select! {
            published = publish(source, producer, &rows) => published,
            // During a broker outage deliveries wait indefinitely; on shutdown leave the rows in
            // the outbox for the next run (they may then be published twice, never lost).
            _ = shutdown.wait() => return Ok(()),
        };
        if !published.acked.is_empty() {
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind(&published.acked)
                .execute(&mut *conn)
                .await
                .with_context(|| format!("deleting published rows of source {}", source.name))?;
            *failures = 0;
        }
        if published.failed > 0 {
            if let Some((code, reason)) = producer.client().fatal_error() {
                // An idempotent producer that hit a fatal error cannot send again; exit so the
                // supervisor restarts the relay with a fresh producer. The rows are still there.
                anyhow::bail!("Kafka producer failed fatally ({code:?}): {reason}");
            }
            if shutdown.sleep(Duration::from_secs(1)).await.is_err() {
                return Ok(());
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

struct Published {
    acked: Vec<i64>,
    failed: usize,
}

/// Produces `rows` in order and waits for every delivery report.
async fn publish(source: &Source, producer: &FutureProducer, rows: &[Row]) -> Published {
    let mut deliveries = Vec::with_capacity(rows.len());
    let mut failed = 0;
    for row in rows {
        let Some(topic) = schemas::topic_for_aggregate(&row.aggregate_type) else {
            tracing::error!(source = %source.name, id = row.id, aggregate_type = %row.aggregate_type,
                "outbox row has an unknown aggregate type; left in place");
            counter!("relay_publish_errors_total", "source" => source.name.clone(), "reason" => "unknown_aggregate").increment(1);
            failed += 1;
            continue;
        };
        let span = send_span(source, row, topic);
        let record = FutureRecord::to(topic)
            .key(row.aggregate_id.as_str())
            .payload(row.payload.as_slice())
            .headers(headers(row, &messaging::trace_context::of(&span)));
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push((row, topic, (delivery, span))),
            Err((e, _)) => {
                tracing::warn!(source = %source.name, id = row.id, error = %e, "could not enqueue; will retry");
                counter!("relay_publish_errors_total", "source" => source.name.clone(), "reason" => "enqueue").increment(1);
                failed += 1;
                // Later rows could overtake this one: stop here and retry from it.
                break;
            }
        }
    }
    let (rows_sent, futures): (Vec<_>, Vec<_>) = deliveries
        .into_iter()
        .map(|(row, topic, (delivery, span))| ((row, topic, span), delivery))
        .unzip();
    let sent_at = Instant::now();
    let reports = join_all(futures).await;
    histogram!("relay_send_to_ack_seconds", "source" => source.name.clone())
        .record(sent_at.elapsed().as_secs_f64());
    let mut acked = Vec::with_capacity(rows_sent.len());
    let now = Utc::now();
    for ((row, topic, span), report) in rows_sent.into_iter().zip(reports) {
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
                acked.push(row.id);
                counter!("relay_rows_published_total", "source" => source.name.clone(), "topic" => topic).increment(1);
                let waited = (now - row.created_at).to_std().unwrap_or_default();
                histogram!("relay_commit_to_ack_seconds", "source" => source.name.clone())
                    .record(waited.as_secs_f64());
            }
            Ok(Err((e, _))) => {
                tracing::warn!(source = %source.name, id = row.id, message_id = %row.message_id, error = %e,
                    "delivery failed; the row stays in the outbox and will be sent again");
                counter!("relay_publish_errors_total", "source" => source.name.clone(), "reason" => "delivery").increment(1);
                failed += 1;
            }
            Err(_) => {
                failed += 1;
            }
        }
    }
    if !acked.is_empty() {
        tracing::debug!(source = %source.name, rows = acked.len(), "published");
    }
    Published { acked, failed }
}

/// The OpenTelemetry producer span of one row (`send orders.v1`), a child of the span that wrote
/// the row (its stored `traceparent`), from the send to the broker's acknowledgement. It records
/// how long the row waited in the outbox (`messaging.outbox.wait_ms`, commit to send); the record
/// carries this span as its `traceparent`, so the consumer's span is its child.
fn send_span(source: &Source, row: &Row, topic: &str) -> tracing::Span {
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

/// The record's headers: the row's, with `traceparent` set to the relay's send span.
fn headers(row: &Row, traceparent: &str) -> OwnedHeaders {
    let message_id = row.message_id.to_string();
    let causation_id = row.causation_id.map(|c| c.to_string());
    let mut pairs: Vec<(&str, &str)> = vec![
        ("message-id", &message_id),
        ("event-type", &row.event_type),
        ("content-type", &row.content_type),
        ("correlation-id", &row.aggregate_id),
    ];
    if let Some(c) = &causation_id {
        pairs.push(("causation-id", c));
    }
    pairs.push(("traceparent", traceparent));
    if let Some(t) = &row.tracestate {
        pairs.push(("tracestate", t));
    }
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    fn row(id: i64, order: &str, event_type: &str) -> Row {
        Row {
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
        assert_eq!(publish(&source, &producer, &[warm]).await.acked, [0]);

        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let rows = [
            row(1, "order-1", "OrderPlaced"),
            row(2, "order-1", "OrderCancelled"),
        ];
        let published =
            tokio::time::timeout(Duration::from_secs(60), publish(&source, &producer, &rows))
                .await
                .expect("both delivery reports within 60 s");
        assert!(
            !published.acked.contains(&1),
            "the refused row is acknowledged: {:?}",
            published.acked
        );
        assert!(
            published.failed > 0,
            "the refused row is reported as failed"
        );
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
