//! Applying a decision of the order state machine: the status change in the write and read
//! models, the event it emits and the step timeouts it starts or ends, in the caller's
//! transaction. Shared by the consumer (events from inventory and payments), the HTTP API
//! (cancel) and the step timeouts.

use std::time::Duration;

use messaging::outbox::{self, Cause};
use schemas::{
    CancelReason, Event, OrderAwaitingPayment, OrderCancelled, OrderConfirmed,
    OrderRefundRequested, OrderRejected,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, Decision, Emit, Input, InvalidTransition, Order, OrderStatus};
use crate::store::{self, Change};

/// What applying an input to an order came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The order moved; `saga` is what to log and count once the transaction has committed.
    Changed {
        from: OrderStatus,
        to: OrderStatus,
        saga: SagaMetrics,
    },
    Ignored(&'static str),
}

/// Decides `input` for the order (whose row the caller locked: [`store::lock_order`]) and
/// applies the decision: the status, the event, and the step timeouts that start or end with
/// it. An invalid transition writes nothing.
pub async fn apply(
    conn: &mut PgConnection,
    order_id: Uuid,
    order: &Order,
    input: &Input,
    cause: &Cause,
    steps: &Steps,
) -> sqlx::Result<Result<Applied, InvalidTransition>> {
    let status = order.status;
    let (to, emit) = match domain::decide(order, input) {
        Err(invalid) => return Ok(Err(invalid)),
        Ok(Decision::Ignore(why)) => return Ok(Ok(Applied::Ignored(why))),
        Ok(Decision::Transition { to, emit }) => (to, emit),
    };
    let change = match &emit {
        Some(Emit::OrderAwaitingPayment { amount_cents }) => Change {
            total_cents: Some(*amount_cents),
            ..Change::default()
        },
        Some(Emit::OrderConfirmed { total_cents }) => Change {
            total_cents: Some(*total_cents),
            ..Change::default()
        },
        Some(Emit::OrderRejected { reason }) => Change {
            reason: Some(reason.clone()),
            ..Change::default()
        },
        Some(Emit::OrderRefundRequested { reason, .. }) => Change {
            reason: Some(format!("refunding: {reason}")),
            cancel_reason: Some(*reason),
            ..Change::default()
        },
        Some(Emit::OrderCancelled { reason }) => Change {
            reason: Some(format!("cancelled: {reason}")),
            cancel_reason: Some(*reason),
            ..Change::default()
        },
        None => Change::default(),
    };
    let changed = store::set_status(conn, order_id, to, &change).await?;
    crate::deadline::follow(conn, order_id, status, to, steps).await?;
    let at = changed.at.timestamp_millis();
    let event = emit.map(|emit| match emit {
        Emit::OrderAwaitingPayment { amount_cents } => {
            Event::OrderAwaitingPayment(OrderAwaitingPayment {
                order_id,
                customer_id: changed.customer_id,
                amount_cents,
                pay_by: at
                    .saturating_add(i64::try_from(steps.payment.as_millis()).unwrap_or(i64::MAX)),
                at,
            })
        }
        Emit::OrderConfirmed { total_cents } => Event::OrderConfirmed(OrderConfirmed {
            order_id,
            total_cents,
            confirmed_at: at,
        }),
        Emit::OrderRejected { reason } => Event::OrderRejected(OrderRejected {
            order_id,
            reason,
            rejected_at: at,
        }),
        Emit::OrderRefundRequested {
            amount_cents,
            reason,
        } => Event::OrderRefundRequested(OrderRefundRequested {
            order_id,
            amount_cents,
            reason,
            requested_at: at,
        }),
        Emit::OrderCancelled { reason } => Event::OrderCancelled(OrderCancelled {
            order_id,
            reason,
            cancelled_at: at,
        }),
    });
    if let Some(event) = event {
        outbox::append(conn, &event, cause).await?;
    }
    let saga = SagaMetrics::of(order_id, status, to, input, changed);
    Ok(Ok(Applied::Changed {
        from: status,
        to,
        saga,
    }))
}

/// How long each step of the saga may take (`--reservation-timeout`, `--payment-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    /// An order PENDING this long is cancelled (DEADLINE_EXCEEDED).
    pub reservation: Duration,
    /// An order AWAITING_PAYMENT this long asks for its refund and is cancelled
    /// (PAYMENT_TIMEOUT).
    pub payment: Duration,
}

impl Default for Steps {
    /// The settings' defaults: 30 s each.
    fn default() -> Self {
        Steps {
            reservation: Duration::from_secs(30),
            payment: Duration::from_secs(30),
        }
    }
}

/// Saga duration buckets in seconds, from 50 ms to 5 minutes: a saga takes a few hundred
/// milliseconds when all is well, and up to its steps' timeouts (30 s each by default) plus the
/// compensations when it is not.
pub const SAGA_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
];

/// The log line and the metrics of one status change, both written by [`SagaMetrics::record`]
/// after the commit, so that neither tells of a change that was rolled back.
///
/// A saga completes when its order reaches CONFIRMED, REJECTED or CANCELLED (a confirmed order
/// that is cancelled later completes again, as cancelled: the compensation is a second saga run);
/// it fails when inventory rejects it (`stock_unavailable`), its reservation step times out
/// (`deadline_exceeded`), the processor declines the payment (`payment_declined`) or its payment
/// step times out (`payment_timeout`); a compensation is counted by step: `payment` when a
/// REFUNDING order gets its money back (a refund of more than 0), `inventory` when a CANCELLING
/// order whose stock inventory had reserved or sold gets it back.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaMetrics {
    order_id: Uuid,
    from: OrderStatus,
    to: OrderStatus,
    outcome: Option<&'static str>,
    failed: Option<&'static str>,
    compensated: Option<&'static str>,
    duration: Duration,
}

impl SagaMetrics {
    fn of(
        order_id: Uuid,
        from: OrderStatus,
        to: OrderStatus,
        input: &Input,
        changed: store::Changed,
    ) -> Self {
        let outcome = match to {
            OrderStatus::Confirmed => Some("confirmed"),
            OrderStatus::Rejected => Some("rejected"),
            OrderStatus::Cancelled => Some("cancelled"),
            OrderStatus::Pending
            | OrderStatus::AwaitingPayment
            | OrderStatus::Refunding
            | OrderStatus::Cancelling => None,
        };
        let failed = match (to, input) {
            (OrderStatus::Rejected, _) => Some("stock_unavailable"),
            (_, Input::PaymentDeclined { .. }) => Some("payment_declined"),
            (_, Input::CancelRequested { reason }) => match reason {
                CancelReason::DeadlineExceeded => Some("deadline_exceeded"),
                CancelReason::PaymentTimeout => Some("payment_timeout"),
                _ => None,
            },
            _ => None,
        };
        let compensated = match (from, input) {
            (OrderStatus::Refunding, Input::PaymentRefunded { refunded_cents })
                if *refunded_cents > 0 =>
            {
                Some("payment")
            }
            (
                OrderStatus::Cancelling,
                Input::StockReleased {
                    released_stock: true,
                },
            ) => Some("inventory"),
            _ => None,
        };
        Self {
            order_id,
            from,
            to,
            outcome,
            failed,
            compensated,
            duration: (changed.at - changed.placed_at)
                .to_std()
                .unwrap_or_default(),
        }
    }

    pub fn record(self) {
        tracing::info!(order_id = %self.order_id, from = %self.from, to = %self.to, "order status changed");
        metrics::counter!("orders_status_changes_total", "to" => self.to.as_str()).increment(1);
        if let Some(reason) = self.failed {
            metrics::counter!("saga_failed_total", "reason" => reason).increment(1);
        }
        if let Some(step) = self.compensated {
            metrics::counter!("saga_compensations_total", "step" => step).increment(1);
        }
        if let Some(outcome) = self.outcome {
            metrics::counter!("saga_completed_total", "outcome" => outcome).increment(1);
            metrics::histogram!("saga_duration_seconds", "outcome" => outcome)
                .record(self.duration.as_secs_f64());
        }
    }
}

/// Describes the saga metrics and the status changes.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "saga_started_total",
        "Sagas started: orders accepted by POST /orders"
    );
    describe_counter!(
        "saga_completed_total",
        "Orders reaching a terminal status, by outcome (confirmed, rejected, cancelled)"
    );
    describe_counter!(
        "saga_failed_total",
        "Sagas that failed, by reason (stock_unavailable, deadline_exceeded, payment_declined, payment_timeout)"
    );
    describe_counter!(
        "saga_compensations_total",
        "Compensations done, by step: payment (money refunded), inventory (reserved or sold stock given back)"
    );
    describe_histogram!(
        "saga_duration_seconds",
        Unit::Seconds,
        "Time from an order being placed to a terminal status, by outcome"
    );
    describe_counter!(
        "orders_status_changes_total",
        "Order status changes, by new status"
    );
}
