//! The order service's reaction to inventory and payment events: StockReserved asks for the
//! payment, StockReservationRejected rejects the order, PaymentConfirmed confirms it,
//! PaymentDeclined cancels it, PaymentRefunded lets a cancellation go on to the stock, and
//! StockReleased finishes it. Each runs in the consumer runtime's transaction (inbox claim +
//! order change + outbox row), as the state machine ([`crate::domain`]) decides.

use messaging::consumer::{AfterCommit, Handler};
use messaging::{Envelope, HandlerError};
use schemas::Event;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::Input;
use crate::store;
use crate::transition::{self, Applied, Steps};

pub const GROUP: &str = schemas::ORDER_SERVICE;

/// The topics order-service consumes.
pub const TOPICS: &[&str] = &[schemas::INVENTORY_TOPIC, schemas::PAYMENTS_TOPIC];

pub struct SagaEvents {
    pub steps: Steps,
}

impl Handler for SagaEvents {
    fn handles(&self, event: &Event) -> bool {
        event.read_by().contains(&GROUP)
    }

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
            Event::PaymentConfirmed(e) => (
                e.order_id,
                Input::PaymentConfirmed {
                    amount_cents: e.amount_cents,
                },
            ),
            Event::PaymentDeclined(e) => (
                e.order_id,
                Input::PaymentDeclined {
                    reason: e.reason.clone(),
                },
            ),
            Event::PaymentRefunded(e) => (
                e.order_id,
                Input::PaymentRefunded {
                    refunded_cents: e.refunded_cents,
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
        apply(conn, order_id, input, envelope, &self.steps).await
    }
}

async fn apply(
    conn: &mut PgConnection,
    order_id: Uuid,
    input: Input,
    envelope: &Envelope,
    steps: &Steps,
) -> Result<AfterCommit, HandlerError> {
    let Some((order, _)) = store::lock_order(conn, order_id).await? else {
        // Not yet: the retry topics give it time; after the last retry it is dead-lettered.
        return Err(HandlerError::Retryable(format!(
            "{} for unknown order {order_id}",
            envelope.event.event_type()
        )));
    };
    match transition::apply(conn, order_id, &order, &input, &envelope.cause(), steps).await? {
        Ok(Applied::Changed { saga, .. }) => Ok(AfterCommit::none().then(|| saga.record())),
        Ok(Applied::Ignored(why)) => {
            tracing::info!(%order_id, status = %order.status, event_type = envelope.event.event_type(), why, "event ignored");
            Ok(AfterCommit::none())
        }
        Err(invalid) => Err(HandlerError::Permanent(invalid.to_string())),
    }
}
