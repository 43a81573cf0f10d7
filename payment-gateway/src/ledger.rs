//! The ledger: charges and refunds, each recorded once per Idempotency-Key. A key seen again
//! with the same request gets the recorded answer (and nothing is charged or refunded again); with
//! another request it is refused. Decisions are made in one transaction with their record, so a
//! crash leaves either both or neither.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Which charges are declined.
#[derive(Debug, Clone, Default)]
pub struct DeclineRules {
    /// A charge above this many cents is declined (`over_limit`).
    pub above_cents: i64,
    /// A charge for one of these customers is declined (`do_not_honor`).
    pub customers: Vec<Uuid>,
}

impl DeclineRules {
    /// The decline code for `charge`, or none when it goes through.
    pub fn decline(&self, charge: &ChargeRequest) -> Option<&'static str> {
        if self.customers.contains(&charge.customer_id) {
            Some("do_not_honor")
        } else if charge.amount_cents > self.above_cents {
            Some("over_limit")
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    pub payment_id: Uuid,
    pub customer_id: Uuid,
    pub amount_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    pub charge_id: Uuid,
    pub amount_cents: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChargeStatus {
    Succeeded,
    Declined,
}

impl ChargeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Succeeded => "succeeded",
            ChargeStatus::Declined => "declined",
        }
    }

    fn parse(text: &str) -> ChargeStatus {
        if text == "succeeded" {
            ChargeStatus::Succeeded
        } else {
            ChargeStatus::Declined
        }
    }
}

/// The answer to a charge: it echoes what was charged, so that a client can check the answer
/// against its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: Uuid,
    pub payment_id: Uuid,
    pub customer_id: Uuid,
    pub amount_cents: i64,
    pub status: ChargeStatus,
    pub decline_code: Option<String>,
    pub refunded_cents: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub refund_id: Uuid,
    pub charge_id: Uuid,
    pub amount_cents: i64,
    pub status: RefundStatus,
    pub created_at: DateTime<Utc>,
}

/// Always `succeeded`: a refund that cannot be made is refused instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefundStatus {
    Succeeded,
}

/// Why a request was refused. Nothing was recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("Idempotency-Key {0:?} was already used with a different request")]
    KeyReused(String),
    #[error("no charge {0}")]
    UnknownCharge(Uuid),
    #[error("charge {0} was declined: nothing was charged, so nothing can be refunded")]
    NotCharged(Uuid),
    #[error(
        "refunding {asked} cents of charge {charge_id} would return more than was charged ({left} cents are left to refund)"
    )]
    MoreThanCharged {
        charge_id: Uuid,
        asked: i64,
        left: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

type ChargeRow = (
    Uuid,
    Uuid,
    Uuid,
    i64,
    String,
    Option<String>,
    i64,
    DateTime<Utc>,
);

const CHARGE_COLUMNS: &str = "charge_id, payment_id, customer_id, amount_cents, status, decline_code, refunded_cents, created_at";

fn charge_of(row: ChargeRow) -> Charge {
    let (charge_id, payment_id, customer_id, amount_cents, status, decline_code, refunded, at) =
        row;
    Charge {
        charge_id,
        payment_id,
        customer_id,
        amount_cents,
        status: ChargeStatus::parse(&status),
        decline_code,
        refunded_cents: refunded,
        created_at: at,
    }
}

/// Charges `request` under `key` (or answers what the key got before). Declined charges are
/// recorded too: the same key is declined again.
pub async fn charge(
    pool: &PgPool,
    rules: &DeclineRules,
    key: &str,
    request: &ChargeRequest,
) -> Result<(Charge, Replay), LedgerError> {
    let decline = rules.decline(request);
    let status = if decline.is_some() {
        ChargeStatus::Declined
    } else {
        ChargeStatus::Succeeded
    };
    let inserted: Option<ChargeRow> = sqlx::query_as(&format!(
        "INSERT INTO charges (charge_id, idempotency_key, payment_id, customer_id, amount_cents, status, decline_code) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (idempotency_key) DO NOTHING RETURNING {CHARGE_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(key)
    .bind(request.payment_id)
    .bind(request.customer_id)
    .bind(request.amount_cents)
    .bind(status.as_str())
    .bind(decline)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = inserted {
        return Ok((charge_of(row), Replay::No));
    }
    let earlier = charge_by_key(pool, key)
        .await?
        .ok_or_else(|| sqlx::Error::RowNotFound)?;
    let same = earlier.payment_id == request.payment_id
        && earlier.customer_id == request.customer_id
        && earlier.amount_cents == request.amount_cents;
    if !same {
        return Err(Refused::KeyReused(key.to_owned()).into());
    }
    Ok((earlier, Replay::Yes))
}

/// Whether an answer repeats one given before under the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    No,
    Yes,
}

async fn charge_by_key(pool: &PgPool, key: &str) -> sqlx::Result<Option<Charge>> {
    let row: Option<ChargeRow> = sqlx::query_as(&format!(
        "SELECT {CHARGE_COLUMNS} FROM charges WHERE idempotency_key = $1"
    ))
    .bind(key)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(charge_of))
}

type RefundRow = (Uuid, Uuid, i64, DateTime<Utc>);

fn refund_of((refund_id, charge_id, amount_cents, created_at): RefundRow) -> Refund {
    Refund {
        refund_id,
        charge_id,
        amount_cents,
        status: RefundStatus::Succeeded,
        created_at,
    }
}

async fn refund_by_key(conn: &mut PgConnection, key: &str) -> sqlx::Result<Option<Refund>> {
    let row: Option<RefundRow> = sqlx::query_as(
        "SELECT refund_id, charge_id, amount_cents, created_at FROM refunds WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(refund_of))
}

/// Refunds `request` under `key` (or answers what the key got before): at most what is left of
/// the charge, with the charge locked so that concurrent refunds cannot together exceed it.
pub async fn refund(
    pool: &PgPool,
    key: &str,
    request: &RefundRequest,
) -> Result<(Refund, Replay), LedgerError> {
    let mut tx = pool.begin().await?;
    let charge: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT status, amount_cents, refunded_cents FROM charges WHERE charge_id = $1 FOR UPDATE",
    )
    .bind(request.charge_id)
    .fetch_optional(&mut *tx)
    .await?;
    // The key first: a replay is answered as before, whatever happened to the charge since.
    if let Some(earlier) = refund_by_key(&mut tx, key).await? {
        return replayed(earlier, key, request);
    }
    let Some((status, charged, refunded)) = charge else {
        return Err(Refused::UnknownCharge(request.charge_id).into());
    };
    if ChargeStatus::parse(&status) != ChargeStatus::Succeeded {
        return Err(Refused::NotCharged(request.charge_id).into());
    }
    let left = charged - refunded;
    if request.amount_cents > left {
        return Err(Refused::MoreThanCharged {
            charge_id: request.charge_id,
            asked: request.amount_cents,
            left,
        }
        .into());
    }
    let inserted: Result<RefundRow, sqlx::Error> = sqlx::query_as(
        "INSERT INTO refunds (refund_id, idempotency_key, charge_id, amount_cents) VALUES ($1, $2, $3, $4) \
         RETURNING refund_id, charge_id, amount_cents, created_at",
    )
    .bind(Uuid::new_v4())
    .bind(key)
    .bind(request.charge_id)
    .bind(request.amount_cents)
    .fetch_one(&mut *tx)
    .await;
    let row = match inserted {
        Ok(row) => row,
        // The same key used at the same moment for a refund of another charge (which this
        // transaction's lock does not cover): answer as the one that got there first.
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            drop(tx);
            let mut conn = pool.acquire().await?;
            let earlier = refund_by_key(&mut conn, key)
                .await?
                .ok_or(sqlx::Error::RowNotFound)?;
            return replayed(earlier, key, request);
        }
        Err(e) => return Err(e.into()),
    };
    sqlx::query("UPDATE charges SET refunded_cents = refunded_cents + $2 WHERE charge_id = $1")
        .bind(request.charge_id)
        .bind(request.amount_cents)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((refund_of(row), Replay::No))
}

fn replayed(
    earlier: Refund,
    key: &str,
    request: &RefundRequest,
) -> Result<(Refund, Replay), LedgerError> {
    if earlier.charge_id == request.charge_id && earlier.amount_cents == request.amount_cents {
        Ok((earlier, Replay::Yes))
    } else {
        Err(Refused::KeyReused(key.to_owned()).into())
    }
}

/// Every charge of a payment, each with its refunds, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    #[serde(flatten)]
    pub charge: Charge,
    pub refunds: Vec<Refund>,
}

pub async fn of_payment(pool: &PgPool, payment_id: Uuid) -> sqlx::Result<Vec<LedgerEntry>> {
    let charges: Vec<ChargeRow> = sqlx::query_as(&format!(
        "SELECT {CHARGE_COLUMNS} FROM charges WHERE payment_id = $1 ORDER BY created_at, charge_id"
    ))
    .bind(payment_id)
    .fetch_all(pool)
    .await?;
    with_refunds(pool, charges).await
}

/// Up to `limit` charges whose id is above `after` (every charge, from the start, without it),
/// in charge id order, each with its refunds: a page of the whole ledger, as a reconciliation
/// reads it. The next page starts after the last charge id of this one.
pub async fn page(
    pool: &PgPool,
    after: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<LedgerEntry>> {
    let charges: Vec<ChargeRow> = sqlx::query_as(&format!(
        "SELECT {CHARGE_COLUMNS} FROM charges WHERE charge_id > $1 ORDER BY charge_id LIMIT $2"
    ))
    .bind(after.unwrap_or(Uuid::nil()))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    with_refunds(pool, charges).await
}

/// The charges, in their order, each with its refunds (oldest first).
async fn with_refunds(pool: &PgPool, charges: Vec<ChargeRow>) -> sqlx::Result<Vec<LedgerEntry>> {
    let ids: Vec<Uuid> = charges.iter().map(|row| row.0).collect();
    let rows: Vec<RefundRow> = sqlx::query_as(
        "SELECT refund_id, charge_id, amount_cents, created_at FROM refunds \
         WHERE charge_id = ANY($1) ORDER BY created_at, refund_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut refunds: std::collections::HashMap<Uuid, Vec<Refund>> = Default::default();
    for refund in rows.into_iter().map(refund_of) {
        refunds.entry(refund.charge_id).or_default().push(refund);
    }
    Ok(charges
        .into_iter()
        .map(|row| {
            let charge = charge_of(row);
            LedgerEntry {
                refunds: refunds.remove(&charge.charge_id).unwrap_or_default(),
                charge,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declines_listed_customers_and_charges_above_the_limit() {
        let listed = Uuid::from_u128(7);
        let rules = DeclineRules {
            above_cents: 100,
            customers: vec![listed],
        };
        let request = |customer_id, amount_cents| ChargeRequest {
            payment_id: Uuid::from_u128(1),
            customer_id,
            amount_cents,
        };
        let other = Uuid::from_u128(8);
        assert_eq!(rules.decline(&request(other, 100)), None);
        assert_eq!(rules.decline(&request(other, 101)), Some("over_limit"));
        assert_eq!(rules.decline(&request(listed, 1)), Some("do_not_honor"));
    }
}
