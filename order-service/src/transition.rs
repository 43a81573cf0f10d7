//! Applying a decision of the order state machine: the status change in the write and read
//! models and the event it emits, in the caller's transaction. Shared by the consumer (events
//! from inventory) and the HTTP API (cancel).

use std::time::Duration;

use messaging::outbox::{self, Cause};
use schemas::{CancelReason, Event, OrderCancelled, OrderConfirmed, OrderRejected};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, Decision, Emit, Input, InvalidTransition, OrderStatus};
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

/// Decides `input` for the order (whose row the caller locked and found in `status`) and applies
/// the decision. An invalid transition writes nothing.
pub async fn apply(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: OrderStatus,
    input: &Input,
    cause: &Cause,
) -> sqlx::Result<Result<Applied, InvalidTransition>> {
    let (to, emit) = match domain::decide(status, input) {
        Err(invalid) => return Ok(Err(invalid)),
        Ok(Decision::Ignore(why)) => return Ok(Ok(Applied::Ignored(why))),
        Ok(Decision::Transition { to, emit }) => (to, emit),
    };
    let change = match &emit {
        Some(Emit::OrderConfirmed { total_cents }) => Change {
            total_cents: Some(*total_cents),
            reason: None,
        },
        Some(Emit::OrderRejected { reason }) => Change {
            total_cents: None,
            reason: Some(reason.clone()),
        },
        Some(Emit::OrderCancelled { reason }) => Change {
            total_cents: None,
            reason: Some(format!("cancelled: {reason}")),
        },
        None => Change::default(),
    };
    let changed = store::set_status(conn, order_id, to, &change).await?;
    if status == OrderStatus::Pending && to != OrderStatus::Pending {
        crate::deadline::stop(conn, order_id).await?;
    }
    let at = changed.at.timestamp_millis();
    let event = emit.map(|emit| match emit {
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

/// Saga duration buckets in seconds, from 50 ms to 5 minutes: a saga takes a few hundred
/// milliseconds when all is well, and up to the saga deadline (30 s by default) plus the
/// cancellation when it is not.
pub const SAGA_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
];

/// The log line and the metrics of one status change, both written by [`SagaMetrics::record`]
/// after the commit, so that neither tells of a change that was rolled back.
///
/// A saga completes when its order reaches CONFIRMED, REJECTED or CANCELLED (a confirmed order
/// that is cancelled later completes again, as cancelled: the compensation is a second saga run);
/// it fails when inventory rejects it (`stock_unavailable`) or its deadline passes
/// (`deadline_exceeded`); a compensation is counted when a CANCELLING order whose stock inventory
/// had reserved or sold gets it back.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaMetrics {
    order_id: Uuid,
    from: OrderStatus,
    to: OrderStatus,
    outcome: Option<&'static str>,
    failed: Option<&'static str>,
    compensated: bool,
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
            OrderStatus::Pending | OrderStatus::Cancelling => None,
        };
        let failed = match (to, input) {
            (OrderStatus::Rejected, _) => Some("stock_unavailable"),
            (
                OrderStatus::Cancelling,
                Input::CancelRequested {
                    reason: CancelReason::DeadlineExceeded,
                },
            ) => Some("deadline_exceeded"),
            _ => None,
        };
        let compensated = from == OrderStatus::Cancelling
            && matches!(
                input,
                Input::StockReleased {
                    released_stock: true
                }
            );
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
        if self.compensated {
            metrics::counter!("saga_compensations_total").increment(1);
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
        "Sagas that failed, by reason (stock_unavailable, deadline_exceeded)"
    );
    describe_counter!(
        "saga_compensations_total",
        "Cancellations that gave back reserved or sold stock"
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
