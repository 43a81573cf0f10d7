//! Group commit: a consumer that finds a backlog applies many records per transaction, and a
//! record that cannot apply (undecodable, "not yet", a duplicate) in the middle of a group falls
//! back to being handled alone without failing its neighbours.

use std::time::Duration;

use e2e::{Process, Stack, StackOptions, eventually, kafka};
use serde_json::json;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(120);
const STOCK: i64 = 1_000;

/// Produces one JSON event to orders.v1, keyed by its order, as a user would with kcat.
async fn produce_order_event(
    stack: &Stack,
    message_id: &str,
    event_type: &str,
    order_id: Uuid,
    body: &str,
) {
    let key = order_id.to_string();
    kafka::produce(
        &stack.broker.bootstrap,
        schemas::ORDERS_TOPIC,
        None,
        Some(&key),
        &[
            ("message-id", message_id),
            ("event-type", event_type),
            ("content-type", "application/json"),
            ("correlation-id", &key),
        ],
        body.as_bytes(),
    )
    .await
    .unwrap();
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_backlog_is_applied_in_groups_and_a_bad_record_in_a_group_fails_none_of_its_neighbours()
     {
        e2e::requires_own_stack("stops inventory-service to build a backlog");
        let mut stack = Stack::start_with(
            "group_commit",
            StackOptions {
                retry_delays: Some("200ms".into()),
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, STOCK).await;
        let sku = stack.sku("A");
        stack.kill(Process::InventoryService);

        let orders_db = stack.orders_pool().await;
        let mut ids = Vec::new();
        for _ in 0..100 {
            ids.push(stack.place_order(&[("A", 1)]).await);
        }
        stack.wait_for_empty_outbox(&orders_db, TIMEOUT).await;

        // In the middle of the backlog: an undecodable record, an OrderConfirmed for an order
        // inventory never reserved ("not yet", then dead-lettered after its retry), and an
        // OrderPlaced of an order the order service does not know, delivered twice.
        let undecodable = Uuid::new_v4().to_string();
        let bad_order = Uuid::new_v4();
        produce_order_event(
            &stack,
            &undecodable,
            "OrderPlaced",
            bad_order,
            &json!({"order_id": bad_order, "customer_id": Uuid::new_v4(),
                    "items": [{"sku": sku, "quantity": "two"}], "placed_at": 1})
            .to_string(),
        )
        .await;
        let not_yet = Uuid::new_v4().to_string();
        let unreserved = Uuid::new_v4();
        produce_order_event(
            &stack,
            &not_yet,
            "OrderConfirmed",
            unreserved,
            &json!({"order_id": unreserved, "total_cents": 100, "confirmed_at": 1732252800000i64})
                .to_string(),
        )
        .await;
        // Behind it on the same key: must wait (parked) until the head is dead-lettered.
        let behind = Uuid::new_v4().to_string();
        produce_order_event(
            &stack,
            &behind,
            "OrderCancelled",
            unreserved,
            &json!({"order_id": unreserved, "reason": "CUSTOMER_REQUEST", "cancelled_at": 1732252800000i64})
                .to_string(),
        )
        .await;
        let twice = Uuid::new_v4().to_string();
        let stranger = Uuid::new_v4();
        let placed = json!({"order_id": stranger, "customer_id": Uuid::new_v4(),
                            "items": [{"sku": sku, "quantity": 1}], "placed_at": 1732252800000i64})
        .to_string();
        for _ in 0..2 {
            produce_order_event(&stack, &twice, "OrderPlaced", stranger, &placed).await;
        }

        for _ in 0..100 {
            ids.push(stack.place_order(&[("A", 1)]).await);
        }
        stack.wait_for_empty_outbox(&orders_db, TIMEOUT).await;
        stack.start_process(Process::InventoryService).await;

        // Every order around the bad records is confirmed.
        stack.wait_for_statuses(&ids, &["CONFIRMED"], TIMEOUT).await;
        // The stranger's OrderPlaced reserved once, not twice.
        let reservations = stack
            .get_json(&format!(
                "{}/reservations?order_id={stranger}",
                stack.inventory_url
            ))
            .await;
        assert_eq!(
            reservations.as_array().map(Vec::len),
            Some(1),
            "one reservation for the order delivered twice: {reservations}"
        );
        let product = stack.product("A").await;
        assert_eq!(
            product["available"].as_i64(),
            Some(STOCK - ids.len() as i64 - 1),
            "{product}"
        );
        stack.assert_stock_conserved(&[("A", STOCK)]).await;
        // The second delivery was recognised by the inbox (the domain alone would also have ignored
        // it), and the cancellation behind the "not yet" head waited in the parking table.
        let counted = |name: &'static str| {
            let stack = &stack;
            async move {
                stack
                    .metric(
                        &stack.inventory_url,
                        name,
                        &[
                            ("group", "inventory-service"),
                            ("topic", schemas::ORDERS_TOPIC),
                        ],
                    )
                    .await
            }
        };
        assert!(
            counted("consumer_messages_duplicate_total").await >= 1.0,
            "the twice-delivered OrderPlaced was not counted as a duplicate"
        );
        assert!(
            counted("consumer_messages_parked_total").await >= 1.0,
            "the OrderCancelled behind the retrying OrderConfirmed was not parked"
        );
        // ... and was applied once its head was dead-lettered: inventory answered it.
        eventually(TIMEOUT, || async {
            let records =
                kafka::read_topic(&stack.broker.bootstrap, schemas::INVENTORY_TOPIC).await?;
            let released = records.iter().any(|r| {
                r.header("causation-id") == Some(behind.as_str())
                    && r.header("event-type") == Some("StockReleased")
            });
            anyhow::ensure!(
                released,
                "no StockReleased caused by the parked OrderCancelled"
            );
            Ok(Some(()))
        })
        .await
        .expect("the parked OrderCancelled is applied after its head");

        // The undecodable record and the one that never became applicable are in the DLQ.
        let dlq = eventually(TIMEOUT, || async {
            let records =
                kafka::read_topic(&stack.broker.bootstrap, "inventory-service.dlq").await?;
            let class_of = |id: &str| {
                records
                    .iter()
                    .find(|r| r.header("message-id") == Some(id))
                    .and_then(|r| r.header("dlq-error-class").map(str::to_owned))
            };
            let found = (class_of(&undecodable), class_of(&not_yet));
            anyhow::ensure!(
                found.0.is_some() && found.1.is_some(),
                "dead letters so far: {found:?}"
            );
            Ok(Some(found))
        })
        .await
        .unwrap();
        assert_eq!(
            dlq,
            (Some("permanent".into()), Some("retryable".into())),
            "dead-letter classes"
        );

        // The backlog was applied in groups: many reservations were created by one transaction
        // (`created_at` is `now()`, the start of the creating transaction, shared by every row that
        // transaction wrote); without group commit every one has its own.
        let inventory_db = stack.inventory_pool().await;
        let (records, largest): (i64, i64) = sqlx::query_as(
            "SELECT sum(n)::bigint, max(n) FROM \
             (SELECT count(*) AS n FROM reservations GROUP BY created_at) AS groups",
        )
        .fetch_one(&inventory_db)
        .await
        .unwrap();
        assert_eq!(records, ids.len() as i64 + 1, "reservations");
        assert!(
            largest >= 10,
            "at most {largest} of {records} OrderPlaced applied in one transaction: no group commit; {}",
            stack.where_logs_are()
        );
    }
}
