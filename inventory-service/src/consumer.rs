//! The inventory service's reaction to order events, as [`domain::react`] decides it: OrderPlaced
//! reserves every line or none and answers StockReserved or StockReservationRejected;
//! OrderConfirmed sells the reserved stock; OrderCancelled releases it and answers StockReleased.
//! Each runs in the consumer runtime's transaction (inbox claim + stock change + outbox row).

use messaging::consumer::{AfterCommit, Handler};
use messaging::outbox;
use messaging::{Envelope, HandlerError};
use schemas::{
    Event, OrderCancelled, OrderPlaced, ReservedLine, Shortage, StockReleased,
    StockReservationRejected, StockReserved,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{
    self, OrderEvent, OrderState, Reaction, ReservationDecision, ReservationStatus, ReserveDecision,
};
use crate::store;

pub const GROUP: &str = schemas::INVENTORY_SERVICE;

pub struct OrderEvents;

impl Handler for OrderEvents {
    fn handles(&self, event: &Event) -> bool {
        event.read_by().contains(&GROUP)
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<AfterCommit, HandlerError> {
        let (order_id, event) = match &envelope.event {
            Event::OrderPlaced(e) => (e.order_id, OrderEvent::Placed),
            Event::OrderConfirmed(e) => (e.order_id, OrderEvent::Confirmed),
            Event::OrderCancelled(e) => (e.order_id, OrderEvent::Cancelled),
            // `domain::react` ignores an OrderRejected whatever the order's state (its table test
            // says so), so the state is not even read for one.
            other => {
                tracing::debug!(event_type = other.event_type(), order_id = %other.order_id(), "nothing for inventory to do");
                return Ok(AfterCommit::none());
            }
        };
        // The reservation is locked until the transaction ends: the order's events never race.
        let reservation = store::lock_reservation(conn, order_id).await?;
        let state = match &reservation {
            Some(r) => {
                let status: ReservationStatus =
                    r.status.parse().map_err(HandlerError::Permanent)?;
                OrderState::Reserved(status)
            }
            None => OrderState::Unreserved {
                cancelled: store::is_cancelled(conn, order_id).await?,
            },
        };
        let reaction =
            domain::react(state, event).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        match (reaction, &envelope.event) {
            (Reaction::Reserve, Event::OrderPlaced(placed)) => {
                reserve(conn, placed, envelope).await
            }
            (Reaction::RejectCancelled, _) => {
                tracing::info!(%order_id, "order was cancelled before its OrderPlaced arrived; nothing reserved");
                let event = Event::StockReservationRejected(StockReservationRejected {
                    order_id,
                    reason: "order was cancelled before stock was reserved".to_owned(),
                    shortages: Vec::new(),
                    rejected_at: now_millis(),
                });
                outbox::append(conn, &event, &envelope.cause()).await?;
                Ok(AfterCommit::none())
            }
            (Reaction::NotYet, _) => {
                // Not yet: the retry topics give the reservation time to appear.
                Err(HandlerError::Retryable(format!(
                    "no reservation for order {order_id} to commit"
                )))
            }
            (Reaction::Move(decision), _) => {
                if let Some(reservation) = &reservation {
                    move_reservation(conn, reservation, decision).await?;
                }
                Ok(AfterCommit::none())
            }
            (Reaction::Release(decision), Event::OrderCancelled(cancelled)) => {
                release(conn, cancelled, reservation.as_ref(), decision, envelope).await
            }
            (Reaction::Ignore(why), _) => {
                tracing::info!(%order_id, event_type = envelope.event.event_type(), ?state, why,
                    "nothing to change");
                Ok(AfterCommit::none())
            }
            (reaction, event) => Err(HandlerError::Permanent(format!(
                "{reaction:?} does not go with {}",
                event.event_type()
            ))),
        }
    }
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn reserve(
    conn: &mut PgConnection,
    placed: &OrderPlaced,
    envelope: &Envelope,
) -> Result<AfterCommit, HandlerError> {
    let order_id = placed.order_id;
    let items: Vec<(String, i64)> = placed
        .items
        .iter()
        .map(|i| (i.sku.clone(), i.quantity))
        .collect();
    let mut skus: Vec<String> = items.iter().map(|(sku, _)| sku.clone()).collect();
    skus.sort();
    skus.dedup();
    let stock = store::lock_stock(conn, &skus).await?;
    let (event, outcome) = match domain::reserve(&items, &stock) {
        ReserveDecision::Reserve { lines, total_cents } => {
            let reservation_id =
                store::insert_reservation(conn, order_id, &lines, total_cents).await?;
            tracing::info!(%order_id, %reservation_id, total_cents, "stock reserved");
            let event = Event::StockReserved(StockReserved {
                order_id,
                reservation_id,
                lines: lines
                    .into_iter()
                    .map(|l| ReservedLine {
                        sku: l.sku,
                        quantity: l.quantity,
                        unit_price_cents: l.unit_price_cents,
                    })
                    .collect(),
                total_cents,
                reserved_at: now_millis(),
            });
            (event, "reserved")
        }
        ReserveDecision::Reject { shortages, reason } => {
            tracing::info!(%order_id, %reason, "reservation rejected");
            let event = Event::StockReservationRejected(StockReservationRejected {
                order_id,
                reason,
                shortages: shortages
                    .into_iter()
                    .map(|s| Shortage {
                        sku: s.sku,
                        requested: s.requested,
                        available: s.available,
                    })
                    .collect(),
                rejected_at: now_millis(),
            });
            (event, "rejected")
        }
    };
    outbox::append(conn, &event, &envelope.cause()).await?;
    Ok(AfterCommit::none().then(move || {
        metrics::counter!("inventory_reservations_total", "outcome" => outcome).increment(1);
    }))
}

/// OrderCancelled: records the cancellation (so that a later OrderPlaced reserves nothing),
/// moves the order's reservation as `decision` says (RESERVED or COMMITTED: the stock goes back
/// to available), and answers StockReleased either way, so the order can finish cancelling;
/// `reservation_id` is the nil UUID when nothing was reserved.
async fn release(
    conn: &mut PgConnection,
    cancelled: &OrderCancelled,
    reservation: Option<&store::Reservation>,
    decision: ReservationDecision,
    envelope: &Envelope,
) -> Result<AfterCommit, HandlerError> {
    let order_id = cancelled.order_id;
    let mut after_commit = AfterCommit::none();
    let reason = format!("order cancelled ({})", cancelled.reason);
    store::record_cancelled(conn, order_id, &reason).await?;
    let reservation_id = match reservation {
        None => {
            tracing::info!(%order_id, "order cancelled before anything was reserved");
            Uuid::nil()
        }
        Some(reservation) => {
            if let Some(from) = move_reservation(conn, reservation, decision).await? {
                after_commit = after_commit.then(move || {
                    metrics::counter!("inventory_releases_total", "from" => from.as_str())
                        .increment(1);
                });
            }
            reservation.reservation_id
        }
    };
    let event = Event::StockReleased(StockReleased {
        order_id,
        reservation_id,
        reason,
        released_at: now_millis(),
    });
    outbox::append(conn, &event, &envelope.cause()).await?;
    Ok(after_commit)
}

/// Carries out `decision` on `reservation` (locked by the handler); the status it moved from,
/// if it moved.
async fn move_reservation(
    conn: &mut PgConnection,
    reservation: &store::Reservation,
    decision: ReservationDecision,
) -> Result<Option<ReservationStatus>, HandlerError> {
    let (order_id, reservation_id) = (reservation.order_id, reservation.reservation_id);
    let from: ReservationStatus = reservation
        .status
        .parse()
        .map_err(HandlerError::Permanent)?;
    match decision {
        ReservationDecision::Ignore(why) => {
            tracing::info!(%order_id, status = %from, why, "reservation unchanged");
            Ok(None)
        }
        ReservationDecision::Transition { to, stock } => {
            store::move_reservation(conn, reservation, to, stock).await?;
            tracing::info!(%order_id, %reservation_id, %from, %to, ?stock, "reservation moved");
            Ok(Some(from))
        }
    }
}

/// Describes inventory's metrics.
pub fn describe_metrics() {
    use metrics::describe_counter;
    describe_counter!(
        "inventory_reservations_total",
        "OrderPlaced answers, by outcome (reserved, rejected)"
    );
    describe_counter!(
        "inventory_releases_total",
        "Reservations released by a cancellation, by the status they were in (RESERVED, COMMITTED)"
    );
}
