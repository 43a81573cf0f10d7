//! The inventory service's reaction to order events: OrderPlaced reserves every line or none and
//! answers StockReserved or StockReservationRejected; OrderConfirmed sells the reserved stock.
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

use crate::domain::{self, ReservationDecision, ReservationInput, ReserveDecision};
use crate::store;

pub const GROUP: &str = "inventory-service";

pub struct OrderEvents;

impl Handler for OrderEvents {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<AfterCommit, HandlerError> {
        match &envelope.event {
            Event::OrderPlaced(placed) => reserve(conn, placed, envelope).await,
            Event::OrderConfirmed(e) => {
                move_reservation(conn, e.order_id, ReservationInput::Commit).await
            }
            Event::OrderCancelled(e) => release(conn, e, envelope).await,
            other => {
                tracing::debug!(event_type = other.event_type(), order_id = %other.order_id(), "nothing for inventory to do");
                Ok(AfterCommit::none())
            }
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
    if store::lock_reservation(conn, order_id).await?.is_some() {
        tracing::info!(%order_id, "order already has a reservation; OrderPlaced ignored");
        return Ok(AfterCommit::none());
    }
    if store::is_cancelled(conn, order_id).await? {
        tracing::info!(%order_id, "order was cancelled before its OrderPlaced arrived; nothing reserved");
        let event = Event::StockReservationRejected(StockReservationRejected {
            order_id,
            reason: "order was cancelled before stock was reserved".to_owned(),
            shortages: Vec::new(),
            rejected_at: now_millis(),
        });
        outbox::append(conn, &event, &envelope.cause()).await?;
        return Ok(AfterCommit::none());
    }
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

/// OrderCancelled: releases the order's reservation if it holds one (RESERVED or COMMITTED: the
/// stock goes back to available), and records the cancellation so that a later OrderPlaced
/// reserves nothing. Either way it answers StockReleased, so the order can finish cancelling;
/// `reservation_id` is the nil UUID when nothing was reserved.
async fn release(
    conn: &mut PgConnection,
    cancelled: &OrderCancelled,
    envelope: &Envelope,
) -> Result<AfterCommit, HandlerError> {
    let order_id = cancelled.order_id;
    let mut after_commit = AfterCommit::none();
    let reason = format!("order cancelled ({})", cancelled.reason);
    store::record_cancelled(conn, order_id, &reason).await?;
    let reservation_id = match store::lock_reservation(conn, order_id).await? {
        None => {
            tracing::info!(%order_id, "order cancelled before anything was reserved");
            Uuid::nil()
        }
        Some(reservation) => {
            let status: domain::ReservationStatus = reservation
                .status
                .parse()
                .map_err(HandlerError::Permanent)?;
            match domain::decide(status, ReservationInput::Release)
                .map_err(|e| HandlerError::Permanent(e.to_string()))?
            {
                ReservationDecision::Ignore(why) => {
                    tracing::info!(%order_id, %status, why, "reservation unchanged");
                }
                ReservationDecision::Transition { to, stock } => {
                    store::move_reservation(conn, &reservation, to, stock).await?;
                    after_commit = after_commit.then(move || {
                        metrics::counter!("inventory_releases_total", "from" => status.as_str())
                            .increment(1);
                    });
                    tracing::info!(%order_id, reservation_id = %reservation.reservation_id, from = %status, %to,
                        "reservation released: stock back to available");
                }
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

async fn move_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
    input: ReservationInput,
) -> Result<AfterCommit, HandlerError> {
    let Some(reservation) = store::lock_reservation(conn, order_id).await? else {
        // Not yet: the retry topics give the reservation time to appear.
        return Err(HandlerError::Retryable(format!(
            "no reservation for order {order_id} to {input:?}"
        )));
    };
    let status: domain::ReservationStatus = reservation
        .status
        .parse()
        .map_err(HandlerError::Permanent)?;
    match domain::decide(status, input).map_err(|e| HandlerError::Permanent(e.to_string()))? {
        ReservationDecision::Ignore(why) => {
            tracing::info!(%order_id, %status, why, "reservation unchanged");
        }
        ReservationDecision::Transition { to, stock } => {
            store::move_reservation(conn, &reservation, to, stock).await?;
            tracing::info!(%order_id, reservation_id = %reservation.reservation_id, from = %status, %to, "reservation moved");
        }
    }
    Ok(AfterCommit::none())
}
