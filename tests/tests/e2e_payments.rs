//! payment-service among the real processes (broker, relay, the stand-in processor, Postgres):
//! OrderAwaitingPayment and OrderRefundRequested records produced to `orders.v1` as JSON test
//! events (as a user does with kcat), payment-service killed with `kill -9` while it charges and
//! the processor killed while calls are in flight; then every payment is checked against the
//! processor's ledger (one charge per confirmed payment, none for a declined one, refunds in
//! full) and against `payments.v1` (one outcome per order, one refund per refunded order), and
//! the dead-letter topic is empty.
//!
//! The test plays order-service's part (its orders are unknown to order-service, which retries
//! and dead-letters their payment events: that is not what is checked here), so that the
//! payments' own promises are checked apart from the saga's.

use std::collections::HashMap;
use std::time::Duration;

use e2e::kafka;
use e2e::{Process, Stack, StackOptions};
use schemas::Event;
use serde_json::Value;
use uuid::Uuid;

/// Charges above this are declined by the stand-in (its default `--decline-above-cents`).
const LIMIT_CENTS: i64 = 100_000;

async fn produce_json(stack: &Stack, order_id: Uuid, event_type: &str, body: &Value) {
    let key = order_id.to_string();
    let message_id = Uuid::now_v7().to_string();
    kafka::produce(
        &stack.broker.bootstrap,
        schemas::ORDERS_TOPIC,
        None,
        Some(&key),
        &[
            ("message-id", &message_id),
            ("event-type", event_type),
            ("content-type", "application/json"),
            ("correlation-id", &key),
        ],
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
}

async fn awaiting_payment(stack: &Stack, order_id: Uuid, amount_cents: i64) {
    let now = chrono::Utc::now().timestamp_millis();
    let body = serde_json::json!({
        "order_id": order_id, "customer_id": Uuid::now_v7(), "amount_cents": amount_cents,
        "pay_by": now + 30_000, "at": now,
    });
    produce_json(stack, order_id, "OrderAwaitingPayment", &body).await;
}

async fn refund_requested(stack: &Stack, order_id: Uuid, amount_cents: i64) {
    let body = serde_json::json!({
        "order_id": order_id, "amount_cents": amount_cents, "reason": "CUSTOMER_REQUEST",
        "requested_at": chrono::Utc::now().timestamp_millis(),
    });
    produce_json(stack, order_id, "OrderRefundRequested", &body).await;
}

/// The order's payment as payment-service shows it, once its status is one of `statuses`.
async fn payment_in(stack: &Stack, order_id: Uuid, statuses: &[&str]) -> Value {
    let url = format!("{}/payments?order_id={order_id}", stack.payment_url);
    e2e::eventually(Duration::from_secs(120), || async {
        let list = stack.get_json(&url).await;
        let payment = list.get(0).cloned();
        match payment {
            Some(p) if statuses.contains(&p["status"].as_str().unwrap_or_default()) => Ok(Some(p)),
            other => anyhow::bail!("order {order_id}'s payment is not {statuses:?} yet: {other:?}"),
        }
    })
    .await
    .unwrap()
}

async fn set_latency(stack: &Stack, latency_ms: u64) {
    stack
        .set_gateway_faults(serde_json::json!({"mode": "ok", "latency_ms": latency_ms}))
        .await;
}

/// Waits until one order of `batch` has its charge made at the processor and its answer not yet
/// back (REQUESTED at payment-service, a succeeded charge in the ledger); returns that order.
async fn charge_in_flight(stack: &Stack, batch: &[(Uuid, i64)]) -> Uuid {
    e2e::eventually(Duration::from_secs(60), || async {
        for (order_id, _) in batch {
            let url = format!("{}/payments?order_id={order_id}", stack.payment_url);
            let list = stack.get_json(&url).await;
            let Some(payment) = list.get(0) else { continue };
            if payment["status"] == "REQUESTED"
                && stack
                    .ledger_of(payment["payment_id"].as_str().unwrap())
                    .await
                    .1
                    == 1
            {
                return Ok(Some(*order_id));
            }
        }
        Ok(None)
    })
    .await
    .expect("a charge in flight")
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn every_payment_is_charged_once_and_refunded_in_full_through_kills_of_the_service_and_the_processor()
     {
        e2e::requires_own_stack("kills payment-service and the processor");
        let mut stack = Stack::start_with(
            "e2e_payments",
            StackOptions {
                payments: true,
                ..StackOptions::default()
            },
        )
        .await;
        // Thirty orders in three batches, every fifth above the decline limit.
        let orders: Vec<(Uuid, i64)> = (0..30)
            .map(|i| {
                let amount = if i % 5 == 4 { LIMIT_CENTS + 1 } else { 100 + i };
                (Uuid::now_v7(), amount)
            })
            .collect();
        // The processor answers 2 s after it charged, so that kills land while charges are in
        // flight: payment-service dies with a charge made and its answer lost (it is sent again
        // with the same key once the job's lease runs out), then the processor dies with a
        // charge made and the connection cut.
        let mut in_flight_at_kill = Vec::new();
        for (batch, fault) in
            orders
                .chunks(10)
                .zip([Some(Process::PaymentService), Some(Process::Gateway), None])
        {
            set_latency(&stack, if fault.is_some() { 2_000 } else { 0 }).await;
            for (order_id, amount) in batch {
                awaiting_payment(&stack, *order_id, *amount).await;
            }
            if let Some(process) = fault {
                in_flight_at_kill.push(charge_in_flight(&stack, batch).await);
                stack.restart(process, Duration::from_secs(1)).await;
            }
        }
        let mut payments = HashMap::new();
        for (order_id, amount) in &orders {
            let payment = payment_in(&stack, *order_id, &["CONFIRMED", "DECLINED"]).await;
            let payment_id = payment["payment_id"].as_str().unwrap().to_owned();
            let (net, charges) = stack.ledger_of(&payment_id).await;
            if *amount > LIMIT_CENTS {
                assert_eq!(payment["status"], "DECLINED", "{payment}");
                assert_eq!(payment["decline_code"], "over_limit");
                assert_eq!((net, charges), (0, 0), "nothing charged for {payment}");
            } else {
                assert_eq!(payment["status"], "CONFIRMED", "{payment}");
                assert_eq!(
                    (net, charges),
                    (*amount, 1),
                    "one charge of the amount for {payment}"
                );
            }
            payments.insert(*order_id, payment_id);
        }
        // A charge whose answer was lost was sent again and made once.
        for order_id in &in_flight_at_kill {
            let payment = payment_in(&stack, *order_id, &["CONFIRMED"]).await;
            assert!(
                payment["attempts"].as_i64() >= Some(2),
                "sent again: {payment}"
            );
        }
        // The first ten confirmed orders ask for their money back; one asks twice.
        let refunded: Vec<(Uuid, i64)> = orders
            .iter()
            .filter(|(_, amount)| *amount <= LIMIT_CENTS)
            .take(10)
            .copied()
            .collect();
        for (order_id, amount) in &refunded {
            refund_requested(&stack, *order_id, *amount).await;
        }
        refund_requested(&stack, refunded[0].0, refunded[0].1).await;
        for (order_id, amount) in &refunded {
            let payment = payment_in(&stack, *order_id, &["REFUNDED"]).await;
            assert_eq!(payment["refunded_cents"].as_i64(), Some(*amount));
            assert_eq!(stack.ledger_of(&payments[order_id]).await, (0, 1));
        }
        // payments.v1: one outcome per order, one refund per refunded order (distinct message
        // ids: the relay may publish a row twice, never two rows for one outcome).
        let records = kafka::read_topic(&stack.broker.bootstrap, schemas::PAYMENTS_TOPIC)
            .await
            .unwrap();
        let mut seen: HashMap<(Uuid, &'static str), std::collections::HashSet<String>> =
            HashMap::new();
        for record in &records {
            let event = record
                .event()
                .expect("payments.v1 holds events of the contract");
            let message_id = record.header("message-id").unwrap().to_owned();
            seen.entry((event.order_id(), event.event_type()))
                .or_default()
                .insert(message_id);
            if let Event::PaymentRefunded(r) = &event {
                let amount = refunded.iter().find(|(o, _)| *o == r.order_id).unwrap().1;
                assert_eq!(r.refunded_cents, amount);
            }
        }
        for (order_id, amount) in &orders {
            let outcome = if *amount > LIMIT_CENTS {
                "PaymentDeclined"
            } else {
                "PaymentConfirmed"
            };
            assert_eq!(
                seen.get(&(*order_id, outcome)).map(|ids| ids.len()),
                Some(1),
                "one {outcome} for order {order_id}"
            );
            let refunds = seen
                .get(&(*order_id, "PaymentRefunded"))
                .map_or(0, |ids| ids.len());
            let asked = refunded.iter().any(|(o, _)| o == order_id);
            assert_eq!(refunds, usize::from(asked), "refunds of order {order_id}");
        }
        let dead = kafka::read_topic(&stack.broker.bootstrap, "payment-service.dlq")
            .await
            .unwrap();
        assert!(dead.is_empty(), "dead letters: {dead:?}");
        assert!(stack.exited().is_empty(), "exited: {:?}", stack.exited());
    }
}
