//! The HTTP API: `GET /payments?order_id=&limit=` and `GET /payments/{payment_id}` (DESIGN.md).
//! Payments change only through order events and their jobs; the API only reads.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use service_kit::http::Problem;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, Record};

pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 500;

pub fn routes(pool: PgPool) -> axum::Router {
    axum::Router::new()
        .route("/payments", get(list_payments))
        .route("/payments/{payment_id}", get(get_payment))
        .route("/openapi.json", get(openapi))
        .with_state(pool)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: Option<String>,
    limit: Option<String>,
}

fn uuid_of(what: &str, text: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(text).map_err(|_| {
        Problem::bad_request(format!(
            "{what} {:?} is not a UUID",
            schemas::limits::truncate_chars(text, 64)
        ))
    })
}

/// The order's payment (a list of at most one), or the newest `limit` payments.
async fn list_payments(
    State(pool): State<PgPool>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Record>>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let order_id = match query.order_id.as_deref() {
        None | Some("") => None,
        Some(text) => Some(uuid_of("order_id", text)?),
    };
    let limit =
        service_kit::http::list_limit(query.limit.as_deref(), DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    Ok(Json(store::list(&pool, order_id, limit).await?))
}

async fn get_payment(
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<Record>, Problem> {
    let payment_id = uuid_of("payment id", &id)?;
    store::get(&pool, payment_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no payment {payment_id}")))
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}
