//! The `payments` table: one row per order. Every change is made under the row's lock
//! ([`lock_by_order`], [`lock`]), so the consumer and the jobs of one payment never race; times
//! are the database's clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Payment, PaymentStatus, UnknownStatus};

/// A payment as stored, and as `GET /payments` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Record {
    pub payment_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: Option<Uuid>,
    pub amount_cents: i64,
    pub status: String,
    pub reason: Option<String>,
    pub decline_code: Option<String>,
    pub charge_id: Option<Uuid>,
    pub refunded_cents: i64,
    /// Charge requests sent to the processor.
    pub attempts: i32,
    pub refund_requested_at: Option<DateTime<Utc>>,
    /// A charge the processor made after the payment was voided ([`mark_late_charge`]).
    pub late_charge_id: Option<Uuid>,
    /// What came back of that late charge (its amount once it was refunded).
    pub late_refunded_cents: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Seconds a charge request sent may still be in flight (0 or less: none can be).
    #[serde(skip)]
    pub in_flight_secs: Option<f64>,
}

impl Record {
    /// The payment as the decisions see it.
    pub fn payment(&self) -> Result<Payment, UnknownStatus> {
        Ok(Payment {
            status: self.status.parse::<PaymentStatus>()?,
            amount_cents: self.amount_cents,
            charge_id: self.charge_id,
            charge_sent: self.attempts > 0,
            in_flight_for: self
                .in_flight_secs
                .filter(|secs| *secs > 0.0)
                .map(Duration::from_secs_f64),
            refund_requested: self.refund_requested_at.is_some(),
        })
    }
}

const COLUMNS: &str = "payment_id, order_id, customer_id, amount_cents, status, reason, \
    decline_code, charge_id, refunded_cents, attempts, refund_requested_at, late_charge_id, \
    late_refunded_cents, created_at, updated_at, \
    EXTRACT(EPOCH FROM charge_in_flight_until - clock_timestamp())::float8 AS in_flight_secs";

/// The order's payment, locked until the transaction ends.
pub async fn lock_by_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Option<Record>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE order_id = $1 FOR UPDATE"
    ))
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

/// The payment, locked until the transaction ends.
pub async fn lock(conn: &mut PgConnection, payment_id: Uuid) -> sqlx::Result<Option<Record>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE payment_id = $1 FOR UPDATE"
    ))
    .bind(payment_id)
    .fetch_optional(conn)
    .await
}

pub async fn get(pool: &PgPool, payment_id: Uuid) -> sqlx::Result<Option<Record>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE payment_id = $1"
    ))
    .bind(payment_id)
    .fetch_optional(pool)
    .await
}

/// The order's payments (at most one), or the newest `limit` payments.
pub async fn list(pool: &PgPool, order_id: Option<Uuid>, limit: i64) -> sqlx::Result<Vec<Record>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE $1::uuid IS NULL OR order_id = $1 \
         ORDER BY created_at DESC, payment_id LIMIT $2"
    ))
    .bind(order_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A new REQUESTED payment of the order; its id (UUIDv7, the charge's Idempotency-Key).
pub async fn insert_requested(
    conn: &mut PgConnection,
    order_id: Uuid,
    customer_id: Uuid,
    amount_cents: i64,
) -> sqlx::Result<Uuid> {
    let payment_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payments (payment_id, order_id, customer_id, amount_cents, status, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, 'REQUESTED', now(), now())",
    )
    .bind(payment_id)
    .bind(order_id)
    .bind(customer_id)
    .bind(amount_cents)
    .execute(conn)
    .await?;
    Ok(payment_id)
}

/// A payment of an order whose refund was asked for before its payment: VOIDED from the start,
/// so that a late OrderAwaitingPayment charges nothing.
pub async fn insert_voided(
    conn: &mut PgConnection,
    order_id: Uuid,
    amount_cents: i64,
    reason: &str,
) -> sqlx::Result<Uuid> {
    let payment_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payments (payment_id, order_id, amount_cents, status, reason, \
             refund_requested_at, created_at, updated_at) \
         VALUES ($1, $2, $3, 'VOIDED', $4, now(), now(), now())",
    )
    .bind(payment_id)
    .bind(order_id)
    .bind(amount_cents)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(payment_id)
}

/// The order asked for its money back: no charge request is sent from now on.
pub async fn mark_refund_requested(conn: &mut PgConnection, payment_id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE payments SET refund_requested_at = now(), updated_at = now() WHERE payment_id = $1",
    )
    .bind(payment_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A charge request is about to be sent; it may be in flight for `window`.
pub async fn mark_charge_sent(
    conn: &mut PgConnection,
    payment_id: Uuid,
    window: Duration,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE payments SET attempts = attempts + 1, \
             charge_in_flight_until = clock_timestamp() + make_interval(secs => $2), updated_at = now() \
         WHERE payment_id = $1",
    )
    .bind(payment_id)
    .bind(window.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(())
}

/// The processor made `charge_id` for a payment settled without it: it is to be refunded.
pub async fn mark_late_charge(
    conn: &mut PgConnection,
    payment_id: Uuid,
    charge_id: Uuid,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE payments SET late_charge_id = $2, updated_at = now() WHERE payment_id = $1",
    )
    .bind(payment_id)
    .bind(charge_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The late charge `charge_id` was refunded: `cents` came back.
pub async fn settle_late_charge(
    conn: &mut PgConnection,
    payment_id: Uuid,
    charge_id: Uuid,
    cents: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE payments SET late_charge_id = $2, late_refunded_cents = $3, updated_at = now() \
         WHERE payment_id = $1",
    )
    .bind(payment_id)
    .bind(charge_id)
    .bind(cents)
    .execute(conn)
    .await?;
    Ok(())
}

/// What the payment came to: `status` with the fields that go with it; no charge request is in
/// flight any more.
pub async fn settle(
    conn: &mut PgConnection,
    payment_id: Uuid,
    outcome: &Settled<'_>,
) -> sqlx::Result<()> {
    let (status, charge_id, decline_code, refunded_cents, reason) = match *outcome {
        Settled::Confirmed { charge_id } => {
            (PaymentStatus::Confirmed, Some(charge_id), None, None, None)
        }
        Settled::Declined {
            decline_code,
            reason,
        } => (
            PaymentStatus::Declined,
            None,
            Some(decline_code),
            None,
            Some(reason),
        ),
        Settled::Refunded { refunded_cents } => (
            PaymentStatus::Refunded,
            None,
            None,
            Some(refunded_cents),
            None,
        ),
        Settled::Voided { reason } => (PaymentStatus::Voided, None, None, None, Some(reason)),
    };
    sqlx::query(
        "UPDATE payments SET status = $2, charge_id = COALESCE($3, charge_id), \
             decline_code = COALESCE($4, decline_code), refunded_cents = COALESCE($5, refunded_cents), \
             reason = COALESCE($6, reason), charge_in_flight_until = NULL, updated_at = now() \
         WHERE payment_id = $1",
    )
    .bind(payment_id)
    .bind(status.as_str())
    .bind(charge_id)
    .bind(decline_code)
    .bind(refunded_cents)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// A change of a payment's status ([`settle`]).
#[derive(Debug, Clone, Copy)]
pub enum Settled<'a> {
    Confirmed {
        charge_id: Uuid,
    },
    Declined {
        decline_code: &'a str,
        reason: &'a str,
    },
    Refunded {
        refunded_cents: i64,
    },
    Voided {
        reason: &'a str,
    },
}

/// Payments whose work is not done: `charging` (REQUESTED, no refund asked for) and `refunding`
/// (a refund asked for and not yet made), each with how many and the age of the oldest (since it
/// was asked for). Both are read by partial indexes, not a scan of every payment.
pub async fn in_flight(pool: &PgPool) -> sqlx::Result<Vec<(String, i64, Option<f64>)>> {
    sqlx::query_as(
        "SELECT 'charging', count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8 \
             FROM payments WHERE status = 'REQUESTED' AND refund_requested_at IS NULL \
         UNION ALL \
         SELECT 'refunding', count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(refund_requested_at))::float8 \
             FROM payments WHERE status IN ('REQUESTED', 'CONFIRMED') AND refund_requested_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await
}
