//! Cancellation by the customer and the compensating release of stock.

use std::time::Duration;

use e2e::{Process, Stack, eventually, kafka};
use reqwest::StatusCode;
use schemas::Event;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);
/// After a crash, Tansu can take a session timeout and a rejoin (about 20 s) to give the restarted
/// consumer its partitions back; on a loaded machine, more.
const AFTER_RESTART: Duration = Duration::from_secs(120);

/// The types of order `id`'s events on `topic`, in order. A record keyed by the order that does
/// not decode fails the test (other tests' records on a shared stack are not looked at).
async fn events_of(stack: &Stack, topic: &str, id: Uuid) -> Vec<&'static str> {
    kafka::events_of(&stack.broker.bootstrap, topic, id)
        .await
        .iter()
        .map(|e| e.event_type())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_confirmed_order_refunds_it_then_returns_its_sold_stock_once_even_if_cancelled_twice()
 {
    let stack = Stack::start("cancel_confirmed").await;
    stack.put_product("A", 100, 10).await;
    let id = stack.place_order(&[("A", 3)]).await;
    stack
        .wait_for_statuses(&[id], &["CONFIRMED"], TIMEOUT)
        .await;
    eventually(TIMEOUT, || async {
        Ok((stack.product("A").await["sold"] == 3).then_some(()))
    })
    .await
    .expect("stock sold");

    let (status, body) = stack.cancel(id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["status"], "REFUNDING", "the money back first");
    let (again, body) = stack.cancel(id).await;
    assert_eq!(again, StatusCode::OK, "a second cancel changes nothing");
    assert!(["REFUNDING", "CANCELLING", "CANCELLED"].contains(&body["status"].as_str().unwrap()));

    stack
        .wait_for_statuses(&[id], &["CANCELLED"], TIMEOUT)
        .await;
    let order = stack.order(id).await;
    assert_eq!(
        e2e::status_history(&order),
        [
            "PENDING",
            "AWAITING_PAYMENT",
            "CONFIRMED",
            "REFUNDING",
            "CANCELLING",
            "CANCELLED"
        ]
    );
    // Refunded in full, once.
    let payment = stack.payment_of(id).await;
    assert_eq!(
        (
            payment["status"].as_str(),
            payment["refunded_cents"].as_i64()
        ),
        (Some("REFUNDED"), Some(300)),
        "{payment}"
    );
    let a = stack.product("A").await;
    assert_eq!(
        (
            a["available"].as_i64(),
            a["reserved"].as_i64(),
            a["sold"].as_i64()
        ),
        (Some(10), Some(0), Some(0)),
        "{a}"
    );
    let reservations = stack
        .get_json(&format!(
            "{}/reservations?order_id={id}",
            stack.inventory_url
        ))
        .await;
    assert_eq!(reservations[0]["status"], "RELEASED");
    assert_eq!(
        events_of(&stack, schemas::ORDERS_TOPIC, id).await,
        [
            "OrderPlaced",
            "OrderAwaitingPayment",
            "OrderConfirmed",
            "OrderRefundRequested",
            "OrderCancelled"
        ]
    );
    assert_eq!(
        events_of(&stack, schemas::INVENTORY_TOPIC, id).await,
        ["StockReserved", "StockReleased"]
    );
    assert_eq!(
        events_of(&stack, schemas::PAYMENTS_TOPIC, id).await,
        ["PaymentConfirmed", "PaymentRefunded"]
    );
    // The compensations ran in reverse order, each caused by the one before:
    // OrderRefundRequested → PaymentRefunded → OrderCancelled → StockReleased.
    let chain = [
        (schemas::ORDERS_TOPIC, "OrderRefundRequested"),
        (schemas::PAYMENTS_TOPIC, "PaymentRefunded"),
        (schemas::ORDERS_TOPIC, "OrderCancelled"),
        (schemas::INVENTORY_TOPIC, "StockReleased"),
    ];
    let mut cause: Option<String> = None;
    for (topic, event_type) in chain {
        let records = kafka::read_topic(&stack.broker.bootstrap, topic)
            .await
            .unwrap();
        let record = records
            .iter()
            .find(|r| {
                r.key_str() == Some(id.to_string().as_str())
                    && r.header("event-type") == Some(event_type)
            })
            .unwrap_or_else(|| panic!("no {event_type} of order {id} on {topic}"));
        if let Some(cause) = &cause {
            assert_eq!(
                record.header("causation-id"),
                Some(cause.as_str()),
                "{event_type} is caused by the step before it"
            );
        }
        cause = record.header("message-id").map(str::to_owned);
    }
    let (after, _) = stack.cancel(id).await;
    assert_eq!(after, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_order_cannot_be_cancelled_and_an_unknown_one_is_not_found() {
    let stack = Stack::start("cancel_rejected").await;
    let id = stack.place_order(&[("NOPE", 1)]).await;
    stack.wait_for_statuses(&[id], &["REJECTED"], TIMEOUT).await;
    let (status, body) = stack.cancel(id).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["detail"].as_str().unwrap().contains("REJECTED"),
        "{body}"
    );
    assert_eq!(stack.order(id).await["status"], "REJECTED");
    let (status, _) = stack.cancel(Uuid::new_v4()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        !events_of(&stack, schemas::ORDERS_TOPIC, id)
            .await
            .contains(&"OrderCancelled")
    );
}

/// Produces `event` to its topic as Avro, as the relay would.
async fn send(stack: &Stack, event: Event) {
    let key = event.order_id().to_string();
    let message_id = Uuid::new_v4().to_string();
    kafka::produce(
        &stack.broker.bootstrap,
        event.topic(),
        None,
        Some(&key),
        &[
            ("message-id", &message_id),
            ("event-type", event.event_type()),
            ("content-type", schemas::AVRO_CONTENT_TYPE),
            ("correlation-id", &key),
        ],
        &schemas::encode(&event),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_placed_after_inventory_saw_its_cancellation_reserves_nothing() {
    let stack = Stack::start("cancel_before_placed").await;
    stack.put_product("A", 100, 5).await;
    // Inventory sees the cancellation of an order first (as when its OrderPlaced was delayed in
    // a dead-letter topic), then the OrderPlaced.
    let id = Uuid::new_v4();
    send(
        &stack,
        Event::OrderCancelled(schemas::OrderCancelled {
            order_id: id,
            reason: schemas::CancelReason::CustomerRequest,
            cancelled_at: 1,
        }),
    )
    .await;
    send(
        &stack,
        Event::OrderPlaced(schemas::OrderPlaced {
            order_id: id,
            customer_id: Uuid::new_v4(),
            items: vec![schemas::OrderItem {
                sku: stack.sku("A"),
                quantity: 2,
            }],
            placed_at: 2,
        }),
    )
    .await;
    let answered = eventually(TIMEOUT, || async {
        let events = events_of(&stack, schemas::INVENTORY_TOPIC, id).await;
        Ok((events.len() >= 2).then_some(events))
    })
    .await
    .unwrap();
    assert_eq!(answered, ["StockReleased", "StockReservationRejected"]);
    assert_eq!(stack.product("A").await["available"], 5);
    stack.assert_stock_conserved(&[("A", 5)]).await;
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_reservation_that_arrives_after_the_order_went_cancelling_is_released() {
        e2e::requires_own_stack("holds the relay back until the order is cancelling");
        // No relay yet: the customer cancels while the OrderPlaced has not reached inventory.
        let mut stack = e2e::Stack::start_with(
            "reserved_after_cancelling",
            e2e::StackOptions {
                relay: false,
                ..e2e::StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, 10).await;
        let id = stack.place_order(&[("A", 2)]).await;
        let (status, _) = stack.cancel(id).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        // Inventory reserves (StockReserved reaches a CANCELLING order and is ignored), then
        // releases on OrderCancelled; the order ends CANCELLED.
        stack.start_process(Process::Relay).await;
        stack
            .wait_for_statuses(&[id], &["CANCELLED"], TIMEOUT)
            .await;
        assert_eq!(
            events_of(&stack, schemas::INVENTORY_TOPIC, id).await,
            ["StockReserved", "StockReleased"]
        );
        assert_eq!(
            e2e::status_history(&stack.order(id).await),
            ["PENDING", "CANCELLING", "CANCELLED"]
        );
        eventually(TIMEOUT, || async {
            Ok((stack.product("A").await["available"] == 10).then_some(()))
        })
        .await
        .expect("stock back");
        stack.assert_stock_conserved(&[("A", 10)]).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn cancels_made_while_inventory_is_down_are_applied_after_it_restarts() {
        e2e::requires_own_stack("kills inventory-service and starts it again");
        let mut stack = Stack::start("cancel_inventory_down").await;
        stack.put_product("A", 100, 10).await;
        let confirmed = stack.place_order(&[("A", 2)]).await;
        stack
            .wait_for_statuses(&[confirmed], &["CONFIRMED"], TIMEOUT)
            .await;
        eventually(TIMEOUT, || async {
            Ok((stack.product("A").await["sold"] == 2).then_some(()))
        })
        .await
        .expect("stock sold");

        // Inventory crashes (no graceful shutdown, it does not leave its consumer group). Meanwhile
        // four orders arrive and three orders are cancelled: the confirmed one and two of the new ones.
        stack.kill(Process::InventoryService);
        let mut placed = Vec::new();
        for _ in 0..4 {
            placed.push(stack.place_order(&[("A", 1)]).await);
        }
        for id in [confirmed, placed[0], placed[1]] {
            assert_eq!(stack.cancel(id).await.0, StatusCode::ACCEPTED);
        }
        stack.start_process(Process::InventoryService).await;

        let cancelled = [confirmed, placed[0], placed[1]];
        stack
            .wait_for_statuses(&cancelled, &["CANCELLED"], AFTER_RESTART)
            .await;
        stack
            .wait_for_statuses(&placed[2..], &["CONFIRMED"], TIMEOUT)
            .await;
        eventually(TIMEOUT, || async {
            let a = stack.product("A").await;
            Ok((a["sold"] == 2 && a["reserved"] == 0).then_some(()))
        })
        .await
        .expect("stock settles: the two new confirmed orders sold, the cancelled one returned");
        assert_eq!(stack.product("A").await["available"], 8);
        stack.assert_stock_conserved(&[("A", 10)]).await;
        for id in cancelled {
            let released = events_of(&stack, schemas::INVENTORY_TOPIC, id)
                .await
                .into_iter()
                .filter(|e| *e == "StockReleased")
                .count();
            assert_eq!(released, 1, "StockReleased for {id}");
        }
    }

    /// An order left CANCELLING (inventory never answers: here it is not running) is covered by no
    /// deadline; `orders_in_flight` and `orders_in_flight_oldest_age_seconds` show it, and the
    /// OrdersStuckInFlight alert reads them.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_order_stuck_cancelling_shows_in_the_in_flight_gauges() {
        e2e::requires_own_stack("runs without inventory-service");
        let stack = Stack::start_with(
            "cancel_stuck_visible",
            e2e::StackOptions {
                inventory: false,
                ..e2e::StackOptions::default()
            },
        )
        .await;
        let id = stack.place_order(&[("A", 1)]).await;
        let (status, _) = stack.cancel(id).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let url = stack.order_url.clone();
        eventually(TIMEOUT, || async {
            let cancelling = stack
                .metric(&url, "orders_in_flight", &[("status", "CANCELLING")])
                .await;
            let age = stack
                .metric(
                    &url,
                    "orders_in_flight_oldest_age_seconds",
                    &[("status", "CANCELLING")],
                )
                .await;
            let pending = stack
                .metric(&url, "orders_in_flight", &[("status", "PENDING")])
                .await;
            Ok((cancelling == 1.0 && age > 0.0 && pending == 0.0).then_some(()))
        })
        .await
        .expect("one CANCELLING order, none PENDING, with its age");
    }
}
