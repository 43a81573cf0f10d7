//! The order service's reaction to inventory events: StockReserved confirms an order,
//! StockReservationRejected rejects it, StockReleased finishes a cancellation. Each runs in the
//! consumer runtime's transaction (inbox claim + order change + outbox row).

use messaging::consumer::{AfterCommit, Handler};
use messaging::{Envelope, HandlerError};
use schemas::Event;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::Input;
use crate::store;
use crate::transition::{self, Applied};

pub const GROUP: &str = "order-service";

pub struct InventoryEvents;

impl Handler for InventoryEvents {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<AfterCommit, HandlerError> {
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
            Event::StockReleased(e) => (
                e.order_id,
                Input::StockReleased {
                    released_stock: !e.reservation_id.is_nil(),
                },
            ),
            other => {
                tracing::debug!(
                    event_type = other.event_type(),
                    "not for the order service; ignored"
                );
                return Ok(AfterCommit::none());
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
) -> Result<AfterCommit, HandlerError> {
    let Some(status) = store::lock_status(conn, order_id).await? else {
        // Not yet: the retry topics give it time; after the last retry it is dead-lettered.
        return Err(HandlerError::Retryable(format!(
            "{} for unknown order {order_id}",
            envelope.event.event_type()
        )));
    };
    match transition::apply(conn, order_id, status, &input, &envelope.cause()).await? {
        Ok(Applied::Changed { saga, .. }) => Ok(AfterCommit::none().then(|| saga.record())),
        Ok(Applied::Ignored(why)) => {
            tracing::info!(%order_id, %status, event_type = envelope.event.event_type(), why, "event ignored");
            Ok(AfterCommit::none())
        }
        Err(invalid) => Err(HandlerError::Permanent(invalid.to_string())),
    }
}
