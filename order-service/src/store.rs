//! The orders database: the `orders` write model, the `order_status_view` read model and the
//! idempotency keys. Every write takes the caller's transaction; writes that change an order also
//! append its event to the outbox in that same transaction.

use chrono::{DateTime, Utc};
use messaging::outbox::{self, Cause};
use schemas::{CancelReason, Event, OrderItem, OrderPlaced};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Order, OrderStatus};
use crate::transition::Steps;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub status: String,
    pub at: DateTime<Utc>,
}

/// An order as `GET /orders/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub status: String,
    #[sqlx(json)]
    pub items: Vec<Item>,
    pub total_cents: Option<i64>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[sqlx(json)]
    pub history: Vec<HistoryEntry>,
}

/// A validated order to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: Uuid,
    pub items: Vec<Item>,
}

fn now_millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// Writes a new PENDING order, its view row, its OrderPlaced outbox row and its reservation
/// step's timeout ([`crate::deadline`]). The caller commits.
pub async fn insert_order(
    conn: &mut PgConnection,
    order: &NewOrder,
    steps: &Steps,
    cause: &Cause,
) -> sqlx::Result<OrderView> {
    insert_order_with_id(conn, Uuid::now_v7(), order, steps, cause).await
}

/// [`insert_order`] with the id chosen by the caller (tests and tools that need a known id).
pub async fn insert_order_with_id(
    conn: &mut PgConnection,
    order_id: Uuid,
    order: &NewOrder,
    steps: &Steps,
    cause: &Cause,
) -> sqlx::Result<OrderView> {
    // Millisecond precision, so the view and the event agree exactly.
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default();
    let status = OrderStatus::Pending.as_str();
    let view = OrderView {
        order_id,
        customer_id: order.customer_id,
        status: status.to_owned(),
        items: order.items.clone(),
        total_cents: None,
        reason: None,
        created_at: now,
        updated_at: now,
        history: vec![HistoryEntry {
            status: status.to_owned(),
            at: now,
        }],
    };
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, status, items, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $5)",
    )
    .bind(order_id)
    .bind(order.customer_id)
    .bind(status)
    .bind(Json(&order.items))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO order_status_view (order_id, customer_id, status, items, created_at, updated_at, history) \
         VALUES ($1, $2, $3, $4, $5, $5, $6)",
    )
    .bind(order_id)
    .bind(order.customer_id)
    .bind(status)
    .bind(Json(&order.items))
    .bind(now)
    .bind(Json(&view.history))
    .execute(&mut *conn)
    .await?;
    let event = Event::OrderPlaced(OrderPlaced {
        order_id,
        customer_id: order.customer_id,
        items: order
            .items
            .iter()
            .map(|i| OrderItem {
                sku: i.sku.clone(),
                quantity: i.quantity,
            })
            .collect(),
        placed_at: now_millis(now),
    });
    outbox::append(&mut *conn, &event, cause).await?;
    crate::deadline::start(conn, order_id, steps).await?;
    Ok(view)
}

/// The order as the state machine sees it, and when it was placed, locking its row until the
/// transaction ends so that changes to one order are serialized (and so are its outbox rows: per
/// order, id order is commit order). A status or reason this code does not know reads as none.
pub async fn lock_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Option<(Order, DateTime<Utc>)>> {
    /// status, total_cents, cancel_reason, created_at.
    type Row = (String, Option<i64>, Option<String>, DateTime<Utc>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT status, total_cents, cancel_reason, created_at FROM orders \
         WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await?;
    Ok(
        row.and_then(|(status, total_cents, cancel_reason, placed_at)| {
            let order = Order {
                status: status.parse().ok()?,
                total_cents,
                cancel_reason: cancel_reason.and_then(|r| CancelReason::from_symbol(&r)),
            };
            Some((order, placed_at))
        }),
    )
}

/// What changes with a status.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub total_cents: Option<i64>,
    pub reason: Option<String>,
    pub cancel_reason: Option<CancelReason>,
}

/// When a status change happened, when its order was placed, and by whom.
#[derive(Debug, Clone, Copy)]
pub struct Changed {
    pub at: DateTime<Utc>,
    pub placed_at: DateTime<Utc>,
    pub customer_id: Uuid,
}

/// Moves the order (locked by [`lock_order`]) to `status` in the write and read models, appending
/// the status to the view's history.
pub async fn set_status(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: OrderStatus,
    change: &Change,
) -> sqlx::Result<Changed> {
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default();
    let (placed_at, customer_id): (DateTime<Utc>, Uuid) = sqlx::query_as(
        "UPDATE orders SET status = $2, total_cents = COALESCE($3, total_cents), \
         reason = COALESCE($4, reason), cancel_reason = COALESCE($6, cancel_reason), updated_at = $5 \
         WHERE order_id = $1 RETURNING created_at, customer_id",
    )
    .bind(order_id)
    .bind(status.as_str())
    .bind(change.total_cents)
    .bind(change.reason.as_deref())
    .bind(now)
    .bind(change.cancel_reason.map(|r| r.to_string()))
    .fetch_one(&mut *conn)
    .await?;
    let entry = HistoryEntry {
        status: status.as_str().to_owned(),
        at: now,
    };
    sqlx::query(
        "UPDATE order_status_view SET status = $2, total_cents = COALESCE($3, total_cents), \
         reason = COALESCE($4, reason), updated_at = $5, history = history || $6 WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(status.as_str())
    .bind(change.total_cents)
    .bind(change.reason.as_deref())
    .bind(now)
    .bind(Json(vec![entry]))
    .execute(conn)
    .await?;
    Ok(Changed {
        at: now,
        placed_at,
        customer_id,
    })
}

const VIEW_COLUMNS: &str =
    "order_id, customer_id, status, items, total_cents, reason, created_at, updated_at, history";

pub async fn view(pool: &PgPool, order_id: Uuid) -> sqlx::Result<Option<OrderView>> {
    sqlx::query_as(&format!(
        "SELECT {VIEW_COLUMNS} FROM order_status_view WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(pool)
    .await
}

/// The newest orders first, optionally only those in `status`.
pub async fn list(
    pool: &PgPool,
    status: Option<OrderStatus>,
    limit: i64,
) -> sqlx::Result<Vec<OrderView>> {
    sqlx::query_as(&format!(
        "SELECT {VIEW_COLUMNS} FROM order_status_view \
         WHERE ($1::text IS NULL OR status = $1) ORDER BY created_at DESC, order_id DESC LIMIT $2"
    ))
    .bind(status.map(OrderStatus::as_str))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A request already answered under an idempotency key.
#[derive(Debug, FromRow)]
pub struct Remembered {
    pub request: serde_json::Value,
    pub response: serde_json::Value,
}

/// Claims `key` for this request, waiting for a concurrent claim of the same key to finish.
/// Returns `None` when the key is ours, or what an earlier request under the key got within
/// `ttl`. A key older than `ttl` is forgotten here (the retention job deletes it too): it is
/// free again.
pub async fn claim_idempotency_key(
    conn: &mut PgConnection,
    key: &str,
    ttl: std::time::Duration,
) -> sqlx::Result<Option<Remembered>> {
    // The advisory lock makes a second request with the same key wait for the first to commit.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE idempotency_key = $1 \
         AND created_at < now() - make_interval(secs => $2)",
    )
    .bind(key)
    .bind(ttl.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    sqlx::query_as("SELECT request, response FROM idempotency_keys WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(conn)
        .await
}

pub async fn remember(
    conn: &mut PgConnection,
    key: &str,
    request: &serde_json::Value,
    response: &OrderView,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO idempotency_keys (idempotency_key, request, order_id, response) VALUES ($1, $2, $3, $4)",
    )
    .bind(key)
    .bind(Json(request))
    .bind(response.order_id)
    .bind(Json(response))
    .execute(conn)
    .await?;
    Ok(())
}
