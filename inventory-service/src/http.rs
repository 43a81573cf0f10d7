//! The HTTP API: `PUT /products/{sku}` (upsert), `GET /products`, `GET /products/{sku}`,
//! `GET /reservations?order_id=`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use schemas::limits::{MAX_PRICE_CENTS, MAX_STOCK};
use serde::Deserialize;
use service_kit::http::{Admin, AdminToken, Problem, ValidJson};
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, Product, Reservation};

pub const MAX_NAME_LEN: usize = 200;
pub const MAX_RESERVATIONS: i64 = 500;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Required on `PUT /products/{sku}` when set: prices and stock are everyone's.
    pub admin_token: AdminToken,
}

impl axum::extract::FromRef<AppState> for AdminToken {
    fn from_ref(state: &AppState) -> AdminToken {
        state.admin_token.clone()
    }
}

pub fn routes(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/products", get(list_products))
        .route("/products/{sku}", get(get_product).put(put_product))
        .route("/reservations", get(list_reservations))
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutProduct {
    pub name: String,
    pub price_cents: i64,
    pub available: i64,
}

fn validated_sku(sku: &str) -> Result<(), Problem> {
    schemas::validate_sku(sku).map_err(|e| Problem::bad_request(format!("sku: {e}")))
}

async fn put_product(
    _: Admin,
    State(state): State<AppState>,
    Path(sku): Path<String>,
    ValidJson(body): ValidJson<PutProduct>,
) -> Result<impl IntoResponse, Problem> {
    validated_sku(&sku)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Problem::unprocessable(format!(
            "name must be 1 to {MAX_NAME_LEN} characters"
        )));
    }
    // Postgres text cannot hold NUL, and no product name needs a control character.
    if name.chars().any(char::is_control) {
        return Err(Problem::unprocessable(
            "name must not contain control characters",
        ));
    }
    if !(0..=MAX_PRICE_CENTS).contains(&body.price_cents) {
        return Err(Problem::unprocessable(format!(
            "price_cents must be between 0 and {MAX_PRICE_CENTS}, got {}",
            body.price_cents
        )));
    }
    if !(0..=MAX_STOCK).contains(&body.available) {
        return Err(Problem::unprocessable(format!(
            "available must be between 0 and {MAX_STOCK}, got {}",
            body.available
        )));
    }
    let mut tx = state.pool.begin().await?;
    let (product, created) =
        store::upsert_product(&mut tx, &sku, name, body.price_cents, body.available).await?;
    tx.commit().await?;
    tracing::info!(sku = %product.sku, available = product.available, price_cents = product.price_cents, created, "product stored");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(product)))
}

async fn get_product(
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<Product>, Problem> {
    validated_sku(&sku)?;
    store::product(&state.pool, &sku)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no product with sku {sku}")))
}

async fn list_products(State(state): State<AppState>) -> Result<Json<Vec<Product>>, Problem> {
    Ok(Json(store::products(&state.pool).await?))
}

#[derive(Debug, Deserialize)]
struct ReservationQuery {
    order_id: Option<String>,
}

async fn list_reservations(
    State(state): State<AppState>,
    Query(query): Query<ReservationQuery>,
) -> Result<Json<Vec<Reservation>>, Problem> {
    let order_id = match query.order_id.as_deref() {
        None | Some("") => None,
        Some(id) => Some(
            Uuid::parse_str(id)
                .map_err(|_| Problem::bad_request(format!("order_id {id:?} is not a UUID")))?,
        ),
    };
    Ok(Json(
        store::reservations(&state.pool, order_id, MAX_RESERVATIONS).await?,
    ))
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}
