//! The inventory database: products (stock per sku) and reservations. Writes take the caller's
//! transaction; stock rows are always locked in sku order, so concurrent writers never deadlock.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::domain::{Line, ReservationStatus, Stock, StockMove};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineView {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct Reservation {
    pub reservation_id: Uuid,
    pub order_id: Uuid,
    pub status: String,
    #[sqlx(json)]
    pub lines: Vec<LineView>,
    pub total_cents: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const PRODUCT_COLUMNS: &str = "sku, name, price_cents, available, reserved, sold";
const RESERVATION_COLUMNS: &str =
    "reservation_id, order_id, status, lines, total_cents, created_at, updated_at";

/// Creates or updates a product; `available` is set as given and the change is counted in
/// `stock_added`. Returns the product and whether it was created.
pub async fn upsert_product(
    conn: &mut PgConnection,
    sku: &str,
    name: &str,
    price_cents: i64,
    available: i64,
) -> sqlx::Result<(Product, bool)> {
    let row: (String, String, i64, i64, i64, i64, bool) = sqlx::query_as(
        "INSERT INTO products (sku, name, price_cents, available, stock_added) VALUES ($1, $2, $3, $4, $4) \
         ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name, price_cents = EXCLUDED.price_cents, \
           stock_added = products.stock_added + EXCLUDED.available - products.available, \
           available = EXCLUDED.available, updated_at = now() \
         RETURNING sku, name, price_cents, available, reserved, sold, (xmax = 0) AS created",
    )
    .bind(sku)
    .bind(name)
    .bind(price_cents)
    .bind(available)
    .fetch_one(conn)
    .await?;
    let (sku, name, price_cents, available, reserved, sold, created) = row;
    Ok((
        Product {
            sku,
            name,
            price_cents,
            available,
            reserved,
            sold,
        },
        created,
    ))
}

pub async fn product(db: impl PgExecutor<'_>, sku: &str) -> sqlx::Result<Option<Product>> {
    sqlx::query_as(&format!(
        "SELECT {PRODUCT_COLUMNS} FROM products WHERE sku = $1"
    ))
    .bind(sku)
    .fetch_optional(db)
    .await
}

pub async fn products(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Product>> {
    sqlx::query_as(&format!(
        "SELECT {PRODUCT_COLUMNS} FROM products ORDER BY sku"
    ))
    .fetch_all(db)
    .await
}

/// Locks the stock rows of `skus` (in sku order) and returns those that exist.
pub async fn lock_stock(
    conn: &mut PgConnection,
    skus: &[String],
) -> sqlx::Result<BTreeMap<String, Stock>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT sku, available, price_cents FROM products WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(skus)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(sku, available, price_cents)| {
            (
                sku,
                Stock {
                    available,
                    price_cents,
                },
            )
        })
        .collect())
}

/// Moves `lines` from available to reserved and records the reservation.
pub async fn insert_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[Line],
    total_cents: i64,
) -> sqlx::Result<Uuid> {
    for line in lines {
        sqlx::query(
            "UPDATE products SET available = available - $2, reserved = reserved + $2, updated_at = now() WHERE sku = $1",
        )
        .bind(&line.sku)
        .bind(line.quantity)
        .execute(&mut *conn)
        .await?;
    }
    let reservation_id = Uuid::now_v7();
    let views: Vec<LineView> = lines
        .iter()
        .map(|l| LineView {
            sku: l.sku.clone(),
            quantity: l.quantity,
            unit_price_cents: l.unit_price_cents,
        })
        .collect();
    sqlx::query(
        "INSERT INTO reservations (reservation_id, order_id, status, lines, total_cents) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(reservation_id)
    .bind(order_id)
    .bind(ReservationStatus::Reserved.as_str())
    .bind(Json(views))
    .bind(total_cents)
    .execute(conn)
    .await?;
    Ok(reservation_id)
}

/// The order's reservation, locked until the transaction ends.
pub async fn lock_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Option<Reservation>> {
    sqlx::query_as(&format!(
        "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE order_id = $1 FOR UPDATE"
    ))
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

/// Moves a reservation (locked by [`lock_reservation`]) to `to`, moving its stock as `stock` says.
pub async fn move_reservation(
    conn: &mut PgConnection,
    reservation: &Reservation,
    to: ReservationStatus,
    stock: StockMove,
) -> sqlx::Result<()> {
    let sql = match stock {
        StockMove::Sell => {
            "UPDATE products SET reserved = reserved - $2, sold = sold + $2, updated_at = now() WHERE sku = $1"
        }
        StockMove::Unreserve => {
            "UPDATE products SET reserved = reserved - $2, available = available + $2, updated_at = now() WHERE sku = $1"
        }
        StockMove::Return => {
            "UPDATE products SET sold = sold - $2, available = available + $2, updated_at = now() WHERE sku = $1"
        }
    };
    let mut lines = reservation.lines.clone();
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    for line in &lines {
        sqlx::query(sql)
            .bind(&line.sku)
            .bind(line.quantity)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(
        "UPDATE reservations SET status = $2, updated_at = now() WHERE reservation_id = $1",
    )
    .bind(reservation.reservation_id)
    .bind(to.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn reservations(
    db: impl PgExecutor<'_>,
    order_id: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<Reservation>> {
    sqlx::query_as(&format!(
        "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE ($1::uuid IS NULL OR order_id = $1) \
         ORDER BY created_at DESC, reservation_id DESC LIMIT $2"
    ))
    .bind(order_id)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Records that `order_id` was cancelled (once).
pub async fn record_cancelled(
    conn: &mut PgConnection,
    order_id: Uuid,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO cancelled_orders (order_id, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(order_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn is_cancelled(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM cancelled_orders WHERE order_id = $1)")
        .bind(order_id)
        .fetch_one(conn)
        .await
}
