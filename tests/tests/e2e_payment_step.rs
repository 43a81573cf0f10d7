//! The payment step inside the whole saga (order-service, inventory-service, payment-service,
//! the stand-in processor, the relay, a real broker and Postgres): a processor that hangs while
//! orders wait for their payment, and a charge that lands after its order asked for the money
//! back. Each test checks every order's status and reason, the stock, the processor's ledger
//! (every cent), and the events on the topics.

use std::time::Duration;

use e2e::kafka::{self, Outgoing};
use e2e::{Stack, StackOptions, eventually};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    /// The processor hangs: charges get no answer, the breaker opens, the orders wait in
    /// AWAITING_PAYMENT. Their payment step times out: each asks for its refund (REFUNDING),
    /// payment-service finds in the processor's ledger that nothing was charged and voids the
    /// payment (PaymentRefunded of 0), and the order is cancelled (PAYMENT_TIMEOUT) with its stock
    /// back. After the processor recovers, nothing is charged for them, ever.
    #[tokio::test(flavor = "multi_thread")]
    async fn orders_waiting_on_a_hanging_processor_time_out_refunded_with_no_late_charge() {
        e2e::requires_own_stack(
            "hangs the processor and starts order-service with a short payment timeout",
        );
        let stack = Stack::start_with(
            "payment_step_hang",
            StackOptions {
                payment_timeout: Some("3s".into()),
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 250, 100).await;
        stack
            .set_gateway_faults(serde_json::json!({"mode": "hang"}))
            .await;
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(stack.place_order(&[("A", 2)]).await);
        }
        stack.wait_for_statuses(&ids, &["CANCELLED"], TIMEOUT).await;
        stack
            .set_gateway_faults(serde_json::json!({"mode": "ok"}))
            .await;
        // Every payment job ends (a charge job still queued looks again, sees the refund asked
        // for, and sends nothing): once none is left, nothing can charge these orders any more.
        let payments = stack.payments_pool().await;
        eventually(TIMEOUT, || async {
            let queued: i64 =
                sqlx::query_scalar("SELECT count(*) FROM jobs WHERE failed_at IS NULL")
                    .fetch_one(&payments)
                    .await?;
            Ok((queued == 0).then_some(()))
        })
        .await
        .expect("every payment job ends");
        for id in &ids {
            let order = stack.order(*id).await;
            assert_eq!(
                e2e::status_history(&order),
                [
                    "PENDING",
                    "AWAITING_PAYMENT",
                    "REFUNDING",
                    "CANCELLING",
                    "CANCELLED"
                ],
                "{order}"
            );
            assert!(
                order["reason"]
                    .as_str()
                    .unwrap()
                    .contains("PAYMENT_TIMEOUT"),
                "{order}"
            );
            let payment = stack.payment_of(*id).await;
            assert_eq!(payment["status"], "VOIDED", "{payment}");
            assert_eq!(
                stack
                    .ledger_of(payment["payment_id"].as_str().unwrap())
                    .await,
                (0, 0),
                "nothing charged for {payment}"
            );
        }
        let a = stack.product("A").await;
        assert_eq!(
            (
                a["available"].as_i64(),
                a["reserved"].as_i64(),
                a["sold"].as_i64()
            ),
            (Some(100), Some(0), Some(0)),
            "{a}"
        );
        let breaker_opened = stack
            .metric(
                &stack.payment_url,
                "circuit_breaker_transitions_total",
                &[("breaker", "payment-gateway"), ("to", "open")],
            )
            .await;
        assert!(breaker_opened >= 1.0, "the breaker opened during the hang");
        let (code, report, stderr) = stack.audit("0s", &[]);
        assert_eq!(code, 0, "saga audit: {report} {stderr}");
    }

    /// The processor charges, but answers late: the order's payment step times out first and
    /// asks for the refund; the PaymentConfirmed that comes afterwards, in REFUNDING, changes
    /// nothing, and the charge is refunded in full before the stock is released. Copies of the
    /// order's OrderAwaitingPayment and of the PaymentConfirmed, produced again, charge nothing
    /// more.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_charge_that_lands_after_the_refund_was_asked_for_is_refunded_in_full() {
        e2e::requires_own_stack(
            "slows the processor and starts order-service with a short payment timeout",
        );
        let stack = Stack::start_with(
            "payment_step_late",
            StackOptions {
                payment_timeout: Some("1500ms".into()),
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 700, 10).await;
        // Answered 3 s after the charge is recorded, within payment-service's 5 s timeout.
        stack
            .set_gateway_faults(serde_json::json!({"mode": "ok", "latency_ms": 3000}))
            .await;
        let id = stack.place_order(&[("A", 1)]).await;
        stack
            .wait_for_statuses(&[id], &["CANCELLED"], TIMEOUT)
            .await;
        let order = stack.order(id).await;
        assert_eq!(
            e2e::status_history(&order),
            [
                "PENDING",
                "AWAITING_PAYMENT",
                "REFUNDING",
                "CANCELLING",
                "CANCELLED"
            ],
            "{order}"
        );
        let payment = stack.payment_of(id).await;
        assert_eq!(
            (
                payment["status"].as_str(),
                payment["refunded_cents"].as_i64()
            ),
            (Some("REFUNDED"), Some(700)),
            "{payment}"
        );
        let payment_id = payment["payment_id"].as_str().unwrap().to_owned();
        assert_eq!(
            stack.ledger_of(&payment_id).await,
            (0, 1),
            "charged once, refunded in full"
        );
        assert_eq!(
            kafka::events_of(&stack.broker.bootstrap, schemas::PAYMENTS_TOPIC, id)
                .await
                .iter()
                .map(|e| e.event_type())
                .collect::<Vec<_>>(),
            ["PaymentConfirmed", "PaymentRefunded"]
        );

        // Redelivered copies (the same message ids) of what asked for and reported the charge.
        stack
            .set_gateway_faults(serde_json::json!({"mode": "ok"}))
            .await;
        let key = id.to_string();
        let mut copies = Vec::new();
        for (topic, event_type) in [
            (schemas::ORDERS_TOPIC, "OrderAwaitingPayment"),
            (schemas::ORDERS_TOPIC, "OrderRefundRequested"),
            (schemas::PAYMENTS_TOPIC, "PaymentConfirmed"),
        ] {
            let records = kafka::read_topic(&stack.broker.bootstrap, topic)
                .await
                .unwrap();
            let record = records
                .iter()
                .find(|r| {
                    r.key_str() == Some(key.as_str()) && r.header("event-type") == Some(event_type)
                })
                .unwrap_or_else(|| panic!("no {event_type} of {id}"));
            copies.push(Outgoing::copy_of(record));
        }
        kafka::produce_many(&stack.broker.bootstrap, &copies)
            .await
            .unwrap();
        let duplicates = |group: &'static str, url: String| {
            let stack = &stack;
            async move {
                stack
                    .metric(
                        &url,
                        "consumer_messages_duplicate_total",
                        &[("group", group)],
                    )
                    .await
            }
        };
        eventually(TIMEOUT, || async {
            let payments = duplicates("payment-service", stack.payment_url.clone()).await;
            let orders = duplicates("order-service", stack.order_url.clone()).await;
            Ok((payments >= 2.0 && orders >= 1.0).then_some(()))
        })
        .await
        .expect("the copies are skipped as duplicates");
        assert_eq!(
            stack.ledger_of(&payment_id).await,
            (0, 1),
            "no second charge or refund"
        );
        assert_eq!(stack.order(id).await["status"], "CANCELLED");
        let a = stack.product("A").await;
        assert_eq!(
            (a["available"].as_i64(), a["sold"].as_i64()),
            (Some(10), Some(0)),
            "{a}"
        );
    }
}
