//! The saga monitor in numbers: how fast `saga-monitor rebuild` projects a log from its start
//! (sagas' events produced straight to a broker of its own), and, in the saga runs, how long
//! after the last saga ended the monitor showed every one ended (`caught_up_after`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::{TRACEPARENT, progress, secs};
use crate::{Broker, binary, db_url};

/// The five events of a confirmed saga, each as (topic, event type, message id, causation id,
/// payload), in the order the services emit them.
fn confirmed_saga(
    order_id: Uuid,
    now: i64,
) -> Vec<(&'static str, schemas::Event, Uuid, Option<Uuid>)> {
    use schemas::events::*;
    let customer_id = Uuid::new_v4();
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let events = vec![
        (
            schemas::ORDERS_TOPIC,
            schemas::Event::OrderPlaced(OrderPlaced {
                order_id,
                customer_id,
                items: vec![OrderItem {
                    sku: "SKU-BENCH-0001".into(),
                    quantity: 2,
                }],
                placed_at: now,
            }),
        ),
        (
            schemas::INVENTORY_TOPIC,
            schemas::Event::StockReserved(StockReserved {
                order_id,
                reservation_id: Uuid::new_v4(),
                lines: vec![ReservedLine {
                    sku: "SKU-BENCH-0001".into(),
                    quantity: 2,
                    unit_price_cents: 250,
                }],
                total_cents: 500,
                reserved_at: now + 5,
            }),
        ),
        (
            schemas::ORDERS_TOPIC,
            schemas::Event::OrderAwaitingPayment(OrderAwaitingPayment {
                order_id,
                customer_id,
                amount_cents: 500,
                pay_by: now + 30_000,
                at: now + 10,
            }),
        ),
        (
            schemas::PAYMENTS_TOPIC,
            schemas::Event::PaymentConfirmed(PaymentConfirmed {
                order_id,
                payment_id: Uuid::new_v4(),
                amount_cents: 500,
                confirmed_at: now + 50,
            }),
        ),
        (
            schemas::ORDERS_TOPIC,
            schemas::Event::OrderConfirmed(OrderConfirmed {
                order_id,
                total_cents: 500,
                confirmed_at: now + 55,
            }),
        ),
    ];
    events
        .into_iter()
        .enumerate()
        .map(|(i, (topic, event))| (topic, event, ids[i], i.checked_sub(1).map(|c| ids[c])))
        .collect()
}

/// Produces `sagas` confirmed sagas' events (five records each, with the contract's headers) to
/// a broker of its own, then runs `saga-monitor rebuild` from the start of the topics into a
/// database of its own and times it.
pub async fn rebuild(server: &str, log_dir: &Path, sagas: usize) -> anyhow::Result<Value> {
    std::fs::create_dir_all(log_dir)?;
    let broker = Broker::start(log_dir).await;
    let kafka = messaging::kafka::KafkaSettings::new(&broker.bootstrap);
    let topics: Vec<_> = schemas::EVENT_TOPICS
        .iter()
        .map(|t| messaging::kafka::TopicSpec::new(*t, Duration::from_secs(7 * 86_400)))
        .collect();
    messaging::kafka::ensure_topics(&kafka, &topics, 3).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    progress(format!(
        "monitor: producing {sagas} sagas' events (five records each) to a broker of its own"
    ));
    let now = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    let mut records = 0_usize;
    for chunk in (0..sagas).collect::<Vec<_>>().chunks(2_000) {
        let mut sends = Vec::new();
        for _ in chunk {
            let order_id = Uuid::now_v7();
            for (topic, event, message_id, cause) in confirmed_saga(order_id, now) {
                let (order, message, event_type) = (
                    order_id.to_string(),
                    message_id.to_string(),
                    event.event_type(),
                );
                let mut headers = OwnedHeaders::new();
                let cause = cause.map(|c| c.to_string());
                let mut pairs = vec![
                    ("message-id", message.as_str()),
                    ("event-type", event_type),
                    ("content-type", schemas::AVRO_CONTENT_TYPE),
                    ("correlation-id", order.as_str()),
                    ("traceparent", TRACEPARENT),
                ];
                if let Some(cause) = &cause {
                    pairs.push(("causation-id", cause.as_str()));
                }
                for (key, value) in pairs {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                let payload = schemas::encode(&event);
                let producer = producer.clone();
                sends.push(async move {
                    producer
                        .send(
                            FutureRecord::to(topic)
                                .key(&order)
                                .payload(&payload)
                                .headers(headers),
                            Duration::from_secs(60),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| e)
                });
                records += 1;
            }
        }
        for result in futures::future::join_all(sends).await {
            result.context("producing the monitor's records")?;
        }
    }
    let produced_in = started.elapsed();
    let db = format!("bench_monitor_{}", Uuid::new_v4().simple());
    progress(format!(
        "monitor: {records} records produced in {produced_in:.1?}; rebuilding from the start of the topics"
    ));
    let started = Instant::now();
    let output = tokio::process::Command::new(binary("saga-monitor"))
        .args([
            "--database-url",
            &db_url(server, &db),
            "--kafka-bootstrap-servers",
            &broker.bootstrap,
            "rebuild",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .context("running saga-monitor rebuild")?;
    let took = started.elapsed();
    anyhow::ensure!(
        output.status.success(),
        "saga-monitor rebuild failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pool = PgPool::connect(&db_url(server, &db)).await?;
    let (shown, steps): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM projection.sagas WHERE outcome = 'confirmed'),
                (SELECT count(*) FROM projection.steps)",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    crate::drop_databases(server, vec![db]);
    progress(format!(
        "monitor: rebuilt {shown} sagas ({steps} steps) in {took:.1?}: {:.0} records/s",
        records as f64 / took.as_secs_f64()
    ));
    Ok(json!({
        "sagas": sagas,
        "records": records,
        "sagas_shown_confirmed": shown,
        "steps": steps,
        "rebuild_seconds": secs(took),
        "records_per_second": (records as f64 / took.as_secs_f64()).round(),
        "sagas_per_second": (sagas as f64 / took.as_secs_f64()).round(),
    }))
}

/// How long after `since` the monitor's projection shows every one of `ids` ended.
pub async fn caught_up_after(
    monitor: &PgPool,
    ids: &[Uuid],
    since: Instant,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection.sagas WHERE order_id = ANY($1) AND outcome <> 'in_progress'",
        )
        .bind(ids)
        .fetch_one(monitor)
        .await?;
        if ended == ids.len() as i64 {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the monitor shows {ended} of {} sagas ended after 10 min",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
