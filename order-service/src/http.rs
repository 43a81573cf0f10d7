//! The HTTP API: `POST /orders` (with `Idempotency-Key`), `GET /orders/{id}`, `GET /orders`.
//! Validation happens here, once, into [`NewOrder`]; a bad request writes nothing.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use messaging::outbox::Cause;
use serde::{Deserialize, Serialize};
use service_kit::http::{Problem, ValidJson};
use sqlx::PgPool;
use uuid::Uuid;

use schemas::CancelReason;

use crate::domain::{Input, OrderStatus};
use crate::store::{self, Item, NewOrder, OrderView};
use crate::transition::{self, Applied, Steps};

pub use schemas::limits::{MAX_ITEMS, MAX_QUANTITY};
pub use service_kit::http::MAX_IDEMPOTENCY_KEY_LEN;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// How long an Idempotency-Key is remembered (`--idempotency-key-ttl`).
    pub idempotency_key_ttl: std::time::Duration,
    /// How long each step may take (`--reservation-timeout`, `--payment-timeout`).
    pub steps: Steps,
}

pub fn routes(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/orders", post(place_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    pub customer_id: String,
    pub items: Vec<ItemRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    pub sku: String,
    pub quantity: i64,
}

/// Checks a request once; what comes out is an order the saga can run.
pub fn validate(request: &PlaceOrderRequest) -> Result<NewOrder, Problem> {
    let customer_id = Uuid::parse_str(&request.customer_id).map_err(|_| {
        Problem::unprocessable(format!(
            "customer_id {:?} is not a UUID",
            request.customer_id
        ))
    })?;
    if request.items.is_empty() {
        return Err(Problem::unprocessable("items must not be empty"));
    }
    if request.items.len() > MAX_ITEMS {
        return Err(Problem::unprocessable(format!(
            "an order has at most {MAX_ITEMS} items, this one has {}",
            request.items.len()
        )));
    }
    let mut items = Vec::with_capacity(request.items.len());
    for (i, item) in request.items.iter().enumerate() {
        schemas::validate_sku(&item.sku)
            .map_err(|e| Problem::unprocessable(format!("items[{i}].sku: {e}")))?;
        if item.quantity <= 0 || item.quantity > MAX_QUANTITY {
            return Err(Problem::unprocessable(format!(
                "items[{i}].quantity must be between 1 and {MAX_QUANTITY}, got {}",
                item.quantity
            )));
        }
        items.push(Item {
            sku: item.sku.clone(),
            quantity: item.quantity,
        });
    }
    Ok(NewOrder { customer_id, items })
}

async fn place_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    ValidJson(request): ValidJson<PlaceOrderRequest>,
) -> Result<Response, Problem> {
    let order = validate(&request)?;
    let key = service_kit::http::idempotency_key(&headers)?;
    let normalized = serde_json::to_value(&request).map_err(Problem::internal)?;
    let cause = Cause {
        causation_id: None,
        traceparent: Some(service_kit::trace_context::current()),
        tracestate: None,
    };
    let mut tx = state.pool.begin().await?;
    if let Some(key) = &key
        && let Some(earlier) =
            store::claim_idempotency_key(&mut tx, key, state.idempotency_key_ttl).await?
    {
        tx.rollback().await?;
        if earlier.request != normalized {
            return Err(Problem::unprocessable(format!(
                "Idempotency-Key {key:?} was already used with a different request body"
            )));
        }
        let view: OrderView =
            serde_json::from_value(earlier.response).map_err(Problem::internal)?;
        return Ok(created(view));
    }
    let view = store::insert_order(&mut tx, &order, &state.steps, &cause).await?;
    if let Some(key) = &key {
        store::remember(&mut tx, key, &normalized, &view).await?;
    }
    tx.commit().await?;
    metrics::counter!("saga_started_total").increment(1);
    tracing::info!(order_id = %view.order_id, customer_id = %view.customer_id, items = view.items.len(), "order placed");
    Ok(created(view))
}

fn created(view: OrderView) -> Response {
    let location = format!("/orders/{}", view.order_id);
    let mut response = (StatusCode::CREATED, Json(view)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn parse_order_id(id: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(id).map_err(|_| Problem::bad_request(format!("order id {id:?} is not a UUID")))
}

/// `POST /orders/{id}/cancel`: a PENDING order goes CANCELLING (202) and emits OrderCancelled;
/// an AWAITING_PAYMENT or CONFIRMED order goes REFUNDING (202) and emits OrderRefundRequested
/// (the money first, then the stock); cancelling an order already REFUNDING, CANCELLING or
/// CANCELLED changes nothing (200); a REJECTED order cannot be cancelled (409).
async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let order_id = parse_order_id(&id)?;
    let cause = Cause {
        causation_id: None,
        traceparent: Some(service_kit::trace_context::current()),
        tracestate: None,
    };
    let mut tx = state.pool.begin().await?;
    let Some((order, _)) = store::lock_order(&mut tx, order_id).await? else {
        return Err(Problem::not_found(format!("no order {order_id}")));
    };
    let status = order.status;
    let input = Input::CancelRequested {
        reason: CancelReason::CustomerRequest,
    };
    let applied =
        transition::apply(&mut tx, order_id, &order, &input, &cause, &state.steps).await?;
    let (code, saga) = match applied {
        Ok(Applied::Changed { saga, .. }) => (StatusCode::ACCEPTED, Some(saga)),
        Ok(Applied::Ignored(_)) => (StatusCode::OK, None),
        Err(invalid) => return Err(Problem::new(StatusCode::CONFLICT, invalid.to_string())),
    };
    tx.commit().await?;
    if let Some(saga) = saga {
        saga.record();
        tracing::info!(%order_id, from = %status, "cancelled by the customer");
    }
    let view = store::view(&state.pool, order_id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no order {order_id}")))?;
    Ok((code, Json(view)).into_response())
}

async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, Problem> {
    let order_id = parse_order_id(&id)?;
    store::view(&state.pool, order_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no order {order_id}")))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
}

pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 500;

async fn list_orders(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<OrderView>>, Problem> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<OrderStatus>()
                .map_err(|e| Problem::bad_request(e.to_string()))?,
        ),
    };
    let limit =
        service_kit::http::list_limit(query.limit.as_deref(), DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    Ok(Json(store::list(&state.pool, status, limit).await?))
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}
