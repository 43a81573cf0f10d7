//! The saga deadline: an order stuck in PENDING is cancelled (DEADLINE_EXCEEDED) and its stock
//! released, once, however many checks run at the same time.

use std::time::Duration;

use e2e::{Process, Stack, StackOptions, eventually, kafka};
use futures::future::join_all;
use schemas::Event;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn an_order_stuck_pending_past_its_deadline_is_cancelled_and_its_stock_released() {
        e2e::requires_own_stack("sets a short saga deadline and holds the relay back");
        // No relay at first: the OrderPlaced waits in the outbox, so the order cannot leave PENDING.
        let mut stack = Stack::start_with(
            "deadline",
            StackOptions {
                relay: false,
                saga_deadline: Some("2s".into()),
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, 10).await;
        let id = stack.place_order(&[("A", 4)]).await;
        stack
            .wait_for_statuses(&[id], &["CANCELLING"], TIMEOUT)
            .await;
        let order = stack.order(id).await;
        assert!(
            order["reason"]
                .as_str()
                .unwrap()
                .contains("DEADLINE_EXCEEDED"),
            "{order}"
        );

        // The reservation is still in flight: inventory now sees OrderPlaced, then OrderCancelled.
        stack.start_process(Process::Relay).await;
        stack
            .wait_for_statuses(&[id], &["CANCELLED"], TIMEOUT)
            .await;
        eventually(TIMEOUT, || async {
            Ok((stack.product("A").await["available"] == 10).then_some(()))
        })
        .await
        .expect("stock back");
        stack.assert_stock_conserved(&[("A", 10)]).await;
        let events: Vec<Event> =
            kafka::events_of(&stack.broker.bootstrap, schemas::ORDERS_TOPIC, id).await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            matches!(&events[1], Event::OrderCancelled(c) if c.reason == schemas::CancelReason::DeadlineExceeded)
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_deadline_runners_cancel_each_overdue_order_exactly_once() {
        e2e::requires_own_stack("runs without a relay");
        // Three job runners run here at the same time, as three order-service instances would.
        // The service itself is stopped once the orders are in: its runner (with its deadline of
        // an hour) would find them not due yet and move them an hour later.
        let mut stack = Stack::start_with(
            "deadline_concurrent",
            StackOptions {
                relay: false,
                saga_deadline: Some("60m".into()),
                ..StackOptions::default()
            },
        )
        .await;
        let ids: Vec<Uuid> = (0..60).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            stack.create_order_quietly(*id).await;
        }
        stack.kill(Process::OrderService);
        let pool = stack.orders_pool().await;
        // Their deadline jobs are due now.
        let due = sqlx::query("UPDATE jobs SET run_at = now() WHERE kind = $1")
            .bind(order_service::deadline::Step::Reservation.kind())
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(due, ids.len() as u64, "every order has its deadline job");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (stop, shutdown) = service_kit::shutdown::Shutdown::new();
        let runners: Vec<_> = (0..3)
            .map(|_| {
                let step = order_service::deadline::Step::Reservation;
                let runner = service_kit::jobs::Runner::default().with(
                    step.job_kind(),
                    order_service::deadline::Timeout {
                        step,
                        steps: order_service::transition::Steps {
                            reservation: Duration::from_secs(1),
                            payment: Duration::from_secs(1),
                        },
                    },
                );
                tokio::spawn(runner.run(pool.clone(), shutdown.clone()))
            })
            .collect();
        stack
            .wait_for_statuses(&ids, &["CANCELLING"], TIMEOUT)
            .await;
        stop.fire();
        join_all(runners).await;
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, 0, "every deadline job was completed");
        let per_order: Vec<(String, i64)> = sqlx::query_as(
            "SELECT aggregate_id, count(*) FROM outbox WHERE event_type = 'OrderCancelled' GROUP BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(per_order.len(), ids.len());
        assert!(
            per_order.iter().all(|(_, n)| *n == 1),
            "an order was cancelled twice: {per_order:?}"
        );
    }
}
