//! "Not yet" failures: retried through the retry topics on the configured schedule, applied once
//! they can be, dead-lettered when they never can, and never reordered within an order.

use std::time::Duration;

use e2e::kafka::{self, Delivery};
use e2e::{Process, Stack, StackOptions, eventually};
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
    reserved_units(order_id, 1)
}

/// A StockReserved of `units` of A at 100 cents each.
fn reserved_units(order_id: Uuid, units: i64) -> serde_json::Value {
    json!({"order_id": order_id, "reservation_id": Uuid::new_v4(), "lines": [{"sku": "A", "quantity": units, "unit_price_cents": 100}],
           "total_cents": 100 * units, "reserved_at": 1732252800000i64})
}

async fn metric(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    stack.metric(&stack.order_url, name, labels).await
}

/// Waits until order-service has sent a message to its first retry topic.
async fn wait_for_first_retry(stack: &Stack) {
    wait_for_retries(stack, 1).await;
}

/// Waits until order-service has sent `n` messages to its first retry topic.
async fn wait_for_retries(stack: &Stack, n: u32) {
    eventually(TIMEOUT, || async {
        let retried = metric(
            stack,
            "consumer_messages_retried_total",
            &[("attempt", "1")],
        )
        .await;
        Ok((retried >= f64::from(n)).then_some(()))
    })
    .await
    .expect("the event went to the first retry topic");
}

async fn dead_letters(stack: &Stack, at_least: usize) -> Vec<Delivery> {
    eventually(TIMEOUT, || async {
        let records = kafka::read_topic(&stack.broker.bootstrap, "order-service.dlq").await?;
        Ok((records.len() >= at_least).then_some(records))
    })
    .await
    .expect("dead letters")
}

/// Waits until `n` messages of `order_id` wait in order-service's parking table.
async fn wait_for_parked_messages(orders_db: &sqlx::PgPool, order_id: Uuid, n: i64, what: &str) {
    eventually(TIMEOUT, || async {
        let parked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM parked_messages WHERE consumer_group = 'order-service' AND message_key = $1",
        )
        .bind(order_id.to_string())
        .fetch_one(orders_db)
        .await?;
        Ok((parked == n).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Produces a retry copy of an inventory event to `order-service.retry.1`, as the service would.
async fn produce_retry_copy(
    stack: &Stack,
    order_id: Uuid,
    message_id: Uuid,
    body: serde_json::Value,
) {
    let (message_id, order) = (message_id.to_string(), order_id.to_string());
    let now_ms = chrono::Utc::now().timestamp_millis().to_string();
    kafka::produce(
        &stack.broker.bootstrap,
        "order-service.retry.1",
        None,
        Some(&order),
        &[
            ("message-id", &message_id),
            ("event-type", "StockReserved"),
            ("content-type", "application/json"),
            ("correlation-id", &order),
            ("retry-attempt", "1"),
            ("retry-not-before", &now_ms),
            ("retry-original-topic", schemas::INVENTORY_TOPIC),
            ("retry-original-partition", "0"),
            ("retry-original-offset", "0"),
        ],
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_not_yet_event_is_retried_and_applied_once_its_order_exists() {
        e2e::requires_own_stack("starts the services with retry delays of its own");
        let stack = stack_with_delays("retry_then_success", "1s,3s,3s").await;
        let order_id = Uuid::new_v4();
        produce_inventory_event(
            &stack,
            0,
            "StockReservationRejected",
            rejected(order_id, "out of tea"),
        )
        .await;
        wait_for_first_retry(&stack).await;

        stack.create_order_quietly(order_id).await;
        stack
            .wait_for_statuses(&[order_id], &["REJECTED"], TIMEOUT)
            .await;
        let order = stack.order(order_id).await;
        assert_eq!(order["reason"], "out of tea");
        assert_eq!(e2e::status_history(&order), ["PENDING", "REJECTED"]);
        let dlq = kafka::read_topic(&stack.broker.bootstrap, "order-service.dlq")
            .await
            .unwrap();
        assert!(dlq.is_empty(), "nothing is dead-lettered");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_never_applicable_is_dead_lettered_after_its_retries_on_schedule() {
        e2e::requires_own_stack("starts the services with retry delays of its own and times them");
        let delays_ms = [1000i64, 2000, 3000];
        let stack = stack_with_delays("retry_exhausted", "1s,2s,3s").await;
        let order_id = Uuid::new_v4();
        let message_id =
            produce_inventory_event(&stack, 1, "StockReserved", reserved(order_id)).await;

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
            letter.headers.iter().all(|(k, _)| !k.starts_with("retry-")),
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
            // Loose bounds (the suite shares two cores): they still tell 1 s, 2 s and 3 s
            // apart, and a schedule that ignored the configured delays.
            assert!(
                (delay - 500..=*delay).contains(&scheduled),
                "retry {} scheduled {scheduled} ms out",
                i + 1
            );
            assert!(
                produced[i + 1] >= due[i],
                "retry {} ran before it was due",
                i + 1
            );
            assert!(
                ran < delay + 5000,
                "retry {} ran {ran} ms after the previous attempt",
                i + 1
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn while_an_orders_event_waits_for_a_retry_its_next_event_waits_too_and_other_orders_flow()
     {
        e2e::requires_own_stack("starts the services with retry delays of its own");
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
        assert_eq!(e2e::status_history(&order), ["PENDING", "REJECTED"]);
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

    /// An order's key waits behind head H2 (still retrying) with a StockReservationRejected parked
    /// behind it, when a stray retry copy of H1, an earlier head that was already applied, arrives
    /// (possible after a crash inside the offset-commit window), followed by H2's own copy, a
    /// StockReserved. The stray must neither apply nor release the key: H2 confirms the order and
    /// only then is the parked rejection applied (too late to matter). Before the fix the stray's
    /// "duplicate" released the key, the rejection overtook H2, and the order ended REJECTED.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stray_retry_copy_of_an_earlier_head_does_not_release_its_key() {
        e2e::requires_own_stack("writes the service's parking and inbox tables");
        let stack = stack_with_delays("retry_stray_copy", "1s,3s,3s").await;
        let order_id = Uuid::new_v4();
        stack.create_order_quietly(order_id).await;
        let (h1, h2) = (Uuid::new_v4(), Uuid::new_v4());
        let orders_db = stack.orders_pool().await;
        sqlx::query(
            "INSERT INTO inbox (consumer_group, message_id, event_type, topic, kafka_partition, kafka_offset) \
             VALUES ('order-service', $1, 'StockReserved', $2, 0, 0)",
        )
        .bind(h1)
        .bind(schemas::INVENTORY_TOPIC)
        .execute(&orders_db)
        .await
        .expect("H1 applied earlier");
        sqlx::query(
            "INSERT INTO parked_keys (consumer_group, message_key, head_message_id, reason) \
             VALUES ('order-service', $1, $2, 'not yet')",
        )
        .bind(order_id.to_string())
        .bind(h2)
        .execute(&orders_db)
        .await
        .expect("the key parked behind H2");

        produce_inventory_event(
            &stack,
            0,
            "StockReservationRejected",
            rejected(order_id, "parked behind H2"),
        )
        .await;
        wait_for_parked_messages(&orders_db, order_id, 1, "the rejection waits behind H2").await;

        // The stray carries another reservation (3 units, 300 cents) than the head (1 unit,
        // 100 cents): the order's total tells which one confirmed it.
        produce_retry_copy(&stack, order_id, h1, reserved_units(order_id, 3)).await;
        produce_retry_copy(&stack, order_id, h2, reserved(order_id)).await;
        let statuses = stack
            .wait_for_statuses(&[order_id], &["CONFIRMED", "REJECTED"], TIMEOUT)
            .await;
        assert_eq!(
            statuses[&order_id],
            "CONFIRMED",
            "the parked rejection overtook the key's head; {}",
            stack.where_logs_are()
        );
        eventually(TIMEOUT, || async {
            let parked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM parked_keys WHERE consumer_group = 'order-service' AND message_key = $1",
            )
            .bind(order_id.to_string())
            .fetch_one(&orders_db)
            .await?;
            Ok((parked == 0).then_some(()))
        })
        .await
        .expect("the key is released once H2 applied and the parked rejection was drained");
        let order = stack.order(order_id).await;
        assert_eq!(
            e2e::status_history(&order),
            ["PENDING", "AWAITING_PAYMENT", "CONFIRMED"]
        );
        assert_eq!(
            order["total_cents"], 100,
            "the order was confirmed by the stray copy of H1, not by its head H2: {order}"
        );
    }

    /// A key parked behind a head whose retry copy never comes back (its retry topic no longer read
    /// after `--retry-delays` was shortened, or the copy expired) would hold its order for good.
    /// After `--parked-key-timeout` the head is dead-lettered from the record stored with the key
    /// (class retryable, so it can be redriven), and the order's waiting events are applied. Before
    /// the fix nothing swept: the order stayed PENDING with its rejection parked forever.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_head_that_never_comes_back_is_dead_lettered_and_its_key_released() {
        e2e::requires_own_stack("starts the services with a parked-key timeout of its own");
        let stack = Stack::start_with(
            "retry_parked_timeout",
            StackOptions {
                retry_delays: Some("1s,1s,1s".into()),
                env: vec![("PARKED_KEY_TIMEOUT".into(), "5s".into())],
                ..StackOptions::default()
            },
        )
        .await;
        let order_id = Uuid::new_v4();
        stack.create_order_quietly(order_id).await;
        let head = Uuid::new_v4();
        let head_headers = json!([
            ["message-id", head.to_string().as_bytes()],
            ["event-type", "StockReserved".as_bytes()],
            ["content-type", "application/json".as_bytes()],
            ["correlation-id", order_id.to_string().as_bytes()],
        ]);
        let orders_db = stack.orders_pool().await;
        sqlx::query(
            "INSERT INTO parked_keys (consumer_group, message_key, head_message_id, reason, head_topic, \
             head_partition, head_offset, head_headers, head_payload) \
             VALUES ('order-service', $1, $2, 'not yet', $3, 2, 41, $4, $5)",
        )
        .bind(order_id.to_string())
        .bind(head)
        .bind(schemas::INVENTORY_TOPIC)
        .bind(&head_headers)
        .bind(reserved(order_id).to_string().into_bytes())
        .execute(&orders_db)
        .await
        .expect("the key parked behind a head whose copy is gone");
        produce_inventory_event(
            &stack,
            0,
            "StockReservationRejected",
            rejected(order_id, "waited behind a lost head"),
        )
        .await;
        wait_for_parked_messages(
            &orders_db,
            order_id,
            1,
            "the rejection waits behind the head",
        )
        .await;
        // The head has waited for an hour.
        sqlx::query(
            "UPDATE parked_keys SET head_since = now() - interval '1 hour' WHERE message_key = $1",
        )
        .bind(order_id.to_string())
        .execute(&orders_db)
        .await
        .unwrap();

        let statuses = stack
            .wait_for_statuses(&[order_id], &["REJECTED"], TIMEOUT)
            .await;
        assert_eq!(statuses[&order_id], "REJECTED");
        let dlq = dead_letters(&stack, 1).await;
        let letter = dlq
            .iter()
            .find(|r| r.header("message-id") == Some(head.to_string().as_str()))
            .expect("the head is dead-lettered");
        assert_eq!(letter.header("dlq-error-class"), Some("retryable"));
        assert_eq!(
            letter.header("dlq-original-topic"),
            Some(schemas::INVENTORY_TOPIC)
        );
        assert_eq!(letter.header("dlq-original-offset"), Some("41"));
        assert!(
            letter
                .header("dlq-error-message")
                .is_some_and(|m| m.contains("did not come back")),
            "{:?}",
            letter.header("dlq-error-message")
        );
        assert!(
            matches!(letter.event(), Ok(schemas::Event::StockReserved(_))),
            "the dead letter carries the head's own record: {:?}",
            letter.event()
        );
        assert_eq!(
            metric(
                &stack,
                "consumer_parked_heads_expired_total",
                &[("group", "order-service")]
            )
            .await,
            1.0
        );
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_keys")
            .fetch_one(&orders_db)
            .await
            .unwrap();
        assert_eq!(parked, 0, "the key is released");
    }

    /// SIGTERM while the broker hangs and a dead letter is being sent: order-service exits promptly
    /// instead of waiting for the broker (its producer never gives up on a record). The record's
    /// offset is not committed, so after the restart it is handled again and dead-lettered.
    #[tokio::test(flavor = "multi_thread")]
    async fn shutdown_during_a_broker_outage_does_not_wait_for_a_dead_letter_send() {
        e2e::requires_own_stack("pauses the broker and stops order-service");
        let mut stack = stack_with_delays("retry_shutdown_in_outage", "3s").await;
        // The copy in retry.1 is read at once and waits until it is due (3 s); the broker is
        // stopped meanwhile. Once due it is still not applicable and has no retry left, so it is
        // dead-lettered, and the log says so before the send. If the copy had not been read
        // before the broker stopped, that line never comes: try again with another order.
        let mut sending = None;
        for attempt in 1..=3 {
            let order_id = Uuid::new_v4();
            let message_id =
                produce_inventory_event(&stack, 0, "StockReserved", reserved(order_id)).await;
            wait_for_retries(&stack, attempt).await;
            stack.broker.pause();
            let key = order_id.to_string();
            let started = eventually(Duration::from_secs(10), || async {
                Ok(stack
                    .log_has("order-service", &["dead-lettering it", &key])
                    .then_some(()))
            })
            .await;
            if started.is_ok() {
                sending = Some(message_id);
                break;
            }
            stack.broker.resume();
        }
        let message_id = sending.expect("no dead-letter send began while the broker was stopped");
        let exited = stack.stop_within(Process::OrderService, Duration::from_secs(10));
        stack.broker.resume();
        assert!(
            exited,
            "order-service did not exit within 10 s of SIGTERM while the broker hung; {}",
            stack.where_logs_are()
        );

        stack.start_process(Process::OrderService).await;
        let letters = eventually(TIMEOUT, || async {
            let records = kafka::read_topic(&stack.broker.bootstrap, "order-service.dlq").await?;
            let letters: Vec<Delivery> = records
                .into_iter()
                .filter(|r| r.header("message-id") == Some(message_id.as_str()))
                .collect();
            Ok((!letters.is_empty()).then_some(letters))
        })
        .await
        .expect("the record is dead-lettered after the restart");
        // One: the abandoned send never reached the broker. It was the process's first to the
        // DLQ, so its producer (sparse metadata, librdkafka's default) first asked the stopped
        // broker for the topic's metadata. A send that had reached it could land a second copy
        // after the restart: dead letters are written at least once.
        assert_eq!(
            letters.len(),
            1,
            "the abandoned send and the one after the restart both landed: {:?}",
            letters.iter().map(|r| r.offset).collect::<Vec<_>>()
        );
    }

    /// A drain that re-parks a message sends its retry copy and then commits; if the commit fails
    /// (or the process dies in between) the message is still parked behind the old head when its
    /// retry copy arrives. That copy must not be dead-lettered as a stray: the message is applied
    /// from the parking table once the head is. Before the fix the copy went to the DLQ.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_retry_copy_of_a_message_still_parked_is_not_dead_lettered() {
        e2e::requires_own_stack("writes the service's parking tables");
        let stack = stack_with_delays("retry_copy_still_parked", "1s,3s,3s").await;
        let order_id = Uuid::new_v4();
        stack.create_order_quietly(order_id).await;
        let head = Uuid::new_v4();
        let orders_db = stack.orders_pool().await;
        sqlx::query(
            "INSERT INTO parked_keys (consumer_group, message_key, head_message_id, reason) \
             VALUES ('order-service', $1, $2, 'not yet')",
        )
        .bind(order_id.to_string())
        .bind(head)
        .execute(&orders_db)
        .await
        .expect("the key parked behind a head");
        // A second reservation answer (applies as "already confirmed" after the head).
        let parked = produce_inventory_event(&stack, 0, "StockReserved", reserved(order_id)).await;
        wait_for_parked_messages(
            &orders_db,
            order_id,
            1,
            "the second answer waits behind the head",
        )
        .await;

        // The parked message's own retry copy, then the head's.
        produce_retry_copy(
            &stack,
            order_id,
            parked.parse().unwrap(),
            reserved(order_id),
        )
        .await;
        produce_retry_copy(&stack, order_id, head, reserved(order_id)).await;
        stack
            .wait_for_statuses(&[order_id], &["CONFIRMED"], TIMEOUT)
            .await;
        wait_for_parked_messages(&orders_db, order_id, 0, "the parked message was drained").await;
        let dlq = kafka::read_topic(&stack.broker.bootstrap, "order-service.dlq")
            .await
            .unwrap();
        assert!(
            dlq.is_empty(),
            "nothing is dead-lettered: {:?}",
            dlq.iter()
                .map(|r| r.header("dlq-error-message"))
                .collect::<Vec<_>>()
        );
    }
}
