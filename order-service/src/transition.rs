//! Applying a decision of the order state machine: the status change in the write and read
//! models and the event it emits, in the caller's transaction. Shared by the consumer (events
//! from inventory) and the HTTP API (cancel).

use messaging::outbox::{self, Cause};
use schemas::{Event, OrderCancelled, OrderConfirmed, OrderRejected};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, Decision, Emit, Input, InvalidTransition, OrderStatus};
use crate::store::{self, Change};

/// What applying an input to an order came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Changed { from: OrderStatus, to: OrderStatus },
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
    let at = store::set_status(conn, order_id, to, &change)
        .await?
        .timestamp_millis();
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
    tracing::info!(%order_id, from = %status, %to, "order status changed");
    metrics::counter!("orders_status_changes_total", "to" => to.as_str()).increment(1);
    Ok(Ok(Applied::Changed { from: status, to }))
}
