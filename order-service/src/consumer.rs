//! The order service's reaction to inventory events: StockReserved confirms an order,
//! StockReservationRejected rejects it, StockReleased finishes a cancellation. Each runs in the
//! consumer runtime's transaction (inbox claim + order change + outbox row).

use messaging::consumer::Handler;
use messaging::outbox;
use messaging::{Envelope, HandlerError};
use schemas::{Event, OrderCancelled, OrderConfirmed, OrderRejected};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, Decision, Emit, Input};
use crate::store::{self, Change};

pub const GROUP: &str = "order-service";

pub struct InventoryEvents;

impl Handler for InventoryEvents {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<(), HandlerError> {
        let (order_id, input) = match &envelope.event {
            Event::StockReserved(e) => (
                e.order_id,
                Input::StockReserved {
                    total_cents: e.total_cents,
                },
            ),
            Event::StockReservationRejected(e) => (
                e.order_id,
                Input::StockRejected {
                    reason: e.reason.clone(),
                },
            ),
            Event::StockReleased(e) => (e.order_id, Input::StockReleased),
            other => {
                tracing::debug!(
                    event_type = other.event_type(),
                    "not for the order service; ignored"
                );
                return Ok(());
            }
        };
        apply(conn, order_id, input, envelope).await
    }
}

async fn apply(
    conn: &mut PgConnection,
    order_id: Uuid,
    input: Input,
    envelope: &Envelope,
) -> Result<(), HandlerError> {
    let Some(status) = store::lock_status(conn, order_id).await? else {
        // Not yet: the retry topics give it time; after the last retry it is dead-lettered.
        return Err(HandlerError::Retryable(format!(
            "{} for unknown order {order_id}",
            envelope.event.event_type()
        )));
    };
    let decision =
        domain::decide(status, &input).map_err(|e| HandlerError::Permanent(e.to_string()))?;
    let (to, emit) = match decision {
        Decision::Ignore(why) => {
            tracing::info!(%order_id, %status, event_type = envelope.event.event_type(), why, "event ignored");
            return Ok(());
        }
        Decision::Transition { to, emit } => (to, emit),
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
        _ => Change::default(),
    };
    let at = store::set_status(conn, order_id, to, &change).await?;
    let at = at.timestamp_millis();
    let event = match emit {
        Some(Emit::OrderConfirmed { total_cents }) => Some(Event::OrderConfirmed(OrderConfirmed {
            order_id,
            total_cents,
            confirmed_at: at,
        })),
        Some(Emit::OrderRejected { reason }) => Some(Event::OrderRejected(OrderRejected {
            order_id,
            reason,
            rejected_at: at,
        })),
        Some(Emit::OrderCancelled { reason }) => Some(Event::OrderCancelled(OrderCancelled {
            order_id,
            reason,
            cancelled_at: at,
        })),
        None => None,
    };
    if let Some(event) = event {
        outbox::append(conn, &event, &envelope.cause()).await?;
    }
    tracing::info!(%order_id, from = %status, to = %to, "order status changed");
    metrics::counter!("orders_status_changes_total", "to" => to.as_str()).increment(1);
    Ok(())
}
