//! "Not yet" failures: retried through the retry topics on the configured schedule, applied once
//! they can be, dead-lettered when they never can, and never reordered within an order.

use std::time::Duration;

use e2e::kafka::{self, Record};
use e2e::{Stack, StackOptions, eventually};
use serde_json::json;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn stack_with_delays(test: &str, delays: &str) -> Stack {
    Stack::start_with(
        test,
        StackOptions {
            retry_delays: Some(delays.to_owned()),
            ..StackOptions::default()
        },
    )
    .await
}

/// Produces an inventory event as JSON (as a user would with kcat) to `partition` of inventory.v1.
async fn produce_inventory_event(
    stack: &Stack,
    partition: i32,
    event_type: &str,
    body: serde_json::Value,
) -> String {
    let message_id = Uuid::new_v4().to_string();
    let order_id = body["order_id"].as_str().unwrap().to_owned();
    kafka::produce(
        &stack.broker.bootstrap,
        schemas::INVENTORY_TOPIC,
        Some(partition),
        Some(&order_id),
        &[
            ("message-id", &message_id),
            ("event-type", event_type),
            ("content-type", "application/json"),
            ("correlation-id", &order_id),
        ],
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
    message_id
}

fn rejected(order_id: Uuid, reason: &str) -> serde_json::Value {
    json!({"order_id": order_id, "reason": reason, "shortages": [], "rejected_at": 1732252800000i64})
}

fn reserved(order_id: Uuid) -> serde_json::Value {
    json!({"order_id": order_id, "reservation_id": Uuid::new_v4(), "lines": [{"sku": "A", "quantity": 1, "unit_price_cents": 100}],
           "total_cents": 100, "reserved_at": 1732252800000i64})
}

async fn metric(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    stack.metric(&stack.order_url, name, labels).await
}

async fn dead_letters(stack: &Stack, at_least: usize) -> Vec<Record> {
    eventually(TIMEOUT, || async {
        let records = kafka::read_topic(&stack.broker.bootstrap, "order-service.dlq").await?;
        Ok((records.len() >= at_least).then_some(records))
    })
    .await
    .expect("dead letters")
}

fn history(order: &serde_json::Value) -> Vec<String> {
    order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_not_yet_event_is_retried_and_applied_once_its_order_exists() {
    if e2e::needs_own_stack("starts the services with retry delays of its own") {
        return;
    }
    let stack = stack_with_delays("retry_then_success", "1s,3s,3s").await;
    let order_id = Uuid::new_v4();
    produce_inventory_event(
        &stack,
        0,
        "StockReservationRejected",
        rejected(order_id, "out of tea"),
    )
    .await;
    eventually(TIMEOUT, || async {
        Ok((metric(
            &stack,
            "consumer_messages_retried_total",
            &[("attempt", "1")],
        )
        .await
            >= 1.0)
            .then_some(()))
    })
    .await
    .expect("the event went to the first retry topic");

    stack.create_order_quietly(order_id).await;
    stack
        .wait_for_statuses(&[order_id], &["REJECTED"], TIMEOUT)
        .await;
    let order = stack.order(order_id).await;
    assert_eq!(order["reason"], "out of tea");
    assert_eq!(history(&order), ["PENDING", "REJECTED"]);
    let dlq = kafka::read_topic(&stack.broker.bootstrap, "order-service.dlq")
        .await
        .unwrap();
    assert!(dlq.is_empty(), "nothing is dead-lettered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_never_applicable_is_dead_lettered_after_its_retries_on_schedule() {
    if e2e::needs_own_stack("starts the services with retry delays of its own and times them") {
        return;
    }
    let delays_ms = [1000i64, 2000, 3000];
    let stack = stack_with_delays("retry_exhausted", "1s,2s,3s").await;
    let order_id = Uuid::new_v4();
    let message_id = produce_inventory_event(&stack, 1, "StockReserved", reserved(order_id)).await;

    let dlq = dead_letters(&stack, 1).await;
    let letter = &dlq[0];
    assert_eq!(letter.header("message-id"), Some(message_id.as_str()));
    assert_eq!(letter.header("dlq-error-class"), Some("retryable"));
    assert_eq!(letter.header("dlq-attempts"), Some("4"));
    assert_eq!(
        letter.header("dlq-original-topic"),
        Some(schemas::INVENTORY_TOPIC)
    );
    assert_eq!(letter.header("dlq-original-partition"), Some("1"));
    assert!(
        letter
            .header("dlq-error-message")
            .unwrap()
            .contains(&format!("unknown order {order_id}"))
    );
    assert!(
        letter.headers.keys().all(|k| !k.starts_with("retry-")),
        "retry headers are dropped"
    );

    // Measure the schedule: each copy says when it may run (retry-not-before); the next attempt's
    // copy (or the dead letter) is produced when that attempt failed.
    let mut produced = Vec::new();
    let mut due = Vec::new();
    for attempt in 1..=3 {
        let topic = format!("order-service.retry.{attempt}");
        let records = kafka::read_topic(&stack.broker.bootstrap, &topic)
            .await
            .unwrap();
        assert_eq!(records.len(), 1, "one copy in {topic}");
        assert_eq!(
            records[0].header("retry-attempt"),
            Some(attempt.to_string().as_str())
        );
        produced.push(records[0].timestamp.unwrap());
        due.push(
            records[0]
                .header("retry-not-before")
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    produced.push(letter.timestamp.unwrap());
    for (i, delay) in delays_ms.iter().enumerate() {
        let scheduled = due[i] - produced[i];
        let ran = produced[i + 1] - produced[i];
        println!(
            "retry {}: configured {delay} ms, scheduled {scheduled} ms, ran after {ran} ms",
            i + 1
        );
        assert!(
            (delay - 50..=*delay).contains(&scheduled),
            "retry {} scheduled {scheduled} ms out",
            i + 1
        );
        assert!(
            produced[i + 1] >= due[i],
            "retry {} ran before it was due",
            i + 1
        );
        assert!(
            ran < delay + 1500,
            "retry {} ran {ran} ms after the previous attempt",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn while_an_orders_event_waits_for_a_retry_its_next_event_waits_too_and_other_orders_flow() {
    if e2e::needs_own_stack("starts the services with retry delays of its own") {
        return;
    }
    let stack = stack_with_delays("order_under_retry", "3s,3s,3s").await;
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    stack.create_order_quietly(b).await;
    // All on one partition: A's first event is not applicable yet (A does not exist), A's second
    // event follows it, then B's event.
    produce_inventory_event(&stack, 2, "StockReservationRejected", rejected(a, "first")).await;
    let a_second = produce_inventory_event(&stack, 2, "StockReserved", reserved(a)).await;
    produce_inventory_event(&stack, 2, "StockReserved", reserved(b)).await;

    // B flows past A while A waits.
    stack.wait_for_statuses(&[b], &["CONFIRMED"], TIMEOUT).await;
    let parked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM parked_messages WHERE message_key = $1")
            .bind(a.to_string())
            .fetch_one(&stack.orders_pool().await)
            .await
            .unwrap();
    assert_eq!(parked, 1, "A's second event waits behind its first");

    // A appears; its events apply in order: REJECTED by the first, and the second (a
    // reservation for a rejected order) can never apply, so it is dead-lettered.
    stack.create_order_quietly(a).await;
    stack.wait_for_statuses(&[a], &["REJECTED"], TIMEOUT).await;
    let dlq = dead_letters(&stack, 1).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("message-id"), Some(a_second.as_str()));
    assert_eq!(dlq[0].header("dlq-error-class"), Some("permanent"));
    let order = stack.order(a).await;
    assert_eq!(order["reason"], "first");
    assert_eq!(history(&order), ["PENDING", "REJECTED"]);
    // The dead letter is written before the parked message and the key are released.
    eventually(TIMEOUT, || async {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_keys")
            .fetch_one(&stack.orders_pool().await)
            .await?;
        Ok((parked == 0).then_some(()))
    })
    .await
    .expect("A's key is released");
}
