//! payment-service's reaction to order events, in the consumer runtime's transaction (inbox claim
//! + payment row + job or outbox row), as [`domain`] decides it:
//!
//! - OrderAwaitingPayment makes the order's one payment (REQUESTED) and queues its charge; the
//!   charge itself runs as a job ([`charging`]), never in this transaction.
//! - OrderRefundRequested marks the payment's refund as asked for (no charge is sent from then
//!   on) and queues the refund job; a payment that was declined, or never asked for, is answered
//!   at once with PaymentRefunded of 0 (the latter recorded VOIDED, so that a late
//!   OrderAwaitingPayment charges nothing).
//!
//! A record that contradicts the payment (another amount) is dead-lettered with its reason.

use messaging::consumer::{AfterCommit, Handler};
use messaging::{Envelope, HandlerError, outbox};
use schemas::{Event, OrderAwaitingPayment, OrderRefundRequested};
use service_kit::jobs::Wake;
use sqlx::PgConnection;

use crate::charging::{self, Origin};
use crate::domain::{self, OnAwaitingPayment, OnRefundRequested};
use crate::store::{self, Record};

pub const GROUP: &str = schemas::PAYMENT_SERVICE;

pub struct OrderEvents {
    /// Wakes the job runner once a transaction that queued a job has committed.
    pub wake: Wake,
}

impl Handler for OrderEvents {
    fn handles(&self, event: &Event) -> bool {
        event.read_by().contains(&GROUP)
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<AfterCommit, HandlerError> {
        match &envelope.event {
            Event::OrderAwaitingPayment(e) => self.awaiting_payment(conn, e, envelope).await,
            Event::OrderRefundRequested(e) => self.refund_requested(conn, e, envelope).await,
            other => {
                tracing::debug!(event_type = other.event_type(), order_id = %other.order_id(), "nothing for payments to do");
                Ok(AfterCommit::none())
            }
        }
    }
}

fn payment_of(record: Option<&Record>) -> Result<Option<domain::Payment>, HandlerError> {
    record
        .map(|r| r.payment())
        .transpose()
        .map_err(|e| HandlerError::Permanent(e.to_string()))
}

impl OrderEvents {
    async fn awaiting_payment(
        &self,
        conn: &mut PgConnection,
        event: &OrderAwaitingPayment,
        envelope: &Envelope,
    ) -> Result<AfterCommit, HandlerError> {
        let order_id = event.order_id;
        let existing = store::lock_by_order(conn, order_id).await?;
        match domain::on_awaiting_payment(
            payment_of(existing.as_ref())?.as_ref(),
            event.amount_cents,
        ) {
            OnAwaitingPayment::Create => {
                let payment_id =
                    store::insert_requested(conn, order_id, event.customer_id, event.amount_cents)
                        .await?;
                let origin = Origin::of(&envelope.cause());
                charging::enqueue(conn, charging::CHARGE, payment_id, &origin).await?;
                tracing::info!(%order_id, %payment_id, amount_cents = event.amount_cents, "payment requested");
                let wake = self.wake.clone();
                Ok(AfterCommit::none().then(move || {
                    metrics::counter!("payments_requested_total").increment(1);
                    wake.now();
                }))
            }
            OnAwaitingPayment::Ignore(why) => {
                tracing::info!(%order_id, why, "OrderAwaitingPayment changes nothing");
                Ok(AfterCommit::none())
            }
            OnAwaitingPayment::AmountDiffers { recorded, asked } => {
                Err(HandlerError::Permanent(format!(
                    "order {order_id}'s payment is for {recorded} cents; this OrderAwaitingPayment asks for {asked}"
                )))
            }
        }
    }

    async fn refund_requested(
        &self,
        conn: &mut PgConnection,
        event: &OrderRefundRequested,
        envelope: &Envelope,
    ) -> Result<AfterCommit, HandlerError> {
        let order_id = event.order_id;
        let existing = store::lock_by_order(conn, order_id).await?;
        let decision = domain::on_refund_requested(
            payment_of(existing.as_ref())?.as_ref(),
            event.amount_cents,
        );
        match (decision, existing) {
            (OnRefundRequested::VoidUnasked, _) => {
                let reason = "voided: the refund was asked for before the payment";
                let payment_id =
                    store::insert_voided(conn, order_id, event.amount_cents, reason).await?;
                let event = charging::refunded(order_id, payment_id, 0);
                outbox::append(conn, &event, &envelope.cause()).await?;
                tracing::info!(%order_id, %payment_id, "refund asked for before any payment; voided");
                Ok(AfterCommit::none().then(|| {
                    metrics::counter!("payments_total", "outcome" => "voided").increment(1);
                }))
            }
            (OnRefundRequested::AnswerNothingCharged, Some(record)) => {
                store::mark_refund_requested(conn, record.payment_id).await?;
                let event = charging::refunded(order_id, record.payment_id, 0);
                outbox::append(conn, &event, &envelope.cause()).await?;
                tracing::info!(%order_id, payment_id = %record.payment_id, "refund asked for a declined payment: nothing to refund");
                Ok(AfterCommit::none())
            }
            (OnRefundRequested::Settle, Some(record)) => {
                store::mark_refund_requested(conn, record.payment_id).await?;
                let origin = Origin::of(&envelope.cause());
                charging::enqueue(conn, charging::REFUND, record.payment_id, &origin).await?;
                tracing::info!(%order_id, payment_id = %record.payment_id, status = %record.status, "refund asked for");
                let wake = self.wake.clone();
                Ok(AfterCommit::none().then(move || wake.now()))
            }
            (OnRefundRequested::Ignore(why), _) => {
                tracing::info!(%order_id, why, "OrderRefundRequested changes nothing");
                Ok(AfterCommit::none())
            }
            (OnRefundRequested::AmountDiffers { recorded, asked }, _) => {
                Err(HandlerError::Permanent(format!(
                    "order {order_id}'s payment is for {recorded} cents; this OrderRefundRequested asks for {asked}"
                )))
            }
            (decision, None) => Err(HandlerError::Permanent(format!(
                "{decision:?} needs a payment and order {order_id} has none"
            ))),
        }
    }
}

/// Describes payment-service's metrics.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "payments_requested_total",
        "Payments asked for (one per order's OrderAwaitingPayment)"
    );
    describe_counter!(
        "payments_total",
        "Payments settled, by outcome: confirmed (charged), declined, refunded, voided (never charged)"
    );
    describe_counter!(
        "payments_late_charges_total",
        "Charges the processor made after their payment was voided (later than the in-flight window), found and refunded in full"
    );
    describe_gauge!(
        "payments_in_flight",
        "Payments whose work is not done, by state: charging (REQUESTED), refunding (a refund asked for and not yet made); counted every 5 s"
    );
    describe_gauge!(
        "payments_in_flight_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest payment in each in-flight state (since it was asked for, or since its refund was)"
    );
}
